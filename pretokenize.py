"""Metadata (path, text, optional start/end/speaker) -> one HDF5 file of Mimi codes and text tokens (SPEC §3).

    python pretokenize.py --train_data train.csv --val_data val.csv --output data.hdf5

Clips are read (only their start-end window) and resampled by a thread pool while Mimi encodes the
previous chunk in padded, duration-sorted batches. Rows that cannot be used are skipped and listed
in <output>.skipped.csv with the reason. Work is committed in chunks of --save_every rows under
<output>.partial/; a killed run resumes when the same command is run again, and the output file
appears (atomically) only once every chunk is done.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import shutil
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import utils
from utils import MIMI_FRAME_RATE, MIMI_SAMPLE_RATE, NUM_CODEBOOKS, UserError

FORMAT_VERSION = 1
SAMPLES_PER_FRAME = int(MIMI_SAMPLE_RATE / MIMI_FRAME_RATE)  # 1920
SILENCE_PEAK = 1e-4
WINDOW_TOLERANCE_S = 0.05  # an `end` this far past the file's end is rounding, not a bad row
METADATA_FORMATS = (".json", ".jsonl", ".csv", ".parquet", ".sql", ".hdf5", ".h5", ".pkl")
REQUIRED_COLUMNS = ("path", "text")
OPTIONAL_COLUMNS = ("start", "end", "speaker")
SPLITS = ("train", "val")


class SkipRow(Exception):
    """This metadata row cannot become an example; the message is the reason in the report."""


# --------------------------------------------------------------------------- metadata


def read_metadata(path: str | Path):
    """A metadata file as a DataFrame with path, text, start, end, speaker; paths made absolute."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise UserError(f"metadata file {path} not found")
    suffix = path.suffix.lower()
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
        if start < 0 or end < 0:
            raise SkipRow(f"negative start/end ({start}, {end})")
        if end <= start:
            raise SkipRow(f"end {end} is not after start {start}")
    speaker = raw["speaker"]
    if _missing(speaker):
        speaker = None
    else:
        try:
            as_float = float(speaker)
        except (TypeError, ValueError):
            raise SkipRow(f"speaker {speaker!r} is not an integer id") from None
        if not as_float.is_integer() or as_float < 0:
            raise SkipRow(f"speaker {speaker!r} is not a non-negative integer id")
        speaker = int(as_float)
    return Row(index, str(path), str(text).strip(), start, end, speaker)


# --------------------------------------------------------------------------- audio


def load_clip(row: Row) -> np.ndarray:
    """The row's audio window as float32 mono at 24 kHz; SkipRow for anything unusable."""
    import soundfile as sf
    import torchaudio

    if not Path(row.path).is_file():
        raise SkipRow("audio file not found")
    try:
        info = sf.info(row.path)
    except Exception as e:  # libsndfile reports every format problem as a RuntimeError with its text
        raise SkipRow(f"unreadable audio ({str(e).splitlines()[0]})") from None
    rate, total = info.samplerate, info.frames
    start, stop = 0, total
    if row.start is not None:
        start, stop = round(row.start * rate), round(row.end * rate)
        if start >= total:
            raise SkipRow(f"window starts at {row.start:g} s, past the end of the file ({total / rate:.2f} s)")
        if stop > total + WINDOW_TOLERANCE_S * rate:
            raise SkipRow(f"window ends at {row.end:g} s, past the end of the file ({total / rate:.2f} s)")
        stop = min(stop, total)
    try:
        data, _ = sf.read(row.path, start=start, stop=stop, dtype="float32", always_2d=True)
    except Exception as e:
        raise SkipRow(f"unreadable audio ({str(e).splitlines()[0]})") from None
    audio = data.mean(axis=1)
    if rate != MIMI_SAMPLE_RATE:
        audio = torchaudio.functional.resample(torch.from_numpy(audio), rate, MIMI_SAMPLE_RATE).numpy()
    if len(audio) < SAMPLES_PER_FRAME:
        raise SkipRow(f"clip shorter than one 80 ms frame ({len(audio) / MIMI_SAMPLE_RATE * 1000:.0f} ms)")
    if not np.isfinite(audio).all():
        raise SkipRow("audio holds NaN or infinite samples")
    if np.abs(audio).max() < SILENCE_PEAK:
        raise SkipRow("silent clip")
    return np.ascontiguousarray(audio, dtype=np.float32)


