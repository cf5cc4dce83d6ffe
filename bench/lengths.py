"""Synthetic but realistic utterance-length distribution used by every batching benchmark, so figures compare.

Durations follow a log-normal fit of common TTS corpora (median ~5 s, long tail to 30 s);
text length follows ~15 Llama-3 tokens per 5 s of speech. A frame is 80 ms (12.5 Hz).

A copy of the project contract's shared/bench/lengths.py, kept here so tests and CI need nothing outside the repo.
"""
import numpy as np


def sample_lengths(n=20000, seed=0):
    rng = np.random.default_rng(seed)
    dur = np.clip(rng.lognormal(mean=np.log(5.0), sigma=0.6, size=n), 0.5, 30.0)
    frames = np.ceil(dur * 12.5).astype(int)
    text = np.maximum(3, (dur * 3.0 + rng.normal(0, 3, n)).astype(int)) + 2  # + bos/eos
    return frames, text, frames + text + 1  # +1 EOS frame, as the original counts


def padding_waste(batches, lengths):
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1 - real / padded
