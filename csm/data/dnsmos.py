"""How clean speech sounds, without a reference: Microsoft's DNSMOS (P.835: signal, background and overall
quality; and P.808), scored 1 (bad) to 5 (excellent) by the ONNX models that the `speechmos` wheel ships.

speechmos's own scorer imports librosa (and through it numba) for one mel spectrogram, so this module loads the
wheel's ONNX files with onnxruntime and computes that spectrogram itself (numpy, the same STFT, mel filters and
dB scaling). Its scores match speechmos's within 0.01 on the bundled clips (tests/fixtures/dnsmos_speechmos.json).

The models hear 9.01 s windows at 16 kHz: audio is resampled to 16 kHz, a shorter clip is repeated until it
fills a window, and a longer one is scored over windows one second apart, averaged, as the reference scorer does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csm.data.audio_io import resample
from csm.system.errors import UserError

RATE = 16_000
WINDOW = int(9.01 * RATE)  # 144,160 samples
HOP = RATE
P808_TRIM = 160  # the P.808 model hears the window without its last 10 ms (900 spectrogram frames)
N_FFT, SPEC_HOP, N_MELS = 321, 160, 120
# The P.835 model's raw outputs are mapped to MOS by these polynomials (highest power first), from the reference.
POLY_SIG = (-0.08397278, 1.22083953, 0.0052439)
POLY_BAK = (-0.13166888, 1.60915514, -0.39604546)
POLY_OVRL = (-0.06766283, 1.11546468, 0.04602535)
INSTALL = "pip install speechmos==0.0.1.1 onnxruntime==1.32.0"
SCORES = ("ovrl", "sig", "bak", "p808")  # each clip's scores, named dnsmos_<score> in reports
SILENCE = 1e-4  # peak below which a clip is called silent and not scored


@dataclass(frozen=True)
class Score:
    ovrl: float
    sig: float
    bak: float
    p808: float

    def as_dict(self, prefix: str = "dnsmos_") -> dict[str, float]:
        return {f"{prefix}{name}": round(float(getattr(self, name)), 4) for name in SCORES}


class NotScorable(ValueError):
    """A clip DNSMOS cannot score (empty, silent, not finite); the message is the reason."""


def rejection(overall: "float | NotScorable", minimum: float) -> str | None:
    """Why a clip with this overall score (or no score) falls short of --min_dnsmos `minimum`; None if it does not."""
    if isinstance(overall, NotScorable):
        return f"no DNSMOS score: {overall}"
    return f"DNSMOS OVRL {overall:.2f} below --min_dnsmos {minimum:g}" if overall < minimum else None


def _model_dir() -> Path:
    try:
        import importlib.util

        spec = importlib.util.find_spec("speechmos")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"DNSMOS needs the speechmos wheel (its ONNX models) and onnxruntime: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "dnsmos_models"


def mel_filters(rate: int = RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangular filters on Slaney's mel scale (linear to 1 kHz, logarithmic above),
    each scaled to unit area (Slaney's normalisation): the filters librosa makes by default."""
    def to_mel(hz):
        hz = np.asarray(hz, dtype=np.float64)
        linear = hz / (200.0 / 3)
        return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), linear)

    def to_hz(mel):
        mel = np.asarray(mel, dtype=np.float64)
        return np.where(mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0)), mel * (200.0 / 3))

    fft_hz = np.fft.rfftfreq(n_fft, d=1.0 / rate)
    edges = to_hz(np.linspace(to_mel(0.0), to_mel(rate / 2), n_mels + 2))
    widths = np.diff(edges)
    rising = (fft_hz[None, :] - edges[:-2, None]) / widths[:-1, None]
    falling = (edges[2:, None] - fft_hz[None, :]) / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return (weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)


_FILTERS = None


