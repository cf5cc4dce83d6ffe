"""The errors a user sees as one line (run_cli prints them and exits 2), apart from everything else so that
every module can raise them.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: shown as one line, no traceback, non-zero exit."""


class DiskFullError(UserError):
    """A write failed because its disk (or quota) is full."""
