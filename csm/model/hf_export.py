"""Exporting a model for other code: a transformers `CsmForConditionalGeneration` directory (weights
converted by weights.py, Mimi in the `MimiModel` layout, a processor with tokenizer, chat template and
24 kHz feature extractor, a generation config, shards above 5 GB), or the official layout.
Directories are written beside the target and renamed onto it, so a crash never leaves half of one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from csm.model.codec import DEFAULT_MIMI, MIMI_SAMPLE_RATE
from csm.model.tokenization import load_text_tokenizer
from csm.system.errors import DiskFullError, UserError
from csm.system.outputs import disk_full_error, is_disk_full
from csm.model.weights import parse_size, save_pretrained, save_safetensors
from csm.model.conversions import HF_CODEC_PREFIX, hf_config_from_args, HF_TIED_AUDIO, official_to_hf

DEFAULT_CODEC = DEFAULT_MIMI  # the codec an export gets when the model brings none
AUDIO_TOKEN, AUDIO_EOS_TOKEN = "<|AUDIO|>", "<|audio_eos|>"
LLAMA3_AUDIO_IDS = (128002, 128003)  # reserved Llama-3 ids that CSM's tokenizer names as the two above
MAX_SHARD_SIZE = "5GB"

# Speaker turns as CSM reads them: BOS [speaker]text EOS for every turn, and for a turn that comes
# with its audio, the audio placeholder and the audio EOS after it (the processor fills in the codes).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not (message['role'] is string and message['role'].isdigit()) -%}"
    "{{- raise_exception(\"each message's role is its speaker id as a string of digits, e.g. '0'\") -}}"
    "{%- endif -%}"
    "{%- set texts = message['content'] | selectattr('type', 'equalto', 'text') | list -%}"
    "{%- set audios = message['content'] | selectattr('type', 'equalto', 'audio') | list -%}"
    "{%- if texts | length != 1 or audios | length > 1 -%}"
    "{{- raise_exception('each message holds one text item and at most one audio item') -}}"
    "{%- endif -%}"
    "{%- if not loop.last and audios | length != 1 -%}"
    "{{- raise_exception('every message before the last needs its audio (the context CSM listens to)') -}}"
    "{%- endif -%}"
    "{{- bos_token + '[' + message['role'] + ']' + texts[0]['text'] + eos_token -}}"
    "{%- if audios -%}{{- '" + AUDIO_TOKEN + AUDIO_EOS_TOKEN + "' -}}{%- endif -%}"
    "{%- endfor -%}"
)


# --------------------------------------------------------------------------- output directories


def _replace_dir(tmp: Path, output: Path) -> None:
    """Move a finished temp directory onto `output` (its files fsynced first, so a power loss cannot leave
    empty files under the final name); an old `output` is removed only after the move."""
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    if output.exists():
        os.replace(output, old)
    os.replace(tmp, output)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _built_dir(output: Path) -> Iterator[Path]:
    """A temp directory beside `output` for the body to fill; moved onto `output` when the body succeeds, removed
    when it fails (a full disk is said in one line)."""
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _replace_dir(tmp, output)
    except BaseException as e:
        full = isinstance(e, DiskFullError) or is_disk_full(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:  # named as the output the user gave, not the temp directory
            raise disk_full_error(output, output.parent) from e
        raise


# --------------------------------------------------------------------------- pieces of the transformers directory


def csm_tokenizer(name_or_path: str):
    """A text tokenizer as CSM's transformers repos ship it: the audio placeholder tokens named, and a
    post-processor that wraps a text in BOS ... EOS (so `processor("[0]Hi", add_special_tokens=True)` works)."""
    tok = load_text_tokenizer(name_or_path)
    vocab = tok.get_vocab()
    if AUDIO_TOKEN not in vocab or AUDIO_EOS_TOKEN not in vocab:
        tok = _with_audio_tokens(tok, name_or_path)
    bos, eos = tok.bos_token, tok.eos_token
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos}:0 $A:0 {eos}:0", pair=f"{bos}:0 $A:0 {eos}:0 {bos}:1 $B:1 {eos}:1",
        special_tokens=[(bos, tok.bos_token_id), (eos, tok.eos_token_id)])
    if tok.pad_token is None:
        tok.pad_token = eos
    # CsmForConditionalGeneration takes no token_type_ids; init_kwargs is what save_pretrained writes.
    tok.model_input_names = tok.init_kwargs["model_input_names"] = ["input_ids", "attention_mask"]
    return tok


def _with_audio_tokens(tok, name):
    """Llama-3's tokenizer holds the two ids CSM uses as reserved tokens: rename them in place."""
    import json

    from transformers import PreTrainedTokenizerFast  # transformers' import takes seconds: exports only

    spec = json.loads(tok.backend_tokenizer.to_str())
    renamed = 0
    for entry in spec.get("added_tokens", []):
        for new, wanted in zip((AUDIO_TOKEN, AUDIO_EOS_TOKEN), LLAMA3_AUDIO_IDS):
            if entry["id"] == wanted:
                entry["content"], renamed = new, renamed + 1
    if renamed != 2:
        raise UserError(f"text tokenizer {name!r} has neither {AUDIO_TOKEN}/{AUDIO_EOS_TOKEN} nor Llama-3's reserved "
                        f"ids {LLAMA3_AUDIO_IDS} to name them; export with a CSM tokenizer (--text_tokenizer)")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=tok.bos_token,
                                   eos_token=tok.eos_token, pad_token=tok.pad_token or tok.eos_token,
                                   model_max_length=tok.model_max_length)


