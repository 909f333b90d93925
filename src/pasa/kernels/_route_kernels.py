"""Triton kernels of PASA's GPU routing (private): top-k selection without a sort, row ranking and
plan building for top-p.

Host functions that check shapes, choose grids and launch live in ``route_triton.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _float_order_key(x):
    # fp32 -> uint32 whose unsigned order is the float order (-inf lowest, +inf highest; every
    # real key is >= key(-inf) = 0x007FFFFF > 0, so 0 pads below all of them).
    bits = x.to(tl.uint32, bitcast=True)
    flip = tl.where((bits >> 31) == 1, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    return bits ^ flip


_INF_KEY: tl.constexpr = tl.constexpr(0xFF800000)  # _float_order_key(+inf): forced blocks


@triton.jit
def _row_keys(
    score_ptr, forced_ptr, offs_row, offs_forced, value, j, ok, FORCED: tl.constexpr,
    VALUED: tl.constexpr,
):  # fmt: skip
    # (ROWS, len(j)) uint32 order keys of columns j; masked-off slots 0 (below every real key).
    # With FORCED, the blocks the (N, N) int8 mask marks for the row's query block key as +inf,
    # or, with VALUED, as the score plus the row's head's value ((ROWS,) fp32; +inf forces).
    s = tl.load(score_ptr + offs_row[:, None] + j[None, :], mask=ok, other=float("-inf"))
    key = _float_order_key(s)
    if FORCED:
        f = tl.load(forced_ptr + offs_forced[:, None] + j[None, :], mask=ok, other=0)
        if VALUED:
            key = tl.where(f != 0, _float_order_key(s + value[:, None]), key)
        else:
            key = tl.where(f != 0, _INF_KEY, key)
    return tl.where(ok, key, 0)


@triton.jit
def _count_at_least(
    score_ptr, forced_ptr, offs_row, offs_forced, value, r_ok, N, cand, CHUNK: tl.constexpr,
    FORCED: tl.constexpr, VALUED: tl.constexpr,
):  # fmt: skip
    # (ROWS,) int32: keys >= cand per row, the row streamed in CHUNK-wide pieces (N > CHUNK).
    n_ge = tl.zeros(cand.shape, tl.int32)
    for c0 in range(0, N, CHUNK):
        j = c0 + tl.arange(0, CHUNK)
        ok = r_ok[:, None] & (j[None, :] < N)
        key = _row_keys(score_ptr, forced_ptr, offs_row, offs_forced, value, j, ok, FORCED, VALUED)
        n_ge += tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
    return n_ge


@triton.jit
def topk_plan_kernel(
    score_ptr,  # (R, N) fp32 routing keys, forced blocks +inf; row r is query block r % N
    forced_ptr,  # (N, N) int8: the local window per query block (read only when FORCED)
    value_ptr,  # (R // N,) fp32: per head, added to the window's keys (read only when VALUED)
    lo_ptr,  # (N,) int32 count floor per query block
    hi_ptr,  # (N,) int32 count ceiling per query block
    fixed_count,  # top-k count before clamping to [lo, hi]
    idx_ptr,  # (R, N) int32 out: kv_indices, ascending, padded with the last selected index
    cnt_ptr,  # (R,) int32 out: kv_counts
    R,
    N,
    ROWS: tl.constexpr,  # rows per program
    CHUNK: tl.constexpr,  # keys per row held at once (power of two)
    SINGLE: tl.constexpr,  # N <= CHUNK: the whole row stays in registers
    FORCED: tl.constexpr,  # apply forced_ptr (the local window): +inf keys, or with VALUED
    VALUED: tl.constexpr,  # the window's keys are score + value_ptr[head] (+inf: forced)
):
    # Radix select, no sort: a threshold t is built bit by bit from the top, keeping the
    # invariant #{key >= t} >= count. It stops as soon as #{key >= t} == count for every row of
    # the program (those keys are the row's top count; typically after 12-20 of the 32 bits),
    # or after 32 bits, when t is the count-th largest key. The row keeps every key > t and, of
    # the keys == t, the lowest-indexed ones (ties: lower block index wins). Selected blocks land
    # at their rank among the selected (a prefix count), so kv_indices come out ascending with
    # no sort; the padding slots repeat the last (largest) selected index.
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    r_ok = r < R
    qblock = r % N
    lo = tl.load(lo_ptr + qblock, mask=r_ok, other=1)
    hi = tl.load(hi_ptr + qblock, mask=r_ok, other=1)
    count = tl.minimum(tl.maximum(lo, fixed_count), hi)  # (ROWS,), 1 <= count <= N
    count = tl.where(r_ok, count, 0)  # rows past R: nothing to select, never hold the loop
    offs_row = r.to(tl.int64) * N  # (ROWS,)
    offs_forced = qblock.to(tl.int64) * N
    value = tl.zeros((ROWS,), tl.float32)
    if VALUED:
        value = tl.load(value_ptr + r // N, mask=r_ok, other=0.0)
    jj = tl.arange(0, CHUNK)
    if SINGLE:
        ok = r_ok[:, None] & (jj[None, :] < N)
        key = _row_keys(score_ptr, forced_ptr, offs_row, offs_forced, value, jj, ok, FORCED, VALUED)
    t = tl.zeros((ROWS,), tl.uint32)
    n_t = tl.full((ROWS,), 2147483647, tl.int32)  # #{key >= t}, unknown until a bit is kept
    bit = tl.full((ROWS,), 0x80000000, tl.uint32)  # the bit tried next, from the top
    while (tl.max(bit, axis=0) > 0) & (tl.max(n_t - count, axis=0) > 0):
        cand = t | bit
        if SINGLE:
            n_ge = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
        else:
            n_ge = _count_at_least(
                score_ptr,
                forced_ptr,
                offs_row,
                offs_forced,
                value,
                r_ok,
                N,
                cand,
                CHUNK,
                FORCED,
                VALUED,
            )
        keep = n_ge >= count
        t = tl.where(keep, cand, t)
        n_t = tl.where(keep, n_ge, n_t)
        bit = bit >> 1
    # #{key >= t} >= count, and #{key > t} < count (t is the count-th largest key) unless
    # #{key >= t} == count: either way the row keeps the keys > t and the first ties at t.
    if SINGLE:
        above = ok & (key > t[:, None])
        tie = ok & (key == t[:, None])
        need = count - tl.sum(above.to(tl.int32), axis=1)  # ties to keep, >= 0
        sel = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=1) <= need[:, None]))
        slot = tl.cumsum(sel.to(tl.int32), axis=1) - 1  # rank among the selected
        j2 = jj[None, :] + tl.zeros((ROWS, CHUNK), tl.int32)
        tl.store(idx_ptr + offs_row[:, None] + slot, j2, mask=sel)
        last = tl.max(tl.where(sel, j2, -1), axis=1)
        pad = ok & (jj[None, :] >= count[:, None])
        tl.store(idx_ptr + offs_row[:, None] + j2, last[:, None] + 0 * j2, mask=pad)
    else:
        n_above = tl.zeros((ROWS,), tl.int32)
        for c0 in range(0, N, CHUNK):
            j = c0 + jj
            ok = r_ok[:, None] & (j[None, :] < N)
            key = _row_keys(
                score_ptr, forced_ptr, offs_row, offs_forced, value, j, ok, FORCED, VALUED
            )
            n_above += tl.sum((key > t[:, None]).to(tl.int32), axis=1)
        need = count - n_above
        taken = tl.zeros((ROWS,), tl.int32)  # selected so far (the next free slot)
        ties = tl.zeros((ROWS,), tl.int32)  # ties seen so far
        last = tl.full((ROWS,), -1, tl.int32)
        for c0 in range(0, N, CHUNK):
            j = c0 + jj
            ok = r_ok[:, None] & (j[None, :] < N)
            key = _row_keys(
                score_ptr, forced_ptr, offs_row, offs_forced, value, j, ok, FORCED, VALUED
            )
            tie = ok & (key == t[:, None])
            tie_rank = ties[:, None] + tl.cumsum(tie.to(tl.int32), axis=1)
            sel = (ok & (key > t[:, None])) | (tie & (tie_rank <= need[:, None]))
            slot = taken[:, None] + tl.cumsum(sel.to(tl.int32), axis=1) - 1
            j2 = j[None, :] + tl.zeros((ROWS, CHUNK), tl.int32)
            tl.store(idx_ptr + offs_row[:, None] + slot, j2, mask=sel)
            last = tl.maximum(last, tl.max(tl.where(sel, j2, -1), axis=1))
            taken += tl.sum(sel.to(tl.int32), axis=1)
            ties += tl.sum(tie.to(tl.int32), axis=1)
        for c0 in range(0, N, CHUNK):
            j = c0 + jj
            pad = r_ok[:, None] & (j[None, :] < N) & (j[None, :] >= count[:, None])
            j2 = j[None, :] + tl.zeros((ROWS, CHUNK), tl.int32)
            tl.store(idx_ptr + offs_row[:, None] + j2, last[:, None] + 0 * j2, mask=pad)
    tl.store(cnt_ptr + r, count, mask=r_ok)


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
