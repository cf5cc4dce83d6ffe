"""Exit statuses that tell the truth and messages that say what happened, through the real command lines: a job
that did not do what was asked exits non-zero with one clear line; odd inputs (a byte order mark, a FIFO, NaN
samples, control characters) get the reason they deserve."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file

import evaluate
import sweep
from conftest import write_token_file
from conftest import assert_clear_error, cli
from csm.system.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_file(tmp_path_factory.mktemp("exits") / "tokens.hdf5", n_train=8, n_val=2)


def _pretokenize_cli(assets, *args):
    return cli("pretokenize.py", *args, "--device", "cpu", "--text_tokenizer", assets["text_tokenizer"],
               "--mimi_weights", assets["mimi"])


def _pretokenize(assets, *args):
    """pretokenize.py's main() in this process (its command line is tested above)."""
    import pretokenize

    return pretokenize.main([*map(str, args), "--device", "cpu", "--text_tokenizer", str(assets["text_tokenizer"]),
                             "--mimi_weights", str(assets["mimi"])])


# --------------------------------------------------------------------------- exit statuses


def test_pretokenize_fails_when_a_split_keeps_no_rows(assets, tmp_path):
    df = pd.read_csv(SAMPLE / "train.csv").head(3)
    df["path"] = [str(SAMPLE / p) for p in df["path"]]
    df.to_csv(tmp_path / "train.csv", index=False)
    bad = df.copy()
    bad["path"] = [str(tmp_path / "gone.wav"), str(tmp_path / "gone2.wav"), str(SAMPLE / df["path"][0])]
    bad["text"] = ["a", "b", "\x01\x02\x1b"]  # control characters alone are no transcript
    bad.to_csv(tmp_path / "val.csv", index=False)
    out = tmp_path / "tokens.hdf5"
    rc, err = _pretokenize_cli(assets, "--train_data", tmp_path / "train.csv", "--val_data", tmp_path / "val.csv",
                               "--output", out)
    assert rc == 2 and "Traceback" not in err, err  # the progress bars, then one line
    assert err.strip().splitlines()[-1].startswith(
        "error: the val split kept no rows, so no token file was written; top reasons: audio file not found: 2 rows; "
        "empty or missing text: 1 row (every skipped row is in "), err
    assert not out.exists() and not Path(f"{out}.partial").exists()
    assert len(pd.read_csv(f"{out}.skipped.csv")) == 3


def test_a_sweep_where_no_trial_completes_exits_non_zero(data, assets, tmp_path):
    out = tmp_path / "s"
    rc, err = cli("sweep.py", "--data", data, "--output_dir", out, "--model", tmp_path / "no-model", "--max_steps", 6,
                  "--n_trials", 2, "--sweep_config", ROOT / "configs" / "sweep_demo.yaml", "--set", "warmup_steps=0",
                  "--wandb_mode", "disabled", timeout=300)
    assert rc == 1, err[-2000:]
    assert "no trial of study 'csm-sweep' completed" in err and "Traceback" not in err
    assert (out / "trials.csv").is_file()


