"""LoRA through peft and partial freezing: training, frozen weights untouched, small checkpoints, merged
weights equal to the unmerged model, adapters in and out (ours, and a transformers CSM's built by peft
itself), and the config and command-line edges."""
import json

import pytest
import torch
from safetensors.torch import load_file

from csm.model import adapters
from csm.training import config
from csm.training import training
from csm.model import conversions
from csm.model import weights
from conftest import write_token_file
from conftest import assert_clear_error, cli
from test_interop import assert_same_model, codebook0_logits_ours, hf_model
from csm.model.tokenization import encode_text


def cfg_for(assets, **overrides):
    values = dict(model=str(assets["model"]), text_tokenizer=str(assets["text_tokenizer"]),
                  mimi_weights=str(assets["mimi"]), batch_size=4, learning_rate=3e-3, warmup_steps=2, max_steps=6,
                  val_every=3, save_every=3, gen_every=0, log_every=1, wandb_mode="disabled", precision="fp32", seed=0)
    values.update(overrides)
    return config.make_config(values)


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_file(tmp_path_factory.mktemp("adapters") / "d.hdf5", n_train=8, n_val=2, audio_frames=(4, 6))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, assets, data):
    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = cfg_for(assets, finetune="lora", lora_rank=4, max_steps=30, learning_rate=1e-2, lr_decay="constant",
                  lora_modules_to_save=["codebook0_head"], decoder_fraction=1.0, val_every=15, save_every=15,
                  export_hf=True, export_codec=str(assets["mimi"]))
    training.train(cfg, data, out, device="cpu", progress=False)
    return out


def test_a_lora_run_trains_and_keeps_the_base_weights(lora_run, assets):
    curve = losses(lora_run)
    assert curve[-1] < curve[0] - 0.5, curve
    base, _ = weights.read_model_weights(assets["model"])
    final, _ = weights.read_model_weights(lora_run / "final")
    assert final.keys() == base.keys()
    for key in base:
        targeted = any(f".{t}.weight" in key for t in adapters.LORA_TARGETS) or key.startswith("codebook0_head")
        assert torch.equal(final[key], base[key]) != targeted, key  # only adapted or saved modules changed


