"""Held-out clips beside the samples of several testbed checkpoints, as one image.

For each held-out clip (the evaluation stream, data seed 10,000) and checkpoint: a row with the
clip as that checkpoint's data draws it (its scene style), then a row with the checkpoint's dense
sample of the clip's caption (in its own caption order), every ``--every``-th frame.

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
        for path, (model, config, _) in zip(args.checkpoints, models, strict=True):
            pixels, (text,) = make_batch([clip], data_seed=EVAL_DATA_SEED, height=args.size,
                                         width=args.size, supersample=max(1, largest // args.size),
                                         **config.clip_settings())  # fmt: skip
            rows.append(pixels[0])
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
