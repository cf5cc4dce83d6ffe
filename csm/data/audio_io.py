"""Reading audio files: a time window without decoding the rest, mixed to mono, resampled to Mimi's
24 kHz, as float32. Every failure is an AudioError carrying a short reason.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from csm.model.codec import MIMI_SAMPLE_RATE
from csm.system.errors import UserError
from csm.system.outputs import not_a_file

WINDOW_TOLERANCE_S = 0.05  # an `end` this far past the file's end is rounding, not a bad window


class AudioError(UserError):
    """An audio file that cannot be used; `reason` is the short why (for skipped-row reports)."""

    def __init__(self, path, reason: str):
        self.reason = reason
        super().__init__(f"{path}: {reason}")


# torchaudio's sinc resampler builds a kernel of (target/g) x (rate/g + taps) floats, g = gcd(rate, target): small
# for the usual rates (44.1 kHz -> 24 kHz: 80 x 147), huge for odd ones (22051 Hz -> 16 kHz: 16000 x 22051, 6.6 GB
# peak). Above this many kernel entries a polyphase resampler (soxr) is used, whose memory does not grow with them.
EXACT_KERNEL_LIMIT = 2**20


def resample(audio: np.ndarray, rate: int, target: int = MIMI_SAMPLE_RATE) -> np.ndarray:
    """1-D float32 audio from `rate` to `target` Hz, in memory and time bounded for any pair of rates: torchaudio's
    sinc interpolation where its kernel is small (every common rate, so their codes stay as they were), soxr's
    polyphase resampler (high quality) for the rest."""
    if rate == target:
        return audio
    g = math.gcd(int(rate), int(target))
    if (target // g) * (rate // g) <= EXACT_KERNEL_LIMIT:
        import torchaudio  # resampling only: audio at Mimi's rate is read without it

        return torchaudio.functional.resample(torch.from_numpy(audio), rate, target).numpy()
    import soxr  # odd rates only; not on a bare PyTorch machine

    return soxr.resample(np.ascontiguousarray(audio, dtype=np.float32), rate, target, quality="HQ").astype(np.float32)


def read_audio(path: str | Path, start: float | None = None, end: float | None = None) -> np.ndarray:
    """The [start, end) seconds of an audio file (the whole file without them) as float32 mono at 24 kHz.

    Only the window is read. An `end` up to WINDOW_TOLERANCE_S past the file's end is clipped to it.
    """
    path = str(path)
    if not Path(path).is_file():
        why = not_a_file(Path(path))
        raise AudioError(path, "audio file not found" if why == "not found" else f"audio path {why}")
    try:
        info = sf.info(path)
    except Exception as e:  # libsndfile reports every format problem as a RuntimeError with its text
        raise AudioError(path, f"unreadable audio ({libsndfile_reason(e)})") from None
    rate, total = info.samplerate, info.frames
    first, stop = 0, total
    if start is not None:
        first, stop = round(start * rate), round(end * rate)
        if first >= total:
            raise AudioError(path, f"window starts at {start:g} s, past the end of the file ({total / rate:.2f} s)")
        if stop > total + WINDOW_TOLERANCE_S * rate:
            raise AudioError(path, f"window ends at {end:g} s, past the end of the file ({total / rate:.2f} s)")
        stop = min(stop, total)
    mono, rate = read_mono(path, path, first, stop)
    return np.ascontiguousarray(resample(mono, rate), dtype=np.float32)


def libsndfile_reason(error: Exception) -> str:
    """libsndfile's own words for a failed read, without soundfile's "Error opening <object at 0x...>:" prefix."""
    reason = getattr(error, "error_string", None) or (str(error).splitlines() or [type(error).__name__])[0]
    return re.sub(r"^Error opening .*?: ", "", reason).strip() or type(error).__name__


def read_mono(source, label, first: int = 0, stop: int | None = None) -> tuple[np.ndarray, int]:
    """Samples [first, stop) of what soundfile reads (a path or a file object) as float32 mono at the file's
    own rate, and that rate. libsndfile's error becomes an AudioError naming `label`."""
    try:
        data, rate = sf.read(source, start=first, stop=stop, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile reports every format problem as a RuntimeError with its text
        raise AudioError(label, f"unreadable audio ({libsndfile_reason(e)})") from None
    return np.ascontiguousarray(data.mean(axis=1), dtype=np.float32), rate