def frames_of(num_samples: int) -> int:
    return math.ceil(num_samples / SAMPLES_PER_FRAME)


@torch.inference_mode()
def encode_batch(mimi, clips: list[np.ndarray], device, num_codebooks: int = NUM_CODEBOOKS) -> list[np.ndarray]:
    """Mimi codes [K, F] of each clip, encoded together right-padded with zeros.

    Mimi is causal, so the zeros after a clip do not change its codes: each clip keeps the
    ceil(len / 1920) frames its own samples reach.
    """
    width = frames_of(max(len(c) for c in clips)) * SAMPLES_PER_FRAME
    batch = torch.zeros(len(clips), 1, width)
    for i, clip in enumerate(clips):
        batch[i, 0, :len(clip)] = torch.from_numpy(clip)
    codes = mimi.encode(batch.to(device))[:, :num_codebooks].cpu().numpy()
    return [codes[i, :, :frames_of(len(clip))] for i, clip in enumerate(clips)]


# --------------------------------------------------------------------------- text


def encode_text(tokenizer, text: str, speaker: int | None, omit_speaker_id: bool) -> list[int]:
    if omit_speaker_id:
        return [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    return utils.encode_text(tokenizer, text, speaker)


# --------------------------------------------------------------------------- chunks on disk


def _chunk_path(work: Path, split: str, index: int) -> Path:
    return work / f"{split}_{index:06d}.npz"


def _save_chunk(path: Path, examples: list[tuple[int, np.ndarray, list[int], float]],
                skipped: list[tuple[int, str, str]]) -> dict:
    """One chunk's kept examples and skipped rows, written to a temp name then renamed (all or nothing)."""
    audio = [e[1].reshape(-1).astype(np.int16) for e in examples]
    text = [np.asarray(e[2], dtype=np.int32) for e in examples]
    arrays = {
        "rows": np.array([e[0] for e in examples], dtype=np.int64),
        "audio": np.concatenate(audio) if audio else np.zeros(0, np.int16),
        "audio_sizes": np.array([len(a) for a in audio], dtype=np.int64),
        "text": np.concatenate(text) if text else np.zeros(0, np.int32),
        "text_sizes": np.array([len(t) for t in text], dtype=np.int64),
        "seconds": np.array([e[3] for e in examples], dtype=np.float64),
        "skipped": np.array(json.dumps(skipped)),
    }
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return {**arrays, "skipped": skipped}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _load_chunk(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        chunk = {k: z[k] for k in z.files}
    chunk["skipped"] = json.loads(str(chunk["skipped"]))
    return chunk


# --------------------------------------------------------------------------- fingerprint


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def fingerprint(args, tokenizer, mimi, metadata: dict) -> dict:
    """Everything that decides the output's content; a resumed run must match it exactly."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    mimi_state = hashlib.sha256()
    for name, tensor in sorted(mimi.state_dict().items()):
        mimi_state.update(name.encode())
        # Shape plus the first 1024 values of each tensor: cheap, and another checkpoint differs there.
        mimi_state.update(str(tuple(tensor.shape)).encode())
        mimi_state.update(tensor.detach().reshape(-1)[:1024].float().cpu().numpy().tobytes())
    return {
        "format_version": FORMAT_VERSION,
        "text_tokenizer": str(args.text_tokenizer),
        "text_tokenizer_vocab": hashlib.sha256(vocab).hexdigest()[:16],
        "mimi": mimi_state.hexdigest()[:16],
        "codebooks": NUM_CODEBOOKS,
        "max_seq_len": args.max_seq_len,
        "omit_speaker_id": bool(args.omit_speaker_id),
        "save_every": args.save_every,
        "metadata": {split: {"path": str(Path(p).resolve()), "digest": _file_digest(Path(p))}
                     for split, p in metadata.items()},
    }


def _describe_change(old: dict, new: dict) -> str:
    changed = [k for k in new if old.get(k) != new[k]]
    names = {"text_tokenizer_vocab": "text tokenizer", "text_tokenizer": "text tokenizer", "mimi": "Mimi weights/config",
             "metadata": "metadata files", "max_seq_len": "--max_seq_len", "omit_speaker_id": "--omit_speaker_id",
             "save_every": "--save_every", "codebooks": "codebooks", "format_version": "format version"}
    return ", ".join(dict.fromkeys(names.get(k, k) for k in changed))


# --------------------------------------------------------------------------- the run


class Stats:
    def __init__(self):
        self.kept = self.skipped = self.tokens = 0
        self.seconds = 0.0

    def add_chunk(self, chunk: dict) -> None:
        self.kept += len(chunk["rows"])
        self.skipped += len(chunk["skipped"])
        self.tokens += int(chunk["audio"].size + chunk["text"].size)
        self.seconds += float(chunk["seconds"].sum())


def process_chunk(rows: list[tuple[int, dict]], clips, tokenizer, mimi, args, device, strict_label: str):
    """Encode one chunk's clips (an iterable of _prepare results in row order, e.g. reader futures
    resolving one by one): returns kept examples and skipped rows, both in row order."""
    examples, skipped, ready = [], [], []

    def encode_ready():
        # Duration-sorted batches keep padding small; results go back to metadata order at the end.
        ready.sort(key=lambda r: len(r[1]))
        for start in range(0, len(ready), args.batch_size):
            batch = ready[start:start + args.batch_size]
            for (index, audio, text), codes in zip(batch, encode_batch(mimi, [b[1] for b in batch], device)):
                examples.append((index, codes, text, len(audio) / MIMI_SAMPLE_RATE))
        ready.clear()

    # Encoding a few batches' worth at a time lets the encoder start while the readers are still
    # busy with the rest of the chunk; batching is exact, so the grouping does not change the codes.
    window = 4 * args.batch_size
    for (index, raw), clip in zip(rows, clips):
        try:
            if isinstance(clip, SkipRow):
                raise clip
            row, audio = clip
            text = encode_text(tokenizer, row.text, row.speaker, args.omit_speaker_id)
            length = len(text) + frames_of(len(audio)) + 1
            if length > args.max_seq_len:
                raise SkipRow(f"too long: {length} frames (text + audio + EOS) > max_seq_len {args.max_seq_len}")
            ready.append((index, audio, text))
        except SkipRow as e:
            if args.strict:
                raise UserError(f"{strict_label} row {index} ({raw.get('path')}): {e} (--strict stops at the first bad row)")
            skipped.append((index, str(raw.get("path")), str(e)))
        if len(ready) >= window:
            encode_ready()
    encode_ready()
    examples.sort(key=lambda e: e[0])
    return examples, skipped


def _prepare(raw_item: tuple[int, dict]):
    """Validate and read one row (runs in the reader threads)."""
    index, raw = raw_item
    try:
        row = check_row(index, raw)
        return row, load_clip(row)
    except SkipRow as e:
        return e


def _ragged(flat: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """A flat buffer cut back into its rows."""
    return np.split(flat, np.cumsum(sizes)[:-1])


def write_output(output: Path, work: Path, plan: dict, fp: dict, args, tokenizer) -> None:
    """Assemble the chunks into <output>.tmp, then rename it onto the output."""
    import h5py

    tmp = output.with_name(output.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs.update(format_version=FORMAT_VERSION, text_tokenizer=str(args.text_tokenizer),
                       text_vocab_size=len(tokenizer), bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                       codebooks=NUM_CODEBOOKS, sample_rate=MIMI_SAMPLE_RATE, frame_rate=MIMI_FRAME_RATE,
                       mimi_weights=str(args.mimi_weights or "default"), omit_speaker_id=bool(args.omit_speaker_id),
                       max_seq_len=args.max_seq_len, fingerprint=json.dumps(fp, sort_keys=True))
        for split, n_chunks in plan.items():
            paths = [_chunk_path(work, split, i) for i in range(n_chunks)]
            n = 0
            for chunk_path in paths:  # npz members load lazily: this reads only the row ids
                with np.load(chunk_path, allow_pickle=False) as z:
                    n += len(z["rows"])
            g = f.create_group(split)
            audio = g.create_dataset("audio", (n,), dtype=h5py.vlen_dtype(np.dtype("int16")))
            text = g.create_dataset("text", (n,), dtype=h5py.vlen_dtype(np.dtype("int32")))
            lengths = g.create_dataset("length", (n,), dtype=np.int32)
            rows = g.create_dataset("source_row", (n,), dtype=np.int64)
            start = 0
            for chunk_path in paths:
                chunk = _load_chunk(chunk_path)
                m = len(chunk["rows"])
                if m == 0:
                    continue
                # Row by row: h5py turns a slice of equal-length rows into a 2-D array and refuses it.
                for j, (a, t) in enumerate(zip(_ragged(chunk["audio"], chunk["audio_sizes"]),
                                               _ragged(chunk["text"], chunk["text_sizes"]))):
                    audio[start + j], text[start + j] = a, t
                lengths[start:start + m] = chunk["text_sizes"] + chunk["audio_sizes"] // NUM_CODEBOOKS + 1
                rows[start:start + m] = chunk["rows"]
                start += m
    os.replace(tmp, output)


def write_skipped_report(path: Path, work: Path, plan: dict) -> int:
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "row", "path", "reason"])
        for split, n_chunks in plan.items():
            for i in range(n_chunks):
                for row, p, reason in _load_chunk(_chunk_path(work, split, i))["skipped"]:
                    w.writerow([split, row, p, reason])
                    count += 1
    os.replace(tmp, path)
    return count


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Metadata -> HDF5 of Mimi audio codes and Llama text tokens.")
    p.add_argument("--train_data", help="metadata of the training split (" + ", ".join(METADATA_FORMATS) + ")")
    p.add_argument("--val_data", help="metadata of the validation split")
    p.add_argument("--output", required=True, help="HDF5 file to write")
    p.add_argument("--omit_speaker_id", action="store_true", help="tokenize text without the [speaker] prefix")
    p.add_argument("--device", default="auto", help="where Mimi runs: auto, cpu, cuda, cuda:1")
    p.add_argument("--save_every", type=int, default=500, help="rows per committed chunk (the resume granularity)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="clips encoded together, duration-sorted (default: 16 on CUDA, 1 on CPU)")
    p.add_argument("--num_workers", type=int, default=None,
                   help="threads reading and resampling audio ahead of the encoder (default: 4 on CUDA, 1 on CPU)")
    p.add_argument("--text_tokenizer", default=utils.DEFAULT_TEXT_TOKENIZER, help="hub id or local directory")
    p.add_argument("--mimi_weights", default=None, help="Mimi safetensors file or hub repo (default: moshi's)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    p.add_argument("--max_seq_len", type=int, default=2048, help="skip examples longer than this many frames")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    metadata = {split: p for split, p in (("train", args.train_data), ("val", args.val_data)) if p}
    if not metadata:
        raise UserError("give --train_data and/or --val_data")
    device = utils.resolve_device(args.device)
    # On CPU the full-size Mimi's convolutions are memory-bound, so big batches stop paying off
    # there (bench/pretokenize.py: 4 beat 1 with the full-size Mimi too); one reader thread is
    # enough to keep the encoder fed without taking a core from it.
    if args.batch_size is None:
        args.batch_size = 16 if device.type == "cuda" else 1
    if args.num_workers is None:
        args.num_workers = 4 if device.type == "cuda" else 0
    for name, value in (("--save_every", args.save_every), ("--batch_size", args.batch_size),
                        ("--max_seq_len", args.max_seq_len)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if args.num_workers < 0:
        raise UserError("--num_workers must be 0 or more")
    frames = {split: read_metadata(p) for split, p in metadata.items()}
    output = Path(args.output)
    work = output.with_name(output.name + ".partial")
    tokenizer = utils.load_text_tokenizer(args.text_tokenizer)
    mimi = utils.load_mimi(args.mimi_weights, device=device, num_codebooks=NUM_CODEBOOKS)
    fp = fingerprint(args, tokenizer, mimi, metadata)

    if output.exists() and not work.exists():
        import h5py

        try:
            with h5py.File(output, "r") as f:
                previous = json.loads(f.attrs.get("fingerprint", "{}"))
        except OSError:
            previous = {}
        if previous == json.loads(json.dumps(fp)):
            print(f"{output} is up to date (same metadata and settings); nothing to do")
            return 0
        print(f"{output} exists and will be replaced when this run finishes")
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "manifest.json"
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            raise UserError(f"{manifest} is unreadable; delete {work} to start over") from None
        if old != json.loads(json.dumps(fp)):
            raise UserError(f"{work} holds a half-done run with other settings ({_describe_change(old, fp)} changed); "
                            f"delete {work} to start over, or choose another --output")
    else:
        _write_atomic(manifest, json.dumps(fp, indent=1, sort_keys=True))

    plan = {split: math.ceil(len(df) / args.save_every) for split, df in frames.items()}
    todo = [(split, i) for split, n in plan.items() for i in range(n) if not _chunk_path(work, split, i).exists()]
    stats = {split: Stats() for split in plan}
    for split, n in plan.items():
        for i in range(n):
            if (split, i) not in todo:
                stats[split].add_chunk(_load_chunk(_chunk_path(work, split, i)))
    done_rows = sum(stats[s].kept + stats[s].skipped for s in plan)
    if done_rows:
        print(f"resuming: {done_rows} rows already done in {work}")

    def rows_of(split: str, i: int) -> list[tuple[int, dict]]:
        df = frames[split].iloc[i * args.save_every:(i + 1) * args.save_every]
        return [(int(idx), rec) for idx, rec in zip(df.index, df.to_dict("records"))]

    total = sum(len(df) for df in frames.values())
    bar = tqdm(total=total, initial=done_rows, unit="clip", desc="pretokenize", dynamic_ncols=True)
    t0, audio_s = time.perf_counter(), 0.0
    pool = ThreadPoolExecutor(args.num_workers) if args.num_workers else None

    def submit(item):
        rows = rows_of(*item)
        return rows, ([pool.submit(_prepare, r) for r in rows] if pool else None)

    try:
        pending = submit(todo[0]) if todo else None
        for n, (split, i) in enumerate(todo):
            rows, futures = pending
            # Read the next chunk while this one is encoded.
            pending = submit(todo[n + 1]) if n + 1 < len(todo) else None
            clips = (f.result() for f in futures) if futures else (_prepare(r) for r in rows)
            examples, skipped = process_chunk(rows, clips, tokenizer, mimi, args, device, split)
            chunk = _save_chunk(_chunk_path(work, split, i), examples, skipped)
            stats[split].add_chunk(chunk)
            audio_s += float(chunk["seconds"].sum())
            bar.update(len(rows))
            bar.set_postfix(audio_h_per_s=f"{audio_s / 3600 / max(time.perf_counter() - t0, 1e-9):.4f}",
                            skipped=sum(s.skipped for s in stats.values()))
    finally:
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)
        bar.close()

    report = Path(str(output) + ".skipped.csv")
    n_skipped = write_skipped_report(report, work, plan)
    write_output(output, work, plan, fp, args, tokenizer)
    # Renamed first, so that a kill during the deletion cannot leave chunks without their manifest.
    trash = work.with_name(work.name + ".delete")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(work, trash)
    shutil.rmtree(trash)
    for split, s in stats.items():
        print(f"{split}: kept {s.kept}, skipped {s.skipped}, {s.seconds / 3600:.3f} h of audio, {s.tokens} tokens")
    print(f"wrote {output}" + (f"; {n_skipped} skipped rows listed in {report}" if n_skipped else ""))
    return 0


if __name__ == "__main__":
    utils.run_cli(main)
