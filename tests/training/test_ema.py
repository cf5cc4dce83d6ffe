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


# --------------------------------------------------------------------------- in training


def _cfg(assets, **overrides):
    from csm.training import config

    return config.make_config({"model": str(assets["model"]), "text_tokenizer": str(assets["text_tokenizer"]),
                               "mimi_weights": str(assets["mimi"]), "batch_size": 3, "learning_rate": 1e-3,
                               "warmup_steps": 1, "max_steps": 6, "val_every": 2, "save_every": 3, "gen_every": 0,
                               "log_every": 1, "wandb_mode": "disabled", "precision": "fp32", "seed": 0,
                               "ema_decay": 0.8, "ema_start": 1, **overrides})


def _metrics(out):
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", [{}, {"finetune": "lora", "lora_rank": 4}, {"freeze": ["backbone"]}],
                         ids=["full", "lora", "frozen"])
def test_a_run_with_an_average_writes_best_ema_and_final_ema_and_resumes_bitwise(assets, tmp_path, mode):
    """best_ema/ and final_ema/ beside best/ and final/, in the same layout (a LoRA run's merged, its adapter
    beside); the average's val_loss logged; killed after step 3 and resumed, final_ema/ equals the unbroken run's
    bit for bit (the average is in every checkpoint)."""
    import shutil

    from safetensors.torch import load_file

    from conftest import write_token_file
    from csm.model import weights
    from csm.training import training

    data = write_token_file(tmp_path / "d.hdf5", n_train=10, n_val=3)
    cfg = _cfg(assets, **mode)
    full, part = tmp_path / "full", tmp_path / "part"
    pages = []  # after each validation the run's page is already rewritten, to that step
    page = full / "report.html"
    training.train(cfg, data, full, device="cpu", progress=False,
                   on_eval=lambda step, _: pages.append(f"<td class=last>{step}<" in page.read_text()))
    assert pages == [True, True, True]
    for name in ("best", "final", "best_ema", "final_ema"):
        assert (full / name / "model.safetensors").is_file(), name
        weights.load_model(full / name)  # what every command reads
    if "finetune" in mode:
        assert (full / "final_ema_adapter" / "adapter_model.safetensors").is_file()
    final, averaged = (load_file(str(full / n / "model.safetensors")) for n in ("final", "final_ema"))
    assert any(not torch.equal(final[k], averaged[k]) for k in final)
    logged = _metrics(full)
    assert [m["step"] for m in logged if "ema_val_loss" in m] == [2, 4, 6]
    # The run's page, rewritten at the end: which step each of best/ and best_ema/ holds, the average dashed.
    from csm.training.report import is_our_page

    page = (full / "report.html").read_text()
    assert is_our_page(full / "report.html") and "best/ holds step" in page and "best_ema/ holds step" in page
    assert '"name": "full (average)"' in page

    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step_0000003.pt", part / "checkpoints" / "step_0000003.pt")
    (part / "metrics.jsonl").write_text("".join(__import__("json").dumps(m) + "\n" for m in logged if m["step"] <= 3))
    training.train(cfg, data, part, device="cpu", resume="auto", progress=False)
    again = load_file(str(part / "final_ema" / "model.safetensors"))
    assert all(torch.equal(averaged[k], again[k]) for k in averaged)


@pytest.mark.parametrize("on_cpu", [False, True], ids=["beside", "ema_on_cpu"])
def test_the_average_of_a_run_is_the_closed_form_of_its_steps(assets, tmp_path, on_cpu):
    """With decay d from step 1 on, final_ema/ is d^(n-1) w_1 + (1 - d) sum_{i=2..n} d^(n-i) w_i over the weights
    after each step (read from a checkpoint saved after every step); kept in CPU memory (ema_on_cpu) too. (On a GPU
    that moves it off the device: the GPU check's ema row.)"""
    from safetensors.torch import load_file

    from conftest import write_token_file
    from csm.training import training

    data = write_token_file(tmp_path / "d.hdf5", n_train=6, n_val=2)
    n, d = 4, 0.7
    training.train(_cfg(assets, max_steps=n, save_every=1, keep_checkpoints=n, ema_decay=d, val_every=0,
                        ema_on_cpu=on_cpu), data,
                   tmp_path / "run", device="cpu", progress=False)
    steps = [torch.load(tmp_path / "run" / "checkpoints" / f"step_000000{i}.pt", weights_only=True)["model"]
             for i in range(1, n + 1)]
    averaged = load_file(str(tmp_path / "run" / "final_ema" / "model.safetensors"))
    for k in averaged:
        closed = d ** (n - 1) * steps[0][k] + (1 - d) * sum(d ** (n - i) * steps[i - 1][k] for i in range(2, n + 1))
        torch.testing.assert_close(averaged[k], closed, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("values, message", [
    ({"ema_decay": 1.0}, "ema_decay must be at least 0 and below 1"),
    ({"ema_decay": float("nan")}, "ema_decay"),
    ({"ema_decay": -0.5}, "ema_decay"),
    ({"ema_start": -1}, "ema_start"),
])
def test_bad_settings_of_the_average_are_refused_in_one_line(values, message):
    from csm.training import config

    with pytest.raises(UserError, match=message):
        config.make_config({"wandb_mode": "disabled", **values})


def test_the_average_of_bf16_weights_is_kept_in_fp32_with_the_12gb_recipe(assets, tmp_path):
    """With bf16 weights, the step in backward and 8-bit states, the average still trains along and is written
    (cast to the weights' bf16 in final_ema/)."""
    from safetensors.torch import load_file

    from conftest import write_token_file
    from csm.training import training

    data = write_token_file(tmp_path / "d.hdf5", n_train=6, n_val=2)
    cfg = _cfg(assets, max_steps=3, val_every=3, save_every=0, precision="bf16", weight_dtype="bf16",
               optimizer_states="8bit", optimizer_in_backward=True, max_grad_norm=0.0, ema_start=0)
    run = training.train(cfg, data, tmp_path / "run", device="cpu", progress=False)
    averaged = load_file(str(tmp_path / "run" / "final_ema" / "model.safetensors"))
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert {v.dtype for v in averaged.values()} == {torch.bfloat16} and run.step == 3
    assert any(not torch.equal(final[k], averaged[k]) for k in final)
