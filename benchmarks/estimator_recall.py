"""Which block-importance estimate keeps the most attention mass on the testbed?

The suite (docs/results.md) found PASA's grouped estimate (g = 32, the *max* over a block's query
groups) no better than one mean per block. This script asks the estimate itself, not the sampled
video: on every layer of the testbed checkpoint (noised held-out clips, t = 0.25, 0.5, 0.75), it
routes each estimate with PASA's own top-k routing (the diagonal block always kept) and measures
the share of the *exact* attention mass the plan computes (``pasa.analysis.plan_recall``), beside
the best any plan of that density could keep (oracle). Estimates:

- ``meanpool``: one mean query and key per 128-token block (SpargeAttn-style; g = 128);
- ``max gG``: PASA's estimate, ``mass(i, j) = max over query groups a of sum over key groups b in
  j of p(a, b)`` with groups of G tokens;
- ``mean gG``: the same, averaged over the block's query groups instead of the max: the estimate
  of what the kernel's quality depends on, the mass that the block's queries on average keep;
- ``keys gG``: one mean query per block against key groups of G tokens;
- ``window``: no estimate, the static 3D local window of the suite's STA/Radial-style peer
  (``pasa.eval.strategies.window_plan``), for scale.

    PYTHONPATH=src python benchmarks/estimator_recall.py --out benchmarks/results/estimator-recall-cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _diffusers_common import write_json

from pasa.analysis import plan_recall, true_block_mass
from pasa.config import PASAConfig
from pasa.estimate import group_pool
from pasa.eval.metrics import oracle_recall
from pasa.eval.probe import capture_qk
from pasa.eval.strategies import window_plan
from pasa.layout import make_layout
from pasa.route import select_blocks


def grouped_mass(q, k, *, block_size: int, q_group: int, k_group: int, reduce: str):
    """``(B, H, N, N)`` estimated block mass from query groups of ``q_group`` and key groups of
    ``k_group`` tokens (``q, k``: ``(B, S, H, D)`` in tiled order); ``reduce`` over the query
    groups of a block: "max" or "mean". S must be a multiple of the block size."""
    qg, _ = group_pool(q, q_group)  # (B, H, A, D)
    kg, counts = group_pool(k, k_group)
    scale = q.shape[-1] ** -0.5
    p = torch.softmax(qg @ kg.transpose(-1, -2) * scale + counts.log(), dim=-1)  # (B, H, A, G)
    b, h, a, _ = p.shape
    n = q.shape[1] // block_size
    per_block = p.view(b, h, a, n, block_size // k_group).sum(-1)  # (B, H, A, N)
    per_block = per_block.view(b, h, n, block_size // q_group, n)
    return per_block.amax(3) if reduce == "max" else per_block.mean(3)


ESTIMATES = {
    "meanpool": dict(q_group=128, k_group=128, reduce="mean"),
    "max g16": dict(q_group=16, k_group=16, reduce="max"),
    "max g32": dict(q_group=32, k_group=32, reduce="max"),
    "max g64": dict(q_group=64, k_group=64, reduce="max"),
    "mean g16": dict(q_group=16, k_group=16, reduce="mean"),
    "mean g32": dict(q_group=32, k_group=32, reduce="mean"),
    "mean g64": dict(q_group=64, k_group=64, reduce="mean"),
    "keys g32": dict(q_group=128, k_group=32, reduce="mean"),
}


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    from pasa.testbed.data import make_batch
    from pasa.testbed.flow import NUM_TRAIN_TIMESTEPS, noisy_input
    from pasa.testbed.model import DEFAULT_CHECKPOINT, load_testbed, pixels_to_latents

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--clips", type=int, default=1)
    ap.add_argument("--times", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--data-seed", type=int, default=10_000)
    ap.add_argument("--out", default=None, help="JSON report")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    model, config, record = load_testbed(args.checkpoint, device="cpu")
    pixels, captions = make_batch(range(args.clips), data_seed=args.data_seed, frames=config.frames,
                                  height=config.height, width=config.width,
                                  **config.clip_settings())  # fmt: skip
    latents = pixels_to_latents(pixels, config.pixel_factor)
    text, _ = config.text_encoder()(captions)
    layout = make_layout(config.token_grid(), block_size=128)
    gen = torch.Generator().manual_seed(args.data_seed)
    names = ["oracle", *ESTIMATES, "window"]
    # recall[density][name][layer] summed over times
    recall = {d: {n: [0.0] * config.num_layers for n in names} for d in args.densities}
    start = time.monotonic()
    for t in args.times:
        noise = torch.randn(latents.shape, generator=gen)
        tt = torch.full((args.clips,), float(t))
        x_t, _ = noisy_input(latents, noise, tt)
        layers = capture_qk(model, x_t, tt * NUM_TRAIN_TIMESTEPS, text)
        for i, (q, k) in enumerate(layers):
            true = true_block_mass(q.float(), k.float(), layout)
            qt, kt = layout.to_blocks(q).float(), layout.to_blocks(k).float()
            estimates = {
                n: grouped_mass(qt, kt, block_size=128, **kw) for n, kw in ESTIMATES.items()
            }
            for d in args.densities:
                recall[d]["oracle"][i] += oracle_recall(true, d) / len(args.times)
                cfg = PASAConfig(density=d)
                for n, mass in estimates.items():
                    plan = select_blocks(mass, layout=layout, config=cfg)
                    recall[d][n][i] += plan_recall(plan, true) / len(args.times)
                window = window_plan(layout, d, batch=q.shape[0], heads=q.shape[2])
                recall[d]["window"][i] += plan_recall(window, true) / len(args.times)
            print(f"t={t} layer {i}: {time.monotonic() - start:.0f} s", flush=True)

    report = {
        "checkpoint_training": record.get("training"),
        "grid": config.token_grid(),
        "clips": args.clips,
        "times": args.times,
        "estimates": {n: kw for n, kw in ESTIMATES.items()},
        "routing": "PASA top-k per row, diagonal block forced, tau = 0",
        "recall": {},
        "seconds": round(time.monotonic() - start, 1),
    }
    for d in args.densities:
        rows = {n: {"per_layer": [round(v, 4) for v in recall[d][n]],
                    "mean": round(sum(recall[d][n]) / config.num_layers, 4)} for n in names}  # fmt: skip
        report["recall"][str(d)] = rows
        print(f"\ndensity {d}: mean over layers (per layer)")
        for n in names:
            print(f"  {n:9s} {rows[n]['mean']:.4f}  {rows[n]['per_layer']}")
    if args.out:
        write_json(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
