"""Claim, then check: every script takes its output's lock before it looks at the output, so no interleaving of
two runs lets one replace what the other finished. The interleavings are forced, not left to timing: another
run's finished work appears in the output at the last moment before the lock is taken (a hook on the lock),
where a script that checked first would already have decided the output was free."""
import shutil
from pathlib import Path

import h5py
import pandas as pd
import pytest

import evaluate
import export
import generate
import outputs
import prepare
import pretokenize
import sweep
import train
import utils
from conftest import write_token_file

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


@pytest.fixture
def just_before_the_lock(monkeypatch):
    """`install(action)`: `action()` runs once, right before the first lock a script takes; returns a list
    that records each lock file taken."""
    taken = []

    def install(action):
        real = outputs.OutputLock.acquire

        def acquire(self):
            taken.append(self.lock_file)
            if len(taken) == 1:
                action()
            return real(self)

        monkeypatch.setattr(outputs.OutputLock, "acquire", acquire)
        return taken

    return install


def _metadata(tmp_path) -> Path:
    df = pd.read_csv(SAMPLE / "train.csv").head(2)
    df["path"] = [str(SAMPLE / p) for p in df["path"]]
    df.to_csv(tmp_path / "m.csv", index=False)
    return tmp_path / "m.csv"


def test_a_token_file_finished_while_a_second_run_starts_is_not_replaced(assets, tmp_path, just_before_the_lock):
    """Run B starts; run A (other settings) runs whole before B takes the lock. B must then see A's finished file
    and refuse it, not re-encode and replace it (each would say "wrote" and exit 0)."""
    out = tmp_path / "tokens.hdf5"
    common = ["--train_data", str(_metadata(tmp_path)), "--output", str(out), "--device", "cpu",
              "--text_tokenizer", str(assets["text_tokenizer"]), "--mimi_weights", str(assets["mimi"])]
    just_before_the_lock(lambda: pretokenize.main([*common, "--omit_speaker_id"]))
    with pytest.raises(utils.UserError, match="was written with other settings"):
        pretokenize.main(common)
    with h5py.File(out) as f:  # A's file, whole
        assert '"omit_speaker_id": true' in f.attrs["fingerprint"] and len(f["train/audio"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "tokens.hdf5", "tokens.hdf5.skipped.csv"]


def test_a_run_holding_the_lock_keeps_a_second_one_out(assets, tmp_path, just_before_the_lock):
    """While B holds the lock (here: while it opens its sources), A is refused at once; B then writes alone."""
    out = tmp_path / "tokens.hdf5"
    common = ["--train_data", str(_metadata(tmp_path)), "--output", str(out), "--device", "cpu",
              "--text_tokenizer", str(assets["text_tokenizer"]), "--mimi_weights", str(assets["mimi"])]
    import encode_dataset

    real, refused = encode_dataset.open_source, []

    def open_source(*args, **kwargs):
        if not refused:
            with pytest.raises(utils.UserError, match="in use by another running process") as e:
                pretokenize.main([*common, "--omit_speaker_id"])
            refused.append(e.value)
        return real(*args, **kwargs)

    encode_dataset.open_source = open_source
    try:
        assert pretokenize.main(common) == 0
    finally:
        encode_dataset.open_source = real
    assert refused
    with h5py.File(out) as f:
        assert '"omit_speaker_id": false' in f.attrs["fingerprint"]


def _plant_dir(out: Path):
    def plant():
        out.mkdir(parents=True, exist_ok=True)
        (out / "other-run.txt").write_text("finished work of another run")
    return plant


def _plant_file(out: Path):
    def plant():
        out.write_text("finished work of another run")
    return plant


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return write_token_file(tmp_path_factory.mktemp("claims") / "tokens.hdf5", n_train=8, n_val=2)


def _cases(assets, tokens, tmp_path):
    model, tok, mimi = str(assets["model"]), str(assets["text_tokenizer"]), str(assets["mimi"])
    out_dir, out_file = tmp_path / "out", tmp_path / "out.wav"
    space = tmp_path.parent / f"{tmp_path.name}-space.yaml"
    space.write_text("learning_rate: {type: float, min: 1.0e-4, max: 1.0e-3, log: true}\n")
    return {
        "train.py": (train.main, ["--data", str(tokens), "--output_dir", str(out_dir), "--model", model,
                                  "--device", "cpu", "--max_steps", "2", "--wandb_mode", "disabled"],
                     out_dir, "already holds a run"),
        "evaluate.py": (evaluate.main, ["--eval_data", str(tokens), "--output_dir", str(out_dir), "--model", model,
                                        "--device", "cpu"], out_dir, "is not empty"),
        "sweep.py": (sweep.main, ["--data", str(tokens), "--output_dir", str(out_dir), "--model", model,
                                  "--max_steps", "2", "--set", "warmup_steps=0", "--sweep_config", str(space)],
                     out_dir, "holds other files"),
        "export.py": (export.main, ["--model", model, "--to", "official", "--output", str(out_dir)], out_dir,
                      "is not empty"),
        "prepare.py": (prepare.main, ["--audio", str(SAMPLE / "clips"), "--output", str(tmp_path / "m.csv"),
                                      "--asr", "none"], tmp_path / "m.csv", "exists"),
        "generate.py": (generate.main, ["--model", model, "--text", "Hi.", "--output", str(out_file), "--device", "cpu",
                                        "--text_tokenizer", tok, "--mimi_weights", mimi], out_file, "exists"),
    }


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "sweep.py", "export.py", "prepare.py", "generate.py"])
def test_every_script_locks_then_looks(script, assets, tokens, tmp_path, just_before_the_lock):
    main, argv, out, refusal = _cases(assets, tokens, tmp_path)[script]
    plant = _plant_dir(out) if out.suffix == "" else _plant_file(out)
    taken = just_before_the_lock(plant)
    with pytest.raises(utils.UserError, match=refusal):
        main(argv)
    assert taken, f"{script} took no lock"
    planted = out / "other-run.txt" if out.suffix == "" else out
    assert planted.read_text() == "finished work of another run"
    leftovers = sorted(p.name for p in (out if out.is_dir() else out.parent).iterdir())
    assert not [n for n in leftovers if n.endswith(".lock") and n != ".lock"], leftovers  # beside-locks removed


