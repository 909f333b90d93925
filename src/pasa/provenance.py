"""Where a result came from: the git commit and the GPU driver, for results JSON.

The GPU machines get a copy of the working tree without ``.git``; there ``PASA_COMMIT`` names the
commit the copy was made from.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit() -> str:
    """``PASA_COMMIT`` when set, else the HEAD of the repository this file lives in."""
    if os.environ.get("PASA_COMMIT"):
        return os.environ["PASA_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (set PASA_COMMIT)"


def nvidia_driver() -> str | None:
    """The NVIDIA driver version of the first GPU, or None without nvidia-smi."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None
