"""Approximate branch (DESIGN.md section 4): attention over the unselected blocks, estimated.

Two estimators, each merged with the exact block-sparse result through the log-sum-exp rule, so
no query is ever left without the context it did not compute exactly:

- ``"group_means"`` (:func:`add_approximate_branch`, DESIGN.md's): every key group of an
  unselected block contributes one pooled key ``k̄_b`` with logit ``q·k̄_b * scale + log n_b`` (it
  stands for its ``n_b`` tokens) and pooled value ``v̄_b``.
- ``"taylor"`` (:func:`add_taylor_branch`): the row's left-out keys and values through their
  first and second moments, ``exp`` expanded to second order about the mean logit.
- ``"grouped_taylor"`` (:func:`add_grouped_taylor_branch`): both at once. Each left-out group
  enters with its own logit (as group means), and ``exp`` is expanded to second order only about
  each group's mean, through the spread of the keys and values inside their groups.
- ``"principal"`` (:func:`add_principal_branch`): each left-out group with its own logit, ``exp``
  expanded to second order about the group's own mean along its leading key directions, with
  that group's own spread (not pooled over the row).
"""

from __future__ import annotations

import warnings

import torch

from pasa.config import PASAConfig
from pasa.estimate import group_pool
from pasa.plan import BlockPlan

_CHUNK_ELEMENTS = 32 * 1024 * 1024


def add_approximate_branch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    group_size: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge group-mean attention over the unselected blocks into an exact result.

    Args:
        q, k, v: ``(B, S, H, D)`` in tiled order.
        out: ``(B, S, H, D)`` exact attention over the plan; lse ``(B, H, S)`` fp32.
    Returns:
        merged out ``(B, S, H, D)`` fp32 and lse ``(B, H, S)`` fp32.
    """
    batch, seq, heads, dim = q.shape
    bs = plan.layout.block_size
    per_block = bs // group_size
    scale = dim**-0.5 if scale is None else scale
    kg, counts = group_pool(k, group_size)  # (B, H, NG, D), (NG,)
    vg, _ = group_pool(v, group_size)
    group_block = torch.arange(kg.shape[2], device=q.device) // per_block  # (NG,)
    selected = plan.to_dense_mask()[..., group_block]  # (B, H, Nq, NG)
    qf = q.float().transpose(1, 2)  # (B, H, S, D)
    out = out.float().transpose(1, 2).clone()  # (B, H, S, D)
    lse = lse.clone()
    rows = max(bs, (_CHUNK_ELEMENTS // max(1, batch * heads * kg.shape[2])) // bs * bs)
    for s0 in range(0, seq, rows):
        s1 = min(seq, s0 + rows)
        qblock = torch.arange(s0, s1, device=q.device) // bs  # (c,)
        # coarse_lse (B, H, c), coarse (B, H, c, D)
        coarse_lse, coarse = _group_tail(
            qf[:, :, s0:s1], kg, vg, counts, selected[:, :, qblock], scale
        )
        merged = torch.logaddexp(lse[:, :, s0:s1], coarse_lse)
        w_exact = torch.exp(lse[:, :, s0:s1] - merged).unsqueeze(-1)
        w_coarse = torch.exp(coarse_lse - merged).unsqueeze(-1)
        out[:, :, s0:s1] = w_exact * out[:, :, s0:s1] + w_coarse * coarse
        lse[:, :, s0:s1] = merged
    return out.transpose(1, 2), lse


def _group_tail(
    q: torch.Tensor,
    kg: torch.Tensor,
    vg: torch.Tensor,
    counts: torch.Tensor,
    excluded: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-means attention of queries ``q (..., c, D)`` over pooled keys and values ``kg, vg
    (..., NG, D)``, each group standing for its ``counts`` tokens, the groups where ``excluded``
    (broadcast to ``(..., c, NG)``) left out: the LSE ``(..., c)``, ``-inf`` where every group
    was excluded, and the values ``(..., c, D)``, zero there."""
    logits = q @ kg.transpose(-1, -2) * scale + counts.log()
    logits = logits.masked_fill(excluded, float("-inf"))
    return torch.logsumexp(logits, -1), torch.softmax(logits, -1).nan_to_num(0.0) @ vg


