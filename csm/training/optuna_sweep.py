"""The Optuna side of sweep.py: the YAML search space (validated against the training config), the
study and its storage, one worker process per GPU running training.train() per trial, failed and
interrupted trials recorded with their reason, and the reports (best_config.yaml, trials.csv, plots).
"""
from __future__ import annotations

import gc
import datetime
import json
import random
import math
import multiprocessing
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
import torch

from csm.training import config as config_mod
from csm.judging.metrics import BY_NAME, SWEEPABLE, direction
from csm.training.tracking import best_logged, last_logged
from csm.system.errors import check_number, UserError
from csm.training.report import REPORT_NAME, sweep_figures, why_not_drawn, write_page
from csm.system.outputs import atomic_path, claim_output_dir, clear_dir, dir_entries, inputs_of, write_text_atomic
from dataloaders import source_paths
from csm.training.training import (
    check_launch, check_planned_size, check_warmup, data_splits, planned_model_args, planned_steps, train,
)
from csm.system.runtime import cuda_unusable_reason, warn_cuda_unusable
from csm.model.weights import resolve_source

PARAM_TYPES = ("categorical", "float", "int", "fixed")
# The sweepable quality metrics: the best value a trial's quality evaluations reached (needs eval_every).
QUALITY = tuple(name for name in SWEEPABLE if BY_NAME[name].quality)


# --------------------------------------------------------------------------- the search space


def _entry_dict(key: str, spec) -> dict:
    """Accept the original's list-of-single-key-dicts form as well as a plain mapping."""
    if isinstance(spec, list) and all(isinstance(x, dict) for x in spec):
        merged = {}
        for part in spec:
            merged.update(part)
        return merged
    if isinstance(spec, dict):
        return dict(spec)
    raise UserError(f"sweep entry {key!r} must be a mapping like "
                    f"{{type: float, min: 1e-5, max: 1e-3, log: true}}, got {spec!r}")


def _number(key: str, spec: dict, name: str, cast):
    if name not in spec:
        raise UserError(f"sweep entry {key!r} ({spec.get('type')}) needs '{name}'")
    try:
        return cast(float(spec[name])) if cast is int else cast(spec[name])
    except (TypeError, ValueError):
        raise UserError(f"sweep entry {key!r}: '{name}' must be a number, got {spec[name]!r}") from None


def load_space(path: str | Path, base: dict) -> dict[str, dict]:
    """Read and validate the search space: keys are training config keys, each type well formed, and
    every value it can produce passes the training config's own validation."""
    raw = config_mod.read_yaml(path, "sweep config")
    if not raw:
        raise UserError(f"sweep config {path} must map config keys to search entries")
    space = {}
    for key, spec in raw.items():
        if key not in config_mod.CONFIG_KEYS:
            raise config_mod.unknown_key_error(key, str(path))
        spec = _entry_dict(key, spec)
        kind = spec.get("type")
        if kind not in PARAM_TYPES:
            raise UserError(f"sweep entry {key!r}: type must be one of {', '.join(PARAM_TYPES)}, got {kind!r}")
        known = {"categorical": {"type", "values"}, "float": {"type", "min", "max", "log", "step"},
                 "int": {"type", "min", "max", "log", "step"}, "fixed": {"type", "value"}}[kind]
        extra = set(spec) - known
        if extra:
            raise UserError(f"sweep entry {key!r} ({kind}) has unknown field(s) {', '.join(sorted(extra))}; "
                            f"allowed: {', '.join(sorted(known))}")
        if kind == "categorical":
            values = spec.get("values")
            if not isinstance(values, list) or not values:
                raise UserError(f"sweep entry {key!r} (categorical) needs a non-empty list 'values'")
            candidates = values
        elif kind == "fixed":
            if "value" not in spec:
                raise UserError(f"sweep entry {key!r} (fixed) needs 'value'")
            candidates = [spec["value"]]
        else:
            cast = float if kind == "float" else int
            lo, hi = _number(key, spec, "min", cast), _number(key, spec, "max", cast)
            if lo > hi:
                raise UserError(f"sweep entry {key!r}: min ({lo}) is greater than max ({hi})")
            if not isinstance(spec.get("log", False), bool):
                raise UserError(f"sweep entry {key!r}: 'log' must be true or false")
            if spec.get("log") and lo <= 0:
                raise UserError(f"sweep entry {key!r}: a log range needs min > 0, got {lo}")
            spec.update(min=lo, max=hi, log=bool(spec.get("log", False)))
            candidates = [lo, hi]
        for value in candidates:
            try:
                config_mod.make_config({**base, key: value}, str(path))
            except UserError as e:
                raise UserError(f"sweep entry {key!r} can produce a bad value: {e}") from None
        space[key] = spec
    return space


