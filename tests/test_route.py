"""Grouped estimate and stochastic routing: determinism, density, forced blocks, and why groups."""

import pytest
import torch

import pasa
from pasa.config import PASAConfig
from pasa.estimate import block_mass, group_pool
from pasa.layout import make_layout
from pasa.noise import routing_gumbel
from pasa.route import forced_blocks, select_blocks
from pasa.synthetic import video_qkv

GRID = (4, 32, 32)  # 32 blocks of 128: density steps of 1/32, so +-0.02 is a real check


def make_qk(grid=GRID, text=0, batch=1, heads=3):
    q, k, _ = video_qkv(grid, heads=heads, dim=32, batch=batch, num_text_tokens=text, seed=1)
    return q, k


def plan(q, k, grid=GRID, text=0, **kw):
    step = kw.pop("step", 0)
    layer = kw.pop("layer", 0)
    return pasa.plan_blocks(
        q, k, grid=grid, config=pasa.PASAConfig(**kw), step=step, layer=layer, num_text_tokens=text
    )


def same(a, b):
    return torch.equal(a.kv_indices, b.kv_indices) and torch.equal(a.kv_counts, b.kv_counts)


def test_same_key_gives_identical_plan():
    q, k = make_qk()
    a = plan(q, k, density=0.2, temperature=1.0, seed=7, step=3, layer=5)
    b = plan(q, k, density=0.2, temperature=1.0, seed=7, step=3, layer=5)
    assert same(a, b)


@pytest.mark.parametrize("selection", ["top_k", "top_p"])
def test_temperature_zero_is_deterministic_ranking(selection):
    q, k = make_qk()
    plans = [
        plan(q, k, density=0.2, temperature=0.0, selection=selection, seed=s, step=s)
        for s in range(3)
    ]
    assert all(same(plans[0], p) for p in plans[1:])
    if selection == "top_k":
        layout = plans[0].layout
        defaults = PASAConfig()
        mass = block_mass(
            layout.to_blocks(q), layout.to_blocks(k), block_size=128, group_size=defaults.group_size
        )
        local = defaults.local_blocks(0.2, layout.num_blocks)  # the default's local window
        assert local > 0
        forced, _ = forced_blocks(layout, "cpu", local, defaults.window_time_scale)
        kk = round(0.2 * layout.num_blocks)
        ranked = mass.masked_fill(forced, float("inf")).topk(kk, -1).indices
        expected = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, ranked, True)
        assert torch.equal(plans[0].to_dense_mask(), expected)


def test_positive_temperature_changes_with_step_seed_and_layer():
    q, k = make_qk()
    base = plan(q, k, density=0.2, temperature=0.5)
    for key in ({"step": 1}, {"seed": 1}, {"layer": 1}):
        assert not same(base, plan(q, k, density=0.2, temperature=0.5, **key))


@pytest.mark.parametrize("density", [0.05, 0.1, 0.25, 0.5])
@pytest.mark.parametrize("selection", ["top_k", "top_p"])
def test_plan_density_meets_the_target(density, selection):
    q, k = make_qk(batch=2)
    p = plan(q, k, density=density, selection=selection)
    assert abs(p.density() - density) <= 0.02


def test_plans_are_sorted_compact_and_keep_forced_blocks():
    grid, text = (3, 20, 24), 40  # ragged tiles, text sharing the last video block
    q, k = make_qk(grid, text=text, batch=2)
    for selection in ("top_k", "top_p"):
        p = plan(q, k, grid, text, density=0.1, selection=selection, temperature=1.0)
        n = p.layout.num_blocks
        assert p.kv_indices.dtype == torch.int32 and p.kv_counts.dtype == torch.int32
        assert p.kv_indices.shape == (2, 3, n, n) and p.kv_counts.shape == (2, 3, n)
        valid = p.row_valid()
        idx = p.kv_indices.long()
        assert bool((idx[..., 1:] >= idx[..., :-1]).all())  # ascending, padding repeats the last
        assert bool(((idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]).all())  # no duplicates
        mask = p.to_dense_mask()
        assert torch.equal(mask.sum(-1).int(), p.kv_counts)
        forced, dense_rows = forced_blocks(p.layout, "cpu")
        assert bool(mask[..., forced].all())
        assert bool(mask[:, :, dense_rows].all())  # text queries attend to everything
        assert bool(mask.diagonal(dim1=-2, dim2=-1).all())


def test_min_and_max_blocks_bound_each_row():
    q, k = make_qk()
    p = plan(q, k, density=0.05, min_blocks=4, max_blocks=6, selection="top_p")
    assert int(p.kv_counts.min()) >= 4 and int(p.kv_counts.max()) <= 6


def test_density_one_selects_everything():
    q, k = make_qk()
    p = plan(q, k, density=1.0)
    assert p.density() == 1.0


