"""What every script shares: one-line user errors, rank-0 printing, seeding, device and precision,
process setup (compute_init/compute_cleanup) and crash-safe file writes.

Nothing here does work at import: no environment reads, no network, no CUDA, no sys.path edits.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import os
import random
import resource
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from gpu_env import driver_advice, nvidia_driver


# --------------------------------------------------------------------------- errors at the edge


class UserError(Exception):
    """Bad input from the user: shown as one line, no traceback, non-zero exit."""


# Exit status of a run that was asked to stop (SIGTERM, Ctrl-C) and saved a checkpoint first: not 0,
# so a script can tell it from a finished run; EX_TEMPFAIL, "try again" (with --resume).
EXIT_STOPPED = 75


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main(); a UserError or Ctrl-C becomes one line on stderr and a non-zero exit."""
    try:
        result = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a write outside atomic_path (an appended log, a library's own file) on a full disk
        if e.errno not in DISK_FULL_ERRNOS:
            raise
        where = Path(e.filename) if e.filename else Path.cwd()
        print(f"error: {disk_full_error(where, where)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


def print0(*args, **kwargs):
    """Print on rank 0 only (all ranks print when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


# --------------------------------------------------------------------------- seeding, device, precision


def load_env_file() -> None:
    """Settings from a .env file in the working directory (WANDB_API_KEY, HF_TOKEN, ...), through python-dotenv.
    Without it (a bare PyTorch machine), a .env file that is there is reported as not read."""
    try:
        from dotenv import load_dotenv
    except ImportError:
        if Path(".env").is_file():
            print("warning: .env was not read: python-dotenv is not installed (pip install python-dotenv)",
                  file=sys.stderr)
        return
    load_dotenv()


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


# --------------------------------------------------------------------------- crash-safe writes


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "errno = 28")


class DiskFullError(UserError):
    """A write failed because its disk (or quota) is full."""


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """Whether a failed write failed for want of space: the error says so (errno, or a library's text), or it
    is an I/O-style error and the disk it wrote to has less than 1 MiB left (torch.save says only
    "unexpected pos" when its disk fills)."""
    if isinstance(error, UserError):
        return False
    if getattr(error, "errno", None) in DISK_FULL_ERRNOS or any(t in str(error) for t in _DISK_FULL_TEXTS):
        return True
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(first_existing(Path(folder).absolute())).free < 2**20
    except OSError:
        return False


def disk_full_error(path: Path, folder: Path) -> DiskFullError:
    """One line for a write that found its disk full: what it wrote, and how much room is left there."""
    base = first_existing(Path(folder).absolute())
    try:
        free = f"{shutil.disk_usage(base).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"no space left on the disk while writing {path} ({free} in {base}); free some space "
                         "or choose an output on another disk, then run the same command again")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside `path`; once the body has written it, fsync it and rename it onto `path`.

    A crash or an exception never leaves half a file at `path` (the temp file is removed on error).
    `suffix` lets writers that insist on an extension (numpy's .npz) keep it.
    """
    path = Path(path)
    # The process id keeps two processes writing one output from sharing (and fighting over) a temp file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}{suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = is_disk_full(e, path.parent)  # asked before the temp file's space is given back
        tmp.unlink(missing_ok=True)
        if full:
            raise disk_full_error(path, path.parent) from e
        raise


def append_line(path: str | Path, line: str, sync: bool = False) -> None:
    """Append one line to a log file (fsynced with `sync`); a full disk is one line naming the file."""
    path = Path(path)
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
            if sync:
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        if is_disk_full(e, path.parent):
            raise disk_full_error(path, path.parent) from e
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file through atomic_path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def check_number(name: str, value, *, min=None, gt=None, max=None) -> None:
    """One clear error for a numeric option that is NaN, infinite or out of range."""
    import math

    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
    if min is not None and value < min:
        raise UserError(f"{name} must be >= {min}, got {value}")
    if gt is not None and value <= gt:
        raise UserError(f"{name} must be > {gt}, got {value}")
    if max is not None and value > max:
        raise UserError(f"{name} must be <= {max}, got {value}")


# --------------------------------------------------------------------------- output paths and locks


def check_output_dir(path: str | Path, what: str) -> Path:
    """An output directory that exists as a directory or can be created, and can be written."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a directory")
    base = first_existing(path.absolute())
    if not base.is_dir():
        raise UserError(f"{what} {path} is under {base}, which is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: cannot write in {base}")
    return path


def check_apart(output: str | Path, what: str, inputs, *, nested: bool = True) -> None:
    """Refuse an output that is an input, or (with `nested`, for directory outputs, which --overwrite empties)
    lies inside one or holds one: replacing it would destroy that input. `inputs` are (flag, path) pairs; None
    and paths that do not exist (hub ids) are passed over."""
    out = Path(output).expanduser().resolve()
    for flag, src in inputs:
        if src is None or not str(src) or not Path(str(src)).expanduser().exists():
            continue
        path, name = Path(str(src)).expanduser().resolve(), f"{flag} {src}" if flag else str(src)
        if path == out:
            raise UserError(f"{what} {output} is also an input ({name}); choose another output")
        if not nested:
            continue
        if out.is_relative_to(path):
            raise UserError(f"{what} {output} lies inside an input ({name}); choose an output apart from it")
        if path.is_relative_to(out):
            raise UserError(f"an input ({name}) lies inside {what} {output}; choose an output apart from it")


def check_output_file(path: str | Path, what: str, inputs=()) -> Path:
    """An output file path that is not a directory, not one of `inputs`, and whose folder can be written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; give a file name")
    check_apart(path, what, [("", src) for src in inputs], nested=False)
    check_output_dir(path.parent if str(path.parent) else Path("."), f"{what} {path}: its folder")
    return path


LOCK_NAME = ".lock"  # the lock file an output directory holds while a run writes it


def dir_entries(path: Path) -> list[str]:
    """The names in an output directory, its lock file aside ([] when it does not exist)."""
    path = Path(path)
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME) if path.is_dir() else []


def clear_dir(path: Path, keep: tuple[str, ...] = (LOCK_NAME,)) -> None:
    """Remove everything in a directory but the names in `keep` (--overwrite, once every check has passed)."""
    for p in Path(path).iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def not_a_file(path: Path) -> str:
    """Why a path that should be a regular file is not one: "not found", "is a directory", "is a FIFO ..."."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "not found"
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"is {kind}, not a regular file"


def first_existing(path: Path) -> Path:
    """The path itself, or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class OutputLock:
    """An exclusive lock on an output (a lock file beside or inside it), so that two processes never write
    the same output: the second gets one clear line. Held until released or the process ends.

    Take it before looking at the output: a run that checks first and locks after can find the output
    free, lose the race to another run that finishes it, and then replace that finished work. The lock
    file is deleted on release, so an output is left as the run found it or made it; a process that
    opened the file just before the deletion sees that it is gone and opens it anew."""

    def __init__(self, lock_file: str | Path, what: str):
        self.lock_file, self.what, self._fd = Path(lock_file), what, None

    def acquire(self) -> "OutputLock":
        import fcntl

        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(f"{self.what} is in use by another running process (lock {self.lock_file}); "
                                "wait for it to finish or choose another output") from None
            try:
                same = os.stat(self.lock_file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return self
            os.close(fd)  # locked a file its last holder had already removed: take the new one

    def release(self) -> None:
        if self._fd is not None:
            self.lock_file.unlink(missing_ok=True)  # while still held, so nobody locks the removed file
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_beside(path: str | Path, what: str) -> OutputLock:
    """The lock of a file or directory output: `<name>.lock` beside it."""
    path = Path(path)
    return OutputLock(path.with_name(path.name + ".lock"), what)


# --------------------------------------------------------------------------- integrity


def content_digest(obj) -> str:
    """sha256 over a nested structure of tensors, arrays and plain values (dict keys sorted): equal
    digests mean equal content, so a file whose bytes were damaged is caught when it is read back."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, np.ndarray):
            h.update(f"A{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=str):
                h.update(repr(k).encode())
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    walk(obj)
    return h.hexdigest()
