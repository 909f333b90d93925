"""Block routing on GPU without host synchronisation, plans identical to pasa/route.py.

``top_k``: one kernel, no sort. Per row a radix select (masked counts over the row's keys, held in
registers for N <= 2048, one per bit until the top ``count`` keys stand apart, at most 32) finds
the count-th largest key, reading the local window's blocks as ``+inf`` keys on the way (a soft or
trusted window's as the score plus the head's value, ``+inf`` in a trusted head); the row
keeps the keys above it and, of the keys equal to it, the lowest-indexed ones; a prefix count
places the selected blocks in ascending order. Exact ties are the only place where this can
differ from pasa/route.py's ``argsort`` (forced ``+inf`` blocks always fit in the count; other
exact ties need equal noisy scores, in practice rows whose mass underflowed with
``temperature=0``): lower block index wins, which is what a stable descending sort keeps.

``top_p``: pasa/route.py finds one top-p threshold for the whole call by 32 bisection steps over a full
``argsort``; here the same plan comes from one row sort per query block (in registers), one
``cumsum`` and one order statistic:

    count(row, p) = clamp(#{cum < p} + 1, lo, hi) = lo + #{rank r in [lo-1, hi-2] : cum_r < p}

so the total count over all rows is ``sum(lo)`` plus a *global* count of eligible cumulative shares
below ``p``, and the bisection's answer is the K-th smallest eligible cumulative share ``c*``,
``K = ceil(target - sum(lo))`` (``K`` is known on the host: ``lo``, ``hi`` depend on the layout
only). Rows then take ``lo + #{eligible cum <= c*}`` blocks. Plans differ from pasa/route.py only
where scores tie exactly or cumulative shares lie closer than the bisection's resolution.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import triton

from pasa.config import PASAConfig
from pasa.kernels._route_kernels import build_plan_kernel, rank_row_kernel, topk_plan_kernel
from pasa.layout import TokenLayout, nearest_blocks
from pasa.plan import BlockPlan
from pasa.route import _count_bounds, forced_blocks, split_window

# Widest row the top-k kernel keeps in registers; longer rows are streamed in pieces this wide.
_TOPK_CHUNK = 2048


@lru_cache(maxsize=64)
def _bounds(
    layout: TokenLayout,
    local: int,
    time_scale: float,
    min_blocks: int,
    max_blocks: int | None,
    device: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, torch.Tensor | None]:
    """Count floor / ceiling per query block (device int32), the eligibility mask of ranks
    ``[lo-1, hi-2]`` (device bool ``(N, N)``), ``sum(lo)``, ``sum(max(hi - lo, 0))`` and the
    local window (device int8 ``(N, N)``, None without one); ``local`` nearest blocks per video
    row are forced, nearest with time distances scaled by ``time_scale`` (route.py's
    :func:`forced_blocks`)."""
    config = PASAConfig(min_blocks=min_blocks, max_blocks=max_blocks)
    forced, dense_rows = forced_blocks(layout, "cpu", local, time_scale)
    lo, hi = _count_bounds(forced, dense_rows, config)  # (N,), (N,) int64
    rank = torch.arange(layout.num_blocks)
    eligible = (rank[None, :] >= lo[:, None] - 1) & (rank[None, :] <= hi[:, None] - 2)
    window = None
    if local:
        window = nearest_blocks(layout, local, time_scale).to(device=device, dtype=torch.int8)
    return (
        lo.to(device=device, dtype=torch.int32),
        hi.to(device=device, dtype=torch.int32),
        eligible.to(device),
        int(lo.sum()),
        int((hi - lo).clamp(min=0).sum()),
        window,
    )


def route_from_scores(
    share: torch.Tensor | None,
    scores: torch.Tensor,
    *,
    layout: TokenLayout,
    config: PASAConfig,
    density: float,
) -> BlockPlan:
    """The plan pasa/route.py's :func:`select_blocks` makes from these routing keys.

    Args:
        share: ``(B, H, N, N)`` fp32 floored row share of block mass (route.py's ``share``);
            only read by ``top_p`` and ``window_trust`` (None is fine otherwise).
        scores: ``(B, H, N, N)`` fp32 ``log share + tau * Gumbel``, forced blocks ``+inf``.
        density: target mean density, < 1.
    Returns:
        :class:`BlockPlan` with ``Kmax = N``; no host synchronisation.
    """
    batch, heads, n, _ = scores.shape
    rows = batch * heads * n
    local = config.local_blocks(density, n)
    routing = split_window(layout, config, local, (batch, heads), scores.device, share)
    lo, hi, eligible, lo_total, eligible_total, window = _bounds(
        layout,
        routing.floor,
        config.window_time_scale,
        config.min_blocks,
        config.max_blocks,
        str(scores.device),
    )
    if not routing.forced:  # the floor's room only; nothing forced beyond the diagonal
        window = None
    if config.selection == "top_k":
        count = round(density * n)  # route.py's count rule, clamped per row in the kernel
        value = None
        if routing.window is not None:  # a soft or trusted window: its values read in place
            window, value = routing.window.view(torch.int8), routing.value.reshape(-1)
        return BlockPlan(*topk_plan(scores, lo, hi, count, forced=window, value=value), layout)
    scores = routing.keys(scores)  # a soft or trusted window: in the keys (route.py)
    if window is not None:  # the local window's blocks are forced like the diagonal: +inf keys
        scores = scores.masked_fill(window.bool(), float("inf"))
    # top_p: rank every row (bitonic sort in registers), then one global threshold.
    block = max(16, 1 << (n - 1).bit_length())
    order = torch.empty((batch, heads, n, n), dtype=torch.int32, device=scores.device)
    ranked = torch.empty_like(share)
    rank_row_kernel[(rows,)](
        scores.contiguous(),
        share.contiguous(),
        order,
        ranked,
        n,
        BLOCK=block,
        RANKED=True,
        num_warps=4,
    )
    cum = ranked.cumsum(-1)  # same op and order as route.py: identical sums
    need = math.ceil(density * rows * n - batch * heads * lo_total)
    if need <= 0:
        thr = torch.full((1,), float("-inf"), device=scores.device)
    elif need > batch * heads * eligible_total:
        thr = torch.full((1,), float("inf"), device=scores.device)
    else:
        # K-th smallest eligible value by a full sort (torch.topk with k in the millions is
        # the suspected cause of an illegal memory access seen on torch 2.11 / H100).
        vals = torch.where(eligible, cum, float("inf")).view(-1)
        thr = vals.sort().values[need - 1].view(1)
    kv_indices = torch.empty((batch, heads, n, n), dtype=torch.int32, device=scores.device)
    kv_counts = torch.empty((batch, heads, n), dtype=torch.int32, device=scores.device)
    build_plan_kernel[(rows,)](
        order,
        cum,
        lo,
        hi,
        thr,
        round(density * n),
        kv_indices,
        kv_counts,
        n,
        TOP_P=True,
        BLOCK=block,
        num_warps=4,
    )
    return BlockPlan(kv_indices, kv_counts, layout)


def topk_plan(
    scores: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    count: int,
    *,
    forced: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    rows_per_program: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``clamp(count, lo, hi)`` key blocks of every row, by a radix select (no sort).

    Args:
        scores: ``(B, H, N, N)`` fp32 routing keys (forced blocks ``+inf``).
        lo, hi: ``(N,)`` int32 count floor / ceiling per query block, ``1 <= lo <= hi <= N``.
        forced: ``(N, N)`` int8, nonzero where a query block's key block is forced (read as a
            ``+inf`` key, as if ``scores`` had it; the local window), or None.
        value: ``(B * H,)`` fp32 or None: with ``forced``, a forced block's key is instead
            its score plus its head's value (``+inf`` forces it there; a soft or trusted
            window, route.py's :meth:`WindowRouting.keys` without the ``(B, H, N, N)`` sum).
        rows_per_program, num_warps: launch shape (tuning only; power-of-two rows).
    Returns:
        ``kv_indices (B, H, N, N)`` int32 (ascending, padded with the last selected index) and
        ``kv_counts (B, H, N)`` int32.
    """
    batch, heads, n, _ = scores.shape
    rows = batch * heads * n
    if value is not None and (forced is None or value.shape != (batch * heads,)):
        raise ValueError(f"value needs forced and shape ({batch * heads},), got {value.shape}")
    scores = scores.contiguous()
    kv_indices = torch.empty((batch, heads, n, n), dtype=torch.int32, device=scores.device)
    kv_counts = torch.empty((batch, heads, n), dtype=torch.int32, device=scores.device)
    chunk = min(_TOPK_CHUNK, max(16, 1 << (n - 1).bit_length()))
    # One row per program on one or two warps: the 32 counts of the radix select reduce within a
    # warp (or two), not across eight. H100, Wan2.1-14B 720p (23,640 rows of 591 keys): 0.33 ms
    # against 0.50 ms for 4 rows on 8 warps (benchmarks/results/estimator-tuning-h100.json).
    per_program = rows_per_program or 1
    warps = num_warps or (2 if chunk >= 512 else 1)
    topk_plan_kernel[(triton.cdiv(rows, per_program),)](
        scores,
        lo if forced is None else forced.contiguous(),  # not read without FORCED
        scores if value is None else value.contiguous(),  # not read without VALUED
        lo,
        hi,
        count,
        kv_indices,
        kv_counts,
        rows,
        n,
        ROWS=per_program,
        CHUNK=chunk,
        SINGLE=n <= chunk,
        FORCED=forced is not None,
        VALUED=value is not None,
        num_warps=warps,
    )
    return kv_indices, kv_counts