def test_gumbel_noise_is_standard_gumbel_and_keyed():
    g = routing_gumbel(
        seed=0, step=0, layer=0, heads=torch.arange(4), num_q_blocks=64, num_k_blocks=64
    )
    assert g.shape == (4, 64, 64)
    assert abs(float(g.mean()) - 0.5772) < 0.03 and abs(float(g.var()) - 1.6449) < 0.1
    # A head's noise depends on its global index only: rank offsets reproduce the full tensor.
    tail = routing_gumbel(
        seed=0, step=0, layer=0, heads=torch.arange(2, 4), num_q_blocks=64, num_k_blocks=64
    )
    assert torch.equal(tail, g[2:])


def test_gumbel_top_k_samples_in_proportion_to_mass_power():
    """With tau = 1, the one free slot of a row is filled with probability mass / sum."""
    layout = pasa.make_layout((1, 1, 128 * 4))
    share = torch.tensor([0.55, 0.3, 0.1, 0.05]).view(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous()
    # density 0.5 = 2 of 4 blocks: row 1 keeps its diagonal (block 1) and samples one of {0, 2, 3}.
    config = pasa.PASAConfig(density=0.5, temperature=1.0, selection="top_k", local_share=0.0)
    hits = torch.zeros(4)
    for step in range(2000):
        hits += select_blocks(share, layout=layout, config=config, step=step).to_dense_mask()[
            0, 0, 1
        ]
    freq = hits / 2000
    assert freq[1] == 1.0
    expected = torch.tensor([0.55, 0.1, 0.05]) / 0.7
    assert torch.allclose(freq[[0, 2, 3]], expected, atol=0.035)


def test_group_pool_counts_ragged_groups():
    x = torch.arange(70, dtype=torch.float32).view(1, 70, 1, 1)
    means, counts = group_pool(x, 32)
    assert counts.tolist() == [32.0, 32.0, 6.0]
    assert means.flatten().tolist() == [15.5, 47.5, 66.5]


def test_one_group_per_block_is_mean_pooling():
    q, k = make_qk((2, 16, 16), heads=2)
    layout = pasa.make_layout((2, 16, 16))
    qt, kt = layout.to_blocks(q), layout.to_blocks(k)
    mass = block_mass(qt, kt, block_size=128, group_size=128)
    qm, _ = group_pool(qt, 128)
    km, _ = group_pool(kt, 128)
    expected = torch.softmax(qm @ km.transpose(-1, -2) * 32**-0.5, -1)
    assert torch.allclose(mass, expected, atol=1e-6)


def test_grouped_estimate_finds_a_small_feature_that_mean_pooling_averages_away():
    """Key block 2 holds one bright 32-token object and a dark rest with zero mean: the block's
    mean key is zero, so mean pooling ranks it like noise. The true attention goes mostly there."""
    dim, s = 16, 128 * 6
    grid = (1, 1, s)  # one row of tokens: tiling is the identity, blocks are plain chunks
    e0 = torch.zeros(dim)
    e0[0] = 1.0
    q = torch.randn(1, s, 1, dim) * 0.1
    k = torch.randn(1, s, 1, dim) * 0.1
    q[0, :128, 0] += 3.0 * e0  # query block 0 looks along e0
    k[0, 128:256, 0] += 0.8 * e0  # block 1: mildly aligned everywhere
    k[0, 256:288, 0] += 4.0 * e0  # block 2: a small bright object...
    k[0, 288:384, 0] -= (4.0 * 32 / 96) * e0  # ...in a dark block whose mean is zero
    from pasa.analysis import true_block_mass

    layout = pasa.make_layout(grid)
    true = true_block_mass(q, k, layout)[0, 0, 0]
    assert int(true[1:].argmax()) + 1 == 2  # block 2 really holds the most off-diagonal mass

    def rank_of_block_2(group_size):
        mass = block_mass(q, k, block_size=128, group_size=group_size)[0, 0, 0]
        order = mass[1:].argsort(descending=True) + 1
        return int((order == 2).nonzero())

    assert rank_of_block_2(32) == 0
    assert rank_of_block_2(32) < rank_of_block_2(128)


def test_local_share_keeps_the_nearest_blocks_and_the_count():
    from pasa.eval.strategies import window_plan
    from pasa.layout import nearest_blocks

    layout = make_layout((8, 32, 32))
    n = layout.num_blocks
    mass = torch.rand(2, 3, n, n, generator=torch.Generator().manual_seed(0))
    plain = select_blocks(mass, layout=layout, config=PASAConfig(density=0.25))
    config = PASAConfig(density=0.25, local_share=0.5, window_trust=None)  # forced everywhere
    local = config.local_blocks(0.25, n)
    assert local == 8  # half of round(0.25 * 64) = 16
    mixed = select_blocks(mass, layout=layout, config=config)
    assert torch.equal(mixed.kv_counts, plain.kv_counts)  # the same compute
    dense = mixed.to_dense_mask()
    scale = config.window_time_scale
    assert (dense & nearest_blocks(layout, local, scale)).sum(-1).eq(local).all()
    # All of the count to the window: the static window plan, whatever the mass says, in
    # either window shape.
    for scale in (0.5, 1.0):
        whole = PASAConfig(
            density=0.25, local_share=1.0, window_time_scale=scale, window_trust=None
        )
        window = select_blocks(mass, layout=layout, config=whole)
        want = window_plan(layout, 0.25, 2, 3, time_scale=scale).to_dense_mask()
        assert torch.equal(window.to_dense_mask(), want)
    assert PASAConfig(local_share=0.5).local_blocks(1.0, n) == 0
    # A steady window keeps the run's size at every step (at most the step's count); a step
    # window follows the step's density.
    steady, step = PASAConfig(density=0.25), PASAConfig(density=0.25, steady_window=False)
    assert [steady.local_blocks(d, n) for d in (0.125, 0.25, 0.5)] == [8, 12, 12]
    assert [step.local_blocks(d, n) for d in (0.125, 0.25, 0.5)] == [6, 12, 24]
    with pytest.raises(ValueError, match="local_share"):
        PASAConfig(local_share=1.5)


def test_soft_window_prefers_the_window_and_yields_to_much_larger_mass():
    from pasa.layout import nearest_blocks

    layout = make_layout((8, 32, 32))
    n = layout.num_blocks
    mass = torch.rand(2, 3, n, n, generator=torch.Generator().manual_seed(0)) + 1.0
    # The forced window of 12 blocks in every head.
    config = PASAConfig(density=0.25, temperature=0.0, window_trust=None)
    local = config.local_blocks(0.25, n)
    window = nearest_blocks(layout, local, config.window_time_scale)
    forced = select_blocks(mass, layout=layout, config=config).to_dense_mask()
    for bonus in (1.0, 2.0):  # mass within a factor 2 of each other: the window always wins
        soft = select_blocks(mass, layout=layout, config=config.replace(window_bonus=bonus))
        assert torch.equal(soft.to_dense_mask(), forced)
    # Zero bonus: no window at all.
    none = select_blocks(mass, layout=layout, config=config.replace(local_share=0.0))
    zero = select_blocks(mass, layout=layout, config=config.replace(window_bonus=0.0))
    assert torch.equal(zero.to_dense_mask(), none.to_dense_mask())
    # With the whole count in the window, a far block with 10 times a window block's mass
    # displaces one under bonus 2 (e^2 = 7.4) but not under bonus 3 (20); the count stays.
    whole = config.replace(local_share=1.0)
    window = nearest_blocks(layout, whole.local_blocks(0.25, n), whole.window_time_scale)
    row, far = 5, int((~window[5]).nonzero()[-1])
    boosted = mass.clone()
    boosted[..., row, far] = 10 * boosted[..., row, window[row]].max()
    two = select_blocks(boosted, layout=layout, config=whole.replace(window_bonus=2.0))
    three = select_blocks(boosted, layout=layout, config=whole.replace(window_bonus=3.0))
    assert two.to_dense_mask()[..., row, far].all()
    assert not three.to_dense_mask()[..., row, far].any()
    assert torch.equal(two.kv_counts, three.kv_counts)
    assert two.to_dense_mask()[..., row, row].all()  # the diagonal is still forced
    with pytest.raises(ValueError, match="window_bonus"):
        PASAConfig(window_bonus=-1.0)


def test_trusted_window_forces_where_the_estimate_agrees_and_yields_elsewhere():
    from pasa.layout import nearest_blocks
    from pasa.route import window_agreement

    layout = make_layout((8, 32, 32))
    n = layout.num_blocks
    config = PASAConfig(density=0.25, temperature=0.0, local_share=1.0, window_trust=None)
    local = config.local_blocks(0.25, n)
    window = nearest_blocks(layout, local, config.window_time_scale)
    mass = torch.rand(1, 3, n, n, generator=torch.Generator().manual_seed(0)) + 1.0
    mass[0, 0] += 30.0 * window  # head 0: the window holds the heaviest blocks
    mass[0, 1] += 30.0 * ~window  # head 1: every block outside outweighs every block inside
    share = mass / mass.sum(-1, keepdim=True)
    agreement = window_agreement(share, window, local, n)[0]
    assert agreement[0] == pytest.approx(1.0) and agreement[1] < 0.2 < 0.6 < agreement[2] < 1.0

    def plan(**changes):
        return select_blocks(mass, layout=layout, config=config.replace(**changes)).to_dense_mask()

    forced, soft3 = plan(), plan(window_bonus=3.0)
    # Trust 0: every head agrees, the forced window everywhere.
    assert torch.equal(plan(window_trust=0.0), forced)
    # Trust 0.5: heads 0 and 2 agree and keep the window whole; head 1 routes by its estimate
    # under the soft bonus (e^3 = 20 < 31 / 2: the far blocks win).
    half = plan(window_trust=0.5, window_bonus=3.0)
    assert torch.equal(half[:, [0, 2]], forced[:, [0, 2]])
    assert torch.equal(half[:, 1], soft3[:, 1])
    assert not torch.equal(half[:, 1], forced[:, 1])
    # Trust 1: no head agrees in full; the bonus defaults to 1 (window_bonus None).
    assert torch.equal(plan(window_trust=1.0), plan(window_bonus=1.0))
    # The count is the forced window's in every head.
    assert half.sum(-1).eq(forced.sum(-1)).all()
    for bad in (-0.1, 1.5, "high"):
        with pytest.raises(ValueError, match="window_trust"):
            PASAConfig(window_trust=bad)
