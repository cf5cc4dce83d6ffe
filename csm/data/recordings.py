"""Long recordings -> utterances -> metadata rows: speech found by a voice-activity model (silero-vad,
whose weights ship inside its wheel), cut into utterances by pause length and duration, transcribed by an
ASR model (speech_metrics.ASR), written as `path,start,end,text,speaker[,conversation,turn]` windows into
the original files. prepare.py is its command line; the work resumes file by file.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from silero_vad import get_speech_timestamps, load_silero_vad
import soundfile as sf
import torch
from tqdm import tqdm

from csm.data.metadata import speaker_id, speaker_numbers, visible_text
from csm.system.errors import UserError
from csm.system.outputs import append_line, atomic_path, not_a_file, write_text_atomic
from csm.data.audio_io import AudioError, read_mono, resample
from csm.data.dnsmos import DNSMOS, NotScorable, rejection

VAD_RATE = 16_000  # silero-vad and Whisper both listen at 16 kHz
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")
COLUMNS = ("path", "start", "end", "text", "speaker")


@dataclass
class CutSettings:
    min_seconds: float = 2.0    # shorter utterances are left out (and reported)
    max_seconds: float = 20.0   # longer speech is split at its longest pause
    min_silence: float = 0.5    # a pause at least this long ends an utterance
    threshold: float = 0.5      # silero's speech probability threshold
    min_dnsmos: float | None = None  # utterances whose DNSMOS OVRL is below this are left out (None: not scored)


# --------------------------------------------------------------------------- finding and cutting speech


def load_vad():
    """silero-vad's model, from the weights inside its wheel (no download)."""
    return load_silero_vad()


def speech_regions(vad, audio16k: np.ndarray, threshold: float) -> list[tuple[float, float]]:
    """(start, end) seconds of speech in 16 kHz mono audio, pauses of 0.1 s and more kept apart."""
    stamps = get_speech_timestamps(torch.from_numpy(audio16k), vad, sampling_rate=VAD_RATE, threshold=threshold,
                                   min_speech_duration_ms=100, min_silence_duration_ms=100, speech_pad_ms=30,
                                   return_seconds=False)
    return [(s["start"] / VAD_RATE, s["end"] / VAD_RATE) for s in stamps]


def cut_utterances(regions: list[tuple[float, float]], s: CutSettings) -> tuple[list[tuple[float, float]], list]:
    """Speech regions -> utterances: regions closer than `min_silence` join; an utterance over `max_seconds`
    is split at its longest inner pause (again and again), or, without any, into equal parts; those under
    `min_seconds` are returned apart as (start, end, reason)."""
    groups: list[list[tuple[float, float]]] = []
    for region in regions:
        if groups and region[0] - groups[-1][-1][1] < s.min_silence:
            groups[-1].append(region)
        else:
            groups.append([region])
    kept, dropped = [], []
    todo = list(groups)
    while todo:
        group = todo.pop(0)
        start, end = group[0][0], group[-1][1]
        if end - start > s.max_seconds:
            if len(group) > 1:
                gaps = [group[i + 1][0] - group[i][1] for i in range(len(group) - 1)]
                cut = int(np.argmax(gaps)) + 1
                todo[:0] = [group[:cut], group[cut:]]
                continue
            parts = int(np.ceil((end - start) / s.max_seconds))  # continuous speech: equal parts
            step = (end - start) / parts
            kept.extend((start + i * step, start + (i + 1) * step) for i in range(parts))
            continue
        if end - start < s.min_seconds:
            dropped.append((start, end, f"speech shorter than --min_seconds ({end - start:.2f} s)"))
        else:
            kept.append((start, end))
    return sorted(kept), dropped


# --------------------------------------------------------------------------- files


