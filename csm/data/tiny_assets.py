"""Tiny stand-ins for the real assets, saved in the real layouts, for tests and the offline demo.

- a byte-level BPE text tokenizer saved as an AutoTokenizer directory (like meta-llama/Llama-3.2-1B),
- a small Mimi with random but non-empty codebooks, saved by transformers as a MimiModel (like kyutai/mimi),
- a tiny CSM saved in the official layout (config.json + model.safetensors, as sesame/csm-1b was released),
- a tiny CSM in the transformers layout, built and saved by transformers itself (CsmForConditionalGeneration
  with a tiny MimiModel, tokenizer and processor, as sesame/csm-1b and its finetunes are served today).

They are loaded by exactly the code that loads the real ones. Audio they produce is not speech.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from tokenizers import decoders, models, pre_tokenizers, Tokenizer, trainers
from tokenizers.processors import TemplateProcessing
import torch

from csm.model.csm_model import CSM, ModelArgs
from csm.model.weights import save_pretrained
from csm.data.audio_io import read_audio
from csm.data import token_file

TEXT_VOCAB_SIZE = 512
TINY_MODEL_ARGS = ModelArgs(backbone_flavor="llama-tiny", decoder_flavor="llama-tiny-decoder",
                            text_vocab_size=TEXT_VOCAB_SIZE, audio_vocab_size=2051, audio_num_codebooks=32)

_CORPUS = """The quick brown fox jumps over the lazy dog. Speech synthesis turns text into sound.
A conversational speech model listens to context and answers with a voice of its own.
Numbers such as 0 1 2 3 4 5 6 7 8 9 and speakers like [0] [1] [999] appear in prompts.
Hello there, how are you today? I am fine, thank you. What time is it? It is half past nine.
She sells sea shells by the sea shore. Peter Piper picked a peck of pickled peppers."""


def make_text_tokenizer(directory: str | Path, vocab_size: int = TEXT_VOCAB_SIZE) -> Path:
    """Train a byte-level BPE on a small corpus and save it as a transformers tokenizer directory."""
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"  # the Llama-3 names
    # CSM's own tokenizers name two special tokens for audio placeholders (Llama-3 reserves their ids).
    audio, audio_eos = "<|AUDIO|>", "<|audio_eos|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bos, eos, audio, audio_eos],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   additional_special_tokens=[audio, audio_eos])
    directory = Path(directory)
    fast.save_pretrained(str(directory))
    return directory


def make_mimi(directory: str | Path, seed: int = 0) -> Path:
    """A small random MimiModel saved by transformers, like kyutai/mimi, with filled codebooks so that
    different audio gets different codes (a fresh codebook maps every frame to code 0)."""
    from transformers import MimiModel

    torch.manual_seed(seed)
    mimi = MimiModel(tiny_hf_mimi_config())
    with torch.no_grad():
        for name, buf in mimi.named_buffers():
            if name.endswith("codebook.embed_sum"):
                buf.normal_(0.0, 0.01)  # the scale of the small encoder's latents
            elif name.endswith("codebook.cluster_usage") or name.endswith("codebook.initialized"):
                buf.fill_(1.0)
    directory = Path(directory)
    mimi.save_pretrained(str(directory))
    return directory


def make_csm(directory: str | Path, args: ModelArgs = TINY_MODEL_ARGS, seed: int = 0) -> Path:
    """Save a randomly initialised CSM in the official layout."""
    torch.manual_seed(seed)
    return save_pretrained(CSM(args), directory)


def make_all(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """All assets under one directory: the model (official layout), the text tokenizer and Mimi (MimiModel)."""
    directory = Path(directory)
    return {
        "model": make_csm(directory / "csm-tiny", seed=seed),
        "text_tokenizer": make_text_tokenizer(directory / "tokenizer"),
        "mimi": make_mimi(directory / "mimi", seed=seed),
    }


# --------------------------------------------------------------------------- the transformers layout

TINY_HF_ROPE = {  # CSM's Llama-3 RoPE scaling as the official transformers checkpoint writes it
    "backbone": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 0.125, "high_freq_factor": 0.5,
                 "original_max_position_embeddings": 1024},
    "decoder": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1 / 512, "high_freq_factor": 1 / 128,
                "original_max_position_embeddings": 16},
}
# The official transformers chat template's behaviour, for the fixture: BOS [speaker]text EOS per turn.
TINY_CHAT_TEMPLATE = ("{%- for m in messages -%}{{- bos_token + '[' + m['role'] + ']' + "
                      "m['content'][0]['text'] + eos_token -}}"
                      "{%- if m['content'] | length > 1 -%}{{- '<|AUDIO|><|audio_eos|>' -}}{%- endif -%}{%- endfor -%}")


def tiny_hf_mimi_config():
    """transformers' MimiConfig shrunk (24 kHz in, 12.5 Hz out, 32 codebooks of 2048)."""
    from transformers import MimiConfig

    return MimiConfig(hidden_size=32, num_filters=4, codebook_dim=16, num_hidden_layers=1, intermediate_size=64,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                      vector_quantization_hidden_dimension=16,
                      upsample_groups=32)


