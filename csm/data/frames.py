"""The frame layout (docs/formats.md, "The frame layout"), in one place: a frame is K audio codes plus one
text token, with a mask saying which entries are real. A turn is its text frames, then its audio frames and the
all-zero EOS frame. Training batches (collate), generation prompts and context turns all use these.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from csm.model.codec import encode_audio


@dataclass
class Segment:
    """One turn: what was said, by whom, and (for context turns) the 24 kHz mono audio of it, or its Mimi codes
    [K, F] (a token file's turn: used as they are, not encoded again)."""

    text: str
    speaker: int
    audio: torch.Tensor | None = None
    codes: torch.Tensor | None = None

    def turn_codes(self, mimi, k: int) -> torch.Tensor | None:
        """The turn's Mimi codes [K, F]: its own, or its audio encoded; None for a turn without audio."""
        if self.codes is not None:
            return torch.as_tensor(self.codes)
        if self.audio is None:
            return None
        return torch.as_tensor(encode_audio(mimi, [self.audio.float().reshape(-1).cpu().numpy()], k)[0])


def empty_frames(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n frames of zeros with nothing real: tokens [n, K+1] int64, mask [n, K+1] bool."""
    return torch.zeros(n, k + 1, dtype=torch.long), torch.zeros(n, k + 1, dtype=torch.bool)


def text_frames(text_ids, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One frame per text id (BOS ... EOS included): only the text entry (the last) is real."""
    ids = torch.as_tensor(text_ids, dtype=torch.long)
    tokens, mask = empty_frames(len(ids), k)
    tokens[:, k], mask[:, k] = ids, True
    return tokens, mask


def audio_frames(codes, k: int, eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames of codes [K, F], then the all-zero EOS frame that ends a turn (its codes are real targets). Without
    `eos`, the codes alone: generated audio that reached its length cap without stopping."""
    codes = torch.as_tensor(codes, dtype=torch.long)
    if codes.shape[0] != k:
        raise ValueError(f"codes have {codes.shape[0]} codebooks, expected {k}")
    tokens, mask = empty_frames(codes.shape[1] + int(eos), k)
    tokens[:codes.shape[1], :k] = codes.T
    mask[:, :k] = True
    return tokens, mask


def turn_frames(text_ids, codes, k: int, eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole turn: text frames, audio frames, EOS frame (unless not `eos`); len(text) + F + 1 frames."""
    n = len(text_ids) + codes.shape[1] + int(eos)
    tokens, mask = empty_frames(n, k)
    fill_turn(tokens, mask, text_ids, codes, k, eos)
    return tokens, mask


def fill_turn(tokens: torch.Tensor, mask: torch.Tensor, text_ids, codes, k: int, eos: bool = True) -> int:
    """Lay a turn out as turn_frames does, into the zeroed frames at the start of `tokens` and `mask` [>= n, K+1]
    (a batch row's slice: no frames of its own are made); returns n, the frames it took."""
    codes = torch.as_tensor(codes, dtype=torch.long)
    if codes.shape[0] != k:
        raise ValueError(f"codes have {codes.shape[0]} codebooks, expected {k}")
    t, f = len(text_ids), codes.shape[1]
    tokens[:t, k], mask[:t, k] = torch.as_tensor(text_ids, dtype=torch.long), True
    tokens[t:t + f, :k] = codes.T
    mask[t:t + f + int(eos), :k] = True
    return t + f + int(eos)


def next_input_frames(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """While generating, the next input is the frame just sampled, alone: codes [b, K] -> tokens and
    mask [b, 1, K+1] with the K codes real and the text entry masked (on the codes' device and dtype)."""
    pad = torch.zeros_like(codes[:, :1])
    tokens = torch.cat([codes, pad], dim=1).unsqueeze(1)
    mask = torch.cat([torch.ones_like(codes, dtype=torch.bool), pad.bool()], dim=1).unsqueeze(1)
    return tokens, mask
