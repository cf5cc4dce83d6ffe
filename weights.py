"""Model weights in every layout we read and write, and the one way a model is built or loaded.

Layouts today: the official hub layout (config.json + model.safetensors), a bare .safetensors file,
this project's training checkpoints and the original finetuning repo's .pt files (both read with
`torch.load(weights_only=True)`). `load_model` takes any of them; `save_pretrained` writes the hub layout.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
from dataclasses import fields
from pathlib import Path

import torch

from csm_model import CSM, FLAVORS, ModelArgs
from hub import hub_file, looks_like_repo_id
from utils import UserError, atomic_path, write_text_atomic

DEFAULT_MODEL = "sesame/csm-1b"
MODEL_CONFIG_NAME = "config.json"
MODEL_WEIGHTS_NAME = "model.safetensors"


# --------------------------------------------------------------------------- configs


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
    """ModelArgs from an official config.json (unknown fields ignored)."""
    known = {f.name for f in fields(ModelArgs)}
    try:
        return ModelArgs(**{k: v for k, v in d.items() if k in known})
    except (TypeError, ValueError) as e:
        raise UserError(f"bad model config {d}: {e}") from e


def model_config_dict(model) -> dict:
    """The config of a built-in or official model as a plain dict (what config.json and checkpoints hold)."""
    return model.config.to_dict() if hasattr(model.config, "to_dict") else dict(vars(model.config))


# --------------------------------------------------------------------------- .pt files


def clean_state_dict(state_dict: dict) -> dict[str, torch.Tensor]:
    """Strip the prefixes torch.compile ('_orig_mod.') and DDP ('module.') add to parameter names."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def read_pt(path: str | Path) -> dict:
    """torch.load with weights_only=True (no code runs); the original repo's pickled argparse namespace is allowed."""
    safe = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"could not read checkpoint {path}: {str(e).splitlines()[0]}") from e


def _state_dict_from_pt(ckpt: dict, path) -> tuple[dict, ModelArgs | None]:
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    for key in ("model", "model_state_dict", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            config = ckpt.get("model_args")
            return clean_state_dict(ckpt[key]), model_args_from_dict(config) if isinstance(config, dict) else None
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return clean_state_dict(ckpt), None
    raise UserError(f"{path} has no model weights (looked for keys 'model', 'model_state_dict', 'state_dict')")


# --------------------------------------------------------------------------- reading any source


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
        state_dict, args = _state_dict_from_pt(read_pt(path), path)
        return state_dict, args or infer_model_args(state_dict)
    elif looks_like_repo_id(source):
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


# --------------------------------------------------------------------------- building and loading


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


# --------------------------------------------------------------------------- writing


def save_pretrained(model, directory: str | Path) -> Path:
    """Write config.json + model.safetensors (the official hub layout), each file atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / MODEL_WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_text_atomic(directory / MODEL_CONFIG_NAME, json.dumps(model_config_dict(model), indent=2) + "\n")
    return directory
