"""The two tokenizers CSM reads: the text tokenizer (Llama-3.2 or any AutoTokenizer) with the
BOS + `[speaker]text` + EOS encoding CSM was trained on, and Mimi, the audio tokenizer
(24 kHz mono in, 12.5 frames/s of 32 codebooks out).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from hub import hub_error, hub_file, looks_like_repo_id
from utils import UserError

DEFAULT_TEXT_TOKENIZER = "meta-llama/Llama-3.2-1B"
DEFAULT_SPEAKER = 999
MIMI_SAMPLE_RATE = 24_000
MIMI_FRAME_RATE = 12.5
SAMPLES_PER_FRAME = int(MIMI_SAMPLE_RATE / MIMI_FRAME_RATE)  # 1920
NUM_CODEBOOKS = 32
MIMI_CONFIG_NAME = "mimi_config.json"


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


def load_mimi(weights: str | Path | None = None, device="cpu", num_codebooks: int = NUM_CODEBOOKS):
    """Mimi from the default hub file, a hub repo id, or a local safetensors file.

    A `mimi_config.json` next to a local file overrides moshi's default architecture (used for
    the small test/demo Mimi; the real weights need none).
    """
    from moshi.models import loaders

    hint = "Or pass --mimi_weights a local copy of the safetensors file."
    config = None
    if weights is None:
        path = hub_file(loaders.DEFAULT_REPO, loaders.MIMI_NAME, "Mimi weights", hint)
    elif Path(weights).expanduser().is_file():
        path = Path(weights).expanduser()
        if path.with_name(MIMI_CONFIG_NAME).exists():
            config = json.loads(path.with_name(MIMI_CONFIG_NAME).read_text())
    elif looks_like_repo_id(str(weights)):
        path = hub_file(str(weights), loaders.MIMI_NAME, "Mimi weights", hint)
    else:
        raise UserError(f"Mimi weights {weights!r} not found (a .safetensors file or a hub repo id)")
    try:
        mimi = loaders.get_mimi(str(path), mimi_config=config, device=device, num_codebooks=num_codebooks)
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path} is not a Mimi checkpoint matching its config: {str(e).splitlines()[0]}") from e
    # Mimi is only ever used as a frozen tokenizer; without this, a call outside inference_mode
    # after one inside it trips over the codebook tensors cached during the first.
    mimi.requires_grad_(False)
    n_q = mimi.quantizer.total_codebooks if hasattr(mimi.quantizer, "total_codebooks") else num_codebooks
    if num_codebooks > n_q:
        raise UserError(f"Mimi at {path} has {n_q} codebooks; {num_codebooks} were asked for")
    return mimi


def mimi_device(mimi) -> torch.device:
    return next(mimi.parameters()).device


def frames_of(num_samples: int) -> int:
    """Mimi frames that `num_samples` samples at 24 kHz become (a started frame counts)."""
    return math.ceil(num_samples / SAMPLES_PER_FRAME)


@torch.inference_mode()
def encode_audio(mimi, clips: list[np.ndarray], num_codebooks: int = NUM_CODEBOOKS) -> list[np.ndarray]:
    """Mimi codes [K, F] of each 24 kHz mono clip, encoded together right-padded with zeros.

    Mimi is causal, so the zeros after a clip do not change its codes: each clip keeps the
    ceil(len / 1920) frames its own samples reach (the same codes as encoding it alone).
    """
    width = frames_of(max(len(c) for c in clips)) * SAMPLES_PER_FRAME
    batch = torch.zeros(len(clips), 1, width)
    for i, clip in enumerate(clips):
        batch[i, 0, :len(clip)] = torch.as_tensor(clip, dtype=torch.float32)
    codes = mimi.encode(batch.to(mimi_device(mimi)))[:, :num_codebooks].cpu().numpy()
    return [codes[i, :, :frames_of(len(clip))] for i, clip in enumerate(clips)]


@torch.inference_mode()
def decode_audio(mimi, codes: torch.Tensor) -> torch.Tensor:
    """Codes [K, F] -> 1-D float32 CPU audio at 24 kHz."""
    return mimi.decode(codes.unsqueeze(0).to(mimi_device(mimi)))[0, 0].float().cpu()
