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
    assert rows[0]["caption"].startswith("one shapes. ") and "red background" in rows[0]["caption"]


def test_colour_caption_follows_the_caption_order():
    from pasa.eval.caption_probe import colour_caption

    old, new = colour_caption("green", "objects_first"), colour_caption("green", "scene_first")
    assert old.startswith("a big white circle") and old.endswith("striped green background.")
    assert new.startswith("one shapes.") and new.endswith("stays still.")
