"""Speech from a model: the generation prompt (context turns, then the text to speak) and the
frame-by-frame sampling loop through the KV caches, stopping at the EOS frame or a length cap.
Used by generate.py and by the samples written during training.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from csm.data.frames import Segment, audio_frames, next_input_frames, text_frames
from csm.model.tokenization import encode_text, load_text_tokenizer, resolve_text_tokenizer
from csm.model.codec import decode_audio, load_mimi, MIMI_FRAME_RATE, SAMPLES_PER_FRAME
from csm.system.errors import check_number, UserError
from csm.system.runtime import autocast, DTYPES, PRECISIONS
from csm.data.audio_io import read_audio
from csm.data.token_file import SPEAKERS_NAME, speaker_names
from csm.model.weights import DEFAULT_MODEL, load_model
from csm.model.adapters import load_adapter
from csm.model.csm_model import frame_noise, MIMI_CARDINALITY


def add_speech_flags(p: argparse.ArgumentParser, *, context_speaker: str, precision_note: str = "") -> None:
    """The flags of every command line that speaks (generate.py, evaluate.py): the model and its parts, where
    it runs, how it samples, and the prompt turns spoken before each text."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id, directory (official or transformers layout), .safetensors or .pt")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub --model (default: main)")
    p.add_argument("--adapter", default=None,
                   help="a peft LoRA adapter directory to apply to --model without merging it on disk (ours, e.g. "
                        "runs/x/best_adapter, or one trained on transformers' CsmForConditionalGeneration)")
    p.add_argument("--text_tokenizer", default=None,
                   help="hub id or local directory (default: the model's own tokenizer files, "
                        "else meta-llama/Llama-3.2-1B)")
    p.add_argument("--mimi_weights", default=None,
                   help="Mimi: MimiModel dir or hub repo, transformers CSM, or moshi .safetensors "
                        "(default: kyutai/mimi)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="model weights: auto = bf16 on CUDA (fp16 on GPUs without bf16), fp32 on CPU; Mimi stays "
                        "fp32" + precision_note)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--topk", type=int, default=50)
    p.add_argument("--context_audio", action="append", default=[],
                   help="wav of a prompt turn spoken before each text (repeatable)")
    p.add_argument("--context_text", action="append", default=[], help="its transcript (one per --context_audio)")
    p.add_argument("--context_speaker", action="append", default=[], help=context_speaker)
    p.add_argument("--batch_size", type=int, default=8,
                   help="utterances generated at once (each samples from its own seed, so the audio does not "
                        "depend on the batch)")
    p.add_argument("--compile", action="store_true",
                   help="compile the one-frame step (torch.compile; CUDA graphs on a GPU): minutes to start, then "
                        "faster frames")


def check_speech_flags(args) -> None:
    """The numbers of the speech flags, before any work: top-k is at most a codebook's size (a larger one would only
    draw noise for ids that cannot win)."""
    check_number("--temperature", args.temperature, gt=0, max=100)
    check_number("--topk", args.topk, min=1, max=MIMI_CARDINALITY)
    check_number("--max_audio_seconds", args.max_audio_seconds, gt=0, max=160)
    check_number("--batch_size", args.batch_size, min=1, max=4096)


def load_speech_model(args, source, device, precision: str):
    """The model of the speech flags (`source`: --model resolved; --adapter applied, unmerged) in the precision's
    dtype, its text tokenizer and Mimi."""
    model = load_model(source, device=device, dtype=DTYPES[precision])
    if args.adapter:
        load_adapter(model, args.adapter)
    tokenizer = load_text_tokenizer(resolve_text_tokenizer(args.text_tokenizer, source))
    mimi = load_mimi(args.mimi_weights, device=device, num_codebooks=model.config.audio_num_codebooks)
    return model, tokenizer, mimi


