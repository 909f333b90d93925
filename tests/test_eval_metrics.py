"""Clip and plan metrics: sanity values on constructed inputs."""

import math

import pytest
import torch

from pasa.eval.metrics import (
    PSNR_CAP_DB,
    attention_recall,
    frame_psnr_variance,
    oracle_recall,
    plan_jaccard,
    psnr,
    ssim,
    step_jaccard,
    temporal_flickering,
    warping_error,
)
from pasa.layout import make_layout
from pasa.plan import BlockPlan


def _clip(frames=6, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(3, frames, size // 8, size // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(-1, 1)


def test_psnr_ssim_identical_and_noisy():
    x = _clip()
    assert psnr(x, x) == PSNR_CAP_DB and ssim(x, x) == pytest.approx(1.0)
    assert frame_psnr_variance(x, x) == 0.0
    noisy = (x + 0.1 * torch.randn(x.shape)).clamp(-1, 1)
    assert 15 < psnr(noisy, x) < 30 and ssim(noisy, x) < 0.9
    # PSNR from its definition: uniform error 0.02 in [-1, 1] is 0.01 in [0, 1] -> 40 dB
    assert psnr((x * 0.5) + 0.02, x * 0.5) == pytest.approx(40.0, abs=1e-6)


def test_frame_psnr_variance_sees_one_bad_frame():
    x = _clip()
    y = x.clone()
    y[:, 2] = (y[:, 2] + 0.2).clamp(-1, 1)
    assert frame_psnr_variance(y, x) > 100


def test_flicker_static_is_one_and_drops_with_flashes():
    static = _clip(frames=1).expand(3, 8, 64, 64)
    assert temporal_flickering(static) == 1.0
    flashing = static.clone()
    flashing[:, 1::2] = (flashing[:, 1::2] + 0.2).clamp(-1, 1)
    assert temporal_flickering(flashing) < 0.96


def test_warping_error_translated_clip_is_small():
    pytest.importorskip("cv2")
    big = _clip(frames=1, size=128)[:, 0]  # (3, 128, 128) smooth texture
    moving = torch.stack([big[:, 16:80, 16 + 2 * t : 80 + 2 * t] for t in range(6)], 1)
    shuffled = torch.stack([_clip(frames=1, seed=s)[:, 0] for s in range(6)], 1)
    translated_error = warping_error(moving)
    assert translated_error < 2e-3
    assert warping_error(shuffled) > 10 * translated_error
    assert not math.isnan(translated_error)


def _plan(mask):
    layout = make_layout((2, 8, 8), block_size=32)
    return BlockPlan.from_dense_mask(mask, layout), layout


def test_plan_jaccard():
    eye = torch.eye(4, dtype=torch.bool).expand(1, 2, 4, 4)
    full = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    a, _ = _plan(eye)
    b, _ = _plan(full)
    assert plan_jaccard(a, a) == 1.0
    assert plan_jaccard(a, b) == pytest.approx(4 / 16)
    assert step_jaccard([a, a, b]) == pytest.approx([1.0, 0.25])


def test_recall_dense_plan_is_one_and_oracle_bounds_any_plan():
    q, k = torch.randn(2, 1, 128, 2, 16).unbind(0)
    full, layout = _plan(torch.ones(1, 2, 4, 4, dtype=torch.bool))
    assert attention_recall(full, q, k) == pytest.approx(1.0, abs=1e-5)
    eye, _ = _plan(torch.eye(4, dtype=torch.bool).expand(1, 2, 4, 4))
    from pasa.analysis import true_block_mass

    mass = true_block_mass(q, k, layout)
    assert attention_recall(eye, q, k) <= oracle_recall(mass, 0.25) + 1e-6
    assert oracle_recall(mass, 1.0) == pytest.approx(1.0, abs=1e-5)
