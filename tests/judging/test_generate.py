"""generate.py on the tiny model: wav output, EOS stop, length cap, seeds, context, errors."""
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import generate
from csm.judging import synthesis
from csm.system.errors import UserError
from csm.model import weights
from csm.data.audio_io import read_audio
from conftest import ROOT
from csm.data.frames import Segment
from csm.training.loss import compute_loss
from csm.judging.synthesis import build_prompt, parse_speaker, synthesize
from csm.model.tokenization import encode_text

SAMPLES_PER_FRAME = 1920  # 24 kHz / 12.5 Hz


@pytest.fixture
def model(assets):
    return weights.load_model(str(assets["model"]))


def _cli(assets, *args):
    return ["--model", str(assets["model"]), "--text_tokenizer", str(assets["text_tokenizer"]),
            "--mimi_weights", str(assets["mimi"]), "--device", "cpu", *args]


def test_cli_writes_a_24khz_wav_within_the_cap(assets, tmp_path, capsys):
    out = tmp_path / "sub" / "hello.wav"
    assert generate.main(_cli(assets, "--text", "Hello there.", "--speaker", "3", "--output", str(out),
                              "--max_audio_seconds", "0.4")) == 0
    info = sf.info(str(out))
    assert info.samplerate == 24000 and info.channels == 1
    assert 0 < info.frames <= 5 * SAMPLES_PER_FRAME
    assert "hello.wav" in capsys.readouterr().out


def test_bf16_weights_generate(assets, tmp_path, monkeypatch):
    """--precision bf16 loads the model in bf16 (the GPU default) and still writes a wav."""
    loaded = []
    real_load = weights.load_model
    monkeypatch.setattr(synthesis, "load_model", lambda *a, **kw: loaded.append(real_load(*a, **kw)) or loaded[-1])
    out = tmp_path / "bf16.wav"
    assert generate.main(_cli(assets, "--text", "Hello.", "--output", str(out), "--max_audio_seconds", "0.4",
                              "--precision", "bf16")) == 0
    assert next(loaded[0].parameters()).dtype == torch.bfloat16
    assert sf.info(str(out)).frames > 0
    with pytest.raises(UserError, match="fp16"):
        generate.main(_cli(assets, "--text", "Hi.", "--precision", "fp16"))  # CPU: fp16 is refused


def test_length_cap_without_eos(model, text_tokenizer, mimi):
    audio, stopped = synthesize(model, text_tokenizer, mimi, "Hi.", 0, max_audio_seconds=0.4,
                                seed=0)
    assert not stopped
    assert audio.shape == (5 * SAMPLES_PER_FRAME,)


class _Const(torch.nn.Module):
    """Outputs a fixed vector whatever comes in (named `scale` so it can stand in for a norm)."""

    def __init__(self, value):
        super().__init__()
        self.scale = torch.nn.Parameter(value, requires_grad=False)

    def forward(self, x):
        return self.scale.to(x.dtype).expand(*x.shape[:-1], -1)


def test_stops_at_the_eos_frame(model, text_tokenizer, mimi):
    # Make code 0 the best candidate for every codebook: the first sampled frame is the EOS frame.
    head = torch.zeros(model.config.audio_vocab_size)
    head[0] = 10.0
    model.codebook0_head = _Const(head)
    model.decoder.norm = _Const(torch.ones(model.decoder.norm.scale.shape))  # decoder output = ones
    with torch.no_grad():
        model.audio_head.zero_()
        model.audio_head[:, :, 0] = 1.0
    audio, stopped = synthesize(model, text_tokenizer, mimi, "Hi.", 0, max_audio_seconds=2.0, topk=1)
    assert stopped and audio.numel() == 0


def test_seed_decides_the_output(model, text_tokenizer, mimi):
    def run(seed):
        return synthesize(model, text_tokenizer, mimi, "Same text.", 1, max_audio_seconds=0.16,
                          seed=seed)[0]

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_mode_and_caches_are_restored(model, text_tokenizer, mimi):
    model.train()
    synthesize(model, text_tokenizer, mimi, "Hi.", 0, max_audio_seconds=0.16)
    assert model.training
    assert not model.backbone.caches_are_enabled() and not model.decoder.caches_are_enabled()


