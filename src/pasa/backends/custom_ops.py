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
    approximate: str,
    backend: str,
    check_finite: bool,
    local_share: float,
    steady_window: bool,
    window_time_scale: float,
    window_bonus: float,
    window_trust: float,
    step: int,
    layer: int,
    density: float,
    head_offset: int,
    kv_indices: torch.Tensor | None,
    kv_counts: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out ``(B, S, H, D)`` and lse ``(B, H, S)`` fp32 of :func:`pasa.sparse_attention`.

    The config travels as its routing / kernel fields (``tile`` empty: "auto"; ``max_blocks``,
    ``window_bonus`` and ``window_trust`` -1: None; ``approximate`` "": False); ``density < 0``
    means ``config.density``; ``kv_indices`` / ``kv_counts`` a precomputed plan.
    """
    from pasa.attention import layout_for, sparse_attention
    from pasa.plan import BlockPlan

    config = config_from_args(
        [density_cfg, block_size, group_size, tile, temperature, selection, min_blocks,
         max_blocks, seed, approximate, backend, check_finite, local_share, steady_window,
         window_time_scale, window_bonus, window_trust]
    )  # fmt: skip
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


# The config fields the op carries, in its argument order: every field one call reads (the
# budget's fields are the caller's business: ``density`` arrives per call).
OP_FIELDS = (
    "density", "block_size", "group_size", "tile", "temperature", "selection", "min_blocks",
    "max_blocks", "seed", "approximate", "backend", "check_finite", "local_share", "steady_window",
    "window_time_scale", "window_bonus", "window_trust",
)  # fmt: skip


def config_args(config: PASAConfig) -> list:
    """The op's arguments for ``config``, in order (plain values Dynamo passes as constants):
    ``tile`` "auto" as ``[]``, ``max_blocks``, ``window_bonus`` and ``window_trust`` None as -1,
    numbers as float where the schema says float."""
    encode = {
        "density": float,
        "temperature": float,
        "local_share": float,
        "window_time_scale": float,
        "tile": lambda tile: [] if tile == "auto" else list(tile),
        "max_blocks": lambda blocks: -1 if blocks is None else blocks,
        "window_bonus": lambda bonus: -1.0 if bonus is None else float(bonus),
        "window_trust": lambda trust: -1.0 if trust is None else float(trust),
        "approximate": lambda approximate: approximate or "",
    }
    return [encode.get(name, lambda value: value)(getattr(config, name)) for name in OP_FIELDS]


def config_from_args(values: list) -> PASAConfig:
    """The :class:`PASAConfig` that :func:`config_args` encoded as ``values``."""
    fields = dict(zip(OP_FIELDS, values, strict=True))
    fields["tile"] = tuple(fields["tile"]) if fields["tile"] else "auto"
    fields["max_blocks"] = None if fields["max_blocks"] < 0 else fields["max_blocks"]
    for name in ("window_bonus", "window_trust"):
        fields[name] = None if fields[name] < 0 else fields[name]
    fields["approximate"] = fields["approximate"] or False
    return PASAConfig(**fields, min_step_density=fields["density"])