def p808_features(audio: np.ndarray) -> np.ndarray:
    """[frames, 120] log-mel features of 16 kHz audio, as the P.808 model was trained on them: a centred,
    zero-padded STFT (Hann window of 321 samples, hop 160), power, mel filters, dB against the loudest bin
    (floored 80 dB below it), then (dB + 40) / 40."""
    global _FILTERS
    if _FILTERS is None:
        _FILTERS = mel_filters()
    pad = N_FFT // 2
    padded = np.pad(audio.astype(np.float32), (pad, pad))
    frames = 1 + (len(padded) - N_FFT) // SPEC_HOP
    index = np.arange(N_FFT)[None, :] + SPEC_HOP * np.arange(frames)[:, None]
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)  # periodic Hann
    power = np.abs(np.fft.rfft(padded[index] * window, axis=1)) ** 2  # [frames, 161]
    mel = power.astype(np.float32) @ _FILTERS.T
    db = 10.0 * np.log10(np.maximum(mel, 1e-10))
    db -= 10.0 * np.log10(max(float(mel.max()), 1e-10))
    db = np.maximum(db, db.max() - 80.0)
    return ((db + 40.0) / 40.0).astype(np.float32)


def windows(audio: np.ndarray) -> list[np.ndarray]:
    """The 9.01 s windows a clip is scored over: repeated until one fits, then one a second."""
    while len(audio) < WINDOW:
        audio = np.concatenate([audio, audio])
    hops = int(math.floor(len(audio) / RATE) - WINDOW / RATE) + 1
    return [w for i in range(hops) if len(w := audio[i * HOP:i * HOP + WINDOW]) == WINDOW]


class DNSMOS:
    """The two ONNX models, loaded once (CPU). `score(audio, rate)` scores one clip; `score_many` several, their
    windows run through each model in batches."""

    def __init__(self, threads: int | None = None):
        try:
            import onnxruntime as ort  # a heavy import (and optional): only DNSMOS users pay for it
        except ImportError:
            raise UserError(f"DNSMOS needs onnxruntime and the speechmos wheel: {INSTALL}") from None
        where = _model_dir()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.p835 = ort.InferenceSession(str(where / "sig_bak_ovr.onnx"), options, providers=["CPUExecutionProvider"])
        self.p808 = ort.InferenceSession(str(where / "model_v8.onnx"), options, providers=["CPUExecutionProvider"])

    def score(self, audio: np.ndarray, rate: int) -> Score:
        return self.score_many([audio], rate)[0]

    def score_many(self, clips: list[np.ndarray], rate: int, batch: int = 16) -> list[Score | NotScorable]:
        """Each clip's Score, or the NotScorable that says why it has none."""
        prepared, out = [], []
        for clip in clips:
            try:
                prepared.append(windows(_at_16k(clip, rate)))
            except NotScorable as e:
                prepared.append(e)
        flat = [w for p in prepared if not isinstance(p, NotScorable) for w in p]
        raw, p808 = [], []
        for start in range(0, len(flat), batch):
            chunk = np.stack(flat[start:start + batch]).astype(np.float32)
            raw.append(self.p835.run(None, {"input_1": chunk})[0])
            features = np.stack([p808_features(w[:-P808_TRIM]) for w in chunk])
            p808.append(self.p808.run(None, {"input_1": features})[0][:, 0])
        raw = np.concatenate(raw) if raw else np.zeros((0, 3))
        p808 = np.concatenate(p808) if p808 else np.zeros(0)
        at = 0
        for p in prepared:
            if isinstance(p, NotScorable):
                out.append(p)
                continue
            n = len(p)
            sig, bak, ovrl = (np.polyval(poly, raw[at:at + n, i]) for i, poly in
                              enumerate((POLY_SIG, POLY_BAK, POLY_OVRL)))
            out.append(Score(float(ovrl.mean()), float(sig.mean()), float(bak.mean()), float(p808[at:at + n].mean())))
            at += n
        return out


def _at_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if len(audio) == 0:
        raise NotScorable("the clip is empty")
    if not np.isfinite(audio).all():
        raise NotScorable("the clip holds NaN or infinite samples")
    if np.abs(audio).max() < SILENCE:
        raise NotScorable("the clip is silent")
    audio = resample(audio, int(rate), RATE) if rate != RATE else audio
    return np.clip(audio, -1.0, 1.0)
