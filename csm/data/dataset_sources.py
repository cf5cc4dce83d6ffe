"""Where pretokenize.py's rows come from: a metadata file (metadata.py), or a `datasets` dataset from the
hub (`hf:NAME[:CONFIG][@SPLIT]`) or from a directory written by `save_to_disk` (`DIR[@SPLIT]`), read in
place or streamed. Every source gives rows as dicts with metadata.py's columns; a dataset's rows also
carry their audio (`AUDIO_KEY`: encoded bytes or a file path, decoded here with soundfile, not torchcodec).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from csm.data.metadata import read_metadata, speaker_id, speaker_numbers
from csm.system.errors import UserError
from csm.model.hub import hub_error
from csm.data.audio_io import AudioError, read_mono, resample
from csm.model.codec import MIMI_SAMPLE_RATE

AUDIO_KEY = "_audio"  # a dataset row's audio, {"bytes", "path"}, beside the metadata columns
HF_PREFIX = "hf:"


@dataclass(frozen=True)
class SourceOptions:
    """How pretokenize.py reads its sources: a dataset's columns and streaming, and whether pickled metadata
    may be read."""

    text_column: str = "text"
    audio_column: str = "audio"
    speaker_column: str | None = None
    streaming: bool = False
    trust_pickle: bool = False


class MetadataSource:
    """A metadata file's rows, by position."""

    streaming = False

    def __init__(self, path: str, trust_pickle: bool = False):
        self.df = read_metadata(path, trust_pickle=trust_pickle)
        self.path = Path(path)
        self.length = len(self.df)
        self.speaker_names: dict[str, int] = {}  # set by the caller: one numbering for every split of a file

    def speaker_values(self) -> list:
        """The distinct cells of the speaker column."""
        return list(dict.fromkeys(self.df["speaker"].tolist()))

    def rows(self, start: int, stop: int) -> list[tuple[int, dict]]:
        df = self.df.iloc[start:stop]
        return [(int(i), {**rec, "speaker": speaker_id(rec["speaker"], self.speaker_names)})
                for i, rec in zip(df.index, df.to_dict("records"))]

    def identity(self) -> dict:
        return {"path": str(self.path.resolve()), "digest": _file_digest(self.path)}


class DatasetSource:
    """A `datasets` dataset's rows: by position (`length` known), or in order from a stream (`streaming`)."""

    def __init__(self, spec: str, *, text_column: str, audio_column: str, speaker_column: str | None,
                 streaming: bool, default_split: str):
        self.spec, self.streaming = spec, streaming
        self.ds = _open_dataset(spec, streaming, default_split)
        if speaker_column is None and "speaker" in (self.ds.features or {}):
            speaker_column = "speaker"
        self.columns = (text_column, audio_column, speaker_column)
        self._check_columns()
        self.speaker_names: dict[str, int] = {}  # set by the caller: one numbering for every split of a file
        from datasets import Audio  # datasets takes a second to import: hub sources only

        if isinstance(self.ds.features.get(audio_column), Audio):  # decoded here (soundfile), not by torchcodec
            self.ds = self.ds.cast_column(audio_column, Audio(decode=False))
        self.length = None if streaming else len(self.ds)

    def _check_columns(self) -> None:
        features = self.ds.features or {}
        names = list(features)
        text, audio, speaker = self.columns
        for flag, name in (("--text_column", text), ("--audio_column", audio)):
            if name not in names:
                raise UserError(f"{self.spec} has no column {name!r} (columns: {', '.join(names)}); set {flag}")
        if speaker is not None and speaker not in names:
            raise UserError(f"{self.spec} has no column {speaker!r} (columns: "
                            f"{', '.join(names)}); set --speaker_column")

    def speaker_values(self) -> list:
        """The distinct cells of the speaker column; a streamed dataset's are read in a pass over that column
        alone, so that its names are numbered as the same dataset read in place numbers them."""
        speaker = self.columns[2]
        if speaker is None:
            return []
        if not self.streaming:
            return self.ds.unique(speaker)
        print(f"{self.spec}: reading the {speaker!r} column once to number its speakers")
        return list(dict.fromkeys(row[speaker] for row in self.ds.select_columns([speaker])))

    def _row(self, index: int, record: dict) -> tuple[int, dict]:
        text, audio, speaker = self.columns
        spk = speaker_id(record.get(speaker), self.speaker_names) if speaker else None
        return index, {"path": f"{self.spec}[{index}]", "text": record.get(text), "start": None, "end": None,
                       "speaker": spk, "conversation": None, "turn": None, AUDIO_KEY: record.get(audio)}

    def rows(self, start: int, stop: int) -> list[tuple[int, dict]]:
        batch = self.ds[start:stop]
        keys = list(batch)
        return [self._row(start + i, {k: batch[k][i] for k in keys}) for i in range(len(batch[keys[0]]))]

    def stream(self, skip: int) -> Iterator[tuple[int, dict]]:
        """Rows from position `skip` on (a resumed run skips what its chunks already hold)."""
        for i, record in enumerate(self.ds.skip(skip) if skip else self.ds, start=skip):
            yield self._row(i, record)

    def identity(self) -> dict:
        ident = {"dataset": self.spec, "columns": list(self.columns), "streaming": self.streaming}
        fingerprint = getattr(self.ds, "_fingerprint", None)
        if fingerprint and not self.streaming:
            ident["fingerprint"] = fingerprint
        return ident


