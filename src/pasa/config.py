"""PASA configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

Selection = Literal["top_p", "top_k"]
BudgetMode = Literal["fixed", "online", "profile"]
Approximation = Literal["group_means", "taylor", "grouped_taylor", "principal"]

SELECTIONS = ("top_p", "top_k")
BUDGET_MODES = ("fixed", "online", "profile")
APPROXIMATIONS = ("group_means", "taylor", "grouped_taylor", "principal")
BACKENDS = ("auto", "reference", "flex", "fa4")
GROUP_SIZES_HINT = "a divisor of block_size that is a multiple of 16 (16, 32, 64, ...)"


def _fail(name: str, value: object, allowed: str) -> None:
    raise ValueError(f"PASAConfig.{name}={value!r} is invalid: allowed {allowed}")


@dataclass(frozen=True)
class PASAConfig:
    """Everything PASA needs to decide which attention blocks to compute.

    Attributes:
        density: target mean fraction of key blocks computed, in (0, 1]. 1 means dense.
        block_size: tokens per block, the unit the kernel skips or computes (128 for FA4).
        group_size: tokens per group inside a block, the unit of the importance estimate
            (64: 2 x 2 group pairs per block pair). ``group_size == block_size`` is plain mean
            pooling (one group per block). 32 costs four times the estimate's logits (0.60 against
            1.37 ms at the Wan2.1-14B 720p shape on H100) and was no better on the testbed.
        tile: ``(tf, th, tw)`` box of video tokens that forms one block, or ``"auto"``.
        temperature: tau >= 0 of the Gumbel selection bias on the estimate-routed blocks; 0 is
            deterministic routing. With the local window share, tau = 0.25 (the default) flickered
            less than tau = 0 on all 8 testbed clips at densities 0.10-0.25 and gained up to
            0.4 dB PSNR; without it, tau = 0.25 had cost 0.2-0.8 dB (docs/results.md).
        selection: ``"top_k"`` (the same count for every row; the default) or ``"top_p"``
            (per-row cumulative mass, one threshold chosen so that the mean count meets
            ``density``). On the testbed top-p lost 4-10 dB PSNR against top-k at equal density:
            rows whose estimate looks peaked keep one or two blocks (docs/results.md).
        local_share: share of each row's top-k count given to the query block's nearest key
            blocks in space and time (a static local window, as STA / Radial attention use),
            the rest chosen by the estimate; 0 leaves all of it to the estimate, 1 is the static
            window. The default 0.75 keeps the window's low flicker and the estimate's far
            blocks (docs/results.md).
        steady_window: size the local window from ``density`` (the run's mean) at every step,
            capped by the step's count, so that a budget that varies the density by step varies
            only the estimate-routed remainder; False sizes it from each step's density. Under a
            varying budget the window then stays the same from step to step, as a static
            window's does (docs/results.md). Calls that override ``density`` keep the window of
            ``config.density``.
        window_time_scale: weight of a time step against a spatial step (both in tiles) when
            the local window ranks a block's neighbours; below 1 the window reaches further in
            time and less far in space. 0.5 (the default) counts two time tiles (four frames at
            the default 2-frame tiles) like one spatial tile: on the testbed it flickered
            0.013-0.020 less than the isotropic window (1.0) on 23 of 24 clip-densities and
            gained 0.8 dB at densities 0.10 and 0.15 (docs/results.md).
        window_bonus: None (the default) keeps the local window's blocks in every row, as the
            diagonal is kept; a number ``b >= 0`` makes the window soft: its blocks compete with
            the rest for the row's count with ``b`` added to their routing scores (``log mass +
            tau * Gumbel``), so a block outside the window displaces one inside only where the
            estimate gives it more than ``e^b`` times the mass. 0 is no window at all
            (``local_share = 0``), and large ``b`` the forced window.
        window_trust: None (the default) treats every head alike; a number in [0, 1]
            forces the window only in the heads whose estimate agrees with it, and makes it
            soft (bonus ``window_bonus``, 1 when None) in the others: at each call, a head
            agrees when, averaged over its video rows (every fourth), the window's blocks hold
            at least that share of the estimated mass that the row's same number of heaviest
            video blocks hold. Every head keeps the forced window's count; 0 is the forced
            window everywhere. On the testbed 0.7 gained 0.38 / 0.28 / 0.08 dB over the forced
            window at densities 0.10 / 0.15 / 0.25 (16 clips; 0.24 / 0.14 / -0.08 on 8 more)
            with 0.0005 / 0.0001 / 0.00003 more flicker excess; its routing costs 0.6-0.7 ms more
            a call at Wan2.1-14B 720p on an H200, too much for the default while the forced
            window's estimate and routing take 4.5% of the FA4 kernel (docs/routing.md).
        min_blocks: floor on key blocks per query-block row (diagonal and text blocks count).
        max_blocks: ceiling on key blocks per row, or None for no ceiling.
        seed: seed of the counter-based routing noise.
        budget: ``"fixed"`` (every step at ``density``), ``"online"`` (curvature-driven, no
            calibration) or ``"profile"`` (curvature recorded once, loaded from ``profile_path``).
        dense_quantile: share of denoising steps, those of highest curvature, run dense (a
            dense step must leave every other step at least 0.75 x ``density``).
        min_step_density: floor on one step's density when the budget varies it by step.
        profile_path: JSON profile for ``budget="profile"``.
        approximate: estimate the attention over each row's unselected blocks and merge it
            with the exact part: ``"taylor"`` (the default: the left-out keys' and values'
            moments, ``exp`` to second order about their mean logit; exact for a head that
            attends uniformly), ``"group_means"`` (one pooled key and value per group,
            DESIGN.md's branch; True means this), ``"grouped_taylor"`` (group logits, ``exp``
            to second order inside the groups; torch only, an option: on run 6's testbed it
            wins two of four captions and loses one by 5-7 dB), ``"principal"`` (group logits,
            ``exp`` to second order about each group's own mean along its ``tail_rank`` leading
            key directions: on run 6's testbed 4.6-4.9 dB closer to dense than the Taylor tail
            on average and closer on every clip, but 456 ms against 23 ms a Wan2.1-14B 720p call
            with its first kernel) or False (exact blocks only).
            On the testbed the Taylor tail raised PSNR against dense from 15.6 / 18.5 / 21.7 to
            21.4 / 22.9 / 25.0 dB at densities 0.10 / 0.15 / 0.25 and took flicker from above
            dense's to below it; group means lost 5 dB on that checkpoint (runs 1-2;
            docs/results.md). See :mod:`pasa.approximate`.
        tail_rank: key directions kept per left-out group by ``approximate="principal"`` (1 up
            to the head size, which makes it the full per-group expansion).
        backend: ``"auto"``, ``"reference"``, ``"flex"`` or ``"fa4"``.
        check_finite: reject NaN / Inf inputs (judged from the estimate's group means for q and k
            and one min / max of v; one host sync per call, per model call under ``pasa.apply``).
    """

    density: float = 0.15
    block_size: int = 128
    group_size: int = 64
    tile: tuple[int, int, int] | Literal["auto"] = "auto"
    temperature: float = 0.25
    selection: Selection = "top_k"
    local_share: float = 0.75
    steady_window: bool = True
    window_time_scale: float = 0.5
    window_bonus: float | None = None
    window_trust: float | None = None
    min_blocks: int = 1
    max_blocks: int | None = None
    seed: int = 0
    budget: BudgetMode = "fixed"
    dense_quantile: float = 0.1
    min_step_density: float = 0.05
    profile_path: str | None = field(default=None, compare=False)
    approximate: bool | Approximation = "taylor"
    tail_rank: int = 4
    backend: str = "auto"
    check_finite: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.tile, list):
            object.__setattr__(self, "tile", tuple(self.tile))
        if not (isinstance(self.density, (int, float)) and 0.0 < self.density <= 1.0):
            _fail("density", self.density, "a number in (0, 1]")
        if not isinstance(self.block_size, int) or self.block_size < 16 or self.block_size % 16:
            _fail("block_size", self.block_size, "a positive multiple of 16 (128 for FA4)")
        if (
            not isinstance(self.group_size, int)
            or self.group_size < 1
            or self.block_size % self.group_size
        ):
            _fail("group_size", self.group_size, GROUP_SIZES_HINT)
        if self.tile != "auto" and (
            not isinstance(self.tile, tuple)
            or len(self.tile) != 3
            or not all(isinstance(t, int) and t >= 1 for t in self.tile)
        ):
            _fail("tile", self.tile, '"auto" or three positive ints (tf, th, tw)')
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)):
            _fail("temperature", self.temperature, "a finite number >= 0")
        if self.temperature < 0:
            _fail("temperature", self.temperature, "a finite number >= 0")
        if self.selection not in SELECTIONS:
            _fail("selection", self.selection, f"one of {SELECTIONS}")
        if not (isinstance(self.local_share, (int, float)) and 0.0 <= self.local_share <= 1.0):
            _fail("local_share", self.local_share, "a number in [0, 1]")
        if self.approximate is True:
            object.__setattr__(self, "approximate", "group_means")
        if self.approximate is not False and self.approximate not in APPROXIMATIONS:
            _fail("approximate", self.approximate, f"False, True or one of {APPROXIMATIONS}")
        if not isinstance(self.tail_rank, int) or self.tail_rank < 1:
            _fail("tail_rank", self.tail_rank, "an int >= 1 (at most the head size)")
        if not isinstance(self.steady_window, bool):
            _fail("steady_window", self.steady_window, "True or False")
        if not (
            isinstance(self.window_time_scale, (int, float))
            and math.isfinite(self.window_time_scale)
            and self.window_time_scale > 0
        ):
            _fail("window_time_scale", self.window_time_scale, "a finite number > 0")
        if self.window_bonus is not None and not (
            isinstance(self.window_bonus, (int, float))
            and math.isfinite(self.window_bonus)
            and self.window_bonus >= 0
        ):
            _fail("window_bonus", self.window_bonus, "None or a finite number >= 0")
        if self.window_trust is not None and not (
            isinstance(self.window_trust, (int, float)) and 0.0 <= self.window_trust <= 1.0
        ):
            _fail("window_trust", self.window_trust, "None or a number in [0, 1]")
        if not isinstance(self.min_blocks, int) or self.min_blocks < 1:
            _fail("min_blocks", self.min_blocks, "an int >= 1")
        if self.max_blocks is not None and (
            not isinstance(self.max_blocks, int) or self.max_blocks < self.min_blocks
        ):
            _fail(
                "max_blocks", self.max_blocks, f"None or an int >= min_blocks ({self.min_blocks})"
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            _fail("seed", self.seed, "an int >= 0")
        if self.budget not in BUDGET_MODES:
            _fail("budget", self.budget, f"one of {BUDGET_MODES}")
        if not (isinstance(self.dense_quantile, (int, float)) and 0.0 <= self.dense_quantile < 1.0):
            _fail("dense_quantile", self.dense_quantile, "a number in [0, 1)")
        if not (
            isinstance(self.min_step_density, (int, float))
            and 0.0 < self.min_step_density <= self.density
        ):
            _fail(
                "min_step_density",
                self.min_step_density,
                f"a number in (0, density={self.density}]",
            )
        if self.budget == "profile" and not self.profile_path:
            _fail("profile_path", self.profile_path, 'a JSON file path when budget="profile"')
        if self.backend not in BACKENDS:
            _fail("backend", self.backend, f"one of {BACKENDS}")

    def replace(self, **changes: object) -> PASAConfig:
        """A copy with ``changes`` applied and validated."""
        return replace(self, **changes)

    @property
    def soft_window_bonus(self) -> float:
        """The bonus a soft window's blocks get: :attr:`window_bonus`, 1 when None."""
        return 1.0 if self.window_bonus is None else float(self.window_bonus)

    def local_blocks(self, density: float, num_blocks: int) -> int:
        """Nearest blocks every video row keeps (prefers, with a soft window:
        :attr:`window_bonus`, :attr:`window_trust`) in a call at ``density`` (itself included):
        ``local_share`` of the top-k count ``round(d * num_blocks)``, where ``d`` is
        ``self.density`` with ``steady_window`` (never more than the call's own count) and
        ``density`` without; 0 when dense or ``local_share`` is 0."""
        if self.local_share <= 0.0 or density >= 1.0:
            return 0
        count = round(density * num_blocks)
        sized = self.density if self.steady_window else density
        return min(round(self.local_share * round(sized * num_blocks)), count)

    @property
    def groups_per_block(self) -> int:
        return self.block_size // self.group_size