def test_export_refuses_outputs_that_hold_or_lie_inside_an_input(assets, tmp_path):
    """--overwrite replaces the output: one that holds the model (or lies inside it) would delete it."""
    run = tmp_path / "run"
    shutil.copytree(assets["model"], run / "final")
    before = {p.name: p.read_bytes() for p in (run / "final").iterdir()}
    for model, output, message in ((run / "final", run, "lies inside --output"),
                                   (run / "final" / "model.safetensors", run / "final", "lies inside --output"),
                                   (run / "final", run / "final" / "hf", "lies inside an input"),
                                   (run / "final", run / "final", "is also an input")):
        with pytest.raises(utils.UserError, match=message):
            export.main(["--model", str(model), "--to", "official", "--output", str(output), "--overwrite"])
    assert {p.name: p.read_bytes() for p in (run / "final").iterdir()} == before


@pytest.mark.parametrize("script", ["train.py", "sweep.py", "evaluate.py"])
def test_overwrite_never_empties_a_directory_that_holds_an_input(script, assets, tokens, tmp_path):
    """One rule for every directory output: --overwrite empties it, so one that holds the data is refused before
    anything is read or removed (train.py used to delete a token file kept in its output directory)."""
    run = tmp_path / "run"
    run.mkdir()
    data = run / "tokens.hdf5"
    shutil.copy(tokens, data)
    main, argv, _, _ = _cases(assets, data, tmp_path)[script]
    argv = [a if a != str(tmp_path / "out") else str(run) for a in argv]
    with pytest.raises(utils.UserError, match="lies inside --output_dir"):
        main([*argv, "--overwrite"])
    assert data.read_bytes() == Path(tokens).read_bytes() and sorted(p.name for p in run.iterdir()) == [data.name]
