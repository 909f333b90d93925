"""PASA on tiny random diffusers transformers of the four supported families (CPU).

Sizes: the configs are of the size diffusers' own model tests use (2 heads, 1-2 layers), and the
post-patch grids are odd (3 x 5 x 7 and the like) so that no side is a multiple of the tile and
the last blocks are ragged; 16-token blocks give a handful of blocks so that density 0.3 really
skips some.
"""

from __future__ import annotations

import pytest
import torch

import pasa
from pasa.integrations.diffusers import apply, remove

pytest.importorskip("diffusers")

from diffusers import (
    CogVideoXTransformer3DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    WanTransformer3DModel,
)

BLOCK = dict(block_size=16, group_size=8)
# Every key block computed (min_blocks above any block count): PASA must then equal stock
# attention up to the fp32 reference backend's round-off.
FULL_COVERAGE = pasa.PASAConfig(density=0.5, min_blocks=10_000, **BLOCK)
SPARSE = pasa.PASAConfig(density=0.3, **BLOCK)
# Measured: largest |PASA full coverage - stock| over the families and grids here is 5.2e-7
# in fp32 (the reference backend's fp32 softmax vs stock SDPA); bound at about 4x that.
ATOL = 2e-6


def _wan(grid: tuple[int, int, int]) -> tuple[torch.nn.Module, dict]:
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        rope_max_seq_len=32,
    )
    f, h, w = grid
    inputs = dict(
        hidden_states=torch.randn(2, 4, f, 2 * h, 2 * w),
        timestep=torch.tensor([700, 700]),
        encoder_hidden_states=torch.randn(2, 6, 16),
    )
    return model, inputs


# Tiny HunyuanVideo: one block of each kind, 2 heads of 10, patch 1 (sizes of diffusers' tests).
HUNYUAN_TINY = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=10,
    num_layers=1,
    num_single_layers=1,
    num_refiner_layers=1,
    patch_size=1,
    patch_size_t=1,
    text_embed_dim=16,
    pooled_projection_dim=8,
    rope_axes_dim=(2, 4, 4),
)


def _hunyuan(grid: tuple[int, int, int], text_valid: tuple[int, int] = (5, 3)):
    model = HunyuanVideoTransformer3DModel(**HUNYUAN_TINY, guidance_embeds=True)
    f, h, w = grid
    text = 6
    mask = torch.zeros(2, text, dtype=torch.long)
    for b, n in enumerate(text_valid):
        mask[b, :n] = 1
    inputs = dict(
        hidden_states=torch.randn(2, 4, f, h, w),
        timestep=torch.tensor([700, 700]),
        encoder_hidden_states=torch.randn(2, text, 16),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(2, 8),
        guidance=torch.tensor([3500.0, 3500.0]),
    )
    return model, inputs


def _cogvideox(grid: tuple[int, int, int]):
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=8,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=6,
    )
    f, h, w = grid
    num_video = f * h * w
    rotary = (torch.randn(num_video, 8), torch.randn(num_video, 8))  # (cos, sin), random is fine
    inputs = dict(
        hidden_states=torch.randn(2, f, 4, 2 * h, 2 * w),
        encoder_hidden_states=torch.randn(2, 6, 8),
        timestep=torch.tensor([700, 700]),
        image_rotary_emb=rotary,
    )
    return model, inputs


def _ltx(grid: tuple[int, int, int]):
    model = LTXVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=2,
        caption_channels=16,
    )
    f, h, w = grid
    inputs = dict(
        hidden_states=torch.randn(2, f * h * w, 4),
        encoder_hidden_states=torch.randn(2, 6, 16),
        timestep=torch.tensor([700, 700]),
        encoder_attention_mask=torch.ones(2, 6, dtype=torch.long),
        num_frames=f,
        height=h,
        width=w,
    )
    return model, inputs


BUILDERS = {"wan": _wan, "hunyuan_video": _hunyuan, "cogvideox": _cogvideox, "ltx_video": _ltx}
GRIDS = [(3, 5, 7), (1, 3, 11), (4, 6, 5)]  # odd sides, a one-frame video, an even frame count


