"""Speaker identity: one mapping per token file, for every split and every kind of source, stored in the file
and followed by training, generate.py and evaluate.py."""
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

import generate
from csm.data import metadata
import pretokenize
from csm.system.errors import UserError
from conftest import token_rows

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


def _pretokenize(assets, output, *args):
    return pretokenize.main([*map(str, args), "--output", str(output), "--device", "cpu", "--save_every", "3",
                             "--text_tokenizer", str(assets["text_tokenizer"]), "--mimi_weights", str(assets["mimi"])])


def _speakers(path):
    with h5py.File(path) as f:
        return ({split: f[split]["speaker"][:].tolist() for split in f}, json.loads(f.attrs["speakers"]),
                {split: [t.tolist() for t in token_rows(path, split)[1]] for split in f})


def test_speaker_cells_are_ids_names_or_unknown():
    value = metadata.speaker_value
    assert [value(v) for v in (3, 3.0, np.int64(3), "3", " 12 ", "3.0", "0")] == [3, 3, 3, 3, 12, 3, 0]
    assert [value(v) for v in ("007", "alice", "p225", "²")] == ["007", "alice", "p225", "²"]
    assert [value(v) for v in (None, math.nan, np.float32("nan"), "", "  ", "nan")] == [None] * 6
    for bad in (-1, 2.5, 1e20, math.inf, "-1", "2.5", "1e20", "inf", "99999999999"):
        with pytest.raises(ValueError):
            value(bad)
    # Names take the lowest ids no integer uses, in sorted order; "007" stays apart from 7.
    names = metadata.speaker_numbers(["7", "007", "bob", 0, 2.0, "alice", math.nan, -4, "alice"])
    assert names == {"007": 1, "alice": 3, "bob": 4}
    assert [metadata.speaker_id(v, names) for v in ("7", 7.0, "007", "bob", None)] == [7, 7, 1, 4, None]
    assert metadata.speaker_id(-4, names) == -4  # left for check_row to skip with its reason


