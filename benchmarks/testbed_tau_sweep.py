"""PASA's routing temperature on the testbed: one caption and seed, dense against PASA at several tau.

Every run uses the shipped checkpoint, the budget profile of one calibration run (as ``pasa eval``
does) and top-k rows; only ``temperature`` changes. Prints and writes JSON (PSNR against dense,
flicker and warping-error excess, plan Jaccard, realised density, seconds).

    PYTHONPATH=src python benchmarks/testbed_tau_sweep.py --density 0.15 --taus 0 0.1 0.25

On the 2-core CPU at the full 16 x 256 x 256 size this takes about 25 minutes; ``--size 128`` is
about 16x cheaper in attention but its 32-block grid leaves little to route (tau made no
difference there).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _diffusers_common import save_testbed_report

from pasa.config import PASAConfig
from pasa.eval import metrics
from pasa.eval.generate import (
    Hooks,
    calibrate_profile,
    eval_captions,
    generate,
    load_model,
    resolve_device,
)
from pasa.testbed.model import DEFAULT_CHECKPOINT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--density", type=float, default=0.15)
    parser.add_argument("--taus", type=float, nargs="+", default=[0.0, 0.1, 0.25])
    parser.add_argument("--caption", type=int, default=0, help="index of the held-out caption")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    model, config, _ = load_model(args.checkpoint, device)
    common = dict(num_steps=args.steps, frames=config.frames, size=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        profile_path = Path(tmp) / "profile.json"
        calibrate_profile(model, config, profile_path, **common)
        caption = eval_captions(args.caption + 1, **config.clip_settings())[args.caption]
        dense = generate(model, config, caption, seed=args.seed, **common)
        ref_flicker = metrics.temporal_flickering(dense.frames)
        ref_warp = metrics.warping_error(dense.frames)
        rows = []
        for tau in args.taus:
            conf = PASAConfig(
                density=args.density,
                temperature=tau,
                budget="profile",
                profile_path=str(profile_path),
            )
            run = generate(model, config, caption, seed=args.seed, hooks=Hooks(conf), **common)
            row = {
                "temperature": tau,
                "psnr": metrics.psnr(run.frames, dense.frames),
                "flicker_excess": ref_flicker - metrics.temporal_flickering(run.frames),
                "warp_error_excess": metrics.warping_error(run.frames) - ref_warp,
                "plan_jaccard": run.plan_jaccard,
                "mean_density": run.mean_density,
                "seconds": run.seconds,
            }
            rows.append(row)
            print(
                f"tau {tau:<5} PSNR {row['psnr']:.2f} dB  flicker excess "
                f"{row['flicker_excess']:.4f}  warp excess {row['warp_error_excess']:.5f}  "
                f"Jaccard {row['plan_jaccard']:.3f}  density {row['mean_density']:.3f}",
                flush=True,
            )
    save_testbed_report("testbed_tau_sweep", args, device, caption=caption, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
