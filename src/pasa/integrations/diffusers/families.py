"""Per-family geometry: which attention modules get PASA and where a call's tokens sit.

A *family* is one diffusers transformer class. Everything PASA needs to know about it is here:

- ``targets``: the self-attention modules (cross-attention is never touched);
- ``grid``: the ``(F, H, W)`` video-token grid, derived on every call from the transformer's
  inputs and its patch size (so any resolution and frame count works);
- ``text_tokens``: text tokens that share the self-attention (joint attention), and
  ``text_valid``: how many of them are real per batch item (HunyuanVideo pads its prompt);
- ``stream``: where the video tokens enter and leave the block stack and which per-token side
  inputs the blocks receive (rotary tables, per-token timestep modulation), so that the tokens
  can stay in PASA's tiled order across all blocks (``stream.py``).

The processors (``processors.py``) hold the per-family attention code; this module holds no
tensor math beyond shape arithmetic (the re-orderings it names run through
``stream.TokenOrder``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pasa.integrations.diffusers.stream import TokenOrder

Grid = tuple[int, int, int]
Inputs = dict[str, Any]
# (value, order) -> the value with its per-token axis in tiled order (None passes through).
Reorder = Callable[[Any, "TokenOrder"], Any]


@dataclass(frozen=True)
class Stream:
    """What keeps a family's video tokens in tiled order from the first block to the last.

    Attributes:
        blocks: ``model -> [block, ...]`` in the order the forward calls them; the first one's
            ``hidden_states`` (first argument) is re-ordered on entry, the last one's output
            (or its first element) back on exit.
        side_outputs: submodule name -> how to re-order its output, for the per-token tensors
            the forward computes once and hands to every block (rotary tables, per-token
            timestep modulation); re-ordered at the source, once per call.
        side_inputs: forward argument name -> how to re-order it (a rotary table the pipeline
            passes in).
        refuses: ``(model, inputs) -> reason`` when the blocks depend on token positions in a
            way the stream cannot follow, else None.
    """

    blocks: Callable[[torch.nn.Module], list[torch.nn.Module]]
    side_outputs: dict[str, Reorder]
    side_inputs: dict[str, Reorder]
    refuses: Callable[[torch.nn.Module, Inputs], str | None]


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
        stream: how the tokens stay in tiled order across the blocks, or None (per-call order).
    """

    name: str
    model_cls: type
    stock_processor: str
    targets: Callable[[torch.nn.Module], list[tuple[str, torch.nn.Module]]]
    grid: Callable[[torch.nn.Module, Inputs], Grid | None]
    text_tokens: Callable[[Inputs], int]
    text_valid: Callable[[Inputs], list[int] | None]
    stream: Stream | None = None


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


def _rotary(dim: int) -> Reorder:
    """A ``(cos, sin)`` pair whose token axis is ``dim``."""

    def reorder(pair: Any, order: TokenOrder) -> Any:
        if pair is None:
            return None
        return tuple(order.to_tiled(t, dim) for t in pair)

    return reorder


def _wan_condition(out: tuple, order: TokenOrder) -> tuple:
    # (temb, timestep_proj, text, image); Wan 2.2 TI2V's timestep_proj is per token (B, S, 6C).
    # temb (B, S, C) stays in frame-major order: it modulates the output after the last block.
    temb, timestep_proj, *rest = out
    if timestep_proj.ndim == 3:
        timestep_proj = order.to_tiled(timestep_proj, 1)
    return (temb, timestep_proj, *rest)


def _ltx_time(out: tuple, order: TokenOrder) -> tuple:
    # (temb (N, 6C), embedded_timestep (N, C)), N = B, or B * S for a per-token timestep (I2V).
    # embedded_timestep stays frame-major: it modulates the output after the last block.
    temb, embedded = out
    if temb.shape[0] != order.batch:
        temb = order.to_tiled(temb.unflatten(0, (order.batch, -1)), 1).flatten(0, 1)
    return temb, embedded


def _never(model: torch.nn.Module, inputs: Inputs) -> str | None:
    return None


def _hunyuan_refuses(model: torch.nn.Module, inputs: Inputs) -> str | None:
    if model.config.image_condition_type == "token_replace":
        return "HunyuanVideo token_replace modulates the first frame's tokens by their position"
    return None


def _block_lists(*names: str) -> Callable[[torch.nn.Module], list[torch.nn.Module]]:
    return lambda m: [block for name in names for block in (getattr(m, name, None) or ())]


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
            stream=Stream(
                blocks=_block_lists("blocks"),
                side_outputs={"rope": _rotary(1), "condition_embedder": _wan_condition},
                side_inputs={},
                refuses=_never,
            ),
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
            stream=Stream(
                blocks=_block_lists("transformer_blocks", "single_transformer_blocks"),
                side_outputs={"rope": _rotary(0)},
                side_inputs={},
                refuses=_hunyuan_refuses,
            ),
        ),
        Family(
            name="cogvideox",
            model_cls=CogVideoXTransformer3DModel,
            stock_processor="CogVideoXAttnProcessor2_0",
            targets=lambda m: list(_blocks(m, ("transformer_blocks",), "attn1")),
            grid=_cogvideox_grid,
            text_tokens=_encoder_tokens,
            text_valid=_all_valid,
            stream=Stream(
                blocks=_block_lists("transformer_blocks"),
                side_outputs={},
                side_inputs={"image_rotary_emb": _rotary(0)},
                refuses=_never,
            ),
        ),
        Family(
            name="ltx_video",
            model_cls=LTXVideoTransformer3DModel,
            stock_processor="LTXVideoAttnProcessor",
            targets=lambda m: list(_blocks(m, ("transformer_blocks",), "attn1")),
            grid=_ltx_grid,
            text_tokens=_no_text,
            text_valid=_all_valid,
            stream=Stream(
                blocks=_block_lists("transformer_blocks"),
                side_outputs={"rope": _rotary(1), "time_embed": _ltx_time},
                side_inputs={},
                refuses=_never,
            ),
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


def replace_input(
    model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], name: str, value: Any
) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` with the forward argument ``name`` set to ``value``, where it was passed."""
    if name in kwargs:
        return args, {**kwargs, name: value}
    index = list(_signature(type(model)).parameters).index(name) - 1  # minus self
    if index < len(args):
        args = (*args[:index], value, *args[index + 1 :])
    return args, kwargs
