"""Where does a sparse clip's extra flicker sit: inside a tile's frame pair, or across tiles?

PASA tiles tokens 2 frames deep (2 x 8 x 8 per 128-token block), so frames (0, 1), (2, 3), ...
share blocks and plans, and every second frame transition crosses from one tile's plan to the
next one's. If the extra flicker of estimate-routed plans comes from plans that differ between
neighbouring time tiles, it should sit on the transitions *across* tiles; a static window, whose
plan is the same neighbourhood for every tile, should show no such pattern.

For one caption and seed, the script samples the dense clip and each strategy at one density
(the suite's hooks and budget profile), plus PASA at each ``--local-shares`` value of
``PASAConfig.local_share`` and with each ``--variant`` of its config, and reports per run the VBench frame-difference
excess over dense (mean absolute difference of consecutive 8-bit frames, sparse minus dense),
split into transitions within a tile's frame pair and transitions across tiles.

    PYTHONPATH=src python benchmarks/flicker_by_transition.py --out benchmarks/results/flicker-by-transition-cpu.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _diffusers_common import open_testbed, save_testbed_report

from pasa.eval.generate import (
    calibrate_profile,
    eval_captions,
    generate,
    strategy_hooks,
)
from pasa.eval.metrics import psnr, temporal_flickering, to_uint8
from pasa.eval.strategies import get_strategy
from pasa.layout import auto_tile
from pasa.testbed.model import DEFAULT_CHECKPOINT


def frame_differences(clip: torch.Tensor) -> torch.Tensor:
    """``(F - 1,)`` mean absolute difference of consecutive 8-bit frames (VBench's ``mae_seq``)."""
    frames = to_uint8(clip).float()
    return (frames[1:] - frames[:-1]).abs().mean(dim=(1, 2, 3))


def spatial_detail(clip: torch.Tensor) -> float:
    """Mean absolute difference of horizontally and vertically neighbouring 8-bit pixels."""
    f = to_uint8(clip).float()  # (F, H, W, 3)
    dy = (f[:, 1:] - f[:, :-1]).abs().mean()
    dx = (f[:, :, 1:] - f[:, :, :-1]).abs().mean()
    return float((dx + dy) / 2)


def coarse_frame_difference(clip: torch.Tensor, pool: int = 8) -> float:
    """Mean absolute difference of consecutive 8-bit frames after ``pool`` x ``pool`` average
    pooling: frame-to-frame change of the picture's coarse layout, without its fine texture."""
    f = to_uint8(clip).float().permute(0, 3, 1, 2)  # (F, 3, H, W)
    coarse = torch.nn.functional.avg_pool2d(f, pool)
    return float((coarse[1:] - coarse[:-1]).abs().mean())


def parse_variant(text: str) -> dict[str, object]:
    """``"local_share=0.9,temperature=0"`` -> ``{"local_share": 0.9, "temperature": 0.0}``
    (numbers as int or float, anything else as a string; PASAConfig validates the fields)."""
    changes: dict[str, object] = {}
    for item in text.split(","):
        field, sep, value = item.partition("=")
        if not sep or not field.strip():
            raise SystemExit(f"--variant {text!r}: expected FIELD=VALUE[,FIELD=VALUE...]")
        try:
            parsed: object = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            parsed = value.strip()
        changes[field.strip()] = parsed
    return changes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--strategies", nargs="+", default=["static_window", "meanpool_topk", "pasa"])
    ap.add_argument("--local-shares", type=float, nargs="*", default=[],
                    help="also PASA with these local_share values")  # fmt: skip
    ap.add_argument("--variant", action="append", default=[], metavar="FIELD=VALUE[,...]",
                    help="also PASA with these PASAConfig changes, e.g. local_share=0.9,"
                         "temperature=0 (repeat for several)")  # fmt: skip
    ap.add_argument("--density", type=float, default=0.15)
    ap.add_argument("--caption", type=int, default=0, help="index of the held-out caption")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=None, help="default: the training size")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="JSON report")
    ap.add_argument("--clips-out", default=None,
                    help="folder to save every clip as uint8 (F, H, W, 3) tensors (NAME.pt)")  # fmt: skip
    args = ap.parse_args(argv)
    device, model, config, size = open_testbed(args)
    common = dict(num_steps=args.steps, frames=config.frames, size=size)
    grid = config.token_grid(height=size, width=size)
    tile_frames = auto_tile(grid, 128)[0]
    caption = eval_captions(args.caption + 1, **config.clip_settings())[args.caption]
    start = time.monotonic()
    dense = generate(model, config, caption, seed=args.seed, **common)
    clips_out = Path(args.clips_out) if args.clips_out else None
    if clips_out is not None:
        clips_out.mkdir(parents=True, exist_ok=True)
        torch.save(to_uint8(dense.frames), clips_out / "dense.pt")
    ref = frame_differences(dense.frames)
    ref_flicker = temporal_flickering(dense.frames)
    across = torch.tensor([(i + 1) % tile_frames == 0 for i in range(ref.numel())])
    rows = {}
    dense_texture = {
        "spatial_detail": round(spatial_detail(dense.frames), 3),
        "coarse_frame_difference": round(coarse_frame_difference(dense.frames), 3),
    }
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "profile.json"
        runs = [(name, name, {}) for name in args.strategies]
        runs += [(f"pasa local_share={x}", "pasa", {"local_share": x}) for x in args.local_shares]
        runs += [(f"pasa {v}", "pasa", parse_variant(v)) for v in args.variant]
        if any(get_strategy(strategy).calibrated for _, strategy, _ in runs):
            calibrate_profile(model, config, profile, **common)
        for name, strategy, changes in runs:
            hooks = strategy_hooks(get_strategy(strategy), args.density, args.steps, profile)
            if changes:
                hooks = replace(hooks, config=hooks.config.replace(**changes))
            run = generate(model, config, caption, seed=args.seed, hooks=hooks, **common)
            excess = frame_differences(run.frames) - ref
            if clips_out is not None:
                torch.save(to_uint8(run.frames), clips_out / f"{name.replace(' ', '_')}.pt")
            rows[name] = {
                "excess_per_transition": [round(float(x), 3) for x in excess],
                "within_tile": round(float(excess[~across].mean()), 3),
                "across_tiles": round(float(excess[across].mean()), 3),
                "mean_density": round(run.mean_density, 4),
                "psnr": round(psnr(run.frames, dense.frames), 3),
                "flicker_excess": round(ref_flicker - temporal_flickering(run.frames), 5),
                "spatial_detail": round(spatial_detail(run.frames), 3),
                "coarse_frame_difference": round(coarse_frame_difference(run.frames), 3),
            }
            print(f"{name:24s} PSNR {rows[name]['psnr']:.2f} dB, frame-difference excess over dense (8-bit levels): within a tile "
                  f"{rows[name]['within_tile']:+.3f}, across tiles "
                  f"{rows[name]['across_tiles']:+.3f}; spatial detail {rows[name]['spatial_detail']:.2f} "
                  f"(dense {dense_texture['spatial_detail']:.2f}), coarse frame difference "
                  f"{rows[name]['coarse_frame_difference']:.2f} "
                  f"(dense {dense_texture['coarse_frame_difference']:.2f})", flush=True)  # fmt: skip
    save_testbed_report(
        "flicker_by_transition", args, device, start, caption=caption, grid=grid,
        tile_frames=tile_frames, dense_per_transition=[round(float(x), 3) for x in ref],
        dense=dense_texture, strategies=rows,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
