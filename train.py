"""Finetune CSM-1B on a pre-tokenized HDF5 file, or train it from scratch.

    python train.py --data data.hdf5 --config configs/finetune.yaml --output_dir runs/my-voice
    torchrun --nproc_per_node 4 train.py --data data.hdf5 --config configs/finetune.yaml

One loop, read top to bottom: every count (schedule, logging, eval, saving) is in optimizer steps;
the loss of an accumulated step is normalised by the step's true number of targets; checkpoints
hold the full state and resume bit-exactly. `train()` is also what sweep.py runs for each trial.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import secrets
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import config as config_mod
import utils
from config import TrainConfig
from csm_model import ModelArgs
from utils import UserError, print0

CHECKPOINT_FORMAT = "csm-train/1"


class TrainingStopped(UserError):
    """Training could not go on (e.g. the loss kept diverging); a checkpoint was saved first."""


# --------------------------------------------------------------------------- process setup


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def compute_init(device_name: str | None) -> Runtime:
    """Device and (under torchrun) the process group, set up once."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(utils.resolve_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name in (None, "", "auto"):
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name.startswith("cuda"):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Runtime(device, rank, world_size, local_rank)


def all_reduce_sum(values: list[float], rt: Runtime) -> list[float]:
    if not rt.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------- model and optimizer


class LossModule(nn.Module):
    """Wraps the CSM so that DDP sees the whole loss computation as one forward call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, mask, decoder_fraction: float, generator: torch.Generator | None):
        return utils.compute_loss(self.model, tokens, mask, decoder_fraction=decoder_fraction, generator=generator)


def build_or_load_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    if cfg.train_from_scratch:
        args = ModelArgs(backbone_flavor=cfg.backbone_flavor, decoder_flavor=cfg.decoder_flavor,
                         text_vocab_size=cfg.text_vocab_size)
        torch.manual_seed(cfg.seed)
        return utils.build_model(args, device=device)
    return utils.load_model(cfg.model, device=device, use_official=cfg.official_model)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (ndim >= 2) only; fused on CUDA, or 8-bit via bitsandbytes."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if cfg.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise UserError("optimizer adamw8bit needs a CUDA GPU (bitsandbytes); use adamw on this device")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise UserError("optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(groups, **kw)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kw)


# --------------------------------------------------------------------------- one optimizer step


def train_step(loss_model: nn.Module, micro_batches: list, cfg: TrainConfig, rt: Runtime, precision: str,
               optimizer, scaler, generator, num_codebooks: int) -> dict:
    """Forward/backward over the micro-batches of one step, normalised by the step's total targets
    (summed over micro-batches and ranks), then clip and step. Returns the step's metrics."""
    counts = [utils.count_targets(mask, cfg.decoder_fraction, num_codebooks) for _, mask in micro_batches]
    n_c0, n_dec = all_reduce_sum([sum(c[0] for c in counts), sum(c[1] for c in counts)], rt)
    sums = torch.zeros(3, dtype=torch.float64)
    real = padded = 0
    for i, (tokens, mask) in enumerate(micro_batches):
        tokens, mask = tokens.to(rt.device, non_blocking=True), mask.to(rt.device, non_blocking=True)
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not rt.distributed else loss_model.no_sync()
        with sync:
            with utils.autocast(rt.device, precision):
                terms = loss_model(tokens, mask, cfg.decoder_fraction, generator)
            loss = utils.combine_loss(terms, int(n_c0), int(n_dec), cfg.decoder_loss_weight)
            # DDP averages gradients over ranks; the loss is already a share of the global sum.
            scaler.scale(loss * rt.world_size).backward()
        sums += torch.tensor([loss.item(), terms.c0_sum.item() / max(n_c0, 1), terms.decoder_sum.item() / max(n_dec, 1)],
                             dtype=torch.float64)
        real += int(mask.any(-1).sum())
        padded += mask.shape[0] * mask.shape[1]
    loss, c0, dec, real, padded = all_reduce_sum([*sums.tolist(), real, padded], rt)

    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")))
    finite = math.isfinite(loss) and (math.isfinite(grad_norm) or scaler.is_enabled())
    if finite:
        # With fp16 the scaler itself skips steps whose gradients overflowed and lowers the scale.
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "c0_loss": c0, "decoder_loss": dec, "grad_norm": grad_norm, "finite": finite,
            "frames": real, "padding_fraction": 1 - real / max(padded, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, loader, cfg: TrainConfig, rt: Runtime, precision: str) -> float:
    """Validation loss with the decoder on every frame: deterministic, never NaN for small batches."""
    was_training = model.training
    model.eval()
    c0 = dec = n_c0 = n_dec = 0.0
    for tokens, mask in loader:
        with utils.autocast(rt.device, precision):
            terms = utils.compute_loss(model, tokens.to(rt.device), mask.to(rt.device), decoder_fraction=1.0)
        c0, dec = c0 + terms.c0_sum.item(), dec + terms.decoder_sum.item()
        n_c0, n_dec = n_c0 + terms.n_c0, n_dec + terms.n_decoder
    c0, dec, n_c0, n_dec = all_reduce_sum([c0, dec, n_c0, n_dec], rt)
    model.train(was_training)
    w = cfg.decoder_loss_weight
    return 2 * ((1 - w) * c0 / max(n_c0, 1) + w * dec / max(n_dec, 1))


