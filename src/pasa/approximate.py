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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge group-mean attention over the unselected blocks into an exact result.

    Args:
        q, k, v: ``(B, S, H, D)`` in tiled order.
        out: ``(B, S, H, D)`` exact attention over the plan; lse ``(B, H, S)`` fp32.
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
    out = out.float().transpose(1, 2).clone()  # (B, H, S, D)
    lse = lse.clone()
    rows = max(bs, (_CHUNK_ELEMENTS // max(1, batch * heads * kg.shape[2])) // bs * bs)
    for s0 in range(0, seq, rows):
        s1 = min(seq, s0 + rows)
        qblock = torch.arange(s0, s1, device=q.device) // bs  # (c,)
        logits = qf[:, :, s0:s1] @ kg.transpose(-1, -2) * scale + counts.log()  # (B, H, c, NG)
        logits = logits.masked_fill(selected[:, :, qblock], float("-inf"))
        coarse_lse = torch.logsumexp(logits, -1)  # (B, H, c), -inf where all blocks were exact
        coarse = torch.softmax(logits, -1).nan_to_num(0.0) @ vg  # (B, H, c, D)
        merged = torch.logaddexp(lse[:, :, s0:s1], coarse_lse)
        w_exact = torch.exp(lse[:, :, s0:s1] - merged).unsqueeze(-1)
        w_coarse = torch.exp(coarse_lse - merged).unsqueeze(-1)
        out[:, :, s0:s1] = w_exact * out[:, :, s0:s1] + w_coarse * coarse
        lse[:, :, s0:s1] = merged
    return out.transpose(1, 2), lse
