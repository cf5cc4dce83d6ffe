"""The two tokenizers CSM reads: the text tokenizer (Llama-3.2 or any AutoTokenizer) with the
BOS + `[speaker]text` + EOS encoding CSM was trained on, and Mimi, the audio tokenizer (transformers'
MimiModel: 24 kHz mono in, 12.5 frames/s of 32 codebooks out).
"""
from __future__ import annotations

from pathlib import Path


from csm.model.hub import hub_error
from csm.system.errors import UserError
from csm.model.weights import model_tokenizer_dir

DEFAULT_TEXT_TOKENIZER = "meta-llama/Llama-3.2-1B"
DEFAULT_SPEAKER = 999


# --------------------------------------------------------------------------- text


def resolve_text_tokenizer(explicit: str | None, model: str | Path | None = None, revision: str | None = None) -> str:
    """The tokenizer to use: the one asked for; else the model source's own tokenizer files (the
    transformers layout carries them, so the gated Llama repo is not needed); else Llama-3.2's."""
    if explicit:
        return str(explicit)
    if model is not None:
        found = model_tokenizer_dir(model, revision)
        if found is not None:
            return str(found)
    return DEFAULT_TEXT_TOKENIZER


def load_text_tokenizer(name_or_path: str = DEFAULT_TEXT_TOKENIZER, revision: str | None = None):
    """The Llama-3.2 tokenizer (or any AutoTokenizer: a CSM repo's own too) from a hub id or a local directory."""
    from transformers import AutoTokenizer  # transformers' import takes seconds

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
