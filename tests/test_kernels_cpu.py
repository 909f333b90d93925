"""PASA's Triton kernels on CPU through Triton's interpreter (``TRITON_INTERPRET=1``).

The interpreter is decided when kernels are defined, so the checks run in a subprocess of their
own; the parent test skips cleanly when the interpreter cannot run a trivial kernel here. What
this covers: indexing, masking, ragged edges, the radix select and the plan layout. What it does
not: the bf16 products (the interpreter's bf16 ``tl.dot`` is wrong, so the block sums use fp32
there) and performance; tests/test_gpu_backends.py holds those on CUDA.

Shapes are tiny (<= 10 blocks): the interpreter runs every program in Python.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pasa

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
in_child = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess of test_kernels_interpreted"
)
# (grid, text tokens): ragged last block with text; 3 blocks exactly-ish; one frame, odd width.
CASES = [((4, 16, 20), 5), ((3, 10, 12), 0), ((1, 7, 97), 13)]

_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def k(x):
    i = tl.arange(0, 16)
    tl.store(x + i, tl.cumsum(tl.load(x + i), 0))
x = torch.ones(16)
k[(1,)](x)
assert x[-1].item() == 16
"""


def _child_env() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    src = str(Path(pasa.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    return env


def test_kernels_interpreted():
    if INTERPRETED:
        pytest.skip("this is the interpreted subprocess itself")
    pytest.importorskip("triton")
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE], env=_child_env(), capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"Triton's interpreter does not run here: {probe.stderr.strip()[-300:]}")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
        env=_child_env(),
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def _qk(grid, text, heads=2, dim=64, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = grid[0] * grid[1] * grid[2] + text
    return [
        torch.randn(batch, seq, heads, dim, generator=g).mul(1.5).to(torch.bfloat16)
        for _ in range(2)
    ]


@in_child
@pytest.mark.parametrize("group_size", [16, 32, 128])
def test_group_means_match_group_pool(group_size):
    from pasa.estimate import group_pool
    from pasa.kernels.permute import group_means

    q, k = _qk((3, 10, 12), 7)
    qg, kg = group_means(q, k.transpose(1, 2).contiguous().transpose(1, 2), group_size)
    assert torch.allclose(qg, group_pool(q, group_size)[0], rtol=1e-6, atol=1e-6)
    assert torch.allclose(kg, group_pool(k, group_size)[0], rtol=1e-6, atol=1e-6)


@in_child
@pytest.mark.parametrize("group_size", [16, 32, 128])
@pytest.mark.parametrize("grid,text", CASES[:2])
def test_block_mass_matches_torch(grid, text, group_size):
    from pasa.estimate import block_mass
    from pasa.kernels.estimate_triton import block_mass_triton
    from pasa.layout import make_layout

    layout = make_layout(grid, num_text_tokens=text)
    q, k = (layout.to_blocks(t) for t in _qk(grid, text))
    ref = block_mass(q, k, block_size=128, group_size=group_size)
    # tf32x3: Triton's interpreter computes bf16 dots wrongly, so the default bf16x3 is held to
    # the same bound on the GPU only (tests/test_gpu_backends.py).
    got = block_mass_triton(q, k, block_size=128, group_size=group_size, precision="tf32x3")
    assert ((got - ref).abs() <= 1e-3 * ref.abs() + 1e-7).all()


@in_child
@pytest.mark.parametrize(
    "selection,min_blocks,max_blocks,local_share,window_bonus,window_trust",
    [("top_k", 1, None, 0.0, None, None), ("top_k", 3, 4, 0.0, None, None),
     ("top_p", 2, 6, 0.0, None, None), ("top_k", 1, None, 0.5, None, None),
     ("top_p", 2, 6, 0.5, None, None), ("top_k", 1, None, 0.5, 1.0, None),
     ("top_p", 2, 6, 0.5, 1.0, None), ("top_k", 1, None, 0.5, 2.0, 0.0),
     ("top_k", 1, None, 0.5, 2.0, 1.0), ("top_p", 2, 6, 0.5, None, 1.0),
     ("top_k", 1, None, 0.75, None, 0.7)],
)  # fmt: skip
@pytest.mark.parametrize("grid,text", CASES)
def test_plan_matches_route(grid, text, selection, min_blocks, max_blocks, local_share,
                            window_bonus, window_trust):  # fmt: skip
    """Fused estimate + routing kernels give pasa/route.py's plan (temperature > 0: no ties),
    with the local window forced, soft or trusted (every head, or none)."""
    from pasa.estimate import block_mass
    from pasa.kernels.permute import group_means
    from pasa.kernels.pipeline import plan_from_means
    from pasa.layout import make_layout
    from pasa.route import select_blocks

    config = pasa.PASAConfig(density=0.35, selection=selection, min_blocks=min_blocks,
                             max_blocks=max_blocks, seed=4, local_share=local_share,
                             window_bonus=window_bonus, window_trust=window_trust)  # fmt: skip
    layout = make_layout(grid, num_text_tokens=text)
    q, k = (layout.to_blocks(t) for t in _qk(grid, text, batch=2))
    qg, kg = group_means(q, k, config.group_size)
    where = dict(layout=layout, config=config, density=0.35, step=3, layer=1)
    got = plan_from_means(qg, kg, head_offset=2, **where)
    mass = block_mass(q, k, block_size=128, group_size=config.group_size)
    ref = select_blocks(mass, head_offset=2, **where)
    assert torch.equal(got.kv_counts, ref.kv_counts)
    assert torch.equal(got.kv_indices, ref.kv_indices)


@in_child
def test_topk_ties_lower_index_wins():
    """Equal keys (zero mass, temperature 0): the lowest-indexed blocks fill the count."""
    from pasa.kernels.route_triton import topk_plan

    n = 9
    scores = torch.zeros(1, 2, n, n)
    scores[0, 1, :, 5:] = 1.0  # head 1: blocks 5.. above the rest
    scores[..., torch.arange(n), torch.arange(n)] = float("inf")  # diagonal forced
    lo = torch.ones(n, dtype=torch.int32)
    hi = torch.full((n,), n, dtype=torch.int32)
    idx, cnt = topk_plan(scores, lo, hi, 3)
    assert (cnt == 3).all()
    for row in range(n):
        want0 = sorted({row, *[j for j in range(n) if j != row][:2]})
        want1 = sorted({row, *[j for j in range(5, n) if j != row][:2]})
        assert idx[0, 0, row, :3].tolist() == want0
        assert idx[0, 1, row, :3].tolist() == want1
        assert (idx[0, :, row, 3:] == idx[0, :, row, 2:3]).all()  # padding repeats the last


@in_child
def test_topk_long_rows_streamed():
    """Rows longer than the register chunk take the streamed path; same plan."""
    from pasa.kernels import route_triton
    from pasa.kernels.route_triton import topk_plan

    g = torch.Generator().manual_seed(1)
    n = 40
    scores = torch.randn(1, 1, n, n, generator=g)
    scores[..., torch.arange(n), torch.arange(n)] = float("inf")
    scores[0, 0, 3, 10:20] = 0.5  # exact ties across chunk borders
    lo = torch.ones(n, dtype=torch.int32)
    hi = torch.full((n,), n, dtype=torch.int32)
    want = topk_plan(scores, lo, hi, 13)
    old = route_triton._TOPK_CHUNK
    route_triton._TOPK_CHUNK = 16  # 40 keys -> three chunks
    try:
        got = topk_plan(scores, lo, hi, 13)
    finally:
        route_triton._TOPK_CHUNK = old
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@in_child
@pytest.mark.parametrize("chunk", [None, 16])  # registers, and streamed in three chunks
def test_topk_forced_window_reads_as_inf(chunk):
    """A forced mask gives the plan of the same keys with those blocks set to +inf (the local
    window), with ties and rows that stop the radix select early or run all 32 bits."""
    from pasa.kernels import route_triton
    from pasa.kernels.route_triton import topk_plan

    g = torch.Generator().manual_seed(2)
    n = 40
    scores = torch.randn(2, 3, n, n, generator=g)
    scores[0, 1, 5, :] = 0.25  # a whole row of ties: all 32 bits, lower indices win
    scores[1, 2, 7, 20:] = -1.0  # ties at the cut
    forced = torch.rand(n, n, generator=g) < 0.15
    forced |= torch.eye(n, dtype=torch.bool)
    lo = forced.sum(-1).to(torch.int32)
    hi = torch.full((n,), n, dtype=torch.int32)
    old = route_triton._TOPK_CHUNK
    route_triton._TOPK_CHUNK = chunk or old
    try:
        got = topk_plan(scores, lo, hi, 11, forced=forced.to(torch.int8))
        want = topk_plan(scores.masked_fill(forced, float("inf")), lo, hi, 11)
    finally:
        route_triton._TOPK_CHUNK = old
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # and both are the top-count by a stable descending sort of the forced keys
    keys = scores.masked_fill(forced, float("inf"))
    count = torch.maximum(lo, torch.tensor(11, dtype=torch.int32))
    for b, h, row in ((0, 1, 5), (1, 2, 7), (0, 0, 0), (1, 1, 39)):
        c = int(count[row])
        top = keys[b, h, row].argsort(descending=True, stable=True)[:c].sort().values
        assert got[0][b, h, row, :c].tolist() == top.tolist()


@in_child
@pytest.mark.parametrize("chunk", [None, 16])  # registers, and streamed in three chunks
def test_topk_window_values_read_in_place(chunk):
    """A window mask with per-head values (+inf in some heads, a bonus in others: a trusted
    window) gives the plan of the keys with the values added (route.py's WindowRouting.keys),
    ties at the cut included."""
    from pasa.kernels import route_triton
    from pasa.kernels.route_triton import topk_plan

    g = torch.Generator().manual_seed(3)
    n = 40
    scores = torch.randn(2, 3, n, n, generator=g)
    scores[..., torch.arange(n), torch.arange(n)] = float("inf")  # the diagonal, as routed
    scores[1, 0, 7, 20:] = -1.0  # ties at the cut
    window = torch.rand(n, n, generator=g) < 0.2
    value = torch.tensor([[float("inf"), 1.0, 0.0], [2.5, float("inf"), 1.0]])
    lo = torch.ones(n, dtype=torch.int32)
    hi = torch.full((n,), n, dtype=torch.int32)
    old = route_triton._TOPK_CHUNK
    route_triton._TOPK_CHUNK = chunk or old
    try:
        got = topk_plan(scores, lo, hi, 9, forced=window.to(torch.int8), value=value.reshape(-1))
        keys = scores + torch.where(window, value[:, :, None, None], 0.0)
        want = topk_plan(keys, lo, hi, 9)
    finally:
        route_triton._TOPK_CHUNK = old
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="value needs forced"):
        topk_plan(scores, lo, hi, 9, value=value.reshape(-1))