def _torch_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _built(family: str, grid: tuple[int, int, int]):
    torch.manual_seed(0)
    model, inputs = BUILDERS[family](grid)
    return model.eval(), inputs


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_dense_budget_is_stock(family: str) -> None:
    model, inputs = _built(family, GRIDS[0])
    stock = _run(model, inputs)
    state = apply(model, pasa.PASAConfig(density=1.0, **BLOCK))
    torch.testing.assert_close(_run(model, inputs), stock, rtol=0, atol=0)
    state.finish()
    assert not state.last_report.tiled_stream  # a dense run keeps the stock token order


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_full_coverage_matches_stock(family: str, grid: tuple[int, int, int]) -> None:
    """The PASA path (projections, rotary, token moves, layout) with every block kept."""
    model, inputs = _built(family, grid)
    stock = _run(model, inputs)
    state = apply(model, FULL_COVERAGE)
    out = _run(model, inputs)
    state.finish()
    assert state.last_report.realised_densities == [1.0]
    torch.testing.assert_close(out, stock, rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_sparse_runs_and_differs(family: str) -> None:
    model, inputs = _built(family, GRIDS[0])
    stock = _run(model, inputs)
    state = apply(model, SPARSE)
    out = _run(model, inputs)
    state.finish()
    assert out.shape == stock.shape and torch.isfinite(out).all()
    assert (out - stock).abs().max() > 1e-3
    report = state.last_report
    assert report.grid == GRIDS[0] and not report.steps[0].dense
    assert 0.0 < report.realised_densities[0] < 1.0
    assert 0.0 < report.flops_saved_fraction < 1.0


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_remove_is_bit_identical(family: str) -> None:
    model, inputs = _built(family, GRIDS[0])
    stock = _run(model, inputs)
    hooks = _torch_hooks(model)
    apply(model, SPARSE)
    _run(model, inputs)
    remove(model)
    assert torch.equal(_run(model, inputs), stock)
    assert not hasattr(model, "_pasa") and "pasa" not in model._diffusers_hook.hooks
    assert _torch_hooks(model) == hooks  # the tiled stream's hooks are gone too


def test_hunyuan_same_padding_drops_masked_keys() -> None:
    """All items with 3 of 6 real text tokens: one sparse call on video + 3 text tokens."""
    torch.manual_seed(0)
    model, inputs = _hunyuan(GRIDS[0], text_valid=(3, 3))
    model.eval()
    stock = _run(model, inputs)
    apply(model, FULL_COVERAGE)
    torch.testing.assert_close(_run(model, inputs), stock, rtol=0, atol=ATOL)


def test_only_self_attention_is_replaced() -> None:
    model, _ = _built("wan", GRIDS[0])
    apply(model, SPARSE)
    for block in model.blocks:
        assert type(block.attn1.processor).__name__ == "WanPASAProcessor"
        assert type(block.attn2.processor).__name__ == "WanAttnProcessor"


def test_unsupported_model_lists_supported() -> None:
    with pytest.raises(TypeError, match=r"WanTransformer3DModel.*LTXVideoTransformer3DModel"):
        apply(torch.nn.Linear(2, 2), SPARSE)


def test_regional_compile_with_pasa() -> None:
    """Regional compile of the repeated blocks: PASA's attention is one graph break per block."""
    model, inputs = _built("wan", GRIDS[0])
    apply(model, SPARSE)
    eager = _run(model, inputs)
    model.compile_repeated_blocks(backend="aot_eager")
    torch._dynamo.reset()
    torch.testing.assert_close(_run(model, inputs), eager, rtol=0, atol=1e-5)


# -- tiled token stream: tokens stay in tiled order across the blocks (stream.py) -------------

# Measured in fp32 on CPU: the tiled stream equals per-call re-ordering exactly (0.0) over the
# families, grids and per-token timesteps here (the same row-wise ops on re-ordered rows), and
# stock attention on re-ordered tokens differs from stock by at most 4.8e-7 (its reductions run
# in another order). The bound is ATOL, about 4x the latter: other BLAS kernels may round the
# re-ordered rows differently.
STREAM_ATOL = ATOL


def _stream_and_per_call(model: torch.nn.Module, inputs: dict, config, **apply_kwargs):
    """Outputs and reports of the same call with the tiled stream and with per-call order."""
    state = apply(model, config, **apply_kwargs)
    results = []
    for tiled_stream in (True, False):
        state.tiled_stream = tiled_stream
        out = _run(model, inputs)
        state.finish()
        results.append((out, state.last_report))
    remove(model)
    return results


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_tiled_stream_matches_per_call(family: str, grid: tuple[int, int, int]) -> None:
    model, inputs = _built(family, grid)
    (streamed, report), (per_call, per_call_report) = _stream_and_per_call(model, inputs, SPARSE)
    assert report.tiled_stream and not per_call_report.tiled_stream
    assert report.realised_densities == per_call_report.realised_densities
    assert 0.0 < report.realised_densities[0] < 1.0
    torch.testing.assert_close(streamed, per_call, rtol=0, atol=STREAM_ATOL)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_stock_attention_on_tiled_tokens(family: str) -> None:
    """A dense step of a run with a given budget keeps the stream: the stock processor on
    re-ordered q, k, v and rotary tables equals stock (permutation equivariance)."""
    from pasa.eval.strategies import ScheduleBudget

    model, inputs = _built(family, GRIDS[2])
    stock = _run(model, inputs)
    state = apply(model, SPARSE, budget=ScheduleBudget([1.0]))
    out = _run(model, inputs)
    state.finish()
    assert state.last_report.tiled_stream and state.last_report.dense_steps == [0]
    torch.testing.assert_close(out, stock, rtol=0, atol=STREAM_ATOL)


@pytest.mark.parametrize("family", ["wan", "ltx_video"])
def test_tiled_stream_per_token_timestep(family: str) -> None:
    """Wan 2.2 TI2V and LTX I2V give every token its own timestep: the modulation inside the
    blocks is re-ordered with the tokens, the one after the last block is not."""
    grid = GRIDS[0]
    model, inputs = _built(family, grid)
    batch, tokens = 2, grid[0] * grid[1] * grid[2]
    inputs["timestep"] = torch.randint(0, 1000, (batch, tokens)).float()  # (B, S)
    stock = _run(model, inputs)
    (streamed, report), (per_call, _) = _stream_and_per_call(model, inputs, SPARSE)
    assert report.tiled_stream
    torch.testing.assert_close(streamed, per_call, rtol=0, atol=STREAM_ATOL)
    (every_block, _), _ = _stream_and_per_call(model, inputs, FULL_COVERAGE)
    torch.testing.assert_close(every_block, stock, rtol=0, atol=ATOL)


def test_hunyuan_token_replace_keeps_per_call_order() -> None:
    """HunyuanVideo I2V (token_replace) modulates the first frame's tokens by position: no stream."""
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        **HUNYUAN_TINY, guidance_embeds=False, image_condition_type="token_replace"
    ).eval()
    _, inputs = _hunyuan(GRIDS[0])
    del inputs["guidance"]
    stock = _run(model, inputs)
    state = apply(model, FULL_COVERAGE)
    out = _run(model, inputs)
    state.finish()
    assert not state.last_report.tiled_stream
    torch.testing.assert_close(out, stock, rtol=0, atol=ATOL)


