"""Conversational context: composed examples against hand-built ones, cut-to-fit, same_speaker draws,
the loss mask and its gradients, old files, and a tiny model trained with a voice prompt that then
speaks after one."""
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, write_token_file
from csm.data.context import ContextPlanner
from dataloaders import CSMDataset, collate, make_loader
from conftest import cli

SAMPLE = ROOT / "data" / "sample"


def _tiny_conversation_file(path):
    """4 rows, 2 codebooks: rows 0, 2, 3 form conversation "a" in turn order 2, 0, 3; row 1 stands alone."""
    from csm.data import token_file

    audio = [np.array([10, 11, 20, 21], dtype=np.int16),  # row 0: 2 frames, codebook-major
             np.array([30, 40], dtype=np.int16),          # row 1: 1 frame
             np.array([50, 60], dtype=np.int16),          # row 2: 1 frame
             np.array([70, 71, 80, 81], dtype=np.int16)]  # row 3: 2 frames
    text = [np.array([1, 5, 2], dtype=np.int32), np.array([1, 6, 2], dtype=np.int32),
            np.array([1, 7, 2], dtype=np.int32), np.array([1, 8, 9, 2], dtype=np.int32)]
    turns = (["a", "", "a", "a"], np.array([1.0, 0.0, 0.5, 2.0]), np.array([0, 1, 1, 0], dtype=np.int32))
    with token_file.write_token_file(path, {"codebooks": 2}, num_codebooks=2) as out:
        out.write_split("train", audio, text, turns=turns)
    return path


def test_a_composed_example_matches_a_hand_built_one(tmp_path):
    ds = CSMDataset(_tiny_conversation_file(tmp_path / "c.hdf5"), "train")
    planner = ContextPlanner(ds.lengths, *ds.turns(), mode="conversation", context_turns=2)
    plans, lengths = planner.plans(0)
    assert plans == [(2, 0), (1,), (2,), (2, 0, 3)]  # turn order within "a": row 2, row 0, row 3
    tokens, mask, target = collate([ds[plans[3]]], num_codebooks=2)
    T, A = [1, 0, 0], [0, 1, 1]  # masks [text, c0, c1]: a text frame, an audio (or EOS) frame
    expected = [  # (tokens, mask) per frame: row 2 (text 1 7 2, 1 frame, EOS), row 0, then the target row 3
        ([0, 0, 1], T), ([0, 0, 7], T), ([0, 0, 2], T), ([50, 60, 0], A), ([0, 0, 0], A),
        ([0, 0, 1], T), ([0, 0, 5], T), ([0, 0, 2], T), ([10, 20, 0], A), ([11, 21, 0], A), ([0, 0, 0], A),
        ([0, 0, 1], T), ([0, 0, 8], T), ([0, 0, 9], T), ([0, 0, 2], T), ([70, 80, 0], A),
                ([71, 81, 0], A), ([0, 0, 0], A),
    ]
    # The frame mask stores [codes..., text]; the hand-built rows list [c0, c1, text] the same way.
    assert tokens[0].tolist() == [t for t, _ in expected]
    assert mask[0].int().tolist() == [[m[1], m[2], m[0]] for _, m in expected]
    assert target[0].int().tolist() == [0] * 15 + [1, 1, 1]  # only the target turn's audio and EOS frames
    assert lengths[3] == len(expected) == 18
    _, _, everything = collate([ds[plans[3]]], num_codebooks=2, context_loss="all")
    assert torch.equal(everything, mask[:, :, 0])


def test_context_is_cut_to_fit_oldest_turns_first():
    lengths = [5, 6, 7, 8]
    conversation, turn, speaker = ["x"] * 4, [0, 1, 2, 3], [0] * 4
    for max_len, plan in ((26, (0, 1, 2, 3)), (21, (1, 2, 3)), (15, (2, 3)), (14, (3,))):
        planner = ContextPlanner(lengths, conversation, turn, speaker, mode="conversation", context_turns=3,
                                 max_seq_len=max_len)
        plans, composed = planner.plans(0)
        assert plans[3] == plan and composed[3] == sum(lengths[r] for r in plan) <= max_len


def test_same_speaker_draws_only_that_speaker_reproducibly_per_seed_and_epoch():
    rng = np.random.default_rng(0)
    speaker = rng.integers(0, 4, 60)
    speaker[:2] = [7, -1]  # a speaker with one row, and an unknown speaker: no voice to prompt with
    lengths = rng.integers(10, 50, 60)

    def plans(seed, epoch, turns=2):
        return ContextPlanner(lengths, [""] * 60, np.arange(60), speaker, mode="same_speaker", context_turns=turns,
                              seed=seed).plans(epoch)[0]

    first = plans(0, 0)
    assert first[0] == (0,) and first[1] == (1,)
    for row, plan in enumerate(first[2:], start=2):
        assert plan[-1] == row and len(plan) == 3 and len(set(plan)) == 3
        assert all(speaker[r] == speaker[row] for r in plan[:-1])
    assert plans(0, 0) == first  # the same (seed, epoch): the same draws
    assert plans(0, 1) != first and plans(1, 0) != first  # another epoch or seed: other draws
    # The loader gives the same composed batches for the same (seed, epoch), resumed or not.
    assert plans(0, 3, turns=1) == plans(0, 3, turns=1)


