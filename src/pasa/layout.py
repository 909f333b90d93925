"""Token grid <-> tiled block order.

Video tokens arrive frame-major: token ``(f, h, w)`` of an ``(F, H, W)`` grid sits at index
``(f * H + h) * W + w``. PASA re-orders them tile by tile, each tile a ``(tf, th, tw)`` box in
raster order, so that the ``block_size`` consecutive tokens of one block are neighbours in space and
time. Tiles cut by the grid's edge are short (ragged); blocks are then simply consecutive
``block_size`` chunks of the re-ordered sequence, so a block near an edge may span two short tiles.
Text tokens (joint-attention models) keep their order and follow the video tokens; a block holding
any text token is a *text block*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

Grid = tuple[int, int, int]
Tile = tuple[int, int, int]


def auto_tile(grid: Grid, block_size: int) -> Tile:
    """A ``(tf, th, tw)`` tile of about ``block_size`` tokens for ``grid``.

    Two frames deep when the video has them (temporal neighbours attend to each other most),
    the rest a near-square patch: 2x8x8 for 128-token blocks, 1x8x16 for a single frame.
    """
    frames, height, width = grid
    tf = 2 if frames >= 2 and block_size % 2 == 0 else 1
    area = block_size // tf
    tw = min(width, 1 << math.ceil(math.log2(math.sqrt(area))))
    th = min(height, max(1, area // tw))
    if th * tw < area and tw < width:  # a short grid side leaves room on the other one
        tw = min(width, area // th)
    return tf, th, tw


@dataclass(frozen=True, eq=False)
class TokenLayout:
    """How the ``S = F*H*W + num_text_tokens`` tokens of one call map to blocks.

    Attributes:
        grid: ``(F, H, W)`` video token grid.
        tile: ``(tf, th, tw)`` tile.
        num_text_tokens: text tokens after the video tokens.
        block_size: tokens per block.
        perm: ``(S,)`` int64, ``perm[i]`` is the original index of the token at tiled position i.
        inv_perm: ``(S,)`` int64, inverse of ``perm``.
    """

    grid: Grid
    tile: Tile
    num_text_tokens: int
    block_size: int
    perm: torch.Tensor
    inv_perm: torch.Tensor

    @property
    def num_video_tokens(self) -> int:
        f, h, w = self.grid
        return f * h * w

    @property
    def seq_len(self) -> int:
        return self.num_video_tokens + self.num_text_tokens

    @property
    def num_blocks(self) -> int:
        return -(-self.seq_len // self.block_size)

    @property
    def first_text_block(self) -> int:
        """Index of the first block holding a text token (``num_blocks`` if there is no text)."""
        if self.num_text_tokens == 0:
            return self.num_blocks
        return self.num_video_tokens // self.block_size

    def to_blocks(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Re-order ``x`` along ``dim`` (the sequence) from original to tiled order."""
        return x.index_select(dim, self.perm)

    def from_blocks(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Inverse of :meth:`to_blocks`."""
        return x.index_select(dim, self.inv_perm)

    def block_of_token(self) -> torch.Tensor:
        """``(S,)`` int64: the block of each token, indexed in original order."""
        return self.inv_perm // self.block_size


def tiled_permutation(grid: Grid, tile: Tile) -> torch.Tensor:
    """``(F*H*W,)`` int64: original token index at each tiled position (ragged tiles kept short)."""
    frames, height, width = grid
    tf, th, tw = tile
    f = torch.arange(frames).view(-1, 1, 1)
    h = torch.arange(height).view(1, -1, 1)
    w = torch.arange(width).view(1, 1, -1)
    tiles_h, tiles_w = -(-height // th), -(-width // tw)
    tile_id = ((f // tf) * tiles_h + h // th) * tiles_w + w // tw  # (F, H, W)
    inside = ((f % tf) * th + h % th) * tw + w % tw  # (F, H, W), < tf*th*tw
    key = (tile_id * (tf * th * tw) + inside).flatten()
    return torch.argsort(key, stable=True)


@lru_cache(maxsize=64)
def _cached_layout(
    grid: Grid, tile: Tile, num_text_tokens: int, block_size: int, device: torch.device
) -> TokenLayout:
    video = tiled_permutation(grid, tile)
    text = torch.arange(video.numel(), video.numel() + num_text_tokens)
    perm = torch.cat([video, text]).to(device)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=device)
    return TokenLayout(grid, tile, num_text_tokens, block_size, perm, inv_perm)


def make_layout(
    grid: Grid,
    *,
    block_size: int = 128,
    tile: Tile | str = "auto",
    num_text_tokens: int = 0,
    device: torch.device | str = "cpu",
) -> TokenLayout:
    """The (cached) :class:`TokenLayout` for a grid, tile and text length."""
    grid = tuple(int(g) for g in grid)  # type: ignore[assignment]
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be three positive ints (F, H, W), got {grid}")
    if num_text_tokens < 0:
        raise ValueError(f"num_text_tokens must be >= 0, got {num_text_tokens}")
    resolved = auto_tile(grid, block_size) if tile == "auto" else tuple(tile)
    return _cached_layout(grid, resolved, num_text_tokens, block_size, torch.device(device))


def block_centres(layout: TokenLayout) -> torch.Tensor:
    """``(N, 3)`` float64 CPU mean (frame, row, column) of each block's video tokens, in tile
    units (text blocks get +inf: they are never near)."""
    _f, h, w = layout.grid
    tf, th, tw = layout.tile
    n, bs = layout.num_blocks, layout.block_size
    # On the CPU: CUDA's float64 index_add_ sums in no fixed order.
    video = layout.perm[: layout.num_video_tokens].cpu()  # original index at each tiled position
    coords = torch.stack([video // (h * w), (video // w) % h, video % w], -1).double()
    coords = coords / torch.tensor([tf, th, tw], dtype=torch.float64, device=coords.device)
    sums = torch.zeros(n, 3, dtype=torch.float64, device=coords.device)
    counts = torch.zeros(n, dtype=torch.float64, device=coords.device)
    block = torch.arange(video.numel(), device=coords.device) // bs
    sums.index_add_(0, block, coords)
    counts.index_add_(0, block, torch.ones_like(block, dtype=torch.float64))
    centres = sums / counts.clamp_min(1).unsqueeze(-1)
    centres[counts == 0] = float("inf")
    centres[layout.first_text_block :] = float("inf")
    return centres


def block_distance(layout: TokenLayout, time_scale: float = 1.0) -> torch.Tensor:
    """``(N, N)`` float64 distance between block centres in tile units, time differences scaled
    by ``time_scale`` (< 1: a window stretched along time): Chebyshev, plus a Euclidean term
    below 1e-3 that breaks its ties; +inf to and from text blocks, -1 on the diagonal (a block
    is nearest to itself). On the layout's device, computed on the CPU."""
    return _block_distance_cpu(layout, time_scale).to(layout.perm.device)


def _block_distance_cpu(layout: TokenLayout, time_scale: float = 1.0) -> torch.Tensor:
    c = block_centres(layout) * torch.tensor([float(time_scale), 1.0, 1.0], dtype=torch.float64)
    diff = (c[:, None, :] - c[None, :, :]).abs().nan_to_num(nan=0.0, posinf=float("inf"))
    cheb, eucl = diff.amax(-1), diff.pow(2).sum(-1).sqrt()
    # Rounded: the centres carry summation ulps, which would decide ties between blocks at the
    # same distance; rounded, such ties are exact and go to the lower index (stable sorts).
    score = (cheb + 1e-3 * (1 - 1 / (1 + eucl))).round(decimals=9)
    score.fill_diagonal_(-1.0)
    return score


@lru_cache(maxsize=64)
def nearest_blocks(layout: TokenLayout, count: int, time_scale: float = 1.0) -> torch.Tensor:
    """``(N, N)`` bool on the layout's device: each video query block's ``count`` nearest video
    key blocks by :func:`block_distance` (time scaled by ``time_scale``), itself included (ties:
    lower index). Text rows and columns are False. Cached per layout, count and scale."""
    n = layout.num_blocks
    video = min(layout.first_text_block, n)
    mask = torch.zeros(n, n, dtype=torch.bool, device=layout.perm.device)
    k = min(int(count), video)
    if k <= 0:
        return mask
    score = _block_distance_cpu(layout, time_scale)[:video, :video]
    nearest = score.argsort(dim=-1, stable=True)[:, :k]  # topk leaves the order of ties open
    mask[:video, :video].scatter_(-1, nearest.to(mask.device), True)
    return mask