def tiny_hf_config(args: ModelArgs = TINY_MODEL_ARGS, **overrides):
    """A CsmConfig of the tiny dimensions, written field by field as a user of transformers would."""
    from transformers import CsmConfig, CsmDepthDecoderConfig

    b, d = args.backbone, args.decoder
    decoder = CsmDepthDecoderConfig(num_codebooks=args.audio_num_codebooks, backbone_hidden_size=b.embed_dim,
                                    vocab_size=args.audio_vocab_size, hidden_size=d.embed_dim,
                                    intermediate_size=d.intermediate_dim, num_hidden_layers=d.num_layers,
                                    num_attention_heads=d.num_heads, num_key_value_heads=d.num_kv_heads,
                                    max_position_embeddings=args.audio_num_codebooks + 1,
                                    rope_scaling=dict(TINY_HF_ROPE["decoder"]))
    values = dict(num_codebooks=args.audio_num_codebooks, vocab_size=args.audio_vocab_size,
                  text_vocab_size=args.text_vocab_size, hidden_size=b.embed_dim, intermediate_size=b.intermediate_dim,
                  num_hidden_layers=b.num_layers, num_attention_heads=b.num_heads, num_key_value_heads=b.num_kv_heads,
                  max_position_embeddings=b.max_seq_len, depth_decoder_config=decoder,
                  codec_config=tiny_hf_mimi_config(),
                  rope_scaling=dict(TINY_HF_ROPE["backbone"]), bos_token_id=0, pad_token_id=2, audio_token_id=2,
                  audio_eos_token_id=3)
    values.update(overrides)
    return CsmConfig(**values)


def make_hf_csm(directory: str | Path, seed: int = 0, dtype=torch.float32, tokenizer_dir: str | Path | None = None,
                **save_kwargs) -> Path:
    """A randomly initialised CsmForConditionalGeneration saved by transformers (plus tokenizer and processor),
    with codebook ids 2048-2050 made unlikely so greedy decoding never picks codes Mimi cannot decode."""
    from transformers import CsmForConditionalGeneration, CsmProcessor, EncodecFeatureExtractor, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    model = CsmForConditionalGeneration(tiny_hf_config()).to(dtype)
    with torch.no_grad():
        model.lm_head.weight[2048:] = 0
        model.depth_decoder.codebooks_head.weight[..., 2048:] = 0
    directory = Path(directory)
    model.save_pretrained(str(directory), **save_kwargs)
    if tokenizer_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            tok = PreTrainedTokenizerFast.from_pretrained(str(make_text_tokenizer(tmp)))
    else:
        tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token}:0 $A:0 {tok.eos_token}:0", special_tokens=[(tok.bos_token, tok.bos_token_id),
                                                                          (tok.eos_token, tok.eos_token_id)])
    tok.pad_token = tok.eos_token  # as the official transformers tokenizer has it
    features = EncodecFeatureExtractor(feature_size=1, sampling_rate=24000)
    CsmProcessor(feature_extractor=features, tokenizer=tok,
                 chat_template=TINY_CHAT_TEMPLATE).save_pretrained(str(directory))
    return directory


# --------------------------------------------------------------------------- judges for the quality evaluation

WHISPER_LANGUAGES = ("en", "de", "fr", "es")