def test_caches_removed_after_an_error(model, text_tokenizer, mimi, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "generate_frame", fail)  # this instance only
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        synthesize(model, text_tokenizer, mimi, "Hi.", 0, max_audio_seconds=0.16)
    assert model.training and not model.backbone.caches_are_enabled()


def test_training_works_after_sampling_a_fresh_model(model, text_tokenizer, mimi):
    # Samples may come before the first training forward; nothing cached while sampling may break backward.
    synthesize(model, text_tokenizer, mimi, "Hi.", 0, max_audio_seconds=0.16)
    model.train()
    tokens = torch.randint(0, 300, (1, 8, 33))
    terms = compute_loss(model, tokens, torch.ones(1, 8, 33, dtype=torch.bool))
    (terms.c0_sum + terms.decoder_sum).backward()
    assert model.codebook0_head.weight.grad is not None


def test_read_audio_mixes_to_mono_and_resamples(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.zeros((16000, 2), dtype=np.float32), 16000)  # 1 s at 16 kHz
    audio = torch.from_numpy(read_audio(path))
    assert audio.ndim == 1 and audio.shape[0] == 24000
    with pytest.raises(UserError, match="audio file not found"):
        read_audio(tmp_path / "missing.wav")


def test_context_turns_change_the_output(model, text_tokenizer, mimi):
    rng = np.random.default_rng(0)
    turn = Segment("Earlier words.", 2, torch.from_numpy(rng.normal(0, 0.1, 12000).astype(np.float32)))
    tokens, mask = build_prompt(text_tokenizer, mimi, [turn, Segment("Now.", 0)], 32)
    n_text0 = len(encode_text(text_tokenizer, "Earlier words.", 2))
    n_audio = 12000 // SAMPLES_PER_FRAME + 1  # ceil(0.5 s / 80 ms) frames, then the EOS frame
    assert len(tokens) == n_text0 + n_audio + 1 + len(encode_text(text_tokenizer, "Now.", 0))
    eos = n_text0 + n_audio  # the context turn's EOS frame: zeros, audio entries real
    assert not tokens[eos].any() and mask[eos, :32].all() and not mask[eos, 32]

    def run(context):
        return synthesize(model, text_tokenizer, mimi, "Now.", 0, context, max_audio_seconds=0.16,
                          seed=0)[0]

    assert not torch.equal(run([turn]), run([]))


def test_lines_file_writes_one_wav_per_line(assets, tmp_path):
    """Line N's wav is _{N-1:03d} whatever blank lines stand before it; existing wavs need --overwrite."""
    lines = tmp_path / "lines.txt"
    lines.write_text("\ufeffFirst line.\n\n  \nFourth line.\n")
    args = _cli(assets, "--lines", str(lines), "--output", str(tmp_path / "out.wav"), "--max_audio_seconds", "0.16")
    assert generate.main(args) == 0
    assert sorted(p.name for p in tmp_path.glob("out_*.wav")) == ["out_000.wav", "out_003.wav"]
    before = {p.name: p.read_bytes() for p in tmp_path.glob("out_*.wav")}
    with pytest.raises(UserError, match="out_000.wav exists .and 1 more.; pass --overwrite"):
        generate.main(args)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("out_*.wav")} == before
    assert generate.main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lines.txt", "out_000.wav", "out_003.wav"]  # no lock left


def test_user_errors(model, text_tokenizer, mimi):
    with pytest.raises(UserError, match="empty"):
        synthesize(model, text_tokenizer, mimi, "  ", 0)
    with pytest.raises(UserError, match="2048-frame limit"):
        synthesize(model, text_tokenizer, mimi, "Hi.", 0, max_audio_seconds=200)
    with pytest.raises(UserError, match="non-negative integer"):
        parse_speaker("abc")
    for bad in ("-1", "²", "1.5", ""):
        with pytest.raises(UserError, match="non-negative integer"):
            parse_speaker(bad)
    assert parse_speaker("12") == 12 and parse_speaker(0) == 0


