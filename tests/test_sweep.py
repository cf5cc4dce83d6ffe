"""sweep.py on CPU with the tiny model: parallel workers, failures, resume, reports, validation."""
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

import config
import optuna_sweep
import sweep
import train
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]


def base_args(assets, data, out, *extra):
    return ["--data", str(data), "--output_dir", str(out), "--base_config", str(ROOT / "configs" / "finetune.yaml"),
            "--max_steps", "2", "--model", str(assets["model"]), "--wandb_mode", "disabled",
            "--set", "batch_size=4", "--set", "val_every=1", "--set", "warmup_steps=1", "--set", "precision=fp32",
            "--set", f"text_tokenizer={assets['text_tokenizer']}", "--set", f"mimi_weights={assets['mimi']}",
            "--sampler", "random", *extra]


def load(out):
    return optuna.load_study(study_name="csm-sweep", storage=f"sqlite:///{(Path(out) / 'study.db').resolve()}")


def write_space(path, text):
    path.write_text(text)
    return path


@pytest.mark.slow
def test_sweep_with_two_workers_a_failing_trial_and_resume(assets, token_file, tmp_path):
    out = tmp_path / "sweep"
    # One categorical choice points at a model that does not exist: those trials fail, the sweep goes on.
    space = write_space(tmp_path / "space.yaml", f"""
learning_rate:
  - type: float
  - log: true
  - min: 1.0e-4
  - max: 1.0e-2
model:
  type: categorical
  values: ["{assets['model']}", "{tmp_path / 'missing.pt'}"]
""")
    assert sweep.main(base_args(assets, token_file, out, "--sweep_config", str(space), "--n_trials", "3",
                                "--n_workers", "2", "--seed", "1")) == 0
    study = load(out)
    assert len(study.trials) == 3
    states = [t.state for t in study.trials]
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    # With --seed 1, worker 0's first draw is the real model and worker 1's the missing one.
    assert TrialState.COMPLETE in states and failed
    for t in failed:
        assert "not found" in t.user_attrs["fail_reason"]
    assert {t.user_attrs["pid"] for t in study.trials} and len({t.user_attrs["pid"] for t in study.trials}) <= 2
    for t in study.trials:
        if t.state == TrialState.COMPLETE:
            assert t.intermediate_values  # val losses were reported for the pruner

    # Reports
    assert (out / "trials.csv").read_text().count("\n") == 4
    best = config.load_config(out / "best_config.yaml")
    assert best.learning_rate == pytest.approx(study.best_params["learning_rate"])
    assert (out / "optimization_history.html").exists() and (out / "parallel_coordinate.html").exists()

    # The same command again continues the study; a larger --n_trials adds only the difference.
    assert sweep.main(base_args(assets, token_file, out, "--sweep_config", str(space), "--n_trials", "3",
                                "--n_workers", "2")) == 0
    assert len(load(out).trials) == 3
    assert sweep.main(base_args(assets, token_file, out, "--sweep_config", str(space), "--n_trials", "4",
                                "--n_workers", "2")) == 0
    assert len(load(out).trials) == 4


def test_best_config_trains(assets, token_file, tmp_path):
    """best_config.yaml is a full training config that train.py takes as --config."""
    study = optuna.create_study(direction="minimize")
    distributions = {"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                     "lr_decay": optuna.distributions.CategoricalDistribution(["linear", "cosine"])}
    study.add_trial(optuna.trial.create_trial(params={"learning_rate": 2e-3, "lr_decay": "cosine"},
                                              distributions=distributions,
                                              value=1.0))
    base = config.make_config({"model": str(assets["model"]), "max_steps": 2, "batch_size": 4, "val_every": 0,
                               "gen_every": 0, "wandb_mode": "disabled", "precision": "fp32",
                               "warmup_steps": 1}).to_dict()
    optuna_sweep.write_reports(study, tmp_path, base)
    assert train.main(["--data", str(token_file), "--config", str(tmp_path / "best_config.yaml"),
                       "--output_dir", str(tmp_path / "run"), "--device", "cpu"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["learning_rate"] == 2e-3 and saved["lr_decay"] == "cosine"


@pytest.mark.parametrize("text, message", [
    ("lr:\n  type: float\n  min: 1\n  max: 2\n", r"unknown config key 'lr' .*did you mean 'learning_rate'"),
    ("learning_rate:\n  type: uniform\n", "type must be one of categorical, float, int, fixed"),
    ("learning_rate:\n  type: float\n  min: 1.0e-2\n  max: 1.0e-4\n", "min .* is greater than max"),
    ("learning_rate:\n  type: float\n  min: 0\n  max: 1\n  log: true\n", "a log range needs min > 0"),
    ("lr_decay:\n  type: categorical\n  values: [linear, step]\n", "'lr_decay' can produce a bad value: .*got 'step'"),
    ("batch_size:\n  type: categorical\n", "needs a non-empty list 'values'"),
    ("batch_size:\n  type: int\n  min: 1\n  max: 4\n  steps: 2\n", r"unknown field\(s\) steps"),
    ("learning_rate: [1\n", "not valid YAML"),
])
def test_bad_sweep_yaml_is_one_clear_message(tmp_path, text, message):
    path = write_space(tmp_path / "s.yaml", text)
    with pytest.raises(UserError, match=message):
        optuna_sweep.load_space(path, config.TrainConfig().to_dict())


def test_shipped_space_is_valid_and_matches_the_reference():
    space = optuna_sweep.load_space(ROOT / "configs" / "sweep.yaml", config.TrainConfig().to_dict())
    assert space["batch_size"]["values"] == [8, 16, 32]
    assert (space["learning_rate"]["min"], space["learning_rate"]["max"],
            space["learning_rate"]["log"]) == (1e-6, 1e-2, True)
    assert space["lr_decay"]["values"] == ["linear", "cosine", "constant", "exponential"]
    assert (space["warmup_steps"]["min"], space["warmup_steps"]["max"]) == (0, 1000)
    assert (space["grad_acc_steps"]["min"], space["grad_acc_steps"]["max"]) == (1, 3)


def test_sweep_without_val_split_needs_train_loss_metric(assets, tmp_path):
    from conftest import write_token_file

    data = write_token_file(tmp_path / "noval.hdf5", n_val=0)
    with pytest.raises(UserError, match="no 'val' split"):
        sweep.main(base_args(assets, data, tmp_path / "s", "--sweep_config", str(ROOT / "configs" / "sweep.yaml")))


def test_a_trial_whose_process_died_before_naming_itself_is_failed_and_redone(tmp_path, monkeypatch):
    """A process killed between creating its trial and writing its host and pid leaves a RUNNING trial that says
    nothing of whose it is; once older than ORPHAN_AFTER it is failed as interrupted and no longer counts."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    orphan = study.ask()  # RUNNING, no attributes: its process died here
    named = study.ask()
    named.set_user_attr("host", "another-machine")
    named.set_user_attr("pid", 1)
    assert optuna_sweep.mark_interrupted_trials(study) == 0  # too young to judge; another host's is not ours
    monkeypatch.setattr(optuna_sweep, "ORPHAN_AFTER", 0.0)
    assert optuna_sweep.mark_interrupted_trials(study) == 1
    states = {t.number: t.state for t in study.trials}
    assert states == {orphan.number: TrialState.FAIL, named.number: TrialState.RUNNING}
    assert optuna_sweep.budget_used(study) == 1
