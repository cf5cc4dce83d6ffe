"""Preference pairs from a model's own speech, for DPO training (train.py --set objective=dpo):

    python prefer.py --model runs/sft/best --data data/tokens.hdf5 --output data/prefs.hdf5 --n_candidates 4

Each prompt (a token file's or metadata file's text and speaker, spoken after the --context_* prompt turns) is
spoken N times and every candidate judged (WER/CER, speaker similarity, EOS, duration, DNSMOS); the weighted reward
picks the best and the worst. Writes PREFS (the pairs, with the reference model's log-probabilities) and
PREFS-stem.candidates.csv (every candidate's scores). Resumes a killed run when run again with the same flags.
The command line only: the work is in preferences.py, the file format in preference_file.py.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from csm.model.adapters import read_adapter
from csm.training.config import read_yaml
from csm.judging.evaluation import add_item_flags, check_item_source, is_token_file, load_items
from csm.system.outputs import claim_output_files, inputs_of
from csm.data.preference_file import path_identity, reference_identity
from csm.training.preferences import (
    candidates_csv, DEFAULT_WEIGHTS, PreferenceRun, PreferSettings, REWARD_TERMS, settings_attrs,
)
from csm.system.runtime import resolve_device, resolve_precision
from csm.judging.speech_metrics import add_judge_flags, judges_of
from csm.judging.synthesis import (
    add_speech_flags, check_speech_flags, CompiledStep, context_segments, load_speech_model, model_speaker_names,
)
from csm.system.errors import check_number, UserError
from utils import CommandParser, run_cli
from csm.system.outputs import content_digest
from csm.model.weights import resolve_source


def build_parser() -> argparse.ArgumentParser:
    terms = "; ".join(f"{t.name} ({t.what}, default {t.default:g})" for t in REWARD_TERMS)
    p = CommandParser(description="Sample candidates, judge them, and write preference pairs for DPO")
    p.add_argument("--data", required=True,
                   help="the prompts: a token file from pretokenize.py (its --split) or a metadata file "
                        "(path,text[,start,end,speaker]); each row's reference is its audio")
    add_item_flags(p, what="prompts", split="train", n=0)
    p.add_argument("--output", required=True, help="the preference file (.hdf5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output and its candidates CSV")
    p.add_argument("--n_candidates", type=int, default=4, help="candidates sampled per prompt (default 4)")
    p.add_argument("--margin", type=float, default=0.1,
                   help="smallest reward gap between the best and the worst candidate that makes a pair (default 0.1)")
    p.add_argument("--weight", action="append", default=[], metavar="TERM=W",
                   help=f"a reward term's weight (repeatable); the terms: {terms}")
    p.add_argument("--weights", metavar="YAML", help="the reward weights as a YAML mapping term: weight")
    p.add_argument("--val_fraction", type=float, default=0.1,
                   help="share of prompts whose pairs are held out as the val split (default 0.1)")
    p.add_argument("--save_every", type=int, default=64, help="prompts per committed chunk (resume granularity)")
    p.add_argument("--max_audio_seconds", type=float, default=20.0,
                   help="length cap of a candidate (each also stops at twice its reference + 1 s)")
    p.add_argument("--seed", type=int, default=0, help="draws the prompts and the val split and seeds each candidate")
    add_judge_flags(p)
    add_speech_flags(p, context_speaker="its speaker id, or a speaker name of a token file --data (or of --speakers)",
                     precision_note="; here it is the autocast only: the weights stay fp32, as training holds "
                                    "them, so the reference log-probabilities are those of a DPO run's first step")
    p.add_argument("--speakers", default=None,
                   help="where speaker names are looked up: a token file or a speakers.json (default: --data when it "
                        "is a token file, else the model's speakers.json)")
    p.add_argument("--trust_pickle", action="store_true", help="allow .pkl/.h5 metadata (read through pickle)")
    return p


def reward_weights(args) -> dict[str, float]:
    """The defaults, then --weights YAML, then each --weight; unknown terms and non-finite weights refused."""
    weights = dict(DEFAULT_WEIGHTS)
    given = dict(read_yaml(args.weights, "--weights file")) if args.weights else {}
    for item in args.weight:
        name, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--weight expects TERM=WEIGHT, got {item!r}")
        given[name.strip()] = value
    for name, value in given.items():
        if name not in weights:
            raise UserError(f"unknown reward term {name!r}; the terms are {', '.join(weights)}")
        try:
            weights[name] = float(value)
        except (TypeError, ValueError):
            raise UserError(f"reward weight {name}={value!r} is not a number") from None
        check_number(f"reward weight {name}", weights[name], min=-1e6, max=1e6)
    return weights


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_speech_flags(args)
    check_number("--n", args.n, min=0, max=10**8)
    check_number("--context_turns", args.context_turns, min=0, max=64)
    check_number("--n_candidates", args.n_candidates, min=2, max=256)
    check_number("--margin", args.margin, min=0, max=1e6)
    check_number("--val_fraction", args.val_fraction, min=0, max=0.9)
    check_number("--save_every", args.save_every, min=1, max=10**7)
    check_number("--seed", args.seed, min=0, max=2**31 - 1)
    weights = reward_weights(args)
    data = check_item_source(args.data, "--data")
    output = Path(args.output)
    if output.suffix.lower() not in (".hdf5", ".h5"):
        raise UserError(f"--output {output}: give a file name ending in .hdf5")
    inputs = inputs_of(vars(args), skip=("output",))
    if args.adapter:
        read_adapter(args.adapter)  # a bad adapter fails before anything loads
    with claim_output_files([output, candidates_csv(output)], "--output", inputs=inputs,
                            overwrite=args.overwrite) as (output, _):
        return _prefer(args, data, output, weights)


def _prefer(args, data: Path, output: Path, weights: dict[str, float]) -> int:
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    names = model_speaker_names(args.model, args.speakers or (data if is_token_file(data) else None))
    context = context_segments(args.context_audio, args.context_text, args.context_speaker, names)
    quality = judges_of(args, device)  # the judges first: one that cannot be loaded fails before the model loads
    source = resolve_source(args.model, args.revision)
    # fp32 weights under the precision's autocast, as training holds and runs them: the reference log-probabilities
    # are then what a DPO run's first step computes.
    model, tokenizer, mimi = load_speech_model(args, source, device, "fp32")
    items, skipped = load_items(data, split=args.split, n=args.n or None, seed=args.seed, tokenizer=tokenizer,
                                trust_pickle=args.trust_pickle, flag="--data", context_turns=args.context_turns)
    for row, reason in skipped:
        print(f"warning: --data row {row} skipped: {reason}")
    settings = PreferSettings(n_candidates=args.n_candidates, margin=args.margin, weights=weights,
                              val_fraction=args.val_fraction, seed=args.seed, save_every=args.save_every,
                              max_audio_seconds=args.max_audio_seconds, temperature=args.temperature, topk=args.topk,
                              batch_size=args.batch_size, precision=precision)
    # What decides the pairs (not --batch_size: each candidate samples from its own seed, whatever its batch).
    decides = {k: v for k, v in settings_attrs(settings).items() if k != "batch_size"}
    # The run's own files (its output, work directory and lock) may lie in the model's folder.
    own = [output, output.with_name(output.name + ".partial"), f"{output}.lock", candidates_csv(output)]
    reference = reference_identity(source, args.adapter, exclude=own)
    fingerprint = {"settings": decides, "data": path_identity(data, own), "split": args.split, "n": args.n,
                   "context_turns": args.context_turns, **reference,
                   "judges": [args.asr, args.speaker_model, args.language, not args.no_dnsmos],
                   "context": content_digest([[s.text, s.speaker, s.audio] for s in context])}
    attrs = {**settings_attrs(settings), "codebooks": model.config.audio_num_codebooks,
             "reference_model": str(args.model), "reference_identity": json.dumps(reference),
             "reference_compiled": False, "adapter": str(args.adapter or ""),
             "data": str(data),
             "split": args.split, "context_turns": args.context_turns, "asr": str(args.asr),
             "speaker_model": str(args.speaker_model), "dnsmos": not args.no_dnsmos,
             "fingerprint": json.dumps(fingerprint, sort_keys=True, default=str)}
    run = PreferenceRun(model, tokenizer, mimi, quality, items, skipped, context, settings, output,
                        json.loads(json.dumps(fingerprint, default=str)), attrs,
                        step=CompiledStep(model, args.batch_size) if args.compile else None, device=device)
    print(f"{len(items)} prompts x {args.n_candidates} candidates from {data} on {device}")
    counts = run.run()
    print(f"wrote {output}: {counts['train']} train and {counts['val']} val pairs (of {len(items)} prompts); every "
          f"candidate's scores in {candidates_csv(output)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
