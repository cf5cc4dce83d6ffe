"""Model weights in every layout: resolved (a local path or a hub snapshot), read, loaded into the one model
class, and saved. The conversions between the layouts are conversions.py's.

Layouts, detected from the files (never from a name):
- official: `config.json` (flavors) + `model.safetensors`, or a plain state dict such as the release's
  `ckpt.pt`; also this project's training checkpoints and the original finetuning repo's `.pt` files.
- transformers (`CsmForConditionalGeneration`): `config.json` with `model_type: csm` + `model.safetensors`
  or shards with `model.safetensors.index.json`; what `sesame/csm-1b` and its finetunes serve today.

"""
from __future__ import annotations

import argparse
import json
import pathlib
import pickle
import re
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
import torch

from csm.model.conversions import (
    HF_CODEC_PREFIX, TRANSFORMERS, args_from_hf_config, clean_state_dict, detect_layout, hf_to_official,
    infer_model_args, model_args_from_dict, model_config_dict,
)
from csm.model.csm_model import CSM, ModelArgs
from csm.model.hub import hub_snapshot, looks_like_repo_id
from csm.system.outputs import content_digest
from csm.system.errors import UserError
from csm.system.outputs import atomic_path, write_text_atomic

DEFAULT_MODEL = "sesame/csm-1b"
MODEL_CONFIG_NAME = "config.json"
MODEL_WEIGHTS_NAME = "model.safetensors"
SHARD_INDEX_NAME = "model.safetensors.index.json"
OFFICIAL_CKPT_NAME = "ckpt.pt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# What a hub model repo is downloaded for: config, weights (single or sharded), tokenizer files.
HUB_PATTERNS = ["config.json", "model.safetensors", "model-*.safetensors", SHARD_INDEX_NAME, "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.*",
                "preprocessor_config.json"]

DIGEST_KEY = "csm_train_sha256"  # safetensors metadata: a digest of the tensors, checked when read back

# --------------------------------------------------------------------------- reading files


def read_pt(path: str | Path) -> dict:
    """torch.load with weights_only=True (no code runs); the original repo's pickled argparse namespace is allowed."""
    safe = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory; give the .pt file (or the directory as --model)")
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # PyTorch's text suggests weights_only=False: that would run code from the file, so it is not repeated.
        raise UserError(f"could not read checkpoint {path}: it holds objects other than tensors and plain data, "
                        "and loading those could run code from the file; refused") from e
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"could not read checkpoint {path}: {first} (empty, truncated or not a PyTorch file?)") from e


def _state_dict_from_pt(ckpt, path) -> tuple[dict, ModelArgs | None]:
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    if ckpt.get("trainable_only"):
        raise UserError(f"{path} is a checkpoint of a LoRA or partly frozen run: it holds "
                        f"only the weights that trained. "
                        "Load the run's best/ or final/ (merged weights), or resume it with train.py --resume")
    for key in ("model", "model_state_dict", "state_dict"):
        if isinstance(ckpt.get(key), dict):
            config = ckpt.get("model_args")
            return clean_state_dict(ckpt[key]), model_args_from_dict(config, path) if isinstance(config, dict) else None
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return clean_state_dict(ckpt), None
    raise UserError(f"{path} has no model weights (looked for keys 'model', 'model_state_dict', 'state_dict')")


