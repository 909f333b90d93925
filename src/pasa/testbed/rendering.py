"""Rendering procedural clips: one at a time (:func:`render`) or many at once (:func:`render_batch`).

A clip is a float tensor ``(C=3, F, H, W)`` in ``[-1, 1]``; a batch is ``(B, 3, F, H, W)``. Clip
``index`` of stream ``data_seed`` is the same whatever process, rank or device renders it, and
whatever other clips share its batch (its scene is drawn on the CPU, :mod:`pasa.testbed.scene`;
rendering is vectorised over frames and pixels, with anti-aliased edges and patterns).
:func:`render` draws one clip, one pass per object; :func:`render_batch` draws many at once, one
pass per object slot (object ``k`` of every clip), with the same numbers: both use the helpers
below, which take Python numbers for one clip or object and ``(G, 1, 1, 1)`` tensors (one row
each) for a group of them. Textures live in world coordinates (background) or object coordinates
(shapes), so they move with the camera and with the objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from pasa.testbed.scene import COLORS, NOISE_CELLS, Scene, SceneObject, Texture

__all__ = ["pattern", "render", "render_batch"]

# A parameter is a Python number for one clip or object, or a (G, 1, 1, 1) tensor for a group of
# G (one row each). Every per-item number is worked out in Python and rounded to float32 once,
# when it meets a tensor (as a Python scalar operand of a float32 op is) or in _columns, so a
# group computes exactly the per-item numbers, bit for bit.
Param = float | torch.Tensor

_PAN_DIRECTIONS = {"none": (0, 0), "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# The lengths each signed distance needs, in radii (see _sdf).
_SDF_LENGTHS = {
    "circle": (1.0,),
    "square": (0.85,),
    "diamond": (1.2,),
    "triangle": (0.5,),
    "ring": (0.7, 0.3),
    "cross": (1.0, 0.33),
    "ellipse": (1.0, 0.6),
}


def _square_wave(phase: torch.Tensor, period_px: Param) -> torch.Tensor:
    """Anti-aliased 0/1 square wave of ``sin(phase)``, edges about one pixel wide.

    Args:
        phase: radians; one period is ``period_px`` pixels long (broadcastable).
    """
    s = torch.sin(phase)
    return (0.5 + s * period_px / (2 * math.pi)).clamp(0.0, 1.0)


def _lattice(seeds: Sequence[int]) -> torch.Tensor:
    """``(G, 1, NOISE_CELLS + 1, NOISE_CELLS + 1)`` value-noise lattices on the CPU, one per seed
    (the last row and column repeat the first, so the noise wraps seamlessly)."""
    cells = [
        torch.rand(1, NOISE_CELLS, NOISE_CELLS, generator=torch.Generator().manual_seed(seed))
        for seed in seeds
    ]
    return F.pad(torch.stack(cells), (0, 1, 0, 1), mode="circular")


def _noise(x: torch.Tensor, y: torch.Tensor, lattice: torch.Tensor) -> torch.Tensor:
    """Tileable bilinear value noise in [0, 1]; one lattice cell per unit of ``x`` and ``y``.

    Args:
        x, y: ``(F, H, W)`` for one lattice, or ``(G, F, H, W)`` for G.
        lattice: ``(G, 1, NOISE_CELLS + 1, NOISE_CELLS + 1)`` (:func:`_lattice`).
    """
    lattice = lattice.to(x.device)
    gx = torch.remainder(x, NOISE_CELLS) / NOISE_CELLS * 2 - 1
    gy = torch.remainder(y, NOISE_CELLS) / NOISE_CELLS * 2 - 1
    grid = torch.stack([gx, gy], -1).reshape(len(lattice), -1, x.shape[-1], 2).float()
    value = F.grid_sample(lattice, grid, mode="bilinear", align_corners=True)
    return ((value.reshape(x.shape) - 0.5) * 2.2 + 0.5).clamp(0.0, 1.0)


def _pattern_axes(
    x: torch.Tensor, y: torch.Tensor, px: torch.Tensor, cos: Param, sin: Param, freq: Param
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pattern's own coordinates: ``a, b`` (``(..., F, H, W)``) in periods along and across
    its axis, and the period in pixels (``(..., F, 1, 1)``).

    Args:
        x, y: coordinates in the pattern's frame (world or object units) that broadcast to
            ``(..., F, H, W)``: ``(F, 1, W)`` and ``(F, H, 1)`` say, or ``(G, F, H, W)`` each.
        px: ``(..., F, 1, 1)`` size of one pixel in the same units (for anti-aliasing).
        cos, sin: of the pattern's angle; freq: periods per unit (parameters, see ``Param``).
    """
    a = (x * cos + y * sin) * freq
    b = (-x * sin + y * cos) * freq
    return a, b, 1.0 / (freq * px)


