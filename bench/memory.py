"""What a CSM-1B training step holds in memory, measured on the CPU, and the largest max_tokens per GPU size.

Activations: the tensors autograd saves for backward, recorded with saved-tensor hooks (each storage
counted once) during the real `compute_loss` forward, under bf16 autocast, at CSM-1B's real widths
(backbone llama-1B, decoder llama-100M, real vocabularies). Models with 1 and 2 layers in each stack give
the cost of one more layer, so no 16-layer model needs to run; each is measured at two batch lengths, so
the cost splits into a part per frame and a fixed part (the bf16 copies autocast makes of the weights).
With activation checkpointing, one backbone layer's activations are added: backward runs each layer
again and holds its activations while it does.
State: fp32 weights, gradients of what trains, and optimizer states (AdamW 8 bytes a trained parameter,
8-bit AdamW 2), counted from the real model's parameters. For the low-memory recipes (bf16 weights, torchao's
8-bit states, the step in backward) the optimizer's state is counted from the real optimizer's state tensors
after one step on a tensor of each parameter's shape (a table's rows cut to 4096 and its state scaled up by
the rows cut: quantized states are block-wise, so their size follows the number of values); the weights are
bf16, and of the gradients only the largest single one is held at a time. Their activations and transient are
measured on bf16 weights (no bf16 copies of the weights for autocast to make).
The largest transient: the frame embedding's fp32 [frames, K+1, dim] buffer (the gathered entries in forward, their
gradient in backward), measured as the peak resident memory of the embedding at CSM-1B's real tables, per frame.
With checkpointing it is of the size of all the saved activations, so it cannot be left out. It is added to them
as if both were held at once (in the step they are not: an upper bound).
The CUDA context (CUDA_CONTEXT_GIB) is an estimate: it cannot be measured without a GPU.

    python bench/memory.py [--update_page docs/training.md]
    python bench/memory.py --ema [--update_page docs/training.md]

The memory guide's table (docs/training.md) is this script's output (a test checks that they agree). The fit assumes
that memory is the CUDA context + state + activations + the transient (+ 10% for the allocator): a planning figure,
to be checked against `bench/train_step.py`'s measured peak on a GPU.
"""
import argparse
import functools
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from csm.model import adapters  # noqa: E402
from csm.training import config  # noqa: E402
from csm.model.csm_model import CSM, FLAVORS, ModelArgs  # noqa: E402
from csm.training.loss import compute_loss  # noqa: E402
from csm.training.optim import cast_weights  # noqa: E402

GIB = 2**30
GPU_SIZES_GB = (8, 12, 16, 24, 40, 80)
OVERHEAD = 1.10  # allocator fragmentation and short-lived buffers, on top of what is counted
CUDA_CONTEXT_GIB = 0.5  # an estimate (the driver's context and the kernels it loads): nothing here measures it
PAGE_MARKERS = ("<!-- memory:start -->", "<!-- memory:end -->")
MODES = {"full": {}, "lora": {"finetune": "lora"}, "frozen_text": {"freeze": ["text_embeddings"]}}
# The low-memory recipe: configs/finetune_12gb.yaml's keys that shrink the state (not its activation checkpointing,
# which the table varies, nor its batch and schedule).
LOW_MEMORY = {key: value for key, value in config.read_yaml(ROOT / "configs" / "finetune_12gb.yaml").items()
              if key in ("precision", "weight_dtype", "bf16_compensation", "optimizer_states", "optimizer_in_backward",
                         "max_grad_norm")}
RECIPES = {"adamw": {}, "adamw8bit": {"optimizer": "adamw8bit"}, "low_memory": LOW_MEMORY}
MEASURED_ROWS = 4096  # a table's rows are cut to this when its optimizer state is measured


def saved_bytes(model, frames: int, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward in one forward of `frames` audio frames (each storage once)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t):
        if t.device.type != "meta":
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    model.set_activation_checkpointing(checkpointing)
    model.train()
    k = model.config.audio_num_codebooks
    tokens = torch.randint(0, 2048, (1, frames, k + 1))
    mask = torch.ones(1, frames, k + 1, dtype=torch.bool)
    mask[:, :, k] = False  # audio frames: every one is a target
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        terms = compute_loss(model, tokens, mask, decoder_fraction=1 / 16, generator=torch.Generator().manual_seed(0))
    del terms
    return sum(seen.values())


