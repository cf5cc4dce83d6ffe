"""Pretokenizing throughput: this tool end to end vs a bare loop that only reads and encodes clip by clip.

The bare loop is the floor of what the original does (read, resample, `mimi.encode` one clip at a
time, nothing written); this tool additionally tokenizes text, validates rows and writes the HDF5.
Both run on the same generated clips (1-6 s, 44.1 kHz, so both must resample) in the same run.

Usage: python bench/pretokenize.py [--clips 32] [--mimi_weights FILE] [--device cpu]
Without --mimi_weights a random Mimi of moshi's full-size architecture is built offline (codebooks
filled so codes vary): the same computation as the real weights, which need a download.
"""
import argparse
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
import tiny_assets  # noqa: E402
import utils  # noqa: E402

SOURCE_RATE = 44100


def make_clips(directory: Path, n: int) -> tuple[Path, float]:
    rng = np.random.default_rng(0)
    rows, seconds = [], 0.0
    for i in range(n):
        dur = float(rng.uniform(1.0, 6.0))
        t = np.arange(int(dur * SOURCE_RATE)) / SOURCE_RATE
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(directory / f"clip{i:04d}.wav", wave.astype(np.float32), SOURCE_RATE)
        rows.append({"path": f"clip{i:04d}.wav", "text": f"Benchmark sentence {i}.", "speaker": 0})
        seconds += dur
    meta = directory / "meta.csv"
    pd.DataFrame(rows).to_csv(meta, index=False)
    return meta, seconds


def full_size_random_mimi(path: Path) -> Path:
    """moshi's default Mimi architecture with random weights, saved like the real file."""
    from moshi.models import loaders
    from safetensors.torch import save_file

    torch.manual_seed(0)
    mimi = loaders.get_mimi(None, device="cpu", num_codebooks=utils.NUM_CODEBOOKS)
    for module in mimi.modules():
        if type(module).__name__ == "EuclideanCodebook":
            module.embedding_sum.normal_(0.0, 1.0)
            module.cluster_usage.fill_(1.0)
            module._initialized.fill_(1.0)
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(path))
    return path


def bare_loop(meta: Path, mimi, device) -> None:
    import torchaudio

    df = pd.read_csv(meta)
    with torch.inference_mode():
        for path in df["path"]:
            data, rate = sf.read(str(meta.parent / path), dtype="float32")
            audio = torchaudio.functional.resample(torch.from_numpy(data), rate, utils.MIMI_SAMPLE_RATE)
            mimi.encode(audio.view(1, 1, -1).to(device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--mimi_weights", help="real Mimi safetensors (default: full-size random Mimi)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch_sizes", default="1,2,8", help="batch sizes to time the tool with")
    p.add_argument("--num_workers", type=int, default=2)
    args = p.parse_args()
    device = utils.resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        assets = tiny_assets.make_all(tmp / "assets")
        mimi_weights = args.mimi_weights or str(full_size_random_mimi(tmp / "mimi-full-random.safetensors"))
        meta, seconds = make_clips(tmp, args.clips)
        mimi = utils.load_mimi(mimi_weights, device=device)
        bare_loop(meta, mimi, device)  # warm-up: file cache and kernels, for both contenders
        t0 = time.perf_counter()
        bare_loop(meta, mimi, device)
        bare = time.perf_counter() - t0
        common = ["--train_data", str(meta), "--text_tokenizer", str(assets["text_tokenizer"]),
                  "--mimi_weights", mimi_weights, "--device", str(device), "--save_every", "500"]
        utils.load_text_tokenizer(str(assets["text_tokenizer"]))  # imports paid outside the timings
        rows = []
        runs = [(1, 0)] + [(int(b), args.num_workers) for b in args.batch_sizes.split(",")]
        for batch, workers in runs:
            out = tmp / f"out_{batch}_{workers}.hdf5"
            t0 = time.perf_counter()
            pretokenize.main([*common, "--output", str(out), "--batch_size", str(batch), "--num_workers", str(workers)])
            rows.append((batch, workers, time.perf_counter() - t0))
    which = "given Mimi weights" if args.mimi_weights else "full-size Mimi, random weights"
    print(f"\n{args.clips} clips, {seconds / 60:.1f} min of 44.1 kHz audio, {which}, {device}, "
          f"{torch.get_num_threads()} threads")
    print("| pretokenizing | clips/s | audio s/s | vs bare loop |\n|---|---|---|---|")
    print(f"| bare loop: read + resample + encode one clip at a time | {args.clips / bare:.1f} | {seconds / bare:.0f} | 1.00x |")
    for batch, workers, t in rows:
        print(f"| pretokenize.py --batch_size {batch} --num_workers {workers} (whole tool, writes the file) | "
              f"{args.clips / t:.1f} | {seconds / t:.0f} | {bare / t:.2f}x |")


if __name__ == "__main__":
    main()
