"""The transformers layout, checked against transformers itself (the second opinion).

Fixtures in that layout are built and saved by transformers (`tiny_assets.make_hf_csm`), never by this
project's converter, so a test cannot agree with a bug in it. Everything runs in fp32 on CPU.
"""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import export
from csm.data import tiny_assets
from csm.model import conversions
from csm.model import weights
from conftest import ROOT, write_token_file
from csm.model.csm_model import embed_frames
from csm.data.frames import next_input_frames, text_frames
from csm.training.loss import decoder_logits
from csm.model.tokenization import encode_text, load_text_tokenizer
from csm.system.errors import UserError

K = 32


def hf_model(directory):
    from transformers import CsmForConditionalGeneration

    model, info = CsmForConditionalGeneration.from_pretrained(str(directory), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # lists in transformers 4, sets in 5
    return model.eval()


def codebook0_logits_ours(model, ids):
    tokens, mask = text_frames(ids, K)
    with torch.no_grad():
        return model.codebook0_head(model.backbone(embed_frames(model, tokens[None], mask[None])))


def greedy_frames_ours(model, ids, n):
    """n frames sampled with top-1 (greedy) through the KV caches."""
    model.eval()
    tokens, mask = text_frames(ids, K)
    tokens, mask, pos = tokens[None], mask[None], torch.arange(len(ids))[None]
    model.setup_caches(1)
    frames = []
    with torch.no_grad():
        for _ in range(n):
            frame = model.generate_frame(tokens, mask, pos, 1.0, 1)
            frames.append(frame)
            tokens, mask = next_input_frames(frame)
            pos = pos[:, -1:] + 1
    model.remove_caches()
    return torch.stack(frames, dim=1)


def assert_same_model(hf, ours, ids):
    """transformers' and our codebook-0 logits, depth-decoder logits and greedy frames agree."""
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        theirs = hf(input_ids=ids_t).logits
    torch.testing.assert_close(codebook0_logits_ours(ours, ids), theirs, rtol=0, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, ours.config.backbone.embed_dim, generator=g)
    codes = torch.randint(0, 2048, (3, K), generator=g)
    with torch.no_grad():
        placeholder_first = torch.cat([torch.zeros(3, 1, dtype=torch.long), codes[:, :-1]], dim=1)
        theirs = hf.depth_decoder(input_ids=placeholder_first, backbone_last_hidden_state=h).logits
        torch.testing.assert_close(decoder_logits(ours, h, codes), theirs, rtol=0, atol=1e-5)
        hf_frames = hf.generate(input_ids=ids_t, max_new_tokens=4, do_sample=False, depth_decoder_do_sample=False)
    assert torch.equal(greedy_frames_ours(ours, ids, 4).long(), hf_frames.long())


def test_a_transformers_checkpoint_loads_as_the_same_model(hf_dir, text_tokenizer):
    ours = weights.load_model(hf_dir)
    assert ours.config.backbone_flavor == "llama-tiny"  # dimensions recognised from the CsmConfig
    assert_same_model(hf_model(hf_dir), ours, encode_text(text_tokenizer, "Hello there.", 0))


def test_export_to_transformers_gives_the_same_model_and_converts_back_bit_exactly(assets, hf_dir, tmp_path,
                                                                                   text_tokenizer):
    model = weights.load_model(assets["model"])
    with torch.no_grad():  # greedy decoding must not depend on ids 2048-2050, which transformers does not mask
        model.codebook0_head.weight[2048:] = 0
        model.audio_head[..., 2048:] = 0
    src = weights.save_pretrained(model, tmp_path / "src")
    out = tmp_path / "hf"
    assert export.main(["--model", str(src), "--to", "hf", "--output", str(out), "--codec", str(hf_dir),
                        "--text_tokenizer", str(assets["text_tokenizer"])]) == 0
    hf = hf_model(out)
    assert_same_model(hf, model, encode_text(text_tokenizer, "Hi, how are you?", 1))
    for name in ("generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    # The feature extractor's settings: their own file in transformers 4, processor_config.json in 5.
    assert (out / "preprocessor_config.json").is_file() or (out / "processor_config.json").is_file()
    # The processor makes the inputs, and the exported Mimi turns the codes into audio.
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(out))
    inputs = processor(["[1]Hi, how are you?"], add_special_tokens=True)
    with torch.no_grad():
        audio = hf.generate(**inputs, max_new_tokens=3, do_sample=False,
                            depth_decoder_do_sample=False, output_audio=True)
    assert audio[0].shape == (3 * 1920,) and audio[0].abs().sum() > 0
    # Back to ours, and to the official layout: the very same tensors.
    back = weights.load_model(out, dtype=None)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    assert export.main(["--model", str(out), "--to", "official", "--output", str(tmp_path / "official")]) == 0
    official = load_file(str(tmp_path / "official" / "model.safetensors"))
    assert all(torch.equal(official[k], v) for k, v in model.state_dict().items())


def test_bf16_is_kept_exactly(tmp_path, assets):
    directory = tiny_assets.make_hf_csm(tmp_path / "bf16", dtype=torch.bfloat16, tokenizer_dir=assets["text_tokenizer"])
    stored = load_file(str(directory / "model.safetensors"))
    model = weights.load_model(directory, dtype=None)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert torch.equal(model.codebook0_head.weight, stored["lm_head.weight"])
    out = tmp_path / "again"
    export.main(["--model", str(directory), "--to", "hf", "--output", str(out)])  # its own codec and tokenizer
    again = load_file(str(out / "model.safetensors"))
    for key, value in stored.items():
        if key in again:
            assert again[key].dtype == torch.bfloat16 and torch.equal(again[key], value), key
    # Up-cast only where asked: the training default is fp32.
    assert next(weights.load_model(directory).parameters()).dtype == torch.float32


def test_a_sharded_transformers_directory_loads(tmp_path, hf_dir, assets):
    sharded = tiny_assets.make_hf_csm(tmp_path / "sharded", max_shard_size="5MB",
                                      tokenizer_dir=assets["text_tokenizer"])
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = weights.load_model(sharded), weights.load_model(hf_dir)  # same seed, so the same weights
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def copy_with_weights(src, dst, change):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_two_different_audio_tables_are_refused(hf_dir, tmp_path):
    def differ(t):
        t["backbone_model.embed_tokens.embed_audio_tokens.weight"] = t["depth_decoder.model.embed_tokens.weight"] + 1

    bad = copy_with_weights(hf_dir, tmp_path / "bad", differ)
    with pytest.raises(UserError, match="audio embedding table and the depth decoder's copy.*differ"):
        weights.load_model(bad)

    def same(t):
        decoder_table = t["depth_decoder.model.embed_tokens.weight"]
        t["backbone_model.embed_tokens.embed_audio_tokens.weight"] = decoder_table.clone()

    weights.load_model(copy_with_weights(hf_dir, tmp_path / "both", same))  # both present and equal: fine


def edited_config(hf_dir, tmp_path, name, edit):
    dst = tmp_path / name
    shutil.copytree(hf_dir, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def rope_of(config: dict) -> dict:
    """The RoPE settings of a saved config: rope_scaling (transformers 4) or rope_parameters (5)."""
    return config.get("rope_scaling") or config["rope_parameters"]


def as_from_defaults(config: dict) -> None:
    """What CsmConfig() from defaults writes: no scaling (4), or default-type parameters (5)."""
    config["rope_scaling"] = None
    if "rope_parameters" in config:
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}


@pytest.mark.parametrize("name,edit,message", [
    ("defaults", as_from_defaults, "no rope_scaling.*different model"),
    ("rope", lambda c: rope_of(c).update(low_freq_factor=1.0), "not CSM's Llama-3 scaling"),
    ("head_dim", lambda c: c.update(head_dim=8), "head_dim 8 x 4 heads != hidden_size 64"),
    ("act", lambda c: c["depth_decoder_config"].update(hidden_act="gelu"), "hidden_act='gelu'"),
    ("nodecoder", lambda c: c.pop("depth_decoder_config"), "no depth_decoder_config"),
])
def test_unfamiliar_config_values_are_refused(hf_dir, tmp_path, name, edit, message):
    with pytest.raises(UserError, match=message):
        weights.load_model(edited_config(hf_dir, tmp_path, name, edit))


def test_a_model_of_any_size_loads_and_round_trips(tmp_path, assets):
    """Dimensions that match no named flavor still load, and our own save keeps them."""
    from transformers import CsmForConditionalGeneration

    config = tiny_assets.tiny_hf_config(num_hidden_layers=3, hidden_size=48, num_attention_heads=6,
                                        intermediate_size=96)
    config.depth_decoder_config.backbone_hidden_size = 48
    torch.manual_seed(0)
    CsmForConditionalGeneration(config).save_pretrained(str(tmp_path / "odd"))
    model = weights.load_model(tmp_path / "odd")
    assert model.config.backbone_flavor == "custom" and model.config.backbone.num_layers == 3
    saved = weights.save_pretrained(model, tmp_path / "ours")
    assert json.loads((saved / "config.json").read_text())["backbone"]["num_heads"] == 6
    again = weights.load_model(saved)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_token_ids_match_the_csm_processor_and_chat_template(hf_dir, assets, tmp_path):
    """BOS + [speaker]text + EOS, whichever way the text is tokenized."""
    from transformers import AutoProcessor

    from csm.model.hf_export import CHAT_TEMPLATE, csm_tokenizer

    tok = load_text_tokenizer(str(hf_dir))  # the model's own tokenizer files
    processor = AutoProcessor.from_pretrained(str(hf_dir))
    for text, speaker in (("Hello there.", 3), ("What time is it?", 0), ("Numbers 0 1 2.", 999)):
        ours = encode_text(tok, text, speaker)
        assert processor(f"[{speaker}]{text}", add_special_tokens=True)["input_ids"][0].tolist() == ours
        assert processor(f"<|begin_of_text|>[{speaker}]{text}<|end_of_text|>")["input_ids"][0].tolist() == ours
        assert encode_text(load_text_tokenizer(str(assets["text_tokenizer"])), text, speaker) == ours
    # The chat template this project exports renders turns the same way.
    conversation = [{"role": "1", "content": [{"type": "text", "text": "Hi."}, {"type": "audio", "path": "a.wav"}]},
                    {"role": "0", "content": [{"type": "text", "text": "Hello there."}]}]
    tokenizer = csm_tokenizer(str(assets["text_tokenizer"]))
    rendered = tokenizer.apply_chat_template(conversation, chat_template=CHAT_TEMPLATE, tokenize=False)
    assert rendered == ("<|begin_of_text|>[1]Hi.<|end_of_text|><|AUDIO|><|audio_eos|>"
                        "<|begin_of_text|>[0]Hello there.<|end_of_text|>")
    ids = tokenizer.apply_chat_template(conversation[1:], chat_template=CHAT_TEMPLATE, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
    assert ids == encode_text(tok, "Hello there.", 0)
    with pytest.raises(Exception, match="speaker id"):
        tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}]}],
                                      chat_template=CHAT_TEMPLATE, tokenize=False)