def suggest(trial, space: dict[str, dict]) -> dict:
    params = {}
    for key, spec in space.items():
        kind = spec["type"]
        if kind == "categorical":
            params[key] = trial.suggest_categorical(key, spec["values"])
        elif kind == "float":
            params[key] = trial.suggest_float(key, spec["min"], spec["max"], log=spec["log"], step=spec.get("step"))
        elif kind == "int":
            params[key] = trial.suggest_int(key, spec["min"], spec["max"], log=spec["log"], step=spec.get("step", 1))
        else:
            params[key] = spec["value"]
    return params


# --------------------------------------------------------------------------- storage and study


def is_journal(url: str) -> bool:
    return url.startswith("journal:") or url.endswith((".log", ".journal"))


def storage_file(url: str) -> Path | None:
    """The file a storage keeps the study in (a journal file, an SQLite database), None for a server's."""
    if is_journal(url):
        return Path(url.removeprefix("journal:")).expanduser()
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        try:
            database = make_url(url).database
        except Exception:  # noqa: BLE001 - an unparsable URL is reported when the storage opens
            return None
        return Path(database).expanduser() if database and database != ":memory:" else None
    return None


def check_storage(url: str) -> Path | None:
    """A storage that every worker process (and machine) of the sweep can share, checked before any work: an
    in-memory SQLite database is private to the process that opens it, so the workers' trials would vanish.
    Returns its file (storage_file)."""
    path = storage_file(url)
    if url.startswith("sqlite") and path is None:
        raise UserError(f"--storage {url}: an in-memory SQLite database is not shared by the sweep's worker "
                        "processes (their trials would vanish); give a file, e.g. sqlite:///sweeps/study.db, or "
                        "leave --storage out for one in --output_dir")
    if path is not None:
        folder = path.parent
        if not folder.is_dir():
            raise UserError(f"--storage {url}: the folder {folder} does not exist; create it, or give a file in a "
                            "folder every worker can reach")
        if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise UserError(f"--storage {url}: cannot write {path if path.exists() else 'in ' + str(folder)}")
    return path


