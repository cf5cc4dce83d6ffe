"""Resampling in bounded memory and time for any rate from 8 kHz to 384 kHz, and unchanged for the common rates.

torchaudio's sinc resampler builds a kernel of (target/g) x (rate/g) entries, g = gcd(rate, target): an odd rate such
as 22051 Hz (gcd 1 with 16 kHz) made prepare.py peak at 6.6 GB and take 20 s for an 11 s file."""
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from csm.data import audio_io

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample"
PEAK_LIMIT_GB = 1.5  # the whole process, torch and the VAD included (about 0.75 GB here; the old path 6.6 GB)


def speech(seconds: float) -> np.ndarray:
    clips = sorted((SAMPLE / "clips").glob("train_*.flac"))
    audio = np.concatenate([sf.read(c, dtype="float32")[0] for c in clips])
    return audio[:int(seconds * sf.info(clips[0]).samplerate)]


def peak_of(tmp_path, script: str, *args) -> tuple[int, float, str]:
    """Run a script's command line in a fresh process; (exit status, its peak resident memory in GB, stderr)."""
    wrapper = tmp_path / "peak.py"
    wrapper.write_text(textwrap.dedent(f"""
        import runpy, sys
        sys.path.insert(0, {str(ROOT)!r})
        sys.argv = sys.argv[1:]
        code = 0
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code or 0
        peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
        print("PEAK_KB", peak, file=sys.stderr)
        sys.exit(code)
    """))
    proc = subprocess.run([sys.executable, str(wrapper), str(ROOT / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                                             "HF_HUB_OFFLINE": "1"})
    peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_KB")]
    return proc.returncode, int(peak[-1].split()[1]) / 2**20 if peak else float("nan"), proc.stderr


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from /proc (Linux)")
def test_an_odd_sample_rate_prepares_and_pretokenizes_in_bounded_memory(assets, tmp_path):
    (tmp_path / "rec").mkdir()
    sf.write(tmp_path / "rec" / "odd.wav", speech(11.0), 22051)
    rc, peak, err = peak_of(tmp_path, "prepare.py", "--audio", tmp_path / "rec", "--output", tmp_path / "m.csv",
                            "--asr", "none")
    assert rc == 0, err[-2000:]
    assert peak < PEAK_LIMIT_GB, f"prepare.py peaked at {peak:.2f} GB"
    (tmp_path / "t.csv").write_text(f"path,text\n{tmp_path / 'rec' / 'odd.wav'},Some words.\n")
    rc, peak, err = peak_of(tmp_path, "pretokenize.py", "--train_data", tmp_path / "t.csv", "--output",
                            tmp_path / "t.hdf5", "--device", "cpu", "--text_tokenizer", assets["text_tokenizer"],
                            "--mimi_weights", assets["mimi"])
    assert rc == 0, err[-2000:]
    assert peak < PEAK_LIMIT_GB, f"pretokenize.py peaked at {peak:.2f} GB"


@pytest.mark.parametrize("rate", [8000, 8001, 11025, 22050, 22051, 44100, 44101, 48000, 96000, 192001, 384000])
@pytest.mark.parametrize("target", [16000, 24000])
def test_every_rate_resamples_fast_to_the_right_length(rate, target):
    audio = np.random.default_rng(rate).standard_normal(rate).astype(np.float32) * 0.1  # one second
    t0 = time.perf_counter()
    out = audio_io.resample(audio, rate, target)
    assert time.perf_counter() - t0 < 5.0
    assert out.dtype == np.float32 and abs(len(out) - target) <= 1


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 32000, 44100, 48000, 88200, 96000])
def test_common_rates_keep_torchaudios_exact_output(rate):
    """Codes of files at the usual rates do not change: they take the same resampler as before, bit for bit."""
    audio = speech(1.0)
    assert np.array_equal(audio_io.resample(audio, rate, 24000),
                          torchaudio.functional.resample(torch.from_numpy(audio), rate, 24000).numpy())


def test_the_polyphase_path_sounds_like_the_sinc_path():
    """At a rate both can do, soxr and torchaudio agree to -45 dB on speech (their filters' edges differ): an odd
    rate's audio is what a common rate's would be."""
    import soxr

    audio = speech(2.0)
    sinc = torchaudio.functional.resample(torch.from_numpy(audio), 22050, 24000).numpy()
    poly = soxr.resample(audio, 22050, 24000, quality="HQ")
    inner = slice(500, -500)  # the two pad the ends differently
    error = np.sqrt(np.mean((sinc[inner] - poly[inner]) ** 2)) / np.sqrt(np.mean(sinc[inner] ** 2))
    assert error < 0.01, error  # -40 dB; measured 0.0054
