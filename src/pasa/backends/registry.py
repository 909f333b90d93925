"""Backend registry: name -> function computing attention over a plan, with capability checks.

A backend is ``fn(q, k, v, plan, *, scale) -> (out, lse)`` on ``(B, S, H, D)`` tensors in tiled
order, out in fp32 or the input dtype, lse ``(B, H, S)`` fp32. ``"auto"`` takes the fastest one
that is available for the tensors' device; a backend asked for by name and unavailable raises
with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pasa.backends.reference import reference_block_attention

BackendFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Backend:
    name: str
    fn: BackendFn
    # Returns None when usable on this device, else the reason it is not.
    unavailable: Callable[[torch.device], str | None]
    # Device types "auto" may pick this backend for (None: every type it is available on).
    auto_device_types: tuple[str, ...] | None = None


def _always(_: torch.device) -> str | None:
    return None


_BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", reference_block_attention, _always),
}
# Fastest first: "auto" takes the first available.
_AUTO_ORDER: list[str] = ["reference"]


def register_backend(backend: Backend, *, auto_rank: int | None = None) -> None:
    """Add a backend; ``auto_rank`` places it in the order ``"auto"`` tries (0 = first)."""
    _BACKENDS[backend.name] = backend
    if auto_rank is not None and backend.name not in _AUTO_ORDER:
        _AUTO_ORDER.insert(auto_rank, backend.name)


def _register_optional_backends() -> None:
    # flex and fa4 import only torch here; FlexAttention / flash-attn-4 load on first use.
    from pasa.backends.fa4 import fa4_block_attention, fa4_unavailable
    from pasa.backends.flex import flex_block_attention, flex_unavailable

    register_backend(Backend("fa4", fa4_block_attention, fa4_unavailable, ("cuda",)), auto_rank=0)
    register_backend(
        Backend("flex", flex_block_attention, flex_unavailable, ("cuda",)), auto_rank=1
    )


_register_optional_backends()


def available_backends(device: torch.device | str) -> dict[str, str | None]:
    """Every registered backend -> None if usable on ``device``, else why not."""
    device = torch.device(device)
    return {name: b.unavailable(device) for name, b in _BACKENDS.items()}


def get_backend(name: str, device: torch.device | str) -> Backend:
    """The backend called ``name`` (or the fastest available for ``"auto"``) on ``device``."""
    device = torch.device(device)
    if name == "auto":
        for candidate in _AUTO_ORDER:
            b = _BACKENDS[candidate]
            if b.auto_device_types is not None and device.type not in b.auto_device_types:
                continue
            if b.unavailable(device) is None:
                return b
        raise RuntimeError("no PASA backend is available")  # reference always is
    if name not in _BACKENDS:
        known = ", ".join(sorted(_BACKENDS))
        raise ValueError(f"unknown PASA backend {name!r}: known backends are {known}")
    backend = _BACKENDS[name]
    reason = backend.unavailable(device)
    if reason is not None:
        raise RuntimeError(f"PASA backend {name!r} is unavailable on {device}: {reason}")
    return backend
