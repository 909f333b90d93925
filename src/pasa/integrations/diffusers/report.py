"""Per-generation PASA report: density, curvature and attention FLOPs, step by step."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pasa.profile import BudgetProfile


def attention_flops(batch: int, heads: int, seq_len: int, head_dim: int) -> float:
    """Dense attention FLOPs of one call: ``QK^T`` and ``PV``, 2 FLOPs per multiply-add.

    ``4 * B * H * S^2 * D``; the softmax and PASA's estimator are not counted.
    """
    return 4.0 * batch * heads * seq_len * seq_len * head_dim


@dataclass
class StepReport:
    """One denoising step.

    Attributes:
        step: 0-based step index (the two classifier-free-guidance calls of a step count once).
        timestep: the scheduler's timestep the model saw.
        sigma: noise level of the step (from the pipeline's cache context or scheduler; else
            ``timestep / num_train_timesteps``).
        density: the budget's target density for the step (>= 1: dense).
        realised_density: computed key blocks / all key blocks over this rank's PASA calls
            (1.0 on a dense step).
        curvature: trajectory curvature kappa at this step; None without history.
        dense: the step ran stock (dense) attention.
        calls: transformer calls in the step (2 with separate CFG passes).
        attention_flops: dense attention FLOPs of the step's PASA layers (all heads).
        computed_flops: ``attention_flops * realised_density`` (block-count estimate).
        tiled_stream: the step's video tokens travelled through the blocks in PASA's tiled
            order (re-ordered once per transformer call, not per attention call).
    """

    step: int
    timestep: float
    sigma: float
    density: float
    realised_density: float
    curvature: float | None
    dense: bool
    calls: int
    attention_flops: float
    computed_flops: float
    tiled_stream: bool = False


@dataclass
class GenerationReport:
    """What PASA did in one pipeline call (``pasa.last_report(pipe)``)."""

    model: str
    config: dict[str, Any]
    grid: tuple[int, int, int] | None
    steps: list[StepReport] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def densities(self) -> list[float]:
        return [s.density for s in self.steps]

    @property
    def realised_densities(self) -> list[float]:
        return [s.realised_density for s in self.steps]

    @property
    def curvatures(self) -> list[float | None]:
        return [s.curvature for s in self.steps]

    @property
    def dense_steps(self) -> list[int]:
        return [s.step for s in self.steps if s.dense]

    @property
    def tiled_stream(self) -> bool:
        """Every step kept its tokens in tiled order across the blocks."""
        return bool(self.steps) and all(s.tiled_stream for s in self.steps)

    @property
    def attention_flops(self) -> float:
        return sum(s.attention_flops for s in self.steps)

    @property
    def flops_saved(self) -> float:
        return sum(s.attention_flops - s.computed_flops for s in self.steps)

    @property
    def flops_saved_fraction(self) -> float:
        total = self.attention_flops
        return self.flops_saved / total if total > 0 else 0.0

    @property
    def mean_density(self) -> float:
        total = self.attention_flops
        if total > 0:
            return sum(s.computed_flops for s in self.steps) / total
        return sum(self.realised_densities) / max(1, self.num_steps)

    def to_profile(self, *, scheduler: str = "unknown") -> BudgetProfile:
        """This run's trajectory as a budget profile, for ``PASAConfig(budget="profile")``.

        A calibration run records sigma and curvature per step; ``profile.save(path)`` keeps
        them, and later runs with the same step count allocate their densities from it.
        """
        if not self.steps:
            raise ValueError("the report has no steps: nothing to make a profile from")
        return BudgetProfile(
            model=self.model,
            scheduler=scheduler,
            num_steps=self.num_steps,
            resolution=tuple(self.grid or ()),
            sigmas=[s.sigma for s in self.steps],
            curvatures=self.curvatures,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            dense_steps=self.dense_steps,
            attention_flops=self.attention_flops,
            flops_saved=self.flops_saved,
            flops_saved_fraction=self.flops_saved_fraction,
            mean_density=self.mean_density,
            tiled_stream=self.tiled_stream,
        )
        return data

    def summary(self) -> str:
        """A few lines for the log: one per step, then the totals."""
        lines = [f"PASA report: {self.model}, grid {self.grid}, {self.num_steps} steps"]
        for s in self.steps:
            kappa = "-" if s.curvature is None else f"{s.curvature:.3g}"
            lines.append(
                f"  step {s.step:3d}  sigma {s.sigma:.4f}  density {s.density:.3f}"
                f"  realised {s.realised_density:.3f}  kappa {kappa}"
                f"{'  dense' if s.dense else ''}"
            )
        lines.append(
            f"  mean density {self.mean_density:.3f}, attention TFLOP "
            f"{self.attention_flops / 1e12:.3f}, saved {self.flops_saved / 1e12:.3f} "
            f"({100 * self.flops_saved_fraction:.1f}%), tiled token stream "
            f"{'on' if self.tiled_stream else 'off'}"
        )
        return "\n".join(lines)
