"""The two tokenizers CSM reads: the text tokenizer (Llama-3.2 or any AutoTokenizer) with the
BOS + `[speaker]text` + EOS encoding CSM was trained on, and Mimi, the audio tokenizer (transformers'
MimiModel: 24 kHz mono in, 12.5 frames/s of 32 codebooks out).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from hub import hub_error
from utils import UserError

DEFAULT_TEXT_TOKENIZER = "meta-llama/Llama-3.2-1B"
DEFAULT_SPEAKER = 999
MIMI_SAMPLE_RATE = 24_000
MIMI_FRAME_RATE = 12.5
SAMPLES_PER_FRAME = int(MIMI_SAMPLE_RATE / MIMI_FRAME_RATE)  # 1920
NUM_CODEBOOKS = 32
DEFAULT_MIMI = "kyutai/mimi"  # Mimi in transformers' MimiModel layout, from its authors


# --------------------------------------------------------------------------- text


def resolve_text_tokenizer(explicit: str | None, model: str | Path | None = None, revision: str | None = None) -> str:
    """The tokenizer to use: the one asked for; else the model source's own tokenizer files (the
    transformers layout carries them, so the gated Llama repo is not needed); else Llama-3.2's."""
    if explicit:
        return str(explicit)
    if model is not None:
        from weights import model_tokenizer_dir

        found = model_tokenizer_dir(model, revision)
        if found is not None:
            return str(found)
    return DEFAULT_TEXT_TOKENIZER


def load_text_tokenizer(name_or_path: str = DEFAULT_TEXT_TOKENIZER, revision: str | None = None):
    """The Llama-3.2 tokenizer (or any AutoTokenizer: a CSM repo's own too) from a hub id or a local directory."""
    from transformers import AutoTokenizer

    hint = "Or pass --text_tokenizer a local directory holding the tokenizer files."
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision)
    except Exception as e:  # transformers wraps hub failures in OSError/ValueError with prose
        raise hub_error("text tokenizer", str(name_or_path), e, hint) from e
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise UserError(f"text tokenizer {name_or_path!r} defines no BOS/EOS token")
    return tok


def encode_text(tokenizer, text: str, speaker: int | str | None = DEFAULT_SPEAKER, *,
                omit_speaker_id: bool = False) -> list[int]:
    """Token ids of `[speaker]text` (or of `text` alone with omit_speaker_id), wrapped in BOS ... EOS
    as CSM was trained. A missing speaker is 999, as in the original. BOS and EOS are added here, not
    by the tokenizer's post-processor, so every tokenizer (Llama's, a CSM repo's) gives the same ids."""
    if speaker is None:
        speaker = DEFAULT_SPEAKER
    body = text if omit_speaker_id else f"[{speaker}]{text}"
    ids = tokenizer.encode(body, add_special_tokens=False)
    return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]


# --------------------------------------------------------------------------- audio (Mimi)


def load_mimi(source: str | Path | None = None, device="cpu", num_codebooks: int = NUM_CODEBOOKS):
    """Mimi as transformers' MimiModel, frozen, from: a hub repo or local directory in the MimiModel layout
    (default kyutai/mimi), a transformers-layout CSM (its codec_model.*), or moshi's Mimi .safetensors file
    (converted on load, with a mimi_config.json beside it when it is not the default Mimi).

    The weights reach `MimiModel.from_pretrained` in the checkpoint layout (a MimiModel directory as it is,
    the others through a temporary one), so transformers itself maps them onto its modules (their layout
    differs between transformers 4 and 5)."""
    import tempfile

    from safetensors.torch import save_file
    from transformers import MimiConfig, MimiModel

    from weights import mimi_model_dir, read_codec_weights

    source = DEFAULT_MIMI if source is None else str(source)
    directory = mimi_model_dir(source)
    if directory is not None:  # already a MimiModel directory: no copy needed
        return _from_pretrained(MimiModel, directory, source, num_codebooks).to(device=device, dtype=torch.float32)
    found = read_codec_weights(source)
    if found is None:
        raise UserError(f"Mimi weights {source!r} not found: give a MimiModel directory or hub repo ({DEFAULT_MIMI}), "
                        "a transformers CSM, or moshi's Mimi .safetensors file (--mimi_weights)")
    weights, config = found
    config = MimiConfig(**{k: v for k, v in config.items() if k not in ("model_type", "transformers_version",
                                                                          "architectures")})
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(Path(tmp) / "model.safetensors"),
                  metadata={"format": "pt"})
        mimi = _from_pretrained(MimiModel, tmp, source, num_codebooks)
    return mimi.to(device=device, dtype=torch.float32)