# --------------------------------------------------------------------------- tracking


class Tracker:
    """metrics.jsonl always; W&B too when enabled. Rank 0 only: other ranks get a silent one."""

    def __init__(self, path: Path | None, run=None):
        self.path, self.run = path, run

    def log(self, metrics: dict, step: int) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_audio(self, key: str, audio: np.ndarray, sample_rate: int, step: int, caption: str) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Audio(audio, sample_rate=sample_rate, caption=caption)}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_mode(requested: str) -> str:
    """Resolve 'auto'; online without a key is a user error, not a prompt or a crash."""
    if requested == "auto":
        return "online" if _wandb_key_configured() else "offline"
    if requested == "online" and not _wandb_key_configured():
        raise UserError("W&B online needs an API key: set WANDB_API_KEY in .env or run `wandb login`, "
                        "or use --wandb_mode offline (sync later with `wandb sync`) or disabled")
    return requested


def make_tracker(cfg: TrainConfig, out: Path, rt: Runtime, resumed_step: int) -> Tracker:
    if not rt.is_main:
        return Tracker(None)
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        # Drop lines past the resumed step, so a resumed run's log reads like an uninterrupted one.
        keep = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= resumed_step]
        metrics.write_text("".join(line + "\n" for line in keep))
    mode = wandb_mode(cfg.wandb_mode)
    if mode == "disabled":
        return Tracker(metrics)
    import wandb

    id_file = out / "wandb_run_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_name or out.name, group=cfg.wandb_group,
                     dir=str(out), mode=mode, id=run_id, resume="allow", config=cfg.to_dict())
    return Tracker(metrics, run)


def last_logged(output_dir: str | Path, key: str) -> float | None:
    """The last value of `key` in a run's metrics.jsonl."""
    value = None
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        value = json.loads(line).get(key, value)
    return value


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --------------------------------------------------------------------------- checkpoints


