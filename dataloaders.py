"""Token-file examples -> padded (tokens, mask, target) training batches, in a resumable order.

- `CSMDataset`: one split of a token file (read through csm/data/token_file.py): a format-2 file mapped
  from disk and shared by every process on the machine; a format-1 file held in memory as flat int16/int32
  buffers plus offsets, or read lazily row by row (`partial=True`).
- `LengthBucketSampler`: batches of similar-length examples, filled up to a padded-token budget
  (or a fixed example count), re-formed every epoch from one seed, sharded over DDP ranks.
- `collate`: padded batches of examples, each one turn or (with conversational context, context.py)
  several turns laid out by frames.py, with the mask of the frames that are loss targets.
- `ResumableLoader`: a DataLoader that knows how many batches it has handed out, so a checkpoint
  can resume mid-epoch with exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from csm.data import token_file
from csm.data.context import ContextPlanner
from csm.data.frames import fill_turn
from csm.data.token_file import DataError
from csm.model.codec import NUM_CODEBOOKS
from csm.system.errors import UserError
from csm.system.runtime import print0


class CSMDataset(Dataset):
    """One split of a token file. Items are (audio codes [K, F], text ids [T]) as int64 tensors.

    A format-2 file's codes and text ids are mapped from the file, in each process on first use: every rank and
    loader worker on a machine reads the one copy in the page cache. A format-1 file is read into flat buffers
    (`partial=True`: row by row from the file instead), and the first open of one says how to upgrade it."""

    def __init__(self, path: str | Path, split: str = "train", *, partial: bool = False, max_seq_len: int = 2048):
        self.path, self.split, self.partial, self.max_seq_len = str(path), split, partial, max_seq_len
        splits = token_file.open_splits(path)
        if split not in splits:
            raise DataError(f"{path} has no '{split}' split (found: {', '.join(splits)})")
        self._file = self._pid = None
        self._audio = self._text = None
        with token_file.open_token_file(self.path) as f:
            self.lengths, self.num_codebooks = token_file.read_split_index(f, path, split)
            self._check_lengths()
            self.mapped = token_file.is_flat(f[split])
            if self.mapped:
                self.partial = False  # nothing is read into memory either way
                self._audio_offsets = token_file.map_flat(f, path, split, "audio_offsets")
                self._text_offsets = token_file.map_flat(f, path, split, "text_offsets")
                self._check_consistency()
                self.text_ids = token_file.text_id_range(f, path, split)
                return
            warn_format_1(self.path)
            if not partial:
                self._audio, self._audio_offsets = token_file.read_flat(f, path, split, "audio")
                self._text, self._text_offsets = token_file.read_flat(f, path, split, "text")
                self._check_consistency()
                text = self._text
            else:
                text = token_file.read_flat(f, path, split, "text")[0]  # small beside the audio; read once
            # Checked against a model's vocabulary once it is known (check_text_ids).
            self.text_ids = (int(text.min()), int(text.max())) if text.size else (0, 0)

    def turns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each row's conversation id ("": on its own), order within it and speaker (-1: unknown), read from the
        file when asked (conversational context needs them; plain training does not hold millions of ids)."""
        with token_file.open_token_file(self.path) as f:
            return token_file.read_turns(f, self.split)

    def _check_lengths(self) -> None:
        too_long = self.lengths > self.max_seq_len
        if too_long.any():
            raise DataError(
                f"{self.path}: {int(too_long.sum())} of {len(self.lengths)} '{self.split}' examples are longer than "
                f"max_seq_len={self.max_seq_len} frames (longest {int(self.lengths.max())}). Re-run pretokenize.py "
                f"with --max_seq_len {self.max_seq_len} to skip them (CSM's backbone cannot go past 2048)")

    def _check_consistency(self) -> None:
        audio = np.diff(self._audio_offsets)
        text = np.diff(self._text_offsets)
        k = self.num_codebooks
        bad = np.flatnonzero((audio % k != 0) | (text + audio // k + 1 != self.lengths))
        if bad.size:
            raise DataError(f"{self.path}: {bad.size} '{self.split}' rows (first: {int(bad[0])}) have a length that is "
                            f"not len(text) + frames + 1 with {self.num_codebooks} codebooks; re-run pretokenize.py")

    def __len__(self) -> int:
        return len(self.lengths)

    def _row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self.mapped and (self._audio is None or self._pid != os.getpid()):
            with token_file.open_token_file(self.path) as f:
                # Plain array views of the maps: numpy's memmap class costs microseconds on every slice.
                self._audio, self._text, self._audio_offsets, self._text_offsets = (
                    token_file.map_flat(f, self.path, self.split, what).view(np.ndarray)
                    for what in ("audio", "text", "audio_offsets", "text_offsets"))
            self._pid = os.getpid()
        if not self.partial:
            a = self._audio[self._audio_offsets[i]:self._audio_offsets[i + 1]]
            t = self._text[self._text_offsets[i]:self._text_offsets[i + 1]]
            return a, t
        # One handle per process: h5py handles must not cross a fork into DataLoader workers.
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = token_file.open_token_file(self.path), os.getpid()
        return token_file.read_row(self._file, self.split, i)

    def __getitem__(self, i):
        """Row i as (audio codes [K, F], text ids [T]); a plan (a tuple of rows: context turns, then the
        target) as the list of its turns."""
        if isinstance(i, tuple):
            return [self._turn(r) for r in i]
        return self._turn(i)

    def _turn(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(i)
        audio, text = self._row(i)
        if self.mapped:  # format 1 was checked whole as it was read; a mapped file's rows are checked as they are
            token_file.check_codes(audio, self.path, self.split, i)
        frames = len(audio) // self.num_codebooks
        if len(text) + frames + 1 != self.lengths[i]:
            raise DataError(f"{self.path}: /{self.split} row {i} does not match its stored "
                            f"length; re-run pretokenize.py")
        audio = torch.from_numpy(audio.astype(np.int64)).view(self.num_codebooks, frames)
        return audio, torch.from_numpy(text.astype(np.int64))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = state["_pid"] = None
        if self.mapped:  # a process it is sent to maps the file itself, rather than receive a copy
            state["_audio"] = state["_text"] = state["_audio_offsets"] = state["_text_offsets"] = None
        return state

    def nbytes(self) -> int:
        """Memory a process holds for the examples (buffers and index; a mapped file's pages are the page cache's),
        not counting Python object overhead."""
        total = self.lengths.nbytes
        if self.mapped:  # the offsets are mapped too
            return total
        if not self.partial:
            total += self._audio.nbytes + self._audio_offsets.nbytes + self._text.nbytes + self._text_offsets.nbytes
        return total


_WARNED_FORMAT_1: set[str] = set()


def warn_format_1(path: str) -> None:
    """Say once per file and process (rank 0 only) that a format-1 file is copied into memory, and how to
    upgrade it."""
    if path in _WARNED_FORMAT_1:
        return
    _WARNED_FORMAT_1.add(path)
    print0(f"note: {path} is a format-1 token file: each process reads it into its own memory. "
           f"`python pretokenize.py --upgrade {path} --output NEW.hdf5` rewrites it as format 2, which every process "
           "maps from the file and shares", file=sys.stderr)


class MixedDataset(Dataset):
    """Several sources (splits of token files, or of preference files) as one dataset: rows numbered source after
    source, `sizes` rows each, read from the source that holds them."""

    def __init__(self, parts: list, names: list[str]):
        self.parts, self.names = parts, names
        codebooks = {p.num_codebooks for p in parts}
        if len(codebooks) > 1:
            raise DataError(f"the sources hold {sorted(codebooks)} codebooks per frame: " + ", ".join(
                f"{p.path} {p.num_codebooks}" for p in parts))
        self.num_codebooks = codebooks.pop()
        self.sizes = [len(p) for p in parts]
        self.starts = np.cumsum([0, *self.sizes])
        self.lengths = np.concatenate([np.asarray(p.lengths, np.int64) for p in parts])
        self.path, self.split, self.max_seq_len = ", ".join(p.path for p in parts), parts[0].split, parts[0].max_seq_len
        self.text_ids = (min(p.text_ids[0] for p in parts), max(p.text_ids[1] for p in parts))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _one(self, i: int):
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[s][int(i) - int(self.starts[s])]

    def __getitem__(self, i):
        if isinstance(i, tuple):  # a plan: context turns, then the target
            return [self._one(r) for r in i]
        return self._one(i)

    def turns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each row's conversation (named per source: two sources' "c1" are two conversations), order, speaker."""
        found = [p.turns() for p in self.parts]
        conversation = np.concatenate([np.array([f"{s}:{c}" if c else "" for c in t[0]], dtype=object)
                                       for s, t in enumerate(found)])
        return conversation, np.concatenate([t[1] for t in found]), np.concatenate([t[2] for t in found])

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts)


def source_paths(spec) -> list[str]:
    """The token files (or preference files) a run trains on: one path, a glob, or a list of either; globs expand
    in sorted order. A glob that matches nothing, or a file named twice, is refused."""
    import glob

    items = [spec] if isinstance(spec, (str, Path)) else list(spec or [])
    paths = []
    for item in map(str, items):
        if glob.has_magic(item):
            found = sorted(glob.glob(os.path.expanduser(item)))
            if not found:
                raise UserError(f"--data {item} matches no file")
            paths += found
        else:
            paths.append(item)
    seen = set()
    for p in paths:
        key = os.path.realpath(p)
        if key in seen:
            raise UserError(f"--data names {p} twice: give each source once (weights set how often it is seen)")
        seen.add(key)
    if not paths:
        raise UserError("no training data: give --data (one or more token files, or a glob), or train_data")
    return paths


def source_names(paths: list[str]) -> list[str]:
    """Short names of the sources, for their metrics (val_loss/NAME): the file names, numbered where they repeat."""
    stems = [Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else f"{s}{i}" for i, s in enumerate(stems)]


def collate(batch: list, num_codebooks: int = NUM_CODEBOOKS, pad_to: int | None = None,
            context_loss: str = "none") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Examples -> tokens [B, S, K+1] int64, mask [B, S, K+1] bool and target [B, S] bool (docs/formats.md,
    "The frame layout").

    An example is one turn (audio [K, F], text [T]) or a list of turns (context turns, then the target
    turn); each turn is laid out by `frames.fill_turn` (text, audio, EOS frame), one after the other,
    then right padding. A turn given as (audio, text, False) has no EOS frame (generated audio that ran to its
    length cap). `target` marks the frames the loss predicts: the audio and EOS frames of the target
    turn, or of every turn with `context_loss="all"` (context frames are otherwise inputs only).
    """
    k = num_codebooks
    examples = [item if isinstance(item, list) else [item] for item in batch]
    lengths = [sum(len(turn[1]) + turn[0].shape[1] + _eos(turn) for turn in turns) for turns in examples]
    seq = max(lengths) if pad_to is None else pad_to
    tokens = torch.zeros(len(batch), seq, k + 1, dtype=torch.long)
    mask = torch.zeros(len(batch), seq, k + 1, dtype=torch.bool)
    target = torch.zeros(len(batch), seq, dtype=torch.bool)
    for b, turns in enumerate(examples):
        start = 0
        for t, turn in enumerate(turns):
            audio, text, eos = turn[0], turn[1], _eos(turn)
            if audio.shape[0] != k:
                raise ValueError(f"example {b} has {audio.shape[0]} codebooks, expected {k}")
            n = fill_turn(tokens[b, start:], mask[b, start:], text, audio, k, eos)
            if context_loss == "all" or t == len(turns) - 1:
                target[b, start + len(text):start + n] = True
            start += n
    return tokens, mask, target


def _eos(turn: tuple) -> bool:
    """Whether a turn (audio, text[, eos]) ends with its EOS frame: unless its third entry says not."""
    return bool(turn[2]) if len(turn) > 2 else True


# --------------------------------------------------------------------------- batching


def _fill_by_budget(order: np.ndarray, lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Cut length-sorted indices into batches whose padded size (longest x count) stays within max_tokens."""
    batches, start, longest = [], 0, 0
    for pos, idx in enumerate(order):
        new_longest = max(longest, int(lengths[idx]))
        if pos > start and new_longest * (pos - start + 1) > max_tokens:
            batches.append(order[start:pos])
            start, new_longest = pos, int(lengths[idx])
        longest = new_longest
    if start < len(order):
        batches.append(order[start:])
    return batches


def _balance_tail(batches: list[np.ndarray], lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Share the last, underfull batch's examples with the batches before it.

    Greedy filling leaves one small batch at the end; re-splitting the last few batches into equal
    counts keeps every batch within 1/1.5 of the budget instead of leaving a 1-example batch.
    """
    def padded(b):
        return int(lengths[b].max()) * len(b)

    if len(batches) < 2 or padded(batches[-1]) * 1.5 >= max_tokens:
        return batches
    for k in range(2, min(len(batches), 16) + 1):
        tail = np.concatenate(batches[-k:])
        groups = np.array_split(tail, k)
        sizes = [padded(g) for g in groups]
        if max(sizes) <= max_tokens and min(sizes) * 1.5 >= max_tokens:
            return batches[:-k] + groups
    return batches


class LengthBucketSampler:
    """Batches of indices of similar length, re-formed each epoch from (seed, epoch), sharded over ranks.

    With `max_tokens` each batch is filled up to that many padded frames; with `batch_size` each
    holds that many examples (the original's batching). Shuffling is within equal lengths, then
    of batch order, so epochs differ but a run repeats exactly. Under DDP every rank gets the
    same number of batches: when the epoch's batch count does not divide by the world size, the
    leftover batches' examples are re-split into one smaller batch per rank (the "evening-out");
    only a split with fewer leftover examples than ranks repeats examples, from the epoch's start.
    """

    def __init__(self, lengths, *, max_tokens: int | None = None, batch_size: int | None = None,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 planner: ContextPlanner | None = None, mix: tuple[list[int], list[float]] | None = None):
        if (max_tokens is None) == (batch_size is None):
            raise ValueError("give exactly one of max_tokens and batch_size")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.planner = planner  # with context: batches of plans, formed on each epoch's composed lengths
        self.mix = mix  # (rows of each source, numbered source after source; each source's share of an epoch)
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.epoch = 0
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_lengths(self, epoch: int) -> np.ndarray:
        """Each example's length in frames this epoch (composed with its context, when there is any)."""
        return self.planner.plans(epoch)[1] if self.planner is not None else self.lengths

    def epoch_rows(self, epoch: int) -> np.ndarray | None:
        """The rows an epoch draws when sources are mixed by weight (None: every row once). Each source gives its
        weight's share of the epoch's examples (as many as all sources hold): a source with fewer rows than its
        share is repeated whole as often as it fits and the rest drawn, one with more is drawn from; every draw
        comes from (seed, epoch), so a resumed run draws the same rows."""
        if self.mix is None:
            return None
        sizes, weights = self.mix
        shares = np.asarray(weights, dtype=np.float64) / np.sum(weights) * sum(sizes)
        counts = np.round(shares).astype(np.int64)
        rng = np.random.default_rng([self.seed, epoch, len(sizes)])
        rows, start = [], 0
        for n, count in zip(sizes, counts):
            whole, part = divmod(int(count), n)
            rows += [start + np.arange(n)] * whole + [start + np.sort(rng.choice(n, part, replace=False))]
            start += n
        return np.concatenate(rows)

    def global_batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """All ranks' batches of an epoch (target row indices), in order (rank r takes r, r+W, ...)."""
        epoch = self.epoch if epoch is None else epoch
        lengths = self.epoch_lengths(epoch)
        rows = self.epoch_rows(epoch)
        n = len(lengths) if rows is None else len(rows)
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        tie = rng.permutation(n) if rng is not None else np.arange(n)
        if rows is not None:
            tie = rows[tie]
        order = tie[np.argsort(lengths[tie], kind="stable")]
        if self.max_tokens is not None:
            batches = _balance_tail(_fill_by_budget(order, lengths, self.max_tokens), lengths, self.max_tokens)
        else:
            batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return self._even_out(batches, lengths)

    def _even_out(self, batches: list[np.ndarray], lengths: np.ndarray) -> list[np.ndarray]:
        w = self.world_size
        extra = len(batches) % w
        if extra == 0:
            return batches
        leftover = np.concatenate(batches[-extra:])
        if len(leftover) < w:  # tiny data: repeat examples from the start so no rank waits forever
            leftover = np.concatenate([leftover, np.concatenate(batches)[:w - len(leftover)]])
        leftover = leftover[np.argsort(lengths[leftover], kind="stable")]
        return batches[:-extra] + np.array_split(leftover, w)

    def rank_batches(self, epoch: int | None = None) -> list:
        """This rank's batches of an epoch: arrays of row indices (int32: 4 bytes a row where a list of Python ints
        takes 36, which a run of millions of rows would feel), or lists of plans (tuples of rows) with context."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:
            batches = self.global_batches(epoch)[self.rank::self.world_size]
            if self.planner is not None:
                plans = self.planner.plans(epoch)[0]
                self._cache = (epoch, [[plans[i] for i in b] for b in batches])
            else:
                self._cache = (epoch, [b.astype(np.int32) for b in batches])
        return self._cache[1]

    def __len__(self) -> int:
        return len(self.rank_batches())

    def __iter__(self):
        return iter(self.rank_batches())


class _Skip:
    """A batch sampler that starts `start` batches into the epoch (for mid-epoch resume)."""

    def __init__(self, sampler: LengthBucketSampler, start: int):
        self.sampler, self.start = sampler, start

    def __iter__(self):
        return iter(self.sampler.rank_batches()[self.start:])

    def __len__(self):
        return max(0, len(self.sampler) - self.start)


def default_num_workers(device: torch.device) -> int:
    """Loader workers when the config leaves them unset. On a GPU the host mostly waits for the device, so
    workers prepare the next batches meanwhile; on the CPU the step needs every core (bench/dataloader.py)."""
    return 2 if device.type == "cuda" else 0


class ResumableLoader:
    """Batches of (tokens, mask) that count what they handed out, so training can resume mid-epoch.

    Iterating yields the rest of the current epoch; iterating a finished epoch moves to the next.
    """

    def __init__(self, dataset: CSMDataset, sampler: LengthBucketSampler, num_workers: int = 0,
                 pin_memory: bool = False, context_loss: str = "none", collate_fn=None):
        self.dataset, self.sampler = dataset, sampler
        self.num_workers, self.pin_memory = num_workers, pin_memory
        # Token-file examples by default; a preference file's pairs bring their own (dpo.collate_pairs).
        self.collate_fn = collate_fn or partial(collate, num_codebooks=dataset.num_codebooks, context_loss=context_loss)
        self.consumed = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.consumed = 0

    def __iter__(self):
        if self.consumed >= len(self):
            self.set_epoch(self.sampler.epoch + 1)
        # Its own generator: a DataLoader iterator otherwise draws its workers' base seed from the global RNG,
        # and a resumed run (which starts one mid-epoch) would then see other dropout masks than an unbroken one.
        loader = DataLoader(self.dataset, batch_sampler=_Skip(self.sampler, self.consumed),
                            collate_fn=self.collate_fn,
                            num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=False,
                            generator=torch.Generator().manual_seed(self.sampler.seed))
        for batch in loader:
            self.consumed += 1  # counted as handed out, not as prefetched by workers
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "consumed": self.consumed, "seed": self.sampler.seed,
                "num_batches": len(self), "examples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.sampler.seed:
            raise UserError(f"checkpoint's data order used seed {state['seed']}, this run {self.sampler.seed}; "
                            "resume with the same seed")
        self.set_epoch(int(state["epoch"]))
        if len(self) != state["num_batches"]:
            saved = state.get("examples")
            why = (f"the data changed: {saved} examples then, {len(self.dataset)} now" if saved is not None
                   and saved != len(self.dataset) else "the batch settings changed")
            raise UserError(f"the checkpoint's epoch had {state['num_batches']} batches per process, this run has "
                            f"{len(self)}: {why}")
        self.consumed = int(state["consumed"])


def check_text_ids(dataset, vocab_size: int) -> None:
    """Every text id of a dataset (its `text_ids`: lowest and highest) is a row of the model's text embeddings."""
    for part in getattr(dataset, "parts", ()):
        check_text_ids(part, vocab_size)
    low, high = dataset.text_ids
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise DataError(f"{dataset.path}: /{dataset.split} holds text id {bad}, outside the model's text vocabulary "
                        f"[0, {vocab_size}); was it pretokenized with another model's tokenizer?")


def make_loader(dataset: CSMDataset, *, max_tokens: int | None = None, batch_size: int | None = None,
                shuffle: bool = True, seed: int = 0, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False, context_mode: str = "none", context_turns: int = 1,
                context_loss: str = "none", collate_fn=None, weights: list[float] | None = None) -> ResumableLoader:
    """A resumable loader over `dataset` with length-bucketed batches (in pinned memory with `pin_memory`: for a
    run on a CUDA device, whose copies then need not wait); with a `context_mode` other than none, each example
    is composed with its context (context.py); with `weights` (a MixedDataset's, one per source), each epoch
    draws each source's share of its examples (LengthBucketSampler.epoch_rows)."""
    if max_tokens is not None:
        batch_size = None
    elif batch_size is None:
        raise ValueError("give max_tokens or batch_size")
    planner = None
    if context_mode != "none":
        planner = ContextPlanner(dataset.lengths, *dataset.turns(), mode=context_mode,
                                 context_turns=context_turns, max_seq_len=dataset.max_seq_len, seed=seed)
    mix = (dataset.sizes, list(weights)) if weights is not None else None
    sampler = LengthBucketSampler(dataset.lengths, max_tokens=max_tokens, batch_size=batch_size, shuffle=shuffle,
                                  seed=seed, rank=rank, world_size=world_size, planner=planner, mix=mix)
    return ResumableLoader(dataset, sampler, num_workers=num_workers, pin_memory=pin_memory, context_loss=context_loss,
                           collate_fn=collate_fn)
