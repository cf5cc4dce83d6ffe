"""Model weights in every layout, their conversions, and the one way a model is built or loaded.

Layouts, detected from the files (never from a name):
- official: `config.json` (flavors) + `model.safetensors`, or a plain state dict such as the release's
  `ckpt.pt`; also this project's training checkpoints and the original finetuning repo's `.pt` files.
- transformers (`CsmForConditionalGeneration`): `config.json` with `model_type: csm` + `model.safetensors`
  or shards with `model.safetensors.index.json`; what `sesame/csm-1b` and its finetunes serve today.

transformers -> official (`hf_to_official`) and official -> transformers (`official_to_hf`) stand side by
side, with the per-head q/k row permutation (rotate-half RoPE) and its inverse next to each other, and
the config mapping in both directions (`args_from_hf_config`, `hf_config_from_args`). Both are exact:
keys are renamed, rows are permuted, no value is computed, and a stored dtype is kept.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import pickle
import re
from pathlib import Path

import torch

from csm_model import CSM, FLAVORS, Flavor, ModelArgs
from hub import hub_snapshot, looks_like_repo_id
from utils import content_digest, UserError
from outputs import atomic_path, write_text_atomic

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

OFFICIAL, TRANSFORMERS = "official", "transformers"
DIGEST_KEY = "csm_train_sha256"  # safetensors metadata: a digest of the tensors, checked when read back
HF_CODEC_PREFIX = "codec_model."
HF_TIED_AUDIO = "depth_decoder.model.embed_tokens.weight"  # a tied copy of the backbone's audio table

# transformers' RoPE is configured by original_max_position_embeddings / low / high frequency factors;
# only their ratios matter. CSM's (context 8192, low 1, high 4) is written with these equivalents,
# as the official transformers checkpoint does, so that transformers does not warn about a context
# longer than max_position_embeddings.
_HF_ROPE = {"backbone": (1024, 0.125, 0.5), "decoder": (16, 1 / 512, 1 / 128)}
_ROPE_CONTEXT, _ROPE_LOW, _ROPE_HIGH = 8192, 1.0, 4.0


# --------------------------------------------------------------------------- official <-> transformers keys


_HF_TOP = {  # official name -> transformers name
    "text_embeddings.weight": "embed_text_tokens.weight",
    "audio_embeddings.weight": "backbone_model.embed_tokens.embed_audio_tokens.weight",
    "projection.weight": "depth_decoder.model.inputs_embeds_projector.weight",
    "codebook0_head.weight": "lm_head.weight",
    "audio_head": "depth_decoder.codebooks_head.weight",
    "backbone.norm.scale": "backbone_model.norm.weight",
    "decoder.norm.scale": "depth_decoder.model.norm.weight",
}
_HF_STACKS = {"backbone": "backbone_model", "decoder": "depth_decoder.model"}
_HF_LAYER = {
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.output_proj.weight": "self_attn.o_proj.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "sa_norm.scale": "input_layernorm.weight",
    "mlp_norm.scale": "post_attention_layernorm.weight",
}
_OFFICIAL_TOP = {v: k for k, v in _HF_TOP.items()}
_OFFICIAL_STACKS = {v: k for k, v in _HF_STACKS.items()}
_OFFICIAL_LAYER = {v: k for k, v in _HF_LAYER.items()}
_LAYER_KEY = re.compile(r"^(?P<stack>.+)\.layers\.(?P<i>\d+)\.(?P<rest>.+)$")


def _rename(key: str, top: dict, stacks: dict, layer: dict) -> str:
    if key in top:
        return top[key]
    m = _LAYER_KEY.match(key)
    if m and m["stack"] in stacks and m["rest"] in layer:
        return f"{stacks[m['stack']]}.layers.{m['i']}.{layer[m['rest']]}"
    raise KeyError(key)


def official_key_to_hf(key: str) -> str:
    return _rename(key, _HF_TOP, _HF_STACKS, _HF_LAYER)


def hf_key_to_official(key: str) -> str:
    return _rename(key, _OFFICIAL_TOP, _OFFICIAL_STACKS, _OFFICIAL_LAYER)


def rope_rows_to_hf(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """q/k projection rows from adjacent-pair RoPE (Meta, ours) to rotate-half RoPE (transformers), per head."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rope_rows_from_hf(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The exact inverse of rope_rows_to_hf."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, 2, rows // num_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _rope_heads(official_key: str, args: ModelArgs) -> int | None:
    """Heads whose rows a q/k projection holds (None for every other tensor)."""
    dims = args.backbone if official_key.startswith("backbone.") else args.decoder
    if official_key.endswith("attn.q_proj.weight"):
        return dims.num_heads
    if official_key.endswith("attn.k_proj.weight"):
        return dims.num_kv_heads
    return None


