"""Procedural clips: determinism, shapes, captions that say what the clip shows, DDP sharding."""

import itertools
from dataclasses import replace

import pytest
import torch

from pasa.testbed.data import ProceduralVideos, clip_indices, make_batch, render
from pasa.testbed.scene import (
    COLORS,
    NUMBERS,
    SCENE_STYLES,
    STEADY_SPEED,
    STYLE_MIXES,
    caption,
    clip_style,
    make_scene,
)
from pasa.testbed.text import tokenize


def test_same_index_same_clip_and_caption():
    a, ca = make_batch([3, 7], data_seed=5, frames=4, height=32, width=32)
    b, cb = make_batch([3, 7], data_seed=5, frames=4, height=32, width=32)
    assert torch.equal(a, b) and ca == cb
    c, cc = make_batch([3, 7], data_seed=6, frames=4, height=32, width=32)
    assert not torch.equal(a, c) and ca != cc


def test_shape_range_and_motion():
    clips, captions = make_batch(range(3), data_seed=0, frames=5, height=48, width=64)
    assert clips.shape == (3, 3, 5, 48, 64) and clips.dtype == torch.float32
    assert clips.min() >= -1 and clips.max() <= 1
    assert len(captions) == 3
    assert all((clip[:, 1:] - clip[:, :-1]).abs().mean() > 0 for clip in clips)  # things move


@pytest.mark.parametrize(("index", "style"), itertools.product(range(40), SCENE_STYLES))
def test_caption_names_every_object_and_the_camera(index, style):
    scene = make_scene(11, index, style=style)
    from pasa.testbed.scene import caption

    words = tokenize(caption(scene))
    lo, hi = SCENE_STYLES[style].objects
    assert lo <= len(scene.objects) <= hi
    assert NUMBERS[len(scene.objects)] in words
    for obj in scene.objects:
        assert obj.shape in words and obj.texture.color in words
        if obj.motion != "still":
            assert obj.direction in words
    if scene.pan != "none":
        assert scene.pan in words[words.index("camera") :]
    if scene.zoom != "none":
        assert "zooms" in words and scene.zoom in words
    assert scene.background.kind in words and scene.background.color in words
    first = caption(scene).split(". ")[:2]  # the scene first: count, then camera and background
    assert first[0] == NUMBERS[len(scene.objects)] + (
        " shape" if len(scene.objects) == 1 else " shapes"
    )
    assert first[1].startswith("the camera ") and "background" in first[1]
    objects_first = caption(scene, "objects_first")  # the shipped checkpoint's captions
    assert objects_first.startswith("a ") and objects_first.endswith(first[1].rstrip(".") + ".")
    assert sorted(objects_first.rstrip(".").split(". ")) == sorted(
        caption(scene).rstrip(".").split(". ")
    )
    with pytest.raises(ValueError, match="caption order must be one of"):
        caption(scene, "reversed")
    assert ("turns" in words) == (scene.background_to is not None)


def test_front_object_colour_at_its_centre():
    # Frame 0 has the identity camera, so the front object's centre pixel shows its texture:
    # a mix of its named colour and its second shade.
    checked = 0
    for index in range(30):
        scene = make_scene(2, index)
        obj = scene.objects[-1]
        x, y = obj.start
        if obj.shape == "ring" or obj.motion == "bounces" or not (0.1 < x < 0.9 and 0.1 < y < 0.9):
            continue
        clip = render(scene, frames=1, height=128, width=128)
        pixel = (clip[:, 0, int(y * 128), int(x * 128)] + 1) / 2
        base, second = torch.tensor(COLORS[obj.texture.color]), torch.tensor(obj.texture.second)
        axis = base - second
        lam = float(((pixel - second) @ axis) / (axis @ axis).clamp_min(1e-6))
        residual = pixel - (second + lam * axis)
        assert -0.05 <= lam <= 1.05 and residual.abs().max() < 0.06, (index, pixel, base, second)
        checked += 1
    assert checked >= 5


