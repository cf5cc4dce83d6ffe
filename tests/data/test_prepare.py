"""From raw audio and datasets to training data: prepare.py with the real silero-vad model on a long
recording made of the bundled clips, transcription through a tiny random Whisper, resume, the reports;
pretokenize.py reading `datasets` datasets (on disk, streamed, through load_dataset) to the same codes as
the same clips given as files."""
import csv
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from conftest import ROOT, token_rows
from conftest import assert_clear_error, cli, fails_clearly

SAMPLE = ROOT / "data" / "sample"
RATE = 24000


def long_recording(path: Path, clips: list[str], gap: float = 1.0) -> list[tuple[float, float]]:
    from csm.data.tiny_assets import make_long_recording

    return make_long_recording(path, [SAMPLE / c for c in clips], gap)


CLIPS = list(pd.read_csv(SAMPLE / "train.csv")["path"][:4])


def rows_of(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_the_real_vad_finds_the_known_utterances(tmp_path):
    bounds = long_recording(tmp_path / "rec" / "long.wav", CLIPS)
    out = tmp_path / "meta.csv"
    rc, err = cli("prepare.py", "--audio", tmp_path / "rec", "--output", out, "--asr", "none", "--min_seconds", 1)
    assert rc == 0, err
    rows = rows_of(out)
    assert len(rows) == len(bounds)
    for row, (start, end) in zip(rows, bounds):
        assert abs(float(row["start"]) - start) < 0.3 and abs(float(row["end"]) - end) < 0.3, (row, start, end)
        assert row["path"] == "rec/long.wav" and row["text"] == "" and row["speaker"] == "0"
    assert json.loads((tmp_path / "meta.csv.speakers.json").read_text()) == {"rec": 0}
    # --asr none leaves the text to the user; pretokenize.py then reports those rows as skipped.


def test_cutting_joins_short_pauses_splits_long_speech_and_drops_short_bits():
    from csm.data.recordings import CutSettings, cut_utterances

    s = CutSettings(min_seconds=2, max_seconds=10, min_silence=0.5)
    regions = [(0.0, 3.0), (3.2, 4.0),          # a 0.2 s pause: one utterance 0-4
               (5.0, 5.5),                       # alone after a 1 s pause, 0.5 s long: dropped
               (7.0, 11.0), (11.3, 13.0), (13.1, 18.5)]  # 11.5 s with pauses 0.3 and 0.1: split at the 0.3 one
    kept, dropped = cut_utterances(regions, s)
    assert kept == [(0.0, 4.0), (7.0, 11.0), (11.3, 18.5)]
    assert [(a, b) for a, b, _ in dropped] == [(5.0, 5.5)] and "min_seconds" in dropped[0][2]
    kept, _ = cut_utterances([(0.0, 25.0)], s)  # continuous speech: equal parts under the maximum
    assert kept == [(0.0, 25 / 3), (25 / 3, 50 / 3), (50 / 3, 25.0)]


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    from csm.data import tiny_assets

    return tiny_assets.make_whisper(tmp_path_factory.mktemp("asr") / "whisper")


def test_transcription_goes_through_the_asr_model_and_bad_recordings_are_reported(whisper, tmp_path):
    from csm.data.recordings import VAD_RATE, read_16k
    from csm.judging.speech_metrics import ASR

    rec = tmp_path / "alice"
    long_recording(rec / "a.wav", CLIPS[:2])
    sf.write(rec / "silence.wav", np.zeros(3 * RATE, np.float32), RATE)
    (rec / "broken.wav").write_bytes(b"RIFF not really a wav")
    out = tmp_path / "meta.csv"
    rc, err = cli("prepare.py", "--audio", rec, "--output", out, "--asr", whisper, "--min_seconds", 1,
                  "--conversations")
    assert rc == 0, err
    rows = rows_of(out)
    skipped = rows_of(tmp_path / "meta.csv.skipped.csv")
    reasons = {Path(s["path"]).name: s["reason"] for s in skipped}
    assert "no speech" in reasons["silence.wav"] and "unreadable" in reasons["broken.wav"]
    # The text of each row is what the ASR model hears in that window (a random Whisper: gibberish).
    asr = ASR(str(whisper), "en")
    audio, _ = read_16k(rec / "a.wav")
    for row in rows:
        clip = audio[int(float(row["start"]) * VAD_RATE):int(float(row["end"]) * VAD_RATE)]
        assert row["text"] == asr.transcribe([clip], VAD_RATE)[0]
        assert row["conversation"] == "alice/a.wav" and float(row["turn"]) == float(row["start"])
    empty = sum("empty transcript" in s["reason"] for s in skipped)
    assert len(rows) + empty == 2


def test_a_killed_run_resumes_file_by_file(tmp_path, monkeypatch):
    from csm.data import recordings
    from csm.data.recordings import CutSettings, find_audio, prepare

    for i in range(4):
        long_recording(tmp_path / "rec" / f"r{i}.wav", CLIPS[i:i + 2])
    files = find_audio([str(tmp_path / "rec")])
    settings = CutSettings(min_seconds=1)
    prepare(files, tmp_path / "ref.csv", settings=settings, progress=False)

    real, calls = recordings._one_file, []

    def dies_at_the_third_file(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(recordings, "_one_file", dies_at_the_third_file)
        with pytest.raises(KeyboardInterrupt):
            prepare(files, tmp_path / "out.csv", settings=settings, progress=False)
    assert not (tmp_path / "out.csv").exists()
    from csm.system.errors import UserError

    with pytest.raises(UserError, match="other settings"):  # a half-done run is not mixed with other settings
        prepare(files, tmp_path / "out.csv", settings=CutSettings(min_seconds=2), progress=False)
    seen = []
    with monkeypatch.context() as m:
        m.setattr(recordings, "_one_file", lambda *a, **k: seen.append(a[0]) or real(*a, **k))
        prepare(files, tmp_path / "out.csv", settings=settings, progress=False)
    assert seen == files[2:]  # the two finished files were not done again
    assert (tmp_path / "out.csv").read_text() == (tmp_path / "ref.csv").read_text()
    assert not (tmp_path / "out.csv.partial.jsonl").exists()


def test_speaker_ids_come_from_folders_or_the_flag(tmp_path):
    from csm.data.recordings import speaker_ids

    files = [tmp_path / "bob" / "1.wav", tmp_path / "alice" / "2.wav", tmp_path / "3" / "x.wav"]
    assert speaker_ids(files, None) == {files[0]: 1, files[1]: 0, files[2]: 3}
    assert set(speaker_ids(files, 9).values()) == {9}


def test_prepare_bad_input(tmp_path):
    import prepare
    from csm.system.errors import UserError

    long_recording(tmp_path / "rec" / "a.wav", CLIPS[:1])
    kept = tmp_path / "kept.csv"
    kept.write_text("mine")
    rc, err = cli("prepare.py", "--audio", tmp_path / "rec", "--output", kept, "--asr", "none")
    assert_clear_error(rc, err, "--overwrite")  # the command line's one-line form; the rest in process
    cases = [(["--min_seconds", "0"], "--min_seconds"), (["--max_seconds", "nan"], "--max_seconds"),
             (["--min_seconds", "5", "--max_seconds", "3"], "below"), (["--vad_threshold", "1.5"], "--vad_threshold"),
             (["--speaker=-1"], "--speaker")]
    for args, message in cases:
        with pytest.raises(UserError, match=message.replace("-", r"\-")):
            prepare.main(["--audio", str(tmp_path / "rec"), "--output", str(tmp_path / "o.csv"),
                          "--asr", "none", *args])
    (tmp_path / "empty").mkdir()
    for audio, output, message in ((tmp_path / "none", tmp_path / "o.csv", "no such file"),
                                   (tmp_path / "empty", tmp_path / "o.csv", "no audio files"),
                                   (tmp_path / "rec", tmp_path / "o.txt", ".csv"),
                                   (tmp_path / "rec", tmp_path / "rec", "directory")):
        with pytest.raises(UserError, match=re.escape(message)):
            prepare.main(["--audio", str(audio), "--output", str(output), "--asr", "none"])
    assert kept.read_text() == "mine" and not (tmp_path / "o.csv").exists()


# --------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def same_clips(tmp_path_factory):
    """Six bundled clips as a metadata file, and as a `datasets` dataset (Audio column, bytes inside) saved to
    disk and as parquet files for load_dataset."""
    from datasets import Audio, Dataset

    base = tmp_path_factory.mktemp("datasets")
    df = pd.read_csv(SAMPLE / "train.csv").head(6)
    df["path"] = [str(SAMPLE / p) for p in df["path"]]
    df.to_csv(base / "files.csv", index=False)
    ds = Dataset.from_dict({"audio": [{"bytes": Path(p).read_bytes(), "path": Path(p).name} for p in df["path"]],
                            "transcript": list(df["text"]), "speaker": [int(s) for s in df["speaker"]]})
    ds = ds.cast_column("audio", Audio())
    ds.save_to_disk(str(base / "on_disk"))
    ds.to_parquet(str(base / "parquet" / "train.parquet"))
    return base


def _pretokenize(assets, output, *args):
    import pretokenize

    pretokenize.main([*map(str, args), "--output", str(output), "--device", "cpu", "--save_every", "4",
                      "--text_tokenizer", str(assets["text_tokenizer"]), "--mimi_weights", str(assets["mimi"])])


def _contents(path):
    audio, text = token_rows(path)
    with h5py.File(path) as f:
        return [a.tolist() for a in audio], [t.tolist() for t in text], f["train/speaker"][:].tolist()


def test_a_dataset_pretokenizes_to_the_same_codes_as_the_files(assets, same_clips, tmp_path):
    _pretokenize(assets, tmp_path / "files.hdf5", "--train_data", same_clips / "files.csv")
    reference = _contents(tmp_path / "files.hdf5")
    for name, args in (("disk", ["--train_data", same_clips / "on_disk"]),
                       ("stream", ["--train_data", same_clips / "on_disk", "--streaming"]),
                       ("load_dataset", ["--train_data", f"hf:{same_clips / 'parquet'}@train"])):
        _pretokenize(assets, tmp_path / f"{name}.hdf5", *args, "--text_column", "transcript")
        assert _contents(tmp_path / f"{name}.hdf5") == reference, name


def test_a_dataset_run_resumes_and_reports_bad_rows(assets, same_clips, tmp_path, monkeypatch):
    import datasets

    from csm.data import encode_dataset

    ds = datasets.load_from_disk(str(same_clips / "on_disk")).cast_column("audio", datasets.Audio(decode=False))
    rows = ds.to_list()
    rows[1]["audio"] = {"bytes": b"not audio at all", "path": "bad.wav"}
    rows[2]["transcript"] = ""
    broken = datasets.Dataset.from_list(rows).cast_column("audio", datasets.Audio())
    broken.save_to_disk(str(tmp_path / "broken"))
    args = ["--train_data", tmp_path / "broken", "--text_column", "transcript"]
    real, calls = encode_dataset.process_chunk, []

    def dies_in_the_second_chunk(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    for streaming in ([], ["--streaming"]):
        out = tmp_path / f"o{len(streaming)}.hdf5"
        with monkeypatch.context() as m:
            m.setattr(encode_dataset, "process_chunk", dies_in_the_second_chunk)
            with pytest.raises(KeyboardInterrupt):
                _pretokenize(assets, out, *args, *streaming)
        calls.clear()
        _pretokenize(assets, out, *args, *streaming)
        audio, _, _ = _contents(out)
        assert len(audio) == 4
        report = list(csv.DictReader(open(str(out) + ".skipped.csv")))
        assert sorted(r["row"] for r in report) == ["1", "2"]
        assert any("unreadable" in r["reason"] for r in report) and any("empty" in r["reason"] for r in report)


def test_dataset_errors_are_one_line(assets, same_clips, tmp_path):
    common = ["--output", tmp_path / "o.hdf5", "--device", "cpu", "--text_tokenizer", assets["text_tokenizer"],
              "--mimi_weights", assets["mimi"]]
    for data, extra, message in ((f"{same_clips / 'on_disk'}", [], "--text_column"),
                                 (f"{same_clips / 'on_disk'}",
                                  ["--text_column", "transcript", "--speaker_column", "who"],
                                  "--speaker_column")):
        fails_clearly("pretokenize.py", ["--train_data", data, *extra, *common], message, through_cli=False)
    rc, err = cli("pretokenize.py", "--train_data", "hf:nobody/no-such-dataset", *common,
                  env={"HF_DATASETS_OFFLINE": "1"})  # offline: `datasets` reads this when it is imported
    assert_clear_error(rc, err, "no-such-dataset")
    assert not (tmp_path / "o.hdf5").exists()


def test_prepared_metadata_pretokenizes(assets, whisper, tmp_path):
    """prepare.py's windows are what pretokenize.py reads: rows with text are kept, rows without are reported."""
    long_recording(tmp_path / "rec" / "long.wav", CLIPS[:3])
    meta = tmp_path / "meta.csv"
    rc, err = cli("prepare.py", "--audio", tmp_path / "rec", "--output", meta, "--asr", "none", "--min_seconds", 1)
    assert rc == 0, err
    df = pd.read_csv(meta, dtype={"text": object})
    df.loc[:1, "text"] = ["First words.", "Second words."]  # transcribed elsewhere, all but the last
    df.to_csv(meta, index=False)
    _pretokenize(assets, tmp_path / "d.hdf5", "--train_data", meta)
    audio, _, _ = _contents(tmp_path / "d.hdf5")
    assert len(audio) == 2
    report = list(csv.DictReader(open(str(tmp_path / "d.hdf5") + ".skipped.csv")))
    assert len(report) == 1 and "text" in report[0]["reason"]


def test_min_dnsmos_keeps_clean_speech_and_drops_its_noisy_and_clipped_copies(tmp_path):
    """The real DNSMOS model on the bundled speech: each clip, a copy with white noise at 5 dB SNR and a hard-clipped
    copy. --min_dnsmos 2.45 keeps the three clean ones (with their scores) and reports each copy with its score."""
    import prepare

    rng = np.random.default_rng(0)
    folder = tmp_path / "audio" / "spk"
    folder.mkdir(parents=True)
    for i in range(3):
        audio, rate = sf.read(str(SAMPLE / "clips" / f"train_{i:02d}.flac"), dtype="float32")
        pause = np.zeros(int(0.6 * rate), np.float32)
        audio = np.concatenate([pause, audio, pause])
        noise = rng.normal(0, 1, len(audio)).astype(np.float32)
        noise *= np.sqrt(np.mean(audio ** 2) / np.mean(noise ** 2)) * 10 ** (-5 / 20)
        sf.write(str(folder / f"clean_{i}.wav"), audio, rate)
        sf.write(str(folder / f"noisy_{i}.wav"), np.clip(audio + noise, -1, 1), rate)
        sf.write(str(folder / f"clipped_{i}.wav"), np.clip(audio / np.abs(audio).max() * 20, -1, 1) * 0.9, rate)
    out = tmp_path / "meta.csv"
    assert prepare.main(["--audio", str(tmp_path / "audio"), "--output", str(out), "--asr", "none",
                         "--min_seconds", "1", "--min_dnsmos", "2.45"]) == 0
    kept = pd.read_csv(out)
    assert sorted(Path(p).stem for p in kept["path"]) == ["clean_0", "clean_1", "clean_2"]
    assert (kept["dnsmos"] >= 2.45).all() and (kept["dnsmos"] <= 5).all()
    skipped = pd.read_csv(out.with_name("meta.csv.skipped.csv"))
    assert sorted(Path(p).stem for p in skipped["path"]) == [f"{k}_{i}" for k in ("clipped", "noisy") for i in range(3)]
    assert all(re.fullmatch(r"DNSMOS OVRL [0-9.]+ below --min_dnsmos 2.45", r) for r in skipped["reason"])
    _pretokenize_filters_on_dnsmos(tmp_path, out)
    for bad in ("nan", "-1", "6"):
        fails_clearly("prepare.py", ["--audio", tmp_path / "audio", "--output", tmp_path / "x.csv", "--asr", "none",
                                     "--min_dnsmos", bad], "--min_dnsmos", through_cli=bad == "nan")


def _pretokenize_filters_on_dnsmos(tmp_path, prepared):
    """pretokenize.py --min_dnsmos: rows with a dnsmos column are judged by it (a row given 1.0 goes, unheard, and
    --strict goes on past it: a filter is not a broken row); rows without one are scored (the noisy copies go), each
    only once its length is checked (the longest pair, too long for --max_seq_len, is never scored: a chunk's clips
    were scored all at once, those the length check then dropped too) and 1 s of audio at a time (GATE_SECONDS)."""
    import math

    from csm.data import encode_dataset
    import pretokenize
    from csm.data import tiny_assets
    from csm.model import tokenization
    from csm.data.dnsmos import DNSMOS

    assets = tiny_assets.make_all(tmp_path / "assets")
    kept = pd.read_csv(prepared)
    kept.loc[0, "dnsmos"] = 1.0
    given = tmp_path / "given.csv"
    kept.to_csv(given, index=False)
    rows = [{"path": str(tmp_path / "audio" / "spk" / f"{k}_{i}.wav"), "text": "Words.", "speaker": 0}
            for k in ("clean", "noisy") for i in range(3)]
    scored = tmp_path / "scored.csv"
    pd.DataFrame(rows).to_csv(scored, index=False)
    samples = {Path(r["path"]).stem: sf.info(r["path"]).frames * 24000 // sf.info(r["path"]).samplerate for r in rows}
    longest = max((k for k in samples if k.startswith("clean")), key=samples.get)
    text = len(tokenization.encode_text(tokenization.load_text_tokenizer(str(assets["text_tokenizer"])), "Words.", 0))
    limit = text + math.ceil(samples[longest] / 1920)  # the longest pair of clips is one frame (its EOS) too long
    too_long = [longest, longest.replace("clean", "noisy")]
    calls, real, gate = [], DNSMOS.score_many, encode_dataset.GATE_SECONDS
    DNSMOS.score_many = lambda self, clips, rate, **kw: calls.append([len(c) for c in clips]) or real(self, clips, rate,
                                                                                                     **kw)
    encode_dataset.GATE_SECONDS = 1.0
    try:
        for metadata, extra, expected in ((given, ["--strict"], ["clean_1", "clean_2"]),
                                          (scored, ["--max_seq_len", str(limit)],
                                           [f"clean_{i}" for i in range(3) if f"clean_{i}" != longest])):
            out = tmp_path / f"{metadata.stem}.hdf5"
            kept["text"] = "Words."
            if metadata == given:
                kept.to_csv(given, index=False)
            assert pretokenize.main(["--train_data", str(metadata), "--output", str(out), "--device", "cpu",
                                     "--text_tokenizer", str(assets["text_tokenizer"]), "--mimi_weights",
                                     str(assets["mimi"]), "--min_dnsmos", "2.45", *extra]) == 0
            skipped = pd.read_csv(str(out) + ".skipped.csv")
            with h5py.File(out) as f:
                assert len(f["train/length"]) == len(expected)
            reasons = dict(zip((Path(p).stem for p in skipped["path"]), skipped["reason"]))
            filtered = sorted(k for k in reasons if k not in too_long or metadata == given)
            assert all(re.fullmatch(r"DNSMOS OVRL [0-9.]+ below --min_dnsmos 2.45", reasons[k]) for k in filtered)
            assert filtered == (["clean_0"] if metadata == given else sorted(
                f"noisy_{i}" for i in range(3) if f"noisy_{i}" not in too_long))
            if metadata == scored:
                assert all(reasons[k].startswith("too long") for k in too_long)
        assert samples[longest] not in [n for call in calls for n in call]  # never scored
        assert len(calls) == 4 and all(len(call) == 1 for call in calls)  # each clip passes 1 s: one at a time
    finally:
        DNSMOS.score_many, encode_dataset.GATE_SECONDS = real, gate
