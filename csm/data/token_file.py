"""The pre-tokenized HDF5 file (docs/formats.md, "The token file"), read and written only here.

Format 2 (written now): per split, the Mimi codes of every row as one contiguous int16 array (32 x F per row,
codebook-major) with int64 row offsets, and the text ids the same way (int32); int32 lengths (len(text) + F + 1),
int64 source rows and (for conversational context) each row's conversation id, turn order and speaker.
Training maps the two arrays from the file (np.memmap at their offset in it), so every process on a machine
shares one copy in the page cache and none reads a split into its own memory.

Format 1 (this tool's earlier files, and the original tool's, which had int32 codes and no attributes) held
one variable-length row per example; it still reads, and `pretokenize.py --upgrade` rewrites it as format 2.
Attributes name the tokenizers, the format version and the speaker names (name -> id, JSON; integer ids stand
for themselves and have no entry; -1 is a row without a speaker). A file of a newer format is refused.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from csm.system.errors import UserError
from csm.system.outputs import atomic_path

FORMAT_VERSION = 2
SPLIT_DATASETS = ("audio", "text", "length")
OFFSET_DATASETS = ("audio_offsets", "text_offsets")  # format 2: row i is [offsets[i], offsets[i + 1])
AUDIO_VOCAB = 2048  # Mimi codes are in [0, 2048); the model's 3 extra ids are never stored
_READ_BLOCK = 4096  # rows per h5py read when loading a format-1 split into memory
_SCAN_BLOCK = 1 << 24  # text ids per pass when a format-2 split's id range is found


class DataError(UserError):
    """The token file is missing, malformed, or does not fit the training settings."""


def _h5py():
    return h5py


# --------------------------------------------------------------------------- reading


def open_hdf5(path: str | Path, what: str, maker: str, supported: int):
    """An open h5py.File (read-only) of a file `maker` writes, or one clear error: missing, not HDF5, or of a
    format version newer than `supported`."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a {what} (make one with {maker})")
    if not path.is_file():
        raise DataError(f"{path}: no such file (make one with {maker})")
    try:
        f = _h5py().File(path, "r")
    except OSError as e:
        raise DataError(f"{path} is not an HDF5 file ({e})") from e
    version = f.attrs.get("format_version")
    if version is not None and int(version) > supported:
        f.close()
        raise DataError(f"{path} is a {what} of format version {int(version)}; this csm-train reads versions "
                        f"up to {supported}: update csm-train, or re-run {maker} with this one")
    return f


def open_token_file(path: str | Path):
    """An open h5py.File (read-only) of a token file, after checking its format version."""
    return open_hdf5(path, "token file", "pretokenize.py", FORMAT_VERSION)


def is_flat(group) -> bool:
    """Whether a split is stored in format 2 (flat arrays and offsets) rather than one row per example."""
    return "audio_offsets" in group


def open_splits(path: str | Path) -> dict[str, int]:
    """Names and sizes of the splits in a token file; one clear error if it is not a token file."""
    h5py = _h5py()
    with open_token_file(path) as f:
        splits = {}
        for name, group in f.items():
            if not isinstance(group, h5py.Group):
                continue
            missing = [d for d in SPLIT_DATASETS + (OFFSET_DATASETS if is_flat(group) else ()) if d not in group]
            if missing:
                raise DataError(f"{path}: group '{name}' lacks dataset(s) {', '.join(missing)}; "
                                f"expected /{name}/audio, /{name}/text, /{name}/length (see pretokenize.py)")
            n = len(group["length"])
            if is_flat(group):
                sizes = {d: len(group[d]) - 1 for d in OFFSET_DATASETS}
                short = [d for d in ("audio", "text") if len(group[d + "_offsets"]) == 0
                         or int(group[d + "_offsets"][-1]) != len(group[d])]
            else:
                sizes, short = {d: len(group[d]) for d in ("audio", "text")}, []
            sizes["length"] = n
            if len(set(sizes.values())) != 1 or short:
                raise DataError(f"{path}: '{name}' datasets differ in length {sizes}; the file is "
                                f"damaged, re-run pretokenize.py")
            splits[name] = n
        if not splits:
            raise DataError(f"{path} holds no split groups (expected /train and/or /val with audio, text, length)")
    return splits


