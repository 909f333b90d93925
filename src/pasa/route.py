"""Stochastic (Gumbel-biased) block routing (DESIGN.md section 2): block mass -> BlockPlan.

Key blocks of a query-block row are ranked by ``log mass + tau * Gumbel`` (Gumbel-top-k samples
blocks without replacement in proportion to ``mass ** (1 / tau)``); the diagonal block and text
blocks are always kept, text query blocks attend densely. The row's count is then

- ``top_k``: ``round(density * Nk)`` for every row;
- ``top_p``: the fewest blocks, in ranked order, whose mass reaches ``p``, with one ``p`` for the
  whole call found by bisection so that the mean count meets ``density``: rows whose attention is
  concentrated take few blocks and leave budget to diffuse rows.

Both clip each row's count to ``[max(min_blocks, forced), max_blocks]``. The local window's
blocks are forced too, or with ``window_bonus`` only preferred (the bonus is added to their
scores), or with ``window_trust`` forced in the heads whose estimate agrees with the window and
preferred in the others. Nothing here synchronises with the host.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

from pasa.config import PASAConfig
from pasa.layout import TokenLayout, nearest_blocks
from pasa.noise import routing_gumbel
from pasa.plan import BlockPlan, compact_selection

_BISECTION_STEPS = 32
# Every block gets at least this share of a row's mass, so that a row's cumulative mass grows
# strictly and top-p can reach any count (fp32 softmax underflows to exact zeros).
_MASS_FLOOR = 1e-6


def forced_blocks(
    layout: TokenLayout, device: torch.device | str, local: int = 0, time_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Nq, Nk)`` bool of blocks always kept (the diagonal, text keys and each video row's
    ``local`` nearest blocks, time distances scaled by ``time_scale``), and ``(Nq,)`` bool of
    rows that attend densely (text rows)."""
    n = layout.num_blocks
    idx = torch.arange(n, device=device)
    text = idx >= layout.first_text_block
    forced = (idx[:, None] == idx[None, :]) | text[None, :]
    if local > 0:
        forced = forced | nearest_blocks(layout, local, time_scale).to(device)
    return forced, text


@lru_cache(maxsize=64)
def local_window(
    layout: TokenLayout, local: int, time_scale: float, device: torch.device | str
) -> torch.Tensor:
    """``(Nq, Nk)`` bool on ``device``: each video row's ``local`` nearest blocks (time
    distances scaled by ``time_scale``). Cached per layout, size and device (read, never
    written)."""
    return nearest_blocks(layout, local, time_scale).to(device)


