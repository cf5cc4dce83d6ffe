"""Speech from a CSM checkpoint: text (+ optional earlier turns as context) -> 24 kHz wav.

    python generate.py --model runs/exp/best --text "Hello there." --speaker 0 --output hello.wav

The prompt is built as the official generator does: every context turn gives its text frames,
then its audio frames and an EOS frame; the turn to speak gives its text frames. Frames are then
sampled one at a time through the KV caches until the model emits the all-zero EOS frame or the
length cap is reached.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import utils
from utils import MIMI_FRAME_RATE, MIMI_SAMPLE_RATE, UserError


@dataclass
class Segment:
    """One turn: what was said, by whom, and (for context turns) the 24 kHz mono audio of it."""

    text: str
    speaker: int
    audio: torch.Tensor | None = None


def parse_speaker(value) -> int:
    """Speaker ids are the non-negative integers CSM was trained with ("[0]Hello")."""
    text = str(value).strip()
    if not re.fullmatch(r"[0-9]+", text):  # not str.isdigit: it accepts "²", which int() rejects
        raise UserError(f"--speaker must be a non-negative integer id, got {value!r}")
    return int(text)


def _text_frames(tokenizer, text: str, speaker: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(utils.encode_text(tokenizer, text, speaker), dtype=torch.long)
    tokens = torch.zeros(len(ids), k + 1, dtype=torch.long)
    mask = torch.zeros(len(ids), k + 1, dtype=torch.bool)
    tokens[:, k], mask[:, k] = ids, True
    return tokens, mask


def _mimi_device(mimi) -> torch.device:
    return next(mimi.parameters()).device


def _audio_frames(mimi, audio: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mimi codes of a context turn, plus the EOS frame that ended it in training data."""
    with torch.inference_mode():
        codes = mimi.encode(audio.float().reshape(1, 1, -1).to(_mimi_device(mimi)))[0, :k].cpu()  # [K, F]
    frames = codes.shape[1] + 1
    tokens = torch.zeros(frames, k + 1, dtype=torch.long)
    mask = torch.zeros(frames, k + 1, dtype=torch.bool)
    tokens[:-1, :k] = codes.T
    mask[:, :k] = True
    return tokens, mask


