"""Finetune CSM-1B on a pre-tokenized HDF5 file, or train it from scratch.

    python train.py --data data.hdf5 --config configs/finetune.yaml --output_dir runs/my-voice
    python train.py --data emilia.hdf5 libritts.hdf5 --set data_weights=[0.7,0.3] --output_dir runs/mix
    torchrun --nproc_per_node 4 train.py --data data.hdf5 --config configs/finetune.yaml

The command line only: the loop itself is `training.train()`, which sweep trials run too.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from csm.training import config as config_mod
from csm.training.config import TrainConfig
from csm.system.outputs import inputs_of
from csm.training.training import train
from utils import CommandParser, EXIT_STOPPED, run_cli
from csm.system.runtime import compute_cleanup


# Flags that set a config key of the same name (unset: keep the YAML's value). Their values are parsed and
# checked as the key's type in TrainConfig says, as YAML values and --set are.
CONFIG_FLAGS = ("n_epochs", "max_steps", "val_every", "save_every", "gen_every", "log_every", "seed", "batch_size",
                "max_tokens", "grad_acc_steps", "learning_rate", "model", "precision", "wandb_project", "wandb_name",
                "wandb_mode", "gen_speaker", "num_workers", "text_tokenizer", "mimi_weights", "warmup_steps",
                "lr_decay", "weight_decay", "max_grad_norm", "decoder_loss_weight", "keep_checkpoints",
                "model_revision", "export_codec")


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(description="Finetune CSM-1B, or train it from scratch, on a pre-tokenized HDF5 file.")
    p.add_argument("--data", nargs="+", metavar="TOKEN_FILE",
                   help="HDF5 file(s) written by pretokenize.py (or the original tool), or a quoted glob; several are "
                        "mixed (config key data_weights). Default: config key train_data")
    p.add_argument("--config", help="YAML config (configs/finetune.yaml, configs/pretrain.yaml)")
    p.add_argument("--output_dir", default="./runs/exp", help="checkpoints, samples, metrics.jsonl, best/ and final/")
    p.add_argument("--resume", nargs="?", const="auto", metavar="PATH|auto",
                   help="continue from a checkpoint; 'auto' (or no value) takes the latest in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in output_dir (default: refuse)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (torchrun sets one GPU per process)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    p.add_argument("--train_from_scratch", action="store_true", default=None, help="random init instead of --model")
    p.add_argument("--partial_data_loading", action="store_true", default=None,
                   help="format-1 token files: read examples row by row from disk (format 2 is always mapped)")
    p.add_argument("--export_hf", action="store_true", default=None,
                   help="also write best_hf/ and final_hf/ in the transformers layout (config key export_hf)")
    p.add_argument("--gen_sentence", action="append", dest="gen_sentences", metavar="TEXT",
                   help="sentence for audio samples (repeat for several, or give a .txt file with one per line)")
    p.add_argument("--use_amp", action="store_true", help="compatibility with the original: same as --precision auto")
    p.add_argument("--wandb_api_key", help="compatibility with the original; prefer WANDB_API_KEY in .env")
    for key in CONFIG_FLAGS:
        p.add_argument(f"--{key}", default=None, metavar=config_mod.type_name(key),
                       help=f"config key {key}: {config_mod.key_help(key)}")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {key: getattr(args, key) for key in CONFIG_FLAGS if getattr(args, key) is not None}
    for key in ("train_from_scratch", "partial_data_loading", "export_hf"):
        if getattr(args, key):
            overrides[key] = True
    if args.use_amp:
        overrides.setdefault("precision", "auto")
    if args.gen_sentences:
        sentences = []
        for s in args.gen_sentences:
            path = Path(s)
            sentences += [line.strip() for line in path.read_text().splitlines() if line.strip()] \
                if s.endswith(".txt") and path.is_file() else [s]
        overrides["gen_sentences"] = sentences
    overrides.update(config_mod.parse_set(args.set))
    return config_mod.load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.wandb_api_key:
        os.environ["WANDB_API_KEY"] = args.wandb_api_key
    cfg = config_from_args(args)
    try:
        # The command's own path flags are inputs too (--config); --resume names a checkpoint of the run itself.
        result = train(cfg, args.data or cfg.train_data, args.output_dir, device=args.device, resume=args.resume,
                       overwrite=args.overwrite, inputs=inputs_of(vars(args), skip=("output_dir", "resume")))
    finally:
        compute_cleanup()
    if result.stopped_early:
        print(f"stopped before the end (step {result.step}); the checkpoint is saved: run the same command with "
              f"--resume to continue (exit status {EXIT_STOPPED})", file=sys.stderr)
        return EXIT_STOPPED
    return 0


if __name__ == "__main__":
    run_cli(main)
