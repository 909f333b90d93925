"""How far is each sparse strategy's attention output from dense, layer by layer?

Along a *dense* sampling trajectory of the testbed (so every strategy sees the same inputs), at
some denoising steps, every video self-attention call is also computed with each strategy's plan,
and its output is compared with the dense output of the same call:

- ``rel_err``: ``||o - o_dense|| / ||o_dense||``;
- ``norm_ratio``: ``||o|| / ||o_dense||``;
- ``contrast_ratio``: the same for ``o`` minus its mean over tokens (per batch item, head and
  channel): above 1, the sparse output varies more from token to token than dense attention's.
  Softmax over fewer keys averages fewer values, so when attention is diffuse, dropping the far
  blocks' small but many shares of mass leaves outputs of higher contrast.

Strategies, each naming its approximate branch (the library's default is the Taylor tail): PASA
(library defaults, fixed budget), PASA with exact blocks only, PASA with group means for the
unselected blocks, PASA with the grouped Taylor tail (the inner spread pooled over each row), the
per-group second-order reference that the grouped tail approximates (each left-out group expanded
about its own mean with its own scatter: exact to second order, but dearer than computing the
blocks exactly, so a diagnostic, not a method), and the suite's static window stretched in time
(exact blocks only, as the suite's peer).

Run 6's caption 0 against caption 1, the steps and layers where the pooled tail went wrong:

    PYTHONPATH=src python benchmarks/attention_error_by_layer.py --scene-style bold+solo \
      --caption-index 0 --density 0.25 --at-steps 2 6 --stop-after-last --variants pasa \
      pasa_group_means pasa_grouped_taylor pasa_per_group_taylor --out ...

    PYTHONPATH=src python benchmarks/attention_error_by_layer.py --out benchmarks/results/attention-error-by-layer-cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _diffusers_common import open_testbed, save_testbed_report, sparse_attention_replaced

import pasa
from pasa.attention import layout_for
from pasa.estimate import group_pool
from pasa.eval.generate import eval_captions
from pasa.eval.strategies import get_strategy
from pasa.testbed.model import DEFAULT_CHECKPOINT
from pasa.testbed.sample import sample

METRICS = ("rel_err", "norm_ratio", "contrast_ratio")


def compare(out: torch.Tensor, dense: torch.Tensor) -> dict[str, float]:
    """Error, norm and contrast of ``(B, S, H, D)`` ``out`` against ``dense``."""
    o, d = out.float(), dense.float()
    co, cd = o - o.mean(1, keepdim=True), d - d.mean(1, keepdim=True)
    return {
        "rel_err": float((o - d).norm() / d.norm()),
        "norm_ratio": float(o.norm() / d.norm()),
        "contrast_ratio": float(co.norm() / cd.norm()),
    }


def per_group_taylor(q, k, v, plan, out, lse, group_size):
    """The tail expanded to second order about each left-out group's own mean, with that group's
    own key scatter ``W_g`` and key-value scatter ``Y_g``: what ``approximate="grouped_taylor"``
    approximates by pooling ``W`` and ``Y`` over the row. Tiled ``(B, S, H, D)`` inputs, the
    exact part's ``out`` and ``lse``; returns the merged output. Per query and left-out group it
    costs ``O(D²)``, more than attending to the group exactly."""
    batch, seq, heads, dim = q.shape
    bs = plan.layout.block_size
    scale = dim**-0.5
    kg, counts = group_pool(k, group_size)  # (B, H, NG, D)
    vg, _ = group_pool(v, group_size)
    num_groups = kg.shape[2]
    group_of = torch.arange(seq, device=q.device) // group_size
    group_block = torch.arange(num_groups, device=q.device) // (bs // group_size)
    mask = plan.to_dense_mask()
    res, res_lse = out.float().clone(), lse.clone()
    for b in range(batch):
        for h in range(heads):
            qf, kf, vf = q[b, :, h].float(), k[b, :, h].float(), v[b, :, h].float()
            kw, vw = kf - kg[b, h][group_of], vf - vg[b, h][group_of]
            zero = torch.zeros(num_groups, dim, dim, device=q.device)
            scatter_kk = zero.index_add(0, group_of, kw[:, :, None] * kw[:, None, :])
            scatter_kv = zero.index_add(0, group_of, kw[:, :, None] * vw[:, None, :])
            for r in range(plan.layout.num_blocks):
                rows = slice(r * bs, min(seq, (r + 1) * bs))
                left = ~mask[b, h, r][group_block]
                if not left.any():
                    continue
                qr, n = qf[rows], counts[left]
                quad = torch.einsum("cd,gde,ce->cg", qr, scatter_kk[left], qr).clamp_min(0)
                gain = 1 + scale * scale / 2 * quad / n
                logits = scale * qr @ kg[b, h][left].T + n.log() + gain.log()
                inner = scale * torch.einsum("cd,gde->cge", qr, scatter_kv[left])
                values = vg[b, h][left][None] + inner / (n * gain)[..., None]
                tail = (torch.softmax(logits, 1)[..., None] * values).sum(1)
                tail_lse = torch.logsumexp(logits, 1)
                merged = torch.logaddexp(res_lse[b, h, rows], tail_lse)
                res[b, rows, h] = (
                    torch.exp(res_lse[b, h, rows] - merged)[:, None] * res[b, rows, h]
                    + torch.exp(tail_lse - merged)[:, None] * tail
                )
                res_lse[b, h, rows] = merged
    return res


class _Done(Exception):
    """Raised inside sampling once the last requested step has been measured."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--captions", type=int, default=1)
    ap.add_argument(
        "--caption",
        action="append",
        default=None,
        help="a prompt instead of the held-out captions (repeat for several)",
    )
    ap.add_argument(
        "--caption-index", type=int, default=None, help="only this one of the held-out captions"
    )
    ap.add_argument(
        "--scene-style",
        default=None,
        help="draw the held-out captions in this style (default: the checkpoint's)",
    )
    ap.add_argument(
        "--stop-after-last",
        action="store_true",
        help="stop each sample after the last of --at-steps",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--variants", nargs="+", default=None, help="strategies to compare (default: all)"
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--at-steps", type=int, nargs="+", default=[0, 5, 10, 15, 19])
    ap.add_argument("--size", type=int, default=None, help="default: the training size")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="JSON report")
    args = ap.parse_args(argv)
    device, model, config, size = open_testbed(args)
    pasa_config = get_strategy("pasa").config(args.density)
    exact = pasa_config.replace(approximate=False)
    variants = {
        "pasa": dict(config=pasa_config),
        "pasa_exact_blocks": dict(config=exact),
        "pasa_group_means": dict(config=pasa_config.replace(approximate="group_means")),
        "pasa_grouped_taylor": dict(config=pasa_config.replace(approximate="grouped_taylor")),
        "pasa_per_group_taylor": dict(config=exact, tail_fn=per_group_taylor),
        "static_window_time": dict(config=exact, plan_fn=get_strategy("static_window_time").plan_fn),
    }  # fmt: skip
    unknown = set(args.variants or ()) - set(variants)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {sorted(variants)}")
    variants = {name: variants[name] for name in args.variants or variants}
    rows: list[dict] = []
    current = {"caption": 0}  # the caption being sampled, for the rows

    def attend(
        original, q, k, v, *, config, step, layer, density=None, plan=None, return_plan=False,
        **kw,
    ):  # fmt: skip
        if args.stop_after_last and step > max(args.at_steps):
            raise _Done
        dense, dense_plan = original(
            q, k, v, config=config, step=step, layer=layer, density=1.0, return_plan=True, **kw
        )
        if step in args.at_steps:
            for name, variant in variants.items():
                if "tail_fn" in variant:  # the processors may hand over tiled tensors already
                    rest = {key: value for key, value in kw.items() if key != "tiled"}
                    text = kw.get("num_text_tokens", 0)
                    layout = layout_for(q, grid=kw["grid"], config=exact, num_text_tokens=text)
                    tiled = kw.get("tiled", False)
                    qt, kt, vt = (x if tiled else layout.to_blocks(x) for x in (q, k, v))
                    part, lse, part_plan = original(
                        qt, kt, vt, config=exact, step=step, layer=layer, tiled=True,
                        return_lse=True, return_plan=True, **rest,
                    )  # fmt: skip
                    tail = variant["tail_fn"](qt, kt, vt, part_plan, part, lse, exact.group_size)
                    out = tail if tiled else layout.from_blocks(tail)
                    rows.append({"caption": current["caption"], "step": step, "layer": layer,
                                 "strategy": name, **compare(out, dense)})  # fmt: skip
                    continue
                fixed = None
                if "plan_fn" in variant:
                    layout = layout_for(q, grid=kw["grid"], config=variant["config"],
                                        num_text_tokens=kw.get("num_text_tokens", 0))  # fmt: skip
                    fixed = variant["plan_fn"](layout, args.density, q.shape[0], q.shape[2])
                out = original(q, k, v, config=variant["config"], step=step, layer=layer,
                               plan=fixed, **kw)  # fmt: skip
                rows.append({"caption": current["caption"], "step": step, "layer": layer,
                             "strategy": name, **compare(out, dense)})  # fmt: skip
        return (dense, dense_plan) if return_plan else dense

    start = time.monotonic()
    with sparse_attention_replaced(lambda original: partial(attend, original)):
        # Any density below 1 routes every video self-attention call through the processor.
        pasa.apply(model, pasa.PASAConfig(density=0.5))
        try:
            settings = config.clip_settings(args.scene_style)
            captions = args.caption or eval_captions(
                max(args.captions, (args.caption_index or 0) + 1), **settings
            )
            indices = (
                [args.caption_index]
                if args.caption_index is not None and not args.caption
                else range(len(captions))
            )
            for index in indices:
                current["caption"] = index
                with contextlib.suppress(_Done):
                    sample(model, config, captions[index], seed=args.seed, num_steps=args.steps,
                           height=size, width=size)  # fmt: skip
        finally:
            pasa.remove(model)
    summary = {}
    for name in variants:
        for layer in sorted({r["layer"] for r in rows}):
            sel = [r for r in rows if r["strategy"] == name and r["layer"] == layer]
            means = {k: round(sum(r[k] for r in sel) / len(sel), 4) for k in METRICS}
            summary.setdefault(name, []).append(means)
        print(f"{name:20s} " + "  ".join(
            f"L{i} {s['rel_err']:.2f}/{s['contrast_ratio']:.2f}" for i, s in enumerate(summary[name])
        ), "(rel err / contrast ratio)", flush=True)  # fmt: skip
    save_testbed_report(
        "attention_error_by_layer", args, device, start, per_layer_mean=summary, rows=rows
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
