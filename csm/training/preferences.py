"""Preference pairs from a model's own speech (prefer.py's work): each prompt is spoken N times, each candidate is
judged as evaluation.py judges (WER/CER, speaker similarity, EOS, duration, DNSMOS), the judgments are weighed into
one reward, and the best and the worst candidate become a pair when their rewards differ by at least a margin. The
reference model's log-probabilities of both are computed here, once, so that DPO training needs no second model.

Work is committed in chunks of prompts under <output>.partial/ (a preference file and a CSV per chunk); a killed
run resumes when the same command runs again, and the output appears only once every chunk is done.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from csm.training.dpo import candidate_logps
from csm.judging.evaluation import CSV_COLUMNS, EvalItem, EvalSettings, evaluate_model, seeded_subset
from csm.data.frames import Segment
from csm.system.outputs import claim_work_dir, remove_work_dir, write_text_atomic
from csm.data.preference_file import Candidate, Pair, read_pairs, write_preference_file
from csm.system.runtime import autocast
from csm.model.tokenization import encode_text
from csm.system.errors import UserError


@dataclass(frozen=True)
class RewardTerm:
    name: str
    what: str
    default: float

    def value(self, row: dict) -> float | None:
        """The term's score of a judged candidate (higher is better), None when it was not measured."""
        return _TERM_VALUES[self.name](row)


def _negated(key):
    return lambda row: None if row.get(key) is None else -float(row[key])


def _duration(row: dict) -> float | None:
    ratio = row.get("duration_ratio")
    return None if ratio is None else -abs(math.log(max(float(ratio), 0.01)))


def _speaker(row: dict) -> float | None:
    # Similarity to the prompt's voice when the candidates were spoken after one, else to the reference recording.
    value = row.get("prompt_speaker_sim")
    return value if value is not None else row.get("speaker_sim")


_TERM_VALUES = {
    "cer": _negated("cer"), "wer": _negated("wer"), "speaker_sim": _speaker,
    "eos": lambda row: None if row.get("stopped_at_eos") is None else float(bool(row["stopped_at_eos"])),
    "duration": _duration, "dnsmos": lambda row: row.get("dnsmos_ovrl"),
}
REWARD_TERMS = (
    RewardTerm("cer", "minus the character error rate of the ASR transcript", 1.0),
    RewardTerm("wer", "minus the word error rate", 0.0),
    RewardTerm("speaker_sim", "speaker similarity to the prompt's audio (to the reference without a prompt)", 1.0),
    RewardTerm("eos", "1 when the candidate stopped at its EOS frame, 0 when it ran to its length cap", 1.0),
    RewardTerm("duration", "minus |ln(duration / reference duration)|", 0.5),
    RewardTerm("dnsmos", "DNSMOS overall quality, 1-5", 0.25),
)
DEFAULT_WEIGHTS = {t.name: t.default for t in REWARD_TERMS}


def rewards(rows: list[dict], weights: dict[str, float]) -> list[float | None]:
    """One prompt's candidates' rewards: the weighted sum of their terms. A term that some candidate lacks (DNSMOS
    of a clip too short to score, similarity without a reference) is left out for all of them, so that rewards
    compare like with like; a candidate that failed to generate has no reward."""
    usable = [r for r in rows if not r.get("error")]
    terms = [t for t in REWARD_TERMS if weights.get(t.name) and usable and all(t.value(r) is not None for r in usable)]
    return [None if r.get("error") else sum(weights[t.name] * t.value(r) for t in terms) for r in rows]


def pick_pair(scores: list[float | None], margin: float) -> tuple[int, int] | str:
    """(best, worst) candidate indices, or why the prompt gives no pair."""
    valid = [(s, i) for i, s in enumerate(scores) if s is not None]
    if len(valid) < 2:
        return f"{len(valid)} candidate(s) generated, 2 needed"
    (low, worst), (high, best) = min(valid), max(valid)
    if high - low < margin or high == low:
        return f"rewards within the margin ({high - low:.4f} < {margin:g})"
    return best, worst


