"""The optimizer and the LR schedule, both counted in optimizer steps. AdamW: fused on CUDA, or 8-bit through
bitsandbytes; for a full finetune on a small card, bf16 weights with a compensated update (torchao's stochastic
rounding or torch-optimi's Kahan summation), torchao's 8- or 4-bit states, and the step inside backward.
"""
from __future__ import annotations

import math
import types
from functools import partial
from typing import Callable

import torch
from torch import nn

from csm.system.errors import UserError

LR_DECAYS = ("linear", "cosine", "exponential", "constant")
OPTIMIZERS = ("adamw", "adamw8bit")
WEIGHT_DTYPES = ("fp32", "bf16")
COMPENSATIONS = ("stochastic_rounding", "kahan", "none")
OPTIMIZER_STATES = ("full", "8bit", "4bit")


def make_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (ndim >= 2) only, as the config's recipe says: fused on CUDA, 8-bit via
    bitsandbytes, bf16 weights with a compensated update, quantized states, or stepped inside backward."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer_in_backward:
        return StepInBackward([g for g in groups if g["params"]], lambda one: _adamw(one, cfg, device))
    return _adamw(groups, cfg, device)


def _adamw(groups: list[dict], cfg, device: torch.device) -> torch.optim.Optimizer:
    kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if cfg.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise UserError("optimizer adamw8bit needs a CUDA GPU (bitsandbytes); use adamw on this device")
        try:
            import bitsandbytes as bnb  # optional: only adamw8bit needs it
        except ImportError as e:
            raise UserError("optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(groups, **kw)
    bf16 = cfg.weight_dtype == "bf16"
    rounding = bf16 and cfg.bf16_compensation == "stochastic_rounding"
    if cfg.optimizer_states != "full" or rounding:
        optim = _library("torchao.optim", "torchao", f"optimizer_states: {cfg.optimizer_states}" if
                         cfg.optimizer_states != "full" else "bf16_compensation: stochastic_rounding")
        cls = {"8bit": optim.AdamW8bit, "4bit": optim.AdamW4bit, "full": optim._AdamW}[cfg.optimizer_states]
        optimizer = cls(groups, **kw, bf16_stochastic_round=rounding)
        return optimizer if device.type == "cuda" or cfg.compile else _eager(optimizer)
    if bf16 and cfg.bf16_compensation == "kahan":
        optimi = _library("optimi", "torch-optimi", "bf16_compensation: kahan")
        # decouple_lr=False: weight decay scaled by the learning rate, as torch's AdamW does.
        return optimi.AdamW(groups, **kw, kahan_sum=True, decouple_lr=False)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kw)


def _library(module: str, package: str, needed_by: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"{needed_by} needs {package}: pip install -r requirements.txt") from e


def _eager(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """torchao compiles its update for each weight's shape. On a GPU that is its speed; on the CPU it is a C++
    build of a minute or more, so there the same update runs eagerly (about 8x slower) unless `compile: true`."""
    step = optimizer.step

    def eager_step(self, *args, **kwargs):
        with torch._dynamo.config.patch(disable=True):
            return step(*args, **kwargs)

    optimizer.step = types.MethodType(eager_step, optimizer)  # a method, as the LR scheduler expects to wrap
    return optimizer


class StepInBackward(torch.optim.Optimizer):
    """The optimizer step inside backward: one optimizer per trained weight, stepped by a hook as soon as backward
    has completed that weight's gradient, which is then freed. The whole model's gradients never exist at once;
    the largest single gradient is the most held.

    A weight whose gradient is not finite is not stepped (each check is one host sync per weight). `param_groups`
    are the per-weight optimizers' own, so the LR schedule reaches them all; `step()` and `zero_grad()` have
    nothing left to do."""

    def __init__(self, groups: list[dict], make: Callable[[list[dict]], torch.optim.Optimizer]):
        self.optimizers = [make([{**g, "params": [p]}]) for g in groups for p in g["params"]]
        super().__init__([p for g in groups for p in g["params"]], {})
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        self._squares: torch.Tensor | None = None
        self.skipped = 0
        self._hooks = [o.param_groups[0]["params"][0].register_post_accumulate_grad_hook(self._stepper(o))
                       for o in self.optimizers]

    def _stepper(self, optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        def step(p: torch.Tensor) -> None:
            squares = p.grad.detach().float().square().sum()
            self._squares = squares if self._squares is None else self._squares + squares
            if torch.isfinite(squares):
                optimizer.step()
            else:
                self.skipped += 1
            p.grad = None
        return step

    def take_grad_norm(self) -> tuple[torch.Tensor, int]:
        """The global gradient norm of the weights stepped since the last call, and how many were skipped as not
        finite; both start again from zero."""
        squares, skipped = self._squares, self.skipped
        self._squares, self.skipped = None, 0
        return (torch.zeros(()) if squares is None else squares).sqrt(), skipped

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    def state_dict(self) -> dict:
        return {"per_weight": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("per_weight")
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise UserError("the checkpoint's optimizer state was not written by optimizer_in_backward for this "
                            "model: resume with the settings it was saved with")
        for o, s in zip(self.optimizers, saved):
            o.load_state_dict(s)
        # Loading replaces each optimizer's group dicts: the schedule must reach the new ones.
        self.param_groups[:] = [g for o in self.optimizers for g in o.param_groups]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's state tensors (each per-weight optimizer's, stepped in backward)."""
    inner = optimizer.optimizers if isinstance(optimizer, StepInBackward) else [optimizer]
    return sum(tensor_bytes(v) for o in inner for state in o.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's quantized states) counted by the tensors inside it."""
    if hasattr(t, "__tensor_flatten__"):
        return sum(tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def cast_weights(model: nn.Module, weight_dtype: str) -> nn.Module:
    """The model's floating-point parameters in the weights' storage dtype (buffers, such as RoPE's tables, stay
    as they are)."""
    if weight_dtype == "bf16":
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
    return model


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
