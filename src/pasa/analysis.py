"""Exact attention statistics for judging plans: true block mass and the recall of a plan."""

from __future__ import annotations

import torch

from pasa.layout import TokenLayout
from pasa.plan import BlockPlan

_CHUNK_ELEMENTS = 32 * 1024 * 1024


def true_block_mass(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Exact attention mass per (query block, key block), averaged over the block's queries.

    Args:
        q, k: ``(B, S, H, D)`` in original token order.
    Returns:
        ``(B, H, N, N)`` fp32; each row sums to 1.
    """
    qt, kt = layout.to_blocks(q).float(), layout.to_blocks(k).float()
    batch, seq, heads, dim = qt.shape
    n, bs = layout.num_blocks, layout.block_size
    key_block = torch.arange(seq, device=q.device) // bs  # (S,)
    out = q.new_zeros((batch, heads, n, n), dtype=torch.float32)
    kt = kt.transpose(1, 2)  # (B, H, S, D)
    rows = max(bs, (_CHUNK_ELEMENTS // max(1, batch * heads * seq)) // bs * bs)
    for s0 in range(0, seq, rows):
        s1 = min(seq, s0 + rows)
        qc = qt[:, s0:s1].transpose(1, 2)  # (B, H, c, D)
        probs = torch.softmax(qc @ kt.transpose(-1, -2) * dim**-0.5, dim=-1)  # (B, H, c, S)
        per_block = torch.zeros(batch, heads, s1 - s0, n, device=q.device)
        per_block.index_add_(3, key_block, probs)
        qblock = torch.arange(s0, s1, device=q.device) // bs
        out.index_add_(2, qblock, per_block)
    sizes = torch.bincount(torch.arange(seq, device=q.device) // bs, minlength=n).float()
    return out / sizes.view(1, 1, -1, 1)


def plan_recall(plan: BlockPlan, mass: torch.Tensor) -> float:
    """Share of the exact attention mass that ``plan`` computes, averaged over rows.

    Args:
        mass: ``(B, H, N, N)`` from :func:`true_block_mass`.
    """
    return float((mass * plan.to_dense_mask()).sum(-1).mean())
