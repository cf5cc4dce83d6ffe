"""The demo's steps, shortened: prepare -> pretokenize -> train -> generate -> evaluate -> sweep, on the sample."""
import json

import h5py
import pytest
import soundfile as sf
import yaml

import browser
import demo


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """The quick demo, run once for this module's tests (they share an xdist group, so one worker runs both):
    its output directory and what it printed."""
    import contextlib
    import io

    out, printed = tmp_path_factory.mktemp("demo") / "demo", io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert demo.main(["--quick", "--output_dir", str(out)]) == 0
    return out, printed.getvalue()


@pytest.mark.slow
@pytest.mark.xdist_group("demo")
def test_quick_demo_runs_every_step(quick_demo):
    out, printed = quick_demo
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
    # The run keeps a weight average; both best/ and best_ema/ are evaluated and shown side by side.
    assert any("ema_val_loss" in m for m in metrics) and (out / "run" / "best_ema" / "model.safetensors").is_file()
    assert json.loads((out / "evaluation_ema" / "summary.json").read_text())["generated"]["n"] > 0
    from transformers import CsmForConditionalGeneration

    _, info = CsmForConditionalGeneration.from_pretrained(str(out / "run" / "best_hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert list((out / "run" / "samples").glob("*.wav"))
    info = sf.info(str(out / "generated.wav"))
    assert info.samplerate == 24000 and info.frames > 0
    assert yaml.safe_load((out / "sweep" / "best_config.yaml").read_text())["learning_rate"] > 0
    assert (out / "loss_curve.png").is_file()
    assert "generated speech" in printed and "noise, not speech" in printed
    assert "best_ema/" in printed and "(what each was picked by)" in printed
    assert printed.rstrip().endswith(str(out / "report.html"))  # the page is the last thing it says


@pytest.mark.slow
@pytest.mark.xdist_group("demo")
@pytest.mark.skipif(browser.find_browser() is None, reason=browser.MISSING)
def test_the_demo_report_works_in_a_real_browser(quick_demo):
    """The demo's page (the SFT run, the DPO run and the sweep's trials) in headless Chromium: no script error, every
    plot draws every trace it was given, every player loads its wav, and the screenshot is not blank. Then picking
    another step and one item shows that step's section and that item's row only."""
    out, _ = quick_demo
    with browser.open_file(out / "report.html") as page:
        drawn = page.evaluate(browser.TRACES)
        players = browser.audio_states(page)
        shot = page.screenshot()
        steps = page.evaluate("[...document.querySelectorAll('#eval-step option')].map(o => o.value)")
        items = page.evaluate("[...document.querySelectorAll('#eval-item option')].map(o => o.value)")
        page.evaluate(f"""(() => {{
            const step = document.getElementById('eval-step'), item = document.getElementById('eval-item');
            step.value = '{steps[0]}'; step.dispatchEvent(new Event('change'));
            item.value = '{items[1]}'; item.dispatchEvent(new Event('change'));
        }})()""")
        shown = page.evaluate("""[[...document.querySelectorAll('.eval-step')].filter(s => !s.hidden)
                                    .map(s => s.dataset.step),
                                  [...document.querySelectorAll('.eval-step:not([hidden]) tr[data-item]')]
                                    .filter(r => !r.hidden).map(r => r.dataset.item)]""")
        links = page.evaluate("[...document.querySelectorAll('table a[href^=\"#run-\"]')]"
                              ".map(a => !!document.getElementById(a.getAttribute('href').slice(1)))")
        errors = page.errors
    assert not errors, errors
    keys = [key for key, _, _ in drawn]
    assert {"loss", "val_loss", "lr", "grad_norm", "cer", "speaker_sim", "dnsmos_ovrl"} <= set(keys), keys
    assert all(given == n > 0 for _, given, n in drawn), drawn
    assert {"sweep: optimization history", "sweep: parallel coordinates"} <= set(keys), keys
    # The SFT run's val_loss is drawn with its weight average's beside it, the DPO run's and each trial's.
    assert dict((k, given) for k, given, _ in drawn)["val_loss"] == 3 + 2
    assert len(players) >= 10 and all(state >= 1 and error is None for _, state, error in players), players
    assert not browser.is_blank(shot)
    assert len(steps) == 2 and shown == [[steps[0]], [items[1]]]
    assert links == [True, True]  # each trial of the sweep's table links to its run's section