def read_split_index(f, path, split: str) -> tuple[np.ndarray, int]:
    """(lengths int64 [N], codebooks per frame) of one split of an open token file."""
    group = f[split]
    lengths = group["length"][:].astype(np.int64)
    if len(lengths) == 0:
        raise DataError(f"{path}: the '{split}' split is empty")
    first_audio, first_text = read_row(f, split, 0)
    frames = int(lengths[0]) - len(first_text) - 1
    if frames <= 0 or len(first_audio) % frames:
        raise DataError(f"{path}: /{split}/length[0]={lengths[0]} does not match its text "
                        f"({len(first_text)} ids) and audio ({len(first_audio)} codes)")
    num_codebooks = len(first_audio) // frames
    declared = f.attrs.get("codebooks")
    if declared is not None and int(declared) != num_codebooks:
        raise DataError(f"{path}: attribute codebooks={declared} but rows hold {num_codebooks} per frame")
    return lengths, num_codebooks


def read_offsets(f, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The row offsets [N+1] of a format-2 split's audio codes and text ids."""
    group = f[split]
    return group["audio_offsets"][:].astype(np.int64), group["text_offsets"][:].astype(np.int64)


def map_flat(f, path, split: str, what: str) -> np.ndarray:
    """A format-2 split's audio codes or text ids as one array mapped from the file (read-only, shared through
    the page cache by every process that maps it); read into memory only where HDF5 stored the array in pieces
    (chunked or compressed: a file made by other tools)."""
    dataset = f[split][what]
    if dataset.size == 0:
        return np.empty(0, dataset.dtype)
    offset = dataset.id.get_offset()
    if offset is None or dataset.chunks is not None or dataset.compression is not None:
        return dataset[:]
    return np.memmap(path, dtype=dataset.dtype, mode="r", offset=offset, shape=dataset.shape)


def text_id_range(f, path, split: str) -> tuple[int, int]:
    """(lowest, highest) text id of a format-2 split, from one pass over its ids (a few bytes a row: cheap beside
    the codes, which are checked row by row as they are read)."""
    text, low, high = map_flat(f, path, split, "text"), 0, 0
    for start in range(0, len(text), _SCAN_BLOCK):
        block = text[start:start + _SCAN_BLOCK]
        low, high = (min(low, int(block.min())), max(high, int(block.max()))) if start else \
            (int(block.min()), int(block.max()))
    return low, high


def check_codes(codes: np.ndarray, path, split: str, row: int) -> None:
    """A row's audio codes are Mimi codes, [0, 2048)."""
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= AUDIO_VOCAB):
        raise DataError(f"{path}: /{split} row {row} holds audio codes outside [0, {AUDIO_VOCAB}); "
                        "is this a token file from pretokenize.py?")


