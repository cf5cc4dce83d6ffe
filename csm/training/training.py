"""Training, read top to bottom: one optimizer step over accumulated micro-batches (`train_step`), the pieces a
run speaks and saves with, the checks made before any work, then the run itself: `setup_run` builds a `Run`
(data, model, wrapping, optimizer, resumed state, outputs, tracker) and `fit` is the loop, with the work after
each step in `after_step`. Every count (schedule, logging, eval, saving) is in optimizer steps; the loss of a
step is normalised by its true number of targets over all micro-batches and ranks. `train()`, last, is what
train.py and every sweep trial run.
"""
from __future__ import annotations

import json
import math
import shutil
import socket
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import soundfile as sf
import torch
from torch import nn
import torch.distributed as dist
from tqdm import tqdm

from csm.training import config as config_mod
from csm.training import parallel
from csm.model.adapters import apply_finetune_mode, count_trainable, is_partial, merged_model, save_adapter
from csm.training.parallel import gradient_sync
from csm.training.checkpoint import (
    LoopState, find_resume_checkpoint, prune_checkpoints, restore_checkpoint, save_checkpoint, step_path,
)
from csm.training.config import TrainConfig
from csm.model.csm_model import CSM, ModelArgs, count_parameters
from csm.training.dpo import collate_pairs, PairDataset
from dataloaders import (
    check_text_ids, CSMDataset, default_num_workers, make_loader, MixedDataset, ResumableLoader, source_names,
    source_paths,
)
from csm.judging.evaluation import (
    check_item_source, EvalSettings, evaluate_model, is_token_file, load_items, write_report,
)
from csm.model.hf_export import csm_tokenizer, DEFAULT_CODEC, export_transformers
from csm.judging.metrics import QUALITY, lower_is_better
from csm.training.objectives import make_objective, move_batch, validate, validation_sums
from csm.training.ema import WeightEMA
from csm.training.report import REPORT_NAME, write_page
from csm.training.optim import StepInBackward, cast_weights, make_optimizer, make_scheduler
from csm.training.tracking import Tracker, make_tracker
from csm.system.runtime import print0, seed_everything
from csm.system.errors import UserError
from csm.system.runtime import (
    all_reduce_sum, autocast, compute_init, cuda_unusable_reason, launched_by_torchrun, peak_memory_bytes,
    resolve_precision, Runtime,
)
from csm.system.outputs import atomic_path, claim_output_dir, clear_dir, first_existing, inputs_of, write_text_atomic
from csm.data.token_file import SPEAKERS_NAME, open_splits, speaker_names
from csm.data.preference_file import is_preference_file, open_preference_file, reference_identity, settings_of
from csm.judging.speech_metrics import QualityModels
from csm.judging.synthesis import model_speaker_names, prompt_segments, SpeechRequest, synthesize_batch
from csm.model.tokenization import load_text_tokenizer, resolve_text_tokenizer
from csm.model.codec import find_codec, load_mimi, MIMI_SAMPLE_RATE
from csm.model.weights import (
    build_model, config_model_args, copy_tokenizer_files, load_model, resolve_source, save_pretrained,
)


class TrainingStopped(UserError):
    """Training could not go on (e.g. the loss kept diverging); a checkpoint was saved first."""


# --------------------------------------------------------------------------- model


class LossModule(nn.Module):
    """Wraps the CSM so that DDP sees the whole loss computation as one forward call: `loss_fn(model, *args,
    **kwargs)`, a pure function of the model and the batch (loss.compute_loss, dpo.pair_terms)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, loss_fn: Callable, *args, **kwargs):
        return loss_fn(self.model, *args, **kwargs)


def build_or_load_model(cfg: TrainConfig, device: torch.device, source: Path | None = None) -> nn.Module:
    """A fresh model (train_from_scratch), or the one at `source` (cfg.model already resolved to a local path)."""
    if cfg.train_from_scratch:
        args = ModelArgs(backbone_flavor=cfg.backbone_flavor, decoder_flavor=cfg.decoder_flavor,
                         text_vocab_size=cfg.text_vocab_size)
        torch.manual_seed(cfg.seed)
        return build_model(args, device=device)
    return load_model(source if source is not None else cfg.model, device=device, revision=cfg.model_revision)


# --------------------------------------------------------------------------- one optimizer step


def train_step(loss_model: nn.Module, micro_batches: list, cfg: TrainConfig, rt: Runtime, precision: str,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, generator: torch.Generator,
               num_codebooks: int) -> dict:
    """Forward/backward over the micro-batches of one step, normalised by the step's totals (target frames, or
    pairs; summed over micro-batches and ranks), then clip and step. Returns the step's metrics: the objective's
    (objectives.py) and the step's own."""
    objective = make_objective(cfg, num_codebooks)
    in_backward = isinstance(optimizer, StepInBackward)
    # Everything that depends on the batch layout is read from the CPU copies of the masks; the step's
    # numbers stay on the device until one read at its end (`read_stats`: the step's only host-device sync, in one
    # process and under DDP or FSDP alike: the counts that normalise the loss are summed over processes on the
    # device and never read back).
    plans = [objective.plan(batch, generator) for batch in micro_batches]
    counts = [objective.counts(plan) for plan in plans]
    totals = to_device(torch.tensor([sum(c[0] for c in counts), sum(c[1] for c in counts)], dtype=torch.float64),
                       rt.device)
    if rt.distributed:
        dist.all_reduce(totals)
    n = len(objective.stats)
    stats = torch.zeros(n + 2, dtype=torch.float64, device=rt.device)  # the objective's numbers, real, padded
    real = padded = 0
    for i, (batch, plan) in enumerate(zip(micro_batches, plans)):
        mask = batch[1]
        real += int(mask.any(-1).sum())
        padded += mask.shape[0] * mask.shape[1]
        batch, plan = move_batch(batch, rt.device, to_device), plan.to(rt.device, to_device)
        last = i == len(micro_batches) - 1
        with gradient_sync(loss_model, last or not rt.distributed):
            with autocast(rt.device, precision):
                loss, parts = objective.loss(loss_model, batch, plan, totals)
            # DDP averages gradients over ranks; the loss is already a share of the global sum. Stepped inside
            # backward, a non-finite loss must stop before backward: there is no step to skip after it.
            if not in_backward or torch.isfinite(loss):
                scaler.scale(loss * rt.world_size).backward()
        stats[:n] += parts.double()
    stats[n:] += to_device(torch.tensor([real, padded], dtype=torch.float64), rt.device)
    if rt.distributed:
        dist.all_reduce(stats)

    if in_backward:  # every weight was stepped (or skipped, its gradient not finite) as backward went
        norm, skipped = optimizer.take_grad_norm()
    else:
        if scaler.is_enabled():
            scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm, skipped = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")), 0
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
    values = read_stats(torch.cat([stats, norm.detach().reshape(1).double().to(stats.device)]))
    named, (real, padded, grad_norm) = dict(zip(objective.stats, values[:n])), values[n:]
    finite = math.isfinite(named["loss"]) and (math.isfinite(grad_norm) or scaler.is_enabled()) and not skipped
    if finite:
        # With fp16 the scaler itself skips steps whose gradients overflowed.
        scaler.step(optimizer)
    # Also after a skipped step: update() ends the step that unscale_() began (without it the next unscale_()
    # raises) and lowers the fp16 scale when the gradients overflowed. Disabled (bf16, fp32), it does nothing.
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return {**named, "grad_norm": grad_norm, "finite": finite, "frames": real,
            "padding_fraction": 1 - real / max(padded, 1)}


