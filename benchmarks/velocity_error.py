"""How far is the model's whole prediction from dense, when every layer attends sparsely?

`attention_error_by_layer.py` compares one attention call at a time, each on dense inputs. Here
the errors compound through the layers as in generation: one forward of the testbed model on a
noised held-out clip at each noise level ``t``, dense and with each configuration applied to
every layer (fixed budget), and the relative error of the predicted velocity against dense.
``--one-layer`` instead makes one layer at a time sparse (the others dense), to find the layers
whose approximation the rest of the model amplifies.

    PYTHONPATH=src python benchmarks/velocity_error.py --out benchmarks/results/velocity-error-cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _diffusers_common import held_out_clip, save_testbed_report, sparse_attention_replaced

import pasa
from pasa.eval.generate import resolve_device
from pasa.testbed.model import DEFAULT_CHECKPOINT


def variants(density: float) -> dict[str, pasa.PASAConfig]:
    base = pasa.PASAConfig(density=density, budget="fixed")  # the defaults: the Taylor tail
    window = base.replace(local_share=1.0, temperature=0.0, approximate=False)
    return {
        "pasa": base,
        "pasa_exact_blocks": base.replace(approximate=False),
        "pasa_group_means": base.replace(approximate="group_means"),
        "window": window,
        "window_taylor": window.replace(approximate="taylor"),
    }


def only_layer(layer: int | None):
    """A context in which PASA's processors attend densely in every layer but ``layer`` (None:
    no change)."""
    if layer is None:
        return contextlib.nullcontext()
    only = layer  # the processors pass their own layer index as ``layer``

    def make(original):
        def attend(q, k, v, *, layer: int, density=None, **kw):
            return original(q, k, v, layer=layer, density=density if layer == only else 1.0, **kw)

        return attend

    return sparse_attention_replaced(make)


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--times", type=float, nargs="+", default=[0.9, 0.5, 0.2])
    ap.add_argument("--clip", type=int, default=0, help="index of the held-out clip")
    names = list(variants(0.1))
    ap.add_argument("--variants", nargs="+", choices=names, default=names)
    ap.add_argument("--one-layer", action="store_true",
                    help="one sparse layer at a time, the others dense")  # fmt: skip
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="JSON report")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    clip = held_out_clip(args.checkpoint, args.clip, device)
    model, config = clip.model, clip.config
    start = time.monotonic()
    configs = {n: c for n, c in variants(args.density).items() if n in args.variants}
    rows = []
    for t in args.times:
        call = clip.model_call(t)
        dense = model(**call)[0].float()
        for layer in range(config.num_layers) if args.one_layer else [None]:
            row: dict = {"t": t} if layer is None else {"t": t, "sparse_layer": layer}
            for name, cfg in configs.items():
                pasa.apply(model, cfg)
                try:
                    with only_layer(layer):
                        out = model(**call)[0].float()
                finally:
                    pasa.remove(model)
                row[name] = round(float((out - dense).norm() / dense.norm()), 4)
            rows.append(row)
            where = "" if layer is None else f", layer {layer} alone sparse"
            print(f"t = {t}{where}: velocity error against dense " + ", ".join(
                f"{k} {v:.4f}" for k, v in row.items() if k not in ("t", "sparse_layer")),
                flush=True)  # fmt: skip
    save_testbed_report("velocity_error", args, device, start, caption=clip.caption, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