def official_to_hf(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our/official weights -> CsmForConditionalGeneration's (without codec_model.*), values unchanged."""
    out = {}
    for key, value in state_dict.items():
        heads = _rope_heads(key, args)
        out[official_key_to_hf(key)] = value if heads is None else rope_rows_to_hf(value, heads).contiguous()
    out[HF_TIED_AUDIO] = out[_HF_TOP["audio_embeddings.weight"]]
    return out


def hf_to_official(state_dict: dict[str, torch.Tensor], args: ModelArgs, source) -> dict[str, torch.Tensor]:
    """CsmForConditionalGeneration weights -> ours: keys renamed, q/k rows un-permuted, codec dropped.

    The depth decoder's copy of the audio table must equal the backbone's (transformers ties them);
    two different tables cannot become one model, so that is refused rather than one silently chosen.
    """
    audio_key = _HF_TOP["audio_embeddings.weight"]
    audio, tied = state_dict.get(audio_key), state_dict.get(HF_TIED_AUDIO)
    if audio is not None and tied is not None and not torch.equal(audio, tied):
        raise UserError(f"{source}: the backbone's audio embedding table and the depth decoder's copy "
                        f"({HF_TIED_AUDIO}) differ; CSM has one table, so this checkpoint cannot be loaded as CSM")
    if audio is None and tied is not None:  # transformers' save_pretrained keeps one of two tied tensors
        state_dict = {**state_dict, audio_key: tied}
    out, unknown = {}, []
    for key, value in state_dict.items():
        if key.startswith(HF_CODEC_PREFIX) or key == HF_TIED_AUDIO:
            continue
        try:
            new = hf_key_to_official(key)
        except KeyError:
            unknown.append(key)
            continue
        heads = _rope_heads(new, args)
        out[new] = value if heads is None else rope_rows_from_hf(value, heads).contiguous()
    if unknown:
        raise UserError(f"{source}: {len(unknown)} tensors that a CSM in the transformers layout does not have "
                        f"(e.g. {', '.join(sorted(unknown)[:3])})")
    return out


# --------------------------------------------------------------------------- peft LoRA adapters

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_[AB])\.weight$")


def _adapter_rename(key: str, rename) -> tuple[str, str | None]:
    """(new key, 'lora_A'/'lora_B' or None for a whole tensor) with the module path renamed by `rename`
    (which maps weight keys: a LoRA pair is named after the weight it updates)."""
    m = _LORA_KEY.match(key)
    if m is None:
        return rename(key), None
    return f"{rename(m['module'] + '.weight').removesuffix('.weight')}.{m['part']}.weight", m["part"]


def is_hf_adapter(state: dict) -> bool:
    """Are an adapter's tensor names (peft prefix removed) those of a transformers CsmForConditionalGeneration?"""
    return any(k.startswith(("backbone_model.", "depth_decoder.", "lm_head.", "embed_text_tokens.")) for k in state)


