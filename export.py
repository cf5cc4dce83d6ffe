"""Export a CSM checkpoint to the transformers layout (CsmForConditionalGeneration) or the official one.

    python export.py --model runs/my-voice/best --to hf --output my-voice-hf
    python export.py --model sesame/csm-1b --to official --output csm-1b-official
    python export.py --model runs/my-voice --average_last 3 --to official --output my-voice-avg

The command line only: the directories are written by hf_export.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from csm.model.hf_export import csm_tokenizer, DEFAULT_CODEC, export_official, export_transformers
from csm.model.codec import find_codec
from csm.model.tokenization import resolve_text_tokenizer
from utils import CommandParser, run_cli
from csm.system.errors import UserError, check_number
from csm.system.outputs import check_apart, claim_output_dir, inputs_of
from csm.model.weights import load_model, parse_size, resolve_source


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(description="Export a CSM checkpoint to the transformers or the official layout.")
    p.add_argument("--model", required=True, help="hub id, directory (either layout), .safetensors or .pt checkpoint")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub --model (default: main)")
    p.add_argument("--to", required=True, choices=("hf", "official"),
                   help="hf: CsmForConditionalGeneration; official: Sesame's")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--text_tokenizer", default=None,
                   help="tokenizer for the processor (--to hf; default: the model's own, else meta-llama/Llama-3.2-1B)")
    p.add_argument("--codec", default=None,
                   help=f"Mimi in the MimiModel layout (--to hf): a transformers CSM or {DEFAULT_CODEC} "
                        f"(default: the model's own codec_model, else {DEFAULT_CODEC})")
    p.add_argument("--max_shard_size", default="5GB", help="largest weights file before sharding (--to hf)")
    p.add_argument("--average_last", type=int, default=None, metavar="N",
                   help="--model is a training run's output directory: export the fp32 mean of the weights of its "
                        "last N step checkpoints (written in fp32)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.average_last is not None:
        check_number("--average_last", args.average_last, min=1, max=10_000)
        if not Path(args.model).is_dir():
            raise UserError(f"--average_last averages a training run's checkpoints: --model {args.model} is not a "
                            "run's output directory")
    try:
        parse_size(args.max_shard_size)
    except UserError as e:
        raise UserError(f"--max_shard_size: {e}") from None
    inputs = inputs_of(vars(args), skip=("output",))
    with claim_output_dir(args.output, "--output", inputs=inputs, overwrite=args.overwrite) as out:
        return export(args, out)


def export(args, output: Path) -> int:
    """The export into its claimed output."""
    source = resolve_source(args.model, args.revision)  # a hub repo is fetched once, at the pinned revision
    check_apart(output, "--output", [("--model", source)])  # a hub model's files in the local cache
    if args.average_last is not None:
        # The run's checkpoints, averaged; tokenizer and codec come from its outputs (final/ or best/), as for them.
        source = next((source / name for name in ("final", "best") if (source / name).is_dir()), source)
    if args.to == "hf":  # everything the export needs is found before the model is loaded
        codec = find_codec([args.codec] if args.codec else [source, DEFAULT_CODEC])
        tokenizer = csm_tokenizer(resolve_text_tokenizer(args.text_tokenizer, source))
    if args.average_last is not None:
        model = averaged_model(Path(args.model), args.average_last)
    else:
        model = load_model(source, dtype=None)  # the stored dtype, bit for bit
    if args.to == "official":
        out = export_official(model, output)
    else:
        out = export_transformers(model, output, tokenizer=tokenizer, codec=codec, max_shard_size=args.max_shard_size)
    print(f"wrote {out} ({'transformers CsmForConditionalGeneration' if args.to == 'hf' else 'official'} layout)")
    return 0


def averaged_model(run_dir: Path, last: int):
    """The model of a run's last `last` checkpoints averaged in fp32; a LoRA or partly frozen run's averaged
    trained weights go onto its base model (reloaded as training loads it) and LoRA is merged."""
    import torch

    from csm.model.adapters import apply_finetune_mode, load_trainable_state, merged_model
    from csm.model.conversions import model_args_from_dict
    from csm.model.csm_model import CSM
    from csm.training.checkpoint import average_checkpoints
    from csm.training.config import make_config
    from csm.training.training import build_or_load_model

    weights, first, paths = average_checkpoints(run_dir, last)
    print(f"averaging {len(paths)} checkpoint(s): {', '.join(p.name for p in paths)}")
    if not first["trainable_only"]:
        with torch.device("meta"):
            model = CSM(model_args_from_dict(first["model_args"], paths[0]))
        model.load_state_dict(weights, strict=True, assign=True)
        return model
    cfg = make_config(first["config"])
    base = None if cfg.train_from_scratch else resolve_source(cfg.model, cfg.model_revision)
    model = apply_finetune_mode(build_or_load_model(cfg, torch.device("cpu"), base), cfg).float()
    load_trainable_state(model, weights, paths[-1])
    return merged_model(model)


if __name__ == "__main__":
    run_cli(main)
