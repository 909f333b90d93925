"""How much of the testbed's low recall is its small grid? The same attention on three grids.

Recall at density d (the attention mass kept by the best ``round(d * N)`` of a query block's N key
blocks) depends on how many blocks a row has, not only on how concentrated the attention is: a
head that attends to a fixed neighbourhood of tokens spends a larger share of 13 blocks (10% of
the testbed's 128) than of 59 (10% of Wan2.1-14B 720p's 591). This script keeps the attention
fixed in token units (``pasa.synthetic.video_qkv``: per-head length scales of 2, 4, 8 and 16
tokens, small moving objects) and measures the recall at 10% and 20% on the testbed's grid and
on Wan's two 81-frame grids, from the exact block mass of a random sample of query blocks.

    PYTHONPATH=src python benchmarks/recall_vs_grid.py --out benchmarks/results/recall-vs-grid-cpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _diffusers_common import write_json

from pasa.layout import make_layout
from pasa.synthetic import video_qkv

GRIDS = {
    "testbed 16x32x32": (16, 32, 32),
    "Wan2.1 480p 21x30x52": (21, 30, 52),
    "Wan2.1 720p 21x45x80": (21, 45, 80),
}


def block_mass_rows(q, k, layout, rows: torch.Tensor) -> torch.Tensor:
    """``(H, len(rows), N)`` exact attention mass of the chosen query blocks per key block."""
    qt, kt = layout.to_blocks(q)[0].float(), layout.to_blocks(k)[0].float()  # (S, H, D)
    bs, n, seq = layout.block_size, layout.num_blocks, qt.shape[0]
    key_block = torch.arange(seq) // bs
    kh = kt.transpose(0, 1)  # (H, S, D)
    out = []
    for r in rows.tolist():
        qb = qt[r * bs : min(seq, (r + 1) * bs)].transpose(0, 1)  # (H, b, D)
        probs = torch.softmax(qb @ kh.transpose(1, 2) * qb.shape[-1] ** -0.5, -1)  # (H, b, S)
        per_block = torch.zeros(probs.shape[0], probs.shape[1], n).index_add_(2, key_block, probs)
        out.append(per_block.mean(1))  # (H, N)
    return torch.stack(out, 1)


def recall(mass: torch.Tensor, density: float) -> torch.Tensor:
    """Per head: mean over rows of the mass in the best ``round(density * N)`` blocks."""
    k = max(1, round(density * mass.shape[-1]))
    return mass.topk(k, dim=-1).values.sum(-1).mean(-1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=48, help="query blocks sampled per grid")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    results = []
    for name, grid in GRIDS.items():
        q, k, _ = video_qkv(grid, heads=4, dim=64, seed=args.seed)
        layout = make_layout(grid)
        n = layout.num_blocks
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))[: args.rows]
        mass = block_mass_rows(q, k, layout, rows)
        row = {"grid": name, "tokens": layout.seq_len, "blocks": n, "rows_sampled": len(rows)}
        for d in (0.1, 0.2):
            per_head = recall(mass, d)
            row[f"recall@{d}"] = {
                "blocks_kept": max(1, round(d * n)),
                "per_head_length_scale_2_4_8_16": [round(float(x), 3) for x in per_head],
                "mean": round(float(per_head.mean()), 3),
            }
        results.append(row)
        print(f"{name:22s} {n:4d} blocks  recall@0.1 {row['recall@0.1']['mean']:.3f} "
              f"{row['recall@0.1']['per_head_length_scale_2_4_8_16']}  recall@0.2 "
              f"{row['recall@0.2']['mean']:.3f}", flush=True)  # fmt: skip
    if args.out:
        write_json({"benchmark": "recall_vs_grid", "seed": args.seed, "results": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
