"""The training loss: exact values, padding invariance, EOS target, length limit, checkpointing."""
import math

import pytest
import torch

from csm.training.loss import SequenceTooLongError, combine_loss, compute_loss, decoder_frame_count, plan_targets
from csm.training.optim import lr_multiplier
from csm.model.csm_model import CSM, embed_frames
from csm.data.tiny_assets import TINY_MODEL_ARGS

K = TINY_MODEL_ARGS.audio_num_codebooks


def example(n_text, n_audio, seed):
    """(tokens, mask) of one utterance laid out as docs/formats.md says: text frames, audio frames, EOS frame."""
    g = torch.Generator().manual_seed(seed)
    s = n_text + n_audio + 1
    tokens = torch.zeros(s, K + 1, dtype=torch.long)
    mask = torch.zeros(s, K + 1, dtype=torch.bool)
    tokens[:n_text, K] = torch.randint(0, TINY_MODEL_ARGS.text_vocab_size, (n_text,), generator=g)
    mask[:n_text, K] = True
    tokens[n_text:n_text + n_audio, :K] = torch.randint(0, 2048, (n_audio, K), generator=g)
    mask[n_text:, :K] = True  # audio frames and the all-zero EOS frame
    return tokens, mask


def pad_batch(examples):
    s = max(t.shape[0] for t, _ in examples)
    tokens = torch.zeros(len(examples), s, K + 1, dtype=torch.long)
    mask = torch.zeros(len(examples), s, K + 1, dtype=torch.bool)
    for i, (t, m) in enumerate(examples):
        tokens[i, : t.shape[0]], mask[i, : m.shape[0]] = t, m
    return tokens, mask


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CSM(TINY_MODEL_ARGS).eval()


def hand_loss(model, tokens, mask):
    """Cross-entropy written out frame by frame, one example at a time, with plain loops."""
    c0, dec, n0, nd = 0.0, 0.0, 0, 0
    for b in range(tokens.shape[0]):
        length = int(mask[b].any(-1).sum())
        h = model.backbone(embed_frames(model, tokens[b:b + 1, :length], mask[b:b + 1, :length]))[0]
        for r in range(1, length):
            if not mask[b, r, 0]:
                continue
            target = tokens[b, r, :K]
            c0 += -torch.log_softmax(model.codebook0_head(h[r - 1]), -1)[target[0]].item()
            n0 += 1
            seq = [h[r - 1]] + [model.audio_embeddings.weight[int(target[i]) + i * TINY_MODEL_ARGS.audio_vocab_size]
                                for i in range(K - 1)]
            dec_h = model.decoder(model.projection(torch.stack(seq)).unsqueeze(0))[0]
            for i in range(1, K):
                logits = dec_h[i] @ model.audio_head[i - 1]
                dec += -torch.log_softmax(logits, -1)[target[i]].item()
                nd += 1
    return c0, dec, n0, nd


@torch.no_grad()
def test_loss_equals_hand_computed_cross_entropy(model):
    tokens, mask = pad_batch([example(4, 6, 0), example(3, 9, 1)])
    terms = compute_loss(model, tokens, mask, decoder_fraction=1.0)
    c0, dec, n0, nd = hand_loss(model, tokens, mask)
    assert (terms.n_c0, terms.n_decoder) == (n0, nd) == (6 + 1 + 9 + 1, (6 + 1 + 9 + 1) * (K - 1))
    assert terms.c0_sum.item() == pytest.approx(c0, rel=1e-5)
    assert terms.decoder_sum.item() == pytest.approx(dec, rel=1e-5)
    loss = combine_loss(terms, terms.n_c0, terms.n_decoder, decoder_loss_weight=0.5)
    assert loss.item() == pytest.approx(2 * (0.5 * c0 / n0 + 0.5 * dec / nd), rel=1e-5)
    # An untrained model is near-uniform over the 2051 audio tokens.
    assert abs(c0 / n0 - math.log(2051)) < 0.5


