"""``torch.library`` wrapping: ``sparse_attention`` as one opaque op inside ``torch.compile``.

Estimation, routing and the kernels synchronise nowhere, but they read Python-side state (cached
layouts, the routing-noise key, the backend registry) that Dynamo should not trace. Under
``torch.compile`` :func:`pasa.sparse_attention` therefore calls ``pasa::sparse_attention``, whose
fake implementation gives the output shapes, so ``fullgraph=True`` holds.
"""

from __future__ import annotations

import torch

from pasa.config import PASAConfig


@torch.library.custom_op("pasa::sparse_attention", mutates_args=())
def sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: list[int],
    num_text_tokens: int,
    density_cfg: float,
    block_size: int,
    group_size: int,
    tile: list[int],
    temperature: float,
    selection: str,
    min_blocks: int,
    max_blocks: int,
    seed: int,
    approximate: bool,
    backend: str,
    check_finite: bool,
    local_share: float,
    steady_window: bool,
    step: int,
    layer: int,
    density: float,
    head_offset: int,
    kv_indices: torch.Tensor | None,
    kv_counts: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out ``(B, S, H, D)`` and lse ``(B, H, S)`` fp32 of :func:`pasa.sparse_attention`.

    The config travels as its routing / kernel fields (``tile`` empty: "auto"; ``max_blocks``
    -1: None); ``density < 0`` means ``config.density``; ``kv_indices`` / ``kv_counts`` a
    precomputed plan.
    """
    from pasa.attention import layout_for, sparse_attention
    from pasa.plan import BlockPlan

    config = config_from_args(
        density_cfg,
        block_size,
        group_size,
        tile,
        temperature,
        selection,
        min_blocks,
        max_blocks,
        seed,
        approximate,
        backend,
        check_finite,
        local_share,
        steady_window,
    )
    plan = None
    if kv_indices is not None and kv_counts is not None:
        layout = layout_for(q, grid=tuple(grid), config=config, num_text_tokens=num_text_tokens)
        plan = BlockPlan(kv_indices, kv_counts, layout)
    out, lse = sparse_attention(
        q,
        k,
        v,
        grid=tuple(grid),
        config=config,
        step=step,
        layer=layer,
        num_text_tokens=num_text_tokens,
        return_lse=True,
        plan=plan,
        density=None if density < 0 else density,
        head_offset=head_offset,
    )
    return out, lse


@sparse_attention_op.register_fake
def _(q, k, v, grid, num_text_tokens, *args):
    batch, seq, heads, _ = q.shape
    return torch.empty_like(q), q.new_empty((batch, heads, seq), dtype=torch.float32)


def config_args(config: PASAConfig) -> list:
    """The op's arguments for ``config``, in order (plain values Dynamo passes as constants)."""
    return [
        float(config.density),
        config.block_size,
        config.group_size,
        [] if config.tile == "auto" else list(config.tile),
        float(config.temperature),
        config.selection,
        config.min_blocks,
        -1 if config.max_blocks is None else config.max_blocks,
        config.seed,
        config.approximate,
        config.backend,
        config.check_finite,
        float(config.local_share),
        config.steady_window,
    ]


def config_from_args(
    density: float,
    block_size: int,
    group_size: int,
    tile: list[int],
    temperature: float,
    selection: str,
    min_blocks: int,
    max_blocks: int,
    seed: int,
    approximate: bool,
    backend: str,
    check_finite: bool,
    local_share: float,
    steady_window: bool,
) -> PASAConfig:
    """The :class:`PASAConfig` that :func:`config_args` encoded: every field one call reads (the
    budget's fields are the caller's business: ``density`` arrives per call)."""
    return PASAConfig(
        density=density,
        block_size=block_size,
        group_size=group_size,
        tile=tuple(tile) if tile else "auto",
        temperature=temperature,
        selection=selection,  # type: ignore[arg-type]
        min_blocks=min_blocks,
        max_blocks=None if max_blocks < 0 else max_blocks,
        seed=seed,
        min_step_density=density,
        approximate=approximate,
        backend=backend,
        check_finite=check_finite,
        local_share=local_share,
        steady_window=steady_window,
    )
