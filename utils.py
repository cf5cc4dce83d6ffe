"""Shared pieces: errors, seeding, precision, model and tokenizer loading, the loss, the LR schedule.

Nothing here does work at import: no environment reads, no network, no CUDA, no sys.path edits.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import random
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from csm_model import CSM, FLAVORS, ModelArgs

DEFAULT_MODEL = "sesame/csm-1b"
DEFAULT_TEXT_TOKENIZER = "meta-llama/Llama-3.2-1B"
MIMI_SAMPLE_RATE = 24_000
MIMI_FRAME_RATE = 12.5
NUM_CODEBOOKS = 32
DEFAULT_SPEAKER = 999
MODEL_CONFIG_NAME = "config.json"
MODEL_WEIGHTS_NAME = "model.safetensors"
MIMI_CONFIG_NAME = "mimi_config.json"


# --------------------------------------------------------------------------- errors at the edge


class UserError(Exception):
    """Bad input from the user: shown as one line, no traceback, non-zero exit."""


class SequenceTooLongError(UserError):
    pass


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main(); a UserError or Ctrl-C becomes one line on stderr and a non-zero exit."""
    try:
        result = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


def print0(*args, **kwargs):
    """Print on rank 0 only (all ranks print when torch.distributed is not initialised)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0:
        print(*args, **kwargs, flush=True)


# --------------------------------------------------------------------------- seeding, device, precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str | None = None) -> torch.device:
    """'auto'/None picks CUDA when present; an unavailable CUDA device is a user error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r} is not a device name (try cpu, cuda, cuda:1)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but no CUDA GPU is visible; use --device cpu")
    return device


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bf16 on CUDA GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise UserError("fp16 mixed precision needs a CUDA GPU; use bf16 or fp32 on this device")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast(device: torch.device, precision: str):
    """The one place mixed precision is chosen: an autocast context for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


# --------------------------------------------------------------------------- hub access


def _hub_error(what: str, source: str, err: Exception, local_hint: str) -> UserError:
    text = str(err).lower()
    if "gated" in text or "401" in text or "403" in text or "restricted" in text:
        why = "it is gated: accept its licence on huggingface.co, then `huggingface-cli login` or set HF_TOKEN in .env"
    elif "offline" in text or "connect" in text or "resolve" in text or "network" in text or "not found in the cache" in text \
            or "cannot find the requested files" in text or "outgoing traffic has been disabled" in text:
        why = "the hub cannot be reached and it is not in the local cache"
    elif "does not exist" in text or "404" in text or "not a valid model identifier" in text or "repository not found" in text:
        why = "no such repository or file on the hub"
    else:
        why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    parent = Path(source).expanduser().parent
    if parent != Path(".") and parent.is_dir():  # 'runs/best' with 'runs/' present: a mistyped local path
        why += f"; nor is there a local {source!r} (the folder {str(parent)!r} has no such entry)"
    return UserError(f"could not load {what} {source!r}: {why}. {local_hint}")


def hub_file(repo_id: str, filename: str, what: str, local_hint: str) -> Path:
    """Download (or take from the cache) one file of a hub repo, with a clear error when that fails."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as e:  # the hub raises many unrelated types (HTTP, offline, gated, OSError)
        raise _hub_error(what, repo_id, e, local_hint) from e


def _looks_like_repo_id(source: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source)) and not source.endswith((".pt", ".pth", ".safetensors"))


# --------------------------------------------------------------------------- model loading and saving


def infer_model_args(state_dict: dict[str, torch.Tensor]) -> ModelArgs:
    """Recover the model configuration from weight shapes (for checkpoints saved without one)."""

    def match(prefix: str) -> str:
        n_layers = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(rf"{prefix}\.layers\.(\d+)\.", k)))
        dim = state_dict[f"{prefix}.norm.scale"].shape[0]
        kv = state_dict[f"{prefix}.layers.0.attn.k_proj.weight"].shape[0]
        ffn = state_dict[f"{prefix}.layers.0.mlp.w1.weight"].shape[0]
        for name, f in FLAVORS.items():
            if (f.num_layers, f.embed_dim, f.num_kv_heads * f.head_dim, f.intermediate_dim) == (n_layers, dim, kv, ffn):
                return name
        raise UserError(f"the checkpoint's {prefix} (layers={n_layers}, dim={dim}, kv_dim={kv}, ffn={ffn}) "
                        f"matches no known flavor ({', '.join(FLAVORS)})")

    try:
        return ModelArgs(
            backbone_flavor=match("backbone"),
            decoder_flavor=match("decoder"),
            text_vocab_size=state_dict["text_embeddings.weight"].shape[0],
            audio_vocab_size=state_dict["codebook0_head.weight"].shape[0],
            audio_num_codebooks=state_dict["audio_head"].shape[0] + 1,
        )
    except (KeyError, ValueError) as e:
        raise UserError(f"the weights do not look like a CSM model (missing {e})") from e


