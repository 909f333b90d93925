"""How fast does the testbed's attention concentrate with training, and how much training would
recall at 10% = 0.6 take at that rate?

Reads every attention probe recorded under ``benchmarks/results/`` (a JSON object with ``mean``,
``per_layer`` and ``training``, at any depth: the per-call probes of the training runs and the
shipped checkpoints' probes), works out each probe's cumulative training clips through its
record's ``init_from`` chain (runs warm-start from each other), and fits

    recall@10% = a + b * log10(cumulative clips)

by least squares over the probes' means at t = 0.25 / 0.5 / 0.75 (the trainer's probe; a probe
of more noise levels contributes its ``per_time`` means at those three). Probes without a
training record (the per-call probes of run 4) are left out. It prints the
points, the fit, and the clips (and, at the best measured rate, hours of a 2 x H200 machine)
that would reach 0.6 if the trend held. An extrapolation over two decades from 0.4 decades of
data, and the probes mix two clip styles; it is a measure of the rate, not a forecast.

    PYTHONPATH=src python benchmarks/recall_trend.py --out benchmarks/results/recall-trend.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STANDARD_TIMES = [0.25, 0.5, 0.75]
GOAL = 0.6


def cumulative_clips(training: dict) -> int:
    """Clips seen by a checkpoint: its own run's plus every run it was initialised from."""
    total = 0
    record: dict | None = training
    while record:
        total += int(record.get("samples", 0))
        record = record.get("init_from")
    return total


def _probes(node, where: str):
    """Every probe record inside a JSON value, with a path that says where it is."""
    if isinstance(node, dict):
        if {"mean", "per_layer", "training"} <= node.keys():
            yield where, node
        for key, value in node.items():
            yield from _probes(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _probes(value, f"{where}[{i}]")


def _standard_means(probe: dict) -> dict[str, float] | None:
    """Mean recall at 10% and 20% over the trainer's noise levels: the probe's own mean when it
    used exactly those, else the mean of its ``per_time`` entries for them (None if missing)."""
    if [float(t) for t in probe.get("times", [])] == STANDARD_TIMES:
        return {d: float(probe["mean"][d]) for d in ("0.1", "0.2")}
    per_time = probe.get("per_time") or {}
    try:
        return {
            d: sum(float(per_time[d][str(t)]) for t in STANDARD_TIMES) / len(STANDARD_TIMES)
            for d in ("0.1", "0.2")
        }
    except KeyError:
        return None


def collect(results: Path = RESULTS) -> list[dict]:
    """One point per distinct checkpoint probed at the trainer's noise levels."""
    points: dict[tuple[int, int], dict] = {}
    for path in sorted(results.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        for where, probe in _probes(data, path.name):
            means = _standard_means(probe)
            if means is None:
                continue
            training = probe["training"]
            clips = cumulative_clips(training)
            key = (clips, int(training.get("steps", 0)))
            exact = [float(t) for t in probe.get("times", [])] == STANDARD_TIMES
            if key in points and (points[key]["exact_times"] or not exact):
                continue  # one point a checkpoint: a probe at exactly these times first
            points[key] = {
                "exact_times": exact,
                "source": where,
                "steps_this_run": training.get("steps"),
                "cumulative_clips": clips,
                "recall_10": means["0.1"],
                "recall_20": means["0.2"],
                "device": probe.get("device") or training.get("device"),
            }
    return sorted(points.values(), key=lambda p: p["cumulative_clips"])


def fit(points: list[dict]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of recall@10% = a + b log10(clips)."""
    xs = [math.log10(p["cumulative_clips"]) for p in points]
    ys = [p["recall_10"] for p in points]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 2 or sxx == 0:
        raise ValueError("need probes of at least two different amounts of training")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - b * mx, b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--clips-per-hour",
        type=float,
        default=176_272 / 8_723 * 7.27 * 3600,
        help="training throughput to turn clips into hours (default: run 4 on two H200s, its "
        "176,272 clips in 8,723 steps (256 and 128 px steps 1:1) at its best call's 7.27 steps/s)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    points = collect(args.results)
    a, b = fit(points)
    latest = points[-1]
    needed = 10 ** ((GOAL - a) / b)
    print(f"{'cumulative clips':>16}  recall@10%  recall@20%  source")
    for p in points:
        print(f"{p['cumulative_clips']:>16,}  {p['recall_10']:>10.3f}  {p['recall_20']:>10.3f}  "
              f"{p['source']}")  # fmt: skip
    print(f"fit: recall@10% = {a:.3f} + {b:.3f} log10(clips)  (+{b:.3f} per tenfold training)")
    print(f"0.6 at {needed:,.0f} clips: {needed / latest['cumulative_clips']:.0f} x the "
          f"{latest['cumulative_clips']:,} trained so far, about "
          f"{(needed - latest['cumulative_clips']) / args.clips_per_hour:,.0f} more hours at "
          f"{args.clips_per_hour:,.0f} clips an hour")  # fmt: skip
    if args.out:
        report = {
            "benchmark": "recall_trend",
            "what": "recall at 10% of every recorded probe (t = 0.25 / 0.5 / 0.75) against the "
            "clips its checkpoint was trained on, and a log-linear fit",
            "points": points,
            "fit": {"a": a, "b_per_decade": b},
            "goal": GOAL,
            "clips_for_goal_if_trend_holds": needed,
            "times_trained_so_far": needed / latest["cumulative_clips"],
            "clips_per_hour_assumed": args.clips_per_hour,
            "hours_for_goal_if_trend_holds": (needed - latest["cumulative_clips"])
            / args.clips_per_hour,
            "command": "PYTHONPATH=src python benchmarks/recall_trend.py --out "
            "benchmarks/results/recall-trend.json",
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
