"""Budget profiles: curvature recorded by one calibration run, saved as versioned JSON."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pasa.curvature import CurvatureTracker, allocate_densities

SCHEMA_VERSION = 1


class ProfileError(ValueError):
    """A budget profile file that cannot be used; the message names the problem and the path."""


@dataclass
class BudgetProfile:
    """Curvature recorded by one calibration run, saved as a small JSON file.

    Attributes:
        schema_version: file format version; :data:`SCHEMA_VERSION` is the one this code reads.
        model, scheduler: names the profile was recorded with (informational).
        num_steps: denoising steps of the run.
        resolution: e.g. ``(frames, height, width)`` of the generated video.
        sigmas: ``(num_steps,)`` noise level per step.
        curvatures: ``(num_steps,)`` kappa per step, None where there was no history yet.
    """

    model: str
    scheduler: str
    num_steps: int
    resolution: tuple[int, ...]
    sigmas: list[float]
    curvatures: list[float | None]
    schema_version: int = field(default=SCHEMA_VERSION)

    def __post_init__(self) -> None:
        self.resolution = tuple(int(r) for r in self.resolution)
        self.sigmas = [float(s) for s in self.sigmas]
        self.curvatures = [None if k is None else float(k) for k in self.curvatures]

    @classmethod
    def from_tracker(
        cls, tracker: CurvatureTracker, *, model: str, scheduler: str, resolution: Sequence[int]
    ) -> BudgetProfile:
        """Profile of the run a tracker has just followed."""
        n, sigmas, kappas = tracker.num_steps, tracker.sigmas, tracker.curvatures
        return cls(model, scheduler, n, tuple(resolution), list(sigmas), list(kappas))

    def densities(
        self, mean_density: float, min_density: float, dense_quantile: float
    ) -> list[float]:
        """``(num_steps,)`` densities from the recorded curvatures.

        Steps without a curvature (the first one or two, where the run had no history) count as
        curved as the most curved recorded step: early steps set the layout, and the first
        measured curvature is the run's largest on the testbed. (Counting them as infinitely
        curved gave the first step 10x the median step's density, 0.61 at a mean of 0.10.)
        """
        known = [k for k in self.curvatures if k is not None]
        top = max(known) if known else math.inf
        kappas = [top if k is None else k for k in self.curvatures]
        kw = {"mean_density": mean_density, "min_density": min_density}
        return allocate_densities(kappas, dense_quantile=dense_quantile, **kw)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write JSON atomically (temp file in the same folder, then ``os.replace``).

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is False.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        data = asdict(self)
        data["resolution"] = list(self.resolution)
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BudgetProfile:
        """Read and validate a profile; never writes.

        Raises:
            FileNotFoundError: no file at ``path``.
            ProfileError: not JSON, a missing / unknown key, a wrong type, lengths that disagree
                with ``num_steps``, or a ``schema_version`` other than :data:`SCHEMA_VERSION`.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"budget profile not found: {path}")

        def bad(problem: str) -> ProfileError:
            return ProfileError(f"budget profile {path}: {problem}")

        try:
            data: Any = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise bad(f"expected a JSON object, found {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise bad(f"schema_version {version!r} found, only {SCHEMA_VERSION} is supported")
        names = {f.name for f in fields(cls)}
        if missing := sorted(names - data.keys()):
            raise bad(f"missing key(s) {missing}")
        if unknown := sorted(data.keys() - names):
            raise bad(f"unknown key(s) {unknown}")

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: Any) -> bool:
            return (is_int(x) or isinstance(x, float)) and math.isfinite(x)

        checks = {
            "model": isinstance(data["model"], str),
            "scheduler": isinstance(data["scheduler"], str),
            "num_steps": is_int(data["num_steps"]) and data["num_steps"] >= 1,
            "resolution": isinstance(data["resolution"], list)
            and all(is_int(r) and r >= 1 for r in data["resolution"]),
            "sigmas": isinstance(data["sigmas"], list) and all(map(is_num, data["sigmas"])),
            "curvatures": isinstance(data["curvatures"], list)
            and all(k is None or (is_num(k) and k >= 0) for k in data["curvatures"]),
        }
        for key, ok in checks.items():
            if not ok:
                raise bad(f"key {key!r} has the wrong type or value: {data[key]!r:.80}")
        for key in ("sigmas", "curvatures"):
            if len(data[key]) != data["num_steps"]:
                raise bad(
                    f"len({key})={len(data[key])} disagrees with num_steps={data['num_steps']}"
                )
        return cls(**data)  # __post_init__ turns lists into the field types
