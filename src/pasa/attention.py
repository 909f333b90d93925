"""``sparse_attention``: validate, plan, dispatch to a backend, restore token order."""

from __future__ import annotations

import torch

from pasa.approximate import (
    add_approximate_branch,
    add_grouped_taylor_branch,
    add_principal_branch,
    add_taylor_branch,
)
from pasa.backends.registry import get_backend
from pasa.config import PASAConfig
from pasa.estimate import block_mass_from_means, group_pool
from pasa.layout import Grid, TokenLayout, make_layout
from pasa.plan import BlockPlan
from pasa.route import select_blocks

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def validate_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: Grid,
    num_text_tokens: int,
    check_finite: bool,
) -> None:
    """Raise ValueError naming the problem if q, k, v cannot go through PASA."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (B, S, H, D), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has unsupported dtype {t.dtype}: use fp16, bf16 or fp32")
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(
            "q, k, v must have the same shape (B, S, H, D) for self-attention, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if len({q.device, k.device, v.device}) != 1:
        raise ValueError("q, k, v must be on the same device")
    _, seq, _, dim = q.shape
    if dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {dim} is larger than the supported {MAX_HEAD_DIM}")
    if len(grid) != 3 or any(int(g) < 1 for g in grid):
        raise ValueError(f"grid must be three positive ints (F, H, W), got {tuple(grid)}")
    if num_text_tokens < 0:
        raise ValueError(f"num_text_tokens must be >= 0, got {num_text_tokens}")
    f, h, w = (int(g) for g in grid)
    if seq != f * h * w + num_text_tokens:
        raise ValueError(
            f"sequence length {seq} != F*H*W + num_text_tokens = {f}*{h}*{w} + {num_text_tokens}"
            f" = {f * h * w + num_text_tokens}"
        )
    if check_finite:
        assert_finite({"q": q, "k": k, "v": v})


class FiniteChecks:
    """Finiteness flags kept on the GPU and checked later, all with one host sync.

    ``sparse_attention(..., finite_checks=checks)`` adds its flags here instead of synchronising
    on every call; :meth:`raise_if_any` (the diffusers hook calls it after each model forward)
    raises for the first call that saw NaN or Inf.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[tuple[str, ...], str, torch.Tensor]] = []

    def add(self, names: tuple[str, ...], flags: torch.Tensor, where: str = "") -> None:
        """Flags (bool, one per name; True = finite) of one call, still on the device."""
        self._pending.append((names, where, flags))

    def clear(self) -> None:
        self._pending = []

    def raise_if_any(self) -> None:
        """Raise ValueError naming the first non-finite tensor; forget the flags either way."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        flat = torch.cat([flags.to(pending[0][2].device) for _, _, flags in pending]).tolist()
        i = 0
        for names, where, _ in pending:
            for name in names:
                if not flat[i]:
                    at = f" ({where})" if where else ""
                    raise ValueError(
                        f"{name} contains NaN or Inf{at} (set PASAConfig(check_finite=False) to "
                        "skip this check)"
                    )
                i += 1


def assert_finite(
    tensors: dict[str, torch.Tensor],
    means: dict | None = None,
    *,
    defer: FiniteChecks | None = None,
    where: str = "",
) -> None:
    """Raise ValueError naming the first tensor that holds NaN or Inf; one host sync in all.

    A tensor is read once (``aminmax``: NaN and Inf reach its min or max); one whose ``(B, H, NG,
    D)`` fp32 group means are in ``means`` is judged by them instead (a NaN or Inf in a group makes
    its mean non-finite; so do magnitudes beyond ~1e37, outside any usable attention input).
    With ``defer`` the flags go there and nothing synchronises now.
    """
    means = means or {}
    flags = []
    for name, t in tensors.items():
        if name in means:
            flags.append(torch.isfinite(means[name]).all())
        else:
            lo, hi = torch.aminmax(t)
            flags.append(torch.isfinite(lo) & torch.isfinite(hi))
    checks = defer if defer is not None else FiniteChecks()
    checks.add(tuple(tensors), torch.stack(flags), where)
    if defer is None:
        checks.raise_if_any()


def layout_for(
    q: torch.Tensor, *, grid: Grid, config: PASAConfig, num_text_tokens: int = 0
) -> TokenLayout:
    """The token layout ``config`` gives a call with this grid and text length."""
    return make_layout(
        grid,
        block_size=config.block_size,
        tile=config.tile,
        num_text_tokens=num_text_tokens,
        device=q.device,
    )


def plan_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    grid: Grid,
    config: PASAConfig,
    step: int = 0,
    layer: int = 0,
    num_text_tokens: int = 0,
    density: float | None = None,
    head_offset: int = 0,
    tiled: bool = False,
) -> BlockPlan:
    """Estimate block importance and route: the plan ``sparse_attention`` would compute.

    Args:
        q, k: ``(B, S, H, D)``, video tokens frame-major then ``num_text_tokens`` text tokens
            (already in the tiled order of ``pasa.make_layout`` when ``tiled``).
        density: overrides ``config.density`` for this call (the per-step budget).
        head_offset: global index of local head 0 (context parallelism).
    Returns:
        :class:`BlockPlan` with ``kv_indices (B, H, Nq, Kmax)`` in the tiled block order.
    """
    layout = layout_for(q, grid=grid, config=config, num_text_tokens=num_text_tokens)
    want = _resolve_density(config, density)
    fast = _fast_path(q, config)
    if want >= 1.0:
        return BlockPlan.full(layout, q.shape[0], q.shape[2], q.device)
    if tiled:
        qg, kg = (fast.group_means if fast is not None else _pool)(q, k, config.group_size)
    elif fast is not None:
        _, qg = fast.gather_tokens(q, layout.perm, pool_group=config.group_size)
        _, kg = fast.gather_tokens(k, layout.perm, pool_group=config.group_size)
    else:
        qg, kg = _pool(layout.to_blocks(q), layout.to_blocks(k), config.group_size)
    return _plan_from_means(qg, kg, layout, config, want, step, layer, head_offset, fast)


def _pool(q: torch.Tensor, k: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return group_pool(q, group_size)[0], group_pool(k, group_size)[0]


def _resolve_density(config: PASAConfig, density: float | None) -> float:
    density = config.density if density is None else float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density!r} is invalid: allowed a number in (0, 1]")
    return density


def _plan_from_means(
    qg: torch.Tensor,
    kg: torch.Tensor,
    layout: TokenLayout,
    config: PASAConfig,
    density: float,
    step: int,
    layer: int,
    head_offset: int,
    fast,
) -> BlockPlan:
    """Estimate + routing from ``(B, H, NG, D)`` fp32 group means (fused kernels on CUDA)."""
    where = dict(config=config, density=density, step=step, layer=layer, head_offset=head_offset)
    if fast is not None:
        return fast.plan_from_means(qg, kg, layout=layout, **where)
    counts = torch.full((qg.shape[2],), float(config.group_size), device=qg.device)
    counts[-1] = layout.seq_len - (qg.shape[2] - 1) * config.group_size
    mass = block_mass_from_means(
        qg, kg, counts, block_size=config.block_size, group_size=config.group_size
    )
    return select_blocks(mass, layout=layout, **where)


def _fast_path(q: torch.Tensor, config: PASAConfig):
    """pasa.kernels.pipeline when the Triton path serves this call (CUDA), else None."""
    if q.device.type != "cuda":
        return None
    from pasa.kernels import pipeline

    return pipeline if pipeline.fast_path_unavailable(q, config) is None else None


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    grid: Grid,
    config: PASAConfig,
    step: int = 0,
    layer: int = 0,
    num_text_tokens: int = 0,
    return_lse: bool = False,
    plan: BlockPlan | None = None,
    density: float | None = None,
    head_offset: int = 0,
    tiled: bool = False,
    return_plan: bool = False,
    finite_checks: FiniteChecks | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """PASA block-sparse self-attention.

    Args:
        q, k, v: ``(B, S, H, D)`` (the diffusers / FlashAttention layout), fp16 / bf16 / fp32,
            ``S = F*H*W + num_text_tokens``: video tokens frame-major, then text tokens.
        grid: ``(F, H, W)`` video token grid.
        config: :class:`PASAConfig`.
        step, layer: denoising step and layer index; they key the routing noise.
        num_text_tokens: text tokens at the end of the sequence (joint attention).
        return_lse: also return the log-sum-exp ``(B, H, S)`` fp32, natural log.
        plan: a precomputed :class:`BlockPlan` (from :func:`plan_blocks`); skips estimate and
            routing.
        density: overrides ``config.density`` for this call; 1 computes every block.
        head_offset: global index of local head 0 (context parallelism).
        tiled: q, k, v are already in the tiled order of ``pasa.make_layout(grid, ...)`` and the
            output (and LSE) stay in it: for callers that keep that order across many layers,
            so the re-ordering is paid once, not per call.
        return_plan: also return the :class:`BlockPlan` that was computed (last element).
        finite_checks: with ``config.check_finite``, collect the check's flags here instead of
            synchronising with the host on this call (see :class:`FiniteChecks`).
    Returns:
        ``(B, S, H, D)`` in the input dtype; then the LSE when ``return_lse``; then the plan
        when ``return_plan``.

    Example:
        >>> import torch, pasa
        >>> q = k = v = torch.randn(1, 4 * 16 * 16, 2, 64)
        >>> out = pasa.sparse_attention(q, k, v, grid=(4, 16, 16), config=pasa.PASAConfig(density=0.25))
        >>> out.shape
        torch.Size([1, 1024, 2, 64])
    """
    if torch.compiler.is_compiling():  # one opaque op: fullgraph-safe (pasa/backends/custom_ops.py)
        if tiled or return_plan:
            raise ValueError(
                "tiled=True and return_plan=True are not supported under torch.compile"
            )
        from pasa.backends.custom_ops import config_args, sparse_attention_op

        out, lse = sparse_attention_op(
            q,
            k,
            v,
            [int(g) for g in grid],
            num_text_tokens,
            *config_args(config),
            step,
            layer,
            -1.0 if density is None else float(density),
            head_offset,
            None if plan is None else plan.kv_indices,
            None if plan is None else plan.kv_counts,
        )
        return (out, lse) if return_lse else out
    # Finiteness is checked below, from the group means where the estimate takes them anyway.
    validate_qkv(q, k, v, grid=grid, num_text_tokens=num_text_tokens, check_finite=False)
    want = _resolve_density(config, density)
    backend = get_backend(config.backend, q.device)
    layout = layout_for(q, grid=grid, config=config, num_text_tokens=num_text_tokens)
    fast = _fast_path(q, config)
    pool = config.group_size if plan is None and want < 1.0 else None
    # q, k, v in tiled order (B, S, H, D), and the group means the estimate reads.
    qg = kg = None
    if tiled:
        qt, kt, vt = q, k, v
    elif fast is not None:  # one Triton gather per tensor, group means taken on the way
        qt, kt, vt, qg, kg = fast.to_tiled(q, k, v, layout, pool)
    else:
        qt, kt, vt = layout.to_blocks(q), layout.to_blocks(k), layout.to_blocks(v)
    if pool is not None and qg is None:  # tiled inputs: pool q and k where they lie
        qg, kg = fast.group_means(qt, kt, pool) if fast is not None else _pool(qt, kt, pool)
    if config.check_finite:
        assert_finite(
            {"q": q, "k": k, "v": v},
            None if qg is None else {"q": qg, "k": kg},
            defer=finite_checks,
            where=f"layer {layer}, step {step}",
        )
    if plan is None:
        plan = (
            BlockPlan.full(layout, q.shape[0], q.shape[2], q.device)
            if pool is None
            else _plan_from_means(qg, kg, layout, config, want, step, layer, head_offset, fast)
        )
    elif plan.layout.num_blocks != layout.num_blocks or plan.kv_counts.shape != (
        q.shape[0],
        q.shape[2],
        layout.num_blocks,
    ):
        raise ValueError(
            f"plan of shape {tuple(plan.kv_counts.shape)} does not fit this call "
            f"(B, H, Nq) = ({q.shape[0]}, {q.shape[2]}, {layout.num_blocks})"
        )
    out, lse = backend.fn(qt, kt, vt, plan)
    if config.approximate == "taylor":
        out, lse = add_taylor_branch(qt, kt, vt, plan, out, lse)
    elif config.approximate == "grouped_taylor":
        out, lse = add_grouped_taylor_branch(
            qt, kt, vt, plan, out, lse, group_size=config.group_size
        )
    elif config.approximate == "principal":
        out, lse = add_principal_branch(
            qt, kt, vt, plan, out, lse, group_size=config.group_size, rank=config.tail_rank
        )
    elif config.approximate:
        out, lse = add_approximate_branch(qt, kt, vt, plan, out, lse, group_size=config.group_size)
    out = out.to(q.dtype)
    if not tiled:
        out = fast.from_tiled(out, layout) if fast is not None else layout.from_blocks(out)
        if return_lse:
            lse = layout.from_blocks(lse, dim=2)
    result = (out, lse) if return_lse else (out,)
    if return_plan:
        result = (*result, plan)
    return result if len(result) > 1 else out
