"""How far each head's estimate agrees with PASA's local window, caption by caption.

``PASAConfig.window_trust`` forces the window only in the heads whose estimate agrees with it:
averaged over a head's video rows, the window's blocks must hold at least that share of the
estimated mass of the row's same number of heaviest blocks (``pasa.route.window_agreement``). This
script samples held-out captions with PASA at one density under the suite's budget profile, with
``window_trust = 0`` (every head agrees: the plans are the default forced window's), and records
the agreement of every head at every sparse step and layer. It reports per caption the quantiles
and the share of heads below each ``--trust`` value, so that a threshold can be read off: where a
zooming camera leaves the window behind, more heads should fall below it.

    PYTHONPATH=src python benchmarks/window_agreement.py --captions 4 --device cuda \\
        --budget-profile PROFILE --out benchmarks/results/window-agreement-h200.json
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

import pasa.route
from pasa.eval.generate import (
    calibrate_profile,
    eval_captions,
    generate,
    strategy_hooks,
)
from pasa.eval.strategies import get_strategy
from pasa.testbed.model import DEFAULT_CHECKPOINT

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class AgreementRecorder:
    """Wraps :func:`pasa.route.window_agreement` (which routing looks up at each call) and keeps
    every ``(B, H)`` result on the CPU, in call order."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []
        self._original = pasa.route.window_agreement

    def __enter__(self) -> AgreementRecorder:
        def recording(*args):
            agreement = self._original(*args)
            self.values.append(agreement.detach().float().cpu())
            return agreement

        pasa.route.window_agreement = recording
        return self

    def __exit__(self, *exc: object) -> None:
        pasa.route.window_agreement = self._original

    def take(self) -> torch.Tensor:
        """``(calls, B * H)`` of the calls since the last take."""
        values, self.values = self.values, []
        return torch.stack([v.flatten() for v in values]) if values else torch.empty(0, 0)


def summarise(agreement: torch.Tensor, trusts: list[float], layers: int) -> dict:
    flat = agreement.flatten()
    per_call = agreement.mean(-1)  # calls in order: step-major, layer-minor
    return {
        "calls": agreement.shape[0],
        "heads_per_call": agreement.shape[1],
        "quantiles": {str(q): round(float(flat.quantile(q)), 4) for q in QUANTILES},
        "share_below": {str(t): round(float((flat < t).float().mean()), 4) for t in trusts},
        "mean_by_layer": [
            round(float(per_call[i::layers].mean()), 4) for i in range(min(layers, len(per_call)))
        ],
        "mean_by_step": [
            round(float(per_call[i : i + layers].mean()), 4)
            for i in range(0, len(per_call), layers)
        ],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--captions", type=int, default=4, help="held-out captions (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--density", type=float, default=0.15)
    ap.add_argument("--trust", type=float, nargs="+", default=[0.5, 0.7, 0.85, 0.95])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=None, help="default: the training size")
    ap.add_argument("--budget-profile", default=None, help="default: calibrate one")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="JSON report")
    args = ap.parse_args(argv)
    device, model, config, size = open_testbed(args)
    common = dict(num_steps=args.steps, frames=config.frames, size=size)
    captions = eval_captions(args.captions, **config.clip_settings())
    start = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(args.budget_profile or Path(tmp) / "profile.json")
        if args.budget_profile is None:
            calibrate_profile(model, config, profile, **common)
        hooks = strategy_hooks(get_strategy("pasa"), args.density, args.steps, profile)
        hooks = replace(hooks, config=hooks.config.replace(window_trust=0.0))
        with AgreementRecorder() as recorder:
            for index, caption in enumerate(captions):
                generate(model, config, caption, seed=args.seed, hooks=hooks, **common)
                row = summarise(recorder.take(), args.trust, config.num_layers)
                rows.append({"caption_index": index, "caption": caption, **row})
                print(f"caption {index}: quantiles {row['quantiles']}, below {row['share_below']}",
                      flush=True)  # fmt: skip
    save_testbed_report(
        "window_agreement", args, device, start, size=size, captions=rows,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