def to_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A CPU tensor on the device without waiting: pinned first on CUDA, so the copy can be asynchronous."""
    if t is None or t.device == device:
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def read_stats(stats: torch.Tensor) -> list[float]:
    """The one read of a step's numbers from the device (a host-device sync)."""
    return stats.tolist()


# --------------------------------------------------------------------------- samples and quality evaluation


class RunSpeech:
    """The text tokenizer, Mimi and prompt turns (gen_context) that samples and quality evaluations speak
    with: loaded when the run starts (a missing one fails before step 1), once, and only when the run
    speaks at all."""

    def __init__(self, cfg: TrainConfig, device: torch.device, text_tokenizer: str):
        self.cfg, self.device, self.text_tokenizer = cfg, device, text_tokenizer
        self.tokenizer = self.mimi = None
        self.context = []

    def load(self, num_codebooks: int = 32) -> None:
        if self.tokenizer is None:
            self.context = prompt_segments(self.cfg.gen_context)
            self.tokenizer = load_text_tokenizer(self.text_tokenizer)
            self.mimi = load_mimi(self.cfg.mimi_weights, device=self.device, num_codebooks=num_codebooks)


def _warn_failed(step: int, what: str, e: Exception) -> None:
    print0(f"warning: step {step}: {what} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
           "training goes on", file=sys.stderr)


class SampleWriter:
    """Speech for the configured sentences, written under samples/ and sent to the tracker.
    A failure while sampling is reported and training goes on (a sample is not worth a run)."""

    def __init__(self, cfg: TrainConfig, out: Path, speech: RunSpeech):
        self.cfg, self.dir, self.speech = cfg, out / "samples", speech

    def __call__(self, model: nn.Module, step: int, tracker: Tracker, precision: str) -> None:
        try:
            self._write(model, step, tracker, precision)
        except Exception as e:  # noqa: BLE001 - any failure here must not end hours of training
            _warn_failed(step, "writing audio samples", e)

    def _write(self, model: nn.Module, step: int, tracker: Tracker, precision: str) -> None:
        self.speech.load(model.config.audio_num_codebooks)
        self.dir.mkdir(parents=True, exist_ok=True)
        requests = [SpeechRequest(sentence, self.cfg.gen_speaker, tuple(self.speech.context), self.cfg.gen_max_seconds,
                                  seed=self.cfg.seed + step + i) for i, sentence in enumerate(self.cfg.gen_sentences)]
        spoken = synthesize_batch(model, self.speech.tokenizer, self.speech.mimi, requests, precision=precision)
        for i, (sentence, speech) in enumerate(zip(self.cfg.gen_sentences, spoken)):
            audio = speech.audio.float().cpu().numpy()
            with atomic_path(self.dir / f"step_{step:07d}_{i}.wav", suffix=".tmp.wav") as tmp:
                sf.write(tmp, audio, MIMI_SAMPLE_RATE)
            tracker.log_audio(f"sample_{i}", audio, MIMI_SAMPLE_RATE, step, sentence)




class QualityEval:
    """eval_every: speak a fixed, seeded subset of the val split (eval_n items, each with its own fixed
    seed) and measure it as evaluate.py does; the metrics go to metrics.jsonl and the tracker, the audio
    and per-item results to eval/step_N/. The ASR and speaker models are loaded when the run starts,
    parked on the CPU and moved to the GPU only while evaluating. A failed evaluation is reported and
    training goes on."""

    def __init__(self, cfg: TrainConfig, out: Path, speech: RunSpeech, data: str):
        self.cfg, self.dir, self.speech = cfg, out / "eval", speech
        speech.load()
        self.quality = QualityModels(cfg.eval_asr, cfg.eval_speaker_model, cfg.eval_language, device="cpu",
                                     half=speech.device.type == "cuda", dnsmos=cfg.eval_dnsmos)
        source = cfg.eval_data or data
        self.items, skipped = load_items(source, split="val", n=cfg.eval_n, seed=cfg.seed, tokenizer=speech.tokenizer,
                                         flag="eval_data" if cfg.eval_data else "--data")
        for row, reason in skipped:
            print0(f"warning: eval_data row {row} left out of the quality evaluation: {reason}", file=sys.stderr)

    def __call__(self, model: nn.Module, step: int, tracker: Tracker, precision: str, prefix: str = "") -> dict:
        """The step's metrics, logged as `prefix` + name (ema_: the weight average's, in eval/step_N_ema/)."""
        try:
            settings = EvalSettings(max_audio_seconds=self.cfg.eval_max_seconds, seed=self.cfg.seed,
                                    precision=precision, context=self.speech.context,
                                    batch_size=self.cfg.eval_batch_size)
            result = evaluate_model(model, self.speech.tokenizer, self.speech.mimi, self.items, self.quality, settings,
                                    device=self.speech.device)
            write_report(result, self.dir / f"step_{step:07d}{'_' + prefix.rstrip('_') if prefix else ''}",
                         extra={"step": step, "weights": "average" if prefix else "trained"})
        except Exception as e:  # noqa: BLE001 - a failed evaluation must not end hours of training
            _warn_failed(step, "the quality evaluation", e)
            return {}
        generated = result.summary["generated"]
        metrics = {k: generated[k] for k in QUALITY if generated.get(k) is not None}
        tracker.log({prefix + k: v for k, v in metrics.items()}, step)
        tracker.log_eval_table(step, result.rows, result.audio, prefix)
        return metrics


