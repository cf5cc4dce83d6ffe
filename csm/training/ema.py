"""An exponential moving average of a model's trained weights: after every optimizer step,
ema <- decay x ema + (1 - decay) x weight, in fp32 whatever the weights' dtype, on their device or the CPU.
Before `start` steps the average is the weights themselves (an average of early, fast-moving weights would
smooth toward the random start).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from csm.system.errors import UserError


def check_decay(decay: float) -> None:
    """0 (no average: the weights themselves) up to, not including, 1 (an average that never moves)."""
    if not isinstance(decay, (int, float)) or math.isnan(decay) or not 0 <= decay < 1:
        raise UserError(f"ema_decay must be at least 0 and below 1 (0.999 averages about the last 1000 steps), "
                        f"got {decay}")


class WeightEMA:
    """The average of `model`'s trained parameters (those with requires_grad: a LoRA run's adapters, a frozen run's
    unfrozen parts), kept in fp32 on `device` (None: beside each weight)."""

    def __init__(self, model: nn.Module, decay: float, start: int = 0, device: torch.device | None = None):
        check_decay(decay)
        if start < 0:
            raise UserError(f"ema_start must be 0 or more steps, got {start}")
        self.decay, self.start = float(decay), int(start)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.params = [params[n] for n in self.names]
        self.average = [p.detach().to(device=device or p.device, dtype=torch.float32, copy=True) for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based): the weights themselves until `start`, then the moving average."""
        weights = [p.detach().to(device=a.device, dtype=torch.float32) for p, a in zip(self.params, self.average)]
        if step <= self.start or self.decay == 0:
            torch._foreach_copy_(self.average, weights)
        else:
            torch._foreach_lerp_(self.average, weights, 1 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "start": self.start, "average": dict(zip(self.names, self.average))}

    def load_state_dict(self, state: dict) -> None:
        saved = state["average"]
        if set(saved) != set(self.names):
            raise UserError("the checkpoint's weight average covers other parameters than this run trains")
        for name, a in zip(self.names, self.average):
            a.copy_(saved[name])

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """The model holds the averaged weights (cast to each weight's dtype) inside the block, its own after."""
        kept = [p.detach().clone() for p in self.params]
        for p, a in zip(self.params, self.average):
            p.copy_(a.to(device=p.device, dtype=p.dtype))
        try:
            yield
        finally:
            for p, k in zip(self.params, kept):
                p.copy_(k)
