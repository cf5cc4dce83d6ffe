"""Metadata tables (path, text, optional start/end/speaker), in every format we read: one DataFrame
with absolute audio paths, and the validation of one row's fields.
"""
from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from utils import UserError

METADATA_FORMATS = (".json", ".jsonl", ".csv", ".parquet", ".sql", ".hdf5", ".h5", ".pkl")
REQUIRED_COLUMNS = ("path", "text")
OPTIONAL_COLUMNS = ("start", "end", "speaker", "conversation", "turn")


class SkipRow(Exception):
    """This metadata row cannot become an example; the message is the reason in the report."""


# --------------------------------------------------------------------------- metadata


PICKLE_FORMATS = (".pkl", ".hdf5", ".h5")  # pandas unpickles these (object columns in HDF5): code can run


def read_metadata(path: str | Path, trust_pickle: bool = False):
    """A metadata file as a DataFrame with path, text, start, end, speaker; paths made absolute.

    Formats that pandas reads through pickle (.pkl, and .h5/.hdf5 tables) can run code hidden in the
    file, so they are refused unless `trust_pickle` says the file comes from someone you trust."""
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        raise UserError(f"metadata file {path} is a directory; give a .csv/.json/.jsonl/.parquet/... file")
    if not path.is_file():
        raise UserError(f"metadata file {path} not found")
    suffix = path.suffix.lower()
    if suffix in PICKLE_FORMATS and not trust_pickle:
        raise UserError(f"{path}: {suffix} metadata is read through pickle, which can run code hidden in the file; "
                        "convert it to .csv/.parquet/.jsonl, or pass --trust_pickle if you trust where it came from")
    if suffix in PICKLE_FORMATS:
        print(f"warning: reading {path} with pickle (--trust_pickle): only do this for files you trust")
    accepted = ", ".join(METADATA_FORMATS)
    try:
        if suffix in (".json", ".jsonl"):
            text = path.read_text(encoding="utf-8").lstrip()
            df = pd.read_json(path, lines=not text.startswith("["))
        elif suffix == ".csv":
            df = pd.read_csv(path)
        elif suffix == ".parquet":
            df = pd.read_parquet(path)
        elif suffix == ".sql":
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
                df = pd.read_sql_query("SELECT * FROM data", con)
        elif suffix in (".hdf5", ".h5"):
            try:
                import tables  # noqa: F401  pandas reads HDF5 tables through PyTables
            except ImportError:
                raise UserError(f"{path}: reading {suffix} metadata needs the 'tables' package "
                                "(pip install tables), or convert it to .csv/.parquet/.jsonl") from None
            df = pd.read_hdf(path)
        elif suffix == ".pkl":
            df = pd.read_pickle(path)
        else:
            raise UserError(f"{path}: unknown metadata format '{suffix}'; accepted: {accepted}")
    except UserError:
        raise
    except Exception as e:  # each reader has its own exception types; the message is what matters
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: cannot read it as {suffix} metadata ({first}); accepted: {accepted}") from e
    if not isinstance(df, pd.DataFrame):
        raise UserError(f"{path} does not hold a table")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}; columns are path, text and optionally "
                        f"start, end (seconds), speaker (found: {', '.join(map(str, df.columns))})")
    df = df.reset_index(drop=True)
    for column in OPTIONAL_COLUMNS:
        if column not in df.columns:
            df[column] = None
    df = df[list(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)].astype(object)
    df["path"] = [_resolve(p, path.parent) for p in df["path"]]
    return df


def _resolve(value, base: Path):
    """Relative audio paths are relative to the metadata file (then to the working directory)."""
    if not isinstance(value, str) or not value:
        return value
    p = Path(value).expanduser()
    if p.is_absolute() or not (base / p).exists() and p.exists():
        return str(p)
    return str(base / p)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass
class Row:
    index: int
    path: str
    text: str
    start: float | None
    end: float | None
    speaker: int | None
    conversation: str | None = None  # rows of one conversation share it; None: the row stands alone
    turn: float | None = None        # order within the conversation


def _as_float(value, reason: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SkipRow(reason) from None


def check_row(index: int, raw: dict) -> Row:
    """Validate one metadata row's fields (not its audio)."""
    path, text = raw["path"], raw["text"]
    if _missing(path) or not str(path).strip():
        raise SkipRow("missing path")
    if _missing(text) or not str(text).strip():
        raise SkipRow("empty or missing text")
    start, end = raw["start"], raw["end"]
    if _missing(start) and _missing(end):
        start = end = None
    else:
        try:
            start, end = float(start), float(end)
        except (TypeError, ValueError):
            raise SkipRow(f"start/end not numbers ({start!r}, {end!r})") from None
        if math.isnan(start) or math.isnan(end):
            raise SkipRow("start or end is NaN")
        if math.isinf(start) or math.isinf(end):
            raise SkipRow(f"start/end not finite ({start}, {end})")
        if start < 0 or end < 0:
            raise SkipRow(f"negative start/end ({start}, {end})")
        if end <= start:
            raise SkipRow(f"end {end} is not after start {start}")
    speaker = raw["speaker"]
    if _missing(speaker):
        speaker = None
    else:
        as_float = _as_float(speaker, f"speaker {speaker!r} is not an integer id")
        if not as_float.is_integer() or as_float < 0 or as_float > 2**31 - 1:
            raise SkipRow(f"speaker {speaker!r} is not a non-negative integer id (below 2^31)")
        speaker = int(as_float)
    conversation = raw.get("conversation")
    conversation = None if _missing(conversation) or not str(conversation).strip() else str(conversation).strip()
    turn = raw.get("turn")
    if _missing(turn):
        turn = None
    else:
        turn = _as_float(turn, f"turn {turn!r} is not a number")
        if not math.isfinite(turn):
            raise SkipRow(f"turn {turn} is not finite")
    return Row(index, str(path), str(text).strip(), start, end, speaker, conversation, turn)


def speaker_numbers(names) -> dict[str, int]:
    """Speaker ids for names: a name that is a number keeps it; the others get the lowest free ids, in
    sorted order of their names (folder names for prepare.py, a dataset's speaker column for pretokenize.py)."""
    names = sorted({str(n) for n in names})
    numbered = {n: int(n) for n in names if n.isdigit()}
    used = set(numbered.values())
    free = (i for i in range(2**31) if i not in used)
    return {**numbered, **{n: next(free) for n in names if n not in numbered}}
