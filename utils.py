"""What every command shares at its edge: one-line user errors and honest exit statuses (run_cli), the command-line
parser (CommandParser) and the working directory's .env file. The library below never imports this module: its
errors are csm/system/errors.py's, rank-0 printing and seeding csm/system/runtime.py's.

Nothing here does work at import: no environment reads, no network, no CUDA, no sys.path edits.
"""
from __future__ import annotations

import argparse
import atexit
import os
import sys
from pathlib import Path
from typing import Callable

from csm.system.errors import UserError
from csm.system.outputs import DISK_FULL_ERRNOS, disk_full_error


# --------------------------------------------------------------------------- errors at the edge


# Exit status of a run that was asked to stop (SIGTERM, Ctrl-C) and saved a checkpoint first: not 0,
# so a script can tell it from a finished run; EX_TEMPFAIL, "try again" (with --resume).
EXIT_STOPPED = 75


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main() after reading the working directory's .env; a UserError or Ctrl-C becomes one line on
    stderr and a non-zero exit."""
    try:
        load_env_file()
        result = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        _exit(2)
    except OSError as e:  # a write outside atomic_path (an appended log, a library's own file) on a full disk
        if e.errno not in DISK_FULL_ERRNOS:
            raise
        where = Path(e.filename) if e.filename else Path.cwd()
        print(f"error: {disk_full_error(where, where)}", file=sys.stderr)
        _exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _exit(130)
    _exit(result if isinstance(result, int) else 0)


def _exit(code: int) -> None:
    """Exit with `code`. A process torchrun started ends once the atexit handlers (W&B, logging, multiprocessing)
    have run and stdout and stderr are flushed, without the interpreter's own teardown: there the C++ objects of
    torch.distributed and the libraries' thread pools are destroyed in no set order, and twice a 2-process gloo
    job that had written every output aborted there ("terminate called without an active exception"), so its
    launcher reported a failure for a job that had succeeded."""
    from csm.system.runtime import launched_by_torchrun  # torch.distributed, only once the work is done

    if not launched_by_torchrun():
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it
            pass
    os._exit(code)


class CommandParser(argparse.ArgumentParser):
    """The command lines' parser: a value that starts with ~/ (or is ~) is expanded to the home folder, the same
    way for every flag. The shell expands --flag ~/x but leaves --flag=~/x as it is, and code that reads the
    value does not all expand it."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        for name, value in vars(parsed).items():
            setattr(parsed, name, _expand_home(value))
        return parsed, rest


def _expand_home(value):
    if isinstance(value, list):
        return [_expand_home(v) for v in value]
    if isinstance(value, str) and (value == "~" or value.startswith("~/")):
        return os.path.expanduser(value)
    return value


# --------------------------------------------------------------------------- environment and seeding


def load_env_file() -> list[str] | None:
    """Settings from the .env file in the working directory (WANDB_API_KEY, HF_TOKEN, ...), through python-dotenv;
    a variable already set in the environment wins. Returns the names it gave a value (None: no .env was read).
    Without python-dotenv (a bare PyTorch machine), a .env file that is there is reported as not read. Every
    command calls this first (run_cli), so each reads the same file: the one where it is run, not beside the code."""
    path = Path.cwd() / ".env"
    if not path.is_file():
        return None
    try:
        from dotenv import dotenv_values  # optional: a bare PyTorch machine lacks it
    except ImportError:
        print("warning: .env was not read: python-dotenv is not installed (pip install python-dotenv)",
              file=sys.stderr)
        return None
    try:
        values = dotenv_values(path, encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read as a .env file ({e})") from None
    given = []
    for name, value in values.items():
        if value and name not in os.environ:
            os.environ[name] = value
            given.append(name)
    return given
