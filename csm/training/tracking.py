"""Where metrics go: metrics.jsonl always, Weights & Biases when enabled (offline without an API key),
and a silent tracker on ranks other than 0, so the training loop has no `if wandb:` branches.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import numpy as np

from csm.system.errors import UserError
from csm.system.runtime import Runtime
from csm.system.outputs import append_line, write_text_atomic
from csm.model.codec import MIMI_SAMPLE_RATE

WANDB_MODES = ("auto", "online", "offline", "disabled")
METRICS_NAME = "metrics.jsonl"


class Tracker:
    """metrics.jsonl always; W&B too when enabled. Rank 0 only: other ranks get a silent one."""

    def __init__(self, path: Path | None, run=None):
        self.path, self.run = path, run

    def log(self, metrics: dict, step: int) -> None:
        if self.path is None:
            return
        append_line(self.path, json.dumps({"step": step, **metrics}))
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_audio(self, key: str, audio: np.ndarray, sample_rate: int, step: int, caption: str) -> None:
        if self.run is not None:
            import wandb  # optional, and 0.6 s to import: W&B runs only

            self.run.log({key: wandb.Audio(audio, sample_rate=sample_rate, caption=caption)}, step=step)

    def log_eval_table(self, step: int, rows: list[dict], audio: dict, prefix: str = "") -> None:
        """A quality evaluation's items as a W&B table (`prefix`eval_items): text, transcript, metrics, generated and
        reference audio."""
        if self.run is None:
            return
        import wandb  # optional, and 0.6 s to import: W&B runs only

        def player(item_id, kind):
            clip = audio.get(item_id, {}).get(kind)
            return wandb.Audio(clip, sample_rate=MIMI_SAMPLE_RATE) if clip is not None and len(clip) else None

        columns = ["id", "text", "transcript", "wer", "cer", "speaker_sim", "stopped_at_eos", "generated", "reference"]
        data = [[r["id"], r["text"], r.get("transcript"), r.get("wer"), r.get("cer"), r.get("speaker_sim"),
                 r.get("stopped_at_eos"), player(r["id"], "generated"), player(r["id"], "reference")] for r in rows]
        self.run.log({f"{prefix}eval_items": wandb.Table(columns=columns, data=data)}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_mode(requested: str) -> str:
    """Resolve 'auto'; online without a key is a user error, not a prompt or a crash."""
    if requested == "auto":
        return "online" if _wandb_key_configured() else "offline"
    if requested == "online" and not _wandb_key_configured():
        raise UserError("W&B online needs an API key: set WANDB_API_KEY in .env or run `wandb login`, "
                        "or use --wandb_mode offline (sync later with `wandb sync`) or disabled")
    return requested


def make_tracker(cfg, out: Path, rt: Runtime, resumed_step: int) -> Tracker:
    """The run's tracker; a resumed run first drops logged lines past the step it resumes from."""
    if not rt.is_main:
        return Tracker(None)
    metrics = out / METRICS_NAME
    if metrics.exists():
        # Drop lines past the resumed step, so a resumed run's log reads like an uninterrupted one; a line
        # cut short by a crash is dropped too.
        keep = [json.dumps(row) for row in read_metrics(metrics) if row["step"] <= resumed_step]
        write_text_atomic(metrics, "".join(line + "\n" for line in keep))
    mode = wandb_mode(cfg.wandb_mode)
    if mode == "disabled":
        return Tracker(metrics)
    import wandb  # optional, and 0.6 s to import: W&B runs only

    id_file = out / "wandb_run_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    write_text_atomic(id_file, run_id)
    run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_name or out.name, group=cfg.wandb_group,
                     dir=str(out), mode=mode, id=run_id, resume="allow", config=cfg.to_dict())
    return Tracker(metrics, run)


def read_metrics(path: str | Path, skipped: list[int] | None = None) -> list[dict]:
    """The rows of a metrics.jsonl; lines that are not a whole JSON object with a step (a write cut short
    by a crash) are skipped, and their line numbers (1-based; blank lines aside) added to `skipped`."""
    rows = []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        elif skipped is not None and line.strip():
            skipped.append(number)
    return rows


def last_logged(output_dir: str | Path, key: str) -> float | None:
    """The last value of `key` in a run's metrics.jsonl."""
    value = None
    for row in read_metrics(Path(output_dir) / METRICS_NAME):
        value = row.get(key, value)
    return value


def best_logged(output_dir: str | Path, key: str, maximize: bool = False) -> float | None:
    """The lowest (or highest) finite value of `key` in a run's metrics.jsonl."""
    values = [row[key] for row in read_metrics(Path(output_dir) / METRICS_NAME)
              if isinstance(row.get(key), (int, float)) and np.isfinite(row[key])]
    if not values:
        return None
    return max(values) if maximize else min(values)