def _pattern_value(
    kind: str,
    a: torch.Tensor,
    b: torch.Tensor,
    period_px: torch.Tensor,
    lattice: torch.Tensor | None = None,
) -> torch.Tensor:
    """Value in [0, 1] (1 = the named colour) of a pattern of ``kind`` at its coordinates
    (:func:`_pattern_axes`); ``lattice``: the noisy kind's (:func:`_lattice`)."""
    if kind == "solid":
        return torch.ones_like(a)
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
        if lattice is None:
            raise ValueError("a noisy texture needs its lattice")
        return _noise(a * 2, b * 2, lattice)
    raise ValueError(f"unknown texture kind {kind!r}")


def pattern(texture: Texture, x: torch.Tensor, y: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """Pattern value in [0, 1] (1 = the named colour) of ``texture`` at coordinates ``x, y``.

    Args:
        x, y: coordinates in the pattern's frame (world or object units) that broadcast to
            ``(F, H, W)``.
        px: ``(F, 1, 1)`` size of one pixel in the same units (for anti-aliasing).
    """
    if texture.kind == "solid":  # no coordinates to work out
        return x.new_ones(torch.broadcast_shapes(x.shape, y.shape))
    cos, sin = math.cos(texture.angle), math.sin(texture.angle)
    lattice = _lattice([texture.noise_seed]) if texture.kind == "noisy" else None
    axes = _pattern_axes(x, y, px, cos, sin, texture.freq)
    return _pattern_value(texture.kind, *axes, lattice)


def _sdf_lengths(shape: str, r: float) -> tuple[float, ...]:
    """The lengths (world units) that :func:`_sdf` of ``shape`` of radius ``r`` needs."""
    if shape not in _SDF_LENGTHS:
        raise ValueError(f"unknown shape {shape!r}")
    return tuple(k * r for k in _SDF_LENGTHS[shape])


def _sdf(shape: str, lx: torch.Tensor, ly: torch.Tensor, lengths: Sequence[Param]) -> torch.Tensor:
    """Signed distance (world units, negative inside) of ``shape`` at object coordinates
    ``lx, ly`` (``(..., F, H, W)``); ``lengths`` are :func:`_sdf_lengths` (parameters)."""
    ax, ay = lx.abs(), ly.abs()
    if shape == "circle":
        (r,) = lengths
        return torch.sqrt(lx * lx + ly * ly) - r
    if shape == "square":
        (half,) = lengths
        return torch.maximum(ax, ay) - half
    if shape == "diamond":
        (reach,) = lengths
        return (ax + ay - reach) * 0.7071
    if shape == "triangle":  # pointing up (y grows downwards)
        (half,) = lengths
        return torch.maximum(ly - half, (1.7321 * ax - ly) * 0.5 - half)
    if shape == "ring":
        (middle, half) = lengths
        return (torch.sqrt(lx * lx + ly * ly) - middle).abs() - half
    if shape == "cross":
        arm, bar = lengths
        return torch.minimum(torch.maximum(ax - arm, ay - bar), torch.maximum(ax - bar, ay - arm))
    if shape == "ellipse":
        a, b = lengths
        return (torch.sqrt((lx / a) ** 2 + (ly / b) ** 2) - 1.0) * 0.6 * a
    raise ValueError(f"unknown shape {shape!r}")


def _coverage(sdf: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of a shape of signed distance ``sdf``, pixels ``px``."""
    return (0.5 - sdf / px).clamp(0.0, 1.0)


def _bounce(pos: torch.Tensor, lo: Param, span: Param) -> torch.Tensor:
    """Reflect positions into ``[lo, lo + span]`` (a triangle wave: elastic bounces off walls)."""
    q = torch.remainder(pos - lo, 2 * span)
    return lo + torch.where(q < span, q, 2 * span - q)


class _Motion(NamedTuple):
    """How an object moves (parameters, see ``Param``; ``bounces`` a bool or a bool tensor):
    centre at frame 0 (before bouncing), velocity (world units per frame), angle (radians) and
    spin (radians per frame), radius, and the room it bounces in across and down."""

    start_x: Param
    start_y: Param
    velocity_x: Param
    velocity_y: Param
    angle: Param
    spin: Param
    radius: Param
    span_x: Param
    span_y: Param
    bounces: bool | torch.Tensor


def _motion(obj: SceneObject, aspect: float) -> _Motion:
    """``obj``'s :class:`_Motion` as Python numbers, in a view ``aspect`` high per unit wide."""
    vx, vy = obj.velocity
    r = obj.radius
    span_x, span_y = max(1.0 - r - r, 1e-6), max(aspect - r - r, 1e-6)
    bounces = obj.motion == "bounces"
    return _Motion(*obj.start, vx, vy, obj.angle, obj.spin, r, span_x, span_y, bounces)


def _bounced(pos: torch.Tensor, m: _Motion, span: Param) -> torch.Tensor:
    """``pos`` kept between the walls ``m.radius`` from the view's edges where ``m.bounces``."""
    if isinstance(m.bounces, torch.Tensor):
        return torch.where(m.bounces, _bounce(pos, m.radius, span), pos)
    return _bounce(pos, m.radius, span) if m.bounces else pos


def _object_frame(
    x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, m: _Motion
) -> tuple[torch.Tensor, torch.Tensor]:
    """Object coordinates ``lx, ly`` (``(..., F, H, W)``) of the pixels at world coordinates
    ``x`` (``(..., F, 1, W)``) and ``y`` (``(..., F, H, 1)``) in frames ``t`` (``(F, 1, 1)``)."""
    cx = _bounced(m.start_x + m.velocity_x * t, m, m.span_x)  # (..., F, 1, 1)
    cy = _bounced(m.start_y + m.velocity_y * t, m, m.span_y)
    angle = m.angle + m.spin * t
    cos, sin = torch.cos(angle), torch.sin(angle)
    dx, dy = x - cx, y - cy
    return dx * cos + dy * sin, -dx * sin + dy * cos


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


def _background_colours(scene: Scene) -> tuple[torch.Tensor, ...]:
    """``(3,)`` named colour and second shade of the background, then the ones it turns to
    (the same again if it keeps its colour)."""
    before = _colour(scene.background)
    if scene.background_to is None:
        return before + before
    return before + _colour(scene.background, scene.background_to)


def _blend(
    base: torch.Tensor,
    second: torch.Tensor,
    new_base: torch.Tensor,
    new_second: torch.Tensor,
    t: torch.Tensor,
    change_frame: Param,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two colours at frames ``t`` (``(F, 1, 1)``), turning into the new ones over three
    frames from ``change_frame``: ``(..., 3, 1, 1, 1)`` colours to ``(..., 3, F, 1, 1)``."""
    mix = ((t - change_frame) / 3).clamp(0.0, 1.0).unsqueeze(-4)  # (..., 1, F, 1, 1)
    return base + (new_base - base) * mix, second + (new_second - second) * mix


def _shade(base: torch.Tensor, second: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Colours ``(..., 3, F, H, W)`` of a pattern ``value`` (``(..., 1, F, H, W)`` or
    ``(F, H, W)``) between ``second`` (0) and ``base`` (1), both ``(..., 3, F or 1, 1, 1)``."""
    return ((base - second) * value).add_(second)  # second + ..., in one new tensor


def _paint(image: torch.Tensor, colour: torch.Tensor, alpha: torch.Tensor) -> None:
    """Paint ``colour`` over ``image`` (both ``(..., 3, F, H, W)``) where ``alpha`` covers it,
    in place: ``image + (colour - image) * alpha``. Overwrites ``colour``."""
    image.add_(colour.sub_(image).mul_(alpha))


def _camera_numbers(scene: Scene) -> tuple[float, float, float]:
    """The camera's zoom rate (log zoom per frame) and pan velocities across and down."""
    dx, dy = _PAN_DIRECTIONS[scene.pan]
    return scene.zoom_rate, dx * scene.pan_speed, dy * scene.pan_speed


def _camera(
    t: torch.Tensor, zoom_rate: Param, pan_x: Param, pan_y: Param, h: int, w: int, aspect: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """World coordinates of the centres of an ``h x w`` view's pixels in frames ``t``
    (``(F, 1, 1)``): ``x`` ``(..., F, 1, W)``, ``y`` ``(..., F, H, 1)`` and the size of a pixel
    ``(..., F, 1, 1)`` (``...`` is ``(G,)`` for ``(G, 1, 1, 1)`` camera parameters)."""
    zoom = torch.exp(zoom_rate * t)
    cx = 0.5 + pan_x * t
    cy = 0.5 * aspect + pan_y * t
    u = (torch.arange(w, device=t.device, dtype=torch.float32) + 0.5) / w - 0.5  # (W,)
    v = ((torch.arange(h, device=t.device, dtype=torch.float32) + 0.5) / h - 0.5) * aspect
    x = cx + u.view(1, 1, -1) / zoom
    y = cy + v.view(1, -1, 1) / zoom
    return x, y, 1.0 / (w * zoom)


def _finish(image: torch.Tensor, supersample: int) -> torch.Tensor:
    """Colours ``(..., H * s, W * s)`` in [0, 1], area-averaged down by ``s = supersample``, as
    ``(..., H, W)`` in [-1, 1]."""
    if supersample > 1:
        *lead, h, w = image.shape
        pooled = F.avg_pool2d(image.reshape(-1, 1, h, w), supersample)
        image = pooled.reshape(*lead, h // supersample, w // supersample)
    return (image * 2 - 1).clamp(-1.0, 1.0)


def _object_layer(
    obj: SceneObject,
    x: torch.Tensor,
    y: torch.Tensor,
    px: torch.Tensor,
    t: torch.Tensor,
    aspect: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(3, F, H, W)`` colour and ``(F, H, W)`` coverage of one object; ``x``, ``y``, ``px``
    as :func:`_camera` returns them."""
    lx, ly = _object_frame(x, y, t, _motion(obj, aspect))
    alpha = _coverage(_sdf(obj.shape, lx, ly, _sdf_lengths(obj.shape, obj.radius)), px)
    value = pattern(obj.texture, lx, ly, px)
    base, second = (c.to(x.device).view(3, 1, 1, 1) for c in _colour(obj.texture))
    return _shade(base, second, value), alpha


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
    One clip, one object at a time: :func:`render_batch` renders many clips faster, the same.
    """
    s = int(supersample)
    aspect = height / width
    t = torch.arange(frames, device=device, dtype=torch.float32).view(-1, 1, 1)  # (F, 1, 1)
    x, y, px = _camera(t, *_camera_numbers(scene), height * s, width * s, aspect)

    bg = scene.background
    base, second = (c.to(device).view(3, 1, 1, 1) for c in _colour(bg))
    if scene.background_to is not None:  # blend to the new colour over three frames
        new = (c.to(device).view(3, 1, 1, 1) for c in _colour(bg, scene.background_to))
        base, second = _blend(base, second, *new, t, scene.change_frame)
    image = _shade(base, second, pattern(bg, x, y, px))  # (3, F, H, W)
    for obj in scene.objects:  # back to front: later objects occlude earlier ones
        _paint(image, *_object_layer(obj, x, y, px, t, aspect))
    return _finish(image, s)


class _Group(NamedTuple):
    """Items (clips or objects) of one shape or texture ``kind``, and their parameters."""

    kind: str
    where: torch.Tensor | slice  # (G,) their rows among all items; slice(None) if all of them
    numbers: torch.Tensor | None = None  # (P, G, 1, 1, 1) float32 (shapes: _sdf_lengths)
    lattice: torch.Tensor | None = None  # (G, 1, C + 1, C + 1) noise lattices (noisy textures)


class _Textures(NamedTuple):
    """The textures of a batch's backgrounds or of a slot's objects."""

    numbers: torch.Tensor  # (3, G, 1, 1, 1): cos and sin of each one's angle, its frequency
    kinds: list[_Group]


class _Slot(NamedTuple):
    """Object ``k`` of each of the first ``size`` clips (clips ranked by object count)."""

    size: int
    motion: _Motion  # (size, 1, 1, 1) tensors
    colours: torch.Tensor  # (2, size, 3, 1, 1, 1): named colour, second shade
    shapes: list[_Group]
    textures: _Textures


class _Plan(NamedTuple):
    """What :func:`render_batch` draws, as tensors, clips ranked by object count (most first)."""

    camera: torch.Tensor  # (4, B, 1, 1, 1): zoom rate, pan velocities, background change frame
    colours: torch.Tensor  # (4, B, 3, 1, 1, 1): the background's (_background_colours)
    backgrounds: _Textures
    slots: list[_Slot]  # slot k: object k of the clips that have one, back to front
    unrank: torch.Tensor | slice  # (B,) each clip's place among the ranked; slice(None) if same


def _columns(rows: Sequence[Sequence[float]]) -> torch.Tensor:
    """``(P, G, 1, 1, 1)`` float32 parameters from ``G`` rows of ``P`` Python numbers."""
    return torch.tensor(rows, dtype=torch.float32).T.reshape(-1, len(rows), 1, 1, 1)


def _stack_colours(colours: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """``(K, G, 3, 1, 1, 1)`` from ``G`` items' ``K`` ``(3,)`` colours each."""
    return torch.stack([torch.stack(tuple(c)) for c in colours], 1)[..., None, None, None]


def _group_by(kinds: Sequence[str]) -> Iterator[tuple[str, list[int], torch.Tensor | slice]]:
    """Each kind among ``kinds`` (first seen first), its items' rows, and where they are (a
    ``(G,)`` tensor, or ``slice(None)`` when one kind holds every row)."""
    rows: dict[str, list[int]] = {}
    for i, kind in enumerate(kinds):
        rows.setdefault(kind, []).append(i)
    for kind, mine in rows.items():
        yield kind, mine, slice(None) if len(rows) == 1 else torch.tensor(mine)


def _shape_groups(objects: Sequence[SceneObject]) -> list[_Group]:
    """``objects`` grouped by shape, with their :func:`_sdf_lengths`."""
    return [
        _Group(shape, where, _columns([_sdf_lengths(shape, objects[i].radius) for i in rows]))
        for shape, rows, where in _group_by([o.shape for o in objects])
    ]


def _textures_of(textures: Sequence[Texture]) -> _Textures:
    """The :class:`_Textures` of ``textures``, grouped by kind."""
    numbers = _columns([(math.cos(tex.angle), math.sin(tex.angle), tex.freq) for tex in textures])
    kinds = []
    for kind, rows, where in _group_by([tex.kind for tex in textures]):
        noisy = kind == "noisy"
        lattice = _lattice([textures[i].noise_seed for i in rows]) if noisy else None
        kinds.append(_Group(kind, where, lattice=lattice))
    return _Textures(numbers, kinds)


def _slot(objects: Sequence[SceneObject], aspect: float) -> _Slot:
    """The :class:`_Slot` of ``objects`` (object ``k`` of each clip that has one)."""
    motions = [_motion(obj, aspect) for obj in objects]
    bounces = torch.tensor([m.bounces for m in motions]).view(-1, 1, 1, 1)
    return _Slot(
        size=len(objects),
        motion=_Motion(*_columns([m[:-1] for m in motions]), bounces),
        colours=_stack_colours([_colour(obj.texture) for obj in objects]),
        shapes=_shape_groups(objects),
        textures=_textures_of([obj.texture for obj in objects]),
    )


def _plan(scenes: Sequence[Scene], aspect: float) -> _Plan:
    """The :class:`_Plan` of ``scenes`` (on the CPU)."""
    order = sorted(range(len(scenes)), key=lambda i: -len(scenes[i].objects))  # stable
    ranked = [scenes[i] for i in order]
    slots = [
        _slot([sc.objects[k] for sc in ranked if len(sc.objects) > k], aspect)
        for k in range(len(ranked[0].objects))
    ]
    return _Plan(
        camera=_columns([(*_camera_numbers(sc), sc.change_frame) for sc in ranked]),
        colours=_stack_colours([_background_colours(sc) for sc in ranked]),
        backgrounds=_textures_of([sc.background for sc in ranked]),
        slots=slots,
        unrank=slice(None) if order == sorted(order) else torch.tensor(order).argsort(),
    )


def _to_device(plan: _Plan, device: torch.device | str) -> _Plan:
    """``plan`` with its tensors on ``device``, moved in one copy per dtype (each copy from the
    CPU waits for the device to finish the work queued before it)."""
    if torch.device(device).type == "cpu":
        return plan
    leaves, spec = tree_flatten(plan)
    at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    for dtype in {leaves[i].dtype for i in at}:
        mine = [i for i in at if leaves[i].dtype == dtype]
        flat = torch.cat([leaves[i].reshape(-1) for i in mine]).to(device)
        for i, part in zip(mine, flat.split([leaves[i].numel() for i in mine]), strict=True):
            leaves[i] = part.view(leaves[i].shape)
    return tree_unflatten(leaves, spec)


def _per_group(
    groups: Sequence[_Group], size: int, compute: Callable[[_Group], torch.Tensor]
) -> torch.Tensor:
    """``compute(group)`` (``(G, ...)``) of each group, put together as ``(size, ...)`` in the
    items' order."""
    if len(groups) == 1:  # it holds every item, in order
        return compute(groups[0])
    out = None
    for group in groups:
        part = compute(group)
        if out is None:
            out = part.new_empty((size, *part.shape[1:]))
        out[group.where] = part
    return out


def _shape_sdf(shapes: Sequence[_Group], lx: torch.Tensor, ly: torch.Tensor) -> torch.Tensor:
    """``(G, F, H, W)`` signed distances of ``shapes`` at their objects' coordinates ``lx, ly``
    (one row each)."""
    return _per_group(shapes, len(lx), lambda g: _sdf(g.kind, lx[g.where], ly[g.where], g.numbers))


def _texture_values(
    textures: _Textures, a: torch.Tensor, b: torch.Tensor, period_px: torch.Tensor
) -> torch.Tensor:
    """``(G, F, H, W)`` pattern values of ``textures`` at their :func:`_pattern_axes` (one row
    of ``a``, ``b`` and ``period_px`` each)."""
    return _per_group(
        textures.kinds,
        len(a),
        lambda g: _pattern_value(g.kind, a[g.where], b[g.where], period_px[g.where], g.lattice),
    )


def _slot_layer(
    x: torch.Tensor, y: torch.Tensor, px: torch.Tensor, t: torch.Tensor, slot: _Slot
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, F, H, W)`` pattern values and coverage of ``slot``'s objects, in the view of
    its ``n`` clips (``x``, ``y``, ``px`` as :func:`_camera` returns them)."""
    lx, ly = _object_frame(x, y, t, slot.motion)  # (n, F, H, W)
    alpha = _coverage(_shape_sdf(slot.shapes, lx, ly), px)
    axes = _pattern_axes(lx, ly, px, *slot.textures.numbers)
    del lx, ly  # two (n, F, H, W) tensors fewer while the textures are drawn
    return _texture_values(slot.textures, *axes), alpha


def _render_pass(
    scenes: Sequence[Scene],
    frames: int,
    height: int,
    width: int,
    device: torch.device | str,
    supersample: int,
) -> torch.Tensor:
    """:func:`render_batch` of ``scenes`` (at least one) in one pass."""
    s = int(supersample)
    aspect = height / width
    plan = _to_device(_plan(scenes, aspect), device)
    t = torch.arange(frames, device=device, dtype=torch.float32).view(-1, 1, 1)  # (F, 1, 1)
    zoom_rate, pan_x, pan_y, change_frame = plan.camera
    x, y, px = _camera(t, zoom_rate, pan_x, pan_y, height * s, width * s, aspect)

    axes = _pattern_axes(x, y, px, *plan.backgrounds.numbers)
    value = _texture_values(plan.backgrounds, *axes)
    # Every clip blends: a colour that turns into itself stays exactly as it was.
    base, second = _blend(*plan.colours, t, change_frame)  # (B, 3, F, 1, 1)
    image = _shade(base, second, value.unsqueeze(1))  # (B, 3, F, H, W)
    del axes, value
    for slot in plan.slots:  # back to front: later objects occlude earlier ones
        n = slot.size
        value, alpha = _slot_layer(x[:n], y[:n], px[:n], t, slot)
        base, second = slot.colours
        _paint(image[:n], _shade(base, second, value.unsqueeze(1)), alpha.unsqueeze(1))
        del value, alpha
    return _finish(image, s)[plan.unrank]


def render_batch(
    scenes: Sequence[Scene],
    *,
    frames: int = 16,
    height: int = 256,
    width: int = 256,
    device: torch.device | str = "cpu",
    supersample: int = 1,
    clips_per_pass: int | None = None,
) -> torch.Tensor:
    """Render ``scenes`` as a ``(B, 3, frames, height, width)`` float32 batch in ``[-1, 1]``:
    ``torch.stack([render(scene, ...) for scene in scenes])``, the same numbers (bit for bit
    on the CPU, where the tests compare them), in fewer and bigger steps.

    A pass renders ``clips_per_pass`` clips together (default: all of them on an accelerator,
    where a batch of small kernels costs more in launches than in work; one on the CPU, where
    batched tensors outgrow the cache and cost more than the launches they save). It draws the
    camera and background of every clip at once (the patterns grouped by texture kind), then,
    slot by slot, back to front, object ``k`` of every clip that has one (shapes and textures
    grouped by kind). Clips are ranked by object count, most first, so that slot ``k``'s clips
    lead the batch (views, not copies), and put back in order at the end. Memory: at most about
    ten float32 tensors of ``(clips_per_pass, F, H * s, W * s)`` (three of them the image),
    whatever the number of objects.
    """
    if clips_per_pass is None:
        clips_per_pass = 1 if torch.device(device).type == "cpu" else max(len(scenes), 1)
    if clips_per_pass < 1:
        raise ValueError(f"clips_per_pass must be at least 1, got {clips_per_pass}")
    if not scenes:
        return torch.empty(0, 3, frames, height, width, device=device)
    passes = [
        _render_pass(scenes[i : i + clips_per_pass], frames, height, width, device, supersample)
        for i in range(0, len(scenes), clips_per_pass)
    ]
    return passes[0] if len(passes) == 1 else torch.cat(passes)
