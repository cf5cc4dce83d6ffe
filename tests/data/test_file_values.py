"""Values read from files are checked against their range when the file opens, for each kind of file: a token
file's and a preference file's text ids against the model's vocabulary, a preference file's reference
log-probabilities (finite, at most 0), a metadata file's dnsmos column (DNSMOS's 1-5 scale)."""
import h5py
import numpy as np
import pandas as pd
import pytest

from csm.training import config
from csm.training import training
from conftest import write_token_file
from csm.data.metadata import check_row, SkipRow
from csm.data.preference_file import read_pairs
from csm.training.preferences import make_preference_file
from csm.data.tiny_assets import TEXT_VOCAB_SIZE
from csm.data.token_file import DataError


def _cfg(assets, **overrides):
    return config.make_config({"model": str(assets["model"]), "max_steps": 1, "batch_size": 2, "warmup_steps": 0,
                               "val_every": 0, "save_every": 0, "gen_every": 0, "wandb_mode": "disabled",
                               "precision": "fp32", **overrides})


def _set_row(path, dataset, row, values):
    with h5py.File(path, "r+") as f:
        f[dataset][row] = values


@pytest.mark.parametrize("bad", [TEXT_VOCAB_SIZE, 10**6, -1], ids=["the vocabulary's size", "far past it", "negative"])
def test_a_text_id_outside_the_models_vocabulary_is_one_line_before_training(assets, tmp_path, bad):
    """It was a traceback in the embedding, in token files and preference files alike."""
    tokens = write_token_file(tmp_path / "d.hdf5", n_train=4, n_val=2)
    with h5py.File(tokens, "r+") as f:  # the val split (checked too), row 1's second id
        f["val/text"][int(f["val/text_offsets"][1]) + 1] = bad
    with pytest.raises(DataError, match=rf"d.hdf5: /val holds text id {bad}, outside the model's text vocabulary "
                                        rf"\[0, {TEXT_VOCAB_SIZE}\)"):
        training.train(_cfg(assets), str(tokens), tmp_path / "run", device="cpu", progress=False)
    prefs = make_preference_file(tmp_path / "p.hdf5", assets["model"], n_train=4, n_val=0)
    with h5py.File(prefs, "r") as f:
        row = np.array(f["train/text"][2])
    row[1] = bad
    _set_row(prefs, "train/text", 2, row)
    with pytest.raises(DataError, match=rf"p.hdf5: /train holds text id {bad}, outside"):
        training.train(_cfg(assets, objective="dpo"), str(prefs), tmp_path / "run2", device="cpu", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run2" / "checkpoints").exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 0.5], ids=["NaN", "inf", "-inf", "positive"])
@pytest.mark.parametrize("column", ["ref_c0", "ref_decoder"])
def test_a_reference_log_probability_that_is_not_one_is_refused(assets, tmp_path, bad, column):
    """NaN or -inf steps were skipped and the run exited 0; a positive one trained silently."""
    prefs = make_preference_file(tmp_path / "p.hdf5", assets["model"], n_train=3, n_val=0)
    with h5py.File(prefs, "r") as f:
        row = np.array(f[f"train/rejected_{column}"][1])
    row[-1] = bad
    _set_row(prefs, f"train/rejected_{column}", 1, row)
    with pytest.raises(DataError, match=rf"/train/rejected_{column} of pair 1 holds {bad:g}, not a log-probability"):
        read_pairs(prefs, "train")
    with pytest.raises(DataError, match="not a log-probability"):
        training.train(_cfg(assets, objective="dpo"), str(prefs), tmp_path / "run", device="cpu", progress=False)


@pytest.mark.parametrize("score, reason", [(99, "dnsmos 99 is outside DNSMOS's 1-5 scale"),
                                           (0.5, "dnsmos 0.5 is outside"), (np.inf, "dnsmos inf is outside"),
                                           ("good", "dnsmos 'good' is not a number")])
def test_a_dnsmos_column_off_its_scale_skips_the_row_saying_so(score, reason):
    """A score of 99 was kept under any --min_dnsmos; an empty cell is no score (scored afresh when needed)."""
    raw = {"path": "a.wav", "text": "Hello.", "start": np.nan, "end": np.nan, "speaker": 0, "dnsmos": score}
    with pytest.raises(SkipRow, match=reason):
        check_row(0, raw)
    for fine in (np.nan, None, 1.0, 3.7, 5):
        assert check_row(0, {**raw, "dnsmos": fine}).text == "Hello."


def test_a_metadata_files_bad_dnsmos_rows_are_reported_as_skipped(assets, tmp_path):
    """Through pretokenize.py: the row is skipped with its reason in the report, the others kept."""
    import soundfile as sf

    import pretokenize

    wav = tmp_path / "a.wav"
    sf.write(wav, np.random.default_rng(0).normal(0, 0.1, 24000).astype(np.float32), 24000)
    pd.DataFrame({"path": [str(wav)] * 3, "text": ["One.", "Two.", "Three."], "dnsmos": [3.1, 99, np.nan]}).to_csv(
        tmp_path / "m.csv", index=False)
    out = tmp_path / "t.hdf5"
    assert pretokenize.main(["--train_data", str(tmp_path / "m.csv"), "--output", str(out), "--device", "cpu",
                             "--text_tokenizer", str(assets["text_tokenizer"]),
                             "--mimi_weights", str(assets["mimi"])]) == 0
    with h5py.File(out, "r") as f:
        assert len(f["train/length"]) == 2
    skipped = next(tmp_path.glob("t*skipped*"))
    assert "dnsmos 99 is outside DNSMOS's 1-5 scale" in skipped.read_text()