def test_llama3_reserved_ids_become_the_audio_tokens(tmp_path):
    """Llama-3.2's tokenizer has no <|AUDIO|>: its reserved ids 128002/128003 are named so on export."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from csm.model.hf_export import csm_tokenizer

    vocab = {f"w{i}": i for i in range(128000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>"]
    tok.add_special_tokens(specials)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1]).save_pretrained(
        str(tmp_path / "llama"))
    csm = csm_tokenizer(str(tmp_path / "llama"))
    assert csm.convert_tokens_to_ids(["<|AUDIO|>", "<|audio_eos|>"]) == [128002, 128003]
    assert csm("w5 w6")["input_ids"] == [128000, 5, 6, 128001]  # the post-processor wraps in BOS ... EOS


def test_train_from_a_transformers_checkpoint_and_export_hf(hf_dir, assets, tmp_path):
    """CsmForConditionalGeneration.save_pretrained -> train.py --model DIR --export_hf -> best_hf/ loads in
    transformers."""
    data = write_token_file(tmp_path / "d.hdf5", n_train=6, n_val=2)
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--data", str(data), "--output_dir", str(out), "--model", str(hf_dir),
           "--max_steps", "2", "--val_every", "1", "--save_every", "0", "--gen_every", "0", "--batch_size", "3",
           "--learning_rate", "1e-3", "--warmup_steps", "1", "--wandb_mode", "disabled", "--device",
           "cpu", "--export_hf"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("best_hf", "final_hf"):
        hf = hf_model(out / name)
        ours = weights.load_model(out / name.removesuffix("_hf"))
        assert_same_model(hf, ours, [0, 40, 41, 1])
    # best/ and final/ carry the base model's tokenizer, so they need no --text_tokenizer either.
    assert (out / "best" / "tokenizer.json").read_text() == (hf_dir / "tokenizer.json").read_text()
    # The codec came from the base model, untouched.
    base = load_file(str(hf_dir / "model.safetensors"))
    final = load_file(str(out / "final_hf" / "model.safetensors"))
    codec = [k for k in base if k.startswith("codec_model.")]
    assert codec and all(torch.equal(base[k], final[k]) for k in codec)


def test_hub_ids_load_the_transformers_layout_at_a_pinned_revision(hub_cache, assets, tmp_path):
    def files(directory):
        return {p.name: p for p in directory.iterdir() if p.is_file()}

    a = tiny_assets.make_hf_csm(tmp_path / "a", seed=0, tokenizer_dir=assets["text_tokenizer"])
    b = tiny_assets.make_hf_csm(tmp_path / "b", seed=1, tokenizer_dir=assets["text_tokenizer"])
    hub_cache("unsloth/csm-1b", files(a))
    pinned = hub_cache("unsloth/csm-1b", files(b), revision="c" * 40)
    main, old = weights.load_model("unsloth/csm-1b"), weights.load_model("unsloth/csm-1b", revision=pinned)
    assert torch.equal(main.codebook0_head.weight, weights.load_model(a).codebook0_head.weight)
    assert torch.equal(old.codebook0_head.weight, weights.load_model(b).codebook0_head.weight)
    # Its tokenizer files are the default tokenizer: the gated Llama repo is not needed.
    from csm.model.tokenization import resolve_text_tokenizer

    assert (weights.Path(resolve_text_tokenizer(None, "unsloth/csm-1b")) / "tokenizer.json").is_file()
    with pytest.raises(UserError, match="no such revision|cannot be reached"):
        weights.load_model("unsloth/csm-1b", revision="nope")


def test_export_refuses_to_lose_work(assets, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=r"is not empty \(keep.txt\); pass --overwrite"):
        export.main(["--model", str(assets["model"]), "--to", "official", "--output", str(out)])
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match=r"is also an input \(--model"):
        export.main(["--model", str(assets["model"]), "--to", "official", "--output",
                     str(assets["model"]), "--overwrite"])
    with pytest.raises(UserError, match="is a file"):
        export.main(["--model", str(assets["model"]), "--to", "official", "--output", str(out / "keep.txt")])
    with pytest.raises(UserError, match="--max_shard_size"):
        export.main(["--model", str(assets["model"]), "--to", "hf", "--output", str(tmp_path / "x"),
                     "--max_shard_size", "0GB"])
    export.main(["--model", str(assets["model"]), "--to", "official", "--output", str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old directories left behind


def test_export_without_a_codec_says_what_to_pass(assets, tmp_path, hub_cache):
    with pytest.raises(UserError, match="kyutai/mimi"):
        export.main(["--model", str(assets["model"]), "--to", "hf", "--output", str(tmp_path / "x"),
                     "--text_tokenizer", str(assets["text_tokenizer"])])
    assert not (tmp_path / "x").exists()


def test_generate_takes_a_transformers_checkpoint_and_its_own_tokenizer(hf_dir, assets, tmp_path):
    """No --text_tokenizer: the model directory's tokenizer files are used (nothing gated is needed)."""
    import generate

    out = tmp_path / "hi.wav"
    assert generate.main(["--model", str(hf_dir), "--text", "Hello there.", "--output", str(out), "--device", "cpu",
                          "--max_audio_seconds", "0.4", "--mimi_weights", str(assets["mimi"])]) == 0
    assert out.is_file()