def _rng_state(generator_states: list[torch.Tensor]) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
        "loss_generators": generator_states,  # one per rank
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def atomic_torch_save(obj, path: Path) -> None:
    """Write to a temp file in the same directory, fsync, then rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: Path, *, model, optimizer, scheduler, scaler, loader, generator_states, cfg: TrainConfig,
                    step: int, best_val_loss: float, nonfinite_streak: int) -> None:
    model_args = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(vars(model.config))
    atomic_torch_save({
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "model": model.state_dict(),
        "model_args": model_args,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "loader": loader.state_dict(),
        "rng": _rng_state(generator_states),
        "config": cfg.to_dict(),
        "best_val_loss": best_val_loss,
        "nonfinite_streak": nonfinite_streak,
    }, path)


def find_resume_checkpoint(resume: str, out: Path) -> Path | None:
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise UserError(f"--resume {resume}: no such checkpoint file")
        return path
    found = sorted((out / "checkpoints").glob("step_*.pt"))
    return found[-1] if found else None


def prune_checkpoints(directory: Path, keep: int) -> None:
    for old in sorted(directory.glob("step_*.pt"))[:-keep]:
        old.unlink()


# --------------------------------------------------------------------------- samples


class SampleWriter:
    """Speech for the configured sentences, written under samples/ and sent to the tracker."""

    def __init__(self, cfg: TrainConfig, out: Path, device: torch.device):
        self.cfg, self.dir, self.device = cfg, out / "samples", device
        self._tokenizer = self._mimi = None

    def __call__(self, model: nn.Module, step: int, tracker: Tracker) -> None:
        import soundfile as sf

        from generate import synthesize

        if self._tokenizer is None:
            self._tokenizer = utils.load_text_tokenizer(self.cfg.text_tokenizer)
            self._mimi = utils.load_mimi(self.cfg.mimi_weights, device=self.device,
                                         num_codebooks=model.config.audio_num_codebooks)
        self.dir.mkdir(parents=True, exist_ok=True)
        for i, sentence in enumerate(self.cfg.gen_sentences):
            generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed + step + i)
            audio, _ = synthesize(model, self._tokenizer, self._mimi, sentence, self.cfg.gen_speaker,
                                  max_audio_seconds=self.cfg.gen_max_seconds, generator=generator)
            audio = audio.float().cpu().numpy()
            sf.write(self.dir / f"step_{step:07d}_{i}.wav", audio, utils.MIMI_SAMPLE_RATE)
            tracker.log_audio(f"sample_{i}", audio, utils.MIMI_SAMPLE_RATE, step, sentence)


# --------------------------------------------------------------------------- stop requests


class StopFlag:
    """SIGTERM or the first Ctrl-C asks the loop to save and stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.requested = True
        print0(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping",
               file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    step: int
    best_val_loss: float
    final_val_loss: float | None
    output_dir: Path
    stopped_early: bool


def train(cfg: TrainConfig, data: str | Path, output_dir: str | Path, *, device: str | None = "auto",
          resume: str | None = None, on_eval: Callable[[int, float], None] | None = None,
          progress: bool = True) -> TrainResult:
    """Run (or resume) one training run. `on_eval(step, val_loss)` may raise to stop it (sweep pruning)."""
    from dataloaders import CSMDataset, make_loader, open_splits

    rt = compute_init(device)
    out = Path(output_dir)
    ckpt_dir = out / "checkpoints"
    if rt.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        config_mod.save_yaml(cfg, out / "config.yaml")
    precision = utils.resolve_precision(cfg.precision, rt.device)
    utils.seed_everything(cfg.seed)

    # Data first: a bad file fails before minutes of model loading.
    data = str(data)
    if not Path(data).is_file():
        raise UserError(f"--data {data}: no such file (make one with pretokenize.py)")
    splits = open_splits(data)
    if "train" not in splits:
        raise UserError(f"{data} has no 'train' split (found: {', '.join(splits) or 'nothing'})")
    train_set = CSMDataset(data, "train", partial=cfg.partial_data_loading, max_seq_len=cfg.max_seq_len)
    val_set = CSMDataset(data, "val", partial=cfg.partial_data_loading, max_seq_len=cfg.max_seq_len) if "val" in splits else None
    batching = dict(max_tokens=cfg.max_tokens, batch_size=None if cfg.max_tokens else cfg.batch_size)
    shard = dict(rank=rt.rank, world_size=rt.world_size)
    train_loader = make_loader(train_set, shuffle=True, seed=cfg.seed, num_workers=cfg.num_workers, **batching, **shard)
    val_loader = make_loader(val_set, shuffle=False, num_workers=cfg.num_workers, **batching, **shard) if val_set else None
    if len(train_loader) == 0:
        raise UserError(f"{data}: the train split gives no batches on {rt.world_size} process(es)")

    model = build_or_load_model(cfg, rt.device)
    k = model.config.audio_num_codebooks
    if train_set.num_codebooks != k:
        raise UserError(f"{data} has {train_set.num_codebooks} codebooks per frame; the model expects {k}")
    if hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(cfg.activation_checkpointing)
    model.train()
    optimizer = make_optimizer(model, cfg, rt.device)
    total_steps = cfg.max_steps or math.ceil(cfg.n_epochs * len(train_loader) / cfg.grad_acc_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        utils.lr_multiplier, warmup_steps=cfg.warmup_steps, total_steps=total_steps, decay=cfg.lr_decay,
        min_lr_ratio=cfg.min_lr_ratio))
    scaler = torch.amp.GradScaler(rt.device.type, enabled=precision == "fp16")
    generator = torch.Generator().manual_seed(cfg.seed + rt.rank)  # the decoder's frame subset

    step, best_val, streak = 0, float("inf"), 0
    resume_from = find_resume_checkpoint(resume, out) if resume else None
    if resume and resume_from is None:
        print0(f"--resume auto: no checkpoint in {ckpt_dir}, starting fresh")
    if resume_from is not None:
        state = utils.load_checkpoint_file(resume_from)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{resume_from} is not a full training checkpoint of this tool (use --model to finetune from it)")
        utils.check_keys(model, utils.clean_state_dict(state["model"]), resume_from)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        train_loader.load_state_dict(state["loader"])
        _set_rng_state(state["rng"])
        if len(state["rng"]["loss_generators"]) != rt.world_size:
            raise UserError(f"{resume_from} was saved by {len(state['rng']['loss_generators'])} process(es); "
                            f"resume it with as many (this run has {rt.world_size})")
        generator.set_state(state["rng"]["loss_generators"][rt.rank])
        step, best_val, streak = state["step"], state["best_val_loss"], state["nonfinite_streak"]
        changed = sorted(key for key, v in state["config"].items() if getattr(cfg, key, v) != v)
        print0(f"resumed from {resume_from} at step {step}" + (f" (config changed: {', '.join(changed)})" if changed else ""))

    loss_model = LossModule(model)
    if rt.distributed:
        loss_model = nn.parallel.DistributedDataParallel(
            loss_model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    tracker = make_tracker(cfg, out, rt, step)
    samples = SampleWriter(cfg, out, rt.device)

    def micro_batches():
        """Micro-batches forever, crossing epochs; the loader's state says where we are."""
        while True:
            for batch in train_loader:
                yield batch
            train_loader.set_epoch(train_loader.state_dict()["epoch"] + 1)

    def checkpoint(path: Path):
        # Every rank draws its own decoder frames: keep each rank's generator, not just rank 0's.
        generators = [generator.get_state()]
        if rt.distributed:
            generators = [None] * rt.world_size
            dist.all_gather_object(generators, generator.get_state())
        if rt.is_main:
            save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                            loader=train_loader, generator_states=generators, cfg=cfg, step=step,
                            best_val_loss=best_val, nonfinite_streak=streak)

    print0(f"training {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) "
           f"on {rt.device} x{rt.world_size}, {precision}, {total_steps} steps, {len(train_set)} train examples")
    batches = micro_batches()
    final_val = None
    stopped_early = False
    pbar = tqdm(total=total_steps, initial=step, disable=not (rt.is_main and progress), desc="train", unit="step")
    with StopFlag() as stop:
        while step < total_steps:
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            stats = train_step(loss_model, [next(batches) for _ in range(cfg.grad_acc_steps)], cfg, rt, precision,
                               optimizer, scaler, generator, k)
            with warnings.catch_warnings():
                # A skipped (non-finite) step still advances the schedule: it follows optimizer steps taken.
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                scheduler.step()
            step += 1
            streak = 0 if stats["finite"] else streak + 1
            dt = time.perf_counter() - t0
            pbar.update(1)
            pbar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}")
            last = step == total_steps
            if not stats["finite"]:
                print0(f"warning: step {step}: non-finite loss or gradient (loss={stats['loss']}, "
                       f"grad_norm={stats['grad_norm']}); update skipped ({streak} in a row)")
            if step % cfg.log_every == 0 or last or not stats["finite"]:
                tracker.log({"loss": stats["loss"], "c0_loss": stats["c0_loss"], "decoder_loss": stats["decoder_loss"],
                             "lr": lr, "grad_norm": stats["grad_norm"], "tokens_per_s": stats["frames"] / dt,
                             "step_time": dt, "peak_memory_gb": peak_memory_bytes(rt.device) / 2**30,
                             "padding_fraction": stats["padding_fraction"],
                             "epoch": train_loader.state_dict()["epoch"]}, step)
            if streak >= cfg.max_nonfinite_steps:
                checkpoint(ckpt_dir / f"step_{step:07d}.pt")
                tracker.finish()
                raise TrainingStopped(f"{streak} non-finite steps in a row at step {step}; checkpoint saved in "
                                      f"{ckpt_dir}. Lower learning_rate, raise warmup_steps or use bf16/fp32.")
            if val_loader is not None and ((cfg.val_every and step % cfg.val_every == 0) or last):
                final_val = evaluate(model, val_loader, cfg, rt, precision)
                tracker.log({"val_loss": final_val}, step)
                pbar.set_postfix(loss=f"{stats['loss']:.4f}", val=f"{final_val:.4f}")
                if final_val < best_val:
                    best_val = final_val
                    if rt.is_main:
                        utils.save_pretrained(model, out / "best")
                if on_eval is not None:
                    on_eval(step, final_val)
            if rt.is_main and cfg.gen_every and step % cfg.gen_every == 0:
                samples(model, step, tracker)
            if (cfg.save_every and step % cfg.save_every == 0) or last or stop.requested:
                checkpoint(ckpt_dir / f"step_{step:07d}.pt")
                if rt.is_main:
                    prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
            if stop.requested:
                stopped_early = not last
                break
    pbar.close()
    if rt.is_main and not stopped_early:
        utils.save_pretrained(model, out / "final")
    tracker.finish()
    if rt.distributed:
        dist.barrier()
    print0(f"{'stopped' if stopped_early else 'done'} at step {step}; outputs in {out}"
           + (f"; best val loss {best_val:.4f}" if math.isfinite(best_val) else ""))
    return TrainResult(step, best_val, final_val, out, stopped_early)