def model_args_from_dict(d: dict) -> ModelArgs:
    known = {f.name for f in fields(ModelArgs)}
    try:
        return ModelArgs(**{k: v for k, v in d.items() if k in known})
    except (TypeError, ValueError) as e:
        raise UserError(f"bad model config {d}: {e}") from e


def clean_state_dict(state_dict: dict) -> dict[str, torch.Tensor]:
    """Strip the prefixes torch.compile ('_orig_mod.') and DDP ('module.') add to parameter names."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_checkpoint_file(path: str | Path) -> dict:
    """torch.load with weights_only=True; the original repo's pickled argparse namespace is allowed."""
    safe = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"could not read checkpoint {path}: {str(e).splitlines()[0]}") from e


def _state_dict_from_checkpoint(ckpt: dict, path) -> tuple[dict, ModelArgs | None]:
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    for key in ("model", "model_state_dict", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            config = ckpt.get("model_args")
            return clean_state_dict(ckpt[key]), model_args_from_dict(config) if isinstance(config, dict) else None
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return clean_state_dict(ckpt), None
    raise UserError(f"{path} has no model weights (looked for keys 'model', 'model_state_dict', 'state_dict')")


def read_model_weights(source: str | Path) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """Weights and config from a hub id, a local hub-layout dir, a .safetensors file or a .pt checkpoint."""
    from safetensors.torch import load_file

    source = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        weights, cfg = path / MODEL_WEIGHTS_NAME, path / MODEL_CONFIG_NAME
        if not weights.exists():
            pts = sorted(path.glob("*.pt"))
            hint = f" (it has {pts[0].name}: pass that file)" if pts else ""
            raise UserError(f"{path} has no {MODEL_WEIGHTS_NAME}; expected the hub layout "
                            f"({MODEL_CONFIG_NAME} + {MODEL_WEIGHTS_NAME}){hint}")
    elif path.is_file() and path.suffix == ".safetensors":
        weights, cfg = path, path.with_name(MODEL_CONFIG_NAME)
    elif path.is_file():
        state_dict, args = _state_dict_from_checkpoint(load_checkpoint_file(path), path)
        return state_dict, args or infer_model_args(state_dict)
    elif _looks_like_repo_id(source):
        hint = "Or pass --model a local directory with config.json + model.safetensors, or a .pt checkpoint."
        cfg = hub_file(source, MODEL_CONFIG_NAME, "model", hint)
        weights = hub_file(source, MODEL_WEIGHTS_NAME, "model", hint)
    else:
        raise UserError(f"model {source!r} not found: give a hub id (e.g. {DEFAULT_MODEL}), "
                        "a directory with config.json + model.safetensors, or a .pt checkpoint")
    state_dict = load_file(str(weights))
    if cfg.exists():
        args = model_args_from_dict(json.loads(cfg.read_text()))
    else:
        args = infer_model_args(state_dict)
    return state_dict, args


def check_keys(model: torch.nn.Module, state_dict: dict, source) -> None:
    """Strict key and shape match with a message that lists what differs."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with other shapes (e.g. {k}: model {expected[k]}, file {got[k]})")
        raise UserError(f"weights in {source} do not match the CSM model: {'; '.join(parts)}")


def build_model(args: ModelArgs, device="cpu", dtype: torch.dtype = torch.float32) -> CSM:
    """A freshly initialised model (training from scratch)."""
    with torch.device(device):
        model = CSM(args)
    return model.to(dtype=dtype)


def load_model(source: str | Path = DEFAULT_MODEL, device="cpu", dtype: torch.dtype = torch.float32,
               use_official: bool = False, csm_repo_path: str | None = None):
    """Load a CSM from any source (hub id, hub-layout dir, .safetensors, this project's or the
    original finetuning repo's .pt), strict key match. `use_official` builds the official `Model`
    from the clone at `csm_repo_path` (default: $CSM_REPO_PATH) instead of the built-in one."""
    state_dict, args = read_model_weights(source)
    if use_official:
        model = _official_model(args, csm_repo_path)
    else:
        with torch.device("meta"):
            model = CSM(args)
    check_keys(model, state_dict, source)
    if use_official:
        model.load_state_dict(state_dict, strict=True)
        return model.to(device=device, dtype=dtype)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=dtype)


def _official_model(args: ModelArgs, csm_repo_path: str | None):
    repo = csm_repo_path or os.environ.get("CSM_REPO_PATH")
    if not repo:
        raise UserError("the official model was asked for, but CSM_REPO_PATH is not set (see .env.example)")
    if not (Path(repo) / "models.py").exists():
        raise UserError(f"CSM_REPO_PATH={repo} has no models.py; point it at a clone of SesameAILabs/csm")
    if repo not in sys.path:
        sys.path.insert(0, repo)
    try:
        from models import Model, ModelArgs as OfficialArgs  # noqa: the clone's module
    except ImportError as e:
        raise UserError(f"could not import the official model from {repo}: {e} (it needs torchtune installed)") from e
    with torch.device("meta"):
        model = Model(OfficialArgs(**args.to_dict()))
    return model.to_empty(device="cpu")


def save_pretrained(model, directory: str | Path) -> Path:
    """Write config.json + model.safetensors (the hub layout), atomically per file."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(vars(model.config))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = directory / (MODEL_WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / MODEL_WEIGHTS_NAME)
    tmp = directory / (MODEL_CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, directory / MODEL_CONFIG_NAME)
    return directory


# --------------------------------------------------------------------------- tokenizers


def load_text_tokenizer(name_or_path: str = DEFAULT_TEXT_TOKENIZER):
    """The Llama-3.2 tokenizer (or any AutoTokenizer) from a hub id or a local directory."""
    from transformers import AutoTokenizer

    hint = "Or pass --text_tokenizer a local directory holding the tokenizer files."
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path))
    except Exception as e:  # transformers wraps hub failures in OSError/ValueError with prose
        raise _hub_error("text tokenizer", str(name_or_path), e, hint) from e
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise UserError(f"text tokenizer {name_or_path!r} defines no BOS/EOS token")
    return tok


