"""``pasa eval``: every strategy at matched mean densities against dense, on the testbed.

For each caption x seed the dense clip is sampled once; then every strategy at every target mean
density, each compared with that dense clip: PSNR, SSIM, per-frame PSNR variance, flicker excess
(dense clip's VBench temporal-flickering score minus the strategy's), warping-error excess (the
strategy's minus the dense clip's), the plans' step-to-step Jaccard and the realised mean density
(computed / all attention FLOPs over the run, dense steps included).

A strategy that cannot reach a density is **skipped, with the reason recorded** (the 20%-dense
warm-up of the Sparse-VideoGen-style peer exceeds mean densities 0.10 and 0.15): reporting it at
a higher mean would compare it at a larger compute budget than the rest of its row.

Writes into ``out_dir``: ``results.json`` (settings, dense references, every run, the summary;
rewritten after every caption x seed, so an interrupted run keeps what it finished),
``results_table.md``, ``psnr_vs_density.png``, ``flicker_vs_density.png``, ``psnr_vs_flicker.png``
and the results page (``results_md``, default ``out_dir/results.md``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pasa.eval import metrics
from pasa.eval.generate import (
    CALIBRATION_DATA_SEED,
    calibrate_profile,
    eval_captions,
    generate,
    load_model,
    require,
    resolve_device,
    strategy_hooks,
)
from pasa.eval.report import (
    markdown_table,
    plot_against_density,
    plot_tradeoff,
    summarise,
    write_results_markdown,
)
from pasa.eval.strategies import STRATEGIES, get_strategy
from pasa.profile import BudgetProfile
from pasa.provenance import git_commit
from pasa.testbed.scene import SCENE_STYLE_NAMES

DENSITIES = (0.10, 0.15, 0.25)


@dataclass
class SuiteResult:
    """Paths written and the data behind them."""

    results: dict[str, Any]
    files: dict[str, Path]
    table: str


def _clip_metrics(clip: torch.Tensor, dense: torch.Tensor, ref: dict[str, float]) -> dict:
    flicker = metrics.temporal_flickering(clip)
    warp = metrics.warping_error(clip)
    return {
        "psnr": metrics.psnr(clip, dense),
        "ssim": metrics.ssim(clip, dense),
        "frame_psnr_var": metrics.frame_psnr_variance(clip, dense),
        "flicker": flicker,
        "flicker_excess": ref["flicker"] - flicker,
        "warp_error": warp,
        "warp_error_excess": warp - ref["warp_error"],
    }


def _write(out: Path, results: dict[str, Any], labels: dict[str, str], md: Path, command: str):
    summary = summarise(results["runs"])
    results["summary"] = summary
    files = {"results": out / "results.json", "table": out / "results_table.md"}
    files["results"].write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(summary, labels)
    files["table"].write_text(table + "\n")
    files["psnr_plot"] = plot_against_density(
        summary, "psnr", out / "psnr_vs_density.png", labels=labels,
        ylabel="PSNR against dense (dB)", title="Quality against density",
    )  # fmt: skip
    files["flicker_plot"] = plot_against_density(
        summary, "flicker_excess", out / "flicker_vs_density.png", labels=labels,
        ylabel="flicker excess over dense (VBench score)", title="Flicker against density",
    )  # fmt: skip
    files["tradeoff_plot"] = plot_tradeoff(summary, out / "psnr_vs_flicker.png", labels=labels)
    dense = results["dense"]
    files["markdown"] = write_results_markdown(
        md,
        summary=summary,
        labels=labels,
        settings=results["settings"],
        dense={k: _nan_mean([d[k] for d in dense]) for k in ("flicker", "warp_error", "seconds")},
        plots={
            "PSNR against density": files["psnr_plot"],
            "flicker": files["flicker_plot"],
            "PSNR against flicker": files["tradeoff_plot"],
        },
        command=command,
    )
    return files, table


def _nan_mean(values: Sequence[float]) -> float | None:
    kept = [v for v in values if v == v]  # drop NaN (warping error with no valid pixels)
    return sum(kept) / len(kept) if kept else None


def run_suite(
    checkpoint: str | Path | None,
    *,
    captions: Sequence[str] | int = 4,
    seeds: Sequence[int] = (0, 1),
    densities: Sequence[float] = DENSITIES,
    strategies: Sequence[str] | None = None,
    steps: int = 20,
    size: int | None = None,
    frames: int | None = None,
    out_dir: str | Path = "eval_results",
    results_md: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    resume: bool = False,
    command: str = "pasa eval",
    pairs: Sequence[tuple[int, int]] | None = None,
    budget_profile: str | Path | None = None,
    scene_style: str | None = None,
) -> SuiteResult:
    """Run the suite and write its files (see the module docstring).

    Args:
        checkpoint: testbed checkpoint (None: the shipped one).
        captions: prompts, or how many held-out evaluation captions to take.
        strategies: names in :data:`~pasa.eval.strategies.STRATEGIES` (default: all); dense is
            always run as the reference.
        size, frames: clip side in pixels and frames (default: the checkpoint's training size).
        results_md: the results page (default ``out_dir/results.md``).
        resume: keep the caption x seed pairs an earlier run with the same settings finished in
            ``out_dir/results.json`` and run only the rest (GPU calls with a time limit).
        command: how the page says to reproduce it.
        pairs: run only these ``(caption index, seed)`` pairs (one device's share of a run
            spread over several, :mod:`pasa.eval.parallel`); default: every pair.
        budget_profile: a recorded calibration profile to allocate from instead of recording
            one (copied into ``out_dir``); it must have ``steps`` steps.
        scene_style: draw the held-out captions in this style instead of the checkpoint's own
            (e.g. ``"bold"``: checkpoints trained on different styles judged on the same
            captions); read when ``captions`` is a count, recorded either way.
    Raises:
        pasa.testbed.CheckpointError: a missing, truncated or foreign checkpoint.
        ValueError: an unknown strategy name, or ``resume`` onto results of other settings.
        ImportError: diffusers, matplotlib or OpenCV missing (``pasa[diffusers,eval]``).
    """
    require("diffusers", "safetensors", "matplotlib", "cv2", command="pasa eval")
    import diffusers
    from tqdm import tqdm

    from pasa.testbed.model import DEFAULT_CHECKPOINT, describe_checkpoint

    names = [n for n in (strategies or list(STRATEGIES)) if n != "dense"]
    chosen = [get_strategy(n) for n in names]
    labels = {s.name: s.label for s in STRATEGIES.values()}
    device = resolve_device(device)
    checkpoint = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    model, config, record = load_model(checkpoint, device)
    size, frames = size or config.height, frames or config.frames
    settings = config.clip_settings(scene_style)  # ValueError for an unknown style
    drawn = isinstance(captions, int)
    prompts = eval_captions(captions, **settings) if drawn else list(captions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = Path(results_md) if results_md is not None else out / "results.md"

    results: dict[str, Any] = {
        "settings": {
            "checkpoint": describe_checkpoint(checkpoint),
            "training steps": (record.get("training") or {}).get("steps"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "clip": f"{frames} frames x {size} x {size}",
            "steps": steps,
            "captions": len(prompts),
            # the style the held-out captions were drawn in (None: prompts given)
            "scene style": settings["scene_style"] if drawn or scene_style else None,
            "seeds": list(seeds),
            "densities": list(densities),
            "strategies": names,
            "versions": f"torch {torch.__version__}, diffusers {diffusers.__version__}",
            "commit": git_commit(),
        },
        "captions": prompts,
        "dense": [],
        "runs": [],
    }
    done = _resume(out / "results.json", results) if resume else set()
    common = dict(num_steps=steps, frames=frames, size=size)
    profile_path = None
    if any(s.calibrated for s in chosen):
        profile_path = out / "budget_profile.json"
        profile = suite_profile(
            model, config, profile_path, given=budget_profile, reuse=bool(done), **common
        )
        results["settings"]["budget profile"] = {
            "file": profile_path.name,
            "calibration caption": "first caption of data seed "
            f"{CALIBRATION_DATA_SEED} (neither training nor this evaluation uses it)",
            "curvatures": profile.curvatures,
        }
    wanted = None if pairs is None else {(int(c), int(s)) for c, s in pairs}
    todo = [
        (ci, seed)
        for ci in range(len(prompts))
        for seed in seeds
        if (ci, seed) not in done and (wanted is None or (ci, seed) in wanted)
    ]
    total = len(todo) * (1 + len(chosen) * len(densities))
    files: dict[str, Path] = {}
    table = ""
    with tqdm(total=total, desc="pasa eval", unit="clip", disable=not progress) as bar:
        for ci, seed in todo:
            pair_started = time.perf_counter()
            caption = prompts[ci]
            where = {"caption": ci, "seed": seed}
            bar.set_postfix_str(f"caption {ci} seed {seed} dense")
            dense = generate(model, config, caption, seed=seed, **common)
            ref = {
                "flicker": metrics.temporal_flickering(dense.frames),
                "warp_error": metrics.warping_error(dense.frames),
                "seconds": dense.seconds,
            }
            results["dense"].append({**where, **ref})
            bar.update()
            for strategy in chosen:
                for density in densities:
                    row: dict[str, Any] = {
                        **where, "strategy": strategy.name, "density": density
                    }  # fmt: skip
                    bar.set_postfix_str(f"caption {ci} seed {seed} {strategy.name} {density}")
                    try:
                        hooks = strategy_hooks(strategy, density, steps, profile_path)
                    except ValueError as exc:
                        row["skipped"] = str(exc)
                    else:
                        run = generate(model, config, caption, seed=seed, hooks=hooks, **common)
                        measured = time.perf_counter()
                        row["metrics"] = {
                            **_clip_metrics(run.frames, dense.frames, ref),
                            "plan_jaccard": run.plan_jaccard,
                            "mean_density": run.mean_density,
                            "seconds": run.seconds,
                            "metric_seconds": round(time.perf_counter() - measured, 3),
                            "step_densities": run.report.realised_densities,
                        }
                    results["runs"].append(row)
                    bar.update()
            # the pair's wall time: every generation and its metrics (not the files written next)
            results["dense"][-1]["pair_seconds"] = round(time.perf_counter() - pair_started, 2)
            files, table = _write(out, results, labels, md, command)
    if not files:  # everything was resumed
        files, table = _write(out, results, labels, md, command)
    return SuiteResult(results, files, table)


_RESUME_KEYS = ("checkpoint", "training steps", "clip", "steps", "densities", "strategies")


def _resumed_profile(path: Path, steps: int) -> BudgetProfile | None:
    """The calibration profile a resumed run's finished clips used, if it is there and fits.

    Calibration is deterministic, so recording it again would give the same profile; reusing it
    saves one dense generation and keeps the resumed clips provably on the same budget.
    """
    if not path.is_file():
        return None
    try:
        profile = BudgetProfile.load(path)
    except (OSError, ValueError):  # unreadable or not a profile: record it again
        return None
    return profile if profile.num_steps == steps else None


def suite_profile(
    model: torch.nn.Module,
    config: Any,
    path: Path,
    *,
    given: str | Path | None,
    reuse: bool,
    num_steps: int,
    frames: int,
    size: int,
) -> BudgetProfile:
    """The calibration profile a suite allocates from, saved at ``path``: ``given`` (copied
    there), else the one already at ``path`` when ``reuse`` (a resumed run), else one recorded
    now by :func:`calibrate_profile`."""
    if given is not None:
        return _given_profile(Path(given), path, num_steps)
    profile = _resumed_profile(path, num_steps) if reuse else None
    if profile is None:
        profile = calibrate_profile(
            model, config, path, num_steps=num_steps, frames=frames, size=size
        )
    return profile


def _given_profile(given: Path, path: Path, steps: int) -> BudgetProfile:
    """Load the profile at ``given`` (it must have ``steps`` steps) and keep a copy at ``path``."""
    profile = BudgetProfile.load(given)
    if profile.num_steps != steps:
        raise ValueError(
            f"budget profile {given} has {profile.num_steps} steps; this run has {steps}"
        )
    if given.resolve() != path.resolve():
        shutil.copyfile(given, path)
    return profile


def _resume(path: Path, results: dict[str, Any]) -> set[tuple[int, int]]:
    """Load the finished caption x seed pairs of ``path`` into ``results``; their keys."""
    if not path.is_file():
        return set()
    old = json.loads(path.read_text())
    new = results["settings"]
    differ = [k for k in _RESUME_KEYS if old["settings"].get(k) != new[k]]
    n = min(len(old["captions"]), len(results["captions"]))
    if old["captions"][:n] != results["captions"][:n]:
        differ.append("captions")
    if differ:
        raise ValueError(
            f"cannot resume {path}: its {', '.join(differ)} differ from this run's; "
            "use another output folder or leave out --resume"
        )
    done = {(d["caption"], d["seed"]) for d in old["dense"]}
    results["dense"] = list(old["dense"])
    results["runs"] = [r for r in old["runs"] if (r["caption"], r["seed"]) in done]
    return done


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The suite's options (for ``pasa eval`` or ``python -m pasa.eval.suite``)."""
    parser.add_argument("--checkpoint", help="testbed checkpoint (default: the shipped one)")
    parser.add_argument("--captions", type=int, default=4, help="held-out captions (default 4)")
    parser.add_argument("--caption", action="append", help="a prompt instead (repeat for several)")
    parser.add_argument(
        "--scene-style",
        choices=SCENE_STYLE_NAMES,
        help="draw the held-out captions in this style (default: the checkpoint's own), e.g. "
        "'bold' to judge checkpoints trained on different styles on the same captions",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), help="default: all")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps (default 20)")
    parser.add_argument("--size", type=int, help="clip side in pixels (default: training size)")
    parser.add_argument("--frames", type=int, help="clip frames (default: training length)")
    parser.add_argument("--out", default="eval_results", help="folder for JSON, table, plots")
    parser.add_argument("--results-md", help="results page (default: OUT/results.md)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument(
        "--devices", nargs="+", metavar="DEVICE",
        help="spread the caption x seed pairs over these devices, one process each "
        "('all': every visible GPU); overrides --device",
    )  # fmt: skip
    parser.add_argument(
        "--budget-profile", help="allocate from this recorded profile instead of calibrating"
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep the caption x seed pairs OUT already has"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run_from_args(args: argparse.Namespace, command: str = "pasa eval") -> int:
    """Run the suite for parsed :func:`add_arguments` options; 2 (with the reason on stderr) on
    a checkpoint, profile, device or resume error."""
    from pasa.eval.parallel import resolve_devices, run_suite_parallel
    from pasa.testbed.model import CheckpointError

    options = dict(
        captions=args.caption or args.captions,
        seeds=args.seeds,
        densities=args.densities,
        strategies=args.strategies,
        steps=args.steps,
        size=args.size,
        frames=args.frames,
        out_dir=args.out,
        results_md=args.results_md,
        progress=not args.no_progress,
        resume=args.resume,
        command=command,
        scene_style=args.scene_style,
    )
    try:
        devices = resolve_devices(args.devices) if args.devices else [args.device]
        if len(devices) > 1:
            result = run_suite_parallel(
                args.checkpoint, devices=devices, budget_profile=args.budget_profile, **options
            )
        else:
            result = run_suite(
                args.checkpoint, device=devices[0], budget_profile=args.budget_profile, **options
            )
    except (CheckpointError, ImportError, OSError, ValueError, RuntimeError) as exc:
        print(f"pasa eval: {exc}", file=sys.stderr)
        return 2
    print(result.table)
    print(f"wrote {', '.join(str(p) for p in result.files.values())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pasa eval", description=__doc__.splitlines()[0])
    args = add_arguments(parser).parse_args(argv)
    return run_from_args(args, command=shlex.join(["pasa", "eval", *argv]))


if __name__ == "__main__":
    sys.exit(main())
