"""Speech from a CSM checkpoint: text (+ optional earlier turns as context) -> 24 kHz wav.

    python generate.py --model runs/exp/best --text "Hello there." --speaker 0 --output hello.wav

The command line only: prompts and sampling live in synthesis.py (context turns are laid out as the
official generator does; sampling stops at the EOS frame or the length cap).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import soundfile as sf

from csm.model.adapters import read_adapter
from csm.data.metadata import visible_text
from csm.judging.synthesis import (
    add_speech_flags, check_prompts, check_speech_flags, CompiledStep, context_segments, encode_context,
    load_speech_model, model_speaker_names, parse_speaker, SpeechRequest, SpeechStream, synthesize_batch,
    utterance_seed,
)
from csm.model.codec import MIMI_SAMPLE_RATE
from csm.system.errors import check_number, UserError
from utils import CommandParser, run_cli
from csm.system.runtime import resolve_device, resolve_precision
from csm.system.outputs import atomic_path, claim_output_files, inputs_of
from csm.judging.speech_metrics import prompt_similarity, SpeakerEncoder
from csm.model.weights import resolve_source


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def build_parser() -> argparse.ArgumentParser:
    """The command line of generate.py."""
    p = CommandParser(description="Speech from a CSM checkpoint (hub id, directory in either "
                                            "layout, .safetensors or .pt)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="what to say")
    what.add_argument("--lines", help="text file, one utterance per line; line N (from 1) is written to "
                                       "<output>_{N-1:03d}.wav (_000.wav, _001.wav, ...); blank lines are passed over")
    p.add_argument("--speaker", default="0",
                   help="speaker id (non-negative integer) as in training, or a speaker name of the training data "
                        "(looked up in the speakers.json beside the model's weights, or in --speakers)")
    p.add_argument("--speakers", default=None,
                   help="where speaker names are looked up: a token file from pretokenize.py or a speakers.json")
    p.add_argument("--output", default="out.wav", help="wav file to write (24 kHz mono)")
    p.add_argument("--overwrite", action="store_true", help="replace output files that exist (default: refuse)")
    p.add_argument("--max_audio_seconds", type=float, default=10.0, help="length cap if no EOS frame comes first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speaker_model", default=None,
                   help="with --context_audio: a speaker-verification model (hub id or local dir, e.g. "
                        "microsoft/wavlm-base-plus-sv) that reports each wav's speaker similarity to the prompt")
    p.add_argument("--stream", action="store_true",
                   help="write the wav as the audio arrives, chunk by chunk (with --text): the file grows under a "
                        "temporary name, printed at the start, and takes --output's name when done")
    add_speech_flags(p, context_speaker="its speaker id (one per --context_audio)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Load model, tokenizers and context once, then write one wav per utterance."""
    args = build_parser().parse_args(argv)
    check_speech_flags(args)
    check_number("--seed", args.seed, min=0, max=2**63 - 1)
    if args.speaker_model and not args.context_audio:
        raise UserError("--speaker_model reports each wav's similarity to the prompt: give --context_audio too")
    if args.stream and args.lines:
        raise UserError("--stream speaks one --text as it is generated; --lines files are generated in batches")
    if args.lines:
        path = Path(args.lines)
        if not path.is_file():
            raise UserError(f"--lines {path}: no such file")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError:
            raise UserError(f"--lines {path} is not a UTF-8 text file") from None
        # A line keeps its number whatever blank lines stand before it: line 4's wav is _003.
        numbered = [(i, text) for i, line in enumerate(lines) if (text := visible_text(line))]
        if not numbered:
            raise UserError(f"--lines {path} has no non-empty line")
        if len(numbered) < len(lines):
            print(f"--lines {path}: {len(lines) - len(numbered)} blank line(s) passed over (no wav for them)")
    else:
        if not visible_text(args.text):
            raise UserError("--text is empty (nothing but spaces or control characters)")
        numbered = [(None, visible_text(args.text))]  # seeded as line 1 of --lines would be
    # Every output is checked before minutes of model loading and sampling.
    output = Path(args.output)
    if output.suffix.lower() not in AUDIO_SUFFIXES:
        raise UserError(f"--output {output}: give a file name ending in {', '.join(AUDIO_SUFFIXES)}")
    outputs = [output if i is None else output.with_name(f"{output.stem}_{i:03d}{output.suffix}") for i, _ in numbered]
    numbered = [(i or 0, text) for i, text in numbered]
    if args.speakers or Path(args.model).expanduser().exists():  # a hub model's speakers.json comes with its files
        parse_speaker(args.speaker, model_speaker_names(args.model, args.speakers))
    with claim_output_files(outputs, "--output", inputs=inputs_of(vars(args), skip=("output",)),
                            overwrite=args.overwrite) as outputs:
        return _generate(args, numbered, outputs)