def test_metadata_speaker_names_are_numbered_once_across_splits(assets, tmp_path):
    """Names in a metadata file are numbered over train and val together, stored in the file, and training writes
    them beside the model, so generate.py --speaker NAME says the name's id."""
    df = pd.read_csv(SAMPLE / "train.csv").head(5)
    df["path"] = [str(SAMPLE / p) for p in df["path"]]
    train, val = df.head(3).copy(), df.tail(2).copy()
    train["speaker"], val["speaker"] = ["alice", "bob", "3"], ["bob", None]
    train.to_csv(tmp_path / "train.csv", index=False)
    val.to_json(tmp_path / "val.json", orient="records")
    # a BOM, as Windows writes
    (tmp_path / "val.json").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "val.json").read_bytes())
    out = tmp_path / "tokens.hdf5"
    assert _pretokenize(assets, out, "--train_data", tmp_path / "train.csv", "--val_data", tmp_path / "val.json") == 0
    speakers, names, texts = _speakers(out)
    assert names == {"alice": 0, "bob": 1}
    assert speakers == {"train": [0, 1, 3], "val": [1, -1]}  # val's bob is train's bob; no speaker: -1
    from csm.model.tokenization import load_text_tokenizer

    tok = load_text_tokenizer(str(assets["text_tokenizer"]))
    prefixes = [tok.decode(t[1:]).split("]")[0] + "]" for t in texts["train"] + texts["val"]]
    assert prefixes == ["[0]", "[1]", "[3]", "[1]", "[999]"]  # the unknown speaker speaks as [999], as the original

    from csm.training import training
    from csm.training.config import make_config

    cfg = make_config(dict(model=str(assets["model"]), text_tokenizer=str(assets["text_tokenizer"]),
                           mimi_weights=str(assets["mimi"]), max_steps=1, batch_size=2, warmup_steps=0, val_every=0,
                           save_every=0, gen_every=0, precision="fp32", wandb_mode="disabled"), "test")
    training.train(cfg, out, tmp_path / "run", device="cpu", progress=False)
    assert json.loads((tmp_path / "run" / "final" / "speakers.json").read_text()) == names

    said = []

    def fake_synthesize(model, tokenizer, mimi, requests, **kwargs):
        import torch

        from csm.judging.synthesis import Speech

        said.extend(r.speaker for r in requests)
        return [Speech(torch.zeros(1920), True, torch.zeros(32, 1, dtype=torch.int)) for _ in requests]

    generate.synthesize_batch, real = fake_synthesize, generate.synthesize_batch
    try:
        common = ["--model", str(tmp_path / "run" / "final"), "--text", "Hi.", "--device", "cpu",
                  "--mimi_weights", str(assets["mimi"])]
        for speaker, expected in (("bob", 1), ("3", 3), ("alice", 0)):
            generate.main([*common, "--speaker", speaker, "--output", str(tmp_path / f"{speaker}.wav")])
            assert said[-1] == expected
        with pytest.raises(UserError, match="neither an integer id nor one of the speaker names .alice, bob."):
            generate.main([*common, "--speaker", "carol", "--output", str(tmp_path / "c.wav")])
        # A local model's names are checked first: before the output (bob.wav exists) and before any loading.
        with pytest.raises(UserError, match="neither an integer id"):
            generate.main([*common, "--speaker", "carol", "--output", str(tmp_path / "bob.wav")])
        (tmp_path / "other.json").write_text(json.dumps({"carol": 5}))
        generate.main([*common, "--speaker", "carol", "--speakers", str(tmp_path / "other.json"),
                       "--output", str(tmp_path / "c.wav")])
        assert said[-1] == 5
    finally:
        generate.synthesize_batch = real

    import evaluate

    clip = df["path"][0]
    context = ["--context_audio", clip, "--context_text", "Hello.", "--device", "cpu"]
    with pytest.raises(UserError, match="--context_speaker 'carol' is neither .* names .alice, bob."):
        evaluate.main(["--eval_data", str(out), "--model", str(assets["model"]), "--output_dir", str(tmp_path / "e"),
                       *context, "--context_speaker", "carol"])


@pytest.fixture(scope="module")
def speaker_dataset(tmp_path_factory):
    """Train and val splits of the bundled clips, saved to disk, with a name column (names that look like numbers
    among them) and a float column holding integers and NaN."""
    from datasets import Audio, Dataset, DatasetDict

    df = pd.read_csv(SAMPLE / "train.csv").head(6)
    audio = [{"bytes": (SAMPLE / p).read_bytes(), "path": Path(p).name} for p in df["path"]]
    who = ["bob", "007", "7", "alice", "bob", "zed"]
    num = [3.0, math.nan, 3.0, 1.0, math.nan, 1.0]

    def split(rows):
        return Dataset.from_dict({"audio": [audio[i] for i in rows], "text": [df["text"][i] for i in rows],
                                  "who": [who[i] for i in rows],
                                  "num": [num[i] for i in rows]}).cast_column("audio", Audio())

    path = tmp_path_factory.mktemp("speakers") / "ds"
    DatasetDict({"train": split([0, 1, 2, 3]), "validation": split([4, 5])}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("column, names, train, val", [
    ("who", {"007": 0, "alice": 1, "bob": 2, "zed": 3}, [2, 0, 7, 1], [2, 3]),
    ("num", {}, [3, -1, 3, 1], [-1, 1]),
])
def test_dataset_speakers_are_one_mapping_read_in_place_or_streamed(assets, speaker_dataset, tmp_path, column, names,
                                                                     train, val):
    results = []
    for streaming in ([], ["--streaming"]):
        out = tmp_path / f"o{len(streaming)}.hdf5"
        assert _pretokenize(assets, out, "--train_data", f"{speaker_dataset}@train",
                            "--val_data", f"{speaker_dataset}@validation", "--speaker_column", column, *streaming) == 0
        results.append(_speakers(out))
    assert results[0] == results[1]
    speakers, stored, _ = results[0]
    assert stored == names and speakers == {"train": train, "val": val}
