"""The dataset, batching, sharding, resume and collate of dataloaders.py."""

import os

import h5py
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import token_rows, write_token_file
from csm.system.errors import UserError
from dataloaders import CSMDataset, LengthBucketSampler, collate, make_loader
from csm.data.token_file import DataError, open_splits


import lengths as _lengths
padding_waste, sample_lengths = _lengths.padding_waste, _lengths.sample_lengths


def _spread(batches, lengths):
    padded = [int(lengths[b].max()) * len(b) for b in batches]
    return max(padded) / min(padded)


def test_token_budget_meets_padding_and_spread_targets():
    _, _, lengths = sample_lengths()
    budget = LengthBucketSampler(lengths, max_tokens=4096, seed=0).global_batches()
    fixed = LengthBucketSampler(lengths, batch_size=8, seed=0).global_batches()
    assert padding_waste(budget, lengths) <= 0.01
    assert _spread(budget, lengths) <= 1.5
    assert all(int(lengths[b].max()) * len(b) <= 4096 for b in budget)
    assert _spread(fixed, lengths) > 10  # what the original's fixed batch size gives
    everything = np.sort(np.concatenate(budget))
    assert np.array_equal(everything, np.arange(len(lengths)))


def test_epochs_differ_but_runs_repeat():
    _, _, lengths = sample_lengths(2000)
    a = LengthBucketSampler(lengths, max_tokens=4096, seed=3)
    b = LengthBucketSampler(lengths, max_tokens=4096, seed=3)
    epoch0 = [x.tolist() for x in a.global_batches(0)]
    assert epoch0 == [x.tolist() for x in b.global_batches(0)]
    assert epoch0 != [x.tolist() for x in a.global_batches(1)]
    assert epoch0 != [x.tolist() for x in LengthBucketSampler(lengths, max_tokens=4096, seed=4).global_batches(0)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", [{"max_tokens": 2048}, {"batch_size": 4}])
def test_ddp_shards_are_disjoint_complete_and_equal(world_size, mode):
    _, _, lengths = sample_lengths(503, seed=1)
    for epoch in range(2):
        per_rank = []
        for rank in range(world_size):
            s = LengthBucketSampler(lengths, seed=0, rank=rank, world_size=world_size, **mode)
            s.set_epoch(epoch)
            per_rank.append(list(s))
        assert len({len(r) for r in per_rank}) == 1, "every rank must get the same number of batches"
        seen = [i for r in per_rank for batch in r for i in batch]
        assert sorted(seen) == list(range(len(lengths))), "no example dropped or repeated"


def test_tiny_split_evens_out_by_repeating():
    s = [LengthBucketSampler([5, 6, 7], batch_size=8, rank=r, world_size=4) for r in range(4)]
    batches = [list(x) for x in s]
    assert [len(b) for b in batches] == [1, 1, 1, 1]
    assert sorted(i for b in batches for i in b[0]) in ([0, 0, 1, 2], [0, 1, 1, 2], [0, 1, 2, 2])


def _ddp_worker(rank, world_size, path, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    loader = make_loader(CSMDataset(path, "train"), max_tokens=60, seed=0, rank=dist.get_rank(),
                         world_size=dist.get_world_size())
    rows = [int(tokens.shape[0]) for tokens, _, _ in loader]
    mine = [int(i) for b in loader.sampler for i in b]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, (rows, mine))
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def test_gloo_ranks_get_equal_disjoint_shares(tmp_path):
    import socket

    path = write_token_file(tmp_path / "t.hdf5", n_train=23, n_val=0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "gathered.pt"
    mp.spawn(_ddp_worker, args=(2, str(path), port, str(out)), nprocs=2)
    (rows0, idx0), (rows1, idx1) = torch.load(out)
    assert len(rows0) == len(rows1) > 0
    assert sorted(idx0 + idx1) == list(range(23))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("grad_acc", [1, 3])
def test_resume_mid_epoch_gives_the_same_batches(tmp_path, num_workers, grad_acc):
    path = write_token_file(tmp_path / "t.hdf5", n_train=40, n_val=0)
    ds = CSMDataset(path, "train")

    def stream(loader, n):
        out = []
        while len(out) < n:
            for tokens, mask, target in loader:
                out.append((tokens, mask, target))
                if len(out) == n:
                    return out
            loader.set_epoch(loader.state_dict()["epoch"] + 1)
        return out

    full = stream(make_loader(ds, max_tokens=80, seed=5, num_workers=num_workers), 3 * grad_acc * 5)
    epoch_len = len(make_loader(ds, max_tokens=80, seed=5))
    first = make_loader(ds, max_tokens=80, seed=5, num_workers=num_workers)
    cut = epoch_len + 2  # one epoch and a bit: resume in the middle of the second epoch
    head = stream(first, cut)
    state = first.state_dict()
    resumed = make_loader(ds, max_tokens=80, seed=5, num_workers=num_workers)
    resumed.load_state_dict(state)
    tail = stream(resumed, len(full) - cut)
    for (t1, m1, g1), (t2, m2, g2) in zip(full, head + tail, strict=True):
        assert torch.equal(t1, t2) and torch.equal(m1, m2) and torch.equal(g1, g2)


def test_resume_at_epoch_end_moves_to_next_epoch(token_file):
    ds = CSMDataset(token_file, "train")
    a = make_loader(ds, batch_size=4, seed=1)
    list(a)
    b = make_loader(ds, batch_size=4, seed=1)
    b.load_state_dict(a.state_dict())
    c = make_loader(ds, batch_size=4, seed=1)
    c.set_epoch(1)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(b, c, strict=True))


def test_resume_refuses_changed_batching(token_file):
    ds = CSMDataset(token_file, "train")
    a = make_loader(ds, batch_size=4, seed=1)
    with pytest.raises(UserError, match="seed"):
        make_loader(ds, batch_size=4, seed=2).load_state_dict(a.state_dict())
    with pytest.raises(UserError, match="batches"):
        make_loader(ds, batch_size=3, seed=1).load_state_dict(a.state_dict())


def test_validation_loader_is_deterministic(token_file):
    loader = make_loader(CSMDataset(token_file, "val"), max_tokens=64, shuffle=False)
    first = [t for t, _, _ in loader]
    second = [t for t, _, _ in loader]
    assert len(first) > 0
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_collate_matches_hand_built_layout():
    k = 3
    audio = torch.tensor([[1, 2], [3, 4], [5, 6]])  # K=3 codebooks x F=2 frames
    text = torch.tensor([100, 7, 101])
    short = (torch.tensor([[9], [8], [7]]), torch.tensor([100, 101]))
    tokens, mask, target = collate([(audio, text), short], num_codebooks=k)
    assert tokens.shape == mask.shape == (2, 6, 4)
    expected = torch.tensor([
        [0, 0, 0, 100], [0, 0, 0, 7], [0, 0, 0, 101],  # text frames
        [1, 3, 5, 0], [2, 4, 6, 0],  # audio frames (codes transposed)
        [0, 0, 0, 0],  # EOS frame
    ])
    expected_mask = torch.tensor([[0, 0, 0, 1]] * 3 + [[1, 1, 1, 0]] * 3, dtype=torch.bool)
    assert torch.equal(tokens[0], expected) and torch.equal(mask[0], expected_mask)
    # second example: 2 text + 1 audio + EOS, then 2 padding rows that are fully masked out
    assert torch.equal(tokens[1, :3], torch.tensor([[0, 0, 0, 100], [0, 0, 0, 101], [9, 8, 7, 0]]))
    assert mask[1, 3, :k].all() and not mask[1, 3, k]
    assert not mask[1, 4:].any() and not tokens[1, 4:].any()
    # One turn each: every audio frame (EOS included) is a target.
    assert torch.equal(target, mask[:, :, 0])


@pytest.mark.parametrize("version", [1, 2])
def test_items_match_the_file_in_every_mode(tmp_path, version):
    path = write_token_file(tmp_path / "t.hdf5", n_train=9, n_val=2, version=version)
    raw = list(zip(*token_rows(path)))
    for ds in (CSMDataset(path, "train"), CSMDataset(path, "train", partial=True)):
        assert len(ds) == 9 and ds.num_codebooks == 32 and ds.mapped == (version == 2)
        for i in range(9):
            audio, text = ds[i]
            assert torch.equal(audio, torch.from_numpy(raw[i][0].astype(np.int64)).view(32, -1))
            assert torch.equal(text, torch.from_numpy(raw[i][1].astype(np.int64)))


def test_every_mode_and_format_gives_the_same_batches_with_workers(tmp_path):
    """Format 1 in memory, format 1 read row by row (partial) and format 2 mapped from the file, each with loader
    workers (which map the file themselves): the same batches."""
    old = write_token_file(tmp_path / "old.hdf5", version=1)
    new = write_token_file(tmp_path / "new.hdf5")
    a = [t for t, _, _ in make_loader(CSMDataset(old, "train"), batch_size=3, seed=0)]
    for ds in (CSMDataset(old, "train", partial=True), CSMDataset(new, "train")):
        b = [t for t, _, _ in make_loader(ds, batch_size=3, seed=0, num_workers=2)]
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_format_1_file_says_once_how_to_upgrade_it(tmp_path, capsys):
    old = write_token_file(tmp_path / "old.hdf5", version=1)
    CSMDataset(old, "train"), CSMDataset(old, "val")
    err = capsys.readouterr().err
    assert err.count("format-1 token file") == 1 and f"pretokenize.py --upgrade {old} --output" in err
    CSMDataset(write_token_file(tmp_path / "new.hdf5"), "train")
    assert "format-1" not in capsys.readouterr().err


def test_original_int32_file_loads_like_int16(tmp_path):
    old = write_token_file(tmp_path / "old.hdf5", audio_dtype="int32", attrs=False)
    new = write_token_file(tmp_path / "new.hdf5", audio_dtype="int16")
    for split in ("train", "val"):
        a, b = CSMDataset(old, split), CSMDataset(new, split)
        assert all(torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1]) for i in range(len(a)))


