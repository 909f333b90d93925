"""Ulysses context parallelism with PASA on CPU: two gloo ranks run benchmarks/ulysses_check.py.

The smoke configuration (tiny Wan, 4 heads, 120 tokens) checks on CPU what the GPU run checks at
size: the Ulysses output equals the one-process output, and every rank routes its global heads
exactly as one process does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_ulysses_two_ranks_match_one(tmp_path: Path) -> None:
    out = tmp_path / "ulysses.json"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free rendezvous port: no clash with other torchrun jobs
        "--nproc_per_node",
        "2",
        str(ROOT / "benchmarks" / "ulysses_check.py"),
        "--smoke",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["passed"] and all(result["checks"].values())
    assert result["plan_agreement_with_one_gpu"] == 1.0
    assert all(0.0 < r[0] < 1.0 for r in result["realised_density_per_rank"])  # sparse ran
