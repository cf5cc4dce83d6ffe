"""Speech from a model: the generation prompt (context turns, then the text to speak) and the
frame-by-frame sampling loop through the KV caches, stopping at the EOS frame or a length cap.
Used by generate.py and by the samples written during training.
"""
from __future__ import annotations

import argparse
import contextlib
import re

import torch
from tqdm import tqdm

from frames import Segment, audio_frames, next_input_frames, text_frames
from tokenization import encode_text
from codec import decode_audio, encode_audio, MIMI_FRAME_RATE
from utils import UserError
from runtime import autocast, PRECISIONS
from audio_io import read_audio
from token_file import SPEAKERS_NAME, speaker_names
from weights import DEFAULT_MODEL


def add_speech_flags(p: argparse.ArgumentParser, *, context_speaker: str, precision_note: str = "") -> None:
    """The flags of every command line that speaks (generate.py, evaluate.py): the model and its parts, where
    it runs, how it samples, and the prompt turns spoken before each text."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id, directory (official or transformers layout), .safetensors or .pt")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub --model (default: main)")
    p.add_argument("--adapter", default=None,
                   help="a peft LoRA adapter directory to apply to --model without merging it on disk (ours, e.g. "
                        "runs/x/best_adapter, or one trained on transformers' CsmForConditionalGeneration)")
    p.add_argument("--text_tokenizer", default=None,
                   help="hub id or local directory (default: the model's own tokenizer files, "
                        "else meta-llama/Llama-3.2-1B)")
    p.add_argument("--mimi_weights", default=None,
                   help="Mimi: MimiModel dir or hub repo, transformers CSM, or moshi .safetensors "
                        "(default: kyutai/mimi)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="model weights: auto = bf16 on CUDA (fp16 on GPUs without bf16), fp32 on CPU; Mimi stays "
                        "fp32" + precision_note)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--topk", type=int, default=50)
    p.add_argument("--context_audio", action="append", default=[],
                   help="wav of a prompt turn spoken before each text (repeatable)")
    p.add_argument("--context_text", action="append", default=[], help="its transcript (one per --context_audio)")
    p.add_argument("--context_speaker", action="append", default=[], help=context_speaker)


def parse_speaker(value, names: dict[str, int] | None = None, flag: str = "--speaker") -> int:
    """Speaker ids are the non-negative integers CSM was trained with ("[0]Hello"); a name is looked up in the
    speaker names of the data the model was trained on (`names`: a token file's, or its model's speakers.json)."""
    text = str(value).strip()
    if re.fullmatch(r"[0-9]+", text) and str(int(text)) == text:  # not str.isdigit: it accepts "²"
        return int(text)
    if names and text in names:
        return names[text]
    if names:
        known = ", ".join(sorted(names)[:8]) + (", ..." if len(names) > 8 else "")
        raise UserError(f"{flag} {value!r} is neither an integer id nor one of the speaker names ({known})")
    raise UserError(f"{flag} must be a non-negative integer id, or a speaker name when the model directory has "
                    f"a speakers.json (or --speakers names a token file); got {value!r}")


def prompt_segments(turns: list[dict], names: dict[str, int] | None = None) -> list[Segment]:
    """Prompt turns {audio, text, speaker} (config gen_context, or --context_* flags) as Segments, with their
    audio read now, so a missing file fails before any work; speaker names are looked up in `names`."""
    segments = []
    for turn in turns:
        if not str(turn["text"]).strip():
            raise UserError(f"the context turn with audio {turn['audio']} has an empty transcript")
        segments.append(Segment(str(turn["text"]).strip(), parse_speaker(turn["speaker"], names, "--context_speaker"),
                                torch.from_numpy(read_audio(turn["audio"]))))
    return segments


def context_segments(audio: list[str], texts: list[str], speakers: list[str],
                     names: dict[str, int] | None = None) -> list[Segment]:
    """Earlier turns given on a command line (--context_audio/_text/_speaker, one of each per turn)."""
    if len(texts) != len(audio) or len(speakers) != len(audio):
        raise UserError(f"give one --context_text and one --context_speaker per --context_audio "
                        f"(got {len(audio)} audio, {len(texts)} texts, {len(speakers)} speakers)")
    return prompt_segments([{"audio": a, "text": t, "speaker": s} for a, t, s in zip(audio, texts, speakers)], names)


def model_speaker_names(source, explicit=None) -> dict[str, int]:
    """Speaker names for --speaker: from `explicit` (a token file or a speakers.json) when given, else the
    speakers.json that training writes beside a model's weights ({} when there is none)."""
    from pathlib import Path

    if explicit:
        return speaker_names(explicit)
    path = Path(str(source)).expanduser()
    if not path.exists():  # a hub id: its files are not here yet
        return {}
    beside = (path if path.is_dir() else path.parent) / SPEAKERS_NAME
    return speaker_names(beside) if beside.is_file() else {}


def build_prompt(tokenizer, mimi, segments: list[Segment], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames of the context turns and the text to speak: tokens, mask [S, K+1].

    As the official generator: every context turn gives its text frames, then its audio frames and
    the EOS frame that ended it in training data; the turn to speak gives its text frames only.
    """
    parts = []
    for i, seg in enumerate(segments):
        parts.append(text_frames(encode_text(tokenizer, seg.text, seg.speaker), k))
        if seg.audio is not None and i < len(segments) - 1:
            codes = encode_audio(mimi, [seg.audio.float().reshape(-1).cpu().numpy()], k)[0]
            parts.append(audio_frames(codes, k))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# no_grad rather than inference_mode: tensors the model caches on first use (its RoPE tables) would
# otherwise be inference tensors, and a training step after the first sample would fail on them.
@torch.no_grad()
def synthesize(model, text_tokenizer, mimi, text: str, speaker: int = 0, context: list[Segment] | tuple = (), *,
               max_audio_seconds: float = 10.0, temperature: float = 0.9, topk: int = 50,
               generator: torch.Generator | None = None, progress: bool = False,
               precision: str | None = None) -> tuple[torch.Tensor, bool]:
    """Speak `text` as `speaker` after the `context` turns. Returns (1-D float CPU audio, stopped at EOS).

    `precision` (a training run's: fp32, bf16, fp16) runs the model under that autocast and nothing else;
    None runs it in its weights' dtype. Mimi always runs outside it, in fp32. The model's train/eval mode
    is restored and its caches removed afterwards, so training can call this.
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
        precision_ctx = autocast(device, precision) if precision else contextlib.nullcontext()
        for _ in tqdm(range(max_frames), disable=not progress, desc="frames", unit="frame", leave=False):
            with precision_ctx:
                frame = model.generate_frame(curr_tokens, curr_mask, curr_pos, temperature, topk, generator)
            if not frame.any():
                stopped = True
                break
            frames.append(frame)
            curr_tokens, curr_mask = next_input_frames(frame)
            curr_pos = curr_pos[:, -1:] + 1
    finally:
        model.remove_caches()
        model.train(was_training)
    if not frames:
        return torch.zeros(0), stopped
    codes = torch.stack(frames, dim=-1)[0]  # [K, F]
    return decode_audio(mimi, codes), stopped
