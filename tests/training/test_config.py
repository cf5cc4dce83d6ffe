"""The typed config: YAML + CLI overrides, validated up front with one clear line."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from csm.training import config
from csm.training.config import TrainConfig
from csm.system.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_configs_hold_the_reference_values():
    ft = config.load_config(ROOT / "configs" / "finetune.yaml")
    assert (ft.batch_size, ft.grad_acc_steps, ft.learning_rate, ft.max_grad_norm, ft.warmup_steps,
            ft.weight_decay, ft.lr_decay, ft.decoder_loss_weight) == (8, 1, 3e-5, 1.3, 1000, 0.002, "linear", 0.5)
    assert not ft.train_from_scratch
    pt = config.load_config(ROOT / "configs" / "pretrain.yaml")
    assert (pt.batch_size, pt.learning_rate, pt.train_from_scratch) == (32, 3e-3, True)


def test_overrides_win_and_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1.0e-4\nbatch_size: 4\n")
    cfg = config.load_config(path, config.parse_set(["learning_rate=3e-5", "lr_decay=cosine", "max_tokens=4096",
                                                     "gen_sentences=[a, b]", "max_steps=null"]))
    assert cfg.learning_rate == 3e-5 and isinstance(cfg.learning_rate, float)
    assert (cfg.batch_size, cfg.lr_decay, cfg.max_tokens, cfg.gen_sentences, cfg.max_steps) == (4, "cosine",
                                                                                                4096, ["a", "b"], None)


@pytest.mark.parametrize("values, message", [
    ({"lr": 1e-4}, r"unknown config key 'lr' in config \(did you mean"),
    ({"learning_rate": "fast"}, "'learning_rate' must be a number, got 'fast'"),
    ({"learning_rate": 0}, "'learning_rate' must be > 0"),
    ({"lr_decay": "step"}, "'lr_decay' must be one of linear, cosine, exponential, constant; got 'step'"),
    ({"batch_size": 2.5}, "'batch_size' must be an integer"),
    ({"train_from_scratch": "maybe"}, "'train_from_scratch' must be true or false"),
    ({"max_seq_len": 4096}, "'max_seq_len' must be <= 2048"),
    ({"precision": "int8"}, "'precision' must be one of auto, bf16, fp16, fp32"),
    ({"backbone_flavor": "llama-7B"}, "'backbone_flavor' must be one of"),
    ({"max_tokens": 100}, "max_tokens .* must be at least max_seq_len"),
    ({"batch_size": None}, "set either batch_size or max_tokens"),
])
def test_bad_values_name_the_key_and_what_is_allowed(values, message):
    with pytest.raises(UserError, match=message):
        config.make_config(values)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        config.load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: [1\n")
    with pytest.raises(UserError, match="not valid YAML"):
        config.load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("learning_rat: 1.0e-4\n")
    with pytest.raises(UserError,
                       match=r"unknown config key 'learning_rat' in .*unknown.yaml \(did you mean 'learning_rate'\?\)"):
        config.load_config(unknown)


def test_saved_config_round_trips(tmp_path):
    cfg = config.make_config({"learning_rate": 1e-3, "lr_decay": "cosine", "gen_sentences": ["x"]})
    config.save_yaml(cfg, tmp_path / "c.yaml")
    assert config.load_config(tmp_path / "c.yaml") == cfg
    assert set(yaml.safe_load((tmp_path / "c.yaml").read_text())) == set(config.CONFIG_KEYS)


def test_cli_bad_config_key_is_one_line_and_exit_2(tmp_path, token_file):
    """Validation happens before any data or model is touched."""
    r = subprocess.run([sys.executable, "train.py", "--data", str(token_file), "--set", "warmup=5",
                        "--output_dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: unknown config key 'warmup'")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_reference_table_lists_every_key():
    table = config.config_reference_markdown()
    for key in config.CONFIG_KEYS:
        assert f"| `{key}` |" in table
    assert len(table.splitlines()) == len(config.CONFIG_KEYS) + 2
    assert TrainConfig().learning_rate == 3e-5