def read_flat(f, path, split: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """All rows of /split/audio (as int16) or /split/text (as int32) as one flat buffer in memory + offsets [N+1]:
    ~2 bytes a code instead of a tensor each, for format 1 (format 2 is that already). Audio codes outside
    [0, 2048) are refused."""
    group = f[split]
    if is_flat(group):
        data, offsets = group[what][:], group[f"{what}_offsets"][:].astype(np.int64)
        if what == "audio" and data.size and (data.min() < 0 or data.max() >= AUDIO_VOCAB):
            raise DataError(f"{path}: /{split}/audio holds codes outside [0, {AUDIO_VOCAB}); "
                            "is this a token file from pretokenize.py?")
        return data, offsets
    dataset = group[what]
    dtype = np.int16 if what == "audio" else np.int32
    n = len(dataset)
    sizes = np.empty(n, dtype=np.int64)
    chunks = []
    for start in range(0, n, _READ_BLOCK):
        rows = [np.asarray(v) for v in dataset[start:start + _READ_BLOCK]]
        sizes[start:start + len(rows)] = [len(r) for r in rows]
        flat = np.concatenate(rows) if rows else np.empty(0, dtype)
        if what == "audio" and flat.size and (flat.min() < 0 or flat.max() >= AUDIO_VOCAB):
            raise DataError(f"{path}: /{split}/audio holds codes outside [0, {AUDIO_VOCAB}); "
                            "is this a token file from pretokenize.py?")
        chunks.append(flat.astype(dtype, copy=False))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return np.concatenate(chunks) if chunks else np.empty(0, dtype), offsets


def read_turns(f, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(conversation ids, turn orders, speaker ids) of a split's rows. Files without them (older ones,
    the original tool's) read as every row its own conversation ("") at its row number, speaker -1 (unknown)."""
    group = f[split]
    n = len(group["length"])
    if "conversation" not in group:
        return np.full(n, "", dtype=object), np.arange(n, dtype=np.float64), np.full(n, -1, dtype=np.int32)
    conversation = np.array([c.decode() if isinstance(c, bytes) else str(c) for c in group["conversation"][:]],
                            dtype=object)
    return conversation, group["turn"][:].astype(np.float64), group["speaker"][:].astype(np.int32)


SPEAKERS_NAME = "speakers.json"  # a model directory's speaker names, copied from the token file it was trained on


def speaker_names(path: str | Path) -> dict[str, int]:
    """The speaker names (name -> id) of a token file, or of a speakers.json; {} for a file without any."""
    import json

    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            names = json.loads(path.read_text(encoding="utf-8-sig"))
        else:
            with open_token_file(path) as f:
                raw = f.attrs.get("speakers")
            names = json.loads(raw) if raw is not None else {}
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read its speaker names ({e})") from None
    if not isinstance(names, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in names.values()):
        raise DataError(f"{path}: speaker names must map each name to an integer id")
    return {str(k): int(v) for k, v in names.items()}


def read_row(f, split: str, i: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat audio codes, text ids) of row i of a split."""
    group = f[split]
    if is_flat(group):
        (a0, a1), (t0, t1) = group["audio_offsets"][i:i + 2], group["text_offsets"][i:i + 2]
        return group["audio"][a0:a1], group["text"][t0:t1]
    return np.asarray(group["audio"][i]), np.asarray(group["text"][i])


# --------------------------------------------------------------------------- writing


class SplitWriter:
    """The datasets of one split in format 2, created at their final size (rows, codes and text ids) and filled a
    block of rows at a time, in order.

    With `turns`, each row also records its conversation id ("" for a row that stands alone), its turn
    order within it and its speaker id, for composing examples with conversational context."""

    def __init__(self, group, n: int, num_codebooks: int, codes: int, text_ids: int, source_rows: bool,
                 turns: bool = False):
        self.group, self.n, self.num_codebooks = group, n, num_codebooks
        # Contiguous and uncompressed (no chunks): what lets a reader map them straight from the file.
        self.audio = group.create_dataset("audio", (codes,), dtype=np.int16)
        self.text = group.create_dataset("text", (text_ids,), dtype=np.int32)
        self.audio_offsets = group.create_dataset("audio_offsets", (n + 1,), dtype=np.int64)
        self.text_offsets = group.create_dataset("text_offsets", (n + 1,), dtype=np.int64)
        self.length = group.create_dataset("length", (n,), dtype=np.int32)
        self.source_row = group.create_dataset("source_row", (n,), dtype=np.int64) if source_rows else None
        self.turns = _turn_datasets(group, n) if turns else None
        self.rows, self.ends = 0, [0, 0]  # rows written; codes and text ids written
        self.audio_offsets[0], self.text_offsets[0] = 0, 0

    def write(self, start: int, audio: list[np.ndarray], text: list[np.ndarray], source_rows=None,
              turns: tuple | None = None) -> int:
        """Rows start.. of flat codes (K x F each) and text ids (and, with turns, (conversation ids,
        turn orders, speakers) of those rows); returns the next free row."""
        if start != self.rows:
            raise ValueError(f"rows are written in order: row {self.rows} is next, not {start}")
        m = len(audio)
        if m == 0:
            return start
        for j, (rows, dataset, offsets) in enumerate(((audio, self.audio, self.audio_offsets),
                                                      (text, self.text, self.text_offsets))):
            flat = np.concatenate(rows)
            if j == 0 and flat.size and (flat.min() < 0 or flat.max() >= AUDIO_VOCAB):
                raise ValueError(f"audio codes outside [0, {AUDIO_VOCAB})")
            end = self.ends[j] + flat.size
            if end > len(dataset):
                raise ValueError(f"more {dataset.name} than the split was created for ({len(dataset)})")
            dataset[self.ends[j]:end] = flat
            offsets[start + 1:start + m + 1] = self.ends[j] + np.cumsum([len(r) for r in rows])
            self.ends[j] = end
        self.length[start:start + m] = [len(t) + len(a) // self.num_codebooks + 1 for a, t in zip(audio, text)]
        if self.source_row is not None:
            self.source_row[start:start + m] = source_rows
        if self.turns is not None:
            _write_turns(self.turns, start, m, turns)
        self.rows = start + m
        return self.rows

    def finish(self) -> None:
        """Check that every row, code and text id was written."""
        if self.rows != self.n or self.ends != [len(self.audio), len(self.text)]:
            raise ValueError(f"split {self.group.name}: {self.rows} of {self.n} rows, {self.ends[0]} of "
                             f"{len(self.audio)} codes and {self.ends[1]} of {len(self.text)} text ids written")


class RowSplitWriter:
    """A split in format 1, one variable-length row per example: what this tool wrote before format 2 and the
    original tool wrote (int32 codes), kept to make such files for tests of reading and upgrading them."""

    def __init__(self, group, n: int, num_codebooks: int, audio_dtype: str, source_rows: bool, turns: bool = False):
        h5py = _h5py()
        self.num_codebooks = num_codebooks
        self.audio = group.create_dataset("audio", (n,), dtype=h5py.vlen_dtype(np.dtype(audio_dtype)))
        self.text = group.create_dataset("text", (n,), dtype=h5py.vlen_dtype(np.dtype("int32")))
        self.length = group.create_dataset("length", (n,), dtype=np.int32)
        self.source_row = group.create_dataset("source_row", (n,), dtype=np.int64) if source_rows else None
        self.turns = _turn_datasets(group, n) if turns else None

    def write(self, start: int, audio: list[np.ndarray], text: list[np.ndarray], source_rows=None,
              turns: tuple | None = None) -> int:
        # Row by row: h5py turns a slice of equal-length rows into a 2-D array and refuses it.
        for j, (a, t) in enumerate(zip(audio, text)):
            self.audio[start + j], self.text[start + j] = a, t
        m = len(audio)
        self.length[start:start + m] = [len(t) + len(a) // self.num_codebooks + 1 for a, t in zip(audio, text)]
        if self.source_row is not None:
            self.source_row[start:start + m] = source_rows
        if self.turns is not None and m:
            _write_turns(self.turns, start, m, turns)
        return start + m

    def finish(self) -> None:
        pass


def _turn_datasets(group, n: int) -> tuple:
    return (group.create_dataset("conversation", (n,), dtype=_h5py().string_dtype()),
            group.create_dataset("turn", (n,), dtype=np.float64),
            group.create_dataset("speaker", (n,), dtype=np.int32))


def _write_turns(datasets: tuple, start: int, m: int, turns: tuple) -> None:
    for dataset, values in zip(datasets, turns):
        dataset[start:start + m] = list(values) if dataset.dtype.kind == "O" else values


class TokenFileWriter:
    """An open token file being written; made by `write_token_file`."""

    def __init__(self, f, num_codebooks: int, audio_dtype: str, version: int):
        self.f, self.num_codebooks, self.audio_dtype, self.version = f, num_codebooks, audio_dtype, version
        self.splits: list = []

    def split(self, name: str, n: int, *, codes: int | None = None, text_ids: int | None = None,
              source_rows: bool = True, turns: bool = False):
        """A split of n rows holding `codes` audio codes and `text_ids` text ids in all (format 2 sizes its
        arrays up front: a reader maps them whole)."""
        group = self.f.create_group(name)
        if self.version == 1:
            writer = RowSplitWriter(group, n, self.num_codebooks, self.audio_dtype, source_rows, turns)
        else:
            if codes is None or text_ids is None:
                raise ValueError("a format-2 split needs its total codes and text ids up front")
            writer = SplitWriter(group, n, self.num_codebooks, codes, text_ids, source_rows, turns)
        self.splits.append(writer)
        return writer

    def write_split(self, name: str, audio: list[np.ndarray], text: list[np.ndarray], *, source_rows=None,
                    turns: tuple | None = None) -> None:
        """A whole split from rows in memory (flat codes K x F each, text ids each)."""
        writer = self.split(name, len(audio), codes=sum(len(a) for a in audio), text_ids=sum(len(t) for t in text),
                            source_rows=source_rows is not None, turns=turns is not None)
        writer.write(0, audio, text, source_rows, turns=turns)


@contextlib.contextmanager
def write_token_file(path: str | Path, attrs: dict | None, *, num_codebooks: int = 32,
                     audio_dtype: str = "int16", version: int = FORMAT_VERSION) -> Iterator[TokenFileWriter]:
    """Write a token file: into a temp file beside `path`, renamed onto it only when the body succeeds and every
    split was filled.

    `attrs` gets format_version added. None writes the original tool's file (format 1, no attributes at all);
    `version=1` this tool's format 1, for tests of old files.
    """
    h5py = _h5py()
    version = 1 if attrs is None else version
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            if attrs is not None:
                f.attrs.update({"format_version": version, **attrs})
            writer = TokenFileWriter(f, num_codebooks, audio_dtype, version)
            yield writer
            for split in writer.splits:
                split.finish()


# --------------------------------------------------------------------------- upgrading format 1


def upgrade_token_file(source: str | Path, output: str | Path, progress: bool = True) -> dict[str, int]:
    """Rewrite a format-1 token file (this tool's earlier files, or the original tool's) as format 2 at `output`:
    the same rows in the same order, attributes and per-row columns kept, codes as int16. Reads the rows twice
    (the text ids first, to size the arrays) and holds one block of rows in memory at a time. Returns the rows
    per split."""
    import json

    from tqdm import tqdm

    splits = open_splits(source)
    with open_token_file(source) as f:
        flat = [name for name in splits if is_flat(f[name])]
        if flat:
            raise DataError(f"{source} is already format {FORMAT_VERSION}; nothing to upgrade")
        attrs = dict(f.attrs)
        if "fingerprint" in attrs:  # pretokenize.py's record of the settings: the same content, now format 2
            fingerprint = json.loads(attrs["fingerprint"])
            fingerprint["format_version"] = FORMAT_VERSION
            attrs["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
        attrs.pop("format_version", None)
        k = next((read_split_index(f, source, name)[1] for name, n in splits.items() if n), 32)
        bar = tqdm(total=2 * sum(splits.values()), unit="row", desc="upgrade", disable=not progress, dynamic_ncols=True)
        with write_token_file(output, attrs, num_codebooks=k) as out:
            for name, n in splits.items():
                group = f[name]
                lengths = group["length"][:].astype(np.int64)
                text_sizes = np.zeros(n, np.int64)
                for start in range(0, n, _READ_BLOCK):
                    rows = group["text"][start:start + _READ_BLOCK]
                    text_sizes[start:start + len(rows)] = [len(r) for r in rows]
                    bar.update(len(rows))
                codes = int((lengths - text_sizes - 1).sum()) * k
                columns = [c for c in ("source_row", "conversation", "turn", "speaker") if c in group]
                writer = out.split(name, n, codes=codes, text_ids=int(text_sizes.sum()),
                                   source_rows="source_row" in columns, turns="conversation" in columns)
                for start in range(0, n, _READ_BLOCK):
                    end = min(n, start + _READ_BLOCK)
                    audio = [np.asarray(a) for a in group["audio"][start:end]]
                    frames = lengths[start:end] - text_sizes[start:end] - 1
                    wrong = np.flatnonzero(np.array([len(a) for a in audio]) != frames * k)
                    if wrong.size:
                        raise DataError(f"{source}: /{name} row {start + int(wrong[0])} has a length that is not "
                                        f"len(text) + frames + 1 with {k} codebooks; the file is damaged")
                    bad = [i for i, a in enumerate(audio) if a.size and (a.min() < 0 or a.max() >= AUDIO_VOCAB)]
                    if bad:
                        raise DataError(f"{source}: /{name} row {start + bad[0]} holds audio codes outside "
                                        f"[0, {AUDIO_VOCAB}); is this a token file from pretokenize.py?")
                    turns = None
                    if writer.turns is not None:
                        turns = ([c.decode() if isinstance(c, bytes) else str(c)
                                  for c in group["conversation"][start:end]],
                                 group["turn"][start:end], group["speaker"][start:end])
                    writer.write(start, [a.astype(np.int16) for a in audio],
                                 [np.asarray(t, np.int32) for t in group["text"][start:end]],
                                 group["source_row"][start:end] if writer.source_row is not None else None, turns=turns)
                    bar.update(end - start)
        bar.close()
    return splits
