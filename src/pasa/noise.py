"""Counter-based routing noise: Gumbel(0, 1) keyed by (seed, step, layer, head, q block, k block).

The same key gives the same number on any device, rank or kernel schedule. The hash is Chris
Wellons' 32-bit "lowbias32" mixer, chained over the key fields; the Triton estimator repeats
exactly these integer steps, so both paths draw identical noise::

    h = mix(seed_salt ^ seed); h = mix(h ^ spread(step)); h = mix(h ^ spread(layer))
    h = mix(h ^ spread(head)); h = mix(h ^ spread(q_block)); h = mix(h ^ spread(k_block))
    u = ((h >> 8) + 0.5) / 2**24            # exact in fp32, in (0, 1)
    gumbel = -log(-log(u))

with ``spread(x) = (x + 1) * 0x9E3779B9 mod 2**32``.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
SEED_SALT = 0x243F6A88
GOLDEN = 0x9E3779B9


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values (wrap-around multiply, masked)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def _spread(x: torch.Tensor | int) -> torch.Tensor | int:
    return ((x + 1) * GOLDEN) & MASK32


def mix32_int(x: int) -> int:
    """:func:`mix32` on one Python int."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def noise_key(seed: int, step: int, layer: int) -> int:
    """The uint32 hash of ``(seed, step, layer)``; head and block indices are chained onto it."""
    h = mix32_int((SEED_SALT ^ seed) & MASK32)
    h = mix32_int(h ^ _spread(step))
    return mix32_int(h ^ _spread(layer))


def routing_gumbel(
    *,
    seed: int,
    step: int,
    layer: int,
    heads: torch.Tensor,
    num_q_blocks: int,
    num_k_blocks: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Gumbel noise ``(len(heads), num_q_blocks, num_k_blocks)`` fp32.

    Args:
        heads: ``(H,)`` int64 global head indices (rank offset included under context parallelism).
    """
    h = noise_key(seed, step, layer)
    heads = heads.to(device=device, dtype=torch.int64)
    qb = torch.arange(num_q_blocks, device=device, dtype=torch.int64)
    kb = torch.arange(num_k_blocks, device=device, dtype=torch.int64)
    hh = mix32(h ^ _spread(heads))  # (H,)
    hq = mix32(hh[:, None] ^ _spread(qb)[None, :])  # (H, Nq)
    hk = mix32(hq[:, :, None] ^ _spread(kb)[None, None, :])  # (H, Nq, Nk)
    u = ((hk >> 8).float() + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(u))