def share_metrics(metrics: dict, rt: Runtime) -> dict:
    """Rank 0's quality metrics on every rank (so all ranks select best/ and report alike)."""
    if not rt.distributed:
        return metrics
    values = all_reduce_sum([metrics.get(k, math.nan) if rt.is_main else 0.0 for k in QUALITY], rt)
    return {k: v for k, v in zip(QUALITY, values) if math.isfinite(v)}


def selection_score(select_by: str, evaluated: dict) -> float | None:
    """This step's score for best/ (lower is better), or None when it measured no such thing."""
    value = evaluated.get(select_by)
    if value is None or not math.isfinite(value):
        return None
    return lower_is_better(select_by, value)


# --------------------------------------------------------------------------- transformers exports


class HFExports:
    """best_hf/ and final_hf/ (config key export_hf). The codec and the tokenizer are found when the run
    starts, so a missing one fails before any training, not at the first validation."""

    def __init__(self, cfg: TrainConfig, base: Path | None, text_tokenizer: str):
        self.codec = find_codec([cfg.export_codec] if cfg.export_codec else [base, DEFAULT_CODEC])
        self.tokenizer = csm_tokenizer(text_tokenizer)

    def __call__(self, model: nn.Module, directory: Path) -> None:
        export_transformers(model, directory, tokenizer=self.tokenizer, codec=self.codec)


# --------------------------------------------------------------------------- best/ and final/


def save_outputs(model: nn.Module, cfg: TrainConfig, out: Path, name: str, tokenizer_dir: Path | None,
                 hf_exports: HFExports | None, speakers: dict[str, int]) -> None:
    """name/ (merged weights, official layout, with the run's tokenizer files and the data's speaker names),
    name_hf/ (export_hf) and, for a LoRA run, name_adapter/ (the adapter in peft's format)."""
    merged = merged_model(model)
    save_pretrained(merged, out / name)
    copy_tokenizer_files(tokenizer_dir, out / name)
    if speakers:  # so that generate.py --model out/name --speaker alice finds alice
        write_text_atomic(out / name / SPEAKERS_NAME, json.dumps(speakers, indent=1, sort_keys=True) + "\n")
    if hf_exports:
        hf_exports(merged, out / f"{name}_hf")
    if cfg.finetune == "lora":
        save_adapter(model, out / f"{name}_adapter", cfg)


# --------------------------------------------------------------------------- stop requests


