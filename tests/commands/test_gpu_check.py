"""bench/gpu_check.py: its every row runs on the CPU (--quick) in an environment holding only a stock PyTorch
image's packages and the wheelhouse, so the GPU run cannot rot; a failing, dying or hanging row is one row's
result; the make targets that run it and fetch its wheels."""
import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

import gpu_check
from conftest import ROOT


def stock_environment(directory: Path) -> Path:
    """A virtual environment holding only STOCK and WHEELHOUSE and what they need (linked from this one): what a
    stock PyTorch machine has after `pip install .whl/*.whl`. Returns its python."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    dists, todo = {}, list(gpu_check.STOCK + gpu_check.WHEELHOUSE)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in dists:
            continue
        try:
            dists[name] = dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional need that this environment does not have either
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(directory)], check=True)
    site = directory / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for dist in dists.values():
        for file in dist.files or []:
            top = file.parts[0]
            if top != ".." and not (site / top).exists():
                (site / top).symlink_to(dist.locate_file(top))
    return directory / "bin" / "python"


@pytest.mark.slow
def test_every_row_runs_on_the_cpu_with_only_a_stock_pytorch_and_the_wheelhouse(tmp_path):
    python = stock_environment(tmp_path / "env")
    hidden = subprocess.run([python, "-c", "import optuna"], capture_output=True, text=True)
    assert "No module named 'optuna'" in hidden.stderr  # the premise: the rest of requirements.txt is not there
    out = tmp_path / "report"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # No row has a time limit on the CPU (a busy machine is slow, not broken); this one is for a hang, far above the
    # 3 minutes the check takes here alone.
    proc = subprocess.run([python, "bench/gpu_check.py", "--output", str(out), "--device", "cpu", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600, env={**env, "OMP_NUM_THREADS": "1"})
    report = json.loads((out / "gpu_check.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    failed = {name: r["figure"] for name, r in rows.items() if r["status"] == "fail"}
    assert proc.returncode == 0 and not failed, (failed, (out / "gpu_check.log").read_text()[-3000:])
    assert list(rows) == [name for name, *_ in gpu_check.ROWS]
    skipped = {name for name, r in rows.items() if r["status"] == "skip"}
    # CUDA only, or left out of a quick CPU run, each saying so
    assert skipped == {"fp16", "compile", "adamw8bit", "csm1b_compile", "csm1b_generate_compiled"}
    assert "needs CUDA" in rows["fp16"]["figure"] and "needs CUDA" in rows["adamw8bit"]["figure"]
    assert "DDP on" in rows["ddp"]["figure"] and "FSDP on" in rows["fsdp"]["figure"]
    assert "sharded weight average written" in rows["fsdp"]["figure"]
    assert "killed in step" in rows["resume"]["figure"]
    assert "3 of 3 greedy rows equal to eager" in rows["generate"]["figure"]
    table = (out / "gpu_check.md").read_text()
    assert all(f"| {name} |" in table for name in rows) and "| 1B, bf16, LoRA |" in table  # the 1B tables follow
    assert "===== csm1b_generate" in (out / "gpu_check.log").read_text()


def _raises(ctx):
    raise RuntimeError("broken\nsecond line")


def _dies(ctx):
    os._exit(7)


def _hangs(ctx):
    time.sleep(60)


def _skips(ctx):
    raise gpu_check.Skip("not here")


def _passes(ctx):
    print("some output")
    return True, "fine"


def test_a_failing_dying_or_hanging_row_is_that_rows_result(tmp_path):
    ctx = gpu_check.Context("cpu", True, tmp_path)
    results = {fn.__name__: gpu_check.run_row(fn.__name__, fn, ctx, 2.0, tmp_path / f"{fn.__name__}.log")
               for fn in (_raises, _dies, _hangs, _skips, _passes)}
    assert results["_raises"]["status"] == "fail" and results["_raises"]["figure"] == "RuntimeError: broken"
    assert "Traceback" in (tmp_path / "_raises.log").read_text()
    assert results["_dies"]["figure"] == "the row's process died (exit status 7) before reporting"
    assert results["_hangs"] == {"status": "fail", "figure": "timed out after 2 s", "seconds": 2.0}
    assert results["_skips"]["status"] == "skip" and results["_skips"]["figure"] == "not here"
    assert results["_passes"]["status"] == "pass" and (tmp_path / "_passes.log").read_text() == "some output\n"


def test_bad_arguments_are_one_line_each(tmp_path, capsys):
    for argv, message in ((["--output", str(tmp_path), "--only", "nosuch"], "no row named nosuch"),
                          (["--output", str(tmp_path), "--part", "4"], "invalid choice: 4"),
                          (["--device", "cpu"], "--output is required")):
        with pytest.raises(SystemExit) as e:
            gpu_check.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "gpu_check.json").write_text("{}")
    with pytest.raises(SystemExit):
        gpu_check.main(["--output", str(tmp_path), "--device", "cpu"])
    assert "already holds a check's report" in capsys.readouterr().err
    # This machine has no GPU: --device cuda (the default) is one line and exit 2, before any row.
    assert gpu_check.main(["--output", str(tmp_path / "new")]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_the_csm1b_rows_come_first_and_each_part_fits_one_ten_minute_command_with_room():
    parts = [part for name, _, _, part, _ in gpu_check.ROWS if name != "setup"]
    assert gpu_check.ROWS[0][0] == "setup" and parts == sorted(parts)  # part 1 (CSM-1B) before part 2
    assert all(name.startswith(("csm1b", "mimi")) for name, _, _, part, _ in gpu_check.ROWS if part == 1)
    for part, budget in gpu_check.PART_BUDGETS.items():
        assert budget == sum(limit for _, _, _, p, limit in gpu_check.ROWS if p in (0, part)) <= 450
    # Parts 1 and 2 in one 15-minute lease, less the machine's start; part 3 in another.
    assert gpu_check.PART_BUDGETS[1] + gpu_check.PART_BUDGETS[2] <= 15 * 60 - 120
    readme = " ".join((ROOT / "docs" / "benchmarks.md").read_text().split())
    for part, budget in gpu_check.PART_BUDGETS.items():  # the docs' commands for a short GPU window
        assert f"gpu_check.py --output gpu_check_out --part {part}" in readme and f"at most {budget} s" in readme
    assert ", ".join(f"`{name}` {limit}" for name, _, _, part, limit in gpu_check.ROWS if part == 1) in readme


def test_the_second_part_joins_the_first_parts_report(tmp_path, monkeypatch):
    """--part 1 then --part 2 on one --output: one report with both parts' rows in order; a part run again, or a
    whole check over a part's report, needs --overwrite."""
    ran = tmp_path / "ran"  # the rows run in processes of their own

    def row(name):
        def fn(ctx):
            with open(ran, "a") as f:
                f.write(name + "\n")
            if name == "setup":
                (ctx.work / "env.json").write_text("{}")
            if name == "csm1b_train":
                (ctx.work / "csm1b_train.md").write_text("| 1B table |")
            return True, f"{name} ok"
        return fn

    rows = [("setup", "s", row("setup"), 0, 5), ("csm1b_train", "big", row("csm1b_train"), 1, 5),
            ("bf16", "tiny", row("bf16"), 2, 5), ("lora", "tiny", row("lora"), 2, 5)]
    monkeypatch.setattr(gpu_check, "ROWS", rows)
    monkeypatch.setattr(gpu_check, "cuda_visible", lambda: True)
    out = tmp_path / "report"
    assert gpu_check.main(["--output", str(out), "--part", "2"]) == 0
    assert gpu_check.main(["--output", str(out), "--part", "1"]) == 0
    assert ran.read_text().split() == ["setup", "bf16", "lora", "setup", "csm1b_train"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert [r["row"] for r in report["rows"]] == ["setup", "csm1b_train", "bf16", "lora"]
    table = (out / "gpu_check.md").read_text()
    assert "| bf16 | tiny | pass | bf16 ok |" in table and "| 1B table |" in table
    log = (out / "gpu_check.log").read_text()
    assert "===== bf16" in log and "===== csm1b_train" in log
    for again in (["--part", "1"], []):
        with pytest.raises(SystemExit):
            gpu_check.main(["--output", str(out), *again])


def test_make_targets_run_the_check_and_fetch_its_wheels_at_the_pinned_versions():
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line)
    dry = subprocess.run(["make", "-n", "wheelhouse", "PYTHON_VERSION=3.12", f"PYTHON={sys.executable}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "pip download --no-deps --only-binary=:all: --python-version 3.12" in dry and "-d .whl" in dry
    assert all(f" {name}=={pins[name]}" in dry for name in gpu_check.WHEELHOUSE)
    dry = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "bench/gpu_check.py --output gpu_check_out" in dry and ".venv" not in dry  # the machine's own python


def test_without_python_dotenv_a_present_env_file_is_reported_as_not_read(tmp_path, monkeypatch, capsys):
    """train.py and sweep.py on a bare PyTorch machine: python-dotenv is not there (an import of None fails)."""
    from utils import load_env_file

    monkeypatch.setitem(sys.modules, "dotenv", None)
    monkeypatch.chdir(tmp_path)
    load_env_file()
    assert capsys.readouterr().err == ""  # no .env: nothing to say
    (tmp_path / ".env").write_text("WANDB_API_KEY=x\n")
    load_env_file()
    assert ".env was not read: python-dotenv is not installed" in capsys.readouterr().err
