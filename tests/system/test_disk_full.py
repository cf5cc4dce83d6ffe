"""A full disk, for real: each writer's output on a small tmpfs that fills up. The run ends with one line that says
what was being written and how much room is left, exits non-zero, and leaves no half-written file behind.

Mounting needs root (CI runs as root); elsewhere these tests are skipped with the reason."""
import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import write_token_file
from conftest import RUN_FLAGS, cli

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


@pytest.fixture
def small_disk(tmp_path):
    """`make(size)`: a tmpfs of that size (e.g. "64k") mounted in tmp_path, unmounted after the test."""
    mounts = []

    def make(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root; run the suite as root to test full disks")
        disk = tmp_path / f"disk{len(mounts)}"
        disk.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True,
                              text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")
        mounts.append(disk)
        return disk

    yield make
    for disk in mounts:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def assert_disk_full(rc, err, written: str):
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: no space left on the disk while writing ") and written in last, last
    assert "MiB free in" in last, last


def no_temp_files(disk: Path) -> list[str]:
    return [p.name for p in disk.rglob("*") if ".tmp" in p.name]


def test_pretokenize_on_a_full_disk(assets, small_disk, tmp_path):
    disk = small_disk("8k")
    df = pd.read_csv(SAMPLE / "train.csv").head(4)
    df["path"] = [str(SAMPLE / p) for p in df["path"]]
    df.to_csv(tmp_path / "m.csv", index=False)
    rc, err = cli("pretokenize.py", "--train_data", tmp_path / "m.csv", "--output",
                  disk / "tokens.hdf5", "--device", "cpu",
                  "--text_tokenizer", assets["text_tokenizer"], "--mimi_weights", assets["mimi"])
    assert_disk_full(rc, err, str(disk))
    assert not (disk / "tokens.hdf5").exists() and not no_temp_files(disk)


def test_export_and_generate_on_a_full_disk(assets, small_disk):
    """Their main() in this process (the command line's one line is run_cli printing this same error)."""
    import export
    import generate
    from csm.system.errors import DiskFullError

    disk = small_disk("4m")
    with pytest.raises(DiskFullError, match=f"while writing {re.escape(str(disk / 'exported'))} .* MiB free in"):
        export.main(["--model", str(assets["model"]), "--to", "official", "--output", str(disk / "exported")])
    assert sorted(p.name for p in disk.iterdir()) == []  # no temp directory, no lock
    disk = small_disk("4k")
    with pytest.raises(DiskFullError, match=f"while writing {re.escape(str(disk / 'hi.wav'))} .* MiB free in"):
        generate.main(["--model", str(assets["model"]), "--text", "Hello there.", "--output", str(disk / "hi.wav"),
                       "--device", "cpu", "--text_tokenizer", str(assets["text_tokenizer"]),
                       "--mimi_weights", str(assets["mimi"]), "--max_audio_seconds", "0.4"])
    assert sorted(p.name for p in disk.iterdir()) == []


def test_training_on_a_disk_that_fills_mid_run(assets, small_disk, tmp_path):
    """Room for the up-front check (one checkpoint) but not for the checkpoint and best/ together."""
    disk = small_disk("90m")
    data = write_token_file(tmp_path / "tokens.hdf5", n_train=8, n_val=2)
    rc, err = cli("train.py", "--data", data, "--output_dir", disk / "run", "--model", assets["model"],
                  "--max_steps", 2, *RUN_FLAGS)
    assert_disk_full(rc, err, str(disk / "run"))
    assert not no_temp_files(disk)


def test_prefer_on_a_full_disk(assets, judges, small_disk, tmp_path):
    disk = small_disk("16k")
    data = write_token_file(tmp_path / "tokens.hdf5", n_train=3, n_val=0)
    rc, err = cli("prefer.py", "--model", assets["model"], "--data", data, "--output", disk / "prefs.hdf5",
                  "--text_tokenizer", assets["text_tokenizer"], "--mimi_weights", assets["mimi"],
                  "--asr", judges["asr"], "--speaker_model", judges["speaker_model"], "--device", "cpu",
                  "--max_audio_seconds", "0.8", "--n_candidates", "2", "--no_dnsmos", "--margin", "0")
    assert_disk_full(rc, err, str(disk))
    assert not no_temp_files(disk) and not (disk / "prefs.hdf5").exists()