def test_memory_per_token_is_compact(tmp_path):
    """Format 1 in memory: about 2 bytes a token. Format 2: only the row index (the codes stay in the file)."""
    for version in (1, 2):
        path = write_token_file(tmp_path / f"t{version}.hdf5", n_train=50, n_val=0, audio_frames=(40, 120),
                                text_len=(8, 30), version=version)
        ds = CSMDataset(path, "train")
        tokens = sum(a.numel() + t.numel() for a, t in (ds[i] for i in range(len(ds))))
        assert ds.nbytes() / tokens <= (2.5 if version == 1 else 0.2)


def test_too_long_examples_refused_at_open(tmp_path):
    path = write_token_file(tmp_path / "t.hdf5", audio_frames=(20, 40))
    with pytest.raises(DataError, match=r"examples are longer than max_seq_len=30.*--max_seq_len 30"):
        CSMDataset(path, "train", max_seq_len=30)


def test_bad_files_get_one_clear_message(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        open_splits(tmp_path / "missing.hdf5")
    (tmp_path / "text.hdf5").write_text("not hdf5")
    with pytest.raises(DataError, match="not an HDF5 file"):
        open_splits(tmp_path / "text.hdf5")
    with h5py.File(tmp_path / "bad.hdf5", "w") as f:
        f.create_group("train").create_dataset("audio", data=np.zeros(3))
    with pytest.raises(DataError, match="lacks dataset.*text, length"):
        open_splits(tmp_path / "bad.hdf5")
    path = write_token_file(tmp_path / "t.hdf5", n_val=0)
    with pytest.raises(DataError, match="no 'val' split"):
        CSMDataset(path, "val")
    with h5py.File(path, "a") as f:
        f["train/length"][3] += 1
    with pytest.raises(DataError, match="not len\\(text\\) \\+ frames \\+ 1"):
        CSMDataset(path, "train")


def test_a_newer_token_file_format_is_refused_with_a_clear_error(tmp_path):
    path = write_token_file(tmp_path / "t.hdf5")
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(DataError, match="format version 99; this csm-train reads versions up to 2"):
        open_splits(path)
    with pytest.raises(DataError, match="format version 99"):
        CSMDataset(path, "train")
    # The original tool wrote no attributes at all: that still reads.
    plain = write_token_file(tmp_path / "plain.hdf5", attrs=False, audio_dtype="int32")
    assert open_splits(plain) == {"train": 12, "val": 4}


def test_loader_workers_default_to_two_on_cuda_and_none_on_cpu():
    """num_workers unset: workers overlap loading with a GPU's step; on the CPU they would take the step's
    cores (bench/dataloader.py measures both)."""
    from csm.training import config
    from dataloaders import default_num_workers

    assert config.make_config({}).num_workers is None
    assert default_num_workers(torch.device("cuda")) == 2 and default_num_workers(torch.device("cpu")) == 0


def _read_every_row(path, barrier, results):
    from dataloader import process_memory  # bench/dataloader.py: what the at-scale benchmark reads from /proc

    torch.set_num_threads(1)
    before = process_memory(os.getpid(), path)
    ds = CSMDataset(path, "train")
    total = sum(int(ds[i][0].sum()) for i in range(len(ds)))
    barrier.wait()  # both processes have read every row: every page of the codes is mapped in both
    results.put((total, before, process_memory(os.getpid(), path)))
    barrier.wait()


def test_two_processes_reading_one_file_share_its_pages(tmp_path):
    """Two processes read every row of one format-2 file at the same time: the file's pages each maps are shared
    with the other (one copy, in the page cache), and neither holds private memory near the file's size."""
    from dataloader import write_reference_file

    path = write_reference_file(tmp_path / "t.hdf5", 8000)  # about 40 MB of codes
    with h5py.File(path) as f:
        codes_bytes = f["train/audio"].nbytes
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_read_every_row, args=(str(path), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    seen = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0
    assert seen[0][0] == seen[1][0]  # the same codes
    for _, before, after in seen:
        assert after["file_shared"] >= 0.9 * codes_bytes, (after, codes_bytes)
        assert after["beyond_file"] - before["beyond_file"] < codes_bytes / 4, (before, after, codes_bytes)
