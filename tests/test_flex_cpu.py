"""CPU tests (fast, CI): the flex backend against the reference, and ``torch.compile(fullgraph=True)``
of a function that calls ``sparse_attention`` (reference backend, through ``pasa::sparse_attention``).

Shapes are tiny (eager FlexAttention on CPU materialises S x S) yet keep a ragged text block,
batch 2 and per-head different block counts.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import pasa
from pasa.backends.reference import reference_block_attention
from pasa.backends.registry import available_backends, get_backend
from pasa.estimate import block_mass
from pasa.layout import make_layout
from pasa.route import select_blocks

GRID, TEXT = (3, 10, 12), 7  # 367 tokens: 2 full blocks + a ragged block holding the text


def _case(seed=0, density=0.5):
    torch.manual_seed(seed)
    layout = make_layout(GRID, num_text_tokens=TEXT)
    q, k, v = (torch.randn(2, layout.seq_len, 2, 32) for _ in range(3))
    qt, kt, vt = (layout.to_blocks(t) for t in (q, k, v))
    mass = block_mass(qt, kt, block_size=128, group_size=32)
    plan = select_blocks(mass, layout=layout, config=pasa.PASAConfig(density=density, seed=seed))
    return q, k, v, qt, kt, vt, plan


@pytest.mark.parametrize("seed", [0, 1])
def test_flex_cpu_matches_reference(seed):
    if available_backends("cpu")["flex"] is not None:
        pytest.skip(available_backends("cpu")["flex"])
    *_, qt, kt, vt, plan = _case(seed)
    ref_out, ref_lse = reference_block_attention(qt, kt, vt, plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
        out, lse = get_backend("flex", "cpu").fn(qt, kt, vt, plan)
    assert out.shape == qt.shape and lse.shape == ref_lse.shape
    torch.testing.assert_close(out.float(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_auto_never_picks_flex_on_cpu():
    assert get_backend("auto", "cpu").name == "reference"


def test_fa4_on_cpu_raises_with_reason():
    with pytest.raises(RuntimeError, match=r"fa4.*CUDA"):
        get_backend("fa4", "cpu")


def test_compile_fullgraph_reference_cpu():
    q, k, v, *_ = _case()
    config = pasa.PASAConfig(density=0.5, backend="reference")

    def f(q, k, v):
        out, lse = pasa.sparse_attention(
            q, k, v, grid=GRID, config=config, num_text_tokens=TEXT, step=2, return_lse=True
        )
        return out + 1, lse

    got, got_lse = torch.compile(f, fullgraph=True)(q, k, v)
    want, want_lse = f(q, k, v)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_lse, want_lse)


def test_compiled_op_carries_every_field_a_call_reads():
    """The custom op rebuilds the config from its arguments: every field but the budget's
    (``density`` arrives per call) must survive the trip, or compiled calls route differently."""
    from dataclasses import fields

    from pasa.backends.custom_ops import config_args, config_from_args

    config = pasa.PASAConfig(
        density=0.3, block_size=64, group_size=32, tile=(2, 4, 8), temperature=0.5,
        selection="top_p", local_share=0.4, steady_window=False, min_blocks=2, max_blocks=9,
        seed=3, approximate=True, backend="reference", check_finite=False, window_time_scale=0.7,
        window_bonus=1.5, window_trust=0.6,
    )  # fmt: skip
    back = config_from_args(config_args(config))
    assert config_from_args(config_args(config.replace(window_bonus=None))).window_bonus is None
    assert config_from_args(config_args(config.replace(window_trust=None))).window_trust is None
    budget_fields = {"budget", "dense_quantile", "min_step_density", "profile_path"}
    for f in fields(pasa.PASAConfig):
        if f.name not in budget_fields:
            assert getattr(back, f.name) == getattr(config, f.name), f.name


def test_compiled_call_routes_like_eager_without_the_window():
    """local_share=0 under torch.compile: the op must not fall back to the default window."""
    grid = (4, 16, 16)  # 8 blocks: the default window would force 3 of a row's 4
    q, k, v = (torch.randn(1, 1024, 2, 32, generator=torch.Generator().manual_seed(i))
               for i in range(3))  # fmt: skip
    config = pasa.PASAConfig(density=0.5, local_share=0.0, backend="reference")

    def f(q, k, v):
        return pasa.sparse_attention(q, k, v, grid=grid, config=config, step=1)

    want = f(q, k, v)
    windowed = pasa.sparse_attention(
        q, k, v, grid=grid, config=config.replace(local_share=0.75), step=1
    )
    assert not torch.allclose(windowed, want)  # the case tells the two apart
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), want)
