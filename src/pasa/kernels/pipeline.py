"""The CUDA path of ``sparse_attention``: gather + pool, fused estimate, GPU routing.

Per call, memory traffic is one read and one write of q, k, v (re-ordering, with the group means
taken on the way) and of the output (restoring the order); the estimate reads only group means.
Inputs already in tiled order (``sparse_attention(..., tiled=True)``) skip the re-ordering; their
group means come from :func:`group_means` (q and k read once, one launch).
"""

from __future__ import annotations

import torch

from pasa.config import PASAConfig
from pasa.kernels.estimate_triton import grouped_block_estimate, noise_key, supports
from pasa.kernels.permute import gather_tokens
from pasa.kernels.permute import group_means as _group_means
from pasa.kernels.route_triton import route_from_scores
from pasa.layout import TokenLayout
from pasa.plan import BlockPlan
from pasa.route import _MASS_FLOOR


def fast_path_unavailable(q: torch.Tensor, config: PASAConfig) -> str | None:
    """None when the Triton path serves this call, else why not."""
    from pasa.kernels import triton_unavailable

    if q.device.type != "cuda":
        return "tensors are not on CUDA"
    reason = triton_unavailable()
    if reason is not None:
        return reason
    if not supports(config.block_size, config.group_size, q.shape[-1]):
        return "block_size / group_size / head dim outside the Triton kernel's tile constraints"
    return None


def to_tiled(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, group_size: int | None
) -> tuple[torch.Tensor, ...]:
    """``(B, S, H, D)`` q, k, v in tiled order, and q / k group means when ``group_size``."""
    qt, qg = gather_tokens(q, layout.perm, pool_group=group_size)
    kt, kg = gather_tokens(k, layout.perm, pool_group=group_size)
    vt, _ = gather_tokens(v, layout.perm)
    return qt, kt, vt, qg, kg


def group_means(
    q: torch.Tensor, k: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, H, NG, D)`` fp32 group means of tiled ``(B, S, H, D)`` q and k (one launch)."""
    return _group_means(q, k, group_size)


def from_tiled(out: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """``(B, S, H, D)`` (any strides, last dim contiguous) back to the original token order."""
    restored, _ = gather_tokens(out, layout.inv_perm)
    return restored


def plan_from_means(
    qg: torch.Tensor,
    kg: torch.Tensor,
    *,
    layout: TokenLayout,
    config: PASAConfig,
    density: float,
    step: int,
    layer: int,
    head_offset: int,
) -> BlockPlan:
    """Fused estimate + GPU routing: pasa/route.py's ``select_blocks(block_mass(...))``."""
    batch, heads = qg.shape[:2]
    if density >= 1.0:
        return BlockPlan.full(layout, batch, heads, qg.device)
    share, scores = grouped_block_estimate(
        qg,
        kg,
        seq_len=layout.seq_len,
        block_size=config.block_size,
        group_size=config.group_size,
        routing={
            "first_text_block": layout.first_text_block,
            "noise_key": noise_key(config.seed, step, layer),
            "head_offset": head_offset,
            "temperature": float(config.temperature),
            "mass_floor": _MASS_FLOOR,
        },
        # top-k ranks the scores alone; a trusted window weighs the window's share
        need_share=config.selection == "top_p" or config.window_trust is not None,
    )
    return route_from_scores(share, scores, layout=layout, config=config, density=density)
