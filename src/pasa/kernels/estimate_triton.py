"""Fused grouped block-importance estimate on GPU (DESIGN.md section 1), held to pasa/estimate.py.

Input is the group means the token gather already produced (``permute.gather_tokens``); one kernel
then computes group logits, the row softmax statistics, the block mass and (optionally) the routing
keys of pasa/route.py: floored row share and ``log share + tau * Gumbel``, forced blocks ``+inf``.
The ``(S/g)^2`` logits never reach GPU memory; only ``(B, H, N, N)`` block values are written.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from pasa.kernels._triton_kernels import block_estimate_kernel, gumbel_kernel
from pasa.noise import GOLDEN, MASK32, SEED_SALT

# Query groups per program and key groups per inner step (tl.dot tile sizes).
_ROWS = 64
_COLS = 64
# "tf32x3" keeps the logits at fp32 accuracy (block mass within 1e-3 relative of the fp32
# reference); "tf32" is ~3x cheaper and ~1e-3 off on the logits.
DEFAULT_PRECISION = "tf32x3"


def _mix_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def noise_key(seed: int, step: int, layer: int) -> int:
    """The uint32 hash of ``(seed, step, layer)`` that pasa/noise.py chains the block indices onto."""
    h = _mix_int((SEED_SALT ^ seed) & MASK32)
    h = _mix_int(h ^ (((step + 1) * GOLDEN) & MASK32))
    return _mix_int(h ^ (((layer + 1) * GOLDEN) & MASK32))


@lru_cache(maxsize=64)
def _key_bias(seq: int, group_size: int, device: torch.device) -> torch.Tensor:
    """``(NG,)`` fp32 log of tokens per key group (the last group may be short)."""
    num_groups = -(-seq // group_size)
    counts = torch.full((num_groups,), float(group_size))
    counts[-1] = seq - (num_groups - 1) * group_size
    return counts.log().to(device)


def supports(block_size: int, group_size: int, head_dim: int) -> bool:
    """Whether the kernel's tile constraints hold (power-of-two groups per block, <= 64)."""
    per_block = block_size // group_size
    pow2 = per_block & (per_block - 1) == 0 and group_size & (group_size - 1) == 0
    return pow2 and per_block <= _ROWS and head_dim <= 256


def grouped_block_estimate(
    qg: torch.Tensor,
    kg: torch.Tensor,
    *,
    seq_len: int,
    block_size: int,
    group_size: int,
    scale: float | None = None,
    routing: dict | None = None,
    precision: str = DEFAULT_PRECISION,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block mass, or (with ``routing``) the routing share and scores, from group means.

    Args:
        qg, kg: ``(B, H, NG, D)`` fp32 group means (``NG = ceil(seq_len / group_size)``).
        routing: None for plain block mass; else a dict with ``first_text_block``, ``noise_key``,
            ``head_offset``, ``temperature``, ``mass_floor`` (pasa/route.py's settings).
    Returns:
        ``(B, H, N, N)`` fp32 block mass and None; or with ``routing`` the row share (floored, as
        pasa/route.py) and the scores ``log share + tau * Gumbel`` with forced blocks ``+inf``.
    """
    batch, heads, num_groups, dim = qg.shape
    if kg.shape != qg.shape or qg.dtype != torch.float32 or kg.dtype != torch.float32:
        raise ValueError(f"qg and kg must be equal-shaped fp32, got {qg.shape} {kg.shape}")
    if not supports(block_size, group_size, dim):
        raise ValueError(f"unsupported block_size {block_size} / group_size {group_size} / D {dim}")
    per_block = block_size // group_size
    n = -(-seq_len // block_size)
    scale = dim**-0.5 if scale is None else float(scale)
    qg, kg = qg.contiguous(), kg.contiguous()
    share = torch.empty((batch, heads, n, n), dtype=torch.float32, device=qg.device)
    scores = torch.empty_like(share) if routing is not None else share
    r = routing or {}
    temperature = float(r.get("temperature", 0.0))
    floor = float(r.get("mass_floor", 0.0))
    qb = _ROWS // per_block
    grid = (_cdiv(n, qb), batch * heads)
    block_estimate_kernel[grid](
        qg,
        kg,
        _key_bias(seq_len, group_size, qg.device),
        share,
        scores,
        heads,
        num_groups,
        n,
        scale,
        int(r.get("first_text_block", n)),
        int(r.get("noise_key", 0)),
        int(r.get("head_offset", 0)),
        temperature,
        floor,
        1.0 + floor * n,
        D=dim,
        BLOCK_D=max(16, 1 << (dim - 1).bit_length()),
        GPB=per_block,
        QB=qb,
        KBC=_COLS // per_block,
        PRECISION=precision,
        FINISH=routing is not None,
        NOISE=temperature > 0,
        num_warps=4,
    )
    return (share, None) if routing is None else (share, scores)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def routing_gumbel_triton(
    *,
    seed: int,
    step: int,
    layer: int,
    heads: int,
    head_offset: int,
    num_q: int,
    num_k: int,
    device: torch.device | str,
) -> torch.Tensor:
    """``(heads, num_q, num_k)`` fp32, the noise of pasa/noise.py drawn by the kernel's code."""
    out = torch.empty((heads, num_q, num_k), dtype=torch.float32, device=device)
    gumbel_kernel[(num_q, heads)](
        out, num_q, num_k, noise_key(seed, step, layer), head_offset, BLOCK=128
    )
    return out


def block_mass_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    group_size: int,
    scale: float | None = None,
    precision: str = DEFAULT_PRECISION,
) -> torch.Tensor:
    """Drop-in for :func:`pasa.estimate.block_mass` on CUDA: ``(B, S, H, D)`` tiled q, k ->
    ``(B, H, N, N)`` fp32 mass."""
    from pasa.kernels.permute import gather_tokens

    seq = q.shape[1]
    ident = torch.arange(seq, device=q.device)
    _, qg = gather_tokens(q, ident, pool_group=group_size)
    _, kg = gather_tokens(k, ident, pool_group=group_size)
    mass, _ = grouped_block_estimate(
        qg,
        kg,
        seq_len=seq,
        block_size=block_size,
        group_size=group_size,
        scale=scale,
        precision=precision,
    )
    return mass


__all__ = [
    "DEFAULT_PRECISION",
    "block_mass_triton",
    "grouped_block_estimate",
    "noise_key",
    "routing_gumbel_triton",
    "supports",
]