class StopFlag:
    """SIGTERM or the first Ctrl-C asks the loop to save and stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.requested = True
        print0(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping",
               file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    step: int
    best_val_loss: float
    final_val_loss: float | None
    output_dir: Path
    stopped_early: bool


def run_inputs(cfg: TrainConfig, data: str | Path | list[str]) -> list[tuple[str, str]]:
    """The files and directories a run reads, which its output directory must stay apart from: the data and every
    config value that names an existing path (gen_context's audio too)."""
    return [*(("--data", str(p)) for p in (data if isinstance(data, list) else [data])),
            *inputs_of(cfg.to_dict(), flags=False)]


def _holds_a_run(out: Path, existing: list[str]) -> str:
    return (f"--output_dir {out} already holds a run ({', '.join(existing[:4])}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another directory")


def check_launch(cfg: TrainConfig) -> None:
    """Settings that need (or do not yet work with) the processes torchrun starts."""
    if cfg.distributed == "fsdp" and not launched_by_torchrun():
        raise UserError("distributed: fsdp shards the model over the processes torchrun starts, and this is one plain "
                        "process; launch it as: torchrun --nproc_per_node NUM_GPUS train.py "
                        "... (or use distributed: ddp)")
    if cfg.compile and cfg.distributed == "fsdp":
        raise UserError("compile: true with distributed: fsdp is not tested yet; use "
                        "distributed: ddp or compile: false")


def run_precision(cfg: TrainConfig, rt: Runtime) -> str:
    """The run's precision (`auto` resolved for its device), refused where it would train wrongly."""
    precision = resolve_precision(cfg.precision, rt.device)
    if cfg.optimizer_in_backward and precision == "fp16":
        raise UserError("optimizer_in_backward cannot work with fp16's GradScaler, and precision: auto picks fp16 on "
                        "this GPU (it has no bf16): set precision: fp32")
    if cfg.weight_dtype == "bf16" and precision != "bf16":
        raise UserError(f"weight_dtype: bf16 computes in bf16, and precision: auto picks {precision} on {rt.device}: "
                        "set precision: bf16")
    low = config_mod.low_memory_keys(cfg)
    if low and rt.distributed:
        raise UserError(f"{', '.join(low)} is tested in one process only, not with {rt.world_size} under "
                        "torchrun: run one process, or use distributed: fsdp to spread the state over the GPUs")
    if precision == "fp16" and cfg.distributed == "fsdp" and rt.distributed:
        # The fp16 GradScaler decides per process whether gradients overflowed; sharded, the processes can decide
        # differently, and then some shards take a step that others skip.
        why = " (precision: auto picks fp16 on GPUs without bf16)" if cfg.precision == "auto" else ""
        raise UserError(f"fp16 with distributed: fsdp is not supported{why}: use precision: bf16 on GPUs that have "
                        "it, or distributed: ddp, or precision: fp32")
    return precision


def loader_settings(cfg: TrainConfig, rt: Runtime) -> dict:
    """make_loader's batching, sharding and context arguments for a run. Batches are pinned only for a run on
    CUDA (a CPU run on a machine with a GPU would pin host memory for nothing)."""
    return dict(max_tokens=cfg.max_tokens, batch_size=None if cfg.max_tokens else cfg.batch_size, seed=cfg.seed,
                rank=rt.rank, world_size=rt.world_size, pin_memory=rt.device.type == "cuda",
                context_mode=cfg.context_mode,
                context_turns=cfg.context_turns, context_loss=cfg.context_loss)


def run_length(cfg: TrainConfig, data: str, train_loader: ResumableLoader, rt: Runtime) -> int:
    """The run's optimizer steps: max_steps, else n_epochs of the train loader's batches."""
    if len(train_loader) == 0:
        raise UserError(f"{data}: the train split gives no batches on {rt.world_size} process(es)")
    return cfg.max_steps or math.ceil(cfg.n_epochs * len(train_loader) / cfg.grad_acc_steps)


def planned_steps(cfg: TrainConfig, data: str | list[str]) -> int:
    """The optimizer steps a one-process run of `cfg` on `data` (one source or several) would take, from the train
    splits' lengths alone (what a sweep checks for each trial's settings before any trial starts)."""
    rt = Runtime(torch.device("cpu"))
    paths = data if isinstance(data, list) else [data]
    parts = [PairDataset(p, "train", max_seq_len=cfg.max_seq_len) if is_preference_file(p)
             else CSMDataset(p, "train", partial=True, max_seq_len=cfg.max_seq_len) for p in paths]
    train_set = parts[0] if len(parts) == 1 else MixedDataset(parts, source_names(paths))
    loader = make_loader(train_set, shuffle=True, num_workers=0, weights=cfg.data_weights or None,
                         **loader_settings(cfg, rt))
    return run_length(cfg, ", ".join(paths), loader, rt)


def check_warmup(cfg: TrainConfig, total_steps: int) -> None:
    if cfg.warmup_steps and cfg.warmup_steps >= total_steps:
        raise UserError(f"warmup_steps {cfg.warmup_steps} is not shorter than the run ({total_steps} optimizer steps): "
                        "the learning rate would never reach learning_rate; lower warmup_steps")
    if cfg.warmup_steps > total_steps / 2:
        print0(f"warning: warmup_steps {cfg.warmup_steps} is more than half of the run's {total_steps} steps",
               file=sys.stderr)


# A model larger than this is not trained on a CPU that was chosen for the user: a GPU box whose CUDA is
# unusable would otherwise start a finetune of CSM-1B on the CPU, about a thousand times slower, and say nothing.
AUTO_CPU_PARAMETERS = 100_000_000


def planned_model_args(cfg: TrainConfig, base: Path | None) -> ModelArgs | None:
    """The dimensions the run's model will have, known before its weights are read (None when only they say)."""
    if cfg.train_from_scratch:
        return ModelArgs(backbone_flavor=cfg.backbone_flavor, decoder_flavor=cfg.decoder_flavor,
                         text_vocab_size=cfg.text_vocab_size)
    return config_model_args(base) if base is not None else None


def check_auto_cpu(parameters: int | None, auto_cpu: bool, explicit: str = "--device cpu") -> None:
    """Refuse a large model on a CPU that the user did not ask for."""
    if not auto_cpu or parameters is None or parameters <= AUTO_CPU_PARAMETERS:
        return

    why = cuda_unusable_reason() or "no CUDA GPU is visible"
    raise UserError(f"not training a {parameters / 1e6:,.0f}M-parameter model on the CPU, which was chosen because "
                    f"CUDA is unusable ({why}); on a CPU it would take about a thousand times longer. Fix CUDA, or "
                    f"pass {explicit} to train on the CPU anyway")


def check_planned_size(cfg: TrainConfig, base: Path | None, auto_cpu: bool) -> ModelArgs | None:
    """check_auto_cpu for the model the config will build or load, counted from its config alone; returns
    those dimensions (None on a CPU that was asked for, or when only the weights say)."""
    planned = planned_model_args(cfg, base) if auto_cpu else None
    check_auto_cpu(meta_parameters(planned) if planned else None, auto_cpu)
    return planned


def meta_parameters(args: ModelArgs) -> int:
    """Parameters of a model of these dimensions, counted on the meta device (nothing is allocated)."""

    with torch.device("meta"):
        return count_parameters(CSM(args))


def check_disk_space(model: nn.Module, cfg: TrainConfig, out: Path) -> None:
    """Room for one checkpoint (weights + optimizer state), estimated from the parameter sizes."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = [p for p in model.parameters() if p.requires_grad]
    # AdamW's two moments per trained weight: in the weights' dtype, or quantized (8-bit: 2 bytes for both, 4-bit:
    # 1, plus their block scales); Kahan summation keeps one more buffer in the weights' dtype.
    per_state = {"full": None, "8bit": 1.1, "4bit": 0.6}[cfg.optimizer_states] or (
        1.1 if cfg.optimizer == "adamw8bit" else None)
    kahan = cfg.weight_dtype == "bf16" and cfg.bf16_compensation == "kahan"
    need = weights + sum(p.numel() * (2 * (per_state or p.element_size()) + kahan * p.element_size())
                         for p in trained)
    free = shutil.disk_usage(first_existing(out.absolute())).free
    if free < need:
        raise UserError(f"{out}: {free / 2**30:.1f} GiB free, but one checkpoint needs about {need / 2**30:.1f} GiB; "
                        "free some space or choose another --output_dir")


@dataclass
class Run:
    """A training run, built by `setup_run` before its first step: the data, the model and how it is wrapped, the
    optimizer, the loop's counters (restored on resume), the outputs and the tracker; `fit` runs it."""

    cfg: TrainConfig
    rt: Runtime
    out: Path
    data: str | list[str]
    precision: str
    train_loader: ResumableLoader
    val_loader: ResumableLoader | None
    train_examples: int
    total_steps: int
    speakers: dict[str, int]
    model: nn.Module
    loss_model: nn.Module  # the model as the loss sees it: wrapped by DDP or sharded by FSDP when distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # the decoder's frame subset
    loop: LoopState
    tokenizer_dir: Path | None  # copied beside best/ and final/
    samples: SampleWriter
    quality: QualityEval | None
    hf_exports: HFExports | None
    tracker: Tracker | None = None  # made once the run's first step is known (after a resume)
    val_sources: list[tuple[str, ResumableLoader]] = field(default_factory=list)  # several sources: each one's val
    ema: WeightEMA | None = None  # the moving average of the trained weights (ema_decay)

    @property
    def objective(self):
        """What the steps optimise and validation measures (objectives.py)."""
        return make_objective(self.cfg, self.model.config.audio_num_codebooks)

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def checkpoint_state(self) -> dict:
        """What save_checkpoint and restore_checkpoint take."""
        return dict(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                    loader=self.train_loader, generator=self.generator, cfg=self.cfg, rt=self.rt, ema=self.ema)

    def save_checkpoint(self) -> None:
        save_checkpoint(step_path(self.checkpoints, self.loop.step), loop=self.loop, **self.checkpoint_state())


@dataclass
class RunData:
    """A token file opened for training."""

    path: str | list[str]
    train_set: CSMDataset | MixedDataset
    train_loader: ResumableLoader
    val_loader: ResumableLoader | None
    speakers: dict[str, int]
    total_steps: int
    val_sources: list[tuple[str, ResumableLoader]] = field(default_factory=list)  # several sources: each one's val


def first_source(data: str | list[str]) -> str:
    """The source whose val split eval_every speaks when eval_data is unset: the data, or the first of several."""
    return data[0] if isinstance(data, list) else data


def open_data(cfg: TrainConfig, data: str | list[str], rt: Runtime) -> RunData:
    """The data's splits, loaders and speaker names, checked before any model is loaded: a token file for
    `objective: sft`, a preference file (prefer.py) for `objective: dpo`. Several sources are mixed by
    data_weights, and each one's val split is validated on its own (val_loss/NAME) beside all of them (val_loss)."""
    paths = data if isinstance(data, list) else [data]
    if cfg.data_weights and len(cfg.data_weights) != len(paths):
        raise UserError(f"data_weights has {len(cfg.data_weights)} weight(s) for {len(paths)} source(s) "
                        f"({', '.join(paths)}): give one weight per source")
    preferences = cfg.objective == "dpo"
    all_splits = []
    for path in paths:
        check_source_kind(cfg, path)
        all_splits.append(data_splits(path))
        if "train" not in all_splits[-1]:
            raise UserError(f"{path} has no 'train' split (found: {', '.join(all_splits[-1]) or 'nothing'})")
    if cfg.eval_every:
        check_eval_source(cfg, paths[0])
    trains, vals = [], []
    for path, splits in zip(paths, all_splits):
        if preferences:
            check_reference(cfg, path, resolve_precision(cfg.precision, rt.device))
            trains.append(PairDataset(path, "train", max_seq_len=cfg.max_seq_len))
            vals.append(PairDataset(path, "val", max_seq_len=cfg.max_seq_len) if splits.get("val") else None)
        else:
            trains.append(CSMDataset(path, "train", partial=cfg.partial_data_loading, max_seq_len=cfg.max_seq_len))
            vals.append(CSMDataset(path, "val", partial=cfg.partial_data_loading,
                                   max_seq_len=cfg.max_seq_len) if "val" in splits else None)
    names = source_names(paths)
    with_val = [(name, v) for name, v in zip(names, vals) if v is not None]
    if len(paths) == 1:
        train_set, val_set = trains[0], vals[0]
    else:
        train_set = MixedDataset(trains, names)
        val_set = MixedDataset([v for _, v in with_val], [n for n, _ in with_val]) if with_val else None
    collate_fn = partial(collate_pairs, num_codebooks=train_set.num_codebooks) if preferences else None
    workers = default_num_workers(rt.device) if cfg.num_workers is None else cfg.num_workers
    settings = {**loader_settings(cfg, rt), "num_workers": workers, "collate_fn": collate_fn}
    train_loader = make_loader(train_set, shuffle=True, weights=cfg.data_weights or None, **settings)
    val_loader = make_loader(val_set, shuffle=False, **settings) if val_set else None
    val_sources = [(name, make_loader(v, shuffle=False, **settings)) for name, v in with_val if len(paths) > 1]
    total_steps = run_length(cfg, ", ".join(paths), train_loader, rt)
    check_warmup(cfg, total_steps)
    if val_loader is None and not (cfg.eval_every and cfg.select_best_by != "val_loss"):
        print0(f"warning: {', '.join(paths)} {'has' if len(paths) == 1 else 'have'} no val "
               f"{'pairs' if preferences else 'split'}: nothing will choose best/, so it is not written; final/ is "
               "the trained model (give a val split, or eval_every with select_best_by a quality metric)",
               file=sys.stderr)
    # A preference file names no speakers: a DPO run keeps those of the model it starts from (its speakers.json).
    speakers = model_speaker_names(cfg.model) if preferences else merged_speaker_names(paths)
    return RunData(data, train_set, train_loader, val_loader, speakers, total_steps, val_sources)


def check_source_kind(cfg: TrainConfig, path: str) -> None:
    """A source exists and is what the objective trains on: a token file (sft) or a preference file (dpo)."""
    if not Path(path).is_file():
        raise UserError(f"--data {path}: no such file (make one with "
                        f"{'prefer.py' if cfg.objective == 'dpo' else 'pretokenize.py'})")
    preferences = is_preference_file(path)
    if preferences and cfg.objective != "dpo":
        raise UserError(f"--data {path} is a preference file (prefer.py): train on it with --set objective=dpo, or "
                        "give a token file from pretokenize.py")
    if cfg.objective == "dpo" and not preferences:
        raise UserError(f"--data {path} is not a preference file: objective: dpo trains on the pairs prefer.py "
                        "writes (prefer.py --model M --data TOKENS --output PREFS)")


def merged_speaker_names(paths: list[str]) -> dict[str, int]:
    """The speaker names of several token files as one mapping. The ids are in the text ids already (`[3]...`),
    so a name must have one id everywhere and an id one name: two sources that disagree are refused."""
    merged: dict[str, int] = {}
    where: dict[str, str] = {}
    for path in paths:
        for name, sid in speaker_names(path).items():
            if merged.get(name, sid) != sid:
                raise UserError(f"speaker {name!r} is id {merged[name]} in {where[name]} but id {sid} in {path}: "
                                "sources mixed in one run must number their speakers alike (pretokenize them "
                                "with the same speaker names, or train on them apart)")
            other = next((n for n, i in merged.items() if i == sid and n != name), None)
            if other is not None:
                raise UserError(f"speaker id {sid} is {other!r} in {where[other]} but {name!r} in {path}: sources "
                                "mixed in one run must number their speakers alike (pretokenize them with the same "
                                "speaker names, or train on them apart)")
            merged[name], where[name] = sid, path
    return merged


def check_eval_source(cfg: TrainConfig, data: str) -> None:
    """What eval_every speaks exists: eval_data (a metadata file, or a token file with a val split), else --data's
    val split."""
    source = cfg.eval_data or data
    what = "eval_data" if cfg.eval_data else "--data"
    if not Path(source).is_file():
        raise UserError(f"{what} {source}: no such file (eval_every speaks its items)")
    check_item_source(source, what)
    if is_token_file(Path(source)) and "val" not in open_splits(source):
        raise UserError(f"eval_every needs a val split in {source}; give pretokenize.py --val_data, or set "
                        "eval_every: 0")


def data_splits(data: str | Path) -> dict[str, int]:
    """The splits of a token file (examples in each) or of a preference file (pairs in each)."""
    return open_preference_file(data) if is_preference_file(data) else open_splits(data)


def check_reference(cfg: TrainConfig, data: str, precision: str) -> None:
    """DPO starts from the model whose log-probabilities the preference file holds (its reference), computed as the
    run computes them: another model would make every log-ratio wrong from the first step, and another precision
    or compile setting moves them by its rounding, so either is warned of, in one line naming both."""
    settings = settings_of(data)
    made = (str(settings.get("precision") or ""), bool(settings.get("reference_compiled", False)))
    if made[0] and made != (precision, cfg.compile):
        made_how, run_how = (f"{p}, {'compiled' if c else 'eager'}" for p, c in (made, (precision, cfg.compile)))
        print0(f"warning: {data}'s reference log-probabilities were computed in {made_how}, but this run trains in "
               f"{run_how}: the first step's dpo_loss is off log 2 by the difference in rounding "
               f"(prefer.py --precision {precision}, or train with precision: {made[0]}, matches them)",
               file=sys.stderr)
    recorded = str(settings.get("reference_model") or "")
    if not recorded or cfg.train_from_scratch:
        return
    identity = settings.get("reference_identity")
    if isinstance(identity, dict) and Path(cfg.model).expanduser().exists():
        # By what the files are, not by the path: a model replaced at the same path differs, the same model reached
        # by another path (or copied with its times) does not, and so does one the reference had an adapter on.
        ours = json.loads(json.dumps(reference_identity(cfg.model)))
        same = ours["model"] == identity.get("model") and not identity.get("adapter")
        how = (f"{recorded} with the LoRA adapter {settings.get('adapter')} applied" if identity.get("adapter")
               else f"{recorded} as its files were then")
    else:  # a hub id, or a file from before identities were kept: by path
        same = recorded == cfg.model or (Path(recorded).exists() and Path(cfg.model).exists()
                                         and Path(recorded).resolve() == Path(cfg.model).resolve())
        how = recorded
    if not same:
        print0(f"warning: {data} holds the reference log-probabilities of {how}, but this run starts from "
               f"{cfg.model}; DPO expects the two to be the same model (its first step's dpo_loss is then log 2 = "
               "0.693)", file=sys.stderr)


def build_model_for(cfg: TrainConfig, rt: Runtime, base: Path | None, planned: ModelArgs | None, auto_cpu: bool,
                    data: RunData, out: Path) -> nn.Module:
    """The model to train: loaded or built, its finetune mode applied, checked against the data, set up to train."""
    model = cast_weights(apply_finetune_mode(build_or_load_model(cfg, rt.device, base), cfg), cfg.weight_dtype)
    check_auto_cpu(count_parameters(model), auto_cpu and planned is None)
    k = model.config.audio_num_codebooks
    if data.train_set.num_codebooks != k:
        raise UserError(f"{data.path} has {data.train_set.num_codebooks} codebooks per frame; the model expects {k}")
    for dataset in (data.train_set, data.val_loader.dataset if data.val_loader else None):
        if dataset is not None:
            check_text_ids(dataset, model.config.text_vocab_size)
    if rt.is_main:
        check_disk_space(model, cfg, out)
    if hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(cfg.activation_checkpointing)
    if cfg.compile:
        model.set_compile(True)
    return model.train()


def setup_run(cfg: TrainConfig, data: str | list[str], out: Path, rt: Runtime, resume: str | None,
              overwrite: bool) -> Run:
    """Everything before the first step, in the order that fails fastest: the data, then what the base model
    brings (tokenizer, codec, judges), then the model, its wrapping and optimizer, then the resumed state; only
    when all of it is ready is the output directory changed."""
    precision = run_precision(cfg, rt)
    seed_everything(cfg.seed)
    run_data = open_data(cfg, data, rt)
    # The base model is resolved once (a hub repo: fetched once, at model_revision) and everything that
    # needs it later (text tokenizer, samples, exports) is found now, not hours into the run.
    base = None if cfg.train_from_scratch else resolve_source(cfg.model, cfg.model_revision)
    auto_cpu = rt.auto_device and rt.device.type == "cpu"
    planned = check_planned_size(cfg, base, auto_cpu)  # before minutes of loading
    text_tokenizer = resolve_text_tokenizer(cfg.text_tokenizer, base)
    speech = RunSpeech(cfg, rt.device, text_tokenizer)
    quality = hf_exports = None
    if rt.is_main:
        if cfg.gen_every:
            speech.load()
        quality = QualityEval(cfg, out, speech, first_source(data)) if cfg.eval_every else None
        hf_exports = HFExports(cfg, base, text_tokenizer) if cfg.export_hf else None
    model = build_model_for(cfg, rt, base, planned, auto_cpu, run_data, out)
    # DDP or FSDP before the optimizer: fully_shard replaces the parameters with sharded ones.
    loss_model = parallel.wrap(LossModule(model), cfg.distributed, rt)
    optimizer = make_optimizer(model, cfg, rt.device)
    run = Run(cfg, rt, out, data, precision, run_data.train_loader, run_data.val_loader, len(run_data.train_set),
              run_data.total_steps, run_data.speakers, model, loss_model, optimizer,
              make_scheduler(optimizer, cfg, run_data.total_steps),
              torch.amp.GradScaler(rt.device.type, enabled=precision == "fp16"),
              torch.Generator().manual_seed(cfg.seed + rt.rank), LoopState(),
              tokenizer_dir=Path(text_tokenizer) if Path(text_tokenizer).is_dir() else None,
              samples=SampleWriter(cfg, out, speech), quality=quality, hf_exports=hf_exports,
              val_sources=run_data.val_sources,
              ema=WeightEMA(model, cfg.ema_decay, cfg.ema_start, torch.device("cpu") if cfg.ema_on_cpu else None)
              if cfg.ema_decay else None)
    found = find_resume_checkpoint(resume, run.checkpoints) if resume else None
    if resume and rt.distributed:
        check_same_resume_point(found, run.checkpoints, rt)
    if resume and found is None:
        print0(f"--resume auto: no checkpoint in {run.checkpoints}, starting fresh")
    if found is not None:
        run.loop = restore_checkpoint(*found, **run.checkpoint_state())
    if rt.is_main:  # all checks passed: only now is the directory changed
        if overwrite and found is None:
            clear_dir(out)
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        config_mod.save_yaml(cfg, out / "config.yaml")
    run.tracker = make_tracker(cfg, out, rt, run.loop.step)
    return run


def check_same_resume_point(found: tuple[Path, dict] | None, directory: Path, rt: Runtime) -> None:
    """Every process resumes from the checkpoint process 0 resumes from. One on a node that does not share the
    output directory's filesystem would otherwise start afresh beside the others: refused, in one line on every
    process, naming the node that cannot see it."""
    seen: list = [None] * rt.world_size
    torch.distributed.all_gather_object(seen, (socket.gethostname(), None if found is None else found[0].name))
    main_host, main_point = seen[0]
    for rank, (host, point) in enumerate(seen):
        if point != main_point:
            raise UserError(
                f"process {rank} on {host} sees {point or 'no checkpoint'} in {directory}, but process 0 on {main_host}"
                f" resumes from {main_point or 'no checkpoint'}: the output directory must be on a filesystem every "
                "node shares (NFS, Lustre, ...), at the same path")


def micro_batches(loader: ResumableLoader) -> Iterator:
    """Micro-batches forever, crossing epochs; the loader's state says where we are."""
    while True:
        yield from loader
        loader.set_epoch(loader.state_dict()["epoch"] + 1)


def fit(run: Run, on_eval: Callable[[int, dict], None] | None, progress: bool) -> TrainResult:
    """The loop: one optimizer step, its log line, then `after_step`, until the last step or a stop request."""
    cfg, rt, loop = run.cfg, run.rt, run.loop
    trainable = f", {count_trainable(run.model) / 1e6:.2f}M trained ({cfg.finetune})" if is_partial(run.model) else ""
    print0(f"training {type(run.model).__name__} ({count_parameters(run.model) / 1e6:.1f}M params{trainable}) "
           f"on {rt.device} x{rt.world_size}{f' ({cfg.distributed})' if rt.distributed else ''}, {run.precision}, "
           f"{run.total_steps} steps, {run.train_examples} train examples")
    batches = micro_batches(run.train_loader)
    codebooks = run.model.config.audio_num_codebooks
    first_step, final_val, stopped_early = loop.step, None, False
    whole = parallel.WholeModel(run.model, rt)  # the model whole on rank 0 for evaluations, best/, samples, final/
    pbar = tqdm(total=run.total_steps, initial=loop.step, disable=not (rt.is_main and progress), desc="train",
                unit="step")
    with StopFlag() as stop, pbar:  # the bar is closed before an error is printed, so the error is the last line
        while loop.step < run.total_steps:
            whole.drop()  # the previous step's whole copy (FSDP), before training needs the memory again
            t0 = time.perf_counter()
            lr = float(run.optimizer.param_groups[0]["lr"])  # torchao keeps it as a tensor
            stats = train_step(run.loss_model, [next(batches) for _ in range(cfg.grad_acc_steps)], cfg, rt,
                               run.precision, run.optimizer, run.scaler, run.generator, codebooks)
            if cfg.compile and loop.step == first_step:
                print0(f"step {loop.step + 1} took {time.perf_counter() - t0:.1f} s, compiling included")
            with warnings.catch_warnings():
                # A skipped (non-finite) step still advances the schedule: it follows optimizer steps taken.
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
                run.scheduler.step()
            loop.step += 1
            if run.ema is not None:
                run.ema.update(loop.step)
            pbar.update(1)
            pbar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}")
            log_step(run, stats, lr, time.perf_counter() - t0)
            val = after_step(run, whole, stop.requested, on_eval)
            if val is not None:
                final_val = val
                pbar.set_postfix(loss=f"{stats['loss']:.4f}", val=f"{val:.4f}")
            if stop.requested:
                stopped_early = loop.step < run.total_steps
                break
    return finish(run, whole, final_val, stopped_early)


