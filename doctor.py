"""One screen about this machine, for setting up and for bug reports: Python, torch and its CUDA, the NVIDIA
driver and each GPU, the pinned packages and whether each imports, hub and W&B login, free disk space, and the
largest max_tokens the memory guide predicts per GPU.

    make doctor          (or: python doctor.py [--output_dir runs])

It never fails on a missing or broken part: that part's line says what is wrong. It prints no token or key,
only whether one is set, so its output can be pasted into an issue as it is.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

from csm.system.gpu_env import driver_advice, nvidia_driver

# torch, huggingface_hub and bench/memory.py are imported inside the functions that report on them, so that a
# missing or broken one is that line's finding, not a crash.

ROOT = Path(__file__).resolve().parent
MODES = ("full, AdamW", "full, 8-bit AdamW", "LoRA r=16, AdamW",  # the memory guide's rows
         "full, bf16 + stochastic rounding, 8-bit states, step in backward",
         "full, bf16 + stochastic rounding, 8-bit states, step in backward, text embeddings frozen")


def pins() -> list[tuple[str, str]]:
    """(distribution, version) of each pin in requirements.txt."""
    found = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            found.append((name.strip(), version.strip()))
    return found


def import_names() -> dict[str, str]:
    """{distribution (lower case): the top-level module it installs}."""
    modules = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            if not module.startswith("_"):
                modules.setdefault(dist.lower().replace("_", "-"), []).append(module)
    # torch also installs functorch and torchgen: the module named as the distribution is the one to try
    return {dist: next((m for m in found if m.lower() == dist.replace("-", "_")), sorted(found)[0])
            for dist, found in modules.items()}


def package_lines() -> list[str]:
    modules = import_names()
    ok, lines = 0, []
    for name, pinned in pins():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            lines.append(f"  {name}: NOT INSTALLED (requirements.txt pins {pinned})")
            continue
        module = modules.get(name.lower().replace("_", "-"))
        try:
            if module:
                importlib.import_module(module)
            imports = ""
        except Exception as e:  # noqa: BLE001 - a broken package is a finding, not a crash
            imports = f"; import {module} FAILS: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
        differs = "" if installed.split("+")[0] == pinned else f" (requirements.txt pins {pinned})"
        if differs or imports:
            lines.append(f"  {name} {installed}{differs}{imports}")
        else:
            ok += 1
    return [f"  {ok} of {len(pins())} pinned packages installed at their pins and importing"] + lines


def gpus() -> list[dict]:
    """Each visible GPU: name, memory in bytes, compute capability, bf16."""
    import torch  # see the note at the imports

    found = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        found.append({"name": props.name, "bytes": props.total_memory, "capability": (props.major, props.minor),
                      "bf16": props.major >= 8})
    return found


def max_tokens_lines(gpu_bytes: float) -> list[str]:
    """The largest max_tokens per finetune mode for a GPU of this size, from the memory guide's figures."""
    sys.path.append(str(ROOT / "bench"))
    import memory  # see the note at the imports

    guide = memory.read_guide((ROOT / "docs" / "training.md").read_text())
    if not guide:
        return ["    max_tokens: the memory guide (docs/training.md) is not here"]
    parts = []
    for label in MODES:
        fits = [memory.max_tokens(gpu_bytes, *guide[label + suffix]) for suffix in ("", ", checkpointing")]
        parts.append(f"{label} {f'{fits[0]:,}' if fits[0] else 'does not fit'}"
                     + (f" ({fits[1]:,} with activation checkpointing)" if fits[1] else ""))
    return ["    largest max_tokens (from the memory guide's figures; a planning estimate): " + "; ".join(parts)]


