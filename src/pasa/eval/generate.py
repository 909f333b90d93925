"""One testbed generation under one strategy: what the demo and the suite share.

:func:`strategy_hooks` turns a :class:`~pasa.eval.strategies.Strategy` at a mean density into the
arguments of :func:`pasa.apply` (config, per-step budget, plan provider); :func:`generate` samples
a clip with them and returns the clip, PASA's per-step report, the plans' step-to-step Jaccard
and the wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pasa.config import PASAConfig
from pasa.eval.metrics import plan_jaccard
from pasa.eval.strategies import ScheduleBudget, Strategy
from pasa.plan import BlockPlan

EVAL_DATA_SEED = 10_000  # held-out caption stream (training uses data seed 0)
CALIBRATION_DATA_SEED = 20_000  # the budget profile's calibration caption: in neither stream


def eval_captions(
    count: int,
    *,
    caption_order: str,
    scene_style: str,
    data_seed: int = EVAL_DATA_SEED,
    frames: int = 16,
) -> list[str]:
    """Captions of the first ``count`` clips of a stream the trainer never sees, as the model was
    trained: pass its ``**config.clip_settings()`` (caption order and scene style)."""
    from pasa.testbed.scene import caption, make_scene

    return [
        caption(make_scene(data_seed, i, frames=frames, style=scene_style), caption_order)
        for i in range(count)
    ]


def require(*modules: str, command: str) -> None:
    """Raise ImportError naming every missing module and the pip extra that brings it."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"{command} needs {', '.join(missing)}: pip install 'pasa[diffusers,eval]'"
        )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(checkpoint: Any, device: torch.device) -> tuple[torch.nn.Module, Any, dict]:
    """:func:`pasa.testbed.model.load_testbed` in bf16 on CUDA, fp32 on the CPU
    (raises :class:`~pasa.testbed.model.CheckpointError` naming the problem)."""
    from pasa.testbed.model import load_testbed

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return load_testbed(checkpoint, device=device, dtype=dtype)


@dataclass
class Hooks:
    """What :func:`pasa.apply` gets for one strategy at one density."""

    config: PASAConfig
    budget: ScheduleBudget | None = None
    plan_provider: Callable[..., BlockPlan | None] | None = None


def strategy_hooks(
    strategy: Strategy, density: float, num_steps: int, profile_path: Any = None
) -> Hooks:
    """The config, budget and plan provider of ``strategy`` at mean ``density``.

    Args:
        profile_path: the budget profile (:func:`calibrate_profile`) a calibrated strategy
            allocates its per-step densities from.
    Raises:
        ValueError: the strategy cannot reach ``density`` (a dense warm-up longer than the
            budget), with the reason; a calibrated strategy without ``profile_path``; dense.
    """
    if strategy.is_dense:
        raise ValueError("dense runs without PASA")
    config = strategy.config(density)
    if strategy.calibrated:
        if profile_path is None:
            raise ValueError(f"{strategy.name} allocates from a budget profile: pass profile_path")
        config = config.replace(budget="profile", profile_path=str(profile_path))
    schedule = strategy.step_densities(density, num_steps)
    budget = ScheduleBudget(schedule) if schedule is not None else None
    provider = None
    if strategy.plan_fn is not None:
        plan_fn = strategy.plan_fn
        cache: dict[tuple, BlockPlan] = {}

        def provider(layout, step, layer, q, k):  # static: one plan per layout and shape
            batch, heads = q.shape[0], q.shape[2]
            key = (
                layout.grid,
                layout.tile,
                layout.block_size,
                layout.num_text_tokens,
                batch,
                heads,
            )
            if key not in cache:
                plan = plan_fn(layout, density, batch, heads)
                cache[key] = BlockPlan(
                    plan.kv_indices.to(q.device), plan.kv_counts.to(q.device), layout
                )
            return cache[key]

    return Hooks(config, budget, provider)


class JaccardMeter:
    """Mean Jaccard of each layer's plan with the same layer's plan at the previous sparse step
    (dense steps have no plan and are skipped). Attach as ``RunState.on_plan``."""

    def __init__(self) -> None:
        self._last: dict[tuple[int, int], tuple[int, BlockPlan]] = {}
        self.values: list[float] = []

    def __call__(self, step: int, layer: int, head_offset: int, plan: BlockPlan) -> None:
        key = (layer, head_offset)
        last = self._last.get(key)
        if last is not None and last[0] < step:
            self.values.append(plan_jaccard(last[1], plan))
        if last is None or last[0] < step:  # the first call of a step (cond under CFG)
            self._last[key] = (step, plan)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None


@dataclass
class Generation:
    """One sampled clip: ``frames (3, F, H, W)`` in [-1, 1] on the CPU; ``report`` is PASA's
    (None for dense); ``plan_jaccard`` the step-to-step plan overlap (None for dense)."""

    frames: torch.Tensor
    seconds: float
    report: Any = None
    plan_jaccard: float | None = None
    step_seconds: list[float] = field(default_factory=list)

    @property
    def mean_density(self) -> float:
        return 1.0 if self.report is None else float(self.report.mean_density)


def generate(
    model: torch.nn.Module,
    config: Any,
    caption: str,
    *,
    seed: int,
    num_steps: int,
    frames: int,
    size: int,
    hooks: Hooks | None = None,
    on_step: Callable[..., None] | None = None,
) -> Generation:
    """Sample one clip, dense (``hooks`` None) or with PASA applied through ``hooks``.

    Args:
        model: the testbed ``WanTransformer3DModel`` (PASA is applied and removed here).
        config: its :class:`~pasa.testbed.model.TestbedConfig`.
        frames, size: clip frames and square side in pixels.
        on_step: forwarded to :func:`pasa.testbed.sample.sample` (progress bars).
    """
    from pasa.integrations.diffusers import apply, last_report, remove
    from pasa.testbed.sample import sample

    meter = None
    if hooks is not None:
        state = apply(model, hooks.config, budget=hooks.budget, plan_provider=hooks.plan_provider)
        state.on_plan = meter = JaccardMeter()
    start = time.perf_counter()
    try:
        result = sample(
            model,
            config,
            caption,
            seed=seed,
            num_steps=num_steps,
            frames=frames,
            height=size,
            width=size,
            on_step=on_step,
        )
        seconds = time.perf_counter() - start
        report = last_report(model) if hooks is not None else None
    finally:
        if hooks is not None:
            remove(model)
    return Generation(
        frames=result.frames,
        seconds=seconds,
        report=report,
        plan_jaccard=None if meter is None else meter.mean,
        step_seconds=[s.seconds for s in result.steps],
    )


def calibrate_profile(
    model: torch.nn.Module,
    config: Any,
    path: Any,
    *,
    num_steps: int,
    frames: int,
    size: int,
    seed: int = 0,
) -> Any:
    """Record the curvature budget profile of one dense generation and save it at ``path``.

    The caption is the first of a stream that neither training nor the evaluation uses
    (:data:`CALIBRATION_DATA_SEED`), so the strategies that allocate from the profile never see
    the clips they are judged on. Returns the :class:`~pasa.profile.BudgetProfile`.
    """
    caption = eval_captions(
        1, **config.clip_settings(), data_seed=CALIBRATION_DATA_SEED, frames=frames
    )[0]
    run = generate(
        model, config, caption, seed=seed, num_steps=num_steps, frames=frames, size=size,
        hooks=Hooks(PASAConfig(density=1.0)),
    )  # fmt: skip
    profile = run.report.to_profile(scheduler="flow-match Euler, shift 3")
    profile.save(path, overwrite=True)
    return profile
