"""The strategy table and the static window plan; the attention probe."""

import pytest
import torch

from pasa.budget import StepBudget
from pasa.config import PASAConfig
from pasa.eval.strategies import (
    REIMPLEMENTED,
    STRATEGIES,
    ScheduleBudget,
    get_strategy,
    window_plan,
)
from pasa.layout import make_layout


@pytest.mark.parametrize("density", [0.1, 0.15, 0.25])
def test_every_strategy_builds_a_valid_config(density):
    for s in STRATEGIES.values():
        if s.is_dense:
            continue
        assert isinstance(s.config(density), PASAConfig) and s.config(density).density == density
    for name in ("meanpool_topk", "static_window", "static_window_time", "sparse_videogen"):
        assert REIMPLEMENTED in STRATEGIES[name].label
    with pytest.raises(ValueError, match="unknown strategy"):
        get_strategy("nope")


def test_ablations_differ_from_pasa_in_one_field():
    base = STRATEGIES["pasa"].config(0.15)
    assert base.temperature > 0 and base.local_share > 0  # the library's defaults
    for name in ("meanpool_topk", "static_window", "static_window_time", "sparse_videogen"):
        peer = STRATEGIES[name].config(0.15)
        assert (peer.group_size, peer.temperature, peer.local_share) == (128, 0.0, 0.0)
    changed = {
        "pasa_no_grouped": {"group_size": 128},
        "pasa_g32": {"group_size": 32},
        "pasa_no_local": {"local_share": 0.0},
        "pasa_local90": {"local_share": 0.9},
        "pasa_step_window": {"steady_window": False},
        "pasa_isotropic_window": {"window_time_scale": 1.0},
        "pasa_no_stochastic": {"temperature": 0.0},
        "pasa_tau010": {"temperature": 0.1},
        "pasa_no_curvature": {"budget": "fixed"},
        "pasa_approximate": {"approximate": "group_means"},
        "pasa_grouped_taylor": {"approximate": "grouped_taylor"},
        "pasa_no_approximate": {"approximate": False},
    }
    for name, fields in changed.items():
        assert STRATEGIES[name].config(0.15) == base.replace(**fields)


def test_warmup_schedule_keeps_the_mean_and_refuses_the_impossible():
    s = STRATEGIES["sparse_videogen"]
    densities = s.step_densities(0.25, 20)
    assert densities[:4] == [1.0] * 4 and sum(densities) / 20 == pytest.approx(0.25)
    with pytest.raises(ValueError, match="warm-up"):
        s.step_densities(0.1, 20)
    budget = ScheduleBudget(densities)
    assert isinstance(budget, StepBudget)
    assert [budget.density(i) for i in range(20)] == densities
    assert budget.realised_densities == densities


@pytest.mark.parametrize(
    ("grid", "text"), [((16, 32, 32), 0), ((5, 13, 19), 0), ((4, 16, 16), 77), ((1, 8, 40), 0)]
)
def test_window_plan(grid, text):
    layout = make_layout(grid, num_text_tokens=text)
    n = layout.num_blocks
    plan = window_plan(layout, 0.1, batch=2, heads=3)
    mask = plan.to_dense_mask()
    assert mask.shape == (2, 3, n, n)
    assert mask.diagonal(dim1=-2, dim2=-1).all()  # own block always
    video = layout.first_text_block
    k = max(1, round(0.1 * n))
    counts = mask[0, 0, :video, :video].sum(-1)
    assert (counts == min(k, video)).all()
    assert mask[..., video:].all() and mask[..., video:, :].all()  # text: both ways
    assert torch.equal(mask[0, 0], mask[1, 2])  # static: same for every head


def test_window_plan_is_local():
    layout = make_layout((16, 32, 32))  # 2x8x8 tiles: 8 x 4 x 4 blocks
    mask = window_plan(layout, 7 / 128).to_dense_mask()[0, 0]
    centre = (3 * 4 + 1) * 4 + 1  # tile (3, 1, 1)
    # 7 blocks: itself and its 6 face neighbours (Chebyshev 1, nearest in Euclidean distance).
    faces = {centre, centre - 1, centre + 1, centre - 4, centre + 4, centre - 16, centre + 16}
    assert set(mask[centre].nonzero().flatten().tolist()) == faces


def test_probe_captures_what_attention_sees():
    from pasa.eval.probe import capture_qk
    from pasa.testbed.model import TINY, build_model

    model = build_model(TINY).eval()
    x = torch.randn(1, TINY.latent_channels, 2, 8, 8)
    text = torch.randn(1, 5, TINY.text_dim)
    layers = capture_qk(model, x, torch.tensor([500.0]), text)
    assert len(layers) == TINY.num_layers
    q, k = layers[0]
    assert q.shape == k.shape == (1, 2 * 4 * 4, TINY.num_heads, TINY.head_dim)
    # Rebuild attn1's output of block 0 from the captured q, k: it must match the stock call.
    block = model.blocks[0]
    seen = {}
    handle = block.attn1.register_forward_hook(lambda m, a, kw, out: seen.update(
        out=out, hidden=kw.get("hidden_states", a[0] if a else None)), with_kwargs=True)  # fmt: skip
    with torch.no_grad():
        model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text)
    handle.remove()
    attn = block.attn1
    v = attn.to_v(seen["hidden"]).unflatten(2, (attn.heads, -1))
    out = (
        torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        .transpose(1, 2)
        .flatten(2)
    )
    torch.testing.assert_close(attn.to_out[0](out), seen["out"], rtol=1e-4, atol=1e-5)


def test_recall_report_per_layer_and_per_time_average_the_same_recalls():
    from pasa.eval.probe import attention_recall_report
    from pasa.testbed.model import TINY, build_model

    torch.manual_seed(0)
    model = build_model(TINY).eval()
    report = attention_recall_report(
        model, TINY, densities=(0.5,), times=(0.3, 0.7), num_clips=1, block_size=64
    )
    per_layer, per_time = report["per_layer"]["0.5"], report["per_time"]["0.5"]
    assert len(per_layer) == TINY.num_layers and set(per_time) == {"0.3", "0.7"}
    assert all(0.0 < r <= 1.0 for r in [*per_layer, *per_time.values()])
    mean_by_time = sum(per_time.values()) / len(per_time)
    assert abs(mean_by_time - report["mean"]["0.5"]) < 1e-3
    per_head = report["per_head"]["0.5"]
    assert len(per_head) == TINY.num_layers and len(per_head[0]) == TINY.num_heads
    for layer, heads in zip(per_layer, per_head, strict=True):
        assert abs(sum(heads) / len(heads) - layer) < 1e-3
    assert report["scene_style"] == TINY.scene_style  # the checkpoint's own clips
    few = attention_recall_report(
        model, TINY, densities=(0.5,), times=(0.3,), num_clips=1, block_size=64, scene_style="few"
    )
    assert few["scene_style"] == "few" and few["mean"]["0.5"] != report["mean"]["0.5"]
    with pytest.raises(ValueError, match="--scene-style"):
        attention_recall_report(model, TINY, num_clips=1, scene_style="busy")
