"""Per-family geometry: which attention modules get PASA and where a call's tokens sit.

A *family* is one diffusers transformer class. Everything PASA needs to know about it is here:

- ``targets``: the self-attention modules (cross-attention is never touched);
- ``grid``: the ``(F, H, W)`` video-token grid, derived on every call from the transformer's
  inputs and its patch size (so any resolution and frame count works);
- ``text_tokens``: text tokens that share the self-attention (joint attention), and
  ``text_valid``: how many of them are real per batch item (HunyuanVideo pads its prompt).

The processors (``processors.py``) hold the per-family attention code; this module holds no
tensors math beyond shape arithmetic.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

Grid = tuple[int, int, int]
Inputs = dict[str, Any]


@dataclass(frozen=True)
class Family:
    """How PASA plugs into one diffusers transformer class.

    Attributes:
        name: short family name used in messages and reports.
        model_cls: the diffusers transformer class (matched with ``isinstance``).
        stock_processor: class name of the processor PASA replaces (any other raises).
        targets: ``model -> [(qualified name, attention module), ...]`` self-attention modules.
        grid: ``(model, inputs) -> (F, H, W)`` or None when the call does not say.
        text_tokens: ``inputs -> T``, text tokens inside the self-attention (0 if none).
        text_valid: ``inputs -> [T_b, ...]`` real text tokens per batch item, or None (all real).
    """

    name: str
    model_cls: type
    stock_processor: str
    targets: Callable[[torch.nn.Module], list[tuple[str, torch.nn.Module]]]
    grid: Callable[[torch.nn.Module, Inputs], Grid | None]
    text_tokens: Callable[[Inputs], int]
    text_valid: Callable[[Inputs], list[int] | None]


def _blocks(model: torch.nn.Module, lists: tuple[str, ...], attr: str) -> Iterator[tuple[str, Any]]:
    for list_name in lists:
        for i, block in enumerate(getattr(model, list_name, None) or ()):
            yield f"{list_name}.{i}.{attr}", getattr(block, attr)


def _patched_grid(x: torch.Tensor, patch: tuple[int, int, int], frames_dim: int) -> Grid:
    """``(F // pt, H // ph, W // pw)`` of a 5D latent whose frame axis is ``frames_dim``."""
    frames, height, width = x.shape[frames_dim], x.shape[-2], x.shape[-1]
    pt, ph, pw = patch
    return frames // pt, height // ph, width // pw


def _no_text(inputs: Inputs) -> int:
    return 0


def _all_valid(inputs: Inputs) -> list[int] | None:
    return None


def _encoder_tokens(inputs: Inputs) -> int:
    return int(inputs["encoder_hidden_states"].shape[1])


def _wan_grid(model: torch.nn.Module, inputs: Inputs) -> Grid:
    return _patched_grid(inputs["hidden_states"], tuple(model.config.patch_size), frames_dim=2)


def _hunyuan_grid(model: torch.nn.Module, inputs: Inputs) -> Grid:
    p, pt = model.config.patch_size, model.config.patch_size_t
    return _patched_grid(inputs["hidden_states"], (pt, p, p), frames_dim=2)


def _hunyuan_text_valid(inputs: Inputs) -> list[int] | None:
    mask = inputs.get("encoder_attention_mask")
    if mask is None:
        return None
    return [int(n) for n in mask.sum(dim=1).tolist()]  # one host sync per transformer call


def _cogvideox_grid(model: torch.nn.Module, inputs: Inputs) -> Grid:
    p, pt = model.config.patch_size, model.config.patch_size_t
    return _patched_grid(inputs["hidden_states"], (pt or 1, p, p), frames_dim=1)


def _ltx_grid(model: torch.nn.Module, inputs: Inputs) -> Grid | None:
    # LTX takes packed tokens (B, S, C); the pipeline passes the post-patch latent grid.
    sizes = tuple(inputs.get(k) for k in ("num_frames", "height", "width"))
    if any(s is None for s in sizes):
        return None  # video_coords-only calls (LTX condition pipeline) give no grid
    return tuple(int(s) for s in sizes)  # type: ignore[return-value]


@lru_cache(maxsize=1)
def families() -> tuple[Family, ...]:
    """The supported families (imports diffusers on first use)."""
    from diffusers import (
        CogVideoXTransformer3DModel,
        HunyuanVideoTransformer3DModel,
        LTXVideoTransformer3DModel,
        WanTransformer3DModel,
    )

    return (
        Family(
            name="wan",
            model_cls=WanTransformer3DModel,
            stock_processor="WanAttnProcessor",
            targets=lambda m: list(_blocks(m, ("blocks",), "attn1")),
            grid=_wan_grid,
            text_tokens=_no_text,
            text_valid=_all_valid,
        ),
        Family(
            name="hunyuan_video",
            model_cls=HunyuanVideoTransformer3DModel,
            stock_processor="HunyuanVideoAttnProcessor2_0",
            targets=lambda m: list(
                _blocks(m, ("transformer_blocks", "single_transformer_blocks"), "attn")
            ),
            grid=_hunyuan_grid,
            text_tokens=_encoder_tokens,
            text_valid=_hunyuan_text_valid,
        ),
        Family(
            name="cogvideox",
            model_cls=CogVideoXTransformer3DModel,
            stock_processor="CogVideoXAttnProcessor2_0",
            targets=lambda m: list(_blocks(m, ("transformer_blocks",), "attn1")),
            grid=_cogvideox_grid,
            text_tokens=_encoder_tokens,
            text_valid=_all_valid,
        ),
        Family(
            name="ltx_video",
            model_cls=LTXVideoTransformer3DModel,
            stock_processor="LTXVideoAttnProcessor",
            targets=lambda m: list(_blocks(m, ("transformer_blocks",), "attn1")),
            grid=_ltx_grid,
            text_tokens=_no_text,
            text_valid=_all_valid,
        ),
    )


def supported_names() -> list[str]:
    return [f.model_cls.__name__ for f in families()]


def family_of(model: torch.nn.Module) -> Family:
    """The family of ``model``; TypeError listing the supported classes otherwise."""
    for family in families():
        if isinstance(model, family.model_cls):
            return family
    raise TypeError(
        f"PASA does not support {type(model).__name__}; supported transformers: "
        f"{', '.join(supported_names())} (or a diffusers pipeline holding one)"
    )


@lru_cache(maxsize=16)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def bind_inputs(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Inputs:
    """The transformer's forward arguments by name (positional ones included)."""
    bound = _signature(type(model)).bind_partial(None, *args, **kwargs)  # None stands for self
    return dict(bound.arguments)
