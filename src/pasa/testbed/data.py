"""Rendering procedural clips, batches of them, and a DDP-aware stream.

A clip is a float tensor ``(C=3, F, H, W)`` in ``[-1, 1]``; a batch is ``(B, 3, F, H, W)``. Clip
``index`` of stream ``data_seed`` is the same whatever process, rank or device renders it (its
scene is drawn on the CPU; rendering is vectorised over frames and pixels, one pass per object,
with anti-aliased edges and patterns). Textures live in world coordinates (background) or object
coordinates (shapes), so they move with the camera and with the objects.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from pasa.testbed.scene import (
    COLORS,
    NOISE_CELLS,
    Scene,
    SceneObject,
    Texture,
    caption,
    check_caption_order,
    check_scene_style,
    make_scene,
)

__all__ = ["ProceduralVideos", "caption", "make_batch", "make_scene", "render"]


def _square_wave(phase: torch.Tensor, period_px: torch.Tensor) -> torch.Tensor:
    """Anti-aliased 0/1 square wave of ``sin(phase)``, edges about one pixel wide.

    Args:
        phase: radians; one period is ``period_px`` pixels long (broadcastable).
    """
    s = torch.sin(phase)
    return (0.5 + s * period_px / (2 * math.pi)).clamp(0.0, 1.0)


def _noise(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    """Tileable bilinear value noise in [0, 1]; one lattice cell per unit of ``x`` and ``y``."""
    gen = torch.Generator().manual_seed(seed)
    lattice = torch.rand(1, 1, NOISE_CELLS, NOISE_CELLS, generator=gen)
    lattice = F.pad(lattice, (0, 1, 0, 1), mode="circular").to(x.device)  # wraps seamlessly
    gx = torch.remainder(x, NOISE_CELLS) / NOISE_CELLS * 2 - 1
    gy = torch.remainder(y, NOISE_CELLS) / NOISE_CELLS * 2 - 1
    grid = torch.stack([gx, gy], -1).reshape(1, -1, x.shape[-1], 2).float()
    value = F.grid_sample(lattice, grid, mode="bilinear", align_corners=True)
    return ((value.reshape(x.shape) - 0.5) * 2.2 + 0.5).clamp(0.0, 1.0)


def pattern(texture: Texture, x: torch.Tensor, y: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """Pattern value in [0, 1] (1 = the named colour) at coordinates ``x, y``.

    Args:
        x, y: ``(F, H, W)`` coordinates in the pattern's frame (world or object units).
        px: ``(F, 1, 1)`` size of one pixel in the same units (for anti-aliasing).
    """
    kind, freq = texture.kind, texture.freq
    if kind == "solid":
        return torch.ones_like(x)
    cos, sin = math.cos(texture.angle), math.sin(texture.angle)
    a = (x * cos + y * sin) * freq  # periods along the pattern's axis
    b = (-x * sin + y * cos) * freq
    period_px = 1.0 / (freq * px)
    if kind == "striped":
        return _square_wave(2 * math.pi * a, period_px)
    if kind == "wavy":
        return _square_wave(2 * math.pi * a + 2.0 * torch.sin(2 * math.pi * b / 3), period_px)
    if kind == "checkered":
        sa = _square_wave(2 * math.pi * a, period_px)
        sb = _square_wave(2 * math.pi * b, period_px)
        return sa * sb + (1 - sa) * (1 - sb)
    if kind == "dotted":
        da = a - torch.floor(a) - 0.5
        db = b - torch.floor(b) - 0.5
        dist = torch.sqrt(da * da + db * db)  # periods from the nearest dot centre
        return (0.5 + (0.3 - dist) * period_px).clamp(0.0, 1.0)
    if kind == "noisy":
        return _noise(a * 2, b * 2, texture.noise_seed)
    raise ValueError(f"unknown texture kind {kind!r}")


def _sdf(shape: str, lx: torch.Tensor, ly: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance (world units, negative inside) of ``shape`` of radius ``r``."""
    ax, ay = lx.abs(), ly.abs()
    if shape == "circle":
        return torch.sqrt(lx * lx + ly * ly) - r
    if shape == "square":
        return torch.maximum(ax, ay) - 0.85 * r
    if shape == "diamond":
        return (ax + ay - 1.2 * r) * 0.7071
    if shape == "triangle":  # pointing up (y grows downwards)
        return torch.maximum(ly - 0.5 * r, (1.7321 * ax - ly) * 0.5 - 0.5 * r)
    if shape == "ring":
        return (torch.sqrt(lx * lx + ly * ly) - 0.7 * r).abs() - 0.3 * r
    if shape == "cross":
        bar = 0.33 * r
        return torch.minimum(torch.maximum(ax - r, ay - bar), torch.maximum(ax - bar, ay - r))
    if shape == "ellipse":
        return (torch.sqrt((lx / r) ** 2 + (ly / (0.6 * r)) ** 2) - 1.0) * 0.6 * r
    raise ValueError(f"unknown shape {shape!r}")


