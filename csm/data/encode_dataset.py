"""Metadata rows -> Mimi codes and text ids -> one token file, crash-safe and resumable.

Clips are read (only their start-end window) by a thread pool while Mimi encodes the previous chunk
in padded, duration-sorted batches. Rows that cannot be used are skipped and listed in
<output>.skipped.csv with the reason. Work is committed in chunks of --save_every rows under
<output>.partial/; a killed run resumes when the same command is run again, and the output file
appears (atomically) only once every chunk is done. pretokenize.py is the command line of `run`.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from csm.data.audio_io import AudioError, read_audio
from csm.data.dataset_sources import AUDIO_KEY, SourceOptions, decode_audio_payload, number_speakers, open_source
from csm.data.metadata import UNKNOWN_SPEAKER, Row, SkipRow, check_row, turn_order
from csm.data.dnsmos import DNSMOS, NotScorable, rejection
from csm.data.token_file import FORMAT_VERSION, write_token_file
from csm.model.tokenization import DEFAULT_TEXT_TOKENIZER, encode_text, load_text_tokenizer
from csm.model.codec import (
    encode_audio, frames_of, load_mimi, MIMI_FRAME_RATE, MIMI_SAMPLE_RATE, NUM_CODEBOOKS, SAMPLES_PER_FRAME,
)
from csm.system.errors import UserError
from csm.system.runtime import Ranks, resolve_device, torchrun_ranks
from csm.system.outputs import (
    atomic_path, claim_output_files, claim_work_dir, describe_change, inputs_of, MANIFEST_NAME, remove_work_dir,
)

SILENCE_PEAK = 1e-4


# --------------------------------------------------------------------------- audio


def load_clip(row: Row, payload=None) -> np.ndarray:
    """The row's audio window (or a dataset row's own audio, `payload`) as float32 mono at 24 kHz;
    SkipRow for anything unusable."""
    try:
        audio = read_audio(row.path, row.start, row.end) if payload is None else decode_audio_payload(payload)
    except AudioError as e:
        raise SkipRow(e.reason) from None
    if len(audio) < SAMPLES_PER_FRAME:
        raise SkipRow(f"clip shorter than one 80 ms frame ({len(audio) / MIMI_SAMPLE_RATE * 1000:.0f} ms)")
    if not np.isfinite(audio).all():
        raise SkipRow("audio holds NaN or infinite samples")
    if np.abs(audio).max() < SILENCE_PEAK:
        raise SkipRow("silent clip")
    return audio


# --------------------------------------------------------------------------- chunks on disk


def _chunk_path(work: Path, split: str, index: int) -> Path:
    return work / f"{split}_{index:06d}.npz"


CHUNK_KEYS = ("rows", "audio", "audio_sizes", "text", "text_sizes", "seconds", "speaker", "conversation", "turn",
              "skipped")


def _save_chunk(path: Path, examples: list[tuple[int, np.ndarray, list[int], float, Row]],
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
        # Kept with each example for conversational context (a fixed-width string array, no pickle).
        "speaker": np.array([UNKNOWN_SPEAKER if e[4].speaker is None else e[4].speaker for e in examples],
                            dtype=np.int64),
        "conversation": np.array([e[4].conversation or "" for e in examples], dtype=str),
        "turn": np.array([turn_order(e[4]) for e in examples], dtype=np.float64),
        "skipped": np.array(json.dumps(skipped)),
    }
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, **arrays)
    return {**arrays, "skipped": skipped}


def _load_chunk(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        chunk = {k: z[k] for k in z.files}
    chunk["skipped"] = json.loads(str(chunk["skipped"]))
    return chunk


# --------------------------------------------------------------------------- fingerprint


@dataclass(frozen=True)
class EncodeSettings:
    """What pretokenize.py was asked to do, its defaults settled and its numbers checked."""

    splits: dict[str, str]  # split name -> metadata file or dataset spec
    output: Path
    device: str = "auto"
    text_tokenizer: str = DEFAULT_TEXT_TOKENIZER
    mimi_weights: str | None = None
    batch_size: int = 1  # clips encoded together
    num_workers: int = 0  # reader threads
    save_every: int = 500  # rows per committed chunk
    max_seq_len: int = 2048
    omit_speaker_id: bool = False
    strict: bool = False
    overwrite: bool = False
    sources: SourceOptions = field(default_factory=SourceOptions)
    min_dnsmos: float | None = None  # rows below this DNSMOS OVRL are skipped (their dnsmos column, else scored)


def fingerprint(args: EncodeSettings, tokenizer, mimi, sources: dict) -> dict:
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
        "metadata": {split: source.identity() for split, source in sources.items()},
        **({} if args.min_dnsmos is None else {"min_dnsmos": args.min_dnsmos}),
    }


# What the fingerprint's keys are called on the command line, for a refusal naming what changed.
FINGERPRINT_NAMES = {"text_tokenizer_vocab": "text tokenizer vocabulary", "text_tokenizer": "--text_tokenizer",
                     "mimi": "Mimi weights/config", "metadata": "metadata files", "max_seq_len": "--max_seq_len",
                     "omit_speaker_id": "--omit_speaker_id", "save_every": "--save_every", "codebooks": "codebooks",
                     "format_version": "format version", "speakers": "speaker names", "min_dnsmos": "--min_dnsmos"}


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


GATE_SECONDS = 120.0  # audio scored by DNSMOS at a time: its memory is bounded whatever --save_every is


class Filtered(SkipRow):
    """A row the quality filter (--min_dnsmos) leaves out: not a broken row, so --strict goes on past it."""


def _given_score(raw: dict) -> float | None:
    try:
        value = float(raw.get("dnsmos"))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def quality_gate(items, scorer: DNSMOS, minimum: float):
    """The rows that passed every other check, in order, those below `minimum` DNSMOS OVRL turned into Filtered
    (with the score): a row's own `dnsmos` column when it has a number there (prepare.py --min_dnsmos writes it),
    else a score made now, for GATE_SECONDS of audio at a time (so a chunk's clips are never all held at once)."""
    pending, seconds = [], 0.0

    def judged():
        todo = [i for i, item in enumerate(pending) if not isinstance(item, SkipRow) and item[5] is None]
        scores = scorer.score_many([pending[i][2] for i in todo], MIMI_SAMPLE_RATE) if todo else []
        for i, score in zip(todo, scores):
            pending[i] = (*pending[i][:5], score if isinstance(score, NotScorable) else score.ovrl)
        for item in pending:
            why = None if isinstance(item, SkipRow) else rejection(item[5], minimum)
            if why:
                item, left_out = Filtered(why), item
                item.row = left_out[:2]
            yield item
        pending.clear()

    for item in items:
        if not isinstance(item, SkipRow):
            given = _given_score(item[1])
            item = (*item, given)
            seconds += 0 if given is not None else len(item[2]) / MIMI_SAMPLE_RATE
        pending.append(item)
        if seconds >= GATE_SECONDS:
            yield from judged()
            seconds = 0.0
    yield from judged()


def process_chunk(rows: list[tuple[int, dict]], clips, tokenizer, mimi, args: EncodeSettings, strict_label: str,
                  scorer: DNSMOS | None = None):
    """Encode one chunk's clips (an iterable of _prepare results in row order, e.g. reader futures
    resolving one by one): returns kept examples and skipped rows, both in row order. Each row is checked (its
    text, its length against max_seq_len) before it is scored: with `scorer`, rows below args.min_dnsmos are then
    left out (quality_gate), and a row too long for the model is never scored."""
    examples, skipped, ready = [], [], []

    def checked():
        """(index, raw, audio, text, row) per row that can become an example, else its SkipRow (index in .index)."""
        for (index, raw), clip in zip(rows, clips):
            try:
                if isinstance(clip, SkipRow):
                    raise clip
                row, audio = clip
                text = encode_text(tokenizer, row.text, row.speaker, omit_speaker_id=args.omit_speaker_id)
                length = len(text) + frames_of(len(audio)) + 1
                if length > args.max_seq_len:
                    raise SkipRow(f"too long: {length} frames (text + audio + EOS) > max_seq_len {args.max_seq_len}")
                yield index, raw, audio, text, row
            except SkipRow as e:
                e.row = (index, raw)
                if args.strict:
                    raise UserError(f"{strict_label} row {index} ({raw.get('path')}): {e} "
                                    f"(--strict stops at the first bad row)") from None
                yield e

    def encode_ready():
        # Duration-sorted batches keep padding small; results go back to metadata order at the end.
        ready.sort(key=lambda r: len(r[1]))
        for start in range(0, len(ready), args.batch_size):
            batch = ready[start:start + args.batch_size]
            for (index, audio, text, row), codes in zip(batch,
                                                        encode_audio(mimi, [b[1] for b in batch], NUM_CODEBOOKS)):
                examples.append((index, codes, text, len(audio) / MIMI_SAMPLE_RATE, row))
        ready.clear()

    items = checked() if scorer is None else quality_gate(checked(), scorer, args.min_dnsmos)
    # Encoding a few batches' worth at a time lets the encoder start while the readers are still
    # busy with the rest of the chunk; batching is exact, so the grouping does not change the codes.
    window = 4 * args.batch_size
    for item in items:
        if isinstance(item, SkipRow):
            index, raw = getattr(item, "row", (None, {}))
            skipped.append((index, str(raw.get("path")), str(item)))
            continue
        index, _, audio, text, row = item[:5]
        ready.append((index, audio, text, row))
        if len(ready) >= window:
            encode_ready()
    encode_ready()
    examples.sort(key=lambda e: e[0])
    skipped.sort(key=lambda s: s[0])
    return examples, skipped


def _prepare(raw_item: tuple[int, dict]):
    """Validate and read one row (runs in the reader threads)."""
    index, raw = raw_item
    try:
        row = check_row(index, raw)
        return row, load_clip(row, raw.get(AUDIO_KEY))
    except SkipRow as e:
        return e


def _ragged(flat: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """A flat buffer cut back into its rows (none for a chunk whose rows were all skipped)."""
    return np.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) else []


def write_output(output: Path, work: Path, plan: dict, fp: dict, args: EncodeSettings, tokenizer) -> None:
    """Assemble the chunks into the token file (written beside it, then renamed onto it)."""
    attrs = dict(text_tokenizer=str(args.text_tokenizer), text_vocab_size=len(tokenizer), bos_id=tokenizer.bos_token_id,
                 eos_id=tokenizer.eos_token_id, codebooks=NUM_CODEBOOKS, sample_rate=MIMI_SAMPLE_RATE,
                 frame_rate=MIMI_FRAME_RATE, mimi_weights=str(args.mimi_weights or "default"),
                 omit_speaker_id=bool(args.omit_speaker_id), max_seq_len=args.max_seq_len,
                 speakers=json.dumps(fp["speakers"], sort_keys=True), fingerprint=json.dumps(fp, sort_keys=True))
    with write_token_file(output, attrs, num_codebooks=NUM_CODEBOOKS) as out:
        for split, n_chunks in plan.items():
            paths = [_chunk_path(work, split, i) for i in range(n_chunks)]
            n = codes = text_ids = 0
            for chunk_path in paths:  # npz members load lazily: this reads only the rows and sizes
                with np.load(chunk_path, allow_pickle=False) as z:
                    n, codes, text_ids = n + len(z["rows"]), codes + int(z["audio_sizes"].sum()), \
                        text_ids + int(z["text_sizes"].sum())
            writer, start = out.split(split, n, codes=codes, text_ids=text_ids, turns=True), 0
            for chunk_path in paths:  # one chunk in memory at a time
                chunk = _load_chunk(chunk_path)
                start = writer.write(start, _ragged(chunk["audio"], chunk["audio_sizes"]),
                                     _ragged(chunk["text"], chunk["text_sizes"]), chunk["rows"],
                                     turns=(chunk["conversation"], chunk["turn"], chunk["speaker"]))


def write_skipped_report(path: Path, work: Path, plan: dict) -> int:
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "row", "path", "reason"])
        for split, n_chunks in plan.items():
            for i in range(n_chunks):
                for row, p, reason in _load_chunk(_chunk_path(work, split, i))["skipped"]:
                    w.writerow([split, row, p, reason])
                    count += 1
    return count


