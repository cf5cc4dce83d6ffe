"""The DPO step's cost against an SFT step on the same frames: real frames/s and the process's peak memory.

A preference file of random pairs (candidates of the reference length distribution, `bench/lengths.py`, capped
at --max_frames) and a token file holding the same sequences as examples (each pair's chosen and rejected
candidate, with their text) are trained on by the real `training.train_step`, each configuration in a fresh
process (peak resident memory on CPU, peak allocated on a GPU): SFT with 4 examples a micro-batch, DPO with 2
pairs (the same 4 sequences). The baseline is the first row, measured in the same run.

CPU (default): the mid-size flavor in fp32. --size 1b --device cuda: CSM-1B in bf16 with LoRA (random weights,
no download), the GPU row of docs/benchmarks.md.

Usage: python bench/bench_dpo.py [--steps 6] [--pairs 48] [--max_frames 150] [--size mid|1b|tiny] [--device auto]
"""
import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after the project's own modules
from csm.model import adapters  # noqa: E402
from csm.training import config  # noqa: E402
from csm.training import optim  # noqa: E402
from csm.system import runtime  # noqa: E402
from csm.training import training  # noqa: E402
from csm.model import weights  # noqa: E402
from csm.model.csm_model import ModelArgs  # noqa: E402
from dataloaders import CSMDataset, make_loader  # noqa: E402
from csm.training.dpo import candidate_logps, collate_pairs, PairDataset  # noqa: E402
from lengths import sample_lengths  # noqa: E402
from csm.data.preference_file import Candidate, Pair, write_preference_file  # noqa: E402
from csm.data.token_file import write_token_file  # noqa: E402

SIZES = {"mid": ModelArgs(backbone_flavor="llama-mid", decoder_flavor="llama-mid-decoder"), "1b": ModelArgs(),
         "tiny": ModelArgs(backbone_flavor="llama-tiny", decoder_flavor="llama-tiny-decoder")}  # tiny: the tests


def write_data(directory: Path, args: ModelArgs, n_pairs: int, max_frames: int, device: torch.device):
    """(preference file, token file) of the same sequences; the reference is a random model of `args`."""
    k = args.audio_num_codebooks
    frames, text, _ = sample_lengths(2 * n_pairs, seed=2)
    frames = np.minimum(frames, max_frames)
    rng = np.random.default_rng(0)
    empty = np.zeros(0, np.float32)
    pairs = []
    for i in range(n_pairs):
        ids = np.concatenate([[0], rng.integers(2, 128_000, int(text[i]) - 2), [1]])
        chosen, rejected = (Candidate(rng.integers(0, 2048, (k, int(f))), stopped, reward, empty, empty)
                            for f, stopped, reward in ((frames[2 * i], True, 1.0), (frames[2 * i + 1], False, 0.0)))
        pairs.append(Pair(i, 0, ids, [], chosen, rejected))
    torch.manual_seed(0)
    reference = weights.build_model(args, device=device)
    for start in range(0, n_pairs, 4):
        batch = pairs[start:start + 4]
        for c, (c0, decoder) in zip([p.chosen for p in batch] + [p.rejected for p in batch],
                                    candidate_logps(reference, batch, k)):
            c.ref_c0, c.ref_decoder = c0, decoder
    prefs, tokens = directory / "prefs.hdf5", directory / "tokens.hdf5"
    with write_preference_file(prefs, {"codebooks": k}) as add:
        add("train", pairs)
    examples = [(p.text, c.codes) for p in pairs for c in (p.chosen, p.rejected)]
    with write_token_file(tokens, {"codebooks": k}, num_codebooks=k) as out:
        out.write_split("train", [c.reshape(-1).astype(np.int16) for _, c in examples],
                        [t.astype(np.int32) for t, _ in examples])
    return prefs, tokens


