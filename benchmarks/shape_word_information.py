"""How much could a caption's shape word say about a clip's pixels at high noise?

At t around 0.85-0.97 a noisy 256-px clip shows where its big object is and what colour it has
(hundreds of pixels average the noise away) but not its outline; the caption's shape word is then
the only source of the outline. This measures the most that word can explain, with no model: for
the one object of a ``solo`` clip (radius log-uniform in the style's range, the caption's size
word known, the centre known), the variance of its coverage mask over the unknown radius,
orientation and shape, and the part of it the shape word explains (the variance between the seven
shapes' mean masks). Times the mean squared contrast between object and background colours (per
channel, pixels in [-1, 1], drawn from the style's own scenes) it is the reduction of a clean-clip
estimate's squared error, per pixel over the frame, that reading the word is worth; a velocity
loss at time t weighs that error by 1 / t^2.

Also with the orientation known (``solo-upright``): what remains of the shape word's worth when
the caption's object is rotated at random is the comparison.

    PYTHONPATH=src python benchmarks/shape_word_information.py \
        --out benchmarks/results/shape-word-information-cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from pasa.provenance import git_commit
from pasa.testbed.rendering import _coverage, _sdf, _sdf_lengths
from pasa.testbed.scene import COLORS, SCENE_STYLES, SHAPES, _size_word, make_scene

FRAME_PX = 256  # the testbed's clip side: one world unit


def mask_draws(shape: str, rotate: bool, draws: int, window: float, n: int, gen: torch.Generator):
    """``draws`` coverage masks (radius, mask) of ``shape`` centred in a ``window``-wide square
    of ``n`` x ``n`` samples, radius log-uniform over the solo range, orientation uniform or 0."""
    lo, hi = SCENE_STYLES["solo"].radius
    axis = torch.linspace(-window / 2, window / 2, n)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    px = torch.tensor(1.0 / FRAME_PX)
    out = []
    for _ in range(draws):
        u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        radius = math.exp(math.log(lo) + u[0] * (math.log(hi) - math.log(lo)))
        angle = 2 * math.pi * u[1] if rotate else 0.0
        c, s = math.cos(angle), math.sin(angle)
        lx, ly = c * x + s * y, -s * x + c * y
        out.append((radius, _coverage(_sdf(shape, lx, ly, _sdf_lengths(shape, radius)), px)))
    return out


def explained_by_shape(rotate: bool, draws: int, window: float, n: int, seed: int) -> dict:
    """Mask variance summed over the window (in shares of the frame) and the part of it between
    the shapes' means, averaged over the caption's size words (each weighted by its share)."""
    gen = torch.Generator().manual_seed(seed)
    per_shape = {shape: mask_draws(shape, rotate, draws, window, n, gen) for shape in SHAPES}
    cell = (window / n) ** 2  # frame share of one sample
    total = explained = 0.0
    for word in ("small ", "", "big "):  # the caption's size words (scene._size_word)
        groups = [
            torch.stack([m for r, m in per_shape[shape] if _size_word(r, "solo") == word])
            for shape in SHAPES
        ]
        weight = sum(len(g) for g in groups) / (draws * len(SHAPES))
        everything = torch.cat(groups)
        variance = everything.var(0, unbiased=False).sum().item() * cell
        within = statistics.mean(g.var(0, unbiased=False).sum().item() for g in groups) * cell
        total += weight * variance
        explained += weight * (variance - within)
    return {"mask_variance": round(total, 5), "explained_by_shape_word": round(explained, 5),
            "share": round(explained / total, 3)}  # fmt: skip


def colour_contrast(style: str, clips: int) -> float:
    """Mean over clips and channels of (object colour - background colour)^2, pixels in [-1, 1]
    (the named colours; a texture's second shade is left out)."""
    values = []
    for index in range(clips):
        scene = make_scene(30_000, index, style=style)
        obj, bg = COLORS[scene.objects[0].texture.color], COLORS[scene.background.color]
        values.append(sum((2 * (a - b)) ** 2 for a, b in zip(obj, bg, strict=True)) / 3)
    return statistics.mean(values)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=400, help="masks per shape")
    ap.add_argument("--clips", type=int, default=2000, help="scenes for the colour contrast")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.draws < 20 or args.clips < 1:
        ap.error("--draws must be at least 20 and --clips at least 1")
    window, n = 0.8, 160  # covers the largest object (radius 0.32, diamond reach 1.2 r)
    contrast = colour_contrast("solo", args.clips)
    cases = {}
    for name, rotate in (("solo (rotated at random)", True), ("solo-upright", False)):
        case = explained_by_shape(rotate, args.draws, window, n, args.seed)
        case["clean_clip_error_removed"] = round(case["explained_by_shape_word"] * contrast, 5)
        case["velocity_loss_removed_at_t"] = {
            f"t={t}": round(case["clean_clip_error_removed"] / t**2, 5) for t in (0.9, 0.95)
        }
        cases[name] = case
        print(name, json.dumps(case))
    print(f"mean squared object-background contrast: {contrast:.3f}")
    if args.out:
        record = {
            "benchmark": "shape_word_information",
            "what": __doc__.split("\n\n")[1].replace("\n", " "),
            "setup": {"draws_per_shape": args.draws, "window_world_units": window,
                      "samples_per_side": n, "contrast_clips": args.clips, "seed": args.seed,
                      "device": "cpu", "torch": torch.__version__, "commit": git_commit()},
            "mean_squared_contrast": round(contrast, 4),
            "cases": cases,
            "command": "PYTHONPATH=src python benchmarks/shape_word_information.py --out FILE",
        }  # fmt: skip
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