def log_step(run: Run, stats: dict, lr: float, seconds: float) -> None:
    """The step's line in metrics.jsonl and the tracker; a run of non-finite steps stops the run."""
    cfg, loop, step = run.cfg, run.loop, run.loop.step
    loop.nonfinite_streak = 0 if stats["finite"] else loop.nonfinite_streak + 1
    if not stats["finite"]:
        print0(f"warning: step {step}: non-finite loss or gradient (loss={stats['loss']}, "
               f"grad_norm={stats['grad_norm']}); update skipped ({loop.nonfinite_streak} in a row)")
    if step % cfg.log_every == 0 or step == run.total_steps or not stats["finite"]:
        run.tracker.log({**{k: stats[k] for k in run.objective.stats}, "lr": lr, "grad_norm": stats["grad_norm"],
                         "tokens_per_s": stats["frames"] / seconds,
                         "step_time": seconds, "peak_memory_gb": peak_memory_bytes(run.rt.device) / 2**30,
                         "padding_fraction": stats["padding_fraction"],
                         "epoch": run.train_loader.state_dict()["epoch"]}, step)
    if loop.nonfinite_streak >= cfg.max_nonfinite_steps:
        run.save_checkpoint()
        run.tracker.finish()
        raise TrainingStopped(f"{loop.nonfinite_streak} non-finite steps in a row at step {step}; checkpoint "
                              f"saved in {run.checkpoints}. Lower learning_rate, raise warmup_steps or use bf16/fp32.")