def _measure(backbone_layers: int, decoder_layers: int, mode: str, short: int, long: int,
             weight_dtype: str = "fp32") -> dict:
    """Saved bytes at the two lengths, without and with checkpointing, of one model (built once)."""
    model = cast_weights(build(backbone_layers, decoder_layers, mode), weight_dtype)
    return {cp: [saved_bytes(model, n, cp) for n in (short, long)] for cp in (False, True)}


def build(backbone_layers: int, decoder_layers: int, mode: str) -> CSM:
    # A small text vocabulary: lookups save the same activations whatever the table's size, and the real
    # 128k-row table would only make each build 1 GB bigger (the state table counts the real one).
    args = ModelArgs(backbone=replace(FLAVORS["llama-1B"], num_layers=backbone_layers),
                     decoder=replace(FLAVORS["llama-100M"], num_layers=decoder_layers), text_vocab_size=4096)
    torch.manual_seed(0)
    model = CSM(args)
    return adapters.apply_finetune_mode(model, config.make_config({"wandb_mode": "disabled", **MODES[mode]}))


@functools.lru_cache(maxsize=None)
def measurements(mode: str, short: int, long: int, weight_dtype: str = "fp32") -> tuple[dict, dict, dict]:
    """The 1+1, 2+1 and 1+2 layer models, each in a process of its own (a 1B-wide model is over 1 GB;
    freed for sure when its process ends)."""
    def measure(b, d):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_measure, b, d, mode, short, long, weight_dtype).result()

    return measure(1, 1), measure(2, 1), measure(1, 2)


def activation_model(mode: str, checkpointing: bool, short: int, long: int,
                     weight_dtype: str = "fp32") -> tuple[float, float]:
    """(bytes per frame, fixed bytes) of CSM-1B's saved activations, from 1- and 2-layer models."""
    base, more_b, more_d = (m[checkpointing] for m in measurements(mode, short, long, weight_dtype))
    full = FLAVORS["llama-1B"].num_layers, FLAVORS["llama-100M"].num_layers
    at = [base[i] + (full[0] - 1) * (more_b[i] - base[i]) + (full[1] - 1) * (more_d[i] - base[i]) for i in range(2)]
    if checkpointing:
        # In backward, one backbone layer at a time is run again and its activations held: add one layer's
        # activations as measured without checkpointing.
        plain = measurements(mode, short, long, weight_dtype)
        at = [at[i] + plain[1][False][i] - plain[0][False][i] for i in range(2)]
    per_frame = (at[1] - at[0]) / (long - short)
    return per_frame, at[0] - per_frame * short


def csm1b(mode: str, recipe: str) -> CSM:
    """CSM-1B on the meta device (nothing allocated), its finetune mode applied and its weights in the recipe's
    dtype."""
    cfg = config.make_config({"wandb_mode": "disabled", **MODES[mode], **RECIPES[recipe]})
    with torch.device("meta"):
        return cast_weights(adapters.apply_finetune_mode(CSM(ModelArgs()), cfg), cfg.weight_dtype)


def state_bytes(mode: str, optimizer: str) -> float:
    """Weights, gradients and optimizer state of CSM-1B for a finetune mode and a recipe (RECIPES): counted from
    the parameters for AdamW and bitsandbytes' 8-bit AdamW, from the real optimizer's states for the low-memory
    recipe (`measured_state_bytes`)."""
    model = csm1b(mode, optimizer)
    total = sum(p.numel() for p in model.parameters())
    trained = adapters.count_trainable(model)
    if optimizer != "low_memory":
        return 4 * total + 4 * trained + (8 if optimizer == "adamw" else 2) * trained
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    largest_gradient = max(p.numel() * p.element_size() for p in params if p.requires_grad)
    return weights + largest_gradient + measured_state_bytes(mode, optimizer)


