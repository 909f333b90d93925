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

    Reads ``x`` once in its own layout (no fp32 copy of the whole tensor).

    Args:
        x: ``(B, S, H, D)`` in tiled order.
    Returns:
        means ``(B, H, NG, D)`` fp32 with ``NG = ceil(S / group_size)``, and
        counts ``(NG,)`` fp32 (the last group may be short).
    """
    seq = x.shape[1]
    full = seq // group_size
    parts = []
    if full:
        head = x[:, : full * group_size].unflatten(1, (full, group_size))  # (B, NGf, g, H, D)
        parts.append(head.sum(2, dtype=torch.float32))  # (B, NGf, H, D)
    if seq > full * group_size:
        parts.append(x[:, full * group_size :].sum(1, keepdim=True, dtype=torch.float32))
    sums = torch.cat(parts, 1) if len(parts) > 1 else parts[0]  # (B, NG, H, D)
    counts = torch.full((sums.shape[1],), float(group_size), device=x.device)
    counts[-1] = seq - (sums.shape[1] - 1) * group_size
    return (sums / counts.view(1, -1, 1, 1)).transpose(1, 2).contiguous(), counts


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
    qg, _ = group_pool(q, group_size)
    kg, counts = group_pool(k, group_size)
    return block_mass_from_means(
        qg, kg, counts, block_size=block_size, group_size=group_size, scale=scale
    )


def block_mass_from_means(
    qg: torch.Tensor,
    kg: torch.Tensor,
    counts: torch.Tensor,
    *,
    block_size: int,
    group_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`block_mass` from group means.

    Args:
        qg, kg: ``(B, H, NG, D)`` fp32 group means; counts ``(NG,)`` tokens per group.
    Returns:
        ``(B, H, N, N)`` fp32.
    """
    batch, heads, num_groups, dim = qg.shape
    scale = dim**-0.5 if scale is None else scale
    per_block = block_size // group_size
    num_blocks = -(-num_groups // per_block)
    key_bias = counts.log()  # (NG,)
    # Key groups padded to whole blocks so that a block sum is a reshape; padding gets p = 0.
    key_pad = num_blocks * per_block - num_groups
    out = qg.new_empty((batch, heads, num_blocks, num_blocks))
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