def validation(run: Run) -> dict:
    """The objective's validation numbers over the val split; with several sources, over all of them (val_loss)
    and over each (val_loss/NAME), from one pass over each source."""
    if not run.val_sources:
        return validate(run.objective, run.loss_model, run.val_loader, run.rt, run.precision)
    sums = {name: validation_sums(run.objective, run.loss_model, loader, run.rt, run.precision)
            for name, loader in run.val_sources}
    measured = run.objective.summary([sum(parts) for parts in zip(*sums.values())])
    for name, part in sums.items():
        measured.update({f"{key}/{name}": value for key, value in run.objective.summary(part).items()})
    return measured


def after_step(run: Run, whole: parallel.WholeModel, stopping: bool,
               on_eval: Callable[[int, dict], None] | None) -> float | None:
    """What follows an optimizer step, in order: validation, the quality evaluation, best/, `on_eval`, the
    checkpoint, samples. Returns the step's validation loss when it measured one."""
    cfg, rt, loop, step = run.cfg, run.rt, run.loop, run.loop.step
    last = step == run.total_steps
    evaluated = {}
    if run.val_loader is not None and ((cfg.val_every and step % cfg.val_every == 0) or last):
        measured = validation(run)
        run.tracker.log(measured, step)
        evaluated.update(measured)
        loop.best_val_loss = min(loop.best_val_loss, evaluated["val_loss"])  # NaN never becomes the best
    measured_quality = bool(cfg.eval_every and (step % cfg.eval_every == 0 or last))
    if measured_quality:
        measured = run.quality(whole.get(), step, run.tracker, run.precision) if rt.is_main else {}
        evaluated.update(share_metrics(measured, rt))
    score = selection_score(cfg.select_best_by, evaluated)
    if score is not None and score < loop.best_score:
        loop.best_score = score
        best_model = whole.get()
        if rt.is_main:
            save_outputs(best_model, cfg, run.out, "best", run.tokenizer_dir, run.hf_exports, run.speakers)
    if run.ema is not None and (evaluated or measured_quality):
        ema_best(run, whole, "val_loss" in evaluated, measured_quality)
    if (evaluated or measured_quality) and rt.is_main:
        write_run_report(run)
    if evaluated and on_eval is not None:
        on_eval(step, evaluated)
    if (cfg.save_every and step % cfg.save_every == 0) or last or stopping:
        run.save_checkpoint()
        if rt.is_main:
            prune_checkpoints(run.checkpoints, cfg.keep_checkpoints)
    if cfg.gen_every and step % cfg.gen_every == 0:
        sampler = whole.get()
        if rt.is_main:
            run.samples(sampler, step, run.tracker, run.precision)  # after the checkpoint, and never fatal
    return evaluated.get("val_loss")