# --------------------------------------------------------------------------- command line

# Flags that set a config key of the same name (None = keep the YAML's value).
CONFIG_FLAGS = {
    "n_epochs": int, "max_steps": int, "val_every": int, "save_every": int, "gen_every": int, "log_every": int,
    "seed": int, "batch_size": int, "max_tokens": int, "grad_acc_steps": int, "learning_rate": float,
    "model": str, "precision": str, "wandb_project": str, "wandb_name": str, "wandb_mode": str,
    "gen_speaker": int, "num_workers": int, "text_tokenizer": str, "mimi_weights": str,
    "warmup_steps": int, "lr_decay": str, "weight_decay": float, "max_grad_norm": float,
    "decoder_loss_weight": float, "keep_checkpoints": int,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Finetune CSM-1B, or train it from scratch, on a pre-tokenized HDF5 file.")
    p.add_argument("--data", required=True, help="HDF5 file written by pretokenize.py (or the original tool)")
    p.add_argument("--config", help="YAML config (configs/finetune.yaml, configs/pretrain.yaml)")
    p.add_argument("--output_dir", default="./runs/exp", help="checkpoints, samples, metrics.jsonl, best/ and final/")
    p.add_argument("--resume", nargs="?", const="auto", metavar="PATH|auto",
                   help="continue from a checkpoint; 'auto' (or no value) takes the latest in output_dir")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (torchrun sets one GPU per process)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    p.add_argument("--train_from_scratch", action="store_true", default=None, help="random init instead of --model")
    p.add_argument("--partial_data_loading", action="store_true", default=None, help="read examples lazily from disk")
    p.add_argument("--gen_sentence", action="append", dest="gen_sentences", metavar="TEXT",
                   help="sentence for audio samples (repeat for several, or give a .txt file with one per line)")
    p.add_argument("--use_amp", action="store_true", help="compatibility with the original: same as --precision auto")
    p.add_argument("--wandb_api_key", help="compatibility with the original; prefer WANDB_API_KEY in .env")
    for key, tp in CONFIG_FLAGS.items():
        p.add_argument(f"--{key}", type=tp, default=None, help=f"config key {key}")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {key: getattr(args, key) for key in CONFIG_FLAGS if getattr(args, key) is not None}
    for key in ("train_from_scratch", "partial_data_loading"):
        if getattr(args, key):
            overrides[key] = True
    if args.use_amp:
        overrides.setdefault("precision", "auto")
    if args.gen_sentences:
        sentences = []
        for s in args.gen_sentences:
            path = Path(s)
            sentences += [line.strip() for line in path.read_text().splitlines() if line.strip()] \
                if s.endswith(".txt") and path.is_file() else [s]
        overrides["gen_sentences"] = sentences
    overrides.update(config_mod.parse_set(args.set))
    return config_mod.load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dotenv import load_dotenv

    load_dotenv()
    if args.wandb_api_key:
        os.environ["WANDB_API_KEY"] = args.wandb_api_key
    cfg = config_from_args(args)
    try:
        train(cfg, args.data, args.output_dir, device=args.device, resume=args.resume)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    utils.run_cli(main)
