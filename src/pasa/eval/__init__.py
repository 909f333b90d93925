"""Quality evaluation on the testbed: clip and plan metrics, the strategy table, attention probes.

- :mod:`pasa.eval.metrics`: PSNR, SSIM, VBench temporal flickering, flow warping error, per-frame
  PSNR variance, plan Jaccard, attention recall.
- :mod:`pasa.eval.strategies`: dense, peers reimplemented for ablation, PASA and its ablations.
- :mod:`pasa.eval.probe`: per-layer attention concentration of a ``WanTransformer3DModel``.
- :mod:`pasa.eval.generate`: one testbed generation under one strategy (demo and suite).
- :mod:`pasa.eval.suite` / :mod:`pasa.eval.report`: ``pasa eval``, its table, plots and page.
"""

from pasa.eval.metrics import (
    attention_recall,
    compare_clips,
    frame_psnr,
    frame_psnr_variance,
    oracle_recall,
    plan_jaccard,
    psnr,
    ssim,
    step_jaccard,
    temporal_flickering,
    warping_error,
)
from pasa.eval.strategies import STRATEGIES, ScheduleBudget, Strategy, get_strategy, window_plan

__all__ = [
    "STRATEGIES",
    "ScheduleBudget",
    "Strategy",
    "attention_recall",
    "compare_clips",
    "frame_psnr",
    "frame_psnr_variance",
    "get_strategy",
    "oracle_recall",
    "plan_jaccard",
    "psnr",
    "ssim",
    "step_jaccard",
    "temporal_flickering",
    "warping_error",
    "window_plan",
]