def write_run_report(run: Run) -> None:
    """report.html in the run directory, rewritten whole (atomically: a page kept open reloads the new one). A page
    that cannot be made is reported and training goes on."""
    try:
        write_page([run.out], run.out / REPORT_NAME)
    except Exception as e:  # noqa: BLE001 - a page is not worth a run
        _warn_failed(run.loop.step, "writing report.html", e)


def ema_best(run: Run, whole: parallel.WholeModel, validate_it: bool, evaluate_it: bool) -> None:
    """The average measured as the step measured the weights (logged as ema_val_loss, ema_cer, ...; its quality
    evaluation in eval/step_N_ema/), and best_ema/ when its select_best_by is the best yet. The average is swapped
    into the model for all of it, on every process (validation is collective)."""
    cfg, rt, step = run.cfg, run.rt, run.loop.step
    with run.ema.swapped_in():
        whole.drop()  # a copy gathered before the swap holds the weights, not the average
        measured = validation(run) if validate_it else {}
        if measured:
            run.tracker.log({f"ema_{k}": v for k, v in measured.items()}, step)
        if evaluate_it:
            quality = run.quality(whole.get(), step, run.tracker, run.precision, "ema_") if rt.is_main else {}
            measured.update(share_metrics(quality, rt))
        score = selection_score(cfg.select_best_by, measured)
        if score is not None and score < run.loop.best_ema_score:  # NaN never becomes the best
            run.loop.best_ema_score = score
            model = whole.get()
            if rt.is_main:
                save_outputs(model, cfg, run.out, "best_ema", run.tokenizer_dir, run.hf_exports, run.speakers)
        whole.drop()  # the gathered copy holds the average, not the weights


