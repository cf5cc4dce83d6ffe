"""Training-state checkpoints: one save/restore pair holding the model, optimizer, schedule, GradScaler,
every RNG (each rank's decoder-frame generator too), the data loader's position, the config and the
loop counters; written atomically with a digest of their content, read with
`torch.load(weights_only=True)` and checked against it, found (falling back past damaged ones) and pruned here.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from csm.model.adapters import is_partial, load_trainable_state, trainable_state_dict
from csm.training.parallel import (
    full_state_dict, is_sharded, load_full_state_dict, load_optimizer_state_dict, optimizer_state_dict,
)
from csm.system.outputs import content_digest, describe_change
from csm.system.runtime import print0
from csm.system.errors import UserError
from csm.system.runtime import Runtime
from csm.system.outputs import atomic_path
from csm.model.weights import check_keys, read_pt
from csm.model.conversions import clean_state_dict, model_config_dict

CHECKPOINT_FORMAT = "csm-train/1"
STEP_GLOB = "step_*.pt"


@dataclass
class LoopState:
    """The training loop's own counters, saved with every checkpoint."""

    step: int = 0
    best_val_loss: float = float("inf")
    nonfinite_streak: int = 0
    # What picked best/ so far (select_best_by), as a score where lower is better (speaker_sim negated).
    best_score: float = float("inf")
    best_ema_score: float = float("inf")  # the same for best_ema/ (ema_decay), by the average's select_best_by


def step_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:07d}.pt"


def _device_rng_state(rt: Runtime) -> torch.Tensor | None:
    """The RNG state of this process's own GPU (dropout on CUDA draws from it); None on the CPU."""
    return torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None


