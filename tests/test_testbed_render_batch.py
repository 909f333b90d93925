"""render_batch: the same clips as render, bit for bit, whatever else shares the batch."""

import functools
from dataclasses import replace

import pytest
import torch

from pasa.testbed import rendering
from pasa.testbed.data import make_batch, render, render_batch
from pasa.testbed.scene import (
    BACKGROUNDS,
    PANS,
    SCENE_STYLES,
    SHAPES,
    TEXTURES,
    ZOOMS,
    Scene,
    make_scene,
)

SEED = 7
FRAMES = 8  # scenes are drawn for the frames rendered, so backgrounds turn within the clip


def _features(scene: Scene) -> set[tuple]:
    """What a batch must hold to exercise every branch of the renderer."""
    found = {
        ("background", scene.background.kind),
        ("objects", len(scene.objects)),
        ("pan", scene.pan),
        ("zoom", scene.zoom),
        ("turns", scene.background_to is not None),
    }
    for obj in scene.objects:
        found |= {("shape", obj.shape), ("texture", obj.texture.kind), ("motion", obj.motion)}
        found.add(("spins", obj.spin != 0))
    return found


@functools.cache
def _covering_indices(style: str) -> tuple[int, ...]:
    """Clip indices of stream SEED whose scenes, together, show every feature (greedy)."""
    look = SCENE_STYLES[style]
    lo, hi = look.objects
    wanted = (
        {("background", k) for k in BACKGROUNDS}
        | {("texture", k) for k in TEXTURES}
        | {("shape", s) for s in SHAPES}
        | {("motion", m) for m in ("still", "moves", "bounces")}
        | {("objects", n) for n in range(lo, hi + 1)}
        | {("pan", p) for p in PANS}
        | {("zoom", z) for z in ZOOMS}
        | {("turns", True), ("turns", False), ("spins", True), ("spins", False)}
    )
    if look.pins_orientation:  # what the diagnostic styles pin cannot vary
        wanted -= {("spins", True)}
    if look.pins_motion:
        wanted -= {("motion", "moves")}
    if look.pins_motion or look.steady:
        wanted -= {("motion", "bounces")}
    if look.pins_camera:
        wanted -= {("pan", p) for p in PANS if p != "none"} | {
            ("zoom", z) for z in ZOOMS if z != "none"
        }
    features = {i: _features(make_scene(SEED, i, frames=FRAMES, style=style)) for i in range(400)}
    chosen: list[int] = []
    missing = set(wanted)
    while missing:
        best = max(features, key=lambda i: len(features[i] & missing))
        if not features[best] & missing:
            break
        chosen.append(best)
        missing -= features[best]
    assert not missing, f"no clip among the first 400 shows {missing}"
    kinds = {k for what, k in wanted if what in ("texture", "background")}
    assert kinds >= {"solid", "striped", "checkered", "dotted", "noisy", "wavy"}
    return tuple(chosen)


def _scenes(style: str, indices=None) -> list[Scene]:
    indices = _covering_indices(style) if indices is None else indices
    return [make_scene(SEED, i, frames=FRAMES, style=style) for i in indices]


def _per_clip(scenes, **settings) -> torch.Tensor:
    return torch.stack([render(scene, frames=FRAMES, **settings) for scene in scenes])


@pytest.mark.parametrize("style", SCENE_STYLES)
def test_the_covering_batch_mixes_object_counts_and_covers_every_kind(style):
    scenes = _scenes(style)
    counts = {len(scene.objects) for scene in scenes}
    lo, hi = SCENE_STYLES[style].objects
    assert counts == set(range(lo, hi + 1))  # so later slots hold fewer clips than early ones


@pytest.mark.parametrize("supersample", [1, 2])
@pytest.mark.parametrize(("height", "width"), [(48, 64), (32, 32), (17, 23)])
@pytest.mark.parametrize("style", SCENE_STYLES)
def test_one_pass_over_the_batch_equals_one_render_per_clip(style, height, width, supersample):
    scenes = _scenes(style)
    settings = dict(height=height, width=width, supersample=supersample)
    batch = render_batch(scenes, frames=FRAMES, clips_per_pass=len(scenes), **settings)
    assert batch.shape == (len(scenes), 3, FRAMES, height, width)
    assert torch.equal(batch, _per_clip(scenes, **settings))  # bit for bit


@pytest.mark.parametrize("style", SCENE_STYLES)
def test_a_batch_of_one_and_passes_of_a_few_clips_equal_render(style):
    scenes = _scenes(style)
    settings = dict(frames=FRAMES, height=24, width=40, supersample=2)
    reference = _per_clip(scenes, height=24, width=40, supersample=2)
    for scene, clip in zip(scenes, reference, strict=True):
        assert torch.equal(render_batch([scene], **settings)[0], clip)
    for clips_per_pass in (None, 1, 3):  # None: the CPU's default, a clip a pass
        batch = render_batch(scenes, clips_per_pass=clips_per_pass, **settings)
        assert torch.equal(batch, reference)


def test_a_clip_does_not_depend_on_the_rest_of_its_batch():
    scenes = _scenes("original")
    by_count = sorted(scenes, key=lambda scene: len(scene.objects))
    a, b, c = by_count[0], by_count[len(by_count) // 2], by_count[-1]  # fewest to most objects
    settings = dict(frames=FRAMES, height=32, width=48, supersample=2)
    abc = render_batch([a, b, c], clips_per_pass=3, **settings)  # ranked c, b, a inside
    ca = render_batch([c, a], clips_per_pass=2, **settings)
    assert torch.equal(abc[2], ca[0]) and torch.equal(abc[0], ca[1])
    assert not torch.equal(abc[0], abc[2])


def test_make_batch_renders_what_render_renders():
    clips, captions = make_batch(range(5), data_seed=3, frames=4, height=24, width=32)
    scenes = [make_scene(3, i, frames=4) for i in range(5)]
    reference = torch.stack([render(sc, frames=4, height=24, width=32) for sc in scenes])
    assert torch.equal(clips, reference) and len(captions) == 5


def test_clips_without_objects_and_an_empty_batch():
    scenes = _scenes("bold")[:3]
    scenes[1] = replace(scenes[1], objects=())
    settings = dict(frames=FRAMES, height=16, width=24)
    for batch in ([scenes[1]], scenes):
        clips = render_batch(batch, clips_per_pass=len(batch), **settings)
        assert torch.equal(clips, _per_clip(batch, height=16, width=24))
    assert render_batch([], frames=3, height=8, width=8).shape == (0, 3, 3, 8, 8)
    with pytest.raises(ValueError, match="clips_per_pass must be at least 1"):
        render_batch(scenes, frames=3, height=8, width=8, clips_per_pass=0)


def test_a_pass_holds_the_whole_batch_off_the_cpu_and_one_clip_on_it(monkeypatch):
    passes = []
    one_pass = rendering._render_pass
    monkeypatch.setattr(
        rendering, "_render_pass", lambda sc, *a: passes.append(len(sc)) or one_pass(sc, *a)
    )
    scenes = _scenes("original")
    # The meta device computes shapes only: enough to run the code path of an accelerator.
    clips = render_batch(scenes, frames=FRAMES, height=32, width=48, device="meta", supersample=2)
    assert clips.shape == (len(scenes), 3, FRAMES, 32, 48) and clips.device.type == "meta"
    assert passes == [len(scenes)]
    passes.clear()
    render_batch(scenes, frames=2, height=8, width=8)
    assert passes == [1] * len(scenes)