@dataclass(frozen=True)
class PreferSettings:
    """What prefer.py was asked to do, its numbers checked."""

    n_candidates: int = 4
    margin: float = 0.1
    weights: dict = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    val_fraction: float = 0.1
    seed: int = 0
    save_every: int = 64           # prompts per committed chunk
    max_audio_seconds: float = 20.0
    temperature: float = 0.9
    topk: int = 50
    batch_size: int = 8            # candidates generated at once; pairs scored at once
    precision: str | None = None   # the model's autocast (None: its weights' dtype)


CANDIDATE_COLUMNS = ("prompt", "split", "candidate", "seed", "reward", "role", "reason",
                     *[c for c in CSV_COLUMNS if c != "id"])


class PreferenceRun:
    """A prefer.py run: the model and judges loaded, the prompts read; `run()` makes and writes the pairs."""

    def __init__(self, model, tokenizer, mimi, quality, items: list[EvalItem], skipped: list, context: list[Segment],
                 settings: PreferSettings, output: Path, fingerprint: dict, attrs: dict, step=None, device=None):
        self.model, self.tokenizer, self.mimi, self.quality = model, tokenizer, mimi, quality
        self.items, self.skipped, self.context, self.s = items, skipped, context, settings
        self.output, self.fingerprint, self.attrs, self.step = output, fingerprint, attrs, step
        self.device = device or next(model.parameters()).device
        self.k = model.config.audio_num_codebooks
        self.work = output.with_name(output.name + ".partial")
        n_val = int(round(len(items) * settings.val_fraction))
        self.val = set(seeded_subset(len(items), n_val, settings.seed + 1)) if n_val else set()
        self._prompt_turns = None

    # ------------------------------------------------------------------ the prompt's stored context

    def context_of(self, item: EvalItem) -> list[tuple[np.ndarray, np.ndarray]]:
        """The turns spoken before an item, as its pairs store them: (Mimi codes [K, F], text ids), laid out as
        generation laid them out (the prompt turns of the flags, then the item's earlier turns)."""
        if self._prompt_turns is None:
            self._prompt_turns = [self._stored(seg) for seg in self.context]
        return self._prompt_turns + [self._stored(seg) for seg in item.context]

    def _stored(self, seg: Segment) -> tuple[np.ndarray, np.ndarray]:
        return (seg.turn_codes(self.mimi, self.k).numpy().astype(np.int64),
                np.asarray(encode_text(self.tokenizer, seg.text, seg.speaker), np.int64))

    # ------------------------------------------------------------------ chunks

    def chunk_path(self, index: int, suffix: str) -> Path:
        return self.work / f"chunk_{index:06d}{suffix}"

    def n_chunks(self) -> int:
        return math.ceil(len(self.items) / self.s.save_every)

    def _done(self, index: int) -> bool:
        """A chunk is done when its preference file reads back (its CSV was written before it)."""
        path = self.chunk_path(index, ".hdf5")
        if not path.exists():
            return False
        try:
            for split in ("train", "val"):
                read_pairs(path, split)
            return self.chunk_path(index, ".csv").exists()
        except (OSError, KeyError, ValueError) as e:
            print(f"warning: {path} is damaged ({type(e).__name__}); making its pairs again")
            path.unlink()
            return False

    def run(self, progress: bool = True) -> dict:
        """Every chunk (resuming), then the output file and the candidates' CSV. Returns pair counts per split."""
        fresh = not self.work.exists()
        try:
            claim_work_dir(self.work, self.fingerprint)
        except BaseException:
            if fresh:
                shutil.rmtree(self.work, ignore_errors=True)
            raise
        todo = [i for i in range(self.n_chunks()) if not self._done(i)]
        done = (self.n_chunks() - len(todo)) * self.s.save_every
        if done:
            print(f"resuming: {min(done, len(self.items))} prompts already done in {self.work}")
        bar = tqdm(total=len(self.items), initial=min(done, len(self.items)), unit="prompt", desc="prefer",
                   disable=not progress, dynamic_ncols=True)
        with bar:
            for index in todo:
                self._chunk(index)
                bar.update(len(self._chunk_items(index)))
        return self._assemble()

    def _chunk_items(self, index: int) -> list[tuple[int, EvalItem]]:
        start = index * self.s.save_every
        return list(enumerate(self.items[start:start + self.s.save_every], start=start))

    def _chunk(self, index: int) -> None:
        """One chunk's prompts: spoken N times, judged, paired, scored by the reference; written CSV first."""
        s, n = self.s, self.s.n_candidates
        prompts = self._chunk_items(index)
        candidates = [replace(item, id=f"{item.id}_c{j}") for _, item in prompts for j in range(n)]
        # Candidate j of prompt g samples with seed + g*N + j, whatever the chunking and batching.
        first_seed = s.seed + prompts[0][0] * n
        settings = EvalSettings(max_audio_seconds=s.max_audio_seconds, temperature=s.temperature, topk=s.topk,
                                seed=first_seed, context=self.context, precision=s.precision,
                                batch_size=s.batch_size, step=self.step)
        result = evaluate_model(self.model, self.tokenizer, self.mimi, candidates, self.quality, settings,
                                device=self.device)
        pairs, rows = {"train": [], "val": []}, []
        for p, (number, item) in enumerate(prompts):
            group = result.rows[p * n:(p + 1) * n]
            scores = rewards(group, s.weights)
            picked = pick_pair(scores, s.margin)
            split = "val" if number in self.val else "train"
            for j, (row, score) in enumerate(zip(group, scores)):
                role = "" if isinstance(picked, str) else {picked[0]: "chosen", picked[1]: "rejected"}.get(j, "")
                rows.append({**row, "prompt": item.id, "split": split, "candidate": j, "seed": first_seed + p * n + j,
                             "reward": score, "role": role, "reason": picked if isinstance(picked, str) else ""})
            if not isinstance(picked, str):
                chosen, rejected = (self._candidate(result, f"{item.id}_c{j}", scores[j]) for j in picked)
                text = np.asarray(encode_text(self.tokenizer, item.text, item.speaker), np.int64)
                pairs[split].append(Pair(item.row if item.row is not None else number, item.speaker, text,
                                         self.context_of(item), chosen, rejected))
        for split_pairs in pairs.values():
            self._score_reference(split_pairs)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CANDIDATE_COLUMNS, extrasaction="ignore")
        writer.writerows(rows)
        write_text_atomic(self.chunk_path(index, ".csv"), buf.getvalue())
        with write_preference_file(self.chunk_path(index, ".hdf5"), {"codebooks": self.k}) as add:
            for split, split_pairs in pairs.items():
                add(split, split_pairs)

    def _candidate(self, result, item_id: str, reward: float) -> Candidate:
        speech = result.generated[item_id]
        empty = np.zeros(0, np.float32)
        return Candidate(speech.codes.numpy().astype(np.int64), bool(speech.stopped), float(reward), empty, empty)

    def _score_reference(self, pairs: list[Pair]) -> None:
        """The reference model's (this model's) per-frame log-probabilities of every candidate, batch by batch."""
        for start in range(0, len(pairs), self.s.batch_size):
            batch = pairs[start:start + self.s.batch_size]
            with autocast(self.device, self.s.precision) if self.s.precision else contextlib.nullcontext():
                scored = candidate_logps(self.model, batch, self.k)
            # Every chosen candidate first, then every rejected one.
            for candidate, (c0, decoder) in zip([p.chosen for p in batch] + [p.rejected for p in batch], scored):
                candidate.ref_c0, candidate.ref_decoder = c0.astype(np.float32), decoder.astype(np.float32)

    def _assemble(self) -> dict:
        """The chunks joined into the output file and the candidates' CSV; no pairs at all is an error."""
        chunks = range(self.n_chunks())
        pairs = {split: [p for i in chunks for p in read_pairs(self.chunk_path(i, ".hdf5"), split)[0]]
                 for split in ("train", "val")}
        csv_path = candidates_csv(self.output)
        header = ",".join(CANDIDATE_COLUMNS) + "\n"
        body = "".join(self.chunk_path(i, ".csv").read_text(encoding="utf-8") for i in chunks)
        skipped = io.StringIO()
        csv.DictWriter(skipped, fieldnames=CANDIDATE_COLUMNS).writerows(
            {"prompt": f"row{row}", "reason": f"skipped: {reason}"} for row, reason in self.skipped)
        if not pairs["train"]:
            gap = largest_gap(body)
            shutil.rmtree(self.work)  # nothing worth resuming: a run with other weights or margin starts anew
            raise UserError(f"no pairs: no training prompt's best and worst candidates differ by --margin "
                            f"{self.s.margin:g} (the largest gap was {gap}; {len(pairs['val'])} val pairs); raise "
                            "--n_candidates or the temperature, lower --margin, or check the reward weights (with "
                            "all-zero weights every candidate's reward is equal)")
        with write_preference_file(self.output, self.attrs) as add:
            for split, split_pairs in pairs.items():
                if split_pairs or split == "train":
                    add(split, split_pairs)
        write_text_atomic(csv_path, header + body + skipped.getvalue())
        remove_work_dir(self.work)
        return {split: len(p) for split, p in pairs.items()}


