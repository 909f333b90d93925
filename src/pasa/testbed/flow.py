"""Rectified flow (flow matching) conventions shared by the trainer and the sampler.

``x_t = (1 - t) x_0 + t * noise`` for ``t`` in [0, 1] (t = 1 is pure noise); the model predicts the
velocity ``v = noise - x_0`` and sees the timestep ``1000 t`` (Wan's convention). Sampling runs Euler
steps from t = 1 to t = 0 on a shifted grid ``t' = s t / (1 + (s - 1) t)`` (SD3 / Wan ``shift``),
which spends more steps at high noise for large token counts; training draws ``t`` from the same
shift applied to a logit-normal (or uniform) ``t``.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``s t / (1 + (s - 1) t)``: the identity for ``shift == 1``."""
    return shift * t / (1 + (shift - 1) * t)


def sample_time(
    batch: int,
    *,
    generator: torch.Generator,
    distribution: str = "logit_normal",
    shift: float = 1.0,
    pure_noise_share: float = 0.0,
) -> torch.Tensor:
    """``(batch,)`` training times in (0, 1], drawn on the CPU from ``generator``: the shifted
    distribution, clamped to [1e-4, 1 - 1e-4], and each time set to 1 (pure noise) with probability
    ``pure_noise_share``.

    Why the share: the sampler's first step is at t = 1, where ``x_t`` holds nothing of the clip
    and everything the model draws (background colour, where objects are) has to come from the
    caption. The shifted logit-normal puts about 3% of the times above 0.95, and from t = 0.97 on
    a 256-px clip already shows its colours through the noise, so a model can fit those times
    without reading its caption and then samples layouts and colours from the noise (measured in
    ``docs/testbed.md``, "Pure noise"). Drawing no extra numbers when the share is 0 keeps runs
    without it bit for bit as before."""
    if not 0.0 <= pure_noise_share <= 1.0:
        raise ValueError(f"pure_noise_share={pure_noise_share} must be in [0, 1]")
    if distribution == "logit_normal":
        t = torch.sigmoid(torch.randn(batch, generator=generator))
    elif distribution == "uniform":
        t = torch.rand(batch, generator=generator)
    else:
        raise ValueError(f"time distribution {distribution!r}: use 'logit_normal' or 'uniform'")
    t = shift_time(t, shift).clamp(1e-4, 1 - 1e-4)
    if pure_noise_share > 0:
        t = torch.where(torch.rand(batch, generator=generator) < pure_noise_share, 1.0, t)
    return t


def sigma_schedule(num_steps: int, shift: float) -> torch.Tensor:
    """``(num_steps + 1,)`` float64 times from 1 down to 0 (shifted), for Euler sampling."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    return shift_time(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)


def noisy_input(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_t`` and the velocity target ``noise - x0`` for times ``t`` of shape ``(B,)``."""
    tb = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tb) * x0 + tb * noise, noise - x0
