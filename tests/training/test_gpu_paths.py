"""What a read of the CUDA paths found, checked where it shows on the CPU: fp16 loss scaling (with the CPU's
GradScaler and fp16 autocast), each rank's own GPU RNG state, fp16 refused under FSDP, pinned batches only for
CUDA runs, and Mimi's encoder kept out of TF32."""
import math

import pytest
import torch

from csm.training import checkpoint
from csm.training import config
from csm.training import training
from csm.system import runtime
from csm.system.errors import UserError
from csm.model import weights
from conftest import write_token_file


def _cfg(assets, **overrides):
    return config.make_config({**dict(model=str(assets["model"]), text_tokenizer=str(assets["text_tokenizer"]),
                                      mimi_weights=str(assets["mimi"]), batch_size=4,
                                      learning_rate=1e-3, warmup_steps=0,
                                      max_steps=2, val_every=0, save_every=2, gen_every=0, log_every=1,
                                      wandb_mode="disabled", precision="fp32", seed=0), **overrides})


def test_an_fp16_step_after_a_non_finite_loss_trains(assets, token_file):
    """The step after a skipped one used to raise 'unscale_() has already been called on this optimizer since
    the last update()': the skipped step unscaled but never updated. Now it lowers the scale and goes on."""
    from dataloaders import CSMDataset, make_loader
    from csm.training.optim import make_optimizer

    cfg = _cfg(assets)
    model = weights.load_model(assets["model"]).train()
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    calls = []

    class FirstLossIsNaN(training.LossModule):
        def forward(self, *args, **kwargs):
            terms = super().forward(*args, **kwargs)
            calls.append(1)
            return terms._replace(c0_sum=terms.c0_sum * math.nan) if len(calls) == 1 else terms

    batches = list(make_loader(CSMDataset(str(token_file), "train"), batch_size=4, seed=0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rt = runtime.Runtime(torch.device("cpu"))
    steps = [training.train_step(FirstLossIsNaN(model), [batch], cfg, rt, "fp16", optimizer, scaler,
                                 torch.Generator().manual_seed(0), 32) for batch in batches[:2]]
    assert [s["finite"] for s in steps] == [False, True]
    assert scaler.get_scale() == 2.0**9  # the overflowing step halved it
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the second step trained


@pytest.mark.parametrize("saved,resumed", [("fp32", "fp16"), ("fp16", "fp32")])
def test_a_run_resumes_across_loss_scaling(assets, tmp_path, monkeypatch, capsys, saved, resumed):
    """precision: auto can resolve to bf16 where a run started and to fp16 where it resumes (or back): resuming
    into fp16 from a checkpoint without a scale used to fail ('The source state dict is empty')."""
    data = write_token_file(tmp_path / "d.hdf5", n_train=8, n_val=0)
    out = tmp_path / "run"
    real = runtime.resolve_precision
    # fp16 autocast and loss scaling run on the CPU too; the tool refuses them there only because they are slow.
    monkeypatch.setattr(training, "resolve_precision", lambda p, d: "fp16" if p == "fp16" else real(p, d))
    training.train(_cfg(assets, precision=saved), data, out, device="cpu", progress=False)
    saved_scale = torch.load(out / "checkpoints" / "step_0000002.pt", weights_only=True)["scaler"]
    assert bool(saved_scale) == (saved == "fp16")
    result = training.train(_cfg(assets, precision=resumed, max_steps=4), data, out, device="cpu", resume="auto",
                            progress=False)
    assert result.step == 4
    assert ("this run scales from the default scale" in capsys.readouterr().out) == (resumed == "fp16")


def test_each_rank_keeps_and_restores_its_own_gpus_rng_state(monkeypatch):
    """Rank r saves and restores the state of its own device only: restoring every visible GPU's state opened a
    CUDA context on each (N x N contexts over N ranks), and gave rank r > 0 rank 0's copy of its device's state."""
    asked, restored = [], []
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device: asked.append(device) or torch.tensor([device.index]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state[0]), device)))
    for name in ("get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: pytest.fail(f"{name} touches every GPU"))
    ranks = [runtime.Runtime(torch.device("cuda", r), rank=r, world_size=2, local_rank=r,
                           distributed=True) for r in (0, 1)]
    generator = torch.Generator().manual_seed(0)
    state = checkpoint._rng_state([(generator.get_state(), checkpoint._device_rng_state(rt)) for rt in ranks])
    assert asked == [torch.device("cuda", 0), torch.device("cuda", 1)]
    checkpoint._set_rng_state(state, ranks[1])
    assert restored == [(1, torch.device("cuda", 1))]
    # A checkpoint written before: rank 0's states of every visible device; rank 1 takes its device's.
    old = {**{k: v for k, v in state.items() if k != "cuda_by_rank"}, "cuda": [torch.tensor([5]), torch.tensor([6])]}
    checkpoint._set_rng_state(old, ranks[1])
    assert restored[-1] == (6, torch.device("cuda", 1))
    checkpoint._set_rng_state(state, runtime.Runtime(torch.device("cpu")))  # a CPU run touches no GPU
    assert len(restored) == 2


def test_fp16_is_refused_with_fsdp(assets, monkeypatch):
    """The plain GradScaler decides per process whether a step overflowed; sharded, processes could disagree."""
    gpu = runtime.Runtime(torch.device("cuda", 0), distributed=True)
    with pytest.raises(UserError, match="fp16 with distributed: fsdp.*bf16"):
        training.run_precision(_cfg(assets, precision="fp16", distributed="fsdp"), gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # a V100 or T4: auto means fp16
    with pytest.raises(UserError, match="precision: auto picks fp16"):
        training.run_precision(_cfg(assets, precision="auto", distributed="fsdp"), gpu)
    assert training.run_precision(_cfg(assets, precision="fp16", distributed="ddp"), gpu) == "fp16"
    assert training.run_precision(_cfg(assets, precision="bf16", distributed="fsdp"), gpu) == "bf16"


def test_batches_are_pinned_only_for_a_cuda_run(assets, token_file, monkeypatch):
    from dataloaders import CSMDataset, make_loader

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU in the machine, and a CPU run
    cfg = _cfg(assets)
    for device, pinned in (("cpu", False), ("cuda", True)):
        settings = training.loader_settings(cfg, runtime.Runtime(torch.device(device)))
        loader = make_loader(CSMDataset(str(token_file), "train"), shuffle=True, num_workers=0, **settings)
        assert loader.pin_memory is pinned, device


def test_mimi_encodes_without_tf32(mimi):
    """cuDNN runs fp32 convolutions in TF32 by default on Ampere and newer; codes are encoded in full fp32."""
    import numpy as np

    from csm.model import codec

    seen = []
    real = mimi.encode
    mimi.encode = lambda *a, **k: seen.append((torch.backends.cudnn.allow_tf32,
                                               torch.backends.cudnn.enabled)) or real(*a, **k)
    try:
        codec.encode_audio(mimi, [np.zeros(1920, dtype=np.float32)], 8)
    finally:
        del mimi.encode
    assert seen == [(False, True)] and torch.backends.cudnn.allow_tf32
