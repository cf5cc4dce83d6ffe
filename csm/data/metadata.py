"""Metadata tables (path, text, optional start/end/speaker), in every format we read: one DataFrame
with absolute audio paths, and the validation of one row's fields.
"""
from __future__ import annotations

import math
import re
import sqlite3
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from csm.system.errors import UserError
from csm.system.outputs import not_a_file

METADATA_FORMATS = (".json", ".jsonl", ".csv", ".parquet", ".sql", ".hdf5", ".h5", ".pkl")
REQUIRED_COLUMNS = ("path", "text")
OPTIONAL_COLUMNS = ("start", "end", "speaker", "conversation", "turn", "dnsmos")  # dnsmos: prepare.py --min_dnsmos


class SkipRow(Exception):
    """This metadata row cannot become an example; the message is the reason in the report."""


# --------------------------------------------------------------------------- metadata


PICKLE_FORMATS = (".pkl", ".hdf5", ".h5")  # pandas unpickles these (object columns in HDF5): code can run


def read_metadata(path: str | Path, trust_pickle: bool = False):
    """A metadata file as a DataFrame with path, text, start, end, speaker; paths made absolute.

    Formats that pandas reads through pickle (.pkl, and .h5/.hdf5 tables) can run code hidden in the
    file, so they are refused unless `trust_pickle` says the file comes from someone you trust."""
    import pandas as pd  # 0.3 s to import: runs on token files never read metadata

    path = Path(path)
    if path.is_dir():
        raise UserError(f"metadata file {path} is a directory; give a .csv/.json/.jsonl/.parquet/... file")
    if not path.is_file():
        raise UserError(f"metadata file {path} {not_a_file(path)}")
    suffix = path.suffix.lower()
    if suffix in PICKLE_FORMATS and not trust_pickle:
        raise UserError(f"{path}: {suffix} metadata is read through pickle, which can run code hidden in the file; "
                        "convert it to .csv/.parquet/.jsonl, or pass --trust_pickle if you trust where it came from")
    if suffix in PICKLE_FORMATS:
        print(f"warning: reading {path} with pickle (--trust_pickle): only do this for files you trust")
    accepted = ", ".join(METADATA_FORMATS)
    try:
        if suffix in (".json", ".jsonl"):
            import io

            text = path.read_text(encoding="utf-8-sig").lstrip()  # -sig: a byte order mark is no JSON
            df = pd.read_json(io.StringIO(text), lines=not text.startswith("["))
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


def visible_text(value) -> str:
    """A transcript with its control characters gone (tabs and line breaks become spaces) and its ends stripped:
    "" when nothing but those was in it."""
    return "".join(" " if ch in "\t\n\r\v\f" else ch for ch in str(value)
                   if ch in "\t\n\r\v\f" or unicodedata.category(ch) != "Cc").strip()


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


def turn_order(row: Row) -> float:
    """A row's place in its conversation: its `turn`, else its `start`, else its row number."""
    return row.turn if row.turn is not None else row.start if row.start is not None else float(row.index)


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
    text = "" if _missing(text) else visible_text(text)
    if not text:
        raise SkipRow("empty or missing text (nothing but spaces or control characters)")
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
    try:
        speaker = speaker_value(speaker)
    except ValueError:
        raise SkipRow(f"speaker {speaker!r} is not a non-negative integer id (below 2^31) or a name") from None
    if isinstance(speaker, str):
        raise SkipRow(f"speaker name {speaker!r} has no id (names are numbered by the source they come from)")
    conversation = raw.get("conversation")
    conversation = None if _missing(conversation) or not str(conversation).strip() else str(conversation).strip()
    turn = raw.get("turn")
    if _missing(turn):
        turn = None
    else:
        turn = _as_float(turn, f"turn {turn!r} is not a number")
        if not math.isfinite(turn):
            raise SkipRow(f"turn {turn} is not finite")
    score = raw.get("dnsmos")
    if not _missing(score):  # prepare.py's DNSMOS OVRL: on the 1-5 scale, or the row is not what it says
        score = _as_float(score, f"dnsmos {score!r} is not a number")
        if not 1 <= score <= 5:
            raise SkipRow(f"dnsmos {score:g} is outside DNSMOS's 1-5 scale")
    return Row(index, str(path), text, start, end, speaker, conversation, turn)


UNKNOWN_SPEAKER = -1  # a row without a speaker, as token files store it (its text prompt says [999], as the original)
MAX_SPEAKER_ID = 2**31 - 1


def speaker_value(value) -> int | str | None:
    """What a speaker cell holds: None when there is none (None, NaN, an empty string), an int for an integer
    id (an int, a float with no fraction, or a number written as text: "7", "7.0", but not "007"), or the name
    as a string. A number that is no id (negative, a fraction, too big) raises ValueError."""
    if _missing(value) or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        name = value.strip()
        if re.fullmatch(r"[0-9]+", name):  # [0-9], not str.isdigit: that accepts "²", which int() refuses
            if len(name) > 1 and name.startswith("0"):
                return name  # "007" is a name, not 7
            if int(name) > MAX_SPEAKER_ID:
                raise ValueError(value)
            return int(name)
        try:  # "3.0", "-1", "2.5", "1e20": a number written as text (a CSV column of ids and names)
            value = float(name)
        except ValueError:
            return name
    if isinstance(value, bool):
        raise ValueError(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):  # numpy's NaN, which _missing does not know
        return None
    if not number.is_integer() or number < 0 or number > MAX_SPEAKER_ID:
        raise ValueError(value)
    return int(number)


def speaker_numbers(values) -> dict[str, int]:
    """The ids of the names among speaker cells: numbered in sorted order from the lowest ids that no integer
    id among them uses. Integer ids keep their number, so they need no entry; "007" is a name, apart from 7."""
    keys = set()
    for value in values:
        try:
            keys.add(speaker_value(value))
        except ValueError:  # a bad id: its rows are skipped with the reason
            continue
    used = {k for k in keys if isinstance(k, int)}
    free = (i for i in range(MAX_SPEAKER_ID + 1) if i not in used)
    return {name: next(free) for name in sorted(k for k in keys if isinstance(k, str))}


def speaker_id(value, names: dict[str, int]):
    """A speaker cell as its id (None: unknown) through `names` (speaker_numbers); a bad value is returned as
    it is, for check_row to skip its row with the reason."""
    try:
        key = speaker_value(value)
    except ValueError:
        return value
    return names.get(key, key) if isinstance(key, str) else key