def adapter_from_hf(state: dict[str, torch.Tensor], args: ModelArgs, source) -> dict[str, torch.Tensor]:
    """A LoRA adapter of CsmForConditionalGeneration -> ours: module paths renamed like the weights, and the
    lora_B rows of q/k projections un-permuted (B's rows are the updated weight's rows; A is unchanged).
    Adapters on its codec (codec_model.*, Mimi) are left out, as the weights' codec is."""
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith(HF_CODEC_PREFIX):  # Mimi is not part of the built-in model (see load_adapter)
            continue
        try:
            new, part = _adapter_rename(key, hf_key_to_official)
        except KeyError:
            unknown.append(key)
            continue
        heads = _rope_heads(new.replace(f".{part}.weight", ".weight") if part else new, args)
        if heads is not None and part != "lora_A":
            value = rope_rows_from_hf(value, heads).contiguous()
        out[new] = value
    if unknown:
        raise UserError(f"{source}: adapter tensors for modules a CSM does not have (e.g. "
                        f"{', '.join(sorted(unknown)[:3])})")
    return out


def adapter_to_hf(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """The exact inverse of adapter_from_hf: our adapter's tensors under CsmForConditionalGeneration's names."""
    out = {}
    for key, value in state.items():
        new, part = _adapter_rename(key, official_key_to_hf)
        heads = _rope_heads(key.replace(f".{part}.weight", ".weight") if part else key, args)
        out[new] = value if heads is None or part == "lora_A" else rope_rows_to_hf(value, heads).contiguous()
    return out


# --------------------------------------------------------------------------- configs


def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-6)


def _flavor_from_hf(cfg: dict, part: str, source) -> Flavor:
    """One transformer's dimensions from a transformers config, with every field we cannot honour refused."""
    where = f"{source} ({'depth_decoder_config' if part == 'decoder' else 'config'})"
    try:
        hidden, heads, kv = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"])
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        checks = {"hidden_act": (cfg.get("hidden_act", "silu"), "silu"),
                  "attention_bias": (bool(cfg.get("attention_bias", False)), False),
                  "mlp_bias": (bool(cfg.get("mlp_bias", False)), False)}
        for key, (got, want) in checks.items():
            if got != want:
                raise UserError(f"{where}: {key}={got!r} is not CSM's ({want!r}); refusing to load a different model")
        if head_dim * heads != hidden:
            raise UserError(f"{where}: head_dim {head_dim} x {heads} heads != hidden_size {hidden}; "
                            "CSM's attention needs head_dim = hidden_size / heads")
        # transformers 4 writes rope_scaling + rope_theta; transformers 5 one rope_parameters holding both.
        params = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
        rope_theta = cfg.get("rope_theta") or params.get("rope_theta") or 500_000.0
        if not scaling:
            raise UserError(f"{where}: no rope_scaling. CSM uses Llama-3 RoPE scaling; a config without it "
                            "(e.g. a CsmConfig built from defaults) is a different model, so it is refused")
        kind = scaling.get("rope_type", scaling.get("type"))
        original = float(scaling.get("original_max_position_embeddings", 0))
        low, high = float(scaling.get("low_freq_factor", 0)), float(scaling.get("high_freq_factor", 0))
        if kind != "llama3" or not (low > 0 and high > 0 and _close(original / low, _ROPE_CONTEXT / _ROPE_LOW)
                                    and _close(original / high, _ROPE_CONTEXT / _ROPE_HIGH)):
            raise UserError(f"{where}: rope_scaling {scaling} is not CSM's Llama-3 scaling (wavelength thresholds "
                            f"{_ROPE_CONTEXT / _ROPE_LOW:g} and {_ROPE_CONTEXT / _ROPE_HIGH:g}); "
                            f"refusing to load a different model")
        max_seq_len = int(cfg.get("max_position_embeddings",
                                  2048)) if part == "backbone" else FLAVORS["llama-100M"].max_seq_len
        return Flavor(num_layers=int(cfg["num_hidden_layers"]), num_heads=heads, num_kv_heads=kv, embed_dim=hidden,
                      intermediate_dim=int(cfg["intermediate_size"]), max_seq_len=max_seq_len,
                      norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), rope_base=float(rope_theta),
                      rope_scale_factor=float(scaling["factor"]))
    except KeyError as e:
        raise UserError(f"{where} lacks {e}; it is not a complete CsmConfig") from None


