"""Mimi through transformers' MimiModel gives the codes and audio moshi's Mimi gave, so token files
pretokenized with moshi stay valid. The reference was made once by moshi's own code
(tests/fixtures/make_moshi_mimi_fixture.py), since moshi cannot be installed beside current torch."""
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from csm.model import codec
from csm.system.errors import UserError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "moshi_mimi"
CLIPS = Path(__file__).resolve().parents[2] / "data" / "sample" / "clips"


@pytest.fixture(scope="module")
def converted():
    return codec.load_mimi(FIXTURE / "mimi-tiny.safetensors")


def test_moshi_weights_give_moshis_codes_on_the_bundled_clips(converted):
    reference = np.load(FIXTURE / "reference.npz")
    clips = sorted(CLIPS.glob("*.flac"))
    assert len(clips) >= 20
    total = mismatched = 0
    for path in clips:
        audio = sf.read(str(path), dtype="float32", always_2d=True)[0].mean(axis=1)
        codes = codec.encode_audio(converted, [audio])[0]
        expected = reference[path.stem]
        assert codes.shape == expected.shape, path.name
        total += codes.size
        mismatched += int((codes != expected).sum())
    assert mismatched == 0, f"{mismatched} of {total} codes differ"  # README: 0 of ~23k


def test_decoding_matches_moshi_within_float_tolerance(converted):
    reference = np.load(FIXTURE / "reference.npz")
    name = next(k for k in reference.files if k.startswith("decoded_"))
    codes = torch.from_numpy(reference[name.removeprefix("decoded_")].astype(np.int64))
    audio = codec.decode_audio(converted, codes).numpy()
    np.testing.assert_allclose(audio, reference[name], rtol=0, atol=1e-5)


def test_mimi_sources_and_errors(tmp_path, assets):
    # A MimiModel directory (kyutai/mimi's layout) and a transformers CSM's codec_model.* both load.
    mimi = codec.load_mimi(assets["mimi"])
    assert type(mimi).__name__ == "MimiModel" and not any(p.requires_grad for p in mimi.parameters())
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not found"):
        codec.load_mimi(tmp_path / "empty")
    with pytest.raises(UserError, match="64 were asked for|has 32 codebooks"):
        codec.load_mimi(assets["mimi"], num_codebooks=64)
