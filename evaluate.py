"""Is the model any good? Speak every item of an evaluation set and measure it: intelligibility (WER and
CER of an ASR transcript), voice similarity to the reference, stopping at EOS, duration and speed, beside
the same metrics on the reference audio itself and on it passed through Mimi (the ceilings).

    python evaluate.py --model runs/exp/best --eval_data data/val.csv --output_dir runs/exp/eval

Writes items.csv, summary.json, wavs/ and report.html (players for reference and generated audio).
The command line only: the work is in evaluation.py, the metrics and their models in speech_metrics.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from csm.judging.metrics import BY_NAME, QUALITY, ROWS
from csm.system.errors import check_number
from utils import CommandParser, run_cli
from csm.system.runtime import resolve_device, resolve_precision
from csm.system.outputs import claim_output_dir, clear_dir, inputs_of
from csm.model.weights import resolve_source
from csm.model.adapters import read_adapter
from csm.judging.evaluation import (
    add_item_flags, check_item_source, EvalSettings, evaluate_model, is_token_file, load_items, write_report,
)
from csm.judging.synthesis import (
    add_speech_flags, check_speech_flags, CompiledStep, context_segments, load_speech_model, model_speaker_names,
    prompt_segments,
)
from csm.judging.speech_metrics import add_judge_flags, judges_of
from csm.training.config import load_config


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(description="Quality of a CSM checkpoint: WER/CER, speaker similarity, EOS rate, "
                                            "with the reference and Mimi ceilings")
    p.add_argument("--eval_data", required=True,
                   help="metadata file (path,text[,start,end,speaker]: references are the recordings) or a token "
                        "file from pretokenize.py (references are its Mimi codes, decoded)")
    add_item_flags(p, what="items", split="val", n=100)
    p.add_argument("--output_dir", required=True, help="items.csv, summary.json, wavs/, report.html")
    p.add_argument("--overwrite", action="store_true", help="replace what --output_dir holds")
    add_judge_flags(p)
    p.add_argument("--no_ceilings", action="store_true", help="skip measuring the references and their Mimi round trip")
    p.add_argument("--max_audio_seconds", type=float, default=20.0,
                   help="length cap (each item also stops at twice its reference + 1 s)")
    p.add_argument("--seed", type=int, default=0, help="draws the items and seeds each item's sampling")
    add_speech_flags(p, context_speaker="its speaker id, or a speaker name of --eval_data's token file (or of "
                                        "--speakers)", precision_note=" (the ASR and speaker models: fp16 on CUDA)")
    p.add_argument("--speakers", default=None,
                   help="where speaker names are looked up: a token file from pretokenize.py or a speakers.json "
                        "(default: --eval_data when it is a token file, else the model's speakers.json)")
    p.add_argument("--context_from_config", metavar="CONFIG",
                   help="speak the prompt turns (gen_context) of a training config, e.g. runs/x/config.yaml, before "
                        "every item, as that run's samples and evaluations did")
    p.add_argument("--trust_pickle", action="store_true", help="allow .pkl/.h5 metadata (read through pickle)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_speech_flags(args)
    check_number("--n", args.n, min=0, max=10**7)
    check_number("--context_turns", args.context_turns, min=0, max=64)
    check_number("--seed", args.seed, min=0, max=2**32 - 1)
    data = check_item_source(args.eval_data)
    inputs = inputs_of(vars(args), skip=("output_dir",))
    with claim_output_dir(args.output_dir, "--output_dir", inputs=inputs, overwrite=args.overwrite) as out:
        return _evaluate(args, data, out)


def _evaluate(args, data: Path, out: Path) -> int:
    if args.adapter:
        read_adapter(args.adapter)  # a bad adapter fails before any model loads
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    names = model_speaker_names(args.model, args.speakers or (data if is_token_file(data) else None))
    context = context_segments(args.context_audio, args.context_text, args.context_speaker, names)
    if args.context_from_config:
        context += prompt_segments(load_config(args.context_from_config).gen_context, names)
    # The judges first: a model that cannot be loaded fails in one line before any speech is generated.
    quality = judges_of(args, device)
    source = resolve_source(args.model, args.revision)
    model, tokenizer, mimi = load_speech_model(args, source, device, precision)
    items, skipped = load_items(data, split=args.split, n=args.n or None, seed=args.seed, tokenizer=tokenizer,
                                trust_pickle=args.trust_pickle, context_turns=args.context_turns)
    for row, reason in skipped:
        print(f"warning: --eval_data row {row} skipped: {reason}")
    settings = EvalSettings(max_audio_seconds=args.max_audio_seconds, temperature=args.temperature, topk=args.topk,
                            seed=args.seed, context=context, batch_size=args.batch_size,
                            step=CompiledStep(model, args.batch_size) if args.compile else None)
    print(f"evaluating {len(items)} items from {data} on {device}")
    torch.manual_seed(args.seed)
    result = evaluate_model(model, tokenizer, mimi, items, quality, settings, ceilings=not args.no_ceilings,
                            device=device, progress=True)
    clear_dir(out)  # --overwrite: only now, with the new results in hand
    write_report(result, out, extra={"model": str(args.model), "eval_data": str(data),
                                     "split": args.split if is_token_file(data) else None,
                                     "seed": args.seed, "skipped_rows": len(skipped)})
    print(summary_table(result.summary))
    print(f"report: {out / 'report.html'}")
    if result.summary["n_items"] and result.summary["n_failed"] == result.summary["n_items"]:
        print(f"error: every one of the {result.summary['n_items']} items failed to generate (their errors are in "
              f"{out / 'items.csv'}); nothing was evaluated", file=sys.stderr)
        return 1
    return 0


def summary_table(summary: dict) -> str:
    """The summary as a small text table: the model's row and the ceilings."""
    lines = [f"{'':10s}" + "".join(f"{k:>15s}" for k in QUALITY)]
    for what in ROWS:
        metrics = summary.get(what)
        if metrics:
            cells = "".join(f"{BY_NAME[k].show(metrics.get(k)):>15s}" for k in QUALITY)
            lines.append(f"{what:10s}{cells}")
    if summary["n_failed"]:
        lines.append(f"{summary['n_failed']} of {summary['n_items']} items failed to generate (see items.csv)")
    return "\n".join(lines) + "\n" + json.dumps({"reference_audio": summary["reference_audio"],
                                                  "normalizer": summary["normalizer"]})


if __name__ == "__main__":
    run_cli(main)