def encode_text(tokenizer, text: str, speaker: int | str | None = DEFAULT_SPEAKER) -> list[int]:
    """Token ids of `[speaker]text`, wrapped in BOS ... EOS as CSM was trained."""
    if speaker is None:
        speaker = DEFAULT_SPEAKER
    ids = tokenizer.encode(f"[{speaker}]{text}", add_special_tokens=False)
    return [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]


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
    elif _looks_like_repo_id(str(weights)):
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


# --------------------------------------------------------------------------- the loss


class LossTerms(NamedTuple):
    """Summed losses and their target counts for one micro-batch (so accumulation can normalise exactly)."""

    c0_sum: torch.Tensor       # cross-entropy of codebook 0, summed over audio target frames
    decoder_sum: torch.Tensor  # cross-entropy of codebooks 1..K-1, summed over the decoder's frames
    n_c0: int                  # audio target frames (EOS frames included)
    n_decoder: int             # decoder targets: frames given to the decoder x (K-1)


def decoder_frame_count(n_frames: int, fraction: float) -> int:
    """Frames the decoder trains on: a fraction of the audio frames, at least one (when there are any)."""
    if n_frames == 0:
        return 0
    return min(n_frames, max(1, int(n_frames * fraction)))


def count_targets(mask: torch.Tensor, decoder_fraction: float, num_codebooks: int) -> tuple[int, int]:
    """(n_c0, n_decoder) that compute_loss will report for this mask, known before the forward."""
    n = int(mask[:, 1:, 0].sum())
    return n, decoder_frame_count(n, decoder_fraction) * (num_codebooks - 1)


