"""A sweep shared by two machines through a real PostgreSQL server: a throwaway one (initdb + pg_ctl on a free local
port, in a temp directory) stands in for the database every machine points at, and two sweep.py processes with
their own output directories stand in for the machines."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from csm.training import optuna_sweep
from csm.system.errors import UserError
from test_sweep import base_args

ROOT = Path(__file__).resolve().parents[2]
ENABLE = "install the server (Debian: apt-get install postgresql) to run it; .ci/run does so when run as root"


def _server_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")) or [Path(p) for p in [shutil.which("pg_ctl")] if p]
    return found[-1].parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """postgresql://sweeper@127.0.0.1:PORT/postgres of a server started for this module and removed after it."""
    bin_dir = _server_bin()
    if bin_dir is None:
        pytest.skip(f"no PostgreSQL server binaries (pg_ctl, initdb): {ENABLE}")
    # The server refuses to run as root: as root, it runs as the package's postgres user, in a folder it owns.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="csm-pg-"))
    root.chmod(0o755)
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()
    run = dict(check=True, capture_output=True, text=True)
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "sweeper", "--auth=trust", "-E", "UTF8"],
                   **run)
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], **run)
    try:
        yield f"postgresql://sweeper@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _sweep(assets, data, out, url, n_trials, **popen):
    space = out.parent / "space.yaml"
    space.write_text("learning_rate: {type: float, min: 1.0e-4, max: 1.0e-2, log: true}\n")
    argv = base_args(assets, data, out, "--storage", url, "--study_name", "shared", "--n_trials", str(n_trials),
                     "--sweep_config", str(space), "--set", "max_steps=4")
    return subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _finish(process, timeout=300):
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_two_machines_share_one_study_and_a_killed_ones_trial_is_redone(assets, token_file, tmp_path, postgres):
    a = _sweep(assets, token_file, tmp_path / "machine_a", postgres, 4)
    b = _sweep(assets, token_file, tmp_path / "machine_b", postgres, 4)
    _finish(a), _finish(b)
    study = optuna.load_study(study_name="shared", storage=postgres)
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(study.trials) == 4 and len(done) == 4  # exactly --n_trials between them
    assert len({t.number for t in study.trials}) == 4 and len({t.user_attrs["pid"] for t in study.trials}) == 2
    best = [yaml.safe_load((tmp_path / m / "best_config.yaml").read_text()) for m in ("machine_a", "machine_b")]
    assert best[0] == best[1]

    # A third machine is killed outright while its trial runs: the next run fails that trial and redoes it.
    c = _sweep(assets, token_file, tmp_path / "machine_c", postgres, 5, start_new_session=True)
    deadline = time.time() + 120
    while not any(t.state == TrialState.RUNNING and "pid" in t.user_attrs for t in study.get_trials(deepcopy=False)):
        assert time.time() < deadline and c.poll() is None, "no trial started"
        time.sleep(0.2)
    os.killpg(c.pid, signal.SIGKILL)
    c.wait()
    assert any(t.state == TrialState.RUNNING for t in optuna.load_study(study_name="shared", storage=postgres).trials)
    _finish(_sweep(assets, token_file, tmp_path / "machine_c", postgres, 5))
    trials = optuna.load_study(study_name="shared", storage=postgres).trials
    assert [t.state for t in trials].count(TrialState.FAIL) == 1 and not any(t.state == TrialState.RUNNING
                                                                           for t in trials)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 5


def test_a_storage_that_cannot_be_opened_is_one_line(postgres, monkeypatch):
    """The host and port of a server that does not answer; the package of a missing driver; never the password."""
    port = free_port()
    with pytest.raises(UserError, match=f"cannot connect to the database server at 127.0.0.1:{port}") as e:
        optuna_sweep.storage_for(f"postgresql://sweeper:secret@127.0.0.1:{port}/postgres")
    assert "secret" not in str(e.value)
    with pytest.raises(UserError, match="the mysql driver is not installed: pip install mysqlclient$"):
        optuna_sweep.storage_for("mysql://nobody@127.0.0.1/db")  # mysql:// means MySQLdb, which mysqlclient provides
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(UserError, match=r"the postgresql driver is not installed: pip install psycopg\[binary\]"):
        optuna_sweep.storage_for(postgres)