def top_skip_reasons(work: Path, plan: dict, top: int = 3) -> str:
    """The commonest reasons rows of these splits were skipped, counted ("audio file not found: 12 rows, ...");
    a reason's details in brackets (a duration, a file's own error) are left out of the grouping."""
    counts: dict[str, int] = {}
    for split, n_chunks in plan.items():
        for i in range(n_chunks):
            for _, _, reason in _load_chunk(_chunk_path(work, split, i))["skipped"]:
                key = reason.split(" (")[0]
                counts[key] = counts.get(key, 0) + 1
    if not counts:
        return "the split has no rows"
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return "top reasons: " + "; ".join(f"{why}: {n} row{'s' if n > 1 else ''}" for why, n in ranked)


def previous_fingerprint(output: Path) -> dict | None:
    """The fingerprint of a token file this tool finished writing; None for any other file."""
    try:
        with h5py.File(output, "r") as f:
            raw = f.attrs.get("fingerprint")
        return json.loads(raw) if raw is not None else None
    except (OSError, ValueError, TypeError):
        return None


def check_existing_output(output: Path, overwrite: bool) -> dict | None:
    """Refuse an existing output that would lose someone's file, before any audio is read (the output's lock
    held). Returns the fingerprint of a finished output of this tool (to compare once the tokenizers are
    loaded), else None."""
    if not output.exists():
        return None
    previous = previous_fingerprint(output)
    if previous is None and not overwrite:
        raise UserError(f"--output {output} exists and is not a token file written by pretokenize.py; "
                        "pass --overwrite to replace it, or choose another output")
    return previous


