"""The denoiser hook: step counting, trajectory -> budget, per-call geometry, report.

One :class:`RunState` is shared by every denoiser of a pipeline (Wan 2.2 has two) and by all
their PASA processors. A :class:`PASAHook` on each denoiser feeds it:

- ``pre_forward``: a call whose step key (the pipeline's ``step_index`` when it sets a cache
  context, else the timestep) differs from the previous call's opens a new step, so the cond and
  uncond calls of classifier-free guidance are one step; a key that goes backwards (timestep up,
  or step index down) means a new generation. It also derives the token grid and text lengths
  from the call's inputs for the processors, and whether the call's video tokens travel through
  the blocks in tiled order (``stream.py``; then it re-orders the per-token forward arguments).
- ``post_forward``: the first call of a step hands ``(sigma, x_t, model output)`` to the budget.
- ``reset_state``: diffusers calls it at the end of every pipeline call
  (``maybe_free_model_hooks``); the run's report is finalised, logged and kept for
  ``pasa.last_report``, then the state is cleared.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from pasa.attention import FiniteChecks
from pasa.budget import CurvatureTracker, StepBudget, make_budget
from pasa.config import PASAConfig
from pasa.integrations.diffusers.families import Family, Grid, bind_inputs, replace_input
from pasa.integrations.diffusers.report import GenerationReport, StepReport, attention_flops
from pasa.integrations.diffusers.stream import TokenOrder, order_for
from pasa.layout import TokenLayout
from pasa.plan import BlockPlan

logger = logging.getLogger("pasa.diffusers")

HOOK_NAME = "pasa"
_DEFAULT_TRAIN_TIMESTEPS = 1000

# (layout, step, layer, q, k) -> a plan to compute instead of PASA's estimate and routing, or None.
# q, k: (B, S, H_local, D), video tokens frame-major then text (also when the tokens travel in
# tiled order: they are handed over frame-major); layout: the call's tiled layout.
PlanProvider = Callable[[TokenLayout, int, int, torch.Tensor, torch.Tensor], BlockPlan | None]


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None


class RunState:
    """Mutable state of one generation, shared by the hooks and processors of a pipeline.

    Attributes read by the processors while a hooked call runs:
        active: a hooked transformer call is in progress.
        step: 0-based denoising step.
        density: the budget's density for the step (>= 1 means dense / stock attention).
        grid: ``(F, H, W)`` video-token grid of the call, or None if the inputs do not say.
        text_valid: real text tokens per batch item (HunyuanVideo's padded prompt), or None.
        order: the call's tiled token order when its video tokens travel through the blocks in
            it (the processors then attend with ``tiled=True``), else None.
        plan_provider: ``(layout, step, layer, q, k) -> BlockPlan | None``; a plan it returns is
            computed instead of PASA's estimate and routing (peers such as a static window).

    Args:
        config: the PASA configuration.
        scheduler: the pipeline's scheduler (step count and sigmas), or None.
        budget: a :class:`~pasa.budget.StepBudget` used instead of ``make_budget(config, n)``;
            it is ``reset()`` at the start of every generation and must plan as many steps as
            the generation runs.
        plan_provider: see the attribute.

    ``tiled_stream`` (default True) lets calls keep their tokens in tiled order across the
    blocks where that is exact (``stream.py``); False re-orders per attention call (tests).
    """

    def __init__(
        self,
        config: PASAConfig,
        scheduler: Any = None,
        *,
        budget: StepBudget | None = None,
        plan_provider: PlanProvider | None = None,
    ) -> None:
        if budget is not None and not isinstance(budget, StepBudget):
            raise TypeError(
                f"budget must satisfy pasa.budget.StepBudget (density, observe, reset, "
                f"realised_densities), got {type(budget).__name__}"
            )
        self.config = config
        self.scheduler = scheduler
        self.budget = budget
        self.plan_provider = plan_provider
        self.last_report: GenerationReport | None = None
        self.on_plan: Callable[..., None] | None = None  # (step, layer, head_offset, plan)
        self.tiled_stream = True
        self._warned: set[str] = set()
        self.reset()

    def reset(self) -> None:
        """Forget the generation (the finished report stays in ``last_report``)."""
        self.active = False
        self.step = -1
        self.density = 1.0
        self.grid: Grid | None = None
        self.text_valid: list[int] | None = None
        self.order: TokenOrder | None = None
        self._key: float | None = None
        self._budget: StepBudget | None = None
        self._tracker: CurvatureTracker | None = None
        self._steps: list[StepReport] = []
        self._model_names: list[str] = []
        self._first_grid: Grid | None = None
        self._observe_pending = False
        self._sigma = 0.0
        self._x_t: torch.Tensor | None = None
        self._computed = torch.zeros(())  # computed key blocks of the step (device tensor)
        self._total_blocks = 0
        self.finite_checks = FiniteChecks()  # the model call's NaN / Inf flags, one sync per call

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # -- called by the hook -------------------------------------------------------------

    def begin_call(
        self, model: torch.nn.Module, family: Family, inputs: dict[str, Any], context: Any
    ) -> None:
        timestep = inputs.get("timestep")
        t = float(torch.as_tensor(timestep).max()) if timestep is not None else 0.0
        step_index = getattr(context, "step_index", None)
        key = float(step_index) if step_index is not None else t
        if self._key is not None and key != self._key:
            went_back = key < self._key if step_index is not None else t > self._key
            if went_back:  # a new generation without a reset in between
                self.finish()
        if self._key is None or key != self._key:
            self._open_step(t, step_index, context, inputs)
        self._key = key
        self._steps[-1].calls += 1
        name = type(model).__name__
        if name not in self._model_names:
            self._model_names.append(name)

        self.finite_checks.clear()  # left over from a call that raised
        self.grid = family.grid(model, inputs)
        if self._first_grid is None:
            self._first_grid = self.grid
        self.text_valid = family.text_valid(inputs)
        self.order = order_for(model, family, inputs, self.grid, self)
        if self.order is not None:
            self._steps[-1].tiled_stream = True
        self._add_flops(model, family, inputs)
        self.active = True

    def end_call(self, output: Any) -> None:
        self.active = False
        self.order = None
        self.finite_checks.raise_if_any()
        if self._observe_pending:
            self._observe_pending = False
            v_t = _first_tensor(output)
            if v_t is not None and v_t.shape != self._x_t.shape:
                v_t = None  # e.g. a learned-sigma output: fall back to latent differences
            self._curvature_source().observe(self._sigma, self._x_t, v_t)
            self._x_t = None

    def finish(self) -> GenerationReport | None:
        """Close the generation: build, log and keep its report; None if nothing ran."""
        report = None
        if self._steps:
            self._close_step()
            report = GenerationReport(
                model=" + ".join(self._model_names),
                config={k: v for k, v in asdict(self.config).items() if k != "profile_path"},
                grid=self._first_grid,
                steps=self._steps,
            )
            self.last_report = report
            logger.info(report.summary())
        self.reset()
        return report

    # -- called by the processors -------------------------------------------------------

    def record_plan(self, computed_blocks: torch.Tensor, total_blocks: int) -> None:
        """Add one PASA call's computed / total key blocks (no host sync)."""
        self._computed = self._computed.to(computed_blocks.device) + computed_blocks
        self._total_blocks += total_blocks

    # -- internals ----------------------------------------------------------------------

    def _curvature_source(self) -> Any:
        """The budget's own tracker when it has one (online), else a tracker for the report."""
        budget_tracker = getattr(self._budget, "tracker", None)
        if isinstance(budget_tracker, CurvatureTracker):
            return self._budget
        if self._tracker is None:
            self._tracker = CurvatureTracker()
        return _TrackerAsObserver(self._tracker)

    def _curvatures(self) -> list[float | None]:
        budget_tracker = getattr(self._budget, "tracker", None)
        tracker = budget_tracker if isinstance(budget_tracker, CurvatureTracker) else self._tracker
        return list(tracker.curvatures) if tracker is not None else []

    def _num_steps(self, context: Any) -> int | None:
        n = getattr(context, "num_inference_steps", None)
        if n is None and self.scheduler is not None:
            timesteps = getattr(self.scheduler, "timesteps", None)
            n = len(timesteps) if timesteps is not None else None
        return int(n) if n else None

    def _sigma_of(self, t: float, step_index: int | None, context: Any) -> float:
        sigma = getattr(context, "sigma", None)
        if sigma is not None:
            return float(sigma)
        sigmas = getattr(self.scheduler, "sigmas", None)
        if step_index is None:
            step_index = self.step
        if sigmas is not None and step_index < len(sigmas):
            return float(sigmas[step_index])
        config = getattr(self.scheduler, "config", None)
        train = getattr(config, "num_train_timesteps", None) or _DEFAULT_TRAIN_TIMESTEPS
        return t / train

    def _open_step(
        self, t: float, step_index: int | None, context: Any, inputs: dict[str, Any]
    ) -> None:
        self._close_step()
        self.step += 1
        if self._budget is None and self.budget is not None:
            self._budget = self._given_budget(self._num_steps(context))
        if self._budget is None:
            num_steps = self._num_steps(context)
            if num_steps is None and self.config.budget != "fixed":
                raise ValueError(
                    f'PASA budget="{self.config.budget}" needs the number of denoising steps: '
                    "apply PASA to the pipeline (not the bare transformer), or run the "
                    'transformer inside `cache_context(name, num_inference_steps=N)`, or use budget="fixed"'
                )
            self._budget = make_budget(self.config, num_steps)
        num_steps = getattr(self._budget, "num_steps", None)
        if num_steps is not None and self.step >= num_steps:
            self.warn_once(
                "extra_steps",
                f"PASA: more denoising steps than the {num_steps} announced; extra steps run at "
                f"density {self.config.density}",
            )
            self.density = self.config.density
        else:
            self.density = float(self._budget.density(self.step))
        self._sigma = self._sigma_of(t, step_index, context)
        x_t = inputs.get("hidden_states")
        self._x_t = x_t.detach() if isinstance(x_t, torch.Tensor) else None
        self._observe_pending = self._x_t is not None
        self._steps.append(
            StepReport(
                step=self.step,
                timestep=t,
                sigma=self._sigma,
                density=self.density,
                realised_density=1.0,
                curvature=None,
                dense=self.density >= 1.0,
                calls=0,
                attention_flops=0.0,
                computed_flops=0.0,
            )
        )

    def _given_budget(self, num_steps: int | None) -> StepBudget:
        """The budget passed to ``apply``, reset for a new generation and checked for length."""
        planned = getattr(self.budget, "num_steps", None)
        if num_steps is not None and planned is not None and planned != num_steps:
            raise ValueError(
                f"the budget passed to pasa.apply plans {planned} steps, but this generation "
                f"runs {num_steps}; build the budget for {num_steps} steps"
            )
        self.budget.reset()
        return self.budget

    def _close_step(self) -> None:
        if not self._steps:
            return
        last = self._steps[-1]
        if self._total_blocks:
            last.realised_density = float(self._computed) / self._total_blocks  # one sync a step
        last.computed_flops = last.attention_flops * last.realised_density
        curvatures = self._curvatures()
        if last.step < len(curvatures):
            last.curvature = curvatures[last.step]
        self._computed = torch.zeros(())
        self._total_blocks = 0

    def _add_flops(self, model: torch.nn.Module, family: Family, inputs: dict[str, Any]) -> None:
        x = inputs.get("hidden_states")
        if self.grid is None or not isinstance(x, torch.Tensor):
            return
        tokens = math.prod(self.grid) + family.text_tokens(inputs)
        flops = 0.0
        for _, attn in family.targets(model):
            heads = attn.heads
            head_dim = attn.to_q.out_features // heads
            flops += attention_flops(x.shape[0], heads, tokens, head_dim)
        self._steps[-1].attention_flops += flops


class _TrackerAsObserver:
    """Adapts a bare :class:`CurvatureTracker` to the budget's ``observe`` call."""

    def __init__(self, tracker: CurvatureTracker) -> None:
        self.tracker = tracker

    def observe(self, sigma: float, x_t: torch.Tensor, v_t: torch.Tensor | None) -> None:
        self.tracker.update(sigma, x_t, v_t)


class _NoState(BaseState):
    def reset(self) -> None:
        pass


class PASAHook(ModelHook):
    """diffusers ``ModelHook`` on a denoiser: feeds :class:`RunState` around every call."""

    _is_stateful = True

    def __init__(self, state: RunState, family: Family) -> None:
        super().__init__()
        self.state = state
        self.family = family
        # Receives the pipeline's CacheContext (step_index, sigma, num_inference_steps).
        self.cache_context = StateManager(_NoState)

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any):
        inputs = bind_inputs(module, args, kwargs)
        self.state.begin_call(module, self.family, inputs, self.cache_context._context)
        order = self.state.order
        if order is not None:  # per-token forward arguments (CogVideoX's rotary tables)
            for name, reorder in self.family.stream.side_inputs.items():
                if inputs.get(name) is not None:
                    value = reorder(inputs[name], order)
                    args, kwargs = replace_input(module, args, kwargs, name, value)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.state.end_call(output)
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.finish()
        return module
