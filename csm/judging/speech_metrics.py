"""How good generated speech is, measured with other people's models: intelligibility (WER/CER of an
ASR transcript against the text, after a documented normalisation) and voice similarity (cosine of
speaker-verification embeddings). The ASR and speaker models load from a hub id or a local directory
through the same code, once, and move to the GPU only while they are used.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import jiwer
import numpy as np
import torch

from csm.model.hub import hub_snapshot, looks_like_repo_id
from csm.system.errors import UserError
from csm.data.dnsmos import DNSMOS
from csm.data.audio_io import resample

DEFAULT_ASR = "openai/whisper-large-v3-turbo"
DEFAULT_SPEAKER_MODEL = "microsoft/wavlm-base-plus-sv"
ASR_SAMPLE_RATE = 16_000  # Whisper's and WavLM's input rate
ENGLISH = ("en", "english")


# --------------------------------------------------------------------------- text normalisation and error rates


class TextNormalizer:
    """What WER/CER compare. English: Whisper's English normaliser (lower case, no punctuation, numbers
    as digits, contractions expanded, British spellings made American when the ASR tokenizer ships its
    spelling map, hesitations like "um" dropped). Other languages: Whisper's basic normaliser (lower case,
    symbols and bracketed asides removed). Both then collapse runs of spaces."""

    def __init__(self, language: str = "en", spelling: dict | None = None):
        # transformers' import takes seconds: the judges only
        from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

        self.english = language.lower() in ENGLISH
        self._normalize = EnglishTextNormalizer(spelling or {}) if self.english else BasicTextNormalizer()

    def __call__(self, text: str) -> str:
        return re.sub(r"\s+", " ", self._normalize(text or "")).strip()


def error_rates(references: list[str], hypotheses: list[str], normalize: TextNormalizer) -> dict:
    """Corpus WER and CER (edits summed over items / reference words or characters summed), with the
    counts behind them. Items whose normalised reference is empty cannot be scored and are left out."""
    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses, strict=True)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        return {"wer": None, "cer": None, "words": 0, "chars": 0, "scored": 0}
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    n_words = words.hits + words.substitutions + words.deletions
    n_chars = chars.hits + chars.substitutions + chars.deletions
    return {"wer": words.wer, "cer": chars.cer, "words": n_words, "chars": n_chars, "scored": len(pairs)}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().reshape(1, -1), b.float().reshape(1, -1)).item())


# --------------------------------------------------------------------------- loading


WEIGHT_PATTERNS = (["*.safetensors", "*.safetensors.index.json"], ["pytorch_model.bin", "pytorch_model.bin.index.json",
                                                                      "pytorch_model-*.bin"])
SUPPORT_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken"]  # configs, tokenizer and preprocessor files


def pretrained_dir(source: str, what: str, flag: str, revision: str | None = None) -> Path:
    """A local directory of a transformers model: `source` itself when it is one, else the hub repo's
    configs, tokenizer files and weights (safetensors when the repo has them, else PyTorch .bin files,
    which transformers reads with weights_only=True, so they cannot run code)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{flag} {source}: the directory has no config.json; give a transformers model directory")
        return path
    if path.exists():
        raise UserError(f"{flag} {source}: a file; give a transformers model directory or a hub id")
    if not looks_like_repo_id(source):
        raise UserError(f"{flag} {source}: no such directory, and not a hub id (owner/name)")
    hint = f"Or pass {flag} a local directory saved with save_pretrained."
    for weights in WEIGHT_PATTERNS:
        snap = hub_snapshot(source, [*SUPPORT_PATTERNS, *weights], what, hint, revision)
        if any(snap.glob("*.safetensors")) or any(snap.glob("*.bin")):
            return snap
    raise UserError(f"{flag} {source}: the repository holds no model weights (.safetensors or .bin)")


@contextlib.contextmanager
def quiet_loading():
    """No per-model "Loading weights" bars from transformers: one evaluation loads several small models."""
    from transformers.utils import logging  # transformers' import takes seconds: the judges only

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def _load_error(flag: str, source: str, e: Exception) -> UserError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return UserError(f"{flag} {source} could not be loaded: {first}")


class ASR:
    """Speech to text through transformers' automatic-speech-recognition pipeline (Whisper by default)."""

    def __init__(self, source: str = DEFAULT_ASR, language: str = "en", *, device="cpu", dtype=torch.float32):
        from transformers import pipeline  # transformers' import takes seconds: the judges only

        self.source, self.language = source, language
        directory = pretrained_dir(source, "ASR model", "--asr")
        try:
            with quiet_loading():
                self.pipe = pipeline("automatic-speech-recognition", model=str(directory), device=torch.device(device),
                                     dtype=dtype)
        except Exception as e:  # transformers raises many types for a directory that is not a model it knows
            raise _load_error("--asr", source, e) from e
        tokenizer = self.pipe.tokenizer
        if tokenizer is not None and tokenizer.pad_token_id is None:  # batching pads the generated ids
            tokenizer.pad_token = tokenizer.eos_token
        self.is_whisper = self.pipe.model.config.model_type == "whisper"
        if self.is_whisper and language and getattr(self.pipe.model.generation_config, "is_multilingual", False):
            self.generate_kwargs = {"language": language, "task": "transcribe"}
        else:
            self.generate_kwargs = {}
        spelling = getattr(tokenizer, "english_spelling_normalizer", None) if self.is_whisper else None
        self.normalizer = TextNormalizer(language, spelling)

    @property
    def model(self) -> torch.nn.Module:
        return self.pipe.model

    def transcribe(self, clips: list[np.ndarray], rate: int, batch_size: int = 8) -> list[str]:
        """Transcripts of mono float clips at `rate` Hz (resampled to 16 kHz here); an empty clip is ''."""
        out = [""] * len(clips)
        todo = [i for i, c in enumerate(clips) if len(c) > 0]
        inputs = [{"raw": resample(np.asarray(clips[i], dtype=np.float32), rate, ASR_SAMPLE_RATE),
                   "sampling_rate": ASR_SAMPLE_RATE} for i in todo]
        if not inputs:
            return out
        kwargs = {"generate_kwargs": self.generate_kwargs} if self.generate_kwargs else {}
        if any(len(x["raw"]) > 30 * ASR_SAMPLE_RATE for x in inputs):
            kwargs["chunk_length_s"] = 30  # Whisper hears 30 s at a time
        results = self.pipe(inputs, batch_size=min(batch_size, len(inputs)), **kwargs)
        for i, r in zip(todo, results):
            out[i] = r["text"].strip()
        return out


