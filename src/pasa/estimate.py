"""Grouped block-importance estimate (DESIGN.md section 1), the PyTorch reference.

Queries and keys are mean-pooled per *group* of ``g`` consecutive tokens of the tiled order (groups
never straddle blocks). For query group ``a`` and key group ``b``::

    logit(a, b) = q̄_a · k̄_b * scale + log n_b          (n_b = tokens in group b)
    p(a, b)     = softmax over all key groups b of logit(a, ·)
    mass(i, j)  = max over query groups a in block i of  sum over key groups b in block j of p(a, b)

``log n_b`` makes a pooled key stand for its ``n_b`` tokens (a short ragged group weighs less).
With one group per block this is exactly the mean-pooling estimate of earlier block-sparse methods.
The fused Triton kernel in ``pasa.kernels`` computes the same quantity without storing ``p``.
"""

from __future__ import annotations

import torch

# Bound on the fp32 elements of one chunk of group logits: ~64 MiB.
_CHUNK_ELEMENTS = 16 * 1024 * 1024


def group_pool(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each group of ``group_size`` consecutive tokens.

    Args:
        x: ``(B, S, H, D)`` in tiled order.
    Returns:
        means ``(B, H, NG, D)`` fp32 with ``NG = ceil(S / group_size)``, and
        counts ``(NG,)`` fp32 (the last group may be short).
    """
    batch, seq, heads, dim = x.shape
    num_groups = -(-seq // group_size)
    pad = num_groups * group_size - seq
    xf = x.float().transpose(1, 2)  # (B, H, S, D)
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
    sums = xf.view(batch, heads, num_groups, group_size, dim).sum(dim=3)  # (B, H, NG, D)
    counts = torch.full((num_groups,), float(group_size), device=x.device)
    counts[-1] = group_size - pad
    return sums / counts.view(1, 1, -1, 1), counts


def block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    group_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Estimated attention mass of every (query block, key block) pair.

    Args:
        q, k: ``(B, S, H, D)`` in tiled order.
    Returns:
        ``(B, H, N, N)`` fp32 with ``N = ceil(S / block_size)``; each entry in [0, 1].
    """
    batch, seq, heads, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    per_block = block_size // group_size
    num_blocks = -(-seq // block_size)
    qg, _ = group_pool(q, group_size)  # (B, H, NG, D)
    kg, counts = group_pool(k, group_size)  # (B, H, NG, D), (NG,)
    num_groups = kg.shape[2]
    key_bias = counts.log()  # (NG,)
    # Key groups padded to whole blocks so that a block sum is a reshape; padding gets p = 0.
    key_pad = num_blocks * per_block - num_groups
    out = q.new_empty((batch, heads, num_blocks, num_blocks), dtype=torch.float32)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * num_groups * per_block))
    for i0 in range(0, num_blocks, rows_per_chunk):
        i1 = min(num_blocks, i0 + rows_per_chunk)
        qa = qg[:, :, i0 * per_block : i1 * per_block]  # (B, H, A, D)
        logits = torch.matmul(qa, kg.transpose(-1, -2)) * scale + key_bias  # (B, H, A, NG)
        p = torch.softmax(logits, dim=-1)
        if key_pad:
            p = torch.nn.functional.pad(p, (0, key_pad))
        per_key_block = p.view(batch, heads, p.shape[2], num_blocks, per_block).sum(-1)
        # (B, H, A, N) -> max over the query groups of each query block -> (B, H, i1-i0, N)
        a_pad = (i1 - i0) * per_block - per_key_block.shape[2]
        if a_pad:  # the last query block has fewer groups: pad with zeros, they never win a max
            per_key_block = torch.nn.functional.pad(per_key_block, (0, 0, 0, a_pad))
        out[:, :, i0:i1] = per_key_block.view(batch, heads, i1 - i0, per_block, num_blocks).amax(3)
    return out
