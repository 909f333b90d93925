"""Procedural clips: determinism, shapes, captions that say what the clip shows, DDP sharding."""

import itertools

import pytest
import torch

from pasa.testbed.data import ProceduralVideos, clip_indices, make_batch, render
from pasa.testbed.scene import COLORS, NUMBERS, make_scene
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


@pytest.mark.parametrize("index", range(40))
def test_caption_names_every_object_and_the_camera(index):
    scene = make_scene(11, index)
    from pasa.testbed.scene import caption

    words = tokenize(caption(scene))
    assert 3 <= len(scene.objects) <= 8
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
    assert first[0] == f"{NUMBERS[len(scene.objects)]} shapes"
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
