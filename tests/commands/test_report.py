"""report.py: one page for runs that are whole, damaged, missing or mid-write; its outputs guarded as every command's.
The page of a real run in a real browser is tested in test_demo.py, on the demo's own page."""
import json

import pytest

import browser
from conftest import assert_clear_error, cli, fails_clearly


def _run(path, rows, raw_tail=""):
    """A run directory as train.py leaves it: metrics.jsonl (rows, then any raw text), config.yaml, best/."""
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + raw_tail)
    (path / "config.yaml").write_text("select_best_by: val_loss\n")
    return path


def _rows(n=6, nan_at=()):
    rows = []
    for step in range(1, n + 1):
        rows.append({"step": step, "loss": float("nan") if step in nan_at else 10.0 - step, "lr": 1e-3,
                     "grad_norm": 1.0})
        if step % 2 == 0:
            rows.append({"step": step, "val_loss": 9.0 - step / 2})
    return rows


def _page(tmp_path, *runs, name="page.html"):
    rc, err = cli("report.py", *runs, "--output", tmp_path / name)
    assert rc == 0, err
    return (tmp_path / name).read_text()


def _figures(page: str) -> list[dict]:
    return json.loads(page.split("const FIGURES = ", 1)[1].split(";", 1)[0])


def test_a_run_without_evaluations_samples_or_best_says_what_is_missing(tmp_path):
    run = _run(tmp_path / "plain", _rows())
    page = _page(tmp_path, run)
    assert "no quality evaluations" in page and "no training samples" in page and "no best/ yet" in page
    assert "No run here has a quality evaluation" in page
    keys = [f["data"][0]["name"] for f in _figures(page)]
    assert keys == ["plain"] * 4  # loss, val_loss, lr, grad_norm
    assert [f["layout"]["title"]["text"].split()[0] for f in _figures(page)] == ["loss", "val_loss", "lr", "grad_norm"]
    assert "http://" not in page.split("<script>")[0] and "src=\"http" not in page  # nothing from a network
    started = tmp_path / "started"  # a run that has not logged its first step yet
    started.mkdir()
    (started / "config.yaml").write_text("select_best_by: cer\n")
    page = _page(tmp_path, started, name="started.html")
    assert "no metrics.jsonl: the run has not logged a step yet" in page and "Nothing logged yet to draw" in page


def test_a_run_killed_mid_write_and_nan_losses_are_drawn_with_a_word(tmp_path):
    run = _run(tmp_path / "killed", _rows(nan_at=(3,)), raw_tail='{"step": 7, "loss": 3.')  # the cut-short line
    (run / "best").mkdir()
    page = _page(tmp_path, run)
    assert "1 line(s) not whole (line 10" in page and "left out" in page
    assert "loss: 1 non-finite value(s) (NaN or inf), not drawn: step 3" in page
    loss = _figures(page)[0]["data"][0]
    assert loss["x"] == [1, 2, 3, 4, 5, 6] and loss["y"][2] is None and loss["y"][5] == 4.0
    assert "best/ holds step 6: the best val_loss logged, 6" in page


def test_damaged_evaluations_are_left_out_with_a_word(tmp_path):
    """An evaluation whose summary.json is cut short is left out, one whose items lack ids loses those rows, one whose
    summary is not evaluate.py's shape loses those parts: each said, the page still written."""
    run = _run(tmp_path / "run", _rows())
    for step, summary, items in ((2, '{"generated": {"cer"', "id,text\na,hi\n"),
                                 (4, '{"generated": [1, 2]}', "id,text\n,no id\nb,hello\n")):
        folder = run / "eval" / f"step_{step:07d}"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(summary)
        (folder / "items.csv").write_text(items)
    page = _page(tmp_path, run)
    assert "eval/step_0000002 cannot be read (JSONDecodeError): left out" in page
    assert "eval/step_0000004/items.csv: 1 row(s) without an id: left out" in page
    assert '<option value="4" selected>4</option>' in page and 'data-item="b"' in page


def test_several_runs_are_overlaid_a_colour_each(tmp_path):
    a, b = _run(tmp_path / "x" / "run", _rows()), _run(tmp_path / "y" / "run", _rows(n=4))
    figure = _figures(_page(tmp_path, a, b))[0]
    names = [t["name"] for t in figure["data"]]
    assert names == ["x/run", "y/run"]  # same names told apart by their folders
    assert len({t["line"]["color"] for t in figure["data"]}) == 2


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "absent", "no such run directory"),
    (lambda d: (d / "f.txt").write_text("x") and d / "f.txt", "is a file; give a run directory"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "is neither a training run"),
])
def test_a_missing_or_foreign_run_is_one_line_and_writes_nothing(tmp_path, make, message):
    good = _run(tmp_path / "good", _rows())
    fails_clearly("report.py", [good, make(tmp_path), "--output", tmp_path / "page.html"], message,
                  through_cli=message == "no such run directory")
    assert not (tmp_path / "page.html").exists()


def test_the_output_is_guarded(tmp_path):
    run = _run(tmp_path / "run", _rows())
    mine = tmp_path / "page.html"
    _page(tmp_path, run)
    _page(tmp_path, run)  # a page of its own is replaced without --overwrite
    other = tmp_path / "notes.html"
    other.write_text("<p>my notes</p>")
    rc, err = cli("report.py", run, "--output", other)
    assert_clear_error(rc, err, "exists; pass --overwrite")
    assert other.read_text() == "<p>my notes</p>"
    fails_clearly("report.py", [run, "--output", tmp_path / "page.txt"], "ending in .html", through_cli=False)
    fails_clearly("report.py", [run, "--output", run / "metrics.jsonl"], "ending in .html", through_cli=False)
    fails_clearly("report.py", [run, "--output", run], "ending in .html", through_cli=False)
    (tmp_path / "dir.html").mkdir()
    fails_clearly("report.py", [run, "--output", tmp_path / "dir.html"], "is a directory", through_cli=False)
    assert mine.is_file()


@pytest.mark.skipif(browser.find_browser() is None, reason=browser.MISSING)
def test_a_damaged_run_page_has_no_script_error_in_a_browser(tmp_path):
    run = _run(tmp_path / "killed", _rows(nan_at=(2, 3)), raw_tail='{"step": 7, "lo')
    _page(tmp_path, run)
    with browser.open_file(tmp_path / "page.html") as page:
        drawn = page.evaluate(browser.TRACES)
        assert not page.errors, page.errors
    assert drawn and all(n == expected and n > 0 for _, expected, n in drawn), drawn


def test_the_inlined_script_is_the_one_plotly_ships():
    """The page reads plotly.min.js from the wheel's files (no import of plotly per page): it is what plotly's own
    get_plotlyjs gives."""
    from plotly.offline import get_plotlyjs

    from csm.training.report import plotly_js

    assert plotly_js() == get_plotlyjs() and len(plotly_js()) > 1_000_000
