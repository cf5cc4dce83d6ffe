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


def test_only_keeps_the_rows_asked_for_in_order_and_the_weight_average_row_measures(tmp_path):
    """--only keeps the rows whose name matches (the first kept is the ratios' baseline); a pattern that matches
    nothing is one line. The weight average's row runs the real step with the average updated after it (tiny
    model)."""
    import pytest

    from csm.data.tiny_assets import TINY_MODEL_ARGS

    import train_step

    specs = [("a, max_tokens=4096", 1, {}), ("a, max_tokens=4096, checkpointing", 1, {}),
             ("a, max_tokens=4096, ema_decay=0.999", 1, {})]
    assert [s[0] for s in train_step.only_rows(specs, ["4096$", "ema_decay"])] == [specs[0][0], specs[2][0]]
    with pytest.raises(SystemExit, match="matches no row"):
        train_step.only_rows(specs, ["nothing"])
    data = write_token_file(tmp_path / "d.hdf5", n_train=20, n_val=0)
    result = train_step.measure(data, torch.device("cpu"), TINY_MODEL_ARGS, 2, max_tokens=512, max_seq_len=512,
                                precision="fp32", ema_decay=0.999)
    assert result["frames_per_s"] > 0
