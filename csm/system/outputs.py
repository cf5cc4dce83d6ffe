"""Output files and directories: written to a temporary file, synced, then renamed (atomic_path), never
half-written on a full disk; refused when they would overwrite or sit inside an input; and locked, so that a
run takes its output before it looks at it (OutputLock); content digests catch a file damaged after it was written.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from csm.system.errors import DiskFullError, UserError

# --------------------------------------------------------------------------- crash-safe writes


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "errno = 28")


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


def check_output_file(path: str | Path, what: str, inputs: "Inputs" = ()) -> Path:
    """An output file path that is not a directory, not one of `inputs` ((flag, path) pairs), and whose folder can
    be written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; give a file name")
    check_apart(path, what, inputs, nested=False)
    check_output_dir(path.parent if str(path.parent) else Path("."), f"{what} {path}: its folder")
    return path


LOCK_NAME = ".lock"  # the lock file earlier versions put inside an output directory (passed over as no content)


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
    """An exclusive lock on an output (a lock file beside it), so that two processes never write
    the same output: the second gets one clear line. Held until released or the process ends.

    Take it before looking at the output: a run that checks first and locks after can find the output
    free, lose the race to another run that finishes it, and then replace that finished work. The lock
    file is deleted on release, so an output is left as the run found it or made it; a process that
    opened the file just before the deletion sees that it is gone and opens it anew."""

    def __init__(self, lock_file: str | Path, what: str):
        self.lock_file, self.what, self._fd = Path(lock_file), what, None

    def acquire(self) -> "OutputLock":
        import fcntl

        while True:
            try:
                self.lock_file.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:  # a directory where the lock file goes, a folder that cannot be written
                why = "a directory is in its place" if self.lock_file.is_dir() else (e.strerror or str(e)).lower()
                raise UserError(f"{self.what}: cannot take its lock {self.lock_file} ({why}); move that out of the "
                                "way, or choose another output") from None
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
    """The one lock of an output, file or directory, whichever command takes it: `<name>.lock` beside the output's
    real path (so a symlink to it and a relative path to it take the same lock)."""
    path = Path(path).expanduser().resolve()
    return OutputLock(path.with_name(path.name + ".lock"), what)


