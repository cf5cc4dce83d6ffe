"""Training-step throughput (and, on a GPU, peak memory) of the training loop's step on reference-length batches.

Every row runs the real `training.train_step` (loss, accumulation, clipping, optimizer) on batches
drawn by `dataloaders.make_loader` from a generated file with the reference length distribution.
The baseline is the first row of each table, measured in the same run.

CPU (default): a mid-size flavor; fixed batch_size=8 batches vs token-budget batches, and the
cost of activation checkpointing.
GPU (when CUDA is available, or --device cuda): the 1B model (random init, no download) in fp32
vs bf16, and peak memory with activation checkpointing and 8-bit AdamW.

Usage: python bench/train_step.py [--steps 8] [--device auto] [--skip_1b]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import config  # noqa: E402
import optim  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
import weights  # noqa: E402
from csm_model import ModelArgs  # noqa: E402
from dataloaders import CSMDataset, make_loader  # noqa: E402
from dataloader import write_reference_file  # noqa: E402


def measure(data: Path, device: torch.device, args: ModelArgs, steps: int, **settings) -> dict:
    """Real (non-padding) frames per second over `steps` optimizer steps after one warm-up step."""
    cfg = config.make_config({"train_from_scratch": True, "backbone_flavor": args.backbone_flavor,
                              "decoder_flavor": args.decoder_flavor, "text_vocab_size": args.text_vocab_size,
                              "learning_rate": 1e-4, "warmup_steps": 0, "wandb_mode": "disabled", **settings})
    torch.manual_seed(0)
    model = weights.build_model(args, device=device)
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    model.train()
    precision = utils.resolve_precision(cfg.precision, device)
    optimizer = optim.make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loader = make_loader(CSMDataset(data, "train"), max_tokens=cfg.max_tokens,
                         batch_size=None if cfg.max_tokens else cfg.batch_size, seed=0)
    batches = iter(loader)
    rt = utils.Runtime(device)
    generator = torch.Generator().manual_seed(0)
    loss_model = training.LossModule(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    frames, elapsed = 0, 0.0
    for i in range(steps + 1):
        micro = [next(batches) for _ in range(cfg.grad_acc_steps)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        stats = training.train_step(loss_model, micro, cfg, rt, precision, optimizer, scaler, generator,
                                 args.audio_num_codebooks)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:  # the first step pays for allocation and kernel selection
            elapsed += time.perf_counter() - t0
            frames += stats["frames"]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"frames_per_s": frames / elapsed, "peak_gb": peak, "precision": precision}


def table(title: str, rows: list[tuple[str, dict]], memory: bool) -> str:
    base = rows[0][1]["frames_per_s"]
    head = f"| {title} | real frames/s | vs first row |" + (" peak GPU memory |" if memory else "")
    sep = "|---|---|---|" + ("---|" if memory else "")
    lines = [head, sep]
    for name, r in rows:
        line = f"| {name} | {r['frames_per_s']:.0f} | {r['frames_per_s'] / base:.2f}x |"
        lines.append(line + (f" {r['peak_gb']:.1f} GiB |" if memory else ""))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--examples", type=int, default=600)
    p.add_argument("--skip_1b", action="store_true", help="on a GPU, skip the 1B rows")
    args = p.parse_args()
    device = utils.resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "reference.hdf5"
        write_reference_file(data, args.examples)
        mid = ModelArgs(backbone_flavor="llama-mid", decoder_flavor="llama-mid-decoder")
        common = {"precision": "fp32"}
        rows = [
            ("mid flavor, fp32, batch_size=8 (original batching)", measure(data, device, mid, args.steps, batch_size=8, **common)),
            ("mid flavor, fp32, max_tokens=4096", measure(data, device, mid, args.steps, max_tokens=4096, **common)),
            ("mid flavor, fp32, max_tokens=4096, activation checkpointing",
             measure(data, device, mid, args.steps, max_tokens=4096, activation_checkpointing=True, **common)),
        ]
        print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                     f" ({torch.get_num_threads()} threads)"))
        print(table("training step (mid flavor)", rows, memory=device.type == "cuda"), end="\n\n")
        if device.type == "cuda" and not args.skip_1b:
            big = ModelArgs()
            runs = [("1B, fp32, AdamW", {"precision": "fp32"}),
                    ("1B, bf16, fused AdamW", {"precision": "bf16"}),
                    ("1B, bf16, activation checkpointing", {"precision": "bf16", "activation_checkpointing": True}),
                    ("1B, bf16, 8-bit AdamW", {"precision": "bf16", "optimizer": "adamw8bit"}),
                    ("1B, bf16, checkpointing + 8-bit AdamW",
                     {"precision": "bf16", "activation_checkpointing": True, "optimizer": "adamw8bit"})]
            rows = [(name, measure(data, device, big, args.steps, max_tokens=4096, **kw)) for name, kw in runs]
            print(table("training step, CSM-1B, max_tokens=4096", rows, memory=True))


if __name__ == "__main__":
    main()
