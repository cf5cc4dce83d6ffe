"""The training objective (docs/formats.md, "Target rows") as pure functions of (model, batch): summed
cross-entropies and their target counts, the one implementation of the teacher-forced decoder logits, and the original
weighting 2((1-w) c0 + w dec) normalised by the target count of the whole accumulated step.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from csm.model.csm_model import embed_frames
from csm.system.errors import UserError


class SequenceTooLongError(UserError):
    """A batch is longer than the backbone's context."""


class LossTerms(NamedTuple):
    """Summed losses and their target counts for one micro-batch (so accumulation can normalise exactly)."""

    c0_sum: torch.Tensor       # cross-entropy of codebook 0, summed over audio target frames
    decoder_sum: torch.Tensor  # cross-entropy of codebooks 1..K-1, summed over the decoder's frames
    n_c0: int                  # audio target frames (EOS frames included)
    n_decoder: int             # decoder targets: frames given to the decoder x (K-1)


def decoder_frame_count(n_frames: int, fraction: float) -> int:
    """Frames the decoder trains on: a fraction of the audio frames, at least one (when there are any)."""
    if n_frames == 0:
        return 0
    return min(n_frames, max(1, int(n_frames * fraction)))


def target_indices(mask: torch.Tensor, target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, position) indices of the rows 1.. whose frame is predicted (positions counted from row 1).
    Without a target mask every audio frame (EOS included) is one; with one (conversational context) only
    those it marks."""
    return (mask[:, :, 0] if target is None else target)[:, 1:].nonzero(as_tuple=True)


def decoder_subset(n: int, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Which k of the n target frames the decoder trains on, drawn on the CPU from `generator`."""
    return torch.randperm(n, generator=generator)[:k]


class TargetPlan(NamedTuple):
    """A batch's targets, known before the forward: which rows the loss predicts and which of them the decoder
    trains on. Made from the CPU copy of the mask, nothing in the loss waits for the GPU."""

    rows: tuple[torch.Tensor, torch.Tensor]  # (batch, position) indices of the target rows (`target_indices`)
    decoder_frames: int                      # how many of them the decoder trains on
    decoder_index: torch.Tensor | None       # which ones; None: all of them (or none)

    def counts(self, num_codebooks: int) -> tuple[int, int]:
        """(n_c0, n_decoder) that compute_loss reports for this batch."""
        return len(self.rows[0]), self.decoder_frames * (num_codebooks - 1)

    def to(self, device: torch.device, move=None) -> "TargetPlan":
        """The plan's tensors on `device` (through `move(tensor, device)` when given)."""
        move = move or (lambda t, d: t.to(d))
        index = None if self.decoder_index is None else move(self.decoder_index, device)
        return TargetPlan(tuple(move(r, device) for r in self.rows), self.decoder_frames, index)


def plan_targets(mask: torch.Tensor, target: torch.Tensor | None, decoder_fraction: float,
                 generator: torch.Generator | None) -> TargetPlan:
    """The target rows of a batch and the decoder's random `decoder_fraction` of them (from `generator`)."""
    rows = target_indices(mask, target)
    n = len(rows[0])
    k = decoder_frame_count(n, decoder_fraction)
    return TargetPlan(rows, k, decoder_subset(n, k, generator) if 0 < k < n else None)


