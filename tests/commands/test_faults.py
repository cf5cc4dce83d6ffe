"""Bad input, interruption and corruption through the real command lines: every case exits non-zero with
one clear line (no traceback), and the files on disk are what they were, or what the user asked for."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from conftest import assert_clear_error, cli, fails_clearly, ROOT, RUN_FLAGS, token_rows, write_token_file
from csm.system.errors import UserError

def snapshot(directory: Path) -> dict:
    """Every file under a directory with its bytes, to prove nothing changed."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_file(tmp_path_factory.mktemp("faults") / "tokens.hdf5", n_train=8, n_val=2)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data, assets):
    out = tmp_path_factory.mktemp("runs") / "done"
    rc, err = cli("train.py", "--data", data, "--output_dir", out, "--model", assets["model"],
                  "--max_steps", 4, *RUN_FLAGS)
    assert rc == 0, err
    return out


# --------------------------------------------------------------------------- 1. run directories


def test_a_new_run_never_overwrites_a_finished_one(finished_run, data, assets, tmp_path):
    before = snapshot(finished_run)
    rc, err = cli("train.py", "--data", data, "--output_dir", finished_run, "--model", assets["model"],
                  "--max_steps", 2, *RUN_FLAGS)
    assert_clear_error(rc, err, "already holds a run")
    assert "--resume" in err and "--overwrite" in err
    # A start that fails on its data does not touch the directory either (config.yaml used to be written first).
    rc, err = cli("train.py", "--data", tmp_path / "missing.hdf5", "--output_dir", finished_run, "--resume",
                  "--model", assets["model"], *RUN_FLAGS)
    assert_clear_error(rc, err, "no such file")
    assert snapshot(finished_run) == before


def test_overwrite_replaces_the_old_run_and_a_failed_start_leaves_nothing(finished_run, data, assets, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    rc, err = cli("train.py", "--data", data, "--output_dir", copy, "--model", assets["model"], "--max_steps", 2,
                  "--overwrite", *RUN_FLAGS)
    assert rc == 0, err
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["step_0000002.pt"]  # none of the old run's
    assert max(json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()) == 2
    rc, err = cli("train.py", "--data", tmp_path / "missing.hdf5", "--output_dir", tmp_path / "new", *RUN_FLAGS)
    assert_clear_error(rc, err, "no such file")
    assert not (tmp_path / "new").exists()


def test_two_runs_on_one_directory_get_a_clear_message(data, assets, tmp_path):
    out = tmp_path / "busy"
    first = subprocess.Popen([sys.executable, "train.py", "--data", str(data), "--output_dir", str(out), "--model",
                              str(assets["model"]), "--max_steps", "100000", *RUN_FLAGS, "--save_every", "0",
                              "--val_every", "0"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.2)
        rc, err = cli("train.py", "--data", data, "--output_dir", out, "--resume", "--model",
                      assets["model"], *RUN_FLAGS)
        assert_clear_error(rc, err, "in use by another running process")
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 75, err  # documented: stopped early with a checkpoint


# --------------------------------------------------------------------------- 5. samples


def test_sample_settings_are_checked_before_step_one(data, assets, tmp_path):
    base = ["--data", data, "--model", assets["model"], "--max_steps", 4, *RUN_FLAGS, "--gen_every", 2,
            "--text_tokenizer", assets["text_tokenizer"]]
    rc, err = cli("train.py", *base, "--output_dir", tmp_path / "a", "--mimi_weights", tmp_path / "nope.safetensors")
    assert_clear_error(rc, err, "Mimi weights")
    rc, err = cli("train.py", *base, "--output_dir", tmp_path / "b", "--mimi_weights", assets["mimi"],
                  "--gen_sentence", " ")
    assert_clear_error(rc, err, "empty string")
    rc, err = cli("train.py", *base, "--output_dir", tmp_path / "c", "--mimi_weights", assets["mimi"],
                  "--set", "gen_max_seconds=1e9")
    assert_clear_error(rc, err, "gen_max_seconds")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_a_failing_sample_does_not_end_the_run_and_comes_after_the_checkpoint(data, assets, tmp_path, monkeypatch):
    from csm.training import config
    from csm.training import training

    calls = []

    def broken(model, *a, **kw):
        calls.append(sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()))
        raise RuntimeError("boom")

    monkeypatch.setattr(training, "synthesize_batch", broken)
    cfg = config.make_config(dict(model=str(assets["model"]), text_tokenizer=str(assets["text_tokenizer"]),
                                  mimi_weights=str(assets["mimi"]), max_steps=4, gen_every=2, save_every=2, val_every=0,
                                  batch_size=4, warmup_steps=1, wandb_mode="disabled"))
    result = training.train(cfg, data, tmp_path / "out", device="cpu", progress=False)
    assert result.step == 4 and not result.stopped_early and (tmp_path / "out" / "final").is_dir()
    assert calls[0] == ["step_0000002.pt"]  # the step's checkpoint was on disk before its samples


# --------------------------------------------------------------------------- 7. corruption


def damage(path: Path, n=200):
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + n] = bytes((b + 101) % 256 for b in raw[mid:mid + n])
    path.write_bytes(bytes(raw))


