"""GPU correctness: every backend against the reference; the Triton estimator and router against
pasa/estimate.py and pasa/route.py; compile-safety on CUDA. Skipped without CUDA.

Shapes are small (a few hundred to ~1,300 tokens) but hit the edges: ragged last block, text
tokens, batch 2, per-head different block counts (top-p plans), bf16 and fp16.
"""

from __future__ import annotations

import pytest
import torch

import pasa
from pasa.backends.reference import reference_block_attention
from pasa.backends.registry import available_backends, get_backend
from pasa.estimate import block_mass
from pasa.layout import make_layout
from pasa.noise import routing_gumbel
from pasa.route import select_blocks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (grid, text tokens): 1,285 tokens = 10 full blocks + a ragged text block; 365 tokens = 3 blocks.
CASES = [((4, 16, 20), 5), ((3, 10, 12), 0), ((1, 7, 97), 13)]


def _inputs(grid, text, dtype, heads=3, dim=64, batch=2, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    seq = grid[0] * grid[1] * grid[2] + text
    return [
        torch.randn(batch, seq, heads, dim, device="cuda", generator=g).mul(1.5).to(dtype)
        for _ in range(3)
    ]


def _plan(q, k, layout, density=0.4):
    qt, kt = layout.to_blocks(q), layout.to_blocks(k)
    config = pasa.PASAConfig(density=density)
    mass = block_mass(qt, kt, block_size=128, group_size=config.group_size)
    return select_blocks(mass, layout=layout, config=config)


def _sdpa_error(qt, kt, vt, plan, ref_out):
    """Error bf16/fp16 SDPA (dense boolean mask from the plan) makes against the fp32 reference."""
    bs = plan.layout.block_size
    mask = plan.to_dense_mask().repeat_interleave(bs, 2).repeat_interleave(bs, 3)
    seq = qt.shape[1]
    mask = mask[..., :seq, :seq]
    out = torch.nn.functional.scaled_dot_product_attention(
        qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)
    return (out.float() - ref_out).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid,text", CASES)
@pytest.mark.parametrize("backend", ["flex", "fa4"])
def test_backend_matches_reference(backend, grid, text, dtype):
    reason = available_backends("cuda")[backend]
    if reason is not None:
        pytest.skip(reason)
    layout = make_layout(grid, num_text_tokens=text, device="cuda")
    q, k, v = _inputs(grid, text, dtype)
    plan = _plan(q, k, layout)
    assert plan.kv_counts.unique().numel() > 1 or layout.num_blocks < 4  # rows differ
    qt, kt, vt = (layout.to_blocks(t) for t in (q, k, v))
    ref_out, ref_lse = reference_block_attention(qt.float(), kt.float(), vt.float(), plan)
    tol = 2 * max(_sdpa_error(qt, kt, vt, plan, ref_out), 1e-3)
    out, lse = get_backend(backend, "cuda").fn(qt, kt, vt, plan)
    assert out.shape == qt.shape and lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert (out.float() - ref_out).abs().max().item() <= tol
    assert (lse - ref_lse).abs().max().item() <= 1e-2


def test_fa4_refuses_cleanly_when_unavailable():
    reason = available_backends("cuda")["fa4"]
    if reason is None:
        pytest.skip("fa4 is available here")
    with pytest.raises(RuntimeError, match="fa4"):
        get_backend("fa4", "cuda")


@pytest.mark.parametrize("precision", ["tf32x3", "bf16x3"])
@pytest.mark.parametrize("group_size", [16, 32, 64, 128])
@pytest.mark.parametrize("grid,text", CASES)
def test_triton_block_mass_matches_torch(grid, text, group_size, precision):
    from pasa.kernels.estimate_triton import block_mass_triton

    layout = make_layout(grid, num_text_tokens=text, device="cuda")
    q, k, _ = _inputs(grid, text, torch.bfloat16)
    qt, kt = layout.to_blocks(q), layout.to_blocks(k)
    ref = block_mass(qt, kt, block_size=128, group_size=group_size)
    got = block_mass_triton(qt, kt, block_size=128, group_size=group_size, precision=precision)
    assert ((got - ref).abs() <= 1e-3 * ref.abs() + 1e-7).all()


@pytest.mark.parametrize(
    "launch",
    [
        dict(rows=128, key_blocks=32, num_warps=8, num_stages=3),
        dict(rows=64, key_blocks=32, num_warps=4, presplit=False),
        dict(rows=128, key_blocks=16, num_warps=4, num_stages=2),
        dict(rows=64, key_blocks=16, num_warps=8, precision="tf32"),
    ],
)
@pytest.mark.parametrize("grid,text", CASES)
def test_triton_block_mass_launch_shapes(grid, text, launch):
    from pasa.kernels.estimate_triton import grouped_block_estimate
    from pasa.kernels.permute import group_means

    layout = make_layout(grid, num_text_tokens=text, device="cuda")
    q, k, _ = _inputs(grid, text, torch.bfloat16)
    qt, kt = layout.to_blocks(q), layout.to_blocks(k)
    ref = block_mass(qt, kt, block_size=128, group_size=32)
    qg, kg = group_means(qt, kt, 32)
    got, _ = grouped_block_estimate(
        qg, kg, seq_len=layout.seq_len, block_size=128, group_size=32, **launch
    )
    # tf32 (one MMA) keeps ~1e-3 relative on the logits, so more slack on the mass there.
    rel = 2e-2 if launch.get("precision") == "tf32" else 1e-3
    assert ((got - ref).abs() <= rel * ref.abs() + 1e-7).all()


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_check_finite_on_cuda(name, tiled):
    grid, text = CASES[0]
    q, k, v = _inputs(grid, text, torch.bfloat16)
    {"q": q, "k": k, "v": v}[name][1, 77, 2, 5] = float("nan")
    config = pasa.PASAConfig(density=0.3)
    with pytest.raises(ValueError, match=f"{name} contains NaN"):
        pasa.sparse_attention(q, k, v, grid=grid, num_text_tokens=text, config=config, tiled=tiled)


@pytest.mark.parametrize("group_size", [16, 32, 128])
def test_triton_group_means_match_group_pool(group_size):
    from pasa.estimate import group_pool
    from pasa.kernels.permute import group_means

    q, k, _ = _inputs(*CASES[0], torch.bfloat16)
    qg, kg = group_means(q, k.transpose(1, 2).contiguous().transpose(1, 2), group_size)
    assert torch.allclose(qg, group_pool(q, group_size)[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(kg, group_pool(k, group_size)[0], rtol=1e-5, atol=1e-6)


def test_triton_noise_is_bit_exact():
    from pasa.kernels.estimate_triton import routing_gumbel_triton

    ref = routing_gumbel(
        seed=11,
        step=4,
        layer=9,
        heads=torch.arange(5, 9),
        num_q_blocks=37,
        num_k_blocks=300,
        device="cuda",
    )
    got = routing_gumbel_triton(
        seed=11, step=4, layer=9, heads=4, head_offset=5, num_q=37, num_k=300, device="cuda"
    )
    assert torch.equal(got, ref)


BOUNDS = [(1, None), (3, 5)]  # (min_blocks, max_blocks): the second clips rows both ways


# How the local window enters routing: forced (the default), soft in every head, and trusted
# by no head (agreement 1 is out of reach of random inputs: every head soft, at the forced
# window's count; mixed heads are held to route.py in tests/test_kernels_cpu.py).
WINDOWS = [{}, {"window_bonus": 1.0}, {"window_trust": 1.0}]


@pytest.mark.parametrize("window", WINDOWS, ids=["forced", "soft", "trusted"])
@pytest.mark.parametrize("local_share", [0.0, 0.75])
@pytest.mark.parametrize("min_blocks,max_blocks", BOUNDS)
@pytest.mark.parametrize("selection", ["top_p", "top_k"])
@pytest.mark.parametrize("grid,text", CASES)
def test_gpu_plan_matches_route(grid, text, selection, min_blocks, max_blocks, local_share, window):
    """The fused estimate + GPU router give pasa/route.py's plan (no near-ties at these shapes)."""
    from pasa.attention import plan_blocks

    if local_share == 0.0 and window:
        pytest.skip("no window to enter routing")
    config = pasa.PASAConfig(
        density=0.3,
        selection=selection,
        seed=2,
        min_blocks=min_blocks,
        max_blocks=max_blocks,
        local_share=local_share,
        **window,
    )
    q, k, _ = _inputs(grid, text, torch.bfloat16)
    got = plan_blocks(q, k, grid=grid, config=config, num_text_tokens=text, step=3, layer=2)
    layout = make_layout(grid, num_text_tokens=text, device="cuda")
    mass = block_mass(
        layout.to_blocks(q), layout.to_blocks(k), block_size=128, group_size=config.group_size
    )
    ref = select_blocks(mass, layout=layout, config=config, step=3, layer=2)
    assert torch.equal(got.kv_counts, ref.kv_counts)
    assert torch.equal(got.kv_indices, ref.kv_indices)


@pytest.mark.parametrize("chunk", [2048, 128])
@pytest.mark.parametrize("selection", ["top_k", "top_p"])
def test_gpu_plan_matches_route_wan_rows(selection, chunk, monkeypatch):
    """591 blocks a row (Wan2.1-14B 720p grid, 2 heads): the register path of the top-k select,
    and (chunk 128) its streamed path. route.py ranks the mass of the same estimate kernel, so
    only the routing is compared."""
    from pasa.attention import plan_blocks
    from pasa.kernels import route_triton
    from pasa.kernels.estimate_triton import block_mass_triton

    monkeypatch.setattr(route_triton, "_TOPK_CHUNK", chunk)
    grid, text = (21, 45, 80), 0
    # local_share = 0: the router ranks all 591 blocks, the path this test is for (the local
    # window's forcing is held to route.py at small shapes in test_gpu_plan_matches_route).
    config = pasa.PASAConfig(density=0.1, selection=selection, seed=5, local_share=0.0)
    q, k, _ = _inputs(grid, text, torch.bfloat16, heads=2, batch=1)
    got = plan_blocks(q, k, grid=grid, config=config, step=1, layer=7)
    layout = make_layout(grid, device="cuda")
    mass = block_mass_triton(
        layout.to_blocks(q), layout.to_blocks(k), block_size=128, group_size=config.group_size
    )
    ref = select_blocks(mass, layout=layout, config=config, step=1, layer=7)
    assert got.kv_indices.shape[-1] == 591
    assert torch.equal(got.kv_counts, ref.kv_counts)
    # The router ranks the kernel's in-kernel log share, route.py the share torch computes from
    # the same mass: ulps apart. Random inputs give near-flat rows, so a near-tie at a row's cut
    # may swap a block (top-p at g = 64 did): allow one swap in 10,000 selected blocks.
    got_mask, ref_mask = got.to_dense_mask(), ref.to_dense_mask()
    swapped = int((got_mask & ~ref_mask).sum())
    assert swapped <= int(ref_mask.sum()) // 10_000


def test_gpu_topk_ties_lower_index_wins():
    """Equal keys (zero mass, temperature 0): the lowest-indexed blocks fill the count."""
    from pasa.kernels.route_triton import topk_plan

    n = 300
    scores = torch.zeros(1, 2, n, n, device="cuda")
    scores[0, 1, :, 150:] = 1.0  # head 1: blocks 150.. above the rest
    scores[..., torch.arange(n), torch.arange(n)] = float("inf")  # diagonal forced
    lo = torch.ones(n, dtype=torch.int32, device="cuda")
    hi = torch.full((n,), n, dtype=torch.int32, device="cuda")
    idx, cnt = topk_plan(scores, lo, hi, 30)
    assert (cnt == 30).all()
    for row in (0, 1, 149, 150, 299):
        want0 = sorted({row, *[j for j in range(n) if j != row][:29]})
        want1 = sorted({row, *[j for j in range(150, n) if j != row][:29]})
        assert idx[0, 0, row, :30].tolist() == want0
        assert idx[0, 1, row, :30].tolist() == want1
        assert (idx[0, :, row, 30:] == idx[0, :, row, 29:30]).all()  # padding repeats the last


def test_tiled_sparse_attention_matches_untiled():
    """sparse_attention(tiled=True) on pre-tiled inputs = the untiled call, re-ordered."""
    grid, text = CASES[0]
    q, k, v = _inputs(grid, text, torch.bfloat16)
    config = pasa.PASAConfig(density=0.4, backend="reference", check_finite=False)
    layout = make_layout(grid, num_text_tokens=text, device="cuda")
    want = pasa.sparse_attention(q, k, v, grid=grid, config=config, num_text_tokens=text)
    qt, kt, vt = (layout.to_blocks(t) for t in (q, k, v))
    got = pasa.sparse_attention(
        qt, kt, vt, grid=grid, config=config, num_text_tokens=text, tiled=True
    )
    assert (got.float() - layout.to_blocks(want).float()).abs().max().item() < 2e-2


@pytest.mark.parametrize("backend", ["flex", "fa4", "reference"])
def test_sparse_attention_cuda_end_to_end(backend):
    if available_backends("cuda")[backend] is not None:
        pytest.skip(available_backends("cuda")[backend])
    grid, text = CASES[0]
    q, k, v = _inputs(grid, text, torch.bfloat16)
    config = pasa.PASAConfig(density=0.4, backend=backend)
    out, lse = pasa.sparse_attention(
        q, k, v, grid=grid, config=config, num_text_tokens=text, return_lse=True
    )
    plan = pasa.plan_blocks(q, k, grid=grid, config=config, num_text_tokens=text)
    ref = pasa.sparse_attention(
        q.float(),
        k.float(),
        v.float(),
        grid=grid,
        num_text_tokens=text,
        config=config.replace(backend="reference"),
        plan=plan,
    )
    assert (out.float() - ref).abs().max().item() < 3e-2
    assert lse.shape == (2, 3, q.shape[1])


@pytest.mark.parametrize("approximate", ["taylor", "grouped_taylor", "group_means", "principal"])
@pytest.mark.parametrize("backend", ["flex", "reference"])
def test_approximate_branches_on_cuda_match_the_cpu(backend, approximate):
    """Each approximate branch on CUDA (bf16 inputs, the kernel's LSE; the Taylor and principal
    tails' Triton kernels) = the CPU's fp32 reference on the same plan."""
    grid, text = CASES[0]
    q, k, v = _inputs(grid, text, torch.bfloat16)
    config = pasa.PASAConfig(density=0.3, backend=backend, approximate=approximate)
    plan = pasa.plan_blocks(q, k, grid=grid, config=config, num_text_tokens=text)
    out = pasa.sparse_attention(q, k, v, grid=grid, config=config, num_text_tokens=text, plan=plan)
    cpu_layout = make_layout(grid, num_text_tokens=text)
    cpu_plan = type(plan)(plan.kv_indices.cpu(), plan.kv_counts.cpu(), cpu_layout)
    ref = pasa.sparse_attention(
        *(t.float().cpu() for t in (q, k, v)),
        grid=grid,
        num_text_tokens=text,
        config=config.replace(backend="reference"),
        plan=cpu_plan,
    )
    assert (out.float().cpu() - ref).abs().max().item() < 3e-2


@pytest.mark.parametrize("dim", [64, 128])
def test_taylor_kernel_matches_the_torch_tail_on_cuda(dim):
    """The Triton per-query kernel of the Taylor tail (bf16) = the torch path on the same plan."""
    from pasa.approximate import add_taylor_branch

    grid, text = CASES[0]
    q, k, v = _inputs(grid, text, torch.bfloat16, dim=dim)
    layout = make_layout(grid, num_text_tokens=text, device="cuda")
    qt, kt, vt = (layout.to_blocks(t) for t in (q, k, v))
    config = pasa.PASAConfig(density=0.3, backend="flex", approximate=False)
    out, lse, plan = pasa.sparse_attention(
        qt, kt, vt, grid=grid, config=config, num_text_tokens=text, tiled=True, return_lse=True,
        return_plan=True,
    )  # fmt: skip
    want, want_lse = add_taylor_branch(qt, kt, vt, plan, out, lse, kernel=False)
    got, got_lse = add_taylor_branch(qt, kt, vt, plan, out, lse, kernel=True)
    assert (got - want).abs().max().item() < 2e-2
    assert (got_lse - want_lse).abs().max().item() < 2e-2


@pytest.mark.parametrize("dim", [64, 128])
def test_principal_kernel_matches_the_torch_tail_on_cuda(dim):
    """The Triton per-query kernel of the principal tail (bf16 inputs, tf32 products) = the
    torch path on the same plan."""
    from pasa.approximate import add_principal_branch

    grid, text = CASES[0]
    q, k, v = _inputs(grid, text, torch.bfloat16, dim=dim)
    layout = make_layout(grid, num_text_tokens=text, device="cuda")
    qt, kt, vt = (layout.to_blocks(t) for t in (q, k, v))
    config = pasa.PASAConfig(density=0.3, backend="flex", approximate=False)
    out, lse, plan = pasa.sparse_attention(
        qt, kt, vt, grid=grid, config=config, num_text_tokens=text, tiled=True, return_lse=True,
        return_plan=True,
    )  # fmt: skip
    kw = dict(group_size=config.group_size)
    want, want_lse = add_principal_branch(qt, kt, vt, plan, out, lse, kernel=False, **kw)
    got, got_lse = add_principal_branch(qt, kt, vt, plan, out, lse, kernel=True, **kw)
    assert (got - want).abs().max().item() < 2e-2
    assert (got_lse - want_lse).abs().max().item() < 2e-2


def test_flex_no_recompile_on_new_plan():
    import torch._dynamo.utils as dyn_utils

    grid, text = CASES[0]
    layout = make_layout(grid, num_text_tokens=text, device="cuda")
    q, k, v = _inputs(grid, text, torch.bfloat16)
    qt, kt, vt = (layout.to_blocks(t) for t in (q, k, v))
    fn = get_backend("flex", "cuda").fn
    fn(qt, kt, vt, _plan(q, k, layout, 0.4))
    before = dyn_utils.counters["stats"]["unique_graphs"]
    fn(qt, kt, vt, _plan(q, k, layout, 0.7))
    assert dyn_utils.counters["stats"]["unique_graphs"] == before


def test_compile_fullgraph_cuda():
    grid, text = CASES[0]
    q, k, v = _inputs(grid, text, torch.bfloat16)
    config = pasa.PASAConfig(density=0.4, backend="flex")

    def f(q, k, v):
        return pasa.sparse_attention(q, k, v, grid=grid, config=config, num_text_tokens=text) * 2

    got = torch.compile(f, fullgraph=True)(q, k, v)
    assert torch.allclose(got, f(q, k, v))
