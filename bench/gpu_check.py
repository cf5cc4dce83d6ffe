"""GPU acceptance check: every CUDA path of the toolkit in one run, each row in a process of its own.

    python bench/gpu_check.py --output gpu_check_out            (or: make gpu-check)
    python bench/gpu_check.py --output gpu_check_out --part 1   (then --part 2, --part 3: one part per command)
    python bench/gpu_check.py --output /tmp/x --device cpu --quick   (what the test suite runs)

Rows: a tiny model trained a few steps in bf16, fp16 (GradScaler), with fused AdamW, compile: true, activation
checkpointing, LoRA, a frozen backbone and conversational context (each: the loss is finite and falls); a run
killed with SIGKILL and resumed; torchrun with one process, DDP and FSDP2 (losses agree with one plain process);
loader workers with pinned batches and the host-device syncs of a step; generate.py, evaluate.py and
pretokenize.py on the device (batched Mimi codes against CPU-encoded ones); CSM-1B and the full-size Mimi with
random weights (bench/train_step.py's rows, MFU, peak memory beside bench/memory.py's prediction, Mimi encode
throughput at batch 1 and 16, generation RTF eager and compiled); the compiled frame step against the eager one
(greedy codes equal); 8-bit AdamW when bitsandbytes is installed; configs/finetune_12gb.yaml's low-memory recipe on
CSM-1B (torchao's compiled 8-bit update), its peak beside the prediction and its speed beside fp32-weight AdamW.

The CSM-1B rows run first (part 1), the tiny model's after them (part 2), the low-memory recipe last (part 3);
`--part N` runs one part, so that each fits one 10-minute command, and a later part adds its rows to the earlier
parts' report in the same --output. Each
row runs in a forked process with a time limit on the GPU (ROWS; a part's limits add up to its budget), so a
failing, hanging or crashing row never stops the others; the report (gpu_check.md, gpu_check.json, gpu_check.log
with each row's output) is written when all have run. Exit status: 0 when no row failed, 1 when one did, 2 for bad
arguments. Needs only torch, transformers, peft, safetensors, h5py, numpy, pandas, pyyaml and tqdm, plus the wheels
`make wheelhouse` downloads (WHEELHOUSE below); nothing else is imported, and nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after the project's own modules

# What a stock PyTorch image has (with what those packages need), and what `make wheelhouse` adds for this check.
STOCK = ("torch", "transformers", "peft", "safetensors", "h5py", "numpy", "pandas", "pyyaml", "tqdm")
WHEELHOUSE = ("torchaudio", "soundfile", "cffi", "pycparser", "jiwer", "rapidfuzz", "click", "torchao")

SYNCS_PER_STEP = 1  # the step's one read of its numbers (training.read_stats); more is a regression
CODE_FLIP_BOUND = 0.01  # at most this share of Mimi codes may differ between CUDA and CPU encoding (near-ties)
BF16_TOLERANCE = 2e-2  # relative: two bf16 runs of the same steps (CUDA's atomics add in varying order)


class Skip(Exception):
    """The row does not apply here; its message says why."""


@dataclass
class Context:
    device: str
    quick: bool
    work: Path

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def assets(self) -> dict:
        return json.loads((self.work / "assets.json").read_text())

    @property
    def precision(self) -> str:
        return "bf16" if self.cuda else "fp32"

    def steps(self, quick: int, full: int) -> int:
        return quick if self.quick else full


# --------------------------------------------------------------------------- shared pieces


def tiny_config(ctx: Context, **settings):
    from csm.training import config

    a = ctx.assets
    values = dict(model=a["model"], text_tokenizer=a["text_tokenizer"], mimi_weights=a["mimi"], batch_size=4,
                  learning_rate=2e-3, warmup_steps=2, max_steps=ctx.steps(8, 30), val_every=0, save_every=0,
                  gen_every=0, log_every=1, wandb_mode="disabled", precision=ctx.precision, seed=0, num_workers=0)
    return config.make_config({**values, **settings})


def logged_losses(out: Path) -> dict[int, float]:
    """Each step's training loss from metrics.jsonl (a resumed run's line replaces the killed run's)."""
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            losses[row["step"]] = row["loss"]
    return losses


def train_tiny(ctx: Context, name: str, **settings) -> list[float]:
    """Train the tiny model on the check's token file; its losses, one per step."""
    from csm.training import training

    out = ctx.work / "runs" / name
    training.train(tiny_config(ctx, **settings), ctx.work / "data.hdf5", out, device=ctx.device, overwrite=True,
                   progress=False)
    return list(logged_losses(out).values())


def baseline_losses(ctx: Context) -> list[float]:
    """The losses of one plain process with the default settings, trained once for the rows that compare with it."""
    out = ctx.work / "runs" / "baseline"
    if not (out / "final").is_dir():
        train_tiny(ctx, "baseline")
    return list(logged_losses(out).values())


