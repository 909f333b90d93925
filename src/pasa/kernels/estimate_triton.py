"""Fused grouped block-importance estimate on GPU (DESIGN.md section 1), held to pasa/estimate.py.

Input is the group means (``permute.gather_tokens`` or ``permute.group_means``); one kernel then
computes group logits, the row softmax statistics, the block mass and (optionally) the routing
keys of pasa/route.py: floored row share and ``log share + tau * Gumbel``, forced blocks ``+inf``.
The ``(S/g)^2`` logits never reach GPU memory; only ``(B, H, N, N)`` block values are written.
The keys stream twice (softmax statistics, then block sums).

Block sums over the groups of a key block are one 0/1-matrix ``tl.dot`` (bf16 hi + lo split of
the probabilities, ~2^-17 relative), not a reshape reduction.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from pasa.kernels._triton_kernels import block_estimate_kernel, gumbel_kernel
from pasa.noise import noise_key

# Launch shape, from benchmarks/estimator_tuning.py on H100 at the Wan2.1-14B 720p shape
# (benchmarks/results/estimator-tuning-h100.json): 128 query groups per program (two Hopper
# warpgroups, 8 warps) and 128 key groups per inner step, two stages: 1.06 ms against 1.23 ms for
# the earlier 64 x 64 x 4 warps (bf16x3, pre-split keys). At g = 32: 19 x 40 programs.
_ROWS = 128
_KEY_GROUPS = 128  # per inner step; key blocks per step = max(16, this // groups per block)
_MAX_GROUPS_PER_BLOCK = 64
# Logit dot precision. "tf32x3": fp32-accurate logits (block mass within 1e-3 relative of the
# fp32 reference). "bf16x3": three bf16 MMAs (~2^-16 relative on the products), about half the
# MMA time of tf32x3. "tf32": one MMA, ~1e-3 relative on the logits.
# Measured on H100 at the Wan2.1-14B 720p shape (commit 9754efc, 64 x 64 launch): tf32x3 2.03 ms,
# bf16x3 1.27 ms, tf32 0.99 ms; block-mass error against the fp32 reference 0.4%, 0.4% and 6.8%
# of the tests' 1e-3 bound. bf16x3 keeps tf32x3's accuracy (1.06 ms at the launch below).
# Triton's CPU interpreter computes bf16 dots wrongly: there (tests only) the default is tf32x3.
PRECISIONS = ("tf32x3", "bf16x3", "tf32")
DEFAULT_PRECISION = "tf32x3" if os.environ.get("TRITON_INTERPRET") == "1" else "bf16x3"
# bf16x3: split the key means into bf16 hi + lo once per call (a few element-wise ops on
# B*H*NG*D values) instead of in every program that streams them (N / QB times per head).
DEFAULT_PRESPLIT = True
# Launch shape; benchmarks/estimator_tuning.py measures the alternatives.
_WARPS = 8
# bf16x3 launches by groups per block where the sweep found a better one than the above (H100,
# Wan2.1-14B 720p, commit 8efea7d, benchmarks/results/estimator-tuning-h100-g64.json): at g = 64,
# 64 query groups and 16 key blocks per step on 4 warps, keys split in the kernel, 0.53 ms
# against 0.56-0.77 ms for 128-group tiles on 8 warps.
_BF16X3_LAUNCH = {
    2: dict(rows=64, key_blocks=16, num_warps=4, num_stages=2, presplit=False),
}


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
    return pow2 and per_block <= _MAX_GROUPS_PER_BLOCK and head_dim <= 256


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
    need_share: bool = True,
    presplit: bool | None = None,
    rows: int | None = None,
    key_blocks: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block mass, or (with ``routing``) the routing share and scores, from group means.

    Args:
        qg, kg: ``(B, H, NG, D)`` fp32 group means (``NG = ceil(seq_len / group_size)``).
        routing: None for plain block mass; else a dict with ``first_text_block``, ``noise_key``,
            ``head_offset``, ``temperature``, ``mass_floor`` (pasa/route.py's settings).
        precision: one of :data:`PRECISIONS` (the logit dot).
        need_share: with ``routing``, also return the share (top-p reads it; top-k does not,
            and then no ``(B, H, N, N)`` share is written).
        presplit: with ``bf16x3``, split the key means into bf16 hi + lo once, up front
            (None: the tuned choice).
        rows, key_blocks, num_warps, num_stages: launch shape (query groups per program, key
            blocks per inner step; powers of two, ``rows >= 16``, ``key_blocks >= 16``). None:
            the tuned bf16x3 launch for this group size where there is one, else 128 query and
            128 key groups on 8 warps; with ``tf32x3`` (fp32 operands, twice the shared memory)
            64 and 64 on 4 warps.
    Returns:
        ``(B, H, N, N)`` fp32 block mass and None; or with ``routing`` the row share (floored, as
        pasa/route.py; None unless ``need_share``) and the scores ``log share + tau * Gumbel``
        with forced blocks ``+inf``.
    """
    batch, heads, num_groups, dim = qg.shape
    if kg.shape != qg.shape or qg.dtype != torch.float32 or kg.dtype != torch.float32:
        raise ValueError(f"qg and kg must be equal-shaped fp32, got {qg.shape} {kg.shape}")
    if not supports(block_size, group_size, dim):
        raise ValueError(f"unsupported block_size {block_size} / group_size {group_size} / D {dim}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    per_block = block_size // group_size
    n = -(-seq_len // block_size)
    if num_groups != -(-seq_len // group_size):
        raise ValueError(f"{num_groups} groups do not match seq_len {seq_len} / group {group_size}")
    scale = dim**-0.5 if scale is None else float(scale)
    qg, kg = qg.contiguous(), kg.contiguous()
    device = qg.device
    wide = precision != "tf32x3"
    tuned = _BF16X3_LAUNCH.get(per_block, {}) if precision == "bf16x3" else {}
    rows = rows or tuned.get("rows")
    key_blocks = key_blocks or tuned.get("key_blocks")
    num_warps = num_warps or tuned.get("num_warps")
    num_stages = num_stages or tuned.get("num_stages")
    presplit = tuned.get("presplit", DEFAULT_PRESPLIT) if presplit is None else presplit
    qb = max(1, (rows or (_ROWS if wide else _ROWS // 2)) // per_block)
    kbc = key_blocks or max(16, (_KEY_GROUPS if wide else _KEY_GROUPS // 2) // per_block)
    num_warps = num_warps or (_WARPS if wide else _WARPS // 2)
    presplit = presplit and precision == "bf16x3"
    kg_lo = kg  # unused unless presplit
    if presplit:
        kg_hi = kg.to(torch.bfloat16)
        kg_lo = (kg - kg_hi.float()).to(torch.bfloat16)
        kg = kg_hi
    grid = (_cdiv(n, qb), batch * heads)
    mass = torch.empty((batch, heads, n, n), dtype=torch.float32, device=device)
    scores = None
    if routing is not None:
        scores = torch.empty_like(mass) if need_share else mass
    r = routing or {}
    temperature = float(r.get("temperature", 0.0))
    floor = float(r.get("mass_floor", 0.0))
    args = (
        qg,
        kg,
        kg_lo,
        _key_bias(seq_len, group_size, device),
        mass,
        mass if scores is None else scores,
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
    )
    meta = dict(
        D=dim,
        BLOCK_D=max(16, 1 << (dim - 1).bit_length()),
        GPB=per_block,
        QB=qb,
        KBC=kbc,
        PRECISION=precision,
        FINISH=routing is not None,
        WRITE_SHARE=routing is not None and need_share,
        NOISE=temperature > 0,
        PRESPLIT=presplit,
        num_warps=num_warps,
        # Shared memory (sm_90): two stages of 128 x 128 bf16 hi + lo (or tf32) keys fit 227 KB;
        # tf32x3 at 64 x 64 takes 164 KB with two, one when a step spans more key groups.
        num_stages=num_stages or (2 if wide or per_block * kbc <= 64 else 1),
    )
    _launch_fitting(grid, args, meta, device)
    if routing is None:
        return mass, None
    return (mass if need_share else None), scores


# Launches that needed fewer pipeline stages than asked to fit this GPU's shared memory (one
# 128 x 128 bf16 hi + lo key tile per stage at D = 128 with one group per block needs 246 KB for
# two stages on H100, whose limit is 227 KB; GPUs with less shared memory hit it sooner).
_ONE_STAGE: set[tuple] = set()


def _launch_fitting(grid: tuple[int, int], args: tuple, meta: dict, device: torch.device) -> None:
    """Launch the estimate kernel; if its stages overflow shared memory, again with one stage."""
    from triton.runtime.errors import OutOfResources

    key = (device.index, *sorted((k, v) for k, v in meta.items() if k != "num_stages"))
    if key in _ONE_STAGE:
        meta = {**meta, "num_stages": 1}
    try:
        block_estimate_kernel[grid](*args, **meta)
    except OutOfResources:
        if meta["num_stages"] <= 1:
            raise
        _ONE_STAGE.add(key)
        block_estimate_kernel[grid](*args, **{**meta, "num_stages": 1})


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
    from pasa.kernels.permute import group_means

    seq = q.shape[1]
    qg, kg = group_means(q, k, group_size)
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
    "DEFAULT_PRESPLIT",
    "PRECISIONS",
    "block_mass_triton",
    "grouped_block_estimate",
    "noise_key",
    "routing_gumbel_triton",
    "supports",
]
