"""Flow-matching sampler for the testbed model: a caption and a seed -> a clip.

Euler steps on the velocity by default; ``eta > 0`` re-draws part of the noise at every step
(ancestral sampling, below).

The transformer is a plain diffusers ``WanTransformer3DModel`` called with
``(hidden_states, timestep, encoder_hidden_states)``. Apply PASA to it first
(``pasa.apply(model, config)``) to sample sparse: every call runs inside
``model.cache_context("cond" | "uncond", step_index=i, num_inference_steps=N, sigma=t)``, so the
PASA hook counts steps, budgets and curvature exactly as in a diffusers pipeline, and the run ends
with ``model._reset_stateful_cache()`` (what pipelines call), which closes PASA's report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pasa.testbed.flow import NUM_TRAIN_TIMESTEPS, sigma_schedule
from pasa.testbed.model import TestbedConfig, latents_to_pixels
from pasa.testbed.scene import mix_seed

StepCallback = Callable[[int, float, torch.Tensor, torch.Tensor], None]


@dataclass
class StepInfo:
    """One Euler step: times ``t`` -> ``t_next``, the velocity's RMS, wall time."""

    step: int
    t: float
    t_next: float
    velocity_rms: float
    seconds: float


@dataclass
class SampleResult:
    """``frames``: ``(3, F, H, W)`` float32 in [-1, 1] on the CPU; ``steps``: per-step info."""

    frames: torch.Tensor
    steps: list[StepInfo] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)


