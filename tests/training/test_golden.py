"""Golden runs: the losses and final weights of a tiny model, pinned, so a refactor proves it changed nothing.

Every run goes through the train.py command line (which a restructure must not change) in a fresh
process with one thread: fp32 on CPU, 4 optimizer steps of 2 accumulated micro-batches each, the
decoder on a random 1/16 of the frames (the default), validation every 2 steps. A killed-and-resumed
run (it starts from the unbroken run's step-2 checkpoint) must end bit for bit as the unbroken run on
the same machine.

The pinned values hold on any CPU: kernels for other instruction sets (AVX-512, AVX2, NEON, plain C)
add in other orders, so they are compared within a tolerance, never as a digest. The weights are pinned
as each tensor's mean absolute and mean signed update over the run (final minus initial weights): a run
on plain kernels (ATEN_CPU_CAPABILITY=default) moved them by at most 1.4e-6 relative and 2e-9 absolute
from an AVX-512 run, while one optimizer step more or less moves them by about a quarter.
If a deliberate change of the numerics moves these values, re-pin them in the same commit and say why
(`PYTHONPATH=tests python tests/training/test_golden.py FINAL_WEIGHTS INITIAL_WEIGHTS` prints the new tensor table).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, write_token_file

# Pinned from a run on the reference stack (torch 2.9.1, CPU, 1 thread); the weights from torch 2.11 on AVX-512.
GOLDEN_LOSSES = {1: 15.252863883972168, 2: 15.22420883178711, 3: 14.89719820022583, 4: 14.791470527648926}
GOLDEN_VAL = {2: 15.290760466241956, 4: 15.297225573518435}
GOLDEN_UPDATES = Path(__file__).resolve().parents[1] / "fixtures" / "golden_weight_updates.json"
LOSS_RTOL = 1e-4
UPDATE_RTOL = 1e-4  # of a tensor's mean absolute update
UPDATE_ATOL = 1e-7  # of a tensor's mean signed update (they are 3e-7 to 6e-4)


def weight_updates(final, initial) -> dict[str, tuple[float, float]]:
    """Each tensor's (mean absolute, mean signed) change from `initial` to `final` (safetensors files), in float64."""
    before = load_file(str(initial))
    return {name: (float((w.double() - before[name].double()).abs().mean()),
                   float((w.double() - before[name].double()).mean()))
            for name, w in sorted(load_file(str(final)).items())}


def run_train(assets, data, out, *extra, env=None):
    cmd = [sys.executable, "train.py", "--data", str(data), "--output_dir", str(out), "--model", str(assets["model"]),
           "--text_tokenizer", str(assets["text_tokenizer"]), "--mimi_weights", str(assets["mimi"]),
           "--device", "cpu", "--precision", "fp32", "--seed", "0", "--max_steps", "4", "--batch_size", "3",
           "--grad_acc_steps", "2", "--learning_rate", "1e-3", "--warmup_steps", "2", "--val_every", "2",
           "--save_every", "2", "--log_every", "1", "--gen_every", "0", "--wandb_mode", "disabled", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    vals = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    return losses, vals, out / "final" / "model.safetensors"


@pytest.fixture(scope="module")
def golden_data(tmp_path_factory):
    return write_token_file(tmp_path_factory.mktemp("golden") / "tokens.hdf5", n_train=10, n_val=3, seed=7)


def check(losses, vals, final, steps, assets):
    assert sorted(losses) == sorted(steps)
    for step in steps:
        assert losses[step] == pytest.approx(GOLDEN_LOSSES[step], rel=LOSS_RTOL), step
    for step in vals:
        assert vals[step] == pytest.approx(GOLDEN_VAL[step], rel=LOSS_RTOL), step
    pinned = json.loads(GOLDEN_UPDATES.read_text())
    updates = weight_updates(final, Path(assets["model"]) / "model.safetensors")
    assert sorted(updates) == sorted(pinned)
    for name, (mean_abs, mean) in updates.items():
        assert mean_abs == pytest.approx(pinned[name][0], rel=UPDATE_RTOL), name
        assert mean == pytest.approx(pinned[name][1], abs=UPDATE_ATOL), name


def test_golden_run_on_plain_cpu_kernels(assets, golden_data, tmp_path):
    """The pins hold on another instruction set: here PyTorch's plain kernels, whatever this CPU has."""
    losses, vals, final = run_train(assets, golden_data, tmp_path / "full", env={"ATEN_CPU_CAPABILITY": "default"})
    check(losses, vals, final, [1, 2, 3, 4], assets)
    assert sorted(vals) == [2, 4]


def test_golden_run_and_its_resume(assets, golden_data, tmp_path):
    full = tmp_path / "full"
    losses, vals, final = run_train(assets, golden_data, full)
    check(losses, vals, final, [1, 2, 3, 4], assets)
    assert sorted(vals) == [2, 4]
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step_0000002.pt", part / "checkpoints" / "step_0000002.pt")
    losses_r, vals_r, final_r = run_train(assets, golden_data, part, "--resume")
    check(losses_r, vals_r, final_r, [3, 4], assets)
    assert sorted(vals_r) == [4]
    # Same machine, same kernels: the resumed run is the unbroken one, bit for bit.
    assert {s: losses[s] for s in (3, 4)} == losses_r and vals_r == {4: vals[4]}
    unbroken, resumed = load_file(str(final)), load_file(str(final_r))
    assert unbroken.keys() == resumed.keys() and all(torch.equal(unbroken[k], resumed[k]) for k in unbroken)


if __name__ == "__main__":  # re-pin: see the module docstring
    print(json.dumps({k: [round(a, 12), round(b, 14)] for k,
                      (a, b) in weight_updates(*sys.argv[1:3]).items()}, indent=1))
