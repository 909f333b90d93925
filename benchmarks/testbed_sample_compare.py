"""Held-out clips beside the samples of several testbed checkpoints, as one image.

For each held-out clip (the evaluation stream, data seed 30,000): a row with the clip itself,
then a row per checkpoint with its dense sample of the clip's caption (written in that
checkpoint's own caption order), every ``--every``-th frame.

    PYTHONPATH=src python benchmarks/testbed_sample_compare.py \\
        src/pasa/testbed/checkpoint/testbed.safetensors run3.safetensors \\
        --clips 5 0 --size 128 --guidance 4 --out docs/img/testbed/run3_vs_shipped.jpg
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    from pasa.eval.generate import EVAL_DATA_SEED
    from pasa.eval.metrics import to_uint8
    from pasa.testbed.data import make_batch
    from pasa.testbed.model import load_testbed
    from pasa.testbed.sample import sample
    from pasa.testbed.scene import caption, make_scene

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--clips", type=int, nargs="+", default=[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--out", type=Path, required=True, help=".png or .jpg")
    args = p.parse_args(argv)
    models = [load_testbed(path) for path in args.checkpoints]
    largest = max(c.height for _, c, _ in models)
    rows = []
    for clip in args.clips:
        pixels, _ = make_batch([clip], data_seed=EVAL_DATA_SEED, height=args.size,
                               width=args.size, supersample=max(1, largest // args.size))  # fmt: skip
        rows.append(pixels[0])
        for path, (model, config, _) in zip(args.checkpoints, models, strict=True):
            text = caption(make_scene(EVAL_DATA_SEED, clip, frames=config.frames),
                           config.caption_order)  # fmt: skip
            run = sample(model, config, text, seed=args.seed, num_steps=args.steps,
                         guidance=args.guidance, height=args.size, width=args.size)  # fmt: skip
            rows.append(run.frames)
            print(f"clip {clip}, {Path(path).name}: {text}", flush=True)
    strips = [to_uint8(r)[:: args.every] for r in rows]  # (F', H, W, 3) each
    image = torch.cat([torch.cat(list(s), dim=1) for s in strips], dim=0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.numpy()).save(args.out, quality=85)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