def find_audio(paths: list[str]) -> list[Path]:
    """Audio files named, or found under the directories named (recursively), sorted, each once."""
    found = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found.extend(q for q in sorted(path.rglob("*")) if q.is_file() and q.suffix.lower() in AUDIO_EXTENSIONS)
        elif path.is_file():
            found.append(path)
        elif path.exists():
            raise UserError(f"--audio {p} {not_a_file(path)}; give audio files or directories")
        else:
            raise UserError(f"--audio {p}: no such file or directory")
    unique = list(dict.fromkeys(q.resolve() for q in found))
    if not unique:
        raise UserError(f"--audio {' '.join(paths)}: no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    return unique


def speaker_ids(files: list[Path], fixed: int | None) -> dict[Path, int]:
    """Each file's speaker id: --speaker for all; else the parent folder's name when it is a number ("7", but
    not "007"), else the other folders numbered in sorted order of their names."""
    if fixed is not None:
        return {f: fixed for f in files}

    names = speaker_numbers(f.parent.name for f in files)
    return {f: speaker_id(f.parent.name, names) for f in files}


def read_16k(path: Path) -> tuple[np.ndarray, float]:
    """A file as 16 kHz mono float32, and its duration in seconds."""
    mono, rate = read_mono(str(path), path)
    if len(mono) == 0:
        raise AudioError(path, "empty audio file")
    if not np.isfinite(mono).all():  # silero-vad would find no speech in it, which says the wrong thing
        raise AudioError(path, "audio holds NaN or infinite samples")
    return resample(mono, rate, VAD_RATE).astype(np.float32), len(mono) / rate


# --------------------------------------------------------------------------- the run


class Progress:
    """Per-file results so far (<output>.partial.jsonl, after a first line with the run's settings): a killed
    run resumes after the last whole file, when it is run again with the same settings."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.done: dict[str, dict] = {}
        if not path.exists():
            self.add({"settings": settings})
            return
        lines = path.read_text().splitlines()
        try:
            saved = json.loads(lines[0])["settings"]
        except (IndexError, ValueError, KeyError, TypeError):
            saved = None
        if saved != json.loads(json.dumps(settings)):
            raise UserError(f"{path} holds a half-done run with other settings or inputs; run it again as it was, "
                            "or delete that file to start over")
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                self.done[entry["file"]] = entry
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the kill

    def add(self, entry: dict) -> None:
        append_line(self.path, json.dumps(entry), sync=True)
        if "file" in entry:
            self.done[entry["file"]] = entry


def prepare(files: list[Path], output: Path, *, settings: CutSettings, asr=None, speaker: int | None = None,
            conversations: bool = False, progress: bool = True, scorer: DNSMOS | None = None) -> dict:
    """Find, cut, score (with settings.min_dnsmos) and transcribe every file; write the metadata rows to `output`
    (CSV, atomically) and the rows left out, with their reasons, to <output>.skipped.csv. Returns counts."""
    vad = load_vad()
    if settings.min_dnsmos is not None and scorer is None:
        scorer = DNSMOS()
    speakers = speaker_ids(files, speaker)
    run_settings = {"cut": vars(settings), "asr": getattr(asr, "source", None),
                    "language": getattr(asr, "language", None),
                    "speaker": speaker, "conversations": conversations, "files": [str(f) for f in files]}
    state = Progress(output.with_name(output.name + ".partial.jsonl"), run_settings)
    todo = [f for f in files if str(f) not in state.done]
    if state.done:
        print(f"resuming: {len(files) - len(todo)} of {len(files)} files already done")
    total_s = 0.0

    for f in todo:
        try:
            info = sf.info(str(f))
            total_s += info.frames / info.samplerate
        except Exception:  # noqa: BLE001 - reported as unreadable when its turn comes
            pass
    bar = tqdm(total=round(total_s / 3600, 4), unit="h", desc="prepare", disable=not progress, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} h audio [{elapsed}<{remaining}{postfix}]")
    t0, done_s = time.perf_counter(), 0.0
    for f in todo:
        rows, skipped, seconds = _one_file(f, vad, settings, asr, speakers[f], conversations, scorer)
        state.add({"file": str(f), "rows": rows, "skipped": skipped})
        done_s += seconds
        bar.update(round(seconds / 3600, 4))
        bar.set_postfix(rtf=f"{(time.perf_counter() - t0) / max(done_s, 1e-9):.3f}")
    bar.close()
    rows = [r for f in files for r in state.done[str(f)]["rows"]]
    skipped = [s for f in files for s in state.done[str(f)]["skipped"]]
    _write_rows(output, rows, conversations, scored=scorer is not None)
    _write_skipped(output.with_name(output.name + ".skipped.csv"), skipped)
    state.path.unlink()
    names = {}
    for f, spk in speakers.items():
        names.setdefault(f.parent.name, spk)
    if speaker is None:
        write_text_atomic(output.with_name(output.name + ".speakers.json"),
                          json.dumps(names, indent=1, sort_keys=True) + "\n")
    return {"rows": len(rows), "skipped": len(skipped), "files": len(files),
            "hours": sum(r["end"] - r["start"] for r in rows) / 3600}


def _one_file(path: Path, vad, s: CutSettings, asr, speaker: int, conversations: bool, scorer=None):
    """(rows, skipped, seconds of audio) of one recording."""
    try:
        audio, seconds = read_16k(path)
    except UserError as e:
        return [], [{"path": str(path), "start": None, "end": None, "reason": getattr(e, "reason", str(e))}], 0.0
    kept, dropped = cut_utterances(speech_regions(vad, audio, s.threshold), s)
    skipped = [{"path": str(path), "start": round(a, 3), "end": round(b, 3), "reason": why} for a, b, why in dropped]
    if not kept:
        skipped.append({"path": str(path), "start": None, "end": None, "reason": "no speech found"})
        return [], skipped, seconds
    clips = [audio[int(a * VAD_RATE):int(b * VAD_RATE)] for a, b in kept]
    scores = [None] * len(kept)
    if scorer is not None:  # before the ASR, which then hears only what is kept
        kept, clips, scores, dropped = _by_quality(kept, clips, scorer.score_many(clips, VAD_RATE), s.min_dnsmos)
        skipped += [{"path": str(path), "start": round(a, 3), "end": round(b, 3), "reason": why}
                    for a, b, why in dropped]
        if not kept:
            return [], skipped, seconds
    texts = asr.transcribe(clips, VAD_RATE) if asr is not None else [""] * len(kept)
    rows = []
    for (a, b), text, score in zip(kept, texts, scores):
        a, b = round(a, 3), round(min(b, seconds), 3)
        text = visible_text(text)
        if asr is not None and not text:
            skipped.append({"path": str(path), "start": a, "end": b, "reason": "empty transcript"})
            continue
        row = {"path": str(path), "start": a, "end": b, "text": text, "speaker": speaker}
        if score is not None:
            row["dnsmos"] = round(score.ovrl, 3)
        if conversations:
            row.update(conversation=str(path), turn=a)
        rows.append(row)
    return rows, skipped, seconds


def _by_quality(kept, clips, scores, minimum: float):
    """The utterances whose DNSMOS OVRL reaches `minimum` (kept, clips, scores) and the others (start, end, why)."""
    good, dropped = [], []
    for span, clip, score in zip(kept, clips, scores):
        why = rejection(score if isinstance(score, NotScorable) else score.ovrl, minimum)
        if why:
            dropped.append((*span, why))
        else:
            good.append((span, clip, score))
    return [g[0] for g in good], [g[1] for g in good], [g[2] for g in good], dropped


def _write_rows(output: Path, rows: list[dict], conversations: bool, scored: bool = False) -> None:
    """The metadata CSV; paths relative to its folder when they lie under it, so the set can move together."""
    columns = [*COLUMNS, *(("dnsmos",) if scored else ()), *(("conversation", "turn") if conversations else ())]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    base = output.resolve().parent
    for row in rows:
        p = Path(row["path"])
        rel = os.path.relpath(p, base) if p.is_relative_to(base) else str(p)
        writer.writerow({**row, "path": rel, **({"conversation": rel} if conversations else {})})
    write_text_atomic(output, buf.getvalue())


def _write_skipped(path: Path, skipped: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "start", "end", "reason"])
        writer.writeheader()
        writer.writerows(skipped)
