"""DNSMOS with the real models of the speechmos wheel on the bundled real speech: our features match speechmos's
own scorer, clean speech outscores its noisy and clipped copies, noise scores low, and every edge case is named."""
import importlib.util
import json
import sys

import numpy as np
import pytest

from csm.data import dnsmos
from csm.system.errors import UserError
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
from make_dnsmos_reference import dnsmos_cases  # noqa: E402

REFERENCE = json.loads((ROOT / "tests" / "fixtures" / "dnsmos_speechmos.json").read_text())


@pytest.fixture(scope="module")
def scored():
    cases = dnsmos_cases()
    return dict(zip(cases, dnsmos.DNSMOS().score_many(list(cases.values()), 16_000)))


def test_scores_match_speechmos_own_scorer(scored):
    """speechmos's scorer (with librosa) gave tests/fixtures/dnsmos_speechmos.json; ours computes the P.808
    features itself. Every score of every case agrees within 0.01 (measured: 5e-6)."""
    assert set(scored) == set(REFERENCE)
    for name, score in scored.items():
        for key in dnsmos.SCORES:
            assert getattr(score, key) == pytest.approx(REFERENCE[name][key], abs=0.01), (name, key)


def test_clean_speech_outscores_noise_and_clipping(scored):
    for i in range(4):
        clean = scored[f"clean_{i}"].ovrl
        assert clean > 2.5 and clean > scored[f"noisy_{i}"].ovrl + 0.5 and clean > scored[f"clipped_{i}"].ovrl
    assert scored["noise"].ovrl < 1.5


def test_long_clips_hop_over_windows_and_short_ones_repeat():
    # 9.01 s windows one second apart, as many as the whole seconds allow (the reference scorer's count):
    assert [len(dnsmos.windows(np.zeros(int(s * 16_000), dtype=np.float32))) for s in (9.5, 11.5, 12.5)] == [1, 2, 3]
    # A short clip is doubled until it fills a window (then hopped over, as the reference does).
    short = np.arange(4000, dtype=np.float32)
    found = dnsmos.windows(short)
    assert all(len(w) == dnsmos.WINDOW for w in found)
    assert np.array_equal(found[0], np.tile(short, 64)[:dnsmos.WINDOW])


def test_unscorable_clips_say_why():
    scorer = dnsmos.DNSMOS()
    empty, silent, broken, fine = scorer.score_many(
        [np.zeros(0), np.zeros(24_000), np.full(24_000, np.nan), np.random.default_rng(0).normal(0, 0.1, 24_000)],
        24_000)
    assert str(empty) == "the clip is empty" and str(silent) == "the clip is silent"
    assert "NaN" in str(broken) and isinstance(fine, dnsmos.Score) and 1 <= fine.ovrl <= 5


def test_without_the_packages_one_line_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match="pip install speechmos==.* onnxruntime=="):
        dnsmos.DNSMOS()
    monkeypatch.undo()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "speechmos" else real(name, *a))
    with pytest.raises(UserError, match="speechmos wheel"):
        dnsmos.DNSMOS()
