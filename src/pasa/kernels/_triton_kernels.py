"""Triton kernels of PASA (private): token gather + group pooling, fused estimate, routing noise.

Host functions that check shapes, choose grids and launch live in ``permute.py`` and
``estimate_triton.py``; the routing kernels are in ``_route_kernels.py``. Nothing here is public.
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
def _group_mean(
    x_ptr,
    out_ptr,
    a,
    hb,
    b,
    S,
    H,
    NG,
    sxb,
    sxs,
    sxh,
    D: tl.constexpr,
    GROUP: tl.constexpr,
    HB: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # The GROUP tokens stream through one (HB, BLOCK_D) fp32 accumulator, one token row per
    # unrolled load: every thread sums its own columns, so no cross-thread reduction, and all
    # GROUP loads can be in flight at once (the sum is over axis 0 of nothing but the loop).
    hh = hb * HB + tl.arange(0, HB)
    dd = tl.arange(0, BLOCK_D)
    hd_ok = (hh[:, None] < H) & (dd[None, :] < D)  # (HB, BLOCK_D)
    col = hh[:, None] * sxh + dd[None, :]
    base = x_ptr + b.to(tl.int64) * sxb
    acc = tl.zeros((HB, BLOCK_D), tl.float32)
    zero = tl.zeros((HB, 1), tl.int32)
    for r in tl.static_range(GROUP):
        t = a * GROUP + r + zero  # (HB, 1): the token row, as a tensor for the mask
        row = tl.load(base + t.to(tl.int64) * sxs + col, mask=hd_ok & (t < S), other=0.0)
        acc += row.to(tl.float32)
    n = tl.minimum(S - a * GROUP, GROUP).to(tl.float32)
    dst = ((b.to(tl.int64) * H + hh[:, None]) * NG + a) * D + dd[None, :]
    tl.store(out_ptr + dst, acc / n, mask=hd_ok)


@triton.jit
def group_mean_kernel(
    q_ptr,  # token s, head h of batch b at q_ptr + b * sqb + s * sqs + h * sqh + d
    k_ptr,  # the same for k, with its own strides
    qg_ptr,  # (B, H, NG, D) fp32 out: means of GROUP consecutive tokens of q
    kg_ptr,  # (B, H, NG, D) fp32 out: the same for k
    S,
    H,
    NG,
    sqb,
    sqs,
    sqh,
    skb,
    sks,
    skh,
    D: tl.constexpr,
    GROUP: tl.constexpr,
    HB: tl.constexpr,  # heads per program
    BLOCK_D: tl.constexpr,
):
    # q and k in one launch (axis 2 = batch x {q, k}): each element is read once, nothing written
    # but the means.
    a = tl.program_id(0)
    hb = tl.program_id(1)
    z = tl.program_id(2)
    b = z // 2
    if z % 2 == 0:
        _group_mean(q_ptr, qg_ptr, a, hb, b, S, H, NG, sqb, sqs, sqh, D, GROUP, HB, BLOCK_D)
    else:
        _group_mean(k_ptr, kg_ptr, a, hb, b, S, H, NG, skb, sks, skh, D, GROUP, HB, BLOCK_D)


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
def _split_bf16(x):
    # fp32 -> bf16 hi + bf16 lo with hi + lo = x to ~2^-17 relative.
    hi = x.to(tl.bfloat16)
    return hi, (x - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _group_logits(
    qa,
    qa_lo,
    kg_ptr,
    kglo_ptr,
    bias_ptr,
    n0,
    NG,
    scale,
    D,
    dd,
    BN: tl.constexpr,
    PRECISION: tl.constexpr,
    PRESPLIT: tl.constexpr,
):
    """(M, BN) fp32 logits of the query groups ``qa`` against key groups n0 .. n0 + BN.

    ``PRECISION``: "tf32x3" / "tf32" (Triton's), or "bf16x3": three bf16 products on ``qa`` =
    (hi, ``qa_lo``) split once by the caller, ~2^-16 relative, at twice tf32's MMA rate.
    ``PRESPLIT`` (bf16x3 only): the key means come already split, bf16 hi at ``kg_ptr`` and lo
    at ``kglo_ptr``, instead of fp32 split here by every program that reads them.
    """
    n = n0 + tl.arange(0, BN)
    n_ok = n < NG
    offs = n[:, None] * D + dd[None, :]
    ok = n_ok[:, None] & (dd[None, :] < D)
    if PRESPLIT:
        kb_hi = tl.trans(tl.load(kg_ptr + offs, mask=ok, other=0.0))  # (BLOCK_D, BN) bf16
        kb_lo = tl.trans(tl.load(kglo_ptr + offs, mask=ok, other=0.0))
        logits = tl.dot(qa, kb_lo)
        logits = tl.dot(qa_lo, kb_hi, logits)
        logits = tl.dot(qa, kb_hi, logits)
    elif PRECISION == "bf16x3":
        kb = tl.load(kg_ptr + offs, mask=ok, other=0.0)  # (BN, BLOCK_D)
        kb_hi, kb_lo = _split_bf16(tl.trans(kb))
        logits = tl.dot(qa, kb_lo)
        logits = tl.dot(qa_lo, kb_hi, logits)
        logits = tl.dot(qa, kb_hi, logits)
    else:
        kb = tl.load(kg_ptr + offs, mask=ok, other=0.0)  # (BN, BLOCK_D)
        logits = tl.dot(qa, tl.trans(kb), input_precision=PRECISION)
    bias = tl.load(bias_ptr + n, mask=n_ok, other=float("-inf"))
    return logits * scale + bias[None, :]


@triton.jit
def _block_sums(p, GPB: tl.constexpr, KBC: tl.constexpr):
    """(M, KBC * GPB) fp32 -> (M, KBC): the sum of every GPB consecutive columns.

    One 0/1 matrix product (exact in bf16) instead of a reshape reduction; p in [0, 1] is split
    into bf16 hi + lo, so the sums keep ~2^-17 relative accuracy (fp32 accumulation).
    """
    if GPB == 1:
        return p
    else:
        BN: tl.constexpr = KBC * GPB
        e = (tl.arange(0, BN)[:, None] // GPB) == tl.arange(0, KBC)[None, :]  # (BN, KBC)
        if _INTERPRET:  # the interpreter's bf16 tl.dot is wrong; fp32 checks the indexing
            return tl.dot(p, e.to(tl.float32), input_precision="ieee")
        else:
            p_hi, p_lo = _split_bf16(p)
            e = e.to(tl.bfloat16)
            return tl.dot(p_lo, e, tl.dot(p_hi, e))


@triton.jit
def block_estimate_kernel(
    qg_ptr,  # (B, H, NG, D) fp32 query group means
    kg_ptr,  # (B, H, NG, D) fp32 key group means (PRESPLIT: their bf16 hi part)
    kglo_ptr,  # PRESPLIT: (B, H, NG, D) bf16 lo part of the key group means (else unused)
    bias_ptr,  # (NG,) fp32 log of tokens per key group
    mass_ptr,  # (B, H, N, N) fp32: block mass, then (FINISH and WRITE_SHARE) the floored share
    score_ptr,  # (B, H, N, N) fp32 routing scores (FINISH only; may be mass_ptr)
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
    WRITE_SHARE: tl.constexpr,
    NOISE: tl.constexpr,
    PRESPLIT: tl.constexpr,  # key means given as bf16 hi + lo (bf16x3)
):
    # One program owns QB query-block rows of one (batch, head). Its M = QB * GPB query-group
    # means stay in registers for the whole row; no (NG x NG) logit ever leaves the chip.
    # Keys stream twice: softmax statistics (online max and normaliser), then normalised block
    # sums, max over the query groups of a block in registers. (A single-pass variant that parked
    # unnormalised block sums in a global scratch buffer and rescaled them after a barrier missed
    # the torch reference on H100 with Triton 3.6 and was no faster at g = 64: removed.)
    M: tl.constexpr = QB * GPB
    BN: tl.constexpr = KBC * GPB
    tl.static_assert(M >= 16, "tl.dot needs at least 16 query groups per program")
    tl.static_assert(KBC >= 16, "the block-sum tl.dot needs at least 16 key blocks per step")
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
    )  # (M, BLOCK_D)
    qa_lo = qa
    if PRECISION == "bf16x3":
        qa, qa_lo = _split_bf16(qa)
    kg = kg_ptr + base
    kglo = kglo_ptr + base
    qb = i0 + tl.arange(0, QB)
    qb_ok = qb < N
    kk = tl.arange(0, KBC)
    out_base = bh.to(tl.int64) * N * N
    row_sum = tl.zeros((QB,), tl.float32)
    m_i = tl.full((M,), float("-inf"), tl.float32)
    l_i = tl.zeros((M,), tl.float32)

    # Pass 1: row max and normaliser of the group softmax (online).
    for n0 in range(0, NG, BN):
        logits = _group_logits(
            qa, qa_lo, kg, kglo, bias_ptr, n0, NG, scale, D, dd, BN, PRECISION, PRESPLIT
        )
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
    inv_l = tl.where(row_ok, 1.0 / l_i, 0.0)  # padding query groups get p = 0: never win a max
    m_i = tl.where(row_ok, m_i, 0.0)
    # Pass 2: block mass = max over the query groups of a block of its key-block sums.
    for j0 in range(0, N, KBC):
        logits = _group_logits(
            qa, qa_lo, kg, kglo, bias_ptr, j0 * GPB, NG, scale, D, dd, BN, PRECISION, PRESPLIT
        )
        p = tl.exp(logits - m_i[:, None]) * inv_l[:, None]  # (M, BN)
        per_key_block = _block_sums(p, GPB, KBC)  # (M, KBC)
        mass = tl.max(tl.reshape(per_key_block, (QB, GPB, KBC)), axis=1)  # (QB, KBC)
        kb = j0 + kk
        ok = qb_ok[:, None] & (kb[None, :] < N)
        mass = tl.where(ok, mass, 0.0)
        row_sum += tl.sum(mass, axis=1)
        tl.store(mass_ptr + out_base + qb[:, None] * N + kb[None, :], mass, mask=ok)

    if FINISH:
        # Pass 3: the routing keys of pasa/route.py, read back from what this program wrote.
        tl.debug_barrier()
        inv_sum = 1.0 / tl.maximum(row_sum, 1e-30)
        if NOISE:
            hh = _mix32(noise_key.to(tl.uint32) ^ _spread(head_offset + h))
            hq = _mix32(hh ^ _spread(qb))  # (QB,)
        for j0 in range(0, N, KBC):
            kb = j0 + kk
            ok = qb_ok[:, None] & (kb[None, :] < N)
            offs = out_base + qb[:, None] * N + kb[None, :]
            mass = tl.load(mass_ptr + offs, mask=ok, other=0.0)
            share = (mass * inv_sum[:, None] + mass_floor) / floor_norm
            score = _log(tl.maximum(share, 1e-30))
            if NOISE:
                hk = _mix32(hq[:, None] ^ _spread(kb)[None, :])
                u = ((hk >> 8).to(tl.float32) + 0.5) / 16777216.0
                score += temperature * -_log(-_log(u))
            forced = (qb[:, None] == kb[None, :]) | (kb[None, :] >= first_text_block)
            forced = forced | (qb[:, None] >= first_text_block)
            score = tl.where(forced, float("inf"), score)
            if WRITE_SHARE:
                tl.store(mass_ptr + offs, share, mask=ok)
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
