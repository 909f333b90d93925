"""``pasa demo``: one captioned testbed clip, dense and with PASA from the same seed.

Writes into ``out_dir``: ``dense.mp4``, ``pasa.mp4``, ``side_by_side.mp4`` (labelled, dense left),
``metrics.json`` (PASA against dense: PSNR, SSIM, flicker, warping error; PASA's per-step report;
timings) and ``density_curvature.png`` (per-step density and trajectory curvature), and prints a
short table. On the CPU it samples a smaller clip (:data:`CPU_DEFAULTS`: 16 frames of 128 x 128,
about 45 s in all on two cores with the full-size testbed model); on a GPU the full-size clip.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pasa.config import APPROXIMATIONS
from pasa.provenance import git_commit

# CPU: 16 frames of 128 x 128 (16 x 16 x 16 tokens, 32 PASA blocks; the trainer mixes in 128-pixel
# clips) and the GPU run's 20 Euler steps: about 45 s in all on two cores with the full-size model.
CPU_DEFAULTS = {"frames": 16, "size": 128, "steps": 20}
GPU_STEPS = 20
FPS = 8


@dataclass
class DemoResult:
    """What :func:`run_video_demo` wrote (``files``: name -> path) and its metrics and table."""

    out_dir: Path
    files: dict[str, Path]
    metrics: dict[str, Any]
    table: str


def demo_settings(config: Any, device: torch.device, *, size, frames, steps) -> dict[str, int]:
    """Clip size and steps: the given ones, else the checkpoint's full size on a GPU, and the
    smaller of it and :data:`CPU_DEFAULTS` on the CPU."""
    full = device.type != "cpu"
    size = size or (config.height if full else min(config.height, CPU_DEFAULTS["size"]))
    frames = frames or (config.frames if full else min(config.frames, CPU_DEFAULTS["frames"]))
    steps = steps or (GPU_STEPS if full else CPU_DEFAULTS["steps"])
    step = 2 * config.pixel_factor
    if size % step:
        raise ValueError(f"size={size} must be a multiple of {step} for this checkpoint")
    return {"frames": int(frames), "size": int(size), "steps": int(steps)}


def write_mp4(path: Path, frames_uint8: Any, fps: int = FPS) -> Path:
    """``(F, H, W, 3)`` uint8 RGB frames -> an mp4.

    H.264 through imageio-ffmpeg when it is installed (plays in browsers); otherwise OpenCV's
    own MPEG-4 Part 2 encoder (``mp4v``: plays in VLC, mpv and most desktop players), so the demo
    also runs where the ffmpeg wheel (68 MB) is not installed.
    """
    import importlib.util

    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        import imageio.v2 as imageio

        imageio.mimwrite(path, list(frames_uint8), fps=fps, codec="libx264", macro_block_size=1)
        return path
    import cv2

    frames = list(frames_uint8)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV could not open an mp4 writer for {path}")
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path


def side_by_side(left: torch.Tensor, right: torch.Tensor, labels: tuple[str, str]) -> Any:
    """Two clips ``(3, F, H, W)`` next to each other, scaled up to >= 256 pixels high, each
    under a label bar: ``(F, 24 + s H, 2 s W, 3)`` uint8."""
    import cv2
    import numpy as np

    from pasa.eval.metrics import to_uint8

    scale = max(1, 256 // left.shape[-2])
    halves = []
    for clip, label in zip((left, right), labels, strict=True):
        frames = to_uint8(clip).numpy()  # (F, H, W, 3)
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
        bar = np.full((frames.shape[0], 24, frames.shape[2], 3), 255, dtype=np.uint8)
        for f in range(frames.shape[0]):
            cv2.putText(bar[f], label, (6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
        halves.append(np.concatenate([bar, frames], axis=1))
    return np.concatenate(halves, axis=2)


def _table(dense: Any, sparse: Any, metrics: dict[str, float]) -> str:
    rows = [
        ("", "seconds", "density", "PSNR dB", "SSIM", "flicker", "warp err"),
        ("dense", f"{dense.seconds:.1f}", "1.000", "-", "-",
         f"{metrics['flicker_reference']:.4f}", f"{metrics['warp_error_reference']:.5f}"),
        ("PASA", f"{sparse.seconds:.1f}", f"{sparse.mean_density:.3f}", f"{metrics['psnr']:.2f}",
         f"{metrics['ssim']:.4f}", f"{metrics['flicker']:.4f}", f"{metrics['warp_error']:.5f}"),
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def run_video_demo(
    checkpoint: str | Path | None,
    out_dir: str | Path,
    *,
    caption: str | None = None,
    seed: int = 0,
    density: float = 0.15,
    budget: str = "online",
    approximate: str | bool = "taylor",
    size: int | None = None,
    frames: int | None = None,
    steps: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> DemoResult:
    """Generate ``caption`` dense and with PASA from ``seed`` and write the comparison.

    Args:
        checkpoint: testbed checkpoint (None: the shipped one, ``DEFAULT_CHECKPOINT``).
        out_dir: created if needed; the five files go here.
        caption: the prompt; None takes the first held-out evaluation caption.
        density: PASA's mean density; ``budget``: ``"online"`` (curvature) or ``"fixed"``.
        approximate: PASA's estimate of the blocks it leaves out (``PASAConfig.approximate``):
            ``"taylor"`` (the default), ``"principal"`` (closer to dense, dearer),
            ``"group_means"``, ``"grouped_taylor"`` or False (exact blocks only).
        size, frames, steps: clip side in pixels, frames and Euler steps (see
            :func:`demo_settings` for the defaults).
        device: None picks CUDA when available.
    Returns:
        :class:`DemoResult` with the written files, the metrics dict and a printable table.
    Raises:
        pasa.testbed.CheckpointError: a missing, truncated or foreign checkpoint.
        ImportError: diffusers, matplotlib or OpenCV missing (``pasa[eval]``).
    """
    from pasa.eval.generate import require

    require("diffusers", "safetensors", "matplotlib", "cv2", command="pasa demo")
    from tqdm import tqdm

    from pasa.eval.generate import Hooks, eval_captions, generate, load_model, resolve_device
    from pasa.eval.metrics import compare_clips, to_uint8
    from pasa.eval.report import plot_density_curvature
    from pasa.eval.strategies import get_strategy
    from pasa.testbed.model import DEFAULT_CHECKPOINT, describe_checkpoint

    started = time.perf_counter()
    device = resolve_device(device)
    checkpoint = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    model, config, record = load_model(checkpoint, device)
    settings = demo_settings(config, device, size=size, frames=frames, steps=steps)
    caption = caption if caption is not None else eval_captions(1, **config.clip_settings())[0]
    pasa_config = (
        get_strategy("pasa").config(density).replace(budget=budget, approximate=approximate)
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = time.perf_counter()
    with tqdm(total=2 * settings["steps"], desc="dense", unit="step", disable=not progress) as bar:
        common = dict(
            seed=seed,
            num_steps=settings["steps"],
            frames=settings["frames"],
            size=settings["size"],
            on_step=lambda *_: bar.update(),
        )
        dense = generate(model, config, caption, **common)
        bar.set_description("PASA")
        sparse = generate(model, config, caption, hooks=Hooks(pasa_config), **common)
    generated = time.perf_counter()
    metrics = compare_clips(sparse.frames, dense.frames)
    metrics["flicker_excess"] = metrics["flicker_reference"] - metrics["flicker"]
    metrics["warp_error_excess"] = metrics["warp_error"] - metrics["warp_error_reference"]
    metrics["plan_jaccard"] = sparse.plan_jaccard
    metrics["mean_density"] = sparse.mean_density

    files = {
        "dense": write_mp4(out / "dense.mp4", to_uint8(dense.frames).numpy()),
        "pasa": write_mp4(out / "pasa.mp4", to_uint8(sparse.frames).numpy()),
        "side_by_side": write_mp4(
            out / "side_by_side.mp4",
            side_by_side(dense.frames, sparse.frames, ("dense", f"PASA {sparse.mean_density:.2f}")),
        ),
        "plot": plot_density_curvature(sparse.report, out / "density_curvature.png"),
    }
    table = _table(dense, sparse, metrics)
    finished = time.perf_counter()
    data = {
        "caption": caption,
        "seed": seed,
        "checkpoint": describe_checkpoint(checkpoint),
        "training": record.get("training"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "commit": git_commit(),
        "clip": {**settings, "height": settings["size"], "width": settings["size"]},
        "pasa_config": asdict(pasa_config),
        "metrics": metrics,
        "timings": {
            "load_s": loaded - started,
            "dense_s": dense.seconds,
            "pasa_s": sparse.seconds,
            "metrics_and_files_s": finished - generated,
            "total_s": finished - started,
            "dense_step_s": dense.step_seconds,
            "pasa_step_s": sparse.step_seconds,
        },
        "report": sparse.report.to_dict(),
    }
    files["metrics"] = out / "metrics.json"
    files["metrics"].write_text(json.dumps(data, indent=2) + "\n")
    return DemoResult(out, files, data, table)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The demo's options (for ``pasa demo`` or ``python -m pasa.testbed.video_demo``)."""
    parser.add_argument("--checkpoint", help="testbed checkpoint (default: the shipped one)")
    parser.add_argument("--out", default="pasa_demo", help="output folder (default: pasa_demo)")
    parser.add_argument("--caption", help="prompt (default: a held-out evaluation caption)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--density", type=float, default=0.15, help="PASA's mean density")
    parser.add_argument("--budget", choices=("online", "fixed"), default="online")
    parser.add_argument(
        "--approximate",
        choices=(*APPROXIMATIONS, "none"),
        default="taylor",
        help="estimate of the blocks PASA leaves out (default taylor; principal: closer to dense, "
        "dearer; none: exact blocks only)",
    )
    parser.add_argument("--size", type=int, help="clip side in pixels (CPU 128, GPU full)")
    parser.add_argument("--frames", type=int, help="clip frames (CPU 16, GPU full)")
    parser.add_argument("--steps", type=int, help=f"Euler steps (default {GPU_STEPS})")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo for parsed :func:`add_arguments` options; 2 on a checkpoint error."""
    from pasa.testbed.model import CheckpointError

    try:
        result = run_video_demo(
            args.checkpoint,
            args.out,
            caption=args.caption,
            seed=args.seed,
            density=args.density,
            budget=args.budget,
            approximate=False if args.approximate == "none" else args.approximate,
            size=args.size,
            frames=args.frames,
            steps=args.steps,
            device=args.device,
            progress=not args.no_progress,
        )
    except (CheckpointError, ImportError) as exc:
        print(f"pasa demo: {exc}", file=sys.stderr)
        return 2
    clip = result.metrics["clip"]
    print(f"caption: {result.metrics['caption']}")
    print(
        f"{clip['frames']} frames x {clip['size']} x {clip['size']}, {clip['steps']} steps, "
        f"seed {result.metrics['seed']}, {result.metrics['device']}"
    )
    print(result.table)
    print(f"wrote {', '.join(p.name for p in result.files.values())} to {result.out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pasa demo", description=__doc__.splitlines()[0])
    return run_from_args(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