def test_export_takes_the_codec_from_a_mimi_model_directory_and_shards(assets, tmp_path):
    """kyutai/mimi's layout (a MimiModel directory) as --codec; its weights land in codec_model.* unchanged.
    Files above --max_shard_size (5GB by default) are split, with the index transformers reads."""
    out = tmp_path / "hf"
    export.main(["--model", str(assets["model"]), "--to", "hf", "--output", str(out), "--codec", str(assets["mimi"]),
                 "--text_tokenizer", str(assets["text_tokenizer"]), "--max_shard_size", "5MB"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf_model(out)
    back = weights.load_model(out)
    original = weights.load_model(assets["model"])
    assert all(torch.equal(back.state_dict()[k], v) for k, v in original.state_dict().items())
    exported = {}
    for name in set(index["weight_map"].values()):
        exported.update(load_file(str(out / name)))
    codec = load_file(str(assets["mimi"] / "model.safetensors"))
    assert all(torch.equal(exported["codec_model." + k], v) for k, v in codec.items())


def test_the_1b_key_map_covers_transformers_exactly():
    """Every tensor of the released 1B model maps to one of CsmForConditionalGeneration's (built by transformers
    at the 1B size, on the meta device) and back, and the q/k permutation inverts exactly."""
    from transformers import CsmConfig, CsmForConditionalGeneration

    from csm.model.csm_model import CSM, ModelArgs

    args = ModelArgs()
    with torch.device("meta"):
        ours = CSM(args).state_dict()
        hf_config = CsmConfig(**conversions.hf_config_from_args(args))
        theirs = CsmForConditionalGeneration(hf_config).state_dict()
    mapped = {conversions.official_key_to_hf(k): tuple(v.shape) for k, v in ours.items()}
    expected = {k: tuple(v.shape) for k, v in theirs.items() if not k.startswith("codec_model.")}
    expected.pop(conversions.HF_TIED_AUDIO)
    assert mapped == expected
    assert all(conversions.hf_key_to_official(conversions.official_key_to_hf(k)) == k for k in ours)
    w = torch.randn(512, 2048)
    assert torch.equal(conversions.rope_rows_from_hf(conversions.rope_rows_to_hf(w, 8), 8), w)
    assert not torch.equal(conversions.rope_rows_to_hf(w, 8), w)
