"""How well does a testbed checkpoint denoise real clips? One step, and Euler from part-way.

Held-out clips of the evaluation stream (the checkpoint's own scene style and captions) are
noised to ``t`` with a fixed noise (seeded by the clip index) and denoised two ways:

- **one step**: the model's clean-clip estimate ``x0 = x_t - t v`` at ``t``;
- **restart**: dense Euler steps from ``t`` to 0 on the sampler's 20-step grid (the grid's
  nearest time to ``t``), as the second half of a generation would run from that point.

The mean squared error against the clean clip (in [-1, 1] pixels) and its PSNR are reported per
``t``. A sampler that loses the objects' outlines a model can recover in one step shows here as
restart errors far above the one-step ones; a model that cannot recover them, as one-step
errors that stay high. With ``--png`` a grid of the first two clips (rows: clean, then one-step
and restart for each ``t``; every fifth frame) is written for eyes.

    PYTHONPATH=src python benchmarks/denoise_check.py --clips 4 --size 128 --device cpu \\
        --out benchmarks/results/denoise-check-cpu.json --png denoise.png

Several checkpoints may be given; each gets its own entry (and PNG, suffixed by its index).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _diffusers_common import save_testbed_report

from pasa.eval.generate import EVAL_DATA_SEED, load_model, resolve_device
from pasa.testbed.data import make_batch
from pasa.testbed.flow import NUM_TRAIN_TIMESTEPS, sigma_schedule
from pasa.testbed.model import (
    DEFAULT_CHECKPOINT,
    describe_checkpoint,
    latents_to_pixels,
    pixels_to_latents,
)

GRID_STEPS = 20


def _velocity(model, x, t: float, text) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    timestep = torch.full((x.shape[0],), t * NUM_TRAIN_TIMESTEPS, device=x.device)
    out = model(
        hidden_states=x.to(dtype),
        timestep=timestep,
        encoder_hidden_states=text.to(dtype),
        return_dict=False,
    )[0]
    return out.float()


@torch.no_grad()
def denoise_check(
    checkpoint, *, clips: int, size: int | None, times: list[float], device: torch.device
) -> tuple[dict, list[torch.Tensor]]:
    """Per ``t``: one-step and restart MSE over ``clips`` held-out clips; and the pixel clips
    of the first two (clean, then one-step and restart per ``t``) for the picture."""
    model, config, record = load_model(checkpoint, device)
    side = size or config.height
    grid = sigma_schedule(GRID_STEPS, 3.0)
    encoder = config.text_encoder()
    rows: dict[str, dict[str, list[float]]] = {}
    pictures: list[torch.Tensor] = []
    for clip in range(clips):
        pixels, captions = make_batch(
            [clip], data_seed=EVAL_DATA_SEED, frames=config.frames, height=side, width=side,
            device=device, **config.clip_settings(),
        )  # fmt: skip
        x0 = pixels_to_latents(pixels, config.pixel_factor).float()
        text, _ = encoder(captions, device=device)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(clip)).to(device)
        if clip < 2:
            pictures.append(pixels[0].cpu())
        for wanted in times:
            first = int((grid - wanted).abs().argmin())
            t = float(grid[first])
            x = (1 - t) * x0 + t * noise
            one_step = x - t * _velocity(model, x, t, text)
            for i in range(first, GRID_STEPS):
                t_i, t_next = float(grid[i]), float(grid[i + 1])
                x = x + (t_next - t_i) * _velocity(model, x, t_i, text)
            row = rows.setdefault(f"{t:.3f}", {"one_step": [], "restart": []})
            for name, estimate in (("one_step", one_step), ("restart", x)):
                row[name].append(float((estimate.clamp(-1, 1) - x0).pow(2).mean()))
                if clip < 2:
                    pictures.append(latents_to_pixels(estimate, config.pixel_factor)[0].cpu())
    summary = {
        t: {
            **{f"{k}_mse": round(sum(v) / len(v), 5) for k, v in row.items()},
            **{f"{k}_psnr": round(_psnr(sum(v) / len(v)), 2) for k, v in row.items()},
            "steps_from_t": GRID_STEPS - int((grid - float(t)).abs().argmin()),
            "per_clip": {k: [round(e, 5) for e in v] for k, v in row.items()},
        }
        for t, row in rows.items()
    }
    entry = {
        "prediction": config.prediction,
        "training_steps": (record.get("training") or {}).get("steps"),
        "size": side,
        "clips": clips,
        "by_t": summary,
    }
    return entry, pictures


def _psnr(mse: float) -> float:
    return 10 * math.log10(4.0 / max(mse, 1e-12))  # peak-to-peak 2 in [-1, 1]


def save_grid(pictures: list[torch.Tensor], per_clip: int, path: Path, every: int = 5) -> None:
    """Rows of every ``every``-th frame: clip 0's clean and estimates, then clip 1's."""
    from PIL import Image

    rows = []
    for clip in pictures:
        frames = ((clip.clamp(-1, 1)[:, ::every] + 1) * 127.5).round().byte()  # (3, F', H, W)
        rows.append(torch.cat(list(frames.permute(1, 2, 3, 0)), dim=1))  # (H, F' W, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(torch.cat(rows, dim=0).numpy()).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="*", default=[str(DEFAULT_CHECKPOINT)])
    parser.add_argument("--clips", type=int, default=4, help="held-out clips (default 4)")
    parser.add_argument("--size", type=int, help="clip side in pixels (default: the model's)")
    parser.add_argument("--t", type=float, nargs="+", default=[0.3, 0.6, 0.85], dest="times")
    parser.add_argument("--device", help="default: cuda if available")
    parser.add_argument("--out", help="results JSON")
    parser.add_argument("--png", help="picture of the first two clips (PNG)")
    args = parser.parse_args(argv)
    if args.clips < 1 or not all(0 < t < 1 for t in args.times):
        parser.error("need --clips >= 1 and every --t in (0, 1)")
    device = resolve_device(args.device)
    start = time.monotonic()
    results = {}
    for k, checkpoint in enumerate(args.checkpoints):
        entry, pictures = denoise_check(
            checkpoint, clips=args.clips, size=args.size, times=args.times, device=device
        )
        results[describe_checkpoint(checkpoint)] = entry
        for t, row in entry["by_t"].items():
            print(f"{Path(checkpoint).name}  t={t}  one step {row['one_step_psnr']:.2f} dB  "
                  f"restart ({row['steps_from_t']} steps) {row['restart_psnr']:.2f} dB")  # fmt: skip
        if args.png:
            png = Path(args.png)
            if len(args.checkpoints) > 1:
                png = png.with_name(f"{png.stem}-{k}{png.suffix}")
            save_grid(pictures, 1 + 2 * len(args.times), png)
    args.checkpoint = args.checkpoints[0]
    args.checkpoints = list(results)  # names and hashes, no machine paths
    args.png = Path(args.png).name if args.png else None
    save_testbed_report("denoise_check", args, device, start, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