def _from_pretrained(cls, directory, source, num_codebooks: int):
    """MimiModel.from_pretrained with every mismatch as one clear error; frozen (only ever a tokenizer)."""
    try:
        # PyTorch's fused attention: ~1.2x the eager encoder on CPU.
        mimi, info = cls.from_pretrained(str(directory), output_loading_info=True, attn_implementation="sdpa")
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{source} is not a Mimi matching its config: {str(e).splitlines()[0]}") from e
    missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    if missing or unexpected:
        raise UserError(f"{source} is not a Mimi matching its config: {len(missing)} missing "
                        f"(e.g. {', '.join(sorted(missing)[:2])}), {len(unexpected)} unexpected "
                        f"(e.g. {', '.join(sorted(unexpected)[:2])})")
    if mimi.config.num_quantizers < num_codebooks:
        raise UserError(f"Mimi at {source} has {mimi.config.num_quantizers} codebooks; {num_codebooks} were asked for")
    return mimi.eval().requires_grad_(False)


def mimi_device(mimi) -> torch.device:
    return next(mimi.parameters()).device


def fp32_convolutions():
    """cuDNN convolutions in full fp32 for encoding. By default PyTorch runs them in TF32 on Ampere and newer GPUs
    (a 10-bit mantissa), and Mimi's codes, the training data, would then flip near-ties far more often than
    fp32 on another device does."""
    c = torch.backends.cudnn
    return c.flags(enabled=c.enabled, benchmark=c.benchmark, deterministic=c.deterministic, allow_tf32=False)


def frames_of(num_samples: int) -> int:
    """Mimi frames that `num_samples` samples at 24 kHz become (a started frame counts)."""
    return math.ceil(num_samples / SAMPLES_PER_FRAME)


@torch.inference_mode()
def encode_audio(mimi, clips: list[np.ndarray], num_codebooks: int = NUM_CODEBOOKS) -> list[np.ndarray]:
    """Mimi codes [K, F] of each 24 kHz mono clip, encoded together right-padded with zeros.

    Mimi is causal, so the zeros after a clip do not change its codes: each clip keeps the
    ceil(len / 1920) frames its own samples reach (the same codes as encoding it alone). Padding to whole
    frames is also what makes MimiModel's codes equal moshi's, which padded the last frame with zeros.
    """
    width = frames_of(max(len(c) for c in clips)) * SAMPLES_PER_FRAME
    batch = torch.zeros(len(clips), 1, width)
    for i, clip in enumerate(clips):
        batch[i, 0, :len(clip)] = torch.as_tensor(clip, dtype=torch.float32)
    with fp32_convolutions():
        codes = mimi.encode(batch.to(mimi_device(mimi)), num_quantizers=num_codebooks).audio_codes.cpu().numpy()
    return [codes[i, :, :frames_of(len(clip))] for i, clip in enumerate(clips)]


@torch.inference_mode()
def decode_audio(mimi, codes: torch.Tensor) -> torch.Tensor:
    """Codes [K, F] -> 1-D float32 CPU audio at 24 kHz."""
    return mimi.decode(codes.unsqueeze(0).long().to(mimi_device(mimi))).audio_values[0, 0].float().cpu()
