"""sweep.py on CPU with the tiny model: parallel workers, failures, resume, reports, validation."""
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from csm.training import config
from csm.training import optuna_sweep
import sweep
import train
from csm.system.errors import UserError
from conftest import write_token_file

ROOT = Path(__file__).resolve().parents[2]


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
    # One page for the study: every trial with its state and parameters, a completed one linked to its run's curves.
    page = (out / "report.html").read_text()
    assert page.count("<td>FAIL</td>") == len(failed) and page.count("<td>COMPLETE</td>") == 3 - len(failed)
    done = next(t.number for t in study.trials if t.state == TrialState.COMPLETE)
    assert f'<a href="#run-sweep-trial_{done:04d}">{done}</a>' in page and f'id="run-sweep-trial_{done:04d}"' in page
    assert 'data-key="sweep: optimization history"' in page

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


def test_storage_that_cannot_be_shared_or_would_be_lost_is_refused_before_any_work(assets, token_file, tmp_path):
    """In-memory SQLite (the workers' trials vanished and the sweep reported 0), a study file inside --output_dir
    (--overwrite deleted a journal that may hold other studies), a folder that cannot be written: one line each,
    and the output and the study file are left as they were."""
    import os

    out = tmp_path / "sw"
    out.mkdir()
    journal = out / "journal.log"
    journal.write_text("other studies\n")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    cases = [("sqlite://", "in-memory SQLite database is not shared"),
             ("sqlite:///:memory:", "in-memory SQLite database is not shared"),
             (str(journal), "lies inside --output_dir"),
             (f"sqlite:///{out}/study2.db", "lies inside --output_dir"),
             (str(tmp_path / "nofolder" / "j.log"), "the folder .* does not exist")]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((str(locked / "j.log"), "cannot write in"))
    for storage, message in cases:
        with pytest.raises(UserError, match=message):
            sweep.main(base_args(assets, token_file, out, "--storage", storage, "--overwrite",
                                 "--sweep_config", str(ROOT / "configs" / "sweep.yaml")))
    assert journal.read_text() == "other studies\n" and sorted(p.name for p in out.iterdir()) == ["journal.log"]


@pytest.mark.parametrize("url", ["postgresql://sweeper:se@cret@127.0.0.1:1/db",
                                 "postgresql://sweeper:secret@host:abc/db",
                                 "postgresql://sweeper:secret@[::1:5432/db",
                                 "postgresql://sweeper:sec:ret@127.0.0.1:1/db",
                                 "postgresql+psycopg://sweeper:secret@127.0.0.1:1/db", "mysql://sweeper:secret@h/db",
                                 "postgresql://sweeper:s%40cret@127.0.0.1:1/db"])
def test_a_storage_url_is_never_shown_with_its_password(url):
    """Whatever the URL's shape: an unencoded @ or : in the password, a port that is not a number, a broken IPv6
    host, another driver. The error is one line; no part of the password is in it."""
    with pytest.raises(UserError) as e:
        optuna_sweep.storage_for(url)
    message = str(e.value)
    assert len(message.splitlines()) == 1 and "sweeper" in message
    assert not any(part in message for part in ("secret", "se@cret", "cret", "s%40", "ret@"))
    assert optuna_sweep.shown_url(url).startswith(url.split("://")[0] + "://sweeper:***@")


def test_the_default_study_database_stays_in_an_output_dir_with_hash_or_question_mark(tmp_path):
    out = tmp_path / "runs#1?x=y"
    out.mkdir()
    url = optuna_sweep.default_storage(out)
    optuna_sweep.storage_for(url)
    assert (out / "study.db").is_file() and [p.name for p in tmp_path.iterdir()] == ["runs#1?x=y"]


def test_a_sweep_trains_each_trial_on_several_weighted_sources(assets, tmp_path):
    """sweep.py --data A B with data_weights in the base config: every trial trains on both, and reports val_loss
    over both splits beside each one's."""
    import json

    sources = [write_token_file(tmp_path / f"{name}.hdf5", n_train=6, n_val=2, seed=i)
               for i, name in enumerate(("a", "b"))]
    space = write_space(tmp_path / "space.yaml", "learning_rate:\n  type: float\n  min: 1.0e-4\n  max: 1.0e-3\n")
    out = tmp_path / "sweep"
    args = base_args(assets, sources[0], out, "--sweep_config", str(space), "--n_trials", "1", "--set",
                     "data_weights=[0.3, 0.7]")
    args[1:2] = [str(p) for p in sources]  # --data A B
    assert sweep.main(args) == 0
    [trial] = load(out).trials
    assert trial.state == TrialState.COMPLETE
    logged = [json.loads(line) for line in next(out.rglob("metrics.jsonl")).read_text().splitlines()]
    assert any({"val_loss", "val_loss/a", "val_loss/b"} <= set(m) for m in logged)
