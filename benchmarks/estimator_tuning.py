"""Launch-shape sweep of PASA's estimate path on one GPU: pooling, fused estimate, top-k routing.

Times every candidate launch of the three Triton kernels that run before the attention kernel, at
one scenario of benchmarks/attention.py, in one process, and checks each candidate's output against
the current default (pool: max abs difference to torch's reduction; estimate: routing scores and
the top-k plan they give; route: identical plans). The defaults in pasa/kernels/ are set from this.

    cd benchmarks && PYTHONPATH=../src python estimator_tuning.py --scenario wan14b-720p \\
        --out results/estimator-tuning-h100.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _diffusers_common import git_commit, write_json
from attention import SCENARIOS, cuda_time_ms, environment

import pasa
from pasa.estimate import group_pool
from pasa.eval.metrics import plan_jaccard
from pasa.kernels.estimate_triton import grouped_block_estimate, noise_key
from pasa.kernels.permute import group_means
from pasa.kernels.route_triton import _bounds, topk_plan
from pasa.layout import make_layout
from pasa.plan import BlockPlan
from pasa.route import _MASS_FLOOR


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="wan14b-720p", choices=sorted(SCENARIOS))
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    sc = SCENARIOS[args.scenario]
    torch.manual_seed(0)
    seq = sc.grid[0] * sc.grid[1] * sc.grid[2] + sc.text_tokens
    shape = (sc.batch, seq, sc.heads, sc.head_dim)
    q, k = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    config = pasa.PASAConfig(density=args.density)
    layout = make_layout(sc.grid, num_text_tokens=sc.text_tokens, device="cuda")
    n = layout.num_blocks
    t_ms = lambda fn: cuda_time_ms(fn, warmup=3, reps=args.reps)  # noqa: E731
    out: dict = {
        "benchmark": "estimator_tuning",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "env": environment(),
        "commit": git_commit(),
        "scenario": args.scenario,
        "density": args.density,
        "group_size": config.group_size,
    }

    def report(section, entry):
        out.setdefault(section, []).append(entry)
        print(section, json.dumps(entry), flush=True)

    # Pooling.
    g = config.group_size
    ref_q = group_pool(q, g)[0]
    report(
        "pool",
        {"variant": "torch", "ms": round(t_ms(lambda: (group_pool(q, g), group_pool(k, g))), 4)},
    )
    for heads, warps in itertools.product((2, 4, 8, 16), (1, 2, 4, 8)):
        if heads * sc.head_dim < 32 * warps:
            continue
        kw = dict(heads_per_program=heads, num_warps=warps)
        try:
            qg, _ = group_means(q, k, g, **kw)
            err = float((qg - ref_q).abs().max())
            ms = t_ms(lambda kw=kw: group_means(q, k, g, **kw))
        except Exception as e:  # a launch that does not compile or fit is a result, not a crash
            report("pool", {"variant": kw, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        report("pool", {"variant": kw, "ms": round(ms, 4), "max_abs_err_vs_torch": err})

    # Fused estimate with routing keys, as kernels/pipeline.plan_from_means runs it.
    qg, kg = group_means(q, k, g)
    routing = {
        "first_text_block": layout.first_text_block,
        "noise_key": noise_key(config.seed, 7, 3),
        "head_offset": 0,
        "temperature": float(config.temperature),
        "mass_floor": _MASS_FLOOR,
    }
    common = dict(
        seq_len=layout.seq_len,
        block_size=config.block_size,
        group_size=g,
        routing=routing,
        need_share=False,
    )
    lo, hi, *_ = _bounds(layout, 0, 1.0, config.min_blocks, config.max_blocks, "cuda")
    count = round(args.density * n)
    # The launch before this sweep: the reference every candidate is held to.
    base_kw = dict(presplit=False, rows=64, key_blocks=16, num_warps=4, num_stages=2)
    _, ref_scores = grouped_block_estimate(qg, kg, **common, **base_kw)
    ref_plan = BlockPlan(*topk_plan(ref_scores, lo, hi, count), layout)
    finite = torch.isfinite(ref_scores)
    candidates = [dict(base_kw, precision="bf16x3")]
    for rows, kb, warps, stages in itertools.product((64, 128), (16, 32), (4, 8), (2, 3)):
        candidates.append(
            dict(
                precision="bf16x3",
                presplit=True,
                rows=rows,
                key_blocks=kb,
                num_warps=warps,
                num_stages=stages,
            )
        )
    for rows, kb, warps in itertools.product((64, 128), (16, 32), (4, 8)):
        candidates.append(
            dict(precision="tf32", rows=rows, key_blocks=kb, num_warps=warps, num_stages=2)
        )
    for kw in candidates:
        t0 = time.perf_counter()
        try:
            _, scores = grouped_block_estimate(qg, kg, **common, **kw)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            err = float((scores[finite] - ref_scores[finite]).abs().max())
            jac = plan_jaccard(BlockPlan(*topk_plan(scores, lo, hi, count), layout), ref_plan)
            ms = t_ms(lambda kw=kw: grouped_block_estimate(qg, kg, **common, **kw))
        except Exception as e:
            report("estimate", {"variant": kw, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        report(
            "estimate",
            {
                "variant": kw,
                "ms": round(ms, 4),
                "max_abs_score_diff": err,
                "plan_jaccard_vs_base": round(jac, 6),
                "compile_s": round(compile_s, 1),
            },
        )

    # Top-k routing.
    for rows, warps in (
        (None, None),
        (1, 1),
        (2, 1),
        (4, 1),
        (1, 2),
        (2, 2),
        (4, 2),
        (4, 4),
        (8, 8),
        (8, 4),
    ):
        kw = dict(rows_per_program=rows, num_warps=warps)
        try:
            plan = topk_plan(ref_scores, lo, hi, count, **kw)
            same = bool(
                torch.equal(plan[0], ref_plan.kv_indices)
                and torch.equal(plan[1], ref_plan.kv_counts)
            )
            ms = t_ms(lambda kw=kw: topk_plan(ref_scores, lo, hi, count, **kw))
        except Exception as e:
            report("route", {"variant": kw, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        report("route", {"variant": kw, "ms": round(ms, 4), "identical_plan": same})

    def best(section, ok):
        rows = [r for r in out.get(section, []) if "ms" in r and ok(r)]
        return min(rows, key=lambda r: r["ms"]) if rows else None

    out["best"] = {
        "pool": best("pool", lambda r: r["variant"] == "torch" or r["max_abs_err_vs_torch"] < 1e-3),
        "estimate": best("estimate", lambda r: r["plan_jaccard_vs_base"] >= 0.999),
        "route": best("route", lambda r: r["identical_plan"]),
    }
    print(json.dumps(out["best"], indent=1))
    if args.out:
        write_json(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
