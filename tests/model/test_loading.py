"""Loading models and tokenizers from every supported source, through the real code paths."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from csm.model import hub
from csm.model import codec
from csm.model import tokenization
from csm.system.errors import UserError
from csm.model import weights
from csm.model.csm_model import CSM
from csm.data.tiny_assets import TINY_MODEL_ARGS

ROOT = Path(__file__).resolve().parents[2]


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_local_hub_layout_round_trip(assets, tmp_path):
    model = weights.load_model(assets["model"])
    assert isinstance(model, CSM) and model.config == TINY_MODEL_ARGS
    out = weights.save_pretrained(model, tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == TINY_MODEL_ARGS.to_dict()
    assert same_weights(weights.load_model(out), model)
    # A bare .safetensors file with its config beside it loads too.
    assert same_weights(weights.load_model(out / "model.safetensors"), model)


def test_hub_id_loads_from_the_cache(assets, hub_cache):
    hub_cache("sesame/csm-1b", {"config.json": assets["model"] / "config.json",
                                "model.safetensors": assets["model"] / "model.safetensors"})
    model = weights.load_model("sesame/csm-1b")
    assert same_weights(model, weights.load_model(assets["model"]))


def test_unreachable_hub_id_is_one_clear_error(hub_cache):
    with pytest.raises(UserError, match="cannot be reached.*local directory"):
        weights.load_model("sesame/csm-1b")


def test_mistyped_relative_path_is_not_reported_as_only_a_hub_miss(hub_cache, tmp_path, monkeypatch):
    """'runs/best' is also a valid hub id; with runs/ present the user most likely mistyped a path."""
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="nor is there a local 'runs/best'"):
        weights.load_model("runs/best")
    with pytest.raises(UserError) as err:
        weights.load_model("sesame/csm-1b")  # no sesame/ folder here: a plain hub miss
    assert "nor is there" not in str(err.value)


def test_project_checkpoint_round_trip(assets, tmp_path):
    model = weights.load_model(assets["model"])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": TINY_MODEL_ARGS.to_dict(), "step": 3}, path)
    assert same_weights(weights.load_model(path), model)


def test_original_repo_checkpoint_loads(assets, tmp_path):
    """The original saved {"model": ..., "args": argparse.Namespace(...), ...} with torch.compile prefixes."""
    model = weights.load_model(assets["model"])
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    ckpt = {
        "model": state,
        "optimizer": {"state": {}, "param_groups": []},
        "config": {"batch_size": 8, "learning_rate": 3e-5},
        "args": argparse.Namespace(output_dir=Path("exp"), n_epochs=5, use_amp=True),
        "effective_step": 10,
        "best_val_loss": 3.2,
    }
    path = tmp_path / "model_bestval.pt"
    torch.save(ckpt, path)
    loaded = weights.load_model(path)  # no config in the file: inferred from the weight shapes
    assert loaded.config == TINY_MODEL_ARGS
    assert same_weights(loaded, model)


def test_mismatched_weights_name_what_differs(assets, tmp_path):
    model = weights.load_model(assets["model"])
    state = model.state_dict()
    state.pop("audio_head")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save({"model": state, "model_args": TINY_MODEL_ARGS.to_dict()}, path)
    with pytest.raises(UserError, match=r"1 missing \(e.g. audio_head\); 1 unexpected \(e.g. extra.weight\)"):
        weights.load_model(path)


def test_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        weights.load_model(str(tmp_path / "nope.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model.safetensors"):
        weights.load_model(tmp_path / "empty")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not read checkpoint"):
        weights.load_model(tmp_path / "junk.pt")


def test_the_removed_official_model_key_says_what_to_do():
    from csm.training import config

    with pytest.raises(UserError, match="official model class was removed.*bit for bit"):
        config.make_config({"official_model": True})


def test_text_tokenizer_wraps_in_bos_eos(text_tokenizer):
    ids = tokenization.encode_text(text_tokenizer, "Hello there.", speaker=3)
    assert ids[0] == text_tokenizer.bos_token_id and ids[-1] == text_tokenizer.eos_token_id
    assert text_tokenizer.decode(ids[1:-1]) == "[3]Hello there."
    assert text_tokenizer.decode(tokenization.encode_text(text_tokenizer, "Hi", None)[1:-1]) == "[999]Hi"


def test_unreachable_text_tokenizer_is_one_clear_error(monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="--text_tokenizer"):
        tokenization.load_text_tokenizer("meta-llama/Llama-3.2-1B")


def test_gated_repo_message_says_how_to_fix():
    from huggingface_hub.errors import GatedRepoError

    message = "Access to model meta-llama/Llama-3.2-1B is restricted."
    try:  # huggingface-hub >= 1 wants the HTTP response the error came with (built here, nothing is sent)
        import httpx2 as httpx
    except ImportError:
        import httpx
    url = "https://huggingface.co/meta-llama/Llama-3.2-1B/resolve/main/config.json"
    try:
        gated = GatedRepoError(message, response=httpx.Response(401, request=httpx.Request("GET", url)))
    except TypeError:
        gated = GatedRepoError(message)
    err = hub.hub_error("text tokenizer", "meta-llama/Llama-3.2-1B", gated, "hint")
    assert "hf auth login" in str(err) and "HF_TOKEN" in str(err)


def test_mimi_loads_from_a_local_directory_with_distinct_codes(mimi):
    t = torch.linspace(0, 1, 24000)
    audio = (0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.05 * torch.randn(24000)).numpy()
    codes = codec.encode_audio(mimi, [audio])[0]
    assert codes.shape == (32, 13)
    assert 0 <= int(codes.min()) and int(codes.max()) < 2048
    assert len(set(codes.flatten().tolist())) > 10  # non-empty codebooks


def test_mimi_default_offline_is_a_clear_error(hub_cache):
    with pytest.raises(UserError, match="--mimi_weights"):
        codec.load_mimi(None)


def test_import_does_no_work():
    """Importing the project needs no clone, no network, no CUDA and leaves sys.path alone."""
    code = ("import importlib, pkgutil, sys; before = list(sys.path); "
            "import csm, dataloaders, utils, train, export; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(csm.__path__, 'csm.')]; "
            "assert sys.path == before; "
            "import torch; assert not torch.cuda.is_initialized()")
    env = {k: v for k, v in os.environ.items() if k not in ("CSM_REPO_PATH", "WANDB_API_KEY")}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=120)