def shown_url(url: str) -> str:
    """The storage URL as it may be printed: whatever stands between :// and its last @ is the user and password,
    and the password is replaced, whatever the URL's shape (an unencoded @ in the password, a broken port)."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, tail = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{head}://{user}{':***' if colon else ''}@{tail}"


def default_storage(out: Path) -> str:
    """The study database in the output directory, as a URL: the path percent-encoded, so that a '#' or '?' in it
    stays part of the path (SQLAlchemy decodes it) instead of ending it."""
    from urllib.parse import quote

    return f"sqlite:///{quote(str((out / 'study.db').resolve()))}"


def storage_for(url: str):
    """An Optuna storage: SQLAlchemy URLs (sqlite://, postgresql://, ...) or a journal file (*.log,
    journal:PATH) that several machines can share over a network file system."""
    if is_journal(url):
        path = check_storage(url)
        try:
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise UserError(f"--storage {url}: cannot write the journal file ({e.strerror or e})") from None
    engine_kwargs = ({"connect_args": {"timeout": 120}} if url.startswith("sqlite") else
                     {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else None)
    from sqlalchemy.exc import IntegrityError, ProgrammingError  # optuna's own dependency

    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (IntegrityError, ProgrammingError) as e:
            # Machines that start together on a new database race to create Optuna's tables; the losers' CREATE
            # fails on what the winner made. Opened again a moment later, the tables are there.
            if attempt == SCHEMA_ATTEMPTS - 1:
                raise UserError(storage_error(url, e)) from e
            time.sleep(0.5 * (attempt + 1) + random.random())
        except Exception as e:  # SQLAlchemy raises driver-specific types for a bad URL or a missing driver
            raise UserError(storage_error(url, e)) from e


SCHEMA_ATTEMPTS = 5


# The package of each SQLAlchemy driver (the URL's +driver, or the database's default one: psycopg for
# postgresql://, mysqldb for mysql://).
DRIVERS = {"psycopg": "psycopg[binary]==3.3.2 (pinned in requirements.txt)", "psycopg2": "psycopg2-binary",
           "mysqldb": "mysqlclient", "pymysql": "pymysql"}
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}


def storage_error(url: str, error: Exception) -> str:
    """One line for a database storage that cannot be opened: the driver that is missing, or the server that
    cannot be reached (its host and port), or what else went wrong. A password in the URL is not shown."""
    from sqlalchemy.engine import make_url  # optuna's own dependency, imported with its RDB storage
    from sqlalchemy.exc import ArgumentError, OperationalError

    shown = shown_url(url)
    userinfo = url.partition("://")[2].rpartition("@")[0]
    if "@" in userinfo:  # read by SQLAlchemy as user:pass@host, the rest of the password taken for the host
        return f"--storage {shown}: the user or password holds an unencoded @; write it as %40 (and : as %3A)"
    try:
        parsed = make_url(url)
        port = parsed.port  # noqa: F841 - a port that is not a number raises here
    except (ArgumentError, ValueError) as e:
        why = "" if isinstance(e, ArgumentError) else " (its port or host does not parse: an unencoded @ or : in " \
                                                      "the password must be written %40 or %3A)"
        return f"--storage {shown!r} is neither a database URL (postgresql://user@host/db, sqlite:///file) nor a " \
               f"journal file (*.log){why}"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    secret = userinfo.partition(":")[2]
    if secret:  # a driver may quote the URL back
        first = first.replace(secret, "***")
    if isinstance(error, ImportError) or isinstance(error.__cause__, ImportError):
        package = DRIVERS.get(parsed.get_driver_name(), parsed.get_driver_name())
        return f"--storage {shown}: the {parsed.get_backend_name()} driver is not installed: pip install {package}"
    if isinstance(error, OperationalError) and parsed.host:
        port = parsed.port or DEFAULT_PORTS.get(parsed.get_backend_name())
        where = f"{parsed.host}:{port}" if port else parsed.host
        return f"--storage {shown}: cannot connect to the database server at {where} ({first})"
    return f"--storage {shown}: {type(error).__name__}: {first}"


@dataclass(frozen=True)
class Study:
    """Which study, optimising what, sampled and pruned how."""

    name: str
    metric: str
    sampler: str
    pruner: str
    seed: int


@dataclass(frozen=True)
class SweepRun:
    """What one run of the sweep settled before its workers start, and all they are given of it (with the base
    config and the search space): no argparse Namespace travels to them."""

    study: Study
    storage: str | None  # the study's storage (URL or journal file); None until the default one is made
    data: str | list[str]  # one token file, or several mixed by the base config's data_weights
    output_dir: Path
    n_trials: int
    n_gpus: int  # 0: the CPU
    n_workers: int  # CPU worker processes (with GPUs: n_gpus x trials_per_gpu)
    deadline: float | None  # no trial starts after this time.time()
    trials_at_start: int  # trials in the study when this run started (seeds its samplers)


def make_study(spec: Study, storage, seed: int | None = None):
    seed = spec.seed if seed is None else seed
    sampler = (optuna.samplers.TPESampler(seed=seed) if spec.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0) if spec.pruner == "median" \
        else optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=spec.name, storage=storage, direction=direction(spec.metric),
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    if study.direction.name.lower() != direction(spec.metric):  # load_if_exists keeps the stored direction
        raise UserError(f"study {spec.name!r} was run to {study.direction.name.lower()} its metric; --metric "
                        f"{spec.metric} needs {direction(spec.metric)}: use another --study_name or --output_dir")
    return study


def budget_used(study) -> int:
    """Trials that count toward --n_trials: all but those a killed run left behind (they are redone)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("interrupted"))


ORPHAN_AFTER = 60.0  # seconds: a RUNNING trial that has not said whose it is by then never will


