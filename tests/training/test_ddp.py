"""torchrun with 2 CPU processes (gloo) trains like one process that sees the same global batches."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port, ROOT, run_torchrun, write_token_file


def _run(cmd, env_extra=None):
    # A crash prints every thread's Python stack (and C++ frames for torch's own errors).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1",
           "TORCH_SHOW_CPP_STACKTRACES": "1", **(env_extra or {})}
    proc = run_torchrun(cmd, cwd=ROOT, env=env, timeout=300) if "--master_port" in cmd else \
        subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    # Where a rank died, the first lines that say why (a faulthandler dump ends with a long list of modules).
    why = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line or "File " in line]
    assert proc.returncode == 0, "\n".join(why[:40]) + "\n" + proc.stderr[-1500:]
    return proc


def _losses(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if "loss" in m], [m["val_loss"] for m in lines if "val_loss" in m]


def _train_args(data, model, max_steps, *extra):
    """Flags every run here shares: tiny model, CPU, fp32, no tracking or samples, a loss logged each step."""
    return ["--data", str(data), "--model", str(model), "--max_steps", str(max_steps), "--gen_every", "0",
            "--log_every", "1", "--wandb_mode", "disabled", "--device", "cpu", "--batch_size", "2",
            "--learning_rate", "1e-3", "--warmup_steps", "1", "--set", "precision=fp32", *extra]


@pytest.mark.slow
# With conversational context: composed examples on top of the plain path (which the resume and FSDP tests
# below run under DDP too).
@pytest.mark.parametrize("context",
                         [["--set", "context_mode=same_speaker", "--set", "context_turns=2"]], ids=["context"])
def test_two_gloo_processes_match_one_process(assets, tmp_path, context):
    data = write_token_file(tmp_path / "d.hdf5", n_train=16, n_val=4,
                            speakers=3 if "context_mode=same_speaker" in context else 0)
    # With a moving average of the weights: every process keeps it and swaps it in for its validation.
    common = _train_args(data, assets["model"], 5, "--val_every", "2", "--save_every", "0",
                         "--set", "decoder_fraction=1.0", "--set", "ema_decay=0.5", *context)
    # One process, 4 micro-batches of 2 per step == 2 ranks x 2 micro-batches of 2 per step: DDP with accumulation
    # (no_sync on the first micro-batch of each step), which crashed at the first backward with static_graph.
    single = tmp_path / "single"
    _run([sys.executable, "train.py", *common, "--grad_acc_steps", "4", "--output_dir", str(single)])
    ddp = tmp_path / "ddp"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
          "train.py", *common, "--grad_acc_steps", "2", "--output_dir", str(ddp)])

    (train_1, val_1), (train_2, val_2) = _losses(single), _losses(ddp)
    assert len(train_1) == len(train_2) == 5 and len(val_1) == len(val_2) == 3
    assert train_2 == pytest.approx(train_1, rel=1e-5)
    assert val_2 == pytest.approx(val_1, rel=1e-5)
    for name in ("final", "final_ema", "best_ema"):
        a, b = (load_file(str(out / name / "model.safetensors")) for out in (single, ddp))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
    ema_val = [[json.loads(x)["ema_val_loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
                if "ema_val_loss" in x] for out in (single, ddp)]
    assert len(ema_val[0]) == 3 and ema_val[1] == pytest.approx(ema_val[0], rel=1e-5)
    # Only rank 0 writes: one metrics file, one set of checkpoints.
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step_0000005.pt"]


@pytest.mark.slow
def test_dpo_on_two_gloo_processes_matches_one_process(assets, tmp_path):
    """objective: dpo under DDP and FSDP2: pairs sharded over 2 ranks, normalised by the pairs of both, give one
    process's losses, reward numbers and weights (with the NLL term; the decoder on every frame, as each rank draws
    its own subset)."""
    from csm.training.preferences import make_preference_file

    data = make_preference_file(tmp_path / "prefs.hdf5", assets["model"], n_train=8, n_val=2)
    common = _train_args(data, assets["model"], 4, "--val_every", "2", "--save_every", "0", "--set", "objective=dpo",
                         "--set", "dpo_sft_weight=0.1")
    single, ddp, fsdp = tmp_path / "single", tmp_path / "ddp", tmp_path / "fsdp"
    _run([sys.executable, "train.py", *common, "--grad_acc_steps", "2", "--output_dir", str(single)])
    _torchrun(*common, "--grad_acc_steps", "1", "--output_dir", ddp)
    _torchrun(*common, "--grad_acc_steps", "1", "--output_dir", fsdp, "--set", "distributed=fsdp")
    a = load_file(str(single / "final" / "model.safetensors"))
    for run in (ddp, fsdp):
        rows = [[json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] for out in (single, run)]
        for key in ("loss", "dpo_loss", "reward_accuracy", "reward_margin", "chosen_logratio", "val_loss",
                    "val_reward_margin"):
            one, two = ([m[key] for m in r if key in m] for r in rows)
            assert len(one) == len(two) > 0, key
            assert two == pytest.approx(one, rel=1e-5, abs=1e-6), (run.name, key, one, two)
        b = load_file(str(run / "final" / "model.safetensors"))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{run.name} {key}")


def _torchrun(*args, processes: int = 2):
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                 str(free_port()), "train.py", *map(str, args)])


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_both_resume_exactly(assets, tmp_path):
    """distributed: fsdp (FSDP2 over 2 gloo processes, 2 micro-batches a step) gives DDP's losses, weights and weight
    average; its checkpoints gather the sharded weights, optimizer states and average, and resume exactly; samples and
    best/ come from the whole model.
    A resumed DDP run repeats an unbroken one exactly too (each rank's decoder-frame generator is saved)."""
    import shutil

    from csm.training.checkpoint import read_checkpoint
    from csm.model.weights import load_model

    data = write_token_file(tmp_path / "d.hdf5", n_train=16, n_val=4)
    # With accumulation: both wrappers skip the gradient sync of a step's first micro-batch.
    common = _train_args(data, assets["model"], 4, "--val_every", "2", "--save_every", "2", "--keep_checkpoints", "5",
                         "--set", "max_grad_norm=0.5", "--grad_acc_steps", "2", "--set", "ema_decay=0.5",
                         "--text_tokenizer", str(assets["text_tokenizer"]), "--mimi_weights", str(assets["mimi"]))
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _torchrun(*common, "--output_dir", ddp)
    _torchrun(*common, "--output_dir", fsdp, "--set", "distributed=fsdp", "--gen_every", "4",
              "--set", "gen_max_seconds=0.3")
    (train_d, val_d), (train_f, val_f) = _losses(ddp), _losses(fsdp)
    assert train_f == pytest.approx(train_d, rel=1e-5) and val_f == pytest.approx(val_d, rel=1e-5)
    # Each FSDP process averages its own shard: the average gathered into final_ema/ and best_ema/ is DDP's.
    for name in ("final", "final_ema", "best_ema"):
        a, b = (load_file(str(run / name / "model.safetensors")) for run in (ddp, fsdp))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
    assert list((fsdp / "samples").glob("step_0000004_*.wav"))
    load_model(fsdp / "best")
    state = read_checkpoint(fsdp / "checkpoints" / "step_0000002.pt")
    a = load_file(str(ddp / "final" / "model.safetensors"))
    assert state["sharded"] and set(state["model"]) == set(a)  # whole weights, official names
    assert {k: v.shape for k, v in state["ema"]["average"].items()} == {k: v.shape for k, v in state["model"].items()}

    for run, extra in ((fsdp, ("--set", "distributed=fsdp")), (ddp, ())):
        part = tmp_path / f"{run.name}-part"
        (part / "checkpoints").mkdir(parents=True)
        shutil.copy(run / "checkpoints" / "step_0000002.pt", part / "checkpoints")
        _torchrun(*common, "--output_dir", part, *extra, "--resume")
        for name in ("final", "final_ema"):  # the average too: each process takes its shard of the saved one
            whole = load_file(str(run / name / "model.safetensors"))
            c = load_file(str(part / name / "model.safetensors"))
            assert all(torch.equal(whole[k], c[k]) for k in whole), (run.name, name)
        assert _losses(part)[0] == _losses(run)[0][2:], run.name
    # A sharded checkpoint is not resumed by DDP (its optimizer state is keyed by name): one clear line.
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    shutil.copy(fsdp / "checkpoints" / "step_0000002.pt", other / "checkpoints")
    proc = run_torchrun([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                         str(free_port()), "train.py", *common, "--output_dir", str(other), "--resume"],
                        cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "distributed: fsdp" in proc.stderr
    # A DDP checkpoint resumed by one process: the number of processes is named (the loader's check came first and
    # blamed "the data, batch settings or number of processes").
    one = tmp_path / "one"
    (one / "checkpoints").mkdir(parents=True)
    shutil.copy(ddp / "checkpoints" / "step_0000002.pt", one / "checkpoints")
    proc = subprocess.run([sys.executable, "train.py", *map(str, common), "--output_dir", str(one), "--resume"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "was saved by 2 process(es); resume it with as many (this run has 1)" in proc.stderr


@pytest.mark.slow
def test_compiled_layers_under_ddp_train_like_eager_and_resume(assets, tmp_path):
    """compile: true under torchrun (DDP in a process group of one gloo process: the collectives and DDP's hooks
    run as with more) gives eager one-process training and validation losses (fp32: within 1e-5), and a resumed
    compiled run repeats the unbroken one within float rounding (a resumed run compiles for the shapes it meets
    first, and kernels generated for other shapes may add in another order). Gradient averaging over 2 processes
    is checked without compiling (test_two_gloo_processes_match_one_process): compiling costs a minute a process."""
    import shutil

    from csm.training import config
    from csm.training import training

    data = write_token_file(tmp_path / "d.hdf5", n_train=16, n_val=4)
    common = _train_args(data, assets["model"], 4, "--save_every", "2", "--keep_checkpoints", "5", "--val_every", "2",
                         "--set", "decoder_fraction=1.0", "--set", "compile=true")
    eager = tmp_path / "eager"
    cfg = config.make_config(dict(model=str(assets["model"]), max_steps=4, batch_size=2, learning_rate=1e-3,
                                  warmup_steps=1, gen_every=0, log_every=1, save_every=0, val_every=2,
                                  wandb_mode="disabled", precision="fp32", decoder_fraction=1.0))
    training.train(cfg, data, eager, device="cpu", progress=False)
    full, part = tmp_path / "full", tmp_path / "part"
    proc = _torchrun(*common, "--output_dir", full, processes=1)
    assert proc.stdout.count("compiling included") == 1, proc.stdout  # the first step's time, printed once
    assert "on cpu x1 (ddp)" in proc.stdout  # one process, and still DDP
    (train_e, val_e), (train_c, val_c) = _losses(eager), _losses(full)
    assert len(val_e) == 2 and train_c == pytest.approx(train_e, abs=1e-5) and val_c == pytest.approx(val_e, abs=1e-5)
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step_0000002.pt", part / "checkpoints")
    _torchrun(*common, "--output_dir", part, "--resume", processes=1)
    assert _losses(part)[0] == pytest.approx(_losses(full)[0][2:], abs=1e-5)
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(part / "final" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_compile_with_fsdp_is_refused_in_one_line(assets, tmp_path):
    data = write_token_file(tmp_path / "d.hdf5", n_train=8, n_val=0)
    proc = run_torchrun([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                         str(free_port()), "train.py",
                         *_train_args(data, assets["model"], 2, "--set", "compile=true", "--set", "distributed=fsdp"),
                         "--output_dir", str(tmp_path / "out")], cwd=ROOT, timeout=300,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "compile: true with distributed: fsdp" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cleanup_frees_a_sharded_model_before_the_process_group_goes(tmp_path, monkeypatch):
    """compute_cleanup releases what FSDP holds in reference cycles while the group and the interpreter are
    alive (without it they were torn down in interpreter shutdown, after destroy_process_group)."""
    import gc
    import weakref

    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from csm.system.runtime import compute_cleanup

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    gc.disable()  # the premise below must not depend on when the collector happens to run
    try:
        model = fully_shard(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1)))
        model(torch.randn(2, 4)).sum().backward()
        alive = weakref.ref(model)
        del model
        assert alive() is not None  # the premise: FSDP keeps the model in reference cycles
        seen = []
        destroy = dist.destroy_process_group
        monkeypatch.setattr(dist, "destroy_process_group", lambda *a: (seen.append(alive()), destroy(*a)))
        compute_cleanup()
        assert seen == [None] and not dist.is_initialized()
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_torchrun_whose_port_was_taken_meanwhile_is_run_again_on_another(tmp_path):
    """run_torchrun, which these tests launch torchrun with: a --master_port another process holds fails with
    EADDRINUSE before any work, and the helper runs it again on a fresh port."""
    import socket

    script = tmp_path / "hello.py"
    script.write_text("import os\nprint('rank', os.environ['RANK'])\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
               "--master_port", str(port), str(script)]
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        again = run_torchrun(cmd, timeout=120)
    assert first.returncode != 0 and "EADDRINUSE" in first.stderr  # the premise: torch's words for it
    assert again.returncode == 0 and "rank 0" in again.stdout