def compute_loss(model, tokens: torch.Tensor, mask: torch.Tensor, target: torch.Tensor | None = None, *,
                 decoder_fraction: float = 1 / 16, generator: torch.Generator | None = None,
                 plan: TargetPlan | None = None) -> LossTerms:
    """Summed training losses of a right-padded batch (docs/formats.md, "The frame layout").

    The backbone output at row r predicts the audio frame at row r+1: codebook 0 through
    `codebook0_head` on every target frame, codebooks 1..K-1 through the decoder on a random
    `decoder_fraction` of them ("compute amortization"), drawn from `generator`. Target frames are the
    audio frames (EOS included), or those `target` [B, S] marks (context turns are then inputs only).
    Padding rows are never targets and, with right padding under a causal mask, never attended to by real rows.

    `plan` (`plan_targets` of the batch, on the device) may be made by the caller from the CPU copy of the
    mask: then nothing here waits for the GPU (found from a GPU mask, the rows would cost a host-device sync).
    """
    if plan is None:
        plan = plan_targets(mask, target, decoder_fraction, generator).to(tokens.device)
    h_prev, targets = target_states(model, tokens, mask, plan.rows)
    n, k = len(plan.rows[0]), plan.decoder_frames
    c0_logits = model.codebook0_head(h_prev)
    c0_sum = F.cross_entropy(c0_logits.float(), targets[:, 0], reduction="sum")

    if k == 0:
        return LossTerms(c0_sum, c0_sum.new_zeros(()), 0, 0)
    if plan.decoder_index is not None:
        h_prev, targets = h_prev[plan.decoder_index], targets[plan.decoder_index]
    logits = decoder_logits(model, h_prev, targets)
    dec_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1), reduction="sum")
    return LossTerms(c0_sum, dec_sum, n, k * (targets.shape[1] - 1))


def backbone_states(model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The backbone's output [B, S, D] for a right-padded batch, in the model's dtype; a batch longer than the
    backbone's context is refused."""
    s, max_len = tokens.shape[1], model.backbone.max_seq_len
    if s > max_len:
        raise SequenceTooLongError(f"batch has sequences of {s} frames; the backbone takes at most {max_len}")
    dtype = next(model.parameters()).dtype
    return model.backbone(embed_frames(model, tokens, mask).to(dtype)).to(dtype)


def target_states(model, tokens: torch.Tensor, mask: torch.Tensor,
                  rows: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each target row (`target_indices`), the backbone state that predicts it [N, D] and its codes [N, K]."""
    h = backbone_states(model, tokens, mask)
    return h[:, :-1][rows], tokens[:, 1:, :-1][rows]


def decoder_logits(model, h_prev: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Teacher-forced decoder logits for codebooks 1..K-1 of N frames given the backbone state before each.

    The decoder sees [h, emb(c0), ..., emb(c_{K-2})]; h_prev [N, D], codes [N, K] -> [N, K-1, V].
    """
    k = codes.shape[1]
    vocab = model.config.audio_vocab_size
    offsets = vocab * torch.arange(k - 1, device=codes.device)
    code_embeds = model.audio_embeddings(codes[:, :-1] + offsets).to(h_prev.dtype)
    dec_h = model.decoder(model.projection(torch.cat([h_prev.unsqueeze(1), code_embeds], dim=1)))
    dec_h = dec_h.to(h_prev.dtype)
    return torch.einsum("nsd,sdv->nsv", dec_h[:, 1:, :], model.audio_head.to(dec_h.dtype))


def combine_loss(terms: LossTerms, n_c0_total, n_decoder_total, decoder_loss_weight: float) -> torch.Tensor:
    """The original objective 2((1-w) c0 + w dec), each term normalised by the step's total target count (ints, or
    0-d tensors on the device: a step's totals summed over processes stay there).

    Summing this over the micro-batches of an accumulated step gives the loss of the whole step.
    """
    return weighted_loss(terms.c0_sum / at_least_one(n_c0_total), terms.decoder_sum / at_least_one(n_decoder_total),
                         decoder_loss_weight)


def at_least_one(n):
    """max(n, 1) of a count that is an int or a tensor (a tensor's is taken on its device, without reading it)."""
    return n.clamp(min=1) if isinstance(n, torch.Tensor) else max(n, 1)


def weighted_loss(c0_mean, decoder_mean, decoder_loss_weight: float):
    """2((1-w) c0 + w dec) of two normalised means (tensors or floats)."""
    return 2 * ((1 - decoder_loss_weight) * c0_mean + decoder_loss_weight * decoder_mean)
