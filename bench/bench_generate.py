"""Generation speed: frames per second of the batched frame loop at batch 1, 4 and 16, eager and compiled, against
transformers' CsmForConditionalGeneration.generate on the same weights, and each stream's real-time factor.

Every figure is measured in this run, on random weights (no download) of the CPU mid flavor by default (--flavor
1b on a GPU: CSM-1B in bf16). Each row generates --frames frames per stream after a 30-frame text prompt, sampling
top-k 50 at temperature 0.9 (a random model never says EOS, so every stream runs the whole length); Mimi's decoding
is not in the figures. The baseline of the ratios is our eager loop at batch 1. The real-time factor is the time a
stream waits for its audio over the audio's length (80 ms per frame): below 1 is faster than real time.

Usage: python bench/bench_generate.py [--frames 48] [--batches 1,4,16] [--no_compile] [--no_peer] [--device auto]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from csm.model import conversions  # noqa: E402
from csm.system import runtime  # noqa: E402
from csm.model.csm_model import CSM, ModelArgs  # noqa: E402
from csm.data.frames import text_frames  # noqa: E402
from csm.judging.synthesis import CompiledStep, FrameLoop  # noqa: E402

FLAVORS = {"mid": ("llama-mid", "llama-mid-decoder"), "tiny": ("llama-tiny", "llama-tiny-decoder"),
           "1b": ("llama-1B", "llama-100M")}
PROMPT_FRAMES = 30
FRAME_SECONDS = 0.08


def build(flavor: str, device: torch.device, dtype: torch.dtype) -> CSM:
    backbone, decoder = FLAVORS[flavor]
    torch.manual_seed(0)
    with torch.device(device):
        model = CSM(ModelArgs(backbone_flavor=backbone, decoder_flavor=decoder)).to(dtype)
    return model.eval()


def prompts(model: CSM, batch: int) -> list:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.text_vocab_size, (PROMPT_FRAMES,), generator=g).tolist()
    return [text_frames(ids, model.config.audio_num_codebooks)] * batch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def ours(model: CSM, batch: int, frames: int, step=None, rounds: int = 2) -> float:
    """Frames per second (all streams) of the frame loop, best of `rounds` after a warm-up run."""
    device = next(model.parameters()).device
    best = float("inf")
    for r in range(rounds + 1):
        loop = FrameLoop(model, prompts(model, batch), [frames] * batch, temperature=0.9, topk=50,
                         generators=[torch.Generator(device).manual_seed(i) for i in range(batch)], step=step)
        sync(device)
        t0 = time.perf_counter()
        for _ in loop.run():
            pass
        sync(device)
        if r:  # the first run warms up (and compiles)
            best = min(best, time.perf_counter() - t0)
    return batch * frames / best


def transformers_peer(model: CSM, frames: int, rounds: int = 2) -> float | None:
    """Frames per second of CsmForConditionalGeneration.generate at batch 1 with our weights, sampling the same."""
    try:
        from transformers import CsmConfig, CsmForConditionalGeneration
    except ImportError:
        return None
    device = next(model.parameters()).device
    config = CsmConfig(**conversions.hf_config_from_args(model.config))
    with torch.device(device):
        hf = CsmForConditionalGeneration(config).to(next(model.parameters()).dtype).eval()
    missing, unexpected = hf.load_state_dict(conversions.official_to_hf(model.state_dict(), model.config), strict=False)
    assert not unexpected and all(k.startswith("codec_model.") for k in missing), (missing, unexpected)
    ids = torch.tensor([prompts(model, 1)[0][0][:, -1].tolist()], device=device)
    best = float("inf")
    with torch.no_grad():
        for r in range(rounds + 1):
            sync(device)
            t0 = time.perf_counter()
            out = hf.generate(input_ids=ids, max_new_tokens=frames, min_new_tokens=frames, do_sample=True, top_k=50,
                              temperature=0.9, depth_decoder_do_sample=True, depth_decoder_top_k=50,
                              depth_decoder_temperature=0.9)
            sync(device)
            if r:
                best = min(best, time.perf_counter() - t0)
    made = out.shape[1] if out.dim() == 3 else frames
    return made / best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flavor", choices=sorted(FLAVORS), default=None, help="default: mid on CPU, 1b on a GPU")
    p.add_argument("--frames", type=int, default=48, help="frames per stream (80 ms each)")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no_compile", action="store_true")
    p.add_argument("--no_peer", action="store_true")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = runtime.resolve_device(args.device)
    flavor = args.flavor or ("1b" if device.type == "cuda" else "mid")
    dtype = torch.bfloat16 if device.type == "cuda" and flavor == "1b" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    model = build(flavor, device, dtype)
    print(f"# generation: {flavor} flavor, {str(dtype).removeprefix('torch.')}, {device.type}"
          f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} CPU threads, {args.frames} frames per stream after a {PROMPT_FRAMES}-frame "
          "prompt, top-k 50\n")
    rows = []
    for mode in ("eager", *(() if args.no_compile else ("compiled",))):
        step = CompiledStep(model, max(batches)) if mode == "compiled" else None
        for batch in batches:
            rows.append((f"ours, {mode}", batch, ours(model, batch, args.frames, step, args.rounds)))
    if not args.no_peer:
        peer = transformers_peer(model, args.frames, args.rounds)
        if peer is not None:
            rows.append(("transformers CsmForConditionalGeneration.generate", 1, peer))
    base = rows[0][2]
    print("| generator | batch | frames/s (all streams) | vs ours eager batch 1 | RTF per stream |")
    print("|---|---:|---:|---:|---:|")
    for name, batch, fps in rows:
        print(f"| {name} | {batch} | {fps:,.1f} | {fps / base:.2f}x | {batch / fps / FRAME_SECONDS:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
