"""Where a run came from: the code (ncppo's version, its git commit when it runs from a checkout), the
libraries that shape the numbers, and the machine. Written to the run's ``config.yaml`` under
``provenance`` (which :func:`ncppo.training.config.load_config` reads past)."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "diffusers", "peft", "accelerate", "transformers", "safetensors")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit(folder: str | Path | None = None) -> dict | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``folder`` (default: ncppo's source), or None when
    it is not in one (an installed wheel) or git is missing."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def provenance(device=None, num_processes: int = 1) -> dict:
    """The record of the code, libraries and machine a run trains on."""
    import ncppo

    machine = {"hostname": socket.gethostname(), "platform": platform.platform(), "python": sys.version.split()[0],
               "cpu_count": os.cpu_count(), "device": str(device) if device is not None else None,
               "num_processes": num_processes}
    try:
        import torch

        if torch.cuda.is_available():
            machine["gpu"] = torch.cuda.get_device_name(0)
            machine["gpu_count"] = torch.cuda.device_count()
    except ImportError:  # the record stays useful without torch
        pass
    return {"ncppo_version": ncppo.__version__, "git": git_commit(),
            "libraries": {name: _version(name) for name in LIBRARIES}, "machine": machine,
            "command": sys.argv, "cwd": os.getcwd(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
