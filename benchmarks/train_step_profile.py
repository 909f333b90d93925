"""Where does a testbed training step's time go: rendering the clips, encoding the captions, or
the model (forward, backward, optimizer, EMA)?

One process, one device, the trainer of ``pasa.testbed.train`` with the arguments given (its
defaults: the testbed, 256 and 128 px clips 1:3, 4 clips a step at 256). For each clip size it
times ``--steps`` steps after ``--warmup``: the batch alone (scenes, rendering, captions, latents:
``Trainer.batch_for``), the captions' encoding alone, and whole training steps; the model's share
is the difference. CUDA is synchronised around every timed part. Then ``--run-steps``
consecutive steps of the run's own size schedule, without and with the trainer's batch prefetch
(``BatchPrefetcher``: the next step's clips made in a background thread while this one trains).

    PYTHONPATH=src python benchmarks/train_step_profile.py --out benchmarks/results/train-step-profile-h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _diffusers_common import git_commit, nvidia_driver, write_json

from pasa.testbed.train import Trainer, build_parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device):
    """``(milliseconds, fn())``, CUDA synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    value = fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3, value


def profile(trainer: Trainer, steps: int, warmup: int) -> list[dict]:
    """Median milliseconds of the batch, the rendering, the captions and the whole step, per
    clip size, over the run's own first steps of each size."""
    need = steps + warmup
    by_size: dict[int, list[int]] = {size: [] for size in trainer.sizes}
    step = 0
    while any(len(chosen) < need for chosen in by_size.values()):
        chosen = by_size[trainer.step_clips(step)[0]]
        if len(chosen) < need:
            chosen.append(step)
        step += 1
    rows = []
    for size, chosen in sorted(by_size.items(), reverse=True):
        times: dict[str, list[float]] = {"step": [], "batch": [], "render": [], "captions": []}
        for i, s in enumerate(chosen):
            batch_ms, _ = _timed(lambda s=s: trainer.batch_for(s), trainer.device)
            render_ms, (_, captions) = _timed(
                lambda s=s: trainer.render_clips(*trainer.step_clips(s)), trainer.device
            )
            text_ms, _ = _timed(
                lambda captions=captions: trainer.text(captions, device=trainer.device),
                trainer.device,
            )
            trainer.step = s
            step_ms, _ = _timed(trainer.train_step, trainer.device)
            if i >= warmup:
                for key, ms in zip(times, (step_ms, batch_ms, render_ms, text_ms), strict=True):
                    times[key].append(ms)
        med = {key: statistics.median(values) for key, values in times.items()}
        rows.append({
            "size": size,
            "clips_per_step": len(trainer.step_clips(chosen[0])[1]),
            "steps_timed": len(times["step"]),
            "step_ms": round(med["step"], 2),
            "batch_ms": round(med["batch"], 2),
            "render_ms": round(med["render"], 2),
            "captions_ms": round(med["captions"], 2),
            "model_ms": round(med["step"] - med["batch"], 2),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def consecutive(trainer: Trainer, steps: int, prefetch: bool) -> float:
    """Mean milliseconds a step over ``steps`` consecutive steps of the run's own size schedule,
    with or without the trainer's batch prefetch (one warm-up step first)."""
    from pasa.testbed.train import BatchPrefetcher

    device = trainer.device
    batches = BatchPrefetcher(trainer) if prefetch else None
    try:
        trainer.step = 0
        trainer.train_step(batches.get(0) if batches else None)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(batches.get(trainer.step) if batches else None)
        _sync(device)
        return (time.perf_counter() - start) * 1e3 / steps
    finally:
        if batches is not None:
            batches.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="timed steps per clip size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--run-steps", type=int, default=40, help="consecutive steps, each way")
    p.add_argument("--out", type=Path, default=None)
    own, rest = p.parse_known_args(argv)
    train_args = build_parser().parse_args(
        ["--out", "/tmp/pasa-train-profile", "--sizes", "256,128", "--size-weights", "1,3", *rest]
    )
    trainer = Trainer(train_args)
    rows = profile(trainer, own.steps, own.warmup)
    run = {
        "steps": own.run_steps,
        "step_ms": round(consecutive(trainer, own.run_steps, prefetch=False), 2),
        "step_ms_prefetched": round(consecutive(trainer, own.run_steps, prefetch=True), 2),
    }
    print(json.dumps(run), flush=True)
    device = trainer.device
    record = {
        "benchmark": "train_step_profile",
        "environment": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "driver": nvidia_driver() if device.type == "cuda" else None,
            "torch": torch.__version__,
        },
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {
            "steps": own.steps,
            "warmup": own.warmup,
            "train_args": rest,
            "sizes": trainer.sizes,
            "size_weights": trainer.size_weights,
            "batch_size": train_args.batch_size,
        },
        "rows": rows,
        "consecutive_steps": run,
    }
    if own.out:
        write_json(record, own.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
