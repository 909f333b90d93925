"""The strategies the evaluation compares, as one declarative table, all under one kernel.

Every sparse strategy is expressed through PASA's own estimate, routing, budget and backend, so
only the selection rule differs between them (same kernel, same token tiling, same density
accounting). The peers are *reimplemented for ablation*, not the authors' code:

========================  ========================================================================
name                      rule
========================  ========================================================================
dense                     stock attention
meanpool_topk             SpargeAttn-style: one mean-pooled query/key per block, deterministic
                          (tau = 0) top-k at a fixed budget every step
static_window             STA / Radial-style static 3D local window: each query block keeps the
                          key blocks nearest in (frame, row, column) tile distance, the window grown
                          until it meets the density; the same plan at every step, layer and head
static_window_time        the same with time distances counted half (the window's shape that PASA's
                          local window uses by default: twice as far in time as in space)
sparse_videogen           Sparse-VideoGen-style: first 20% of steps dense, then deterministic top-p
                          (mean-pooled estimate) at the density that keeps the run's mean on target
pasa                      the library's defaults: grouped estimate (g = 64), three quarters of each
                          row's top-k count to the nearest blocks (local_share = 0.75, time
                          distances counted half, the window's size steady across steps), the rest
                          by the estimate with stochastic routing (tau = 0.25), the curvature
                          budget from a profile recorded by one calibration run on a caption
                          outside the evaluation set, and the Taylor tail for the blocks left out
                          (approximate = "taylor")
pasa_soft_window1         PASA with a soft window: the window's blocks get +1 on their routing
                          scores instead of being forced (window_bonus = 1), so a block outside
                          displaces one inside where the estimate gives it e (2.7) times the mass
pasa_soft_window2         the same with +2 (7.4 times the mass)
pasa_trusted_window70     PASA forcing the window only in the heads whose estimate agrees with it
                          (the window holds at least 0.7 of the mass of the row's heaviest blocks
                          of the same number, averaged over rows; window_trust = 0.7), soft (+1)
                          in the others
pasa_trusted_window85     the same at 0.85
pasa_isotropic_window     PASA with time and space distances counted alike (window_time_scale = 1)
pasa_step_window          PASA with the window sized by each step's density (steady_window = False)
pasa_window_floor         PASA whose budget never gives a step fewer blocks than its local window
pasa_local90_fixed        nine tenths local and a fixed per-step budget
pasa_local100             the local window alone (local_share = 1) under PASA's curvature budget
                          (steady: on the budget's expensive steps the estimate routes the rest)
pasa_window_budget        the window alone, sized from each step's density: a static window whose
                          size follows the curvature budget (no estimate-routed blocks at all)
pasa_local90_step_window  nine tenths local, the window sized from each step's density
pasa_local100_tau0        pasa_local100 with deterministic routing of the expensive steps' rest
pasa_no_local             PASA with the whole count routed by the estimate (local_share = 0)
pasa_local50              PASA with half of each row's count to the nearest blocks
pasa_local90              PASA with nine tenths of each row's count to the nearest blocks
pasa_g32                  PASA with the grouped estimate at g = 32 (4 x 4 group pairs a block pair)
pasa_no_grouped           PASA with one group per block (mean-pooled estimate)
pasa_no_stochastic        PASA with deterministic routing (tau = 0)
pasa_tau010               PASA with milder stochastic routing (tau = 0.1)
pasa_no_curvature         PASA with a fixed per-step budget
pasa_no_approximate       PASA without the approximate branch: exact blocks only (the defaults
                          before the Taylor tail)
pasa_approximate          PASA with the group-mean branch (DESIGN.md section 4) in place of the
                          Taylor tail
pasa_grouped_taylor       PASA with the grouped Taylor tail: each left-out group by its own mean
                          logit, exp to second order only inside the groups
                          (approximate = "grouped_taylor")
pasa_principal            PASA with the principal tail: each left-out group by its own mean logit,
                          exp to second order about it along the group's 4 leading key directions
                          (approximate = "principal")
pasa_principal2           the same with 2 directions a group (tail_rank = 2)
pasa_principal8           the same with 8 directions a group (tail_rank = 8)
window_taylor             the static window stretched in time plus the Taylor tail, fixed budget
pasa_top_p                PASA with top-p rows (one coverage p per call) instead of top-k
========================  ========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from pasa.config import PASAConfig
from pasa.layout import TokenLayout, nearest_blocks
from pasa.plan import BlockPlan

REIMPLEMENTED = "reimplemented for ablation"
# The static_window_time peer takes the shape of PASA's default local window.
PASA_WINDOW_TIME_SCALE = PASAConfig().window_time_scale
WARMUP_FRACTION = 0.2  # Sparse-VideoGen-style dense warm-up share of the steps

PlanFn = Callable[[TokenLayout, float, int, int], BlockPlan]  # (layout, density, batch, heads)


@dataclass(frozen=True)
class Strategy:
    """One row of the comparison.

    Attributes:
        name: key used in results and on the command line.
        label: how tables and plots name it (peers say they are reimplemented).
        config: ``density -> PASAConfig`` (None for dense).
        plan_fn: a fixed plan instead of PASA's estimate and routing (static window), or None.
        dense_warmup: share of the first steps run dense (the rest re-balanced to the mean).
        calibrated: allocates its per-step densities from a recorded curvature profile
            (``budget="profile"``; :func:`pasa.eval.generate.strategy_hooks` supplies the file).
    """

    name: str
    label: str
    config: Callable[[float], PASAConfig] | None
    plan_fn: PlanFn | None = None
    dense_warmup: float = 0.0
    calibrated: bool = False

    @property
    def is_dense(self) -> bool:
        return self.config is None

    def step_densities(self, density: float, num_steps: int) -> list[float] | None:
        """Per-step densities for schedules fixed in advance (warm-up), else None (the
        config's budget decides). Raises ValueError if the warm-up alone exceeds the mean."""
        if self.dense_warmup <= 0:
            return None
        warm = round(self.dense_warmup * num_steps)
        rest = num_steps - warm
        sparse = (density * num_steps - warm) / max(rest, 1)
        if rest and sparse < 0.01:
            raise ValueError(
                f"{self.name}: {warm} dense warm-up steps of {num_steps} exceed a mean density "
                f"of {density}; the lowest reachable mean is {(warm + 0.01 * rest) / num_steps:.3f}"
            )
        return [1.0] * warm + [min(1.0, sparse)] * rest


def _pasa(floor_share: float = 0.0, **changes: object) -> Callable[[float], PASAConfig]:
    """PASA as a user gets it (``PASAConfig`` defaults) with ``changes`` for the ablations;
    ``floor_share`` raises the budget's per-step floor to that share of the density."""
    defaults = PASAConfig()
    base = dict(
        group_size=defaults.group_size,
        temperature=defaults.temperature,
        selection=defaults.selection,
        local_share=defaults.local_share,
        steady_window=defaults.steady_window,
        window_time_scale=defaults.window_time_scale,
        window_bonus=defaults.window_bonus,
        window_trust=defaults.window_trust,
        budget="fixed",  # calibrated strategies get budget="profile" with the file, per run
    )
    base.update(changes)
    return lambda density: PASAConfig(
        density=density,
        min_step_density=max(min(defaults.min_step_density, density), floor_share * density),
        **base,
    )


def _peer(**changes: object) -> Callable[[float], PASAConfig]:
    """A peer's rule in PASA's terms: one group per block, deterministic routing, no window,
    fixed budget, exact blocks only (no approximate branch)."""
    base = dict(group_size=128, temperature=0.0, local_share=0.0, budget="fixed", approximate=False)
    base.update(changes)
    return lambda density: PASAConfig(density=density, **base)


def window_plan(
    layout: TokenLayout,
    density: float,
    batch: int = 1,
    heads: int = 1,
    time_scale: float = 1.0,
) -> BlockPlan:
    """Static 3D local window at ``density``: every query block keeps ``round(density * N)`` key
    blocks, the text blocks (attended by all) and then the video blocks nearest in tile units
    (:func:`pasa.layout.nearest_blocks`: Chebyshev distance with time scaled by ``time_scale``,
    Euclidean to break ties, then the lower index), itself included; text blocks attend to
    all."""
    n = layout.num_blocks
    video = min(layout.first_text_block, n)
    k = min(n, max(1, round(density * n)))
    mask = nearest_blocks(layout, max(k - (n - video), 1), time_scale).clone()
    mask[:, video:] = True  # text keys: always
    mask[video:] = True  # text queries: dense
    return BlockPlan.from_dense_mask(mask.expand(batch, heads, n, n).contiguous(), layout)


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("dense", "dense", None),
        Strategy("meanpool_topk", f"mean-pool top-k (SpargeAttn-style, {REIMPLEMENTED})",
                 _peer(selection="top_k")),
        Strategy("static_window", f"static 3D window (STA/Radial-style, {REIMPLEMENTED})",
                 _peer(selection="top_k"), plan_fn=window_plan),
        Strategy("static_window_time",
                 f"static 3D window stretched in time (time distance x {PASA_WINDOW_TIME_SCALE:g}, "
                 f"{REIMPLEMENTED})",
                 _peer(selection="top_k"),
                 plan_fn=partial(window_plan, time_scale=PASA_WINDOW_TIME_SCALE)),
        Strategy("sparse_videogen", f"dense warm-up + top-p (Sparse-VideoGen-style, {REIMPLEMENTED})",
                 _peer(selection="top_p"), dense_warmup=WARMUP_FRACTION),
        Strategy("pasa", "PASA", _pasa(), calibrated=True),
        Strategy("pasa_no_local", "PASA without local window share (local_share = 0)",
                 _pasa(local_share=0.0), calibrated=True),
        Strategy("pasa_local50", "PASA with half of each row local (local_share = 0.5)",
                 _pasa(local_share=0.5), calibrated=True),
        Strategy("pasa_local90", "PASA with 9/10 of each row local (local_share = 0.9)",
                 _pasa(local_share=0.9), calibrated=True),
        Strategy("pasa_window_floor",
                 "PASA with no step below its local window (step floor = local_share x density)",
                 _pasa(floor_share=PASAConfig().local_share), calibrated=True),
        Strategy("pasa_local90_fixed", "PASA with 9/10 local and a fixed per-step budget",
                 _pasa(local_share=0.9)),
        Strategy("pasa_local100",
                 "PASA's window alone under its curvature budget (local_share = 1)",
                 _pasa(local_share=1.0), calibrated=True),
        Strategy("pasa_window_budget",
                 "the local window alone, sized by each step's budget "
                 "(local_share = 1, window per step)",
                 _pasa(local_share=1.0, steady_window=False), calibrated=True),
        Strategy("pasa_local90_step_window", "PASA, 9/10 local, window sized by each step's budget",
                 _pasa(local_share=0.9, steady_window=False), calibrated=True),
        Strategy("pasa_local100_tau0",
                 "the steady window alone under the curvature budget, deterministic routing",
                 _pasa(local_share=1.0, temperature=0.0), calibrated=True),
        Strategy("pasa_step_window", "PASA with the window sized by each step's budget",
                 _pasa(steady_window=False), calibrated=True),
        Strategy("pasa_soft_window1",
                 "PASA with a soft window (window blocks +1 in the routing score, not forced)",
                 _pasa(window_bonus=1.0), calibrated=True),
        Strategy("pasa_soft_window2",
                 "PASA with a soft window (window blocks +2 in the routing score, not forced)",
                 _pasa(window_bonus=2.0), calibrated=True),
        Strategy("pasa_trusted_window70",
                 "PASA with the window forced where the estimate agrees (trust 0.7), soft elsewhere",
                 _pasa(window_trust=0.7), calibrated=True),
        Strategy("pasa_trusted_window85",
                 "PASA with the window forced where the estimate agrees (trust 0.85), soft elsewhere",
                 _pasa(window_trust=0.85), calibrated=True),
        Strategy("pasa_isotropic_window", "PASA with time and space counted alike in the window",
                 _pasa(window_time_scale=1.0), calibrated=True),
        Strategy("pasa_g32", "PASA with 32-token groups", _pasa(group_size=32), calibrated=True),
        Strategy("pasa_no_grouped", "PASA without grouped estimate", _pasa(group_size=128),
                 calibrated=True),
        Strategy("pasa_no_stochastic", "PASA without stochastic routing (tau = 0)",
                 _pasa(temperature=0.0), calibrated=True),
        Strategy("pasa_tau010", "PASA with milder stochastic routing (tau = 0.1)",
                 _pasa(temperature=0.1), calibrated=True),
        Strategy("pasa_no_curvature", "PASA without curvature budget (fixed per step)", _pasa()),
        Strategy("pasa_no_approximate",
                 "PASA without the approximate branch (exact blocks only)",
                 _pasa(approximate=False), calibrated=True),
        Strategy("pasa_approximate", "PASA with group means instead of the Taylor tail",
                 _pasa(approximate="group_means"), calibrated=True),
        Strategy("pasa_grouped_taylor",
                 "PASA with the grouped Taylor tail (group logits, second order inside groups)",
                 _pasa(approximate="grouped_taylor"), calibrated=True),
        Strategy("pasa_principal",
                 "PASA with the principal tail (group logits, 4 key directions a group)",
                 _pasa(approximate="principal"), calibrated=True),
        Strategy("pasa_principal2",
                 "PASA with the principal tail at 2 key directions a group",
                 _pasa(approximate="principal", tail_rank=2), calibrated=True),
        Strategy("pasa_principal8",
                 "PASA with the principal tail at 8 key directions a group",
                 _pasa(approximate="principal", tail_rank=8), calibrated=True),
        Strategy("window_taylor",
                 "the static window stretched in time plus the Taylor tail (fixed budget)",
                 _pasa(approximate="taylor"),
                 plan_fn=partial(window_plan, time_scale=PASA_WINDOW_TIME_SCALE)),
        Strategy("pasa_top_p", "PASA with top-p rows", _pasa(selection="top_p"), calibrated=True),
    )
}  # fmt: skip


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}: choose from {', '.join(STRATEGIES)}"
        ) from None


class ScheduleBudget:
    """A :class:`pasa.budget.StepBudget` that hands out densities fixed in advance (warm-up
    schedules); ``observe`` is ignored."""

    def __init__(self, densities: list[float]) -> None:
        if not densities or not all(0.0 < d <= 1.0 for d in densities):
            raise ValueError(f"densities must be non-empty, each in (0, 1], got {densities}")
        self.num_steps = len(densities)
        self._planned = list(densities)
        self._realised: list[float] = []

    @property
    def realised_densities(self) -> list[float]:
        return list(self._realised)

    def density(self, step: int) -> float:
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step={step} is outside [0, num_steps={self.num_steps})")
        self._realised = self._planned[: max(step + 1, len(self._realised))]
        return self._planned[step]

    def observe(self, sigma: float, x_t: torch.Tensor, v_t: torch.Tensor | None = None) -> None:
        """Schedules do not adapt."""

    def reset(self) -> None:
        self._realised = []