@in_child
@pytest.mark.parametrize(
    "tail,grid,text,block_size,dim,options",
    [
        ("taylor", (5, 9, 11), 0, 64, 16, {}),
        ("taylor", (3, 10, 12), 7, 128, 32, {}),
        ("principal", (5, 9, 11), 0, 64, 16, {"group_size": 32, "rank": 2}),
        ("principal", (3, 10, 12), 7, 128, 32, {"group_size": 64, "rank": 4}),
    ],
)
def test_tail_kernels_match_the_torch_tails(tail, grid, text, block_size, dim, options):
    """The Triton per-query part of the Taylor and principal tails = their torch statements
    (fp32: the interpreter's bf16 dot is wrong), ragged last block (and group), batch 2, a
    strided ``out``, a row without a tail."""
    from pasa.approximate import add_principal_branch, add_taylor_branch
    from pasa.layout import make_layout
    from pasa.plan import BlockPlan

    branch = {"taylor": add_taylor_branch, "principal": add_principal_branch}[tail]
    layout = make_layout(grid, block_size=block_size, num_text_tokens=text)
    g = torch.Generator().manual_seed(1)
    seq = grid[0] * grid[1] * grid[2] + text
    q, k, v = (torch.randn(2, seq, 3, dim, generator=g) for _ in range(3))
    n = layout.num_blocks
    mask = torch.rand(2, 3, n, n, generator=g) < 0.3
    mask |= torch.eye(n, dtype=torch.bool)
    mask[:, :, -1] = True  # a row without a tail
    plan = BlockPlan.from_dense_mask(mask, layout)
    out = torch.randn(2, 3, seq, dim, generator=g).transpose(1, 2)  # strided, as kernels return
    lse = torch.randn(2, 3, seq, generator=g)
    want, want_lse = branch(q, k, v, plan, out, lse, kernel=False, **options)
    got, got_lse = branch(q, k, v, plan, out, lse, kernel=True, **options)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-4, rtol=1e-5)
