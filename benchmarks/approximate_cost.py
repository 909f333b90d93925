"""What do the approximate branches cost on real video shapes, beside the sparse call itself?

On one GPU, random bf16 tensors of each scenario of ``attention.py``: PASA's whole
``sparse_attention`` at a density (estimate, routing, kernel) without an approximate branch, with
group means, with the Taylor tail, the grouped Taylor tail and the principal tail, and each branch
alone on the same plan and kernel output.
Results: JSON under ``benchmarks/results/``.

    PYTHONPATH=src python benchmarks/approximate_cost.py --out benchmarks/results/approximate-cost-h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _diffusers_common import git_commit, write_json
from attention import SCENARIOS, cuda_time_ms, environment

import pasa
from pasa.approximate import (
    add_approximate_branch,
    add_grouped_taylor_branch,
    add_principal_branch,
    add_taylor_branch,
)
from pasa.backends.registry import get_backend


def measure(name: str, args: argparse.Namespace) -> dict:
    """One scenario's row: whole calls with each branch, the branches alone, the Taylor tail's
    extra memory."""
    sc = SCENARIOS[name]
    seq = sc.grid[0] * sc.grid[1] * sc.grid[2] + sc.text_tokens
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(sc.batch, seq, sc.heads, sc.head_dim, device="cuda", generator=gen).to(
            torch.bfloat16
        )
        for _ in range(3)
    )
    base = pasa.PASAConfig(density=args.density, backend=args.backend)
    row = {"scenario": name, "tokens": seq, "heads": sc.heads, "density": args.density}

    def timed(fn) -> float:
        return round(cuda_time_ms(fn, warmup=args.warmup, reps=args.reps), 3)

    labels = ("none", "group_means", "taylor", "grouped_taylor", "principal")
    for label, approx in zip(labels, (False, *labels[1:]), strict=True):
        config = base.replace(approximate=approx)
        row[f"sparse_attention_{label}_ms"] = timed(
            lambda config=config: pasa.sparse_attention(
                q, k, v, grid=sc.grid, config=config, num_text_tokens=sc.text_tokens
            )
        )
    # The branches alone, on one plan and one kernel output in tiled order.
    layout = pasa.make_layout(
        sc.grid, block_size=base.block_size, num_text_tokens=sc.text_tokens, device=q.device
    )
    qt, kt, vt = layout.to_blocks(q), layout.to_blocks(k), layout.to_blocks(v)
    _, plan = pasa.sparse_attention(
        qt, kt, vt, grid=sc.grid, config=base, tiled=True, num_text_tokens=sc.text_tokens,
        return_plan=True,
    )  # fmt: skip
    out, lse = get_backend(args.backend, q.device).fn(qt, kt, vt, plan)
    row["group_means_branch_ms"] = timed(
        lambda: add_approximate_branch(qt, kt, vt, plan, out, lse, group_size=base.group_size)
    )
    row["taylor_branch_ms"] = timed(
        lambda: add_taylor_branch(qt, kt, vt, plan, out, lse, kernel=False)
    )
    row["grouped_taylor_branch_ms"] = timed(
        lambda: add_grouped_taylor_branch(qt, kt, vt, plan, out, lse, group_size=base.group_size)
    )
    row["principal_branch_ms"] = timed(
        lambda: add_principal_branch(
            qt, kt, vt, plan, out, lse, group_size=base.group_size, kernel=False
        )
    )
    try:  # the principal tail's Triton kernel (the default on CUDA)
        row["principal_branch_kernel_ms"] = timed(
            lambda: add_principal_branch(
                qt, kt, vt, plan, out, lse, group_size=base.group_size, kernel=True
            )
        )
    except Exception as exc:
        row["principal_branch_kernel_error"] = repr(exc)[:300]
    try:  # the Triton per-query kernel (the default on CUDA for half-precision inputs)
        row["taylor_branch_kernel_ms"] = timed(
            lambda: add_taylor_branch(qt, kt, vt, plan, out, lse, kernel=True)
        )
    except Exception as exc:  # recorded, so the other rows still come back
        row["taylor_branch_kernel_error"] = repr(exc)[:300]
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    add_taylor_branch(qt, kt, vt, plan, out, lse)
    row["taylor_extra_memory_gib"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 3)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--backend", default="flex", choices=["flex", "fa4"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("approximate_cost.py times CUDA kernels: run it on a GPU machine")
    rows = []
    for name in args.scenarios:
        rows.append(measure(name, args))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    report = {
        "benchmark": "approximate_cost",
        "environment": environment(),
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
        "settings": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    if args.out:
        write_json(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