def measured_state_bytes(mode: str, recipe: str) -> float:
    """The optimizer state of CSM-1B's trained parameters, each counted from the real optimizer's state tensors
    after one step on a tensor of that parameter's shape and dtype (rows cut to MEASURED_ROWS, the state scaled up
    by the same factor); shapes repeat, so each is stepped once."""
    model = csm1b(mode, recipe)
    shapes: dict[tuple, int] = {}
    for p in model.parameters():
        if p.requires_grad:
            key = (tuple(p.shape), p.dtype, p.ndim >= 2)
            shapes[key] = shapes.get(key, 0) + 1
    return sum(count * _state_of_shape(recipe, *key) for key, count in shapes.items())


@functools.lru_cache(maxsize=None)
def _state_of_shape(recipe: str, shape: tuple, dtype: torch.dtype, decays: bool) -> float:
    from csm.training.optim import make_optimizer, optimizer_state_bytes

    rows = min(shape[0], MEASURED_ROWS)
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(torch.randn(rows, *shape[1:]).mul(0.02).to(dtype))
    cfg = config.make_config({"wandb_mode": "disabled", **RECIPES[recipe], "optimizer_in_backward": False,
                              "weight_decay": 0.002 if decays else 0.0})
    optimizer = make_optimizer(holder, cfg, torch.device("cpu"))
    holder.weight.grad = torch.randn_like(holder.weight).mul(1e-3)
    optimizer.step()
    return optimizer_state_bytes(optimizer) * shape[0] / rows


ROWS = (("full", "adamw", "full, AdamW"), ("full", "adamw8bit", "full, 8-bit AdamW"),
        ("lora", "adamw", "LoRA r=16, AdamW"),
        ("full", "low_memory", "full, bf16 + stochastic rounding, 8-bit states, step in backward"),
        ("frozen_text", "low_memory", "full, bf16 + stochastic rounding, 8-bit states, step in backward, text "
                                      "embeddings frozen"))
HEAD = ("| CSM-1B, bf16 autocast | state GiB | activations MiB/frame | fixed activations GiB | transient MiB/frame | "
        + " | ".join(f"max_tokens, "
                     f"{gb} GB" for gb in GPU_SIZES_GB) + " |\n|---|---|---|---|---|" + "---|" * len(GPU_SIZES_GB))


def row(mode: str, optimizer: str, label: str, checkpointing: bool, short: int, long: int) -> str:
    """One line of the table: the state, the activations and the largest max_tokens per GPU size."""
    state = state_bytes(mode, optimizer)
    weight_dtype = config.make_config({"wandb_mode": "disabled", **RECIPES[optimizer]}).weight_dtype
    per_frame, fixed = activation_model(mode, checkpointing, short, long, weight_dtype)
    transient = transient_per_frame(weight_dtype=weight_dtype, text_trains=mode != "frozen_text")
    fits = [max_tokens(gb * 1e9, state, per_frame, fixed, transient) for gb in GPU_SIZES_GB]
    fits = [f"{n:,}" if n else "does not fit" for n in fits]
    return (f"| {label}{', checkpointing' if checkpointing else ''} | {state / GIB:.1f} | "
            f"{per_frame / 2**20:.2f} | {fixed / GIB:.2f} | {transient / 2**20:.2f} | " + " | ".join(fits) + " |")


def peak_bytes(state: float, per_frame: float, fixed: float, transient: float, frames: int,
               context: bool = True) -> float:
    """The planning figure of a step's peak: state + activations + the largest transient (+ the CUDA context; a
    GPU's allocator statistics leave it out, so a comparison with them does too)."""
    return (CUDA_CONTEXT_GIB * GIB if context else 0) + state + fixed + (per_frame + transient) * frames


def max_tokens(gpu_bytes: float, state: float, per_frame: float, fixed: float, transient: float) -> int | None:
    """The largest max_tokens (a multiple of 256) whose peak_bytes, with the allocator's overhead, fit in
    `gpu_bytes`; None when not even 256 do."""
    room = gpu_bytes / OVERHEAD - peak_bytes(state, 0, fixed, 0, 0)
    frames = int(room / (per_frame + transient)) // 256 * 256 if room > 0 else 0
    return frames or None


EMA_MARKERS = ("<!-- memory-ema:start -->", "<!-- memory-ema:end -->")