def build_prompt(tokenizer, mimi, segments: list[Segment], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames of the context turns and the text to speak: tokens, mask [S, K+1]."""
    parts = []
    for i, seg in enumerate(segments):
        parts.append(_text_frames(tokenizer, seg.text, seg.speaker, k))
        if seg.audio is not None and i < len(segments) - 1:
            parts.append(_audio_frames(mimi, seg.audio, k))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# no_grad rather than inference_mode: tensors the model caches on first use (its RoPE tables) would
# otherwise be inference tensors, and a training step after the first sample would fail on them.
@torch.no_grad()
def synthesize(model, text_tokenizer, mimi, text: str, speaker: int = 0, context: list[Segment] | tuple = (), *,
               max_audio_seconds: float = 10.0, temperature: float = 0.9, topk: int = 50,
               generator: torch.Generator | None = None, progress: bool = False) -> tuple[torch.Tensor, bool]:
    """Speak `text` as `speaker` after the `context` turns. Returns (1-D float CPU audio, stopped at EOS).

    The model's train/eval mode is restored and its caches removed afterwards, so training can call this.
    """
    if not text or not text.strip():
        raise UserError("the text to speak is empty")
    speaker = parse_speaker(speaker)
    k = model.config.audio_num_codebooks
    device = next(model.parameters()).device
    tokens, mask = build_prompt(text_tokenizer, mimi, [*context, Segment(text, speaker)], k)
    max_frames = int(max_audio_seconds * MIMI_FRAME_RATE)
    limit = model.backbone.max_seq_len
    if max_frames < 1:
        raise UserError(f"max_audio_seconds={max_audio_seconds} allows no audio frame (one frame is 80 ms)")
    if len(tokens) + max_frames > limit:
        raise UserError(f"the text and context take {len(tokens)} frames and {max_audio_seconds:g} s of audio "
                        f"{max_frames} more, over the model's {limit}-frame limit; shorten the text or context, "
                        "or lower --max_audio_seconds")

    was_training = model.training
    model.eval()
    try:
        model.setup_caches(1)
        curr_tokens, curr_mask = tokens.unsqueeze(0).to(device), mask.unsqueeze(0).to(device)
        curr_pos = torch.arange(len(tokens), device=device).unsqueeze(0)
        frames, stopped = [], False
        for _ in tqdm(range(max_frames), disable=not progress, desc="frames", unit="frame", leave=False):
            frame = model.generate_frame(curr_tokens, curr_mask, curr_pos, temperature, topk, generator)
            if not frame.any():
                stopped = True
                break
            frames.append(frame)
            # The next input is this audio frame alone: its K codes real, its text entry masked.
            curr_tokens = torch.cat([frame, torch.zeros_like(frame[:, :1])], dim=1).unsqueeze(1)
            curr_mask = torch.cat([torch.ones_like(frame, dtype=torch.bool),
                                   torch.zeros_like(frame[:, :1], dtype=torch.bool)], dim=1).unsqueeze(1)
            curr_pos = curr_pos[:, -1:] + 1
    finally:
        model.remove_caches()
        model.train(was_training)
    if not frames:
        return torch.zeros(0), stopped
    codes = torch.stack(frames, dim=-1)  # [1, K, F]
    with torch.inference_mode():
        audio = mimi.decode(codes.to(_mimi_device(mimi)))[0, 0].float().cpu()
    return audio, stopped


def read_audio(path: str | Path) -> torch.Tensor:
    """A wav/flac/ogg file as 1-D float audio at 24 kHz (stereo mixed down)."""
    import soundfile as sf
    import torchaudio

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such audio file")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile's errors are plain RuntimeErrors with its own wording
        raise UserError(f"{path}: cannot read audio ({e})") from e
    audio = torch.from_numpy(data).mean(dim=1)
    if rate != MIMI_SAMPLE_RATE:
        audio = torchaudio.functional.resample(audio, rate, MIMI_SAMPLE_RATE)
    return audio


def build_parser() -> argparse.ArgumentParser:
    """The command line of generate.py."""
    p = argparse.ArgumentParser(description="Speech from a CSM checkpoint (hub id, directory in the hub layout, or .pt)")
    p.add_argument("--model", default=utils.DEFAULT_MODEL, help="hub id, directory (config.json + model.safetensors) or .pt")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="what to say")
    what.add_argument("--lines", help="text file, one utterance per line; writes <output>_000.wav, _001.wav, ...")
    p.add_argument("--speaker", default="0", help="speaker id (non-negative integer) as in training")
    p.add_argument("--output", default="out.wav", help="wav file to write (24 kHz mono)")
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--topk", type=int, default=50)
    p.add_argument("--max_audio_seconds", type=float, default=10.0, help="length cap if no EOS frame comes first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=utils.PRECISIONS,
                   help="model weights: auto = bf16 on CUDA (fp16 on GPUs without bf16), fp32 on CPU; Mimi stays fp32")
    p.add_argument("--text_tokenizer", default=utils.DEFAULT_TEXT_TOKENIZER, help="hub id or local directory")
    p.add_argument("--mimi_weights", default=None, help="Mimi safetensors file or hub repo (default: moshi's)")
    p.add_argument("--context_audio", action="append", default=[], help="wav of an earlier turn (repeatable)")
    p.add_argument("--context_text", action="append", default=[], help="its transcript (one per --context_audio)")
    p.add_argument("--context_speaker", action="append", default=[], help="its speaker id (one per --context_audio)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Load model, tokenizers and context once, then write one wav per utterance."""
    args = build_parser().parse_args(argv)
    n = len(args.context_audio)
    if len(args.context_text) != n or len(args.context_speaker) != n:
        raise UserError(f"give one --context_text and one --context_speaker per --context_audio "
                        f"(got {n} audio, {len(args.context_text)} texts, {len(args.context_speaker)} speakers)")
    speaker = parse_speaker(args.speaker)
    if args.lines:
        path = Path(args.lines)
        if not path.is_file():
            raise UserError(f"--lines {path}: no such file")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise UserError(f"--lines {path} has no non-empty line")
    else:
        texts = [args.text]
    if any(not t.strip() for t in texts):
        raise UserError("--text is empty")
    if args.topk < 1 or args.temperature <= 0:
        raise UserError("--topk must be >= 1 and --temperature > 0")

    device = utils.resolve_device(args.device)
    context = [Segment(text, parse_speaker(spk), read_audio(wav))
               for wav, text, spk in zip(args.context_audio, args.context_text, args.context_speaker)]
    precision = utils.resolve_precision(args.precision, device)
    model = utils.load_model(args.model, device=device, dtype=utils.DTYPES[precision])
    tokenizer = utils.load_text_tokenizer(args.text_tokenizer)
    mimi = utils.load_mimi(args.mimi_weights, device=device, num_codebooks=model.config.audio_num_codebooks)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    import soundfile as sf

    output = Path(args.output)
    outputs = [output] if not args.lines else [output.with_name(f"{output.stem}_{i:03d}{output.suffix or '.wav'}")
                                                for i in range(len(texts))]
    for text, out in zip(texts, outputs):
        audio, stopped = synthesize(model, tokenizer, mimi, text, speaker, context,
                                    max_audio_seconds=args.max_audio_seconds, temperature=args.temperature,
                                    topk=args.topk, generator=generator, progress=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(out), audio.numpy(), MIMI_SAMPLE_RATE)
        why = "stopped at EOS" if stopped else f"reached the {args.max_audio_seconds:g} s cap"
        print(f"{out}: {len(audio) / MIMI_SAMPLE_RATE:.2f} s ({why})")
    return 0


if __name__ == "__main__":
    utils.run_cli(main)
