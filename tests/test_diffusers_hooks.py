"""The hooks peers plug into ``pasa.apply``: a given per-step budget and a plan provider.

Sizes: the tiny testbed model (2 layers, 2 heads) on a 4 x 8 x 8 token grid with 16-token
blocks: 16 blocks, so density 0.3 skips most of them; three Euler steps through the testbed
sampler, which runs every call in a diffusers cache context as a pipeline does.
"""

from __future__ import annotations

import pytest
import torch

import pasa
from pasa.integrations.diffusers import apply, last_report, remove

pytest.importorskip("diffusers")

from pasa.eval.strategies import ScheduleBudget, window_plan
from pasa.layout import make_layout
from pasa.plan import BlockPlan
from pasa.testbed.model import TINY, build_model
from pasa.testbed.sample import sample

CONFIG = pasa.PASAConfig(density=0.3, block_size=16, group_size=8, budget="fixed")
STEPS = 3
# Measured: the largest |PASA with every block - stock| on this clip is 7.2e-7 (fp32
# reference backend against stock SDPA, through three Euler steps); bound at about 7x.
ATOL = 5e-6


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(TINY).eval()


def _clip(model: torch.nn.Module) -> torch.Tensor:
    return sample(model, TINY, "a red circle moves left", seed=3, num_steps=STEPS).frames


def test_given_budget_replaces_make_budget(model):
    schedule = [1.0, 0.25, 0.5]
    budget = ScheduleBudget(schedule)
    apply(model, CONFIG, budget=budget)
    try:
        _clip(model)
        report = last_report(model)
        assert report.densities == schedule
        assert report.dense_steps == [0]
        assert 0.0 < report.steps[1].realised_density < report.steps[2].realised_density < 1.0
        _clip(model)  # reset at the start of the next generation: the same schedule again
        assert last_report(model).densities == schedule
        assert budget.realised_densities == schedule
    finally:
        remove(model)


def test_given_budget_must_fit_the_run(model):
    apply(model, CONFIG, budget=ScheduleBudget([1.0, 0.5]))
    try:
        with pytest.raises(ValueError, match="plans 2 steps, but this generation runs 3"):
            _clip(model)
    finally:
        remove(model)
    with pytest.raises(TypeError, match="StepBudget"):
        apply(model, CONFIG, budget=[0.5, 0.5, 0.5])
    assert not hasattr(model, "_pasa")  # a refused apply leaves the model stock


def test_plan_provider_plan_is_computed(model):
    stock = _clip(model)
    calls: list[tuple[int, int, int, tuple[int, ...]]] = []
    seen: list[BlockPlan] = []

    def everything(layout, step, layer, q, k):
        calls.append((layout.num_blocks, step, layer, tuple(q.shape)))
        n = layout.num_blocks
        mask = torch.ones(q.shape[0], q.shape[2], n, n, dtype=torch.bool)
        return BlockPlan.from_dense_mask(mask, layout)

    state = apply(model, CONFIG, plan_provider=everything)
    state.on_plan = lambda step, layer, head_offset, plan: seen.append(plan)
    try:
        full = _clip(model)
        report = last_report(model)
    finally:
        remove(model)
    # Every block computed although the budget says 0.3: the provider's plan, not PASA's routing.
    torch.testing.assert_close(full, stock, rtol=0, atol=ATOL)
    assert report.realised_densities == [1.0] * STEPS
    tokens = 4 * 8 * 8
    assert calls == [
        (16, step, layer, (1, tokens, TINY.num_heads, TINY.head_dim))
        for step in range(STEPS)
        for layer in range(TINY.num_layers)
    ]
    assert len(seen) == len(calls) and all(p.density() == 1.0 for p in seen)


def test_plan_provider_none_falls_back_to_pasa(model):
    apply(model, CONFIG)
    try:
        routed = _clip(model)
        expected = last_report(model).realised_densities
    finally:
        remove(model)
    apply(model, CONFIG, plan_provider=lambda layout, step, layer, q, k: None)
    try:
        assert torch.equal(_clip(model), routed)
        assert last_report(model).realised_densities == expected
    finally:
        remove(model)


def test_static_window_through_the_provider(model):
    def window(layout, step, layer, q, k):
        return window_plan(layout, CONFIG.density, batch=q.shape[0], heads=q.shape[2])

    apply(model, CONFIG, plan_provider=window)
    try:
        _clip(model)
        realised = last_report(model).realised_densities
    finally:
        remove(model)
    layout = make_layout((4, 8, 8), block_size=CONFIG.block_size, tile=CONFIG.tile)
    expected = window_plan(layout, CONFIG.density).density()
    assert 0.0 < expected < 1.0
    assert realised == pytest.approx([expected] * STEPS)


def test_plan_provider_sees_frame_major_tokens(model):
    """With the tokens in tiled order across the blocks, the provider still gets q, k in the
    documented frame-major order: the same tensors as without the stream."""
    seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}

    def record(layout, step, layer, q, k):
        seen[state.tiled_stream].append(q)

    state = apply(model, CONFIG, plan_provider=record)
    try:
        for tiled_stream in (True, False):
            state.tiled_stream = tiled_stream
            _clip(model)
            assert last_report(model).tiled_stream == tiled_stream
    finally:
        remove(model)
    assert len(seen[True]) == len(seen[False]) > 0
    for streamed, per_call in zip(seen[True], seen[False], strict=True):
        torch.testing.assert_close(streamed, per_call, rtol=0, atol=1e-6)


def test_non_finite_attention_input_raises_after_the_model_call(model):
    def poison(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        hidden = hidden.clone()
        hidden[0, 3] = float("nan")
        if "hidden_states" in kwargs:
            return args, dict(kwargs, hidden_states=hidden)
        return (hidden, *args[1:]), kwargs

    handle = model.blocks[1].attn1.register_forward_pre_hook(poison, with_kwargs=True)
    apply(model, CONFIG)
    try:
        with pytest.raises(ValueError, match=r"contains NaN or Inf \(layer 1, step 0\)"):
            _clip(model)
    finally:
        handle.remove()
        remove(model)
    assert torch.isfinite(_clip(model)).all()  # removed, and nothing left behind


def test_a_sample_predicting_testbed_model_is_hooked_like_wan():
    # The x-prediction subclass returns the velocity, so PASA's step counting and curvature see
    # what they see on a stock Wan; with every block computed the clip is the stock one.
    from dataclasses import replace

    config = replace(TINY, prediction="sample")
    torch.manual_seed(0)
    model = build_model(config).eval()
    stock = sample(model, config, "a red circle moves left", seed=3, num_steps=STEPS).frames

    def everything(layout, step, layer, q, k):
        mask = torch.ones(q.shape[0], q.shape[2], layout.num_blocks, layout.num_blocks,
                          dtype=torch.bool)  # fmt: skip
        return BlockPlan.from_dense_mask(mask, layout)

    apply(model, replace(CONFIG, budget="online"), plan_provider=everything)
    try:
        full = sample(model, config, "a red circle moves left", seed=3, num_steps=STEPS).frames
        report = last_report(model)
    finally:
        remove(model)
    torch.testing.assert_close(full, stock, rtol=0, atol=ATOL)
    assert report.model == "SamplePredictingWan" and len(report.steps) == STEPS
    assert [c is not None for c in report.curvatures] == [False] + [True] * (STEPS - 1)
