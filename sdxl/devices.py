"""Which ``--device`` values this machine can run, decided without initialising CUDA.

The parent process checks ``--device`` before any model loads. It must not initialise CUDA to do
so: a process that has (``torch.cuda.get_device_name``, a CUDA tensor) cannot use CUDA in the
children it forks ("Cannot re-initialize CUDA in forked subprocess"). torch's NVML-based check
(``PYTORCH_NVML_BASED_CUDA_CHECK=1``) counts devices without creating a CUDA context.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from .errors import UserError

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def cuda_device_count() -> int:
    """Visible CUDA devices, counted through NVML (fork-safe); 0 on a machine without a driver."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(device: str) -> None:
    """``cpu``, ``cuda`` or ``cuda:N`` that exists here; otherwise one line saying what does."""
    match = _DEVICE.match(device)
    if not match or (match.group(1) == "cpu" and match.group(2) is not None):
        raise UserError(f"--device {device}: use cpu, cuda or cuda:N")
    if match.group(1) == "cuda":
        count = cuda_device_count()
        index = int(match.group(2) or 0)
        if count == 0:
            raise UserError(f"--device {device}: no CUDA device on this machine (torch sees none); use --device cpu")
        if index >= count:
            raise UserError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")


def gpus() -> list[dict[str, str]]:
    """Each GPU's ``name`` and ``memory`` (e.g. ``81559 MiB``) from ``nvidia-smi``, without a CUDA context in
    this process; empty when there is none."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [[part.strip() for part in line.rsplit(",", 1)] for line in out.splitlines() if line.strip()]
    return [{"name": row[0], "memory": row[1] if len(row) > 1 else ""} for row in rows]
