"""The whole workflow offline on CPU in a few minutes: prepare -> pretokenize -> train -> generate -> evaluate -> one
round of preference finetuning (prefer -> train with DPO -> evaluate) -> sweep.

    make demo            (or: .venv/bin/python demo.py [--quick] [--output_dir demo_out])

It uses tiny stand-ins for CSM-1B, the Llama tokenizer, Mimi, Whisper and WavLM (random weights, saved
in the real layouts) and the bundled espeak-ng clips in data/sample/, joined into one long recording per
speaker for prepare.py to cut up (with the real silero-vad model). It shows every step working; the
audio a tiny random model makes is noise, not speech, and the quality numbers (WER, speaker similarity)
the tiny random judges give it mean nothing.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import optuna
import pandas as pd

import evaluate
import generate
import prefer
import prepare
import pretokenize
import report
import sweep
from csm.data import tiny_assets
from csm.judging.metrics import BY_NAME
import train
from utils import CommandParser, run_cli

ROOT = Path(__file__).resolve().parent
SAMPLE = ROOT / "data" / "sample"


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def plot_losses(metrics_path: Path, png: Path) -> None:
    """Training and validation loss against optimizer steps."""
    import matplotlib  # here, so that the Agg backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("demo: tiny CSM on the bundled clips")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def plot_sweep(sweep_dir: Path, out_dir: Path) -> list[Path]:
    """Static PNGs of the sweep (the HTML versions are in the sweep directory)."""
    import matplotlib  # here, so that the Agg backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    study = optuna.load_study(study_name="csm-sweep", storage=f"sqlite:///{(sweep_dir / 'study.db').resolve()}")
    written = []
    for name, plot in (("sweep_history", ovm.plot_optimization_history),
                       ("sweep_importances", ovm.plot_param_importances)):
        try:
            ax = plot(study)
            ax.figure.set_size_inches(6, 3.5)
            ax.figure.tight_layout()
            ax.figure.savefig(out_dir / f"{name}.png", dpi=120)
            plt.close(ax.figure)
            written.append(out_dir / f"{name}.png")
        except Exception as e:  # e.g. importances with too few finished trials
            print(f"skipped {name}.png: {e}")
    return written


def prepare_recordings(out: Path, asr: Path) -> Path:
    """One long recording per speaker from the bundled training clips, cut up and transcribed by prepare.py.

    The tiny Whisper is random, so its transcripts are noise; the demo then puts in the known text of the
    clip each utterance came from (what a user who transcribes elsewhere does after `--asr none`)."""
    clips = pd.read_csv(SAMPLE / "train.csv")
    where = out / "recordings"
    known = []  # (file, start, end, text)
    for speaker, group in clips.groupby("speaker"):
        wav = where / str(speaker) / "session.wav"  # the folder name is the speaker id
        bounds = tiny_assets.make_long_recording(wav, [SAMPLE / p for p in group["path"]], gap=0.8)
        known += [(wav.resolve(), a, b, text) for (a, b), text in zip(bounds, group["text"])]
    metadata = where / "metadata.csv"
    prepare.main(["--audio", str(where), "--output", str(metadata), "--asr", str(asr), "--min_seconds", "1",
                  "--device", "cpu"])
    rows = pd.read_csv(metadata, dtype={"text": object})
    texts = []
    for _, row in rows.iterrows():
        path = (metadata.parent / row["path"]).resolve()
        overlap = [(min(b, row["end"]) - max(a, row["start"]), text) for f, a, b, text in known if f == path]
        texts.append(max(overlap)[1])
    print(f"  {len(rows)} utterances found; the random Whisper heard e.g. {str(rows['text'].iloc[0])!r}, "
          f"replaced by the known text {texts[0]!r}")
    rows["text"] = texts
    rows.to_csv(metadata, index=False)
    return metadata


def preference_round(out: Path, model: Path, data: Path, assets: dict, common: list[str], steps: int,
                     prompts: int, n: int) -> tuple[Path, Path]:
    """prefer.py on the SFT model's speech, train.py with objective: dpo from it, evaluate.py on the result: each
    step reads the one before's outputs as they are. (The tiny judges are random, so what the pairs prefer is too;
    the margin is low to find pairs among them.)"""
    judges = ["--asr", str(assets["asr"]), "--speaker_model", str(assets["speaker_model"])]
    prefs = out / "prefs.hdf5"
    prefer.main(["--model", str(model), "--data", str(data), "--output", str(prefs), "--n", str(prompts),
                 "--n_candidates", "4", "--margin", "0.01", "--val_fraction", "0.34", "--max_audio_seconds", "2",
                 "--device", "cpu", *judges, *common])
    dpo_run = out / "run_dpo"
    train.main(["--data", str(prefs), "--model", str(model), "--output_dir", str(dpo_run), "--max_steps", str(steps),
                "--device", "cpu", "--log_every", "1", "--gen_every", "0", "--wandb_mode", "disabled",
                "--set", "objective=dpo", "--set", "batch_size=2", "--set", "learning_rate=1e-3",
                "--set", "warmup_steps=1", "--set", f"val_every={steps}", *common])
    last = [json.loads(line) for line in (dpo_run / "metrics.jsonl").read_text().splitlines()][-1]
    print(f"  DPO: validation reward accuracy {last.get('val_reward_accuracy', float('nan')):.2f}, "
          f"margin {last.get('val_reward_margin', float('nan')):.3f}")
    dpo_eval = out / "evaluation_dpo"
    evaluate.main(["--model", str(dpo_run / "best"), "--eval_data", str(SAMPLE / "val.json"), "--n", str(n),
                   "--output_dir", str(dpo_eval), *judges, "--max_audio_seconds", "2", "--device", "cpu",
                   "--no_ceilings", *common])
    return dpo_run, dpo_eval


def evaluate_best(out: Path, run: Path, assets: dict, common: list[str], n: int) -> tuple[Path, dict]:
    """evaluate.py on best/ and on best_ema/ (the same items; the recordings' and Mimi's ceilings once, as they do not
    depend on the model), and the two side by side with the validation loss each was picked by."""
    summaries = {}
    for name in ("best", "best_ema"):
        where = out / ("evaluation" if name == "best" else "evaluation_ema")
        evaluate.main(["--model", str(run / name), "--eval_data", str(SAMPLE / "val.json"), "--n", str(n),
                       "--output_dir", str(where), "--asr", str(assets["asr"]), "--speaker_model",
                       str(assets["speaker_model"]), "--max_audio_seconds", "2", "--device", "cpu", *common,
                       *(["--no_ceilings"] if name == "best_ema" else [])])
        summaries[name] = json.loads((where / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lowest = {key: min((r[key] for r in rows if key in r), default=float("nan"))
              for key in ("val_loss", "ema_val_loss")}
    print(f"  {'':12s} {'best/':>9s} {'best_ema/':>10s}")
    print(f"  {'val_loss':12s} {lowest['val_loss']:9.4f} {lowest['ema_val_loss']:10.4f}   (what each was picked by)")
    for key in ("cer", "speaker_sim", "eos_rate", "dnsmos_ovrl"):
        print(f"  {key:12s} {BY_NAME[key].show(summaries['best']['generated'].get(key)):>9s} "
              f"{BY_NAME[key].show(summaries['best_ema']['generated'].get(key)):>10s}")
    return out / "evaluation", summaries["best"]


def main(argv: list[str] | None = None) -> int:
    p = CommandParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default=str(ROOT / "demo_out"))
    p.add_argument("--quick", action="store_true", help="fewer steps and trials (what the test suite runs)")
    args = p.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")

    out = Path(args.output_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    steps, trials, trial_steps = (20, 2, 8) if args.quick else (300, 3, 40)  # --quick: one trial per worker
    t0 = time.time()

    banner("1/8 tiny model, tokenizer, Mimi, Whisper and WavLM (random weights, real file layouts)")
    assets = {**tiny_assets.make_all(out / "assets"), **tiny_assets.make_judges(out / "assets")}
    for name, path in assets.items():
        print(f"  {name}: {path}")
    common = ["--text_tokenizer", str(assets["text_tokenizer"]), "--mimi_weights", str(assets["mimi"])]

    banner("2/8 prepare: long recordings -> utterances (silero-vad), transcribed by the tiny random Whisper")
    metadata = prepare_recordings(out, assets["asr"])

    banner("3/8 pretokenize the prepared utterances (and the bundled validation clips)")
    data = out / "data.hdf5"
    pretokenize.main(["--train_data", str(metadata), "--val_data", str(SAMPLE / "val.json"),
                      "--output", str(data), "--device", "cpu", *common])

    banner(f"4/8 train for {steps} steps (validation, quality evaluation, samples, checkpoints, transformers export)")
    run = out / "run"
    train.main(["--data", str(data), "--config", str(ROOT / "configs" / "finetune.yaml"), "--output_dir", str(run),
                "--model", str(assets["model"]), "--max_steps", str(steps), "--device", "cpu",
                "--val_every", str(max(steps // 6, 1)), "--save_every", str(max(steps // 3, 1)),
                "--gen_every", str(steps), "--log_every", "1", "--gen_sentence", "Hello from the demo.",
                "--wandb_mode", "disabled", "--set", "learning_rate=2e-3", "--set", "warmup_steps=10",
                "--set", "batch_size=4", "--set", "gen_max_seconds=2", "--set", "lr_decay=cosine",
                "--set", f"ema_decay={0.8 if args.quick else 0.98}",
                "--set", f"eval_every={max(steps // 2, 1)}", "--set", "eval_n=2", "--set", "eval_max_seconds=2",
                "--set", f"eval_asr={assets['asr']}", "--set", f"eval_speaker_model={assets['speaker_model']}",
                "--export_hf", "--export_codec", str(assets["mimi"]), *common])
    plot_losses(run / "metrics.jsonl", out / "loss_curve.png")

    banner("5/8 generate speech from the trained model")
    wav = out / "generated.wav"
    generate.main(["--model", str(run / "best"), "--text", "This is the tiny demo model speaking.",
                   "--speaker", "0", "--output", str(wav), "--max_audio_seconds", "2", "--seed", "0",
                   "--device", "cpu", *common])

    banner("6/8 evaluate best/ and best_ema/ (the weight average): WER/CER, speaker similarity, DNSMOS, EOS rate, "
           "with the reference and Mimi ceilings")
    evaluation, summary = evaluate_best(out, run, assets, common, n=2 if args.quick else 4)
    ovrl = {what: (summary.get(what) or {}).get("dnsmos_ovrl") for what in ("reference", "codec", "generated")}
    shown = {what: "-" if value is None else f"{value:.2f}" for what, value in ovrl.items()}
    print(f"  DNSMOS overall quality (1-5, the real model): the recordings (real speech) {shown['reference']}, "
          f"their round trip through the tiny random Mimi {shown['codec']}, the tiny model's speech "
          f"{shown['generated']}")

    banner("7/8 one round of preference finetuning: candidates judged by prefer.py, DPO, then evaluate.py again")
    dpo_run, dpo_eval = preference_round(out, run / "best", data, assets, common, steps=max(steps // 15, 6),
                                         prompts=4 if args.quick else 8, n=2 if args.quick else 4)
    after = json.loads((dpo_eval / "summary.json").read_text())["generated"]
    for key in ("cer", "speaker_sim", "eos_rate", "dnsmos_ovrl"):
        print(f"  {key:12s} SFT {BY_NAME[key].show(summary['generated'].get(key)):>7s}   after DPO "
              f"{BY_NAME[key].show(after.get(key)):>7s}")

    banner(f"8/8 a {trials}-trial sweep on 2 CPU workers")
    sweep_dir = out / "sweep"
    sweep.main(["--data", str(data), "--sweep_config", str(ROOT / "configs" / "sweep_demo.yaml"),
                "--output_dir", str(sweep_dir),
                "--n_trials", str(trials), "--n_workers", "2", "--max_steps", str(trial_steps), "--model",
                str(assets["model"]),
                "--wandb_mode", "disabled", "--sampler", "random", "--set",
                "val_every=" + str(max(trial_steps // 2, 1)),
                "--set", "batch_size=4", "--set", f"text_tokenizer={assets['text_tokenizer']}",
                "--set", f"mimi_weights={assets['mimi']}", "--set", "warmup_steps=2"])
    plots = plot_sweep(sweep_dir, out)

    banner(f"done in {time.time() - t0:.0f} s; outputs")
    rows = [
        ("recordings and prepared metadata", metadata.parent), ("pre-tokenized data", data),
            ("skipped-rows report (if any)", Path(str(data) + ".skipped.csv")),
        ("training metrics", run / "metrics.jsonl"), ("loss curve", out / "loss_curve.png"),
        ("checkpoints (full state, resumable)", run / "checkpoints"), ("best model (official layout)", run / "best"),
        ("final model (official layout)", run / "final"),
        ("best weight average (official layout)", run / "best_ema"),
        ("final weight average (official layout)", run / "final_ema"),
        ("best model, transformers layout", run / "best_hf"), ("audio samples from training", run / "samples"),
        ("generated speech", wav), ("quality during training", run / "eval"),
        ("evaluation report (open in a browser)", evaluation / "report.html"),
        ("evaluation of the weight average", out / "evaluation_ema" / "report.html"),
        ("preference pairs", out / "prefs.hdf5"), ("every candidate's scores", out / "prefs.candidates.csv"),
        ("DPO run", dpo_run), ("evaluation after DPO", dpo_eval / "report.html"),
            ("sweep: best config", sweep_dir / "best_config.yaml"),
        ("sweep: all trials", sweep_dir / "trials.csv"), ("sweep: plots (HTML)", sweep_dir),
        *[(f"sweep plot {p.stem}", p) for p in plots],
    ]
    for label, path in rows:
        if path.exists():
            print(f"  {label:40s} {path}")
    print("\nThe tiny random models make noise, not speech, and their WER and speaker similarity mean nothing: "
          "see the README for finetuning and evaluating the real CSM-1B.")
    page = out / "report.html"
    report.main([str(run), str(dpo_run), str(sweep_dir), "--output", str(page)])
    print(f"\nOne page for the runs and the sweep: curves, every evaluation with players, samples, best/, the "
          f"trials (open it in a browser):"
          f"\n  {page}")
    return 0


if __name__ == "__main__":
    run_cli(main)