def torch_lines() -> list[str]:
    driver = nvidia_driver()
    lines = [f"  NVIDIA driver: {driver or 'none found (no /proc/driver/nvidia/version, no nvidia-smi)'}"]
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return [f"  torch: cannot be imported ({type(e).__name__}: {e})"] + lines
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines.insert(0, f"  torch {torch.__version__}, CUDA {torch.version.cuda or 'none (a CPU-only build)'}"
                    + (f", cuDNN {cudnn}" if cudnn else ""))
    if not torch.cuda.is_available():
        advice = driver_advice(driver, torch.__version__, torch.version.cuda)
        lines.append(f"  CUDA: unusable: {advice}" if advice else "  CUDA: no GPU (training runs on the CPU)")
        return lines
    for i, gpu in enumerate(gpus()):
        lines.append(f"  GPU {i}: {gpu['name']}, {gpu['bytes'] / 2**30:.1f} GiB, compute capability "
                     f"{gpu['capability'][0]}.{gpu['capability'][1]}, bf16: {'yes' if gpu['bf16'] else 'no (fp16)'}")
        lines += max_tokens_lines(gpu["bytes"])
    return lines


def login_lines() -> list[str]:
    lines = []
    try:
        from huggingface_hub import constants, get_token

        where = "the HF_TOKEN variable" if os.environ.get("HF_TOKEN") else f"{constants.HF_TOKEN_PATH}"
        lines.append(f"  hub: {'a token is set (from ' + where + ')' if get_token() else 'no token (hf auth login)'}"
                     + (", HF_HUB_OFFLINE is on" if constants.HF_HUB_OFFLINE else ""))
    except Exception as e:  # noqa: BLE001
        lines.append(f"  hub: cannot be read ({type(e).__name__}: {e})")
    netrc = Path.home() / ".netrc"
    in_netrc = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    wandb = bool(os.environ.get("WANDB_API_KEY")) or in_netrc
    lines.append(f"  W&B: {'a key is set' if wandb else 'no key (wandb_mode offline and disabled need none)'}")
    return lines


def read_env_file() -> list[str] | None:
    """The working directory's .env read as every command reads it (None when it could not be)."""
    try:
        from utils import load_env_file  # imports torch: see the note at the imports
    except Exception:  # noqa: BLE001 - a broken torch is reported in its own section
        return None
    try:
        return load_env_file()
    except Exception:  # noqa: BLE001
        return None


def env_file_line(given: list[str] | None) -> str:
    """What the working directory's .env gave (the names, never the values)."""
    path = Path.cwd() / ".env"
    if not path.is_file():
        return f"  .env: none in {Path.cwd()} (optional: cp .env.example .env)"
    if given is None:
        return f"  .env: {path} was not read (python-dotenv missing, or the file is not a .env file)"
    return f"  .env: {path} read; it set {', '.join(given) if given else 'nothing not already set'}"


def disk_lines(output_dir: Path) -> list[str]:
    lines = []
    try:
        from huggingface_hub import constants

        cache = Path(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001
        cache = Path.home() / ".cache" / "huggingface" / "hub"
    for label, path in (("hub cache", cache), ("output", output_dir)):
        where = path.absolute()
        while not where.exists() and where != where.parent:
            where = where.parent
        free = shutil.disk_usage(where).free
        lines.append(f"  {label} {path}: {free / 2**30:.1f} GiB free")
    return lines


def section(title: str, make) -> list[str]:
    try:
        return [title] + make()
    except Exception as e:  # noqa: BLE001 - a part that cannot be read is reported, never fatal
        return [title, f"  could not be read: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", default=".", help="where runs will be written (for its free space)")
    args = p.parse_args(argv)
    given = read_env_file()  # as every command reads it, so the logins below are what a run would see
    t0 = time.time()
    lines = [f"csm-train doctor, {time.strftime('%Y-%m-%d')}",
             f"  Python {platform.python_version()} ({sys.executable}), {platform.system()} {platform.machine()}, "
             f"{os.cpu_count()} CPUs"]
    lines += section("torch, CUDA and GPUs", torch_lines)
    lines += section("packages (requirements.txt)", package_lines)
    lines += section("logins (whether set; never their values)", lambda: [env_file_line(given), *login_lines()])
    lines += section("disk", lambda: disk_lines(Path(args.output_dir)))
    print("\n".join(lines) + f"\n({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