def test_a_damaged_checkpoint_is_caught_and_resume_falls_back(finished_run, data, assets, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run / "checkpoints" / "step_0000004.pt")
    rc, err = cli("train.py", "--data", data, "--output_dir", run, "--resume", run / "checkpoints" / "step_0000004.pt",
                  "--model", assets["model"], "--max_steps", 6, *RUN_FLAGS)
    assert_clear_error(rc, err, "damaged")
    assert "weights_only" not in err
    rc, err = cli("train.py", "--data", data, "--output_dir", run, "--resume", "--model", assets["model"],
                  "--max_steps", 6, *RUN_FLAGS)
    assert rc == 0, err
    assert "step_0000004.pt" in err and "trying the checkpoint before it" in err
    state = torch.load(run / "checkpoints" / "step_0000006.pt", weights_only=True)
    assert state["step"] == 6


def test_damaged_best_weights_are_caught(finished_run, tmp_path):
    from csm.model import weights

    best = tmp_path / "best"
    shutil.copytree(finished_run / "best", best)
    damage(best / "model.safetensors", n=64)
    with pytest.raises(UserError, match="damaged|not a readable"):
        weights.load_model(best)


def test_pickled_checkpoints_are_refused_without_pytorchs_unsafe_advice(tmp_path):
    from csm.model import weights

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError) as err:
        weights.load_model(tmp_path / "evil.pt")
    assert "could run code" in str(err.value) and "weights_only=False" not in str(err.value)


# --------------------------------------------------------------------------- 8. warmup, 10. exit status


def test_warmup_as_long_as_the_run_is_an_error_naming_both(data, assets, tmp_path):
    rc, err = cli("train.py", "--data", data, "--output_dir", tmp_path / "w", "--model", assets["model"],
                  "--max_steps", 3, *RUN_FLAGS, "--warmup_steps", 1000)
    assert_clear_error(rc, err, "warmup_steps 1000 is not shorter than the run (3 optimizer steps)")