def ema_table(page: str) -> str:
    """The guide's checkpointing rows (read from `page`) with a weight average (ema_decay) kept on the GPU: 4 bytes
    (fp32) a trained parameter added to the state, and the largest max_tokens again. With ema_on_cpu the GPU holds
    what the guide says, and the CPU the average."""
    guide = read_guide(page)
    lines = ["| CSM-1B, checkpointing, with ema_decay (the average on the GPU) | average GiB | state + average GiB | "
             + " | ".join(f"max_tokens, {gb} GB" for gb in GPU_SIZES_GB) + " |",
             "|---|---|---|" + "---|" * len(GPU_SIZES_GB)]
    for mode, recipe, label in ROWS:
        state, per_frame, fixed, transient = guide[label + ", checkpointing"]
        average = 4 * adapters.count_trainable(csm1b(mode, recipe))
        fits = [max_tokens(gb * 1e9, state + average, per_frame, fixed, transient) for gb in GPU_SIZES_GB]
        lines.append(f"| {label} | {average / GIB:.2f} | {(state + average) / GIB:.1f} | "
                     + " | ".join(f"{n:,}" if n else "does not fit" for n in fits) + " |")
    return "\n".join(lines)


def read_guide(readme: str) -> dict[str, tuple[float, float, float, float]]:
    """{row label: (state bytes, activation bytes per frame, fixed activation bytes, transient bytes per frame)} from
    the memory guide's table (docs/training.md), which this script wrote: the measured figures, for tools that cannot
    measure them again (doctor.py)."""
    start, end = PAGE_MARKERS
    if start not in readme or end not in readme:
        return {}
    rows = readme.split(start)[1].split(end)[0].strip().splitlines()[2:]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    return {c[0]: (float(c[1]) * GIB, float(c[2]) * 2**20, float(c[3]) * GIB, float(c[4]) * 2**20)
            for c in cells if len(c) >= 5}


@functools.lru_cache(maxsize=None)
def transient_per_frame(batch: int = 16, length: int = 256, weight_dtype: str = "fp32",
                        text_trains: bool = True) -> float:
    """Bytes per frame of the largest short-lived buffer of a step: the frame embedding's peak above what it
    starts with, in forward, or in backward less the tables' gradients (counted in the state), whichever is
    larger; measured at CSM-1B's real tables in the weights' dtype, in a process of its own."""
    args = ModelArgs()
    dim = FLAVORS[args.backbone_flavor].embed_dim
    size = 2 if weight_dtype == "bf16" else 4
    rows = args.text_vocab_size * text_trains + args.audio_vocab_size * args.audio_num_codebooks
    table_gradients = size * dim * rows
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        forward, backward = pool.submit(_embedding_peaks, "this", batch, length, weight_dtype, text_trains).result()
    return max(forward, backward - table_gradients) / (batch * length)