def args_from_hf_config(cfg: dict, source) -> ModelArgs:
    """ModelArgs from a CsmConfig dict (config.json of the transformers layout), every field checked."""
    dec = cfg.get("depth_decoder_config") or {}
    if not dec:
        raise UserError(f"{source}: config.json has no depth_decoder_config; it is not a complete CsmConfig")
    backbone, decoder = _flavor_from_hf(cfg, "backbone", source), _flavor_from_hf(dec, "decoder", source)
    k, vocab = int(cfg.get("num_codebooks", 32)), int(cfg.get("vocab_size", 2051))
    mismatched = [name for name, a, b in (("num_codebooks", k, dec.get("num_codebooks", k)),
                                          ("vocab_size", vocab, dec.get("vocab_size", vocab)),
                                          ("backbone_hidden_size", backbone.embed_dim,
                                           dec.get("backbone_hidden_size", backbone.embed_dim))) if int(a) != int(b)]
    if mismatched:
        raise UserError(f"{source}: config and depth_decoder_config disagree on {', '.join(mismatched)}")
    if not cfg.get("tie_codebooks_embeddings", True):
        raise UserError(f"{source}: tie_codebooks_embeddings is false; CSM has one audio embedding table")
    return ModelArgs(backbone=backbone, decoder=decoder, backbone_flavor="", decoder_flavor="",
                     text_vocab_size=int(cfg.get("text_vocab_size", 128_256)), audio_vocab_size=vocab,
                     audio_num_codebooks=k)


def _hf_transformer_config(dims: Flavor, part: str) -> dict:
    original, low, high = _HF_ROPE[part]
    return {"hidden_size": dims.embed_dim, "intermediate_size": dims.intermediate_dim,
            "num_hidden_layers": dims.num_layers, "num_attention_heads": dims.num_heads,
            "num_key_value_heads": dims.num_kv_heads, "head_dim": dims.head_dim, "rms_norm_eps": dims.norm_eps,
            "rope_theta": dims.rope_base, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "rope_scaling": {"rope_type": "llama3", "factor": dims.rope_scale_factor, "low_freq_factor": low,
                             "high_freq_factor": high, "original_max_position_embeddings": original}}


def hf_config_from_args(args: ModelArgs) -> dict:
    """CsmConfig keyword arguments (without codec_config and token ids) for these dimensions."""
    decoder = {**_hf_transformer_config(args.decoder, "decoder"), "num_codebooks": args.audio_num_codebooks,
               "backbone_hidden_size": args.backbone.embed_dim, "vocab_size": args.audio_vocab_size,
               "max_position_embeddings": args.audio_num_codebooks + 1}
    return {**_hf_transformer_config(args.backbone, "backbone"), "num_codebooks": args.audio_num_codebooks,
            "vocab_size": args.audio_vocab_size, "text_vocab_size": args.text_vocab_size,
            "max_position_embeddings": args.backbone.max_seq_len, "tie_codebooks_embeddings": True,
            "depth_decoder_config": decoder}


def model_args_from_dict(d: dict, source="config") -> ModelArgs:
    """ModelArgs from an official config.json (or a checkpoint's model_args); unknown fields ignored."""
    known = ("backbone_flavor", "decoder_flavor", "text_vocab_size", "audio_vocab_size", "audio_num_codebooks",
             "backbone", "decoder")
    try:
        return ModelArgs(**{k: v for k, v in d.items() if k in known})
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: bad model config ({e})") from e


