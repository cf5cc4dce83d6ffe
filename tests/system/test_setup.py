"""Set-up on the GPU machines people have: the CUDA variant make setup installs, why CUDA is unusable (said
in one line, never a silent CPU run of a large model), and make doctor. The probes are simulated: no test
needs a GPU or a driver."""
import os
import subprocess
import sys

import pytest
import torch

from csm.system import gpu_env
from csm.system import runtime
from csm.system.errors import UserError
from conftest import ROOT


def _dry_setup(tmp_path, *variables):
    return subprocess.run(["make", "-n", "setup", f"VENV={tmp_path / 'venv'}", *variables], cwd=ROOT,
                          capture_output=True, text=True)


def test_make_setup_installs_the_chosen_cuda_variant_and_keeps_every_other_pin(tmp_path):
    pins = {line.split("==")[0]: line for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line}
    for variant in ("cu126", "cu128", "cpu"):
        dry = _dry_setup(tmp_path, f"TORCH_CUDA={variant}").stdout
        index = f"https://download.pytorch.org/whl/{variant}"
        torch_line = f"pip install --index-url {index} {pins['torch']} {pins['torchaudio']}"
        assert torch_line in dry, dry
        assert "pip install -r requirements.txt" in dry.split(torch_line)[1]  # the rest, at their pins, after it
        assert f"echo \"{variant}\" > {tmp_path / 'venv'}/torch_cuda" in dry  # kept for later make runs
    default = _dry_setup(tmp_path).stdout
    assert "--index-url" not in default and "pip install -r requirements.txt" in default  # the registry's build
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / "torch_cuda").write_text("cu128\n")  # a venv set up with TORCH_CUDA=cu128 keeps it
    assert "/whl/cu128" in _dry_setup(tmp_path).stdout
    bad = _dry_setup(tmp_path, "TORCH_CUDA=cu999")
    assert bad.returncode != 0 and "TORCH_CUDA=cu999 is not one of: cu126 cu128 cu130 cpu" in bad.stderr


@pytest.mark.parametrize("driver,torch_cuda,visible,expected", [
    ("535.154.05", "13.0", None, "NVIDIA driver 535.154.05 is too old for this torch's CUDA 13.0 (it needs R580 or "
                                 "newer): make setup TORCH_CUDA=cu128 installs a build for it, or update the driver"),
    ("470.82.01", "13.0", None, "update the driver to R525 or newer"),
    ("580.65.06", None, None, "CPU-only build, and NVIDIA driver 580.65.06 is installed: make setup TORCH_CUDA=cu130"),
    ("580.65.06", "13.0", "", "CUDA_VISIBLE_DEVICES='' hides every GPU"),
    ("580.65.06", "13.0", "0", "sees no GPU: check `nvidia-smi`"),
])
def test_why_cuda_is_unusable(monkeypatch, driver, torch_cuda, visible, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert expected in gpu_env.driver_advice(driver, "2.11.0", torch_cuda)
    assert gpu_env.driver_advice(None, "2.11.0", torch_cuda) is None  # no NVIDIA driver: nothing to say


def test_the_driver_is_read_from_the_kernel_module(tmp_path, monkeypatch):
    version = tmp_path / "version"
    version.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.133.20  "
                       "Release Build  (dvs-builder)\n")
    monkeypatch.setattr(gpu_env, "DRIVER_FILE", version)
    assert gpu_env.nvidia_driver() == "570.133.20"
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.154.05  Thu Dec 28 15:37:48 UTC 2023\n")
    assert gpu_env.nvidia_driver() == "535.154.05"


@pytest.fixture
def old_driver(monkeypatch):
    """A GPU machine whose driver (R535) is too old for this torch's CUDA 13: CUDA is unusable."""
    monkeypatch.setattr(runtime, "nvidia_driver", lambda: "535.154.05")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(runtime, "_warned_cpu", False)


def test_an_automatic_cpu_on_a_gpu_machine_says_why_once(old_driver, capsys):
    assert runtime.resolve_device("auto") == torch.device("cpu")
    assert runtime.resolve_device(None) == torch.device("cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: CUDA is unusable, so this runs on the CPU: NVIDIA driver 535.154.05 is too old for this "
                   "torch's CUDA 13.0 (it needs R580 or newer): make setup TORCH_CUDA=cu128 installs a build for it, "
                   "or update the driver"]
    with pytest.raises(UserError, match="--device cuda asked for CUDA, but NVIDIA driver 535.154.05 is too old"):
        runtime.resolve_device("cuda")


