"""Does the low-memory full finetune learn as well as fp32-weight AdamW? Validation loss after the same steps.

The mid-size flavor (4-layer 512-wide backbone, real vocabularies) trains from the same random initialisation (the
same seed) on the bundled speech clips (data/sample: the demo's clips, pretokenized with the tiny Mimi and
tokenizer), once per recipe, with the same batches, schedule and number of steps:

- fp32 weights, AdamW (bf16 autocast): the baseline;
- configs/finetune_12gb.yaml's recipe: bf16 weights with stochastic rounding, torchao's 8-bit states, the step in
  backward;
- bf16 weights with Kahan summation (torch-optimi), the step in backward;
- plain bf16 weights, no compensation (8-bit states, the step in backward): what the compensation is for.

Every recipe runs without gradient clipping (the step in backward cannot clip) and with the text embeddings frozen
(the clips use a handful of text tokens, and on the CPU torchao's 8-bit update of the 66M-row table would take most
of the time). `compile: true` compiles torchao's update on the CPU, as a GPU always does. The table gives each
recipe's final validation loss and its difference from the baseline's (the goal: within 2%). Speed is not compared
here: on the CPU torchao's update is no guide to a GPU's (the GPU check's part 3 measures it on CSM-1B).

    python bench/low_memory.py [--steps 200] [--max_tokens 1024] [--lr 3e-5]
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))
from memory import LOW_MEMORY  # noqa: E402  (configs/finetune_12gb.yaml's recipe)

RECIPES = [
    ("fp32 weights, AdamW", {"precision": "bf16"}),
    ("bf16 weights + stochastic rounding, 8-bit states, step in backward (finetune_12gb)", LOW_MEMORY),
    ("bf16 weights + Kahan summation, full states, step in backward",
     {**LOW_MEMORY, "bf16_compensation": "kahan", "optimizer_states": "full"}),
    ("plain bf16 weights (no compensation), 8-bit states, step in backward",
     {**LOW_MEMORY, "bf16_compensation": "none"}),
]
GOAL = 0.02  # relative difference in final validation loss from the baseline


def demo_data(work: Path) -> tuple[Path, dict]:
    """The bundled clips (train and val) pretokenized with the tiny Mimi and tokenizer, as the demo does."""
    import pretokenize
    from csm.data import tiny_assets

    assets = tiny_assets.make_all(work / "assets")
    data = work / "data.hdf5"
    sample = ROOT / "data" / "sample"
    code = pretokenize.main(["--train_data", str(sample / "train.csv"), "--val_data", str(sample / "val.json"),
                             "--output", str(data), "--device", "cpu", "--text_tokenizer",
                             str(assets["text_tokenizer"]), "--mimi_weights", str(assets["mimi"])])
    if code:
        raise SystemExit(f"pretokenize.py failed ({code})")
    return data, assets


def run(name: str, recipe: dict, data: Path, assets: dict, out: Path, args) -> dict:
    from csm.training import config, training

    cfg = config.make_config({
        "train_from_scratch": True, "backbone_flavor": "llama-mid", "decoder_flavor": "llama-mid-decoder",
        "max_tokens": args.max_tokens, "max_seq_len": min(2048, args.max_tokens), "learning_rate": args.lr,
        "warmup_steps": args.steps // 10, "lr_decay": "cosine", "max_steps": args.steps, "max_grad_norm": 0.0,
        "freeze": ["text_embeddings"], "val_every": args.steps, "save_every": 0, "gen_every": 0,
        "log_every": 10, "wandb_mode": "disabled", "seed": 0, "compile": True, "decoder_fraction": 1 / 4,
        "text_tokenizer": str(assets["text_tokenizer"]), **recipe})
    start = time.perf_counter()
    training.train(cfg, data, out, device="cpu", progress=False)
    seconds = time.perf_counter() - start
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    print(f"{name}: {args.steps} steps in {seconds:.0f} s", flush=True)
    return {"name": name, "val_loss": val[-1]}


def table(rows: list[dict], args) -> str:
    base = rows[0]
    lines = [f"| mid flavor, {args.steps} steps, max_tokens={args.max_tokens}, lr {args.lr:g}, text embeddings "
             "frozen, CPU | final val loss | vs fp32 weights |", "|---|---|---|"]
    for r in rows:
        diff = (r["val_loss"] - base["val_loss"]) / base["val_loss"]
        lines.append(f"| {r['name']} | {r['val_loss']:.4f} | {diff:+.2%} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--max_tokens", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-5, help="the finetuning default: updates below half a bf16 ulp")
    args = p.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, assets = demo_data(work)
        rows = [run(name, recipe, data, assets, work / f"run{i}", args) for i, (name, recipe) in enumerate(RECIPES)]
    print(table(rows, args))


if __name__ == "__main__":
    main()