def add_taylor_branch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float | None = None,
    kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a second-order Taylor estimate of attention over the unselected blocks.

    For a query ``q`` and the ``n`` keys left out of its row, with ``k̄, v̄`` their means and
    ``δ_i = s q·(k_i − k̄)`` each key's logit about the mean logit ``c = s q·k̄``:

        Σ exp(s q·k_i)        ≈ n e^c (1 + qᵀCq s² / 2n)             (C: the keys' scatter)
        Σ exp(s q·k_i) v_i / Σ ≈ v̄ + s qᵀX / n / (1 + qᵀCq s² / 2n)  (X: the key-value scatter)

    ``exp(δ) ≈ 1 + δ + δ²/2``; the first-order term sums to zero over the keys, the second makes
    the mass at least Jensen's ``n e^c`` (group means underestimate it), and the value gets the
    first-order, query-dependent correction. Unlike group means, every left-out token takes
    part through its block's moments (sums of ``k``, ``v``, ``k kᵀ``, ``k vᵀ``), so a head that
    attends almost uniformly is reproduced almost exactly, with its contrast.

    Cost: ``O(Nk·bs·D²)`` for the block moments, ``O(Nq·Nk·D²)`` to sum each row's left-out
    blocks (a matmul with the plan's complement) and ``O(S·D²)`` for the queries, per head. With
    half-precision inputs the three run as bf16 matmuls (fp32 accumulation) on keys and values
    centred on their head's mean, so the sums carry no large common part; ``qᵀCq`` and ``qᵀX``
    are taken as ``qᵀ(Σkkᵀ)q − n(q·k̄)²`` and ``qᵀ(Σkvᵀ) − n(q·k̄)v̄``, never forming ``C``.

    The per-query part runs as one Triton kernel (``pasa/kernels/taylor_triton.py``) on CUDA
    for half-precision inputs with a power-of-two head size from 16 to 256: it equals the torch
    path on the H200 (``tests/test_gpu_backends.py``) and takes the branch from 32.6 to 23.0 ms
    for a Wan2.1-14B 720p call at density 0.1 (``benchmarks/approximate_cost.py``,
    ``benchmarks/results/approximate-cost-h200-kernel.json``).

    Args and returns as :func:`add_approximate_branch`. ``kernel``: None (default) takes the
    kernel wherever it applies on CUDA with half-precision inputs, else the torch path; False
    always the torch path; True the kernel or ValueError where it does not apply.
    """
    batch, seq, heads, dim = q.shape
    bs = plan.layout.block_size
    nk = plan.num_kv_blocks
    scale = dim**-0.5 if scale is None else scale
    pad = nk * bs - seq
    half = q.dtype in (torch.float16, torch.bfloat16)
    dtype = torch.bfloat16 if half else torch.float32  # bf16: fp16 would overflow the sums
    unselected = (~plan.to_dense_mask()).flatten(0, 1)  # (G, Nq, Nk), G = B*H
    counts = torch.full((nk,), float(bs), device=q.device)
    counts[-1] -= pad

    def by_head(x: torch.Tensor) -> torch.Tensor:
        """``(B, S, H, D)`` as ``(G, Nk, bs, D)`` in the matmul dtype, zero-padded (one copy)."""
        x = x.to(dtype).transpose(1, 2).flatten(0, 1)
        return torch.nn.functional.pad(x, (0, 0, 0, pad)).unflatten(1, (nk, bs))

    kernel = _use_kernel(kernel, q, out, name="Taylor", half_only=True)
    ka, va = by_head(k), by_head(v)
    qa = None if kernel else by_head(q)
    groups = batch * heads
    if kernel:
        from pasa.kernels.taylor_triton import taylor_merge

        result = torch.empty(batch, seq, heads, dim, dtype=torch.float32, device=q.device)
        result_lse = torch.empty(batch, heads, seq, dtype=torch.float32, device=q.device)
    else:
        result = torch.empty(groups, seq, dim, dtype=torch.float32, device=q.device)
        result.view(batch, heads, seq, dim).copy_(out.transpose(1, 2))  # the caller's stays
        result_lse = lse.flatten(0, 1).clone()  # (G, S)
    step = max(1, _CHUNK_ELEMENTS // (nk * dim * dim))
    for g0 in range(0, groups, step):
        g1 = min(groups, g0 + step)
        # Keys and values centred on their head's mean; the padding stays zero.
        k_centre = ka[g0:g1].sum((1, 2), dtype=torch.float32) / seq  # (g, D)
        v_centre = va[g0:g1].sum((1, 2), dtype=torch.float32) / seq
        kb = ka[g0:g1] - k_centre.to(dtype)[:, None, None]
        vb = va[g0:g1] - v_centre.to(dtype)[:, None, None]
        if pad:
            kb[:, -1, bs - pad :] = 0
            vb[:, -1, bs - pad :] = 0
        un = unselected[g0:g1]
        uf = un.float()
        n = uf @ counts  # (g, Nq) tokens left out of each row
        inv_n = 1.0 / n.clamp_min(1.0)
        k_mean = (uf @ kb.sum(2, dtype=torch.float32)) * inv_n[..., None]  # (g, Nq, D), centred
        v_mean = (uf @ vb.sum(2, dtype=torch.float32)) * inv_n[..., None]
        # Σ k kᵀ and Σ k vᵀ over each row's left-out blocks: (g, Nq, D, D).
        u = un.to(dtype)
        row_kk = (u @ (kb.transpose(-1, -2) @ kb).flatten(-2)).unflatten(-1, (dim, dim))
        row_kv = (u @ (kb.transpose(-1, -2) @ vb).flatten(-2)).unflatten(-1, (dim, dim))
        if kernel:
            moments = (row_kk, row_kv, k_mean, v_mean, k_centre, v_centre, n)
            taylor_merge(q, out, lse, moments, g0, block_size=bs, scale=scale, res=result,
                         res_lse=result_lse)  # fmt: skip
            continue
        qb = qa[g0:g1]  # (g, Nk, bs, D)
        # q·k̄ (centred) and q·(k̄ + centre) in fp32: (g, Nq, bs, 2).
        q_means = qb.float() @ torch.stack((k_mean, k_mean + k_centre[:, None]), -1)
        q_kmean, centre = q_means[..., 0], scale * q_means[..., 1]
        quad = ((qb @ row_kk) * qb).sum(-1, dtype=torch.float32) - n[..., None] * q_kmean.square()
        gain = 1.0 + (scale * scale / 2) * quad.clamp_min(0.0) * inv_n[..., None]
        tail_lse = (n.clamp_min(1.0).log()[..., None] + centre + gain.log()).flatten(1)[:, :seq]
        tail_lse = tail_lse.masked_fill((n == 0).repeat_interleave(bs, 1)[:, :seq], float("-inf"))
        # v̄ + s (qᵀΣkvᵀ − n (q·k̄) v̄) / n / gain, in place on the (g, Nq, bs, D) product.
        coef = (scale * inv_n[..., None] / gain)[..., None]  # (g, Nq, bs, 1)
        tail = (qb @ row_kv).float().mul_(coef)
        tail.addcmul_(coef * n[..., None, None] * q_kmean[..., None], v_mean[:, :, None], value=-1)
        tail.add_((v_centre[:, None] + v_mean)[:, :, None])
        merged = torch.logaddexp(result_lse[g0:g1], tail_lse)
        result[g0:g1].lerp_(tail.flatten(1, 2)[:, :seq], torch.exp(tail_lse - merged).unsqueeze(-1))
        result_lse[g0:g1] = merged
    if kernel:
        return result, result_lse
    out = result.unflatten(0, (batch, heads)).transpose(1, 2)
    return out, result_lse.unflatten(0, (batch, heads))


def add_grouped_taylor_branch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    group_size: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a two-level estimate of attention over the unselected blocks: group means between
    groups, a second-order Taylor expansion inside them.

    The Taylor tail expands ``exp`` about the mean logit of all of a row's left-out keys. When
    those keys mix a few heavy ones (another object the query's head follows) with many light
    ones, their logits spread by several units and the expansion, exact to second order only,
    misjudges both the tail's mass and its value. Group means keep the heavy groups' own logits
    but lose every group's inner spread. Here, for a query ``q`` and a row's left-out groups
    ``g`` (``n_g`` tokens, means ``k̄_g, v̄_g``; ``n`` tokens in all):

        mass  ≈ Σ_g n_g e^(s q·k̄_g) · (1 + s² qᵀWq / 2n)
        value ≈ softmax_g(s q·k̄_g + log n_g) · v̄_g + s qᵀY / n / (1 + s² qᵀWq / 2n)

    with ``W = Σ (k_i − k̄_g)(k_i − k̄_g)ᵀ`` and ``Y = Σ (k_i − k̄_g)(v_i − v̄_g)ᵀ`` summed over
    the row's left-out tokens: the keys' and values' scatter inside their groups, pooled over the
    row (one ``D × D`` pair a row, as the Taylor tail's), so the inner correction assumes every
    left-out group spreads alike. It is exact where each group's keys are equal (any values),
    and with one-token groups; it costs group means' ``O(S · NG · D)`` plus the Taylor tail's
    moments. Torch only (no Triton kernel yet): 186 ms against the Taylor kernel's 23 ms for a
    Wan2.1-14B 720p call at density 0.1 on an H200. On the testbed (docs/results.md, run 6) it
    gains 2.2 dB over the Taylor tail on a three-shape clip whose left-out logits spread widely,
    and loses 5-7 dB on one object over a noisy background: an option, not the default.

    Args and returns as :func:`add_approximate_branch`.
    """
    batch, seq, heads, dim = q.shape
    bs = plan.layout.block_size
    nk = plan.num_kv_blocks
    per_block = bs // group_size
    scale = dim**-0.5 if scale is None else scale
    pad = nk * bs - seq
    kg, counts = group_pool(k, group_size)  # (B, H, NG, D), (NG,)
    vg, _ = group_pool(v, group_size)
    num_groups = kg.shape[2]
    group_of = torch.arange(seq, device=q.device) // group_size
    block_counts = torch.nn.functional.pad(counts, (0, nk * per_block - num_groups))
    block_counts = block_counts.view(nk, per_block).sum(1)  # (Nk,)
    group_block = torch.arange(num_groups, device=q.device) // per_block
    mask = plan.to_dense_mask().flatten(0, 1)  # (G, Nq, Nk)
    kg, vg = kg.flatten(0, 1), vg.flatten(0, 1)  # (G, NG, D)
    qf, kf, vf = (x.float().transpose(1, 2).flatten(0, 1) for x in (q, k, v))  # (G, S, D)
    out = out.float().transpose(1, 2).flatten(0, 1).clone()  # (G, S, D)
    lse = lse.flatten(0, 1).clone()  # (G, S)

    def by_block(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, 0, 0, pad)).unflatten(1, (nk, bs))

    groups = batch * heads
    step = max(1, _CHUNK_ELEMENTS // (nk * max(dim * dim, bs * num_groups)))
    for g0 in range(0, groups, step):
        g1 = min(groups, g0 + step)
        # Keys and values about their group's mean; the padding stays zero.
        kw = by_block(kf[g0:g1] - kg[g0:g1][:, group_of])  # (g, Nk, bs, D)
        vw = by_block(vf[g0:g1] - vg[g0:g1][:, group_of])
        un = (~mask[g0:g1]).float()  # (g, Nq, Nk)
        n = un @ block_counts  # (g, Nq)
        inv_n = 1.0 / n.clamp_min(1.0)
        row_w = (un @ (kw.transpose(-1, -2) @ kw).flatten(-2)).unflatten(-1, (dim, dim))
        row_y = (un @ (kw.transpose(-1, -2) @ vw).flatten(-2)).unflatten(-1, (dim, dim))
        qb = by_block(qf[g0:g1])  # (g, Nq, bs, D)
        quad = ((qb @ row_w) * qb).sum(-1).clamp_min(0.0)  # (g, Nq, bs)
        gain = 1.0 + (scale * scale / 2) * quad * inv_n[..., None]
        inner = (qb @ row_y) * (scale * inv_n[..., None] / gain)[..., None]  # (g, Nq, bs, D)
        # Between groups: one logit per left-out group, as group means; coarse_lse (g, Nq, bs),
        # coarse (g, Nq, bs, D).
        excluded = mask[g0:g1][..., group_block].unsqueeze(2)  # (g, Nq, 1, NG)
        coarse_lse, coarse = _group_tail(
            qb, kg[g0:g1, None], vg[g0:g1, None], counts, excluded, scale
        )
        tail_lse = (coarse_lse + gain.log()).flatten(1)[:, :seq]
        tail = (coarse + inner).flatten(1, 2)[:, :seq]
        merged = torch.logaddexp(lse[g0:g1], tail_lse)
        out[g0:g1].lerp_(tail, torch.exp(tail_lse - merged).nan_to_num(0.0).unsqueeze(-1))
        lse[g0:g1] = merged
    out = out.unflatten(0, (batch, heads)).transpose(1, 2)
    return out, lse.unflatten(0, (batch, heads))


def add_principal_branch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    group_size: int,
    rank: int = PASAConfig.tail_rank,
    scale: float | None = None,
    kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge an estimate of attention over the unselected blocks that expands ``exp`` to second
    order about each left-out group's own mean, along that group's principal key directions.

    For a query ``q`` and a left-out group ``g`` (``n_g`` tokens, means ``k̄_g, v̄_g``), with
    ``u_1 … u_r`` the group's ``r`` leading key directions (orthonormal eigenvectors of its key
    scatter ``W_g = Σ (k_i − k̄_g)(k_i − k̄_g)ᵀ``, eigenvalues ``λ_j``), ``z_j = Σ (u_j·(k_i −
    k̄_g)) (v_i − v̄_g)`` and ``p_j = s u_j·q``:

        mass_g  ≈ n_g e^(s q·k̄_g) · (1 + Σ_j λ_j p_j² / 2n_g)
        value_g ≈ v̄_g + Σ_j p_j z_j / n_g / (1 + Σ_j λ_j p_j² / 2n_g)

    and the tail is the mass-weighted mixture of the groups' values. At ``r = D`` this is the
    second-order expansion about each group's own mean with its own key scatter and key-value
    scatter; ``r`` leading directions make it cost about ``r + 1`` times group means'
    ``O(S·NG·D)`` (``2r + 2`` dot products per query and group against their 2). Group means lose each group's spread; the Taylor tail expands about one mean
    for the whole row, wrong when the row's left-out logits spread by several units; the
    grouped Taylor tail pools the spread over the row. This keeps the groups' own logits and,
    along the directions that carry most of it, their own spread. It is exact where each
    group's keys are equal (any values), with one-token groups, and where every group's keys
    leave their mean within ``r`` directions.

    The directions come from three rounds of subspace iteration on the keys about their group
    mean (``W_g`` is never formed), from a fixed start, then a Rayleigh-Ritz step: the result
    is deterministic.

    The per-query part runs as one Triton kernel (``pasa/kernels/principal_triton.py``) on
    CUDA for a power-of-two head size from 16 to 256: an online softmax over the groups, as
    FlashAttention walks keys. On run 6's testbed (docs/results.md) rank 4 is 4.6-4.9 dB closer
    to dense than the Taylor tail on average and closer on every clip; at Wan2.1-14B 720p,
    density 0.1, on an H200 the branch takes 456 ms with this first kernel (65 ms of it the
    torch part above) and 705 ms in torch, against the Taylor kernel's 23 ms
    (``benchmarks/results/approximate-cost-h200-principal.json``): an option, not the default.

    Args and returns as :func:`add_approximate_branch`; ``rank``: directions per group, from 1
    to the head size; ``kernel`` as :func:`add_taylor_branch`'s.
    """
    batch, seq, heads, dim = q.shape
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= dim:
        raise ValueError(f"rank must be an int from 1 to the head size {dim}, got {rank!r}")
    auto = kernel is None
    kernel = _use_kernel(kernel, q, out, name="principal", half_only=False)
    bs = plan.layout.block_size
    per_block = bs // group_size
    scale = dim**-0.5 if scale is None else scale
    kg, counts = group_pool(k, group_size)  # (B, H, NG, D), (NG,)
    vg, _ = group_pool(v, group_size)
    num_groups = kg.shape[2]
    pad = num_groups * group_size - seq
    group_block = torch.arange(num_groups, device=q.device) // per_block
    mask = plan.to_dense_mask().flatten(0, 1)  # (G, Nq, Nk)
    kg, vg = kg.flatten(0, 1), vg.flatten(0, 1)  # (G, NG, D)
    if kernel:
        from pasa.kernels.principal_triton import principal_merge

        result = torch.empty(batch, seq, heads, dim, dtype=torch.float32, device=q.device)
        result_lse = torch.empty(batch, heads, seq, dtype=torch.float32, device=q.device)
    else:
        qf = q.float().transpose(1, 2).flatten(0, 1)  # (G, S, D)
        result = out.float().transpose(1, 2).flatten(0, 1).clone()  # (G, S, D)
        result_lse = lse.flatten(0, 1).clone()  # (G, S)
    log_counts = counts.log()
    start = _subspace_start(group_size, rank, q.device)  # (gs, r)

    def about_means(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """``(g, S, D)`` as ``(g, NG, gs, D)`` fp32 about its group ``means``, padding zero."""
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).unflatten(1, (num_groups, -1))
        x = x - means[:, :, None]
        if pad:
            x[:, -1, group_size - pad :] = 0
        return x

    groups = batch * heads
    step = max(1, _CHUNK_ELEMENTS // (num_groups * group_size * dim))
    for g0 in range(0, groups, step):
        g1 = min(groups, g0 + step)
        by_head = (x.transpose(1, 2).flatten(0, 1)[g0:g1] for x in (k, v))
        kw, vw = (about_means(x, m[g0:g1]) for x, m in zip(by_head, (kg, vg), strict=True))
        basis = kw.transpose(-1, -2) @ start  # (g, NG, D, r)
        for _ in range(3):
            basis = _orthonormal(kw.transpose(-1, -2) @ (kw @ basis))
        coords = kw @ basis  # (g, NG, gs, r): the keys about their mean, in the basis
        eigenvalues, rotation = torch.linalg.eigh(coords.transpose(-1, -2) @ coords)
        basis, coords = basis @ rotation, coords @ rotation  # Rayleigh-Ritz
        cross = coords.transpose(-1, -2) @ vw  # (g, NG, r, D): the z_j
        half_weights = eigenvalues.clamp_min(0.0) / (2.0 * counts[:, None])  # (g, NG, r)
        if kernel:
            moments = (kg[g0:g1], vg[g0:g1], basis, half_weights, cross, counts)
            try:
                principal_merge(q, out, lse, moments, mask[g0:g1], g0, block_size=bs,
                                group_size=group_size, scale=scale, res=result,
                                res_lse=result_lse)  # fmt: skip
            except Exception as exc:  # e.g. too little shared memory on this GPU
                if not auto or type(exc).__name__ != "OutOfResources":
                    raise
                warnings.warn(f"the principal tail's Triton kernel cannot run here ({exc}); "
                              "using the torch path", stacklevel=2)  # fmt: skip
                return add_principal_branch(q, k, v, plan, out, lse, group_size=group_size,
                                            rank=rank, scale=scale, kernel=False)  # fmt: skip
            continue
        cross = cross.flatten(1, 2)  # (g, NG * r, D)
        basis = basis.permute(0, 2, 1, 3).flatten(2)  # (g, D, NG * r)
        rows = max(bs, (_CHUNK_ELEMENTS // ((g1 - g0) * num_groups * rank)) // bs * bs)
        for s0 in range(0, seq, rows):
            s1 = min(seq, s0 + rows)
            qc = qf[g0:g1, s0:s1]  # (g, c, D)
            p = (scale * qc @ basis).unflatten(-1, (num_groups, rank))  # (g, c, NG, r)
            gain = 1.0 + (p.square() * half_weights[:, None]).sum(-1)  # (g, c, NG)
            logits = scale * qc @ kg[g0:g1].transpose(-1, -2) + log_counts + gain.log()
            qblock = torch.arange(s0, s1, device=q.device) // bs
            excluded = mask[g0:g1][:, qblock][..., group_block]  # (g, c, NG)
            logits = logits.masked_fill(excluded, float("-inf"))
            tail_lse = torch.logsumexp(logits, -1)  # (g, c)
            weights = torch.softmax(logits, -1).nan_to_num(0.0)
            inner = (weights / (counts * gain)).unsqueeze(-1) * p  # (g, c, NG, r)
            tail = weights @ vg[g0:g1] + inner.flatten(2) @ cross  # (g, c, D)
            merged = torch.logaddexp(result_lse[g0:g1, s0:s1], tail_lse)
            share = torch.exp(tail_lse - merged).nan_to_num(0.0).unsqueeze(-1)
            result[g0:g1, s0:s1].lerp_(tail, share)
            result_lse[g0:g1, s0:s1] = merged
    if kernel:
        return result, result_lse
    out = result.unflatten(0, (batch, heads)).transpose(1, 2)
    return out, result_lse.unflatten(0, (batch, heads))


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    """Columns of ``x (..., D, r)`` made orthonormal (Gram-Schmidt, twice for accuracy); a
    column in the span of those before it comes out near zero."""
    for _ in range(2):
        columns = []
        for j in range(x.shape[-1]):
            c = x[..., j]
            for u in columns:
                c = c - (c * u).sum(-1, keepdim=True) * u
            columns.append(c / c.norm(dim=-1, keepdim=True).clamp_min(1e-30))
        x = torch.stack(columns, -1)
    return x


def _subspace_start(group_size: int, rank: int, device: torch.device) -> torch.Tensor:
    """A fixed ``(group_size, rank)`` start for the subspace iteration: mixes of a group's
    tokens with signs from a fixed generator, the same on every device."""
    generator = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (group_size, rank), generator=generator).float() * 2 - 1
    return signs.to(device)


def _use_kernel(
    kernel: bool | None, q: torch.Tensor, out: torch.Tensor, *, name: str, half_only: bool
) -> bool:
    """Whether a tail runs its Triton per-query kernel: ``kernel`` None takes it on CUDA wherever
    it applies (with ``half_only``, for half-precision inputs only), False never, True always,
    with a ValueError naming the ``name`` kernel where it cannot run."""
    applies = kernel is not False and _tail_kernel_applies(q, out)
    if kernel is None:
        half = q.dtype in (torch.float16, torch.bfloat16)
        return q.is_cuda and applies and (half or not half_only)
    if kernel and not applies:
        raise ValueError(
            f"the Triton {name} kernel needs a power-of-two head size from 16 to 256, contiguous "
            f"last dimensions and Triton (got head size {q.shape[-1]}, q on {q.device})"
        )
    return bool(kernel)


def _tail_kernel_applies(q: torch.Tensor, out: torch.Tensor) -> bool:
    """The tails' Triton per-query kernels can run on these inputs: a power-of-two head size
    from 16 to 256, the last dimension contiguous, Triton importable (on the CPU only under its
    interpreter, ``TRITON_INTERPRET=1``)."""
    import os

    dim = q.shape[-1]
    if dim & (dim - 1) or not 16 <= dim <= 256:
        return False
    if any(t.stride(-1) != 1 for t in (q, out)):
        return False
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
