"""Preference finetuning: the DPO loss against hand computations, prefer.py's pairs and their stored reference,
training on them (resume, LoRA, freezing), a scripted preference that the tiny model learns, and bad inputs."""
import json
import math
import shutil
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from csm.training import config
import prefer
from csm.training import preferences
from csm.training import training
from csm.model import weights
from conftest import ROOT, write_token_file
from csm.training.dpo import candidate_logps, collate_pairs, dpo_loss, dpo_terms, pair_terms, plan_pairs
from csm.training.loss import compute_loss
from csm.data.preference_file import Candidate, Pair, read_pairs, settings_of, write_preference_file
from csm.training.preferences import make_preference_file
from csm.system.errors import UserError


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _cfg(assets, **overrides):
    values = dict(model=str(assets["model"]), objective="dpo", batch_size=2, max_steps=4, learning_rate=1e-3,
                  warmup_steps=1, val_every=0, save_every=0, gen_every=0, log_every=1, wandb_mode="disabled",
                  precision="fp32")
    return config.make_config({**values, **overrides})


@pytest.fixture(scope="module")
def prefs(assets, tmp_path_factory):
    return make_preference_file(tmp_path_factory.mktemp("prefs") / "prefs.hdf5", assets["model"], n_train=8, n_val=3)


# --------------------------------------------------------------------------- the loss


def test_the_loss_and_its_gradient_equal_a_hand_computation():
    """Two pairs, β = 0.3, an NLL weight of 0.5 over 10 codes: the loss and d loss / d log π by hand."""
    beta, weight, codes = 0.3, 0.5, 10
    policy = torch.tensor([-10.0, -20.0, -12.0, -18.0], dtype=torch.float64, requires_grad=True)  # c1 c2 r1 r2
    reference = torch.tensor([-11.0, -19.0, -11.0, -19.0], dtype=torch.float64)
    terms = dpo_terms(policy, reference, beta)
    loss = dpo_loss(terms, 2, codes, weight)
    loss.backward()

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    margins = [beta * ((-10 + 11) - (-12 + 11)), beta * ((-20 + 19) - (-18 + 19))]  # 0.6, -0.6
    expected = sum(-math.log(sigmoid(m)) for m in margins) / 2 + weight * 30 / codes
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert terms.margins.tolist() == pytest.approx(margins)
    by_hand = [-beta * sigmoid(-m) / 2 - weight / codes for m in margins] + [beta * sigmoid(-m) / 2 for m in margins]
    assert policy.grad.tolist() == pytest.approx(by_hand, rel=1e-12)


def test_pair_terms_and_their_gradients_equal_per_sequence_likelihoods(assets, prefs):
    """log π of each candidate is the negative of the supervised loss sums of its sequence alone; the batched DPO
    loss and its gradient on every weight equal those built by hand from them."""
    pairs, k = read_pairs(prefs, "train")
    pairs = pairs[:3]
    batch = collate_pairs(pairs, k)
    plan = plan_pairs(batch.mask, batch.target, 1.0, None)
    model = weights.load_model(assets["model"])
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    params = [p for p in model.parameters() if p.requires_grad]
    beta, weight = 0.2, 0.3
    terms = pair_terms(model, batch.tokens, batch.mask, batch.ref_c0, batch.ref_decoder, plan=plan, beta=beta)
    codes = plan.chosen_frames * k
    loss = dpo_loss(terms, 3, codes, weight)
    ours = torch.autograd.grad(loss, params)

    logp = []
    for b in range(6):
        alone = compute_loss(model, batch.tokens[b:b + 1], batch.mask[b:b + 1], batch.target[b:b + 1],
                             decoder_fraction=1.0)
        logp.append(-(alone.c0_sum + alone.decoder_sum).double())
    candidates = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ref = [float(c.ref_c0.sum(dtype=np.float64) + c.ref_decoder.sum(dtype=np.float64)) for c in candidates]
    ratio = [lp - r for lp, r in zip(logp, ref)]
    hand = sum(-torch.nn.functional.logsigmoid(beta * (ratio[i] - ratio[i + 3])) for i in range(3)) / 3
    hand = hand - weight * sum(logp[:3]) / codes
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
    for a, b in zip(ours, torch.autograd.grad(hand, params)):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("fraction", [1.0, 0.3])