def test_the_merged_transformers_export_loads_in_transformers(lora_run):
    from transformers import CsmForConditionalGeneration

    _, info = CsmForConditionalGeneration.from_pretrained(str(lora_run / "final_hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours, _ = weights.read_model_weights(lora_run / "final")
    back, _ = weights.read_model_weights(lora_run / "final_hf")
    assert all(torch.equal(ours[k], back[k]) for k in ours)  # the merged weights, in the other layout


def test_merged_weights_are_the_same_function_as_base_plus_adapter(lora_run, assets, text_tokenizer):
    merged = weights.load_model(lora_run / "final")
    unmerged = adapters.load_adapter(weights.load_model(assets["model"]), lora_run / "final_adapter")
    ids = encode_text(text_tokenizer, "Hello there, how are you?", 0)
    torch.testing.assert_close(codebook0_logits_ours(unmerged, ids), codebook0_logits_ours(merged, ids),
                               rtol=1e-4, atol=1e-4)
    config_json = json.loads((lora_run / "final_adapter" / "adapter_config.json").read_text())
    assert config_json["r"] == 4 and config_json["modules_to_save"] == ["codebook0_head"]
    assert set(config_json["target_modules"]) == set(adapters.LORA_TARGETS)


def test_a_lora_checkpoint_is_small_and_not_a_model(lora_run, assets, data, tmp_path):
    full = tmp_path / "full"
    training.train(cfg_for(assets, max_steps=2, warmup_steps=1, val_every=0, save_every=2), data, full, device="cpu",
                   progress=False)
    lora_ckpt = lora_run / "checkpoints" / "step_0000030.pt"
    full_ckpt = full / "checkpoints" / "step_0000002.pt"
    ratio = lora_ckpt.stat().st_size / full_ckpt.stat().st_size
    assert ratio < 0.25, ratio  # stated in the README for the tiny test model (with codebook0_head saved whole)
    with pytest.raises(Exception, match="only the weights that trained"):
        weights.load_model(lora_ckpt)


@pytest.mark.parametrize("part", ["backbone", "heads"])
def test_frozen_parts_stay_bitwise_unchanged(assets, data, tmp_path, part):
    out = tmp_path / "run"
    training.train(cfg_for(assets, freeze=[part], max_steps=16, lr_decay="constant", decoder_fraction=1.0), data, out,
                   device="cpu", progress=False)
    curve = losses(out)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.2, curve  # the parts left free still learn
    base, _ = weights.read_model_weights(assets["model"])
    final, _ = weights.read_model_weights(out / "final")
    prefixes = adapters.FREEZABLE[part]
    frozen = [k for k in base if k.split(".")[0] in prefixes]
    assert frozen and all(torch.equal(final[k], base[k]) for k in frozen)
    assert any(not torch.equal(final[k], base[k]) for k in base if k not in frozen)
    assert not (out / "final_adapter").exists()


def test_a_transformers_peft_adapter_loads_onto_the_built_in_model(hf_dir, text_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    hf = hf_model(hf_dir)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                      modules_to_save=["lm_head"],  # B random: a real update
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(hf, lora)
    with torch.no_grad():  # the head saved whole differs from the base's too
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.01)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    ours = adapters.load_adapter(weights.load_model(hf_dir), tmp_path / "adapter")
    ids = encode_text(text_tokenizer, "Hello there, how are you?", 0)
    assert_same_model(peft_model.get_base_model().eval(), ours, ids)
    # Without the adapter the two models differ: the test above is not passing on the base weights alone.
    base = weights.load_model(hf_dir)
    assert not torch.allclose(codebook0_logits_ours(base, ids), codebook0_logits_ours(ours, ids), atol=1e-3)


def test_adapter_key_maps_are_inverses(hf_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(hf_model(hf_dir), LoraConfig(r=2, init_lora_weights=False,
                                                             target_modules=["q_proj", "k_proj", "o_proj"]))
    peft_model.save_pretrained(str(tmp_path / "a"))
    state = {k.removeprefix(adapters.PEFT_PREFIX): v for k,
             v in load_file(str(tmp_path / "a" / "adapter_model.safetensors")).items()}
    args = weights.load_model(hf_dir).config
    ours = conversions.adapter_from_hf(state, args, "test")
    assert all(k.startswith(("backbone.", "decoder.")) for k in ours)
    back = conversions.adapter_to_hf(ours, args)
    # Mimi's layers are left out
    state = {k: v for k, v in state.items() if not k.startswith(conversions.HF_CODEC_PREFIX)}
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_generate_and_evaluate_take_an_adapter(lora_run, assets, tmp_path):
    common = ["--model", assets["model"], "--text_tokenizer", assets["text_tokenizer"],
              "--mimi_weights", assets["mimi"],
              "--device", "cpu"]
    rc, err = cli("generate.py", *common, "--adapter", lora_run / "best_adapter", "--text", "Hi.", "--output",
                  tmp_path / "a.wav", "--max_audio_seconds", 0.3)
    assert rc == 0, err
    rc, err = cli("generate.py", *common, "--adapter", tmp_path, "--text", "Hi.", "--output", tmp_path / "b.wav")
    assert_clear_error(rc, err, "adapter_config.json")
    assert not (tmp_path / "b.wav").exists()


def test_finetune_settings_are_checked_before_any_work(assets, data, tmp_path):
    from csm.system.errors import UserError

    cases = [({"freeze": ["backbon"]}, "valid: text_embeddings"),
             ({"finetune": "lora", "train_from_scratch": True}, "training from scratch"),
             ({"finetune": "lora", "lora_targets": ["q_proj", "wq"]}, "lora_targets"),
             ({"finetune": "lora", "lora_modules_to_save": ["lm_head"]}, "lora_modules_to_save"),
             ({"finetune": "lora", "freeze": ["backbone"]}, "freeze is for finetune: full"),
             ({"freeze": ["backbone", "decoder", "text_embeddings", "audio_embeddings", "projection", "heads"]},
              "nothing to train")]
    for values, message in cases:
        with pytest.raises(UserError, match=message):
            training.train(cfg_for(assets, **values), data, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


def test_resume_refuses_other_finetune_settings(lora_run, assets, data, tmp_path):
    import shutil

    from csm.system.errors import UserError

    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(lora_run / "checkpoints" / "step_0000015.pt", part / "checkpoints")
    for values, message in (({"finetune": "lora", "lora_rank": 2, "lora_modules_to_save": ["codebook0_head"]}, "shape"),
                            ({"finetune": "lora", "lora_rank": 4}, "other parameters"),
                            ({}, "other parameters")):
        with pytest.raises(UserError, match=message):
            training.train(cfg_for(assets, max_steps=30, **values), data, part, device="cpu", resume="auto",
                           progress=False)


def test_sweep_over_lora_rank(assets, data, tmp_path):
    import optuna

    space = tmp_path / "space.yaml"
    space.write_text("lora_rank: {type: categorical, values: [2, 8]}\n")
    out = tmp_path / "sweep"
    rc, err = cli("sweep.py", "--data", data, "--sweep_config", space, "--output_dir", out, "--n_trials", 2,
                  "--n_workers", 1, "--max_steps", 2, "--model", assets["model"], "--wandb_mode", "disabled",
                  "--sampler", "random", "--pruner", "none", "--set", "finetune=lora", "--set", "warmup_steps=1",
                  "--set", "batch_size=4", "--set", "val_every=1")
    assert rc == 0, err
    study = optuna.load_study(study_name="csm-sweep", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert {t.params["lora_rank"] for t in study.trials} <= {2, 8}
    for t in study.trials:
        trial = out / "trials" / f"trial_{t.number:04d}"
        adapter = json.loads((trial / "final_adapter" / "adapter_config.json").read_text())
        assert adapter["r"] == t.params["lora_rank"]
