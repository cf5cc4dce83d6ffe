"""Raw recordings -> metadata rows for pretokenize.py: find speech (silero-vad), cut it into utterances,
transcribe them (an ASR model through transformers), and write `path,start,end,text,speaker` windows into
the original files.

    python prepare.py --audio recordings/ --output data/metadata.csv

The command line only: the work is in recordings.py. A killed run resumes file by file when the same
command is run again; rows left out (unreadable file, no speech, too short, empty transcript) are listed
in <output>.skipped.csv.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from csm.judging.speech_metrics import ASR, DEFAULT_ASR
from csm.system.errors import check_number, UserError
from utils import CommandParser, run_cli
from csm.system.runtime import resolve_device
from csm.system.outputs import claim_output_files, inputs_of
from csm.data.dnsmos import DNSMOS
from csm.data.recordings import CutSettings, find_audio, prepare


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(description="Recordings -> utterance metadata (VAD, cutting, ASR) for pretokenize.py")
    p.add_argument("--audio", nargs="+", required=True, help="audio files and/or directories (searched recursively)")
    p.add_argument("--output", required=True, help="metadata CSV to write")
    p.add_argument("--min_seconds", type=float, default=2.0, help="shortest utterance kept (default 2 s)")
    p.add_argument("--max_seconds", type=float, default=20.0,
                   help="longest utterance; longer speech is split at its longest pause (default 20 s)")
    p.add_argument("--min_dnsmos", type=float, default=None,
                   help="leave out utterances whose DNSMOS overall quality (1-5; Emilia keeps >= 3.0) is below this, "
                        "each with its score in the skipped report; kept rows get a dnsmos column (0: score, keep all)")
    p.add_argument("--min_silence", type=float, default=0.5,
                   help="a pause at least this long ends an utterance; shorter pauses stay inside it (default 0.5 s)")
    p.add_argument("--vad_threshold", type=float, default=0.5, help="silero-vad speech probability threshold")
    p.add_argument("--asr", default=DEFAULT_ASR,
                   help=f"ASR model (hub id or local dir; default {DEFAULT_ASR}), or 'none' to leave the text "
                        "empty for transcribing elsewhere (pretokenize.py then skips those rows)")
    p.add_argument("--language", default="en", help="language spoken (Whisper code, e.g. en, de)")
    p.add_argument("--speaker", type=int, default=None,
                   help="speaker id of every row (default: the parent folder's name: a number as it is, other "
                        "names numbered in sorted order, the mapping in <output>.speakers.json)")
    p.add_argument("--conversations", action="store_true",
                   help="also write conversation (the file) and turn (the start time) columns, for "
                        "context_mode: conversation")
    p.add_argument("--device", default="auto", help="where the ASR model runs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_number("--min_seconds", args.min_seconds, gt=0, max=3600)
    check_number("--max_seconds", args.max_seconds, gt=0, max=3600)
    check_number("--min_silence", args.min_silence, gt=0, max=60)
    if args.min_dnsmos is not None:
        check_number("--min_dnsmos", args.min_dnsmos, min=0, max=5)
    check_number("--vad_threshold", args.vad_threshold, gt=0, max=0.99)
    if args.speaker is not None:
        check_number("--speaker", args.speaker, min=0, max=2**31 - 1)
    if args.max_seconds < args.min_seconds:
        raise UserError(f"--max_seconds {args.max_seconds:g} is below --min_seconds {args.min_seconds:g}")

    files = find_audio(args.audio)
    output = Path(args.output).expanduser()
    if output.suffix.lower() != ".csv" and not output.is_dir():
        raise UserError(f"--output {output}: give a file name ending in .csv")
    partial = output.with_name(output.name + ".partial.jsonl")  # an unfinished run's work, which this one resumes
    inputs = [("--audio", f) for f in files] + inputs_of(vars(args), skip=("output",))
    with claim_output_files([output], "--output", inputs=inputs, overwrite=args.overwrite, continues=partial.exists):
        scorer = DNSMOS() if args.min_dnsmos is not None else None  # fails in one line before the ASR loads
        asr = None
        if args.asr.lower() != "none":
            device = resolve_device(args.device)

            asr = ASR(args.asr, args.language, device=device,
                      dtype=torch.float16 if device.type == "cuda" else torch.float32)
        settings = CutSettings(args.min_seconds, args.max_seconds, args.min_silence, args.vad_threshold,
                               args.min_dnsmos)
        counts = prepare(files, output, settings=settings, asr=asr, speaker=args.speaker,
                         conversations=args.conversations, scorer=scorer)
    print(f"wrote {output}: {counts['rows']} utterances, {counts['hours']:.3f} h of speech from {counts['files']} "
          f"files; {counts['skipped']} left out (see {output.name}.skipped.csv)")
    return 0


if __name__ == "__main__":
    run_cli(main)
