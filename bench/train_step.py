"""Training-step throughput (and, on a GPU, peak memory) of the training loop's step on reference-length batches.

Every row runs the real `training.train_step` (loss, accumulation, clipping, optimizer) on batches
drawn by `dataloaders.make_loader` from a generated file with the reference length distribution.
The baseline is the first row of each table, measured in the same run.

CPU (default): a mid-size flavor; fixed batch_size=8 batches vs token-budget batches, and the
cost of activation checkpointing. Then full finetuning vs LoRA vs a frozen backbone, each in a fresh
process: trainable parameters, optimizer-state bytes, the process's peak memory (peak RSS on CPU,
peak allocated on a GPU) and frames/s.
GPU (when CUDA is available, or --device cuda): the 1B model (random init, no download) in fp32
vs bf16, and peak memory with activation checkpointing and 8-bit AdamW.

Usage: python bench/train_step.py [--steps 8] [--rounds 3] [--device auto] [--skip_1b]
"""
import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after the project's own modules
from csm.model import adapters  # noqa: E402
from csm.training import config  # noqa: E402
from csm.training import optim  # noqa: E402
from csm.training import training  # noqa: E402
from csm.training.ema import WeightEMA  # noqa: E402
from memory import LOW_MEMORY  # noqa: E402
from csm.system import runtime  # noqa: E402
from csm.model import weights  # noqa: E402
from csm.model.csm_model import ModelArgs  # noqa: E402
from dataloaders import CSMDataset, make_loader  # noqa: E402
from dataloader import write_reference_file  # noqa: E402


