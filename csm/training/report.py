"""One HTML page for one or more training runs (or a sweep's trials): the curves of metrics.jsonl, every quality
evaluation with players for each item, the training samples, and which step best/ holds.

The page carries its scripts and plots (plotly's JS, from its wheel, inlined): it opens from disk with no network. The
players point at the runs' own wav files by relative paths, so the page is read where it was written, beside the runs.
What a run lacks (no evaluations yet, a line cut short by a crash, NaN losses) is said on the page, in words.
"""
from __future__ import annotations

import csv
import functools
import html
import importlib.resources
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from csm.judging.metrics import BY_NAME, QUALITY, lower_is_better
from csm.system.errors import UserError
from csm.system.outputs import write_text_atomic
from csm.training.tracking import read_metrics

REPORT_NAME = "report.html"  # what train.py and sweep.py keep up to date in their output directories
GENERATOR = "csm-train report"  # the page's <meta name="generator">: a page of ours, which may be rewritten
# Logged numbers that are bookkeeping, not curves.
NOT_CURVES = {"step", "epoch"}
EVAL_DIR = re.compile(r"step_(\d+)(_ema)?$")
SAMPLE = re.compile(r"step_(\d+)_(\d+)\.wav$")
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22")


@dataclass
class Evaluation:
    step: int
    average: bool  # the weight average's (eval/step_N_ema/), not the trained weights'
    summary: dict
    items: list[dict]
    folder: Path


