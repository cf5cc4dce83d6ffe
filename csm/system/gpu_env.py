"""The NVIDIA driver of this machine and what it means for PyTorch's CUDA builds, without importing torch
(doctor.py reports it on machines whose torch is broken or missing).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

# The oldest NVIDIA driver series each CUDA major version runs on (NVIDIA's minor-version compatibility), and
# PyTorch's CUDA variants (make setup TORCH_CUDA=...), newest first, with the series each needs.
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
TORCH_VARIANTS = (("cu130", 580), ("cu128", 525), ("cu126", 525))
DRIVER_FILE = Path("/proc/driver/nvidia/version")


def nvidia_driver() -> str | None:
    """The version of this machine's NVIDIA driver (its kernel module, else nvidia-smi); None without one."""
    try:
        found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", DRIVER_FILE.read_text())
        if found:
            return found.group(1)
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        version = out.stdout.split()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        version = None
    return version or "unknown (nvidia-smi is there but did not answer)"


def driver_series(driver: str) -> int | None:
    return int(driver.split(".")[0]) if driver[:1].isdigit() else None


def fitting_variants(driver: str) -> list[str]:
    """PyTorch's CUDA variants this driver runs, newest first."""
    series = driver_series(driver)
    return [name for name, need in TORCH_VARIANTS if series is not None and series >= need]


def driver_advice(driver: str | None, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why a torch of this version and CUDA cannot use the GPUs of a machine with this NVIDIA driver, with the
    fix, in one line; None without a driver (no NVIDIA GPU here)."""
    if driver is None:
        return None
    fits = fitting_variants(driver)
    if torch_cuda is None:
        return (f"this torch {torch_version} is a CPU-only build, and NVIDIA driver {driver} is installed: "
                f"make setup TORCH_CUDA={fits[0] if fits else 'cu126'} installs a CUDA build")
    need, series = MIN_DRIVER.get(int(torch_cuda.split(".")[0])), driver_series(driver)
    if need is not None and series is not None and series < need:
        fix = (f"make setup TORCH_CUDA={fits[0]} installs a build for it, or update the driver" if fits else
               f"update the driver to R{TORCH_VARIANTS[-1][1]} or newer")
        return (f"NVIDIA driver {driver} is too old for this torch's CUDA {torch_cuda} (it needs R{need} or newer): "
                f"{fix}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU (NVIDIA driver {driver}, torch CUDA {torch_cuda})"
    return (f"NVIDIA driver {driver} is installed, but torch {torch_version} (CUDA {torch_cuda}) sees no GPU: check "
            "`nvidia-smi`, CUDA_VISIBLE_DEVICES, and that a container was given the GPUs (docker run --gpus all)")