def model_config_dict(model) -> dict:
    """The config of a model as a plain dict (what config.json and checkpoints hold)."""
    return model.config.to_dict() if hasattr(model.config, "to_dict") else dict(vars(model.config))


def infer_model_args(state_dict: dict[str, torch.Tensor], source="the checkpoint") -> ModelArgs:
    """Config from weight shapes, for checkpoints saved without one. Head counts are not in the shapes,
    so only the named flavors can be recognised."""

    def match(prefix: str) -> str:
        n_layers = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(rf"{prefix}\.layers\.(\d+)\.", k)))
        dim = state_dict[f"{prefix}.norm.scale"].shape[0]
        kv = state_dict[f"{prefix}.layers.0.attn.k_proj.weight"].shape[0]
        ffn = state_dict[f"{prefix}.layers.0.mlp.w1.weight"].shape[0]
        for name, f in FLAVORS.items():
            if (f.num_layers, f.embed_dim, f.num_kv_heads * f.head_dim, f.intermediate_dim) == (n_layers, dim, kv, ffn):
                return name
        raise UserError(f"{source} has no config, and its {prefix} (layers={n_layers}, dim={dim}, kv_dim={kv}, "
                        f"ffn={ffn}) matches no named flavor ({', '.join(FLAVORS)}), so its head count is unknown; "
                        "put a config.json beside it")

    try:
        return ModelArgs(
            backbone_flavor=match("backbone"),
            decoder_flavor=match("decoder"),
            text_vocab_size=state_dict["text_embeddings.weight"].shape[0],
            audio_vocab_size=state_dict["codebook0_head.weight"].shape[0],
            audio_num_codebooks=state_dict["audio_head"].shape[0] + 1,
        )
    except (KeyError, ValueError) as e:
        raise UserError(f"the weights in {source} do not look like a CSM model (missing {e})") from e


# --------------------------------------------------------------------------- reading files


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
    from safetensors import SafetensorError, safe_open

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


def detect_layout(keys, config: dict | None, source) -> str:
    """'transformers' or 'official', from the config's model_type or the tensor names."""
    keys = list(keys)
    if (config or {}).get("model_type") == "csm" or any(k.startswith(("backbone_model.",
                                                                      "depth_decoder.")) for k in keys):
        return TRANSFORMERS
    if any(k.startswith(("backbone.layers.", "text_embeddings")) for k in keys):
        return OFFICIAL
    raise UserError(f"{source} does not hold CSM weights in a known layout (official or transformers); "
                    f"first tensor names: {', '.join(sorted(keys)[:3]) or 'none'}")


def _read_config(path: Path) -> dict | None:
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
    config = _read_config(path / MODEL_CONFIG_NAME if path.is_dir() else path.with_name(MODEL_CONFIG_NAME))
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
            return _to_official(read_safetensors(path), _read_config(path / MODEL_CONFIG_NAME), source)
    if path.suffix == ".safetensors":
        return _to_official(read_safetensors(path), _read_config(path.with_name(MODEL_CONFIG_NAME)), source)
    state_dict, args = _state_dict_from_pt(read_pt(path), path)
    beside = _read_config(path.with_name(MODEL_CONFIG_NAME)) if args is None else None
    return _to_official(state_dict, beside, source, args)


def model_tokenizer_dir(source: str | Path, revision: str | None = None) -> Path | None:
    """The directory of a model source's own tokenizer files (the transformers layout carries them), or None."""
    path = resolve_source(source, revision)
    directory = path if path.is_dir() else path.parent
    return directory if any((directory / name).is_file() for name in TOKENIZER_FILES) else None


# --------------------------------------------------------------------------- Mimi: moshi's layout -> MimiModel's

