"""The preference file (docs/formats.md, "The preference file"), read and written only here: prefer.py's pairs of
a prompt's best and worst generated candidate, with their rewards and the reference model's log-probabilities of
every target frame, per split (train, val). Training with `objective: dpo` reads it.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from csm.system.outputs import atomic_path
from csm.data.token_file import AUDIO_VOCAB, DataError, open_hdf5

KIND = "preferences"  # the root attribute `kind` that tells a preference file from a token file
FORMAT_VERSION = 1
ROLES = ("chosen", "rejected")


@dataclass
class Candidate:
    """One generated candidate: its codes [K, F], whether it stopped at its EOS frame (then the EOS frame is a
    target too), its reward, and the reference model's log-probabilities of each target frame (F, plus one for
    the EOS frame): codebook 0 (`ref_c0`) and codebooks 1..K-1 summed (`ref_decoder`)."""

    codes: np.ndarray
    stopped: bool
    reward: float
    ref_c0: np.ndarray
    ref_decoder: np.ndarray

    @property
    def targets(self) -> int:
        return self.codes.shape[1] + int(self.stopped)


@dataclass
class Pair:
    """A prompt (its text ids, its context turns as (codes [K, F], text ids)) and its chosen and rejected
    candidates; `prompt` is the prompt's row in the data prefer.py read, `speaker` its speaker id."""

    prompt: int
    speaker: int
    text: np.ndarray
    context: list[tuple[np.ndarray, np.ndarray]]
    chosen: Candidate
    rejected: Candidate

    def lengths(self) -> tuple[int, int]:
        """Frames of the chosen and the rejected sequence: context turns, the text, the candidate."""
        prompt = sum(len(t) + c.shape[1] + 1 for c, t in self.context) + len(self.text)
        return prompt + self.chosen.targets, prompt + self.rejected.targets


def _vlen(dtype):
    return h5py.vlen_dtype(np.dtype(dtype))


# --------------------------------------------------------------------------- writing


def _write_split(group, pairs: list[Pair]) -> None:
    n = len(pairs)

    def ragged(name, dtype, values):
        dataset = group.create_dataset(name, (n,), dtype=_vlen(dtype))
        for i, v in enumerate(values):  # row by row: h5py refuses equal-length rows given as one 2-D slice
            dataset[i] = np.asarray(v, dtype=dtype).reshape(-1)

    group.create_dataset("prompt", data=np.array([p.prompt for p in pairs], dtype=np.int64).reshape(n))
    group.create_dataset("speaker", data=np.array([p.speaker for p in pairs], dtype=np.int32).reshape(n))
    ragged("text", "int32", [p.text for p in pairs])
    ragged("context_text", "int32", [np.concatenate([t for _, t in p.context] or [np.zeros(0)]) for p in pairs])
    ragged("context_text_sizes", "int32", [[len(t) for _, t in p.context] for p in pairs])
    ragged("context_audio", "int16", [np.concatenate([c.reshape(-1) for c, _ in p.context] or [np.zeros(0)])
                                      for p in pairs])
    ragged("context_frames", "int32", [[c.shape[1] for c, _ in p.context] for p in pairs])
    for role in ROLES:
        candidates = [getattr(p, role) for p in pairs]
        ragged(role, "int16", [c.codes for c in candidates])
        group.create_dataset(f"{role}_stopped", data=np.array([c.stopped for c in candidates], np.int8).reshape(n))
        group.create_dataset(f"{role}_reward", data=np.array([c.reward for c in candidates], np.float64).reshape(n))
        ragged(f"{role}_ref_c0", "float32", [c.ref_c0 for c in candidates])
        ragged(f"{role}_ref_decoder", "float32", [c.ref_decoder for c in candidates])


