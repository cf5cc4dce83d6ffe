"""Every metric the toolkit measures or optimises, named once: which way is better, how it is printed, and where
it may be used (picking best/ with select_best_by, a sweep's --metric). Evaluation, training, the config,
evaluate.py and sweep.py all read this table.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    what: str
    higher_is_better: bool | None  # None: neither (duration_ratio is best at 1)
    fmt: str = ".3f"
    selects_best: bool = False  # select_best_by may name it (needs it measured during training)
    sweepable: bool = False  # sweep.py --metric may name it
    quality: bool = False  # measured by the quality evaluation (evaluate.py, eval_every)

    def show(self, value: float | None) -> str:
        return "-" if value is None else format(value, self.fmt)


METRICS = (
    Metric("val_loss", "best validation loss of the run", False, ".4f", selects_best=True, sweepable=True),
    Metric("final_val_loss", "validation loss at the last step", False, ".4f", sweepable=True),
    Metric("train_loss", "training loss at the last step", False, ".4f", sweepable=True),
    Metric("wer", "word error rate of the ASR transcript", False, selects_best=True, sweepable=True, quality=True),
    Metric("cer", "character error rate of the ASR transcript", False, selects_best=True, sweepable=True,
           quality=True),
    Metric("speaker_sim", "cosine similarity of speaker embeddings, generated vs reference", True, selects_best=True,
           sweepable=True, quality=True),
    Metric("prompt_speaker_sim", "cosine similarity of speaker embeddings, generated vs the context turns' audio", True,
           quality=True),
    Metric("dnsmos_ovrl", "DNSMOS P.835 overall quality, 1-5 (no reference needed)", True, selects_best=True,
           sweepable=True, quality=True),
    Metric("dnsmos_sig", "DNSMOS P.835 speech signal quality, 1-5", True, selects_best=True, sweepable=True,
           quality=True),
    Metric("dnsmos_bak", "DNSMOS P.835 background (noise) quality, 1-5", True, selects_best=True, sweepable=True,
           quality=True),
    Metric("dnsmos_p808", "DNSMOS P.808 overall quality, 1-5", True, selects_best=True, sweepable=True, quality=True),
    Metric("eos_rate", "share of items that stopped at an EOS frame", True, quality=True),
    Metric("duration_ratio", "generated duration / reference duration", None, quality=True),
    Metric("rtf", "generation time / audio duration", False, quality=True),
)
BY_NAME = {m.name: m for m in METRICS}
ROWS = ("generated", "reference", "codec")  # what the quality evaluation measures: the model's speech, two ceilings
QUALITY = tuple(m.name for m in METRICS if m.quality)  # the quality evaluation's summary, in this order
SELECTS_BEST = tuple(m.name for m in METRICS if m.selects_best)
SWEEPABLE = tuple(m.name for m in METRICS if m.sweepable)


def lower_is_better(name: str, value: float) -> float:
    """`value` as a score where lower is better (for a metric with a direction)."""
    return -value if BY_NAME[name].higher_is_better else value


def direction(name: str) -> str:
    """Optuna's study direction for a metric."""
    return "maximize" if BY_NAME[name].higher_is_better else "minimize"


def describe(names) -> str:
    """'wer (minimised), speaker_sim (maximised), ...' for help texts."""
    return ", ".join(f"{n} ({'maximised' if BY_NAME[n].higher_is_better else 'minimised'})" for n in names)
