"""Batching and dataset benchmark on the reference length distribution (bench/lengths.py).

1. Padding waste and padded-tokens-per-batch spread: fixed batch size (the original) vs token budget,
   and token budget on examples composed with same_speaker context (1 and 2 turns, 20 speakers).
2. Dataset memory a process holds per stored token: a list of int64 tensors (the original), format 1 read into
   flat int16 buffers, format 2 mapped from the file.
3. Batches/s of each loading mode (format 1 in memory, format 1 row by row, format 2 mapped) with 0 and 2 workers.
4. Loading overlapped with compute: time per batch when each batch is followed by a step that leaves the host
   idle (a sleep, as the host waits on a GPU), with 0 and 2 workers.
5. At scale: a format-2 token file of 200,000 utterances (about 280 hours) and one of 2,000,000 (made here,
   deleted after), read by 2 ranks with 2 loader workers each: the time to open it, the private memory each
   process adds (beyond the file's shared pages) and the time to assemble an 8192-token batch.

Usage: python bench/dataloader.py [--examples 2000] [--scale 200000 2000000]
Prints markdown tables for docs/benchmarks.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # after the project's own modules
from csm.data.context import ContextPlanner  # noqa: E402
from csm.data.token_file import write_token_file  # noqa: E402
from dataloaders import collate, CSMDataset, LengthBucketSampler, make_loader  # noqa: E402
from lengths import padding_waste, sample_lengths  # noqa: E402

CODEBOOKS = 32
SCALE_BATCH_TOKENS = 8192
SCALE_BATCHES = 100  # batches each rank loads (through its workers) before its memory is read


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


def write_reference_file(path: Path, n: int, version: int = 2, block: int = 20000) -> Path:
    """A token file of n random examples with the reference lengths, written a block of rows at a time (a file of
    millions of rows never sits in memory), with the per-row columns pretokenize.py writes. `version=1` writes
    the original tool's layout (no attributes)."""
    frames, text, _ = sample_lengths(n, seed=1)
    rng = np.random.default_rng(0)
    attrs = {"codebooks": CODEBOOKS} if version == 2 else None
    with write_token_file(path, attrs, num_codebooks=CODEBOOKS, version=version) as out:
        turns = version == 2
        split = out.split("train", n, codes=int(frames.sum()) * CODEBOOKS, text_ids=int(text.sum()),
                          source_rows=turns, turns=turns)
        for start in range(0, n, block):
            f, t = frames[start:start + block], text[start:start + block]
            codes = rng.integers(0, 2048, int(f.sum()) * CODEBOOKS, dtype=np.int16)
            ids = rng.integers(0, 128256, int(t.sum()), dtype=np.int32)
            audio = np.split(codes, np.cumsum(f * CODEBOOKS)[:-1])
            txt = np.split(ids, np.cumsum(t)[:-1])
            m = len(f)
            rows = np.arange(start, start + m)
            split.write(start, audio, txt, rows if turns else None,
                        turns=([f"c{i // 4}" for i in rows], (rows % 4).astype(np.float64),
                               (rows % 50).astype(np.int32)) if turns else None)
    return path


# --------------------------------------------------------------------------- memory of a process


def process_memory(pid: int, mapped: str | os.PathLike | None = None) -> dict:
    """A process's memory from /proc/PID/smaps, in bytes: `uss` (pages no other process maps), `anonymous`
    (memory not backed by a file) and, for the file `mapped`, the pages of it the process maps (`file_rss`) and
    how many of those it shares with another process (`file_shared`)."""
    found = {"uss": 0, "anonymous": 0, "file_rss": 0, "file_shared": 0}
    target = os.path.realpath(mapped) if mapped is not None else None
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head, _, rest = line.partition(":")
            if "-" in head and " " in line and not rest.strip().endswith("kB"):
                parts = line.split()
                inside = target is not None and len(parts) >= 6 and os.path.realpath(" ".join(parts[5:])) == target
                continue
            value = rest.split()
            if not value or value[-1] != "kB":
                continue
            size = int(value[0]) * 1024
            if head in ("Private_Clean", "Private_Dirty"):
                found["uss"] += size
            elif head == "Anonymous":
                found["anonymous"] += size
            if inside and head == "Rss":
                found["file_rss"] += size
            elif inside and head in ("Shared_Clean", "Shared_Dirty"):
                found["file_shared"] += size
    found["beyond_file"] = found["uss"] - (found["file_rss"] - found["file_shared"])
    return found