def test_cli_errors_are_one_line(assets, tmp_path):
    proc = subprocess.run([sys.executable, "generate.py", "--model", str(tmp_path / "missing"), "--text", "Hi",
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    with pytest.raises(UserError, match="--context_text"):
        generate.main(_cli(assets, "--text", "Hi", "--context_audio", str(tmp_path / "none.wav")))


def test_generation_reports_its_similarity_to_the_prompt(assets, tmp_path, capsys):
    """With context audio and --speaker_model, each wav's speaker similarity to the prompt is printed."""
    from csm.data import tiny_assets

    judges = tiny_assets.make_judges(tmp_path / "judges")
    prompt = str(ROOT / "data" / "sample" / "clips" / "train_00.flac")
    args = _cli(assets, "--text", "Hello.", "--output", str(tmp_path / "o.wav"), "--max_audio_seconds", "0.4",
                "--context_audio", prompt, "--context_text", "A prompt.", "--context_speaker", "0",
                "--speaker_model", str(judges["speaker_model"]))
    assert generate.main(args) == 0
    said = float(capsys.readouterr().out.split("speaker similarity to the prompt ")[1].split()[0])
    assert -1 <= said <= 1
    with pytest.raises(UserError, match="give --context_audio too"):
        generate.main(_cli(assets, "--text", "Hi.", "--output", str(tmp_path / "x.wav"), "--speaker_model", "m"))


def test_bad_prompts_are_refused_before_anything_is_spoken(assets, tmp_path):
    """A --lines line too long for the model is named by its number before any line is spoken; a context wav
    with no frame's worth of samples, or with NaN samples, is one line; so is a --topk past a codebook's size, in
    every command that speaks (it once allocated [rows, 32, topk] of noise)."""
    import evaluate
    import prefer

    lines = tmp_path / "lines.txt"
    lines.write_text("Short.\n\n" + "many words " * 40 + "\n")
    out = tmp_path / "out.wav"
    with pytest.raises(UserError, match=r"^--lines .*lines.txt line 3: the text and context take \d+ frames"):
        generate.main(_cli(assets, "--lines", str(lines), "--output", str(out), "--max_audio_seconds", "160"))
    assert not list(tmp_path.glob("out*"))
    for samples, message in ((np.zeros(0, np.float32), "holds 0 samples at 24 kHz, less than one frame"),
                             (np.full(4800, np.nan, np.float32), "NaN or infinite samples")):
        wav = tmp_path / "context.wav"
        sf.write(wav, samples, 24000, subtype="FLOAT")
        turn = ["--context_audio", str(wav), "--context_text", "Before.", "--context_speaker", "0"]
        with pytest.raises(UserError, match=message):
            generate.main(_cli(assets, "--text", "Hi.", "--output", str(out), *turn))
        assert not out.exists()
        # evaluate.py exited 0 with every item failed, and prefer.py advised raising --n_candidates
        with pytest.raises(UserError, match=message):
            evaluate.main(_cli(assets, "--eval_data", str(lines), "--output_dir", str(tmp_path / "ev"), *turn))
        with pytest.raises(UserError, match=message):
            prefer.main(_cli(assets, "--data", str(lines), "--output", str(tmp_path / "p.hdf5"), *turn))
    for main, args in ((generate.main, ["--text", "Hi.", "--output", str(out)]),
                       (evaluate.main, ["--eval_data", str(lines), "--output_dir", str(tmp_path / "ev")]),
                       (prefer.main, ["--data", str(lines), "--output", str(tmp_path / "p.hdf5")])):
        with pytest.raises(UserError, match="--topk must be <= 2048, got 4096"):
            main([*args, "--topk", "4096"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["context.wav", "lines.txt"]
