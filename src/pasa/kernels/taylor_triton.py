"""The Taylor tail's per-query part in one Triton kernel (``pasa.approximate.add_taylor_branch``).

The row moments (each query block's left-out key and value sums) are matmuls and stay in torch;
what remains per query is two ``D × D`` products and a dozen element-wise steps, which in torch
are as many passes over ``(B, S, H, D)``. Here each program reads its queries and the exact
result once, in their own ``(B, S, H, D)`` layout, and writes the merged output and LSE once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def taylor_merge_kernel(
    q_ptr,  # (B, S, H, D) tiled order, strides sqb, sqs, sqh, 1
    o_ptr,  # exact result (B, S, H, D), strides sob, sos, soh, 1
    lse_ptr,  # exact LSE (B, H, S) fp32, strides slb, slh, sls
    kk_ptr,  # (g, NQ, D, D) contiguous: Σ k kᵀ over each row's left-out keys (centred keys)
    kv_ptr,  # (g, NQ, D, D) contiguous: Σ k vᵀ
    kmean_ptr,  # (g, NQ, D) fp32: mean left-out key, centred
    vmean_ptr,  # (g, NQ, D) fp32: mean left-out value, centred
    kc_ptr,  # (g, D) fp32: the head's key centre
    vc_ptr,  # (g, D) fp32: the head's value centre
    n_ptr,  # (g, NQ) fp32: left-out tokens of each row
    res_ptr,  # (B, S, H, D) fp32 contiguous: merged output
    rlse_ptr,  # (B, H, S) fp32 contiguous: merged LSE
    S,
    H,
    NQ,
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
    BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
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
    )
    mat = (gl * NQ + r).to(tl.int64) * D * D + d[:, None] * D + d[None, :]
    kk = tl.load(kk_ptr + mat)
    kv = tl.load(kv_ptr + mat)
    quad_raw = tl.dot(q.to(kk.dtype), kk)  # (BLOCK_M, D) fp32
    lin = tl.dot(q.to(kv.dtype), kv)
    qf = q.to(tl.float32)
    vec = (gl * NQ + r) * D + d
    k_mean = tl.load(kmean_ptr + vec)
    v_mean = tl.load(vmean_ptr + vec)
    k_centre = tl.load(kc_ptr + gl * D + d)
    v_centre = tl.load(vc_ptr + gl * D + d)
    n = tl.load(n_ptr + gl * NQ + r)
    inv_n = 1.0 / tl.maximum(n, 1.0)
    q_kmean = tl.sum(qf * k_mean[None, :], 1)
    centre = scale * (q_kmean + tl.sum(qf * k_centre[None, :], 1))
    quad = tl.sum(quad_raw * qf, 1) - n * q_kmean * q_kmean
    gain = 1.0 + (scale * scale * 0.5) * tl.maximum(quad, 0.0) * inv_n
    coef = scale * inv_n / gain
    tail = (v_centre + v_mean)[None, :] + coef[:, None] * (
        lin - (n * q_kmean)[:, None] * v_mean[None, :]
    )
    tail_lse = tl.log(tl.maximum(n, 1.0)) + centre + tl.log(gain)
    o = tl.load(
        o_ptr + b * sob + rows[:, None] * sos + h * soh + d[None, :], mask=valid[:, None], other=0.0
    ).to(tl.float32)
    lse = tl.load(lse_ptr + b * slb + h * slh + rows * sls, mask=valid, other=0.0)
    top = tl.maximum(lse, tail_lse)
    merged = top + tl.log(tl.exp(lse - top) + tl.exp(tail_lse - top))
    has_tail = n > 0
    w = tl.where(has_tail, tl.exp(tail_lse - merged), 0.0)
    merged = tl.where(has_tail, merged, lse)
    res = o + w[:, None] * (tail - o)
    tl.store(res_ptr + ((b * S + rows[:, None]) * H + h) * D + d[None, :], res, mask=valid[:, None])
    tl.store(rlse_ptr + (b * H + h) * S + rows, merged, mask=valid)


def taylor_merge(
    q: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    moments: tuple[torch.Tensor, ...],
    g0: int,
    *,
    block_size: int,
    scale: float,
    res: torch.Tensor,
    res_lse: torch.Tensor,
) -> None:
    """Write the merged output and LSE of heads ``g0 : g0 + g`` (global ``b * H + h``) into
    ``res`` ``(B, S, H, D)`` fp32 and ``res_lse`` ``(B, H, S)`` fp32.

    ``moments`` = ``(row_kk, row_kv, k_mean, v_mean, k_centre, v_centre, n)`` of the chunk, as
    :func:`pasa.approximate.add_taylor_branch` computes them (``row_kk`` / ``row_kv``
    ``(g, Nq, D, D)``, means ``(g, Nq, D)`` fp32, centres ``(g, D)`` fp32, ``n`` ``(g, Nq)``).
    """
    row_kk, row_kv, k_mean, v_mean, k_centre, v_centre, n = moments
    _, seq, heads, dim = q.shape
    groups, nq = n.shape
    block_m = min(64 if dim <= 64 else 32, block_size & -block_size)  # divides the block
    grid = (groups, nq, block_size // block_m)
    taylor_merge_kernel[grid](
        q, out, lse,
        row_kk.contiguous(), row_kv.contiguous(), k_mean.contiguous(), v_mean.contiguous(),
        k_centre.contiguous(), v_centre.contiguous(), n.contiguous(),
        res, res_lse,
        seq, heads, nq, g0,
        q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        scale,
        D=dim, BS=block_size, BLOCK_M=block_m,
        num_warps=4 if dim <= 64 else 8,
    )  # fmt: skip