def test_the_loss_predicts_only_the_target_turn_and_its_gradient_ignores_context_frames(assets, tmp_path):
    from csm.training.loss import compute_loss, plan_targets
    from csm.model.weights import load_model

    path = write_token_file(tmp_path / "d.hdf5", n_train=6, n_val=0, speakers=1)
    loader = make_loader(CSMDataset(path, "train"), batch_size=3, shuffle=False, context_mode="same_speaker",
                         context_turns=1)
    tokens, mask, target = next(iter(loader))
    assert target.sum() < mask[:, :, 0].sum()  # context audio is there, and not a target
    model = load_model(assets["model"])
    captured = {}

    def keep_output(module, args, out):
        out.retain_grad()
        captured["h"] = out

    model.backbone.register_forward_hook(keep_output)
    terms = compute_loss(model, tokens, mask, target, decoder_fraction=1.0)
    assert (terms.n_c0, terms.n_decoder) == plan_targets(mask, target, 1.0, None).counts(32)
    assert terms.n_c0 == int(target[:, 1:].sum())
    (terms.c0_sum + terms.decoder_sum).backward()
    grad = captured["h"].grad.abs().sum(-1)[:, :-1]  # the state at row r predicts row r + 1
    predicts_target = target[:, 1:]
    assert (grad[~predicts_target] == 0).all() and (grad[predicts_target] > 0).all()


def test_old_files_without_conversations_train_as_before(tmp_path):
    path = write_token_file(tmp_path / "old.hdf5", n_train=12, n_val=0, attrs=False, audio_dtype="int32")
    ds = CSMDataset(path, "train")
    plain = list(make_loader(ds, max_tokens=200, seed=3))
    for mode in ("conversation", "same_speaker"):
        composed = list(make_loader(ds, max_tokens=200, seed=3, context_mode=mode, context_turns=3))
        assert len(composed) == len(plain)
        for a, b in zip(plain, composed):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_model_trained_with_a_voice_prompt_speaks_after_one(assets, tmp_path):
    import pretokenize
    from csm.training import training
    from csm.training.config import make_config

    data = tmp_path / "data.hdf5"
    pretokenize.main(["--train_data", str(SAMPLE / "train.csv"), "--val_data", str(SAMPLE / "val.json"), "--output",
                      str(data), "--device", "cpu", "--text_tokenizer", str(assets["text_tokenizer"]),
                      "--mimi_weights", str(assets["mimi"])])
    ds = CSMDataset(data, "train")
    speaker = ds.turns()[2]
    assert sorted(speaker.tolist()) == sorted(pd.read_csv(SAMPLE / "train.csv")["speaker"].tolist())  # kept per row
    plans = make_loader(ds, batch_size=4, context_mode="same_speaker").sampler.planner.plans(0)[0]
    assert all(len(p) == 2 and speaker[p[0]] == speaker[p[1]] for p in plans)

    prompt = {"audio": str(SAMPLE / "clips" / "train_00.flac"), "text": "The quick brown fox jumps over the lazy dog.",
              "speaker": 0}
    cfg = make_config(dict(model=str(assets["model"]), text_tokenizer=str(assets["text_tokenizer"]),
                           mimi_weights=str(assets["mimi"]), batch_size=4, learning_rate=1e-3,
                           warmup_steps=1, max_steps=4,
                           val_every=2, save_every=2, gen_every=4, gen_max_seconds=0.5, log_every=1, precision="fp32",
                           wandb_mode="disabled", context_mode="same_speaker", gen_context=[prompt]))
    out = tmp_path / "run"
    training.train(cfg, data, out, device="cpu", progress=False)
    assert len(list((out / "samples").glob("step_0000004_*.wav"))) == 1
    rc, err = cli("generate.py", "--model", out / "best", "--text", "Hello there.", "--speaker", 0, "--output",
                  tmp_path / "hi.wav", "--max_audio_seconds", 0.5, "--device", "cpu", "--mimi_weights", assets["mimi"],
                  "--context_audio", prompt["audio"], "--context_text", prompt["text"], "--context_speaker", 0)
    assert rc == 0, err
    assert (tmp_path / "hi.wav").is_file()


def test_a_missing_prompt_file_fails_before_training(assets, tmp_path):
    from csm.training import training
    from csm.training.config import make_config
    from csm.system.errors import UserError

    data = write_token_file(tmp_path / "d.hdf5")
    cfg = make_config(dict(model=str(assets["model"]), text_tokenizer=str(assets["text_tokenizer"]),
                           mimi_weights=str(assets["mimi"]), max_steps=2, warmup_steps=1, gen_every=1,
                           wandb_mode="disabled", gen_context=[{"audio": str(tmp_path / "none.wav"), "text": "x",
                                                                 "speaker": 0}]))
    with pytest.raises(UserError, match="none.wav"):
        training.train(cfg, data, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="exactly the keys"):
        make_config({"gen_context": [{"audio": "a.wav", "text": "x"}]})
    with pytest.raises(UserError, match="context_mode"):
        make_config({"context_mode": "dialogue"})
