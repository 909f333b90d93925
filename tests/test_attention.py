"""sparse_attention against dense SDPA, the LSE merge rule, and input validation."""

import pytest
import torch
import torch.nn.functional as F

import pasa
from pasa.layout import make_layout
from pasa.plan import BlockPlan


def sdpa(q, k, v):
    """Dense attention in the (B, S, H, D) layout."""
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)


def dense_lse(q, k):
    scores = torch.einsum("bshd,bthd->bhst", q.double(), k.double()) * q.shape[-1] ** -0.5
    return torch.logsumexp(scores, -1).float()


def qkv(grid, text=0, batch=1, heads=2, dim=32, dtype=torch.float32):
    s = grid[0] * grid[1] * grid[2] + text
    return [torch.randn(batch, s, heads, dim).to(dtype) for _ in range(3)]


# Exact blocks only: a plan passed to a call with this config is computed as it stands.
DENSE = pasa.PASAConfig(density=1.0, backend="reference", approximate=False)


# Small grids keep the fp32 reference fast on 2 CPU cores; they still cover ragged last blocks,
# grids not divisible by the tile, batch 2, text tokens and a single-frame video.
@pytest.mark.parametrize(
    "grid,text,batch",
    [
        ((4, 16, 16), 0, 1),
        ((3, 7, 9), 0, 2),
        ((5, 9, 11), 17, 2),
        ((1, 12, 20), 0, 1),
        ((1, 1, 1), 3, 1),
    ],
)
def test_density_one_equals_sdpa_within_bf16_error(grid, text, batch):
    q, k, v = qkv(grid, text, batch)
    exact = sdpa(q.double(), k.double(), v.double()).float()
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    bf16_sdpa_error = (sdpa(qb, kb, vb).float() - exact).abs().max()
    out = pasa.sparse_attention(qb, kb, vb, grid=grid, config=DENSE, num_text_tokens=text)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert (out.float() - exact).abs().max() <= 2 * bf16_sdpa_error
    out32, lse = pasa.sparse_attention(
        q, k, v, grid=grid, config=DENSE, num_text_tokens=text, return_lse=True
    )
    assert torch.allclose(out32, exact, atol=1e-5)
    assert lse.shape == (batch, q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert torch.allclose(lse, dense_lse(q, k), atol=1e-5)


def test_complementary_plans_merge_to_dense_through_lse():
    grid, text = (4, 12, 12), 9
    q, k, v = qkv(grid, text, batch=2, heads=3)
    layout = make_layout(grid, num_text_tokens=text)
    n = layout.num_blocks
    mask_a = torch.rand(2, 3, n, n) < 0.5
    mask_a[..., 0] = True  # every row keeps one block in each plan
    mask_a[..., 1] = False
    plans = [BlockPlan.from_dense_mask(m, layout) for m in (mask_a, ~mask_a)]
    outs = [
        pasa.sparse_attention(
            q, k, v, grid=grid, config=DENSE, num_text_tokens=text, plan=p, return_lse=True
        )
        for p in plans
    ]
    (oa, la), (ob, lb) = outs
    lse = torch.logaddexp(la, lb)  # (B, H, S)
    wa = torch.exp(la - lse).transpose(1, 2).unsqueeze(-1)  # (B, S, H, 1)
    wb = torch.exp(lb - lse).transpose(1, 2).unsqueeze(-1)
    assert torch.allclose(wa * oa + wb * ob, sdpa(q, k, v), atol=1e-5)
    assert torch.allclose(lse, dense_lse(q, k), atol=1e-5)


def test_sparse_output_matches_masked_dense_attention():
    grid = (4, 16, 16)
    q, k, v = qkv(grid, batch=2)
    config = pasa.PASAConfig(density=0.3, backend="reference", approximate=False)
    plan = pasa.plan_blocks(q, k, grid=grid, config=config)
    out = pasa.sparse_attention(q, k, v, grid=grid, config=config, plan=plan)
    # Token-level mask from the block plan, in original token order.
    block = plan.layout.block_of_token()
    token_mask = plan.to_dense_mask()[:, :, block][:, :, :, block]  # (B, H, S, S)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=token_mask
    ).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-5)
    # Computing the plan inside the call gives the same result.
    again = pasa.sparse_attention(q, k, v, grid=grid, config=config)
    assert torch.equal(again, out)


def test_plan_keeps_most_attention_on_video_like_input():
    """Smooth video-like features make attention local: the plan's recall is near the oracle's."""
    from pasa.analysis import plan_recall, true_block_mass
    from pasa.synthetic import video_qkv

    grid = (8, 32, 32)  # 64 blocks: enough rows and columns for density 0.2 to mean something
    q, k, v = video_qkv(grid, heads=4, dim=64, seed=0)
    config = pasa.PASAConfig(density=0.2)
    plan = pasa.plan_blocks(q, k, grid=grid, config=config)
    mass = true_block_mass(q, k, plan.layout)
    kk = round(0.2 * plan.layout.num_blocks)
    oracle_mask = torch.zeros_like(mass, dtype=torch.bool).scatter_(
        -1, mass.topk(kk, -1).indices, True
    )
    oracle = BlockPlan.from_dense_mask(oracle_mask, plan.layout)
    assert plan_recall(plan, mass) >= 0.95 * plan_recall(oracle, mass)
    dense = sdpa(q, k, v)
    out = pasa.sparse_attention(q, k, v, grid=grid, config=config, plan=plan)
    assert (out - dense).norm() / dense.norm() < 0.15


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda q, k, v: (q[0], k[0], v[0]), "rank 4"),
        (lambda q, k, v: (q, k[:, :-1], v), "same shape"),
        (lambda q, k, v: (q.double(), k.double(), v.double()), "dtype"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), "dtype"),
    ],
)
def test_bad_tensors_raise_value_error(change, match):
    q, k, v = qkv((2, 4, 4))
    with pytest.raises(ValueError, match=match):
        pasa.sparse_attention(*change(q, k, v), grid=(2, 4, 4), config=DENSE)