def falls(losses: list[float], extra: str = "") -> tuple[bool, str]:
    """Finite, and the last third's mean below the first third's."""
    third = max(1, len(losses) // 3)
    first, last = sum(losses[:third]) / third, sum(losses[-third:]) / third
    ok = all(math.isfinite(x) for x in losses) and last < first
    return ok, f"loss {first:.3f} -> {last:.3f} over {len(losses)} steps{extra}"


def agree(a: list[float], b: list[float], rel: float) -> tuple[bool, float]:
    worst = max(abs(x - y) / max(abs(y), 1e-8) for x, y in zip(a, b)) if a and len(a) == len(b) else math.inf
    return worst <= rel, worst


def train_tolerance(ctx: Context) -> float:
    return BF16_TOLERANCE if ctx.precision == "bf16" else 1e-5


# --------------------------------------------------------------------------- rows


def row_setup(ctx: Context):
    """Tiny assets in the real layouts, a token file with conversations, and the sample clips encoded on the CPU."""
    import torch

    import pretokenize
    from csm.data import tiny_assets

    assets = {**tiny_assets.make_all(ctx.work / "assets"), **tiny_assets.make_judges(ctx.work / "assets")}
    (ctx.work / "assets.json").write_text(json.dumps({k: str(v) for k, v in assets.items()}))
    tiny_assets.make_token_file(ctx.work / "data.hdf5", n_train=8, n_val=4, speakers=3)
    pretokenize.main(["--train_data", str(SAMPLE / "train.csv"), "--output", str(ctx.work / "cpu_codes.hdf5"),
                      "--device", "cpu", "--batch_size", "1", "--text_tokenizer", str(assets["text_tokenizer"]),
                      "--mimi_weights", str(assets["mimi"])])
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        env["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        env["driver"] = _driver_version()
    import transformers

    env["transformers"] = transformers.__version__
    (ctx.work / "env.json").write_text(json.dumps(env))
    return True, ("tiny model, tokenizer, Mimi, Whisper and WavLM; 8 training rows (2 batches, seen again and again); "
                  "sample clips encoded on the CPU")


def _driver_version() -> str | None:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        return text.split("Kernel Module")[1].split()[0]
    except (OSError, IndexError):
        return None


def row_bf16(ctx: Context):
    return falls(train_tiny(ctx, "bf16", precision="bf16"))


def row_fp16(ctx: Context):
    if not ctx.cuda:
        raise Skip("fp16 needs CUDA (its loss scaling is tested on the CPU in tests/training/test_gpu_paths.py)")
    return falls(train_tiny(ctx, "fp16", precision="fp16"))


def row_fused_adamw(ctx: Context):
    from csm.training import training

    made = []
    real = training.make_optimizer
    training.make_optimizer = lambda *a: made.append(real(*a)) or made[-1]
    losses = train_tiny(ctx, "fused", precision="fp32")
    fused = bool(made[0].defaults.get("fused"))
    ok, figure = falls(losses, f", fused: {'yes' if fused else 'no'}")
    return ok and fused == ctx.cuda, figure


def row_compile(ctx: Context):
    if ctx.quick and not ctx.cuda:
        raise Skip("--quick on the CPU: compiling takes a minute here (test_ddp.py and test_model.py compile)")
    return falls(train_tiny(ctx, "compile", compile=True))


def row_ema(ctx: Context):
    """ema_decay with the average in CPU memory (ema_on_cpu): the loss falls, and final_ema/ is written and differs
    from final/."""
    from safetensors.torch import load_file

    ok, figure = falls(train_tiny(ctx, "ema", ema_decay=0.5, ema_on_cpu=True))
    out = ctx.work / "runs" / "ema"
    final, averaged = (load_file(str(out / name / "model.safetensors")) for name in ("final", "final_ema"))
    differs = any(not final[k].equal(averaged[k]) for k in final)
    return ok and differs, figure + f", final_ema/ {'differs from' if differs else 'EQUALS'} final/"


def row_checkpointing(ctx: Context):
    return falls(train_tiny(ctx, "checkpointing", activation_checkpointing=True))


def row_lora(ctx: Context):
    return falls(train_tiny(ctx, "lora", finetune="lora", learning_rate=1e-2))


def row_freeze(ctx: Context):
    return falls(train_tiny(ctx, "freeze", freeze=["backbone"], learning_rate=1e-2))


def row_context(ctx: Context):
    return falls(train_tiny(ctx, "context", context_mode="conversation", context_turns=2, context_loss="all"))


def row_dpo(ctx: Context):
    """objective: dpo on scripted pairs whose reference was computed on the CPU in fp32: the first step is at the
    reference (dpo_loss log 2, within the precision's rounding) and the loss falls."""
    from csm.training.preferences import make_preference_file

    data = make_preference_file(ctx.work / "prefs.hdf5", ctx.assets["model"], n_train=8, n_val=2)
    out = ctx.work / "runs" / "dpo"
    from csm.training import training

    training.train(tiny_config(ctx, objective="dpo", batch_size=2, learning_rate=1e-3, dpo_sft_weight=0.1,
                               dpo_decoder_fraction=0.5, val_every=4), data, out, device=ctx.device, overwrite=True,
                   progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dpo = [r["dpo_loss"] for r in rows if "dpo_loss" in r]
    first = abs(dpo[0] - math.log(2))
    ok, figure = falls(dpo)
    ok = ok and first < (0.05 if ctx.precision == "bf16" else 1e-5)
    return ok, f"dpo_loss {figure}; step 1 off log 2 by {first:.2g}; " \
               f"val reward accuracy {[r for r in rows if 'val_reward_accuracy' in r][-1]['val_reward_accuracy']:.2f}"


def row_resume(ctx: Context):
    """A run killed (SIGKILL) in the step after its checkpoint, resumed: the same losses as an unbroken run."""
    from csm.training import training

    n, every = ctx.steps(6, 20), ctx.steps(3, 10)
    settings = dict(save_every=every, keep_checkpoints=5)
    killed = ctx.work / "runs" / "resume_killed"
    pid = os.fork()  # before this process touches CUDA: the killed run is a process of its own
    if pid == 0:
        real, calls = training.train_step, []

        def dies_after_the_checkpoint(*args, **kwargs):
            calls.append(1)
            if len(calls) == every + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        training.train_step = dies_after_the_checkpoint
        try:
            training.train(tiny_config(ctx, max_steps=n, **settings), ctx.work / "data.hdf5", killed,
                           device=ctx.device, progress=False)
        finally:
            os._exit(3)  # not reached when killed
    _, status = os.waitpid(pid, 0)
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        return False, f"the run to kill ended otherwise (wait status {status})"
    training.train(tiny_config(ctx, max_steps=n, **settings), ctx.work / "data.hdf5", killed, device=ctx.device,
                   resume="auto", progress=False)
    resumed = logged_losses(killed)
    unbroken = train_tiny(ctx, "resume_unbroken", max_steps=n, **settings)
    after = [resumed[s] for s in range(every + 1, n + 1)]
    ok, worst = agree(after, unbroken[every:], train_tolerance(ctx))
    return ok, f"killed in step {every + 1}, resumed from step {every}: steps {every + 1}-{n} within {worst:.1e} (rel)"


def _torchrun_row(ctx: Context, strategy: str):
    import subprocess

    out = ctx.work / "runs" / f"torchrun_{strategy}"
    cfg = tiny_config(ctx, distributed=strategy)
    settings = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in cfg.to_dict().items()
                if k in ("batch_size", "learning_rate", "warmup_steps", "precision", "seed", "num_workers",
                         "distributed", "log_every", "val_every", "save_every", "gen_every")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(_free_port()),
           str(ROOT / "train.py"), "--data", str(ctx.work / "data.hdf5"), "--model", cfg.model,
           "--text_tokenizer", cfg.text_tokenizer, "--mimi_weights", cfg.mimi_weights,
           "--max_steps", str(cfg.max_steps),
           "--output_dir", str(out), "--device", ctx.device, "--wandb_mode", "disabled", "--overwrite",
           *[a for s in settings for a in ("--set", s)],
           # FSDP: each process keeps the weight average of its own shard (DTensor), gathered into final_ema/
           *(["--set", "ema_decay=0.5"] if strategy == "fsdp" else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    print(proc.stdout, proc.stderr, sep="\n")
    if proc.returncode != 0:
        return False, f"torchrun exited {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    wrapped = f"x1 ({strategy})" in proc.stdout
    plain = baseline_losses(ctx)
    ok, worst = agree(list(logged_losses(out).values()), plain, train_tolerance(ctx))
    backend = "NCCL" if ctx.cuda else "gloo"
    averaged = strategy != "fsdp" or (out / "final_ema" / "model.safetensors").is_file()
    return ok and wrapped and averaged, (
        f"1 process on {backend}, {strategy.upper()} {'on' if wrapped else 'NOT applied'}; losses within {worst:.1e} "
        f"(rel) of one plain process" + ("" if strategy != "fsdp" else
                                          f"; sharded weight average {'written' if averaged else 'MISSING'}"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def row_ddp(ctx: Context):
    return _torchrun_row(ctx, "ddp")


def row_fsdp(ctx: Context):
    return _torchrun_row(ctx, "fsdp")


def row_workers(ctx: Context):
    """Loader workers with pinned batches; the host-device syncs of each step after the first."""
    import torch

    from csm.training import training

    real, syncs, pinned = training.train_step, [], []

    def counted(loss_model, micro_batches, *args, **kwargs):
        if not ctx.cuda:
            return real(loss_model, micro_batches, *args, **kwargs)
        pinned.append(all(t.is_pinned() for batch in micro_batches for t in batch if t is not None))
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                stats = real(loss_model, micro_batches, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
        return stats

    training.train_step = counted
    ok, figure = falls(train_tiny(ctx, "workers", num_workers=2))
    if not ctx.cuda:
        return ok, figure + ", 2 workers (syncs are counted on CUDA only)"
    per_step = max(syncs[1:]) if len(syncs) > 1 else math.inf
    return (ok and all(pinned) and per_step <= SYNCS_PER_STEP,
            f"{figure}, 2 workers, batches pinned: {'yes' if all(pinned) else 'no'}, host syncs per step: {per_step} "
            f"(at most {SYNCS_PER_STEP})")


def row_generate(ctx: Context):
    """generate.py on the device; then the compiled frame step (CUDA graphs on a GPU) against the eager one on a batch
    of prompts of different lengths, greedy, in fp32: the codes must be equal."""
    import soundfile as sf
    import torch

    import generate
    from csm.judging.synthesis import CompiledStep, SpeechRequest, synthesize_batch
    from csm.model.tokenization import load_text_tokenizer
    from csm.model.codec import load_mimi
    from csm.model.weights import load_model

    a, wav = ctx.assets, ctx.work / "generated.wav"
    t0 = time.perf_counter()
    generate.main(["--model", a["model"], "--text", "The GPU check speaks.", "--speaker", "0", "--output", str(wav),
                   "--max_audio_seconds", str(ctx.steps(1, 2)), "--seed", "0", "--device",
                   ctx.device, "--text_tokenizer",
                   a["text_tokenizer"], "--mimi_weights", a["mimi"], "--overwrite"])
    audio, rate = sf.read(str(wav))
    seconds, elapsed = len(audio) / rate, time.perf_counter() - t0
    model = load_model(a["model"], device=ctx.device, dtype=torch.float32)
    tokenizer, mimi = load_text_tokenizer(a["text_tokenizer"]), load_mimi(a["mimi"], device=ctx.device)
    requests = [SpeechRequest(text, i, (), 1.6, i) for i, text in
                enumerate(("Short.", "A longer line for the compiled step.", "Third line, of a third length."))]
    eager = synthesize_batch(model, tokenizer, mimi, requests, topk=1)
    # On the CPU the check of the check traces the graphs without inductor's minutes of C++ compiling.
    step = CompiledStep(model, 4, **({} if ctx.cuda else {"backend": "eager"}))
    for _ in range(2):  # the second call replays what the first recorded
        compiled = synthesize_batch(model, tokenizer, mimi, requests, topk=1, step=step)
        equal = sum(torch.equal(x.codes, y.codes) for x, y in zip(eager, compiled))
    how = "CUDA graphs" if ctx.cuda else "traced, not compiled, on the CPU"
    ok = bool(len(audio) == 0 or abs(audio).max() < 1e3) and equal == len(requests)
    return ok, (f"{seconds:.2f} s of audio in {elapsed:.1f} s; compiled step ({how}): {equal} of {len(requests)} "
                "greedy rows equal to eager")


def row_evaluate(ctx: Context):
    import importlib.util

    import evaluate

    a, out = ctx.assets, ctx.work / "evaluation"
    # DNSMOS's onnxruntime (27 MB) is not in the wheelhouse: a bare PyTorch machine evaluates without it.
    dnsmos = all(importlib.util.find_spec(m) for m in ("speechmos", "onnxruntime"))
    evaluate.main(["--model", a["model"], "--eval_data", str(SAMPLE / "val.json"), "--n", "2", "--output_dir", str(out),
                   "--asr", a["asr"], "--speaker_model", a["speaker_model"], "--max_audio_seconds",
                   str(ctx.steps(1, 2)),
                   "--device", ctx.device, "--text_tokenizer", a["text_tokenizer"], "--mimi_weights", a["mimi"],
                   "--overwrite", *(["--no_ceilings"] if ctx.quick and not ctx.cuda else []),
                   *([] if dnsmos else ["--no_dnsmos"])])
    generated = json.loads((out / "summary.json").read_text())["generated"]
    shown = {k: generated.get(k) for k in ("wer", "speaker_sim", "eos_rate", *(["dnsmos_ovrl"] if dnsmos else []))}
    ok = all(v is not None and math.isfinite(v) for v in shown.values())
    return ok, ", ".join(f"{k} {v:.3f}" for k, v in shown.items() if v is not None) + " (tiny random judges)"


def row_pretokenize(ctx: Context):
    """pretokenize.py as a multi-GPU run launches it: under torchrun, one process per GPU (2 on the CPU), each
    encoding its share of the chunks in batches of 16; the codes against the CPU's, encoded one at a time."""
    import subprocess

    import h5py
    import numpy as np
    import torch

    from csm.data.token_file import read_flat

    a, out = ctx.assets, ctx.work / "device_codes.hdf5"
    processes = torch.cuda.device_count() if ctx.cuda else 2
    # --standalone: torchrun finds a free port itself (one picked here could be taken before torchrun binds it).
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                    str(ROOT / "pretokenize.py"), "--train_data", str(SAMPLE / "train.csv"),
                    "--output", str(out), "--device", ctx.device, "--batch_size", "16", "--save_every", "4",
                    "--text_tokenizer", a["text_tokenizer"], "--mimi_weights", a["mimi"], "--overwrite"],
                   cwd=ROOT, check=True)
    with h5py.File(ctx.work / "cpu_codes.hdf5", "r") as f, h5py.File(out, "r") as g:
        (cpu, cpu_rows), (dev, dev_rows) = read_flat(f, "cpu", "train", "audio"), read_flat(g,
                                                                                            "device", "train", "audio")
    if not np.array_equal(cpu_rows, dev_rows):
        return False, "the batched encoding gave other frame counts than the CPU's"
    differ = float((cpu != dev).mean())
    return differ <= CODE_FLIP_BOUND, (f"{len(cpu_rows) - 1} clips, torchrun with {processes} process(es), batch 16 on "
                                        f"{ctx.device} vs one at a time on the CPU: {differ:.2%} of {len(cpu)} codes "
                                        f"differ (at most {CODE_FLIP_BOUND:.0%})")


def _big_args(ctx: Context):
    """CSM-1B on a GPU; on the CPU its tiny flavors (with the full text vocabulary, as the reference data needs)."""
    from csm.model.csm_model import ModelArgs

    return ModelArgs() if ctx.cuda else ModelArgs(backbone_flavor="llama-tiny", decoder_flavor="llama-tiny-decoder")


def _csm1b_train(ctx: Context, wanted: list[str], name: str):
    import torch
    import dataloader
    import memory
    import train_step

    runs = [run for run in train_step.BIG_RUNS if run[0] in wanted]
    data = ctx.work / "reference.hdf5"
    if not data.is_file():
        dataloader.write_reference_file(data, 200 if ctx.cuda else 40)
    report = train_step.big_model_report(data, torch.device(ctx.device), _big_args(ctx), ctx.steps(2, 6),
                                         memory.previous_frame_embedding, runs=runs)
    (ctx.work / f"{name}.md").write_text(report + "\n")
    speeds = [line.split("|")[2].strip() for line in report.splitlines() if line.startswith("| 1B")][:len(runs)]
    figure = "; ".join(f"{run.removeprefix('1B, bf16, ')}: {speed} frames/s" for (run, _), speed in zip(runs, speeds))
    return all(float(s) > 0 for s in speeds), figure + " (tables below)"


def row_csm1b_train(ctx: Context):
    """bench/train_step.py's rows on CSM-1B (random weights): bf16 eager, activation checkpointing, LoRA."""
    return _csm1b_train(ctx, ["1B, bf16, fused AdamW", "1B, bf16, activation checkpointing", "1B, bf16, LoRA"],
                        "csm1b_train")


def row_csm1b_low_memory(ctx: Context):
    """configs/finetune_12gb.yaml's recipe on CSM-1B: its measured peak beside bench/memory.py's prediction, and its
    speed beside the fp32-weight AdamW row, measured in the same call. On a GPU torchao compiles its 8-bit update
    (Triton) for each weight's shape, the first step."""
    import train_step

    return _csm1b_train(ctx, ["1B, bf16, fused AdamW", train_step.LOW_MEMORY_RUN], "csm1b_low_memory")


def row_csm1b_compile(ctx: Context):
    """The same with compile: true, apart: compiling CSM-1B takes the most time of any row."""
    if not ctx.cuda:
        raise Skip("compiling is checked on a GPU only (on the CPU: tests/training/test_ddp.py and test_model.py)")
    return _csm1b_train(ctx, ["1B, bf16, compile: true (after 3 warm-up steps)"], "csm1b_compile")


def row_mimi_throughput(ctx: Context):
    """Mimi (full size on CUDA, random weights) encoding 10 s clips one at a time and 16 at a time."""
    import numpy as np
    import torch
    from transformers import MimiConfig, MimiModel

    from csm.data import tiny_assets
    from csm.model.codec import encode_audio

    config = MimiConfig() if ctx.cuda else tiny_assets.tiny_hf_mimi_config()
    mimi = MimiModel(config).to(ctx.device).eval()
    seconds, n = (10.0, 32) if ctx.cuda else (1.0, 4)
    clips = [np.random.default_rng(i).standard_normal(int(seconds * 24000)).astype(np.float32) * 0.1 for i in range(n)]
    rates = {}
    for batch in (1, 16):
        encode_audio(mimi, clips[:batch], 32)  # warm-up
        if ctx.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            encode_audio(mimi, clips[i:i + batch], 32)
        rates[batch] = n * seconds / (time.perf_counter() - t0)
    return all(r > 0 for r in rates.values()), (f"{rates[1]:.0f} s of audio per s at batch 1, {rates[16]:.0f} at batch "
                                                f"16 ({rates[16] / rates[1]:.1f}x)")


def _csm1b_speaker(ctx: Context):
    """CSM-1B (random weights; bf16 on a GPU), the full-size Mimi and a function giving the real-time factor of a
    batch (seconds per second of audio of each stream, after a warm-up call) and the codes spoken."""
    import torch
    from transformers import MimiConfig, MimiModel

    from csm.data import tiny_assets
    from csm.judging.synthesis import SpeechRequest, synthesize_batch
    from csm.model.tokenization import load_text_tokenizer
    from csm.model.weights import build_model

    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    torch.manual_seed(0)
    model = build_model(_big_args(ctx), device=torch.device(ctx.device), dtype=dtype).eval()
    mimi = MimiModel(MimiConfig() if ctx.cuda else tiny_assets.tiny_hf_mimi_config()).to(ctx.device).eval()
    tokenizer = load_text_tokenizer(ctx.assets["text_tokenizer"])
    seconds = 4.0 if ctx.cuda else 0.4

    def rtf(batch: int, step=None, topk: int = 50):
        requests = [SpeechRequest("The real-time factor of one stream.", 0, (), seconds, seed=i) for i in range(batch)]
        warm_up = [SpeechRequest("Warm up.", 0, (), 0.4, seed=i) for i in range(batch)]
        synthesize_batch(model, tokenizer, mimi, warm_up, step=step, topk=topk)  # compiled: the graphs are made here
        t0 = time.perf_counter()
        spoken = synthesize_batch(model, tokenizer, mimi, requests, step=step, topk=topk)
        elapsed, audio = time.perf_counter() - t0, min(len(s.audio) for s in spoken) / 24000
        return (elapsed / audio if audio else math.inf), audio, [s.codes for s in spoken]

    return model, rtf


def row_csm1b_generate(ctx: Context):
    """Generation with CSM-1B and the full-size Mimi (random weights), eager: one stream's real-time factor, and
    16 streams at once."""
    _, rtf = _csm1b_speaker(ctx)
    one, audio, _ = rtf(1)
    parts = [f"one stream RTF {one:.2f} ({audio:.1f} s of audio)"]
    if ctx.cuda:
        parts.append(f"16 streams RTF {rtf(16)[0]:.2f} each")
    return audio > 0, "; ".join(parts) + " (eager; below 1 is faster than real time)"


def row_csm1b_generate_compiled(ctx: Context):
    """The same stream with the compiled step (CUDA graphs): its RTF, and how many greedy codes match eager's (bf16:
    the compiled kernels round differently, so a few may differ)."""
    from csm.judging.synthesis import CompiledStep

    if not ctx.cuda:
        raise Skip("CUDA graphs need a GPU (the compiled step against eager on CPU: test_batched_generation.py)")
    model, rtf = _csm1b_speaker(ctx)
    step = CompiledStep(model, 1)
    eager_rtf, _, _ = rtf(1)
    compiled, audio, _ = rtf(1, step)
    _, _, greedy_eager = rtf(1, topk=1)
    _, _, greedy_compiled = rtf(1, step, topk=1)
    a, b = greedy_eager[0], greedy_compiled[0]
    n = min(a.shape[1], b.shape[1])
    same = float((a[:, :n] == b[:, :n]).float().mean()) if n else 0.0
    return audio > 0, (f"one stream RTF {compiled:.2f} compiled, {eager_rtf:.2f} eager ({eager_rtf / compiled:.2f}x); "
                       f"greedy: {same:.1%} of the first {n} frames' codes equal eager's")


def row_csm1b_dpo(ctx: Context):
    """bench/bench_dpo.py on CSM-1B with LoRA in bf16 (random weights): the DPO step against an SFT step on the
    same frames, speed and peak memory."""
    import torch

    import bench_dpo

    size = "1b" if ctx.cuda else "tiny"
    names = [bench_dpo.ROWS[0][0], bench_dpo.ROWS[2][0]]  # SFT and DPO, each at its default decoder share
    text, results = bench_dpo.report(size, torch.device(ctx.device), steps=ctx.steps(2, 4), pairs=16,
                                     max_frames=150, fresh=False, names=names)
    (ctx.work / "csm1b_dpo.md").write_text(text + "\n")
    (_, sft), (_, dpo) = results
    ok = sft["frames_per_s"] > 0 and dpo["frames_per_s"] > 0
    return ok, (f"DPO step at {dpo['frames_per_s'] / sft['frames_per_s']:.2f}x the SFT step's frames/s, "
                f"{dpo['peak_gib'] / sft['peak_gib']:.2f}x its peak memory (table below)")


def row_adamw8bit(ctx: Context):
    if not ctx.cuda:
        raise Skip("8-bit AdamW needs CUDA")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise Skip("bitsandbytes not installed") from None
    return falls(train_tiny(ctx, "adamw8bit", optimizer="adamw8bit"))


# name, what it checks, function, part, time limit on a GPU in seconds. Part 1 is what a GPU run exists for (CSM-1B's
# speed, memory and generation), part 2 the tiny model through every CUDA path; setup (part 0) runs in both. Each
# part's limits add up to its budget (PART_BUDGETS), which fits one 10-minute command with room for the machine's
# start; on the CPU (the check of the check) there are no limits.
ROWS = [
    ("setup", "tiny assets and data", row_setup, 0, 40),
    ("csm1b_train", "CSM-1B training step, bf16: eager, checkpointing, LoRA", row_csm1b_train, 1, 100),
    ("csm1b_generate", "CSM-1B generation RTF, eager: 1 and 16 streams", row_csm1b_generate, 1, 50),
    ("csm1b_dpo", "CSM-1B DPO step vs SFT step, LoRA (random weights)", row_csm1b_dpo, 1, 60),
    ("mimi_throughput", "Mimi encoding, batch 1 vs 16", row_mimi_throughput, 1, 30),
    ("csm1b_generate_compiled", "CSM-1B generation RTF, compiled (CUDA graphs)", row_csm1b_generate_compiled, 1, 70),
    ("csm1b_compile", "CSM-1B training step, compile: true", row_csm1b_compile, 1, 70),
    ("bf16", "tiny model, bf16 autocast", row_bf16, 2, 12),
    ("fp16", "tiny model, fp16 with GradScaler", row_fp16, 2, 12),
    ("fused_adamw", "tiny model, fused AdamW (fp32)", row_fused_adamw, 2, 12),
    ("checkpointing", "tiny model, activation checkpointing", row_checkpointing, 2, 12),
    ("lora", "tiny model, LoRA", row_lora, 2, 12),
    ("freeze", "tiny model, backbone frozen", row_freeze, 2, 12),
    ("context", "tiny model, conversational context", row_context, 2, 12),
    ("dpo", "tiny model, objective: dpo", row_dpo, 2, 15),
    ("resume", "kill (SIGKILL) and resume", row_resume, 2, 30),
    ("ddp", "torchrun, 1 process, DDP", row_ddp, 2, 25),
    ("fsdp", "torchrun, 1 process, FSDP2", row_fsdp, 2, 25),
    ("workers", "loader workers, pinned memory, host syncs", row_workers, 2, 15),
    ("generate", "generate.py; compiled step vs eager", row_generate, 2, 35),
    ("evaluate", "evaluate.py, tiny judges", row_evaluate, 2, 20),
    ("pretokenize", "torchrun pretokenize.py, a process per GPU, vs CPU codes", row_pretokenize, 2, 21),
    ("compile", "tiny model, compile: true", row_compile, 2, 40),
    ("adamw8bit", "tiny model, 8-bit AdamW", row_adamw8bit, 2, 10),
    ("csm1b_low_memory", "CSM-1B, the 12 GB recipe (bf16 + stochastic rounding, 8-bit states, step in backward) "
     "beside fp32-weight AdamW", row_csm1b_low_memory, 3, 240),
    ("ema", "tiny model, ema_decay with the average in CPU memory", row_ema, 3, 15),
]
# Parts 1 and 2 fit one 15-minute GPU lease; part 3 (torchao compiles its update for each of CSM-1B's weight
# shapes on its first step) is a lease of its own.
PARTS = (1, 2, 3)
PART_BUDGETS = {part: sum(limit for *_, p, limit in ROWS if p in (0, part)) for part in PARTS}


# --------------------------------------------------------------------------- running rows apart


def run_row(name: str, fn, ctx: Context, limit: float | None, log: Path) -> dict:
    """`fn(ctx)` in a forked process (new session) with a time limit (None: none); its output goes to `log`."""
    result_file = ctx.work / "results" / f"{name}.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # also where a host replaced them
        try:
            passed, figure = fn(ctx)
            result = {"status": "pass" if passed else "fail", "figure": figure}
        except Skip as e:
            result = {"status": "skip", "figure": str(e)}
        except BaseException as e:  # noqa: BLE001 - every failure is a row's result
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0]
            result = {"status": "fail", "figure": f"{type(e).__name__}: {first}"[:300]}
        result_file.write_text(json.dumps(result))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if limit is not None and time.perf_counter() - t0 > limit:
            os.killpg(pid, signal.SIGKILL)  # the row and whatever it started (torchrun, loader workers)
            os.waitpid(pid, 0)
            return {"status": "fail", "figure": f"timed out after {limit:.0f} s", "seconds": limit}
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    if not result_file.is_file():
        how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit status {os.WEXITSTATUS(status)}"
        return {"status": "fail", "figure": f"the row's process died ({how}) before reporting", "seconds": seconds}
    return {**json.loads(result_file.read_text()), "seconds": seconds}


def markdown(rows: list[dict], env: dict, details: list[str]) -> str:
    where = ", ".join(f"{k} {v}" for k, v in env.items() if v)
    lines = [f"GPU check, {time.strftime('%Y-%m-%d')}: {where}", "",
             "| row | checks | result | figure | seconds |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['checks']} | {r['status']} | {r['figure'].replace('|', '/')} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines + [""] + details) + "\n"


def earlier_part(path: Path, part: int | None) -> dict | None:
    """The report at `path` when it holds only another part's rows than `part` (so this part's join it), else None."""
    if part is None or not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
        parts = {r["part"] for r in report["rows"] if r["row"] != "setup"}
    except (ValueError, KeyError, TypeError):
        return None
    return report if parts and part not in parts else None


def merge_parts(earlier: dict, report: dict) -> dict:
    """One report of the parts run so far: the rows in ROWS' order (this run's setup row), every part's details."""
    order = {name: i for i, (name, *_) in enumerate(ROWS)}
    rows = [r for r in earlier["rows"] if r["row"] != "setup"] + report["rows"]
    parts = sorted({r["part"] for r in rows if r["row"] != "setup"})
    env = {**report["env"], "parts": ", ".join(map(str, parts))}
    return {"env": env, "rows": sorted(rows, key=lambda r: order.get(r["row"], len(order))),
            "details": earlier.get("details", []) + report["details"]}


def cuda_visible() -> bool:
    """torch.cuda.is_available(), asked in a child process: this process forks every row and must never start
    CUDA itself (a child forked after that could not use it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        import torch

        os._exit(0 if torch.cuda.is_available() else 1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def pinned_wheels() -> list[str]:
    """WHEELHOUSE at requirements.txt's versions (what `make wheelhouse` downloads)."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    missing = [n for n in WHEELHOUSE if n not in pins]
    if missing:
        raise SystemExit(f"requirements.txt pins no version of {', '.join(missing)}")
    return [f"{n}=={pins[n]}" for n in WHEELHOUSE]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", help="directory for gpu_check.md, gpu_check.json and gpu_check.log")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (to test the check itself)")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps, smaller data; on the CPU, the tiny model stands in "
                                                         "for CSM-1B and compiling is left out")
    p.add_argument("--part", type=int, choices=PARTS,
                   help=f"one part of the check, for a GPU lent in short windows: 1, the CSM-1B rows (at most "
                        f"{PART_BUDGETS[1]} s), or 2, the tiny model's rows ({PART_BUDGETS[2]} s); default: both")
    p.add_argument("--only", nargs="+", metavar="ROW", help="these rows (setup always runs)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --output")
    p.add_argument("--print_wheelhouse", action="store_true", help="print the wheels `make wheelhouse` downloads")
    args = p.parse_args(argv)
    if args.print_wheelhouse:
        print(" ".join(pinned_wheels()))
        return 0
    if not args.output:
        p.error("--output is required")
    names = [name for name, *_ in ROWS]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        p.error(f"no row named {', '.join(unknown)} (rows: {', '.join(names)})")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        p.error(f"--output {out} is a file, not a directory")
    earlier = earlier_part(out / "gpu_check.json", args.part) if not args.overwrite else None
    if earlier is None and (out / "gpu_check.json").exists() and not args.overwrite:
        p.error(f"--output {out} already holds a check's report; pass --overwrite to replace it")

    import torch

    if args.device.startswith("cuda") and not cuda_visible():
        print(f"--device {args.device}: no CUDA GPU is visible to this torch {torch.__version__} (CUDA "
              f"{torch.version.cuda}); run with --device cpu to check the check itself", file=sys.stderr)
        return 2
    # Imported once here, before any fork: every row starts with them loaded.
    import evaluate  # noqa: F401
    import generate  # noqa: F401
    import pretokenize  # noqa: F401
    from csm.judging import synthesis  # noqa: F401
    from csm.data import tiny_assets  # noqa: F401
    import train_step  # noqa: F401
    from csm.training import training  # noqa: F401

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Context(args.device, args.quick, Path(tmp))
        rows, logs = [], []
        for name, checks, fn, part, limit in ROWS:
            if name != "setup" and (args.only and name not in args.only or args.part and part != args.part):
                continue
            log = ctx.work / f"{name}.log"
            if rows and rows[0]["status"] != "pass":
                result = {"status": "fail", "figure": "not run: setup failed", "seconds": 0.0}
            else:
                # The limits are a GPU's; on the CPU the check of the check runs each row to its end, however slow
                # the machine (its test has a time limit of its own, for hangs).
                result = run_row(name, fn, ctx, limit if ctx.cuda else None, log)
            rows.append({"row": name, "checks": checks, "part": part, **result})
            print(f"{name:16s} {result['status']:4s}  {result['figure']}", flush=True)
            if log.is_file():
                logs.append(f"===== {name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-200:]))
        env = json.loads((ctx.work / "env.json").read_text()) if (ctx.work / "env.json").is_file() else {}
        env = {"device": args.device, **env, "quick": args.quick or None}
        details = [(ctx.work / name).read_text() for name in ("csm1b_train.md", "csm1b_compile.md", "csm1b_dpo.md")
                   if (ctx.work / name).is_file()]
    from csm.system.outputs import write_text_atomic

    report = {"env": env, "rows": rows, "details": details}
    if earlier is not None:  # the other part's rows, from an earlier command on the same --output
        report = merge_parts(earlier, report)
        logs.insert(0, (out / "gpu_check.log").read_text(errors="replace").rstrip("\n"))
    write_text_atomic(out / "gpu_check.md", markdown(report["rows"], report["env"], report["details"]))
    write_text_atomic(out / "gpu_check.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "gpu_check.log", "\n".join(logs) + "\n")
    failed = [r["row"] for r in rows if r["status"] == "fail"]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} rows passed or were skipped; report in {out / 'gpu_check.md'}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
