"""Shared fixtures: tiny assets in the real layouts, built once per test session (no network), and the helpers
tests import from here (write_token_file, token_rows, cli and its checks, free_port)."""
import importlib
import os
import re
import socket
import subprocess
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
from csm.system.errors import UserError  # noqa: E402


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


# --------------------------------------------------------------------------- helpers tests import from here


RUN_FLAGS = ["--device", "cpu", "--wandb_mode", "disabled", "--gen_every", "0", "--val_every", "2", "--save_every", "2",
             "--batch_size", "4", "--warmup_steps", "1", "--log_every", "1", "--learning_rate", "1e-3"]


def cli(script, *args, timeout=300, env=None, cwd=ROOT, fresh=False):
    """Run a script's command line as a user would (from `cwd`); returns (exit status, stderr). In this process
    (the script's main through run_cli, stderr captured), which has imported torch already: a new process pays
    seconds for that on every call. `fresh` (or another `cwd` or `env`) runs it in a process of its own, for what
    only a new process shows (its imports, its environment, its working directory)."""
    if fresh or env is not None or cwd != ROOT:
        proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        return proc.returncode, proc.stderr
    import contextlib
    import importlib
    import io

    from utils import run_cli

    main = importlib.import_module(script.removesuffix(".py")).main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            run_cli(lambda: main([str(a) for a in args]))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            return code, err.getvalue()
    return 0, err.getvalue()


def assert_clear_error(rc, err, match):
    assert rc != 0 and rc != 1, (rc, err[-2000:])  # 1 is Python's status for an uncaught exception
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2 and match.lower() in lines[-1].lower(), err  # argparse adds a usage line


def fails_clearly(script: str, argv, message: str, through_cli: bool) -> None:
    """A bad input refused: through the command line (a non-zero exit and one line, no traceback), or, for the
    other cases of a class once one went through it, by the same main() in this process (a UserError, which
    run_cli turns into that line), which spares a Python start and a torch import per case."""
    if through_cli:
        rc, err = cli(script, *argv)
        assert_clear_error(rc, err, message)
        return
    module = importlib.import_module(script.removesuffix(".py"))
    with pytest.raises(UserError, match=re.escape(message) if message else None):
        module.main([str(a) for a in argv])


def free_port() -> int:
    """A TCP port free on this machine now (for a torchrun rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PORT_TAKEN = "EADDRINUSE"  # torch's words when the rendezvous port was taken between free_port() and its bind


def run_torchrun(cmd: list, attempts: int = 3, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run of a command with `--master_port PORT`, again with a new port while the port was taken before
    torchrun could bind it (another test's process took it in between: free_port() can only say it was free). That
    failure comes before any work, so a rerun is the same run."""
    cmd = [str(c) for c in cmd]
    for _ in range(attempts):
        proc = subprocess.run(cmd, **{"capture_output": True, "text": True, **kwargs})
        if proc.returncode == 0 or PORT_TAKEN not in proc.stderr:
            return proc
        cmd[cmd.index("--master_port") + 1] = str(free_port())
    return proc


def token_rows(path, split="train") -> tuple[list, list]:
    """A token file split's rows as ([codes of each row], [text ids of each row]), read with h5py alone (not the
    project's reader), in either format."""
    import h5py
    import numpy as np

    with h5py.File(path) as f:
        g = f[split]
        if "audio_offsets" not in g:  # format 1: one variable-length row per example
            return [np.asarray(x) for x in g["audio"]], [np.asarray(x) for x in g["text"]]
        a, ao, t, to = g["audio"][:], g["audio_offsets"][:], g["text"][:], g["text_offsets"][:]
        return [a[ao[i]:ao[i + 1]] for i in range(len(ao) - 1)], [t[to[i]:to[i + 1]] for i in range(len(to) - 1)]