def _processor(tokenizer):
    from transformers import CsmProcessor, EncodecFeatureExtractor  # transformers' import takes seconds: exports only

    features = EncodecFeatureExtractor(feature_size=1, sampling_rate=MIMI_SAMPLE_RATE, padding_value=0.0,
                                       return_attention_mask=True)
    return CsmProcessor(feature_extractor=features, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def hf_config(args, codec_config: dict, tokenizer):
    """The CsmConfig of an export: our dimensions, the codec's config, the tokenizer's special ids."""
    from transformers import CsmConfig  # transformers' import takes seconds: exports only

    audio, audio_eos = tokenizer.convert_tokens_to_ids([AUDIO_TOKEN, AUDIO_EOS_TOKEN])
    codec = {k: v for k, v in codec_config.items() if k not in ("transformers_version", "architectures")}
    return CsmConfig(**hf_config_from_args(args), codec_config=codec, bos_token_id=tokenizer.bos_token_id,
                     pad_token_id=audio, audio_token_id=audio, audio_eos_token_id=audio_eos)


def generation_config():
    """Sampling as the official generator does (and generate.py by default): top-k 50, temperature 0.9,
    for the backbone and (depth_decoder_*) the depth decoder; at most 125 frames (10 s)."""
    from transformers import GenerationConfig  # transformers' import takes seconds: exports only

    return GenerationConfig(max_new_tokens=125, do_sample=True, top_k=50, temperature=0.9,
                            depth_decoder_do_sample=True, depth_decoder_top_k=50, depth_decoder_temperature=0.9)


def hf_state_dict(model, codec_weights: dict) -> dict:
    """Every tensor of the export in the checkpoint layout transformers reads (4.x and 5.x alike): ours
    converted, the codec under codec_model.*. Both copies of the audio table are written (as separate
    tensors): transformers ties the backbone's to the depth decoder's on load, so that one must be there."""
    state = official_to_hf(model.state_dict(), model.config)
    state = {k: v.detach().cpu().clone() if k == HF_TIED_AUDIO else v.detach().cpu().contiguous()
             for k, v in state.items()}
    state.update({HF_CODEC_PREFIX + k: v.detach().cpu().contiguous() for k, v in codec_weights.items()})
    return state


# --------------------------------------------------------------------------- exports


def export_transformers(model, output: str | Path, *, tokenizer, codec: tuple[dict, dict],
                        max_shard_size: str = MAX_SHARD_SIZE) -> Path:
    """Write `model` as a transformers CSM directory that `CsmForConditionalGeneration.from_pretrained` and
    `AutoProcessor.from_pretrained` load. `tokenizer` comes from csm_tokenizer, `codec` from find_codec.
    The files are written here, in the checkpoint layout, rather than by a transformers model object, so
    the export does not depend on how a transformers version arranges its modules. The caller owns `output`
    (export.py claims it; a training run writes into its own directory): it is replaced whole."""
    output = Path(output)
    max_bytes = parse_size(max_shard_size)
    config = hf_config(model.config, codec[1], tokenizer)
    config.architectures = ["CsmForConditionalGeneration"]
    # The dtype the weights are stored in (transformers loads them in it with dtype="auto").
    config.torch_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    state = hf_state_dict(model, codec[0])
    with _built_dir(output) as tmp:
        config.save_pretrained(str(tmp))
        generation_config().save_pretrained(str(tmp))
        save_safetensors(state, tmp, max_bytes)
        _processor(tokenizer).save_pretrained(str(tmp))
    return output


def export_official(model, output: str | Path) -> Path:
    """Write `model` in the official layout (config.json + model.safetensors), which the official code loads.
    `output` is replaced whole, as by export_transformers."""
    output = Path(output)
    with _built_dir(output) as tmp:
        save_pretrained(model, tmp)
    return output