def _generate(args, numbered: list[tuple[int, str]], outputs: list[Path]) -> int:
    """The model, tokenizers and context loaded once, then a wav per text (the outputs locked and checked)."""
    if args.adapter:
        read_adapter(args.adapter)  # a bad adapter fails before the model loads
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    source = resolve_source(args.model, args.revision)  # a hub repo is fetched once, at the pinned revision
    names = model_speaker_names(source, args.speakers)
    speaker = parse_speaker(args.speaker, names)
    context = context_segments(args.context_audio, args.context_text, args.context_speaker, names)
    judge = _prompt_judge(args, context, device)  # a judge that cannot be loaded fails before the model loads
    model, tokenizer, mimi = load_speech_model(args, source, device, precision)
    step = CompiledStep(model, args.batch_size) if args.compile else None
    context = encode_context(context, mimi, model.config.audio_num_codebooks)  # once, not once a line
    requests = [SpeechRequest(text, speaker, context, args.max_audio_seconds, utterance_seed(args.seed, number))
                for number, text in numbered]
    # Every line is checked before the first is spoken: a line too long for the model stops nothing midway.
    check_prompts(model, tokenizer, mimi, requests,
                  [f"--lines {args.lines} line {number + 1}" if args.lines else "--text" for number, _ in numbered])
    if args.stream:
        return _stream(model, tokenizer, mimi, requests[0], outputs[0], args, step)
    for start in range(0, len(requests), args.batch_size):
        batch = requests[start:start + args.batch_size]
        spoken = synthesize_batch(model, tokenizer, mimi, batch, temperature=args.temperature, topk=args.topk,
                                  progress=True, step=step)
        for speech, out in zip(spoken, outputs[start:start + args.batch_size]):
            write_wav(out, speech.audio.numpy())
            why = "stopped at EOS" if speech.stopped else f"reached the {args.max_audio_seconds:g} s cap"
            similar = judge(speech.audio.numpy()) if judge else None
            print(f"{out}: {len(speech.audio) / MIMI_SAMPLE_RATE:.2f} s ({why})"
                  + ("" if similar is None else f"; speaker similarity to the prompt {similar:.3f}"))
    return 0


def _prompt_judge(args, context, device):
    """With --speaker_model and context audio: a function from a generated clip to its speaker similarity to
    the context turns' audio (None: nothing to judge)."""
    if not args.speaker_model:
        return None
    prompts = [s.audio.float().numpy() for s in context if s.audio is not None]
    encoder = SpeakerEncoder(args.speaker_model, device=device)
    embedded = [e for e in (encoder.embed(p, MIMI_SAMPLE_RATE) for p in prompts) if e is not None]
    return lambda clip: prompt_similarity(encoder, clip, embedded, MIMI_SAMPLE_RATE)


def _stream(model, tokenizer, mimi, request: SpeechRequest, out: Path, args, step) -> int:
    """Write one utterance as its chunks arrive: appended and flushed to the temp file, renamed at the end."""
    stream = SpeechStream(model, tokenizer, mimi, request, temperature=args.temperature, topk=args.topk, step=step)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0, samples = time.perf_counter(), 0
    with atomic_path(out, suffix=f".tmp{out.suffix}") as tmp:
        print(f"streaming into {tmp} (renamed to {out} when done)")
        with sf.SoundFile(str(tmp), "w", samplerate=MIMI_SAMPLE_RATE, channels=1) as f:
            for chunk in stream:
                f.write(chunk.numpy())
                f.flush()
                if not samples:
                    print(f"first audio after {time.perf_counter() - t0:.2f} s")
                samples += len(chunk)
    why = "stopped at EOS" if stream.stopped else f"reached the {args.max_audio_seconds:g} s cap"
    print(f"{out}: {samples / MIMI_SAMPLE_RATE:.2f} s ({why}) in {time.perf_counter() - t0:.2f} s")
    return 0


def write_wav(out: Path, audio) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=f".tmp{out.suffix}") as tmp:  # soundfile picks the format by extension
        sf.write(str(tmp), audio, MIMI_SAMPLE_RATE)


if __name__ == "__main__":
    run_cli(main)