MOSHI_MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"  # moshi's Mimi file (kyutai/moshiko-pytorch-bf16)
MOSHI_MIMI_CONFIG_NAME = "mimi_config.json"  # beside a moshi file: moshi's config of a non-default Mimi
# Substring renames from moshi's Mimi names to transformers' MimiModel names, applied in order.
_MIMI_RENAMES = (
    ("conv.conv.conv", "conv"), ("convtr.convtr.convtr", "conv"), ("conv.conv", "conv"), ("convtr.convtr", "conv"),
    ("quantizer.rvq_first.vq", "quantizer.semantic_residual_vector_quantizer"),
    ("quantizer.rvq_first", "quantizer.semantic_residual_vector_quantizer"),
    ("quantizer.rvq_rest.vq", "quantizer.acoustic_residual_vector_quantizer"),
    ("quantizer.rvq_rest", "quantizer.acoustic_residual_vector_quantizer"),
    ("_codebook", "codebook"), ("_initialized", "initialized"), ("embedding_sum", "embed_sum"),
    ("encoder.model", "encoder.layers"), ("decoder.model", "decoder.layers"),
    ("encoder_transformer.transformer", "encoder_transformer"),
                 ("decoder_transformer.transformer", "decoder_transformer"),
    ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2"), ("self_attn.out_projs.0", "self_attn.o_proj"),
    ("self_attn.out_proj", "self_attn.o_proj"), ("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"),
    ("layer_scale_1", "self_attn_layer_scale"), ("layer_scale_2", "mlp_layer_scale"),
)
_MOSHI_QKV = ("self_attn.in_projs.0.weight", "self_attn.in_proj_weight")


def mimi_config_from_moshi(cfg: dict | None) -> dict:
    """MimiConfig fields for a moshi Mimi config (None: moshi's default Mimi, which is MimiConfig's default)."""
    if cfg is None:
        return {"model_type": "mimi"}
    try:
        s, q, t = cfg["seanet"], cfg["quantizer"], cfg["transformer"]
        return {"model_type": "mimi", "sampling_rate": cfg["sample_rate"], "audio_channels": cfg["channels"],
                "hidden_size": s["dimension"], "num_filters": s["n_filters"],
                "num_residual_layers": s["n_residual_layers"],
                "upsampling_ratios": list(s["ratios"]), "kernel_size": s["kernel_size"],
                "last_kernel_size": s["last_kernel_size"], "residual_kernel_size": s["residual_kernel_size"],
                "dilation_growth_rate": s["dilation_base"], "use_causal_conv": s["causal"], "pad_mode": s["pad_mode"],
                "compress": s["compress"], "codebook_size": q["bins"], "codebook_dim": q["dimension"],
                "num_quantizers": q["n_q"], "vector_quantization_hidden_dimension": q["dimension"],
                "upsample_groups": s["dimension"], "num_hidden_layers": t["num_layers"],
                "intermediate_size": t["dim_feedforward"], "num_attention_heads": t["num_heads"],
                "num_key_value_heads": t["num_heads"], "head_dim": t["d_model"] // t["num_heads"],
                "sliding_window": t["context"], "rope_theta": float(t["max_period"]),
                "layer_scale_initial_scale": t["layer_scale"]}
    except (KeyError, TypeError) as e:
        raise UserError(f"moshi Mimi config lacks {e}") from None