def inputs_of(values, *, skip: Iterable[str] = (), flags: bool = True) -> list[tuple[str, str]]:
    """Every path a command reads, derived from its settings rather than listed by hand: each value among
    `values` (parsed arguments or a config, as a dict; nested lists and dicts walked) that names a file or
    directory that exists. `skip` names the keys that are not inputs (the output itself, a checkpoint of the run
    being resumed). Labels are `--key` (`flags`) or the config key."""
    found = []

    def walk(label: str, value) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(label, v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(label, v)
        elif isinstance(value, (str, Path)) and str(value).strip():
            try:
                exists = Path(str(value)).expanduser().exists()
            except (OSError, ValueError):  # a name too long for a path, a NUL: text, not a path
                exists = False
            if exists:
                found.append((label, str(value)))

    skip = set(skip)
    for key, value in dict(values).items():
        if key not in skip:
            walk(f"--{key}" if flags else key, value)
    return found


# --------------------------------------------------------------------------- the guard of every output

Inputs = Iterable[tuple[str, "str | Path | None"]]  # (flag, path) pairs; hub ids and None are passed over


def _not_empty(what: str, out: Path, existing: list[str]) -> str:
    return (f"{what} {out} is not empty ({', '.join(existing[:4])}); pass --overwrite to replace what it holds, "
            "or choose another directory")


@contextlib.contextmanager
def claim_output_dir(path: str | Path, what: str, *, inputs: Inputs = (), overwrite: bool = False,
                     continues: Callable[[list[str]], bool] | None = None,
                     refusal: Callable[[list[str]], str] | None = None, main: bool = True) -> Iterator[Path]:
    """The one guard of an output directory (train.py, sweep.py, evaluate.py, export.py).

    The path is checked first: a directory that exists or can be made, and can be written, apart from every
    input (neither one of them, nor inside one, nor holding one: --overwrite empties it). Then it is locked
    (`<name>.lock` beside it: one lock per output, whichever command takes it), and only then looked at: a
    directory that holds anything is refused unless `overwrite`, or `continues(entries)` says this run carries on
    what it holds (--resume, the same study). `refusal(entries)` words the refusal.

    Nothing in the directory is changed here; the body empties it (--overwrite) once its own
    checks pass. A directory this claim created is removed again when the body fails before writing anything
    into it. `main=False` (a run's other processes) checks the path only: the main process locks and looks."""
    out = check_output_dir(path, what)
    check_apart(out, what, inputs)
    created, lock = not out.exists(), None
    try:
        if main:
            name = f"{what} {out}"
            lock = lock_beside(out, name).acquire()
            out.mkdir(parents=True, exist_ok=True)
            existing = dir_entries(out)  # lock, then look (see OutputLock)
            if existing and not overwrite and not (continues and continues(existing)):
                raise UserError(refusal(existing) if refusal else _not_empty(what, out, existing))
        yield out
    except BaseException:
        if created and main and not dir_entries(out):
            shutil.rmtree(out, ignore_errors=True)  # a start that failed leaves no directory behind
        raise
    finally:
        if lock is not None:
            lock.release()


@contextlib.contextmanager
def claim_output_files(paths: list[Path], what: str, *, inputs: Inputs = (), overwrite: bool = False,
                       continues: Callable[[], bool] | None = None) -> Iterator[list[Path]]:
    """The one guard of file outputs (prepare.py, pretokenize.py, generate.py): each path checked (not a directory,
    not an input, in a folder that can be written), then the lock beside the first taken, then the paths
    looked at: one that exists is refused unless `overwrite` or `continues()` (a run that resumes its own
    unfinished work)."""
    inputs = list(inputs)
    paths = [check_output_file(p, what, inputs=inputs) for p in paths]
    with lock_beside(paths[0], f"{what} {paths[0]}"):  # lock, then look (see OutputLock)
        existing = [str(p) for p in paths if p.exists()]
        if existing and not overwrite and not (continues and continues()):
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise UserError(f"{what} {existing[0]} exists{more}; pass --overwrite to replace it, or choose another "
                            "output")
        yield paths


# --------------------------------------------------------------------------- a resumable run's work directory

MANIFEST_NAME = "manifest.json"  # the settings of the run whose chunks a work directory holds


_ABSENT = object()


def describe_change(old: dict, new: dict, names: dict[str, str] | None = None, prefix: str = "") -> str:
    """What differs between two settings (a refusal's words): each setting changed, added or removed, with its old
    and its new value; nested settings by their path (settings.margin). `names` gives top-level keys their flags."""
    parts = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a == b:
            continue
        label = prefix + (names or {}).get(key, key)
        if isinstance(a, dict) and isinstance(b, dict):
            parts.append(describe_change(a, b, None, label + "."))
        else:
            parts.append(f"{label} {_shown_value(a)} -> {_shown_value(b)}")
    return ", ".join(parts)


def _shown_value(value) -> str:
    if value is _ABSENT:
        return "(not set)"
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def claim_work_dir(work: Path, fingerprint: dict, names: dict[str, str] | None = None) -> None:
    """A resumable run's work directory (`<output>.partial`): made with this run's settings in its manifest, or
    taken over from a half-done run of the same settings. One of other settings is refused, naming each setting
    that changed with its old and new value (`names`: the flags of top-level keys), and so is an unreadable
    manifest."""
    manifest = work / MANIFEST_NAME
    work.mkdir(exist_ok=True)
    wanted = json.loads(json.dumps(fingerprint))  # as it reads back: tuples become lists
    if not manifest.exists():
        write_text_atomic(manifest, json.dumps(wanted, indent=1, sort_keys=True))
        return
    try:
        old = json.loads(manifest.read_text())
    except (OSError, ValueError):
        raise UserError(f"{manifest} is unreadable; delete {work} to start over") from None
    if old != wanted:
        raise UserError(f"{work} holds a half-done run with other settings ({describe_change(old, wanted, names)}); "
                        f"delete {work} to start over, or choose another --output")


def remove_work_dir(work: Path) -> None:
    """A finished run's work directory, gone. Renamed first, so that a kill during the deletion cannot leave chunks
    without their manifest."""
    trash = work.with_name(work.name + ".delete")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(work, trash)
    shutil.rmtree(trash)


# --------------------------------------------------------------------------- integrity


def content_digest(obj) -> str:
    """sha256 over a nested structure of tensors, arrays and plain values (dict keys sorted): equal
    digests mean equal content, so a file whose bytes were damaged is caught when it is read back."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor) and hasattr(x, "__tensor_flatten__"):
            # A tensor subclass (torchao's quantized optimizer states): its inner tensors and its metadata.
            names, meta = x.__tensor_flatten__()
            h.update(f"S{type(x).__name__}{meta!r}{tuple(x.shape)}".encode())
            for name in names:
                walk(getattr(x, name))
        elif isinstance(x, torch.Tensor):
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
