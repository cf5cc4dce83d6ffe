"""Where a run computes: the device (CUDA when it works, else the CPU, saying why CUDA is unusable), the
precision and its autocast, peak memory, and the processes torchrun starts (compute_init, compute_cleanup,
all_reduce_sum), rank-0 printing and seeding.

Nothing here does work at import: no environment reads, no CUDA.
"""
from __future__ import annotations

import contextlib
import gc
import os
import random
import resource
import sys
from dataclasses import dataclass
from typing import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from csm.system.errors import UserError
from csm.system.gpu_env import driver_advice, nvidia_driver


def print0(*args, **kwargs):
    """Print on rank 0 only (all ranks print when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


AUTO_DEVICE = (None, "", "auto")


def resolve_device(name: str | None = None) -> torch.device:
    """'auto'/None picks CUDA when present (else the CPU, saying why CUDA is unusable when this machine has an
    NVIDIA driver); an unavailable CUDA device is a user error."""
    if name in AUTO_DEVICE:
        if torch.cuda.is_available():
            return torch.device("cuda")
        warn_cuda_unusable()
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r} is not a device name (try cpu, cuda, cuda:1)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        reason = cuda_unusable_reason()
        raise UserError(f"--device {name} asked "
                        f"for CUDA, but " + (reason or "no CUDA GPU is visible; use --device cpu"))
    return device


_warned_cpu = False


def cuda_unusable_reason() -> str | None:
    """Why torch cannot use CUDA on a machine with an NVIDIA driver, with the versions and the fix, in one line;
    None on a machine without one."""
    return driver_advice(nvidia_driver(), torch.__version__, torch.version.cuda)


def warn_cuda_unusable() -> str | None:
    """On a machine with an NVIDIA driver where CUDA is unusable, say why in one line (once per process);
    returns the reason."""
    global _warned_cpu
    reason = cuda_unusable_reason()
    if reason and not _warned_cpu:
        _warned_cpu = True
        print0(f"warning: CUDA is unusable, so this runs on the CPU: {reason}", file=sys.stderr)
    return reason


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bf16 on CUDA GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise UserError("fp16 mixed precision needs a CUDA GPU; use bf16 or fp32 on this device")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """The one place mixed precision is chosen: an autocast context for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated by tensors on CUDA; the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:  # Linux: the high-water mark of this process image (getrusage's keeps the parent's peak across fork + exec)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    # ru_maxrss is in bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# --------------------------------------------------------------------------- process setup


@dataclass
class Runtime:
    """Where this process computes, and its place among the torchrun processes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # Started by torchrun, in a process group (of one process too: `torchrun --nproc_per_node 1` runs DDP or FSDP
    # and every collective, as the same run on more GPUs does).
    distributed: bool = False
    auto_device: bool = False  # the device was chosen for the user (--device auto), not named

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def compute_init(device_name: str | None) -> Runtime:
    """Device and (under torchrun) the process group, set up once."""
    auto = device_name in AUTO_DEVICE
    device = resolve_device(device_name)
    if not launched_by_torchrun():
        return Runtime(device, auto_device=auto)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Runtime(device, rank, world_size, local_rank, distributed=True, auto_device=auto)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass
class Ranks:
    """The processes torchrun started for a job whose ranks only need to agree, not to exchange tensors (each
    pretokenize.py rank encodes its own chunks): rank 0 decides what all must know, and every rank hears it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def share(self, decide: Callable[[], object]) -> object:
        """decide() run on rank 0, its result given to every rank; a UserError it raises is raised on every rank."""
        if self.world_size == 1:
            return decide()
        box = [None]
        if self.rank == 0:
            try:
                box[0] = ("value", decide())
            except UserError as e:
                box[0] = ("error", str(e))
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise UserError(value)
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


@contextlib.contextmanager
def torchrun_ranks() -> Iterator[Ranks]:
    """The ranks of this launch: under torchrun, a gloo group set up here and torn down after (no GPU memory,
    whatever the device); otherwise one rank."""
    if not launched_by_torchrun():
        yield Ranks()
        return
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo")
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    finally:
        if created:
            compute_cleanup()


def compute_cleanup() -> None:
    """Tear down what compute_init set up (the process group under torchrun).

    Garbage is collected first: a sharded model is held in reference cycles (FSDP's hooks and state), so
    without it the model, its DTensors and the group's last references outlive destroy_process_group and
    are torn down during interpreter shutdown instead, in no set order. A 2-process gloo FSDP run once
    aborted at exit ("terminate called without an active exception") after every output was written;
    this teardown is the likely place (not reproduced here)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], rt: Runtime) -> list[float]:
    """Sum a few numbers over all processes (a no-op in a single process)."""
    if not rt.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()