def _big_model(tmp_path):
    """A directory with CSM-1B's config.json and no weights: its size is known without reading any."""
    import json

    from csm.model.csm_model import ModelArgs
    from dataclasses import asdict

    model = tmp_path / "csm-1b"
    model.mkdir()
    args = asdict(ModelArgs())
    (model / "config.json").write_text(json.dumps({k: args[k] for k in ("backbone_flavor", "decoder_flavor",
                                                                         "text_vocab_size", "audio_vocab_size",
                                                                         "audio_num_codebooks")}))
    return model


def test_a_large_model_is_not_trained_on_an_automatic_cpu(old_driver, tmp_path, assets, capsys):
    import train
    from conftest import write_token_file

    data = write_token_file(tmp_path / "d.hdf5", n_train=4, n_val=0)
    model = _big_model(tmp_path)
    argv = ["--data", str(data), "--model", str(model), "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
            "--wandb_mode", "disabled", "--text_tokenizer", str(assets["text_tokenizer"]),
            "--set", "warmup_steps=0", "--set", "gen_every=0", "--set", "eval_every=0"]
    with pytest.raises(UserError, match=r"not training a 1,\d{3}M-parameter model on the CPU, which was chosen "
                                              r"because CUDA is unusable \(NVIDIA driver 535.154.05 is too old.*pass "
                                              r"--device cpu to train on the CPU anyway"):
        train.main(argv)
    assert not (tmp_path / "run").exists()
    # Asked for by name, the CPU is used: the run goes on to read the weights (this directory has none).
    with pytest.raises(UserError, match="has no model.safetensors"):
        train.main([*argv, "--device", "cpu"])
    # A small model is trained on an automatic CPU, with the one-line warning.
    assert train.main([*argv[:3], str(assets["model"]), *argv[4:]]) == 0
    assert "warning: CUDA is unusable, so this runs on the CPU" in capsys.readouterr().err


def test_a_sweep_refuses_a_large_model_on_an_automatic_cpu(old_driver, tmp_path):
    import sweep
    from conftest import write_token_file

    data = write_token_file(tmp_path / "d.hdf5", n_train=4, n_val=2)
    argv = ["--data", str(data), "--model", str(_big_model(tmp_path)), "--output_dir", str(tmp_path / "s"),
            "--n_trials", "1", "--max_steps", "8", "--wandb_mode", "disabled", "--set", "warmup_steps=1",
            "--sweep_config", str(ROOT / "configs" / "sweep_demo.yaml")]
    with pytest.raises(UserError, match="not training a 1,.*pass --device cpu"):
        sweep.main(argv)
    with pytest.raises(UserError, match="--device cuda, but NVIDIA driver 535.154.05 is too old"):
        sweep.main([*argv, "--device", "cuda"])
    with pytest.raises(UserError, match="--device cpu and --n_gpus 2 contradict"):
        sweep.main([*argv, "--device", "cpu", "--n_gpus", "2"])
    assert not (tmp_path / "s").exists()


def test_doctor_reports_every_part_and_no_secret(tmp_path, monkeypatch, capsys):
    """make doctor runs doctor.py (with .venv's Python when there is one); doctor.main is run here in this process,
    which has imported most packages already (a fresh process takes seconds to import them all)."""
    import doctor

    dry = subprocess.run(["make", "-n", "doctor"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert any(line.endswith("doctor.py") for line in dry.splitlines())
    monkeypatch.setenv("HF_TOKEN", "hf_doctorsecret123")
    monkeypatch.setenv("WANDB_API_KEY", "wandbdoctorsecret456")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert doctor.main([]) == 0
    captured = capsys.readouterr()
    out = captured.out
    for part in ("Python 3.", "torch 2.11.0", "NVIDIA driver:", "pinned packages installed at their pins and importing",
                 "hub: a token is set (from the HF_TOKEN variable)", "W&B: a key is set", "hub cache", "GiB free"):
        assert part in out, part
    assert "doctorsecret" not in out + captured.err


def test_doctor_never_fails_on_a_missing_part(tmp_path):
    """torch that cannot be imported, and a pinned package that is not installed: lines that say so, exit 0."""
    script = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, '.'); import doctor; "
              "real = doctor.pins; doctor.pins = lambda: real() + [('nosuchpackage', '1.0')]; sys.exit(doctor.main())")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "torch: cannot be imported" in proc.stdout and "NVIDIA driver:" in proc.stdout
    assert "nosuchpackage: NOT INSTALLED (requirements.txt pins 1.0)" in proc.stdout
    assert "import torch FAILS" in proc.stdout and "import peft FAILS" in proc.stdout  # peft needs torch


