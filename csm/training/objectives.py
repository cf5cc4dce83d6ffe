"""What a training step optimises (config `objective`), as the step sees it: `sft`, the supervised loss of token
files (loss.py), and `dpo`, preference pairs (dpo.py). Each plans its micro-batches' targets from the CPU masks,
names the counts that normalise a step (summed over micro-batches and processes), gives a micro-batch's share of
the loss with the numbers it logs, and measures a validation split.
"""
from __future__ import annotations

import torch

from csm.training.dpo import dpo_loss, pair_terms, PairBatch, plan_pairs
from csm.training.loss import at_least_one, combine_loss, compute_loss, plan_targets, weighted_loss
from csm.system.runtime import all_reduce_sum, autocast

OBJECTIVES = ("sft", "dpo")


class SFT:
    """The supervised objective: 2((1-w) c0 + w dec), each term over the step's target count."""

    stats = ("loss", "c0_loss", "decoder_loss")

    def __init__(self, cfg, num_codebooks: int):
        self.cfg, self.k = cfg, num_codebooks

    def plan(self, batch, generator, fraction: float | None = None):
        _, mask, target = batch
        return plan_targets(mask, target, self.cfg.decoder_fraction if fraction is None else fraction, generator)

    def counts(self, plan) -> tuple[int, int]:
        return plan.counts(self.k)

    def loss(self, loss_model, batch, plan, totals) -> tuple[torch.Tensor, torch.Tensor]:
        """A micro-batch's share of the step's loss and its logged numbers; `totals` ([2], on the device): the
        step's counts summed over micro-batches and processes."""
        tokens, mask, target = batch
        terms = loss_model(compute_loss, tokens, mask, target, plan=plan)
        loss = combine_loss(terms, totals[0], totals[1], self.cfg.decoder_loss_weight)
        parts = torch.stack([loss.detach(), terms.c0_sum.detach() / at_least_one(totals[0]),
                             terms.decoder_sum.detach() / at_least_one(totals[1])])
        return loss, parts

    def sums(self, loss_model, batch, plan) -> list[float]:
        """Validation: the summed losses and their counts."""
        terms = loss_model(compute_loss, *batch, plan=plan)
        return [terms.c0_sum.item(), terms.decoder_sum.item(), terms.n_c0, terms.n_decoder]

    def summary(self, sums: list[float]) -> dict:
        c0, dec, n_c0, n_dec = sums
        return {"val_loss": weighted_loss(c0 / max(n_c0, 1), dec / max(n_dec, 1), self.cfg.decoder_loss_weight)}


class DPO:
    """Preference pairs: the DPO loss over the step's pairs (plus dpo_sft_weight x the chosen candidates' NLL per
    code), with reward accuracy, mean margin and the two log-ratios, each a mean over the step's pairs."""

    stats = ("loss", "dpo_loss", "chosen_nll", "reward_accuracy", "reward_margin", "chosen_logratio",
             "rejected_logratio")

    def __init__(self, cfg, num_codebooks: int):
        self.cfg, self.k = cfg, num_codebooks

    def plan(self, batch: PairBatch, generator, fraction: float | None = None):
        return plan_pairs(batch.mask, batch.target, self.cfg.dpo_decoder_fraction if fraction is None else fraction,
                          generator)

    def counts(self, plan) -> tuple[int, int]:
        """(pairs, codes of the chosen candidates): what the DPO and the NLL terms are normalised by."""
        pairs, frames = plan.counts()
        return pairs, frames * self.k

    def _terms(self, loss_model, batch: PairBatch, plan):
        return loss_model(pair_terms, batch.tokens, batch.mask, batch.ref_c0, batch.ref_decoder, plan=plan,
                          beta=self.cfg.dpo_beta)

    @staticmethod
    def _parts(terms) -> list[torch.Tensor]:
        """Per micro-batch sums: DPO losses, chosen log-likelihoods, right orderings, margins, log-ratios."""
        return [terms.losses.sum(), terms.chosen_logp.sum(), (terms.margins > 0).sum().double(),
                terms.margins.sum(), terms.chosen_ratio.sum(), terms.rejected_ratio.sum()]

    def loss(self, loss_model, batch: PairBatch, plan, totals) -> tuple[torch.Tensor, torch.Tensor]:
        pairs, codes = at_least_one(totals[0]), at_least_one(totals[1])
        terms = self._terms(loss_model, batch, plan)
        loss = dpo_loss(terms, pairs, codes, self.cfg.dpo_sft_weight)
        dpo_sum, chosen_logp, right, margin, chosen, rejected = (t.detach() for t in self._parts(terms))
        parts = torch.stack([loss.detach().double(), dpo_sum / pairs, -chosen_logp / codes, right / pairs,
                             margin / pairs, chosen / pairs, rejected / pairs])
        return loss, parts

    def sums(self, loss_model, batch: PairBatch, plan) -> list[float]:
        return [t.item() for t in self._parts(self._terms(loss_model, batch, plan))] + list(self.counts(plan))

    def summary(self, sums: list[float]) -> dict:
        dpo_sum, chosen_logp, right, margin, chosen, rejected, pairs, codes = sums
        pairs, codes = max(pairs, 1), max(codes, 1)
        loss = dpo_sum / pairs - self.cfg.dpo_sft_weight * chosen_logp / codes
        return {"val_loss": loss, "val_reward_accuracy": right / pairs, "val_reward_margin": margin / pairs,
                "val_chosen_logratio": chosen / pairs, "val_rejected_logratio": rejected / pairs}


def make_objective(cfg, num_codebooks: int):
    return {"sft": SFT, "dpo": DPO}[cfg.objective](cfg, num_codebooks)


def validate(objective, loss_model, loader, rt, precision: str) -> dict:
    """The objective's validation numbers over a loader (the decoder on every frame: deterministic), summed over
    processes. `loss_model` is the (DDP- or FSDP-wrapped) LossModule."""
    return objective.summary(validation_sums(objective, loss_model, loader, rt, precision))


@torch.no_grad()
def validation_sums(objective, loss_model, loader, rt, precision: str) -> list:
    """What `validate` sums over a loader and the processes, before the objective turns it into its numbers."""
    was_training = loss_model.training
    loss_model.eval()
    sums = None
    for batch in loader:
        plan = objective.plan(batch, None, fraction=1.0).to(rt.device)  # from the CPU masks: no sync
        with autocast(rt.device, precision):
            part = objective.sums(loss_model, move_batch(batch, rt.device), plan)
        sums = part if sums is None else [a + b for a, b in zip(sums, part)]
    loss_model.train(was_training)
    if sums is None:
        raise ValueError("validation got no batches")
    return all_reduce_sum(sums, rt)


def move_batch(batch, device: torch.device, move=None):
    """A batch's tensors on `device` (through `move(tensor, device)` when given), as the same kind of tuple."""
    moved = [t if t is None else (move(t, device) if move else t.to(device)) for t in batch]
    return type(batch)(*moved) if hasattr(batch, "_fields") else tuple(moved)
