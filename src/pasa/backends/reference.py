"""Reference block-sparse attention: pure PyTorch, the executable spec every kernel is held to.

Chunked over query blocks: one chunk gathers only its planned key blocks, so extra memory is
O(chunk * Kmax * block_size * D), never O(S^2). Softmax and accumulation in fp32; exact LSE.
"""

from __future__ import annotations

import torch

from pasa.plan import BlockPlan

# Bound on fp32 elements of one chunk's gathered keys or scores: ~128 MiB each.
_CHUNK_ELEMENTS = 32 * 1024 * 1024


def reference_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the planned blocks.

    Args:
        q, k, v: ``(B, S, H, D)`` in tiled order (``plan.layout``).
        plan: the blocks to compute; ``kv_indices`` ``(B, H, Nq, Kmax)``.
    Returns:
        out ``(B, S, H, D)`` fp32 and lse ``(B, H, S)`` fp32 (natural log), tiled order.
    """
    batch, seq, heads, dim = q.shape
    bs = plan.layout.block_size
    n = plan.layout.num_blocks
    scale = dim**-0.5 if scale is None else scale
    plan = plan.trimmed()
    kmax = plan.kv_indices.shape[-1]
    pad = n * bs - seq

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (B, S, H, D) -> (B, H, N, bs, D) fp32
        x = x.float().transpose(1, 2)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(batch, heads, n, bs, dim)

    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    key_is_real = torch.arange(n * bs, device=q.device).view(n, bs) < seq  # (N, bs)
    out = torch.empty(batch, heads, n, bs, dim, device=q.device)
    lse = torch.empty(batch, heads, n, bs, device=q.device)
    per_row = batch * heads * kmax * bs * max(dim, bs)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // per_row)
    for i0 in range(0, n, rows_per_chunk):
        i1 = min(n, i0 + rows_per_chunk)
        idx = plan.kv_indices[:, :, i0:i1].long()  # (B, H, c, Kmax)
        c = i1 - i0
        flat = idx.reshape(batch, heads, c * kmax, 1, 1).expand(-1, -1, -1, bs, dim)
        kg = kb.gather(2, flat).view(batch, heads, c, kmax * bs, dim)
        vg = vb.gather(2, flat).view(batch, heads, c, kmax * bs, dim)
        valid = plan.row_valid()[:, :, i0:i1].unsqueeze(-1) & key_is_real[idx]  # (B,H,c,Kmax,bs)
        scores = torch.matmul(qb[:, :, i0:i1], kg.transpose(-1, -2)) * scale  # (B,H,c,bs,Kmax*bs)
        scores = scores.masked_fill(~valid.view(batch, heads, c, 1, kmax * bs), float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # (B, H, c, bs)
        probs = torch.exp(scores - row_lse.unsqueeze(-1))
        out[:, :, i0:i1] = torch.matmul(probs, vg)
        lse[:, :, i0:i1] = row_lse
    out = out.view(batch, heads, n * bs, dim)[:, :, :seq].transpose(1, 2)  # (B, S, H, D)
    return out, lse.view(batch, heads, n * bs)[:, :, :seq]
