"""Quality and stability metrics of a generated clip against the dense clip of the same seed.

Clips are float tensors ``(3, F, H, W)`` in [-1, 1] (the testbed's convention); pixel metrics work
on [0, 1] values, VBench's flicker on 8-bit frames as VBench reads them from video files.
Plan metrics take :class:`~pasa.plan.BlockPlan` objects.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from pasa.analysis import plan_recall, true_block_mass
from pasa.plan import BlockPlan

PSNR_CAP_DB = 100.0  # PSNR of identical clips (finite, so that JSON and means stay valid)


def _unit(clip: torch.Tensor) -> torch.Tensor:
    """``(3, F, H, W)`` in [-1, 1] -> ``(F, 3, H, W)`` float64 in [0, 1]."""
    if clip.dim() != 4 or clip.shape[0] != 3:
        raise ValueError(f"expected a clip (3, F, H, W), got shape {tuple(clip.shape)}")
    return ((clip.double() + 1) / 2).clamp(0, 1).transpose(0, 1)


def to_uint8(clip: torch.Tensor) -> torch.Tensor:
    """``(3, F, H, W)`` in [-1, 1] -> ``(F, H, W, 3)`` uint8 RGB frames."""
    return (_unit(clip) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-30))).clamp(max=PSNR_CAP_DB)


def psnr(clip: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB over the whole clip ([0, 1] peak); ``PSNR_CAP_DB`` when identical."""
    return float(_psnr_from_mse((_unit(clip) - _unit(reference)).pow(2).mean()))


def frame_psnr(clip: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``(F,)`` PSNR of each frame in dB."""
    return _psnr_from_mse((_unit(clip) - _unit(reference)).pow(2).mean(dim=(1, 2, 3)))


def frame_psnr_variance(clip: torch.Tensor, reference: torch.Tensor) -> float:
    """Variance over frames of the per-frame PSNR (dB^2): error that comes and goes flickers."""
    return float(frame_psnr(clip, reference).var(unbiased=False))


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    """``(size,)`` normalised 1D Gaussian; the 2D SSIM window is its outer product."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def ssim(
    clip: torch.Tensor, reference: torch.Tensor, *, window: int = 11, sigma: float = 1.5
) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, [0, 1]
    range), over the valid window positions of every frame and channel."""
    x, y = _unit(clip), _unit(reference)  # (F, 3, H, W)
    if x.shape != y.shape:
        raise ValueError(f"clips differ in shape: {tuple(clip.shape)} vs {tuple(reference.shape)}")
    window = min(window, x.shape[-1], x.shape[-2])
    g = _gaussian(window, sigma).to(x)
    rows = g.view(1, 1, 1, window).expand(3, 1, 1, window)
    cols = g.view(1, 1, window, 1).expand(3, 1, window, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable: rows then columns, valid positions
        return F.conv2d(F.conv2d(t, rows, groups=3), cols, groups=3)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return float((num / den).mean())


def temporal_flickering(clip: torch.Tensor) -> float:
    """VBench's temporal_flickering score, in [0, 1], 1 for a static clip.

    As ``vbench/temporal_flickering.py`` (Vchitect/VBench, ``cal_score``): the mean absolute
    difference of consecutive 8-bit frames over all pixels and channels (``cv2.absdiff`` in
    float32, ``mae_seq``), averaged over frame pairs, then ``(255 - mean) / 255``. VBench applies
    it to static-scene prompts; on moving clips compare the score against the dense clip's.
    """
    frames = to_uint8(clip).float()  # (F, H, W, 3)
    if frames.shape[0] < 2:
        raise ValueError("temporal_flickering needs at least two frames")
    mae = (frames[1:] - frames[:-1]).abs().mean(dim=(1, 2, 3))  # (F - 1,)
    return float((255.0 - mae.mean()) / 255.0)


def _cv2():
    try:
        import cv2
    except ImportError as exc:
        raise ImportError(
            "warping_error needs OpenCV: pip install opencv-python-headless (or pasa[eval])"
        ) from exc
    return cv2


def warping_error(clip: torch.Tensor) -> float:
    """Flow warping error (Lai et al. 2018): mean squared difference between each frame and the
    next frame warped back by optical flow, over non-occluded pixels, RGB in [0, 1].

    Flow: OpenCV Farneback, forward (t -> t+1) and backward (t+1 -> t) on grey frames. A pixel is
    occluded when the round trip does not return: ``|f + b(x + f)|^2 >= 0.01 (|f|^2 + |b(x + f)|^2)
    + 0.5`` (Sundaram et al. 2010). Lower is more temporally consistent.
    """
    cv2 = _cv2()
    frames = to_uint8(clip).numpy()  # (F, H, W, 3)
    if frames.shape[0] < 2:
        raise ValueError("warping_error needs at least two frames")
    import numpy as np

    h, w = frames.shape[1:3]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    errors = []
    for a in range(len(frames) - 1):
        fwd = cv2.calcOpticalFlowFarneback(grey[a], grey[a + 1], None, 0.5, 3, 15, 3, 5, 1.2, 0)
        bwd = cv2.calcOpticalFlowFarneback(grey[a + 1], grey[a], None, 0.5, 3, 15, 3, 5, 1.2, 0)
        map_x, map_y = gx + fwd[..., 0], gy + fwd[..., 1]
        warped = cv2.remap(
            frames[a + 1], map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        bwd_at = cv2.remap(bwd, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        round_trip = ((fwd + bwd_at) ** 2).sum(-1)
        bound = 0.01 * ((fwd**2).sum(-1) + (bwd_at**2).sum(-1)) + 0.5
        inside = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
        valid = (round_trip < bound) & inside
        if not valid.any():
            continue
        diff = ((frames[a].astype(np.float64) - warped.astype(np.float64)) / 255.0) ** 2
        errors.append(float(diff.mean(-1)[valid].mean()))
    return float(np.mean(errors)) if errors else math.nan


def plan_jaccard(a: BlockPlan, b: BlockPlan) -> float:
    """|A ∩ B| / |A ∪ B| of two plans' computed blocks, over batch, heads and rows."""
    ma, mb = a.to_dense_mask(), b.to_dense_mask()
    if ma.shape != mb.shape:
        raise ValueError(f"plans differ in shape: {tuple(ma.shape)} vs {tuple(mb.shape)}")
    union = (ma | mb).sum()
    return float((ma & mb).sum() / union) if union else 1.0