def test_stream_is_disjoint_across_ranks_and_workers():
    streams = [
        ProceduralVideos(1, frames=2, height=16, width=16, rank=r, world_size=2) for r in range(2)
    ]
    seen = [[c for c, _ in itertools.islice(iter(s), 3)] for s in streams]
    reference, _ = make_batch(range(6), data_seed=1, frames=2, height=16, width=16)
    for k in range(6):  # clip k goes to rank k % 2
        assert torch.equal(seen[k % 2][k // 2], reference[k])
    a = clip_indices(5, batch_size=3, rank=1, world_size=4)
    b = clip_indices(5, batch_size=3, rank=2, world_size=4)
    assert len(set(a) | set(b)) == 6 and a == [63, 64, 65]


def test_supersampled_small_clip_matches_downsampled_large():
    scene = make_scene(0, 4)
    small = render(scene, frames=2, height=32, width=32, supersample=2)
    large = render(scene, frames=2, height=64, width=64)
    pooled = torch.nn.functional.avg_pool2d(large.reshape(6, 64, 64), 2).reshape(small.shape)
    assert torch.allclose(small, pooled, atol=1e-5)


def test_scene_styles_draw_the_same_clip_with_fewer_bigger_objects_on_a_calmer_background():
    for index in range(30):
        old, new = make_scene(4, index, style="original"), make_scene(4, index, style="bold")
        assert (old.background.kind, old.background.color, old.background.freq) == (
            new.background.kind, new.background.color, new.background.freq)  # fmt: skip
        assert old.background.contrast == 1.0 and new.background.contrast == 0.35
        for objects, style in ((old.objects, "original"), (new.objects, "bold")):
            lo, hi = SCENE_STYLES[style].radius
            assert all(lo <= o.radius <= hi for o in objects)
        pairs = zip(old.objects, new.objects, strict=False)  # the same draws, object by object
        assert all((a.shape, a.texture.color) == (b.shape, b.texture.color) for a, b in pairs)
    olds = [make_scene(4, i, style="original") for i in range(200)]
    news = [make_scene(4, i, style="bold") for i in range(200)]
    assert sum(len(s.objects) for s in news) < 0.8 * sum(len(s.objects) for s in olds)
    assert sum(o.radius for s in news for o in s.objects) / sum(len(s.objects) for s in news) > (
        1.3 * sum(o.radius for s in olds for o in s.objects) / sum(len(s.objects) for s in olds)
    )
    # the background's pattern at a third of the contrast: a clip without objects varies less
    bare = [make_scene(4, i, style=st) for st in ("original", "bold") for i in range(8)]
    spread = [float(render(replace(s, objects=()), frames=2, height=32, width=32).std(dim=(2, 3))
                    .mean()) for s in bare]  # fmt: skip
    assert sum(spread[8:]) < 0.5 * sum(spread[:8])


def test_size_words_follow_the_scene_style():
    for style, look in SCENE_STYLES.items():
        for index in range(20):
            scene = make_scene(2, index, style=style)
            text = caption(scene)
            for obj in scene.objects:
                word = (
                    "small " if obj.radius < look.small else "big " if obj.radius > look.big else ""
                )
                assert f"a {word}{obj.texture.color} " in text


def test_a_mixture_draws_each_clip_whole_in_one_of_its_styles():
    (mixture, parts), *_ = STYLE_MIXES.items()
    picks = [clip_style(3, i, mixture) for i in range(400)]
    assert set(picks) == set(parts)
    assert all(abs(picks.count(p) / 400 - 1 / len(parts)) < 0.1 for p in parts)
    assert picks != [clip_style(4, i, mixture) for i in range(400)]  # the stream's own picks
    for index, pick in enumerate(picks[:30]):
        scene = make_scene(3, index, style=mixture)
        assert scene == make_scene(3, index, style=pick) and scene.style == pick
    clips, captions = make_batch(range(6), data_seed=3, frames=2, height=16, width=16,
                                 scene_style=mixture)  # fmt: skip
    alone = [make_batch([i], data_seed=3, frames=2, height=16, width=16, scene_style=p)
             for i, p in enumerate(picks[:6])]  # fmt: skip
    assert torch.equal(clips, torch.cat([c for c, _ in alone]))
    assert captions == [c[0] for _, c in alone]
    assert clip_style(3, 0, "bold") == "bold"


def test_solo_clips_show_one_big_object():
    scenes = [make_scene(5, i, style="solo") for i in range(50)]
    assert all(len(s.objects) == 1 for s in scenes)
    assert all(s.objects[0].radius >= 0.2 for s in scenes)
    assert all(caption(s).startswith("one shape") for s in scenes)


def test_upright_still_and_fixed_solo_clips_keep_the_draws_and_pin_what_they_say():
    starts = set()
    for i in range(20):
        solo, upright, still, fixed = (make_scene(5, i, style=s) for s in (
            "solo", "solo-upright", "solo-still", "solo-fixed"))  # fmt: skip
        (o,), (u,), (s,), (f,) = solo.objects, upright.objects, still.objects, fixed.objects
        assert (s.shape, s.texture, s.radius, s.start) == (o.shape, o.texture, o.radius, o.start)
        assert (s.angle, s.spin, s.motion, still.pan, still.zoom) == (0.0, 0.0, "still", "none",
                                                                      "none")  # fmt: skip
        starts.add(s.start)
        assert (u.shape, u.texture, u.radius, u.start, u.motion) == (
            o.shape, o.texture, o.radius, o.start, o.motion
        )  # fmt: skip
        assert u.angle == u.spin == 0.0 and (upright.pan, upright.zoom) == (solo.pan, solo.zoom)
        assert (f.shape, f.texture, f.radius) == (o.shape, o.texture, o.radius)
        assert (f.angle, f.spin, f.start, f.motion) == (0.0, 0.0, (0.5, 0.5), "still")
        assert (fixed.pan, fixed.zoom, fixed.background) == ("none", "none", solo.background)
        assert caption(fixed).endswith(f"{o.shape} stays still.")
        assert "the camera stays still" in caption(fixed)
    assert len(starts) == 20  # a still clip's object is wherever it was drawn


def test_near_and_mid_solo_clips_pull_the_drawn_place_towards_the_centre():
    for i in range(20):
        still, near, mid = (make_scene(5, i, style=s) for s in ("solo-still", "solo-near",
                                                                 "solo-mid"))  # fmt: skip
        (s,), (n,), (m,) = still.objects, near.objects, mid.objects
        assert (n.shape, n.radius, n.motion, near.pan) == (s.shape, s.radius, "still", "none")
        for v, vn, vm in zip(s.start, n.start, m.start, strict=True):
            assert vn - 0.5 == pytest.approx(0.125 * (v - 0.5))
            assert vm - 0.5 == pytest.approx(0.375 * (v - 0.5))
            assert abs(vn - 0.5) <= 0.625 * 0.125 and abs(vm - 0.5) <= 0.625 * 0.375


def test_solo_from_centre_clips_start_at_the_centre_and_move_as_captioned_at_one_speed():
    motions = set()
    for i in range(30):
        solo, steady = make_scene(5, i, style="solo"), make_scene(5, i, style="solo-from-centre")
        (o,), (s,) = solo.objects, steady.objects
        assert (s.shape, s.texture, s.radius, s.direction) == (o.shape, o.texture, o.radius,
                                                               o.direction)  # fmt: skip
        assert s.start == (0.5, 0.5) and s.angle == s.spin == 0.0
        assert s.motion == ("still" if o.motion == "still" else "moves")
        assert s.speed == STEADY_SPEED and (steady.pan, steady.zoom) == ("none", "none")
        assert caption(steady).endswith(
            f"{o.shape} stays still." if o.motion == "still" else f"{o.shape} moves {o.direction}."
        )
        motions.add(s.motion)
    assert motions == {"still", "moves"}


def test_a_spread_is_only_for_still_or_steady_styles_and_within_0_and_1():
    with pytest.raises(ValueError, match="spread must be in"):
        replace(SCENE_STYLES["solo-still"], spread=1.5)
    with pytest.raises(ValueError, match="still or steady styles"):
        replace(SCENE_STYLES["solo"], spread=0.5)
    with pytest.raises(ValueError, match="still or steady, not both"):
        replace(SCENE_STYLES["solo-still"], steady=True)


def test_a_scene_style_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="scene style must be one of"):
        make_scene(0, 0, style="busy")
    with pytest.raises(ValueError, match="scene_style must be one of"):
        make_batch([0], data_seed=0, frames=2, height=16, width=16, scene_style="busy")
    with pytest.raises(ValueError, match="scene style must be one of"):
        clip_style(0, 0, "bold+busy")
