"""The README and the docs pages match the code: the config table, the command lines, the images, the links, the
first commands; and the README stays short enough to read in five minutes."""
import importlib
import re
import shlex

import pytest

from csm.training import config
from conftest import ROOT

README = (ROOT / "README.md").read_text()
PAGES = {p.name: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
EVERYTHING = "\n".join([README, *PAGES.values()])
SCRIPTS = ("prepare", "pretokenize", "train", "sweep", "evaluate", "generate", "export", "prefer", "report")


def _command_lines(text: str = EVERYTHING) -> list[str]:
    """Shell lines of the code blocks (of the README and every docs page), with backslash continuations joined."""
    lines = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
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
    assert _command_lines(README)[:2] == ["make demo", "make test"]


def test_the_readme_is_short_and_links_every_docs_page():
    """About 250 lines at most (what a newcomer reads in five minutes); the depth is in docs/, each page linked."""
    assert len(README.splitlines()) <= 250
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", README))
    assert linked == set(PAGES), set(PAGES) ^ linked


def _slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    title = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", title)
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    anchors, counts, fenced = set(), {}, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6} (.+)$", line)):
            slug = _slug(m.group(1))
            anchors.add(slug if slug not in counts else f"{slug}-{counts[slug]}")
            counts[slug] = counts.get(slug, 0) + 1
    return anchors


def _links(text: str) -> list[str]:
    """Every markdown link's target outside code (fenced blocks and `spans`)."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    return re.findall(r"\]\(([^)\s]+)\)", prose)


@pytest.mark.parametrize("name", ["README.md", *(f"docs/{n}" for n in PAGES)])
def test_every_relative_link_and_anchor_resolves(name):
    source = ROOT / name
    broken = []
    for target in _links(source.read_text()):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (source.parent / path).resolve() if path else source
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
            broken.append(f"{target} (no such heading)")
    assert not broken, broken


def test_the_link_checker_finds_a_broken_link_and_anchor():
    text = "# A title\n## Second `code` part\n[ok](#second-code-part) [bad](#nope) `[not](#a-link)`\n"
    assert _anchors(text) == {"a-title", "second-code-part"}
    assert _links(text) == ["#second-code-part", "#nope"]


def test_config_table_matches_the_dataclass():
    start, end = config.PAGE_MARKERS
    table = PAGES["config.md"].split(start, 1)[1].split(end, 1)[0].strip()
    assert table == config.config_reference_markdown(), \
        "run: python -m csm.training.config --update_page docs/config.md"


def test_memory_table_is_consistent_with_bench_memory():
    """The table's header, state column and max_tokens columns are bench/memory.py's (state from the real
    parameters; fits recomputed from the table's own state, activation and transient figures and the CUDA context,
    to their rounding). Re-measuring the activations and the low-memory recipes' optimizer states takes minutes:
    `python bench/memory.py --update_page docs/training.md` does that; here the states counted from the parameters
    are checked, and the measured ones are checked against their parts (bf16 weights and 8-bit states of both
    moments: about 4 bytes a parameter)."""
    import memory


    start, end = memory.PAGE_MARKERS
    lines = PAGES["training.md"].split(start, 1)[1].split(end, 1)[0].strip().splitlines()
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


def test_the_memory_guides_table_with_a_weight_average_is_bench_memorys():
    """The guide's rows with the average on the GPU are `bench/memory.py --ema`'s, from the guide's own table."""
    import memory

    start, end = memory.EMA_MARKERS
    assert PAGES["training.md"].split(start, 1)[1].split(end, 1)[0].strip() == memory.ema_table(PAGES["training.md"]), \
        "run: python bench/memory.py --ema --update_page docs/training.md"


def test_flop_figure_is_the_flop_counters():
    """The benchmarks page's FLOPs per step are bench/train_step.py's count (torch.utils.flop_counter on the meta
    device)."""
    from csm.model.csm_model import ModelArgs

    import train_step


    flops = train_step.step_flops(ModelArgs())
    page = PAGES["benchmarks.md"]
    assert f"{flops:.3g} FLOPs forward + backward" in page and f"{flops / 4096:.3g} per frame" in page
    assert 6e9 < flops / 4096 < 9e9  # about 6 x the 1.2e9 backbone weights a frame meets, plus the decoder's share


def test_every_script_is_shown():
    assert {name for name, _ in _script_invocations()} == set(SCRIPTS)


@pytest.mark.parametrize("name,args", _script_invocations(), ids=lambda x: x if isinstance(x, str) else None)
def test_readme_command_lines_parse(name, args):
    parser = importlib.import_module(name).build_parser()
    parser.exit_on_error = False
    parser.parse_args(args)  # raises SystemExit (or ArgumentError) on an unknown flag or a bad value


@pytest.mark.parametrize("name", ["README.md", *(f"docs/{n}" for n in PAGES)])
def test_images_exist(name):
    source = ROOT / name
    for path in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", source.read_text()):
        assert (source.parent / path).is_file(), path


def test_config_keys_named_in_the_readme_exist():
    for key in re.findall(r"--set (\w+)=", EVERYTHING):
        assert key == "key" or key in config.CONFIG_KEYS, key


def test_the_table_of_parts_names_every_file_and_module_and_each_says_what_it_owns():
    """The Development table names each top-level .py file and each part of csm/ with every module in it, and
    each module opens by saying what it owns."""
    table = PAGES["development.md"].split("<!-- files:start -->", 1)[1].split("<!-- files:end -->", 1)[0]
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
