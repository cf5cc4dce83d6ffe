"""The optimizer (AdamW: fused on CUDA, or 8-bit through bitsandbytes) and the LR schedule, both
counted in optimizer steps.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from csm.system.errors import UserError

LR_DECAYS = ("linear", "cosine", "exponential", "constant")
OPTIMIZERS = ("adamw", "adamw8bit")


def make_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (ndim >= 2) only; fused on CUDA, or 8-bit via bitsandbytes."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if cfg.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise UserError("optimizer adamw8bit needs a CUDA GPU (bitsandbytes); use adamw on this device")
        try:
            import bitsandbytes as bnb  # optional: only adamw8bit needs it
        except ImportError as e:
            raise UserError("optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(groups, **kw)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kw)


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, decay: str, min_lr_ratio: float = 0.0) -> float:
    """LR factor for optimizer step `step` (0-based): linear warmup to 1 over `warmup_steps`, then
    decay that reaches its final value exactly at the last step (`total_steps - 1`).

    Final value: `min_lr_ratio` for linear/cosine; for exponential `min_lr_ratio` or 0.01 when 0.
    """
    if decay not in LR_DECAYS:
        raise ValueError(f"lr_decay {decay!r} is not one of {LR_DECAYS}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = total_steps - 1 - warmup_steps
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    if decay == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if decay == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    final = min_lr_ratio if min_lr_ratio > 0 else 0.01
    return final ** progress


def make_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The configured warmup + decay over `total_steps` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_multiplier, warmup_steps=cfg.warmup_steps, total_steps=total_steps, decay=cfg.lr_decay,
        min_lr_ratio=cfg.min_lr_ratio))