class SpeakerEncoder:
    """Speaker embeddings from a speaker-verification model (WavLM x-vector by default)."""

    def __init__(self, source: str = DEFAULT_SPEAKER_MODEL, *, device="cpu", dtype=torch.float32):
        # transformers' import takes seconds: the judges only
        from transformers import AutoFeatureExtractor, AutoModelForAudioXVector

        self.source = source
        directory = pretrained_dir(source, "speaker model", "--speaker_model")
        try:
            with quiet_loading():
                self.features = AutoFeatureExtractor.from_pretrained(str(directory))
                self.model = AutoModelForAudioXVector.from_pretrained(str(directory), dtype=dtype).to(device).eval()
        except Exception as e:
            raise _load_error("--speaker_model", source, e) from e
        self.rate = getattr(self.features, "sampling_rate", ASR_SAMPLE_RATE)

    @torch.no_grad()
    def embed(self, clip: np.ndarray, rate: int) -> torch.Tensor | None:
        """The embedding of one mono clip (None for a clip too short to embed: under 0.1 s)."""
        if len(clip) < rate // 10:
            return None
        audio = resample(np.asarray(clip, dtype=np.float32), rate, self.rate)
        inputs = self.features(audio, sampling_rate=self.rate, return_tensors="pt")
        param = next(self.model.parameters())
        inputs = {k: v.to(param.device, dtype=param.dtype if v.is_floating_point() else v.dtype)
                  for k, v in inputs.items()}
        return self.model(**inputs).embeddings[0].float().cpu()


def prompt_similarity(encoder: SpeakerEncoder, clip: np.ndarray | None, prompts: list[torch.Tensor],
                      rate: int) -> float | None:
    """Speaker similarity of `clip` to the context turns' audio (`prompts`: their embeddings), averaged: how well a
    voice follows the prompt it was given. None when the clip is too short to embed or there is no prompt."""
    a = encoder.embed(clip, rate) if clip is not None else None
    return float(np.mean([cosine(a, b) for b in prompts])) if a is not None and prompts else None


def add_judge_flags(p) -> None:
    """The judges' flags of every command line that judges speech (evaluate.py, prefer.py)."""
    p.add_argument("--asr", default=DEFAULT_ASR, help=f"ASR model: hub id or local dir (default {DEFAULT_ASR})")
    p.add_argument("--language", default="en",
                   help="language spoken (Whisper code, e.g. en, de, fr): sets Whisper's language and the "
                        "normalisation (English: Whisper's English normaliser; others: its basic one)")
    p.add_argument("--speaker_model", default=DEFAULT_SPEAKER_MODEL,
                   help=f"speaker-verification model: hub id or local dir (default {DEFAULT_SPEAKER_MODEL})")
    p.add_argument("--no_dnsmos", action="store_true",
                   help="skip DNSMOS (audio quality; needs speechmos and onnxruntime, which requirements.txt pins)")


def judges_of(args, device) -> "QualityModels":
    """The judges the flags of `add_judge_flags` name, loaded (fp16 on CUDA)."""
    return QualityModels(args.asr, args.speaker_model, args.language, device=device, half=device.type == "cuda",
                         dnsmos=not args.no_dnsmos)


class QualityModels:
    """The ASR and speaker models of an evaluation, loaded once (any failure: one line, before any speech
    is generated). `on(device)` moves them there for the duration of an evaluation and back to the CPU
    afterwards, so a training run keeps their GPU memory only while it evaluates."""

    def __init__(self, asr: str = DEFAULT_ASR, speaker_model: str = DEFAULT_SPEAKER_MODEL, language: str = "en",
                 *, device="cpu", half: bool = False, dnsmos: bool = True):
        dtype = torch.float16 if half else torch.float32
        self.dnsmos = DNSMOS() if dnsmos else None  # ONNX on the CPU; first, as it is the quickest to fail
        self.asr = ASR(asr, language, device=device, dtype=dtype)
        self.speaker = SpeakerEncoder(speaker_model, device=device, dtype=dtype)
        self.device = torch.device(device)

    def _move(self, device: torch.device) -> None:
        self.asr.model.to(device)
        self.asr.pipe.device = device
        self.speaker.model.to(device)
        self.device = device

    @contextlib.contextmanager
    def on(self, device):
        device, parked = torch.device(device), self.device
        self._move(device)
        try:
            yield self
        finally:
            self._move(parked)
            if device.type == "cuda":
                torch.cuda.empty_cache()
