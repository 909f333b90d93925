"""Testbed model: codec, sizes, checkpoint round trip and clear errors."""

import pytest
import torch

from pasa.testbed.model import (
    TESTBED,
    TINY,
    CheckpointError,
    build_model,
    count_parameters,
    latents_to_pixels,
    load_testbed,
    pixels_to_latents,
    save_testbed,
)


def test_pixel_codec_is_exactly_invertible():
    x = torch.randn(2, 3, 3, 16, 24)
    z = pixels_to_latents(x, 4)
    assert z.shape == (2, 48, 3, 4, 6)
    assert torch.equal(latents_to_pixels(z, 4), x)
    # channel c * 16 + 4 * dy + dx of latent pixel (i, j) is pixel (4 i + dy, 4 j + dx)
    assert z[0, 1 * 16 + 4 * 2 + 3, 1, 2, 5] == x[0, 1, 1, 4 * 2 + 2, 4 * 5 + 3]


def test_testbed_size_and_token_grid():
    assert TESTBED.token_grid() == (16, 32, 32)
    params = count_parameters(build_model(TESTBED))
    assert params * 2 <= 24e6  # bf16 checkpoint within the 24 MB the repository allows


def test_save_load_round_trip(tmp_path):
    model = build_model(TINY)
    path = save_testbed(
        model, TINY, tmp_path / "m.safetensors", training={"steps": 3, "data_seed": 1}
    )
    loaded, config, record = load_testbed(path)
    assert config == TINY and record["training"] == {"steps": 3, "data_seed": 1}
    assert (tmp_path / "m.json").is_file()
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a.to(torch.bfloat16).float(), b), name


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_testbed(tmp_path / "missing.safetensors")
    path = save_testbed(build_model(TINY), TINY, tmp_path / "m.safetensors", training={})
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_testbed(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_testbed(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not a PASA testbed"):
        load_testbed(tmp_path / "foreign.safetensors")


def test_text_context_defaults_and_presets():
    from pasa.testbed.model import DEFAULT_CHECKPOINT, TestbedConfig, read_record

    assert TestbedConfig().text_context == "none"  # what configs written before it existed mean
    assert TESTBED.text_context == TINY.text_context == "bigram"  # new training runs
    assert TestbedConfig.from_dict({"frames": 4}).text_context == "none"
    assert TINY.text_encoder().context == "bigram"
    with pytest.raises(ValueError, match="text_context must be one of"):
        TestbedConfig(text_context="bag")
    shipped = TestbedConfig.from_dict(read_record(DEFAULT_CHECKPOINT)["config"])
    assert shipped.text_context == "bigram"  # the shipped checkpoint: warm start onto bigrams


def test_caption_order_defaults_presets_and_what_the_evaluation_writes():
    from pasa.eval.generate import eval_captions
    from pasa.testbed.model import DEFAULT_CHECKPOINT, TestbedConfig, read_record

    assert TestbedConfig().caption_order == "objects_first"  # configs written before it existed
    assert TESTBED.caption_order == TINY.caption_order == "scene_first"  # new training runs
    with pytest.raises(ValueError, match="caption_order must be one of"):
        TestbedConfig(caption_order="shuffled")
    shipped = TestbedConfig.from_dict(read_record(DEFAULT_CHECKPOINT)["config"])
    assert shipped.caption_order == "scene_first"  # as it was trained (run 4)
    assert shipped.scene_style == "bold"  # and on the clips it was trained on
    assert shipped.clip_settings() == {"caption_order": "scene_first", "scene_style": "bold"}
    assert TestbedConfig().scene_style == "original"
    assert TESTBED.scene_style == TINY.scene_style == "bold"
    with pytest.raises(ValueError, match="scene_style must be one of"):
        TestbedConfig(scene_style="busy")
    old = eval_captions(2, caption_order="objects_first", scene_style="original")
    new = eval_captions(2, caption_order="scene_first", scene_style="original")
    for a, b in zip(old, new, strict=True):
        assert a.startswith("a ") and "background" in a.split(". ")[-1]
        assert b.split(". ")[0].endswith(" shapes")
        assert sorted(a.rstrip(".").split(". ")) == sorted(b.rstrip(".").split(". "))