def initial_noise(config: TestbedConfig, seed: int, *, frames: int, height: int, width: int):
    """``(1, C, F, h, w)`` float32 latent noise of ``seed``, drawn on the CPU (device-independent)."""
    f = config.pixel_factor
    shape = (1, config.latent_channels, frames, height // f, width // f)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    config: TestbedConfig,
    caption: str,
    *,
    seed: int = 0,
    num_steps: int = 20,
    shift: float = 3.0,
    guidance: float = 1.0,
    eta: float = 0.0,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    on_step: StepCallback | None = None,
) -> SampleResult:
    """Generate one clip.

    Args:
        model: the testbed ``WanTransformer3DModel`` (PASA applied or not), on its device.
        config: the model's :class:`TestbedConfig` (codec, text encoder, default size).
        caption: text prompt; same seed and caption give the same starting noise.
        guidance: classifier-free guidance scale; 1 runs only the conditional call.
        eta: stochasticity in [0, 1]. Each step splits ``x_t`` into the predicted clean clip
            ``x0 = x_t - t v`` and noise ``e = x_t + (1 - t) v`` and moves to
            ``(1 - t') x0 + t' e'``. With ``e' = e`` that is exactly the Euler step (``eta = 0``,
            the default); ``e' = sqrt(1 - eta^2) e + eta z`` mixes in fresh noise ``z`` (drawn on
            the CPU from ``seed``, so device-independent), ``eta = 1`` re-draws it entirely
            (ancestral sampling), which corrects errors the trajectory has accumulated.
        frames, height, width: clip size in frames and pixels (default: the config's).
        on_step: ``callback(step, t, x_t, v)`` after each model evaluation (latents ``x_t`` and
            guided velocity ``v``, both ``(1, C, F, h, w)``).
    Returns:
        :class:`SampleResult` with the clip ``(3, F, H, W)`` and the per-step info.
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    frames, height, width = frames or config.frames, height or config.height, width or config.width
    encoder = config.text_encoder()
    cond, _ = encoder([caption], device=device)
    uncond, _ = encoder([""], device=device)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta} must be in [0, 1]")
    x = initial_noise(config, seed, frames=frames, height=height, width=width).to(device)
    fresh = torch.Generator().manual_seed(mix_seed(seed, 0, salt=0x5EED)) if eta > 0 else None
    times = sigma_schedule(num_steps, shift)
    steps: list[StepInfo] = []
    try:
        for i in range(num_steps):
            t, t_next = float(times[i]), float(times[i + 1])
            start = time.perf_counter()
            timestep = torch.full((1,), t * NUM_TRAIN_TIMESTEPS, device=device)
            v = _velocity(model, x, timestep, cond, dtype, name="cond", step=i, n=num_steps, t=t)
            if guidance != 1.0:
                v_u = _velocity(
                    model, x, timestep, uncond, dtype, name="uncond", step=i, n=num_steps, t=t
                )
                v = v_u + guidance * (v - v_u)
            if on_step is not None:
                on_step(i, t, x, v)
            if fresh is None or t_next == 0.0:
                x = x + (t_next - t) * v
            else:
                z = torch.randn(x.shape, generator=fresh).to(device)
                x0, noise = x - t * v, x + (1 - t) * v
                noise = (1 - eta * eta) ** 0.5 * noise + eta * z
                x = (1 - t_next) * x0 + t_next * noise
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rms = float(v.pow(2).mean().sqrt())
            steps.append(StepInfo(i, t, t_next, rms, time.perf_counter() - start))
    finally:
        reset = getattr(model, "_reset_stateful_cache", None)
        if reset is not None:
            reset()  # ends the generation for stateful hooks (PASA's report), as pipelines do
    pixels = latents_to_pixels(x.float(), config.pixel_factor)[0].clamp(-1, 1).cpu()
    return SampleResult(pixels, steps)


def _velocity(model, x, timestep, text, dtype, *, name: str, step: int, n: int, t: float):
    """One transformer call inside the cache context the PASA hook reads."""
    context = getattr(model, "cache_context", None)
    kwargs = dict(
        hidden_states=x.to(dtype),
        timestep=timestep,
        encoder_hidden_states=text.to(dtype),
        return_dict=False,
    )
    if context is None:
        return model(**kwargs)[0].float()
    with context(name, step_index=step, num_inference_steps=n, sigma=t, timestep=t * 1000):
        return model(**kwargs)[0].float()


def frame_strip(frames_uint8: torch.Tensor, every: int = 3) -> torch.Tensor:
    """``(F, H, W, 3)`` uint8 frames -> one ``(H, W', 3)`` row of every ``every``-th frame,
    separated by 2-pixel white gaps."""
    picked = list(frames_uint8[::every])
    gap = torch.full((frames_uint8.shape[1], 2, 3), 255, dtype=torch.uint8)
    parts = [p for f in picked for p in (f, gap)][:-1]
    return torch.cat(parts, dim=1)


def main(argv: list[str] | None = None) -> int:
    """``python -m pasa.testbed.sample``: dense samples of held-out captions as PNG frame strips."""
    import argparse
    import json
    from pathlib import Path

    from PIL import Image

    from pasa.eval.generate import eval_captions, load_model, resolve_device
    from pasa.eval.metrics import to_uint8
    from pasa.testbed.model import DEFAULT_CHECKPOINT, describe_checkpoint
    from pasa.testbed.scene import SCENE_STYLE_NAMES

    parser = argparse.ArgumentParser(prog="python -m pasa.testbed.sample", description=main.__doc__)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--captions", type=int, default=3, help="held-out captions (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="classifier-free guidance scale (default 1: conditional only)",
    )
    parser.add_argument(
        "--eta",
        type=float,
        default=0.0,
        help="fresh noise per step, 0 (Euler, default) to 1 (ancestral sampling)",
    )
    parser.add_argument("--size", type=int, help="clip side in pixels (default: the model's)")
    parser.add_argument(
        "--scene-style",
        choices=SCENE_STYLE_NAMES,
        help="take the held-out captions of clips in this style (default: the model's own)",
    )
    parser.add_argument("--every", type=int, default=3, help="keep every n-th frame (default 3)")
    parser.add_argument("--out", default="samples", help="folder for PNGs and captions.json")
    parser.add_argument("--device", help="default: cuda if available")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    model, config, record = load_model(args.checkpoint, device)
    if args.guidance <= 0 or (args.size is not None and args.size % (2 * config.pixel_factor)):
        parser.error(f"need --guidance > 0 and --size a multiple of {2 * config.pixel_factor}")
    if not 0 <= args.eta <= 1:
        parser.error("need 0 <= --eta <= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = {"checkpoint": describe_checkpoint(args.checkpoint), "steps": args.steps,
             "seed": args.seed, "guidance": args.guidance, "eta": args.eta,
             "size": args.size or config.height,
             "training": record.get("training"), "samples": []}  # fmt: skip
    settings = config.clip_settings(args.scene_style)
    index["scene_style"] = settings["scene_style"]
    for i, caption in enumerate(eval_captions(args.captions, **settings)):
        result = sample(
            model,
            config,
            caption,
            seed=args.seed,
            num_steps=args.steps,
            guidance=args.guidance,
            eta=args.eta,
            height=args.size,
            width=args.size,
        )
        strip = frame_strip(to_uint8(result.frames), args.every)
        name = f"sample_{i}.png"
        Image.fromarray(strip.numpy()).save(out / name)
        index["samples"].append({"file": name, "caption": caption})
        print(f"{name}: {caption}")
    (out / "captions.json").write_text(json.dumps(index, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
