"""train.py end to end on CPU with the tiny model: learning, accumulation, resume, guards, tracking."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from csm.training import config
from csm.training import objectives
from csm.training import tracking
from csm.training import training
from csm.system import runtime
from csm.system.errors import UserError
from csm.model import weights
from conftest import wandb_log, write_token_file

ROOT = Path(__file__).resolve().parents[2]


def tiny_cfg(assets, **overrides):
    values = dict(model=str(assets["model"]), text_tokenizer=str(assets["text_tokenizer"]),
                  mimi_weights=str(assets["mimi"]), batch_size=4, learning_rate=1e-3, warmup_steps=2,
                  max_steps=6, val_every=3, save_every=3, gen_every=0, log_every=1, wandb_mode="disabled",
                  precision="fp32", seed=0)
    values.update(overrides)
    return config.make_config(values)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def train_losses(out):
    return {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}


def test_tiny_model_overfits_a_tiny_dataset(assets, tmp_path):
    data = write_token_file(tmp_path / "d.hdf5", n_train=4, n_val=2, audio_frames=(4, 6), text_len=(3, 4))
    cfg = tiny_cfg(assets, max_steps=60, learning_rate=3e-3, warmup_steps=5, lr_decay="constant",
                   decoder_fraction=1.0, val_every=0, save_every=0, log_every=1)
    training.train(cfg, data, tmp_path / "out", device="cpu", progress=False)
    losses = train_losses(tmp_path / "out")
    first, last = losses[1], losses[60]
    assert first > 7.0  # ~ln(2051) at random init
    assert last < first / 3, (first, last)  # stated in the README: at least 3x lower after 60 steps


def _micro_batches(token_file, sizes):
    from dataloaders import CSMDataset, collate

    ds = CSMDataset(str(token_file), "train")
    items = [ds[i] for i in range(sum(sizes))]
    out, start = [], 0
    for n in sizes:
        out.append(collate(items[start:start + n], num_codebooks=ds.num_codebooks))
        start += n
    return out


def test_accumulation_equals_one_big_batch(assets, token_file):
    """B x 1 and B/2 x 2 (and uneven splits) give the same update when the decoder sees every frame."""
    cfg = tiny_cfg(assets, decoder_fraction=1.0, max_grad_norm=0.5)
    rt = runtime.Runtime(torch.device("cpu"))
    results = []
    for sizes in ([4], [2, 2], [1, 3]):
        model = weights.load_model(assets["model"])
        # Plain SGD makes the update the clipped gradient itself; Adam would turn float noise in
        # near-zero gradients into full-size steps and hide what is being compared.
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        stats = training.train_step(training.LossModule(model), _micro_batches(token_file, sizes), cfg, rt, "fp32",
                                 opt, scaler, torch.Generator().manual_seed(0), 32)
        results.append((stats, {k: v.clone() for k, v in model.state_dict().items()}))
    (ref_stats, ref), others = results[0], results[1:]
    for stats, state in others:
        assert stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-6)
        assert stats["grad_norm"] == pytest.approx(ref_stats["grad_norm"], rel=1e-5)
        for k in ref:
            torch.testing.assert_close(state[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    assert ref_stats["grad_norm"] > 0.5  # clipping was active


def test_schedule_counts_optimizer_steps_and_ends_at_the_last_one(assets, token_file, tmp_path):
    cfg = tiny_cfg(assets, grad_acc_steps=2, max_steps=None, n_epochs=2, warmup_steps=2, val_every=0,
                   save_every=0, learning_rate=1e-3)
    result = training.train(cfg, token_file, tmp_path / "out", device="cpu", progress=False)
    # 12 examples / batch 4 = 3 micro-batches per epoch; 2 epochs = 6 micro-batches = 3 optimizer steps.
    assert result.step == 3
    lrs = {m["step"]: m["lr"] for m in metrics(tmp_path / "out") if "lr" in m}
    assert lrs == pytest.approx({1: 5e-4, 2: 1e-3, 3: 0.0})


@pytest.mark.parametrize("context", [{}, {"context_mode": "same_speaker", "context_turns": 2},
                                     {"context_mode": "conversation", "context_loss": "all"},
                                     {"finetune": "lora", "lora_rank": 4, "lora_dropout": 0.1,
                                      "lora_modules_to_save": ["audio_head"]},
                                     {"freeze": ["backbone", "text_embeddings"]}])
def test_resume_is_bit_exact(assets, tmp_path, context):
    """N steps, stop, resume to 2N == 2N uninterrupted: weights and logged losses, mid-epoch, with accumulation,
    with conversational context (whose same_speaker draws change every epoch), and for LoRA (dropout on) and
    frozen runs, whose checkpoints hold only what trains."""
    data = write_token_file(tmp_path / "d.hdf5", n_train=10, n_val=3, speakers=2 if "context_mode" in context else 0)
    cfg = tiny_cfg(assets, grad_acc_steps=2, batch_size=3, max_steps=6, save_every=3, val_every=2, **context)
    full, part = tmp_path / "full", tmp_path / "part"
    training.train(cfg, data, full, device="cpu", progress=False)

    # The interrupted run: what the full run had on disk after step 3 (10 examples / 3 = 4 batches per
    # epoch, so step 3 ends in the middle of epoch 2).
    (part / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copy(full / "checkpoints" / "step_0000003.pt", part / "checkpoints" / "step_0000003.pt")
    state = torch.load(part / "checkpoints" / "step_0000003.pt", weights_only=True)
    assert state["loader"]["epoch"] == 1 and state["step"] == 3
    (part / "metrics.jsonl").write_text("".join(
        json.dumps(m) + "\n" for m in metrics(full) if m["step"] <= 3) + json.dumps({"step": 4, "loss": -1}) + "\n")
    training.train(cfg, data, part, device="cpu", resume="auto", progress=False)

    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(part / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = {"tokens_per_s", "step_time", "peak_memory_gb"}

    def logged(out):
        return [{k: v for k, v in m.items() if k not in timing} for m in metrics(out)]

    assert logged(part) == logged(full)


def test_a_run_on_a_format_1_file_resumes_on_its_upgrade_exactly(assets, tmp_path):
    """Trained 3 steps on a format-1 file, resumed on the same data upgraded to format 2 (pretokenize.py
    --upgrade): the same weights as an unbroken run on the old file."""
    import shutil

    import pretokenize

    old, new = write_token_file(tmp_path / "old.hdf5", n_train=10, n_val=3, version=1), tmp_path / "new.hdf5"
    assert pretokenize.main(["--upgrade", str(old), "--output", str(new)]) == 0
    cfg = tiny_cfg(assets, batch_size=3, max_steps=6, save_every=3, val_every=3)
    full, part = tmp_path / "full", tmp_path / "part"
    training.train(cfg, old, full, device="cpu", progress=False)
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step_0000003.pt", part / "checkpoints" / "step_0000003.pt")
    training.train(cfg, new, part, device="cpu", resume="auto", progress=False)
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(part / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_guard_skips_then_stops_with_a_checkpoint(assets, token_file, tmp_path):
    model = weights.load_model(assets["model"])
    with torch.no_grad():
        model.codebook0_head.weight[0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save({"model": model.state_dict(), "model_args": model.config.to_dict()}, bad)
    cfg = tiny_cfg(assets, model=str(bad), max_steps=20, max_nonfinite_steps=3, val_every=0, save_every=0)
    with pytest.raises(training.TrainingStopped, match="3 non-finite steps in a row at step 3"):
        training.train(cfg, token_file, tmp_path / "out", device="cpu", progress=False)
    assert (tmp_path / "out" / "checkpoints" / "step_0000003.pt").exists()
    logged = metrics(tmp_path / "out")
    assert [m["step"] for m in logged] == [1, 2, 3]
    # Weights were never updated with the NaN gradients.
    state = torch.load(tmp_path / "out" / "checkpoints" / "step_0000003.pt", weights_only=True)
    assert torch.equal(state["model"]["audio_head"], model.audio_head.detach())


def test_sigterm_saves_a_checkpoint_then_exits(assets, token_file, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "train.py", "--data", str(token_file), "--output_dir", str(out),
           "--model", str(assets["model"]), "--max_steps", "100000", "--val_every", "0", "--save_every", "0",
           "--gen_every", "0", "--wandb_mode", "disabled", "--device", "cpu", "--log_every", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err  # documented: stopped with a checkpoint, not finished
    assert not (out / "final").exists() and "--resume" in err
    saved = sorted((out / "checkpoints").glob("step_*.pt"))
    assert len(saved) == 1
    state = torch.load(saved[0], weights_only=True)
    assert state["step"] >= 2 and state["step"] == max(m["step"] for m in metrics(out))
    assert "SIGTERM" in err


def test_validation_is_deterministic_and_best_is_kept(assets, token_file, tmp_path):
    cfg = tiny_cfg(assets, max_steps=4, val_every=2)
    result = training.train(cfg, token_file, tmp_path / "out", device="cpu", progress=False)
    vals = [m["val_loss"] for m in metrics(tmp_path / "out") if "val_loss" in m]
    assert len(vals) == 2 and result.best_val_loss == min(vals)
    from dataloaders import CSMDataset, make_loader

    model = weights.load_model(tmp_path / "out" / "best")
    loader = make_loader(CSMDataset(str(token_file), "val"), batch_size=4, shuffle=False)
    rt = runtime.Runtime(torch.device("cpu"))
    objective = objectives.make_objective(cfg, 32)
    again = [objectives.validate(objective, training.LossModule(model), loader, rt, "fp32")["val_loss"]
             for _ in range(2)]
    assert again[0] == again[1] == pytest.approx(min(vals), rel=1e-6)


def test_checkpoints_are_complete_and_pruned(assets, token_file, tmp_path):
    cfg = tiny_cfg(assets, max_steps=6, save_every=1, keep_checkpoints=2, val_every=0)
    training.train(cfg, token_file, tmp_path / "out", device="cpu", progress=False)
    names = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert names == ["step_0000005.pt", "step_0000006.pt"]
    state = torch.load(tmp_path / "out" / "checkpoints" / "step_0000006.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "loader", "config", "step", "model_args"} <= set(state)
    assert isinstance(state["config"], dict) and state["config"]["max_steps"] == 6
    # The final model is in the hub layout and loads anywhere the official one does.
    # ... with the run's text tokenizer beside it (a local directory here), so it is its own default.
    assert sorted(p.name for p in (tmp_path / "out" / "final").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    weights.load_model(tmp_path / "out" / "final")
    weights.load_model(tmp_path / "out" / "checkpoints" / "step_0000006.pt")


def test_samples_and_offline_wandb(assets, token_file, tmp_path):
    cfg = tiny_cfg(assets, max_steps=2, warmup_steps=1, gen_every=2, gen_max_seconds=0.5, val_every=2,
                   wandb_mode="offline",
                   gen_sentences=["Hello there.", "Second one."])
    training.train(cfg, token_file, tmp_path / "out", device="cpu", progress=False)
    wavs = sorted(p.name for p in (tmp_path / "out" / "samples").iterdir())
    assert wavs == ["step_0000002_0.wav", "step_0000002_1.wav"]
    run_dirs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    files = [p.relative_to(run_dirs[0]).as_posix() for p in run_dirs[0].rglob("*") if p.is_file()]
    assert any(f.endswith(".wandb") for f in files)
    assert sum(f.startswith("files/media/audio/") and f.endswith(".wav") for f in files) == 2
    # The offline run log (protobuf) holds each metric by name with the value metrics.jsonl got.
    val = [m["val_loss"] for m in metrics(tmp_path / "out") if "val_loss" in m][-1]
    keys = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "padding_fraction",
            "peak_memory_gb", json.dumps(val))
    log = wandb_log(run_dirs[0], keys)
    for key in keys:
        assert key.encode() in log, key


def test_online_wandb_without_a_key_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(UserError, match="W&B online needs an API key"):
        tracking.wandb_mode("online")
    assert tracking.wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.wandb_mode("auto") == "online"


def test_train_from_scratch_uses_the_configured_flavors(token_file, tmp_path, assets):
    cfg = tiny_cfg(assets, train_from_scratch=True, backbone_flavor="llama-tiny", decoder_flavor="llama-tiny-decoder",
                   text_vocab_size=512, max_steps=2, warmup_steps=1, val_every=0)
    training.train(cfg, token_file, tmp_path / "out", device="cpu", progress=False)
    model = weights.load_model(tmp_path / "out" / "final")
    assert model.config.backbone_flavor == "llama-tiny" and model.config.text_vocab_size == 512


def test_missing_data_file_is_a_clear_error(assets, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        training.train(tiny_cfg(assets), tmp_path / "nope.hdf5", tmp_path / "out", device="cpu")


@pytest.mark.parametrize("processes", [1, 2], ids=["one process", "2-process DDP"])
def test_a_training_step_reads_from_the_device_once(assets, token_file, monkeypatch, processes):
    """On the meta device every host-device sync (.item(), a boolean index's nonzero, .tolist(), float())
    raises: a whole optimizer step (accumulation, clipping, AdamW) runs there but for its one read of the
    step's numbers (`read_stats`), which is counted. As one of 2 DDP processes too (a process group of the
    fake backend, whose collectives take meta tensors): the counts that normalise the loss and the step's numbers
    are all-reduced on the device, and nothing more is read. (DDP's wrapper itself cannot be built on the meta
    device, as it checks the processes' parameter shapes with .item(): the step runs on the unwrapped module,
    whose gradient sync DDP's hooks add without a read.)"""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from dataloaders import CSMDataset, make_loader
    from csm.training.optim import make_optimizer

    cfg = tiny_cfg(assets, grad_acc_steps=3, decoder_fraction=0.5)
    meta = torch.device("meta")
    with torch.device("meta"):
        model = weights.CSM(weights.load_model(assets["model"]).config)
    model.train()
    optimizer = make_optimizer(model, cfg, meta)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = list(make_loader(CSMDataset(str(token_file), "train"), batch_size=4, seed=0))[:3]
    reads, reduced = [], []
    monkeypatch.setattr(training, "read_stats", lambda t: reads.append(t.shape) or [1.0, 1.0, 1.0, 10.0, 12.0, 1.0])
    rt = runtime.Runtime(meta)
    if processes > 1:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=processes)
        rt = runtime.Runtime(meta, rank=0, world_size=processes, distributed=True)
        real = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: reduced.append(t.device.type) or real(t, *a, **k))
    try:
        stats = training.train_step(training.LossModule(model), batches, cfg, rt, "fp32", optimizer, scaler,
                                    torch.Generator().manual_seed(0), model.config.audio_num_codebooks)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert reads == [torch.Size([6])] and stats["finite"]
    assert reduced == ([] if processes == 1 else ["meta", "meta"])  # the counts, then the step's numbers
    with pytest.raises(Exception):
        torch.zeros(1, device="meta").item()  # the premise: a sync on the meta device raises


def test_the_whole_model_is_gathered_once_for_a_steps_samples_and_final(assets, tmp_path, monkeypatch):
    """Samples at the last step and final/ share one gathered copy (under FSDP each gather is a collective and
    a whole copy of the model)."""
    from csm.training import parallel

    calls = []
    real = parallel.gathered_model
    monkeypatch.setattr(parallel, "gathered_model", lambda *a: calls.append(a) or real(*a))
    data = write_token_file(tmp_path / "d.hdf5", n_train=8, n_val=0)
    training.train(tiny_cfg(assets, max_steps=2, warmup_steps=0, gen_every=2, save_every=0, gen_max_seconds=0.3), data,
                   tmp_path / "run", device="cpu", progress=False)
    assert list((tmp_path / "run" / "samples").glob("step_0000002_*.wav")) and (tmp_path / "run" / "final").is_dir()
    assert len(calls) == 1