def test_sequence_must_match_grid_and_text():
    q, k, v = qkv((2, 4, 4), text=3)
    with pytest.raises(ValueError, match=r"F\*H\*W"):
        pasa.sparse_attention(q, k, v, grid=(2, 4, 4), config=DENSE)
    pasa.sparse_attention(q, k, v, grid=(2, 4, 4), config=DENSE, num_text_tokens=3)


def test_head_dim_over_256_raises():
    q, k, v = qkv((1, 2, 2), dim=264)
    with pytest.raises(ValueError, match="head dim 264"):
        pasa.sparse_attention(q, k, v, grid=(1, 2, 2), config=DENSE)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises_unless_switched_off(bad):
    q, k, v = qkv((2, 4, 4))
    k[0, 3, 1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        pasa.sparse_attention(q, k, v, grid=(2, 4, 4), config=DENSE)
    pasa.sparse_attention(q, k, v, grid=(2, 4, 4), config=DENSE.replace(check_finite=False))


def test_deferred_finite_checks_raise_later_with_the_call_named():
    q, k, v = qkv((2, 4, 4))
    v[0, 5, 0, 1] = float("nan")
    checks = pasa.FiniteChecks()
    config = pasa.PASAConfig(density=0.5, block_size=16, group_size=8)
    for layer in range(3):
        pasa.sparse_attention(
            q if layer == 2 else q.clone(),
            k,
            v if layer == 2 else v.nan_to_num(),
            grid=(2, 4, 4),
            config=config,
            layer=layer,
            finite_checks=checks,
        )  # no error yet: the flags wait on the device
    with pytest.raises(ValueError, match=r"v contains NaN or Inf \(layer 2, step 0\)"):
        checks.raise_if_any()
    checks.raise_if_any()  # the flags were consumed


def test_plan_of_another_shape_is_rejected():
    q, k, _v = qkv((4, 16, 16), heads=2)
    plan = pasa.plan_blocks(q, k, grid=(4, 16, 16), config=DENSE)
    q3, k3, v3 = qkv((4, 16, 16), heads=3)
    with pytest.raises(ValueError, match="does not fit"):
        pasa.sparse_attention(q3, k3, v3, grid=(4, 16, 16), config=DENSE, plan=plan)


@pytest.mark.parametrize("density", [0.0, -0.5, 1.01])
def test_density_override_outside_zero_one_raises(density):
    q, k, v = qkv((2, 4, 4))
    with pytest.raises(ValueError, match="density"):
        pasa.sparse_attention(q, k, v, grid=(2, 4, 4), config=DENSE, density=density)


def test_unknown_backend_is_rejected_by_config():
    with pytest.raises(ValueError, match="backend"):
        pasa.PASAConfig(backend="cuda-magic")


def test_approximate_branch_reduces_error_and_leaves_dense_alone():
    from pasa.synthetic import video_qkv

    grid = (4, 32, 32)
    q, k, v = video_qkv(grid, heads=2, dim=64, seed=3)
    dense = sdpa(q, k, v)
    exact_only = pasa.PASAConfig(density=0.1, temperature=0.0, approximate=False)
    errors = []
    for config in (exact_only, exact_only.replace(approximate=True)):
        out = pasa.sparse_attention(q, k, v, grid=grid, config=config)
        errors.append(float((out - dense).norm() / dense.norm()))
    assert errors[1] < errors[0]
    out = pasa.sparse_attention(q, k, v, grid=grid, config=DENSE.replace(approximate=True))
    assert torch.allclose(out, dense, atol=1e-5)


def test_tiled_inputs_and_returned_plan_match_the_plain_call():
    grid, text = (3, 20, 24), 11  # ragged tiles, text tokens
    q, k, v = qkv(grid, text, batch=2)
    config = pasa.PASAConfig(density=0.2, temperature=0.5)
    out, lse, plan = pasa.sparse_attention(
        q, k, v, grid=grid, config=config, num_text_tokens=text, return_lse=True, return_plan=True
    )
    expected = pasa.plan_blocks(q, k, grid=grid, config=config, num_text_tokens=text)
    assert torch.equal(plan.kv_indices, expected.kv_indices)
    layout = plan.layout
    qt, kt, vt = (layout.to_blocks(t) for t in (q, k, v))
    tiled_plan = pasa.plan_blocks(
        qt, kt, grid=grid, config=config, num_text_tokens=text, tiled=True
    )
    assert torch.equal(tiled_plan.kv_indices, plan.kv_indices)
    out_t, lse_t = pasa.sparse_attention(
        qt, kt, vt, grid=grid, config=config, num_text_tokens=text, return_lse=True, tiled=True
    )
    assert torch.allclose(layout.from_blocks(out_t), out, atol=1e-6)
    assert torch.allclose(layout.from_blocks(lse_t, dim=2), lse, atol=1e-6)