def official_frame_embedding(model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official embedding, written out: gather the audio and the text columns, concatenate, multiply by the
    mask out of place, sum. csm_model.embed_frames gives the same values (tests/model/test_model.py)."""
    text = model.text_embeddings(tokens[:, :, -1]).unsqueeze(-2)
    audio = model.audio_embeddings(tokens[:, :, :-1] + _offsets(model, tokens))
    return (torch.cat([audio, text], dim=-2) * mask.unsqueeze(-1)).sum(dim=2)


def _offsets(model, tokens: torch.Tensor) -> torch.Tensor:
    """Codebook i's rows in the audio table start at i x audio_vocab_size."""
    k = model.config.audio_num_codebooks
    return model.config.audio_vocab_size * torch.arange(k, device=tokens.device)


def previous_frame_embedding(model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """This project's version before the single gather: the gathered columns are freed once concatenated."""
    columns = torch.cat([model.audio_embeddings(tokens[:, :, :-1] + _offsets(model, tokens)),
                         model.text_embeddings(tokens[:, :, -1]).unsqueeze(-2)], dim=-2)
    return (columns * mask.unsqueeze(-1)).sum(dim=2)


def _resident() -> tuple[int, int]:
    """(peak, current) resident bytes of this process (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _embedding_peaks(variant: str, batch: int, length: int, weight_dtype: str = "fp32",
                     text_trains: bool = True) -> tuple[int, int]:
    """Peak resident bytes above the start of the frame embedding's forward, and of its backward (which
    allocates the tables' gradients), at CSM-1B's real tables and width, in the weights' dtype."""
    from types import SimpleNamespace

    from csm.model.csm_model import embed_frames

    args = ModelArgs()
    torch.manual_seed(0)
    k, dim = args.audio_num_codebooks, FLAVORS[args.backbone_flavor].embed_dim
    shell = SimpleNamespace(config=args, text_embeddings=torch.nn.Embedding(args.text_vocab_size, dim),
                            audio_embeddings=torch.nn.Embedding(args.audio_vocab_size * k, dim))
    shell._embed_tokens = lambda tokens: CSM._embed_tokens(shell, tokens)
    cast_weights(shell.text_embeddings, weight_dtype), cast_weights(shell.audio_embeddings, weight_dtype)
    shell.text_embeddings.weight.requires_grad_(text_trains)
    tokens = torch.randint(0, 2048, (batch, length, k + 1))
    mask = torch.zeros(batch, length, k + 1, dtype=torch.bool)
    mask[:, : length // 4, k] = True  # text frames, then audio frames (docs/formats.md)
    mask[:, length // 4:, :k] = True
    upstream = torch.randn(batch, length, dim, dtype=shell.audio_embeddings.weight.dtype)
    embed = {"official": official_frame_embedding, "previous": previous_frame_embedding, "this": embed_frames}[variant]
    peaks = []
    for attempt in range(2):  # the first pass pages in the tables and the allocator's arenas
        for table in (shell.text_embeddings, shell.audio_embeddings):
            table.weight.grad = None
        _reset_peak()
        start = _resident()[1]
        out = embed(shell, tokens, mask)
        forward = _resident()[0] - start
        _reset_peak()
        start = _resident()[1]
        out.backward(upstream)
        peaks = [forward, _resident()[0] - start]
        del out
    return peaks[0], peaks[1]


def embedding_table(batch: int = 16, length: int = 256) -> str:
    """Transient memory of the frame embedding, official vs this (each in a process of its own)."""
    rows = []
    for name, variant in (("official: gather audio + text, concatenate, multiply by the mask", "official"),
                          ("previous version: the same, the gathered columns freed once concatenated", "previous"),
                          ("this: one gather into one tensor, mask in place", "this")):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            forward, backward = pool.submit(_embedding_peaks, variant, batch, length).result()
        rows.append((name, forward, backward))
    base = rows[0][1]
    lines = [f"| frame embedding, CSM-1B tables, {batch * length} frames, fp32 | forward peak GiB | vs official | "
             "backward peak GiB (incl. 1.5 GiB of table gradients) |", "|---|---|---|---|"]
    lines += [f"| {name} | {f / GIB:.2f} | {f / base:.2f}x | {b / GIB:.2f} |" for name, f, b in rows]
    return "\n".join(lines)


def table(short: int, long: int) -> str:
    return HEAD + "\n" + "\n".join(row(*r, cp, short, long) for r in ROWS for cp in (False, True))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, nargs=2, default=(128, 384), help="the two batch lengths measured")
    p.add_argument("--update_page", metavar="PAGE", help="write the table between the memory markers of PAGE "
                                                        "(docs/training.md)")
    p.add_argument("--ema", action="store_true",
                   help="instead, the guide's checkpointing rows with a weight average on the GPU, from the table in "
                        "docs/training.md (or --update_page's page)")
    p.add_argument("--embedding", action="store_true",
                   help="instead, measure the frame embedding's transient memory, official vs this (peak resident "
                        "memory of a process of its own; Linux)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.embedding:
        print(embedding_table())
        return
    page = Path(args.update_page or ROOT / "docs" / "training.md")
    text, markers = (ema_table(page.read_text()), EMA_MARKERS) if args.ema else (table(*args.frames), PAGE_MARKERS)
    if args.update_page:
        from csm.training.config import replace_between
        from csm.system.outputs import write_text_atomic

        path = Path(args.update_page)
        write_text_atomic(path, replace_between(path.read_text(), markers, text))
    print(text)


if __name__ == "__main__":
    main()
