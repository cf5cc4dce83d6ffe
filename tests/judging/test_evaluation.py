"""Quality evaluation: the WER/CER maths and normalisation, evaluate.py end to end with tiny random Whisper
and WavLM models built and saved by transformers, their loading from a hub cache, its errors, and the
training loop's eval_every / select_best_by / sweep --metric."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, wandb_log, write_token_file
from conftest import assert_clear_error, cli

SAMPLE = ROOT / "data" / "sample"


@pytest.fixture(scope="module")
def pretokenized(tmp_path_factory, assets):
    import pretokenize

    out = tmp_path_factory.mktemp("eval-data") / "data.hdf5"
    pretokenize.main(["--train_data", str(SAMPLE / "train.csv"), "--val_data", str(SAMPLE / "val.json"), "--output",
                      str(out), "--device", "cpu", "--text_tokenizer", str(assets["text_tokenizer"]),
                      "--mimi_weights", str(assets["mimi"])])
    return out


def common(assets, judges):
    return ["--model", assets["model"], "--text_tokenizer", assets["text_tokenizer"], "--mimi_weights", assets["mimi"],
            "--asr", judges["asr"], "--speaker_model", judges["speaker_model"], "--device", "cpu"]


# --------------------------------------------------------------------------- the metric maths


def test_wer_and_cer_against_hand_computed_cases():
    from csm.judging.speech_metrics import TextNormalizer, error_rates

    english = TextNormalizer("en")
    # Punctuation and case are normalised away; "a" for "the" is 1 substitution in 2 + 6 reference words.
    # Characters: "the" -> "a" is 3 edits (2 deletions, 1 substitution) in 11 + 22 reference characters.
    rates = error_rates(["Hello, world!", "The cat sat on the mat."], ["hello world", "the cat sat on a mat"], english)
    assert rates["words"] == 8 and rates["wer"] == pytest.approx(1 / 8)
    assert rates["chars"] == 33 and rates["cer"] == pytest.approx(3 / 33)
    # Whisper's English normaliser: titles, contractions and spelled numbers.
    assert english("Mr. Smith won't pay twenty-one dollars.") == "mister smith will not pay $21"
    assert error_rates(["Mr. Smith won't go."], ["mister smith will not go"], english)["wer"] == 0
    # One insertion in three words; one deletion in four.
    assert error_rates(["a big cat"], ["a big fat cat"], english)["wer"] == pytest.approx(1 / 3)
    assert error_rates(["red green blue gold"], ["red green gold"], english)["wer"] == pytest.approx(1 / 4)
    # Another language: the basic normaliser keeps letters with diacritics and drops punctuation.
    german = TextNormalizer("de")
    assert not german.english and german("Größe, bitte!  Danke.") == "größe bitte danke"
    assert error_rates(["Die Straße ist lang."], ["die strasse ist lang"], german)["wer"] == pytest.approx(1 / 4)
    # A reference that normalises to nothing cannot be scored and is left out, not divided by zero.
    rates = error_rates(["(laughs)", "a b"], ["x", "a b"], english)
    assert rates["scored"] == 1 and rates["wer"] == 0
    assert error_rates(["Um?!"], ["x"], english)["wer"] is None


def test_a_perfect_transcript_scores_zero_for_every_reference_text():
    from csm.judging.speech_metrics import TextNormalizer, error_rates

    texts = list(pd.read_csv(SAMPLE / "train.csv")["text"]) + list(pd.read_json(SAMPLE / "val.json")["text"])
    for language in ("en", "fr"):
        rates = error_rates(texts, list(texts), TextNormalizer(language))
        assert rates["wer"] == 0 and rates["cer"] == 0 and rates["scored"] == len(texts)


def test_selection_reads_each_metric_the_right_way_round():
    from csm.training.training import selection_score

    assert selection_score("wer", {"wer": 0.3, "val_loss": 2.0}) == 0.3
    assert selection_score("speaker_sim", {"speaker_sim": 0.8}) == -0.8  # higher similarity is better
    assert selection_score("wer", {"val_loss": 2.0}) is None  # a step that measured no WER selects nothing
    assert selection_score("val_loss", {"val_loss": float("nan")}) is None
    scores = [selection_score("cer", {"cer": v}) for v in (0.8, 0.5, 0.7)]
    assert int(np.argmin(scores)) == 1


# --------------------------------------------------------------------------- evaluate.py


@pytest.mark.slow
def test_evaluate_end_to_end_from_a_metadata_file(assets, judges, tmp_path):
    out = tmp_path / "eval"
    rc, err = cli("evaluate.py", "--eval_data", SAMPLE / "train.csv", "--n", 3, "--output_dir", out,
                  "--max_audio_seconds", 1, *common(assets, judges))
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_items"] == 3 and summary["n_failed"] == 0 and summary["reference_audio"] == "recordings"
    assert summary["normalizer"] == "whisper-english"
    for what in ("generated", "reference", "codec"):  # the model and both ceilings, each over every item
        assert summary[what]["n"] == 3 and 0 <= summary[what]["cer"] and -1 <= summary[what]["speaker_sim"] <= 1
    generated = summary["generated"]
    assert 0 <= generated["eos_rate"] <= 1 and generated["duration_ratio"] > 0 and generated["rtf"] > 0
    # DNSMOS, the real model: the recordings (real speech) sound far better than the tiny random model's noise.
    for what in ("generated", "reference", "codec"):
        assert all(1 <= summary[what][f"dnsmos_{k}"] <= 5 for k in ("ovrl", "sig", "bak", "p808"))
    assert summary["reference"]["dnsmos_ovrl"] > 2.5 > summary["generated"]["dnsmos_ovrl"]
    rows = list(csv.DictReader((out / "items.csv").open()))
    assert len(rows) == 3 and all(r["error"] == "" and r["wer"] != "" for r in rows)
    assert all(r["dnsmos_ovrl"] != "" and r["reference_dnsmos_ovrl"] != "" for r in rows)
    page = (out / "report.html").read_text()
    for row in rows:
        for kind in ("reference", "generated", "codec"):
            wav = out / "wavs" / f"{row['id']}_{kind}.wav"
            assert wav.is_file() and f"wavs/{wav.name}" in page
    # The corpus WER is the metric code's over the transcripts the CSV records.
    from csm.judging.speech_metrics import TextNormalizer, error_rates

    redone = error_rates([r["text"] for r in rows], [r["transcript"] for r in rows], TextNormalizer("en"))
    assert redone["wer"] == pytest.approx(generated["wer"])


@pytest.mark.slow
def test_the_numbers_do_not_depend_on_the_batch_size(assets, judges, tmp_path):
    """Each item samples from its own seed: batches of 1 and of 3 give the same audio, transcripts and scores."""
    results = {}
    for size in (1, 3):
        out = tmp_path / f"eval{size}"
        rc, err = cli("evaluate.py", "--eval_data", SAMPLE / "train.csv", "--n", 3, "--output_dir", out,
                      "--max_audio_seconds", 1, "--no_ceilings", "--batch_size", size, *common(assets, judges))
        assert rc == 0, err
        rows = list(csv.DictReader((out / "items.csv").open()))
        wavs = {p.name: p.read_bytes() for p in (out / "wavs").glob("*_generated.wav")}
        results[size] = ([(r["id"], r["transcript"], r["wer"], r["speaker_sim"], r["duration_s"]) for r in rows], wavs)
    assert len(results[1][1]) == 3 and results[1] == results[3]


@pytest.mark.slow
def test_evaluate_a_token_file_split_with_a_voice_prompt(assets, judges, pretokenized, tmp_path):
    out = tmp_path / "eval"
    prompt = SAMPLE / "clips" / "train_00.flac"
    rc, err = cli("evaluate.py", "--eval_data", pretokenized, "--split", "val", "--n", 0, "--output_dir", out,
                  "--max_audio_seconds", 1, "--language", "de", "--context_audio", prompt, "--context_text",
                  "The quick brown fox jumps over the lazy dog.", "--context_speaker", 0, *common(assets, judges))
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    val = pd.read_json(SAMPLE / "val.json")
    assert summary["n_items"] == len(val) and summary["split"] == "val"
    # A token file holds codes, not recordings: its references are already Mimi's, so there is no codec row.
    assert summary["reference_audio"] == "codes" and summary["codec"] is None and summary["reference"]["n"] == len(val)
    assert summary["normalizer"] == "whisper-basic" and summary["language"] == "de"
    assert -1 <= summary["generated"]["prompt_speaker_sim"] <= 1  # similarity to the prompt, beside the reference's
    assert all(r["prompt_speaker_sim"] != "" for r in csv.DictReader((out / "items.csv").open()))
    texts = sorted(r["text"] for r in csv.DictReader((out / "items.csv").open()))
    assert texts == sorted(val["text"])  # the texts decoded from the token file are the metadata's


def test_a_failing_item_is_reported_and_skipped(assets, judges, tmp_path):
    rows = pd.read_csv(SAMPLE / "train.csv").head(2)
    rows["path"] = [str(SAMPLE / p) for p in rows["path"]]
    rows.loc[1, "text"] = "word " * 2500  # more text frames than the model's 2048-frame window
    meta = tmp_path / "meta.csv"
    rows.to_csv(meta, index=False)
    out = tmp_path / "eval"
    rc, err = cli("evaluate.py", "--eval_data", meta, "--output_dir", out, "--max_audio_seconds", 1,
                  "--no_ceilings", *common(assets, judges))
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_items"] == 2 and summary["n_failed"] == 1 and summary["generated"]["n"] == 1
    assert summary["reference"] is None and summary["codec"] is None
    failed = [r for r in csv.DictReader((out / "items.csv").open()) if r["error"]]
    assert len(failed) == 1 and "2048-frame limit" in failed[0]["error"]
    assert "generation failed" in err
    # Every item failing is no evaluation: exit 1 (it was 0), the report still written to say why.
    rows.loc[0, "text"] = "word " * 2500
    rows.to_csv(meta, index=False)
    rc, err = cli("evaluate.py", "--eval_data", meta, "--output_dir", out, "--max_audio_seconds", 1,
                  "--no_ceilings", "--overwrite", *common(assets, judges))
    assert rc == 1 and "every one of the 2 items failed to generate" in err
    assert json.loads((out / "summary.json").read_text())["n_failed"] == 2


def test_judges_that_cannot_be_loaded_fail_in_one_line_before_any_generation(assets, judges, tmp_path):
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(judges["asr"], broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 100)
    base = ["--eval_data", SAMPLE / "train.csv", "--n", 2, "--device", "cpu", "--model", assets["model"],
            "--text_tokenizer", assets["text_tokenizer"], "--mimi_weights", assets["mimi"]]
    cases = [(["--asr", tmp_path / "missing", "--speaker_model", judges["speaker_model"]], "--asr"),
             (["--asr", not_a_model, "--speaker_model", judges["speaker_model"]], "no config.json"),
             (["--asr", broken, "--speaker_model", judges["speaker_model"]], "could not be loaded"),
             (["--asr", judges["asr"], "--speaker_model", judges["asr"]], "--speaker_model"),
             (["--asr", "nobody/no-such-asr", "--speaker_model", judges["speaker_model"]], "not in the local cache")]
    import evaluate
    from csm.system.errors import UserError

    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        if i == 0:  # the command line's one-line form once; the others in process (no interpreter start each)
            rc, err = cli("evaluate.py", *base, *args, "--output_dir", out)
            assert_clear_error(rc, err, message)
            assert "evaluating" not in err
        else:
            with pytest.raises(UserError, match=message.replace("-", r"\-")):
                evaluate.main([str(a) for a in (*base, *args, "--output_dir", out)])
        assert not any(out.rglob("*.wav"))


def test_evaluate_bad_numbers_inputs_and_outputs(assets, judges, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    inside = tmp_path / "inside"
    inside.mkdir()
    shutil.copy(SAMPLE / "train.csv", inside / "meta.csv")
    meta = SAMPLE / "train.csv"
    cases = [(["--eval_data", meta, "--n=-1"], "--n"),
             (["--eval_data", meta, "--temperature", "nan"], "--temperature"),
             (["--eval_data", meta, "--max_audio_seconds", 0], "--max_audio_seconds"),
             (["--eval_data", meta, "--max_audio_seconds", "1e9"], "--max_audio_seconds"),
             (["--eval_data", tmp_path], "directory"),
             (["--eval_data", tmp_path / "none.csv"], "no such file"),
             (["--eval_data", meta, "--output_dir", busy], "--overwrite"),
             (["--eval_data", inside / "meta.csv", "--output_dir", inside, "--overwrite"], "inside --output_dir"),
             (["--eval_data", meta, "--output_dir", meta], "is a file")]
    import evaluate
    from csm.system.errors import UserError

    # In process (each is refused before any model loads; the one-line CLI form is checked by the tests above).
    for args, message in cases:
        if "--output_dir" not in args:
            args = [*args, "--output_dir", tmp_path / "out"]
        with pytest.raises(UserError, match=message.replace("-", r"\-")):
            evaluate.main([str(a) for a in (*args, *common(assets, judges))])
    assert (busy / "keep.txt").read_text() == "mine" and (inside / "meta.csv").is_file()


def test_judges_load_from_the_hub_cache_by_id_and_bin_only_repos_work(judges, hub_cache, tmp_path):
    from csm.judging.speech_metrics import QualityModels

    asr_files = {p.name: p for p in Path(judges["asr"]).iterdir()}
    hub_cache("acme/whisper-tiny-random", asr_files)
    # microsoft/wavlm-base-plus-sv ships PyTorch .bin weights only: lay one out like that.
    speaker = {p.name: p for p in Path(judges["speaker_model"]).iterdir() if p.suffix != ".safetensors"}
    bin_file = tmp_path / "pytorch_model.bin"
    torch.save(load_file(str(Path(judges["speaker_model"]) / "model.safetensors")), bin_file)
    hub_cache("acme/wavlm-tiny-random", {**speaker, "pytorch_model.bin": bin_file})
    quality = QualityModels("acme/whisper-tiny-random", "acme/wavlm-tiny-random", "en")
    local = QualityModels(str(judges["asr"]), str(judges["speaker_model"]), "en")
    clip = np.random.default_rng(0).standard_normal(24000).astype(np.float32) * 0.1
    assert torch.allclose(quality.speaker.embed(clip, 24000), local.speaker.embed(clip, 24000))
    assert quality.asr.transcribe([clip], 24000) == local.asr.transcribe([clip], 24000)


# --------------------------------------------------------------------------- in training


def train_cfg(assets, judges, **overrides):
    from csm.training import config

    values = dict(model=str(assets["model"]), text_tokenizer=str(assets["text_tokenizer"]),
                  mimi_weights=str(assets["mimi"]), batch_size=4, learning_rate=3e-3, warmup_steps=1, max_steps=3,
                  val_every=1, save_every=1, keep_checkpoints=10, gen_every=0, log_every=1, wandb_mode="disabled",
                  precision="fp32", seed=0, eval_every=1, eval_n=2, eval_max_seconds=0.5,
                  eval_asr=str(judges["asr"]), eval_speaker_model=str(judges["speaker_model"]))
    values.update(overrides)
    return config.make_config(values)


def step_weights(out: Path, step: int) -> dict:
    from csm.training.checkpoint import read_checkpoint

    return read_checkpoint(out / "checkpoints" / f"step_{step:07d}.pt")["model"]


@pytest.mark.slow
# speaker_sim (maximised): test_two_gloo_processes_evaluate_once...; dnsmos_ovrl is maximised too
@pytest.mark.parametrize("select_by", ["wer", "dnsmos_ovrl"])
def test_quality_metrics_are_logged_and_select_best(assets, judges, pretokenized, tmp_path, select_by):
    from csm.training import training
    from csm.training.tracking import read_metrics
    from csm.model.weights import read_model_weights

    out = tmp_path / "run"
    training.train(train_cfg(assets, judges, select_best_by=select_by), pretokenized, out, device="cpu", progress=False)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "wer" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all({"wer", "cer", "speaker_sim", "eos_rate", "duration_ratio", "rtf", "dnsmos_ovrl", "dnsmos_sig",
                "dnsmos_bak", "dnsmos_p808"} <= set(r) for r in rows)
    values = [r[select_by] for r in rows]
    maximised = select_by in ("speaker_sim", "dnsmos_ovrl")
    best = rows[int(np.argmax(values) if maximised else np.argmin(values))]["step"]  # first of ties
    saved, _ = read_model_weights(out / "best")
    expected = step_weights(out, best)
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    assert {p.name for p in (out / "eval").iterdir()} == {"step_0000001", "step_0000002", "step_0000003"}
    assert json.loads((out / "eval" / "step_0000002" / "summary.json").read_text())["step"] == 2


@pytest.mark.slow
def test_select_best_by_judges_the_average_by_its_own_quality_evaluation(assets, judges, pretokenized, tmp_path):
    """With ema_decay, each quality evaluation runs again on the average (eval/step_N_ema/, logged as ema_cer, ...),
    and best_ema/ holds the average of the step whose ema_speaker_sim was highest. Resumed with another
    select_best_by, best_ema/ is chosen afresh, as best/ is (the old best's score means something else)."""
    import shutil

    from csm.training import training
    from csm.training.checkpoint import read_checkpoint
    from csm.training.tracking import read_metrics
    from csm.model.weights import read_model_weights

    out = tmp_path / "run"
    training.train(train_cfg(assets, judges, select_best_by="speaker_sim", ema_decay=0.5, eval_dnsmos=False),
                   pretokenized, out, device="cpu", progress=False)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "ema_speaker_sim" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all("ema_cer" in r for r in rows)
    assert {p.name for p in (out / "eval").iterdir()} == {f"step_000000{i}{s}" for i in (1, 2, 3) for s in ("", "_ema")}
    assert json.loads((out / "eval" / "step_0000002_ema" / "summary.json").read_text())["weights"] == "average"
    best = rows[int(np.argmax([r["ema_speaker_sim"] for r in rows]))]["step"]
    saved, _ = read_model_weights(out / "best_ema")
    average = read_checkpoint(out / "checkpoints" / f"step_{best:07d}.pt")["ema"]["average"]
    assert all(torch.equal(saved[k], average[k]) for k in average)

    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(out / "checkpoints" / "step_0000002.pt", part / "checkpoints")
    training.train(train_cfg(assets, judges, select_best_by="cer", ema_decay=0.5, eval_dnsmos=False), pretokenized,
                   part, device="cpu", progress=False, resume="auto")
    saved, _ = read_model_weights(part / "best_ema")  # step 3, the one cer measured since
    average = read_checkpoint(part / "checkpoints" / "step_0000003.pt")["ema"]["average"]
    assert all(torch.equal(saved[k], average[k]) for k in average)


def test_quality_evaluation_settings_are_checked_before_training(assets, judges, pretokenized, tmp_path):
    from csm.training import config
    from csm.training import training
    from csm.system.errors import UserError

    with pytest.raises(UserError, match="eval_every"):
        config.make_config({"select_best_by": "wer"})
    no_val = write_token_file(tmp_path / "noval.hdf5", n_val=0)
    with pytest.raises(UserError, match="val split"):
        training.train(train_cfg(assets, judges), no_val, tmp_path / "a", device="cpu", progress=False)
    with pytest.raises(UserError, match="--asr"):
        training.train(train_cfg(assets, judges, eval_asr=str(tmp_path / "nope")), pretokenized, tmp_path / "b",
                       device="cpu", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_sweep_optimises_wer(assets, judges, pretokenized, tmp_path):
    import optuna

    out = tmp_path / "sweep"
    space = tmp_path / "space.yaml"
    space.write_text("learning_rate: {type: float, min: 1.0e-4, max: 1.0e-2, log: true}\n")
    flags = ["--data", pretokenized, "--sweep_config", space, "--output_dir", out, "--n_trials", 1, "--n_workers", 1,
             "--max_steps", 1, "--model", assets["model"], "--wandb_mode", "disabled", "--metric", "wer",
             "--set", "batch_size=4", "--set", "warmup_steps=0", "--set", f"text_tokenizer={assets['text_tokenizer']}",
             "--set", f"mimi_weights={assets['mimi']}", "--set", "eval_n=2", "--set", "eval_max_seconds=0.5",
             "--set", f"eval_asr={judges['asr']}", "--set", f"eval_speaker_model={judges['speaker_model']}"]
    import sweep
    from csm.system.errors import UserError

    with pytest.raises(UserError, match="eval_every"):  # in this process: a command line costs a Python start
        sweep.main([str(f) for f in flags])
    rc, err = cli("sweep.py", *flags, "--set", "eval_every=1")
    assert rc == 0, err
    study = optuna.load_study(study_name="csm-sweep", storage=f"sqlite:///{out / 'study.db'}")
    from csm.training.tracking import best_logged

    assert study.best_value == best_logged(out / "trials" / "trial_0000", "wer")
    with pytest.raises(UserError, match="maximize"):
        sweep.main([str(f) for f in (*flags, "--set", "eval_every=1", "--metric", "speaker_sim", "--n_trials", 2)])


def test_quality_evaluation_goes_to_wandb_as_a_table(assets, judges, pretokenized, tmp_path, monkeypatch):
    from csm.training import training

    # W&B logs a table holding media as a run artifact, staged under its data dir until `wandb sync`.
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    out = tmp_path / "run"
    training.train(train_cfg(assets, judges, max_steps=1, warmup_steps=0, wandb_mode="offline"), pretokenized, out,
                   device="cpu", progress=False)
    run_dir = next((out / "wandb").glob("offline-run-*"))
    table = json.loads(next(run_dir.glob("files/media/table/eval_items_*.table.json")).read_text())
    assert table["columns"][-2:] == ["generated", "reference"] and len(table["data"]) == 2
    staged = [p for p in (tmp_path / "wandb-data").rglob("*") if p.is_file()]
    assert sum(p.read_bytes()[:4] == b"RIFF" for p in staged) == 4  # generated + reference audio of 2 items
    keys = ("eval_items", "wer", "cer", "speaker_sim", "eos_rate")
    log = wandb_log(run_dir, keys)
    assert all(key.encode() in log for key in keys), [k for k in keys if k.encode() not in log]


@pytest.mark.slow
def test_two_gloo_processes_evaluate_once_and_agree_on_best(assets, judges, pretokenized, tmp_path):
    import os
    import sys

    from conftest import free_port, run_torchrun
    from csm.training.tracking import read_metrics
    from csm.model.weights import read_model_weights

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "train.py", "--data", str(pretokenized), "--model", str(assets["model"]), "--max_steps", "2",
           "--output_dir", str(out), "--device", "cpu", "--wandb_mode", "disabled", "--gen_every", "0",
           "--save_every", "1", "--val_every", "1", "--batch_size", "2", "--warmup_steps", "1",
           "--learning_rate", "3e-3",
           "--text_tokenizer", str(assets["text_tokenizer"]), "--mimi_weights", str(assets["mimi"]),
           "--set", "keep_checkpoints=5", "--set", "eval_every=1", "--set", "eval_n=2", "--set", "eval_max_seconds=0.5",
           "--set", f"eval_asr={judges['asr']}", "--set", f"eval_speaker_model={judges['speaker_model']}",
           "--set", "select_best_by=speaker_sim", "--set", "precision=fp32"]
    proc = run_torchrun(cmd, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "speaker_sim" in r]
    assert [r["step"] for r in rows] == [1, 2]  # rank 0 evaluates; rank 1 logs nothing
    best = rows[int(np.argmax([r["speaker_sim"] for r in rows]))]["step"]
    saved, _ = read_model_weights(out / "best")
    expected = step_weights(out, best)
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_evaluate_speaks_after_the_prompt_of_a_training_config(assets, judges, tmp_path):
    import yaml

    prompt = {"audio": str(SAMPLE / "clips" / "train_00.flac"), "text": "The quick brown fox jumps over the lazy dog.",
              "speaker": 0}
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump({"gen_context": [prompt]}))
    bad.write_text(yaml.safe_dump({"gen_context": [{**prompt, "audio": str(tmp_path / "gone.wav")}]}))
    base = ["--eval_data", SAMPLE / "val.json", "--n", 1, "--max_audio_seconds", 0.5, "--no_ceilings",
            *common(assets, judges)]
    rc, err = cli("evaluate.py", *base, "--output_dir", tmp_path / "a", "--context_from_config", bad)
    assert_clear_error(rc, err, "gone.wav")
    rc, err = cli("evaluate.py", *base, "--output_dir", tmp_path / "b", "--context_from_config", good)
    assert rc == 0, err
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["generated"]["n"] == 1


