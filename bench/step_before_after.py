"""Did a change slow the training step? bench/train_step.py's mid-flavor rows, of two commits, in alternation.

    python bench/step_before_after.py BASE_REV [--rounds 5] [--steps 4] [--device auto]

Each round measures every row once with BASE_REV's code (a temporary git worktree of it) and once with this tree's,
each in a process of its own, one after the other: this machine's speed drifts by up to a third over minutes, and a
pair measured back to back sees the same drift. It prints each row's median frames/s for both and their ratio.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))

ROWS = [("fp32, max_tokens=4096", {"precision": "fp32", "max_tokens": 4096}),
        ("bf16 autocast, max_tokens=4096", {"precision": "bf16", "max_tokens": 4096}),
        ("fp32, max_tokens=4096, grad_acc_steps=2", {"precision": "fp32", "max_tokens": 4096, "grad_acc_steps": 2})]
CHILD = """
import json, sys, torch
sys.path.insert(0, {tree!r}); sys.path.append({bench!r})
import train_step
from csm.model.csm_model import ModelArgs
from csm.system import runtime
mid = ModelArgs(backbone_flavor="llama-mid", decoder_flavor="llama-mid-decoder")
r = train_step.measure({data!r}, runtime.resolve_device({device!r}), mid, {steps}, **{settings!r})
print(json.dumps(r["frames_per_s"]))
"""


def measure(tree: Path, data: Path, device: str, steps: int, settings: dict) -> float:
    code = CHILD.format(tree=str(tree), bench=str(tree / "bench"), data=str(data), device=device, steps=steps,
                        settings=settings)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tree)
    if done.returncode:
        raise SystemExit(f"the measurement in {tree} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", help="the commit to compare this tree with (e.g. HEAD~3, a tag)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    from dataloader import write_reference_file

    base = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True)
    if base.returncode:
        raise SystemExit(f"{args.base} is not a commit of this repository")
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            data = Path(tmp) / "reference.hdf5"
            write_reference_file(data, 600)
            speeds = {(name, tree): [] for name, _ in ROWS for tree in ("base", "this")}
            for _ in range(args.rounds):
                for name, settings in ROWS:
                    speeds[name, "base"].append(measure(old, data, args.device, args.steps, settings))
                    speeds[name, "this"].append(measure(ROOT, data, args.device, args.steps, settings))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
    print(f"| training step, mid flavor ({args.rounds} rounds, median) | {base.stdout.strip()} frames/s | "
          "this tree frames/s | this / base |\n|---|---|---|---|")
    for name, _ in ROWS:
        before, after = (statistics.median(speeds[name, t]) for t in ("base", "this"))
        print(f"| {name} | {before:.0f} | {after:.0f} | {after / before:.2f}x |")


if __name__ == "__main__":
    main()
