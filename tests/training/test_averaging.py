"""export.py --average_last N: the fp32 mean of a run's last checkpoints, written as a model directory."""
import shutil

import pytest
import torch
from safetensors.torch import load_file

import export
from conftest import assert_clear_error, cli, write_token_file
from csm.model import weights
from csm.system.errors import UserError
from csm.training import checkpoint, config, training


@pytest.fixture(scope="module")
def full_run(assets, tmp_path_factory):
    return _run(assets, tmp_path_factory.mktemp("averaging"))


def _run(assets, tmp_path, name="run", **overrides):
    data = write_token_file(tmp_path / "d.hdf5", n_train=8, n_val=2)
    cfg = config.make_config({"model": str(assets["model"]), "text_tokenizer": str(assets["text_tokenizer"]),
                              "mimi_weights": str(assets["mimi"]), "batch_size": 4, "learning_rate": 1e-3,
                              "warmup_steps": 1, "max_steps": 4, "val_every": 0, "save_every": 2, "gen_every": 0,
                              "wandb_mode": "disabled", "precision": "fp32", "seed": 0, **overrides})
    training.train(cfg, data, tmp_path / name, device="cpu", progress=False)
    return tmp_path / name


def test_the_average_of_two_checkpoints_is_their_mean_and_of_one_is_itself(full_run, hf_dir, tmp_path):
    run = full_run
    a, b = (torch.load(run / "checkpoints" / f"step_000000{s}.pt", weights_only=True)["model"] for s in (2, 4))
    assert export.main(["--model", str(run), "--average_last", "2", "--to", "official",
                        "--output", str(tmp_path / "avg")]) == 0
    avg = load_file(str(tmp_path / "avg" / "model.safetensors"))
    assert avg.keys() == a.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(avg[k], (a[k].float() + b[k].float()) / 2) for k in a)  # exactly, in fp32
    assert export.main(["--model", str(run), "--average_last", "1", "--to", "official",
                        "--output", str(tmp_path / "one")]) == 0
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert all(torch.equal(one[k], b[k]) for k in b)
    model = weights.load_model(tmp_path / "avg")  # what every other command reads
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in a.values())
    assert export.main(["--model", str(run), "--average_last", "2", "--to", "hf", "--output", str(tmp_path / "hf"),
                        "--codec", str(hf_dir)]) == 0  # the tokenizer: the run's own, from final/
    hf = weights.load_model(tmp_path / "hf", dtype=None)
    assert all(torch.equal(hf.state_dict()[k], avg[k]) for k in avg)


def test_a_lora_runs_averaged_adapters_are_merged_onto_its_base(assets, tmp_path):
    run = _run(assets, tmp_path, finetune="lora", lora_rank=4)
    assert export.main(["--model", str(run), "--average_last", "2", "--to", "official",
                        "--output", str(tmp_path / "avg")]) == 0
    avg, final = load_file(str(tmp_path / "avg" / "model.safetensors")), load_file(str(run / "final" /
                                                                                      "model.safetensors"))
    assert avg.keys() == final.keys()
    changed = [k for k in avg if not torch.equal(avg[k], final[k])]
    assert changed and all(("attn" in k or "mlp" in k) for k in changed)  # only what LoRA adapts differs


def test_checkpoints_of_other_settings_or_too_few_are_refused_in_one_line(assets, full_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    other = _run(assets, tmp_path, name="other", learning_rate=5e-4)
    shutil.copy(other / "checkpoints" / "step_0000004.pt", run / "checkpoints" / "step_0000006.pt")
    with pytest.raises(UserError, match=r"step_0000006.pt and step_0000004.pt differ in config "
                                        r"\(learning_rate 0.001 -> 0.0005\)"):
        checkpoint.average_checkpoints(run, 2)
    (run / "checkpoints" / "step_0000006.pt").unlink()
    rc, err = cli("export.py", "--model", run, "--average_last", "3", "--to", "official", "--output",
                  tmp_path / "x")
    assert_clear_error(rc, err, "holds 2 checkpoint(s)")
    for bad in ("0", "-1", "nan", "1e30"):
        rc, err = cli("export.py", "--model", run, "--average_last", bad, "--to", "official", "--output",
                      tmp_path / "x")
        assert rc == 2 and "Traceback" not in err, (bad, err)
    rc, err = cli("export.py", "--model", assets["model"], "--average_last", "2", "--to", "official", "--output",
                  tmp_path / "x")
    assert_clear_error(rc, err, "holds no checkpoints/ folder")
    assert not (tmp_path / "x").exists()
