"""FlashAttention-4 backend: the block-sparse forward of flash-attn-4 (CuTe DSL), Hopper / Blackwell.

The plan maps onto FA4's block-sparse tensors with every planned block a *full* block (no
``mask_mod`` runs inside it) and no partial block. FA4 walks a row's full blocks from the last
entry to the first and masks the sequence end on the first one it processes, so a ragged last key
block is exact because ``kv_indices`` is sorted ascending. q, k, v stay ``(B, S, H, D)``: FA4's own
layout, no transpose. Never falls back to dense: unavailable means an error with the reason.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from pasa.plan import BlockPlan

SUPPORTED_MAJOR = (9, 10, 11)  # Hopper, Blackwell
FA4_BLOCK = 128


@lru_cache(maxsize=1)
def _import_error() -> str | None:
    try:
        import flash_attn.cute.interface  # noqa: F401
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch  # noqa: F401
    except Exception as exc:  # ImportError, or the CuTe DSL failing to load its libraries
        return f"flash-attn-4 is not installed or failed to import ({type(exc).__name__}: {exc})"
    return None


def fa4_unavailable(device: torch.device) -> str | None:
    """None when FA4's block-sparse forward can run on ``device``, else why not."""
    if device.type != "cuda":
        return f"FA4 needs a CUDA device, got {device.type}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in SUPPORTED_MAJOR:
        return f"FA4 needs Hopper or Blackwell (sm90 / sm100), this GPU is sm{major}{minor}"
    return _import_error()


@lru_cache(maxsize=32)
def _no_partial_blocks(
    batch: int, heads: int, n: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    cnt = torch.zeros((batch, heads, n), dtype=torch.int32, device=device)
    idx = torch.zeros((batch, heads, n, 1), dtype=torch.int32, device=device)
    return cnt, idx


def fa4_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the planned blocks with FA4.

    Args:
        q, k, v: ``(B, S, H, D)`` in tiled order, fp16 / bf16.
        plan: 128-token blocks; ``kv_indices (B, H, N, Kmax)`` sorted ascending.
    Returns:
        out ``(B, S, H, D)`` in the input dtype and lse ``(B, H, S)`` fp32, natural log.
    """
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    from flash_attn.cute.interface import _flash_attn_fwd

    if plan.layout.block_size != FA4_BLOCK:
        raise ValueError(
            f"the fa4 backend needs block_size={FA4_BLOCK}, got {plan.layout.block_size}"
        )
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the fa4 backend needs fp16 or bf16 inputs, got {q.dtype}")
    batch, heads, n, _ = plan.kv_indices.shape
    cnt, idx = _no_partial_blocks(batch, heads, n, q.device)
    sparse = BlockSparseTensorsTorch(
        mask_block_cnt=cnt,
        mask_block_idx=idx,
        full_block_cnt=plan.kv_counts,
        full_block_idx=plan.kv_indices,
        block_size=(FA4_BLOCK, FA4_BLOCK),
    )
    out, lse, *_ = _flash_attn_fwd(
        q, k, v, softmax_scale=scale, block_sparse_tensors=sparse, return_lse=True
    )
    return out, lse


def fa4_dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4 dense forward on ``(B, S, H, D)``, the benchmark's baseline; out and lse ``(B, H, S)``."""
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse, *_ = _flash_attn_fwd(q, k, v, softmax_scale=scale, return_lse=True)
    return out, lse