def _embed_frames(model, tokens, mask):
    embeds = model._embed_tokens(tokens)  # present on the built-in and the official model
    return (embeds * mask.unsqueeze(-1)).sum(dim=2)


def compute_loss(model, tokens: torch.Tensor, mask: torch.Tensor, *, decoder_fraction: float = 1 / 16,
                 generator: torch.Generator | None = None) -> LossTerms:
    """Summed training losses of a right-padded batch (SPEC §2).

    The backbone output at row r predicts the audio frame at row r+1: codebook 0 through
    `codebook0_head` on every audio target frame, codebooks 1..K-1 through the decoder on a random
    `decoder_fraction` of them ("compute amortization"), drawn from `generator`. Padding rows are
    never targets and, with right padding under a causal mask, never attended to by real rows.
    """
    b, s, _ = tokens.shape
    max_len = model.backbone.max_seq_len
    if s > max_len:
        raise SequenceTooLongError(f"batch has sequences of {s} frames; the backbone takes at most {max_len}")
    dtype = next(model.parameters()).dtype
    h = model.backbone(_embed_frames(model, tokens, mask).to(dtype)).to(dtype)

    is_target = mask[:, 1:, 0]                      # rows 1.. that hold an audio frame (EOS included)
    h_prev = h[:, :-1][is_target]                   # [N, D] the state that predicts each target frame
    targets = tokens[:, 1:, :-1][is_target]         # [N, K]
    n = targets.shape[0]
    c0_logits = model.codebook0_head(h_prev)
    c0_sum = F.cross_entropy(c0_logits.float(), targets[:, 0], reduction="sum")

    k = decoder_frame_count(n, decoder_fraction)
    if k == 0:
        return LossTerms(c0_sum, c0_sum.new_zeros(()), 0, 0)
    if k < n:
        idx = torch.randperm(n, generator=generator)[:k].to(h_prev.device)
        h_prev, targets = h_prev[idx], targets[idx]
    logits = decoder_logits(model, h_prev, targets)
    dec_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1), reduction="sum")
    return LossTerms(c0_sum, dec_sum, n, k * (targets.shape[1] - 1))


def decoder_logits(model, h_prev: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Teacher-forced decoder logits for codebooks 1..K-1: input [h, emb(c0), ..., emb(c_{K-2})] -> [N, K-1, V]."""
    k = codes.shape[1]
    vocab = model.config.audio_vocab_size
    offsets = vocab * torch.arange(k - 1, device=codes.device)
    code_embeds = model.audio_embeddings(codes[:, :-1] + offsets).to(h_prev.dtype)
    dec_h = model.decoder(model.projection(torch.cat([h_prev.unsqueeze(1), code_embeds], dim=1)))
    dec_h = dec_h.to(h_prev.dtype)
    return torch.einsum("nsd,sdv->nsv", dec_h[:, 1:, :], model.audio_head.to(dec_h.dtype))


def combine_loss(terms: LossTerms, n_c0_total: int, n_decoder_total: int, decoder_loss_weight: float) -> torch.Tensor:
    """The original objective 2((1-w) c0 + w dec), each term normalised by the step's total target count.

    Summing this over the micro-batches of an accumulated step gives the loss of the whole step.
    """
    c0 = terms.c0_sum / max(n_c0_total, 1)
    dec = terms.decoder_sum / max(n_decoder_total, 1)
    return 2 * ((1 - decoder_loss_weight) * c0 + decoder_loss_weight * dec)


# --------------------------------------------------------------------------- LR schedule


LR_DECAYS = ("linear", "cosine", "exponential", "constant")


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, decay: str, min_lr_ratio: float = 0.0) -> float:
    """LR factor for optimizer step `step` (0-based): linear warmup to 1 over `warmup_steps`, then
    decay that reaches its final value exactly at the last step (`total_steps - 1`).

    Final value: `min_lr_ratio` for linear/cosine; for exponential `min_lr_ratio` or 0.01 when 0.
    """
    if decay not in LR_DECAYS:
        raise ValueError(f"lr_decay {decay!r} is not one of {LR_DECAYS}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = total_steps - 1 - warmup_steps
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    if decay == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if decay == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    final = min_lr_ratio if min_lr_ratio > 0 else 0.01
    return final ** progress