def _done_chunks(work: Path, plan: dict, ranks: Ranks | None = None) -> tuple[list, dict]:
    """Chunks still to encode, and the stats of those already done: all of them, or with `ranks` this rank's
    share (chunk g of the plan, counted across splits, is rank g mod N's). A chunk that cannot be read (a power
    loss can leave 0 bytes behind the rename) is deleted and done again."""
    todo, stats = [], {split: Stats() for split in plan}
    chunks = [(split, i) for split, n in plan.items() for i in range(n)]
    if ranks is not None:
        chunks = chunks[ranks.rank::ranks.world_size]
    for split, i in chunks:
        path = _chunk_path(work, split, i)
        if path.exists():
            try:
                chunk = _load_chunk(path)
                missing = [k for k in CHUNK_KEYS if k not in chunk]
                if missing:  # written by an older version of this tool
                    raise KeyError(", ".join(missing))
                stats[split].add_chunk(chunk)
                continue
            except (OSError, ValueError, KeyError, EOFError) as e:
                print(f"warning: {path} is damaged ({type(e).__name__}); encoding its rows again")
                path.unlink()
        todo.append((split, i))
    return todo, stats


def _streamed_chunks(work: Path, split: str) -> int:
    """Chunks of a streamed split already on disk: 0, 1, ... without a gap (a damaged last one is redone)."""
    n = 0
    while _chunk_path(work, split, n).exists():
        try:
            _load_chunk(_chunk_path(work, split, n))
        except (OSError, ValueError, KeyError, EOFError):
            _chunk_path(work, split, n).unlink()
            break
        n += 1
    return n