def read_safetensors(directory_or_file: Path, skip_prefix: str | None = HF_CODEC_PREFIX,
                     only_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, a shard set (model.safetensors.index.json) or one .safetensors file,
    in their stored dtype. Tensors under `skip_prefix` are not read; with `only_prefix`, only those are."""
    path = Path(directory_or_file)
    if path.is_dir() and (path / SHARD_INDEX_NAME).is_file():
        try:
            weight_map = json.loads((path / SHARD_INDEX_NAME).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path / SHARD_INDEX_NAME} is not a shard index ({e})") from e
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{path} lacks shard(s) {', '.join(missing)} named in {SHARD_INDEX_NAME}")
    else:
        files = [path / MODEL_WEIGHTS_NAME if path.is_dir() else path]
    out = {}
    for file in files:
        if not file.is_file():
            raise UserError(f"{file}: no such weights file")
        try:
            with safe_open(str(file), framework="pt") as f:
                digest = (f.metadata() or {}).get(DIGEST_KEY)
                wanted = [k for k in f.keys() if digest is not None or not (
                    (skip_prefix and k.startswith(skip_prefix)) or (only_prefix and not k.startswith(only_prefix)))]
                tensors = {key: f.get_tensor(key) for key in wanted}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UserError(f"{file} is not a readable safetensors file ({str(e).splitlines()[0]})") from e
        if digest is not None and content_digest(tensors) != digest:
            raise UserError(f"{file} is damaged: its tensors do not match the digest saved with them")
        out.update({k: v for k, v in tensors.items() if not (skip_prefix and k.startswith(skip_prefix))
                    and not (only_prefix and not k.startswith(only_prefix))})
    return out


def read_config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object")
    return config


def _to_official(state_dict: dict, config: dict | None, source, args: ModelArgs | None = None):
    """(official state dict, ModelArgs) from weights in either layout and the config beside them."""
    layout = detect_layout(state_dict, config, source)
    if layout == TRANSFORMERS:
        if config is None:
            raise UserError(f"{source} is in the transformers layout but has no config.json beside it "
                            "(head counts and RoPE settings are not in the weights)")
        args = args_from_hf_config(config, source)
        return hf_to_official(state_dict, args, source), args
    if args is None:
        args = model_args_from_dict(config, source) if config else infer_model_args(state_dict, source)
    return state_dict, args


def resolve_source(source: str | Path, revision: str | None = None) -> Path:
    """A local path for a model source: the path itself, or the snapshot of the needed files of a hub repo."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if looks_like_repo_id(text):
        hint = "Or pass --model a local directory or checkpoint file."
        return hub_snapshot(text, HUB_PATTERNS, "model", hint, revision=revision)
    raise UserError(f"model {text!r} not found: give a hub id (e.g. {DEFAULT_MODEL}), a directory (official or "
                    "transformers layout), a .safetensors file or a .pt checkpoint")


def config_model_args(path: Path) -> ModelArgs | None:
    """The dimensions a local model's config.json gives (either layout), read without its weights; None where
    it has none (a checkpoint file carries them inside) or names nothing this code knows."""
    config = read_config(path / MODEL_CONFIG_NAME if path.is_dir() else path.with_name(MODEL_CONFIG_NAME))
    if config is None:
        return None
    if "depth_decoder_config" in config:
        return args_from_hf_config(config, path)
    if "backbone_flavor" in config or "backbone" in config:
        return model_args_from_dict(config, path)
    return None


def read_model_weights(source: str | Path, revision: str | None = None) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """Weights (official names, stored dtype) and config from any source: hub id, official or transformers
    directory (sharded or not), .safetensors file, or .pt checkpoint (ours, the original repo's, ckpt.pt)."""
    path = resolve_source(source, revision)
    if path.is_dir():
        has_weights = (path / MODEL_WEIGHTS_NAME).is_file() or (path / SHARD_INDEX_NAME).is_file()
        if not has_weights and (path / OFFICIAL_CKPT_NAME).is_file():
            path = path / OFFICIAL_CKPT_NAME
        elif not has_weights:
            pts = sorted(path.glob("*.pt"))
            hint = f" (it has {pts[0].name}: pass that file)" if pts else ""
            raise UserError(f"{path} has no {MODEL_WEIGHTS_NAME} or {SHARD_INDEX_NAME}; expected config.json + weights "
                            f"in the official or transformers layout{hint}")
        else:
            return _to_official(read_safetensors(path), read_config(path / MODEL_CONFIG_NAME), source)
    if path.suffix == ".safetensors":
        return _to_official(read_safetensors(path), read_config(path.with_name(MODEL_CONFIG_NAME)), source)
    state_dict, args = _state_dict_from_pt(read_pt(path), path)
    beside = read_config(path.with_name(MODEL_CONFIG_NAME)) if args is None else None
    return _to_official(state_dict, beside, source, args)


def model_tokenizer_dir(source: str | Path, revision: str | None = None) -> Path | None:
    """The directory of a model source's own tokenizer files (the transformers layout carries them), or None."""
    path = resolve_source(source, revision)
    directory = path if path.is_dir() else path.parent
    return directory if any((directory / name).is_file() for name in TOKENIZER_FILES) else None


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


def load_model(source: str | Path = DEFAULT_MODEL, device="cpu", dtype: torch.dtype | None = torch.float32,
               revision: str | None = None) -> CSM:
    """Load a CSM from any source and layout (see read_model_weights), strict key match.

    `dtype` None keeps the stored dtype exactly (bf16 stays bf16); otherwise the weights are cast to it.
    `revision` pins a hub repo's branch, tag or commit.
    """
    state_dict, args = read_model_weights(source, revision)
    with torch.device("meta"):
        model = CSM(args)
    check_keys(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)


# --------------------------------------------------------------------------- writing


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' -> bytes (decimal units as the hub counts them; KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(KB|MB|GB|KiB|MiB|GiB)\s*", str(text))
    if not m or float(m[1]) <= 0:
        raise UserError(f"size {text!r}: give a positive size such as 5GB or 500MB")
    unit = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[m[2]]
    return int(float(m[1]) * unit)


def save_safetensors(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int | None = None) -> list[Path]:
    """Tensors in the hub's file layout: model.safetensors, or shards of at most `max_shard_bytes`
    (model-0000k-of-0000n.safetensors) with model.safetensors.index.json, as transformers reads them."""
    sizes = {k: v.numel() * v.element_size() for k, v in state.items()}
    shards, current, used = [], {}, 0
    for key in state:  # in order, filled greedily; a tensor larger than the limit gets a shard of its own
        if current and max_shard_bytes is not None and used + sizes[key] > max_shard_bytes:
            shards.append(current)
            current, used = {}, 0
        current[key], used = state[key].contiguous(), used + sizes[key]
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(directory / MODEL_WEIGHTS_NAME), metadata={"format": "pt"})
        return [directory / MODEL_WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(directory / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(sizes.values())},
             "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
    (directory / SHARD_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [directory / n for n in names] + [directory / SHARD_INDEX_NAME]


def copy_tokenizer_files(source: Path | None, directory: str | Path) -> None:
    """Put a text tokenizer's files beside saved weights, so the directory is its own default tokenizer."""
    if source is None or not Path(source).is_dir():
        return
    for name in (*TOKENIZER_FILES, "special_tokens_map.json", "chat_template.jinja"):
        if (Path(source) / name).is_file():
            write_text_atomic(Path(directory) / name, (Path(source) / name).read_text())


def save_pretrained(model, directory: str | Path) -> Path:
    """Write config.json + model.safetensors (the official layout), each file atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / MODEL_WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", DIGEST_KEY: content_digest(state)})
    write_text_atomic(directory / MODEL_CONFIG_NAME, json.dumps(model_config_dict(model), indent=2) + "\n")
    return directory
