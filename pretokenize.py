"""Metadata (path, text, optional start/end/speaker) -> one HDF5 file of Mimi codes and text tokens (docs/formats.md).

    python pretokenize.py --train_data train.csv --val_data val.csv --output data.hdf5
    python pretokenize.py --upgrade old.hdf5 --output data.hdf5    (a format-1 token file -> format 2)

The command line only: the crash-safe, resumable work is encode_dataset.run (see its docstring).
Rows that cannot be used are skipped and listed in <output>.skipped.csv with the reason; a killed
run resumes when the same command is run again.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from csm.data.dataset_sources import SourceOptions
from csm.data.encode_dataset import EncodeSettings, run
from csm.data.metadata import METADATA_FORMATS
from csm.model.tokenization import DEFAULT_TEXT_TOKENIZER
from csm.data.token_file import FORMAT_VERSION, open_splits, upgrade_token_file
from csm.system.errors import check_number, UserError
from csm.system.outputs import claim_output_files
from utils import CommandParser, run_cli
from csm.system.runtime import resolve_device


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(description="Metadata -> HDF5 of Mimi audio codes and Llama text tokens.")
    p.add_argument("--train_data", help="the training split: a metadata file (" + ", ".join(METADATA_FORMATS) + "), "
                   "a hub dataset hf:NAME[:CONFIG][@SPLIT], or a directory saved with datasets' save_to_disk [@SPLIT]")
    p.add_argument("--val_data", help="the validation split, in the same forms (a dataset's default split: validation)")
    p.add_argument("--text_column", default="text", help="a dataset's transcript column")
    p.add_argument("--audio_column", default="audio", help="a dataset's audio column")
    p.add_argument("--speaker_column", default=None,
                   help="a dataset's speaker column (default: 'speaker' if it has one; names that are not numbers "
                        "are numbered in sorted order)")
    p.add_argument("--streaming", action="store_true",
                   help="stream datasets instead of downloading them whole (for datasets bigger than the disk)")
    p.add_argument("--output", required=True, help="HDF5 file to write")
    p.add_argument("--omit_speaker_id", action="store_true", help="tokenize text without the [speaker] prefix")
    p.add_argument("--device", default="auto", help="where Mimi runs: auto, cpu, cuda, cuda:1")
    p.add_argument("--save_every", type=int, default=500, help="rows per committed chunk (the resume granularity)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="clips encoded together, duration-sorted (default: 16 on CUDA, 1 on CPU)")
    p.add_argument("--num_workers", type=int, default=None,
                   help="threads reading and resampling audio ahead of the encoder (default: 4 on CUDA, 1 on CPU)")
    p.add_argument("--text_tokenizer", default=DEFAULT_TEXT_TOKENIZER, help="hub id or local directory")
    p.add_argument("--mimi_weights", default=None,
                   help="Mimi: MimiModel dir or hub repo, transformers CSM, or moshi "
                        ".safetensors (default: kyutai/mimi)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    p.add_argument("--min_dnsmos", type=float, default=None,
                   help="skip rows whose DNSMOS overall quality (1-5) is below this: a row's dnsmos column (from "
                        "prepare.py --min_dnsmos) when it has one, else scored now")
    p.add_argument("--max_seq_len", type=int, default=2048,
                   help="skip examples longer than this many frames (at most 2048)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output even if it is not a finished token file with the same settings")
    p.add_argument("--trust_pickle", action="store_true",
                   help="allow .pkl/.h5 metadata, which pandas reads with pickle (can run code from the file)")
    p.add_argument("--upgrade", metavar="TOKEN_FILE",
                   help="instead of encoding audio: rewrite a format-1 token file (this tool's before format 2, or "
                        "the original tool's) as format 2 at --output, which training maps from disk and shares "
                        "between processes")
    return p


def upgrade(args) -> int:
    """pretokenize.py --upgrade: one token file rewritten in the current format, nothing encoded."""
    given = [f for f in ("train_data", "val_data") if getattr(args, f)]
    if given:
        raise UserError(f"--upgrade rewrites a token file and encodes nothing: drop --{given[0]}")
    source = Path(args.upgrade)
    open_splits(source)  # a missing, damaged or foreign file is refused before the output is touched
    with claim_output_files([Path(args.output)], "--output", inputs=[("--upgrade", str(source))],
                            overwrite=args.overwrite) as (output,):
        rows = upgrade_token_file(source, output)
    print(f"wrote {output} (format {FORMAT_VERSION}): " + ", ".join(f"{s} {n} rows" for s, n in rows.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.upgrade:
        return upgrade(args)
    metadata = {split: p for split, p in (("train", args.train_data), ("val", args.val_data)) if p}
    if not metadata:
        raise UserError("give --train_data and/or --val_data")
    device = resolve_device(args.device)
    # On CPU the full-size Mimi's convolutions are memory-bound, so big batches stop paying off
    # there (bench/bench_pretokenize.py: 4 beat 1 with the full-size Mimi too); one reader thread is
    # enough to keep the encoder fed without taking a core from it.
    batch_size = (16 if device.type == "cuda" else 1) if args.batch_size is None else args.batch_size
    num_workers = (4 if device.type == "cuda" else 0) if args.num_workers is None else args.num_workers
    check_number("--save_every", args.save_every, min=1, max=10**7)
    check_number("--batch_size", batch_size, min=1, max=4096)
    check_number("--max_seq_len", args.max_seq_len, min=2, max=2048)
    check_number("--num_workers", num_workers, min=0, max=256)
    if args.min_dnsmos is not None:
        check_number("--min_dnsmos", args.min_dnsmos, min=0, max=5)
    sources = SourceOptions(text_column=args.text_column, audio_column=args.audio_column,
                            speaker_column=args.speaker_column, streaming=args.streaming,
                            trust_pickle=args.trust_pickle)
    return run(EncodeSettings(metadata, Path(args.output), device=args.device, text_tokenizer=args.text_tokenizer,
                              mimi_weights=args.mimi_weights, batch_size=batch_size, num_workers=num_workers,
                              save_every=args.save_every, max_seq_len=args.max_seq_len,
                              omit_speaker_id=args.omit_speaker_id, strict=args.strict, overwrite=args.overwrite,
                              sources=sources, min_dnsmos=args.min_dnsmos))


if __name__ == "__main__":
    run_cli(main)
