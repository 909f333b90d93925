"""Do object words pay once a caption says where each object is? Small Wan models on the CPU.

The testbed checkpoints read the background words of their captions and hardly any object word:
swapping every shape word for another changes their loss by less than 0.13%, colours and textures
by at most 0.5% (``docs/testbed.md``, "The object words are not used"). One reason may be that a
caption never says *where* an object is, so at high noise a colour or shape word cannot be put
anywhere. This experiment trains the same small model twice from scratch on the same ``bold``
clips, seeds and steps, changing only the object sentences:

- ``scene_first``: the captions as the trainer writes them;
- ``placed``: each object's sentence also names the ninth of the frame where the object starts,
  after its shape: "a big red striped circle at the top left bounces up-left";
- ``shape_only`` / ``colour_only`` (oracles, for one-object styles such as ``solo-fixed``): the
  caption is the object's size and shape words alone ("big circle.") or its colour alone
  ("red."), so the whole-caption gain is what that word is worth to the model.

At the end it measures, on held-out clips, the loss gain of the true captions over shuffled ones
and of the true object words over swapped ones (shape, colour, texture; and, for ``placed``, the
place words: :func:`pasa.eval.caption_probe.swap_object_words` plus a place swap here), all
``(swapped - true) / swapped``.

    PYTHONPATH=src python benchmarks/testbed_place_experiment.py \\
        --out benchmarks/results/testbed-place-experiment-cpu.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from _diffusers_common import write_json
from _small_text_models import flow_loss, train_small_model

from pasa.provenance import git_commit
from pasa.testbed.scene import SCENE_STYLE_NAMES, SCENE_STYLES

VARIANTS = ("scene_first", "placed", "shape_only", "colour_only")
SETUP = dict(
    frames=4, height=64, width=64, num_layers=2, num_heads=2, head_dim=32, ffn_dim=256,
    freq_dim=64, text_dim=64, max_text_tokens=96, text_context="bigram",
    caption_order="scene_first", scene_style="bold",
)  # fmt: skip
DATA_SEED = 11
ROWS, COLUMNS = ("top", "", "bottom"), ("left", "", "right")
# Each place becomes the one across the frame (top left <-> bottom right, middle stays middle,
# so the middle is left out of the swap's gain by construction; it is one ninth of the objects).
_OPPOSITE = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}


def place_words(start: tuple[float, float]) -> str:
    """``"at the top left"`` ... ``"in the middle"``: the ninth of the frame holding ``start``
    (an object's centre at frame 0, in frame units; the camera starts unzoomed at the centre)."""
    x, y = (min(max(v, 0.0), 0.999) for v in start)
    row, column = ROWS[int(y * 3)], COLUMNS[int(x * 3)]
    where = " ".join(w for w in (row, column) if w)
    return f"at the {where}" if where else "in the middle"


def placed_caption(scene) -> str:
    """The trainer's scene-first caption with each object's place after its shape word."""
    from pasa.testbed.scene import SHAPES, caption

    sentences = caption(scene, "scene_first").split(". ")
    objects = list(reversed(scene.objects))
    first = len(sentences) - len(objects)
    for k, obj in enumerate(objects):
        words = sentences[first + k].split(" ")
        at = next(i for i, w in enumerate(words) if w in SHAPES) + 1
        sentences[first + k] = " ".join([*words[:at], place_words(obj.start), *words[at:]])
    return ". ".join(sentences)


def oracle_caption(scene, kind: str) -> str:
    """The caption's first object's (the front one's) size and shape words (``kind="shape"``)
    or its colour (``"colour"``)."""
    from pasa.testbed.scene import _size_word

    obj = scene.objects[-1]
    if kind == "colour":
        return f"{obj.texture.color}."
    return f"{_size_word(obj.radius, scene.style)}{obj.shape}."


def fix_position_gain(model) -> None:
    """The position code at gain 1, not trained: a fixed sinusoidal code of each token's frame,
    row and column (unit RMS; pasa/testbed/model.py) added to the patch embedding's output. Wan
    has none: its 3D rotary code acts inside self-attention on relative offsets only, so without
    it a token can hardly tell where in the frame it is when the input is pure noise."""
    model.patch_embedding.position_gain.data.fill_(1.0)
    model.patch_embedding.position_gain.requires_grad_(False)


def swap_places(caption: str) -> str:
    """Every place word of the object sentences for the opposite side."""
    from pasa.eval.caption_probe import map_object_words

    return map_object_words(caption, _OPPOSITE)


def run_variant(
    variant: str,
    clips: int,
    held: int,
    steps: int,
    batch: int,
    seed: int,
    size: int,
    styles: tuple[str, ...],
    pixel_factor: int = 4,
    pure_noise_share: float = 0.0,
    absolute_position: bool = False,
    device: str = "cpu",
    num_layers: int = 2,
    max_minutes: float | None = None,
    samples_out: Path | None = None,
    threads: int = 1,
) -> dict:
    """Train one model from scratch on ``size`` px clips of ``styles`` (more than one: a
    curriculum, ``clips`` clips of each style trained in that order, one equal stage of the steps
    each); the held-out gains at the end, on ``held`` clips of the last style (and of each style,
    under ``gains_by_style``, for a curriculum). With ``samples_out``, a PNG there of held-out
    clips of the last style over dense samples of their captions (:func:`save_samples`)."""
    from pasa.testbed.model import TestbedConfig, pixels_to_latents
    from pasa.testbed.rendering import render_batch
    from pasa.testbed.scene import caption, make_scene

    torch.set_num_threads(threads)
    code = "sinusoidal" if absolute_position else "none"
    config = TestbedConfig(**dict(SETUP, height=size, width=size, scene_style=styles[-1],
                                  pixel_factor=pixel_factor, position_code=code,
                                  num_layers=num_layers))  # fmt: skip
    # per style: clips 0 .. clips-1 train, the next held are held out (the same draws in every
    # style, so the same objects, placed as each style says)
    scenes = {style: [make_scene(DATA_SEED, i, frames=config.frames, style=style)
                      for i in range(clips + held)] for style in styles}  # fmt: skip
    latents = {style: pixels_to_latents(torch.cat([
        render_batch(chosen[i : i + 64], frames=config.frames, height=config.height,
                     width=config.width) for i in range(0, len(chosen), 64)]),
        config.pixel_factor).to(device) for style, chosen in scenes.items()}  # fmt: skip
    write = {
        "placed": placed_caption,
        "shape_only": lambda s: oracle_caption(s, "shape"),
        "colour_only": lambda s: oracle_caption(s, "colour"),
    }.get(variant, lambda s: caption(s, "scene_first"))
    captions = {style: [write(s) for s in chosen] for style, chosen in scenes.items()}
    encoder = config.text_encoder()
    text = {style: encoder(c)[0].to(device) for style, c in captions.items()}
    start = time.perf_counter()

    def progress(step: int, model, losses) -> None:
        print(f"{variant} step {step} loss {sum(losses[-100:]) / len(losses[-100:]):.4f} "
              f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip

    model, losses = train_small_model(config, torch.cat([x[:clips] for x in latents.values()]),
                                      torch.cat([c[:clips] for c in text.values()]), steps=steps,
                                      batch=batch, seed=seed, every=max(steps // 10, 1),
                                      on_every=progress,
                                      pure_noise_share=pure_noise_share,
                                      prepare=fix_position_gain if absolute_position
                                      else None,
                                      max_seconds=None if max_minutes is None
                                      else 60 * max_minutes,
                                      stages=len(styles))  # fmt: skip
    model.eval()
    gains = {style: held_out_gains(model, encoder, latents[style][clips:],
                                   text[style][clips:], captions[style][clips:],
                                   placed=variant == "placed")
             for style in styles}  # fmt: skip
    result = {
        "variant": variant,
        "example_caption": captions[styles[-1]][clips],
        "seconds": round(time.perf_counter() - start, 1),
        "steps_done": len(losses),
        "final_train_loss_last_100": round(sum(losses[-100:]) / len(losses[-100:]), 5),
        "gains": gains[styles[-1]],
    }
    if samples_out is not None:
        name = f"{variant}-{styles[-1]}-{'code' if absolute_position else 'nocode'}.png"
        result["samples"] = save_samples(
            model,
            config,
            latents[styles[-1]][clips:],
            captions[styles[-1]][clips:],
            Path(samples_out) / name,
        )
    if len(styles) > 1:
        result.update(curriculum=list(styles),
                      stage_reached=(len(losses) - 1) * len(styles) // steps + 1,
                      gains_by_style=gains)  # fmt: skip
    return result


def save_samples(model, config, held_x, held_captions, path: Path, count: int = 6) -> dict:
    """For the first ``count`` held-out clips: the clip's frames (upper row) over a dense sample
    of its caption (seed 0, 20 steps, no guidance; lower row), 4x enlarged, one pair of rows per
    clip, as a PNG at ``path``. Returns the file's name and the captions."""
    from PIL import Image

    from pasa.eval.metrics import to_uint8
    from pasa.testbed.model import latents_to_pixels
    from pasa.testbed.sample import sample

    def strip(pixels: torch.Tensor) -> torch.Tensor:  # (3, F, H, W) in [-1, 1] -> (H, F*W, 3)
        return torch.cat(list(to_uint8(pixels)), dim=1)

    rows = []
    for k in range(min(count, held_x.shape[0])):
        truth = latents_to_pixels(held_x[k : k + 1].float().cpu(), config.pixel_factor)[0]
        drawn = sample(model, config, held_captions[k], seed=0).frames
        rows += [strip(truth), strip(drawn), torch.full((2, truth.shape[1] * truth.shape[3], 3),
                                                        255, dtype=torch.uint8)]  # fmt: skip
    image = torch.cat(rows[:-1]).repeat_interleave(4, 0).repeat_interleave(4, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.numpy()).save(path)
    return {"file": path.name, "captions": list(held_captions[:count])}


def held_out_gains(model, encoder, held_x, held_text, held_captions, *, placed: bool) -> dict:
    """Per time, the loss with the true captions and each swap's relative gain over it."""
    from pasa.eval.caption_probe import SWAPS, swap_object_words

    held = held_x.shape[0]
    variants = {"shuffled": None, **{k: (lambda c, k=k: swap_object_words(c, k)) for k in SWAPS}}
    if placed:
        variants["place"] = swap_places
    others = {name: held_text.roll(1, 0) if swap is None
              else encoder([swap(c) for c in held_captions])[0].to(held_x.device)
              for name, swap in variants.items()}  # fmt: skip
    gains = {}
    with torch.no_grad():
        for tv in (1.0, 0.9, 0.6, 0.3):
            t = torch.full((held,), tv)
            true = flow_loss(model, held_x, held_text, t, 0).item()
            row = {"true": round(true, 5)}
            for name, other in others.items():
                swapped = flow_loss(model, held_x, other, t, 0).item()
                row[name] = round((swapped - true) / swapped, 5)
            gains[f"t={tv}"] = row
    return gains


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--clips", type=int, default=3000)
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64, help="clip side in pixels (a multiple of 8)")
    ap.add_argument(
        "--scene-style",
        default="bold",
        choices=SCENE_STYLE_NAMES,
        help="the clips' style (pasa/testbed/scene.py), the same for every variant",
    )
    ap.add_argument(
        "--curriculum",
        nargs="+",
        default=None,
        choices=list(SCENE_STYLES),
        metavar="STYLE",
        help="train on these styles in turn (--clips of each, the steps split equally) instead "
        "of --scene-style; the gains are measured on held-out clips of each",
    )
    ap.add_argument(
        "--pixel-factor",
        type=int,
        default=4,
        help="the pixel codec's factor (4: 192 pixel values per token, three times the models' "
        "width of 64, so they cannot carry the noise; 2: 48, which they can)",
    )
    ap.add_argument(
        "--pure-noise-share", type=float, default=0.0, help="share of training times set to 1"
    )
    ap.add_argument(
        "--absolute-position",
        action="store_true",
        help="add a fixed code of each token's place to the patch embedding (Wan has none)",
    )
    ap.add_argument("--jobs", type=int, default=2, help="variants trained at once")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each variant")
    ap.add_argument("--device", default="cpu", help="where the models train (cpu, cuda, ...)")
    ap.add_argument("--num-layers", type=int, default=2, help="transformer blocks (default 2)")
    ap.add_argument(
        "--max-minutes", type=float, default=None, help="stop training early after this long"
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--samples-out",
        type=Path,
        default=None,
        help="also save, per variant, a PNG here of held-out clips over dense samples of their "
        "captions",
    )
    args = ap.parse_args(argv)
    if args.steps < 10 or args.held_out < 2 or args.size < 8 or args.size % 8:
        ap.error("--steps must be at least 10, --held-out at least 2, --size a multiple of 8")
    if args.pixel_factor < 1 or args.size % (2 * args.pixel_factor):
        ap.error("--size must be a multiple of 2 * --pixel-factor")
    if not 0.0 <= args.pure_noise_share <= 1.0:
        ap.error("--pure-noise-share must be in [0, 1]")
    if args.threads < 1 or args.jobs < 1:
        ap.error("--threads and --jobs must be at least 1")
    if args.curriculum is not None and len(args.curriculum) < 2:
        ap.error("--curriculum needs at least two styles (one style: --scene-style)")
    styles = tuple(args.curriculum or (args.scene_style,))
    work = (args.clips, args.held_out, args.steps, args.batch, args.seed, args.size,
            styles, args.pixel_factor, args.pure_noise_share,
            args.absolute_position, args.device, args.num_layers, args.max_minutes,
            args.samples_out, args.threads)  # fmt: skip
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked workers
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        results = list(
            pool.map(run_variant, args.variants, *[[w] * len(args.variants) for w in work])
        )
    setup = dict(SETUP, height=args.size, width=args.size, scene_style=styles[-1],
                 pixel_factor=args.pixel_factor, pure_noise_share=args.pure_noise_share,
                 absolute_position=args.absolute_position, num_layers=args.num_layers,
                 max_minutes=args.max_minutes, curriculum=args.curriculum, threads=args.threads,
                 clips=args.clips,
                 held_out=args.held_out, steps=args.steps)  # fmt: skip
    setup.update(batch=args.batch, seed=args.seed, lr=1e-3, caption_dropout=0.1)
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    setup.update(data_seed=DATA_SEED, device=device, torch=torch.__version__, commit=git_commit())
    for r in results:
        print(r["variant"], json.dumps(r["gains"]))
    if args.out:
        write_json(
            {"benchmark": "testbed_place_experiment", "setup": setup, "results": results}, args.out
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
