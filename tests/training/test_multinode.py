"""Training on two nodes, simulated on this machine: two torchrun launches of one process each, `--nnodes 2` with
c10d rendezvous on localhost (gloo). They train like one node with two processes; killed after a checkpoint and
launched again with --resume, they finish exactly as an unbroken run; and a node that cannot see the checkpoint
(an output directory that is not shared) is refused in one line."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, write_token_file
from conftest import free_port
from test_ddp import _losses, _run, _train_args

KILLED_AT = 3  # the optimizer step that never finishes: the one after the step-2 checkpoint


def _dies_in_step(path, step: int):
    """A train.py that SIGKILLs its process in optimizer step `step` (as a crash or an evicted node would)."""
    path.write_text(f"""import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import train
from csm.training import training
real, calls = training.train_step, []

def dies(*args, **kwargs):
    calls.append(1)
    if len(calls) == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

training.train_step = dies
sys.exit(train.main(sys.argv[1:]))
""")
    return path


def _nodes(script, per_node_args, port, env_extra=None):
    """Both nodes launched together; (returncode, stderr) of each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"csm-{port}",
              "--max_restarts", "0"]
    procs = [subprocess.Popen([*launch, str(script), *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for args in per_node_args]
    results = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            raise
        results.append((proc.returncode, err))
    return results


@pytest.mark.slow
def test_two_nodes_train_like_one_and_resume_exactly_after_both_are_killed(assets, tmp_path):
    data = write_token_file(tmp_path / "d.hdf5", n_train=16, n_val=4)
    common = _train_args(data, assets["model"], 5, "--val_every", "2", "--save_every", "2", "--keep_checkpoints", "5",
                         "--set", "decoder_fraction=0.5")
    one_node = tmp_path / "one_node"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
          "train.py", *common, "--output_dir", str(one_node)])

    shared = tmp_path / "shared"  # the output directory both nodes see
    results = _nodes(_dies_in_step(tmp_path / "dies.py", KILLED_AT), [[*common, "--output_dir", shared]] * 2,
                     free_port())
    assert all(rc != 0 for rc, _ in results), results
    assert sorted(p.name for p in (shared / "checkpoints").iterdir()) == ["step_0000002.pt"]
    assert not (shared / "final").exists()

    resumed = _nodes(ROOT / "train.py", [[*common, "--output_dir", shared, "--resume"]] * 2, free_port())
    assert all(rc == 0 for rc, _ in resumed), [err[-2000:] for _, err in resumed]
    logged = [json.loads(x) for x in (shared / "metrics.jsonl").read_text().splitlines()]
    by_step = {m["step"]: m["loss"] for m in logged if "loss" in m}  # steps 1-2 from the killed run, 3-5 resumed
    assert sorted(by_step) == [1, 2, 3, 4, 5]
    assert [by_step[s] for s in range(1, 6)] == pytest.approx(_losses(one_node)[0], rel=1e-6)
    a = load_file(str(one_node / "final" / "model.safetensors"))
    b = load_file(str(shared / "final" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_node_that_cannot_see_the_checkpoint_is_refused(assets, tmp_path):
    """Node B's output directory is a local one without the checkpoint (as on a disk the nodes do not share)."""
    data = write_token_file(tmp_path / "d.hdf5", n_train=8, n_val=0)
    common = _train_args(data, assets["model"], 4, "--save_every", "2")
    shared, local = tmp_path / "shared", tmp_path / "node_b_local"
    _nodes(_dies_in_step(tmp_path / "dies.py", KILLED_AT), [[*common, "--output_dir", shared]] * 2, free_port())
    assert (shared / "checkpoints" / "step_0000002.pt").is_file()
    results = _nodes(ROOT / "train.py", [[*common, "--output_dir", shared, "--resume"],
                                         [*common, "--output_dir", local, "--resume"]], free_port())
    assert all(rc != 0 for rc, _ in results)
    said = "\n".join(err for _, err in results)
    assert "must be on a filesystem every node shares" in said and "sees no checkpoint" in said
