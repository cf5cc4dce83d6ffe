"""Export a CSM checkpoint to the transformers layout (CsmForConditionalGeneration) or the official one.

    python export.py --model runs/my-voice/best --to hf --output my-voice-hf
    python export.py --model sesame/csm-1b --to official --output csm-1b-official

The command line only: the directories are written by hf_export.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from csm.model.hf_export import csm_tokenizer, DEFAULT_CODEC, export_official, export_transformers
from csm.model.codec import find_codec
from csm.model.tokenization import resolve_text_tokenizer
from utils import CommandParser, run_cli
from csm.system.errors import UserError
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    if args.to == "hf":  # everything the export needs is found before the model is loaded
        codec = find_codec([args.codec] if args.codec else [source, DEFAULT_CODEC])
        tokenizer = csm_tokenizer(resolve_text_tokenizer(args.text_tokenizer, source))
    model = load_model(source, dtype=None)  # the stored dtype, bit for bit
    if args.to == "official":
        out = export_official(model, output)
    else:
        out = export_transformers(model, output, tokenizer=tokenizer, codec=codec, max_shard_size=args.max_shard_size)
    print(f"wrote {out} ({'transformers CsmForConditionalGeneration' if args.to == 'hf' else 'official'} layout)")
    return 0


if __name__ == "__main__":
    run_cli(main)
