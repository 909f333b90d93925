"""Structured synthetic video Q/K/V: attention shaped like a video DiT's, no weights needed.

Each token of an ``(F, H, W)`` grid gets two kinds of features:

- *position*: random Fourier features of its (scaled) coordinates, so that ``q·k`` approximates a
  Gaussian kernel of the distance between two tokens (attention is local in space and time);
  each head has its own length scale, from sharp (2 tokens) to broad (16 tokens), like real heads;
- *content*: a handful of small objects move across the video (linear motion, a few tokens wide);
  tokens covered by the same object share a content vector, so an object attends to itself in
  every frame: sparse, long-range, small features inside a block, the case grouped estimation is
  for.

Text tokens (optional) are random vectors attending broadly. Deterministic for a given seed.
"""

from __future__ import annotations

import math

import torch

_LENGTH_SCALES = (2.0, 4.0, 8.0, 16.0)


def _object_membership(
    grid: tuple[int, int, int], num_objects: int, gen: torch.Generator
) -> torch.Tensor:
    """``(F*H*W, num_objects)`` fp32 in {0, 1}: which moving object covers each token."""
    frames, height, width = grid
    f = torch.arange(frames, dtype=torch.float32).view(-1, 1, 1, 1)
    h = torch.arange(height, dtype=torch.float32).view(1, -1, 1, 1)
    w = torch.arange(width, dtype=torch.float32).view(1, 1, -1, 1)
    start_h = torch.rand(num_objects, generator=gen) * height
    start_w = torch.rand(num_objects, generator=gen) * width
    vel = (torch.rand(num_objects, 2, generator=gen) - 0.5) * 2.0  # tokens per frame
    radius = 1.0 + torch.rand(num_objects, generator=gen) * 2.0
    ch = (start_h + vel[:, 0] * f) % max(height, 1)  # (F, 1, 1, O)
    cw = (start_w + vel[:, 1] * f) % max(width, 1)
    inside = ((h - ch) ** 2 + (w - cw) ** 2) <= radius**2  # (F, H, W, O)
    return inside.float().reshape(frames * height * width, num_objects)


def video_qkv(
    grid: tuple[int, int, int],
    *,
    heads: int = 4,
    dim: int = 64,
    batch: int = 1,
    num_text_tokens: int = 0,
    num_objects: int = 8,
    sharpness: float = 10.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic ``q, k, v``, each ``(B, F*H*W + num_text_tokens, heads, dim)``.

    Args:
        sharpness: logit of a token with itself (position part); larger is more local.
    """
    gen = torch.Generator().manual_seed(seed)
    frames, height, width = grid
    n = frames * height * width
    pos_dim, content_dim = dim // 2, dim - dim // 2
    f = torch.arange(frames, dtype=torch.float32).view(-1, 1, 1).expand(frames, height, width)
    h = torch.arange(height, dtype=torch.float32).view(1, -1, 1).expand(frames, height, width)
    w = torch.arange(width, dtype=torch.float32).view(1, 1, -1).expand(frames, height, width)
    coords = torch.stack([2.0 * f, h, w], -1).reshape(n, 3)  # a frame step ~ two pixels
    members = _object_membership(grid, num_objects, gen)  # (N, O)

    qs, ks, vs = [], [], []
    amp = math.sqrt(sharpness * math.sqrt(dim))  # so that q·k * dim**-0.5 peaks near sharpness
    for head in range(heads):
        scale = _LENGTH_SCALES[head % len(_LENGTH_SCALES)]
        omega = torch.randn(3, pos_dim, generator=gen) / scale
        phase = torch.rand(pos_dim, generator=gen) * 2 * math.pi
        pos = math.sqrt(2.0 / pos_dim) * torch.cos(coords @ omega + phase)  # (N, pos_dim)
        content_vecs = torch.nn.functional.normalize(
            torch.randn(num_objects, content_dim, generator=gen), dim=-1
        )
        content = members @ content_vecs  # (N, content_dim)
        feat = torch.cat([pos, content], -1) * amp
        qs.append(feat + 0.3 * torch.randn(batch, n, dim, generator=gen))
        ks.append(feat + 0.3 * torch.randn(batch, n, dim, generator=gen))
        mix = torch.randn(dim, dim, generator=gen) / math.sqrt(dim)
        vs.append(feat @ mix / amp + 0.1 * torch.randn(batch, n, dim, generator=gen))
    q, k, v = (torch.stack(t, 2) for t in (qs, ks, vs))  # (B, N, H, D)
    if num_text_tokens:
        text = [torch.randn(batch, num_text_tokens, heads, dim, generator=gen) for _ in range(3)]
        q, k, v = (torch.cat([x, t], 1) for x, t in zip((q, k, v), text, strict=False))
    return tuple(t.to(dtype=dtype, device=device) for t in (q, k, v))  # type: ignore[return-value]