def run(args: EncodeSettings) -> int:
    """Metadata files -> token file, for pretokenize.py's settings; resumable. Under torchrun the chunks are shared
    out over the processes (chunk i to rank i mod N), each on its own GPU, and rank 0 writes the one token file
    once every rank is done."""
    with torchrun_ranks() as ranks:
        return _run_ranks(args, ranks)


def _run_ranks(args: EncodeSettings, ranks: Ranks) -> int:
    if args.sources.streaming and ranks.world_size > 1:
        raise UserError(f"--streaming reads a dataset as one stream, which {ranks.world_size} processes cannot "
                        "share out: run pretokenize.py as one process, or without --streaming")
    device = resolve_device(args.device)
    if ranks.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
    with contextlib.ExitStack() as held:
        def claim():
            # Rank 0 takes the output's lock for the whole run. An existing output is not refused here:
            # check_existing_output weighs it against this run's settings.
            (output,) = held.enter_context(claim_output_files(
                [Path(args.output)], "--output", inputs=inputs_of(vars(args), skip=("output",)),
                continues=lambda: True))
            return output, check_existing_output(output, args.overwrite), not _work_dir(output).exists()

        output, previous, fresh = ranks.share(claim)
        work = _work_dir(output)
        try:
            sources = {split: open_source(spec, args.sources, split) for split, spec in args.splits.items()}
            speakers = number_speakers(sources.values())
            return _run(args, device, sources, speakers, output, work, previous, ranks)
        except BaseException:
            if ranks.rank == 0 and fresh and not (work / MANIFEST_NAME).exists():
                shutil.rmtree(work, ignore_errors=True)  # nothing of this run to resume: leave no trace
            raise


