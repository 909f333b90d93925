"""Tables and plots of evaluation results (matplotlib, Agg backend; nothing is shown).

- :func:`plot_density_curvature`: one generation's per-step density and curvature (the demo).
- :func:`summarise`: suite rows -> means over captions x seeds per strategy x density.
- :func:`markdown_table`, :func:`plot_against_density`, :func:`plot_tradeoff`,
  :func:`write_results_markdown`.

``python -m pasa.eval.report RESULTS.json [...] --tradeoff OUT.png`` draws the PSNR / flicker
trade-off of the runs of one or more suite results files (a strategy found in several keeps its
first file's runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Suite metrics, how tables name them, and their number format.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("mean_density", "realised density", ".3f"),
    ("psnr", "PSNR dB", ".2f"),
    ("ssim", "SSIM", ".4f"),
    ("flicker_excess", "flicker excess", ".5f"),
    ("warp_error_excess", "warp-error excess", ".6f"),
    ("frame_psnr_var", "frame-PSNR var", ".3f"),
    ("plan_jaccard", "plan Jaccard", ".3f"),
    ("seconds", "seconds", ".1f"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_density_curvature(report: Any, path: str | Path) -> Path:
    """Per-step budget and realised density (left axis) and curvature kappa (right axis) of a
    :class:`~pasa.integrations.diffusers.GenerationReport`; dense steps shaded."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    steps = [s.step for s in report.steps]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    for s in report.steps:
        if s.dense:
            ax.axvspan(s.step - 0.5, s.step + 0.5, color="0.9", lw=0)
    ax.step(steps, report.densities, where="mid", color="C0", label="budget density")
    ax.plot(steps, report.realised_densities, "o", color="C0", ms=4, label="realised density")
    ax.set_xlabel("denoising step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("attention density")
    ax.set_ylim(0, 1.05)
    right = ax.twinx()
    kappa = [math.nan if k is None else k for k in report.curvatures]
    right.plot(steps, kappa, "s--", color="C3", ms=3, label="curvature kappa")
    right.set_ylabel("curvature kappa", color="C3")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize=8)
    ax.set_title(f"PASA: mean density {report.mean_density:.3f} (dense steps shaded)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean of every :data:`COLUMNS` metric over captions x seeds, per (strategy, density), in
    the order first seen; skipped runs keep their reason."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["strategy"], row["density"]), []).append(row)
    out = []
    for (strategy, density), members in groups.items():
        ran = [m for m in members if "skipped" not in m]
        entry: dict[str, Any] = {"strategy": strategy, "density": density, "runs": len(ran)}
        if ran:
            entry.update({k: _mean([m["metrics"].get(k) for m in ran]) for k, _, _ in COLUMNS})
        else:
            entry["skipped"] = members[0]["skipped"]
        out.append(entry)
    return out


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown_table(summary: Sequence[dict[str, Any]], labels: dict[str, str]) -> str:
    """One row per strategy x target density; skipped ones say why."""
    head = ["strategy", "target density", "runs", *(title for _, title, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary:
        name = labels.get(e["strategy"], e["strategy"])
        if "skipped" in e:
            cells = [name, f"{e['density']:.2f}", "0", f"skipped: {e['skipped']}"]
            cells += [""] * (len(head) - len(cells))
        else:
            cells = [name, f"{e['density']:.2f}", str(e["runs"])]
            cells += [_cell(e.get(k), fmt) for k, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_against_density(
    summary: Sequence[dict[str, Any]],
    metric: str,
    path: str | Path,
    *,
    labels: dict[str, str],
    ylabel: str,
    title: str,
) -> Path:
    """``metric`` against realised mean density, one line per strategy (means over runs)."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    by_strategy: dict[str, list[tuple[float, float]]] = {}
    for e in summary:
        if "skipped" in e or e.get(metric) is None or e.get("mean_density") is None:
            continue
        by_strategy.setdefault(e["strategy"], []).append((e["mean_density"], e[metric]))
    for i, (strategy, points) in enumerate(by_strategy.items()):
        points.sort()
        style = "-" if strategy.startswith("pasa") else "--"
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            style,
            marker="o",
            color=f"C{i % 10}",
            label=labels.get(strategy, strategy),
        )
    ax.set_xlabel("realised mean attention density")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if by_strategy:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*", "<", ">")


def plot_tradeoff(
    summary: Sequence[dict[str, Any]], path: str | Path, *, labels: dict[str, str]
) -> Path:
    """PSNR against flicker excess, one panel per target density, one point per strategy:
    up is closer to dense, left flickers less (means over runs)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    ran = [e for e in summary if "skipped" not in e and e.get("psnr") is not None]
    densities = sorted({e["density"] for e in ran})
    strategies = list(dict.fromkeys(e["strategy"] for e in ran))
    fig, axes = plt.subplots(
        1, max(1, len(densities)), figsize=(4.2 * max(1, len(densities)), 4.4), dpi=120,
        squeeze=False,
    )  # fmt: skip
    for ax, density in zip(axes[0], densities, strict=False):
        for e in (e for e in ran if e["density"] == density):
            i = strategies.index(e["strategy"])
            ax.plot(e["flicker_excess"], e["psnr"], _MARKERS[i % len(_MARKERS)],
                    color=plt.get_cmap("tab20")(i % 20), ms=7,
                    label=labels.get(e["strategy"], e["strategy"]))  # fmt: skip
        ax.set_title(f"target density {density:.2f}")
        ax.set_xlabel("flicker excess over dense")
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("PSNR against dense (dB)")
    legend: dict[str, Any] = {}  # label -> its first handle, in the order first drawn
    for ax in axes[0]:
        for h, n in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(n, h)
    fig.tight_layout()
    if legend:
        fig.legend(list(legend.values()), list(legend), fontsize=7, loc="upper left",
                   bbox_to_anchor=(1.0, 0.95))  # fmt: skip
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def write_results_markdown(
    path: str | Path,
    *,
    summary: Sequence[dict[str, Any]],
    labels: dict[str, str],
    settings: dict[str, Any],
    dense: dict[str, float | None],
    plots: dict[str, Path],
    command: str,
) -> Path:
    """A ``docs/results.md``-style page: settings, the table, the plots (relative links)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Testbed quality results",
        "",
        f"Reproduce: `{command}`",
        "",
        "Every strategy is compared with the dense clip of the same caption and seed; numbers are "
        "means over captions x seeds. Flicker excess: dense clip's VBench temporal-flickering "
        "score minus the strategy's (positive: more flicker than dense). Warp-error excess: the "
        "strategy's flow warping error minus the dense clip's. Plan Jaccard: overlap of each "
        "layer's computed blocks between consecutive sparse steps. Peers are reimplemented for "
        "ablation under PASA's kernel and tiling (`pasa.eval.strategies`).",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in settings.items()),
        "",
        f"Dense reference: VBench temporal flickering {_cell(dense.get('flicker'), '.5f')}, "
        f"warping error {_cell(dense.get('warp_error'), '.6f')}, "
        f"{_cell(dense.get('seconds'), '.1f')} s per clip.",
        "",
        markdown_table(summary, labels),
        "",
    ]
    for name, plot in plots.items():
        link = Path(os.path.relpath(plot.resolve(), path.parent.resolve())).as_posix()
        lines += [f"![{name}]({link})", ""]
    path.write_text("\n".join(lines))
    return path


def merged_runs(
    paths: Sequence[str | Path], only: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The runs of several suite ``results.json`` files; a strategy found in more than one
    keeps the runs of the first file that has it; ``only`` keeps those strategies alone. Raises
    SystemExit naming a file that is not suite results."""
    runs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for name in paths:
        try:
            file_runs = json.loads(Path(name).read_text())["runs"]
            fresh = {r["strategy"] for r in file_runs} - seen
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"{name}: not a suite results file ({exc!r})") from None
        runs += [r for r in file_runs if r["strategy"] in fresh]
        seen |= fresh
    if only is None:
        return runs
    keep = set(only)
    return [r for r in runs if r["strategy"] in keep]


def main(argv: list[str] | None = None) -> int:
    """Trade-off plot of the runs in one or more suite ``results.json`` files."""
    from pasa.eval.strategies import STRATEGIES

    ap = argparse.ArgumentParser(description="PSNR / flicker trade-off of suite results")
    ap.add_argument("results", nargs="+", help="results.json files written by `pasa eval`")
    ap.add_argument("--tradeoff", required=True, help="PNG to write")
    ap.add_argument("--strategies", nargs="+", default=None, help="draw only these strategies")
    args = ap.parse_args(argv)
    labels = {name: s.label for name, s in STRATEGIES.items()}
    runs = merged_runs(args.results, args.strategies)
    path = plot_tradeoff(summarise(runs), args.tradeoff, labels=labels)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
