"""Mimi, the audio codec, in one place: its constants (24 kHz, 12.5 frames/s, 32 codebooks), where its weights
come from (a MimiModel directory or hub repo, a transformers CSM's codec_model.*, or moshi's file, converted on
load), loading it as transformers' MimiModel, and encoding clips to codes and codes back to audio.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
from safetensors.torch import save_file
import torch

from csm.model.conversions import HF_CODEC_PREFIX, rope_rows_to_hf
from csm.system.errors import UserError
from csm.model.hub import hub_snapshot, looks_like_repo_id
from csm.model.weights import MODEL_CONFIG_NAME, MODEL_WEIGHTS_NAME, SHARD_INDEX_NAME, read_config, read_safetensors

MIMI_SAMPLE_RATE = 24_000
MIMI_FRAME_RATE = 12.5
SAMPLES_PER_FRAME = int(MIMI_SAMPLE_RATE / MIMI_FRAME_RATE)  # 1920
NUM_CODEBOOKS = 32
DEFAULT_MIMI = "kyutai/mimi"  # Mimi in transformers' MimiModel layout, from its authors


# --------------------------------------------------------------------------- audio (Mimi)


def load_mimi(source: str | Path | None = None, device="cpu", num_codebooks: int = NUM_CODEBOOKS):
    """Mimi as transformers' MimiModel, frozen, from: a hub repo or local directory in the MimiModel layout
    (default kyutai/mimi), a transformers-layout CSM (its codec_model.*), or moshi's Mimi .safetensors file
    (converted on load, with a mimi_config.json beside it when it is not the default Mimi).

    The weights reach `MimiModel.from_pretrained` in the checkpoint layout (a MimiModel directory as it is,
    the others through a temporary one), so transformers itself maps them onto its modules (their layout
    differs between transformers 4 and 5)."""
    from transformers import MimiConfig, MimiModel  # transformers' import takes seconds: only when Mimi is used

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
    config = mimi_config_from_moshi(read_config(beside) if beside.is_file() else None)
    from transformers import MimiConfig  # transformers' import takes seconds: only Mimi's users pay for it

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
    config = read_config(hub_snapshot(str(source), [MODEL_CONFIG_NAME], "Mimi", hint, revision) / MODEL_CONFIG_NAME)
    if (config or {}).get("model_type") in ("mimi", "csm"):
        patterns = [MODEL_CONFIG_NAME, MODEL_WEIGHTS_NAME, "model-*.safetensors", SHARD_INDEX_NAME]
    else:
        patterns = [MODEL_CONFIG_NAME, MOSHI_MIMI_NAME]
    return hub_snapshot(str(source), patterns, "Mimi", hint, revision)


def mimi_model_dir(source: str | Path, revision: str | None = None) -> Path | None:
    """The directory of a source in the MimiModel layout itself (kyutai/mimi, a saved MimiModel), else None."""
    path = _resolve_codec_source(source, revision)
    directory = path if path.is_dir() else path.parent
    is_mimi = path.is_dir() and ((read_config(directory / MODEL_CONFIG_NAME) or {}).get("model_type") == "mimi")
    return directory if is_mimi else None


def read_codec_weights(source: str | Path, revision: str | None = None) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(Mimi weights in MimiModel layout, MimiConfig dict) from a MimiModel directory or hub repo (kyutai/mimi),
    a transformers-layout CSM (its codec_model.*), or moshi's Mimi file (converted); None when there is none."""
    path = _resolve_codec_source(source, revision)
    if path.is_file() and path.suffix == ".safetensors" and not (path.parent / MODEL_CONFIG_NAME).is_file():
        return read_moshi_mimi(path)
    directory = path if path.is_dir() else path.parent
    config = read_config(directory / MODEL_CONFIG_NAME) or {}
    if config.get("model_type") == "mimi":
        return read_safetensors(directory, skip_prefix=None), config
    if config.get("model_type") == "csm" and config.get("codec_config"):
        weights = read_safetensors(directory, skip_prefix=None, only_prefix=HF_CODEC_PREFIX)
        if weights:
            return {k[len(HF_CODEC_PREFIX):]: v for k, v in weights.items()}, config["codec_config"]
    if (directory / MOSHI_MIMI_NAME).is_file():
        return read_moshi_mimi(directory / MOSHI_MIMI_NAME)
    return None


def find_codec(sources: list) -> tuple[dict, dict]:
    """Mimi weights + config (MimiModel layout) from the first source that has them (None entries skipped)."""
    for source in sources:
        if source is None:
            continue
        try:
            found = read_codec_weights(source)
        except UserError:
            if source == sources[-1]:
                raise
            continue
        if found is not None:
            return found
    raise UserError(f"none of {', '.join(str(s) for s in sources if s)} holds Mimi in the MimiModel layout; "
                    f"pass --codec {DEFAULT_MIMI} (or a transformers CSM directory)")
