"""Triton kernels of PASA (private): token gather + group pooling, fused estimate, row routing.

Host functions that check shapes, choose grids and launch live in ``permute.py``,
``estimate_triton.py`` and ``route_triton.py``; nothing here is public API.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

# libdevice's logf is what torch's CUDA log calls: same bits. The interpreter (CPU tests) has none.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _log(x):
    if _INTERPRET:
        return tl.log(x)
    else:
        return libdevice.log(x)


@triton.jit
def gather_pool_kernel(
    x_ptr,  # input, token s of batch b at x_ptr + b * sxb + s * sxs + h * sxh + d
    idx_ptr,  # (S,) int64: output position t reads input token idx[t]
    out_ptr,  # (B, S, H, D) contiguous, gathered order
    pool_ptr,  # (B, H, NG, D) fp32 group means (only written when POOL)
    S,
    H,
    NG,
    sxb,
    sxs,
    sxh,
    D: tl.constexpr,
    GROUP: tl.constexpr,  # tokens per program (the group size when POOL)
    HB: tl.constexpr,  # heads per program
    BLOCK_D: tl.constexpr,
    POOL: tl.constexpr,
):
    # One program copies GROUP consecutive output tokens x HB heads; the GROUP rows of one group
    # stay in registers, so the group mean costs no second read of x.
    a = tl.program_id(0)
    hb = tl.program_id(1)
    b = tl.program_id(2)
    t = a * GROUP + tl.arange(0, GROUP)  # output positions
    t_ok = t < S
    src = tl.load(idx_ptr + t, mask=t_ok, other=0)
    hh = hb * HB + tl.arange(0, HB)
    dd = tl.arange(0, BLOCK_D)
    hd_ok = (hh[:, None] < H) & (dd[None, :] < D)  # (HB, BLOCK_D)
    col_in = hh[:, None] * sxh + dd[None, :]
    col_out = hh[:, None] * D + dd[None, :]
    ok = t_ok[:, None, None] & hd_ok[None, :, :]
    x = tl.load(
        x_ptr + b.to(tl.int64) * sxb + src[:, None, None] * sxs + col_in[None, :, :], mask=ok
    )  # (GROUP, HB, BLOCK_D)
    row_out = (b.to(tl.int64) * S + t) * H * D
    tl.store(out_ptr + row_out[:, None, None] + col_out[None, :, :], x, mask=ok)
    if POOL:
        n = tl.minimum(S - a * GROUP, GROUP).to(tl.float32)
        mean = tl.sum(x.to(tl.float32), axis=0) / n  # (HB, BLOCK_D)
        dst = ((b.to(tl.int64) * H + hh[:, None]) * NG + a) * D + dd[None, :]
        tl.store(pool_ptr + dst, mean, mask=hd_ok)


@triton.jit
def _mix32(x):
    # lowbias32 (pasa/noise.py), uint32 wrap-around arithmetic.
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _spread(x):
    return (x.to(tl.uint32) + 1) * 0x9E3779B9


@triton.jit
def _group_logits(
    qa, kg_ptr, bias_ptr, n0, NG, scale, D, dd, BN: tl.constexpr, PRECISION: tl.constexpr
):
    """(M, BN) fp32 logits of the query groups ``qa`` against key groups n0 .. n0 + BN."""
    n = n0 + tl.arange(0, BN)
    n_ok = n < NG
    kb = tl.load(
        kg_ptr + n[:, None] * D + dd[None, :], mask=n_ok[:, None] & (dd[None, :] < D), other=0.0
    )
    logits = tl.dot(qa, tl.trans(kb), input_precision=PRECISION) * scale
    bias = tl.load(bias_ptr + n, mask=n_ok, other=float("-inf"))
    return logits + bias[None, :]


@triton.jit
def block_estimate_kernel(
    qg_ptr,  # (B, H, NG, D) fp32 query group means
    kg_ptr,  # (B, H, NG, D) fp32 key group means
    bias_ptr,  # (NG,) fp32 log of tokens per key group
    share_ptr,  # (B, H, N, N) fp32: block mass, then (FINISH) the floored row share
    score_ptr,  # (B, H, N, N) fp32 routing scores (FINISH only)
    H,
    NG,
    N,
    scale,
    first_text_block,
    noise_key,  # uint32 hash of (seed, step, layer)
    head_offset,
    temperature,
    mass_floor,
    floor_norm,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GPB: tl.constexpr,  # groups per block
    QB: tl.constexpr,  # query blocks per program
    KBC: tl.constexpr,  # key blocks per inner step
    PRECISION: tl.constexpr,
    FINISH: tl.constexpr,
    NOISE: tl.constexpr,
):
    # One program owns QB query-block rows of one (batch, head). Its QB * GPB query-group means stay
    # in registers for the whole row; key groups stream through twice (softmax statistics, then
    # block mass), and no (NG x NG) logit ever leaves the chip.
    M: tl.constexpr = QB * GPB
    BN: tl.constexpr = KBC * GPB
    tl.static_assert(M >= 16, "tl.dot needs at least 16 query groups per program")
    tl.static_assert(BN >= 16, "tl.dot needs at least 16 key groups per step")
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    i0 = pid * QB
    rows = i0 * GPB + tl.arange(0, M)
    row_ok = rows < NG
    dd = tl.arange(0, BLOCK_D)
    base = bh.to(tl.int64) * NG * D
    qa = tl.load(
        qg_ptr + base + rows[:, None] * D + dd[None, :],
        mask=row_ok[:, None] & (dd[None, :] < D),
        other=0.0,
    )
    kg = kg_ptr + base

    # Pass 1: row max and normaliser of the group softmax (online).
    m_i = tl.full((M,), float("-inf"), tl.float32)
    l_i = tl.zeros((M,), tl.float32)
    for n0 in range(0, NG, BN):
        logits = _group_logits(qa, kg, bias_ptr, n0, NG, scale, D, dd, BN, PRECISION)
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
    inv_l = tl.where(row_ok, 1.0 / l_i, 0.0)  # padding query groups get p = 0: never win a max
    m_i = tl.where(row_ok, m_i, 0.0)

    # Pass 2: block mass = max over query groups of the block of the summed key-group probabilities.
    qb = i0 + tl.arange(0, QB)
    qb_ok = qb < N
    out_base = bh.to(tl.int64) * N * N
    row_sum = tl.zeros((QB,), tl.float32)
    for j0 in range(0, N, KBC):
        logits = _group_logits(qa, kg, bias_ptr, j0 * GPB, NG, scale, D, dd, BN, PRECISION)
        p = tl.exp(logits - m_i[:, None]) * inv_l[:, None]  # (M, BN)
        per_key_block = tl.sum(tl.reshape(p, (M, KBC, GPB)), axis=2)  # (M, KBC)
        mass = tl.max(tl.reshape(per_key_block, (QB, GPB, KBC)), axis=1)  # (QB, KBC)
        kb = j0 + tl.arange(0, KBC)
        ok = qb_ok[:, None] & (kb[None, :] < N)
        mass = tl.where(ok, mass, 0.0)
        row_sum += tl.sum(mass, axis=1)
        tl.store(share_ptr + out_base + qb[:, None] * N + kb[None, :], mass, mask=ok)

    if FINISH:
        # Pass 3: the routing keys of pasa/route.py, read back from what this program wrote.
        tl.debug_barrier()
        inv_sum = 1.0 / tl.maximum(row_sum, 1e-30)
        if NOISE:
            hh = _mix32(noise_key.to(tl.uint32) ^ _spread(head_offset + h))
            hq = _mix32(hh ^ _spread(qb))  # (QB,)
        for j0 in range(0, N, KBC):
            kb = j0 + tl.arange(0, KBC)
            ok = qb_ok[:, None] & (kb[None, :] < N)
            offs = out_base + qb[:, None] * N + kb[None, :]
            mass = tl.load(share_ptr + offs, mask=ok, other=0.0)
            share = (mass * inv_sum[:, None] + mass_floor) / floor_norm
            score = _log(tl.maximum(share, 1e-30))
            if NOISE:
                hk = _mix32(hq[:, None] ^ _spread(kb)[None, :])
                u = ((hk >> 8).to(tl.float32) + 0.5) / 16777216.0
                score += temperature * -_log(-_log(u))
            forced = (qb[:, None] == kb[None, :]) | (kb[None, :] >= first_text_block)
            forced = forced | (qb[:, None] >= first_text_block)
            score = tl.where(forced, float("inf"), score)
            tl.store(share_ptr + offs, share, mask=ok)
            tl.store(score_ptr + offs, score, mask=ok)


@triton.jit
def gumbel_kernel(out_ptr, NQ, NK, noise_key, head_offset, BLOCK: tl.constexpr):
    # Debug / test helper: the routing Gumbel noise of one head, (NQ, NK).
    h = tl.program_id(1)
    i = tl.program_id(0)
    hh = _mix32(noise_key.to(tl.uint32) ^ _spread(head_offset + h))
    hq = _mix32(hh ^ _spread(i))
    for j0 in range(0, NK, BLOCK):
        kb = j0 + tl.arange(0, BLOCK)
        hk = _mix32(hq ^ _spread(kb))
        u = ((hk >> 8).to(tl.float32) + 0.5) / 16777216.0
        g = -_log(-_log(u))
        tl.store(out_ptr + (h * NQ + i).to(tl.int64) * NK + kb, g, mask=kb < NK)


@triton.jit
def _float_order_key(x):
    # fp32 -> uint32 whose unsigned order is the float order (-inf lowest, +inf highest).
    bits = x.to(tl.uint32, bitcast=True)
    flip = tl.where((bits >> 31) == 1, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    return bits ^ flip


@triton.jit
def rank_row_kernel(
    score_ptr,  # (R, N) fp32 routing scores
    share_ptr,  # (R, N) fp32 row shares
    order_ptr,  # (R, N) int32 out: key blocks by descending score
    ranked_ptr,  # (R, N) fp32 out: share in ranked order (only when RANKED)
    N,
    BLOCK: tl.constexpr,
    RANKED: tl.constexpr,
):
    # One program sorts one row in registers: bitonic sort of packed (score key, block) pairs.
    r = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    ok = j < N
    s = tl.load(score_ptr + r * N + j, mask=ok, other=float("-inf"))
    key = (_float_order_key(s).to(tl.uint64) << 32) | j.to(tl.uint64)
    key = tl.where(ok, key, 0)
    key = tl.sort(key, descending=True)
    order = (key & 0xFFFFFFFF).to(tl.int32)
    tl.store(order_ptr + r * N + j, order, mask=ok)
    if RANKED:
        ranked = tl.load(share_ptr + r * N + order, mask=ok, other=0.0)
        tl.store(ranked_ptr + r * N + j, ranked, mask=ok)


@triton.jit
def build_plan_kernel(
    order_ptr,  # (R, N) int32 ranked key blocks
    cum_ptr,  # (R, N) fp32 cumulative ranked share (TOP_P only)
    lo_ptr,  # (Nq,) int32 count floor per query block
    hi_ptr,  # (Nq,) int32 count ceiling per query block
    thr_ptr,  # (1,) fp32 cumulative-share threshold c* (TOP_P only)
    fixed_count,  # top-k count before clamping (TOP_P false)
    idx_ptr,  # (R, N) int32 out: kv_indices, ascending, padded with the last selected
    cnt_ptr,  # (R,) int32 out: kv_counts
    N,
    TOP_P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row = r % N  # query block
    j = tl.arange(0, BLOCK)
    ok = j < N
    lo = tl.load(lo_ptr + row)
    hi = tl.load(hi_ptr + row)
    if TOP_P:
        # count = clamp(#{cum <= c*} + 1, lo, hi) = lo + #{rank in [lo-1, hi-2] : cum <= c*}
        thr = tl.load(thr_ptr)
        cum = tl.load(cum_ptr + r * N + j, mask=ok, other=float("inf"))
        eligible = (j >= lo - 1) & (j <= hi - 2) & (cum <= thr)
        count = lo + tl.sum(eligible.to(tl.int32), axis=0)
    else:
        count = tl.minimum(tl.maximum(fixed_count, lo), hi)
    order = tl.load(order_ptr + r * N + j, mask=ok, other=0)
    chosen = ok & (j < count)
    picked = tl.sort(tl.where(chosen, order, 0x7FFFFFFF))  # selected blocks first, ascending
    last = tl.max(tl.where(chosen, order, -1), axis=0)
    tl.store(idx_ptr + r * N + j, tl.where(j < count, picked, last), mask=ok)
    tl.store(cnt_ptr + r, count)
