"""How the model is spread over processes: DDP (a full copy per GPU) or FSDP2 (`fully_shard`: weights,
gradients and optimizer states sharded over the GPUs), and the full, gathered state of a sharded model
for checkpoints, best/ and final/, samples and evaluations. With one process both are the plain model.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from csm.system.runtime import Runtime
from csm.model.weights import build_model

DISTRIBUTED = ("ddp", "fsdp")


def wrap(loss_module: nn.Module, strategy: str, rt: Runtime) -> nn.Module:
    """The loss module made ready for `rt`'s processes. FSDP shards every transformer layer, then the rest
    of the model with the loss module as the root (the loss reads embeddings and heads outside any layer,
    so they must belong to a module whose forward runs: the root's)."""
    if not rt.distributed:
        return loss_module
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard  # half a second to import: distributed runs only

        model = loss_module.model
        for stack in (model.backbone, model.decoder):
            for layer in stack.layers:
                fully_shard(layer)
        fully_shard(loss_module)
        return loss_module
    # gradient_as_bucket_view: gradients live in DDP's communication buckets (no second copy of them).
    # No static_graph: with it, the first backward under no_sync() (every micro-batch but the last when
    # grad_acc_steps > 1) fails in torch 2.11 with "expect_autograd_hooks_ INTERNAL ASSERT FAILED" (reproduced on
    # CPU with gloo, tests/training/test_ddp.py). What it saved is nothing here: find_unused_parameters stays off (every
    # micro-batch has audio targets, so every trained parameter gets a gradient), so DDP searches no graph anyway.
    return nn.parallel.DistributedDataParallel(loss_module,
                                               device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                                               gradient_as_bucket_view=True)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor  # half a second to import: paid at a run's first checkpoint

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def gradient_sync(loss_model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) of a micro-batch that is not the last."""
    if isinstance(loss_model, nn.parallel.DistributedDataParallel):
        with contextlib.nullcontext() if enabled else loss_model.no_sync():
            yield
        return
    if hasattr(loss_model, "set_requires_gradient_sync"):  # a fully_shard-ed module
        loss_model.set_requires_gradient_sync(enabled)
    yield


def _full_options():
    # half a second to import: distributed runs only
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights: gathered on every process's call (a collective), held on rank 0's CPU
    ({} elsewhere) when sharded; the plain state dict otherwise."""
    if not is_sharded(model):
        return model.state_dict()
    # half a second to import: distributed runs only
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put a whole state dict (every process holds it) back into a sharded or plain model."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    # half a second to import: distributed runs only
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def optimizer_state_dict(model: nn.Module, optimizer) -> dict:
    """The optimizer's state: gathered and keyed by parameter name when sharded (a collective), as is otherwise."""
    if not is_sharded(model):
        return optimizer.state_dict()
    # half a second to import: distributed runs only
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_optimizer_state_dict(model: nn.Module, optimizer, state: dict) -> None:
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    # half a second to import: distributed runs only
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def gathered_model(model: nn.Module, rt: Runtime) -> nn.Module | None:
    """The model whole on rank 0, for what only rank 0 does (samples, evaluations, best/ and final/): the
    model itself when it is not sharded; a gathered copy on rank 0's device when it is (every process must
    call this; ranks other than 0 get None)."""
    if not is_sharded(model):
        return model if rt.is_main else None

    state = full_state_dict(model)
    if not rt.is_main:
        return None
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave training's RNG as it was
        copy = build_model(model.config, device=rt.device, dtype=next(iter(state.values())).dtype)
    copy.load_state_dict(state)
    return copy.train(model.training)


class WholeModel:
    """`gathered_model`, gathered at most once until `drop()`: eval, best/, samples and final/ of one step share
    one copy. Every rank asks at the same points (the collective stays in step); drop it before training goes
    on, so a sharded run never holds a whole copy while it trains."""

    def __init__(self, model: nn.Module, rt: Runtime):
        self.model, self.rt = model, rt
        self._held, self._whole = False, None

    def get(self) -> nn.Module | None:
        if not self._held:
            self._whole, self._held = gathered_model(self.model, self.rt), True
        return self._whole

    def drop(self) -> None:
        self._held, self._whole = False, None