def _rng_state(per_rank: list[tuple]) -> dict:
    """Every RNG: the host's (as rank 0 has them), and per rank its decoder-frame generator and its GPU's state
    (each rank draws from a device of its own; none touches the others')."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda_by_rank": [cuda for _, cuda in per_rank],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
        "loss_generators": [generator for generator, _ in per_rank],  # one per rank
    }


def _set_rng_state(state: dict, rt: Runtime) -> None:
    torch.set_rng_state(state["torch"])
    if rt.device.type == "cuda":
        # Only this rank's device: setting every visible GPU's state would open a CUDA context on each of them.
        if "cuda_by_rank" in state:
            cuda = state["cuda_by_rank"][rt.rank]
        else:  # written before cuda_by_rank: rank 0's get_rng_state_all(), one state per visible device
            index = torch.cuda.current_device() if rt.device.index is None else rt.device.index
            cuda = state["cuda"][index] if index < len(state["cuda"]) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, rt.device)
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: Path, *, model, optimizer, scheduler, scaler, loader, generator: torch.Generator,
                    cfg, loop: LoopState, rt: Runtime, ema=None) -> None:
    """Write the full training state to `path` (rank 0 writes; every rank must call it)."""
    # Every rank draws its own decoder frames and its own GPU's dropout: keep each rank's, not just rank 0's.
    per_rank = [(generator.get_state(), _device_rng_state(rt))]
    if rt.distributed:
        per_rank = [None] * rt.world_size
        dist.all_gather_object(per_rank, (generator.get_state(), _device_rng_state(rt)))
    sharded = is_sharded(model)
    if sharded:  # FSDP: every rank takes part in gathering the whole model and optimizer state
        model_state, optimizer_state = full_state_dict(model), optimizer_state_dict(model, optimizer)
    else:
        # A LoRA or frozen run keeps only what trains (its base model is reloaded on resume): a small file.
        model_state = trainable_state_dict(model) if is_partial(model) else model.state_dict()
        optimizer_state = optimizer.state_dict()
    ema_state = ema.state_dict() if ema is not None else None  # gathered from every process's shard (FSDP)
    if not rt.is_main:
        return
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": loop.step,
        "model": model_state,
        "trainable_only": is_partial(model),
        "sharded": sharded,  # the optimizer state is keyed by parameter name (FSDP), not by position
        "model_args": model_config_dict(model),
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "loader": loader.state_dict(),
        "rng": _rng_state(per_rank),
        "config": cfg.to_dict(),
        "best_val_loss": loop.best_val_loss,
        "nonfinite_streak": loop.nonfinite_streak,
        "best_score": loop.best_score,
        "ema": ema_state,
        "best_ema_score": loop.best_ema_score,
        "best_by": cfg.select_best_by,
        "best_meaning": selection_meaning(cfg),
    }
    state["digest"] = content_digest(state)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint, checked: readable, of this tool's format, and its content equal to its digest.
    Checkpoints written before digests existed carry none and are accepted as they are."""
    state = read_pt(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a full training checkpoint of this tool (use --model to finetune from it)")
    digest = state.pop("digest", None)
    if digest is not None and content_digest(state) != digest:
        raise UserError(f"{path} is damaged: its content does not match the digest saved with it")
    return state


def find_resume_checkpoint(resume: str, directory: Path) -> tuple[Path, dict] | None:
    """The checkpoint to resume from, read and checked: `resume` is a path, or 'auto' for the newest usable
    step checkpoint in `directory` (a damaged one is reported and the one before it is tried). None if none."""
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise UserError(f"--resume {resume}: no such checkpoint file")
        return path, read_checkpoint(path)
    found = sorted(directory.glob(STEP_GLOB), reverse=True)
    for path in found:
        try:
            return path, read_checkpoint(path)
        except UserError as e:
            print0(f"warning: cannot resume from {path}: {e}; trying the checkpoint before it", file=sys.stderr)
    if found:
        raise UserError(f"none of the {len(found)} checkpoints in {directory} is usable; start again without --resume "
                        "(and with --overwrite)")
    return None


def restore_checkpoint(path: Path, state: dict, *, model, optimizer, scheduler, scaler, loader,
                       generator: torch.Generator, cfg, rt: Runtime, ema=None) -> LoopState:
    """Put every piece of a saved training state (as read_checkpoint returned it) back; returns the loop counters."""
    if len(state["rng"]["loss_generators"]) != rt.world_size:  # before anything that depends on it (the batches)
        raise UserError(f"{path} was saved by {len(state['rng']['loss_generators'])} process(es); "
                        f"resume it with as many (this run has {rt.world_size})")
    if bool(state.get("sharded")) != is_sharded(model):
        saved = "distributed: fsdp" if state.get("sharded") else "a single process or distributed: ddp"
        raise UserError(f"{path} was saved by {saved}; resume it the same way")
    if state.get("trainable_only"):
        load_trainable_state(model, state["model"], path)
    elif is_partial(model):
        raise UserError(f"{path} is a checkpoint of a full finetune; this run trains only part of the model: resume "
                        "with the finetune and freeze settings it was saved with")
    else:
        check_keys(model, clean_state_dict(state["model"]), path)  # a sharded model's shapes are the global ones
        load_full_state_dict(model, state["model"])
    load_optimizer_state_dict(model, optimizer, state["optimizer"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    elif ema is not None:
        print0(f"note: {path} holds no weight average (ema_decay was 0): it starts from the resumed weights")
    scheduler.load_state_dict(state["scheduler"])
    restore_scaler(scaler, state["scaler"])
    changed = sorted(key for key, v in state["config"].items() if getattr(cfg, key, v) != v)
    try:
        loader.load_state_dict(state["loader"])
    except UserError as e:
        keys = [f"{k} {state['config'][k]!r} -> {getattr(cfg, k)!r}" for k in changed]
        raise UserError(f"{path}: {e}" + (f" (config changed: {', '.join(keys)})" if keys else "")) from None
    _set_rng_state(state["rng"], rt)
    generator.set_state(state["rng"]["loss_generators"][rt.rank])
    print0(f"resumed from {path} at step "
           f"{state['step']}" + (f" (config changed: {', '.join(changed)})" if changed else ""))
    # Checkpoints from before select_best_by picked best/ by val loss; a changed select_best_by starts afresh, and
    # so does a change of what the numbers mean (dpo_beta rescales the DPO val_loss, eval_data changes the items a
    # CER is measured on): an old best would no longer be comparable, and best/ would never move again.
    best_by = state.get("best_by", "val_loss")
    best_val, best_score = state["best_val_loss"], state.get("best_score", state["best_val_loss"])
    now = selection_meaning(cfg)
    saved = state.get("best_meaning", now)
    meaning = [key for key in now if saved.get(key) != now[key]]
    best_ema = state.get("best_ema_score", float("inf")) if state.get("ema") is not None else float("inf")
    if best_by != cfg.select_best_by or meaning:  # best_ema/ is judged by select_best_by too
        best_score = best_ema = float("inf")
    if meaning:
        best_val = float("inf")
        print0(f"note: {', '.join(f'{k} {saved.get(k)!r} -> {now[k]!r}' for k in meaning)} changes what "
               f"validation measures: best/ is chosen afresh from here")
    return LoopState(state["step"], best_val, state["nonfinite_streak"], best_score, best_ema)


# The config keys that decide what the validation numbers best/ is chosen by mean: the validation loss's terms and
# scale, and the items, judges and prompts of the quality evaluation.
MEANING_KEYS = ("objective", "decoder_loss_weight", "context_mode", "context_turns", "context_loss", "max_seq_len",
                "dpo_beta", "dpo_sft_weight", "eval_data", "eval_n", "eval_max_seconds", "eval_asr",
                "eval_speaker_model", "eval_language", "gen_context", "seed")


def selection_meaning(cfg) -> dict:
    """The values of MEANING_KEYS in `cfg` (plain values, as a checkpoint stores them)."""
    values = cfg.to_dict()
    return {key: values[key] for key in MEANING_KEYS}


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict) -> None:
    """The fp16 loss scale as saved. `precision: auto` may resolve differently on the resuming machine (bf16 on an
    A100, fp16 on a V100 or T4): a run that saved none (bf16, fp32) resumes into fp16 with a fresh scale, and a
    saved scale is of no use to a run that does not scale."""
    if not scaler.is_enabled():
        return
    if not saved:
        print0("note: the checkpoint was saved without fp16 loss scaling; this run scales from the default scale")
        return
    scaler.load_state_dict(saved)


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints."""
    for old in sorted(directory.glob(STEP_GLOB))[:-keep]:
        old.unlink()


# --------------------------------------------------------------------------- averaging


def average_checkpoints(run_dir: Path, last: int) -> tuple[dict[str, torch.Tensor], dict, list[Path]]:
    """The fp32 mean of the model weights in a run's last `last` step checkpoints (by step), with the first's state
    (config, model_args, trainable_only) and the files averaged. Checkpoints that do not hold the same kind of
    model (other shapes, finetune modes or configs) are refused in one line; so is a run with fewer checkpoints."""
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        raise UserError(f"--model {run_dir} holds no checkpoints/ folder: give a training run's output directory")
    paths = sorted(directory.glob(STEP_GLOB))[-last:]
    if len(paths) < last:
        raise UserError(f"--average_last {last}: {directory} holds {len(paths)} checkpoint(s); keep more with "
                        "keep_checkpoints (or average fewer)")
    first_path, first = paths[0], read_checkpoint(paths[0])
    total = {k: v.float() for k, v in first["model"].items()}
    for path in paths[1:]:
        state = read_checkpoint(path)
        for what in ("trainable_only", "model_args", "config"):
            if state.get(what) != first.get(what):
                differ = f" ({describe_change(first[what], state[what])})" if what == "config" else ""
                raise UserError(f"{path.name} and {first_path.name} differ in {what.replace('_', ' ')}{differ}: "
                                "only checkpoints of one run's settings can be averaged")
        shapes = {k: tuple(v.shape) for k, v in state["model"].items()}
        if shapes != {k: tuple(v.shape) for k, v in total.items()}:
            raise UserError(f"{path.name} and {first_path.name} hold tensors of other names or shapes: only "
                            "checkpoints of one model can be averaged")
        for k, v in state["model"].items():
            total[k] += v.float()
    return {k: v / len(paths) for k, v in total.items()}, first, paths

