"""Conversational context for training: which earlier turns go before each target turn, per epoch.

A composed example is up to `context_turns` context rows, oldest first, then the target row; each is laid
out as the official generator lays out a segment (text frames, audio frames, EOS frame), and the oldest
context turns are dropped until the whole fits `max_seq_len`. Modes:

- `none`: every row alone (as before context existed);
- `conversation`: the turns before it in its conversation (by `turn`, then row order);
- `same_speaker`: other rows of the same speaker, drawn from (seed, epoch) and re-drawn each epoch: a voice
  prompt, as single-speaker finetunes are used.

A plan is a tuple of row indices (context rows, then the target row); plans depend only on the data, the
settings, the seed and the epoch, so a resumed run composes exactly what an uninterrupted one would.
"""
from __future__ import annotations

import numpy as np

CONTEXT_MODES = ("none", "conversation", "same_speaker")
CONTEXT_LOSSES = ("none", "all")  # none: only the target turn's audio is a loss target; all: every turn's


class ContextPlanner:
    """The plans and composed lengths of one split, per epoch."""

    def __init__(self, lengths, conversation, turn, speaker, *, mode: str = "none", context_turns: int = 1,
                 max_seq_len: int = 2048, seed: int = 0):
        if mode not in CONTEXT_MODES:
            raise ValueError(f"context mode {mode!r} is not one of {CONTEXT_MODES}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.mode, self.context_turns, self.max_seq_len, self.seed = mode, int(context_turns), int(max_seq_len), seed
        self.speaker = np.asarray(speaker, dtype=np.int64)
        self._history = _conversation_history(conversation, turn) if mode == "conversation" else None
        self._cache: tuple[int, list[tuple[int, ...]], np.ndarray] | None = None

    def _context(self, epoch: int) -> list[list[int]]:
        """Each row's context rows, oldest first, before cutting to fit."""
        n, k = len(self.lengths), self.context_turns
        if self.mode == "none" or k == 0:
            return [[] for _ in range(n)]
        if self.mode == "conversation":
            return [list(h[-k:]) for h in self._history]
        context: list[list[int]] = [[] for _ in range(n)]
        rng = np.random.default_rng([self.seed, epoch])
        for spk in np.unique(self.speaker):
            if spk < 0:  # unknown speaker (files without speaker ids): no voice to prompt with
                continue
            group = rng.permutation(np.flatnonzero(self.speaker == spk))
            g = len(group)
            # Each row takes the rows after it in this epoch's random order of its speaker's rows.
            for pos, row in enumerate(group):
                context[row] = [int(group[(pos + j) % g]) for j in range(min(k, g - 1), 0, -1)]
        return context

    def plans(self, epoch: int = 0) -> tuple[list[tuple[int, ...]], np.ndarray]:
        """(plan per target row, composed length per target row) for an epoch."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        plans, lengths = [], np.empty(len(self.lengths), dtype=np.int64)
        for row, context in enumerate(self._context(epoch)):
            total = int(self.lengths[row]) + int(self.lengths[context].sum()) if context else int(self.lengths[row])
            while context and total > self.max_seq_len:  # cut to fit: the oldest turns go first
                total -= int(self.lengths[context[0]])
                context = context[1:]
            plans.append((*context, row))
            lengths[row] = total
        self._cache = (epoch, plans, lengths)
        return plans, lengths


def _conversation_history(conversation, turn) -> list[list[int]]:
    """For each row, the rows before it in its conversation (sorted by turn, then row); [] for a row on its
    own (conversation id "", as in files without conversations)."""
    conversation = np.asarray(conversation, dtype=object)
    turn = np.asarray(turn, dtype=np.float64)
    history: list[list[int]] = [[] for _ in range(len(conversation))]
    groups: dict[str, list[int]] = {}
    for row, conv in enumerate(conversation):
        if conv != "":
            groups.setdefault(conv, []).append(row)
    for rows in groups.values():
        ordered = sorted(rows, key=lambda r: (turn[r], r))
        for pos, row in enumerate(ordered):
            history[row] = ordered[:pos]
    return history
