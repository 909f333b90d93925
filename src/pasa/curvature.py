"""Trajectory curvature and the allocator that turns it into per-step densities (DESIGN.md §3).

The sampler's trajectory ``x(sigma)`` has calm stretches and sharp turns. Its curvature at step t is
``kappa_t = |a_t| / |v_t|`` with ``a_t = (v_t - v_{t-1}) / (sigma_t - sigma_{t-1})``.
:func:`allocate_densities` turns a curvature series into one density per step with a given mean;
the budgets in :mod:`pasa.budget` use both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

WEIGHT_POWER = 0.5  # density grows like sqrt(kappa / median kappa) between the clips
WEIGHT_CLIP = (0.1, 10.0)  # so one step gets at most 100x another's share before [min, max]
EPS = 1e-12
# A dense step may not push any other step below this share of the mean density: at mean 0.10
# over 20 steps one dense step would leave the other 19 at 0.053 (the testbed's generations then
# lost 5-6 dB PSNR against dense beside a fixed 0.10; docs/results.md).
DENSE_REST_FLOOR = 0.75


def dense_rest_floor(mean_density: float, min_density: float) -> float:
    """The least every other step must keep when a step runs dense:
    ``max(min_density, DENSE_REST_FLOOR * mean_density)``."""
    return max(min_density, DENSE_REST_FLOOR * mean_density)


def curvature(sigma_prev: float, sigma: float, v_prev: torch.Tensor, v: torch.Tensor) -> float:
    """Relative curvature ``|a| / |v|`` of the trajectory between two steps.

    Args:
        sigma_prev, sigma: noise levels of the previous and the current step.
        v_prev, v: velocities (or any direction estimate) at those steps, same shape, any layout,
            e.g. ``(B, C, F, H, W)``; flattened, computed in float64 (float32 on MPS).

    Returns:
        ``|(v - v_prev) / (sigma - sigma_prev)| / |v|``; the plain difference when the sigmas are
        equal, 0.0 when ``|v| == 0``.
    """
    if v_prev.shape != v.shape:
        raise ValueError(f"curvature: v_prev shape {tuple(v_prev.shape)} != v {tuple(v.shape)}")
    dtype = torch.float32 if v.device.type == "mps" else torch.float64
    v_now = v.detach().reshape(-1).to(dtype)  # (N,)
    dv = v_now - v_prev.detach().reshape(-1).to(device=v.device, dtype=dtype)  # (N,)
    v_norm = float(torch.linalg.vector_norm(v_now))
    if v_norm == 0.0:
        return 0.0
    ds = float(sigma) - float(sigma_prev)
    a_norm = float(torch.linalg.vector_norm(dv))
    if ds != 0.0:
        a_norm /= abs(ds)
    return a_norm / v_norm


class CurvatureTracker:
    """Per-run curvature history, fed one denoising step at a time.

    Keeps only the previous step's velocity (or, without velocities, the previous latent and its
    finite-difference velocity), never the whole trajectory.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the run: the next :meth:`update` is a first step again."""
        self.sigmas: list[float] = []
        self.curvatures: list[float | None] = []
        self._prev_v: torch.Tensor | None = None
        self._prev_x: torch.Tensor | None = None
        self._prev_vhat: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    def update(self, sigma: float, x_t: torch.Tensor, v_t: torch.Tensor | None) -> float | None:
        """Record one step and return its curvature, or None while there is no history.

        Args:
            sigma: the step's noise level.
            x_t: the latent the model saw at this step, e.g. ``(B, C, F, H, W)``.
            v_t: the model's velocity, same shape as ``x_t``; None to estimate it from the latents
                instead: ``vhat_t = (x_t - x_{t-1}) / (sigma_t - sigma_{t-1})``, and kappa is the
                second difference of the latents relative to the first, i.e.
                ``curvature(sigma_{t-1}, sigma_t, vhat_{t-1}, vhat_t)``. That path needs two
                previous steps and lags one step behind (for an Euler sampler ``vhat_t``
                equals ``v_{t-1}``). Switching between the two paths restarts the history.
        """
        sigma = float(sigma)
        kappa: float | None = None
        if v_t is not None:
            if self._prev_v is not None:
                kappa = curvature(self.sigmas[-1], sigma, self._prev_v, v_t)
            self._prev_v = v_t.detach().clone()
            self._prev_x = self._prev_vhat = None
        else:
            vhat = None
            if self._prev_x is not None:
                ds = sigma - self.sigmas[-1]
                vhat = x_t.detach().float() - self._prev_x  # same shape as x_t, float32
                if ds != 0.0:
                    vhat = vhat / ds
                if self._prev_vhat is not None:
                    kappa = curvature(self.sigmas[-1], sigma, self._prev_vhat, vhat)
            x_copy = x_t.detach().to(torch.float32, copy=True)  # bf16 differences would cancel
            self._prev_x, self._prev_vhat, self._prev_v = x_copy, vhat, None
        self.sigmas.append(sigma)
        self.curvatures.append(kappa)
        return kappa


def _water_fill(weights: Sequence[float], total: float, lo: float, hi: float) -> list[float]:
    """``d_i = clip(c * w_i, lo, hi)`` with the scalar ``c`` that makes ``sum(d) == total``.

    ``S(c) = sum clip(c w_i)`` is piecewise linear and non-decreasing with breakpoints at ``lo/w_i``
    and ``hi/w_i``; the segment holding ``total`` is found and solved exactly (no iteration).
    Requires ``w_i > 0`` and ``n lo <= total <= n hi``.
    """
    n = len(weights)
    if hi - lo <= EPS or total <= n * lo + EPS:
        return [lo] * n
    if total >= n * hi - EPS:
        return [hi] * n

    def filled(c: float) -> float:
        return sum(min(max(c * w, lo), hi) for w in weights)

    points = sorted({b for w in weights for b in (lo / w, hi / w)})
    sums = [filled(b) for b in points]
    c = points[-1]
    for j in range(len(points) - 1):
        if sums[j] <= total <= sums[j + 1]:
            span = sums[j + 1] - sums[j]  # S is linear on [points[j], points[j + 1]]
            frac = (total - sums[j]) / span if span > 0 else 0.0
            c = points[j] + frac * (points[j + 1] - points[j])
            break
    out = [min(max(c * w, lo), hi) for w in weights]
    free = [i for i, d in enumerate(out) if lo < d < hi]
    if free:  # float round-off only; equal weights keep equal densities
        fix = (total - sum(out)) / len(free)
        for i in free:
            out[i] += fix
    return out


def allocate_densities(
    curvatures: Sequence[float],
    *,
    mean_density: float,
    min_density: float,
    max_density: float = 1.0,
    dense_quantile: float,
) -> list[float]:
    """Per-step densities with mean ``mean_density``, non-decreasing in curvature.

    Algorithm:
        1. ``k = ceil(dense_quantile * n)`` steps of highest curvature are dense (exactly 1.0),
           cut to what the budget affords (``k + (n - k) r <= n mean_density`` with the rest's
           floor ``r = max(min_density, DENSE_REST_FLOOR * mean_density)``), then
           until the dense set does not split a group of equal curvatures (so equal kappa always
           means equal density; all-equal curvature means no dense step). Dense steps need
           ``max_density == 1``; with a lower cap no step is dense.
        2. The other steps share the rest: ``d_i = clip(c * w_i, min_density, max_density)`` with
           ``w_i = clip((kappa_i / median kappa)^0.5, 0.1, 10)`` (median over these steps' positive
           curvatures) and the scalar ``c`` solved exactly by water-filling so that the sum hits
           the target. Weights are monotone in kappa and clipping is monotone, so a higher curvature
           never gets a lower density.

    Args:
        curvatures: ``(n,)`` curvature per step, >= 0; ``math.inf`` marks a step of top priority.
        mean_density: target mean, in (0, 1]; 1 gives all steps dense.
        min_density, max_density: bounds on every step's density.
        dense_quantile: share of steps, those of highest curvature, to run dense, in [0, 1].

    Returns:
        ``(n,)`` densities whose mean equals ``mean_density`` to float round-off.

    Raises:
        ValueError: infeasible bounds (e.g. ``mean_density < min_density``), or a curvature that
            is NaN or negative.
    """
    if not 0.0 < max_density <= 1.0:
        raise ValueError(f"max_density={max_density} must be in (0, 1]")
    if not 0.0 <= min_density <= max_density:
        raise ValueError(f"min_density={min_density} must be in [0, max_density={max_density}]")
    if not min_density <= mean_density <= max_density or mean_density <= 0.0:
        raise ValueError(
            f"mean_density={mean_density} is infeasible: it must be > 0 and within "
            f"[min_density={min_density}, max_density={max_density}]"
        )
    if not 0.0 <= dense_quantile <= 1.0:
        raise ValueError(f"dense_quantile={dense_quantile} must be in [0, 1]")
    kappas = [float(k) for k in curvatures]
    for i, k in enumerate(kappas):
        if math.isnan(k) or k < 0.0:
            raise ValueError(f"curvatures[{i}]={k} is invalid: curvatures must be >= 0, not NaN")
    n = len(kappas)
    if n == 0:
        return []
    if mean_density >= max_density - EPS:
        return [max_density] * n
    total = mean_density * n

    order = sorted(range(n), key=lambda i: -kappas[i])  # highest curvature first
    k = 0
    if max_density == 1.0 and dense_quantile > 0.0:
        k = math.ceil(dense_quantile * n - 1e-9)
        rest = min(dense_rest_floor(mean_density, min_density), 1.0 - EPS)
        affordable = (total - n * rest) / (1.0 - rest)
        k = min(k, n - 1, math.floor(affordable + 1e-9))
        while 0 < k < n and kappas[order[k - 1]] == kappas[order[k]]:
            k -= 1
    dense, sparse = order[:k], order[k:]

    finite_pos = sorted(kappas[i] for i in sparse if 0.0 < kappas[i] < math.inf)
    ref = finite_pos[len(finite_pos) // 2] if finite_pos else 1.0
    lo_w, hi_w = WEIGHT_CLIP
    weights = [min(max((kappas[i] / ref) ** WEIGHT_POWER, lo_w), hi_w) for i in sparse]
    filled = _water_fill(weights, total - k, min_density, max_density)

    out = [0.0] * n
    for i in dense:
        out[i] = 1.0
    for i, d in zip(sparse, filled, strict=True):
        out[i] = d
    return out