@torch.no_grad()
def test_padded_batch_gives_the_same_per_example_losses(model):
    examples = [example(4, 5, 0), example(6, 17, 1), example(3, 2, 2)]
    tokens, mask = pad_batch(examples)
    batch = compute_loss(model, tokens, mask, decoder_fraction=1.0)
    alone = [compute_loss(model, t[None], m[None], decoder_fraction=1.0) for t, m in examples]
    assert batch.n_c0 == sum(a.n_c0 for a in alone)
    assert batch.c0_sum.item() == pytest.approx(sum(a.c0_sum.item() for a in alone), rel=1e-5)
    assert batch.decoder_sum.item() == pytest.approx(sum(a.decoder_sum.item() for a in alone), rel=1e-5)
    # Garbage in the padding must not change anything.
    garbage = tokens.clone()
    garbage[~mask] = 7
    again = compute_loss(model, garbage, mask, decoder_fraction=1.0)
    assert again.c0_sum.item() == pytest.approx(batch.c0_sum.item(), rel=1e-6)


@torch.no_grad()
def test_eos_frame_is_a_target(model):
    tokens, mask = pad_batch([example(3, 4, 0)])
    terms = compute_loss(model, tokens, mask, decoder_fraction=1.0)
    assert terms.n_c0 == 5  # 4 audio frames + the EOS frame
    # Changing the EOS frame's (all-zero) targets changes the loss: it is really predicted.
    changed = tokens.clone()
    changed[0, -1, :K] = 5
    other = compute_loss(model, changed, mask, decoder_fraction=1.0)
    assert other.c0_sum.item() != pytest.approx(terms.c0_sum.item(), rel=1e-6)


def test_decoder_fraction_is_reproducible_and_at_least_one_frame(model):
    tokens, mask = pad_batch([example(3, 40, 0), example(3, 3, 1)])
    assert plan_targets(mask, None, 1 / 16, None).counts(K) == (45, 2 * (K - 1))
    a = compute_loss(model, tokens, mask, generator=torch.Generator().manual_seed(5))
    b = compute_loss(model, tokens, mask, generator=torch.Generator().manual_seed(5))
    c = compute_loss(model, tokens, mask, generator=torch.Generator().manual_seed(6))
    assert a.n_decoder == 2 * (K - 1)
    assert a.decoder_sum.item() == b.decoder_sum.item()
    assert a.decoder_sum.item() != c.decoder_sum.item()
    assert decoder_frame_count(3, 1 / 16) == 1
    assert decoder_frame_count(0, 1 / 16) == 0


def test_too_long_sequence_is_a_clear_error(model):
    tokens = torch.zeros(1, model.backbone.max_seq_len + 1, K + 1, dtype=torch.long)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    with pytest.raises(SequenceTooLongError, match="at most 2048"):
        compute_loss(model, tokens, mask)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    tokens, mask = pad_batch([example(4, 6, 0), example(3, 9, 1)])

    def grads(checkpointing):
        torch.manual_seed(0)
        model = CSM(TINY_MODEL_ARGS).train()
        model.set_activation_checkpointing(checkpointing)
        terms = compute_loss(model, tokens, mask, decoder_fraction=1.0)
        combine_loss(terms, terms.n_c0, terms.n_decoder, 0.5).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_lr_schedule_boundaries():
    kw = dict(warmup_steps=10, total_steps=110)
    assert lr_multiplier(0, decay="linear", **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, decay="linear", **kw) == pytest.approx(1.0)
    assert lr_multiplier(10, decay="linear", **kw) == pytest.approx(1.0)
    for decay, final in (("linear", 0.0), ("cosine", 0.0), ("exponential", 0.01), ("constant", 1.0)):
        assert lr_multiplier(109, decay=decay, **kw) == pytest.approx(final), decay
    assert lr_multiplier(59, decay="linear", **kw) == pytest.approx(0.5, abs=0.01)
    assert lr_multiplier(59, decay="cosine", **kw) == pytest.approx(0.5, abs=0.02)
    assert lr_multiplier(109, decay="cosine", min_lr_ratio=0.1, **kw) == pytest.approx(0.1)
    assert lr_multiplier(0, warmup_steps=0, total_steps=5, decay="linear") == pytest.approx(1.0)
    with pytest.raises(ValueError):
        lr_multiplier(0, warmup_steps=0, total_steps=5, decay="step")