def test_a_half_written_metrics_line_does_not_break_resume(finished_run, data, assets, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # the process died mid-line
    rc, err = cli("train.py", "--data", data, "--output_dir", run, "--resume", "--model", assets["model"],
                  "--max_steps", 6, *RUN_FLAGS)
    assert rc == 0, err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and max(steps) == 6


# --------------------------------------------------------------------------- classes of bad values and files


TRAIN_NUMBERS = [
    ("--learning_rate", "nan", "finite"), ("--learning_rate", "inf", "finite"), ("--learning_rate", "0", "> 0"),
    ("--batch_size", "0", ">= 1"), ("--batch_size", "-3", ">= 1"), ("--max_steps", str(10**12), "absurdly large"),
    ("--seed", "-1", ">= 0"), ("--max_grad_norm", "-inf", "finite"), ("--num_workers", "100000", "<= 256"),
]


@pytest.mark.parametrize("flag,value,message", TRAIN_NUMBERS)
def test_train_numbers(data, assets, tmp_path, flag, value, message):
    fails_clearly("train.py", ["--data", data, "--output_dir", tmp_path / "o", "--model", assets["model"], *RUN_FLAGS,
                               f"{flag}={value}"],  # the '=' form: argparse would read '-inf' as an option
                  message, through_cli=(flag, value, message) == TRAIN_NUMBERS[0])
    assert not (tmp_path / "o").exists()


def bad_files(tmp_path, good: Path) -> dict:
    """The classes of bad input file: empty, truncated, a directory, another format under the same name."""
    (tmp_path / "bad").mkdir()
    empty = tmp_path / "bad" / f"empty{good.suffix}"
    empty.write_bytes(b"")
    truncated = tmp_path / "bad" / f"truncated{good.suffix}"
    truncated.write_bytes(good.read_bytes()[: max(1, good.stat().st_size // 2)])
    other = tmp_path / "bad" / f"text{good.suffix}"
    other.write_text("this is not what the name says\n")
    directory = tmp_path / "bad" / f"dir{good.suffix}"
    directory.mkdir()
    return {"empty": empty, "truncated": truncated, "other format": other, "directory": directory}


@pytest.mark.parametrize("kind", ["empty", "truncated", "other format", "directory"])
def test_train_bad_input_files(data, assets, tmp_path, kind):
    for flag, good in (("--data", data), ("--model", assets["model"] / "model.safetensors")):
        sub = tmp_path / flag.strip("-")
        sub.mkdir()
        bad = bad_files(sub, Path(good))[kind]
        args = {"--data": data, "--model": assets["model"]}
        args[flag] = bad
        fails_clearly("train.py", ["--data", args["--data"], "--model", args["--model"], "--output_dir", sub / "o",
                                   *RUN_FLAGS], "", through_cli=kind == "empty")
        assert not (sub / "o").exists()


def test_train_bad_config_files(data, assets, tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00\x81garbage")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    for name, message in (("dir.yaml", "is a directory"), ("bin.yaml", "not a text"), ("list.yaml", "mapping")):
        fails_clearly("train.py",
                      ["--data", data, "--config", tmp_path / name, "--output_dir", tmp_path / "o"], message,
                      through_cli=name == "dir.yaml")


def test_train_bad_output_dirs(data, assets, tmp_path):
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "which is a file")):
        rc, err = cli("train.py", "--data", data, "--output_dir", out, "--model", assets["model"], *RUN_FLAGS)
        assert_clear_error(rc, err, message)
    assert (tmp_path / "file").read_text() == "x"


GENERATE_NUMBERS = [
    (["--temperature", "nan"], "finite"), (["--temperature", "0"], "> 0"), (["--temperature=-inf"], "finite"),
    (["--max_audio_seconds", "inf"], "finite"), (["--max_audio_seconds", "0"], "> 0"),
    (["--max_audio_seconds", "1e9"], "<= 160"), (["--topk", "0"], ">= 1"), (["--seed=-5"], ">= 0"),
    (["--output", "noext"], "ending in"),
]


@pytest.mark.parametrize("args,message", GENERATE_NUMBERS)
def test_generate_numbers_and_names(assets, tmp_path, args, message):
    fails_clearly("generate.py", ["--model", assets["model"], "--text", "Hi.", "--device", "cpu",
                                  "--output", tmp_path / "o.wav", *args], message,
                  through_cli=(args, message) == GENERATE_NUMBERS[0])


def test_generate_bad_outputs_and_inputs_fail_before_any_work(assets, tmp_path):
    wav = tmp_path / "turn.wav"
    sf.write(wav, np.zeros(4800, dtype=np.float32), 24000)
    (tmp_path / "file").write_text("x")
    (tmp_path / "outdir.wav").mkdir()
    cases = [
        (["--output", tmp_path / "outdir.wav"], "is a directory"),
        (["--output", tmp_path / "file" / "o.wav"], "is a file"),
        (["--output", wav, "--context_audio", wav, "--context_text", "x", "--context_speaker", "0"], "also an input"),
        (["--output", tmp_path / "o.wav", "--context_audio", tmp_path, "--context_text", "x", "--context_speaker", "0"],
         "audio path is a directory"),
        (["--output", tmp_path / "o.wav", "--context_audio", tmp_path / "file", "--context_text", "x",
          "--context_speaker", "0"], "unreadable audio"),
    ]
    for i, (args, message) in enumerate(cases):
        fails_clearly("generate.py", ["--model", assets["model"], "--text", "Hi.", "--device", "cpu",
                                      "--text_tokenizer", assets["text_tokenizer"], "--mimi_weights", assets["mimi"],
                                      *args], message, through_cli=i == 2)
    assert sf.info(str(wav)).frames == 4800 and not (tmp_path / "o.wav").exists()
    (tmp_path / "lines.txt").write_bytes(b"\xff\xfe\x00bad")
    rc, err = cli("generate.py", "--model", assets["model"], "--lines", tmp_path / "lines.txt",
                  "--output", tmp_path / "o.wav")
    assert_clear_error(rc, err, "not a UTF-8 text file")


PRETOKENIZE_NUMBERS = [
    (["--save_every", "0"], ">= 1"), (["--batch_size=-1"], ">= 1"), (["--max_seq_len", "99999"], "<= 2048"),
    (["--num_workers=-1"], ">= 0"),
]


@pytest.mark.parametrize("args,message", PRETOKENIZE_NUMBERS)
def test_pretokenize_numbers(assets, tmp_path, args, message):
    (tmp_path / "m.csv").write_text("path,text\na.wav,hi\n")
    fails_clearly("pretokenize.py", ["--train_data", tmp_path / "m.csv", "--output", tmp_path / "o.hdf5", *args],
                  message, through_cli=(args, message) == PRETOKENIZE_NUMBERS[0])


def test_pretokenize_bad_metadata_files(tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "dir.csv").mkdir()
    (tmp_path / "half.json").write_text('[{"path": "a.wav", "text": "hi"}, {"path": "b.w')
    (tmp_path / "fake.parquet").write_text("not parquet")
    for name, message in (("empty.csv", "cannot read it"), ("dir.csv", "is a directory"),
                          ("half.json", "cannot read it"), ("fake.parquet", "cannot read it")):
        fails_clearly("pretokenize.py", ["--train_data", tmp_path / name, "--output", tmp_path / "o.hdf5"], message,
                      through_cli=name == "empty.csv")
    assert not (tmp_path / "o.hdf5").exists() and not (tmp_path / "o.hdf5.partial").exists()


def test_pretokenize_never_replaces_a_file_it_did_not_write(assets, tmp_path):
    meta = tmp_path / "m.csv"
    meta.write_text("path,text\na.wav,hi\n")
    foreign = tmp_path / "notes.hdf5"
    foreign.write_text("my notes")
    common = ["--text_tokenizer", assets["text_tokenizer"], "--mimi_weights", assets["mimi"], "--device", "cpu"]
    rc, err = cli("pretokenize.py", "--train_data", meta, "--output", foreign, *common)
    assert_clear_error(rc, err, "not a token file written by pretokenize.py")
    fails_clearly("pretokenize.py", ["--train_data", meta, "--output", meta, *common],
                  "also an input", through_cli=False)
    (tmp_path / "d.hdf5").mkdir()
    fails_clearly("pretokenize.py", ["--train_data", meta, "--output", tmp_path / "d.hdf5", *common], "is a directory",
                  through_cli=False)
    assert foreign.read_text() == "my notes" and meta.read_text() == "path,text\na.wav,hi\n"


def test_pretokenize_redoes_a_chunk_left_empty_by_a_power_loss(assets, tmp_path, monkeypatch):
    """A 0-byte chunk (renamed, never flushed) is encoded again instead of breaking the resume."""
    from csm.data import encode_dataset
    import pretokenize

    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        sf.write(tmp_path / f"c{i}.wav", (0.1 * rng.standard_normal(12000)).astype(np.float32), 24000)
        rows.append({"path": f"c{i}.wav", "text": f"Clip {i}."})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    common = ["--train_data", str(tmp_path / "m.csv"), "--save_every", "2", "--device", "cpu",
              "--text_tokenizer", str(assets["text_tokenizer"]), "--mimi_weights", str(assets["mimi"])]
    pretokenize.main([*common, "--output", str(tmp_path / "ref.hdf5")])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the machine went down after both chunks were committed

    with monkeypatch.context() as m:
        m.setattr(encode_dataset, "write_output", crash)
        with pytest.raises(KeyboardInterrupt):
            pretokenize.main([*common, "--output", str(tmp_path / "o.hdf5")])
    chunk = tmp_path / "o.hdf5.partial" / "train_000000.npz"
    chunk.write_bytes(b"")
    pretokenize.main([*common, "--output", str(tmp_path / "o.hdf5")])
    for got, want in zip(token_rows(tmp_path / "o.hdf5"), token_rows(tmp_path / "ref.hdf5")):
        assert [x.tolist() for x in got] == [x.tolist() for x in want]


SWEEP_NUMBERS = [
    (["--n_trials", "0"], ">= 1"), (["--n_trials=-4"], ">= 1"), (["--timeout", "nan"], "finite"),
    (["--n_workers", "0"], ">= 1"), (["--seed=-1"], ">= 0"),
]


@pytest.mark.parametrize("args,message", SWEEP_NUMBERS)
def test_sweep_numbers(data, tmp_path, args, message):
    fails_clearly("sweep.py", ["--data", data, "--output_dir", tmp_path / "s", *args], message,
                  through_cli=(args, message) == SWEEP_NUMBERS[0])
    assert not (tmp_path / "s").exists()


def test_sweep_bad_files_and_other_studies(data, tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "empty.yaml").write_text("")
    for name, message in (("dir.yaml", "is a directory"), ("empty.yaml", "must map config keys")):
        fails_clearly("sweep.py", ["--data", data, "--sweep_config", tmp_path / name, "--output_dir", tmp_path / "s"],
                      message, through_cli=False)
    old = tmp_path / "old"
    old.mkdir()
    (old / "sweep.json").write_text(json.dumps({"study_name": "first"}))
    (old / "trials").mkdir()
    rc, err = cli("sweep.py", "--data", data, "--output_dir", old, "--study_name", "second", "--max_steps", "6",
                  "--sweep_config", ROOT / "configs" / "sweep_demo.yaml")
    assert_clear_error(rc, err, "holds study 'first'")
    assert sorted(p.name for p in old.iterdir()) == ["sweep.json", "trials"]


# --------------------------------------------------------------------------- 2-4. sweeps stopped, killed, re-run


def sweep_cmd(data, assets, out, *extra):
    return [sys.executable, "sweep.py", "--data", str(data), "--output_dir", str(out), "--model", str(assets["model"]),
            "--base_config", str(ROOT / "configs" / "finetune.yaml"), "--sweep_config",
            str(ROOT / "configs" / "sweep_demo.yaml"),
            "--n_workers", "1", "--wandb_mode", "disabled", "--sampler", "random", "--set", "batch_size=4",
            "--set", "warmup_steps=1", "--set", "val_every=1", "--set",
            f"text_tokenizer={assets['text_tokenizer']}", *extra]


def study_of(out):
    import optuna

    return optuna.load_study(study_name="csm-sweep", storage=f"sqlite:///{(out / 'study.db').resolve()}")


def wait_for_training(out, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(out.glob("trials/*/metrics.jsonl")):
            return
        time.sleep(0.3)
    raise AssertionError("no trial started training")


@pytest.mark.slow
def test_ctrl_c_on_a_sweep_records_interrupted_trials_and_writes_reports(data, assets, tmp_path):
    from optuna.trial import TrialState

    out = tmp_path / "s"
    proc = subprocess.Popen(sweep_cmd(data, assets, out, "--n_trials", "3", "--max_steps", "100000"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_training(out)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group gets it
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-2000:]
    trials = study_of(out).trials
    assert [t.state for t in trials] == [TrialState.FAIL]  # stopped: no other trial was started
    assert trials[0].user_attrs["interrupted"] and trials[0].user_attrs["fail_reason"].startswith("interrupted")
    assert (out / "trials.csv").is_file() and "Traceback" not in err


@pytest.mark.slow
def test_killing_the_sweep_kills_its_workers_and_a_rerun_redoes_their_trials_with_new_draws(data, assets, tmp_path):
    from optuna.trial import TrialState

    out = tmp_path / "s"
    proc = subprocess.Popen(sweep_cmd(data, assets, out, "--n_trials", "1", "--max_steps", "100000"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_training(out)
    worker = study_of(out).trials[0].user_attrs["pid"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.3)
    else:
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the worker outlived the sweep that started it")
    rerun = subprocess.run(sweep_cmd(data, assets, out, "--n_trials", "1", "--max_steps", "6"), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    trials = study_of(out).trials
    # The dying sweep's worker got SIGTERM, stopped at a step and recorded its trial as interrupted (were it
    # killed outright, the re-run would find the trial RUNNING with a dead pid and mark it so); either way
    # the re-run redid it instead of counting it.
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].user_attrs["interrupted"]
    assert trials[1].params != trials[0].params  # a resumed sweep draws new parameters, not the first run's again


def test_two_pretokenize_runs_on_one_output_get_a_clear_message(assets, tmp_path):
    import pretokenize
    from csm.system.outputs import OutputLock

    (tmp_path / "m.csv").write_text("path,text\na.wav,hi\n")
    with OutputLock(tmp_path / "o.hdf5.lock", "the other run"):
        with pytest.raises(UserError, match="in use by another running process"):
            pretokenize.main(["--train_data", str(tmp_path / "m.csv"), "--output", str(tmp_path / "o.hdf5"),
                              "--text_tokenizer", str(assets["text_tokenizer"]), "--mimi_weights", str(assets["mimi"])])


def test_two_sweeps_on_one_output_dir_get_a_clear_message(data, assets, tmp_path):
    import sweep
    from csm.system.outputs import lock_beside

    out = tmp_path / "s"
    with lock_beside(out, "the other sweep"):
        with pytest.raises(UserError, match="in use by another running process"):
            sweep.main(sweep_cmd(data, assets, out, "--max_steps", "6")[2:])
