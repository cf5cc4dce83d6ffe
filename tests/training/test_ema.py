"""The moving average of the weights itself: the closed form, decay 0, the start, bad values, the swap."""
import math

import pytest
import torch

from csm.system.errors import UserError
from csm.training.ema import WeightEMA


def _model(value=0.0):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


def test_after_k_steps_the_average_is_the_closed_form():
    """Weights w_1..w_k after steps 1..k, the average begun at w_s (step s = start): ema_k = d^(k-s) w_s +
    (1 - d) sum_{i=s+1..k} d^(k-i) w_i."""
    decay, start, k = 0.9, 2, 12
    model = _model()
    ema = WeightEMA(model, decay, start=start)
    script = [float(i * i % 7) - 2.5 for i in range(1, k + 1)]
    for step, w in enumerate(script, 1):
        with torch.no_grad():
            model.weight.fill_(w)
            model.bias.fill_(-w)
        ema.update(step)
    closed = decay ** (k - start) * script[start - 1] + (1 - decay) * sum(
        decay ** (k - i) * script[i - 1] for i in range(start + 1, k + 1))
    assert ema.average[0].flatten().tolist() == pytest.approx([closed] * 6, rel=1e-6)
    assert ema.average[1].flatten().tolist() == pytest.approx([-closed] * 2, rel=1e-6)


def test_decay_0_is_the_weights_themselves_and_the_swap_puts_them_back():
    model = _model(1.0)
    ema = WeightEMA(model, 0.0)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(1)
    assert torch.equal(ema.average[0], model.weight.detach())
    smooth = WeightEMA(model, 0.5)
    with torch.no_grad():
        model.weight.fill_(5.0)
    smooth.update(1)
    with smooth.swapped_in():
        assert torch.equal(model.weight, torch.full_like(model.weight, 4.0))
    assert torch.equal(model.weight, torch.full_like(model.weight, 5.0))


def test_only_what_trains_is_averaged_in_fp32():
    model = _model(1.0).to(torch.bfloat16)
    model.bias.requires_grad_(False)
    ema = WeightEMA(model, 0.99)
    assert ema.names == ["weight"] and ema.average[0].dtype == torch.float32


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_bad_decays_are_refused_in_one_line(decay):
    with pytest.raises(UserError, match="ema_decay must be at least 0 and below 1"):
        WeightEMA(_model(), decay)