@dataclass
class RunData:
    """What one run directory holds, read without trusting it: every part may be missing or damaged."""
    path: Path
    name: str
    rows: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    evaluations: list[Evaluation] = field(default_factory=list)
    samples: dict[int, list[Path]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what is damaged, in words
    absent: list[str] = field(default_factory=list)  # what the run's settings left out (no evaluations, samples)

    @property
    def anchor(self) -> str:
        return "run-" + re.sub(r"[^A-Za-z0-9_-]", "-", self.name)


def is_sweep(path: Path) -> bool:
    return (path / "trials.csv").is_file() or (path / "trials").is_dir()


def read_run(path: Path, name: str) -> RunData:
    run = RunData(path, name)
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        run.rows = _read_rows(metrics, run.notes)
    else:
        run.notes.append("no metrics.jsonl: the run has not logged a step yet")
    config = path / "config.yaml"
    if config.is_file():
        import yaml

        try:  # the C loader where PyYAML has one: a run's config is read at every evaluation
            loaded = yaml.load(config.read_text(errors="replace"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            run.config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            run.notes.append("config.yaml cannot be read: which metric picks best/ is not known")
    evals = path / "eval"
    for folder in sorted(evals.iterdir()) if evals.is_dir() else []:
        match = EVAL_DIR.match(folder.name)
        if match and folder.is_dir():
            evaluation = _read_evaluation(folder, int(match.group(1)), bool(match.group(2)), run.notes)
            if evaluation is not None:
                run.evaluations.append(evaluation)
    if not run.evaluations:
        run.absent.append("no quality evaluations (eval/step_N/): train with eval_every > 0 to hear the model "
                         "as it trains")
    for wav in sorted((path / "samples").glob("step_*.wav")):
        match = SAMPLE.match(wav.name)
        if match:
            run.samples.setdefault(int(match.group(1)), []).append(wav)
    if not run.samples:
        run.absent.append("no training samples (samples/): gen_every is 0, or no sample step was reached")
    for key, steps in _nonfinite(run.rows).items():
        shown = ", ".join(map(str, steps[:5])) + (", ..." if len(steps) > 5 else "")
        run.notes.append(f"{key}: {len(steps)} non-finite value(s) (NaN or inf), not drawn: step {shown}")
    return run


def _read_rows(path: Path, notes: list[str]) -> list[dict]:
    bad: list[int] = []
    rows = read_metrics(path, skipped=bad)
    if bad:
        notes.append(f"metrics.jsonl: {len(bad)} line(s) not whole (line {', '.join(map(str, bad[:5]))}; a run killed "
                     "mid-write cuts its last line short): left out")
    return rows


def _read_evaluation(folder: Path, step: int, average: bool, notes: list[str]) -> Evaluation | None:
    try:
        summary = json.loads((folder / "summary.json").read_text())
        with open(folder / "items.csv", newline="", encoding="utf-8", errors="replace") as f:
            items = list(csv.DictReader(f))
    except (OSError, ValueError) as e:
        notes.append(f"eval/{folder.name} cannot be read ({type(e).__name__}): left out")
        return None
    # Only the parts of the shapes evaluate.py writes: a hand-edited or foreign file loses the rest, not the page.
    parts = ("generated", "reference", "codec")
    summary = {k: v for k, v in summary.items() if isinstance(v, dict) or k not in parts} \
        if isinstance(summary, dict) else {}
    kept = [row for row in items if row.get("id")]
    if len(kept) < len(items):
        notes.append(f"eval/{folder.name}/items.csv: {len(items) - len(kept)} row(s) without an id: left out")
    return Evaluation(step, average, summary, kept, folder)


def _nonfinite(rows: list[dict]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                found.setdefault(key, []).append(row["step"])
    return found


def read_runs(paths: list[Path]) -> tuple[list[RunData], list[tuple[Path, list[RunData]]]]:
    """The runs named and the sweeps named (each with its trials' runs). Checked first: a path that does not exist,
    or is neither a run nor a sweep, is refused in one line before anything is read."""
    for path in paths:
        if not path.exists():
            raise UserError(f"{path}: no such run directory")
        if not path.is_dir():
            raise UserError(f"{path} is a file; give a run directory (train.py --output_dir) or a sweep directory")
        if not is_sweep(path) and not any((path / name).exists() for name in ("metrics.jsonl", "config.yaml",
                                                                             "checkpoints")):
            raise UserError(f"{path} is neither a training run (no metrics.jsonl, config.yaml or checkpoints/) nor a "
                            "sweep (no trials.csv or trials/)")
    names = _short_names(paths)
    runs, sweeps = [], []
    for path, name in zip(paths, names):
        if is_sweep(path):
            trials = sorted((path / "trials").glob("trial_*")) if (path / "trials").is_dir() else []
            sweeps.append((path, [read_run(t, f"{name}/{t.name}") for t in trials if t.is_dir()]))
        else:
            runs.append(read_run(path, name))
    return runs, sweeps


def _short_names(paths: list[Path]) -> list[str]:
    """Each directory's name, or more of its path where two would read alike."""
    resolved = [p.resolve() for p in paths]
    for depth in range(1, 1 + max(len(p.parts) for p in resolved)):
        names = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in resolved]


# --------------------------------------------------------------------------- what the page shows


def best_steps(run: RunData) -> list[str]:
    """Which step best/ (and best_ema/) holds and by which metric, as training chose it: the first step with the
    best value of select_best_by (of the average's, ema_ + it, for best_ema/)."""
    by = run.config.get("select_best_by", "val_loss")
    lines = []
    for folder, key in (("best", by), ("best_ema", f"ema_{by}")):
        if not (run.path / folder).is_dir():
            continue
        scored = [(lower_is_better(by, r[key]) if by in BY_NAME else r[key], r["step"]) for r in run.rows
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if scored:
            score, step = min(scored, key=lambda s: s[0])  # min keeps the first of ties, as training does
            value = -score if by in BY_NAME and BY_NAME[by].higher_is_better else score
            lines.append(f"{folder}/ holds step {step}: the best {key} logged, {value:.4g}")
        else:
            lines.append(f"{folder}/ exists, but metrics.jsonl logs no {key} to say which step it holds")
    if not (run.path / "best").is_dir():
        lines.append(f"no best/ yet (it is written when {by} is first measured)")
    return lines


def curve_keys(runs: list[RunData]) -> list[str]:
    seen: list[str] = []
    for run in runs:
        for row in run.rows:
            for key, value in row.items():
                base = key[4:] if key.startswith("ema_") else key
                if base not in seen and key not in NOT_CURVES and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    seen.append(base)
    def place(key: str) -> int:  # the training loss and its parts, validation, lr, grad_norm, quality, the rest
        if key == "loss" or (key.endswith("_loss") and not key.startswith("val")):
            return 0
        if key.startswith("val_"):
            return 1
        order = ("lr", "grad_norm", *QUALITY)
        return 2 + order.index(key) if key in order else 2 + len(order)

    return sorted(seen, key=lambda k: (place(k), seen.index(k)))


def curve_figures(runs: list[RunData]) -> list[dict]:
    """One plot per logged number, every run a colour; the weight average's (ema_) dashed beside it."""
    out = []
    for key in curve_keys(runs):
        traces = []
        for i, run in enumerate(runs):
            for logged, suffix, dash in ((key, "", "solid"), (f"ema_{key}", " (average)", "dash")):
                points = [(r["step"], r[logged]) for r in run.rows if isinstance(r.get(logged), (int, float))]
                if not points:
                    continue
                traces.append({"type": "scatter", "mode": "lines+markers" if len(points) < 30 else "lines",
                               "name": run.name + suffix, "x": [s for s, _ in points],
                               "y": [v if math.isfinite(v) else None for _, v in points],
                               "line": {"color": COLOURS[i % len(COLOURS)], "dash": dash}})
        title = f"{key} ({'higher' if BY_NAME[key].higher_is_better else 'lower'} is better)" if key in BY_NAME else key
        out.append({"key": key, "data": traces,
                    "layout": {"title": {"text": title, "x": 0.02, "xanchor": "left"}, "height": 300,
                               "margin": {"l": 50, "r": 10, "t": 40, "b": 40}, "xaxis": {"title": {"text": "step"}},
                               "legend": {"orientation": "h"}}})
    return out


def _link(target: Path, page_dir: Path) -> str:
    """A URL for `target` from the page's folder: relative where it can be, a file:// URI otherwise."""
    try:
        return "/".join(Path(os.path.relpath(target.resolve(), page_dir.resolve())).parts)
    except ValueError:  # another drive (Windows)
        return target.resolve().as_uri()


def _player(wav: Path, page_dir: Path) -> str:
    if not wav.is_file():
        return '<span class="missing">(no audio)</span>'
    return f'<audio controls preload="metadata" src="{html.escape(_link(wav, page_dir))}"></audio>'


def _number(value) -> str:
    if value is None or value == "":
        return "-"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return html.escape(str(value))
    return f"{value:.4g}" if math.isfinite(value) else "NaN"


def evaluations_html(runs: list[RunData], page_dir: Path) -> str:
    """A step picker and an item picker over every run's evaluations: the summary table of the step, then each
    item's text, and per run the generated speech, its transcript and CER, beside the recording."""
    columns = [(run, average) for run in runs for average in (False, True)
               if any(e.average == average for e in run.evaluations)]
    if not columns:
        return "<p class=note>No run here has a quality evaluation (eval_every is 0, or none was reached).</p>"
    steps = sorted({e.step for run in runs for e in run.evaluations})
    by = {(run.name, e.average, e.step): e for run in runs for e in run.evaluations}
    items = list(dict.fromkeys(item["id"] for run in runs for e in run.evaluations for item in e.items))
    parts = ['<div class=pickers><label>step <select id=eval-step>',
             *[f'<option value="{s}"{" selected" if s == steps[-1] else ""}>{s}</option>' for s in steps],
             '</select></label> <label>item <select id=eval-item><option value="">all</option>',
             *[f'<option value="{html.escape(i)}">{html.escape(i)}</option>' for i in items], '</select></label></div>']
    metrics = [m for m in QUALITY if any(m in (e.summary.get("generated") or {}) for e in by.values())]
    for step in steps:
        parts.append(f'<section class=eval-step data-step="{step}"{"" if step == steps[-1] else " hidden"}>')
        head = "".join(f"<th>{m}</th>" for m in metrics)
        parts.append(f"<table class=summary><tr><th>weights</th><th>n</th>{head}</tr>")
        ceilings = next((e.summary for e in by.values() if e.step == step), {})
        for what in ("reference", "codec"):
            if ceilings.get(what):
                values = "".join(f"<td>{_number(ceilings[what].get(m))}</td>" for m in metrics)
                parts.append(f"<tr class=ceiling><td>{what} (ceiling)</td><td>{ceilings[what].get('n', '-')}</td>"
                             f"{values}</tr>")
        for run, average in columns:
            e = by.get((run.name, average, step))
            label = html.escape(run.name + (" (average)" if average else ""))
            if e is None:
                parts.append(f"<tr><td>{label}</td><td colspan={len(metrics) + 1}>not evaluated at this step</td></tr>")
                continue
            generated = e.summary.get("generated") or {}
            values = "".join(f"<td>{_number(generated.get(m))}</td>" for m in metrics)
            parts.append(f"<tr><td>{label}</td><td>{generated.get('n', '-')}</td>{values}</tr>")
        parts.append("</table><table class=items><tr><th>item</th><th>reference</th>"
                     + "".join(f"<th>{html.escape(run.name + (' (average)' if a else ''))}</th>" for run, a in columns)
                     + "</tr>")
        for item in items:
            rows = {(run.name, a): next((r for r in e.items if r["id"] == item), None)
                    for run, a in columns if (e := by.get((run.name, a, step)))}
            found = [(key, r) for key, r in rows.items() if r is not None]
            if not found:
                continue
            (name, average), first = found[0]
            reference = by[(name, average, step)].folder / "wavs" / f"{item}_reference.wav"
            cells = []
            for run, a in columns:
                row = rows.get((run.name, a))
                if row is None:
                    cells.append("<td>-</td>")
                    continue
                wav = by[(run.name, a, step)].folder / "wavs" / f"{item}_generated.wav"
                cells.append(f"<td>{_player(wav, page_dir)}<div class=said>heard: "
                             f"{html.escape(row.get('transcript') or '-')}</div><div>CER {_number(row.get('cer'))}"
                             "</div></td>")
            parts.append(f'<tr data-item="{html.escape(item)}"><td><b>{html.escape(item)}</b><div class=said>'
                         f'{html.escape(first.get("text") or "")}</div></td><td>{_player(reference, page_dir)}</td>'
                         + "".join(cells) + "</tr>")
        parts.append("</table></section>")
    return "\n".join(parts)


def samples_html(runs: list[RunData], page_dir: Path) -> str:
    parts = []
    for run in runs:
        if not run.samples:
            continue
        parts.append(f"<h3>{html.escape(run.name)}</h3><table><tr><th>step</th><th>samples</th></tr>")
        for step, wavs in sorted(run.samples.items()):
            players = "".join(_player(w, page_dir) for w in wavs)
            parts.append(f"<tr><td>{step}</td><td>{players}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts) or "<p class=note>No run here has training samples (gen_every is 0).</p>"


def runs_html(runs: list[RunData]) -> str:
    """A row per run: its colour, name and folder, its last step, what best/ holds, and what it lacks."""
    parts = ["<table class=runs><tr><th>run</th><th>last step</th><th>best</th><th>notes</th></tr>"]
    for i, run in enumerate(runs):
        last = run.rows[-1]["step"] if run.rows else "none"
        colour = COLOURS[i % len(COLOURS)]
        notes = [f"<div class=missing>{html.escape(n)}</div>" for n in run.notes] + \
            [f"<div class=note>{html.escape(n)}</div>" for n in run.absent]
        parts.append(f'<tr id="{run.anchor}"><td><span class=swatch style="background:{colour}"></span>'
                     f'<b>{html.escape(run.name)}</b><div class=path>{html.escape(str(run.path))}</div></td>'
                     f"<td class=last>{last}</td><td>{'<br>'.join(html.escape(line) for line in best_steps(run))}</td>"
                     f"<td>{''.join(notes) or '-'}</td></tr>")
    return "\n".join(parts) + "</table>"


# Optuna's plots of a sweep: the file stem sweep.py writes each to, the page's title, the optuna.visualization function.
SWEEP_PLOTS = (("optimization_history", "optimization history", "plot_optimization_history"),
               ("param_importances", "parameter importances", "plot_param_importances"),
               ("parallel_coordinate", "parallel coordinates", "plot_parallel_coordinate"))


def sweep_figures(study) -> dict[str, object]:
    """Each of SWEEP_PLOTS of `study` by its file stem: a plotly figure, or the exception that kept it from being
    drawn (e.g. importances need two finished trials with varied parameters)."""
    import optuna.visualization as vis  # plotly: 0.7 s to import, for sweeps only

    figures = {}
    for stem, _, plot in SWEEP_PLOTS:
        try:
            figures[stem] = getattr(vis, plot)(study)
        except Exception as e:  # noqa: BLE001 - said where the figure would be
            figures[stem] = e
    return figures


def why_not_drawn(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def sweep_html(sweep: Path, trials: list[RunData], figures: dict | None = None) -> tuple[str, list[dict]]:
    """The trials table (number, state, value, parameters; each number links to its run's section) and Optuna's
    plots: `figures` as sweep.py drew them (sweep_figures), else drawn from the sweep's own study.db when it can be
    opened."""
    parts = [f"<h2>Sweep {html.escape(sweep.name)}</h2>"]
    anchors = {run.path.name: run.anchor for run in trials}
    table = sweep / "trials.csv"
    if table.is_file():
        with open(table, newline="", encoding="utf-8", errors="replace") as f:
            rows = list(csv.DictReader(f))
        params = [c for c in (rows[0] if rows else {}) if c.startswith("params_")]
        parts.append("<table><tr><th>trial</th><th>state</th><th>value</th>"
                     + "".join(f"<th>{html.escape(c[7:])}</th>" for c in params) + "</tr>")
        for row in rows:
            number = row.get("number", "")
            anchor = anchors.get(f"trial_{int(number):04d}") if number.isdigit() else None
            shown = f'<a href="#{anchor}">{number}</a>' if anchor else html.escape(number)
            parts.append(f"<tr><td>{shown}</td><td>{html.escape(row.get('state', ''))}</td>"
                         f"<td>{_number(row.get('value'))}</td>"
                         + "".join(f"<td>{_number(row.get(c))}</td>" for c in params) + "</tr>")
        parts.append("</table>")
    else:
        parts.append("<p class=missing>no trials.csv yet: the sweep writes it when it ends</p>")
    plots = []
    if figures is None:
        study = _open_study(sweep)
        figures = sweep_figures(study) if study is not None else None
    if figures is None:
        parts.append("<p class=note>Optuna's plots: the sweep's study could not be opened here (a shared "
                     "--storage); its own HTML plots are in the sweep directory.</p>")
        return "\n".join(parts), plots
    for stem, name, _ in SWEEP_PLOTS:
        figure = figures[stem]
        if isinstance(figure, Exception):
            parts.append(f"<p class=note>{name}: not drawn ({html.escape(why_not_drawn(figure))})</p>")
            continue
        drawn = json.loads(figure.to_json())
        plots.append({"key": f"sweep: {name}", "data": drawn["data"], "layout": drawn["layout"]})
    return "\n".join(parts), plots


def _open_study(sweep: Path):
    database = sweep / "study.db"
    if not database.is_file():
        return None
    import optuna

    try:
        storage = f"sqlite:///{database.resolve()}"
        names = optuna.study.get_all_study_names(storage)
        return optuna.load_study(study_name=names[0], storage=storage) if len(names) == 1 else None
    except Exception:  # noqa: BLE001 - a damaged or foreign database: the page says the plots are not here
        return None


STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}h1{margin-top:0}table{border-collapse:collapse;
margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top;text-align:left}
.missing{color:#a33}.note{color:#555}.path,.said{color:#666;font-size:12px}.swatch{display:inline-block;width:12px;
height:12px;margin-right:6px}.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:8px}
.ceiling{color:#555;font-style:italic}audio{height:32px;max-width:260px}.pickers{margin:.5em 0}"""

SCRIPT = """
for (const figure of FIGURES) {
  const div = document.getElementById(figure.id);
  Plotly.newPlot(div, figure.data, figure.layout, {responsive: true, displaylogo: false});
}
function showEvaluation() {
  const step = document.getElementById('eval-step'), item = document.getElementById('eval-item');
  if (!step) return;
  for (const section of document.querySelectorAll('.eval-step')) section.hidden = section.dataset.step !== step.value;
  for (const row of document.querySelectorAll('.items tr[data-item]'))
    row.hidden = item.value !== '' && row.dataset.item !== item.value;
}
for (const id of ['eval-step', 'eval-item']) {
  const picker = document.getElementById(id);
  if (picker) picker.addEventListener('change', showEvaluation);
}
"""


def build_page(paths: list[Path], page: Path, figures: dict | None = None) -> str:
    """The page's HTML for the runs and sweeps at `paths`, to be written at `page` (its links are relative to it)."""
    runs, sweeps = read_runs(paths)
    title = ", ".join([*(run.name for run in runs), *(f"sweep {path.name}" for path, _ in sweeps)])
    page_dir = page.parent
    sweep_parts, plots = [], []
    for sweep, trials in sweeps:
        text, figs = sweep_html(sweep, trials, figures)
        sweep_parts.append(text)
        plots += figs
        runs += trials
    figs = curve_figures(runs) + plots
    for i, figure in enumerate(figs):
        figure["id"] = f"plot-{i}"
    curves = "".join(f'<div id="{f["id"]}" class=plot data-key="{html.escape(f["key"])}"></div>' for f in figs) or \
        "<p class=note>Nothing logged yet to draw.</p>"
    body = [f"<h1>Training report: {html.escape(title)}</h1>",
            "<h2>Runs</h2>", runs_html(runs) if runs else "<p class=note>No runs: the sweep has no trials yet.</p>",
            "<h2>Curves</h2>", f"<div class=plots>{curves}</div>",
            "<h2>Quality evaluations</h2>", evaluations_html(runs, page_dir),
            "<h2>Training samples</h2>", samples_html(runs, page_dir),
            *sweep_parts]
    data = json.dumps(_finite([{"id": f["id"], "data": f["data"], "layout": f["layout"]} for f in figs]),
                      allow_nan=False, default=str).replace("</", "<\\/")
    return (f'<!doctype html><html><head><meta charset="utf-8"><meta name="generator" content="{GENERATOR}">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style>"
            f"<script>{plotly_js()}</script></head><body>{''.join(body)}"
            f"<script>const FIGURES = {data};{SCRIPT}</script></body></html>\n")


@functools.lru_cache(maxsize=1)
def plotly_js() -> str:
    """plotly.js as the plotly wheel ships it (what plotly.offline.get_plotlyjs returns), read once a process and
    without importing plotly's Python side: train.py writes a page after each evaluation."""
    return (importlib.resources.files("plotly") / "package_data" / "plotly.min.js").read_text(encoding="utf-8")


def _finite(value):
    """JSON for the page's script: NaN and inf (which JSON lacks) become null, a gap in a curve."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def is_our_page(path: Path) -> bool:
    """A file this module wrote (which train.py and sweep.py may rewrite), by its generator tag near the start."""
    try:
        with open(path, "rb") as f:
            return f'<meta name="generator" content="{GENERATOR}">'.encode() in f.read(400)
    except OSError:
        return False


def write_page(paths: list[Path], page: Path, figures: dict | None = None) -> Path:
    """The page of `paths` at `page`; `figures`: a sweep's plots as sweep.py drew them (sweep_figures)."""
    write_text_atomic(page, build_page(paths, page, figures))
    return page