def _bounce(pos: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Reflect positions into ``[lo, hi]`` (a triangle wave: elastic bounces off the walls)."""
    span = max(hi - lo, 1e-6)
    q = torch.remainder(pos - lo, 2 * span)
    return lo + torch.where(q < span, q, 2 * span - q)


def _colour(texture: Texture, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(3,)`` named colour and second shade of ``texture`` (re-shaded for colour ``name``)."""
    base = torch.tensor(COLORS[texture.color])
    second = torch.tensor(texture.second)
    if name is None:
        return base, second
    new = torch.tensor(COLORS[name])
    dark = float(second.sum()) < float(base.sum())
    shade = 0.3 * new if dark else new + 0.6 * (1 - new)
    if texture.contrast == 1.0:
        return new, shade
    return new, new + texture.contrast * (shade - new)


def _object_layer(
    obj: SceneObject,
    x: torch.Tensor,
    y: torch.Tensor,
    px: torch.Tensor,
    t: torch.Tensor,
    aspect: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(3, F, H, W)`` colour and ``(F, H, W)`` coverage of one object."""
    vx, vy = obj.velocity
    cx = obj.start[0] + vx * t  # (F, 1, 1)
    cy = obj.start[1] + vy * t
    if obj.motion == "bounces":
        cx = _bounce(cx, obj.radius, 1.0 - obj.radius)
        cy = _bounce(cy, obj.radius, aspect - obj.radius)
    angle = obj.angle + obj.spin * t
    cos, sin = torch.cos(angle), torch.sin(angle)
    dx, dy = x - cx, y - cy
    lx, ly = dx * cos + dy * sin, -dx * sin + dy * cos  # (F, H, W) object frame
    alpha = (0.5 - _sdf(obj.shape, lx, ly, obj.radius) / px).clamp(0.0, 1.0)
    value = pattern(obj.texture, lx, ly, px)
    base, second = (c.to(x.device).view(3, 1, 1, 1) for c in _colour(obj.texture))
    return second + (base - second) * value, alpha


def render(
    scene: Scene,
    *,
    frames: int = 16,
    height: int = 256,
    width: int = 256,
    device: torch.device | str = "cpu",
    supersample: int = 1,
) -> torch.Tensor:
    """Render ``scene`` as a ``(3, frames, height, width)`` float32 clip in ``[-1, 1]``.

    ``supersample`` renders ``s`` times larger and area-averages (anti-aliasing for small sizes).
    """
    s = int(supersample)
    h, w = height * s, width * s
    aspect = height / width
    t = torch.arange(frames, device=device, dtype=torch.float32).view(-1, 1, 1)  # (F, 1, 1)
    zoom = torch.exp(scene.zoom_rate * t)
    pan = {"none": (0, 0), "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    px_dir, py_dir = pan[scene.pan]
    cx = 0.5 + px_dir * scene.pan_speed * t
    cy = 0.5 * aspect + py_dir * scene.pan_speed * t
    u = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w - 0.5  # (W,)
    v = ((torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h - 0.5) * aspect
    x = cx + u.view(1, 1, -1) / zoom  # (F, 1, W) -> broadcast below
    y = cy + v.view(1, -1, 1) / zoom  # (F, H, 1)
    x, y = x.expand(frames, h, w), y.expand(frames, h, w)
    px = 1.0 / (w * zoom)  # (F, 1, 1) world units per pixel

    bg = scene.background
    value = pattern(bg, x, y, px)
    base, second = (c.to(device).view(3, 1, 1, 1) for c in _colour(bg))
    if scene.background_to is not None:  # blend to the new colour over three frames
        new_base, new_second = (
            c.to(device).view(3, 1, 1, 1) for c in _colour(bg, scene.background_to)
        )
        mix = ((t - scene.change_frame) / 3).clamp(0.0, 1.0).unsqueeze(0)  # (1, F, 1, 1)
        base = base + (new_base - base) * mix
        second = second + (new_second - second) * mix
    image = second + (base - second) * value  # (3, F, H, W)
    for obj in scene.objects:  # back to front: later objects occlude earlier ones
        colour, alpha = _object_layer(obj, x, y, px, t, aspect)
        image = image + (colour - image) * alpha
    if s > 1:
        image = F.avg_pool2d(image.reshape(3 * frames, 1, h, w), s).reshape(
            3, frames, height, width
        )
    return (image * 2 - 1).clamp(-1.0, 1.0)


def make_batch(
    indices: Sequence[int],
    *,
    data_seed: int,
    frames: int = 16,
    height: int = 256,
    width: int = 256,
    device: torch.device | str = "cpu",
    supersample: int = 1,
    caption_order: str = "scene_first",
    scene_style: str = "bold",
) -> tuple[torch.Tensor, list[str]]:
    """Clips ``indices`` of stream ``data_seed`` in ``scene_style``: ``(B, 3, F, H, W)`` in
    [-1, 1] and captions (in ``caption_order``, :func:`pasa.testbed.scene.caption`). A model's
    order and style are its config's (:meth:`pasa.testbed.model.TestbedConfig.data_settings`)."""
    check_caption_order(caption_order)  # before any rendering
    check_scene_style(scene_style)
    scenes = [make_scene(data_seed, int(i), frames=frames, style=scene_style) for i in indices]
    clips = [
        render(
            sc, frames=frames, height=height, width=width, device=device, supersample=supersample
        )
        for sc in scenes
    ]
    return torch.stack(clips), [caption(sc, caption_order) for sc in scenes]


def clip_indices(step: int, *, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Clip indices of training ``step`` on ``rank``: disjoint across ranks and steps, so a
    resumed or re-sharded run sees exactly the clips it would have seen."""
    first = (step * world_size + rank) * batch_size
    return list(range(first, first + batch_size))


class ProceduralVideos(IterableDataset):
    """Endless stream of ``(clip (3, F, H, W), caption)`` for a DataLoader.

    Clip ``k`` of the stream goes to rank ``k % world_size`` and, within a rank, to DataLoader
    worker ``(k // world_size) % num_workers``, so ranks and workers never repeat each other.

    Args:
        data_seed: the stream.
        rank, world_size: DDP position (``torch.distributed`` rank and world size).
        start: first clip index of the whole stream (for resuming).
        caption_order, scene_style: as :func:`make_batch`.
    """

    def __init__(
        self,
        data_seed: int,
        *,
        frames: int = 16,
        height: int = 256,
        width: int = 256,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        supersample: int = 1,
        caption_order: str = "scene_first",
        scene_style: str = "bold",
    ) -> None:
        super().__init__()
        self.caption_order = check_caption_order(caption_order)
        self.scene_style = check_scene_style(scene_style)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.data_seed, self.rank, self.world_size, self.start = data_seed, rank, world_size, start
        self.frames, self.height, self.width, self.supersample = frames, height, width, supersample

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        stride = self.world_size * workers
        k = self.start + self.rank + self.world_size * worker
        while True:
            scene = make_scene(self.data_seed, k, frames=self.frames, style=self.scene_style)
            clip = render(
                scene,
                frames=self.frames,
                height=self.height,
                width=self.width,
                supersample=self.supersample,
            )
            yield clip, caption(scene, self.caption_order)
            k += stride
