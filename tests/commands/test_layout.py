"""The layout shows the architecture: the commands and the original's two modules at the top, the library in csm/,
one sub-package per part, each part importing only the parts below it (read from the source with ast, imports
inside functions included)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("system", "model", "data", "judging", "training")  # each imports only those before it
COMMANDS = {"train", "pretokenize", "sweep", "prepare", "generate", "evaluate", "prefer", "export", "report", "demo",
            "doctor"}
# The original repo's two modules stay on top by name. dataloaders.py batches the data part's token files for
# training, so it sits between data and judging; utils.py is the commands' edge, above the whole library.
RANK = {**{f"csm.{p}": i for i, p in enumerate(PARTS)}, "dataloaders": 2.5, "utils": len(PARTS),
        **{c: len(PARTS) + 1 for c in COMMANDS}}


def rank_of(module: str) -> float | None:
    """Where a dotted module name sits in the order; None for a module outside the project."""
    parts = module.split(".")
    if parts[0] == "csm":
        if len(parts) < 2:
            return None  # the package's own __init__ holds only its docstring
        return RANK.get(f"csm.{parts[1]}")
    return RANK.get(parts[0])


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted module) for every import; `from csm.data import token_file` names csm.data.token_file."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"line {node.lineno}: a relative import (the project imports by full name)"
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def upward_imports(name: str, source: str) -> list[str]:
    """The imports of module `name` (dotted) that reach a module ranked above it."""
    own = rank_of(name)
    return [f"{name}:{line} imports {target}" for line, target in imported_modules(ast.parse(source))
            if (r := rank_of(target)) is not None and r > own]


def project_modules() -> dict[str, Path]:
    modules = {p.stem: p for p in ROOT.glob("*.py")}
    for path in (ROOT / "csm").rglob("*.py"):
        dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[dotted.removesuffix(".__init__")] = path
    return modules


def test_no_module_imports_one_above_it():
    found = [up for name, path in project_modules().items() for up in upward_imports(name, path.read_text())]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name, source, upward", [
    ("csm.model.weights", "from csm.data import token_file\n", True),
    ("csm.data.frames", "def f():\n    import dataloaders\n", True),  # inside a function counts too
    ("csm.training.dpo", "from dataloaders import collate\n", False),
    ("csm.system.outputs", "import utils\n", True),
    ("dataloaders", "from csm.judging.metrics import METRICS\n", True),
    ("csm.judging.evaluation", "from csm.data.token_file import read\nimport torch\n", False),
])
def test_the_check_catches_an_upward_import(name, source, upward):
    assert bool(upward_imports(name, source)) == upward


def test_the_top_level_holds_the_commands_and_the_originals_two_modules():
    assert {p.stem for p in ROOT.glob("*.py")} == COMMANDS | {"dataloaders", "utils"}
    assert sorted(p.name for p in (ROOT / "csm").iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(PARTS)
    assert not [p for p in (ROOT / "csm").rglob("*.py") if p.parent.parent not in (ROOT, ROOT / "csm")]


@pytest.mark.parametrize("part", ["", *PARTS])
def test_each_part_says_what_it_is_and_reexports_nothing(part):
    tree = ast.parse((ROOT / "csm" / part / "__init__.py").read_text())
    doc = ast.get_docstring(tree)
    assert doc and len(tree.body) == 1, "an __init__.py holds its docstring and nothing else"
    if part:
        allowed = doc.split("May import:", 1)[1]
        below = PARTS[:PARTS.index(part)]
        assert all(p in allowed for p in below) or "every other part" in allowed
        assert not [p for p in PARTS[PARTS.index(part) + 1:] if p in allowed]
