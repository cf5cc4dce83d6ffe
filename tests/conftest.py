"""Shared fixtures: tiny assets in the real layouts, built once per test session (no network)."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests must never reach the network, whatever the machine's settings.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """{'model': dir, 'text_tokenizer': dir, 'mimi': file} of tiny stand-ins saved like the real ones."""
    import tiny_assets

    return tiny_assets.make_all(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="session")
def text_tokenizer(assets):
    import utils

    return utils.load_text_tokenizer(str(assets["text_tokenizer"]))


@pytest.fixture(scope="session")
def mimi(assets):
    import utils

    return utils.load_mimi(str(assets["mimi"]))
