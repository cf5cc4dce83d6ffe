"""The one typed training configuration: defaults, YAML + CLI overrides, validation before any work.

Every key is documented here; the config reference page (docs/config.md) is generated from these fields.
"""
from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import yaml

from csm.model.adapters import FINETUNE_MODES, FREEZABLE, LORA_TARGETS, MODULES_TO_SAVE
from csm.data.context import CONTEXT_LOSSES, CONTEXT_MODES
from csm.judging.metrics import SELECTS_BEST
from csm.training.ema import check_decay
from csm.training.objectives import OBJECTIVES
from csm.training.optim import COMPENSATIONS, LR_DECAYS, OPTIMIZER_STATES, OPTIMIZERS, WEIGHT_DTYPES
from csm.training.parallel import DISTRIBUTED
from csm.judging.speech_metrics import DEFAULT_ASR, DEFAULT_SPEAKER_MODEL
from csm.training.tracking import WANDB_MODES
from csm.system.errors import UserError
from csm.system.runtime import PRECISIONS
from csm.system.outputs import write_text_atomic
from csm.model.csm_model import FLAVORS



def _f(default, help: str, *, choices=None, min=None, max=None, gt=None, default_factory=None):
    meta = {"help": help, "choices": choices, "min": min, "max": max, "gt": gt}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- model
    model: str = _f("sesame/csm-1b",
                    "Weights to finetune: hub id, directory (official or transformers layout), .safetensors or .pt.")
    model_revision: str | None = _f(None, "Branch, tag or commit of a hub `model` (default: main).")
    train_from_scratch: bool = _f(False, "Ignore `model` and start from random weights (see docs/training.md).")
    backbone_flavor: str = _f("llama-1B", "Backbone shape when training from scratch.")
    decoder_flavor: str = _f("llama-100M", "Decoder shape when training from scratch.")
    text_vocab_size: int = _f(128_256, "Text vocabulary size when training from scratch.", min=1)
    text_tokenizer: str | None = _f(None,
                                    "Tokenizer for the sample sentences (hub id or dir; default: the model's own, "
                                    "else meta-llama/Llama-3.2-1B).")
    mimi_weights: str | None = _f(None,
                                  "Mimi for decoding samples: MimiModel dir or hub repo, transformers CSM, or moshi "
                                  "file (default: kyutai/mimi).")
    export_hf: bool = _f(False,
                         "Also write best_hf/ and final_hf/: the transformers CsmForConditionalGeneration layout.")
    export_codec: str | None = _f(None,
                                  "Mimi (MimiModel layout) for export_hf: a transformers CSM or kyutai/mimi (default: "
                                  "the model's own, else kyutai/mimi).")
    # --- what trains (see docs/training.md: LoRA and freezing)
    finetune: str = _f("full",
                       "full: every weight trains (minus freeze); lora: peft LoRA adapters "
                       "(plus lora_modules_to_save).",
                       choices=FINETUNE_MODES)
    lora_rank: int = _f(16, "LoRA rank r.", min=1, max=4096)
    lora_alpha: float = _f(32.0, "LoRA alpha: the update is scaled by alpha / r.", gt=0)
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.", min=0, max=0.9)
    lora_targets: list[str] = _f(None,
                                 "Linear layers (by this model's module names) that get LoRA adapters, in backbone "
                                 "and decoder.", default_factory=lambda: list(LORA_TARGETS))
    lora_modules_to_save: list[str] = _f(None, "Modules trained whole beside the LoRA adapters (e.g. codebook0_head, "
                                         "audio_head, projection).", default_factory=list)
    freeze: list[str] = _f(None, "Parts a full finetune leaves untouched (text_embeddings, audio_embeddings, backbone, "
                           "decoder, projection, codebook0_head, audio_head, heads).", default_factory=list)
    # --- batching
    batch_size: int | None = _f(8,
                                "Examples per micro-batch (the original's batching). "
                                "Ignored when max_tokens is set.", min=1)
    max_tokens: int | None = _f(None,
                                "Padded frames per micro-batch (token-budget batching, far less "
                                "padding). Overrides batch_size.", min=1)
    grad_acc_steps: int = _f(1, "Micro-batches per optimizer step.", min=1)
    max_seq_len: int = _f(2048,
                          "Longest example in frames; longer ones are refused when the data opens.", min=2, max=2048)
    train_data: list[str] = _f(None, "What trains: token files (preference files for objective: dpo), each a path or "
                               "a glob; several are mixed (data_weights). --data gives them on the command line, "
                               "and wins over this key.", default_factory=list)
    data_weights: list[float] = _f(None, "Each train_data source's share of an epoch's examples, in order (e.g. "
                                   "[0.5, 0.3, 0.2]; they need not sum to 1), drawn anew each epoch from the seed: a "
                                   "source smaller than its share repeats, a larger one is sampled. Unset: every "
                                   "example of every source once an epoch.", default_factory=list)
    partial_data_loading: bool = _f(False, "Format-1 token files only: read examples row by row from the file "
                                           "instead of into each process's memory. Changes nothing for format 2 "
                                           "(what pretokenize.py writes), which every process maps from the file.")
    num_workers: int | None = _f(None,
                                 "DataLoader worker processes; unset: 2 on CUDA (loading overlaps the GPU's step), 0 "
                                 "on CPU (workers would take the cores the step runs on). See docs/benchmarks.md.",
                                 min=0, max=256)
    # --- conversational context (see docs/training.md: conversational context)
    context_mode: str = _f("none",
                           "Context before each target turn: none; conversation (its earlier turns); same_speaker "
                           "(other utterances of its speaker, re-drawn each epoch: a voice prompt).",
                           choices=CONTEXT_MODES)
    context_turns: int = _f(1,
                            "Most context turns per example; the oldest are dropped "
                            "first to fit max_seq_len.", min=1, max=64)
    context_loss: str = _f("none", "none: only the target turn's audio is a loss target; all: every turn's.",
                           choices=CONTEXT_LOSSES)
    # --- optimisation
    learning_rate: float = _f(3e-5, "Peak learning rate.", gt=0)
    weight_decay: float = _f(0.002, "AdamW weight decay, applied to matrices only (not norms).", min=0)
    adam_beta1: float = _f(0.9, "AdamW beta1.", min=0, max=1)
    adam_beta2: float = _f(0.999, "AdamW beta2.", min=0, max=1)
    adam_eps: float = _f(1e-8, "AdamW epsilon.", gt=0)
    optimizer: str = _f("adamw", "adamw (fused on CUDA) or adamw8bit (bitsandbytes, CUDA only).", choices=OPTIMIZERS)
    max_grad_norm: float = _f(1.3, "Clip the global gradient norm to this (0 disables clipping).", min=0)
    # --- low-memory full finetuning (see docs/training.md: a full finetune on a 12 GB card)
    weight_dtype: str = _f("fp32", "fp32: fp32 weights (autocast computes in bf16 on a GPU); bf16: the weights "
                           "themselves in bf16, 2 bytes each, updated as `bf16_compensation` says (needs precision: "
                           "bf16).", choices=WEIGHT_DTYPES)
    bf16_compensation: str = _f("stochastic_rounding",
                                "How bf16 weights keep updates smaller than their precision: stochastic_rounding "
                                "(torchao: each weight rounds up or down with the odds of the exact value), kahan "
                                "(torch-optimi: a bf16 buffer keeps what rounding lost), or none (plain bf16, which "
                                "loses them; for comparison).", choices=COMPENSATIONS)
    optimizer_states: str = _f("full", "AdamW's two moments: full (the weights' dtype), 8bit or 4bit (torchao's "
                               "block-quantized states; tensors under 4096 values stay full).",
                               choices=OPTIMIZER_STATES)
    optimizer_in_backward: bool = _f(False, "Step each weight as soon as backward completes its gradient, then free "
                                     "the gradient, so the whole model's gradients never exist at once. Needs "
                                     "grad_acc_steps 1, max_grad_norm 0 and one process.")
    warmup_steps: int = _f(1000, "Optimizer steps of linear warmup.", min=0)
    lr_decay: str = _f("linear", "Decay after warmup, reaching its end value at the last step.", choices=LR_DECAYS)
    min_lr_ratio: float = _f(0.0,
                             "Final LR as a fraction of the peak (exponential uses 0.01 when this is 0).", min=0, max=1)
    decoder_loss_weight: float = _f(0.5, "w in 2((1-w) c0_loss + w decoder_loss).", min=0, max=1)
    decoder_fraction: float = _f(1 / 16,
                                 "Fraction of audio frames the decoder trains on (compute amortization).", gt=0, max=1)
    # --- preference finetuning (see docs/preference.md)
    objective: str = _f("sft", "sft: imitate a token file's recordings; dpo: learn from a preference file's pairs "
                        "(prefer.py) with the DPO loss.", choices=OBJECTIVES)
    dpo_beta: float = _f(0.1, "DPO's beta: how far the policy may move from the reference; the implicit reward is "
                         "beta x (log pi - log pi_ref).", gt=0, max=1000)
    dpo_sft_weight: float = _f(0.0, "Adds this x the chosen candidate's negative log-likelihood per code to the "
                               "DPO loss (0: none).", min=0, max=1000)
    dpo_decoder_fraction: float = _f(1.0, "Fraction of each candidate's frames the decoder's codebooks are scored on "
                                     "(the same frames for policy and reference, scaled up to the whole).",
                                     gt=0, max=1)
    precision: str = _f("auto", "auto = bf16 on CUDA (fp16 on GPUs without bf16), fp32 on CPU.", choices=PRECISIONS)
    distributed: str = _f("ddp",
                          "With several processes (torchrun): ddp keeps a full copy per GPU; fsdp shards weights, "
                          "gradients and optimizer states over them (FSDP2, full finetuning only).",
                          choices=DISTRIBUTED)
    compile: bool = _f(False, "torch.compile the transformer layers (dynamic shapes: one compilation serves every "
                       "batch length); the first steps pay for compiling. On the CPU it also compiles torchao's "
                       "update (optimizer_states 8bit/4bit, stochastic rounding), which a GPU always compiles.")
    activation_checkpointing: bool = _f(False,
                                        "Recompute layer activations in backward: less "
                                        "activation memory for extra compute.")
    # --- length of the run
    n_epochs: int = _f(25, "Epochs over the training split (the run length unless max_steps is set).", min=1)
    max_steps: int | None = _f(None, "Optimizer steps; overrides n_epochs.", min=1)
    seed: int = _f(42, "Seed for weights (from scratch), batching and the decoder's frame subset.",
                   min=0, max=2**32 - 1)
    # --- cadence, in optimizer steps
    log_every: int = _f(10, "Log training metrics every N steps.", min=1)
    val_every: int = _f(100, "Validation loss every N steps and at the end (0: only at the end).", min=0)
    save_every: int = _f(1000, "Full checkpoint every N steps and at the end (0: only at the end).", min=0)
    keep_checkpoints: int = _f(2,
                               "How many of the latest step checkpoints to keep (best "
                               "and final are kept apart).", min=1)
    gen_every: int = _f(1000, "Audio samples every N steps (0: never).", min=0)
    gen_sentences: list[str] = _f(None, "Sentences spoken in the samples.",
                                  default_factory=lambda: ["Bird law in this country is not governed by reason."])
    gen_speaker: int = _f(999, "Speaker id for the samples.", min=0, max=2**31 - 1)
    gen_context: list[dict] = _f(None, "Prompt turns spoken before every sample and evaluation item: a list of "
                                 "{audio: wav path, text: its transcript, speaker: id}.", default_factory=list)
    gen_max_seconds: float = _f(10.0,
                                "Longest sample, in seconds (the model's 2048 frames "
                                "hold 160 s with the text).", gt=0, max=160)
    # --- quality evaluation (WER/CER, speaker similarity, EOS rate; see docs/evaluation.md)
    eval_every: int = _f(0, "Quality evaluation of eval_n val items every N steps and at the end (0: never).", min=0)
    eval_data: str | None = _f(None, "What the quality evaluation speaks: a token file (its val split) or a metadata "
                               "file (default: --data's val split; a DPO run needs it, its preference file holding "
                               "no references).")
    eval_n: int = _f(16,
                     "Val items in each quality evaluation: a fixed subset drawn with the seed.", min=1, max=100_000)
    eval_max_seconds: float = _f(20.0,
                                 "Longest generated item in evaluation (each also stops "
                                 "at 2x its reference + 1 s).", gt=0, max=160)
    eval_dnsmos: bool = _f(True, "Measure DNSMOS (audio quality, 1-5) in the quality evaluation; needs speechmos and "
                                 "onnxruntime (pinned in requirements.txt).")
    eval_batch_size: int = _f(8, "Items of the quality evaluation generated at once (each keeps its own seed, so "
                                 "the numbers do not depend on it).", min=1, max=4096)
    eval_asr: str = _f(DEFAULT_ASR, "ASR model for WER/CER: hub id or local dir.")
    eval_speaker_model: str = _f(DEFAULT_SPEAKER_MODEL,
                                 "Speaker-verification model for speaker_sim: hub id or local dir.")
    eval_language: str = _f("en",
                            "Language spoken (Whisper code); en uses Whisper's English "
                            "normaliser, others its basic one.")
    select_best_by: str = _f("val_loss", "What picks best/: val_loss, or a quality metric (needs eval_every).",
                             choices=SELECTS_BEST)
    # --- a moving average of the weights (see docs/training.md: the weight average)
    ema_decay: float = _f(0.0, "Keep an exponential moving average of the trained weights, updated after every "
                          "optimizer step with this decay (0: none; 0.999 averages about the last 1000 steps). The "
                          "run then also writes final_ema/ and best_ema/, the average judged by select_best_by "
                          "(val_loss unless set); every validation and quality evaluation also measures the "
                          "average (ema_val_loss, ema_cer, ...; eval/step_N_ema/), so a quality evaluation takes "
                          "twice as long.", min=0)
    ema_start: int = _f(0, "Optimizer steps before the average begins; until then it is the weights themselves.",
                        min=0)
    ema_on_cpu: bool = _f(False, "Keep the average (fp32, 4 bytes a trained weight) in CPU memory instead of beside "
                          "the weights.")
    # --- safety
    max_nonfinite_steps: int = _f(10, "Stop (with a checkpoint) after this many non-finite steps in a row.", min=1)
    # --- tracking
    wandb_project: str = _f("csm-finetune", "Weights & Biases project.")
    wandb_name: str | None = _f(None, "W&B run name (default: derived from the output directory).")
    wandb_group: str | None = _f(None, "W&B group (sweeps group trials by study).")
    wandb_mode: str = _f("auto", "auto = online when an API key is configured, else offline.",
                         choices=WANDB_MODES)

    def to_dict(self) -> dict:
        return asdict(self)


