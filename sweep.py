"""Optuna hyperparameter search over a YAML space; every trial runs training.train(), the loop of train.py.

    python sweep.py --data data.hdf5 --sweep_config configs/sweep.yaml --output_dir ./my-sweep \
        --n_epochs 3 --n_trials 50 --n_gpus 2

Trials run in one worker process per GPU (or --n_workers on CPU) sharing one study storage; a trial
that fails, runs out of memory or diverges is recorded with its reason and the sweep goes on; the
same command run again continues the study. Reports: best_config.yaml, trials.csv, HTML plots.
The command line only: the study is optuna_sweep.run_sweep.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from csm.judging.metrics import SWEEPABLE, describe
from csm.training.optuna_sweep import run_sweep
from utils import CommandParser, run_cli


CONFIGS = Path(__file__).resolve().parent / "configs"  # the defaults work from any directory


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(description="Optuna hyperparameter sweep; each trial runs train.py's training loop.")
    p.add_argument("--data", nargs="+", metavar="TOKEN_FILE",
                   help="HDF5 file(s) from pretokenize.py, or a quoted glob (a val split for val_loss); several are "
                        "mixed by the base config's data_weights. Default: the base config's train_data")
    p.add_argument("--sweep_config", default=str(CONFIGS / "sweep.yaml"),
                   help="YAML search space (default: this tool's configs/sweep.yaml)")
    p.add_argument("--base_config", default=str(CONFIGS / "finetune.yaml"),
                   help="training config the trials start from (default: this tool's configs/finetune.yaml)")
    p.add_argument("--output_dir", default="./sweep", help="study.db, trials/, best_config.yaml, trials.csv, plots")
    p.add_argument("--n_trials", type=int, default=20, help="total trials in the study, across all workers")
    p.add_argument("--n_gpus", type=int, default=None, help="one worker per GPU (default: all visible GPUs)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto (default): the GPUs when CUDA works, else the CPU, which is refused for a model of over "
                        "100M parameters; cpu: train on the CPU anyway (as --n_gpus 0)")
    p.add_argument("--trials_per_gpu", type=int, default=1, help="concurrent trials on each GPU")
    p.add_argument("--n_workers", type=int, default=1, help="worker processes when running on CPU")
    p.add_argument("--storage", help="Optuna storage: SQLAlchemy URL or journal file (default: sqlite in output_dir)")
    p.add_argument("--study_name", default="csm-sweep")
    p.add_argument("--metric", default="val_loss", choices=SWEEPABLE,
                   help=f"what to optimise: {describe(SWEEPABLE)}; val_loss is the best validation loss, a quality "
                        "metric the best value a trial's quality evaluations reached (needs eval_every)")
    p.add_argument("--sampler", default="tpe", choices=("tpe", "random"))
    p.add_argument("--pruner", default="median", choices=("median", "none"))
    p.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--n_epochs", type=int, help="epochs per trial (config key n_epochs)")
    p.add_argument("--max_steps", type=int, help="optimizer steps per trial (config key max_steps)")
    p.add_argument("--model", help="config key model")
    p.add_argument("--wandb_project", default="csm-sweep", help="config key wandb_project")
    p.add_argument("--wandb_mode", help="config key wandb_mode")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any base config key")
    p.add_argument("--overwrite", action="store_true",
                   help="empty an --output_dir that holds another study or other files (default: refuse)")
    p.add_argument("--use_amp", action="store_true", help="compatibility with the original (precision is auto)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_sweep(args)


if __name__ == "__main__":
    run_cli(main)
