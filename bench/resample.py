"""Resampling cost per source rate: the previous resampler (torchaudio's sinc interpolation for every rate) against
audio_io.resample (the same for common rates, soxr's polyphase resampler where torchaudio's kernel would be huge).

Each case runs in a fresh process, so its peak resident memory (VmHWM, Linux) is its own; the figure includes the
process's imports (torch, soundfile), measured alone in the first row. Audio: 11 s of the bundled speech.

Usage: python bench/resample.py [--seconds 11]
Prints a markdown table for docs/benchmarks.md.
"""
import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import numpy as np, soundfile as sf, torch, torchaudio
    from csm.data import audio_io
    rate, target, how, seconds = {rate}, {target}, {how!r}, {seconds}
    clips = sorted((__import__("pathlib").Path({root!r}) / "data" / "sample" / "clips").glob("train_*.flac"))
    audio = np.concatenate([sf.read(c, dtype="float32")[0] for c in clips])[:int(seconds * rate)]
    t0 = time.perf_counter()
    if how == "previous":
        out = torchaudio.functional.resample(torch.from_numpy(audio), rate, target).numpy()
    elif how == "now":
        out = audio_io.resample(audio, rate, target)
    seconds_taken = time.perf_counter() - t0
    peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
    print(seconds_taken, peak / 2**20)
""")


def measure(rate: int, target: int, how: str, seconds: float) -> tuple[float, float]:
    code = CASE.format(root=str(ROOT), rate=rate, target=target, how=how, seconds=seconds)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    taken, peak_gb = map(float, proc.stdout.split())
    return taken, peak_gb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=11.0)
    args = p.parse_args()
    _, base = measure(16000, 16000, "imports", args.seconds)
    print(f"Resampling {args.seconds:g} s of speech, one thread; peak resident memory of the whole process "
          f"(imports alone: {base:.2f} GB).\n")
    print("| source rate -> target | previous: time, peak | now: time, peak | time ratio | peak ratio |")
    print("|---|---|---|---|---|")
    for rate, target in ((44100, 24000), (44100, 16000), (22051, 24000), (22051, 16000)):
        (t_old, m_old), (t_new, m_new) = measure(rate, target, "previous", args.seconds), \
            measure(rate, target, "now", args.seconds)
        print(f"| {rate} Hz -> {target} Hz | {t_old:.3f} s, {m_old:.2f} GB | {t_new:.3f} s, {m_new:.2f} GB | "
              f"{t_old / t_new:.1f}x | {m_old / m_new:.1f}x |")


if __name__ == "__main__":
    main()
