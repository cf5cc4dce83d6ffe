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
from csm.system import outputs
import prepare
import pretokenize
import sweep
import train
from csm.system.errors import UserError
from conftest import write_token_file

ROOT = Path(__file__).resolve().parents[2]
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
    with pytest.raises(UserError, match="was written with other settings"):
        pretokenize.main(common)
    with h5py.File(out) as f:  # A's file, whole
        assert '"omit_speaker_id": true' in f.attrs["fingerprint"] and len(f["train/length"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "tokens.hdf5", "tokens.hdf5.skipped.csv"]


def test_a_run_holding_the_lock_keeps_a_second_one_out(assets, tmp_path, just_before_the_lock):
    """While B holds the lock (here: while it opens its sources), A is refused at once; B then writes alone."""
    out = tmp_path / "tokens.hdf5"
    common = ["--train_data", str(_metadata(tmp_path)), "--output", str(out), "--device", "cpu",
              "--text_tokenizer", str(assets["text_tokenizer"]), "--mimi_weights", str(assets["mimi"])]
    from csm.data import encode_dataset

    real, refused = encode_dataset.open_source, []

    def open_source(*args, **kwargs):
        if not refused:
            with pytest.raises(UserError, match="in use by another running process") as e:
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
    with pytest.raises(UserError, match=refusal):
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
        with pytest.raises(UserError, match=message):
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
    with pytest.raises(UserError, match="lies inside --output_dir"):
        main([*argv, "--overwrite"])
    assert data.read_bytes() == Path(tokens).read_bytes() and sorted(p.name for p in run.iterdir()) == [data.name]


def test_a_refusal_names_each_changed_setting_with_its_old_and_new_value():
    """pretokenize.py said "( changed)" for a removed key and prefer.py "(settings changed)"."""
    from csm.system.outputs import describe_change

    old = {"max_seq_len": 2048, "min_dnsmos": 3.0, "settings": {"margin": 0.1, "seed": 0}, "same": [1, 2]}
    new = {"max_seq_len": 1024, "settings": {"margin": 0.5, "seed": 0}, "same": [1, 2], "added": "x" * 80}
    said = describe_change(old, new, {"max_seq_len": "--max_seq_len"})
    assert said == ("--max_seq_len 2048 -> 1024, min_dnsmos 3.0 -> (not set), settings.margin 0.1 -> 0.5, "
                    "added (not set) -> '" + "x" * 56 + "...")


def test_a_resume_with_another_number_of_processes_or_data_says_which(token_file):
    """The loader's check came first and blamed "the data, batch settings or number of processes" at once."""
    from dataloaders import CSMDataset, make_loader

    loader = make_loader(CSMDataset(str(token_file), "train"), batch_size=4, seed=0)
    state = loader.state_dict()
    with pytest.raises(UserError, match=r"the data changed: 99 examples then, \d+ now"):
        loader.load_state_dict({**state, "num_batches": 99, "examples": 99})
    with pytest.raises(UserError, match="the batch settings changed"):
        loader.load_state_dict({**state, "num_batches": 99})


def _path_flags(parser, outputs_: tuple[str, ...]):
    """The flags of a parser that take a string (every path flag among them), but the output's own and --resume."""
    return [a for a in parser._actions if a.option_strings and a.nargs != 0 and a.choices is None
            and a.type in (None, str) and a.dest not in (*outputs_, "resume", "help")]


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with `flag` given `value` (replacing the value it had)."""
    if flag in argv:
        i = argv.index(flag)
        return [*argv[:i + 1], value, *argv[i + 2:]]
    return [*argv, flag, value]


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "sweep.py", "export.py", "prepare.py", "generate.py"])
def test_no_path_a_command_reads_can_be_deleted_by_overwrite(script, assets, tokens, tmp_path, monkeypatch):
    """The guard's inputs are derived from the parsed arguments (every value that names an existing path), not a
    list per command: each string flag in turn names a folder inside the output directory (or, for a file output,
    the output file itself), and --overwrite must leave it whole. evaluate.py deleted --asr, --text_tokenizer and
    --mimi_weights folders kept in its output; a sweep's journal in its output was deleted."""
    import importlib

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    main, argv, out, _ = _cases(assets, tokens, tmp_path)[script]
    parser = importlib.import_module(script.removesuffix(".py")).build_parser()
    directory = out.suffix == ""
    if directory:
        kept = out / "kept"
        kept.mkdir(parents=True)
        (kept / "file.txt").write_text("an input")
    flags = _path_flags(parser, ("output", "output_dir"))
    assert len(flags) >= 3, [a.dest for a in flags]
    for action in flags:
        if not directory:
            out.write_text("an input")
        target = str(kept if directory else out)
        with pytest.raises((UserError, SystemExit)):
            main(_with(argv, action.option_strings[-1], target) + ["--overwrite"])
        assert (kept / "file.txt" if directory else out).read_text() == "an input", action.option_strings


def test_two_different_commands_on_one_output_take_one_lock(assets, tokens, tmp_path):
    """export.py --output RUN --overwrite while train.py writes RUN deleted its checkpoints: export locked RUN.lock
    beside it, train RUN/.lock inside it. Now every command takes the one lock beside its output."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", "--data", str(tokens), "--output_dir", str(run), "--model",
                             str(assets["model"]), "--device", "cpu", "--max_steps", "100000", "--save_every", "1",
                             "--wandb_mode", "disabled", "--gen_every", "0", "--val_every", "0"],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600  # for a hang only: training starts in seconds
        while not list(run.glob("checkpoints/step_*.pt")):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with pytest.raises(UserError, match="is in use by another running process"):
            export.main(["--model", str(assets["model"]), "--to", "official", "--output", str(run), "--overwrite"])
        assert list(run.glob("checkpoints/step_*.pt")) and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)


def test_a_home_path_given_after_an_equals_sign_is_expanded_for_every_flag(assets, tmp_path, monkeypatch):
    """The shell expands --output ~/x, not --output=~/x: every command's parser expands ~/ itself, for every flag,
    so a file lands in the home folder, not in a folder named ~ in the working directory."""
    import importlib

    from utils import CommandParser

    for name in ("train", "sweep", "prepare", "pretokenize", "generate", "evaluate", "prefer", "export"):
        assert isinstance(importlib.import_module(name).build_parser(), CommandParser), name
    assert "CommandParser(" in (ROOT / "demo.py").read_text()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    assert generate.main([f"--model={assets['model']}", "--text=Hi.", "--output=~/hi.wav", "--device=cpu",
                          "--max_audio_seconds=0.16", f"--text_tokenizer={assets['text_tokenizer']}",
                          f"--mimi_weights={assets['mimi']}"]) == 0
    assert (tmp_path / "home" / "hi.wav").is_file() and not (tmp_path / "~").exists()