def _parse_spec(spec: str, default_split: str) -> tuple[str, str | None, str]:
    """hf:NAME[:CONFIG][@SPLIT] or DIR[@SPLIT] -> (name or dir, config, split)."""
    body = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec
    body, _, split = body.partition("@")
    name, _, config = body.partition(":") if spec.startswith(HF_PREFIX) else (body, "", "")
    if not name:
        raise UserError(f"{spec}: give a dataset, as hf:NAME[:CONFIG][@SPLIT] or a save_to_disk directory[@SPLIT]")
    return name, config or None, split or default_split


def _open_dataset(spec: str, streaming: bool, default_split: str):
    import datasets  # a second to import: hub sources only

    name, config, split = _parse_spec(spec, default_split)
    try:
        if spec.startswith(HF_PREFIX):
            return datasets.load_dataset(name, config, split=split, streaming=streaming)
        loaded = datasets.load_from_disk(name)
    except UserError:
        raise
    except Exception as e:  # the hub and datasets raise many types; the first line says what went wrong

        raise hub_error("dataset", name, e, "Or give a local directory saved with save_to_disk.") from e
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"{spec}: no split {split!r} (splits: {', '.join(loaded)}); add @SPLIT")
        loaded = loaded[split]
    return loaded.to_iterable_dataset() if streaming else loaded


def is_dataset_spec(spec: str) -> bool:
    """A `datasets` source rather than a metadata file: hf:..., or a save_to_disk directory (optionally @SPLIT)."""
    if spec.startswith(HF_PREFIX):
        return True
    path = Path(spec.partition("@")[0])
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json",
                                                                        "state.json"))


def open_source(spec: str, options: SourceOptions, split: str):
    """The rows of one split given on pretokenize.py's command line."""
    if is_dataset_spec(spec):
        return DatasetSource(spec, text_column=options.text_column, audio_column=options.audio_column,
                             speaker_column=options.speaker_column, streaming=options.streaming,
                             default_split="validation" if split == "val" else "train")
    return MetadataSource(spec, trust_pickle=options.trust_pickle)


def number_speakers(sources) -> dict[str, int]:
    """One numbering of the speaker names of every split, given to each source (so val's "bob" is train's "bob");
    returns it (name -> id; integer ids keep their number and need no entry)."""
    names = speaker_numbers(v for source in sources for v in source.speaker_values())
    for source in sources:
        source.speaker_names = names
    return names


def decode_audio_payload(payload) -> np.ndarray:
    """A dataset row's audio as float32 mono at 24 kHz: {"bytes"} or {"path"} (any format soundfile reads),
    or {"array", "sampling_rate"} already decoded."""
    if not isinstance(payload, dict):
        raise AudioError("dataset row", "no audio in the row")
    if payload.get("array") is not None:
        data, rate = np.asarray(payload["array"], dtype=np.float32), int(payload["sampling_rate"])
        mono = data if data.ndim == 1 else data.mean(axis=0 if data.shape[0] < data.shape[-1] else 1)
    else:
        source = io.BytesIO(payload["bytes"]) if payload.get("bytes") else payload.get("path")
        if not source:
            raise AudioError("dataset row", "no audio in the row")
        mono, rate = read_mono(source, payload.get("path") or "dataset row")
    return np.ascontiguousarray(resample(np.ascontiguousarray(mono, dtype=np.float32), rate, MIMI_SAMPLE_RATE),
                                dtype=np.float32)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
