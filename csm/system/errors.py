"""The errors a user sees as one line (run_cli prints them and exits 2), apart from everything else so that
every module can raise them, and the number check that raises them.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: shown as one line, no traceback, non-zero exit."""


class DiskFullError(UserError):
    """A write failed because its disk (or quota) is full."""


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
