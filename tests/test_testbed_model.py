"""Testbed model: codec, sizes, checkpoint round trip and clear errors."""

import pytest
import torch

from pasa.testbed.model import (
    TESTBED,
    TINY,
    CheckpointError,
    TestbedConfig,
    build_model,
    count_parameters,
    latents_to_pixels,
    load_testbed,
    pixels_to_latents,
    save_testbed,
    sinusoidal_position_code,
    token_positions,
    transfer_codec_weights,
    with_pixel_factor,
)


def test_pixel_codec_is_exactly_invertible():
    x = torch.randn(2, 3, 3, 16, 24)
    z = pixels_to_latents(x, 4)
    assert z.shape == (2, 48, 3, 4, 6)
    assert torch.equal(latents_to_pixels(z, 4), x)
    # channel c * 16 + 4 * dy + dx of latent pixel (i, j) is pixel (4 i + dy, 4 j + dx)
    assert z[0, 1 * 16 + 4 * 2 + 3, 1, 2, 5] == x[0, 1, 1, 4 * 2 + 2, 4 * 5 + 3]


def test_codec_transfer_makes_a_coarser_model_the_block_mean_of_the_finer_one():
    fine = TestbedConfig(frames=2, height=32, width=32, pixel_factor=4, num_layers=1,
                         num_heads=2, head_dim=12, ffn_dim=24, freq_dim=16, text_dim=8)  # fmt: skip
    coarse = with_pixel_factor(fine, 2)
    assert (coarse.height, coarse.width) == (16, 16) and coarse.token_grid() == fine.token_grid()
    torch.manual_seed(0)
    big = build_model(fine).eval()
    torch.nn.init.normal_(big.proj_out.bias)  # zero at init: give the bias something to move
    small = build_model(coarse).eval()
    small.load_state_dict(transfer_codec_weights(dict(big.state_dict()), 4, 2))
    clip = torch.randn(1, 3, 2, 16, 16)
    repeated = clip.repeat_interleave(2, 3).repeat_interleave(2, 4)  # the clip at 32 px
    t, text = torch.tensor([500.0]), torch.randn(1, 4, 8)
    with torch.no_grad():
        out_big = latents_to_pixels(big(pixels_to_latents(repeated, 4), t, text)[0], 4)
        out_small = latents_to_pixels(small(pixels_to_latents(clip, 2), t, text)[0], 2)
    # the coarse model on a clip = the fine model on its pixel-repeated copy, averaged 2 x 2
    pooled = torch.nn.functional.avg_pool3d(out_big, (1, 2, 2))
    assert torch.allclose(out_small, pooled, atol=1e-5) and out_small.abs().mean() > 0.1
    back = transfer_codec_weights(transfer_codec_weights(dict(big.state_dict()), 4, 2), 2, 4)
    assert all(back[k].shape == v.shape for k, v in big.state_dict().items())
    with pytest.raises(ValueError, match="divide"):
        transfer_codec_weights(dict(big.state_dict()), 4, 3)
    with pytest.raises(ValueError, match=">= 1"):
        with_pixel_factor(fine, 0)


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
    assert shipped.caption_order == "scene_first"  # as it was trained (run 6)
    assert shipped.scene_style == "bold+solo-from-centre"  # and on the clips it was trained on
    assert shipped.clip_settings() == {
        "caption_order": "scene_first",
        "scene_style": "bold+solo-from-centre",
    }
    assert shipped.clip_settings("few") == {"caption_order": "scene_first", "scene_style": "few"}
    with pytest.raises(ValueError, match="--scene-style must be one of"):
        shipped.clip_settings("busy")
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