def test_a_sweep_checks_warmup_against_run_length_before_any_trial(data, assets, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("warmup_steps: {type: int, min: 0, max: 50}\nbatch_size: {type: categorical, values: [2, 4]}\n")
    out = tmp_path / "s"
    # 8 rows in batches of 4 for 3 epochs: 6 steps, which warmup_steps=50 never leaves.
    with pytest.raises(UserError, match=re.escape("trials that draw warmup_steps=50, batch_size=4 would fail: "
                                                  "warmup_steps 50 is not shorter than the run (6 optimizer steps)")):
        sweep.main([str(a) for a in ("--data", data, "--output_dir", out, "--model", assets["model"], "--n_epochs", 3,
                                     "--sweep_config", space, "--set", "max_tokens=null")])
    assert not out.exists()


def test_fsdp_outside_torchrun_is_refused_with_the_command_to_use(data, assets, tmp_path):
    rc, err = cli("train.py", "--data", data, "--output_dir", tmp_path / "r", "--model", assets["model"],
                  "--device", "cpu", "--set", "distributed=fsdp")
    assert_clear_error(rc, err, "launch it as: torchrun --nproc_per_node NUM_GPUS train.py")
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- storage


def test_unusable_sweep_storage_is_one_line_and_leaves_nothing(data, assets, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = os.geteuid() == 0 and os.system(f"mount -t tmpfs -o ro,size=64k tmpfs {ro} 2>/dev/null") == 0
    try:
        cases = [(f"{tmp_path / 'no-such-dir' / 'j.log'}", "does not exist"),
                 ("mysql://nobody@127.0.0.1:1/nothing", "--storage mysql://"),
                 ("bogus://what", "--storage bogus://")]
        if mounted:
            cases.append((f"{ro / 'j.log'}", "cannot write in"))
        out = tmp_path / "s"
        args = ["--data", data, "--output_dir", out, "--model", assets["model"], "--max_steps", 6,
                "--sweep_config", ROOT / "configs" / "sweep_demo.yaml", "--storage"]
        rc, err = cli("sweep.py", *args, cases[0][0])  # one through the command line; the rest in this process
        assert_clear_error(rc, err, cases[0][1])
        assert not out.exists()  # no sweep.json, no directory
        for storage, message in cases[1:]:
            with pytest.raises(UserError, match=re.escape(message)):
                sweep.main([*map(str, args), storage])
            assert not out.exists(), storage
    finally:
        if mounted:
            os.system(f"umount {ro}")


# --------------------------------------------------------------------------- adapters


def test_an_adapter_that_does_not_fit_the_model_is_one_line(assets, tmp_path):
    """Its shapes are checked against the model's layers (peft would stop with a size-mismatch traceback)."""
    from csm.model import adapters
    from csm.data import tiny_assets

    adapter = tmp_path / "adapter"
    state = {"base_model.model.backbone.layers.0.attn.q_proj.lora_A.weight": torch.zeros(4, 999),
             "base_model.model.backbone.layers.0.attn.q_proj.lora_B.weight": torch.zeros(16, 4)}
    adapter.mkdir()
    save_file(state, str(adapter / adapters.ADAPTER_WEIGHTS_NAME))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                              "target_modules": ["q_proj"]}))
    common = ["--model", assets["model"], "--adapter", adapter, "--device", "cpu"]
    rc, err = cli("generate.py", *common, "--text", "Hi.", "--output", tmp_path / "a.wav")
    assert_clear_error(rc, err, "does not fit this model: its LoRA for backbone.layers.0.attn.q_proj has A (4, 999)")
    judges = tiny_assets.make_judges(tmp_path / "judges")
    with pytest.raises(UserError, match="does not fit this model"):
        evaluate.main([*map(str, common), "--eval_data", str(SAMPLE / "train.csv"), "--output_dir", str(tmp_path / "e"),
                       "--asr", str(judges["asr"]), "--speaker_model", str(judges["speaker_model"])])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "judges"]


# --------------------------------------------------------------------------- messages


def test_prepare_names_a_fifo_and_nan_samples(tmp_path):
    import prepare

    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=re.escape("is a FIFO (named pipe), not a regular file")):
        prepare.main(["--audio", str(fifo), "--output", str(tmp_path / "m.csv"), "--asr", "none"])
    fifo.unlink()
    # 11 s of real speech with 45 ms of NaN in it: the reason is the NaN, not "no speech found".
    speech = np.concatenate([sf.read(p)[0] for p in sorted((SAMPLE / "clips").glob("train_*.flac"))[:4]])
    speech[24000:24000 + 1080] = np.nan
    (tmp_path / "rec").mkdir()
    sf.write(tmp_path / "rec" / "nan.wav", speech, 24000, subtype="FLOAT")
    rc, err = cli("prepare.py", "--audio", tmp_path / "rec", "--output", tmp_path / "m.csv", "--asr", "none")
    assert rc == 0, err
    report = pd.read_csv(tmp_path / "m.csv.skipped.csv")
    assert list(report["reason"]) == ["audio holds NaN or infinite samples"]