def parse_speaker(value, names: dict[str, int] | None = None, flag: str = "--speaker") -> int:
    """Speaker ids are the non-negative integers CSM was trained with ("[0]Hello"); a name is looked up in the
    speaker names of the data the model was trained on (`names`: a token file's, or its model's speakers.json)."""
    text = str(value).strip()
    if re.fullmatch(r"[0-9]+", text) and str(int(text)) == text:  # not str.isdigit: it accepts "²"
        return int(text)
    if names and text in names:
        return names[text]
    if names:
        known = ", ".join(sorted(names)[:8]) + (", ..." if len(names) > 8 else "")
        raise UserError(f"{flag} {value!r} is neither an integer id nor one of the speaker names ({known})")
    raise UserError(f"{flag} must be a non-negative integer id, or a speaker name when the model directory has "
                    f"a speakers.json (or --speakers names a token file); got {value!r}")


def prompt_segments(turns: list[dict], names: dict[str, int] | None = None) -> list[Segment]:
    """Prompt turns {audio, text, speaker} (config gen_context, or --context_* flags) as Segments, with their
    audio read now, so a missing file fails before any work; speaker names are looked up in `names`."""
    segments = []
    for turn in turns:
        if not str(turn["text"]).strip():
            raise UserError(f"the context turn with audio {turn['audio']} has an empty transcript")
        audio = read_audio(turn["audio"])
        if len(audio) < SAMPLES_PER_FRAME:  # Mimi makes no frame of it: the turn would be its text alone
            raise UserError(f"the context audio {turn['audio']} holds {len(audio)} samples at 24 kHz, less than one "
                            f"frame ({SAMPLES_PER_FRAME}, 80 ms); give a recording of the turn")
        if not np.isfinite(audio).all():
            raise UserError(f"the context audio {turn['audio']} holds NaN or infinite samples")
        segments.append(Segment(str(turn["text"]).strip(), parse_speaker(turn["speaker"], names, "--context_speaker"),
                                torch.from_numpy(audio)))
    return segments


def context_segments(audio: list[str], texts: list[str], speakers: list[str],
                     names: dict[str, int] | None = None) -> list[Segment]:
    """Earlier turns given on a command line (--context_audio/_text/_speaker, one of each per turn)."""
    if len(texts) != len(audio) or len(speakers) != len(audio):
        raise UserError(f"give one --context_text and one --context_speaker per --context_audio "
                        f"(got {len(audio)} audio, {len(texts)} texts, {len(speakers)} speakers)")
    return prompt_segments([{"audio": a, "text": t, "speaker": s} for a, t, s in zip(audio, texts, speakers)], names)


def model_speaker_names(source, explicit=None) -> dict[str, int]:
    """Speaker names for --speaker: from `explicit` (a token file or a speakers.json) when given, else the
    speakers.json that training writes beside a model's weights ({} when there is none)."""
    from pathlib import Path

    if explicit:
        return speaker_names(explicit)
    path = Path(str(source)).expanduser()
    if not path.exists():  # a hub id: its files are not here yet
        return {}
    beside = (path if path.is_dir() else path.parent) / SPEAKERS_NAME
    return speaker_names(beside) if beside.is_file() else {}


