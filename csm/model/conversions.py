"""The conversions between CSM's weight layouts, as pure functions of tensors and dicts (no file or hub access):
official <-> transformers parameter names, the per-head q/k row permutation of rotate-half RoPE and its
inverse, peft adapter keys in both layouts, and the config maps in both directions. Both directions are exact:
keys are renamed, rows are permuted, no value is computed, and a stored dtype is kept. weights.py reads,
resolves, loads and saves with them.
"""
from __future__ import annotations

import math
import re

import torch

from csm.model.csm_model import FLAVORS, Flavor, ModelArgs
from csm.system.errors import UserError

OFFICIAL, TRANSFORMERS = "official", "transformers"
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


def clean_state_dict(state_dict: dict) -> dict[str, torch.Tensor]:
    """Strip the prefixes torch.compile ('_orig_mod.') and DDP ('module.') add to parameter names."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
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
