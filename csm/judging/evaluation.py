"""Quality evaluation of a model: speak each item's text, transcribe it, compare it with the item's
reference recording, and summarise (WER, CER, speaker similarity, EOS rate, duration ratio, real-time
factor), with the same metrics on the references themselves and on the references passed through Mimi
(the ceilings). evaluate.py and the training loop (eval_every) both run `evaluate_model`.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from csm.data.frames import Segment
from csm.judging.metrics import QUALITY, ROWS
from csm.judging.speech_metrics import cosine, error_rates, prompt_similarity, QualityModels
from csm.model.codec import decode_audio, encode_audio, MIMI_SAMPLE_RATE
from csm.system.errors import UserError
from csm.system.outputs import atomic_path, write_text_atomic
from csm.data.audio_io import read_audio
from csm.data.metadata import SkipRow, check_row, read_metadata, turn_order
from csm.data import token_file
from csm.data.preference_file import is_preference_file
from csm.judging.synthesis import SpeechRequest, synthesize_batch
from csm.data.dnsmos import Score, SCORES as DNSMOS_SCORES



@dataclass
class EvalItem:
    """One thing to say: its text and speaker, and the reference it is compared with. A reference is
    a recording (metadata files) or, for token files that hold only codes, those codes decoded by Mimi."""

    id: str
    text: str
    speaker: int
    recording: np.ndarray | None = None   # 24 kHz mono
    codes: np.ndarray | None = None       # Mimi codes [K, F]
    row: int | None = None                # its row in the file it came from
    context: tuple[Segment, ...] = ()     # its conversation's earlier turns, spoken before it (context_turns)


@dataclass
class EvalSettings:
    max_audio_seconds: float = 20.0  # hard cap; each item also stops at twice its reference + 1 s
    temperature: float = 0.9
    topk: int = 50
    seed: int = 0                    # item i is sampled with seed + i: the same draw at every evaluation
    context: list[Segment] = field(default_factory=list)  # a prompt spoken before every item
    precision: str | None = None     # the training run's autocast precision (None: the model's own dtype)
    batch_size: int = 8              # items generated at once (each with its own seed: same audio at any size)
    step: object = None              # a compiled frame step (synthesis.CompiledStep), or None for eager


@dataclass
class EvalResult:
    rows: list[dict]                  # one per item (per-item metrics, errors)
    summary: dict                     # corpus metrics per measured row, and counts
    audio: dict[str, dict[str, np.ndarray]]  # item id -> {"generated"|"reference"|"codec": 24 kHz audio}
    generated: dict = field(default_factory=dict)  # item id -> its synthesis.Speech (codes, stopped at EOS)


def add_item_flags(p, *, what: str, split: str, n: int) -> None:
    """The flags that choose what a command speaks from its data (evaluate.py's items, prefer.py's prompts): the
    token file's split, how many rows, and how many earlier turns of each row's conversation go before it."""
    p.add_argument("--split", default=split, help=f"split of a token file (default {split})")
    p.add_argument("--n", type=int, default=n, help=f"{what} to use, drawn with --seed (default {n}; 0 = all)")
    p.add_argument("--context_turns", type=int, default=0,
                   help=f"speak each of the {what} after up to this many earlier turns of its conversation (the "
                        "data's conversation and turn columns; default 0: none), after any --context_audio turns")


def seeded_subset(total: int, n: int | None, seed: int) -> list[int]:
    """`n` of `total` row indices drawn with `seed` (all of them when n is None or >= total), in row order."""
    if n is None or n >= total:
        return list(range(total))
    return sorted(np.random.default_rng(seed).choice(total, size=n, replace=False).tolist())


# --------------------------------------------------------------------------- items


def is_token_file(path: Path) -> bool:
    """An HDF5 file with split groups (pretokenize.py's), not a pandas metadata table."""
    if path.suffix.lower() not in (".hdf5", ".h5"):
        return False

    try:
        with h5py.File(path, "r") as f:
            return any(isinstance(g, h5py.Group) and "audio" in g and "length" in g for g in f.values())
    except OSError:
        return False


def earlier_turns(conversations, orders, rows, n: int) -> dict[int, list[int]]:
    """For each of `rows`, the rows of its conversation that come before it (by `orders`), the last `n` of them in
    order; none for a row that stands alone (conversation "" or None)."""
    groups: dict[str, list] = {}
    for j, (c, o) in enumerate(zip(conversations, orders)):
        if c:
            groups.setdefault(c, []).append((o, j))
    place = {}
    for group in groups.values():
        group.sort()
        place.update({j: (group, pos) for pos, (_, j) in enumerate(group)})
    out = {}
    for i in rows:
        group, pos = place.get(i, ([], 0))
        out[i] = [j for _, j in group[max(0, pos - n):pos]] if n > 0 else []
    return out


def items_from_metadata(path: Path, n: int | None, seed: int, trust_pickle: bool = False,
                        flag: str = "--eval_data", context_turns: int = 0) -> tuple[list[EvalItem], list]:
    """Items of a metadata file (reference = the recorded window), each with up to `context_turns` earlier turns of
    its conversation (their recordings); rows that cannot be used are returned as (row, reason) and left out."""
    df = read_metadata(path, trust_pickle=trust_pickle)
    if len(df) == 0:
        raise UserError(f"{flag} {path} has no rows")
    records = df.to_dict("records")
    chosen = seeded_subset(len(df), n, seed)
    before = {i: [] for i in chosen}
    if context_turns:
        rows = {}
        for j, record in enumerate(records):
            try:
                rows[j] = check_row(j, record)
            except SkipRow:
                continue
        conversations = [rows[j].conversation if j in rows else None for j in range(len(records))]
        orders = [turn_order(rows[j]) if j in rows else 0.0 for j in range(len(records))]
        before = earlier_turns(conversations, orders, chosen, context_turns)
    items, skipped = [], []
    for i in chosen:
        try:
            row = check_row(i, records[i])
            audio = read_audio(row.path, row.start, row.end)
            context = []
            for j in before[i]:
                turn = check_row(j, records[j])
                context.append(Segment(turn.text, 0 if turn.speaker is None else turn.speaker,
                                       torch.from_numpy(read_audio(turn.path, turn.start, turn.end))))
        except (SkipRow, UserError) as e:
            skipped.append((i, getattr(e, "reason", str(e))))
            continue
        items.append(EvalItem(f"row{i:05d}", row.text, 0 if row.speaker is None else row.speaker, recording=audio,
                              row=i, context=tuple(context)))
    return items, skipped


_SPEAKER_PREFIX = re.compile(r"^\[(\d+)\](.*)$", re.S)


def _spoken(ids, tokenizer, stored_speaker: int) -> tuple[str, int]:
    """The text and speaker of a token-file row's ids ("[speaker]text"; the stored speaker when the text has none)."""
    body = [int(t) for t in ids if t not in (tokenizer.bos_token_id, tokenizer.eos_token_id)]
    text = tokenizer.decode(body, skip_special_tokens=True).strip()
    match = _SPEAKER_PREFIX.match(text)
    if match:
        return match.group(2).strip(), int(match.group(1))
    return text, max(int(stored_speaker), 0)


def items_from_token_file(path: Path, split: str, n: int | None, seed: int, tokenizer,
                          flag: str = "--eval_data", context_turns: int = 0) -> tuple[list[EvalItem], list]:
    """Items of one split of a token file: the text decoded from its ids ("[speaker]text"), the codes kept
    as the reference (decoded by Mimi when evaluated), and up to `context_turns` earlier turns of its
    conversation (their codes, as stored); rows without text to speak are returned as (row, reason)."""
    splits = token_file.open_splits(path)
    if split not in splits:
        raise UserError(f"{flag} {path} has no '{split}' split (found: {', '.join(splits)}); choose --split")
    items, skipped = [], []
    with token_file.open_token_file(path) as f:
        _, k = token_file.read_split_index(f, path, split)
        conversations, orders, speakers = token_file.read_turns(f, split)
        chosen = seeded_subset(splits[split], n, seed)
        before = earlier_turns(conversations, orders, chosen, context_turns)
        for i in chosen:
            codes, ids = token_file.read_row(f, split, i)
            text, speaker = _spoken(ids, tokenizer, speakers[i])
            if not text:
                skipped.append((i, "its text ids decode to no text"))
                continue
            context = []
            for j in before[i]:
                turn_codes, turn_ids = token_file.read_row(f, split, j)
                turn_text, turn_speaker = _spoken(turn_ids, tokenizer, speakers[j])
                context.append(Segment(turn_text or " ", turn_speaker,
                                       codes=torch.from_numpy(turn_codes.astype(np.int64).reshape(k, -1))))
            items.append(EvalItem(f"{split}{i:05d}", text, speaker, codes=codes.astype(np.int64).reshape(k, -1), row=i,
                                  context=tuple(context)))
    return items, skipped


def check_item_source(source: str | Path, flag: str = "--eval_data") -> Path:
    """A file items can come from (a metadata file or a token file), checked before any model loads."""
    path = Path(source)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a metadata file or a token file (.hdf5)")
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    if is_preference_file(path):
        raise UserError(f"{flag} {path} is a preference file (prefer.py): it holds candidates, not reference "
                        "recordings; give the token file or metadata file its prompts came from")
    return path


def load_items(source: str | Path, *, split: str = "val", n: int | None = None, seed: int = 0, tokenizer=None,
               trust_pickle: bool = False, flag: str = "--eval_data",
               context_turns: int = 0) -> tuple[list[EvalItem], list]:
    """Items from a metadata file or a token file (its `split`); (items, skipped rows with reasons). Errors name
    the file by `flag`, the option that gave it."""
    path = check_item_source(source, flag)
    if is_token_file(path):
        items, skipped = items_from_token_file(path, split, n, seed, tokenizer, flag, context_turns)
    else:
        items, skipped = items_from_metadata(path, n, seed, trust_pickle, flag, context_turns)
    if not items:
        raise UserError(f"{flag} {path}: no usable item ({len(skipped)} rows skipped"
                        + (f", e.g. {skipped[0][1]}" if skipped else "") + ")")
    return items, skipped


# --------------------------------------------------------------------------- evaluation


def _request(item: EvalItem, index: int, settings: EvalSettings, reference_s: float | None) -> SpeechRequest:
    cap = settings.max_audio_seconds
    if reference_s:
        cap = min(cap, 2 * reference_s + 1.0)  # an item not done by then will not stop: no need to wait
    return SpeechRequest(item.text, item.speaker, (*settings.context, *item.context), cap, seed=settings.seed + index)


def _speak(model, tokenizer, mimi, requests: list[SpeechRequest], settings: EvalSettings) -> tuple[list, float]:
    """A batch of items, spoken at once: (each item's Speech or its exception, the seconds each took, the batch's
    time shared among its items). A batch that fails is spoken again item by item, so that one item's failure
    (too long, bad text) is that item's alone."""
    kwargs = dict(temperature=settings.temperature, topk=settings.topk, precision=settings.precision,
                  step=settings.step)
    t0 = time.perf_counter()
    try:
        spoken = synthesize_batch(model, tokenizer, mimi, requests, **kwargs)
        return spoken, (time.perf_counter() - t0) / len(requests)
    except Exception:  # noqa: BLE001 - retried one by one below, where each item's error is its own
        if len(requests) == 1:
            raise
    out = []
    for request in requests:
        try:
            out.append(synthesize_batch(model, tokenizer, mimi, [request], **kwargs)[0])
        except Exception as e:  # noqa: BLE001
            out.append(e)
    return out, (time.perf_counter() - t0) / len(requests)


def _record(item: EvalItem, row: dict, speech, seconds: float, clips: dict, timing: dict, generated: dict) -> None:
    """An item's generation into its row: its audio, length and pace, or the error that stopped it."""
    if isinstance(speech, Exception):
        row["error"] = f"{type(speech).__name__}: {str(speech).splitlines()[0] if str(speech) else ''}"
        print(f"warning: item {item.id}: generation failed ({row['error']}); skipped", file=sys.stderr)
        return
    clips["generated"] = speech.audio.float().numpy()
    generated[item.id] = speech
    duration = len(clips["generated"]) / MIMI_SAMPLE_RATE
    row.update(stopped_at_eos=speech.stopped, duration_s=round(duration, 3),
               duration_ratio=duration / row["reference_s"] if row["reference_s"] else None,
               rtf=seconds / duration if duration else None)
    timing[item.id] = seconds


def _peers(items: list[EvalItem]) -> list[int | None]:
    """For each item, another item of the same speaker (the next one, cyclically), or None."""
    by_speaker: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        by_speaker.setdefault(item.speaker, []).append(i)
    peers = []
    for i, item in enumerate(items):
        group = by_speaker[item.speaker]
        peers.append(group[(group.index(i) + 1) % len(group)] if len(group) > 1 else None)
    return peers


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def evaluate_model(model, tokenizer, mimi, items: list[EvalItem], quality: QualityModels, settings: EvalSettings, *,
                   ceilings: bool = False, device=None, progress: bool = False) -> EvalResult:
    """Generate every item, then measure it; with `ceilings`, measure the references and their Mimi
    round trip too. A failing item is recorded with its error and skipped; it never ends the evaluation."""
    device = device or next(model.parameters()).device
    rows, audio, timing, requests, generated = [], {}, {}, [], {}
    for index, item in enumerate(items):
        clips = {}
        if item.recording is not None:
            clips["reference"] = item.recording
        if item.codes is not None:  # a token file's reference is its codes, decoded
            clips["reference" if item.recording is None else "codec"] = decode_audio(mimi,
                                                                                     torch.as_tensor(item.codes)).numpy()
        elif ceilings:
            codes = encode_audio(mimi, [item.recording], model.config.audio_num_codebooks)[0]
            clips["codec"] = decode_audio(mimi, torch.as_tensor(codes)).numpy()
        reference_s = len(clips["reference"]) / MIMI_SAMPLE_RATE
        rows.append({"id": item.id, "text": item.text, "speaker": item.speaker, "reference_s": round(reference_s, 3),
                     "error": ""})
        audio[item.id] = clips
        requests.append(_request(item, index, settings, reference_s))
    size = max(1, settings.batch_size)
    with tqdm(total=len(items), desc="evaluate", unit="item", disable=not progress, leave=False) as bar:
        for start in range(0, len(items), size):
            spoken, seconds = _speak(model, tokenizer, mimi, requests[start:start + size], settings)
            for item, row, speech in zip(items[start:start + size], rows[start:start + size], spoken):
                _record(item, row, speech, seconds, audio[item.id], timing, generated)
            bar.update(len(spoken))

    measured = ["generated", *[k for k in ("reference", "codec") if ceilings and any(k in c for c in audio.values())]]
    peers = _peers(items)
    prompt = [s.audio.float().numpy() for s in settings.context if s.audio is not None]
    with quality.on(device):
        for what in measured:
            _measure(rows, items, audio, peers, quality, what)
        if prompt:
            _prompt_similarity(rows, items, audio, quality, prompt)
    summary = _summarize(rows, items, audio, quality, measured, timing)
    return EvalResult(rows, summary, audio, generated)


def _measure(rows: list[dict], items: list[EvalItem], audio: dict, peers: list,
             quality: QualityModels, what: str) -> None:
    """Transcripts, per-item WER/CER and speaker similarity of one kind of clip, into the rows.

    Generated and codec clips are compared with the item's reference; a reference with another reference
    of its speaker (what two real takes of one voice reach), when the evaluation has one."""
    prefix = "" if what == "generated" else f"{what}_"
    todo = [i for i, item in enumerate(items) if what in audio[item.id]]
    transcripts = quality.asr.transcribe([audio[items[i].id][what] for i in todo], MIMI_SAMPLE_RATE)
    embeddings = {}

    def embed(i, kind):
        key = (i, kind)
        if key not in embeddings:
            embeddings[key] = quality.speaker.embed(audio[items[i].id][kind], MIMI_SAMPLE_RATE)
        return embeddings[key]

    for i, transcript in zip(todo, transcripts):
        row = rows[i]
        rates = error_rates([items[i].text], [transcript], quality.asr.normalizer)
        row[f"{prefix}transcript"], row[f"{prefix}wer"], row[f"{prefix}cer"] = transcript, rates["wer"], rates["cer"]
        if what == "reference":
            other = (peers[i], "reference") if peers[i] is not None else None
        else:
            other = (i, "reference")
        a = embed(i, what)
        b = embed(*other) if other is not None else None
        row[f"{prefix}speaker_sim"] = cosine(a, b) if a is not None and b is not None else None
    if quality.dnsmos is not None:
        scores = quality.dnsmos.score_many([audio[items[i].id][what] for i in todo], MIMI_SAMPLE_RATE)
        for i, score in zip(todo, scores):
            values = score.as_dict() if isinstance(score, Score) else dict.fromkeys(DNSMOS_KEYS)
            rows[i].update({f"{prefix}{k}": v for k, v in values.items()})


def _prompt_similarity(rows: list[dict], items: list[EvalItem], audio: dict, quality: QualityModels,
                       prompt: list[np.ndarray]) -> None:
    """Each generated item's speaker similarity to the context turns' audio (their mean), beside the one to its
    own reference: how well the voice follows the prompt it was given."""
    prompts = [e for e in (quality.speaker.embed(clip, MIMI_SAMPLE_RATE) for clip in prompt) if e is not None]
    for row, item in zip(rows, items):
        row["prompt_speaker_sim"] = prompt_similarity(quality.speaker, audio[item.id].get("generated"), prompts,
                                                      MIMI_SAMPLE_RATE)


def _summarize(rows, items, audio, quality: QualityModels, measured: list[str], timing: dict) -> dict:
    summary = {"n_items": len(items), "n_failed": sum(1 for r in rows if r["error"]),
               "asr": quality.asr.source, "speaker_model": quality.speaker.source, "language": quality.asr.language,
               "normalizer": "whisper-english" if quality.asr.normalizer.english else "whisper-basic",
               "reference_audio": "codes" if any(it.recording is None for it in items) else "recordings"}
    for what in ROWS:
        if what not in measured:
            summary[what] = None
            continue
        prefix = "" if what == "generated" else f"{what}_"
        done = [(r, it) for r, it in zip(rows, items) if f"{prefix}transcript" in r]
        rates = error_rates([it.text for _, it in done], [r[f"{prefix}transcript"] for r, _ in done],
                            quality.asr.normalizer)
        metrics = {"n": len(done), "wer": rates["wer"], "cer": rates["cer"],
                   "speaker_sim": _mean(r[f"{prefix}speaker_sim"] for r, _ in done),
                   **{k: _mean(r.get(f"{prefix}{k}") for r, _ in done) for k in DNSMOS_KEYS}}
        if what == "generated":
            generated = [r for r in rows if not r["error"]]
            seconds = sum(r["duration_s"] for r in generated)
            metrics.update(eos_rate=_mean(float(r["stopped_at_eos"]) for r in generated),
                           prompt_speaker_sim=_mean(r.get("prompt_speaker_sim") for r in generated),
                           duration_ratio=_mean(r["duration_ratio"] for r in generated),
                           rtf=sum(timing.values()) / seconds if seconds else None)
        summary[what] = metrics
    return summary


# --------------------------------------------------------------------------- report


DNSMOS_KEYS = tuple(f"dnsmos_{k}" for k in DNSMOS_SCORES)
CSV_COLUMNS = ("id", "speaker", "text", "error", "stopped_at_eos", "duration_s", "reference_s", "duration_ratio", "rtf",
               *(f"{prefix}{k}" for prefix in ("", "reference_", "codec_")
                 for k in ("transcript", "wer", "cer", "speaker_sim", *DNSMOS_KEYS)),
               "prompt_speaker_sim")


def _wav_bytes(audio: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, MIMI_SAMPLE_RATE, format="WAV")
    return buf.getvalue()


def write_report(result: EvalResult, out: Path, extra: dict | None = None) -> None:
    """wavs/<id>_<kind>.wav, items.csv, summary.json and report.html under `out`, each written atomically."""
    wavs = out / "wavs"
    wavs.mkdir(parents=True, exist_ok=True)
    for item_id, clips in result.audio.items():
        for kind, clip in clips.items():
            with atomic_path(wavs / f"{item_id}_{kind}.wav") as tmp:
                tmp.write_bytes(_wav_bytes(clip))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(result.rows)
    write_text_atomic(out / "items.csv", buf.getvalue())
    write_text_atomic(out / "summary.json", json.dumps({**result.summary, **(extra or {})}, indent=2) + "\n")
    write_text_atomic(out / "report.html", report_html(result))


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def report_html(result: EvalResult) -> str:
    """A page with the summary table (model vs ceilings) and, per item, the players and transcripts."""
    head = "<tr><th></th>" + "".join(f"<th>{k}</th>" for k in QUALITY) + "</tr>"
    lines = []
    for what in ROWS:
        metrics = result.summary.get(what)
        if metrics:
            cells = "".join(f"<td>{_fmt(metrics.get(k))}</td>" for k in QUALITY)
            lines.append(f"<tr><th>{what}</th>{cells}</tr>")
    items = []
    for row in result.rows:
        clips = result.audio.get(row["id"], {})
        players = "".join(f"<div>{kind}<br><audio controls preload=none "
                          f"src='wavs/{row['id']}_{kind}.wav'></audio></div>"
                          for kind in ("reference", "generated", "codec") if kind in clips)
        detail = (f"error: {_fmt(row['error'])}" if row["error"] else
                  f"heard: “{_fmt(row.get('transcript'))}”<br>WER {_fmt(row.get('wer'))} · "
                  f"CER {_fmt(row.get('cer'))} · "
                  f"speaker sim {_fmt(row.get('speaker_sim'))} · DNSMOS {_fmt(row.get('dnsmos_ovrl'))} · "
                  f"EOS {_fmt(row.get('stopped_at_eos'))} · "
                  f"{_fmt(row.get('duration_s'))} s of {_fmt(row.get('reference_s'))} s")
        items.append(f"<tr><td>{_fmt(row['id'])}<br>[{row['speaker']}]</td><td>{_fmt(row['text'])}<br><small>{detail}"
                     f"</small></td><td class=p>{players}</td></tr>")
    return ("<!doctype html><meta charset=utf-8><title>csm-train evaluation</title><style>body{font-family:sans-serif}"
            "td,th{border:1px solid #ccc;padding:4px;vertical-align:top}table{border-collapse:collapse}"
            ".p div{display:inline-block;margin-right:8px}</style>"
            f"<h1>Evaluation</h1><p>ASR: {_fmt(result.summary.get('asr'))} ({_fmt(result.summary.get('normalizer'))} "
            f"normalisation) · speaker model: {_fmt(result.summary.get('speaker_model'))}</p>"
            f"<table>{head}{''.join(lines)}</table><h2>Items</h2><table>{''.join(items)}</table>\n")
