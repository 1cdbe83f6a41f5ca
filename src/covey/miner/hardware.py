"""What this machine has, as reported in the miner's hello."""

from __future__ import annotations

import os
import shutil
import subprocess

import psutil

from covey.protocol import Hardware


def detect_gpus() -> tuple[str, ...]:
    """Names of NVIDIA GPUs from ``nvidia-smi``; empty when there is none or it fails."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return ()
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(line.strip() for line in out.splitlines() if line.strip())


def detect_hardware() -> Hardware:
    """CPU count, total RAM (bytes) and GPUs of this machine."""
    return Hardware(
        cpu_count=os.cpu_count() or 1,
        ram_bytes=psutil.virtual_memory().total,
        gpus=detect_gpus(),
    )