class WindowRouting(NamedTuple):
    """How the local window enters one call's routing (:func:`split_window`)."""

    forced: int  # nearest blocks of every video row forced in every head (+inf scores)
    floor: int  # nearest blocks the rows' count bounds make room for (the forced window's)
    window: torch.Tensor | None  # (Nq, Nk) bool: the blocks that get `value` (None: nothing added)
    value: torch.Tensor | None  # (B, H) fp32 added to `window`'s scores per head; +inf forces them

    def keys(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` ``(B, H, Nq, Nk)`` with each head's value added on the window's blocks
        (what the GPU top-k reads in place, pasa/kernels/route_triton.py)."""
        if self.window is None:
            return scores
        return scores + torch.where(self.window, self.value[:, :, None, None], 0.0)


# window_agreement averages every AGREEMENT_ROW_STRIDE-th video row, for its per-row top-k: at
# Wan2.1-14B 720p on an H200 a trusted window's routing took 1.17-1.23 ms a call over all 591
# rows and 0.85-0.94 ms over every fourth (the forced window's: 0.24-0.27 ms).
AGREEMENT_ROW_STRIDE = 4


def window_agreement(
    share: torch.Tensor, window: torch.Tensor, local: int, video: int
) -> torch.Tensor:
    """``(B, H)`` fp32: per head, the mean over video rows (every
    :data:`AGREEMENT_ROW_STRIDE`-th) of the window's share of the row's estimated mass over
    the share of its ``local`` heaviest video blocks (1: the window holds the heaviest blocks;
    text keys are left out of both).

    Args:
        share: ``(B, H, Nq, Nk)`` row share of estimated block mass.
        window: ``(Nq, Nk)`` bool, each video row's ``local`` nearest video blocks.
        video: video blocks (they come first in a layout, the text blocks after them).
    """
    if video <= 0 or local <= 0:
        return share.new_ones(share.shape[:2])
    rows = slice(0, video, AGREEMENT_ROW_STRIDE)
    share = share[..., rows, :video]
    held = (share * window[rows, :video]).sum(-1)
    best = share.topk(min(local, video), dim=-1).values.sum(-1)
    return (held / best.clamp_min(1e-30)).mean(-1)


def split_window(
    layout: TokenLayout,
    config: PASAConfig,
    local: int,
    heads: tuple[int, int],
    device: torch.device | str,
    share: torch.Tensor | None = None,
) -> WindowRouting:
    """How a row's ``local`` nearest blocks enter the routing of ``heads`` = ``(B, H)``.

    - the default window forces all ``local`` in every head and adds nothing;
    - a soft one (``window_bonus``) forces none and adds the bonus to their scores in every head
      (the rows' count bounds make no room for them);
    - a trusted one (``window_trust``) adds ``+inf`` (forces them) in the heads whose estimate
      agrees with the window (:func:`window_agreement` of ``share``, the ``(B, H, Nq, Nk)`` row
      share, at least ``window_trust``) and the soft bonus in the others; every row keeps the
      forced window's count.
    """
    if local == 0 or (config.window_bonus is None and config.window_trust is None):
        return WindowRouting(local, local, None, None)
    window = local_window(layout, local, config.window_time_scale, str(device))
    bonus = config.soft_window_bonus
    if config.window_trust is None:
        return WindowRouting(0, 0, window, torch.full(heads, bonus, device=device))
    if share is None:
        raise ValueError("window_trust needs the estimate's row share of block mass")
    video = min(layout.first_text_block, layout.num_blocks)
    agrees = window_agreement(share, window, local, video) >= config.window_trust  # (B, H)
    return WindowRouting(0, local, window, torch.where(agrees, float("inf"), bonus))


def _count_bounds(
    forced: torch.Tensor, dense_rows: torch.Tensor, config: PASAConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(Nq,)`` int64 lower and upper bounds on the count."""
    n = forced.shape[-1]
    lo = forced.sum(-1).clamp(min=min(config.min_blocks, n))
    hi = torch.full_like(lo, n if config.max_blocks is None else min(config.max_blocks, n))
    hi = torch.maximum(hi, lo)
    lo = torch.where(dense_rows, n, lo)
    hi = torch.where(dense_rows, n, hi)
    return lo, hi


def routing_scores(
    mass: torch.Tensor,
    *,
    config: PASAConfig,
    step: int,
    layer: int,
    head_offset: int = 0,
) -> torch.Tensor:
    """``(B, H, Nq, Nk)`` fp32 ranking scores ``log mass + tau * Gumbel`` (mass row-normalised)."""
    heads = mass.shape[1]
    scores = mass.clamp_min(1e-30).log()
    if config.temperature > 0:
        gumbel = routing_gumbel(
            seed=config.seed,
            step=step,
            layer=layer,
            heads=torch.arange(head_offset, head_offset + heads),
            num_q_blocks=mass.shape[2],
            num_k_blocks=mass.shape[3],
            device=mass.device,
        )  # (H, Nq, Nk)
        scores = scores + config.temperature * gumbel
    return scores


def select_blocks(
    mass: torch.Tensor,
    *,
    layout: TokenLayout,
    config: PASAConfig,
    density: float | None = None,
    step: int = 0,
    layer: int = 0,
    head_offset: int = 0,
) -> BlockPlan:
    """Turn a block-mass estimate into a plan.

    Args:
        mass: ``(B, H, Nq, Nk)`` non-negative estimated attention mass (rows need not sum to 1).
        density: target mean density of the plan; ``config.density`` if None; >= 1 is dense.
        head_offset: global index of head 0 (context parallelism: same noise on every rank).
    Returns:
        A :class:`BlockPlan` with ``Kmax = Nk`` (call ``trimmed()`` for the compact form).
    """
    density = config.density if density is None else float(density)
    batch, heads, rows, cols = mass.shape
    if rows != layout.num_blocks or cols != layout.num_blocks:
        raise ValueError(f"mass has {rows}x{cols} blocks, layout has {layout.num_blocks}")
    if density >= 1.0:
        full = torch.ones(batch, heads, rows, cols, dtype=torch.bool, device=mass.device)
        return BlockPlan(*compact_selection(full), layout)

    mass = mass.float()
    share = mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
    share = (share + _MASS_FLOOR) / (1.0 + _MASS_FLOOR * cols)
    local = config.local_blocks(density, cols)
    window = split_window(layout, config, local, (batch, heads), mass.device, share)
    scale = config.window_time_scale
    forced, dense_rows = forced_blocks(layout, mass.device, window.forced, scale)
    room = (
        forced
        if window.floor == window.forced
        else forced_blocks(layout, mass.device, window.floor, scale)[0]
    )
    lo, hi = _count_bounds(room, dense_rows, config)  # (Nq,), (Nq,)
    scores = routing_scores(share, config=config, step=step, layer=layer, head_offset=head_offset)
    scores = window.keys(scores)  # a soft or trusted window: in the scores, not forced
    scores = scores.masked_fill(forced | dense_rows[:, None], float("inf"))
    order = scores.argsort(
        dim=-1, descending=True, stable=True
    )  # (B, H, Nq, Nk); ties: lower index

    if config.selection == "top_k":
        counts = torch.full_like(lo, round(density * cols)).clamp(min=lo, max=hi)
        counts = counts.expand(batch, heads, rows)
    else:
        counts = _top_p_counts(
            share.gather(-1, order), lo, hi, density * batch * heads * rows * cols
        )

    rank = torch.arange(cols, device=mass.device)
    selected_ranked = rank < counts.unsqueeze(-1)  # (B, H, Nq, Nk) in ranked order
    mask = torch.zeros_like(selected_ranked).scatter_(-1, order, selected_ranked)
    return BlockPlan(*compact_selection(mask), layout)


def _top_p_counts(
    ranked_share: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, target_total: float
) -> torch.Tensor:
    """Per-row counts for the smallest ``p`` whose total count reaches ``target_total``.

    Args:
        ranked_share: ``(B, H, Nq, Nk)`` row shares of mass in ranked order (each row sums to 1).
        lo, hi: ``(Nq,)`` count bounds.
    """
    cum = ranked_share.cumsum(-1).contiguous()  # (B, H, Nq, Nk), strictly increasing

    def counts_at(p: torch.Tensor) -> torch.Tensor:
        needed = torch.searchsorted(cum, p.expand(cum.shape[:-1]).unsqueeze(-1).contiguous())
        return (needed.squeeze(-1) + 1).clamp(min=lo, max=hi)

    low = torch.zeros((), device=cum.device)
    high = torch.full((), 1.0 + 1e-4, device=cum.device)  # above every row's total: counts = hi
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        enough = counts_at(mid).sum() >= target_total
        high = torch.where(enough, mid, high)
        low = torch.where(enough, low, mid)
    return counts_at(high)
