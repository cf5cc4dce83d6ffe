"""Generation in batches: each row equals its batch of one (greedy exactly, sampled through its own seed), stops
at its own EOS or cap, leaves the batch when done; a frame step reads nothing back from the device; a compiled
step equals the eager one; generate.py and the evaluation give the same audio at any batch size."""
import numpy as np
import pytest
import soundfile as sf
import torch

import generate
from csm.model import weights
from csm.model.csm_model import CSM, frame_noise
from csm.data.frames import Segment
from csm.judging.synthesis import CompiledStep, SpeechRequest, synthesize_batch

SAMPLES_PER_FRAME = 1920


@pytest.fixture
def model(assets):
    return weights.load_model(str(assets["model"]))


def _requests(seed=None):
    """Prompts of different lengths, one with a context turn, with caps of their own."""
    rng = np.random.default_rng(0)
    turn = Segment("Earlier words.", 2, torch.from_numpy(rng.normal(0, 0.1, 9600).astype(np.float32)))
    seeds = [None] * 3 if seed is None else [seed, seed + 1, seed + 2]
    return [SpeechRequest("Hi.", 0, (), 0.4, seeds[0]),
            SpeechRequest("A much longer sentence than the first one.", 1, (), 0.64, seeds[1]),
            SpeechRequest("After a turn.", 3, (turn,), 0.24, seeds[2])]


def _alone(model, text_tokenizer, mimi, requests, **kwargs):
    return [synthesize_batch(model, text_tokenizer, mimi, [r], **kwargs)[0] for r in requests]


def test_greedy_rows_equal_their_batch_of_one(model, text_tokenizer, mimi):
    requests = _requests()
    batch = synthesize_batch(model, text_tokenizer, mimi, requests, topk=1)
    for speech, alone, request in zip(batch, _alone(model, text_tokenizer, mimi, requests, topk=1), requests):
        assert torch.equal(speech.codes, alone.codes) and torch.equal(speech.audio, alone.audio)
        frames = int(request.max_audio_seconds * 12.5)  # the random model never says EOS: each row its own cap
        assert speech.codes.shape == (32, frames) and len(speech.audio) == frames * SAMPLES_PER_FRAME


def test_sampled_rows_depend_on_their_seed_only(model, text_tokenizer, mimi):
    requests = _requests(seed=7)
    batch = synthesize_batch(model, text_tokenizer, mimi, requests, topk=50)
    for speech, alone in zip(batch, _alone(model, text_tokenizer, mimi, requests, topk=50)):
        assert torch.equal(speech.codes, alone.codes)
    reordered = synthesize_batch(model, text_tokenizer, mimi, requests[::-1], topk=50)[::-1]
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(batch, reordered))
    other = synthesize_batch(model, text_tokenizer, mimi, [SpeechRequest("Hi.", 0, (), 0.4, 8)], topk=50)[0]
    assert not torch.equal(other.codes, batch[0].codes)


def test_gumbel_noise_samples_the_top_k_softmax():
    """sample_topk with frame_noise draws from softmax(logits / T) over the top k, and only from there."""
    from csm.model.csm_model import sample_topk

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 5.0]]).expand(20_000, -1)
    generators = [torch.Generator().manual_seed(0)]
    noise = frame_noise(generators, 20_000, 3, "cpu")[0]  # 20,000 draws of one row's noise
    picks = sample_topk(logits, 3, 0.7, noise)[:, 0]
    counts = torch.bincount(picks, minlength=5).float() / len(picks)
    top = torch.tensor([2.0, 1.0, 5.0]) / 0.7
    expected = torch.zeros(5)
    expected[[0, 1, 4]] = torch.softmax(top, 0)
    assert counts[2] == 0 and counts[3] == 0
    torch.testing.assert_close(counts, expected, atol=0.01, rtol=0)


