"""Tiled token stream: the video tokens stay in PASA's tiled order across the whole block stack.

Without it, every PASA attention call re-orders q, k, v into tiled order and its output back:
four gathers per call, ~3 ms at 75,600 tokens, 80 calls per Wan2.1-14B step. With it, the
hidden states are re-ordered once on entry to the first block and back on exit from the last
(two gathers of ``(B, S, C)`` per transformer call), every per-token tensor the blocks receive
(rotary tables; Wan 2.2 TI2V's and LTX I2V's per-token timestep modulation) is re-ordered once
at its source, and the PASA processors call ``sparse_attention(..., tiled=True)``.

Why the output does not change: inside a block every op but self-attention is token-wise
(norms, FFN, adaptive modulation, cross-attention whose keys are text), and self-attention is
permutation-equivariant when q, k, v and the rotary tables move together. So the stock
processor (dense steps) stays exact on the re-ordered tokens (equal up to float round-off: the
reductions run in another order), and joint text tokens, which follow the video tokens, keep
their places. The stream is on for the dense steps of a run that has sparse ones too, so every
step of a generation sees one token order (anything kept across steps, such as diffusers'
caches, stays consistent); a run that is dense throughout (``density=1`` and no given budget)
does not use it, so it is the stock model bit for bit.

Where the hooks sit, and why there:
- a torch forward pre-hook on the first block and a forward hook on the last block: they fire on
  every ``block(...)`` call whatever the loop around it does (the plain loop, gradient
  checkpointing), and outside any diffusers hook on the block (which replaces ``forward``);
- forward hooks on the modules that compute per-token side inputs (``rope``, the timestep
  embedder), or a rewrite of the forward argument the pipeline passes (CogVideoX's rotary
  tables): every block receives the same object, so re-ordering it at the source costs one
  gather per call where a per-block hook would cost one per block. Per-token tensors used after
  the last block (Wan TI2V's / LTX's output modulation) stay in frame-major order, as the
  restored hidden states are.
Nothing is patched in diffusers' forward code, and ``pasa.remove`` removes every hook.

Not used (per-call re-ordering instead) when: context parallelism is configured (diffusers
shards the rotary tables and the first block's input inside its own hooks, before ours could
re-order the full sequence), the call gives no grid (LTX with ``video_coords`` only), the
family's blocks read token positions (HunyuanVideo ``token_replace``), or
``RunState.tiled_stream`` is False (tests compare both paths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from pasa.integrations.diffusers.families import Family, Grid
from pasa.layout import TokenLayout, make_layout

_eager = torch.compiler.disable  # regional compile: the hooks stay Python, one graph break


@dataclass(frozen=True)
class TokenOrder:
    """The tiled order of one transformer call's video tokens.

    Attributes:
        grid: ``(F, H, W)`` video token grid.
        batch: batch size of the call.
        block_size, tile: the PASA config's, so the order is the one ``sparse_attention`` uses.
    """

    grid: Grid
    batch: int
    block_size: int
    tile: Any

    @property
    def num_video_tokens(self) -> int:
        return math.prod(self.grid)

    def layout(self, device: torch.device) -> TokenLayout:
        return make_layout(self.grid, block_size=self.block_size, tile=self.tile, device=device)

    def to_tiled(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``x`` with its ``F*H*W`` video-token axis ``dim`` re-ordered frame-major -> tiled."""
        self._check(x, dim)
        return self.layout(x.device).to_blocks(x, dim)

    def to_frame_major(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Inverse of :meth:`to_tiled`."""
        self._check(x, dim)
        return self.layout(x.device).from_blocks(x, dim)

    def _check(self, x: torch.Tensor, dim: int) -> None:
        if x.shape[dim] != self.num_video_tokens:
            raise ValueError(
                f"PASA tiled stream: a per-token tensor of shape {tuple(x.shape)} has "
                f"{x.shape[dim]} tokens on axis {dim}, but the grid {self.grid} has "
                f"{self.num_video_tokens}"
            )


def install(model: torch.nn.Module, family: Family, state: Any) -> list[RemovableHandle]:
    """Register the stream's hooks on ``model``; they act only while ``state.order`` is set.

    Returns:
        The handles, for ``pasa.remove``.
    """
    stream = family.stream
    if stream is None:
        return []
    blocks = stream.blocks(model)
    if not blocks:
        return []

    @_eager
    def enter(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        order = state.order
        if order is None:
            return None
        if args:  # hidden_states (B, S, C) is the first argument
            return (order.to_tiled(args[0], 1), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": order.to_tiled(kwargs["hidden_states"], 1)}

    @_eager
    def leave(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        order = state.order
        if order is None:
            return None
        if isinstance(output, tuple):  # (hidden_states, encoder_hidden_states)
            return (order.to_frame_major(output[0], 1), *output[1:])
        return order.to_frame_major(output, 1)

    def side(reorder: Any) -> Any:
        @_eager
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            order = state.order
            return None if order is None else reorder(output, order)

        return hook

    handles = [
        blocks[0].register_forward_pre_hook(enter, with_kwargs=True),
        blocks[-1].register_forward_hook(leave),
    ]
    modules = dict(model.named_modules())
    for name, reorder in stream.side_outputs.items():
        if name in modules:
            handles.append(modules[name].register_forward_hook(side(reorder)))
    return handles


def order_for(
    model: torch.nn.Module, family: Family, inputs: dict[str, Any], grid: Grid | None, state: Any
) -> TokenOrder | None:
    """The call's :class:`TokenOrder` when the stream serves it, else None (per-call order)."""
    stream = family.stream
    x = inputs.get("hidden_states")
    if not state.tiled_stream or stream is None or grid is None or not isinstance(x, torch.Tensor):
        return None
    if state.config.density >= 1.0 and state.budget is None:
        return None  # every step dense: the stock model, bit for bit (module docstring)
    if getattr(model, "_parallel_config", None) is not None:
        return None  # diffusers shards the sequence inside its own hooks (module docstring)
    reason = stream.refuses(model, inputs)
    if reason is not None:
        state.warn_once("stream", f"PASA: tokens re-ordered per attention call: {reason}")
        return None
    config = state.config
    return TokenOrder(tuple(grid), int(x.shape[0]), config.block_size, config.tile)