def test_sample_prediction_returns_the_velocity_of_its_clean_clip(tmp_path):
    from dataclasses import replace

    from diffusers import WanTransformer3DModel

    from pasa.testbed.model import T_MIN, velocity_from_sample

    config = replace(TINY, prediction="sample")
    torch.manual_seed(0)
    model = build_model(config).eval()
    assert isinstance(model, WanTransformer3DModel)  # PASA's Wan family applies to it
    plain = WanTransformer3DModel(**config.transformer_kwargs()).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(3, config.latent_channels, 4, 16, 16)
    text = torch.randn(3, 5, config.text_dim)
    t = torch.tensor([0.9, 0.3, 0.01])
    with torch.no_grad():
        v = model(hidden_states=x, timestep=1000 * t, encoder_hidden_states=text).sample
        x0 = plain(hidden_states=x, timestep=1000 * t, encoder_hidden_states=text).sample
        as_tuple = model(x, 1000 * t, text, return_dict=False)[0]
    assert torch.equal(v, as_tuple) and v.dtype == torch.float32
    # (x_t - x0) / t, with t clipped at T_MIN: the last item's t (0.01) divides by 0.05
    divisor = t.clamp(min=T_MIN).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(v, (x - x0) / divisor)
    # the sampler's x0 = x_t - t v gives back the network's clean clip
    torch.testing.assert_close(x[:2] - t[:2].view(-1, 1, 1, 1, 1) * v[:2], x0[:2])
    with pytest.raises(ValueError, match="one per batch item"):
        velocity_from_sample(x, x0, torch.ones(2))
    path = save_testbed(model, config, tmp_path / "x.safetensors", training={"steps": 0})
    loaded, loaded_config, _ = load_testbed(path)
    assert loaded_config.prediction == "sample" and type(loaded) is type(model)
    with pytest.raises(ValueError, match="prediction must be one of"):
        replace(TINY, prediction="noise")
    assert TINY.prediction == TESTBED.prediction == "velocity"  # runs 1-4; old configs too


def test_position_code_starts_as_the_plain_model_and_round_trips(tmp_path):
    from dataclasses import replace

    coded = replace(TINY, position_code="sinusoidal")
    torch.manual_seed(0)
    plain = build_model(TINY).eval()
    torch.manual_seed(0)
    model = build_model(coded).eval()  # the same draws: the gain is made after the rest
    assert type(model).__name__ == "PositionCodedWanTransformer3DModel"
    extra = set(model.state_dict()) - set(plain.state_dict())
    assert extra == {"patch_embedding.position_gain"}
    assert not model.patch_embedding.position_gain.any()  # zero gain: the plain model
    x, t, text = torch.randn(1, 12, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 96, 8)
    with torch.no_grad():
        assert torch.equal(model(x, t, text, return_dict=False)[0],
                           plain(x, t, text, return_dict=False)[0])  # fmt: skip
        model.patch_embedding.position_gain.fill_(0.5)
        moved = model(x, t, text, return_dict=False)[0]
    assert not torch.allclose(moved, plain(x, t, text, return_dict=False)[0])
    path = save_testbed(model, coded, tmp_path / "m.safetensors", training={}, dtype=torch.float32)
    loaded, config, _ = load_testbed(path)
    assert config.position_code == "sinusoidal"
    with torch.no_grad():
        assert torch.equal(loaded(x, t, text, return_dict=False)[0], moved)
    sample_coded = build_model(replace(coded, prediction="sample"))
    assert type(sample_coded).__name__ == "PositionCodedSamplePredictingWan"
    with pytest.raises(ValueError, match="position_code"):
        replace(TINY, position_code="learned")


def test_position_code_measures_rows_and_columns_in_full_size_tokens():
    code = sinusoidal_position_code(30, 3, 4, 6)
    assert code.shape == (30, 3, 4, 6)
    assert torch.allclose(code.pow(2).mean(0), torch.ones(3, 4, 6))  # unit RMS at every token
    # Ten channels each: frame, row, column. A frame's code is the same at every place.
    assert torch.equal(code[:10, 1], code[:10, 1, :1, :1].expand(10, 4, 6))
    assert torch.equal(code[10:20, :, 2], code[10:20, :1, 2].expand(10, 3, 6))
    assert torch.equal(token_positions(8), torch.arange(8.0))
    assert torch.equal(token_positions(8, 8), torch.arange(8.0))
    coarse, fine = token_positions(4, 8), token_positions(8, 8)
    assert torch.equal(coarse, fine.view(4, 2).mean(1))  # a coarse token: its fine tokens' mean
    half = sinusoidal_position_code(30, 3, 4, 6, side=8)
    assert torch.equal(half[:10], code[:10])  # frames stay indices
    assert not torch.allclose(half[10:], code[10:])
