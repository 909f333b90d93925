"""pasa.eval.caption_probe on a tiny random checkpoint: the report's fields, bounds and errors."""

import json

import pytest

from pasa.eval.caption_probe import background_colours, caption_use_report, main
from pasa.testbed.model import TINY


def test_report_fields_and_bounds(checkpoint):
    report = caption_use_report(checkpoint, clips=3, times=(0.9, 0.5), size=32)
    assert report["text_context"] == "bigram" and report["clips"] == 3
    assert report["caption_order"] == "scene_first"
    assert set(report["loss_gain"]) == {"t=0.9", "t=0.5"}
    for row in report["loss_gain"].values():
        assert row["true"] > 0 and row["shuffled"] > 0
        assert row["gain"] == pytest.approx(
            (row["shuffled"] - row["true"]) / row["shuffled"], abs=1e-4
        )
    assert set(report["attribute_gain"]) == {"t=0.9", "t=0.5"}
    assert all(set(row) == {"shape", "colour", "texture"} and all(-1 < g < 1 for g in row.values())
               for row in report["attribute_gain"].values())  # fmt: skip
    assert report["clips_scene_style"] == report["scene_style"] == "bold"
    few = caption_use_report(checkpoint, clips=2, times=(0.5,), size=32, scene_style="few")
    assert few["clips_scene_style"] == "few"
    with pytest.raises(ValueError, match="--scene-style must be one of"):
        caption_use_report(checkpoint, clips=2, size=32, scene_style="busy")
    words = report["word_attention_per_layer"]
    assert len(words) == TINY.num_layers and all(0.0 <= w <= 1.0 for w in words)
    assert 0.0 < report["word_positions_share"] < 1.0


def test_cli_writes_json_and_names_bad_input(checkpoint, tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert main([str(checkpoint), "--clips", "2", "--size", "32", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["clips"] == 2
    assert "cross-attention mass on words" in capsys.readouterr().out
    assert main([str(checkpoint), "--clips", "1", "--size", "32"]) == 2
    assert "clips must be at least 2" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.safetensors")]) == 2


def test_background_colour_check(checkpoint):
    rows = background_colours(checkpoint, colours=("red", "blue"), guidances=(1.0, 2.0), steps=2,
                              size=32, frames=4)  # fmt: skip
    assert [(r["colour"], r["guidance"]) for r in rows] == [
        ("red", 1.0),
        ("red", 2.0),
        ("blue", 1.0),
        ("blue", 2.0),
    ]
    assert all(len(r["mean_rgb"]) == 3 and all(0 <= c <= 1 for c in r["mean_rgb"]) for r in rows)
    assert rows[0]["target_rgb"] == (0.90, 0.12, 0.12)
    # The tiny test checkpoint is a new run's: scene first, as it would have been trained.
    assert rows[0]["caption"].startswith("one shape. ") and "red background" in rows[0]["caption"]


def test_colour_caption_follows_the_caption_order():
    from pasa.eval.caption_probe import colour_caption

    old, new = colour_caption("green", "objects_first"), colour_caption("green", "scene_first")
    assert old.startswith("a big white circle") and old.endswith("striped green background.")
    assert new.startswith("one shape.") and new.endswith("stays still.")


def test_object_words_are_swapped_for_others_of_their_kind_and_nothing_else():
    from pasa.eval.caption_probe import SWAPS, swap_object_words

    caption = ("two shapes. the camera pans right over a striped red background that turns blue. "
               "a big red striped circle bounces up-left. a small blue dotted ellipse stays still.")  # fmt: skip
    shapes = swap_object_words(caption, "shape")
    assert shapes.endswith("a big red striped diamond bounces up-left. a small blue dotted "
                           "triangle stays still.")  # fmt: skip
    colours = swap_object_words(caption, "colour")
    assert "striped red background that turns blue" in colours  # the scene sentence stays
    assert "a big purple striped circle" in colours and "a small black dotted ellipse" in colours
    textures = swap_object_words(caption, "texture")
    assert "a big red dotted circle" in textures and "a small blue solid ellipse" in textures
    for kind, (words, shift) in SWAPS.items():
        # a swap never keeps a word, and never gives two words the same replacement
        assert 0 < shift < len(words) and swap_object_words(caption, kind) != caption
    assert swap_object_words("one shape. the camera stays still over a noisy gray background.",
                             "shape").endswith("gray background.")  # fmt: skip
