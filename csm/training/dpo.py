"""Direct preference optimisation on pairs of generated candidates (docs/formats.md, "The preference file").

A pair's two sequences (the prompt, then the chosen or the rejected candidate) are laid out as training turns; a
batch of P pairs is 2P sequences, the P chosen first. log π(y) of a candidate is the sum over its target frames
(its audio frames, and its EOS frame when it stopped) of codebook 0's log-probability and the decoder's
codebooks 1..K-1. With `decoder_fraction` < 1 the decoder runs on a random subset of each sequence's frames,
scaled up by (frames / subset): an unbiased estimate of the full sum, and the reference's stored per-frame
log-probabilities are summed over the same subset. The loss of a pair is

    -log σ(β [(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))])

and β (log π - log π_ref) is a candidate's implicit reward.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dataloaders import collate
from csm.training.loss import (
    at_least_one, decoder_frame_count, decoder_logits, decoder_subset, target_indices, target_states,
)
from csm.data.preference_file import Pair, read_pairs
from csm.data.token_file import DataError


# --------------------------------------------------------------------------- data


class PairDataset(Dataset):
    """One split of a preference file, in memory. `lengths` are what batching weighs a pair by: twice its longer
    sequence (a pair is two sequences, padded alike)."""

    def __init__(self, path, split: str = "train", *, max_seq_len: int = 2048):
        self.path, self.split, self.max_seq_len = str(path), split, max_seq_len
        self.pairs, self.num_codebooks = read_pairs(path, split)
        if not self.pairs:
            raise DataError(f"{path}: the '{split}' split holds no pairs (prefer.py found no prompt whose best and "
                            "worst candidates differ by --margin)")
        longest = np.array([max(p.lengths()) for p in self.pairs], dtype=np.int64)
        too_long = longest > max_seq_len
        if too_long.any():
            raise DataError(f"{path}: {int(too_long.sum())} of {len(longest)} '{split}' pairs have a sequence longer "
                            f"than max_seq_len={max_seq_len} frames (longest {int(longest.max())})")
        self.lengths = 2 * longest
        ids = [np.concatenate([p.text, *[t for _, t in p.context]]) for p in self.pairs]
        flat = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        self.text_ids = (int(flat.min()), int(flat.max())) if flat.size else (0, 0)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i) -> Pair:
        return self.pairs[int(i)]


class PairBatch(NamedTuple):
    """P pairs as 2P sequences (chosen first): the frames and targets (as `dataloaders.collate` makes them) and the
    reference log-probabilities of every target row, in row order (sequence by sequence)."""

    tokens: torch.Tensor       # [2P, S, K+1]
    mask: torch.Tensor         # [2P, S, K+1]
    target: torch.Tensor       # [2P, S]
    ref_c0: torch.Tensor       # [N] float32: codebook 0
    ref_decoder: torch.Tensor  # [N] float32: codebooks 1..K-1, summed


def collate_pairs(pairs: list[Pair], num_codebooks: int) -> PairBatch:
    """Pairs -> a right-padded batch of their chosen, then their rejected sequences. A sequence is the context
    turns (text, audio, EOS), the prompt's text frames and the candidate's audio frames (and the EOS frame when
    it stopped), and only the candidate's frames are targets."""
    sequences = [(p, p.chosen) for p in pairs] + [(p, p.rejected) for p in pairs]
    tokens, mask, target = collate([[*pair.context, (c.codes, pair.text, c.stopped)] for pair, c in sequences],
                                   num_codebooks)
    ref_c0 = torch.from_numpy(np.concatenate([c.ref_c0 for _, c in sequences]).astype(np.float32))
    ref_decoder = torch.from_numpy(np.concatenate([c.ref_decoder for _, c in sequences]).astype(np.float32))
    return PairBatch(tokens, mask, target, ref_c0, ref_decoder)


# --------------------------------------------------------------------------- which frames


class PairPlan(NamedTuple):
    """A pair batch's target rows and the decoder's frames, known from the CPU copy of the mask before the
    forward: `decoder_index` picks target rows (each sequence's own subset), `decoder_weight` scales each one to
    stand for its sequence's frames."""

    rows: tuple[torch.Tensor, torch.Tensor]  # (sequence, position) of each target row, sequence by sequence
    decoder_index: torch.Tensor              # [D] indices into the rows
    decoder_weight: torch.Tensor             # [D] float64: the sequence's target frames / its decoder frames
    sequences: int                           # 2P
    chosen_frames: int                       # target frames of the P chosen sequences

    def counts(self) -> tuple[int, int]:
        """(pairs, chosen target frames): what a step's losses are normalised by."""
        return self.sequences // 2, self.chosen_frames

    def to(self, device: torch.device, move=None) -> "PairPlan":
        move = move or (lambda t, d: t.to(d))
        return self._replace(rows=tuple(move(r, device) for r in self.rows),
                             decoder_index=move(self.decoder_index, device),
                             decoder_weight=move(self.decoder_weight, device))


