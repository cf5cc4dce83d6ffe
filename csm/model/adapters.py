"""Which parameters train, and adapters in and out: LoRA through peft (injected into the built-in model,
whose module names stay as they are), freezing parts of a full finetune, the trainable-only state that
checkpoints hold, merged weights for best/ and final/, and peft-format adapter directories (ours, or a
transformers CsmForConditionalGeneration adapter with its names and q/k rows mapped by weights.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file
import torch
from torch import nn

from csm.system.errors import UserError
from csm.system.outputs import atomic_path, write_text_atomic
from csm.model.weights import build_model
from csm.model.conversions import adapter_from_hf, HF_CODEC_PREFIX, is_hf_adapter

FINETUNE_MODES = ("full", "lora")
# The parts a full finetune can freeze, as module paths of the built-in model ("heads": both output heads).
FREEZABLE = {"text_embeddings": ("text_embeddings",), "audio_embeddings": ("audio_embeddings",),
             "backbone": ("backbone",), "decoder": ("decoder",), "projection": ("projection",),
             "codebook0_head": ("codebook0_head",), "audio_head": ("audio_head",),
             "heads": ("codebook0_head", "audio_head")}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")  # attention and SwiGLU projections
MODULES_TO_SAVE = ("text_embeddings", "audio_embeddings", "projection", "codebook0_head", "audio_head")
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how peft's PeftModel.save_pretrained names a model's tensors


# --------------------------------------------------------------------------- choosing what trains


def _params_under(model: nn.Module, paths) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if any(n == path or n.startswith(path + ".") for path in paths)]


def lora_config(rank: int, alpha: float, dropout: float, targets, target_modules=None, rank_pattern=None):
    """peft's LoraConfig for the built-in model: `targets` are its module names (q_proj, ..., w3)."""
    from peft import LoraConfig  # peft takes seconds to import: only LoRA runs pay for it

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                      target_modules=list(target_modules or targets), rank_pattern=rank_pattern or {})


def apply_finetune_mode(model: nn.Module, cfg) -> nn.Module:
    """Set what trains: everything (full), all but the `freeze` parts (full), or peft LoRA adapters on
    `lora_targets` plus the `lora_modules_to_save` trained whole (lora). Returns the same model."""
    if cfg.finetune == "full":
        for name in cfg.freeze:
            for _, p in _params_under(model, FREEZABLE[name]):
                p.requires_grad_(False)
        if not any(p.requires_grad for p in model.parameters()):
            raise UserError("freeze leaves nothing to train; remove a part from freeze")
        return model
    from peft import inject_adapter_in_model  # peft takes seconds to import: only LoRA runs pay for it

    inject_adapter_in_model(lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets), model)
    for _, p in _params_under(model, cfg.lora_modules_to_save):
        p.requires_grad_(True)
    return model


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer  # peft takes seconds to import: only LoRA runs pay for it

    return any(isinstance(m, LoraLayer) for m in model.modules())


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def is_partial(model: nn.Module) -> bool:
    """Does only part of the model train (frozen parts, or LoRA)?"""
    return any(not p.requires_grad for p in model.parameters())


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name: all a LoRA or frozen run's checkpoint needs besides its base model."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """Put a trainable-only state back, after checking it names exactly this run's trainable parameters."""
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(f"{source} trained other parameters than this run does ({len(missing)} missing, e.g. "
                        f"{', '.join(missing[:2]) or '-'}; {len(extra)} unexpected, e.g. "
                        f"{', '.join(extra[:2]) or '-'}): "
                        "resume with the finetune, lora_* and freeze settings it was saved with")
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise UserError(f"{source}: {name} has shape {tuple(value.shape)}, this run "
                                f"{tuple(params[name].shape)}")
            params[name].copy_(value)


# --------------------------------------------------------------------------- merged weights


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer  # peft takes seconds to import: only LoRA runs pay for it

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with every LoRA update added to its base weight (peft's own delta, so scaling,
    dropout-free inference and rsLoRA are peft's), under the official names."""
    layers = dict(_lora_layers(model))
    out = {}
    for name, value in model.state_dict().items():
        if ".lora_" in name:
            continue
        module, _, leaf = name.rpartition(".base_layer.")
        if module in layers:
            layer = layers[module]
            delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters)
            out[f"{module}.{leaf}"] = (value + delta.to(value.dtype)).detach().clone()
        else:
            out[name] = value.detach().clone()
    return out


def merged_model(model: nn.Module) -> nn.Module:
    """The model itself without LoRA; with LoRA, a CPU copy of it with the adapters merged in (the training
    model keeps its adapters, so training goes on exactly as before)."""
    if not has_lora(model):
        return model

    dtype = next(p for n, p in model.named_parameters() if ".lora_" not in n).dtype
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave training's RNG as it was
        copy = build_model(model.config, device="cpu", dtype=dtype)
    copy.load_state_dict({k: v.cpu() for k, v in merged_state_dict(model).items()})
    return copy.eval()


# --------------------------------------------------------------------------- adapter directories