def children(pid: int) -> list[int]:
    """The processes `pid` started (its DataLoader workers), from /proc."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def memory_table(path: Path, original_path: Path) -> str:
    rows = []
    for name, p in (("format 1, flat int16 codes + int32 text + offsets in memory", original_path),
                    ("format 2, mapped from the file (this)", path)):
        ds = CSMDataset(p, "train")
        items = [ds[i] for i in range(len(ds))]
        tokens = sum(a.numel() + t.numel() for a, t in items)
        if not rows:  # the original kept two int64 tensors per example; count their data only (a lower bound)
            original = sum(a.numel() * 8 + t.numel() * 8 for a, t in items)
            rows.append(f"| list of int64 tensors (original; data only) | {original / tokens:.2f} |")
        rows.append(f"| {name} | {ds.nbytes() / tokens:.2f} |")
    return "| dataset storage | bytes per stored token, per process |\n|---|---|\n" + "\n".join(rows)


MODES = (("format 1 in memory", "v1", False), ("format 1 row by row (partial)", "v1", True),
         ("format 2 mapped", "v2", False))


def throughput_table(paths: dict, max_tokens: int, seconds: float) -> str:
    rows = []
    for name, version, partial in MODES:
        for workers in (0, 2):
            loader = make_loader(CSMDataset(paths[version], "train", partial=partial), max_tokens=max_tokens, seed=0,
                                 num_workers=workers, pin_memory=False)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                for _ in loader:
                    n += 1
                    if time.perf_counter() - start >= seconds:
                        break
            rows.append(f"| {name} | {workers} | {n / (time.perf_counter() - start):.0f} |")
    return f"| loading mode (max_tokens={max_tokens}) | workers | batches/s |\n|---|---|---|\n" + "\n".join(rows)


def overlap_table(paths: dict, step_ms: float, batches: int) -> str:
    """Time per batch when each batch is followed by a step that leaves the host idle (a sleep: what the host
    does while a GPU computes), over `batches` batches from the start of an epoch (workers' start included)."""
    rows = []
    for max_tokens in (4096, 16384):
        for name, version, partial in MODES:
            per_batch = {}
            for workers in (0, 2):
                loader = make_loader(CSMDataset(paths[version], "train", partial=partial), max_tokens=max_tokens,
                                     seed=0, num_workers=workers, pin_memory=False)
                n, start = 0, time.perf_counter()
                for _ in loader:
                    time.sleep(step_ms / 1000)
                    n += 1
                    if n == batches:
                        break
                per_batch[workers] = (time.perf_counter() - start) / n * 1000
            exposed = {w: max(0.0, t - step_ms) for w, t in per_batch.items()}
            rows.append(f"| {max_tokens} | {name} | {per_batch[0]:.1f} ({exposed[0]:.1f}) | "
                        f"{per_batch[2]:.1f} ({exposed[2]:.1f}) | {per_batch[0] / per_batch[2]:.2f}x |")
    return ("| max_tokens | loading mode | ms per batch, 0 workers (loading not hidden) | ms per batch, 2 workers "
            "(not hidden) | 2 workers vs 0 |\n|---|---|---|---|---|\n" + "\n".join(rows))


# --------------------------------------------------------------------------- at scale: 2 ranks x 2 workers


def rank_process(path: str, rank: int, world_size: int, workers: int) -> dict:
    """What one rank of a run sees of a token file: the seconds to open it, the private memory it adds by loading
    SCALE_BATCHES batches itself, the time each of those batches took to assemble (SCALE_BATCH_TOKENS padded
    tokens), then the private memory each of `workers` loader workers holds after as many batches. The rank is
    measured before any worker starts: a fork shares the rank's pages with the worker, and /proc then counts
    them as shared, not private."""
    torch.set_num_threads(1)
    base = process_memory(os.getpid(), path)
    start = time.perf_counter()
    ds = CSMDataset(path, "train")
    opened = time.perf_counter() - start
    settings = dict(max_tokens=SCALE_BATCH_TOKENS, seed=0, rank=rank, world_size=world_size, pin_memory=False)
    loader = make_loader(ds, num_workers=0, **settings)
    assembly = []
    for batch in loader.sampler.rank_batches()[:SCALE_BATCHES]:
        start = time.perf_counter()
        collate([ds[i] for i in batch], num_codebooks=ds.num_codebooks)
        assembly.append(time.perf_counter() - start)
    rank_memory = process_memory(os.getpid(), path)
    it = iter(make_loader(ds, num_workers=workers, **settings))
    for _ in range(SCALE_BATCHES):
        next(it)
    worker_memory = [process_memory(pid, path) for pid in children(os.getpid())]
    del it
    return {"open_s": opened, "rank_added": rank_memory["beyond_file"] - base["beyond_file"],
            "worker_private": [w["beyond_file"] for w in worker_memory], "workers": len(worker_memory),
            "assembly_ms": statistics.median(assembly) * 1000}


def scale_row(path: Path, n: int, world_size: int = 2, workers: int = 2) -> str:
    """Launch `world_size` rank processes at once (as torchrun would) on one file and gather what each saw."""
    script = Path(__file__).resolve()
    procs = [subprocess.Popen([sys.executable, str(script), "--_rank", str(path), str(r), str(world_size),
                               str(workers)], stdout=subprocess.PIPE, text=True) for r in range(world_size)]
    seen = []
    for proc in procs:
        out, _ = proc.communicate(timeout=3600)
        if proc.returncode:
            raise SystemExit(f"a rank process failed (exit {proc.returncode})")
        seen.append(json.loads(out.strip().splitlines()[-1]))
    mib, hours = 1 << 20, sample_lengths(n, seed=1)[0].sum() / 12.5 / 3600  # the file's frames, 12.5 a second
    return (f"| {n:,} | {hours:,.0f} | {path.stat().st_size / (1 << 30):.2f} | "
            f"{max(s['open_s'] for s in seen):.2f} | {max(s['rank_added'] for s in seen) / mib:.0f} | "
            f"{max(max(s['worker_private']) for s in seen) / mib:.0f} ({sum(s['workers'] for s in seen)}) | "
            f"{max(s['assembly_ms'] for s in seen):.1f} |")


SCALE_HEAD = ("| utterances | hours | file GiB | open, s (slowest rank) | private MiB a rank adds | private MiB a "
              "loader worker holds (workers) | ms to assemble an 8192-token batch (median) |\n"
              "|---|---|---|---|---|---|---|")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_rank":
        path, rank, world, workers = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(rank_process(path, rank, world, workers)))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=2000, help="examples in the generated file for parts 2-3")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_tokens", type=int, default=4096)
    p.add_argument("--seconds", type=float, default=3.0, help="time per throughput measurement")
    p.add_argument("--step_ms", type=float, default=50.0, help="the idle-host step of the overlap table")
    p.add_argument("--overlap_batches", type=int, default=150, help="batches per overlap measurement (from an epoch's "
                   "start: workers start once per epoch)")
    p.add_argument("--overlap_examples", type=int, default=20000, help="examples in the overlap table's file")
    p.add_argument("--scale", type=int, nargs="*", default=[200_000, 2_000_000],
                   help="utterances of each at-scale file (each is made, measured, deleted)")
    p.add_argument("--dir", default=None, help="where the files are made (default: the temp folder; the largest "
                   "default file takes about 9 GiB)")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(batching_table(args.batch_size, args.max_tokens), end="\n\n")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        paths = {v: write_reference_file(Path(tmp) / f"reference_{v}.hdf5", args.examples, version=int(v[1]))
                 for v in ("v1", "v2")}
        print(memory_table(paths["v2"], paths["v1"]), end="\n\n")
        print(throughput_table(paths, args.max_tokens, args.seconds), end="\n\n")
        paths = {v: write_reference_file(Path(tmp) / f"large_{v}.hdf5", args.overlap_examples, version=int(v[1]))
                 for v in ("v1", "v2")}
        print(f"loading overlapped with a {args.step_ms:.0f} ms step that leaves the host idle (a GPU-bound step), "
              f"{args.overlap_batches} batches from an epoch's start:")
        print(overlap_table(paths, args.step_ms, args.overlap_batches), end="\n\n")
        for path in paths.values():
            path.unlink()
        rows = []
        for n in args.scale:
            path = write_reference_file(Path(tmp) / f"scale_{n}.hdf5", n)
            rows.append(scale_row(path, n))
            path.unlink()
        if rows:
            print(f"format 2 at scale: 2 ranks x 2 loader workers on one file ({SCALE_BATCHES} batches each before "
                  "memory is read; private memory is what a process holds beyond the file's pages in the page cache):")
            print(SCALE_HEAD + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
