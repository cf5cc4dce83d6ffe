"""Shared fixtures: tiny assets in the real layouts, built once per test session (no network), and the helper
tests import from here (write_token_file)."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "bench") not in sys.path:
    sys.path.append(str(ROOT / "bench"))  # the benchmark scripts, whose names shadow no module of the project

# Tests must never reach the network, whatever the machine's settings.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# Under pytest-xdist (make test runs 2 workers) each worker takes one thread, so the workers do not fight over
# the cores; alone, the suite takes two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


from csm.data.tiny_assets import make_token_file as write_token_file  # noqa: E402,F401  (tests import it from here)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """{'model': dir, 'text_tokenizer': dir, 'mimi': file} of tiny stand-ins saved like the real ones."""
    from csm.data import tiny_assets

    return tiny_assets.make_all(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="session")
def judges(tmp_path_factory):
    """{'asr': dir, 'speaker_model': dir}: a tiny random Whisper and WavLM x-vector saved by transformers."""
    from csm.data import tiny_assets

    return tiny_assets.make_judges(tmp_path_factory.mktemp("judges"))


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, assets):
    """A tiny CsmForConditionalGeneration (with Mimi, tokenizer and processor) as transformers saves it."""
    from csm.data import tiny_assets

    return tiny_assets.make_hf_csm(tmp_path_factory.mktemp("hf") / "csm-tiny-hf",
                                   tokenizer_dir=assets["text_tokenizer"])


@pytest.fixture(scope="session")
def text_tokenizer(assets):
    from csm.model import tokenization

    return tokenization.load_text_tokenizer(str(assets["text_tokenizer"]))


@pytest.fixture(scope="session")
def mimi(assets):
    from csm.model import codec

    return codec.load_mimi(str(assets["mimi"]))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache; `put(repo, files, revision=None)` lays files out as the hub client
    caches them: under a commit's snapshot, with refs/main (or the named branch) pointing at it.
    `revision` may be a branch name or a 40-hex commit; returns the commit."""
    import hashlib
    import shutil

    import huggingface_hub.constants as c

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)

    def put(repo_id, files, revision=None):
        base = cache / f"models--{repo_id.replace('/', '--')}"
        is_commit = revision is not None and len(revision) == 40
        commit = revision if is_commit else hashlib.sha1(f"{repo_id}@{revision or 'main'}".encode()).hexdigest()
        snap = base / "snapshots" / commit
        snap.mkdir(parents=True)
        (base / "refs").mkdir(exist_ok=True)
        if not is_commit:
            (base / "refs" / (revision or "main")).write_text(commit)
        for name, src in files.items():
            shutil.copy(src, snap / name)
        return commit

    return put


@pytest.fixture
def token_file(tmp_path):
    return write_token_file(tmp_path / "tokens.hdf5")


def wandb_log(run_dir, keys, timeout: float = 30.0) -> bytes:
    """An offline W&B run's log (protobuf) once it holds every key: W&B's core process may still be writing it
    when run.finish() returns (seen on a loaded machine, with the log holding only its header)."""
    import time

    deadline = time.time() + timeout
    while True:
        log = next(Path(run_dir).glob("*.wandb")).read_bytes()
        if all(key.encode() in log for key in keys) or time.time() > deadline:
            return log
        time.sleep(0.5)