def test_rows_stop_at_their_own_eos_and_leave_the_batch(model, text_tokenizer, mimi, monkeypatch):
    """A stand-in step says EOS for row 0 at its 3rd frame and row 1 at its 6th (each frame carries its row and
    number in codebooks 1 and 2, which the next step reads back as its input); row 2 runs to its cap. Each row
    keeps the frames before its EOS, nothing past a row's end is decoded, and done rows leave the batch at the
    next check (every 2 frames here)."""
    from csm.judging import synthesis

    k, sizes, decoded = model.config.audio_num_codebooks, [], []

    def step(tokens, mask, pos, temperature, topk, noise=None, last=None):
        b = len(tokens)
        sizes.append(b)
        if last is not None:  # the prompt: rows in their order, frame 0 next
            ids, number = torch.arange(b), torch.zeros(b, dtype=torch.long)
        else:
            ids, number = tokens[:, 0, 1] - 1, tokens[:, 0, 2] + 1
        frame = torch.ones(b, k, dtype=torch.int)
        frame[:, 1], frame[:, 2] = ids + 1, number
        eos = ((ids == 0) & (number == 2)) | ((ids == 1) & (number == 5))
        return torch.where(eos[:, None], torch.zeros_like(frame), frame)

    monkeypatch.setattr(model, "generate_frame", step)
    real_decode = synthesis.decode_audio
    monkeypatch.setattr(synthesis, "decode_audio", lambda m, c: decoded.append(c.shape[1]) or real_decode(m, c))
    spoken = synthesize_batch(model, text_tokenizer, mimi, _requests(), topk=1, check_every=2)
    assert [s.stopped for s in spoken] == [True, True, False]
    assert [s.codes.shape[1] for s in spoken] == [2, 5, 3] and decoded == [2, 5, 3]
    assert [len(s.audio) for s in spoken] == [2 * SAMPLES_PER_FRAME, 5 * SAMPLES_PER_FRAME, 3 * SAMPLES_PER_FRAME]
    assert sizes == [3, 3, 3, 3, 1, 1]  # rows 0 and 2 left at the check after frame 4; row 1 ended at frame 6


def test_a_frame_step_reads_nothing_back_from_the_device(assets):
    """On the meta device any read back (.item(), int(), .tolist(), a nonzero) raises: the prompt step and the
    one-frame steps, greedy and sampled, and dropping rows, all run there."""
    with torch.device("meta"):
        model = CSM(weights.load_model(assets["model"]).config).eval()
    k = model.config.audio_num_codebooks
    model.setup_caches(3, 128)
    tokens = torch.zeros(3, 9, k + 1, dtype=torch.long, device="meta")
    mask = torch.ones(3, 9, k + 1, dtype=torch.bool, device="meta")
    pos = torch.arange(9, device="meta").expand(3, -1)
    last = torch.tensor([8, 5, 2], device="meta")
    with torch.no_grad():
        frame = model.generate_frame(tokens, mask, pos, 0.9, 50, torch.zeros(3, k, 50, device="meta"), last)
        for noise in (None, torch.zeros(3, k, 50, device="meta")):
            frame = model.generate_frame(tokens[:, :1], mask[:, :1], (last + 1)[:, None], 0.9, 50, noise)
        model.keep_rows(torch.tensor([0, 2], device="meta"))
        frame = model.generate_frame(tokens[:2, :1], mask[:2, :1], pos[:2, :1], 0.9, 1)
    assert frame.shape == (2, k) and frame.device.type == "meta"
    with pytest.raises(Exception):
        torch.zeros(1, device="meta").item()  # the premise: a read back on the meta device raises