CONFIG_KEYS = tuple(f.name for f in fields(TrainConfig))


def _base_type(tp):
    """The non-None type of an annotation such as `int | None` (annotations are strings here)."""
    tp = eval(tp, vars(typing)) if isinstance(tp, str) else tp  # noqa: S307 - our own annotations
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = type(None) in typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = args[0]
    return tp, optional


def _coerce(key: str, value, tp, optional: bool):
    if value is None:
        if optional:
            return None
        raise UserError(f"config key {key!r} may not be empty")
    origin = typing.get_origin(tp)
    if origin is list and typing.get_args(tp) == (dict,):
        return _coerce_turns(key, value)
    if origin is list and typing.get_args(tp) == (float,):
        if not isinstance(value, list):
            value = [value]
        numbers = [_coerce(key, v, float, False) for v in value]
        if any(v <= 0 for v in numbers):
            raise UserError(f"config key {key!r} must hold numbers > 0, got {value!r}")
        return numbers
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"config key {key!r} must be a list of strings, got {value!r}")
        if any(not v.strip() for v in value):
            raise UserError(f"config key {key!r} holds an empty string; every entry needs some text")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"config key {key!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())
                                           or (isinstance(value, str) and value.strip().lstrip("-").isdigit())):
            raise UserError(f"config key {key!r} must be an integer, got {value!r}")
        if abs(int(value)) > 2**31 - 1:
            raise UserError(f"config key {key!r} is absurdly large ({value!r}); at most {2**31 - 1}")
        return int(value)
    if tp is float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise UserError(f"config key {key!r} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not math.isfinite(out):
            raise UserError(f"config key {key!r} must be a finite number, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"config key {key!r} must be a string, got {value!r}")
        return str(value)
    return value


TURN_KEYS = ("audio", "text", "speaker")


def _coerce_turns(key: str, value) -> list[dict]:
    """A list of prompt turns {audio, text, speaker}; the audio files are read when a run starts."""
    if not isinstance(value, list):
        raise UserError(f"config key {key!r} must be a list of {{audio, text, speaker}} entries, got {value!r}")
    turns = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or set(entry) != set(TURN_KEYS):
            raise UserError(f"config key {key!r}: entry {i} must have exactly the keys audio, "
                            f"text, speaker; got {entry!r}")
        audio, text, speaker = entry["audio"], entry["text"], entry["speaker"]
        if not isinstance(audio, str) or not audio.strip():
            raise UserError(f"config key {key!r}: entry {i} needs 'audio', the path of a wav file")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"config key {key!r}: entry {i} needs 'text', the transcript of its audio")
        if isinstance(speaker, bool) or not isinstance(speaker, int) or not 0 <= speaker <= 2**31 - 1:
            raise UserError(f"config key {key!r}: entry {i} 'speaker' must be a "
                            f"non-negative integer id, got {speaker!r}")
        turns.append({"audio": audio, "text": text.strip(), "speaker": speaker})
    return turns


def _check_range(key: str, value, meta: dict):
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise UserError(f"config key {key!r} must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
    if meta.get("min") is not None and value < meta["min"]:
        raise UserError(f"config key {key!r} must be >= {meta['min']}, got {value!r}")
    if meta.get("max") is not None and value > meta["max"]:
        raise UserError(f"config key {key!r} must be <= {meta['max']}, got {value!r}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise UserError(f"config key {key!r} must be > {meta['gt']}, got {value!r}")


# Names users bring from other tools, for the "did you mean" hint.
# Keys that existed once, with what to do instead.
_REMOVED = {"official_model": "the official model class was removed: the built-in model matches it bit for bit in fp32 "
                              "and loads the same weights; delete the key"}

_ALIASES = {"lr": "learning_rate", "epochs": "n_epochs", "num_epochs": "n_epochs", "warmup": "warmup_steps",
            "grad_accum": "grad_acc_steps", "gradient_accumulation_steps": "grad_acc_steps", "bs": "batch_size",
            "clip": "max_grad_norm", "grad_clip": "max_grad_norm", "wd": "weight_decay", "steps": "max_steps"}


def unknown_key_error(key: str, source: str) -> UserError:
    if key in _REMOVED:
        return UserError(f"config key {key!r} in {source}: {_REMOVED[key]}")
    close = [_ALIASES[key]] if key in _ALIASES else difflib.get_close_matches(key, CONFIG_KEYS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UserError(f"unknown config key {key!r} in {source}{hint}; known keys: {', '.join(CONFIG_KEYS)}")


def make_config(values: dict, source: str = "config") -> TrainConfig:
    """Validate a dict of keys (from YAML, CLI, a checkpoint) into a TrainConfig; one clear error per problem."""
    by_name = {f.name: f for f in fields(TrainConfig)}
    kwargs = {}
    for key, value in values.items():
        if key not in by_name:
            raise unknown_key_error(key, source)
        tp, optional = _base_type(by_name[key].type)
        kwargs[key] = _coerce(key, value, tp, optional)
        _check_range(key, kwargs[key], by_name[key].metadata)
    cfg = TrainConfig(**kwargs)
    for key in ("backbone_flavor", "decoder_flavor"):
        if getattr(cfg, key) not in FLAVORS:
            raise UserError(f"config key {key!r} must be one of {', '.join(FLAVORS)}; got {getattr(cfg, key)!r}")
    if cfg.batch_size is None and cfg.max_tokens is None:
        raise UserError("set either batch_size or max_tokens")
    for key, allowed in (("lora_targets", (*LORA_TARGETS, "projection", "codebook0_head")),
                         ("lora_modules_to_save", MODULES_TO_SAVE), ("freeze", tuple(FREEZABLE))):
        unknown = [v for v in getattr(cfg, key) if v not in allowed]
        if unknown:
            raise UserError(f"config key {key!r}: unknown name(s) "
                            f"{', '.join(map(repr, unknown))}; valid: {', '.join(allowed)}")
    if cfg.distributed == "fsdp" and (cfg.finetune == "lora" or cfg.freeze):
        raise UserError("distributed: fsdp shards a full finetune of every weight; LoRA and frozen runs keep little "
                        "state per GPU already: use distributed: ddp")
    if cfg.finetune == "lora":
        if cfg.train_from_scratch:
            raise UserError("finetune: lora adapts pretrained weights; training from scratch must train every weight "
                            "(finetune: full)")
        if cfg.freeze:
            raise UserError("freeze is for finetune: full; LoRA already trains only its "
                            "adapters and lora_modules_to_save")
        if not cfg.lora_targets:
            raise UserError("finetune: lora needs at least one name in lora_targets")
    check_low_memory(cfg)
    if cfg.ema_decay:
        check_decay(cfg.ema_decay)
    if cfg.select_best_by != "val_loss" and not cfg.eval_every:
        raise UserError(f"select_best_by: {cfg.select_best_by} needs the quality evaluation: set eval_every > 0")
    if not cfg.eval_language.strip():
        raise UserError("config key 'eval_language' is empty; give a language code such as en")
    if cfg.objective == "dpo":
        if cfg.context_mode != "none":
            raise UserError("objective: dpo reads each pair's context from the preference file; set context_mode: none "
                            "(give prefer.py the prompt turns instead)")
        if cfg.eval_every and not cfg.eval_data:
            raise UserError("objective: dpo with eval_every needs eval_data: a preference file holds no reference "
                            "recordings, so name the token file (its val split) or metadata file to evaluate on")
    if cfg.max_tokens is not None and cfg.max_tokens < cfg.max_seq_len:
        raise UserError(f"max_tokens ({cfg.max_tokens}) must be at least max_seq_len "
                        f"({cfg.max_seq_len}) so every example fits")
    return cfg


def low_memory_keys(cfg: TrainConfig) -> list[str]:
    """The low-memory keys this config turns on, as a refusal names them."""
    return [key for key, on in (("weight_dtype: bf16", cfg.weight_dtype == "bf16"),
                                (f"optimizer_states: {cfg.optimizer_states}", cfg.optimizer_states != "full"),
                                ("optimizer_in_backward", cfg.optimizer_in_backward)) if on]


def check_low_memory(cfg: TrainConfig) -> None:
    """The low-memory keys' combinations that cannot train as asked, refused before anything loads (the device and
    the process count are checked once they are known: training.run_precision)."""
    low = low_memory_keys(cfg)
    if cfg.weight_dtype == "bf16" and cfg.precision in ("fp32", "fp16"):
        raise UserError(f"weight_dtype: bf16 computes in bf16, not precision: {cfg.precision}: set precision: bf16")
    if cfg.optimizer == "adamw8bit" and (cfg.weight_dtype == "bf16" or cfg.optimizer_states != "full"):
        raise UserError("optimizer: adamw8bit is bitsandbytes' 8-bit AdamW for fp32 weights; for bf16 weights or "
                        "optimizer_states 8bit/4bit use optimizer: adamw (the states come from torchao)")
    if cfg.bf16_compensation == "kahan" and cfg.weight_dtype == "bf16" and cfg.optimizer_states != "full":
        raise UserError(f"bf16_compensation: kahan comes from torch-optimi, whose AdamW keeps full states: use "
                        f"bf16_compensation: stochastic_rounding with optimizer_states: {cfg.optimizer_states}")
    if low and cfg.objective == "dpo":
        raise UserError("weight_dtype, optimizer_states and optimizer_in_backward are for supervised finetuning "
                        "(objective: sft); preference rounds train LoRA adapters (finetune: lora) or fp32 weights")
    if low and cfg.finetune == "lora":
        raise UserError("weight_dtype, optimizer_states and optimizer_in_backward shrink a full finetune's state; "
                        "LoRA's adapters are a few MiB, so they would save nothing: leave them at their defaults")
    if cfg.optimizer_in_backward:
        if cfg.grad_acc_steps > 1:
            raise UserError(f"optimizer_in_backward steps each weight during backward, so gradients cannot "
                            f"accumulate over grad_acc_steps {cfg.grad_acc_steps}: set grad_acc_steps: 1 and raise "
                            "max_tokens (or batch_size) instead")
        if cfg.max_grad_norm > 0:
            raise UserError(f"optimizer_in_backward steps each weight before the global gradient norm is known, so "
                            f"it cannot clip to max_grad_norm {cfg.max_grad_norm}: set max_grad_norm: 0")
        if cfg.precision == "fp16":
            raise UserError("optimizer_in_backward steps each weight during backward, before fp16's GradScaler could "
                            "unscale its gradient or skip an overflowing step: use precision: bf16 or fp32")
        if cfg.optimizer == "adamw8bit":
            raise UserError("optimizer_in_backward steps one weight at a time with torch's or torchao's AdamW; for "
                            "8-bit states set optimizer: adamw and optimizer_states: 8bit")


def read_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML mapping, or one clear error naming the file (`what` says which kind of file it is)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} not found")
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; give a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}  # -sig: a BOM is not part of a key
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a text (YAML) file") from None
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must be a mapping of key: value")
    return data


def parse_set(items: list[str]) -> dict:
    """`--set key=value` pairs; values are parsed as YAML scalars (3e-5, true, null, [a, b])."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults < YAML file < overrides (CLI flags and --set), validated together."""
    values = read_yaml(path) if path else {}
    source = str(path) if path else "config"
    for key in values:
        if key not in CONFIG_KEYS:
            raise unknown_key_error(key, source)
    values.update(overrides or {})
    return make_config(values, source)


def save_yaml(cfg: TrainConfig | dict, path: str | Path) -> None:
    data = cfg.to_dict() if isinstance(cfg, TrainConfig) else cfg
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


FIELDS = {f.name: f for f in fields(TrainConfig)}


def key_help(key: str) -> str:
    """A config key's help text, with its choices."""
    meta = FIELDS[key].metadata
    return meta["help"] + (f" One of: {', '.join(map(str, meta['choices']))}." if meta.get("choices") else "")


def type_name(key: str) -> str:
    """INT, FLOAT, TEXT, ... for a key's command-line flag."""
    tp, _ = _base_type(FIELDS[key].type)
    return {int: "INT", float: "FLOAT", bool: "BOOL", str: "TEXT"}.get(tp, "VALUE")


def config_reference_markdown() -> str:
    """The config reference table (docs/config.md), generated from the dataclass so they cannot drift apart."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for f in fields(TrainConfig):
        default = f.default_factory() if f.default is MISSING else f.default
        rows.append(f"| `{f.name}` | `{default!r}` | {key_help(f.name)} |")
    return "\n".join(rows)


PAGE_MARKERS = ("<!-- config-table:start -->", "<!-- config-table:end -->")


def replace_between(text: str, markers: tuple[str, str], body: str) -> str:
    """`text` with what lies between the two marker lines replaced by `body`."""
    start, end = markers
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Print the config reference, or write it into its docs page.")
    p.add_argument("--markdown", action="store_true", help="print the config table as markdown")
    p.add_argument("--update_page", metavar="PAGE", help="replace the table between the page's markers "
                                                        "(docs/config.md)")
    args = p.parse_args(argv)
    if args.update_page:
        path = Path(args.update_page)
        write_text_atomic(path, replace_between(path.read_text(), PAGE_MARKERS, config_reference_markdown()))
    else:
        print(config_reference_markdown())
    return 0


if __name__ == "__main__":
    main()
