"""PASA attention processors: the stock projections, norms and rotary embeddings, PASA attention.

Each processor mirrors its family's stock diffusers processor line for line up to the attention
call (so QK norms and rotary embeddings stay exactly as stock), hands ``q, k, v`` in the
``(B, S, H, D)`` layout with video tokens first and text tokens last to :meth:`PASAProcessor.attend`,
and applies the stock output projection. A call the budget runs dense (density >= 1), or one PASA
cannot serve, goes to the wrapped stock processor itself, so dense steps are the stock model.

When the call's video tokens travel through the blocks in tiled order (``stream.py``,
``RunState.order``), the processors receive them (and the rotary tables) in that order and
attend with ``sparse_attention(..., tiled=True)``: no re-ordering per call. Their code is the
same either way; text tokens still follow the video tokens.

Context parallelism: ``attend`` runs inside diffusers' Ulysses all-to-all
(``_templated_context_parallel_attention``), where each rank holds the full sequence and
``H / N`` heads; the global index of its first head is passed as ``head_offset`` so every rank
draws the routing noise of the same global heads. Ring attention splits the keys and is served
by the stock processor.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import _templated_context_parallel_attention

from pasa.attention import layout_for, sparse_attention
from pasa.integrations.diffusers.hook import RunState

_eager = torch.compiler.disable  # one graph break per attention: step, layer, density stay Python


class PASAProcessor:
    """Shared core of the PASA processors; subclasses hold the family's projection code.

    Args:
        stock: the processor PASA replaces (restored by ``pasa.remove``); it serves dense calls
            and keeps the model's attention backend and parallel config.
        state: the run state shared with the denoiser hook.
        layer: index of this attention among the model's PASA layers (keys the routing noise).
        family: family name, for messages.
    """

    def __init__(self, stock: Any, state: RunState, layer: int, family: str) -> None:
        self.stock = stock
        self.state = state
        self.layer = layer
        self.family = family

    # diffusers sets these on processors (set_attention_backend, enable_parallelism); they
    # live on the stock processor so that `pasa.remove` hands back an up-to-date one.
    @property
    def _attention_backend(self) -> Any:
        return getattr(self.stock, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.stock._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return getattr(self.stock, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self.stock._parallel_config = value

    def _context_parallel(self) -> Any:
        config = self._parallel_config
        return None if config is None else getattr(config, "context_parallel_config", None)

    def use_stock(self) -> bool:
        """True when this call runs the stock processor (dense step, or PASA cannot serve it)."""
        state = self.state
        if not state.active or state.density >= 1.0:
            return True
        if state.grid is None:
            state.warn_once(
                "no_grid",
                f"PASA ({self.family}): the call gives no token grid; running stock attention",
            )
            return True
        cp = self._context_parallel()
        if cp is not None and (cp.ring_degree > 1 or cp.ulysses_anything):
            state.warn_once(
                "ring",
                f"PASA ({self.family}): ring / ulysses_anything context parallelism splits the keys "
                "across ranks; running stock attention (use ulysses_degree)",
            )
            return True
        return False

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        num_text: int = 0,
        text_valid: list[int] | None = None,
    ) -> torch.Tensor:
        """PASA self-attention over video tokens then ``num_text`` text tokens.

        Args:
            q, k, v: ``(B, S_local, H, D)``; ``S_local = S / N`` under Ulysses degree N.
            num_text: text tokens at the end of the (full) sequence.
            text_valid: real text tokens per batch item (the rest is padding whose keys are
                masked out, as the stock attention mask does), or None when all are real.
        Returns:
            ``(B, S_local, H, D)`` in the input dtype.
        """
        cp = self._context_parallel()
        if cp is not None and cp.ulysses_degree > 1:
            if self.state.order is not None:  # stream.order_for never allows this
                raise RuntimeError("PASA: tiled token stream under context parallelism")
            op = functools.partial(self._ulysses_op, num_text=num_text, text_valid=text_valid)
            return _templated_context_parallel_attention(
                q,
                k,
                v,
                forward_op=op,
                backward_op=_no_backward,
                _parallel_config=self._parallel_config,
            )
        return self._attend_full(q, k, v, num_text, text_valid, head_offset=0)

    def _ulysses_op(
        self,
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *args: Any,
        num_text: int,
        text_valid: list[int] | None,
        _parallel_config: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        # After the all-to-all: (B, S, H / N, D), this rank's heads are a contiguous slice.
        rank = _parallel_config.context_parallel_config._ulysses_local_rank
        return self._attend_full(q, k, v, num_text, text_valid, head_offset=rank * q.shape[2])

    def _attend_full(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        num_text: int,
        text_valid: list[int] | None,
        head_offset: int,
    ) -> torch.Tensor:
        grid = self.state.grid
        num_video = math.prod(grid)
        seq = q.shape[1]
        if seq != num_video + num_text:
            raise ValueError(
                f"PASA ({self.family}, layer {self.layer}): attention over {seq} tokens, but the "
                f"grid {grid} and {num_text} text tokens make {num_video + num_text}"
            )
        if text_valid is None or all(n == num_text for n in text_valid):
            return self._sparse(q, k, v, num_text, head_offset)
        # Padded text: per group of equal valid length, drop the padded keys (what the stock
        # mask does) and attend the padded query rows densely to the kept keys.
        out = torch.empty_like(q)
        for valid in sorted(set(text_valid)):
            rows = torch.tensor(
                [b for b, n in enumerate(text_valid) if n == valid], device=q.device
            )
            qb, kb, vb = q[rows], k[rows], v[rows]  # (b, S, H, D)
            keep = num_video + valid
            kept = self._sparse(qb[:, :keep], kb[:, :keep], vb[:, :keep], valid, head_offset)
            if keep < seq:
                pad = F.scaled_dot_product_attention(
                    qb[:, keep:].transpose(1, 2),
                    kb[:, :keep].transpose(1, 2),
                    vb[:, :keep].transpose(1, 2),
                ).transpose(1, 2)  # (b, S - keep, H, D)
                kept = torch.cat([kept, pad.to(kept.dtype)], dim=1)
            out[rows] = kept
        return out

    def _sparse(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_text: int, head_offset: int
    ) -> torch.Tensor:
        state = self.state
        where = dict(
            grid=state.grid,
            config=state.config,
            step=state.step,
            layer=self.layer,
            num_text_tokens=num_text,
            density=state.density,
            head_offset=head_offset,
        )
        # The tokens arrive in tiled order when they travel through the blocks in it (stream.py),
        # then the output stays in it; else one call re-orders them in and out.
        tiled = state.order is not None
        plan = None
        if state.plan_provider is not None:  # a peer's plan (static window, ...) instead of ours
            layout = layout_for(q, grid=state.grid, config=state.config, num_text_tokens=num_text)
            if tiled:  # the provider sees q, k frame-major, as documented
                q_in, k_in = layout.from_blocks(q), layout.from_blocks(k)
            else:
                q_in, k_in = q, k
            plan = state.plan_provider(layout, state.step, self.layer, q_in, k_in)
        out, plan = sparse_attention(
            q,
            k,
            v,
            plan=plan,
            return_plan=True,
            tiled=tiled,
            finite_checks=state.finite_checks,  # checked once per model call (hook.py)
            **where,
        )
        state.record_plan(plan.kv_counts.sum(), plan.kv_counts.numel() * plan.num_kv_blocks)
        if state.on_plan is not None:
            state.on_plan(state.step, self.layer, head_offset, plan)
        return out


def _no_backward(*args: Any, **kwargs: Any) -> None:
    raise NotImplementedError("PASA attention is inference-only (no backward pass)")


def wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding, as in ``WanAttnProcessor`` (which defines it inline)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanPASAProcessor(PASAProcessor):
    """``WanAttnProcessor`` for the self-attention ``attn1`` of Wan 2.1 / 2.2 blocks."""

    @_eager
    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if self.use_stock() or encoder_hidden_states is not None or attention_mask is not None:
            return self.stock(
                attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb
            )
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # (B, S, H, D)
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = wan_rotary(query, *rotary_emb)
            key = wan_rotary(key, *rotary_emb)

        hidden_states = self.attend(query, key, value)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)  # (B, S, H * D)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class HunyuanVideoPASAProcessor(PASAProcessor):
    """``HunyuanVideoAttnProcessor2_0``: joint attention, video then text, padded text masked."""

    @_eager
    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.use_stock() or encoder_hidden_states is None:
            return self.stock(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        from diffusers.models.embeddings import apply_rotary_emb

        num_text = encoder_hidden_states.shape[1]
        single_stream = attn.add_q_proj is None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))  # (B, S, H, D)
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            if single_stream:
                video = slice(None, -num_text)
                text = slice(-num_text, None)
                query = torch.cat(
                    [
                        apply_rotary_emb(query[:, video], image_rotary_emb, sequence_dim=1),
                        query[:, text],
                    ],
                    dim=1,
                )
                key = torch.cat(
                    [
                        apply_rotary_emb(key[:, video], image_rotary_emb, sequence_dim=1),
                        key[:, text],
                    ],
                    dim=1,
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if not single_stream:
            encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        text_valid = self.state.text_valid if attention_mask is not None else None
        hidden_states = self.attend(query, key, value, num_text=num_text, text_valid=text_valid)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)  # (B, S, H * D)

        hidden_states, encoder_hidden_states = (
            hidden_states[:, :-num_text],
            hidden_states[:, -num_text:],
        )
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class CogVideoXPASAProcessor(PASAProcessor):
    """``CogVideoXAttnProcessor2_0``: joint attention with the text *first*.

    The text tokens are moved behind the video tokens for PASA and back afterwards.
    """

    @_eager
    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.use_stock() or attention_mask is not None:
            return self.stock(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        from diffusers.models.embeddings import apply_rotary_emb

        num_text = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # text first
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, S, D)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, num_text:] = apply_rotary_emb(query[:, :, num_text:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, num_text:] = apply_rotary_emb(key[:, :, num_text:], image_rotary_emb)

        def text_last(x: torch.Tensor) -> torch.Tensor:  # (B, H, T + V, D) -> (B, V + T, H, D)
            return torch.cat([x[:, :, num_text:], x[:, :, :num_text]], dim=2).transpose(1, 2)

        out = self.attend(text_last(query), text_last(key), text_last(value), num_text=num_text)
        num_video = out.shape[1] - num_text
        out = torch.cat([out[:, num_video:], out[:, :num_video]], dim=1)  # (B, T + V, H, D)
        hidden_states = out.reshape(batch_size, -1, attn.heads * head_dim)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split(
            [num_text, hidden_states.size(1) - num_text], dim=1
        )
        return hidden_states, encoder_hidden_states


class LTXVideoPASAProcessor(PASAProcessor):
    """``LTXVideoAttnProcessor`` for the self-attention ``attn1`` of LTX-Video blocks."""

    @_eager
    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.use_stock() or encoder_hidden_states is not None or attention_mask is not None:
            return self.stock(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query = query.unflatten(2, (attn.heads, -1))  # (B, S, H, D)
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        hidden_states = self.attend(query, key, value)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)  # (B, S, H * D)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


PROCESSORS: dict[str, type[PASAProcessor]] = {
    "wan": WanPASAProcessor,
    "hunyuan_video": HunyuanVideoPASAProcessor,
    "cogvideox": CogVideoXPASAProcessor,
    "ltx_video": LTXVideoPASAProcessor,
}