def mark_interrupted_trials(study) -> int:
    """Trials still RUNNING from a process on this host that no longer exists were killed: fail them. So are
    trials that never said whose they are (a process killed between creating its trial and naming itself)."""
    host, n = socket.gethostname(), 0
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if pid is None:
            started = t.datetime_start
            if started is None or (now - started).total_seconds() < ORPHAN_AFTER:
                continue
        elif t.user_attrs.get("host") != host or _alive(pid):
            continue
        trial = optuna.trial.Trial(study, t._trial_id)
        trial.set_user_attr("interrupted", True)
        trial.set_user_attr("fail_reason", "interrupted: its process ended before the trial finished")
        study.tell(trial, state=TrialState.FAIL)
        n += 1
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- workers


class TrialInterrupted(Exception):
    """The trial's training was asked to stop (Ctrl-C, SIGTERM) and saved a checkpoint: not a result."""


def sampler_seed(seed: int, trials_so_far: int, worker_index: int) -> int:
    """Each worker of each (re-)run samples from its own stream, reproducible from --seed and the study:
    a re-run must not draw the parameters the first run already tried."""
    return (seed * 1_000_003 + trials_so_far * 7_919 + worker_index) % 2**32


def _die_with_parent(parent_pid: int) -> None:
    """Linux: this worker gets SIGTERM when the sweep's main process dies, even by SIGKILL, so no orphan
    goes on taking trials; elsewhere, and if the parent is already gone, it checks the parent pid."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        sys.exit(1)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_trial(trial, run: SweepRun, base: dict, space: dict, device: str) -> float:
    """One trial: the base config plus the suggested values, trained by train.train()."""
    params = suggest(trial, space)
    name, metric = run.study.name, run.study.metric
    values = {**base, **params, "wandb_group": name, "wandb_name": f"{name}-trial-{trial.number}"}
    cfg = config_mod.make_config(values, "sweep")
    out = run.output_dir / "trials" / f"trial_{trial.number:04d}"

    key = metric if metric in QUALITY else "val_loss"  # what the pruner compares between trials

    def report(step: int, metrics: dict):
        if key not in metrics:
            return
        value = metrics[key]
        trial.report(value, step)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"{key} is {value} at step {step}")
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} ({key} {value:.4f})")

    result = train(cfg, run.data, out, device=device, on_eval=report, progress=False)
    if result.stopped_early:
        raise TrialInterrupted(f"interrupted at step {result.step}")
    if metric == "val_loss":
        value = result.best_val_loss
    elif metric == "final_val_loss":
        value = result.final_val_loss
    elif metric in QUALITY:
        value = best_logged(out, metric, maximize=direction(metric) == "maximize")
    else:
        value = last_logged(out, "loss")
    if value is None or not math.isfinite(value):
        raise RuntimeError(f"metric {metric} is {value}")
    return value


def worker(index: int, run: SweepRun, base: dict, space: dict, lock, parent_pid: int) -> None:
    """Take trials from the shared study until --n_trials have been started, recording each outcome.

    SIGTERM (sent by the main process when it is stopped, or when it dies) or Ctrl-C stops the trial
    in progress at its next step boundary; the trial is recorded as interrupted and the worker exits."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # between trials; training has its own handler
    if run.n_gpus:
        # Before anything touches CUDA: this process sees one GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % run.n_gpus)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    device = "cuda" if run.n_gpus else "cpu"
    if not run.n_gpus:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, run.n_workers)))
    seed = sampler_seed(run.study.seed, run.trials_at_start, index)
    study = make_study(run.study, storage_for(run.storage), seed=seed)
    while True:
        if run.deadline is not None and time.time() > run.deadline:
            return
        with lock:
            if budget_used(study) >= run.n_trials:
                return
            trial = study.ask()
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
        try:
            value = run_trial(trial, run, base, space, device)
        except optuna.TrialPruned as e:
            trial.set_user_attr("fail_reason", str(e) or "pruned")
            study.tell(trial, state=TrialState.PRUNED)
            print(f"[worker {index}] trial {trial.number} pruned: {e}", flush=True)
        except (KeyboardInterrupt, TrialInterrupted) as e:
            trial.set_user_attr("interrupted", True)
            trial.set_user_attr("fail_reason", f"interrupted ({e})" if str(e) else "interrupted")
            study.tell(trial, state=TrialState.FAIL)
            print(f"[worker {index}] trial {trial.number} interrupted; it will be redone when the sweep is run again",
                  flush=True)
            return
        except Exception as e:  # any failure ends this trial only (OOM, NaN, bad value, bug)
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            trial.set_user_attr("fail_reason", reason)
            study.tell(trial, state=TrialState.FAIL)
            print(f"[worker {index}] trial {trial.number} failed: {reason}", flush=True)
            if not isinstance(e, UserError):
                traceback.print_exc()
        else:
            study.tell(trial, value)
            print(f"[worker {index}] trial {trial.number} done: {run.study.metric} = {value:.4f}", flush=True)
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------- reports


