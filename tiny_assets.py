"""Tiny stand-ins for the real assets, saved in the real layouts, for tests and the offline demo.

- a byte-level BPE text tokenizer saved as an AutoTokenizer directory (like meta-llama/Llama-3.2-1B),
- a small Mimi with random but non-empty codebooks, saved as safetensors (+ mimi_config.json),
- a tiny CSM saved in the hub layout (config.json + model.safetensors, like sesame/csm-1b).

They are loaded by exactly the code that loads the real ones. Audio they produce is not speech.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from csm_model import CSM, ModelArgs
from tokenization import MIMI_CONFIG_NAME
from weights import save_pretrained

TEXT_VOCAB_SIZE = 512
TINY_MODEL_ARGS = ModelArgs(backbone_flavor="llama-tiny", decoder_flavor="llama-tiny-decoder",
                            text_vocab_size=TEXT_VOCAB_SIZE, audio_vocab_size=2051, audio_num_codebooks=32)

_CORPUS = """The quick brown fox jumps over the lazy dog. Speech synthesis turns text into sound.
A conversational speech model listens to context and answers with a voice of its own.
Numbers such as 0 1 2 3 4 5 6 7 8 9 and speakers like [0] [1] [999] appear in prompts.
Hello there, how are you today? I am fine, thank you. What time is it? It is half past nine.
She sells sea shells by the sea shore. Peter Piper picked a peck of pickled peppers."""


def make_text_tokenizer(directory: str | Path, vocab_size: int = TEXT_VOCAB_SIZE) -> Path:
    """Train a byte-level BPE on a small corpus and save it as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"  # the Llama-3 names
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bos, eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    directory = Path(directory)
    fast.save_pretrained(str(directory))
    return directory


def tiny_mimi_config() -> dict:
    """moshi's Mimi architecture shrunk (same 24 kHz in, 12.5 Hz out, 32 codebooks of 2048)."""
    from moshi.models import loaders

    cfg = copy.deepcopy(loaders._mimi_config)
    cfg["seanet"].update(n_filters=4, dimension=32)
    cfg["quantizer"].update(dimension=16, input_dimension=32, output_dimension=32)
    cfg["transformer"].update(d_model=32, num_heads=2, num_layers=1, dim_feedforward=64,
                              input_dimension=32, output_dimensions=[32])
    return cfg


def make_mimi(path: str | Path, seed: int = 0) -> Path:
    """Save a small random Mimi whose codebooks are filled, so different audio gets different codes."""
    from moshi.models import loaders
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    cfg = tiny_mimi_config()
    mimi = loaders.get_mimi(None, mimi_config=cfg, device="cpu", num_codebooks=32)
    for module in mimi.modules():
        if type(module).__name__ == "EuclideanCodebook":
            # A fresh codebook is all zeros and maps every frame to code 0; this scale matches the
            # small encoder's latents so that codes change with the input.
            module.embedding_sum.normal_(0.0, 0.01)
            module.cluster_usage.fill_(1.0)
            module._initialized.fill_(1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(path))
    path.with_name(MIMI_CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def make_csm(directory: str | Path, args: ModelArgs = TINY_MODEL_ARGS, seed: int = 0) -> Path:
    """Save a randomly initialised CSM in the hub layout."""
    torch.manual_seed(seed)
    return save_pretrained(CSM(args), directory)


def make_all(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """All three assets under one directory; returns their paths (model dir, tokenizer dir, Mimi file)."""
    directory = Path(directory)
    return {
        "model": make_csm(directory / "csm-tiny", seed=seed),
        "text_tokenizer": make_text_tokenizer(directory / "tokenizer"),
        "mimi": make_mimi(directory / "mimi" / "mimi-tiny.safetensors", seed=seed),
    }
