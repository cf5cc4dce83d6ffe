"""Several token files in one run: sources mixed by weight (drawn anew each epoch from the seed), exact resume
across them, val_loss per source beside the total, one speaker mapping, and the same lists through the sweep's
checks and a DPO run."""
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import write_token_file
from csm.system.errors import UserError
from csm.training import training
from csm.training.preferences import make_preference_file
from dataloaders import LengthBucketSampler, source_paths
from test_train import metrics, tiny_cfg


def test_each_source_gives_its_share_of_an_epoch_drawn_from_the_seed():
    sizes, weights = [100, 20, 5], [0.5, 0.3, 0.2]
    lengths = np.random.default_rng(0).integers(10, 60, sum(sizes))
    sampler = LengthBucketSampler(lengths, batch_size=4, seed=3, mix=(sizes, weights))
    rows = sampler.epoch_rows(0)
    per_source = np.bincount(np.searchsorted(np.cumsum(sizes), rows, side="right"), minlength=3)
    assert per_source.tolist() == [62, 38, 25]  # 0.5 / 0.3 / 0.2 of the 125 examples an epoch holds
    assert np.bincount(rows[rows >= 120] - 120).tolist() == [5] * 5  # the small source repeats whole
    assert np.array_equal(sampler.epoch_rows(0), LengthBucketSampler(lengths, batch_size=4, seed=3,
                                                                     mix=(sizes, weights)).epoch_rows(0))
    assert not np.array_equal(rows, sampler.epoch_rows(1))  # a new draw each epoch
    batched = np.sort(np.concatenate(sampler.global_batches(0)))
    assert np.array_equal(batched, np.sort(rows))  # the batches hold exactly the epoch's draw


@pytest.fixture
def two_sources(tmp_path):
    a = write_token_file(tmp_path / "a.hdf5", n_train=10, n_val=3, seed=1)
    b = write_token_file(tmp_path / "b.hdf5", n_train=4, n_val=2, seed=2, audio_frames=(3, 5))
    return a, b


def test_a_weighted_mix_trains_reports_each_source_and_resumes_exactly(assets, tmp_path, two_sources):
    cfg = tiny_cfg(assets, batch_size=3, max_steps=6, save_every=3, val_every=3, data_weights=[0.4, 0.6])
    full, part = tmp_path / "full", tmp_path / "part"
    training.train(cfg, list(map(str, two_sources)), full, device="cpu", progress=False)
    val = [m for m in metrics(full) if "val_loss" in m]
    assert val and all({"val_loss/a", "val_loss/b"} <= set(m) for m in val)
    # The total is over both val splits: between the two sources' own losses.
    assert all(min(m["val_loss/a"], m["val_loss/b"]) <= m["val_loss"] <= max(m["val_loss/a"], m["val_loss/b"])
               for m in val)
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step_0000003.pt", part / "checkpoints" / "step_0000003.pt")
    training.train(cfg, list(map(str, two_sources)), part, device="cpu", resume="auto", progress=False)
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(part / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_glob_names_the_sources_and_weights_must_match_them(assets, tmp_path, two_sources):
    import train

    assert source_paths(str(tmp_path / "*.hdf5")) == [str(p) for p in two_sources]
    with pytest.raises(UserError, match="matches no file"):
        source_paths(str(tmp_path / "none*.hdf5"))
    with pytest.raises(UserError, match="names .* twice"):
        source_paths([str(two_sources[0]), str(tmp_path / "a*.hdf5")])
    common = ["--model", str(assets["model"]), "--device", "cpu", "--wandb_mode", "disabled", "--gen_every", "0",
              "--batch_size", "4", "--max_steps", "2", "--val_every", "2", "--save_every", "0", "--warmup_steps", "0"]
    with pytest.raises(UserError, match=r"data_weights has 3 weight\(s\) for 2 source\(s\)"):
        train.main(["--data", str(tmp_path / "*.hdf5"), "--output_dir", str(tmp_path / "r1"),
                    "--set", "data_weights=[1, 2, 3]", *common])
    for bad in ("[0.5, 0]", "[0.5, -1]", "[0.5, .nan]"):
        with pytest.raises(UserError, match="data_weights"):
            train.main(["--data", *map(str, two_sources), "--output_dir", str(tmp_path / "r2"),
                        "--set", f"data_weights={bad}", *common])
    assert train.main(["--data", str(tmp_path / "*.hdf5"), "--output_dir", str(tmp_path / "r3"), *common]) == 0
    assert {"val_loss/a", "val_loss/b"} <= set(metrics(tmp_path / "r3")[-1])


def test_speaker_names_are_one_mapping_and_a_disagreement_names_both_sources(assets, tmp_path, two_sources):
    a, b = two_sources
    for path, names in ((a, {"alice": 0}), (b, {"alice": 0, "bob": 1})):
        with h5py.File(path, "r+") as f:
            f.attrs["speakers"] = json.dumps(names)
    assert training.merged_speaker_names([str(a), str(b)]) == {"alice": 0, "bob": 1}
    with h5py.File(b, "r+") as f:
        f.attrs["speakers"] = json.dumps({"alice": 1})
    with pytest.raises(UserError, match=rf"speaker 'alice' is id 0 in {a} but id 1 in {b}"):
        training.merged_speaker_names([str(a), str(b)])
    with h5py.File(b, "r+") as f:
        f.attrs["speakers"] = json.dumps({"carol": 0})
    with pytest.raises(UserError, match=rf"speaker id 0 is 'alice' in {a} but 'carol' in {b}"):
        training.merged_speaker_names([str(a), str(b)])


def test_the_sweep_checks_and_dpo_take_the_same_lists(assets, tmp_path, two_sources):
    cfg = tiny_cfg(assets, batch_size=2, max_steps=None, n_epochs=1, data_weights=[1, 1])
    one = training.planned_steps(tiny_cfg(assets, batch_size=2, max_steps=None, n_epochs=1), str(two_sources[0]))
    assert training.planned_steps(cfg, list(map(str, two_sources))) > one  # an epoch of both holds more batches
    prefs = [make_preference_file(tmp_path / f"p{i}.hdf5", assets["model"], n_train=4, n_val=2, seed=i)
             for i in range(2)]
    dpo = tiny_cfg(assets, objective="dpo", batch_size=2, max_steps=2, val_every=2, save_every=0, warmup_steps=0,
                   data_weights=[0.5, 0.5])
    training.train(dpo, list(map(str, prefs)), tmp_path / "dpo", device="cpu", progress=False)
    assert {"val_loss", "val_loss/p0", "val_loss/p1"} <= set(metrics(tmp_path / "dpo")[-1])


def test_no_data_at_all_is_one_line(tmp_path):
    import train

    with pytest.raises(UserError, match="no training data: give --data"):
        train.main(["--output_dir", str(tmp_path / "run"), "--device", "cpu"])
    assert not (tmp_path / "run").exists()