def test_doctor_gives_the_memory_guides_max_tokens_for_each_gpu(monkeypatch):
    """A simulated 80 GB GPU gets about the memory guide's 80 GB column (the guide prints its figures rounded)."""
    import doctor

    import memory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: False)  # its version asks the (absent) GPUs
    monkeypatch.setattr(doctor, "gpus", lambda: [{"name": "Simulated GPU", "bytes": 80e9, "capability": (9, 0),
                                                  "bf16": True}])
    lines = doctor.torch_lines()
    assert "  GPU 0: Simulated GPU, 74.5 GiB, compute capability 9.0, bf16: yes" in lines
    text = (ROOT / "docs" / "training.md").read_text()
    table = text.split(memory.PAGE_MARKERS[0])[1].split(memory.PAGE_MARKERS[1])[0]
    readme = {row.split("|")[1].strip(): int(row.split("|")[-2].strip().replace(",", ""))
              for row in table.strip().splitlines()[2:] if "does not fit" not in row.split("|")[-2]}
    guide = next(line for line in lines if "largest max_tokens" in line)
    for label, value in readme.items():
        base, checkpointing = label.removesuffix(", checkpointing"), label.endswith("checkpointing")
        part = guide.split(base + " ")[1].split(";")[0]
        shown = int((part.split("(")[1] if checkpointing else part).split()[0].replace(",", ""))
        assert abs(shown - value) <= 0.03 * value, (label, shown, value)


def test_generate_on_an_automatic_cpu_says_why_and_goes_on(old_driver, assets, tmp_path, capsys):
    import generate

    assert generate.main(["--model", str(assets["model"]), "--text", "Hi.", "--output", str(tmp_path / "a.wav"),
                          "--max_audio_seconds", "0.3", "--text_tokenizer", str(assets["text_tokenizer"]),
                          "--mimi_weights", str(assets["mimi"])]) == 0
    assert "warning: CUDA is unusable, so this runs on the CPU: NVIDIA driver 535.154.05" in capsys.readouterr().err


COMMANDS = ("train", "sweep", "prepare", "pretokenize", "generate", "evaluate", "prefer", "export", "demo")


def test_every_command_reads_the_env_file_of_its_working_directory(tmp_path, monkeypatch, capsys):
    """.env was read by train.py and sweep.py alone, and from beside the code (python-dotenv's search starts at the
    calling file). Every command's entry point is run_cli, which reads ./.env first: a .env that cannot be read is
    one line and exit 2 from any command, and one that can sets what the shell has not set, never overriding."""
    import importlib

    import utils

    for name in COMMANDS:
        assert (ROOT / f"{name}.py").read_text().rstrip().endswith("run_cli(main)"), name
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_bytes(b"WANDB_API_KEY=\xff\xfe broken\n")
    for name in COMMANDS:
        main = importlib.import_module(name).main
        with pytest.raises(SystemExit) as e:
            utils.run_cli(lambda: main(["--help"]))
        assert e.value.code == 2 and "error: " in capsys.readouterr().err, name
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HF_TOKEN", "from-the-shell")
    (tmp_path / ".env").write_text("\ufeffWANDB_API_KEY=fromdotenv789\nHF_TOKEN=fromdotenv000\nEMPTY=\n")
    assert utils.load_env_file() == ["WANDB_API_KEY"]
    assert os.environ["WANDB_API_KEY"] == "fromdotenv789" and os.environ["HF_TOKEN"] == "from-the-shell"
    monkeypatch.delenv("WANDB_API_KEY")


def test_doctor_says_what_the_env_file_set_without_its_values(tmp_path, monkeypatch, capsys):
    import doctor

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert doctor.main([]) == 0
    assert ".env: none in" in capsys.readouterr().out
    (tmp_path / ".env").write_text("WANDB_API_KEY=doctorenvsecret\n")
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    assert f".env: {tmp_path / '.env'} read; it set WANDB_API_KEY" in out and "W&B: a key is set" in out
    assert "doctorenvsecret" not in out
    monkeypatch.delenv("WANDB_API_KEY")