class CudaGraphLike:
    """A torch.compile backend that hands out outputs the way CUDA graphs do: each compiled graph writes its
    outputs into static buffers of its own, which its next call overwrites (so a caller that keeps one call's
    output across the next reads the later values, as it would on a GPU). It runs the graph as traced and counts
    the graphs it is given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        static = []

        def replay(*args):
            outputs = gm(*args)
            flat = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            if not static:
                static.extend(torch.empty_like(o) if isinstance(o, torch.Tensor) else None for o in flat)
            for buffer, o in zip(static, flat):
                if buffer is not None:
                    buffer.copy_(o)
            out = [b if b is not None else o for b, o in zip(static, flat)]
            return type(outputs)(out) if isinstance(outputs, (tuple, list)) else out[0]

        return replay


def test_the_CudaGraphLike_backend_shows_what_a_kept_output_reads(model):
    """The premise of the tests below: with this backend, an output kept across the graph's next call changes."""
    backend = CudaGraphLike()
    double = torch.compile(lambda x: x * 2, backend=backend, fullgraph=True, dynamic=False)
    first = double(torch.ones(3))
    double(torch.full((3,), 5.0))
    assert first.tolist() == [10.0, 10.0, 10.0] and backend.graphs == 1


@pytest.mark.parametrize("topk", [1, 50], ids=["greedy", "sampled"])
def test_a_compiled_step_under_cuda_graph_semantics_speaks_what_eager_speaks(model, text_tokenizer, mimi, topk):
    """Rows of different prompt lengths, a context turn and caps of their own, batched: the compiled step (its
    outputs overwritten on each graph's next call, as under CUDA graphs) gives eager's codes, greedy and sampled."""
    requests = _requests(seed=5)
    eager = synthesize_batch(model, text_tokenizer, mimi, requests, topk=topk)
    step = CompiledStep(model, 4, backend=CudaGraphLike())
    compiled = synthesize_batch(model, text_tokenizer, mimi, requests, topk=topk, step=step)
    assert all(torch.equal(a.codes, b.codes) and a.stopped == b.stopped for a, b in zip(eager, compiled))
    assert all(len(s.codes[0]) > 1 for s in eager)  # the premise: the compiled steps ran


def test_compiled_generation_compiles_a_bounded_number_of_graphs_across_calls(model, text_tokenizer, mimi):
    """Calls of several batch sizes and lengths compile a graph per bucket they meet, once: a later call of other
    sizes in the same buckets compiles nothing, the KV caches are allocated once, and the model is left without
    caches between calls (training may run in between)."""
    backend = CudaGraphLike()
    step = CompiledStep(model, 4, backend=backend, lengths=(48, 96))  # the buckets of 256, 512, ... in small
    short, long = 0.4, 3.2  # the long one needs more than 48 cache positions: the next length bucket

    def say(n, seconds):
        requests = [SpeechRequest(f"Line {i} of {n}.", i, (), seconds, i) for i in range(n)]
        return synthesize_batch(model, text_tokenizer, mimi, requests, topk=1, step=step)

    say(3, short)  # bucket (4 rows, 48): a backbone graph and two decoder graphs
    after_first = backend.graphs
    assert after_first == 3
    pointer = model.backbone.layers[0].attn.kv_cache if model.backbone.caches_are_enabled() else None
    assert pointer is None  # removed after the call
    caches = [c.k.data_ptr() for c in step._caches]
    say(4, short)
    say(2, short)  # 2 rows: a new batch bucket
    say(1, long)   # 1 row, 96 positions
    say(1, short)
    assert backend.graphs == after_first + 3 + 3 + 1
    seen = backend.graphs
    for n, seconds in ((3, short), (2, short), (1, long), (4, short), (1, 0.08)):
        say(n, seconds)
    assert backend.graphs == seen <= step.max_graphs
    assert [c.k.data_ptr() for c in step._caches] == caches
    with pytest.raises(ValueError, match="over the compiled step's max_batch of 4"):
        say(5, short)


@pytest.mark.slow
def test_the_CompiledStep_with_inductor_equals_the_eager_one(model, text_tokenizer, mimi):
    """The real compiler (inductor's C++ on the CPU; on a GPU, bench/gpu_check.py's generate row compares them)."""
    requests = _requests()[:2]
    eager = synthesize_batch(model, text_tokenizer, mimi, requests, topk=1)
    compiled = synthesize_batch(model, text_tokenizer, mimi, requests, topk=1, step=CompiledStep(model, 2))
    assert all(torch.equal(a.codes, b.codes) for a, b in zip(eager, compiled))


