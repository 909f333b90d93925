"""PASA's own GPU kernels (Triton): token gather + group pooling, fused estimate, GPU routing.

Importing this package needs no Triton; the submodules that hold kernels do.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def triton_unavailable() -> str | None:
    """None when Triton and a CUDA device are usable, else why not."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


__all__ = ["triton_unavailable"]