def test_cogvideox_positional_rotary_is_reordered() -> None:
    """The stream re-orders a forward argument whether it comes by keyword or by position."""
    model, inputs = _built("cogvideox", GRIDS[0])
    names = ["hidden_states", "encoder_hidden_states", "timestep", "timestep_cond", "ofs"]
    args = [inputs.get(n) for n in names] + [inputs["image_rotary_emb"]]
    state = apply(model, SPARSE)
    with torch.no_grad():
        positional = model(*args, return_dict=False)[0]
    state.finish()
    assert state.last_report.tiled_stream
    torch.testing.assert_close(positional, _run(model, inputs), rtol=0, atol=0)


def test_tiled_stream_reorders_once_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-orderings per Wan transformer call: per attention call without the stream (q, k, v in,
    the output back), once per transformer call with it (hidden states in and back, and the
    rotary (cos, sin) tables in)."""
    from pasa.layout import TokenLayout

    counts = {"to_blocks": 0, "from_blocks": 0}
    for name in counts:
        original = getattr(TokenLayout, name)

        def counted(self, x, dim=1, _name=name, _original=original):
            counts[_name] += 1
            return _original(self, x, dim)

        monkeypatch.setattr(TokenLayout, name, counted)
    model, inputs = _built("wan", GRIDS[0])
    layers = len(model.blocks)
    state = apply(model, SPARSE)
    for tiled_stream, expected in ((True, (3, 1)), (False, (3 * layers, layers))):
        state.tiled_stream = tiled_stream
        counts.update(to_blocks=0, from_blocks=0)
        _run(model, inputs)
        state.finish()
        assert (counts["to_blocks"], counts["from_blocks"]) == expected


def test_no_tiled_stream_under_context_parallelism() -> None:
    """diffusers shards the sequence inside its own hooks before the blocks, so a model with a
    parallel config keeps per-call re-ordering (the gloo run is tests/test_diffusers_ulysses.py)."""
    model, inputs = _built("wan", GRIDS[0])
    state = apply(model, SPARSE)
    expected = _run(model, inputs)
    state.finish()
    model._parallel_config = object()  # what enable_parallelism sets; read only by PASA here
    try:
        out = _run(model, inputs)
        state.finish()
    finally:
        del model._parallel_config
    assert not state.last_report.tiled_stream
    torch.testing.assert_close(out, expected, rtol=0, atol=STREAM_ATOL)