def build_prompt(tokenizer, mimi, segments: list[Segment], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames of the context turns and the text to speak: tokens, mask [S, K+1].

    As the official generator: every context turn gives its text frames, then its audio frames and
    the EOS frame that ended it in training data; the turn to speak gives its text frames only.
    """
    parts = []
    for i, seg in enumerate(segments):
        parts.append(text_frames(encode_text(tokenizer, seg.text, seg.speaker), k))
        codes = seg.turn_codes(mimi, k) if i < len(segments) - 1 else None
        if codes is not None:
            parts.append(audio_frames(codes, k))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@dataclass(frozen=True)
class SpeechRequest:
    """One utterance to generate: what to say, by whom, after which prompt turns, and its length cap. `seed`
    seeds this utterance's own sampling generator (None: an unseeded one), so its audio does not depend on
    the other utterances of its batch."""

    text: str
    speaker: int = 0
    context: tuple[Segment, ...] = ()
    max_audio_seconds: float = 10.0
    seed: int | None = None


@dataclass
class Speech:
    """A generated utterance: 1-D float32 CPU audio at 24 kHz, whether it stopped at its EOS frame (else at its
    cap), and its codes [K, frames]."""

    audio: torch.Tensor
    stopped: bool
    codes: torch.Tensor


CHECK_EVERY = 8  # frames between the loop's reads of which rows are done (its only host syncs)
CACHE_ROUND = 64  # eager generation: cache lengths are rounded up to this
# Compiled generation: a batch is padded to the next power of two (at most the step's max_batch) and its cache to
# one of these lengths (at most the model's limit), so the graphs a process compiles are bounded, whatever it says.
LENGTH_BUCKETS = (256, 512, 1024, 2048)


def _prompt(tokenizer, mimi, request: SpeechRequest, k: int, limit: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A request's prompt frames and its cap in frames, checked against the model's length limit."""
    if not request.text or not request.text.strip():
        raise UserError("the text to speak is empty")
    cap = request.max_audio_seconds * MIMI_FRAME_RATE
    if not math.isfinite(cap) or int(cap) < 1:
        raise UserError(f"max_audio_seconds={request.max_audio_seconds} allows no audio frame (one frame is 80 ms)")
    turn = Segment(request.text, parse_speaker(request.speaker))
    tokens, mask = build_prompt(tokenizer, mimi, [*request.context, turn], k)
    if len(tokens) + int(cap) > limit:
        raise UserError(f"the text and context take {len(tokens)} frames and {request.max_audio_seconds:g} s of audio "
                        f"{int(cap)} more, over the model's {limit}-frame limit; shorten the text or context, "
                        "or lower --max_audio_seconds")
    return tokens, mask, int(cap)


def encode_context(segments, mimi, k: int) -> tuple[Segment, ...]:
    """Context turns with their audio encoded once (kept beside it), for prompts that share them."""
    return tuple(Segment(s.text, s.speaker, s.audio, s.turn_codes(mimi, k)) for s in segments)


def check_prompts(model, tokenizer, mimi, requests: list[SpeechRequest], labels: list[str]) -> None:
    """Every request's prompt against the model's length limit, before any is spoken: the first that does not fit
    is one line naming it (`labels[i]`, e.g. "--lines line 7")."""
    k, limit = model.config.audio_num_codebooks, model.backbone.max_seq_len
    for request, label in zip(requests, labels):
        try:
            _prompt(tokenizer, mimi, request, k, limit)
        except UserError as e:
            raise UserError(f"{label}: {e}") from None


class FrameLoop:
    """The frame-by-frame loop of a batch of prompts through the KV caches, as a generator: it yields each time
    it has read back which rows are done (every `check_every` frames, its only host syncs), and what it has
    generated so far is in `codes` ([B, T, K]), `stop_at` (per row, the frames it keeps) and `eos`.

    Rows may have prompts of different lengths (padded on the right, each row at its own positions) and caps
    of their own. A row ends at its EOS frame (not kept) or its cap. Eagerly, finished rows are dropped from the
    batch at the next check. With a compiled `step` (CompiledStep) the batch is padded with empty rows to the
    step's batch bucket and keeps its shape to the end, and the caches are the step's own."""

    def __init__(self, model, prompts: list[tuple[torch.Tensor, torch.Tensor]], caps: list[int], *,
                 temperature: float, topk: int, generators: list[torch.Generator | None], step=None,
                 precision: str | None = None, check_every: int = CHECK_EVERY):
        self.model, self.temperature, self.topk = model, temperature, topk
        self.device = next(model.parameters()).device
        self.generators = [g if g is not None else _unseeded(self.device) for g in generators]
        self.step, self.check_every = step, max(1, check_every)
        self.precision = autocast(self.device, precision) if precision else contextlib.nullcontext()
        b, k = len(prompts), model.config.audio_num_codebooks
        lengths = [len(t) for t, _ in prompts]
        width, self.frames = max(lengths), max(caps)
        if step is not None:
            rows, self.cache_len = step.shape(b, width + self.frames)
        else:
            limit = model.backbone.max_seq_len
            rows, self.cache_len = b, min(limit, -(-(width + self.frames) // CACHE_ROUND) * CACHE_ROUND)
        # Rows past b (a compiled batch's padding) are one empty frame each: they run, and nothing reads them.
        self.tokens = torch.zeros(rows, width, k + 1, dtype=torch.long)
        self.mask = torch.zeros(rows, width, k + 1, dtype=torch.bool)
        for i, (t, m) in enumerate(prompts):
            self.tokens[i, : len(t)], self.mask[i, : len(m)] = t, m
        self.lengths = torch.tensor(lengths + [1] * (rows - b), device=self.device)
        self.codes = torch.zeros(b, self.frames, k, dtype=torch.int, device=self.device)
        self.stop_at = torch.tensor(caps, device=self.device)
        self.eos = torch.zeros(b, dtype=torch.bool, device=self.device)

    def _noise(self, rows: list[int], padded: int) -> torch.Tensor | None:
        if self.topk == 1:
            return None  # greedy: no noise drawn
        k = self.model.config.audio_num_codebooks
        noise = frame_noise([self.generators[r] for r in rows], k, self.topk, self.device)
        if padded > len(rows):
            noise = torch.cat([noise, noise.new_zeros(padded - len(rows), k, self.topk)])
        return noise

    def run(self, progress: bool = False) -> Iterator[int]:
        """Generate; yields the number of frames done at each check. The model's mode is restored and its caches
        removed (a compiled step keeps its own for the next call)."""
        model, device, compiled = self.model, self.device, self.step is not None
        was_training = model.training
        model.eval()
        rows = list(range(len(self.codes)))
        padded = len(self.tokens)
        index = torch.arange(len(rows), device=device)
        bar = tqdm(total=self.frames, disable=not progress, desc="frames", unit="frame", leave=False)
        try:
            if compiled:
                self.step.attach(self.cache_len)
            else:
                model.setup_caches(padded, self.cache_len)
            tokens, mask = self.tokens.to(device), self.mask.to(device)
            pos = torch.arange(tokens.shape[1], device=device).expand(padded, -1)
            last = self.lengths - 1
            for t in range(self.frames):
                # The prompt (its length varies) always runs eagerly; a compiled step takes the one-frame steps.
                # A compiled step's output may live in memory its next call overwrites (CUDA graphs): it is copied
                # (into codes, and into the next input frames) before that call.
                step = self.step if t and compiled else model.generate_frame
                with self.precision:
                    frame = step(tokens, mask, pos, self.temperature, self.topk, self._noise(rows, padded), last)
                self._record(t, index, frame[: len(rows)])
                bar.update()
                tokens, mask = next_input_frames(frame)
                pos = (last if t == 0 else pos[:, 0]).add(1).clamp(max=self.cache_len - 1).unsqueeze(1)
                last = frame = None
                if (t + 1) % self.check_every and t + 1 < self.frames:
                    continue
                done = (self.stop_at[index] <= t + 1).tolist()  # the one read back: which rows are done
                yield t + 1
                if all(done):
                    break
                if any(done) and not compiled:
                    keep = [i for i, d in enumerate(done) if not d]
                    kept = torch.tensor(keep, device=device)
                    model.keep_rows(kept)
                    rows, index = [rows[i] for i in keep], index[kept]
                    tokens, mask, pos = tokens[kept], mask[kept], pos[kept]
                    padded = len(rows)
        finally:
            bar.close()
            model.remove_caches()
            model.train(was_training)

    def _record(self, t: int, index: torch.Tensor, frame: torch.Tensor) -> None:
        """Store frame t of the batch's rows; a row's first all-zero frame (EOS) before its cap ends it."""
        self.codes[:, t].index_copy_(0, index, frame)
        stop = self.stop_at[index]
        hit = (frame == 0).all(-1) & (t < stop)
        self.stop_at.index_copy_(0, index, torch.where(hit, t, stop))
        self.eos.index_copy_(0, index, self.eos[index] | hit)


def utterance_seed(seed: int, number: int) -> int:
    """The sampling seed of utterance `number` of a run seeded `seed`: its own, whatever comes before it."""
    digest = hashlib.sha256(f"{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _backbone_part(model, tokens, mask, pos, temperature: float, topk: int, noise):
    """The backbone's one-frame step and codebook 0: codebook 0's sample and the decoder's first input."""
    return model.first_codebook(model.backbone_step(tokens, mask, pos), temperature, topk, noise)


def _codebook_part(model, curr_h, pos, i, temperature: float, topk: int, noise):
    return model.codebook_step(curr_h, pos, i, temperature, topk, noise)


class CompiledStep:
    """The model's one-frame step, compiled (torch.compile, static shapes; CUDA graphs, mode reduce-overhead, on a
    GPU), for the life of a loaded model.

    Two graphs make a frame: the backbone's step with codebook 0, and one decoder step that serves codebooks
    1..K-1 (the codebook is a tensor argument). One graph of the whole frame would launch less, but its unrolled
    decoder took 153 s to compile per shape (inductor, tiny model, this project's 2-core CPU) against seconds.
    Under CUDA graphs a call's outputs live in memory that the graph's next replay overwrites, so each output is
    copied before the next call (the frame into a fresh [b, K], the decoder's input into a tensor of its own).

    The KV caches are allocated once, at `max_batch` rows and the model's whole length, kept for every later call
    (CUDA graphs record against fixed addresses) and zeroed between calls. A call's batch is padded to a power of
    two and its cache window to one of LENGTH_BUCKETS, so one process compiles at most `max_graphs` graphs, whatever
    it is asked to say; a compile past that is an error rather than Dynamo's silent fall back to eager. `backend`
    and `mode` are torch.compile's (tests pass a backend of their own, and shorter `lengths`)."""

    def __init__(self, model, max_batch: int = 8, *, backend="inductor", mode: str | None = "auto",
                 lengths: tuple[int, ...] = LENGTH_BUCKETS):
        if max_batch < 1:
            raise UserError(f"a compiled step needs a batch of at least 1 row, not {max_batch}")
        device = next(model.parameters()).device
        if mode == "auto":
            mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
        self.model, self.max_batch = model, max_batch
        limit = model.backbone.max_seq_len
        self.batch_buckets = tuple(sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)}))
        self.length_buckets = tuple(sorted({min(n, limit) for n in lengths} | {limit}))
        # A backbone graph per (batch, length) bucket and two decoder graphs per batch bucket (codebook 1 reads two
        # positions, the others one); x2: greedy or sampled.
        self.max_graphs = 2 * len(self.batch_buckets) * (len(self.length_buckets) + 2)
        self._caches = None
        self._codebooks = [torch.tensor(i, device=device) for i in range(model.config.audio_num_codebooks)]
        compile_ = functools.partial(torch.compile, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        self._backbone, self._codebook = compile_(_backbone_part), compile_(_codebook_part)

    def shape(self, batch: int, length: int) -> tuple[int, int]:
        """(rows, cache length) a call of `batch` rows needing `length` positions runs at: its buckets."""
        if batch > self.max_batch:
            raise ValueError(f"a batch of {batch} rows is over the compiled step's max_batch of {self.max_batch}")
        rows = next(b for b in self.batch_buckets if b >= batch)
        return rows, next((n for n in self.length_buckets if n >= length), self.length_buckets[-1])

    def attach(self, cache_len: int) -> None:
        """Give the model the step's caches, zeroed, attending over their first `cache_len` positions (the caller
        removes them with model.remove_caches())."""
        model = self.model
        layers = [layer for stack in (model.backbone, model.decoder) for layer in stack.layers]
        if self._caches is None:
            model.setup_caches(self.max_batch)
            self._caches = [layer.attn.kv_cache for layer in layers]
        for layer, cache in zip(layers, self._caches):
            cache.reset()
            layer.attn.kv_cache = cache
        model.backbone.set_cache_len(cache_len)

    def __call__(self, tokens, mask, pos, temperature: float, topk: int, noise=None, last=None) -> torch.Tensor:
        """One frame of every row, [b, K], as model.generate_frame gives it (`last` must be None: the prompt runs
        eagerly)."""
        model, k = self.model, self.model.config.audio_num_codebooks
        frame = torch.empty(len(tokens), k, dtype=torch.int, device=tokens.device)
        with torch._dynamo.config.patch(recompile_limit=self.max_graphs, fail_on_recompile_limit_hit=True):
            sample, curr_h = self._backbone(model, tokens, mask, pos, temperature, topk, noise)
            frame[:, :1].copy_(sample)
            curr_h = curr_h.clone()
            pos = torch.arange(2, device=tokens.device).expand(len(tokens), -1)
            for i in range(1, k):
                sample, curr_h = self._codebook(model, curr_h, pos, self._codebooks[i], temperature, topk, noise)
                frame[:, i:i + 1].copy_(sample)
                curr_h = curr_h.clone()
                pos = pos[:, -1:] + 1
        return frame


def _unseeded(device) -> torch.Generator:
    g = torch.Generator(device)
    g.seed()  # a nondeterministic seed of its own; the global generator is left alone
    return g


def _setup(model, tokenizer, mimi, requests: list[SpeechRequest]):
    k, limit = model.config.audio_num_codebooks, model.backbone.max_seq_len
    prompts = [_prompt(tokenizer, mimi, r, k, limit) for r in requests]
    device = next(model.parameters()).device
    generators = [None if r.seed is None else torch.Generator(device).manual_seed(r.seed) for r in requests]
    return [(t, m) for t, m, _ in prompts], [cap for _, _, cap in prompts], generators


# no_grad rather than inference_mode: tensors the model caches on first use (its RoPE tables) would
# otherwise be inference tensors, and a training step after the first sample would fail on them.
@torch.no_grad()
def synthesize_batch(model, text_tokenizer, mimi, requests: list[SpeechRequest], *, temperature: float = 0.9,
                     topk: int = 50, progress: bool = False, precision: str | None = None, step=None,
                     check_every: int = CHECK_EVERY) -> list[Speech]:
    """Speak every request, all at once. Each row samples from its own generator (its request's seed) and
    stops at its own EOS frame or cap; Mimi decodes each row's frames up to its end, in fp32.

    `precision` (a training run's: fp32, bf16, fp16) runs the model under that autocast and nothing else;
    None runs it in its weights' dtype. `step` replaces the model's frame step (a compiled one, from
    CompiledStep). The model's train/eval mode is restored and its caches removed afterwards, so training
    can call this."""
    prompts, caps, generators = _setup(model, text_tokenizer, mimi, requests)
    loop = FrameLoop(model, prompts, caps, temperature=temperature, topk=topk, generators=generators, step=step,
                     precision=precision, check_every=check_every)
    for _ in loop.run(progress):
        pass
    codes, stop_at, eos = loop.codes.cpu(), loop.stop_at.tolist(), loop.eos.tolist()
    out = []
    for row, end, stopped in zip(codes, stop_at, eos):
        kept = row[:end].T  # [K, F]: nothing past the row's end is decoded
        out.append(Speech(decode_audio(mimi, kept) if end else torch.zeros(0), bool(stopped), kept))
    return out


def synthesize(model, text_tokenizer, mimi, text: str, speaker: int = 0, context: list[Segment] | tuple = (), *,
               max_audio_seconds: float = 10.0, temperature: float = 0.9, topk: int = 50, seed: int | None = None,
               progress: bool = False, precision: str | None = None, step=None) -> tuple[torch.Tensor, bool]:
    """Speak `text` as `speaker` after the `context` turns (a batch of one). Returns (1-D float CPU audio, stopped
    at EOS)."""
    speech = synthesize_batch(model, text_tokenizer, mimi, [SpeechRequest(text, speaker, tuple(context),
                                                                          max_audio_seconds, seed)],
                              temperature=temperature, topk=topk, progress=progress, precision=precision, step=step)[0]
    return speech.audio, speech.stopped


# --------------------------------------------------------------------------- streaming

STREAM_CHUNK = 6     # frames per streamed chunk (0.48 s of audio)
STREAM_CONTEXT = 25  # frames decoded again before each chunk (2 s), so that Mimi's decoder hears what came before
STREAM_HOLDBACK = 1  # frames held back to the next chunk: the last frame's audio still changes with the next frame


class StreamDecoder:
    """Mimi decoding as frames arrive. transformers' MimiModel keeps no streaming state in its decoder, so each
    chunk decodes its new frames again with STREAM_CONTEXT frames before them, and gives out the audio of all
    but the last STREAM_HOLDBACK frames (the transposed convolutions still add into those from the next frame).
    Joined, the chunks differ from a one-shot decode of the same codes by a small, measured amount."""

    def __init__(self, mimi, context: int = STREAM_CONTEXT, holdback: int = STREAM_HOLDBACK):
        self.mimi, self.context, self.holdback, self.emitted = mimi, context, holdback, 0

    def push(self, codes: torch.Tensor, final: bool = False) -> torch.Tensor:
        """codes [K, F]: every frame so far. Returns the audio that is settled and not yet given out."""
        end = codes.shape[1] if final else codes.shape[1] - self.holdback
        if end <= self.emitted:
            return torch.zeros(0)
        start = max(0, self.emitted - self.context)
        audio = decode_audio(self.mimi, codes[:, start:])
        out = audio[(self.emitted - start) * SAMPLES_PER_FRAME:(end - start) * SAMPLES_PER_FRAME]
        self.emitted = end
        return out


class SpeechStream:
    """One utterance spoken chunk by chunk: iterate for 1-D float CPU audio chunks as frames arrive (every
    `chunk` frames: the loop's checks are where it reads back its frames). Once the iteration ends, `stopped`
    says whether it stopped at EOS and `codes` holds its frames. The frames are those synthesize_batch gives
    for the same request."""

    def __init__(self, model, text_tokenizer, mimi, request: SpeechRequest, *, temperature: float = 0.9,
                 topk: int = 50, precision: str | None = None, step=None, chunk: int = STREAM_CHUNK):
        prompts, caps, generators = _setup(model, text_tokenizer, mimi, [request])
        self.loop = FrameLoop(model, prompts, caps, temperature=temperature, topk=topk, generators=generators,
                              step=step, precision=precision, check_every=chunk)
        self.decoder, self.stopped, self.codes = StreamDecoder(mimi), False, None

    @torch.no_grad()
    def __iter__(self) -> Iterator[torch.Tensor]:
        loop = self.loop
        for done in loop.run():
            end = min(done, int(loop.stop_at[0]))
            chunk = self.decoder.push(loop.codes[0, :end].T.cpu())
            if len(chunk):
                yield chunk
        end = int(loop.stop_at[0])
        self.codes, self.stopped = loop.codes[0, :end].T.cpu(), bool(loop.eos[0])
        chunk = self.decoder.push(self.codes, final=True)
        if len(chunk):
            yield chunk
