"""Per-step density budgets (DESIGN.md section 3).

A budget gives one attention density per denoising step whose mean is the user's ``density``:

- :class:`FixedBudget`: every step at ``density``.
- :class:`OnlineBudget`: no calibration; curvature from the steps already taken, the remaining
  budget re-balanced after every step so that the run's mean stays on target.
- :class:`ProfileBudget`: densities from a :class:`~pasa.profile.BudgetProfile` recorded by one
  calibration run.

:func:`make_budget` picks one from a :class:`~pasa.config.PASAConfig`.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch

from pasa.config import PASAConfig
from pasa.curvature import EPS, CurvatureTracker, allocate_densities, dense_rest_floor
from pasa.profile import BudgetProfile

_TIE_RTOL = 0.01  # online: curvatures within 1% are ties (finite differences are that noisy)
WARMUP_BOOST = 2.5  # online: the steps before any curvature get this multiple of the even share


@runtime_checkable
class StepBudget(Protocol):
    """What the attention hook asks of a budget: one density per denoising step.

    ``density(step)`` is idempotent for a step already planned (every layer of one step asks);
    ``observe`` is called once per step after the model's forward.
    """

    @property
    def realised_densities(self) -> list[float]: ...

    def density(self, step: int) -> float: ...

    def observe(self, sigma: float, x_t: torch.Tensor, v_t: torch.Tensor | None = None) -> None: ...

    def reset(self) -> None: ...


class _PlannedBudget:
    """Shared bookkeeping: steps are planned in order, each exactly once, by ``_plan``."""

    num_steps: int | None

    def __init__(self, num_steps: int | None) -> None:
        if num_steps is not None and (not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps={num_steps!r} must be an int >= 1")
        self.num_steps = num_steps
        self._realised: list[float] = []

    @property
    def realised_densities(self) -> list[float]:
        """Densities handed out so far, one per step (a copy)."""
        return list(self._realised)

    @property
    def realised_mean(self) -> float:
        return sum(self._realised) / len(self._realised) if self._realised else 0.0

    def density(self, step: int) -> float:
        """Density for ``step`` (0-based); plans any earlier step not asked for yet."""
        if step < 0 or (self.num_steps is not None and step >= self.num_steps):
            raise ValueError(f"step={step} is outside [0, num_steps={self.num_steps})")
        while len(self._realised) <= step:
            self._realised.append(self._plan(len(self._realised)))
        return self._realised[step]

    def observe(self, sigma: float, x_t: torch.Tensor, v_t: torch.Tensor | None = None) -> None:
        """Feed one finished step; ignored by budgets that do not adapt."""

    def reset(self) -> None:
        self._realised = []

    def _plan(self, step: int) -> float:
        raise NotImplementedError


class FixedBudget(_PlannedBudget):
    """Every step at ``density``."""

    def __init__(self, density: float, num_steps: int | None = None) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density={density} must be in (0, 1]")
        super().__init__(num_steps)
        self._density = float(density)

    def _plan(self, step: int) -> float:
        return self._density


class OnlineBudget(_PlannedBudget):
    """Curvature-driven densities without calibration.

    Plan for step s (``m = num_steps - s`` steps left, ``R`` budget left, ``even = R / m``,
    ``kappa_r`` the latest curvature, ``seen`` all curvatures so far, ``floor = max(min_density,
    DENSE_REST_FLOOR * mean_density)``):

    - Warm-up (no curvature yet: 2 steps with velocities, 3 from latents alone): the first steps
      set the layout and curve the most (kappa 3-20x its median on the testbed), so they get
      ``WARMUP_BOOST * even``, capped at 1 and at what leaves every later step ``floor``. Never
      dense: at a low mean a dense first step starves the rest of the run.
    - Dense: ``kappa_r`` ranks in the top ``dense_quantile`` of the curvatures seen (rank, with
      values within 1% counted as ties against it, <= ``q * len(seen)``: it needs ``1/q``
      observations and must stand out from noise), the run has used fewer than
      ``ceil(q * num_steps)`` dense steps, and the later steps keep ``floor`` each.
    - Otherwise ``even``: later steps are predicted to curve like the latest one. (Predicting
      them from the spread of ``seen`` reserved budget for early-run spikes that do not recur,
      starved the middle of the run and spent the rest on the last steps.) The curvature profile
      of a whole run, front-loaded on the testbed, is what ``budget="profile"`` allocates from.

    Every plan is an exact split of ``R`` over the ``m`` steps within ``[min_density, 1]``, so the
    realised mean over ``num_steps`` equals ``mean_density``. If ``R`` ever drops below
    ``m * min_density`` the steps sit at ``min_density`` and :attr:`realised_mean` says so.
    """

    num_steps: int

    def __init__(
        self, mean_density: float, min_density: float, dense_quantile: float, num_steps: int
    ) -> None:
        if num_steps is None:
            raise ValueError("OnlineBudget needs num_steps to keep the run's mean on target")
        super().__init__(num_steps)
        allocate_densities(
            [], mean_density=mean_density, min_density=min_density, dense_quantile=dense_quantile
        )  # validates the numbers
        self.mean_density = float(mean_density)
        self.min_density = float(min_density)
        self.dense_quantile = float(dense_quantile)
        self.tracker = CurvatureTracker()

    def reset(self) -> None:
        super().reset()
        self.tracker.reset()

    def observe(self, sigma: float, x_t: torch.Tensor, v_t: torch.Tensor | None = None) -> None:
        """Record the finished step (``x_t``, ``v_t`` as in :meth:`CurvatureTracker.update`)."""
        self.tracker.update(sigma, x_t, v_t)

    def _plan(self, step: int) -> float:
        m = self.num_steps - step
        left = self.mean_density * self.num_steps - sum(self._realised)
        lo = self.min_density
        if left < m * lo + EPS:
            return lo
        if left >= m - EPS or m == 1:  # all that is left must be spent on the remaining steps
            return min(left / m, 1.0)
        even = left / m
        floor = dense_rest_floor(self.mean_density, lo)
        spare = left - (m - 1) * floor  # the most this step can take
        seen = [k for k in self.tracker.curvatures if k is not None]
        if not seen:
            return min(max(even, min(WARMUP_BOOST * even, spare)), 1.0 - EPS)
        recent = seen[-1]
        quota = math.ceil(self.dense_quantile * self.num_steps - 1e-9)
        quota -= sum(d >= 1.0 for d in self._realised)
        # Near-ties rank low, so a flat history (up to estimation noise) has no top.
        rank = sum(k >= recent * (1.0 - _TIE_RTOL) for k in seen)
        if quota > 0 and spare >= 1.0 - EPS and rank <= self.dense_quantile * len(seen):
            return 1.0
        return min(even, 1.0)


class ProfileBudget(_PlannedBudget):
    """Densities fixed in advance from a recorded :class:`BudgetProfile`."""

    num_steps: int

    def __init__(
        self,
        profile: BudgetProfile,
        *,
        mean_density: float,
        min_density: float,
        dense_quantile: float,
        num_steps: int,
    ) -> None:
        if num_steps != profile.num_steps:
            raise ValueError(
                f"run has num_steps={num_steps} but the profile was recorded with "
                f"{profile.num_steps}; record a profile for this step count"
            )
        super().__init__(num_steps)
        self.profile = profile
        self.planned = profile.densities(mean_density, min_density, dense_quantile)

    def _plan(self, step: int) -> float:
        return self.planned[step]


def make_budget(config: PASAConfig, num_steps: int) -> StepBudget:
    """The budget ``config.budget`` names, for a run of ``num_steps`` denoising steps."""
    if config.budget == "fixed":
        return FixedBudget(config.density, num_steps)
    if config.budget == "online":
        return OnlineBudget(
            config.density, config.min_step_density, config.dense_quantile, num_steps
        )
    if config.budget == "profile":
        if config.profile_path is None:
            raise ValueError('budget="profile" needs config.profile_path')
        return ProfileBudget(
            BudgetProfile.load(config.profile_path),
            mean_density=config.density,
            min_density=config.min_step_density,
            dense_quantile=config.dense_quantile,
            num_steps=num_steps,
        )
    raise ValueError(f"unknown budget mode {config.budget!r}")
