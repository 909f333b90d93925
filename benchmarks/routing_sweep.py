"""Routing ablation on synthetic video attention (CPU): recall and plan stability per setting.

For each setting, on ``--layers`` independent synthetic inputs (pasa.synthetic.video_qkv), the plan's
share of the exact attention mass (recall) and the Jaccard overlap of two consecutive steps' plans.
The q/k inputs are the same at both steps, so any change of plan comes from the routing noise alone:
Jaccard 1 means frozen routing (tau = 0).

    python benchmarks/routing_sweep.py --out benchmarks/results/routing_sweep_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from tqdm import tqdm

import pasa
from pasa.analysis import plan_recall, true_block_mass
from pasa.synthetic import video_qkv

SETTINGS = {
    "mean-pool (g=128), tau=0, top-k": dict(group_size=128, temperature=0.0, selection="top_k"),
    "grouped (g=32), tau=0, top-k": dict(group_size=32, temperature=0.0, selection="top_k"),
    "grouped (g=16), tau=0, top-k": dict(group_size=16, temperature=0.0, selection="top_k"),
    "grouped (g=32), tau=0.25, top-k": dict(group_size=32, temperature=0.25, selection="top_k"),
    "grouped (g=32), tau=0.5, top-k": dict(group_size=32, temperature=0.5, selection="top_k"),
    "grouped (g=32), tau=0, top-p": dict(group_size=32, temperature=0.0, selection="top_p"),
    "grouped (g=32), tau=0.25, top-p": dict(group_size=32, temperature=0.25, selection="top_p"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, nargs=3, default=[8, 32, 32])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--out")
    args = parser.parse_args()
    grid = tuple(args.grid)
    rows = []
    inputs = [video_qkv(grid, heads=args.heads, dim=64, seed=s) for s in range(args.layers)]
    masses = [true_block_mass(q, k, pasa.make_layout(grid)) for q, k, _ in inputs]
    for density in args.densities:
        for name, kw in tqdm(SETTINGS.items(), desc=f"density {density}"):
            config = pasa.PASAConfig(density=density, **kw)
            recall = jaccard = real = 0.0
            for layer, ((q, k, _), mass) in enumerate(zip(inputs, masses, strict=True)):
                a = pasa.plan_blocks(q, k, grid=grid, config=config, step=0, layer=layer)
                b = pasa.plan_blocks(q, k, grid=grid, config=config, step=1, layer=layer)
                ma, mb = a.to_dense_mask(), b.to_dense_mask()
                recall += plan_recall(a, mass) / args.layers
                jaccard += float((ma & mb).sum() / (ma | mb).sum()) / args.layers
                real += a.density() / args.layers
            rows.append(
                dict(density=density, setting=name, realised=real, recall=recall, jaccard=jaccard)
            )
    print("| target density | setting | realised | recall | Jaccard step→step |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['density']} | {r['setting']} | {r['realised']:.3f} | {r['recall']:.3f} | "
            f"{r['jaccard']:.3f} |"
        )
    if args.out:
        meta = dict(
            grid=grid,
            heads=args.heads,
            layers=args.layers,
            torch=torch.__version__,
            machine=platform.machine(),
            device="cpu",
        )
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
