"""Batching and dataset benchmark on the reference length distribution (bench/lengths.py).

1. Padding waste and padded-tokens-per-batch spread: fixed batch size (the original) vs token budget,
   and token budget on examples composed with same_speaker context (1 and 2 turns, 20 speakers).
2. Dataset memory per stored token: flat int16 buffers vs a list of int64 tensors (the original).
3. Batches/s of in-memory and partial (lazy HDF5) loading with 0 and 2 workers.
4. Loading overlapped with compute: time per batch when each batch is followed by a step that leaves the host
   idle (a sleep, as the host waits on a GPU), with 0 and 2 workers.

Usage: python bench/dataloader.py [--examples 2000] [--batch_size 8] [--max_tokens 4096]
Prints markdown tables for the README.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # after the project's own modules
from csm.data.context import ContextPlanner  # noqa: E402
from dataloaders import CSMDataset, LengthBucketSampler, make_loader  # noqa: E402
from csm.data.token_file import write_token_file  # noqa: E402
from lengths import padding_waste, sample_lengths  # noqa: E402

CODEBOOKS = 32


def batching_table(batch_size: int, max_tokens: int) -> str:
    _, _, lengths = sample_lengths()
    rows = []
    for name, kw in ((f"fixed batch_size={batch_size}, length-bucketed (original)", {"batch_size": batch_size}),
                     (f"token budget max_tokens={max_tokens}", {"max_tokens": max_tokens})):
        batches = LengthBucketSampler(lengths, seed=0, **kw).global_batches()
        padded = np.array([int(lengths[b].max()) * len(b) for b in batches])
        rows.append(f"| {name} | {len(batches)} | {padding_waste(batches, lengths):.2%} | "
                    f"{padded.max() / padded.min():.1f}x | {padded.mean():.0f} |")
    # Conversational context: batches form on the composed lengths (context turns + target, cut to 2048).
    speakers = np.random.default_rng(2).integers(0, 20, len(lengths))
    for turns in (1, 2):
        planner = ContextPlanner(lengths, np.full(len(lengths), ""), np.arange(len(lengths)), speakers,
                                 mode="same_speaker", context_turns=turns, max_seq_len=2048, seed=0)
        composed = planner.plans(0)[1]
        batches = LengthBucketSampler(lengths, seed=0, max_tokens=max_tokens, planner=planner).global_batches()
        padded = np.array([int(composed[b].max()) * len(b) for b in batches])
        rows.append(f"| token budget max_tokens={max_tokens}, same_speaker context_turns={turns} "
                    f"(mean example {composed.mean():.0f} frames, was {lengths.mean():.0f}) | {len(batches)} | "
                    f"{padding_waste(batches, composed):.2%} | "
                    f"{padded.max() / padded.min():.1f}x | {padded.mean():.0f} |")
    # The original shuffled examples into fixed-size batches with no length grouping at all.
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(lengths))
    random_batches = [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
    padded = np.array([int(lengths[b].max()) * len(b) for b in random_batches])
    rows.insert(0, f"| random batch_size={batch_size}, no bucketing | {len(random_batches)} | "
                   f"{padding_waste(random_batches, lengths):.2%} | "
                   f"{padded.max() / padded.min():.1f}x | {padded.mean():.0f} |")
    head = ("| batching (20,000 reference utterances) | batches | padding waste | padded tokens/batch max/min "
            "| mean padded tokens/batch |\n|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def write_reference_file(path: Path, n: int) -> None:
    """A token file (original layout: no attributes) of n random examples with the reference lengths."""
    frames, text, lengths = sample_lengths(n, seed=1)
    rng = np.random.default_rng(0)
    audio = [rng.integers(0, 2048, CODEBOOKS * int(fr), dtype=np.int16) for fr in frames]
    txt = [rng.integers(0, 128256, int(t), dtype=np.int32) for t in text]
    with write_token_file(path, None, num_codebooks=CODEBOOKS) as out:
        out.write_split("train", audio, txt)


def memory_table(path: Path) -> str:
    ds = CSMDataset(path, "train")
    items = [ds[i] for i in range(len(ds))]
    tokens = sum(a.numel() + t.numel() for a, t in items)
    # The original kept two int64 tensors per example; count their data only (a lower bound).
    original = sum(a.numel() * 8 + t.numel() * 8 for a, t in items)
    return ("| dataset storage | bytes per stored token |\n|---|---|\n"
            f"| list of int64 tensors (original; data only) | {original / tokens:.2f} |\n"
            f"| flat int16 codes + int32 text + offsets (this) | {ds.nbytes() / tokens:.2f} |")


def throughput_table(path: Path, max_tokens: int, seconds: float) -> str:
    rows = []
    for partial in (False, True):
        for workers in (0, 2):
            loader = make_loader(CSMDataset(path, "train", partial=partial), max_tokens=max_tokens, seed=0,
                                 num_workers=workers, pin_memory=False)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                for _ in loader:
                    n += 1
                    if time.perf_counter() - start >= seconds:
                        break
            rate = n / (time.perf_counter() - start)
            rows.append(f"| {'partial (lazy HDF5)' if partial else 'in memory'} | {workers} | {rate:.0f} |")
    return (f"| loading mode (max_tokens={max_tokens}) | workers | batches/s |\n|---|---|---|\n" + "\n".join(rows))


def overlap_table(path: Path, step_ms: float, batches: int) -> str:
    """Time per batch when each batch is followed by a step that leaves the host idle (a sleep: what the host
    does while a GPU computes), over `batches` batches from the start of an epoch (workers' start included)."""
    rows = []
    for max_tokens in (4096, 16384):
        for partial in (False, True):
            per_batch = {}
            for workers in (0, 2):
                loader = make_loader(CSMDataset(path, "train", partial=partial), max_tokens=max_tokens, seed=0,
                                     num_workers=workers, pin_memory=False)
                n, start = 0, time.perf_counter()
                for _ in loader:
                    time.sleep(step_ms / 1000)
                    n += 1
                    if n == batches:
                        break
                per_batch[workers] = (time.perf_counter() - start) / n * 1000
            exposed = {w: max(0.0, t - step_ms) for w, t in per_batch.items()}
            rows.append(f"| {max_tokens} | {'partial (lazy HDF5)' if partial else 'in memory'} | {per_batch[0]:.1f} "
                        f"({exposed[0]:.1f}) | {per_batch[2]:.1f} ({exposed[2]:.1f}) | "
                        f"{per_batch[0] / per_batch[2]:.2f}x |")
    return ("| max_tokens | loading mode | ms per batch, 0 workers (loading not hidden) | ms per batch, 2 workers "
            "(not hidden) | 2 workers vs 0 |\n|---|---|---|---|---|\n" + "\n".join(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=2000, help="examples in the generated file for parts 2-3")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_tokens", type=int, default=4096)
    p.add_argument("--seconds", type=float, default=3.0, help="time per throughput measurement")
    p.add_argument("--step_ms", type=float, default=50.0, help="the idle-host step of the overlap table")
    p.add_argument("--overlap_batches", type=int, default=150, help="batches per overlap measurement (from an epoch's "
                   "start: workers start once per epoch)")
    p.add_argument("--overlap_examples", type=int, default=20000, help="examples in the overlap table's file")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(batching_table(args.batch_size, args.max_tokens), end="\n\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reference.hdf5"
        write_reference_file(path, args.examples)
        print(memory_table(path), end="\n\n")
        print(throughput_table(path, args.max_tokens, args.seconds), end="\n\n")
        path = Path(tmp) / "large.hdf5"
        write_reference_file(path, args.overlap_examples)
        print(f"loading overlapped with a {args.step_ms:.0f} ms step that leaves the host idle (a GPU-bound step), "
              f"{args.overlap_batches} batches from an epoch's start:")
        print(overlap_table(path, args.step_ms, args.overlap_batches))


if __name__ == "__main__":
    main()