def plan_pairs(mask: torch.Tensor, target: torch.Tensor, decoder_fraction: float,
               generator: torch.Generator | None) -> PairPlan:
    """Each sequence's target rows and the decoder's `decoder_fraction` of them (at least one), drawn from
    `generator` sequence by sequence."""
    rows = target_indices(mask, target)
    counts = torch.bincount(rows[0], minlength=mask.shape[0]).tolist()
    index, weight, start = [], [], 0
    for n in counts:
        k = decoder_frame_count(n, decoder_fraction)
        pick = decoder_subset(n, k, generator).sort().values if 0 < k < n else torch.arange(n)
        index.append(pick + start)
        weight += [n / k] * k
        start += n
    b = mask.shape[0]
    return PairPlan(rows, torch.cat(index) if index else torch.zeros(0, dtype=torch.long),
                    torch.tensor(weight, dtype=torch.float64), b, sum(counts[:b // 2]))


# --------------------------------------------------------------------------- log-probabilities and the loss


def frame_logps(model, tokens: torch.Tensor, mask: torch.Tensor, plan: PairPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities under `model` of every target row's codebook 0 [N], and of codebooks 1..K-1 (summed) of
    the decoder's rows [D], in float32."""
    h_prev, targets = target_states(model, tokens, mask, plan.rows)
    c0 = model.codebook0_head(h_prev).float().log_softmax(-1)
    c0 = c0.gather(-1, targets[:, :1]).squeeze(-1)
    h_dec, t_dec = h_prev[plan.decoder_index], targets[plan.decoder_index]
    logits = decoder_logits(model, h_dec, t_dec).float().log_softmax(-1)
    decoder = logits.gather(-1, t_dec[:, 1:].unsqueeze(-1)).squeeze(-1).sum(-1)
    return c0, decoder


def sequence_logps(c0: torch.Tensor, decoder: torch.Tensor, plan: PairPlan) -> torch.Tensor:
    """Per sequence [2P], float64: its rows' codebook-0 log-probabilities plus its decoder rows', scaled by
    `decoder_weight`. `c0` holds every target row, `decoder` the decoder's rows."""
    seq = plan.rows[0]
    out = torch.zeros(plan.sequences, dtype=torch.float64, device=c0.device)
    out = out.index_add(0, seq, c0.double())
    return out.index_add(0, seq[plan.decoder_index], decoder.double() * plan.decoder_weight)


class PairTerms(NamedTuple):
    """Per pair [P] (float64): the DPO loss, the reward margin β(ratio_c - ratio_r), the log-ratios log π - log π_ref
    of the chosen and the rejected candidate, and log π of the chosen one."""

    losses: torch.Tensor
    margins: torch.Tensor
    chosen_ratio: torch.Tensor
    rejected_ratio: torch.Tensor
    chosen_logp: torch.Tensor


def pair_terms(model, tokens: torch.Tensor, mask: torch.Tensor, ref_c0: torch.Tensor, ref_decoder: torch.Tensor, *,
               plan: PairPlan, beta: float) -> PairTerms:
    """The DPO terms of a pair batch under `model`, against the reference log-probabilities of the same frames."""
    policy = sequence_logps(*frame_logps(model, tokens, mask, plan), plan)
    reference = sequence_logps(ref_c0, ref_decoder[plan.decoder_index], plan)
    return dpo_terms(policy, reference, beta)


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> PairTerms:
    """The terms from sequence log-probabilities [2P] (chosen first) of the policy and the reference."""
    ratio = policy - reference
    p = len(ratio) // 2
    chosen, rejected = ratio[:p], ratio[p:]
    margins = beta * (chosen - rejected)
    return PairTerms(-F.logsigmoid(margins), margins, chosen, rejected, policy[:p])


def dpo_loss(terms: PairTerms, pairs_total, chosen_codes_total, sft_weight: float) -> torch.Tensor:
    """This micro-batch's share of the step's loss: the DPO losses over the step's pairs (all micro-batches and
    processes), plus `sft_weight` x the chosen candidates' negative log-likelihood per code (target frames x K)."""
    loss = terms.losses.sum() / at_least_one(pairs_total)
    if sft_weight:
        loss = loss - sft_weight * terms.chosen_logp.sum() / at_least_one(chosen_codes_total)
    return loss


@torch.no_grad()
def candidate_logps(model, pairs: list[Pair], num_codebooks: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The per-frame log-probabilities (codebook 0, codebooks 1..K-1 summed) of every pair's chosen, then every
    pair's rejected candidate, under `model` with the decoder on every frame: what prefer.py stores as the
    reference."""
    batch = collate_pairs(pairs, num_codebooks)
    plan = plan_pairs(batch.mask, batch.target, 1.0, None)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        c0, decoder = frame_logps(model, batch.tokens.to(device), batch.mask.to(device), plan.to(device))
    finally:
        model.train(was_training)
    cut = np.cumsum(torch.bincount(plan.rows[0], minlength=plan.sequences).tolist())[:-1]
    return list(zip(np.split(c0.cpu().numpy(), cut), np.split(decoder.cpu().numpy(), cut)))