def save_adapter(model: nn.Module, directory: Path, cfg) -> Path:
    """The LoRA adapter and the modules trained whole, in peft's format (adapter_config.json +
    adapter_model.safetensors, tensors named as PeftModel.save_pretrained names them), each file atomically."""
    from peft import get_peft_model_state_dict  # peft takes seconds to import: only LoRA runs pay for it

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {PEFT_PREFIX + k: v for k, v in get_peft_model_state_dict(model).items()}
    for name, p in _params_under(model, cfg.lora_modules_to_save):
        state[PEFT_PREFIX + name] = p.detach()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    config = lora_config(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets).to_dict()
    config.update(modules_to_save=list(cfg.lora_modules_to_save) or None, base_model_name_or_path=str(cfg.model),
                  peft_type="LORA", task_type=None, target_modules=sorted(config["target_modules"]))
    with atomic_path(directory / ADAPTER_WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_text_atomic(directory / ADAPTER_CONFIG_NAME, json.dumps(config, indent=2, default=str) + "\n")
    return directory


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter directory's config (plain JSON: nothing in it runs) and tensors, with clear errors."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"--adapter {directory}: no such directory (give a peft adapter directory)")
    config_file, weights_file = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        raise UserError(f"--adapter {directory}: expected {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} "
                        "(a peft adapter saved with save_pretrained; .bin adapters are not read)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        state = load_file(str(weights_file))
    except Exception as e:  # a damaged or foreign file: JSON or safetensors errors of many types
        raise UserError(f"--adapter {directory}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"--adapter {directory} is a {config.get('peft_type')} adapter; only LoRA adapters are read")
    for flag, why in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) layers")):
        if config.get(flag):
            raise UserError(f"--adapter {directory} uses {why}, which this toolkit does not load")
    if config.get("bias", "none") != "none":
        raise UserError(f"--adapter {directory} trains biases (bias={config['bias']!r}); CSM has none")
    return config, state


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Put a LoRA adapter (ours, or one trained on transformers' CsmForConditionalGeneration) onto the
    built-in model, unmerged: LoRA layers through peft, modules saved whole copied in. Returns the model."""
    # peft takes seconds to import: only LoRA runs pay for it
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    config, state = read_adapter(directory)
    if not all(k.startswith(PEFT_PREFIX) for k in state):
        raise UserError(f"--adapter {directory}: tensor names are not peft's ({next(iter(state))})")
    state = {k[len(PEFT_PREFIX):]: v for k, v in state.items()}
    if is_hf_adapter(state):
        codec = [k for k, v in state.items() if k.startswith(HF_CODEC_PREFIX) and ".lora_B." in k and v.any()]
        if codec:
            print(f"warning: --adapter {directory} also changes the codec (Mimi; e.g. {codec[0]}); that part is not "
                  "applied: audio is decoded by the Mimi of --mimi_weights", file=sys.stderr)
        state = adapter_from_hf(state, model.config, directory)
    lora = {k: v for k, v in state.items() if k.endswith((".lora_A.weight", ".lora_B.weight"))}
    whole = {k: v for k, v in state.items() if k not in lora}
    if any(".lora_" in k for k in whole):
        raise UserError(f"--adapter {directory}: LoRA tensors of a kind not read here (e.g. "
                        f"{next(k for k in whole if '.lora_' in k)}); only lora_A/lora_B of linear layers")
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in lora})
    known = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = [m for m in modules if m not in known]
    if unknown:
        raise UserError(f"--adapter {directory}: LoRA on modules this model has no linear layer for "
                        f"(e.g. {', '.join(unknown[:3])})")
    layers = dict(model.named_modules())
    for m in modules:  # peft would stop with a size-mismatch traceback
        a, b, layer = lora.get(f"{m}.lora_A.weight"), lora.get(f"{m}.lora_B.weight"), layers[m]
        if a is None or b is None:
            raise UserError(f"--adapter {directory}: {m} has lora_{'A' if a is None else 'B'} missing")
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != layer.in_features or b.shape[0] != layer.out_features \
                or b.shape[1] != a.shape[0]:
            raise UserError(f"--adapter {directory} does not fit this model: its LoRA for {m} has A {tuple(a.shape)} "
                            f"and B {tuple(b.shape)}, but the layer maps {layer.in_features} -> {layer.out_features} "
                            "(was it trained on a model of another size?)")
    if modules:
        ranks = {m: int(lora[f"{m}.lora_A.weight"].shape[0]) for m in modules}
        rank = int(config.get("r") or max(ranks.values()))
        pattern = {m: r for m, r in ranks.items() if r != rank}
        if config.get("alpha_pattern"):
            raise UserError(f"--adapter {directory} sets alpha_pattern, which is not read; "
                            f"merge it where it was trained")
        peft_config = lora_config(rank, config.get("lora_alpha", rank), 0.0, (), target_modules=modules,
                                  rank_pattern=pattern)
        peft_config.use_rslora = bool(config.get("use_rslora", False))
        inject_adapter_in_model(peft_config, model)
        result = set_peft_model_state_dict(model, lora)
        bad = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
        if bad:
            raise UserError(f"--adapter {directory}: tensors that do not fit the model (e.g. {bad[0]})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in whole.items():
            if name not in params or params[name].shape != value.shape:
                raise UserError(f"--adapter {directory}: {name} does not fit this model")
            params[name].copy_(value)
    model.requires_grad_(False)
    return model.eval()
