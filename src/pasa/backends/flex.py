"""FlexAttention backend: the portable block-sparse kernel (any CUDA GPU; CPU for tests).

Every planned block is handed to ``BlockMask.from_kv_blocks`` as a *full* block (no mask
evaluated inside it), except a ragged last key block, which is partial with ``mask_mod``
``kv < S``. On CUDA ``flex_attention`` is compiled once per process with ``dynamic=False``: a new shape
compiles once, a new plan of the same shape reuses the compiled kernel (``kv_indices`` keeps
``Kmax = N``, so its shape never depends on the plan). On CPU (tests) compiled FlexAttention returns
no LSE, so the eager implementation runs; it evaluates only ``mask_mod``, which then reads the
plan's dense block mask.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from pasa.plan import BlockPlan


def flex_unavailable(device: torch.device) -> str | None:
    """None when FlexAttention can run on ``device``, else why not."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as exc:  # torch < 2.5
        return f"torch {torch.__version__} has no FlexAttention ({exc})"
    if device.type not in ("cuda", "cpu"):
        return f"FlexAttention does not run on {device.type}"
    return None


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


# Compiled FlexAttention's forward tile on CUDA, by (compute capability, head dim), for bf16 /
# fp16 (torch's own choice elsewhere). Every plan keeps each row's diagonal block, so no row is
# ever fully masked: ROWS_GUARANTEED_SAFE skips the kernel's guard for that case.
_SAFE_ROWS = {"ROWS_GUARANTEED_SAFE": True}
# H100 (sm_90), D = 128, Wan2.1-14B 720p at density 0.1 (benchmarks/results/
# attention-h100-wan14b-720p-early-exit.json): TMA loads, 26.95 ms against 27.94 without and
# 28.66 for torch's own choice; 128 x 128 tiles on 8 warps were slower (31.9 ms, 27.3 with TMA).
_TUNED: dict[tuple[tuple[int, int], int], dict] = {((9, 0), 128): {"USE_TMA": True}}
_override: dict | None = None


def set_kernel_options(options: dict | None) -> None:
    """Process-wide ``kernel_options`` for compiled FlexAttention on CUDA (``BLOCK_M``,
    ``BLOCK_N``, ``num_warps``, ``num_stages``, ``USE_TMA``, ...; see torch's
    ``FlexKernelOptions``); None restores PASA's choice for the GPU. Each distinct set compiles
    once per shape."""
    global _override
    _override = None if options is None else dict(options)


def kernel_options(q: torch.Tensor) -> dict:
    """The ``kernel_options`` compiled FlexAttention gets for ``(B, H, S, D)`` ``q``."""
    if _override is not None:
        return dict(_override)
    tuned = {}
    if q.dtype in (torch.bfloat16, torch.float16):
        cap = torch.cuda.get_device_capability(q.device)
        tuned = _TUNED.get((cap, q.shape[-1]), {})
    return {**_SAFE_ROWS, **tuned}


@lru_cache(maxsize=8)
def _filled(shape: tuple[int, ...], value: int, device: torch.device) -> torch.Tensor:
    # Partial-block indices of the full index shape: compiled FlexAttention reads both index
    # tensors with one set of strides, so a narrower tensor would be read out of place.
    return torch.full(shape, value, dtype=torch.int32, device=device)


@lru_cache(maxsize=32)
def _inside(seq_len: int):
    """``mask_mod`` keeping keys inside the sequence (one function object per length: no
    recompilation)."""

    def inside(b, h, q_idx, kv_idx):
        return kv_idx < seq_len

    return inside


def plan_block_mask(plan: BlockPlan, seq_len: int):
    """The :class:`BlockMask` of ``plan``.

    Planned blocks are *full* blocks (no mask evaluated), except a ragged last key block: compiled
    FlexAttention does not bound full blocks by the sequence length (keys past the end would load
    as zeros and take softmax weight), so that one block is *partial*, masked by ``kv < S``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    bs = plan.layout.block_size
    counts = plan.kv_counts.contiguous()
    indices = plan.kv_indices.contiguous()
    if seq_len % bs:
        last = plan.layout.num_blocks - 1
        pos = (counts.long() - 1).clamp(min=0).unsqueeze(-1)  # (B, H, N, 1)
        has_last = (indices.gather(-1, pos).squeeze(-1) == last).to(torch.int32)
        full_counts = counts - has_last  # the ragged block is the last entry when planned
        part_idx = _filled(tuple(plan.kv_indices.shape), last, plan.kv_indices.device)
    else:
        has_last = torch.zeros_like(counts)
        full_counts = counts
        part_idx = _filled(tuple(plan.kv_indices.shape), 0, plan.kv_indices.device)
    kwargs = {
        "full_kv_num_blocks": full_counts,
        "full_kv_indices": indices,
        "BLOCK_SIZE": bs,
        "mask_mod": _inside(seq_len),
        "seq_lengths": (seq_len, seq_len),
    }
    try:
        return BlockMask.from_kv_blocks(has_last, part_idx, compute_q_blocks=False, **kwargs)
    except TypeError:  # torch without compute_q_blocks
        return BlockMask.from_kv_blocks(has_last, part_idx, **kwargs)


def _eager_block_mask(plan: BlockPlan, seq_len: int):
    """A :class:`BlockMask` whose ``mask_mod`` reads the plan (eager FlexAttention reads only that)."""
    from torch.nn.attention.flex_attention import BlockMask

    dense = plan.to_dense_mask()  # (B, H, N, N) bool
    bs = plan.layout.block_size

    def planned(b, h, q_idx, kv_idx):
        return dense[b, h, q_idx // bs, kv_idx // bs]

    return BlockMask.from_kv_blocks(
        plan.kv_counts,
        plan.kv_indices,
        BLOCK_SIZE=bs,
        mask_mod=planned,
        seq_lengths=(seq_len, seq_len),
    )


def flex_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the planned blocks with FlexAttention.

    Args:
        q, k, v: ``(B, S, H, D)`` in tiled order, fp16 / bf16 / fp32.
        plan: ``kv_indices (B, H, N, Kmax)``, ``kv_counts (B, H, N)``.
    Returns:
        out ``(B, S, H, D)`` in the input dtype (a transposed view of FlexAttention's
        ``(B, H, S, D)`` output) and lse ``(B, H, S)`` fp32, natural log.
    """
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D) views, no copy
    if q.device.type == "cuda":
        block_mask = plan_block_mask(plan, q.shape[1])
        flex = _compiled_flex()
        extra = {"kernel_options": kernel_options(qh)}
    else:
        block_mask = _eager_block_mask(plan, q.shape[1])
        from torch.nn.attention.flex_attention import flex_attention as flex

        extra = {}
    out, lse = _with_lse(flex, qh, kh, vh, block_mask=block_mask, scale=scale, **extra)
    return out.transpose(1, 2), lse.float()


def _with_lse(flex, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``flex(..., return_aux=AuxRequest(lse=True))`` where torch has it. Its deprecated
    ``return_lse=True`` warns once per process, and compiled FlexAttention guards on torch's set
    of warnings shown: the first plan change after the warning recompiled (TORCH_LOGS=recompiles
    on torch 2.11)."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch before AuxRequest
        return flex(*args, return_lse=True, **kwargs)
    out, aux = flex(*args, return_aux=AuxRequest(lse=True), **kwargs)
    return out, aux.lse
