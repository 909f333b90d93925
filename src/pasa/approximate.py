"""Approximate branch (DESIGN.md section 4): unselected blocks seen through group means.

For each query, every key group of an *unselected* block contributes one pooled key ``k̄_b`` with
logit ``q·k̄_b * scale + log n_b`` (it stands for its ``n_b`` tokens) and pooled value ``v̄_b``.
This coarse attention is merged with the exact block-sparse result through the log-sum-exp rule,
so no query is ever left without the context it did not compute exactly.
"""

from __future__ import annotations

import torch

from pasa.estimate import group_pool
from pasa.plan import BlockPlan

_CHUNK_ELEMENTS = 32 * 1024 * 1024


def add_approximate_branch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    group_size: int,
    scale: float | None = None,
    flat_ratio: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge group-mean attention over the unselected blocks into an exact result.

    Args:
        q, k, v: ``(B, S, H, D)`` in tiled order.
        out: ``(B, S, H, D)`` exact attention over the plan; lse ``(B, H, S)`` fp32.
        flat_ratio: > 0 merges only the heads (per batch item) whose plan keeps less than
            ``flat_ratio`` times the plan's density of the attention mass (its exact mass against
            the group means' estimate of the rest, averaged over rows): heads that attend almost uniformly, whose dense output is close to
            the mean value and whose sparse output is not. 0 merges every head.
    Returns:
        merged out ``(B, S, H, D)`` fp32 and lse ``(B, H, S)`` fp32.
    """
    batch, seq, heads, dim = q.shape
    bs = plan.layout.block_size
    per_block = bs // group_size
    scale = dim**-0.5 if scale is None else scale
    kg, counts = group_pool(k, group_size)  # (B, H, NG, D), (NG,)
    vg, _ = group_pool(v, group_size)
    group_block = torch.arange(kg.shape[2], device=q.device) // per_block  # (NG,)
    selected = plan.to_dense_mask()[..., group_block]  # (B, H, Nq, NG)
    qf = q.float().transpose(1, 2)  # (B, H, S, D)
    coarse_out = torch.zeros(batch, heads, seq, dim, device=q.device)
    coarse_lse = torch.full((batch, heads, seq), float("-inf"), device=q.device)
    rows = max(bs, (_CHUNK_ELEMENTS // max(1, batch * heads * kg.shape[2])) // bs * bs)
    for s0 in range(0, seq, rows):
        s1 = min(seq, s0 + rows)
        qblock = torch.arange(s0, s1, device=q.device) // bs  # (c,)
        logits = qf[:, :, s0:s1] @ kg.transpose(-1, -2) * scale + counts.log()  # (B, H, c, NG)
        logits = logits.masked_fill(selected[:, :, qblock], float("-inf"))
        chunk_lse = torch.logsumexp(logits, -1)  # (B, H, c), -inf where all blocks were exact
        coarse_out[:, :, s0:s1] = torch.softmax(logits, -1).nan_to_num(0.0) @ vg
        coarse_lse[:, :, s0:s1] = chunk_lse
    merged = torch.logaddexp(lse, coarse_lse)
    if flat_ratio > 0:
        # Kept share per row: the exact mass of the plan against it plus the group means'
        # estimate of the rest (exact where attention peaks inside a block, which the group
        # means alone would average away).
        kept = torch.exp(lse - merged).mean(-1)  # (B, H)
        density = plan.kv_counts.float().mean(-1) / plan.num_kv_blocks  # (B, H)
        flat = kept < flat_ratio * density  # (B, H)
        merged = torch.where(flat[..., None], merged, lse)
        coarse_lse = torch.where(flat[..., None], coarse_lse, float("-inf"))
    w_exact = torch.exp(lse - merged).unsqueeze(-1)
    w_coarse = torch.exp(coarse_lse - merged).unsqueeze(-1)
    result = w_exact * out.float().transpose(1, 2) + w_coarse * coarse_out
    return result.transpose(1, 2), merged
