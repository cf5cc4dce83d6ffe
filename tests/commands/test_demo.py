"""The demo's steps, shortened: prepare -> pretokenize -> train -> generate -> evaluate -> sweep, on the sample."""
import json

import h5py
import pytest
import soundfile as sf
import yaml

import demo


@pytest.mark.slow
def test_quick_demo_runs_every_step(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--output_dir", str(out)]) == 0
    prepared = (out / "recordings" / "metadata.csv").read_text().splitlines()
    assert len(prepared) == 21  # header + the 20 bundled training clips, found in the long recordings by the VAD
    with h5py.File(out / "data.hdf5") as f:
        assert len(f["train/length"]) >= 15 and len(f["val/length"]) >= 3
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in m for m in metrics)
    assert any({"wer", "cer", "speaker_sim", "eos_rate"} <= set(m) for m in metrics)  # eval_every is on
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert summary["generated"]["n"] > 0 and summary["reference"]["n"] > 0 and summary["codec"]["n"] > 0
    assert (out / "evaluation" / "report.html").is_file()
    assert (out / "run" / "best" / "model.safetensors").is_file()
    from transformers import CsmForConditionalGeneration

    _, info = CsmForConditionalGeneration.from_pretrained(str(out / "run" / "best_hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert list((out / "run" / "samples").glob("*.wav"))
    info = sf.info(str(out / "generated.wav"))
    assert info.samplerate == 24000 and info.frames > 0
    assert yaml.safe_load((out / "sweep" / "best_config.yaml").read_text())["learning_rate"] > 0
    assert (out / "loss_curve.png").is_file()
    printed = capsys.readouterr().out
    assert "generated speech" in printed and "noise, not speech" in printed