def moshi_mimi_to_hf(state_dict: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """moshi's Mimi weights -> MimiModel's: names mapped, the fused q/k/v split, q/k rows permuted for
    rotate-half RoPE (the same per-head permutation as CSM's). Values are not changed."""
    out = {}
    for key, value in state_dict.items():
        new = key
        for old, replacement in _MIMI_RENAMES:
            new = new.replace(old, replacement)
        qkv = next((suffix for suffix in _MOSHI_QKV if new.endswith(suffix)), None)
        if qkv is None:
            out[new] = value
            continue
        base, d = new[: -len(qkv)] + "self_attn.", value.shape[0] // 3
        out[base + "q_proj.weight"] = rope_rows_to_hf(value[:d], num_heads).contiguous()
        out[base + "k_proj.weight"] = rope_rows_to_hf(value[d:2 * d], num_heads).contiguous()
        out[base + "v_proj.weight"] = value[2 * d:].contiguous()
    return out


def read_moshi_mimi(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A moshi Mimi safetensors file (with its mimi_config.json when not the default Mimi), as MimiModel weights."""
    beside = path.with_name(MOSHI_MIMI_CONFIG_NAME)
    config = mimi_config_from_moshi(_read_config(beside) if beside.is_file() else None)
    from transformers import MimiConfig

    heads = MimiConfig(**{k: v for k, v in config.items() if k != "model_type"}).num_attention_heads
    return moshi_mimi_to_hf(read_safetensors(path, skip_prefix=None), heads), config


def _resolve_codec_source(source, revision) -> Path:
    """Like resolve_source, but a hub repo's config decides what else is fetched: the weights of a
    MimiModel/CSM repo, or only moshi's Mimi file from a moshi repo (whose model.safetensors is a 7B LM)."""
    path = Path(str(source)).expanduser()
    if path.exists():
        return path
    if not looks_like_repo_id(str(source)):
        raise UserError(f"Mimi weights {str(source)!r} not found: give a MimiModel "
                        f"directory or hub repo (kyutai/mimi), "
                        "a transformers CSM, or moshi's Mimi .safetensors file (--mimi_weights, --codec)")
    hint = ("Or pass --mimi_weights (or --codec) a local MimiModel directory, a transformers CSM directory or "
            "moshi's Mimi .safetensors file.")
    config = _read_config(hub_snapshot(str(source), [MODEL_CONFIG_NAME], "Mimi", hint, revision) / MODEL_CONFIG_NAME)
    if (config or {}).get("model_type") in ("mimi", "csm"):
        patterns = [MODEL_CONFIG_NAME, MODEL_WEIGHTS_NAME, "model-*.safetensors", SHARD_INDEX_NAME]
    else:
        patterns = [MODEL_CONFIG_NAME, MOSHI_MIMI_NAME]
    return hub_snapshot(str(source), patterns, "Mimi", hint, revision)


def mimi_model_dir(source: str | Path, revision: str | None = None) -> Path | None:
    """The directory of a source in the MimiModel layout itself (kyutai/mimi, a saved MimiModel), else None."""
    path = _resolve_codec_source(source, revision)
    directory = path if path.is_dir() else path.parent
    is_mimi = path.is_dir() and ((_read_config(directory / MODEL_CONFIG_NAME) or {}).get("model_type") == "mimi")
    return directory if is_mimi else None


def read_codec_weights(source: str | Path, revision: str | None = None) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(Mimi weights in MimiModel layout, MimiConfig dict) from a MimiModel directory or hub repo (kyutai/mimi),
    a transformers-layout CSM (its codec_model.*), or moshi's Mimi file (converted); None when there is none."""
    path = _resolve_codec_source(source, revision)
    if path.is_file() and path.suffix == ".safetensors" and not (path.parent / MODEL_CONFIG_NAME).is_file():
        return read_moshi_mimi(path)
    directory = path if path.is_dir() else path.parent
    config = _read_config(directory / MODEL_CONFIG_NAME) or {}
    if config.get("model_type") == "mimi":
        return read_safetensors(directory, skip_prefix=None), config
    if config.get("model_type") == "csm" and config.get("codec_config"):
        weights = read_safetensors(directory, skip_prefix=None, only_prefix=HF_CODEC_PREFIX)
        if weights:
            return {k[len(HF_CODEC_PREFIX):]: v for k, v in weights.items()}, config["codec_config"]
    if (directory / MOSHI_MIMI_NAME).is_file():
        return read_moshi_mimi(directory / MOSHI_MIMI_NAME)
    return None


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
    from safetensors.torch import save_file

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
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / MODEL_WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", DIGEST_KEY: content_digest(state)})
    write_text_atomic(directory / MODEL_CONFIG_NAME, json.dumps(model_config_dict(model), indent=2) + "\n")
    return directory
