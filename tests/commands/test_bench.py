"""bench/train_step.py's GPU report, run on the CPU with a tiny model: its code runs before any GPU does."""
import torch

from conftest import write_token_file


def test_the_gpu_report_runs_every_kind_of_row(tmp_path):
    from csm.data.tiny_assets import TINY_MODEL_ARGS

    import memory
    import train_step

    data = write_token_file(tmp_path / "d.hdf5", n_train=40, n_val=0)
    # no 8-bit AdamW on a CPU; compiling is slow here
    runs = [r for r in train_step.BIG_RUNS if "8-bit" not in r[0] and "compile" not in r[0]]
    asked = []
    report = train_step.big_model_report(data, torch.device("cpu"), TINY_MODEL_ARGS, 2, memory.previous_frame_embedding,
                                         runs=runs, predict=lambda *a: asked.append(a) or 1.0)
    for name, _ in runs:
        assert f"| {name} |" in report
    bf16 = [name for name, kw in runs if kw["precision"] == "bf16"]
    assert [a[:3] for a in asked] == [("lora" if "LoRA" in n else "full", "adamw", "checkpointing" in n) for n in bf16]


def test_only_measures_the_rows_asked_for_against_the_first_of_them(capsys):
    """--only keeps the mid-flavor rows that match (here the baseline and the weight average's), in order, and the
    ratios are against the first kept; a pattern that matches nothing is one line."""
    import pytest

    import train_step

    train_step.main(["--steps", "1", "--rounds", "1", "--examples", "40", "--device", "cpu",
                     "--only", "4096$", "ema_decay"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| mid flavor")]
    names = [r.split(" | ")[0].removeprefix("| mid flavor, fp32, ") for r in rows]
    assert names == ["max_tokens=4096", "max_tokens=4096, ema_decay=0.999 (the average updated after every step)"]
    assert " | 1.00x" in rows[0]  # the baseline: the first row kept
    with pytest.raises(SystemExit, match="matches no row"):
        train_step.main(["--steps", "1", "--rounds", "1", "--examples", "40", "--device", "cpu", "--only", "nothing"])
