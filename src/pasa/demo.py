"""``pasa demo``: attention-level comparison of routing strategies on synthetic video Q/K/V.

Until the testbed video model exists, the demo runs each strategy on structured synthetic
attention inputs (:mod:`pasa.synthetic`: local in space and time, with small moving objects) and
reports, against dense attention: the realised density, the relative output error, the share of
the exact attention mass the plan keeps (recall), the plan's step-to-step stability (Jaccard of
two consecutive steps' plans) and the wall time of the call.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pasa.analysis import plan_recall, true_block_mass
from pasa.attention import plan_blocks, sparse_attention
from pasa.config import PASAConfig
from pasa.synthetic import video_qkv


def demo_strategies(density: float) -> dict[str, PASAConfig]:
    """The sparse strategies the demo compares with dense SDPA, on the reference kernel."""
    return {
        "mean-pool top-k": PASAConfig(
            density=density,
            group_size=128,
            temperature=0.0,
            local_share=0.0,
            selection="top_k",
            backend="reference",
        ),
        "PASA": PASAConfig(density=density, backend="reference"),
    }


@dataclass
class StrategyResult:
    strategy: str
    density: float
    rel_error: float
    recall: float
    plan_jaccard: float
    seconds: float


def run_demo(
    *,
    grid: tuple[int, int, int] = (8, 32, 48),
    heads: int = 4,
    dim: int = 64,
    layers: int = 3,
    density: float = 0.15,
    seed: int = 0,
    progress: bool = True,
) -> list[StrategyResult]:
    """Average each strategy's metrics over ``layers`` independent synthetic attention inputs."""
    strategies = demo_strategies(density)
    sums: dict[str, list[float]] = {name: [0.0] * 5 for name in ("dense SDPA", *strategies)}
    for layer in tqdm(range(layers), desc="pasa demo", unit="layer", disable=not progress):
        q, k, v = video_qkv(grid, heads=heads, dim=dim, seed=seed + layer)
        start = time.perf_counter()
        dense = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)  # (B, S, H, D)
        row = (1.0, 0.0, 1.0, 1.0, time.perf_counter() - start)
        sums["dense SDPA"] = [s + x / layers for s, x in zip(sums["dense SDPA"], row, strict=True)]
        mass = None
        for name, config in strategies.items():
            start = time.perf_counter()
            plan = plan_blocks(q, k, grid=grid, config=config, step=0, layer=layer)
            out = sparse_attention(q, k, v, grid=grid, config=config, plan=plan)
            seconds = time.perf_counter() - start
            if mass is None:
                mass = true_block_mass(q, k, plan.layout)
            next_plan = plan_blocks(q, k, grid=grid, config=config, step=1, layer=layer)
            a, b = plan.to_dense_mask(), next_plan.to_dense_mask()
            jaccard = float((a & b).sum() / (a | b).sum())
            rel = float((out - dense).norm() / dense.norm())
            row = (plan.density(), rel, plan_recall(plan, mass), jaccard, seconds)
            sums[name] = [s + x / layers for s, x in zip(sums[name], row, strict=True)]
    return [StrategyResult(name, *values) for name, values in sums.items()]


def format_table(results: list[StrategyResult]) -> str:
    lines = [
        "| strategy | density | rel. error vs dense | attention recall | plan Jaccard step→step | time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.strategy} | {r.density:.3f} | {r.rel_error:.4f} | {r.recall:.3f} | "
            f"{r.plan_jaccard:.3f} | {r.seconds:.2f} |"
        )
    return "\n".join(lines)


def main(args) -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    grid = tuple(args.grid)
    print(
        f"PASA demo: synthetic video attention, grid {grid} ({grid[0] * grid[1] * grid[2]} tokens), "
        f"{args.heads} heads x d{args.dim}, {args.layers} layers, target density {args.density}"
    )
    results = run_demo(
        grid=grid,
        heads=args.heads,
        dim=args.dim,
        layers=args.layers,
        density=args.density,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(format_table(results))
    print(
        "recall = share of the exact attention mass inside the computed blocks; "
        "Jaccard = overlap of two consecutive steps' plans (1 = frozen routing).\n"
        "Times are CPU wall times of the pure-PyTorch reference kernel (plan included), not a "
        "speed claim: the GPU backends are measured by benchmarks/attention.py."
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
        print(f"wrote {args.json}")
    return 0
