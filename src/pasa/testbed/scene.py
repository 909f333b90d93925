"""Procedural scenes: what a clip contains, drawn from a seed, and the caption that says so.

A :class:`Scene` is pure description (shapes, textures, colours, motion, camera, background);
:mod:`pasa.testbed.data` renders it. Every random draw comes from a ``torch.Generator`` on the CPU
seeded by ``(data_seed, index)`` through a fixed integer mix, so a clip is the same on every
machine, process and DDP rank, whatever device renders it.

World coordinates: the unit square ``[0, 1]^2`` is the first frame's view (x right, y down);
objects move in world units per frame; the camera's view is centred at ``center(t)`` and spans
``1 / zoom(t)`` world units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "orange": (0.95, 0.55, 0.10),
    "yellow": (0.95, 0.90, 0.15),
    "green": (0.15, 0.75, 0.20),
    "teal": (0.10, 0.60, 0.60),
    "blue": (0.15, 0.30, 0.90),
    "purple": (0.55, 0.20, 0.80),
    "pink": (0.95, 0.50, 0.75),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.50, 0.50, 0.50),
    "brown": (0.50, 0.30, 0.12),
    "black": (0.08, 0.08, 0.08),
}
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross", "ellipse")
TEXTURES = ("solid", "striped", "checkered", "dotted", "noisy")
BACKGROUNDS = ("striped", "checkered", "dotted", "noisy", "wavy")
DIRECTIONS = {
    "right": (1.0, 0.0),
    "left": (-1.0, 0.0),
    "down": (0.0, 1.0),
    "up": (0.0, -1.0),
    "up-right": (0.7071, -0.7071),
    "up-left": (-0.7071, -0.7071),
    "down-right": (0.7071, 0.7071),
    "down-left": (-0.7071, 0.7071),
}
PANS = ("none", "left", "right", "up", "down")
ZOOMS = ("none", "in", "out")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_ORDERS = ("objects_first", "scene_first")  # see caption()


@dataclass(frozen=True)
class SceneStyle:
    """How busy a clip is: how many objects, how big, and how strong the background's pattern.

    ``objects``: fewest and most objects; ``radius``: smallest and largest radius (world units,
    drawn log-uniform); ``small`` / ``big``: the radii below / above which a caption says
    "small" / "big"; ``background_contrast``: the background's second shade as a share of the
    full one (1: as strong as an object's pattern).
    """

    objects: tuple[int, int]
    radius: tuple[float, float]
    small: float
    big: float
    background_contrast: float
    upright: bool = False  # every object unrotated and not spinning
    still: bool = False  # upright and still under a still camera
    # upright under a still camera, each object still or moving in a straight line (a drawn
    # bounce moves instead) at STEADY_SPEED: its path is what its caption says
    steady: bool = False
    # How far from the frame's centre an object starts, as a share of its drawn offset from it:
    # 1 where it was drawn, 0 at the centre. Drawn offsets reach 0.625 on an axis (a moving
    # draw starts half its path before its middle), half of them 0.29, so 0.125 keeps every
    # object within 0.08 of the centre and most within 0.04.
    spread: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.spread <= 1.0:
            raise ValueError(f"spread must be in [0, 1], got {self.spread}")
        if self.spread != 1.0 and not (self.still or self.steady):
            raise ValueError(
                "a spread below 1 is for still or steady styles (a drawn path would leave)"
            )
        if self.still and self.steady:
            raise ValueError("a style is still or steady, not both")

    @property
    def pins_orientation(self) -> bool:
        """Every object unrotated and not spinning (``upright``, ``still`` or ``steady``)."""
        return self.upright or self.still or self.steady

    @property
    def pins_camera(self) -> bool:
        """The camera stays still (``still`` or ``steady``)."""
        return self.still or self.steady

    @property
    def pins_motion(self) -> bool:
        """Nothing moves: every object still, the camera too (``still``)."""
        return self.still


# "original": the data of runs 1-3 (3-8 objects, often small, on full-contrast backgrounds).
# "bold": the preset, and run 4's (the shipped run 5 mixes it with "solo"). Fewer and bigger
# objects on backgrounds at a third of the contrast; every texture kind stays, on objects and
# backgrounds alike. A 9M-parameter model trained on "original" denoises its objects well but
# samples only background texture (docs/testbed.md), because objects cover a few percent of the
# pixels and so of the loss.
SCENE_STYLES: dict[str, SceneStyle] = {
    "original": SceneStyle(objects=(3, 8), radius=(0.05, 0.17), small=0.075, big=0.12,
                           background_contrast=1.0),
    "bold": SceneStyle(objects=(2, 6), radius=(0.08, 0.22), small=0.11, big=0.155,
                       background_contrast=0.35),
    # bold with one to three objects: a caption's shape word has fewer objects to bind to
    "few": SceneStyle(objects=(1, 3), radius=(0.08, 0.22), small=0.11, big=0.155,
                      background_contrast=0.35),
    # one big object (a sixth of the frame on average): what its sentence says decides many pixels
    "solo": SceneStyle(objects=(1, 1), radius=(0.2, 0.32), small=0.23, big=0.28,
                       background_contrast=0.35),
    # diagnostics of the shape words (docs/testbed.md, "What a shape word could say"): solo with
    # the outline's orientation known; with orientation and motion known (nothing moves) but
    # the place not; near the frame's centre (spread 0.125 and 0.375); and
    # with orientation, place and motion all known
    "solo-upright": SceneStyle(objects=(1, 1), radius=(0.2, 0.32), small=0.23, big=0.28,
                               background_contrast=0.35, upright=True),
    "solo-still": SceneStyle(objects=(1, 1), radius=(0.2, 0.32), small=0.23, big=0.28,
                             background_contrast=0.35, still=True),
    "solo-near": SceneStyle(objects=(1, 1), radius=(0.2, 0.32), small=0.23, big=0.28,
                            background_contrast=0.35, still=True, spread=0.125),
    "solo-mid": SceneStyle(objects=(1, 1), radius=(0.2, 0.32), small=0.23, big=0.28,
                           background_contrast=0.35, still=True, spread=0.375),
    "solo-fixed": SceneStyle(objects=(1, 1), radius=(0.2, 0.32), small=0.23, big=0.28,
                             background_contrast=0.35, still=True, spread=0.0),
    # the object starts at the centre and moves (or stays) as its caption says at one speed, so
    # the caption fixes where it is in every frame
    "solo-from-centre": SceneStyle(objects=(1, 1), radius=(0.2, 0.32), small=0.23, big=0.28,
                                   background_contrast=0.35, steady=True, spread=0.0),
}  # fmt: skip
# A steady style's one speed (world units a frame): 0.225 of the frame over 16 frames.
STEADY_SPEED = 0.015


# A mixture draws each clip in one of its styles, picked by the clip's own seed (so the same on
# every machine and rank) with equal odds; its name joins the styles with "+". "bold+solo" keeps
# the busy clips the attention statistics come from and adds clips whose one big object covers a
# sixth of the frame (docs/testbed.md, "Pure noise").
# "bold+solo-from-centre" keeps the busy clips and adds clips whose caption fixes its one object's
# path, so a model with a position code can read the shape words (docs/testbed.md, "What a shape
# word could say").
STYLE_MIXES: dict[str, tuple[str, ...]] = {
    "bold+solo": ("bold", "solo"),
    "bold+solo-from-centre": ("bold", "solo-from-centre"),
}
_MIX_SALT = 0x5C3E  # mix_seed's salt for a mixture's pick, apart from the scene's own draws
SCENE_STYLE_NAMES = (*SCENE_STYLES, *STYLE_MIXES)


def check_scene_style(style: str, what: str = "scene_style") -> str:
    """``style`` if it names one of :data:`SCENE_STYLE_NAMES` (a style or a mixture), else
    ValueError naming ``what``."""
    if style not in SCENE_STYLE_NAMES:
        raise ValueError(f"{what} must be one of {SCENE_STYLE_NAMES}, got {style!r}")
    return style


def clip_style(data_seed: int, index: int, style: str) -> str:
    """The key of :data:`SCENE_STYLES` that clip ``index`` of stream ``data_seed`` is drawn in:
    ``style`` itself, or for a mixture the one of its styles this clip's seed picks."""
    parts = STYLE_MIXES.get(check_scene_style(style, "scene style"))
    if parts is None:
        return style
    return parts[mix_seed(data_seed, index, salt=_MIX_SALT) % len(parts)]


def check_caption_order(order: str, what: str = "caption_order") -> str:
    """``order`` if it is one of :data:`CAPTION_ORDERS`, else ValueError naming ``what``."""
    if order not in CAPTION_ORDERS:
        raise ValueError(f"{what} must be one of {CAPTION_ORDERS}, got {order!r}")
    return order


NOISE_CELLS = 24  # value-noise lattice per texture period (a fine, tileable texture)


@dataclass(frozen=True)
class Texture:
    """A two-colour pattern: ``kind`` in TEXTURES / BACKGROUNDS, ``freq`` periods per unit,
    ``angle`` of stripes / checks (radians), ``noise_seed`` for the noisy kind; ``second`` is
    ``contrast`` of the way from the named colour to its dark or light shade."""

    kind: str
    color: str
    second: tuple[float, float, float]
    freq: float
    angle: float
    noise_seed: int
    contrast: float = 1.0


@dataclass(frozen=True)
class SceneObject:
    """One shape. ``radius`` in world units; ``start`` is its centre at frame 0 (before
    bouncing); ``velocity`` world units per frame; ``spin`` radians per frame."""

    shape: str
    texture: Texture
    radius: float
    start: tuple[float, float]
    motion: str  # "still", "moves" or "bounces"
    direction: str
    speed: float
    angle: float
    spin: float

    @property
    def velocity(self) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        return (dx * self.speed, dy * self.speed) if self.motion != "still" else (0.0, 0.0)


@dataclass(frozen=True)
class Scene:
    """Everything one clip shows. Objects are listed back to front (later ones occlude)."""

    index: int
    background: Texture
    background_to: str | None  # colour the background turns to, or None
    change_frame: int
    objects: tuple[SceneObject, ...]
    pan: str
    pan_speed: float
    zoom: str
    zoom_rate: float
    style: str  # a key of SCENE_STYLES, never a mixture (the caption's size words depend on it)


def mix_seed(data_seed: int, index: int, salt: int = 0) -> int:
    """A 63-bit seed from ``(data_seed, index, salt)`` (splitmix64 finaliser, no Python hash)."""
    x = (data_seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + salt) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (x ^ (x >> 31)) & (2**63 - 1)


class _Draws:
    """Uniform draws from a pre-generated CPU block (one generator call per scene)."""

    def __init__(self, seed: int, n: int = 512) -> None:
        gen = torch.Generator().manual_seed(seed)
        self._u = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
        self._i = 0

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        u = self._u[self._i]
        self._i += 1
        return lo + (hi - lo) * u

    def choice(self, options):
        return options[min(int(self.uniform() * len(options)), len(options) - 1)]

    def integer(self, lo: int, hi: int) -> int:
        """Uniform in ``[lo, hi]`` inclusive."""
        return min(lo + int(self.uniform() * (hi - lo + 1)), hi)


def _texture(draws: _Draws, kinds: tuple[str, ...], exclude: str | None = None) -> Texture:
    names = [c for c in COLORS if c != exclude]
    color = draws.choice(names)
    base = COLORS[color]
    # The second colour is a dark or a light shade of the first, so the named colour dominates.
    if draws.uniform() < 0.5:
        second = tuple(0.3 * c for c in base)
    else:
        second = tuple(c + 0.6 * (1.0 - c) for c in base)
    if color in ("black", "brown"):
        second = tuple(c + 0.5 * (1.0 - c) for c in base)
    return Texture(
        kind=draws.choice(kinds),
        color=color,
        second=second,  # type: ignore[arg-type]
        freq=math.exp(draws.uniform(math.log(6.0), math.log(28.0))),
        angle=draws.uniform(0.0, math.pi),
        noise_seed=draws.integer(0, 2**31 - 1),
    )


def make_scene(data_seed: int, index: int, *, frames: int = 16, style: str = "bold") -> Scene:
    """The scene of clip ``index`` of the stream ``data_seed`` in ``style`` (:data:`SCENE_STYLES`;
    a model's is its config's ``scene_style``). The styles make the same draws in the same order:
    clip ``index`` has the same background and its first objects the same shapes, textures and
    motion in each; the styles differ in the number and size of the objects (so in the draws
    after them: the camera) and in the background's contrast. A mixture (:data:`STYLE_MIXES`)
    draws the clip in the style :func:`clip_style` picks, and the scene records that style."""
    style = clip_style(data_seed, index, style)
    look = SCENE_STYLES[style]
    draws = _Draws(mix_seed(data_seed, index))
    background = _texture(draws, BACKGROUNDS)
    if look.background_contrast != 1.0:
        c = look.background_contrast
        base = COLORS[background.color]
        second = tuple(b + c * (s - b) for b, s in zip(base, background.second, strict=True))
        background = replace(background, second=second, contrast=c)
    background_to = None
    if draws.uniform() < 0.3:
        background_to = draws.choice([c for c in COLORS if c != background.color])
    change_frame = draws.integer(2, max(2, frames - 4))
    objects = []
    for _ in range(draws.integer(*look.objects)):
        texture = _texture(draws, TEXTURES, exclude=background.color)
        radius = math.exp(draws.uniform(math.log(look.radius[0]), math.log(look.radius[1])))
        motion = draws.choice(("still", "moves", "moves", "bounces", "bounces"))
        direction = draws.choice(tuple(DIRECTIONS))
        speed = draws.uniform(0.006, 0.03)
        middle = (draws.uniform(0.1, 0.9), draws.uniform(0.1, 0.9))
        dx, dy = DIRECTIONS[direction]
        if motion == "moves":  # centred on the clip's middle frame, so it stays mostly in view
            half = speed * (frames - 1) / 2
            start = (middle[0] - dx * half, middle[1] - dy * half)
        else:
            start = middle
        spin = draws.uniform(0.04, 0.15) * draws.choice((-1.0, 1.0))
        objects.append(
            SceneObject(
                shape=draws.choice(SHAPES),
                texture=texture,
                radius=radius,
                start=start,
                motion=motion,
                direction=direction,
                speed=speed,
                angle=draws.uniform(0.0, 2 * math.pi),
                spin=spin if draws.uniform() < 0.3 else 0.0,
            )
        )
    pan = draws.choice(PANS)
    zoom = draws.choice(ZOOMS)
    if look.pins_orientation:  # after every draw: the others stay as drawn
        objects = [replace(o, angle=0.0, spin=0.0) for o in objects]
    if look.pins_motion:
        objects = [replace(o, motion="still") for o in objects]
    if look.steady:
        objects = [replace(o, motion="still" if o.motion == "still" else "moves",
                           speed=STEADY_SPEED) for o in objects]  # fmt: skip
    if look.pins_camera:
        pan, zoom = "none", "none"
    if look.spread != 1.0:
        objects = [replace(o, start=tuple(0.5 + look.spread * (v - 0.5) for v in o.start))
                   for o in objects]  # fmt: skip
    return Scene(
        index=index,
        background=background,
        background_to=background_to,
        change_frame=change_frame,
        objects=tuple(objects),
        pan=pan,
        pan_speed=draws.uniform(0.008, 0.025) if pan != "none" else 0.0,
        zoom=zoom,
        zoom_rate={"none": 0.0, "in": 1.0, "out": -1.0}[zoom] * draws.uniform(0.015, 0.035),
        style=style,
    )


def _size_word(radius: float, style: str) -> str:
    look = SCENE_STYLES[style]
    return "small " if radius < look.small else ("big " if radius > look.big else "")


def describe_object(obj: SceneObject, style: str) -> str:
    """``"a big red striped circle bounces up-left and spins"`` (size words of ``style``)."""
    texture = "" if obj.texture.kind == "solid" else obj.texture.kind + " "
    what = f"{_size_word(obj.radius, style)}{obj.texture.color} {texture}{obj.shape}"
    act = "stays still" if obj.motion == "still" else f"{obj.motion} {obj.direction}"
    spin = " and spins" if obj.spin else ""
    return f"a {what} {act}{spin}"


def caption(scene: Scene, order: str = "scene_first") -> str:
    """What the clip shows, in words the hashed text encoder sees (lower case, fixed grammar):
    the objects front to back, and the count, camera and background.

    ``order="scene_first"`` (new training runs): the count, camera and background first,
    ``"two shapes. the camera pans right and zooms in over a checkered green background that
    turns yellow. a red striped circle bounces left. a small blue dotted square stays still."``;
    ``"objects_first"`` (runs 1 and 2): the same sentences with the objects first.

    With the scene first its words (the background's colour above all, what the model needs most
    from the text at high noise) stand at nearly the same positions in every caption; a small
    model trained on CPU learned to use whole captions sooner and more that way
    (``benchmarks/testbed_caption_experiment.py``, variant ``bigram_scene_first``). A checkpoint
    records its order (``TestbedConfig.caption_order``); evaluate it with the same.
    """
    check_caption_order(order, "caption order")
    camera = []
    if scene.pan != "none":
        camera.append(f"pans {scene.pan}")
    if scene.zoom != "none":
        camera.append(f"zooms {scene.zoom}")
    camera_text = " and ".join(camera) if camera else "stays still"
    bg = scene.background
    turn = f" that turns {scene.background_to}" if scene.background_to else ""
    parts = [
        f"{NUMBERS[len(scene.objects)]} shape{'' if len(scene.objects) == 1 else 's'}. "
        f"the camera {camera_text} over a "
        f"{bg.kind} {bg.color} background{turn}."
    ]
    objects = [describe_object(o, scene.style) + "." for o in reversed(scene.objects)]
    return " ".join(parts + objects if order == "scene_first" else objects + parts)
