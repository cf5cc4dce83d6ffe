"""An exponential moving average of a model's trained weights: after every optimizer step,
ema <- decay x ema + (1 - decay) x weight, in fp32 whatever the weights' dtype, on their device or the CPU.
Before `start` steps the average is the weights themselves (an average of early, fast-moving weights would
smooth toward the random start). Under FSDP each process averages its own shard of each weight; the whole average
is gathered only for a checkpoint.
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


def _local(p: torch.Tensor) -> torch.Tensor:
    """The part of a weight this process holds: its shard under FSDP (a DTensor), the weight itself otherwise."""
    return p.to_local() if hasattr(p, "to_local") else p


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
        self.average = [_local(p).detach().to(device=device or p.device, dtype=torch.float32, copy=True)
                        for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based): the weights themselves until `start`, then the moving average."""
        weights = [_local(p).detach().to(device=a.device, dtype=torch.float32)
                   for p, a in zip(self.params, self.average)]
        if step <= self.start or self.decay == 0:
            torch._foreach_copy_(self.average, weights)
        else:
            torch._foreach_lerp_(self.average, weights, 1 - self.decay)

    def state_dict(self) -> dict:
        """The whole average: gathered from every process's shard under FSDP (a collective: every process calls it)."""
        return {"decay": self.decay, "start": self.start,
                "average": {n: self._whole(p, a) for n, p, a in zip(self.names, self.params, self.average)}}

    def load_state_dict(self, state: dict) -> None:
        """Put a whole average back (every process holds it); each process keeps its own shard of it."""
        saved = state["average"]
        if set(saved) != set(self.names):
            raise UserError("the checkpoint's weight average covers other parameters than this run trains")
        for name, p, a in zip(self.names, self.params, self.average):
            a.copy_(self._shard(p, saved[name]))

    @staticmethod
    def _whole(p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if not hasattr(p, "to_local"):
            return a
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(a.to(_local(p).device), p.device_mesh, p.placements, shape=p.shape,
                                  stride=p.stride()).full_tensor().cpu()

    @staticmethod
    def _shard(p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        if not hasattr(p, "to_local"):
            return whole
        from torch.distributed.tensor import distribute_tensor

        # Every process holds the whole average: each cuts its own shard, with nothing sent.
        return distribute_tensor(whole.to(_local(p).device), p.device_mesh, p.placements, src_data_rank=None).to_local()

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """The model holds the averaged weights (cast to each weight's dtype) inside the block, its own after."""
        shards = [_local(p) for p in self.params]
        kept = [s.detach().clone() for s in shards]
        for s, a in zip(shards, self.average):
            s.copy_(a.to(device=s.device, dtype=s.dtype))
        try:
            yield
        finally:
            for s, k in zip(shards, kept):
                s.copy_(k)
