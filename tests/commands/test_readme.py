"""The README matches the code: its config table, its command lines, its images, its first commands."""
import importlib
import re
import shlex

import pytest

from csm.training import config
from conftest import ROOT

README = (ROOT / "README.md").read_text()
SCRIPTS = ("prepare", "pretokenize", "train", "sweep", "evaluate", "generate", "export", "prefer")


def _command_lines() -> list[str]:
    """Shell lines of the README's code blocks, with backslash continuations joined."""
    lines = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line:
                lines.append(line)
    return lines


def _script_invocations() -> list[tuple[str, list[str]]]:
    found = []
    for line in _command_lines():
        words = shlex.split(line)
        for i, word in enumerate(words):
            name = word.removesuffix(".py")
            if word.endswith(".py") and name in SCRIPTS:
                found.append((name, words[i + 1:]))
    return found


def test_first_commands_are_make_demo_and_make_test():
    assert _command_lines()[:2] == ["make demo", "make test"]


def test_config_table_matches_the_dataclass():
    start, end = config.README_MARKERS
    table = README.split(start, 1)[1].split(end, 1)[0].strip()
    assert table == config.config_reference_markdown(), "run: python -m csm.training.config --update_readme README.md"


def test_memory_table_is_consistent_with_bench_memory():
    """The table's header, state column and max_tokens columns are bench/memory.py's (state from the real
    parameters; fits recomputed from the table's own state, activation and transient figures and the CUDA context,
    to their rounding). Re-measuring the activations and the low-memory recipes' optimizer states takes minutes:
    `python bench/memory.py --update_readme README.md` does that; here the states counted from the parameters
    are checked, and the measured ones are checked against their parts (bf16 weights and 8-bit states of both
    moments: about 4 bytes a parameter)."""
    import memory


    start, end = memory.README_MARKERS
    lines = README.split(start, 1)[1].split(end, 1)[0].strip().splitlines()
    assert "\n".join(lines[:2]) == memory.HEAD
    cells = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ")[1:] for line in lines[2:]}
    for mode, optimizer, label in memory.ROWS:
        if optimizer == "low_memory":
            model = memory.csm1b(mode, optimizer)
            total = sum(p.numel() for p in model.parameters())
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            state = float(cells[label][0]) * memory.GIB
            assert 2 * total + 2 * trained < state < 2 * total + 2.2 * trained + 0.6 * memory.GIB, label
        else:
            state = memory.state_bytes(mode, optimizer)
        for name in (label, label + ", checkpointing"):
            row = cells[name]
            assert row[0] == f"{state / memory.GIB:.1f}" or optimizer == "low_memory", name
            per_frame, fixed, transient = float(row[1]) * 2**20, float(row[2]) * memory.GIB, float(row[3]) * 2**20
            # the embedding's [frames, K+1, 2048] buffer: 0.26 MiB a frame in fp32, half that with bf16 weights
            assert transient > (0.1 if optimizer == "low_memory" else 0.2) * 2**20, name
            per_frame += transient
            for gb, cell in zip(memory.GPU_SIZES_GB, row[4:]):
                room = gb * 1e9 / memory.OVERHEAD - state - fixed - memory.CUDA_CONTEXT_GIB * memory.GIB
                if cell == "does not fit":
                    assert room < 300 * per_frame, (name, gb)
                else:
                    assert int(cell.replace(",", "")) == pytest.approx(room / per_frame, rel=0.02, abs=300), (name, gb)


def test_flop_figure_is_the_flop_counters():
    """The README's FLOPs per step are bench/train_step.py's count (torch.utils.flop_counter on the meta device)."""
    from csm.model.csm_model import ModelArgs

    import train_step


    flops = train_step.step_flops(ModelArgs())
    assert f"{flops:.3g} FLOPs forward + backward" in README and f"{flops / 4096:.3g} per frame" in README
    assert 6e9 < flops / 4096 < 9e9  # about 6 x the 1.2e9 backbone weights a frame meets, plus the decoder's share


def test_every_script_is_shown():
    assert {name for name, _ in _script_invocations()} == set(SCRIPTS)


@pytest.mark.parametrize("name,args", _script_invocations(), ids=lambda x: x if isinstance(x, str) else None)
def test_readme_command_lines_parse(name, args):
    parser = importlib.import_module(name).build_parser()
    parser.exit_on_error = False
    parser.parse_args(args)  # raises SystemExit (or ArgumentError) on an unknown flag or a bad value


def test_images_exist():
    for path in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
        assert (ROOT / path).is_file(), path


def test_config_keys_named_in_the_readme_exist():
    for key in re.findall(r"--set (\w+)=", README):
        assert key == "key" or key in config.CONFIG_KEYS, key


def test_the_table_of_parts_names_every_file_and_module_and_each_says_what_it_owns():
    """The Development table names each top-level .py file and each part of csm/ with every module in it, and
    each module opens by saying what it owns."""
    table = README.split("<!-- files:start -->", 1)[1].split("<!-- files:end -->", 1)[0]
    rows = dict(re.findall(r"^\| (.+?) \| (.+) \|$", table, flags=re.M))
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert sorted(n for row in rows for n in re.findall(r"`([\w.]+\.py)`", row)) == top
    parts = sorted(p for p in (ROOT / "csm").iterdir() if (p / "__init__.py").is_file())
    for part in parts:
        held = rows[f"`csm/{part.name}/`"]
        named = set(re.findall(r"`(\w+)`", held))
        modules = sorted(p.stem for p in part.glob("*.py") if p.stem != "__init__")
        assert [m for m in modules if m not in named] == [], part.name
    assert sorted(r for r in rows if r.startswith("`csm/")) == [f"`csm/{p.name}/`" for p in parts]
    for path in [*ROOT.glob("*.py"), *(ROOT / "csm").rglob("*.py")]:
        assert path.read_text().startswith('"""'), f"{path.relative_to(ROOT)} has no module docstring"


def test_the_formats_page_names_every_dataset_and_attribute_and_nothing_cites_an_outside_spec(tmp_path):
    """docs/formats.md is this project's own description of the token file: every dataset a split holds and every
    attribute pretokenize.py writes is named there; no file cites a specification that is not in the repository."""
    import ast
    import subprocess

    import h5py

    from csm.data.tiny_assets import make_token_file

    page = (ROOT / "docs" / "formats.md").read_text()
    with h5py.File(make_token_file(tmp_path / "t.hdf5", speakers=3), "r") as f:
        datasets = set(f["train"].keys())
    source = ast.parse((ROOT / "csm" / "data" / "encode_dataset.py").read_text())
    write_output = next(n for n in ast.walk(source) if isinstance(n, ast.FunctionDef) and n.name == "write_output")
    attrs = next(n.value for n in ast.walk(write_output)
                 if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "attrs")
    names = datasets | {k.arg for k in attrs.keywords} | {"format_version"}
    assert {"audio", "text", "length", "conversation", "turn", "speaker"} <= datasets
    assert not [n for n in names if f"`{n}`" not in page]
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.yaml"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split()
    outside = "SPEC" + " §"  # written apart, so this file does not cite it either
    assert not [f for f in files if outside in (ROOT / f).read_text()]