def finish(run: Run, whole: parallel.WholeModel, final_val: float | None, stopped_early: bool) -> TrainResult:
    """final/ (unless stopped early), the tracker closed, and the run's last line."""
    cfg, rt, loop = run.cfg, run.rt, run.loop
    if not stopped_early:
        final_model = whole.get()  # the last step's copy when it made one: the weights have not changed since
        if rt.is_main:
            save_outputs(final_model, cfg, run.out, "final", run.tokenizer_dir, run.hf_exports, run.speakers)
        if run.ema is not None:
            whole.drop()
            with run.ema.swapped_in():
                averaged = whole.get()
                if rt.is_main:
                    save_outputs(averaged, cfg, run.out, "final_ema", run.tokenizer_dir, run.hf_exports, run.speakers)
    whole.drop()
    run.tracker.finish()
    if rt.is_main:
        write_run_report(run)
    if rt.distributed:
        dist.barrier()
    best, by = loop.best_val_loss, cfg.select_best_by
    score = lower_is_better(by, loop.best_score)  # the score's sign undone
    print0(f"{'stopped' if stopped_early else 'done'} at step {loop.step}; outputs in {run.out}"
           + (f"; best val loss {best:.4f}" if math.isfinite(best) else "")
           + (f"; best/ has the best {by}, {score:.4f}" if by != "val_loss" and math.isfinite(score) else "")
           + ("" if (run.out / "best").is_dir() else f"; no best/ (no {by} was measured): use final/")
           + (f"; report: {run.out / REPORT_NAME}" if (run.out / REPORT_NAME).is_file() else ""))
    return TrainResult(loop.step, best, final_val, run.out, stopped_early)


def train(cfg: TrainConfig, data: str | Path, output_dir: str | Path, *, device: str | None = "auto",
          resume: str | None = None, overwrite: bool = False, on_eval: Callable[[int, dict], None] | None = None,
          progress: bool = True, inputs: list[tuple[str, str]] = ()) -> TrainResult:
    """Run (or resume) one training run. `on_eval(step, metrics)` (val_loss and/or the quality metrics of
    the step) may raise to stop it (sweep pruning).

    `output_dir` must be empty or new unless `resume` (continue the run in it) or `overwrite` (replace it)."""
    check_launch(cfg)
    sources = source_paths(data or cfg.train_data)
    data = sources[0] if len(sources) == 1 else sources
    rt = compute_init(device)
    # Nothing is written into the directory before setup_run's checks pass: a start that fails leaves a run intact.
    with claim_output_dir(output_dir, "--output_dir", inputs=[*run_inputs(cfg, data), *inputs], overwrite=overwrite,
                          continues=lambda _: bool(resume), refusal=lambda e: _holds_a_run(Path(output_dir), e),
                          main=rt.is_main) as out:
        return fit(setup_run(cfg, data, out, rt, resume, overwrite), on_eval, progress)