def _work_dir(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def _claim_work(args: EncodeSettings, fp: dict, output: Path, work: Path, previous: dict | None) -> str:
    """Rank 0's decision once the settings are known: "up to date" (nothing to do), or "go" with the work
    directory claimed for this run; a refusal raises."""
    if previous is not None and not (work / MANIFEST_NAME).exists():
        if previous == json.loads(json.dumps(fp)):
            print(f"{output} is up to date (same metadata and settings); nothing to do")
            shutil.rmtree(work, ignore_errors=True)
            return "up to date"
        if not args.overwrite and {k: v for k, v in previous.items() if k != "format_version"} == \
                {k: v for k, v in json.loads(json.dumps(fp)).items() if k != "format_version"}:
            version = previous.get("format_version")
            raise UserError(f"--output {output} holds these rows in token-file format {version}: "
                            f"`python pretokenize.py --upgrade {output} --output NEW.hdf5` rewrites it as format "
                            f"{FORMAT_VERSION} without encoding again (or pass --overwrite to encode it anew)")
        if not args.overwrite:
            raise UserError(f"--output {output} was written with other settings "
                            f"({describe_change(previous, fp, FINGERPRINT_NAMES)}); pass --overwrite to replace it, "
                            "or choose another output")
        print(f"{output} will be replaced when this run finishes (--overwrite)")
    claim_work_dir(work, fp, FINGERPRINT_NAMES)
    return "go"


def _run(args: EncodeSettings, device, sources, speakers: dict[str, int], output, work, previous,
         ranks: Ranks) -> int:
    scorer = DNSMOS() if args.min_dnsmos is not None else None  # a missing package fails before the models load
    tokenizer = load_text_tokenizer(args.text_tokenizer)
    mimi = load_mimi(args.mimi_weights, device=device, num_codebooks=NUM_CODEBOOKS)
    fp = {**fingerprint(args, tokenizer, mimi, sources), "speakers": speakers}
    if ranks.share(lambda: _claim_work(args, fp, output, work, previous)) == "up to date":
        return 0

    # A streamed split's chunk count is known once its stream ends: until then, the chunks already on disk.
    plan = {split: math.ceil(src.length / args.save_every) if not src.streaming else _streamed_chunks(work, split)
            for split, src in sources.items()}
    todo, stats = _done_chunks(work, plan, ranks)
    done_rows = sum(stats[s].kept + stats[s].skipped for s in plan)
    if done_rows and ranks.rank == 0:
        share = f" (rank 0's share of {ranks.world_size})" if ranks.world_size > 1 else ""
        print(f"resuming: {done_rows} rows already done in {work}{share}")

    def rows_of(split: str, i: int) -> list[tuple[int, dict]]:
        return sources[split].rows(i * args.save_every, (i + 1) * args.save_every)

    total = None if any(src.streaming for src in sources.values()) else \
        done_rows + sum(len(range(i * args.save_every, min((i + 1) * args.save_every, sources[split].length)))
                        for split, i in todo)
    bar = tqdm(total=total, initial=done_rows, unit="clip", dynamic_ncols=True, disable=ranks.rank != 0,
               desc="pretokenize" + (f" (rank 0 of {ranks.world_size})" if ranks.world_size > 1 else ""))
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
            examples, skipped = process_chunk(rows, clips, tokenizer, mimi, args, split, scorer)
            chunk = _save_chunk(_chunk_path(work, split, i), examples, skipped)
            stats[split].add_chunk(chunk)
            audio_s += float(chunk["seconds"].sum())
            bar.update(len(rows))
            bar.set_postfix(audio_h_per_s=f"{audio_s / 3600 / max(time.perf_counter() - t0, 1e-9):.4f}",
                            skipped=sum(s.skipped for s in stats.values()))
        for split, src in sources.items():  # streamed splits: read on from where their chunks end
            if not src.streaming:
                continue
            stream = src.stream(plan[split] * args.save_every)
            while True:
                rows = list(itertools.islice(stream, args.save_every))
                if not rows:
                    break
                examples, skipped = process_chunk(rows, (_prepare(r) for r in rows), tokenizer, mimi, args, split,
                                                  scorer)
                chunk = _save_chunk(_chunk_path(work, split, plan[split]), examples, skipped)
                plan[split] += 1
                stats[split].add_chunk(chunk)
                audio_s += float(chunk["seconds"].sum())
                bar.update(len(rows))
    finally:
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    ranks.barrier()  # every rank's chunks are on disk
    return ranks.share(lambda: _finish(args, output, work, plan, fp, tokenizer, stats, ranks.world_size))


def _finish(args: EncodeSettings, output: Path, work: Path, plan: dict, fp: dict, tokenizer, stats: dict,
            world_size: int) -> int:
    """Rank 0, once every chunk is done: the skipped-rows report, then the token file, then the work gone."""
    if world_size > 1:  # this rank saw only its own chunks
        missing, stats = _done_chunks(work, plan)
        if missing:
            raise UserError(f"{work} lacks {len(missing)} chunk(s) the other processes wrote (first: "
                            f"{_chunk_path(work, *missing[0]).name}): with several nodes, the output's folder must be "
                            "one every node writes to (a shared filesystem); run again there to finish")
    report = Path(str(output) + ".skipped.csv")
    n_skipped = write_skipped_report(report, work, plan)
    empty = [split for split, s in stats.items() if s.kept == 0]
    if empty:
        reasons = top_skip_reasons(work, {split: plan[split] for split in empty})
        shutil.rmtree(work)  # nothing worth resuming: a run after the fix reads every row anew
        raise UserError(f"the {' and '.join(empty)} split{'s' if len(empty) > 1 else ''} "
                        f"kept no rows, so no token file "
                        f"was written; {reasons} (every skipped row is in {report})")
    write_output(output, work, plan, fp, args, tokenizer)
    remove_work_dir(work)
    for split, s in stats.items():
        print(f"{split}: kept {s.kept}, skipped {s.skipped}, {s.seconds / 3600:.3f} h of audio, {s.tokens} tokens")
    print(f"wrote {output}" + (f"; {n_skipped} skipped rows listed in {report}" if n_skipped else ""))
    return 0
