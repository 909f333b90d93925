"""The principal tail's per-query part in one Triton kernel (``pasa.approximate.add_principal_branch``).

Each left-out group's mean key and value, leading key directions and their weights come from
torch (a few batched matmuls per head). What remains is attention of every query over the
groups with ``2r + 2`` dot products per query and group; in torch that is a stack of
``(S, NG, r)`` intermediates. Here each program takes one tile of a query block's queries
through every group of its head once, as an online softmax (the way FlashAttention walks keys),
skipping nothing but the groups the plan computed exactly, and writes the merged output and LSE
once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def principal_merge_kernel(
    q_ptr,  # (B, S, H, D) tiled order, strides sqb, sqs, sqh, 1
    o_ptr,  # exact result (B, S, H, D), strides sob, sos, soh, 1
    lse_ptr,  # exact LSE (B, H, S) fp32, strides slb, slh, sls
    km_ptr,  # (g, NG, D) fp32: group mean keys
    vm_ptr,  # (g, NG, D) fp32: group mean values
    u_ptr,  # (g, R, NG, D) fp32: each group's leading key directions
    lam_ptr,  # (g, R, NG) fp32: s² λ_j / 2n_g
    z_ptr,  # (g, R, NG, D) fp32: s z_j / n_g
    logn_ptr,  # (NG,) fp32: log n_g
    sel_ptr,  # (g, NQ, NK) int8: 1 where the plan computed the block exactly
    res_ptr,  # (B, S, H, D) fp32 contiguous: merged output
    rlse_ptr,  # (B, H, S) fp32 contiguous: merged LSE
    S,
    H,
    NG,
    NQ,
    NK,
    G0,  # global index (b * H + h) of the chunk's first head
    sqb,
    sqs,
    sqh,
    sob,
    sos,
    soh,
    slb,
    slh,
    sls,
    scale,
    D: tl.constexpr,
    R: tl.constexpr,
    BS: tl.constexpr,
    GPB: tl.constexpr,  # groups per block
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    gl = tl.program_id(0)
    r = tl.program_id(1)
    m = tl.program_id(2)
    g = G0 + gl
    b = g // H
    h = g % H
    rows = r * BS + m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < S
    d = tl.arange(0, D)
    q = tl.load(
        q_ptr + b * sqb + rows[:, None] * sqs + h * sqh + d[None, :], mask=valid[:, None], other=0.0
    ).to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for g_start in range(0, NG, BLOCK_G):
        gidx = g_start + tl.arange(0, BLOCK_G)
        gvalid = gidx < NG
        chosen = tl.load(sel_ptr + (gl * NQ + r) * NK + gidx // GPB, mask=gvalid, other=1)
        left = gvalid & (chosen == 0)
        tile = (gl * NG + gidx)[:, None] * D + d[None, :]
        km = tl.load(km_ptr + tile, mask=gvalid[:, None], other=0.0)
        logit = tl.dot(q, tl.trans(km)) * scale + tl.load(logn_ptr + gidx, mask=gvalid, other=0.0)
        gain = tl.full((BLOCK_M, BLOCK_G), 1.0, tl.float32)
        for j in tl.static_range(R):
            dtile = ((gl * R + j) * NG + gidx)[:, None] * D + d[None, :]
            u = tl.load(u_ptr + dtile, mask=gvalid[:, None], other=0.0)
            p = tl.dot(q, tl.trans(u))
            lam = tl.load(lam_ptr + (gl * R + j) * NG + gidx, mask=gvalid, other=0.0)
            gain += lam[None, :] * p * p
        logit = tl.where(left[None, :], logit + tl.log(gain), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logit, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        w = tl.exp(logit - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(w, 1)
        vm = tl.load(vm_ptr + tile, mask=gvalid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(w, vm)
        coef = w / gain
        for j in tl.static_range(R):
            dtile = ((gl * R + j) * NG + gidx)[:, None] * D + d[None, :]
            u = tl.load(u_ptr + dtile, mask=gvalid[:, None], other=0.0)
            z = tl.load(z_ptr + dtile, mask=gvalid[:, None], other=0.0)
            acc += tl.dot(coef * tl.dot(q, tl.trans(u)), z)
        m_i = m_new
    has_tail = l_i > 0.0
    l_safe = tl.where(has_tail, l_i, 1.0)
    tail = acc / l_safe[:, None]
    tail_lse = m_i + tl.log(l_safe)
    o = tl.load(
        o_ptr + b * sob + rows[:, None] * sos + h * soh + d[None, :], mask=valid[:, None], other=0.0
    ).to(tl.float32)
    lse = tl.load(lse_ptr + b * slb + h * slh + rows * sls, mask=valid, other=0.0)
    top = tl.maximum(lse, tl.where(has_tail, tail_lse, lse))
    merged = top + tl.log(tl.exp(lse - top) + tl.where(has_tail, tl.exp(tail_lse - top), 0.0))
    share = tl.where(has_tail, tl.exp(tail_lse - merged), 0.0)
    merged = tl.where(has_tail, merged, lse)
    res = o + share[:, None] * (tail - o)
    tl.store(res_ptr + ((b * S + rows[:, None]) * H + h) * D + d[None, :], res, mask=valid[:, None])
    tl.store(rlse_ptr + (b * H + h) * S + rows, merged, mask=valid)


def principal_merge(
    q: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    groups: tuple[torch.Tensor, ...],
    selected: torch.Tensor,
    g0: int,
    *,
    block_size: int,
    group_size: int,
    scale: float,
    res: torch.Tensor,
    res_lse: torch.Tensor,
) -> None:
    """Write the merged output and LSE of heads ``g0 : g0 + g`` (global ``b * H + h``) into
    ``res`` ``(B, S, H, D)`` fp32 and ``res_lse`` ``(B, H, S)`` fp32.

    ``groups`` = ``(k_mean, v_mean, basis, half_weights, cross, counts)`` of the chunk: means
    ``(g, NG, D)`` fp32, ``basis`` ``(g, NG, D, r)`` (orthonormal columns), ``half_weights``
    ``(g, NG, r)`` (``λ_j / 2n_g``), ``cross`` ``(g, NG, r, D)`` (``z_j``), ``counts`` ``(NG,)``;
    ``selected`` ``(g, Nq, Nk)`` bool, the plan's blocks.
    """
    k_mean, v_mean, basis, half_weights, cross, counts = groups
    _, seq, heads, dim = q.shape
    chunk, num_groups, rank = half_weights.shape
    nq, nk = selected.shape[1:]
    u = basis.permute(0, 3, 1, 2).contiguous()  # (g, r, NG, D)
    lam = (scale * scale * half_weights).permute(0, 2, 1).contiguous()  # (g, r, NG)
    z = (scale * cross / counts[:, None, None]).transpose(1, 2).contiguous()  # (g, r, NG, D)
    block_m = min(64 if dim <= 64 else 32, block_size & -block_size)
    grid = (chunk, nq, block_size // block_m)
    principal_merge_kernel[grid](
        q, out, lse,
        k_mean.contiguous(), v_mean.contiguous(), u, lam, z, counts.log().contiguous(),
        selected.to(torch.int8).contiguous(),
        res, res_lse,
        seq, heads, num_groups, nq, nk, g0,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        scale,
        D=dim, R=rank, BS=block_size, GPB=block_size // group_size, BLOCK_M=block_m,
        BLOCK_G=32 if dim <= 64 else 16, num_warps=4 if dim <= 64 else 8, num_stages=1,
    )  # fmt: skip