def measure(data: Path, args: ModelArgs, device: torch.device, steps: int, settings: dict) -> dict:
    """Real frames/s of `steps` training steps after one warm-up step, and the peak memory."""
    from train_step import _timed_steps

    cfg = config.make_config({"backbone_flavor": args.backbone_flavor, "decoder_flavor": args.decoder_flavor,
                              "learning_rate": 1e-5, "warmup_steps": 0, "wandb_mode": "disabled", **settings})
    torch.manual_seed(0)
    model = adapters.apply_finetune_mode(weights.build_model(args, device=device), cfg).train()
    precision = runtime.resolve_precision(cfg.precision, device)
    if cfg.objective == "dpo":
        dataset = PairDataset(data, "train")
        loader = make_loader(dataset, batch_size=cfg.batch_size, seed=0,
                             collate_fn=lambda pairs: collate_pairs(pairs, dataset.num_codebooks))
    else:
        loader = make_loader(CSMDataset(data, "train"), batch_size=cfg.batch_size, seed=0)
    batches = (batch for _ in iter(int, 1) for batch in loader)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    frames, elapsed = _timed_steps(training.LossModule(model), batches, cfg, runtime.Runtime(device), precision,
                                   optim.make_optimizer(model, cfg, device),
                                   torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                                   torch.Generator().manual_seed(0), args, device, steps, 1)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else runtime.peak_memory_bytes(device))
    return {"frames_per_s": frames / elapsed, "peak_gib": peak / 2**30}


def _fresh(*args, threads: int) -> dict:
    torch.set_num_threads(threads)
    return measure(*args)


def measure_fresh(*args) -> dict:
    """measure() in a process of its own, so that its peak memory is this configuration's alone."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_fresh, *args, threads=torch.get_num_threads()).result()


# name, which file, settings (beside the size's own); the first row is the baseline
ROWS = [("SFT, decoder on 1/16 of the frames (the default)", "tokens", {"batch_size": 4}),
        ("SFT, decoder on every frame", "tokens", {"batch_size": 4, "decoder_fraction": 1.0}),
        ("DPO, decoder on every frame (the default)", "prefs", {"objective": "dpo", "batch_size": 2}),
        ("DPO, dpo_decoder_fraction 1/16", "prefs", {"objective": "dpo", "batch_size": 2,
                                                     "dpo_decoder_fraction": 1 / 16}),
        ("DPO + dpo_sft_weight 0.1", "prefs", {"objective": "dpo", "batch_size": 2, "dpo_sft_weight": 0.1})]
SIZE_SETTINGS = {"mid": {"precision": "fp32"}, "tiny": {"precision": "fp32"},
                 "1b": {"precision": "bf16", "finetune": "lora"}}


def report(size: str, device: torch.device, *, steps: int, pairs: int, max_frames: int, fresh: bool = True,
           names: list[str] | None = None) -> tuple[str, list[tuple[str, dict]]]:
    """The table of the rows named (all by default), each in a fresh process unless not `fresh`; and the results."""
    model_args = SIZES[size]
    run = measure_fresh if fresh else measure
    with tempfile.TemporaryDirectory() as tmp:
        files = dict(zip(("prefs", "tokens"), write_data(Path(tmp), model_args, pairs, max_frames, device)))
        results = [(name, run(files[which], model_args, device, steps, {**SIZE_SETTINGS[size], **settings}))
                   for name, which, settings in ROWS if names is None or name in names]
    base = results[0][1]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"{size} flavor, {where}; {', '.join(f'{k} {v}' for k, v in SIZE_SETTINGS[size].items())}; "
             f"micro-batches of 4 sequences (2 pairs), candidates capped at {max_frames} frames", "",
             "| step | real frames/s | vs first row | peak memory | vs first row |", "|---|---|---|---|---|"]
    for name, r in results:
        lines.append(f"| {name} | {r['frames_per_s']:.0f} | {r['frames_per_s'] / base['frames_per_s']:.2f}x | "
                     f"{r['peak_gib']:.2f} GiB | {r['peak_gib'] / base['peak_gib']:.2f}x |")
    return "\n".join(lines), results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--pairs", type=int, default=48)
    p.add_argument("--max_frames", type=int, default=150, help="longest candidate, in frames (12 s)")
    p.add_argument("--size", choices=tuple(SIZES), default="mid")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    text, _ = report(args.size, runtime.resolve_device(args.device), steps=args.steps, pairs=args.pairs,
                     max_frames=args.max_frames)
    print(text)


if __name__ == "__main__":
    main()
