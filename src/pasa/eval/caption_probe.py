"""Does a testbed checkpoint use its captions? Two numbers per checkpoint, no sampling needed.

- **loss gain**: on held-out training-distribution clips, the flow-matching loss with the true
  captions against the loss with another clip's caption (rolled by one), ``(shuffled - true) /
  shuffled`` per noise level. 0 when the model ignores its text; a model that follows the
  background colour alone already gains several percent at high noise. t = 1 (pure noise, the
  sampler's first step) is where the caption is all the model has: a small gain there means
  samples take their colours and layout from the noise.
- **attribute gains**: the same loss with one kind of word swapped in the object sentences only
  (every shape for another shape, colour for colour, texture for texture; the background's
  words stay), ``(swapped - true) / swapped`` per noise level: how much of what the captions say
  about the objects the model uses. A shape covers fewer pixels than the colour filling it, so
  even a model that follows both gains less from shapes; compare checkpoints, not the kinds.
- **word attention**: per layer, the share of the cross-attention's softmax mass that lands on
  word positions rather than padding (uniform attention would give words / positions).
- with ``--colours``: the mean colour of clips sampled from one caption whose background colour
  word alone changes (a model that follows its captions moves it toward each colour).

    python -m pasa.eval.caption_probe                      # the shipped checkpoint, on the CPU
    python -m pasa.eval.caption_probe other.safetensors --json caption_probe.json --colours
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from pasa.testbed.data import make_batch
from pasa.testbed.flow import NUM_TRAIN_TIMESTEPS, noisy_input
from pasa.testbed.model import (
    DEFAULT_CHECKPOINT,
    describe_checkpoint,
    load_testbed,
    pixels_to_latents,
)
from pasa.testbed.scene import COLORS, SCENE_STYLE_NAMES, SHAPES, TEXTURES

# A data stream neither training (seed 0) nor the suite's captions use.
PROBE_DATA_SEED = 30_000


def _word_attention(model: torch.nn.Module, run, mask: torch.Tensor) -> list[float]:
    """Per layer: mean cross-attention mass on the positions where ``mask`` is True."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def grab(i):
        def hook(_module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            seen[i] = (hidden, text)

        return hook

    handles = [
        block.attn2.register_forward_pre_hook(grab(i), with_kwargs=True)
        for i, block in enumerate(model.blocks)
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    shares = []
    for i, block in enumerate(model.blocks):
        attn, (hidden, text) = block.attn2, seen[i]
        q = attn.norm_q(attn.to_q(hidden)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        k = attn.norm_k(attn.to_k(text)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        weights = torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
        on_words = (weights * mask[:, None, None, :].to(weights.dtype)).sum(-1)  # (B, H, S)
        shares.append(round(float(on_words.mean()), 4))
    return shares


@torch.no_grad()
def caption_use_report(
    checkpoint: Any = None,
    *,
    clips: int = 8,
    times: tuple[float, ...] = (1.0, 0.9, 0.6, 0.3),
    size: int = 128,
    frames: int | None = None,
    device: str = "cpu",
    scene_style: str | None = None,
) -> dict[str, Any]:
    """Loss gain of true over shuffled captions per noise level, the gain of each kind of object
    word over swapped ones, and word attention per layer. ``scene_style``: the clips' style
    (default: the checkpoint's own), to compare checkpoints trained on different styles on the
    same clips."""
    if clips < 2:
        raise ValueError(
            f"clips must be at least 2 (captions are shuffled among them), got {clips}"
        )
    path = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    model, config, record = load_testbed(path, device=device)
    frames = frames or config.frames
    settings = config.clip_settings(scene_style)
    pixels, captions = make_batch(
        range(clips), data_seed=PROBE_DATA_SEED, frames=frames, height=size, width=size, **settings
    )
    x0 = pixels_to_latents(pixels, config.pixel_factor).to(device)
    encoder = config.text_encoder()
    text, mask = encoder(captions, device=device)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(device)

    def loss(t: float, cond: torch.Tensor) -> float:
        tt = torch.full((clips,), t, device=device)
        xt, target = noisy_input(x0, eps, tt)
        v = model(hidden_states=xt, timestep=tt * NUM_TRAIN_TIMESTEPS, encoder_hidden_states=cond,
                  return_dict=False)[0]  # fmt: skip
        return float(((v - target) ** 2).mean())

    swapped = {kind: encoder([swap_object_words(c, kind) for c in captions], device=device)[0]
               for kind in SWAPS}  # fmt: skip
    gains, attributes = {}, {}
    for t in times:
        true, shuffled = loss(t, text), loss(t, text.roll(1, 0))
        gains[f"t={t}"] = {
            "true": round(true, 5),
            "shuffled": round(shuffled, 5),
            "gain": round((shuffled - true) / shuffled, 5),
        }
        attributes[f"t={t}"] = {
            kind: round((other - true) / other, 5)
            for kind, other in ((k, loss(t, cond)) for k, cond in swapped.items())
        }
    words = _word_attention(model, lambda: loss(0.6, text), mask)
    return {
        "checkpoint": describe_checkpoint(path),
        "training steps": (record.get("training") or {}).get("steps"),
        "text_context": config.text_context,
        "caption_order": config.caption_order,
        "scene_style": config.scene_style,
        "clips_scene_style": settings["scene_style"],
        "clips": clips,
        "clip": f"{frames} frames x {size} x {size}",
        "data_seed": PROBE_DATA_SEED,
        "loss_gain": gains,
        "attribute_gain": attributes,
        "word_positions_share": round(float(mask.float().mean()), 4),
        "word_attention_per_layer": words,
    }


# Each word of a kind becomes the one `shift` places on in its list: shapes that look alike
# (circle / ellipse, square / diamond) never swap for each other, nor colours that are near.
SWAPS = {"shape": (SHAPES, 3), "colour": (tuple(COLORS), 6), "texture": (TEXTURES, 2)}


def swap_object_words(caption: str, kind: str) -> str:
    """``caption`` with every ``kind`` word (:data:`SWAPS`) of its object sentences replaced by
    another of its kind; the count and background stay."""
    words, shift = SWAPS[kind]
    return map_object_words(
        caption, {w: words[(i + shift) % len(words)] for i, w in enumerate(words)}
    )


def map_object_words(caption: str, mapping: dict[str, str]) -> str:
    """``caption`` with every word of its object sentences (those that start with "a ") that is
    a key of ``mapping`` replaced by its value; the other sentences stay as they are."""
    sentences = []
    for sentence in caption.split(". "):
        if sentence.startswith("a "):
            sentence = " ".join(mapping.get(w, w) for w in sentence.split(" "))
        sentences.append(sentence)
    return ". ".join(sentences)


_COLOUR_OBJECT = "a big white circle stays still."
_COLOUR_SCENE = "one shape. the camera stays still over a striped {} background."


def colour_caption(colour: str, order: str) -> str:
    """One big white circle over a striped ``colour`` background, in the caption ``order`` of
    :func:`pasa.testbed.scene.caption` (a model's ``config.caption_order``)."""
    parts = [_COLOUR_OBJECT, _COLOUR_SCENE.format(colour)]
    return " ".join(parts if order == "objects_first" else parts[::-1])


@torch.no_grad()
def background_colours(
    checkpoint: Any = None,
    *,
    colours: tuple[str, ...] = ("blue", "yellow", "red", "green"),
    guidances: tuple[float, ...] = (1.0, 4.0),
    steps: int = 12,
    size: int = 128,
    frames: int = 8,
    seed: int = 0,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Mean RGB (0..1) of clips from :func:`colour_caption` (in the checkpoint's caption order)
    with each background colour, one seed."""
    from pasa.testbed.sample import sample
    from pasa.testbed.scene import COLORS

    model, config, _ = load_testbed(checkpoint or DEFAULT_CHECKPOINT, device=device)
    rows = []
    for colour in colours:
        for guidance in guidances:
            text = colour_caption(colour, config.caption_order)
            clip = sample(model, config, text, seed=seed,
                          num_steps=steps, guidance=guidance, frames=frames, height=size,
                          width=size).frames  # fmt: skip
            rgb = ((clip + 1) / 2).mean(dim=(1, 2, 3))
            rows.append({"colour": colour, "guidance": guidance, "caption": text,
                         "target_rgb": COLORS[colour],
                         "mean_rgb": [round(float(x), 4) for x in rgb]})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pasa.eval.caption_probe", description=__doc__.splitlines()[0]
    )
    parser.add_argument("checkpoint", nargs="?", default=None, help="default: the shipped one")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="clip side in pixels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument(
        "--colours", action="store_true", help="also sample the background-colour check"
    )
    parser.add_argument(
        "--scene-style",
        choices=SCENE_STYLE_NAMES,
        help="draw the probe's clips in this style (default: the checkpoint's own)",
    )
    args = parser.parse_args(argv)
    try:
        report = caption_use_report(
            args.checkpoint,
            clips=args.clips,
            size=args.size,
            device=args.device,
            scene_style=args.scene_style,
        )
        if args.colours:
            report["background_colours"] = background_colours(
                args.checkpoint, size=args.size, device=args.device
            )
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"caption_probe: {exc}", file=sys.stderr)
        return 2
    for key, row in report["loss_gain"].items():
        print(f"{key}: loss true {row['true']:.4f}, shuffled {row['shuffled']:.4f}, "
              f"gain {row['gain']:+.2%}")  # fmt: skip
    for key, row in report["attribute_gain"].items():
        print(f"{key}: gain of the object words over swapped ones: "
              + ", ".join(f"{k} {g:+.2%}" for k, g in row.items()))  # fmt: skip
    print(f"word positions: {report['word_positions_share']:.0%} of the text tokens; "
          "cross-attention mass on words per layer: "
          + ", ".join(f"{w:.2f}" for w in report["word_attention_per_layer"]))  # fmt: skip
    for row in report.get("background_colours", []):
        print(f"background {row['colour']:6s} guidance {row['guidance']}: mean RGB "
              f"{row['mean_rgb']} (target {row['target_rgb']})")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