def test_bad_dataset_audio_is_reported_without_object_reprs(assets, tmp_path):
    from datasets import Audio, Dataset

    good = (SAMPLE / "clips" / "train_00.flac").read_bytes()
    ds = Dataset.from_dict({"audio": [{"bytes": good, "path": "a.flac"}, {"bytes": b"not audio", "path": None}],
                            "text": ["Hello there.", "Broken."]}).cast_column("audio", Audio(decode=False))
    ds.save_to_disk(str(tmp_path / "ds"))
    assert _pretokenize(assets, "--train_data", tmp_path / "ds", "--output", tmp_path / "o.hdf5") == 0
    reason = pd.read_csv(tmp_path / "o.hdf5.skipped.csv")["reason"][0]
    assert reason == "unreadable audio (Format not recognised.)" and "0x" not in reason


def test_sweep_finds_its_default_configs_from_any_directory(data, assets, tmp_path):
    rc, err = cli("sweep.py", "--data", data, "--output_dir", tmp_path / "s", "--max_steps", 5, cwd=tmp_path)
    assert_clear_error(rc, err, "warmup_steps")  # the shipped configs loaded: their warmup does not fit 5 steps


def test_control_characters_are_no_transcript(tmp_path):
    """An ASR that hears only control characters (or a metadata row holding them) gives no text: the segment is
    reported as an empty transcript, not kept with "\\x1b" as its words."""
    from csm.data.recordings import CutSettings, prepare

    class ControlCharacterASR:
        source, language = "test", "en"

        def transcribe(self, clips, rate):
            return ["\x1b\x07 \x00"] * len(clips)

    counts = prepare([SAMPLE / "clips" / "long_recording.flac"], tmp_path / "m.csv", settings=CutSettings(),
                     asr=ControlCharacterASR(), progress=False)
    assert counts["rows"] == 0 and counts["skipped"] > 0
    assert set(pd.read_csv(tmp_path / "m.csv.skipped.csv")["reason"]) == {"empty transcript"}


def test_jsonl_metadata_with_a_byte_order_mark_is_read(assets, tmp_path):
    df = pd.read_csv(SAMPLE / "train.csv").head(2)
    df["path"] = [str(SAMPLE / p) for p in df["path"]]
    (tmp_path / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + df.to_json(orient="records", lines=True).encode())
    assert _pretokenize(assets, "--train_data", tmp_path / "m.jsonl", "--output", tmp_path / "o.hdf5") == 0
    import h5py

    with h5py.File(tmp_path / "o.hdf5") as f:
        assert len(f["train/length"]) == 2


def test_a_sweep_refuses_fsdp_before_any_trial(data, assets, tmp_path):
    with pytest.raises(UserError,
                       match="every trial would fail: distributed: fsdp shards the model over the processes"):
        sweep.main([str(a) for a in ("--data", data, "--output_dir", tmp_path / "s", "--model", assets["model"],
                                     "--max_steps", 6, "--sweep_config", ROOT / "configs" / "sweep_demo.yaml",
                                     "--set", "distributed=fsdp")])
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("ends, status, said", [("return 3", 3, "the work's last words"),
                                                ("raise UserError('no such thing')", 2, "error: no such thing")])
def test_a_process_torchrun_started_exits_with_its_status_after_its_atexit_handlers_and_its_output(tmp_path, ends,
                                                                                                     status, said):
    """Under torchrun, run_cli ends the process without the interpreter's teardown (where gloo jobs that had done
    their work aborted): the status, the atexit handlers and the unflushed output must all still get out."""
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text(
        "import atexit, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from utils import run_cli\n"
        "from csm.system.errors import UserError\n"
        "def main():\n"
        f"    atexit.register(lambda: open({str(tmp_path / 'handled')!r}, 'w').write('yes'))\n"
        "    print(\"the work's last words\", end='')  # no newline: still in the buffer at exit\n"
        f"    {ends}\n"
        "run_cli(main)\n")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == status, done.stderr
    assert said in done.stdout + done.stderr and (tmp_path / "handled").read_text() == "yes"