@contextlib.contextmanager
def write_preference_file(path: str | Path, attrs: dict) -> Iterator:
    """Write a preference file: into a temp file beside `path`, renamed onto it when the body succeeds. The body
    gets `add(split, pairs)`; `attrs` get the kind and format version added."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({**attrs, "kind": KIND, "format_version": FORMAT_VERSION})
            yield lambda split, pairs: _write_split(f.create_group(split), pairs)


# --------------------------------------------------------------------------- reading


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
CONFIG_NAMES = ("config.json", "adapter_config.json")


def path_identity(path, exclude=()) -> object:
    """What a local input is, for telling it from a changed one: a file's name, size and modification time; for a
    model's folder, those of its weights and configs (names relative to it, so the same model reached by another
    path, or copied with its times, is the same; files beside them, such as speakers.json, do not count). A hub id
    stands for itself. `exclude`: paths of the run's own outputs (a preference file kept in the model's folder),
    which are not part of the input."""
    p = Path(str(path)).expanduser()
    if not p.exists():
        return str(path)
    skip = [Path(e).expanduser().resolve() for e in exclude]
    root = p.resolve()
    files = sorted(f for f in ([root] if root.is_file() else root.rglob("*")) if f.is_file()
                   and (root.is_file() or f.suffix in WEIGHT_SUFFIXES or f.name in CONFIG_NAMES)
                   and not any(f == s or f.is_relative_to(s) for s in skip))
    return [(f.name if root.is_file() else str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns)
            for f in files]


def reference_identity(model, adapter=None, exclude=()) -> dict:
    """The identity of a reference model (with the LoRA adapter it was applied with), as a preference file keeps it
    and a DPO run compares it."""
    return {"model": path_identity(model, exclude), "adapter": path_identity(adapter, exclude) if adapter else None}


def is_preference_file(path: str | Path) -> bool:
    """An HDF5 file whose root says it holds preference pairs."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("kind") == KIND
    except (OSError, ValueError):
        return False


def open_preference_file(path: str | Path) -> dict[str, int]:
    """Names and pair counts of a preference file's splits, after checking what it is."""
    with open_hdf5(path, "preference file", "prefer.py", FORMAT_VERSION) as f:
        if f.attrs.get("kind") != KIND:
            raise DataError(f"{path} is not a preference file from prefer.py")
        return {name: len(group["prompt"]) for name, group in f.items() if isinstance(group, h5py.Group)}


LOGP_SLACK = 1e-3


def read_pairs(path: str | Path, split: str) -> tuple[list[Pair], int]:
    """Every pair of one split, and the codebooks per frame; a file that does not add up is refused."""
    with h5py.File(path, "r") as f:
        k = int(f.attrs["codebooks"])
        g = f[split]
        columns = {name: g[name][:] for name in g}
    pairs = []
    for i in range(len(columns["prompt"])):
        def codes(flat, what, i=i):
            flat = np.asarray(flat)
            if flat.size % k or (flat.size and (flat.min() < 0 or flat.max() >= AUDIO_VOCAB)):
                raise DataError(f"{path}: /{split}/{what} row {i} is not {k} codebooks of codes in [0, {AUDIO_VOCAB})")
            return flat.astype(np.int64).reshape(k, -1)

        sizes, frames = columns["context_text_sizes"][i], columns["context_frames"][i]
        cut_text = np.split(columns["context_text"][i], np.cumsum(sizes)[:-1]) if len(sizes) else []
        cut_audio = np.split(columns["context_audio"][i], np.cumsum(np.asarray(frames) * k)[:-1]) if len(frames) else []
        context = [(codes(a, "context_audio"), np.asarray(t, np.int64)) for a, t in zip(cut_audio, cut_text)]
        candidates = []
        for role in ROLES:
            candidate = Candidate(codes(columns[role][i], role), bool(columns[f"{role}_stopped"][i]),
                                  float(columns[f"{role}_reward"][i]), np.asarray(columns[f"{role}_ref_c0"][i]),
                                  np.asarray(columns[f"{role}_ref_decoder"][i]))
            if not len(candidate.ref_c0) == len(candidate.ref_decoder) == candidate.targets:
                raise DataError(f"{path}: /{split} pair {i}: the {role} candidate has {candidate.targets} target "
                                f"frames but {len(candidate.ref_c0)} reference log-probabilities; re-run prefer.py")
            for name, logps in (("ref_c0", candidate.ref_c0), ("ref_decoder", candidate.ref_decoder)):
                # Log-probabilities are finite and at most 0 (a little above, for float rounding).
                if logps.size and not (np.isfinite(logps).all() and logps.max() <= LOGP_SLACK):
                    bad = logps[~np.isfinite(logps) | (logps > LOGP_SLACK)][0]
                    raise DataError(f"{path}: /{split}/{role}_{name} of pair {i} holds {bad:g}, not a log-probability "
                                    "(finite, at most 0); re-run prefer.py")
            candidates.append(candidate)
        pairs.append(Pair(int(columns["prompt"][i]), int(columns["speaker"][i]),
                          np.asarray(columns["text"][i], np.int64), context, *candidates))
    return pairs, k


def settings_of(path: str | Path) -> dict:
    """The attributes prefer.py recorded (the reference model, the judges' weights, ...), JSON values decoded."""
    with h5py.File(path, "r") as f:
        out = {}
        for key, value in f.attrs.items():
            value = value.item() if hasattr(value, "item") else value
            try:
                out[key] = json.loads(value) if isinstance(value, str) and value[:1] in "{[" else value
            except ValueError:
                out[key] = value
        return out
