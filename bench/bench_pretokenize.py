"""Pretokenizing throughput: this tool end to end vs the bare loop of the original.

    python bench/bench_pretokenize.py [--clips 48] [--mimi_weights FILE | --full_size] [--device cpu]

The bare loop is the floor of what the original does: load Mimi, then for each clip read it with
soundfile, resample, `mimi.encode` it alone under inference_mode; nothing validated or written.
The tool (`pretokenize.main`) additionally loads the text tokenizer, validates and tokenizes every
row, fingerprints its inputs and writes the chunked, resumable HDF5 output. Both see the same
seeded random clips (1-6 s at 24 kHz by default) after one warm-up pass each (file cache, imports).

Mimi: the tiny one of tiny_assets by default (offline, seconds); --full_size builds the full-size
architecture with random weights (the real computation, no download); --mimi_weights takes real weights.
Both sides encode with transformers' MimiModel. When moshi is installed and the weights are in moshi's
file layout (--full_size builds them so), a last table times moshi's Mimi, the previous encoder, against
MimiModel on the same clips and weights.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pretokenize  # noqa: E402
from csm.data import tiny_assets  # noqa: E402
from csm.model import codec  # noqa: E402
from csm.system import runtime  # noqa: E402


def make_clips(directory: Path, n: int, rate: int, seed: int) -> tuple[Path, float]:
    """n sine-plus-noise clips of 1-6 s and their metadata csv; returns (csv, total seconds)."""
    rng = np.random.default_rng(seed)
    rows, seconds = [], 0.0
    for i in range(n):
        dur = float(rng.uniform(1.0, 6.0))
        t = np.arange(int(dur * rate)) / rate
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(directory / f"clip{i:04d}.wav", wave.astype(np.float32), rate)
        rows.append({"path": f"clip{i:04d}.wav", "text": f"Benchmark sentence number {i}.", "speaker": i % 2})
        seconds += len(t) / rate
    meta = directory / "meta.csv"
    pd.DataFrame(rows).to_csv(meta, index=False)
    return meta, seconds


def full_size_random_mimi(directory: Path) -> Path:
    """The full-size Mimi (MimiConfig's defaults, which are kyutai/mimi's) with random weights and filled
    codebooks: with moshi installed, built by moshi and saved as its file (so both encoders can load the
    same weights); else built by transformers and saved as a MimiModel directory."""
    torch.manual_seed(0)
    try:
        from moshi.models import loaders
    except ImportError:
        from transformers import MimiConfig, MimiModel

        mimi = MimiModel(MimiConfig())
        with torch.no_grad():
            for name, buf in mimi.named_buffers():
                if name.endswith("embed_sum"):
                    buf.normal_(0.0, 1.0)
                elif name.endswith(("cluster_usage", "initialized")):
                    buf.fill_(1.0)
        mimi.save_pretrained(str(directory))
        return directory
    from safetensors.torch import save_file

    mimi = loaders.get_mimi(None, device="cpu", num_codebooks=codec.NUM_CODEBOOKS)
    for module in mimi.modules():
        if type(module).__name__ == "EuclideanCodebook":
            module.embedding_sum.normal_(0.0, 1.0)
            module.cluster_usage.fill_(1.0)
            module._initialized.fill_(1.0)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer-e351c8d8-checkpoint125.safetensors"
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(path))
    return path


def read_clip(path: Path) -> torch.Tensor:
    import torchaudio

    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    audio = torch.from_numpy(data.mean(axis=1))
    if rate != codec.MIMI_SAMPLE_RATE:
        audio = torchaudio.functional.resample(audio, rate, codec.MIMI_SAMPLE_RATE)
    return audio


def bare_loop(meta: Path, mimi_weights: str, device) -> None:
    """Load Mimi, then read, resample and encode one clip at a time (the original's inner loop)."""
    mimi = codec.load_mimi(mimi_weights, device=device)
    df = pd.read_csv(meta)
    with torch.inference_mode():
        for path in df["path"]:
            codec.encode_audio(mimi, [read_clip(meta.parent / path).numpy()])


def encoder_comparison(meta: Path, moshi_file: str, device, repeats: int) -> str:
    """Encoding alone, the same clips and weights: moshi's Mimi (the previous encoder) vs MimiModel."""
    try:
        from moshi.models import loaders
    except ImportError:
        return "(moshi is not installed: the comparison with the previous encoder needs it)"
    import json

    config = Path(moshi_file).with_name("mimi_config.json")
    moshi = loaders.get_mimi(moshi_file, mimi_config=json.loads(config.read_text()) if config.is_file() else None,
                             device=device, num_codebooks=codec.NUM_CODEBOOKS)
    ours = codec.load_mimi(moshi_file, device=device)
    clips = [read_clip(meta.parent / p).numpy() for p in pd.read_csv(meta)["path"]]

    def run_moshi():
        with torch.inference_mode():
            for clip in clips:
                padded = torch.zeros(1, 1, codec.frames_of(len(clip)) * codec.SAMPLES_PER_FRAME)
                padded[0, 0, :len(clip)] = torch.from_numpy(clip)
                moshi.encode(padded.to(device))

    def run_ours():
        for clip in clips:
            codec.encode_audio(ours, [clip])

    t_moshi, t_ours = timed(run_moshi, repeats), timed(run_ours, repeats)
    return ("| encoder (same weights, same clips, one at a time) | clips/s | vs moshi |\n|---|---|---|\n"
            f"| moshi 0.2.13 Mimi (the previous encoder) | {len(clips) / t_moshi:.1f} | 1.00x |\n"
            f"| transformers MimiModel (this) | {len(clips) / t_ours:.1f} | {t_moshi / t_ours:.2f}x |")


def timed(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source_rate", type=int, default=24000, help="sample rate of the generated clips")
    p.add_argument("--mimi_weights", help="real Mimi safetensors (default: the tiny Mimi)")
    p.add_argument("--full_size", action="store_true", help="moshi's full-size Mimi with random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", default="1:0,auto",
                   help="tool settings to time, comma-separated BATCH:WORKERS pairs or 'auto' (the defaults)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--processes", type=int, nargs="*", default=[2],
                   help="also time torchrun --nproc_per_node N pretokenize.py against one process, for each N")
    p.add_argument("--process_clips", type=int, default=192, help="clips of the processes table")
    args = p.parse_args()
    device = runtime.resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        assets = tiny_assets.make_all(tmp / "assets")
        if args.mimi_weights:
            mimi_weights, which = args.mimi_weights, f"Mimi {Path(args.mimi_weights).name}"
        elif args.full_size:
            mimi_weights, which = str(full_size_random_mimi(tmp / "mimi-full")), "full-size Mimi, random weights"
        else:
            mimi_weights, which = str(assets["mimi"]), "tiny Mimi (tiny_assets)"
        meta, seconds = make_clips(tmp, args.clips, args.source_rate, args.seed)
        bare = timed(lambda: bare_loop(meta, mimi_weights, device), args.repeats)
        common = ["--train_data", str(meta), "--text_tokenizer", str(assets["text_tokenizer"]),
                  "--mimi_weights", mimi_weights, "--device", str(device)]
        comparison = (encoder_comparison(meta, mimi_weights, device, args.repeats)
                      if mimi_weights.endswith(".safetensors") else "(encoder comparison: needs moshi's file layout)")
        rows = []
        for n, config in enumerate(args.configs.split(",")):
            batch, workers = config.split(":") if config != "auto" else (None, None)
            extra = [] if config == "auto" else ["--batch_size", batch, "--num_workers", workers]
            out = tmp / f"out{n}.hdf5"

            def tool():
                out.unlink(missing_ok=True)  # else the second call is an up-to-date no-op
                pretokenize.main([*common, "--output", str(out), *extra])

            label = "defaults" if config == "auto" else f"--batch_size {extra[1]} --num_workers {extra[3]}"
            rows.append((label, timed(tool, args.repeats)))
        processes = processes_table(tmp, assets, mimi_weights, device, args) if args.processes else ""
    print(f"\n{args.clips} clips, {seconds / 60:.1f} min of {args.source_rate / 1000:g} kHz audio, {which}, {device}, "
          f"{torch.get_num_threads()} torch threads, median of {args.repeats}")
    print("| pretokenizing | clips/s | audio s/s | vs bare loop |\n|---|---|---|---|")
    print(f"| bare loop: load Mimi, read + resample + encode one clip at a time | {args.clips / bare:.1f} | "
          f"{seconds / bare:.0f} | 1.00x |")
    for label, t in rows:
        print(f"| pretokenize.py {label} (whole tool, writes the file) | {args.clips / t:.1f} | {seconds / t:.0f} | "
              f"{bare / t:.2f}x |")
    print()
    print(comparison)
    if processes:
        print()
        print(processes)


def processes_table(tmp: Path, assets: dict, mimi_weights: str, device, args) -> str:
    """The whole command as a user launches it, start-up included: one process against torchrun with N processes
    (each taking its share of the chunks; torchrun gives each one CPU thread), on `--process_clips` clips."""
    import os
    import subprocess

    folder = tmp / "processes"
    folder.mkdir()
    meta, seconds = make_clips(folder, args.process_clips, args.source_rate, args.seed + 1)
    common = ["--train_data", str(meta), "--text_tokenizer", str(assets["text_tokenizer"]), "--mimi_weights",
              mimi_weights, "--device", str(device), "--save_every", str(max(1, args.process_clips // 16))]
    out = folder / "out.hdf5"

    def launch(n: int) -> None:
        out.unlink(missing_ok=True)
        head = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node", str(n)]
        done = subprocess.run([*head, str(ROOT / "pretokenize.py"), *common, "--output", str(out)], cwd=ROOT,
                              capture_output=True, text=True, env=os.environ.copy())
        if done.returncode:
            raise SystemExit(f"pretokenize.py with {n} process(es) failed:\n{done.stderr[-2000:]}")

    one = timed(lambda: launch(1), args.repeats)
    rows = [f"| python pretokenize.py (1 process, {torch.get_num_threads()} torch threads) | "
            f"{args.process_clips / one:.1f} | {seconds / one:.0f} | 1.00x |"]
    for n in args.processes:
        t = timed(lambda: launch(n), args.repeats)
        rows.append(f"| torchrun --nproc_per_node {n} pretokenize.py | {args.process_clips / t:.1f} | "
                    f"{seconds / t:.0f} | {one / t:.2f}x |")
    return (f"{args.process_clips} clips, {seconds / 60:.1f} min of audio, the whole command (start-up included), "
            f"{device}, median of {args.repeats}\n| launch | clips/s | audio s/s | vs 1 process |\n|---|---|---|---|\n"
            + "\n".join(rows))


if __name__ == "__main__":
    main()