def write_reports(study, out: Path, base: dict) -> list[Path]:
    """best_config.yaml (usable with train.py --config), trials.csv, HTML plots and report.html."""
    written = []
    df = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
    with atomic_path(out / "trials.csv") as tmp:
        df.to_csv(tmp, index=False)
    written.append(out / "trials.csv")
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        cfg = config_mod.make_config({**base, **best.params}, "best trial")
        config_mod.save_yaml(cfg, out / "best_config.yaml")
        written.append(out / "best_config.yaml")
    figures = sweep_figures(study)  # drawn once, for their own files and for the page
    for name, figure in figures.items():
        try:
            if isinstance(figure, Exception):  # e.g. importances need >= 2 complete trials with varying params
                raise figure
            with atomic_path(out / f"{name}.html") as tmp:
                figure.write_html(str(tmp))
            written.append(out / f"{name}.html")
        except Exception as e:
            print(f"skipped {name}.html: {why_not_drawn(e)}")
    try:  # the trials, their runs' curves and evaluations, and the plots above, on one page
        written.append(write_page([out], out / REPORT_NAME, figures))
    except Exception as e:  # noqa: BLE001 - the page is a view of the results above, which are written
        print(f"skipped {REPORT_NAME}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return written


# --------------------------------------------------------------------------- the whole sweep


def choose_gpus(args) -> tuple[int, bool]:
    """(GPUs to use, whether the CPU was chosen for the user) from --n_gpus and --device: the visible GPUs unless
    told otherwise. A CPU chosen because CUDA is unusable is said in one line (why); check_model_size refuses a
    large model on it."""
    visible = torch.cuda.device_count()
    chosen = args.n_gpus is None and args.device == "auto"
    if args.device == "cpu" and args.n_gpus:
        raise UserError(f"--device cpu and --n_gpus {args.n_gpus} contradict each other; give one of them")
    n_gpus = 0 if args.device == "cpu" else visible if args.n_gpus is None else args.n_gpus
    if n_gpus > visible:
        raise UserError(f"--n_gpus {n_gpus}, but {visible} GPU(s) are visible")
    if args.device == "cuda" and n_gpus == 0:
        raise UserError("--device cuda, but " + ((cuda_unusable_reason() or "no CUDA GPU is visible") if not visible
                                                  else "--n_gpus 0 asks for none"))
    auto_cpu = not n_gpus and chosen  # not asked for (--device cpu, --n_gpus 0)
    if auto_cpu:
        warn_cuda_unusable()
    return n_gpus, auto_cpu


def check_model_size(auto_cpu: bool, base: dict) -> None:
    """Refuse a model of over 100M parameters on a CPU the sweep chose itself, as train.py does. A model that cannot
    be found is left to the trials, which report it."""
    if not auto_cpu:
        return
    cfg = config_mod.make_config(base)
    try:
        source = None if cfg.train_from_scratch else resolve_source(cfg.model, cfg.model_revision)
        planned_model_args(cfg, source)  # a model or config that cannot be read is the trials' to report
    except UserError:
        return
    check_planned_size(cfg, source, auto_cpu)


def base_values(args) -> dict:
    """The training config every trial starts from: --base_config plus the sweep's flags and --set."""
    overrides = {k: getattr(args, k) for k in ("n_epochs", "max_steps", "model", "wandb_project", "wandb_mode")
                 if getattr(args, k) is not None}
    overrides.setdefault("gen_every", 0)  # samples would only slow trials down; --set gen_every=N to keep them
    overrides.setdefault("save_every", 0)
    overrides.update(config_mod.parse_set(args.set))
    return config_mod.load_config(args.base_config, overrides).to_dict()


MARKER_NAME = "sweep.json"  # which study an output directory belongs to


def study_of(out: Path) -> str | None:
    """The study an output directory belongs to (its marker), or None."""
    marker = out / MARKER_NAME
    try:
        return json.loads(marker.read_text()).get("study_name") if marker.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def _holds_other_work(out: Path, study_name: str, existing: list[str]) -> str:
    owner = study_of(out)
    what = f"study {owner!r}" if owner else f"other files ({', '.join(existing[:4])})"
    return (f"--output_dir {out} holds {what}; trials of study {study_name!r} would mix with them. "
            "Choose another --output_dir, the same --study_name to continue, or --overwrite to replace it")


# Where the run is longest or shortest, for the warmup check: the largest batches and accumulation and the fewest
# epochs or steps give the fewest optimizer steps, against the longest warmup.
_LENGTH_EXTREMES = (("warmup_steps", max), ("batch_size", max), ("max_tokens", max), ("grad_acc_steps", max),
                    ("n_epochs", min), ("max_steps", min))


def _candidates(spec: dict) -> list:
    return {"categorical": lambda: spec["values"], "fixed": lambda: [spec["value"]]}.get(
        spec["type"], lambda: [spec["min"], spec["max"]])()


def check_trial_lengths(base: dict, space: dict, data: str | list[str]) -> None:
    """The training config's launch and run-length checks (no fsdp outside torchrun; warmup shorter than the run,
    a train split that gives batches), before any trial starts, for the settings the space can draw that make
    them hardest to pass."""
    try:
        check_launch(config_mod.make_config(base, "sweep"))  # trials are plain processes, never torchrun's
    except UserError as e:
        raise UserError(f"every trial would fail: {e}") from None
    worst = dict(base)
    for key, pick in _LENGTH_EXTREMES:
        values = [v for v in _candidates(space[key]) if v] if key in space else []
        if values:
            worst[key] = pick(values)
    drawn = {k: worst[k] for k, _ in _LENGTH_EXTREMES if k in space and k in worst}
    try:
        cfg = config_mod.make_config(worst, "sweep")
        check_warmup(cfg, planned_steps(cfg, data))
    except UserError as e:
        where = f"trials that draw {', '.join(f'{k}={v}' for k, v in drawn.items())}" if drawn else "every trial"
        raise UserError(f"{where} would fail: {e}") from None


def check_args(args) -> None:
    check_number("--n_trials", args.n_trials, min=1, max=10**6)
    check_number("--n_gpus", args.n_gpus, min=0, max=1024)
    check_number("--trials_per_gpu", args.trials_per_gpu, min=1, max=64)
    check_number("--n_workers", args.n_workers, min=1, max=256)
    check_number("--timeout", args.timeout, gt=0)
    check_number("--seed", args.seed, min=0, max=2**32 - 1)


def run_sweep(args) -> int:
    """Run (or continue) the study for sweep.py's arguments until --n_trials are done; write the reports.

    Ctrl-C or SIGTERM stops every worker at its trial's next step boundary (those trials are recorded as
    interrupted and redone by the next run), then the reports are written and the exit status is 130."""
    check_args(args)
    out = Path(args.output_dir)
    base = base_values(args)
    space = load_space(args.sweep_config, base)
    sources = source_paths(args.data or base.get("train_data"))
    data = sources[0] if len(sources) == 1 else sources
    for path in sources:
        if not Path(path).is_file():
            raise UserError(f"--data {path}: no such file (make one with pretokenize.py)")
    if args.metric != "train_loss" and not any("val" in data_splits(path) for path in sources):
        raise UserError(f"{', '.join(sources)} {'has' if len(sources) == 1 else 'have'} no 'val' split; give "
                        "pretokenize.py --val_data (prefer.py: --val_fraction) or use --metric train_loss")
    if args.metric in QUALITY and not base.get("eval_every"):
        raise UserError(f"--metric {args.metric} is measured by the quality evaluation: set eval_every in the base "
                        "config or with --set eval_every=N")
    if args.storage:
        kept = check_storage(args.storage)
        if kept is not None and kept.resolve().is_relative_to(out.expanduser().resolve()):
            raise UserError(f"--storage {args.storage} lies inside --output_dir {out}, which --overwrite empties (and "
                            "a shared storage may hold other studies); keep it outside, or leave --storage out")
    n_gpus, auto_cpu = choose_gpus(args)
    check_trial_lengths(base, space, data)
    check_model_size(auto_cpu, base)
    spec = Study(args.study_name, args.metric, args.sampler, args.pruner, args.seed)
    run = SweepRun(spec, args.storage, data, out, args.n_trials, n_gpus,
                   n_workers=n_gpus * args.trials_per_gpu if n_gpus else args.n_workers,
                   deadline=time.time() + args.timeout if args.timeout else None, trials_at_start=0)
    # Held until the sweep ends; the directory is emptied and marked only once the study's storage has opened.
    inputs = inputs_of(vars(args), skip=("output_dir", "storage")) + inputs_of(base, flags=False)
    with claim_output_dir(out, "--output_dir", inputs=inputs,
                          overwrite=args.overwrite, continues=lambda _: study_of(out) == spec.name,
                          refusal=lambda existing: _holds_other_work(out, spec.name, existing)):
        return _run_study(run, base, space)


def _claim(out: Path, study_name: str) -> None:
    """Make the (locked) output directory this study's: emptied first if it held anything else (--overwrite)."""
    if dir_entries(out) and study_of(out) != study_name:
        clear_dir(out)
    write_text_atomic(out / MARKER_NAME, json.dumps({"study_name": study_name}) + "\n")


def _run_study(run: SweepRun, base: dict, space: dict) -> int:
    out = run.output_dir
    # A storage of the user's is opened before the output directory is touched; the default one lives in it.
    study = make_study(run.study, storage_for(run.storage)) if run.storage else None
    _claim(out, run.study.name)
    if study is None:
        run = replace(run, storage=default_storage(out))
        study = make_study(run.study, storage_for(run.storage))
    if mark_interrupted_trials(study):
        print("trials left running by a killed earlier run were marked failed; they will be redone")
    done = budget_used(study)
    run = replace(run, trials_at_start=len(study.get_trials(deepcopy=False)))  # seeds the samplers (sampler_seed)
    print(f"study {run.study.name!r} in {shown_url(run.storage)}: {done} of {run.n_trials} trials already done")

    n_workers = max(1, min(run.n_workers, run.n_trials - done)) if done < run.n_trials else 0
    ctx = multiprocessing.get_context("spawn")
    lock = ctx.Lock()
    procs = [ctx.Process(target=worker, args=(i, run, base, space, lock, os.getpid()), daemon=False)
             for i in range(n_workers)]
    interrupted = False
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt) if _main_thread() else None
    try:
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt:
            interrupted = True
            print("stopping: each running trial saves a checkpoint at its next step, is recorded as interrupted, "
                  "and is redone when the sweep is run again (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
            try:
                for p in procs:
                    if p.is_alive():
                        p.terminate()  # SIGTERM: the worker stops its trial at the next step boundary
                for p in procs:
                    p.join()
            except KeyboardInterrupt:
                for p in procs:
                    p.kill()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

    study = make_study(run.study, storage_for(run.storage))
    mark_interrupted_trials(study)  # a worker killed outright leaves its trial RUNNING
    # A trial of this run stopped by a signal its worker got (Ctrl-C reaches the whole process group, and the kernel
    # may hand the main process's copy to a thread other than the one waiting) leaves the study unfinished too.
    interrupted = interrupted or any(t.user_attrs.get("interrupted") for t in study.trials[run.trials_at_start:])
    written = write_reports(study, out, base)

    states = [t.state for t in study.trials]
    summary = ", ".join(f"{states.count(s)} {s.name.lower()}" for s in TrialState if states.count(s))
    print(f"{len(states)} trials: {summary}")
    for t in study.trials:
        if t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"):
            print(f"  trial {t.number} failed: {t.user_attrs.get('fail_reason', '?')}")
    if any(s == TrialState.COMPLETE for s in states):
        print(f"best: trial {study.best_trial.number}, {run.study.metric} = {study.best_value:.4f}, "
              f"{study.best_params}")
    print("wrote " + ", ".join(str(p) for p in written))
    if interrupted:
        print("interrupted; run the same command again to continue the study", file=sys.stderr)
        return 130
    if TrialState.COMPLETE not in states:
        print(f"error: no trial of study {run.study.name!r} completed (see the reasons above and in "
              f"{out / 'trials.csv'})", file=sys.stderr)
        return 1
    return 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