def measure(data: Path, device: torch.device, args: ModelArgs, steps: int, warmup: int = 1, embedding=None,
            **settings) -> dict:
    """Real (non-padding) frames per second over `steps` optimizer steps after `warmup` steps (allocation,
    kernel selection, compiling). `embedding` replaces the frame embedding (the before/after rows)."""
    cfg = config.make_config({"backbone_flavor": args.backbone_flavor,
                              "decoder_flavor": args.decoder_flavor, "text_vocab_size": args.text_vocab_size,
                              "learning_rate": 1e-4, "warmup_steps": 0, "wandb_mode": "disabled", **settings})
    torch.manual_seed(0)
    model = optim.cast_weights(adapters.apply_finetune_mode(weights.build_model(args, device=device), cfg),
                               cfg.weight_dtype)
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    model.set_compile(cfg.compile)
    model.train()
    precision = runtime.resolve_precision(cfg.precision, device)
    optimizer = optim.make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loader = make_loader(CSMDataset(data, "train"), max_tokens=cfg.max_tokens,
                         batch_size=None if cfg.max_tokens else cfg.batch_size, seed=0)
    batches = (batch for _ in iter(int, 1) for batch in loader)  # epoch after epoch
    rt = runtime.Runtime(device)
    generator = torch.Generator().manual_seed(0)
    loss_model = training.LossModule(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    from csm.training import loss

    kept, loss.embed_frames = loss.embed_frames, embedding or loss.embed_frames
    try:
        ema = WeightEMA(model, cfg.ema_decay, cfg.ema_start) if cfg.ema_decay else None
        frames, elapsed = _timed_steps(loss_model, batches, cfg, rt, precision, optimizer, scaler, generator, args,
                                       device, steps, warmup, ema)
    finally:
        loss.embed_frames = kept
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    optimizer_bytes = optim.optimizer_state_bytes(optimizer)
    result = {"frames_per_s": frames / elapsed, "peak_gb": peak, "precision": precision,
              "trainable": adapters.count_trainable(model), "params": sum(p.numel() for p in model.parameters()),
              "optimizer_bytes": optimizer_bytes}
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _timed_steps(loss_model, batches, cfg, rt, precision, optimizer, scaler, generator, args, device, steps: int,
                 warmup: int, ema=None) -> tuple[int, float]:
    frames, elapsed = 0, 0.0
    for i in range(steps + warmup):
        micro = [next(batches) for _ in range(cfg.grad_acc_steps)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        stats = training.train_step(loss_model, micro, cfg, rt, precision, optimizer, scaler, generator,
                                 args.audio_num_codebooks)
        if ema is not None:  # as the loop does after every optimizer step
            ema.update(i + 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            elapsed += time.perf_counter() - t0
            frames += stats["frames"]
    return frames, elapsed


def _measure_fresh(*args, **kwargs) -> dict:
    """measure() in a process of its own: peak memory then belongs to this configuration alone."""
    torch.set_num_threads(kwargs.pop("threads"))
    result = measure(*args, **kwargs)
    if result["peak_gb"] != result["peak_gb"]:  # NaN: on CPU, the process's peak resident memory
        result["peak_gb"] = runtime.peak_memory_bytes(torch.device("cpu")) / 2**30
    return result


def measure_fresh(*args, **kwargs) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure_fresh, *args, threads=torch.get_num_threads(), **kwargs).result()


def modes_table(title: str, rows: list[tuple[str, dict]]) -> str:
    base = rows[0][1]
    lines = [f"| {title} | trainable parameters | optimizer state | peak memory | real frames/s | vs first row |",
             "|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['trainable'] / 1e6:.2f}M of {r['params'] / 1e6:.1f}M | "
                     f"{r['optimizer_bytes'] / 2**20:.0f} MiB | {r['peak_gb']:.2f} GiB | {r['frames_per_s']:.0f} | "
                     f"{r['frames_per_s'] / base['frames_per_s']:.2f}x |")
    return "\n".join(lines)


def _median(results: list[dict]) -> dict:
    """The round with the median speed, and the range of speeds over all rounds."""
    ordered = sorted(results, key=lambda r: r["frames_per_s"])
    speeds = [r["frames_per_s"] for r in ordered]
    return {**ordered[len(ordered) // 2], "range": (speeds[0], speeds[-1]) if len(speeds) > 1 else None}


def table(title: str, rows: list[tuple[str, dict]], memory: bool) -> str:
    base = rows[0][1]["frames_per_s"]
    ranged = any(r.get("range") for _, r in rows)
    head = (f"| {title} | real frames/s | vs first row |" + (" range over rounds |" if ranged else "")
            + (" peak GPU memory |" if memory else ""))
    lines = [head, "|---|---|---|" + ("---|" if ranged else "") + ("---|" if memory else "")]
    for name, r in rows:
        line = f"| {name} | {r['frames_per_s']:.0f} | {r['frames_per_s'] / base:.2f}x |"
        if ranged:
            line += f" {r['range'][0]:.0f}-{r['range'][1]:.0f} |"
        lines.append(line + (f" {r['peak_gb']:.1f} GiB |" if memory else ""))
    return "\n".join(lines)


def state_memory_table(args: ModelArgs) -> str:
    """Weights, gradients and optimizer states of CSM-1B per finetune mode, counted from the parameters of the
    real model (built on the meta device): exact for those tensors; activations come on top."""
    from csm.model.csm_model import CSM

    gib = 2**30
    rows = []
    for name, kw, state_bytes in (("full, AdamW", {}, 8), ("full, 8-bit AdamW", {"optimizer": "adamw8bit"}, 2),
                                  ("LoRA r=16 (default targets), AdamW", {"finetune": "lora"}, 8),
                                  ("full, backbone frozen, AdamW", {"freeze": ["backbone"]}, 8)):
        cfg = config.make_config({"wandb_mode": "disabled", **kw})
        with torch.device("meta"):
            model = adapters.apply_finetune_mode(CSM(args), cfg)
        total = sum(p.numel() for p in model.parameters())
        trained = adapters.count_trainable(model)
        weights_b, grads_b, opt_b = 4 * total, 4 * trained, state_bytes * trained
        rows.append(f"| {name} | {trained / 1e6:.1f}M | {weights_b / gib:.2f} | "
                    f"{grads_b / gib:.2f} | {opt_b / gib:.2f} | "
                    f"{(weights_b + grads_b + opt_b) / gib:.2f} |")
    head = ("| CSM-1B, fp32 weights (bf16 autocast) | trained parameters | weights GiB | gradients GiB | "
            "optimizer states GiB | total GiB |\n|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def step_flops(args: ModelArgs, batch: int = 16, length: int = 256, decoder_fraction: float = 1 / 16) -> int:
    """FLOPs of one training step's forward and backward on `batch` x `length` audio frames, counted by
    torch.utils.flop_counter on the meta device (nothing is computed; matmuls and attention are counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from csm.model.csm_model import CSM
    from csm.training.loss import compute_loss, plan_targets

    meta = torch.device("meta")
    with meta:
        model = CSM(args)
    k = args.audio_num_codebooks
    mask = torch.zeros(batch, length, k + 1, dtype=torch.bool)
    mask[..., :k] = True
    plan = plan_targets(mask, None, decoder_fraction, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        terms = compute_loss(model, torch.zeros(batch, length, k + 1, dtype=torch.long, device=meta), mask.to(meta),
                             plan=plan.to(meta))
        (terms.c0_sum + terms.decoder_sum).backward()
    return counter.get_total_flops()


def predicted_peak_gib(mode: str, optimizer: str, checkpointing: bool, frames: int) -> float:
    """bench/memory.py's planning figure for this configuration (state + activations + the largest transient; no
    overhead, and no CUDA context, which the allocator's peak it is compared with leaves out too), from the
    memory guide's table (docs/training.md), which that script wrote (measuring again takes a minute of CPU)."""
    import memory

    label = next(label for m, o, label in memory.ROWS if (m, o) == (mode, optimizer))
    guide = memory.read_guide((ROOT / "docs" / "training.md").read_text())
    state, per_frame, fixed, transient = guide[label + (", checkpointing" if checkpointing else "")]
    return memory.peak_bytes(state, per_frame, fixed, transient, frames, context=False) / 2**30


LOW_MEMORY_RUN = "1B, bf16 weights + stochastic rounding, 8-bit states, step in backward, checkpointing"
BIG_RUNS = [("1B, fp32, AdamW", {"precision": "fp32"}),
            ("1B, bf16, fused AdamW", {"precision": "bf16"}),
            ("1B, bf16, activation checkpointing", {"precision": "bf16", "activation_checkpointing": True}),
            ("1B, bf16, 8-bit AdamW", {"precision": "bf16", "optimizer": "adamw8bit"}),
            ("1B, bf16, checkpointing + 8-bit AdamW",
             {"precision": "bf16", "activation_checkpointing": True, "optimizer": "adamw8bit"}),
            ("1B, bf16, compile: true (after 3 warm-up steps)", {"precision": "bf16", "compile": True, "warmup": 3}),
            ("1B, bf16, grad_acc_steps=4", {"precision": "bf16", "grad_acc_steps": 4}),
            ("1B, bf16, previous frame embedding", {"precision": "bf16", "embedding": "previous"}),
            ("1B, bf16, LoRA", {"precision": "bf16", "finetune": "lora"}),
            # configs/finetune_12gb.yaml's recipe
            (LOW_MEMORY_RUN, {**LOW_MEMORY, "activation_checkpointing": True})]
DENSE_BF16 = {"h100 pcie": 756e12, "h100": 989e12, "h200": 989e12, "a100": 312e12}  # peak FLOP/s, vendor figures


def big_model_report(data: Path, device: torch.device, big: ModelArgs, steps: int, previous_embedding,
                     runs=BIG_RUNS, predict=None) -> str:
    """The GPU tables: step speed and peak memory per configuration, MFU, and the measured peak beside
    bench/memory.py's prediction (`predict(mode, optimizer, checkpointing, frames)` -> GiB)."""
    predict = predict or predicted_peak_gib
    rows = []
    for name, kw in runs:
        kw = {**kw, "embedding": previous_embedding} if kw.get("embedding") == "previous" else kw
        rows.append((name, measure(data, device, big, steps, max_tokens=4096, **kw)))
    lines = [table("training step, CSM-1B, max_tokens=4096", rows, memory=True), ""]
    per_frame = step_flops(big) / 4096
    gpu = torch.cuda.get_device_name(device).lower() if device.type == "cuda" else device.type
    dense = next((v for k, v in DENSE_BF16.items() if k in gpu), None)
    lines += [f"{name}: MFU {r['frames_per_s'] * per_frame / dense:.1%}" for name, r in rows
              if dense and r["precision"] == "bf16"]
    lines += ["", "| CSM-1B, bf16, max_tokens=4096 | predicted (bench/memory.py) GiB | measured peak GiB |",
              "|---|---|---|"]
    for name, r in rows:
        if r["precision"] == "bf16":
            optimizer = "low_memory" if name == LOW_MEMORY_RUN else "adamw8bit" if "8-bit" in name else "adamw"
            predicted = predict("lora" if "LoRA" in name else "full", optimizer, "checkpointing" in name, 4096)
            lines.append(f"| {name} | {predicted:.1f} | {r['peak_gb']:.1f} |")
    return "\n".join(lines)


def only_rows(specs: list[tuple], patterns: list[str]) -> list[tuple]:
    """The rows (name first) whose name matches one of `patterns` (regular expressions), in their order."""
    kept = [spec for spec in specs if any(re.search(pattern, spec[0]) for pattern in patterns)]
    if not kept:
        raise SystemExit(f"--only {' '.join(patterns)} matches no row")
    return kept


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--examples", type=int, default=600)
    p.add_argument("--skip_1b", action="store_true", help="on a GPU, skip the 1B rows")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the mid-flavor rows (median reported)")
    p.add_argument("--only", nargs="+", metavar="REGEX",
                   help="only the mid-flavor rows whose name matches one of these (the first row kept is the baseline "
                        "of the ratios), and none of the other tables: e.g. --only '4096$' ema_decay")
    args = p.parse_args(argv)
    device = runtime.resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "reference.hdf5"
        write_reference_file(data, args.examples)
        mid = ModelArgs(backbone_flavor="llama-mid", decoder_flavor="llama-mid-decoder")
        common = {"precision": "fp32"}
        from memory import previous_frame_embedding

        budget = dict(max_tokens=4096, **common)
        specs = [
            ("mid flavor, fp32, batch_size=8 (original batching)", args.steps, dict(batch_size=8, **common)),
            ("mid flavor, fp32, max_tokens=4096", args.steps, budget),
            ("mid flavor, fp32, max_tokens=4096, activation checkpointing", args.steps,
             dict(activation_checkpointing=True, **budget)),
            ("mid flavor, fp32, max_tokens=4096, previous frame embedding (concatenate, then mask)", args.steps,
             dict(embedding=previous_frame_embedding, **budget)),
            ("mid flavor, fp32, max_tokens=4096, grad_acc_steps=4", max(1, args.steps // 4),
             dict(grad_acc_steps=4, **budget)),
            ("mid flavor, fp32, max_tokens=4096, compile: true (after 3 warm-up steps)", args.steps,
             dict(warmup=3, compile=True, **budget)),
            ("mid flavor, fp32, max_tokens=4096, ema_decay=0.999 (the average updated after every step)", args.steps,
             dict(ema_decay=0.999, **budget)),
        ]
        if args.only:
            specs = only_rows(specs, args.only)
        # Round after round over all rows: the machine's speed drifts over minutes, and a row measured in
        # every round sees the same drift as its baseline. The median of the rounds is reported.
        runs = {name: [] for name, _, _ in specs}
        for _ in range(args.rounds):
            for name, steps, kw in specs:
                runs[name].append(measure(data, device, mid, steps, **kw))
        rows = [(name, _median(results)) for name, results in runs.items()]
        print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                     f" ({torch.get_num_threads()} threads)"))
        print(table("training step (mid flavor)", rows, memory=device.type == "cuda"), end="\n\n")
        if args.only:
            return
        modes = [("full finetuning", {}),
                 ("LoRA r=16 on q/k/v/o and MLP (backbone and decoder)", {"finetune": "lora"}),
                 ("full, backbone frozen", {"freeze": ["backbone"]}),
                 ("full, backbone and text embeddings frozen", {"freeze": ["backbone", "text_embeddings"]})]
        rows = [(name, measure_fresh(data, device, mid, args.steps, max_tokens=4096, **common, **kw))
                for name, kw in modes]
        print(modes_table(f"finetune mode (mid flavor, fp32, max_tokens=4096, {device.type})", rows), end="\n\n")
        print(state_memory_table(ModelArgs()), end="\n\n")
        if device.type == "cuda" and not args.skip_1b:
            print(big_model_report(data, device, ModelArgs(), args.steps, previous_frame_embedding))
        flops = step_flops(ModelArgs())
        print(f"\nCSM-1B training step, 16 x 256 audio frames, decoder_fraction 1/16: {flops:.3g} FLOPs forward + "
              f"backward (torch.utils.flop_counter), {flops / 4096:.3g} per frame. "
              "MFU = real frames/s x FLOPs per frame / the GPU's dense bf16 peak FLOP/s.")


if __name__ == "__main__":
    main()