def test_evaluate_takes_an_adapter(assets, judges, tmp_path):
    from csm.model import adapters
    from csm.training import config
    from csm.model import weights

    cfg = config.make_config({"finetune": "lora", "lora_rank": 2, "model": str(assets["model"])})
    model = adapters.apply_finetune_mode(weights.load_model(assets["model"]), cfg)
    adapters.save_adapter(model, tmp_path / "adapter", cfg)
    rc, err = cli("evaluate.py", "--eval_data", SAMPLE / "val.json", "--n", 1, "--max_audio_seconds",
                  0.5, "--no_ceilings",
                  "--adapter", tmp_path / "adapter", "--output_dir", tmp_path / "eval", *common(assets, judges))
    assert rc == 0, err
    rc, err = cli("evaluate.py", "--eval_data", SAMPLE / "val.json", "--adapter", tmp_path / "none",
                  "--output_dir", tmp_path / "eval2", *common(assets, judges))
    assert_clear_error(rc, err, "--adapter")


def test_items_carry_the_earlier_turns_of_their_conversation(tmp_path):
    """context_turns: each item of a metadata file with conversation and turn columns gets the recordings of the
    turns before it (the last N, in order); a row that stands alone gets none."""
    from csm.judging.evaluation import earlier_turns, load_items

    clips = SAMPLE / "clips"
    rows = [{"path": str(clips / f"train_0{i}.flac"), "text": f"turn {i}", "speaker": i % 2,
             "conversation": "a" if i < 3 else "", "turn": 3 - i} for i in range(4)]  # turns in reverse row order
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    items, skipped = load_items(tmp_path / "m.csv", n=None, context_turns=2)
    assert not skipped
    context = {item.row: [(seg.text, seg.speaker) for seg in item.context] for item in items}
    assert context == {0: [("turn 2", 0), ("turn 1", 1)], 1: [("turn 2", 0)], 2: [], 3: []}
    from csm.data.audio_io import read_audio

    assert np.array_equal(items[0].context[0].audio.numpy(), read_audio(str(clips / "train_02.flac")))
    assert earlier_turns(["x", "x", "x"], [0.0, 1.0, 2.0], [2], 1) == {2: [1]}


def test_a_token_file_row_without_text_is_skipped_with_a_reason(tmp_path, text_tokenizer):
    from csm.data import token_file
    from csm.judging.evaluation import load_items

    path = tmp_path / "t.hdf5"
    ids = [np.array([0, 1], np.int32), np.array([0, *text_tokenizer.encode("[0]Hello there.",
                                                                         add_special_tokens=False), 1], np.int32)]
    with token_file.write_token_file(path, {"codebooks": 32}) as out:
        out.write_split("val", [np.zeros(32 * 3, np.int16)] * 2, ids)
    items, skipped = load_items(path, split="val", tokenizer=text_tokenizer)
    assert [(i.row, i.text) for i in items] == [(1, "Hello there.")]
    assert skipped == [(0, "its text ids decode to no text")]