def make_whisper(directory: str | Path, seed: int = 0) -> Path:
    """A tiny random WhisperForConditionalGeneration with its processor, saved by transformers like
    openai/whisper-*: a byte-level BPE vocabulary with Whisper's special tokens and a multilingual
    generation config (language and task tokens), so the ASR pipeline runs it as it runs the real one.
    Its transcripts are gibberish."""
    import json
    import unicodedata

    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor, WhisperTokenizer)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(_CORPUS.splitlines() * 4, trainers.BpeTrainer(
        vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    eot = "<|endoftext|>"
    specials = ["<|startoftranscript|>", *[f"<|{lang}|>" for lang in WHISPER_LANGUAGES], "<|translate|>",
                "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    vocab = {eot: 0, **{t: i + 1 for t, i in state["vocab"].items()}}
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges, pad_token=eot)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in [eot, *specials]}
    # Byte tokens that decode to control characters are never emitted (the real Whisper never writes them, and a
    # transcript of them counts as empty), so the random model's gibberish is printable gibberish.
    control = [i for i in range(len(tokenizer))
               if any(unicodedata.category(ch) == "Cc" for ch in tokenizer.decode([i]))]
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                           max_target_positions=64, pad_token_id=ids[eot], bos_token_id=ids[eot], eos_token_id=ids[eot],
                           decoder_start_token_id=ids["<|startoftranscript|>"])
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], bos_token_id=ids[eot], eos_token_id=ids[eot],
        pad_token_id=ids[eot], max_length=24, is_multilingual=True, begin_suppress_tokens=[], suppress_tokens=control,
        no_timestamps_token_id=ids["<|notimestamps|>"],
        lang_to_id={f"<|{lang}|>": ids[f"<|{lang}|>"] for lang in WHISPER_LANGUAGES},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]})
    directory = Path(directory)
    model.save_pretrained(str(directory))
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80),
                     tokenizer=tokenizer).save_pretrained(str(directory))
    return directory


def make_wavlm(directory: str | Path, seed: int = 0) -> Path:
    """A tiny random WavLMForXVector with its feature extractor, saved by transformers like
    microsoft/wavlm-base-plus-sv (16 kHz in, one speaker embedding out)."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    config = WavLMConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2, tdnn_dim=(16, 16), tdnn_kernel=(3, 1), tdnn_dilation=(1, 1),
                         xvector_output_dim=8, num_buckets=32, max_bucket_distance=64)
    torch.manual_seed(seed)
    directory = Path(directory)
    WavLMForXVector(config).save_pretrained(str(directory))
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(str(directory))
    return directory


def make_judges(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """The tiny ASR and speaker models an evaluation loads (`asr`, `speaker_model`)."""
    directory = Path(directory)
    return {"asr": make_whisper(directory / "whisper-tiny-random", seed),
            "speaker_model": make_wavlm(directory / "wavlm-tiny-random", seed)}


# --------------------------------------------------------------------------- a long recording


def make_long_recording(path: str | Path, clips: list[str | Path], gap: float = 1.0) -> list[tuple[float, float]]:
    """Clips one after another with `gap` seconds of silence around each, as one 24 kHz wav (what prepare.py
    cuts up); returns each clip's (start, end) in seconds."""
    rate = 24000
    silence = np.zeros(int(gap * rate), np.float32)
    parts, bounds, t = [silence], [], gap
    for clip in clips:
        audio = read_audio(clip)
        parts += [audio, silence]
        bounds.append((t, t + len(audio) / rate))
        t += len(audio) / rate + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.concatenate(parts), rate)
    return bounds


def make_token_file(path, n_train=12, n_val=4, seed=0, codebooks=32, audio_frames=(6, 14), text_len=(3, 8),
                    text_vocab=400, audio_dtype="int16", attrs=True, speakers=0, version=token_file.FORMAT_VERSION):
    """A token file of random codes and text ids, written by token_file.py as pretokenize.py writes it;
    `version=1` gives this tool's earlier format, and `attrs=False` with `audio_dtype="int32"` a file like the
    original tool's. With `speakers`, rows also carry conversations (row i in conversation "c{i % 3}", turn i)
    and random speakers below that."""
    rng = np.random.default_rng(seed)
    meta = dict(codebooks=codebooks, sample_rate=24000, frame_rate=12.5) if attrs else None
    with token_file.write_token_file(path, meta, num_codebooks=codebooks, audio_dtype=audio_dtype,
                                     version=version) as out:
        for split, n in (("train", n_train), ("val", n_val)):
            if n == 0:
                continue
            audio, text = [], []
            for _ in range(n):
                frames = int(rng.integers(*audio_frames, endpoint=True))
                t = int(rng.integers(*text_len, endpoint=True))
                audio.append(rng.integers(0, 2048, size=codebooks * frames).astype(audio_dtype))
                text.append(np.concatenate([[0], rng.integers(2, text_vocab, size=t - 2), [1]]).astype("int32"))
            turns = ([f"c{i % 3}" for i in range(n)], np.arange(n, dtype=np.float64),
                     rng.integers(0, speakers, size=n).astype(np.int32)) if speakers else None
            out.write_split(split, audio, text, turns=turns)
    return path