def _cli(assets, *args):
    return ["--model", str(assets["model"]), "--text_tokenizer", str(assets["text_tokenizer"]),
            "--mimi_weights", str(assets["mimi"]), "--device", "cpu", "--max_audio_seconds", "0.32", *args]


def test_a_lines_wav_depends_neither_on_the_batch_nor_on_the_lines_before_it(assets, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("First line.\nSecond line here.\nThird.\n")
    alone = tmp_path / "alone.txt"
    alone.write_text("\n\nThird.\n")  # line 3 again, with nothing before it
    wavs = {}
    for name, path, size in (("b1", lines, 1), ("b3", lines, 3), ("alone", alone, 2)):
        assert generate.main(_cli(assets, "--lines", str(path), "--output", str(tmp_path / f"{name}.wav"),
                                  "--batch_size", str(size))) == 0
        wavs[name] = {p.name.split("_")[1]: sf.read(p)[0] for p in tmp_path.glob(f"{name}_*.wav")}
    assert sorted(wavs["b1"]) == ["000.wav", "001.wav", "002.wav"] and sorted(wavs["alone"]) == ["002.wav"]
    for line in wavs["b1"]:
        assert np.array_equal(wavs["b1"][line], wavs["b3"][line])
    assert np.array_equal(wavs["alone"]["002.wav"], wavs["b1"]["002.wav"])
    assert not np.array_equal(wavs["b1"]["000.wav"][:3840], wavs["b1"]["001.wav"][:3840])


def test_streamed_chunks_join_close_to_a_one_shot_decode(mimi):
    """Mimi's decoder keeps no streaming state in transformers: chunks are decoded with 2 s of frames before them
    and the last frame held back. Joined, they are as long as a one-shot decode and differ from it by at most
    1e-3 of its peak (measured here: 1.4e-4, and 1e-6 while the whole past fits in the context)."""
    from csm.judging.synthesis import StreamDecoder, decode_audio

    codes = torch.randint(0, 2048, (32, 100), generator=torch.Generator().manual_seed(0))
    one_shot = decode_audio(mimi, codes)
    decoder = StreamDecoder(mimi)
    chunks = [decoder.push(codes[:, :n]) for n in range(6, 100, 6)] + [decoder.push(codes, final=True)]
    joined = torch.cat(chunks)
    assert len(joined) == len(one_shot) and all(len(c) == 6 * SAMPLES_PER_FRAME for c in chunks[1:-1])
    assert (joined - one_shot).abs().max() <= 1e-3 * one_shot.abs().max()
    assert (joined[:20 * SAMPLES_PER_FRAME] - one_shot[:20 * SAMPLES_PER_FRAME]).abs().max() <= 1e-5


def test_a_stream_speaks_what_the_batch_speaks(model, text_tokenizer, mimi, assets, tmp_path):
    from csm.judging.synthesis import SpeechStream

    request = SpeechRequest("Streamed words.", 1, (), 1.2, seed=3)
    stream = SpeechStream(model, text_tokenizer, mimi, request, topk=50, chunk=4)
    chunks = list(stream)
    batch = synthesize_batch(model, text_tokenizer, mimi, [request], topk=50)[0]
    assert torch.equal(stream.codes, batch.codes) and stream.stopped == batch.stopped
    assert len(chunks) > 2 and sum(len(c) for c in chunks) == len(batch.audio)
    out = tmp_path / "s.wav"
    assert generate.main(_cli(assets, "--text", "Streamed words.", "--output", str(out), "--stream")) == 0
    plain = tmp_path / "p.wav"
    assert generate.main(_cli(assets, "--text", "Streamed words.", "--output", str(plain))) == 0
    streamed, whole = sf.read(out)[0], sf.read(plain)[0]
    assert len(streamed) == len(whole) and np.abs(streamed - whole).max() <= 1e-3 * np.abs(whole).max() + 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.wav", "s.wav"]
    with pytest.raises(Exception, match="--stream speaks one --text"):
        generate.main(_cli(assets, "--lines", str(out), "--output", str(tmp_path / "x.wav"), "--stream"))
