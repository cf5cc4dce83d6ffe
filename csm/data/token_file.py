"""The pre-tokenized HDF5 file (docs/formats.md, "The token file"), read and written only here: per split,
vlen int16 Mimi codes (32 x F, codebook-major), vlen int32 text ids, int32 lengths (len(text) + F + 1), int64
source rows and (for conversational context) each row's conversation id, turn order and speaker; attributes
name the tokenizers, the format version and the speaker names (name -> id, JSON; integer ids stand for
themselves and have no entry; -1 is a row without a speaker). Files of the original tool (int32 codes, no
attributes) read the same way; a file of a newer format version is refused with a clear message.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from csm.system.errors import UserError
from csm.system.outputs import atomic_path

FORMAT_VERSION = 1
SPLIT_DATASETS = ("audio", "text", "length")
AUDIO_VOCAB = 2048  # Mimi codes are in [0, 2048); the model's 3 extra ids are never stored
_READ_BLOCK = 4096  # rows per h5py read when loading a split into memory


class DataError(UserError):
    """The token file is missing, malformed, or does not fit the training settings."""


def _h5py():
    return h5py


# --------------------------------------------------------------------------- reading


def open_hdf5(path: str | Path, what: str, maker: str, supported: int):
    """An open h5py.File (read-only) of a file `maker` writes, or one clear error: missing, not HDF5, or of a
    format version newer than `supported`."""
    path = Path(path)
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


def open_splits(path: str | Path) -> dict[str, int]:
    """Names and sizes of the splits in a token file; one clear error if it is not a token file."""
    h5py = _h5py()
    with open_token_file(path) as f:
        splits = {}
        for name, group in f.items():
            if not isinstance(group, h5py.Group):
                continue
            missing = [d for d in SPLIT_DATASETS if d not in group]
            if missing:
                raise DataError(f"{path}: group '{name}' lacks dataset(s) {', '.join(missing)}; "
                                f"expected /{name}/audio, /{name}/text, /{name}/length (see pretokenize.py)")
            sizes = {d: len(group[d]) for d in SPLIT_DATASETS}
            if len(set(sizes.values())) != 1:
                raise DataError(f"{path}: '{name}' datasets differ in length {sizes}; the file is "
                                f"damaged, re-run pretokenize.py")
            splits[name] = sizes["length"]
        if not splits:
            raise DataError(f"{path} holds no split groups (expected /train and/or /val with audio, text, length)")
    return splits


def read_split_index(f, path, split: str) -> tuple[np.ndarray, int]:
    """(lengths int64 [N], codebooks per frame) of one split of an open token file."""
    group = f[split]
    lengths = group["length"][:].astype(np.int64)
    if len(lengths) == 0:
        raise DataError(f"{path}: the '{split}' split is empty")
    first_audio, first_text = np.asarray(group["audio"][0]), np.asarray(group["text"][0])
    frames = int(lengths[0]) - len(first_text) - 1
    if frames <= 0 or len(first_audio) % frames:
        raise DataError(f"{path}: /{split}/length[0]={lengths[0]} does not match its text "
                        f"({len(first_text)} ids) and audio ({len(first_audio)} codes)")
    num_codebooks = len(first_audio) // frames
    declared = f.attrs.get("codebooks")
    if declared is not None and int(declared) != num_codebooks:
        raise DataError(f"{path}: attribute codebooks={declared} but rows hold {num_codebooks} per frame")
    return lengths, num_codebooks


def read_flat(f, path, split: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """All rows of /split/audio (as int16) or /split/text (as int32) as one flat buffer + offsets [N+1]:
    ~2 bytes a code instead of a tensor each. Audio codes outside [0, 2048) are refused."""
    dataset = f[split][what]
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
    return np.asarray(group["audio"][i]), np.asarray(group["text"][i])


# --------------------------------------------------------------------------- writing


class SplitWriter:
    """The datasets of one split, created at their final size and filled a block of rows at a time.

    With `turns`, each row also records its conversation id ("" for a row that stands alone), its turn
    order within it and its speaker id, for composing examples with conversational context."""

    def __init__(self, group, n: int, num_codebooks: int, audio_dtype: str, source_rows: bool, turns: bool = False):
        h5py = _h5py()
        self.num_codebooks = num_codebooks
        self.audio = group.create_dataset("audio", (n,), dtype=h5py.vlen_dtype(np.dtype(audio_dtype)))
        self.text = group.create_dataset("text", (n,), dtype=h5py.vlen_dtype(np.dtype("int32")))
        self.length = group.create_dataset("length", (n,), dtype=np.int32)
        self.source_row = group.create_dataset("source_row", (n,), dtype=np.int64) if source_rows else None
        self.turns = None
        if turns:
            self.turns = (group.create_dataset("conversation", (n,), dtype=h5py.string_dtype()),
                          group.create_dataset("turn", (n,), dtype=np.float64),
                          group.create_dataset("speaker", (n,), dtype=np.int32))

    def write(self, start: int, audio: list[np.ndarray], text: list[np.ndarray], source_rows=None,
              turns: tuple | None = None) -> int:
        """Rows start.. of flat codes (K x F each) and text ids (and, with turns, (conversation ids,
        turn orders, speakers) of those rows); returns the next free row."""
        # Row by row: h5py turns a slice of equal-length rows into a 2-D array and refuses it.
        for j, (a, t) in enumerate(zip(audio, text)):
            self.audio[start + j], self.text[start + j] = a, t
        m = len(audio)
        self.length[start:start + m] = [len(t) + len(a) // self.num_codebooks + 1 for a, t in zip(audio, text)]
        if self.source_row is not None:
            self.source_row[start:start + m] = source_rows
        if self.turns is not None and m:
            for dataset, values in zip(self.turns, turns):
                dataset[start:start + m] = list(values) if dataset.dtype.kind == "O" else values
        return start + m


class TokenFileWriter:
    """An open token file being written; made by `write_token_file`."""

    def __init__(self, f, num_codebooks: int, audio_dtype: str):
        self.f, self.num_codebooks, self.audio_dtype = f, num_codebooks, audio_dtype

    def split(self, name: str, n: int, *, source_rows: bool = True, turns: bool = False) -> SplitWriter:
        return SplitWriter(self.f.create_group(name), n, self.num_codebooks, self.audio_dtype, source_rows, turns)


@contextlib.contextmanager
def write_token_file(path: str | Path, attrs: dict | None, *, num_codebooks: int = 32,
                     audio_dtype: str = "int16") -> Iterator[TokenFileWriter]:
    """Write a token file: into a temp file beside `path`, renamed onto it only when the body succeeds.

    `attrs` (None: none at all, as the original tool wrote) gets format_version added.
    """
    h5py = _h5py()
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            if attrs is not None:
                f.attrs.update({"format_version": FORMAT_VERSION, **attrs})
            yield TokenFileWriter(f, num_codebooks, audio_dtype)