def step_jaccard(plans: list[BlockPlan]) -> list[float]:
    """Jaccard of each step's plan with the previous step's (one layer's plans, in step order)."""
    return [plan_jaccard(p, q) for p, q in itertools.pairwise(plans)]


def attention_recall(plan: BlockPlan, q: torch.Tensor, k: torch.Tensor) -> float:
    """Share of the exact attention mass of ``q, k`` (``(B, S, H, D)``) that ``plan`` computes."""
    return plan_recall(plan, true_block_mass(q, k, plan.layout))


def oracle_recall(mass: torch.Tensor, density: float) -> float:
    """Mass kept by the best ``round(density * N)`` key blocks of every row (the ceiling of any
    plan at that density): how concentrated the attention is. ``mass``: ``(B, H, N, N)``."""
    n = mass.shape[-1]
    k = max(1, round(density * n))
    return float(mass.topk(k, dim=-1).values.sum(-1).mean())


def compare_clips(
    clip: torch.Tensor, reference: torch.Tensor, *, flow: bool = True
) -> dict[str, float]:
    """All clip metrics of ``clip`` against ``reference`` (the dense clip of the same seed)."""
    out = {
        "psnr": psnr(clip, reference),
        "ssim": ssim(clip, reference),
        "frame_psnr_var": frame_psnr_variance(clip, reference),
        "flicker": temporal_flickering(clip),
        "flicker_reference": temporal_flickering(reference),
    }
    if flow:
        out["warp_error"] = warping_error(clip)
        out["warp_error_reference"] = warping_error(reference)
    return out