def test_a_policy_equal_to_its_reference_has_loss_log_2(assets, prefs, fraction):
    """Every log-ratio is 0, so every margin is 0 and the loss is log 2: with the decoder on every frame, and on a
    random subset (the same frames for the policy and the stored reference)."""
    pairs, k = read_pairs(prefs, "train")
    batch = collate_pairs(pairs, k)
    plan = plan_pairs(batch.mask, batch.target, fraction, torch.Generator().manual_seed(3))
    if fraction < 1:
        assert len(plan.decoder_index) < len(plan.rows[0])
    model = weights.load_model(assets["model"]).eval()
    with torch.no_grad():
        terms = pair_terms(model, batch.tokens, batch.mask, batch.ref_c0, batch.ref_decoder, plan=plan, beta=0.1)
    assert dpo_loss(terms, len(pairs), 1, 0.0).item() == pytest.approx(math.log(2), abs=1e-5)
    assert terms.chosen_ratio.abs().max() < 1e-3 and terms.rejected_ratio.abs().max() < 1e-3


# --------------------------------------------------------------------------- prefer.py


def _prefer_args(assets, judges, data, output, *extra):
    return ["--model", str(assets["model"]), "--data", str(data), "--output", str(output), "--text_tokenizer",
            str(assets["text_tokenizer"]), "--mimi_weights", str(assets["mimi"]), "--asr", str(judges["asr"]),
            "--speaker_model", str(judges["speaker_model"]), "--device", "cpu", "--max_audio_seconds", "0.8",
            "--n_candidates", "3", "--no_dnsmos", "--margin", "0", "--save_every", "2", "--val_fraction", "0.25",
            *extra]


