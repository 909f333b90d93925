"""The approximate branches: the Taylor tail and the grouped Taylor tail against brute-force
statements of their formulas, their exactness where the formulas say so, and how the branches
leave dense plans and configs alone."""

import math

import pytest
import torch
import torch.nn.functional as F

import pasa
from pasa import approximate
from pasa.approximate import (
    add_approximate_branch,
    add_grouped_taylor_branch,
    add_principal_branch,
    add_taylor_branch,
)
from pasa.layout import make_layout
from pasa.plan import BlockPlan


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)


def exact_part(q, k, v, mask, bs):
    """Attention of (B, S, H, D) tiled inputs over the blocks of ``mask`` (B, H, Nq, Nk), and
    its LSE (B, H, S), in float64."""
    seq = q.shape[1]
    token_mask = mask.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[..., :seq, :seq]
    logits = torch.einsum("bshd,bthd->bhst", q.double(), k.double()) * q.shape[-1] ** -0.5
    logits = logits.masked_fill(~token_mask, float("-inf"))
    out = torch.softmax(logits, -1) @ v.double().transpose(1, 2)
    return out.transpose(1, 2), torch.logsumexp(logits, -1)


def taylor_by_rows(q, k, v, mask, bs):
    """The Taylor tail of every query, written out token by token from its row's left-out keys
    (the statement the blocked implementation must match), merged with the exact part."""
    batch, seq, heads, dim = q.shape
    s = dim**-0.5
    exact, lse = exact_part(q, k, v, mask, bs)
    out = torch.empty_like(exact)
    merged = torch.empty_like(lse)
    for b in range(batch):
        for h in range(heads):
            for i in range(seq):
                keep = mask[b, h, i // bs].repeat_interleave(bs)[:seq]
                kk, vv = k[b, ~keep, h].double(), v[b, ~keep, h].double()
                qi = q[b, i, h].double()
                if kk.shape[0] == 0:
                    out[b, i, h], merged[b, h, i] = exact[b, i, h], lse[b, h, i]
                    continue
                n = kk.shape[0]
                kbar, vbar = kk.mean(0), vv.mean(0)
                delta = s * (kk - kbar) @ qi  # logits about the mean logit
                gain = 1 + (delta**2).mean() / 2
                tail_lse = math.log(n) + s * float(qi @ kbar) + math.log(gain)
                tail = vbar + (delta[:, None] * vv).sum(0) / n / gain
                m = torch.logaddexp(lse[b, h, i], torch.tensor(tail_lse, dtype=torch.float64))
                out[b, i, h] = (
                    torch.exp(lse[b, h, i] - m) * exact[b, i, h] + math.exp(tail_lse - m) * tail
                )
                merged[b, h, i] = m
    return out, merged


def grouped_taylor_by_rows(q, k, v, mask, bs, gs):
    """The grouped Taylor tail of every query, token by token: each left-out group (``gs``
    consecutive tiled tokens) by its own mean logit and value, plus a second-order correction
    from the keys' and values' spread inside their groups, pooled over the row."""
    batch, seq, heads, dim = q.shape
    s = dim**-0.5
    exact, lse = exact_part(q, k, v, mask, bs)
    out, merged = exact.clone(), lse.clone()
    group = torch.arange(seq) // gs
    first = torch.arange(0, seq, gs)  # each group's first token
    for b in range(batch):
        for h in range(heads):
            kd, vd = k[b, :, h].double(), v[b, :, h].double()
            sizes = torch.bincount(group).double()
            kbar = torch.zeros(len(sizes), dim, dtype=torch.float64).index_add_(0, group, kd)
            vbar = torch.zeros(len(sizes), dim, dtype=torch.float64).index_add_(0, group, vd)
            kbar, vbar = kbar / sizes[:, None], vbar / sizes[:, None]
            for r in range(mask.shape[2]):  # the queries of one block share their keys
                left = ~mask[b, h, r].repeat_interleave(bs)[:seq]
                rows = slice(r * bs, min(seq, (r + 1) * bs))
                if not left.any():
                    continue
                qr = q[b, rows, h].double()  # (c, D)
                gl = left[first]  # the left-out groups (blocks, so groups, leave out whole)
                logits = s * qr @ kbar[gl].T + sizes[gl].log()  # (c, groups)
                where = group[left]
                kw, vw = kd[left] - kbar[where], vd[left] - vbar[where]
                delta = s * qr @ kw.T  # (c, n): each key's logit about its group's
                n = int(left.sum())
                gain = 1 + (delta**2).sum(1) / n / 2
                tail_lse = torch.logsumexp(logits, 1) + gain.log()
                tail = torch.softmax(logits, 1) @ vbar[gl] + delta @ vw / n / gain[:, None]
                m = torch.logaddexp(lse[b, h, rows], tail_lse)
                out[b, rows, h] = (
                    torch.exp(lse[b, h, rows] - m)[:, None] * exact[b, rows, h]
                    + torch.exp(tail_lse - m)[:, None] * tail
                )
                merged[b, h, rows] = m
    return out, merged


def per_group_taylor_by_rows(q, k, v, mask, bs, gs):
    """Every query's tail expanded to second order about each left-out group's own mean, token
    by token: what the principal tail computes at full rank."""
    batch, seq, heads, dim = q.shape
    s = dim**-0.5
    exact, lse = exact_part(q, k, v, mask, bs)
    out, merged = exact.clone(), lse.clone()
    group = torch.arange(seq) // gs
    for b in range(batch):
        for h in range(heads):
            kd, vd = k[b, :, h].double(), v[b, :, h].double()
            for i in range(seq):
                left = ~mask[b, h, i // bs].repeat_interleave(bs)[:seq]
                if not left.any():
                    continue
                qi = q[b, i, h].double()
                logits, values = [], []
                for g in group[left].unique():
                    kk, vv = kd[group == g], vd[group == g]
                    kbar, vbar = kk.mean(0), vv.mean(0)
                    delta = s * (kk - kbar) @ qi  # each key's logit about its group's
                    gain = 1 + (delta**2).mean() / 2
                    logits.append(s * qi @ kbar + math.log(len(kk)) + gain.log())
                    values.append(vbar + (delta[:, None] * (vv - vbar)).mean(0) / gain)
                logits = torch.stack(logits)
                tail_lse = torch.logsumexp(logits, 0)
                tail = torch.softmax(logits, 0) @ torch.stack(values)
                m = torch.logaddexp(lse[b, h, i], tail_lse)
                out[b, i, h] = (
                    torch.exp(lse[b, h, i] - m) * exact[b, i, h] + torch.exp(tail_lse - m) * tail
                )
                merged[b, h, i] = m
    return out, merged


def random_plan(layout, batch, heads, density, seed):
    gen = torch.Generator().manual_seed(seed)
    n = layout.num_blocks
    mask = torch.rand(batch, heads, n, n, generator=gen) < density
    mask |= torch.eye(n, dtype=torch.bool)  # every row keeps at least its own block
    mask[:, :, -1] = True  # and one row keeps everything (no tail)
    return BlockPlan.from_dense_mask(mask, layout), mask


@pytest.mark.parametrize("chunk", [None, 1])
def test_taylor_branch_matches_its_formula_row_by_row(monkeypatch, chunk):
    # A ragged last block (S = 5 * 9 * 11 = 495 is not a multiple of 64), batch 2, 3 heads; chunk
    # 1 forces one head per pass through the loop.
    if chunk is not None:
        monkeypatch.setattr(approximate, "_CHUNK_ELEMENTS", chunk)
    grid, bs = (5, 9, 11), 64
    layout = make_layout(grid, block_size=bs)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 495, 3, 16, generator=gen) for _ in range(3))
    plan, mask = random_plan(layout, 2, 3, 0.3, seed=1)
    exact, lse = exact_part(q, k, v, mask, bs)
    out, merged = add_taylor_branch(q, k, v, plan, exact.float(), lse.float())
    want_out, want_lse = taylor_by_rows(q, k, v, mask, bs)
    torch.testing.assert_close(out, want_out.float(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(merged, want_lse.float(), atol=2e-5, rtol=1e-5)
    # The last query block keeps every key block: no tail, the exact result unchanged.
    last = slice((layout.num_blocks - 1) * bs, 495)
    torch.testing.assert_close(out[:, last], exact[:, last].float())


@pytest.mark.parametrize(("gs", "chunk"), [(16, None), (32, 1), (64, None)])
def test_grouped_taylor_branch_matches_its_formula_row_by_row(monkeypatch, gs, chunk):
    # The ragged last block and group of the Taylor test (S = 495), groups of 16 to a whole block.
    if chunk is not None:
        monkeypatch.setattr(approximate, "_CHUNK_ELEMENTS", chunk)
    grid, bs = (5, 9, 11), 64
    layout = make_layout(grid, block_size=bs)
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 495, 3, 16, generator=gen) for _ in range(3))
    plan, mask = random_plan(layout, 2, 3, 0.3, seed=7)
    exact, lse = exact_part(q, k, v, mask, bs)
    out, merged = add_grouped_taylor_branch(
        q, k, v, plan, exact.float(), lse.float(), group_size=gs
    )
    want_out, want_lse = grouped_taylor_by_rows(q, k, v, mask, bs, gs)
    torch.testing.assert_close(out, want_out.float(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(merged, want_lse.float(), atol=2e-5, rtol=1e-5)
    last = slice((layout.num_blocks - 1) * bs, 495)
    torch.testing.assert_close(out[:, last], exact[:, last].float())


def test_grouped_taylor_branch_is_exact_where_each_groups_keys_are_equal():
    # Keys equal inside each 32-token group, values free: a group's tokens share one logit, so
    # its mean logit and mean value give its attention exactly; the Taylor tail's single
    # expansion about the row's mean does not. One-token groups are exact for any keys.
    grid, bs, gs = (4, 16, 16), 128, 32
    layout = make_layout(grid, block_size=bs)
    gen = torch.Generator().manual_seed(8)
    q, v = (torch.randn(1, 1024, 2, 32, generator=gen) for _ in range(2))
    k = (2 * torch.randn(1, 1024 // gs, 2, 32, generator=gen)).repeat_interleave(gs, 1)
    plan, mask = random_plan(layout, 1, 2, 0.2, seed=9)
    exact, lse = exact_part(q, k, v, mask, bs)
    full = sdpa(q.double(), k.double(), v.double())
    grouped, _ = add_grouped_taylor_branch(q, k, v, plan, exact.float(), lse.float(), group_size=gs)
    taylor, _ = add_taylor_branch(q, k, v, plan, exact.float(), lse.float())
    torch.testing.assert_close(grouped.double(), full, atol=1e-5, rtol=1e-4)
    assert float((taylor.double() - full).norm() / full.norm()) > 1e-2
    k = 2 * torch.randn(1, 1024, 2, 32, generator=gen)
    exact, lse = exact_part(q, k, v, mask, bs)
    one, _ = add_grouped_taylor_branch(q, k, v, plan, exact.float(), lse.float(), group_size=1)
    torch.testing.assert_close(one.double(), sdpa(q.double(), k.double(), v.double()),
                               atol=1e-5, rtol=1e-4)  # fmt: skip


def test_grouped_taylor_branch_keeps_far_heavy_groups_that_the_taylor_tail_misjudges():
    # Light keys everywhere, and in each of eight blocks one 32-token group leaning on the
    # direction the queries lean on, heavier block after block: a row's left-out logits spread by
    # several units. The Taylor tail's one expansion about their mean misjudges those groups'
    # weight; the grouped tail gives each its own logit and keeps its inner spread.
    grid, bs, gs, dim = (4, 16, 16), 128, 32, 32
    layout = make_layout(grid, block_size=bs)
    gen = torch.Generator().manual_seed(8)
    q, v = (torch.randn(1, 1024, 2, dim, generator=gen) for _ in range(2))
    k = 0.3 * torch.randn(1, 1024, 2, dim, generator=gen)
    u = torch.randn(dim, generator=gen)
    u /= u.norm()
    q += 2 * u
    for b in range(8):
        s0 = b * bs + (b % 4) * gs
        k[:, s0 : s0 + gs] += (1 + b / 2) * u * dim**0.5 / 2
        k[:, s0 : s0 + gs] += 0.3 * torch.randn(1, gs, 2, dim, generator=gen)
    plan, mask = random_plan(layout, 1, 2, 0.2, seed=9)
    exact, lse = exact_part(q, k, v, mask, bs)
    full = sdpa(q.double(), k.double(), v.double())
    exact, lse = exact.float(), lse.float()
    outs = {
        "group_means": add_approximate_branch(q, k, v, plan, exact, lse, group_size=gs)[0],
        "taylor": add_taylor_branch(q, k, v, plan, exact, lse)[0],
        "grouped_taylor": add_grouped_taylor_branch(q, k, v, plan, exact, lse, group_size=gs)[0],
    }
    errors = {name: float((o.double() - full).norm() / full.norm()) for name, o in outs.items()}
    assert errors["grouped_taylor"] < min(0.5 * errors["taylor"], errors["group_means"])


@pytest.mark.parametrize(("gs", "chunk"), [(16, None), (32, 1)])
def test_principal_branch_at_full_rank_matches_the_per_group_expansion_row_by_row(
    monkeypatch, gs, chunk
):
    # The ragged case of the Taylor tests (S = 495): at rank = head size the principal tail is
    # the second-order expansion about each left-out group's own mean, with its own scatter.
    if chunk is not None:
        monkeypatch.setattr(approximate, "_CHUNK_ELEMENTS", chunk)
    grid, bs = (5, 9, 11), 64
    layout = make_layout(grid, block_size=bs)
    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(2, 495, 3, 16, generator=gen) for _ in range(3))
    plan, mask = random_plan(layout, 2, 3, 0.3, seed=11)
    exact, lse = exact_part(q, k, v, mask, bs)
    out, merged = add_principal_branch(
        q, k, v, plan, exact.float(), lse.float(), group_size=gs, rank=16
    )
    want_out, want_lse = per_group_taylor_by_rows(q, k, v, mask, bs, gs)
    torch.testing.assert_close(out, want_out.float(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(merged, want_lse.float(), atol=2e-5, rtol=1e-5)
    last = slice((layout.num_blocks - 1) * bs, 495)
    torch.testing.assert_close(out[:, last], exact[:, last].float())


def test_principal_branch_at_low_rank_is_the_full_expansion_where_groups_vary_in_few_directions():
    # Each 32-token group's keys leave their mean along two directions of its own: rank 2 finds
    # them and equals the per-group expansion written out token by token; rank 1 does not.
    grid, bs, gs, dim = (2, 16, 16), 128, 32, 32
    layout = make_layout(grid, block_size=bs)
    gen = torch.Generator().manual_seed(12)
    q, v = (torch.randn(1, 512, 2, dim, generator=gen) for _ in range(2))
    groups = 512 // gs
    means = torch.randn(1, groups, 1, 2, dim, generator=gen)
    directions = torch.randn(1, groups, 2, 2, dim, generator=gen)  # two per group and head
    coefficients = torch.randn(1, groups, gs, 2, 2, generator=gen)
    k = means + torch.einsum("bgtrh,bgrhd->bgthd", coefficients, directions).div(3)
    k = k.flatten(1, 2)  # (1, 512, 2, dim)
    plan, mask = random_plan(layout, 1, 2, 0.3, seed=13)
    exact, lse = exact_part(q, k, v, mask, bs)
    want, _ = per_group_taylor_by_rows(q, k, v, mask, bs, gs)
    exact, lse = exact.float(), lse.float()
    two, _ = add_principal_branch(q, k, v, plan, exact, lse, group_size=gs, rank=2)
    one, _ = add_principal_branch(q, k, v, plan, exact, lse, group_size=gs, rank=1)
    torch.testing.assert_close(two, want.float(), atol=2e-5, rtol=1e-4)
    assert (one - want.float()).abs().max() > 1e-3


def test_principal_branch_is_exact_where_each_groups_keys_are_equal():
    # As the grouped Taylor tail: equal keys inside each group (any values), or one-token groups.
    grid, bs, gs = (4, 16, 16), 128, 32
    layout = make_layout(grid, block_size=bs)
    gen = torch.Generator().manual_seed(14)
    q, v = (torch.randn(1, 1024, 2, 32, generator=gen) for _ in range(2))
    k = (2 * torch.randn(1, 1024 // gs, 2, 32, generator=gen)).repeat_interleave(gs, 1)
    plan, mask = random_plan(layout, 1, 2, 0.2, seed=15)
    exact, lse = exact_part(q, k, v, mask, bs)
    full = sdpa(q.double(), k.double(), v.double())
    out, _ = add_principal_branch(q, k, v, plan, exact.float(), lse.float(), group_size=gs)
    torch.testing.assert_close(out.double(), full, atol=1e-5, rtol=1e-4)
    k = 2 * torch.randn(1, 1024, 2, 32, generator=gen)
    exact, lse = exact_part(q, k, v, mask, bs)
    one, _ = add_principal_branch(q, k, v, plan, exact.float(), lse.float(), group_size=1)
    torch.testing.assert_close(one.double(), sdpa(q.double(), k.double(), v.double()),
                               atol=1e-5, rtol=1e-4)  # fmt: skip


def test_principal_branch_refuses_a_rank_outside_the_head_size():
    grid, bs = (2, 8, 8), 32
    layout = make_layout(grid, block_size=bs)
    q = k = v = torch.randn(1, 128, 1, 16)
    plan, mask = random_plan(layout, 1, 1, 0.3, seed=0)
    exact, lse = exact_part(q, k, v, mask, bs)
    for rank in (0, 17, 2.0):
        with pytest.raises(ValueError, match="rank must be an int from 1 to the head size 16"):
            add_principal_branch(q, k, v, plan, exact.float(), lse.float(), group_size=16,
                                 rank=rank)  # fmt: skip


def test_taylor_branch_is_exact_for_uniform_attention():
    # q = 0: every key has the same logit, attention is the plain mean of v. Any plan plus the
    # Taylor tail gives it (up to rounding); the exact part alone gives a local mean, and group
    # means give it only because their pooled logits are equal too.
    grid = (4, 16, 16)
    _, k, v = (torch.randn(1, 1024, 2, 32) for _ in range(3))
    q = torch.zeros_like(k)
    dense = sdpa(q, k, v)
    config = pasa.PASAConfig(density=0.1, temperature=0.0, backend="reference", approximate=False)
    sparse = pasa.sparse_attention(q, k, v, grid=grid, config=config)
    taylor = pasa.sparse_attention(q, k, v, grid=grid, config=config.replace(approximate="taylor"))
    assert float((sparse - dense).norm() / dense.norm()) > 0.5
    torch.testing.assert_close(taylor, dense, atol=1e-5, rtol=1e-4)


def test_taylor_branch_beats_group_means_on_nearly_uniform_heads():
    # Small logits (q scaled down): nearly uniform attention whose weights still depend on the
    # query. The second-order tail keeps that dependence; group means lose it.
    from pasa.synthetic import video_qkv

    grid = (4, 32, 32)
    q, k, v = video_qkv(grid, heads=2, dim=64, seed=3)
    q = q * 0.1
    dense = sdpa(q, k, v)
    config = pasa.PASAConfig(density=0.1, temperature=0.0, backend="reference")
    errors = {}
    for approx in (False, "group_means", "taylor"):
        out = pasa.sparse_attention(q, k, v, grid=grid, config=config.replace(approximate=approx))
        errors[approx] = float((out - dense).norm() / dense.norm())
    assert errors["taylor"] < 0.25 * errors["group_means"] < errors[False]


def test_taylor_branch_leaves_dense_plans_alone():
    grid = (3, 7, 9)
    q, k, v = (torch.randn(2, 189, 2, 32) for _ in range(3))
    config = pasa.PASAConfig(density=1.0, backend="reference", approximate="taylor")
    out, lse = pasa.sparse_attention(q, k, v, grid=grid, config=config, return_lse=True)
    torch.testing.assert_close(out, sdpa(q, k, v), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(lse).all()


def test_approximate_setting_is_validated_and_true_means_group_means():
    assert pasa.PASAConfig(approximate=True).approximate == "group_means"
    assert pasa.PASAConfig(approximate="taylor").approximate == "taylor"
    assert pasa.PASAConfig(approximate="grouped_taylor").approximate == "grouped_taylor"
    assert pasa.PASAConfig().approximate == "taylor"
    assert pasa.PASAConfig(approximate=False).approximate is False
    with pytest.raises(ValueError, match="approximate"):
        pasa.PASAConfig(approximate="linear")


def test_taylor_branch_in_bf16_stays_close_to_fp32():
    # Half-precision inputs take the bf16 matmul path (centred moments); on the same values it
    # must agree with the fp32 path to about bf16's precision.
    grid, bs = (4, 16, 16), 128
    layout = make_layout(grid, block_size=bs)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1024, 2, 32, generator=gen).bfloat16() for _ in range(3))
    k = k + 2.0  # a large common part, which the centring must take out before the sums
    plan, mask = random_plan(layout, 1, 2, 0.2, seed=2)
    exact, lse = exact_part(q, k, v, mask, bs)
    want, want_lse = add_taylor_branch(q.float(), k.float(), v.float(), plan, exact, lse.float())
    got, got_lse = add_taylor_branch(q, k, v, plan, exact.bfloat16(), lse.float())
    assert float((got - want).norm() / want.norm()) < 2e-2
    torch.testing.assert_close(got_lse, want_lse, atol=2e-2, rtol=1e-3)


def test_taylor_branch_leaves_the_callers_tensors_alone():
    # Batch 1 in fp32: the head-major view of ``out`` could alias the caller's tensor.
    grid, bs = (4, 16, 16), 128
    layout = make_layout(grid, block_size=bs)
    q, k, v = (torch.randn(1, 1024, 2, 32) for _ in range(3))
    plan, mask = random_plan(layout, 1, 2, 0.2, seed=4)
    exact, lse = exact_part(q, k, v, mask, bs)
    exact, lse = exact.float(), lse.float()
    before = (exact.clone(), lse.clone(), k.clone())
    add_taylor_branch(q, k, v, plan, exact, lse)
    for a, b in zip((exact, lse, k), before, strict=True):
        assert torch.equal(a, b)


def test_tail_kernels_are_refused_where_they_cannot_run():
    # The Triton kernels run on CUDA (or under Triton's interpreter): elsewhere, and for a head
    # size that is not a power of two, asking for it is an error, not a silent fallback.
    grid = (3, 7, 9)
    layout = make_layout(grid, block_size=64)
    q, k, v = (torch.randn(1, 189, 2, 24) for _ in range(3))
    plan, mask = random_plan(layout, 1, 2, 0.3, seed=0)
    exact, lse = exact_part(q, k, v, mask, 64)
    with pytest.raises(ValueError, match="Triton Taylor kernel"):
        add_taylor_branch(q, k, v, plan, exact.float(), lse.float(), kernel=True)
    with pytest.raises(ValueError, match="Triton principal kernel"):
        add_principal_branch(q, k, v, plan, exact.float(), lse.float(), group_size=32,
                             kernel=True)  # fmt: skip
