"""One page for one or more training runs, or a sweep: curves, evaluations with players, samples, best/.

    python report.py runs/my-voice --output my-voice.html
    python report.py runs/lr-1e-4 runs/lr-3e-4 --output compare.html   (overlaid, a colour each)
    python report.py sweeps/lr --output sweep.html                      (the trials, their runs, Optuna's plots)

train.py keeps RUN_DIR/report.html up to date after each evaluation, and sweep.py SWEEP_DIR/report.html; this command
draws any set of runs together. The page opens from disk, with no network; its players read the runs' wav files
by relative paths, so open it where it was written.
"""
from __future__ import annotations

from pathlib import Path

from csm.system.errors import UserError
from csm.system.outputs import claim_output_files
from csm.training.report import is_our_page, read_runs, write_page
from utils import CommandParser, run_cli


def build_parser() -> CommandParser:
    p = CommandParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a train.py --output_dir or a sweep.py --output_dir")
    p.add_argument("--output", required=True, help="the page to write (.html)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it is another file (a page this command wrote is replaced anyway)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    if output.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--output {output}: give a file name ending in .html")
    runs = [Path(r) for r in args.runs]
    read_runs(runs)  # every run checked (exists, is a run or a sweep) before the output is claimed
    mine = output.is_file() and is_our_page(output)
    with claim_output_files([output], "--output", inputs=[("RUN_DIR", r) for r in args.runs],
                            overwrite=args.overwrite or mine) as (page,):
        write_page(runs, page)
    print(f"wrote {page}: open it in a browser")
    return 0


if __name__ == "__main__":
    run_cli(main)