def _killed_at_the_second_chunk(monkeypatch, args):
    """prefer.py interrupted (as by Ctrl-C) once its first chunk of prompts is committed."""
    real = preferences.PreferenceRun._chunk

    def dies_at_the_second_chunk(self, index):
        if index == 1:
            raise KeyboardInterrupt
        return real(self, index)

    monkeypatch.setattr(preferences.PreferenceRun, "_chunk", dies_at_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        prefer.main(args)
    monkeypatch.setattr(preferences.PreferenceRun, "_chunk", real)


def test_prefer_writes_pairs_whose_reference_is_fresh_and_resumes_a_killed_run(assets, judges, tmp_path,
                                                                                monkeypatch, capsys):
    """An unbroken run and a run killed after its first chunk then run again write the same pairs; the stored
    reference log-probabilities equal the model's, computed afresh; the CSV holds every candidate."""
    data = write_token_file(tmp_path / "tokens.hdf5", n_train=5, n_val=0)
    whole = tmp_path / "whole.hdf5"
    assert prefer.main(_prefer_args(assets, judges, data, whole)) == 0

    killed = tmp_path / "killed.hdf5"
    _killed_at_the_second_chunk(monkeypatch, _prefer_args(assets, judges, data, killed))
    assert not killed.exists() and (tmp_path / "killed.hdf5.partial" / "chunk_000000.hdf5").exists()
    with pytest.raises(UserError, match=r"half-done run with other settings \(settings.margin 0.0 -> 0.5\)"):
        prefer.main(_prefer_args(assets, judges, data, killed, "--margin", "0.5"))  # not the killed run's command
    # --batch_size changes no pair (each candidate samples from its own seed): it does not block the resume.
    assert prefer.main(_prefer_args(assets, judges, data, killed, "--batch_size", "2")) == 0
    assert "resuming: 2 prompts already done" in capsys.readouterr().out
    assert not (tmp_path / "killed.hdf5.partial").exists()

    model = weights.load_model(assets["model"])
    for split in ("train", "val"):
        a, k = read_pairs(whole, split)
        b, _ = read_pairs(killed, split)
        assert len(a) == len(b) and (split == "val" or a)
        for x, y in zip(a, b):
            for role in ("chosen", "rejected"):
                cx, cy = getattr(x, role), getattr(y, role)
                assert np.array_equal(cx.codes, cy.codes) and cx.reward == cy.reward
                np.testing.assert_allclose(cx.ref_c0, cy.ref_c0, rtol=1e-5, atol=1e-5)
            assert x.chosen.reward > x.rejected.reward
        fresh = candidate_logps(model, a, k) if a else []
        for candidate, (c0, decoder) in zip([p.chosen for p in a] + [p.rejected for p in a], fresh):
            np.testing.assert_allclose(candidate.ref_c0, c0, rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(candidate.ref_decoder, decoder, rtol=1e-5, atol=1e-3)
    rows = (tmp_path / "whole.candidates.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 * 3 and rows[0].startswith("prompt,split,candidate,seed,reward,role")
    assert settings_of(whole)["weights"] == preferences.DEFAULT_WEIGHTS
    # docs/formats.md names every dataset and attribute the file holds.
    import h5py

    page = (ROOT / "docs" / "formats.md").read_text().split("## The preference file", 1)[1]
    with h5py.File(whole, "r") as f:
        names = set(f["train"].keys()) | set(f.attrs.keys())
    assert sorted(n for n in names if f"`{n}`" not in page) == []

    # The pairs train, and the first step's policy is its reference: the DPO loss is log 2. The speaker names of
    # the model it starts from go on to its outputs.
    base = tmp_path / "base"
    shutil.copytree(assets["model"], base)
    (base / "speakers.json").write_text('{"alice": 3}')
    out = tmp_path / "run"
    training.train(_cfg(assets, model=str(base), max_steps=2, val_every=2), whole, out, device="cpu", progress=False)
    first = _metrics(out)[0]
    assert first["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5) and first["reward_accuracy"] == 0
    assert json.loads((out / "final" / "speakers.json").read_text()) == {"alice": 3}
    assert "DPO expects the two to be the same model" not in capsys.readouterr().err  # a copy, times kept: the same


def test_a_preference_file_kept_in_its_models_folder_resumes(assets, judges, tmp_path, monkeypatch, capsys):
    """The model's identity counted the run's own work directory and lock, so the second try said the model had
    changed and the half-done work was stranded."""
    data = write_token_file(tmp_path / "tokens.hdf5", n_train=4, n_val=0)
    model = tmp_path / "model"
    shutil.copytree(assets["model"], model)
    output = model / "prefs.hdf5"
    args = [a if a != str(assets["model"]) else str(model) for a in _prefer_args(assets, judges, data, output)]
    _killed_at_the_second_chunk(monkeypatch, args)
    assert prefer.main(args) == 0
    assert "resuming: 2 prompts already done" in capsys.readouterr().out and output.is_file()


def test_prompts_from_recordings_spoken_after_a_context_turn(assets, judges, tmp_path):
    """A metadata file of real recordings as the prompts, spoken after a prompt turn: each pair carries the turn
    (its Mimi codes and text), DPO lays it out before the candidate, and the first step is at the reference, so
    prefer.py and training saw the same frames."""
    sample = ROOT / "data" / "sample"
    out = tmp_path / "p.hdf5"
    assert prefer.main(_prefer_args(assets, judges, sample / "val.json", out, "--n", "3", "--val_fraction", "0",
                                    "--context_audio", str(sample / "clips" / "val_03.flac"), "--context_text",
                                    "Rain is expected later tonight.", "--context_speaker", "1")) == 0
    pairs, k = read_pairs(out, "train")
    assert pairs and all(len(p.context) == 1 and p.context[0][0].shape[0] == k for p in pairs)
    assert {p.prompt for p in pairs} <= {0, 1, 2, 3}
    rows = (tmp_path / "p.candidates.csv").read_text()
    assert "prompt_speaker_sim" in rows.splitlines()[0]
    run = tmp_path / "run"
    training.train(_cfg(assets, max_steps=1, warmup_steps=0), out, run, device="cpu", progress=False)
    assert _metrics(run)[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_prompts_spoken_after_the_earlier_turns_of_their_conversation(assets, judges, tmp_path):
    """--context_turns 1 on a token file with conversations: a prompt with an earlier turn carries that turn's
    stored codes and text as its context, one without carries none, and training sees the same frames."""
    from csm.data import token_file as tf

    data = write_token_file(tmp_path / "tokens.hdf5", n_train=6, n_val=0, speakers=2)  # row i: conversation i % 3
    out = tmp_path / "p.hdf5"
    assert prefer.main(_prefer_args(assets, judges, data, out, "--context_turns", "1", "--val_fraction", "0")) == 0
    pairs, k = read_pairs(out, "train")
    with tf.open_token_file(data) as f:
        for pair in pairs:
            if pair.prompt < 3:
                assert pair.context == []
            else:
                (codes, _), = pair.context
                assert np.array_equal(codes.reshape(-1), tf.read_row(f, "train", pair.prompt - 3)[0])
    assert any(p.context for p in pairs)
    run = tmp_path / "run"
    training.train(_cfg(assets, max_steps=1, warmup_steps=0), out, run, device="cpu", progress=False)
    assert _metrics(run)[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_equal_rewards_give_no_pairs_and_one_clear_line(assets, judges, tmp_path):
    """All-zero weights make every reward equal: no pair, one line, and no output or half-done work left."""
    data = write_token_file(tmp_path / "tokens.hdf5", n_train=2, n_val=0)
    out = tmp_path / "p.hdf5"
    weights_off = [f"--weight={t.name}=0" for t in preferences.REWARD_TERMS]
    with pytest.raises(UserError) as raised:
        prefer.main(_prefer_args(assets, judges, data, out, *weights_off))
    message = str(raised.value)
    assert message.startswith("no pairs") and "all-zero weights" in message and "\n" not in message
    assert not out.exists() and not (tmp_path / "p.hdf5.partial").exists()
    assert not (tmp_path / "p.candidates.csv").exists()


@pytest.mark.parametrize("extra,message", [
    (["--n_candidates", "1"], "--n_candidates"),
    (["--margin", "nan"], "--margin"),
    (["--val_fraction", "1.5"], "--val_fraction"),
    (["--weight", "loudness=1"], "unknown reward term 'loudness'"),
    (["--weight", "cer=inf"], "reward weight cer"),
    (["--weight", "cer"], "TERM=WEIGHT"),
])
def test_bad_numbers_and_weights_are_refused_before_any_work(assets, judges, tmp_path, extra, message):
    data = write_token_file(tmp_path / "tokens.hdf5", n_train=2, n_val=0)
    with pytest.raises(UserError, match=message):
        prefer.main(_prefer_args(assets, judges, data, tmp_path / "p.hdf5", *extra))


def test_outputs_that_would_lose_work_are_refused(assets, judges, tmp_path):
    data = write_token_file(tmp_path / "tokens.hdf5", n_train=2, n_val=0)
    with pytest.raises(UserError, match="ending in .hdf5"):
        prefer.main(_prefer_args(assets, judges, data, tmp_path / "p.csv"))
    with pytest.raises(UserError, match="is one of the inputs|same as|input"):
        prefer.main(_prefer_args(assets, judges, data, data))
    (tmp_path / "dir.hdf5").mkdir()
    with pytest.raises(UserError, match="directory"):
        prefer.main(_prefer_args(assets, judges, data, tmp_path / "dir.hdf5"))
    existing = tmp_path / "old.hdf5"
    existing.write_bytes(b"someone's work")
    with pytest.raises(UserError, match="exists"):
        prefer.main(_prefer_args(assets, judges, data, existing))
    assert existing.read_bytes() == b"someone's work"
    with pytest.raises(UserError, match="no such file"):
        prefer.main(_prefer_args(assets, judges, tmp_path / "missing.hdf5", tmp_path / "p.hdf5"))


def test_a_preference_file_is_not_taken_for_prompts(assets, judges, prefs, tmp_path):
    """Neither as prefer.py's prompts nor as an evaluation's items (it was taken for pickled metadata and got
    --trust_pickle advice)."""
    import evaluate

    with pytest.raises(UserError, match="--data .* is a preference file .prefer.py.: it holds candidates"):
        prefer.main(_prefer_args(assets, judges, prefs, tmp_path / "p.hdf5"))
    with pytest.raises(UserError, match="is a preference file .prefer.py.: it holds candidates, not reference"):
        evaluate.main(["--eval_data", str(prefs), "--model", str(assets["model"]), "--output_dir", str(tmp_path / "e")])
    with pytest.raises(UserError, match="eval_data .* is a preference file .prefer.py.: it holds candidates"):
        training.train(_cfg(assets, eval_every=1, eval_data=str(prefs)), str(prefs), tmp_path / "r", device="cpu")
    assert not (tmp_path / "e").exists() and not (tmp_path / "r").exists()


def test_reward_weights_come_from_yaml_then_flags(tmp_path):
    (tmp_path / "w.yaml").write_text("\ufeffcer: 2\neos: 0\n", encoding="utf-8")  # with a BOM, as Notepad saves
    args = prefer.build_parser().parse_args(["--data", "d", "--output", "o.hdf5", "--weights", str(tmp_path / "w.yaml"),
                                             "--weight", "eos=3"])
    assert prefer.reward_weights(args) == {**preferences.DEFAULT_WEIGHTS, "cer": 2.0, "eos": 3.0}


def test_rewards_leave_out_a_term_some_candidate_lacks_and_pairs_need_the_margin():
    rows = [{"cer": 0.5, "stopped_at_eos": True, "dnsmos_ovrl": 3.0}, {"cer": 0.1, "stopped_at_eos": False},
            {"error": "RuntimeError: boom"}]
    scores = preferences.rewards(rows, {"cer": 1.0, "eos": 1.0, "dnsmos": 5.0})
    assert scores == [pytest.approx(0.5), pytest.approx(-0.1), None]  # DNSMOS left out: candidate 1 has none
    assert preferences.pick_pair(scores, 0.1) == (0, 1)
    assert "within the margin" in preferences.pick_pair(scores, 1.0)
    assert "2 needed" in preferences.pick_pair([None, 1.0], 0.0)


# --------------------------------------------------------------------------- training on preferences


@pytest.mark.parametrize("mode", [{}, {"finetune": "lora", "lora_rank": 4, "lora_dropout": 0.1},
                                  {"freeze": ["backbone"]}], ids=["full", "lora", "freeze"])
def test_dpo_resume_is_bit_exact(assets, prefs, tmp_path, mode):
    """N steps, stop, resume to 2N == 2N unbroken, with accumulation and a decoder subset: weights and every
    logged number (DPO's reward accuracy, margins and log-ratios, and validation's)."""
    cfg = _cfg(assets, grad_acc_steps=2, max_steps=4, save_every=2, val_every=2, dpo_decoder_fraction=0.5,
               dpo_sft_weight=0.1, **mode)
    full, part = tmp_path / "full", tmp_path / "part"
    training.train(cfg, prefs, full, device="cpu", progress=False)
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step_0000002.pt", part / "checkpoints")
    (part / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in _metrics(full) if m["step"] <= 2))
    training.train(cfg, prefs, part, device="cpu", resume="auto", progress=False)
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(part / "final" / "model.safetensors"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    timing = {"tokens_per_s", "step_time", "peak_memory_gb"}
    logged = [[{k: v for k, v in m.items() if k not in timing} for m in _metrics(out)] for out in (full, part)]
    assert logged[0] == logged[1]
    keys = set().union(*logged[0])
    assert {"dpo_loss", "reward_accuracy", "reward_margin", "chosen_logratio", "rejected_logratio", "chosen_nll",
            "val_loss", "val_reward_accuracy", "val_reward_margin", "val_chosen_logratio",
            "val_rejected_logratio"} <= keys


def test_a_change_of_what_validation_measures_chooses_best_afresh_on_resume(assets, prefs, tmp_path, capsys,
                                                                             monkeypatch):
    """Resumed with another dpo_beta, the old best val_loss (of another scale) would keep best/ from ever moving:
    the best starts afresh, saying which setting changed."""
    out = tmp_path / "run"
    training.train(_cfg(assets, max_steps=2, save_every=2, val_every=2), prefs, out, device="cpu", progress=False)
    saved, real = [], training.save_outputs
    monkeypatch.setattr(training, "save_outputs", lambda model, cfg, out, name, *a: saved.append(name) or
                        real(model, cfg, out, name, *a))
    training.train(_cfg(assets, max_steps=4, save_every=2, val_every=2, dpo_beta=0.001), prefs, out, device="cpu",
                   resume="auto", progress=False)
    said = capsys.readouterr().out
    assert "note: dpo_beta 0.1 -> 0.001 changes what validation measures: best/ is chosen afresh" in said
    assert saved == ["best", "final"]  # best/ from step 4, its first validation since the change
    vals = [m["val_loss"] for m in _metrics(out) if "val_loss" in m]
    assert vals[1] > vals[0]  # the premise: at the new scale, step 4's val_loss is above step 2's


def test_a_run_without_val_pairs_says_it_writes_no_best(assets, tmp_path, capsys):
    """It wrote no best/ silently, and the README's next command (evaluate.py --model RUN/best) then failed."""
    prefs = make_preference_file(tmp_path / "p.hdf5", assets["model"], n_train=4, n_val=0)
    training.train(_cfg(assets, max_steps=2), prefs, tmp_path / "run", device="cpu", progress=False)
    out, err = capsys.readouterr()
    assert "has no val pairs: nothing will choose best/, so it is not written; final/ is the trained model" in err
    assert "no best/ (no val_loss was measured): use final/" in out.strip().splitlines()[-1]
    assert (tmp_path / "run" / "final").is_dir() and not (tmp_path / "run" / "best").exists()


def test_a_dpo_run_evaluates_on_eval_data_and_keeps_the_best_by_cer(assets, judges, prefs, tmp_path):
    """eval_every with eval_data (here the bundled recordings' metadata): the quality metrics are logged beside the
    DPO numbers and select_best_by: cer picks best/."""
    cfg = _cfg(assets, max_steps=2, eval_every=1, eval_data=str(ROOT / "data" / "sample" / "val.json"), eval_n=2,
               eval_max_seconds=0.5, eval_asr=str(judges["asr"]), eval_speaker_model=str(judges["speaker_model"]),
               eval_dnsmos=False, select_best_by="cer", text_tokenizer=str(assets["text_tokenizer"]),
               mimi_weights=str(assets["mimi"]))
    out = tmp_path / "run"
    training.train(cfg, prefs, out, device="cpu", progress=False)
    rows = _metrics(out)
    assert [r["step"] for r in rows if "cer" in r] == [1, 2] and any("dpo_loss" in r for r in rows)
    assert (out / "eval" / "step_0000002" / "summary.json").is_file() and (out / "best" / "model.safetensors").is_file()
    with pytest.raises(UserError, match="eval_data .*missing.csv: no such file"):
        training.train(_cfg(assets, eval_every=1, eval_data=str(tmp_path / "missing.csv")), prefs, tmp_path / "r2",
                       device="cpu", progress=False)


def test_accumulated_pairs_are_normalised_like_one_batch(assets, prefs):
    """4 pairs as 1 x 4 or 2 x 2 micro-batches give the same loss and update."""
    from csm.training.dpo import PairDataset
    from csm.system import runtime

    cfg = _cfg(assets, dpo_sft_weight=0.2, max_grad_norm=0.0)
    dataset = PairDataset(prefs, "train")
    results = []
    for sizes in ([4], [2, 2]):
        pairs = dataset.pairs[:4]
        micro, start = [], 0
        for n in sizes:
            micro.append(collate_pairs(pairs[start:start + n], dataset.num_codebooks))
            start += n
        model = weights.load_model(assets["model"])
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        stats = training.train_step(training.LossModule(model), micro, cfg, runtime.Runtime(torch.device("cpu")),
                                    "fp32", opt, torch.amp.GradScaler("cpu", enabled=False),
                                    torch.Generator().manual_seed(0), 32)
        results.append((stats, {k: v.clone() for k, v in model.state_dict().items()}))
    (s1, w1), (s2, w2) = results
    assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-6) and s1["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-5, atol=1e-6)


def test_dpo_learns_a_scripted_preference_for_stopping(assets, text_tokenizer, mimi, tmp_path):
    """The preference "stop here, rather than go on one more frame", scripted on the tiny model's own samples
    (after 3..8 of their frames), is learnt by DPO alone (no NLL term): greedy speech of prompts it never saw goes
    from never stopping (the 2 s cap, 25 frames) to stopping at EOS, from the same seeds."""
    from csm.judging.synthesis import SpeechRequest, synthesize_batch
    from csm.model.tokenization import encode_text

    seen = ["Hello there.", "How are you today?", "The quick brown fox.", "She sells sea shells.",
            "What time is it?", "I am fine, thank you.", "Peter Piper picked.", "It is half past nine."]
    unseen = ["Numbers such as one two.", "A conversational model listens.", "Bird law is not governed by reason.",
              "Speech synthesis turns text into sound."]

    def speak(model, texts, topk):
        requests = [SpeechRequest(t, 0, (), 2.0, seed=100 + i) for i, t in enumerate(texts)]
        spoken = synthesize_batch(model, text_tokenizer, mimi, requests, topk=topk)
        return np.mean([s.stopped for s in spoken]), np.mean([s.codes.shape[1] for s in spoken]), spoken

    model = weights.load_model(assets["model"])
    eos_before, frames_before, _ = speak(model, unseen, topk=1)
    *_, samples = speak(model, seen, topk=50)
    empty = np.zeros(0, np.float32)
    pairs = []
    for i, (text, speech) in enumerate(zip(seen, samples)):
        codes, ids = speech.codes.numpy(), np.asarray(encode_text(text_tokenizer, text, 0))
        for t in range(3, 9):
            pairs.append(Pair(i, 0, ids, [], Candidate(codes[:, :t], True, 1.0, empty, empty),
                              Candidate(codes[:, :t + 1], False, 0.0, empty, empty)))
    for candidate, (c0, decoder) in zip([p.chosen for p in pairs] + [p.rejected for p in pairs],
                                        candidate_logps(model, pairs, 32)):
        candidate.ref_c0, candidate.ref_decoder = c0, decoder
    data = tmp_path / "stop.hdf5"
    with write_preference_file(data, {"codebooks": 32}) as add:
        add("train", pairs)

    cfg = _cfg(assets, max_steps=120, batch_size=4, learning_rate=3e-3, warmup_steps=5, dpo_beta=0.02, log_every=10)
    training.train(cfg, data, tmp_path / "run", device="cpu", progress=False)
    logged = _metrics(tmp_path / "run")
    assert logged[-1]["reward_accuracy"] == 1.0 and logged[-1]["dpo_loss"] < 0.1
    eos_after, frames_after, _ = speak(weights.load_model(tmp_path / "run" / "final"), unseen, topk=1)
    assert eos_before == 0 and frames_before == 25
    assert eos_after >= 0.75 and frames_after < frames_before / 2


def test_a_sweep_tunes_dpo_on_the_preference_files_val_pairs(assets, prefs, tmp_path):
    """sweep.py takes a preference file (its val pairs give each trial's val_loss, the DPO loss)."""
    import optuna
    import sweep

    space = tmp_path / "space.yaml"
    space.write_text("dpo_beta:\n  - type: float\n  - min: 0.05\n  - max: 0.5\n")
    out = tmp_path / "sweep"
    assert sweep.main(["--data", str(prefs), "--output_dir", str(out), "--sweep_config", str(space), "--n_trials", "2",
                       "--max_steps", "2", "--model", str(assets["model"]), "--wandb_mode", "disabled", "--sampler",
                       "random", "--set", "objective=dpo", "--set", "batch_size=2", "--set", "val_every=1",
                       "--set", "warmup_steps=1", "--set", "precision=fp32", "--set", "gen_every=0"]) == 0
    study = optuna.load_study(study_name="csm-sweep", storage=f"sqlite:///{(out / 'study.db').resolve()}")
    values = [t.value for t in study.trials]
    assert len(values) == 2 and all(0 < v < 1 for v in values)  # DPO losses near log 2, not SFT losses


# --------------------------------------------------------------------------- bad inputs


def _train_cli(data, assets, out, *extra):
    return subprocess.run([sys.executable, "train.py", "--data", str(data), "--model", str(assets["model"]),
                           "--output_dir", str(out), "--device", "cpu", "--max_steps", "1", "--gen_every", "0",
                           "--wandb_mode", "disabled", *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_reference_model_is_checked_by_its_files_not_its_path(assets, prefs, tmp_path, monkeypatch, capsys):
    """The same model by another (relative) path: no warning. The model replaced at the same path, or a file made
    with an adapter on the model (its log-probabilities are the adapter's) and trained from the model alone: a
    warning naming it."""
    import h5py

    warned = "DPO expects the two to be the same model"
    model = Path(assets["model"])
    monkeypatch.chdir(model.parent)
    training.check_reference(_cfg(assets, model=f"./{model.name}/../{model.name}"), str(prefs), "fp32")
    assert warned not in capsys.readouterr().err
    moved = tmp_path / "model"
    shutil.copytree(model, moved)
    data = tmp_path / "p.hdf5"
    make_preference_file(data, moved, n_train=2, n_val=0)
    (moved / "config.json").write_text((moved / "config.json").read_text() + "\n")  # replaced in place
    training.check_reference(_cfg(assets, model=str(moved)), str(data), "fp32")
    assert warned in capsys.readouterr().err
    with h5py.File(prefs, "r") as f:
        identity = json.loads(f.attrs["reference_identity"])
    adapted = tmp_path / "adapted.hdf5"
    shutil.copy(prefs, adapted)
    with h5py.File(adapted, "r+") as f:
        f.attrs["reference_identity"] = json.dumps({**identity, "adapter": [["adapter_model.safetensors", 1, 2]]})
        f.attrs["adapter"] = "runs/x/best_adapter"
    training.check_reference(_cfg(assets), str(adapted), "fp32")
    err = capsys.readouterr().err
    assert "with the LoRA adapter runs/x/best_adapter applied" in err and warned in err


def test_a_run_at_another_precision_or_compile_setting_than_the_reference_is_warned_of(assets, prefs, capsys):
    """The file records the precision and compile setting its reference log-probabilities were computed in (fp32,
    eager here); a run that differs in either gets one warning line naming both, a matching run none."""
    from csm.system import runtime

    cpu = runtime.Runtime(torch.device("cpu"))
    for overrides, said in (({}, None), ({"precision": "bf16"}, "bf16, eager"), ({"compile": True}, "fp32, compiled"),
                            ({"precision": "auto"}, None)):  # auto is fp32 on the CPU
        training.check_reference(_cfg(assets, **overrides), str(prefs),
                                 runtime.resolve_precision(overrides.get("precision", "fp32"), cpu.device))
        err = capsys.readouterr().err
        if said is None:
            assert err == "", overrides
        else:
            assert err.count("\n") == 1 and "computed in fp32, eager, but this run trains in " + said in err, err
    assert settings_of(prefs)["precision"] == "fp32" and settings_of(prefs)["reference_compiled"] in (False, 0)


def test_the_wrong_file_for_the_objective_is_one_clear_line(assets, prefs, tmp_path):
    tokens = write_token_file(tmp_path / "tokens.hdf5", n_train=4, n_val=0)
    for data, extra, message in ((tokens, ["--set", "objective=dpo"], "is not a preference file"),
                                 (prefs, [], "is a preference file (prefer.py): train on it with --set objective=dpo")):
        proc = _train_cli(data, assets, tmp_path / "run", *extra)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert message in proc.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "run").exists()


def test_a_preference_file_without_pairs_is_refused(assets, tmp_path):
    empty = tmp_path / "empty.hdf5"
    with write_preference_file(empty, {"codebooks": 32}) as add:
        add("train", [])
    with pytest.raises(UserError, match="holds no pairs"):
        training.train(_cfg(assets), empty, tmp_path / "run", device="cpu", progress=False)


def test_dpo_settings_are_checked_before_any_work(assets):
    for bad, message in (({"dpo_beta": 0}, "dpo_beta"), ({"dpo_beta": math.nan}, "dpo_beta"),
                         ({"dpo_decoder_fraction": 0}, "dpo_decoder_fraction"),
                         ({"dpo_sft_weight": -1}, "dpo_sft_weight"), ({"objective": "ppo"}, "objective"),
                         ({"eval_every": 5}, "eval_every needs eval_data"),
                         ({"context_mode": "conversation"}, "context_mode")):
        with pytest.raises(UserError, match=message):
            _cfg(assets, **bad)


def test_damaged_or_newer_preference_files_are_refused_in_one_line(prefs, tmp_path):
    import h5py

    from csm.data.preference_file import open_preference_file

    newer = tmp_path / "newer.hdf5"
    shutil.copy(prefs, newer)
    with h5py.File(newer, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(UserError, match="format version 99.*update csm-train"):
        open_preference_file(newer)
    short = tmp_path / "short.hdf5"
    shutil.copy(prefs, short)
    with h5py.File(short, "a") as f:
        f["train/chosen_ref_c0"][0] = np.zeros(1, np.float32)
    with pytest.raises(UserError, match="pair 0: the chosen candidate has .* target frames but 1 reference"):
        read_pairs(short, "train")
    (tmp_path / "text.hdf5").write_text("not hdf5")
    with pytest.raises(UserError, match="not an HDF5 file"):
        open_preference_file(tmp_path / "text.hdf5")