def largest_gap(rows_csv: str) -> str:
    """The largest reward gap of any prompt in candidate rows (CSV without its header), for the no-pairs error."""
    by_prompt: dict[str, list[float]] = {}
    for row in csv.DictReader(io.StringIO(rows_csv), fieldnames=CANDIDATE_COLUMNS):
        if row["reward"] not in ("", None):
            by_prompt.setdefault(row["prompt"], []).append(float(row["reward"]))
    gaps = [max(r) - min(r) for r in by_prompt.values() if len(r) > 1]
    return f"{max(gaps):.4f}" if gaps else "none: no prompt had two judged candidates"


def candidates_csv(output: Path) -> Path:
    """Where every candidate's scores go: beside the preference file, <name>.candidates.csv."""
    return output.with_name(output.stem + ".candidates.csv")


def settings_attrs(settings: PreferSettings) -> dict:
    """The settings as the preference file's attributes (JSON where not a plain value)."""
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else ("" if v is None else v)
            for k, v in asdict(settings).items()}


def make_preference_file(path, model_dir, n_train=8, n_val=2, seed=0, short=(2, 5), long=(8, 12), text_len=(3, 8),
                         text_vocab=400):
    """A preference file as prefer.py writes it, of scripted pairs, for the tests and the GPU check: the chosen
    candidate is short and stops at its EOS frame, the rejected one long and capped (random codes); the reference
    log-probabilities are those of the model in `model_dir`."""
    from csm.data.preference_file import reference_identity
    from csm.model.weights import load_model

    rng = np.random.default_rng(seed)
    model = load_model(model_dir)
    k = model.config.audio_num_codebooks
    empty = np.zeros(0, np.float32)

    def candidate(frames, stopped, reward):
        codes = rng.integers(0, 2048, size=(k, int(rng.integers(*frames, endpoint=True))))
        return Candidate(codes, stopped, reward, empty, empty)

    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        pairs = []
        for i in range(n):
            t = int(rng.integers(*text_len, endpoint=True))
            text = np.concatenate([[0], rng.integers(2, text_vocab, size=t - 2), [1]])
            pairs.append(Pair(i, 0, text, [], candidate(short, True, 1.0), candidate(long, False, 0.0)))
        if pairs:
            scored = candidate_logps(model, pairs, k)
            for c, (c0, decoder) in zip([p.chosen for p in pairs] + [p.rejected for p in pairs], scored):
                c.ref_c0, c.ref_decoder = c0, decoder
        splits[split] = pairs
    attrs = {"codebooks": k, "reference_model": str(model_dir), "precision": "fp32", "reference_compiled": False,
             "reference_identity": json.dumps(reference_identity(model_dir))}
    with write_preference_file(path, attrs) as add:
        for split, pairs in splits.items():
            if pairs or split == "train":
                add(split, pairs)
    return path
