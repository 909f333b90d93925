"""``apply`` / ``remove`` / ``last_report``: PASA on and off a diffusers pipeline or transformer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry

from pasa.budget import StepBudget
from pasa.config import PASAConfig
from pasa.integrations.diffusers.families import family_of, supported_names
from pasa.integrations.diffusers.hook import HOOK_NAME, PASAHook, PlanProvider, RunState
from pasa.integrations.diffusers.processors import PROCESSORS
from pasa.integrations.diffusers.report import GenerationReport
from pasa.integrations.diffusers.stream import install as install_stream

_DENOISER_NAMES = ("transformer", "transformer_2")


@dataclass
class _Installed:
    """What ``apply`` changed on one transformer, so that ``remove`` can undo it."""

    state: RunState
    stock: dict[str, Any]  # attention module name -> its original processor
    handles: list[Any]  # the tiled stream's torch hooks


def _denoisers(pipe_or_transformer: Any) -> list[torch.nn.Module]:
    """The pipeline's denoisers (both Wan 2.2 experts), or the transformer itself."""
    if isinstance(pipe_or_transformer, torch.nn.Module):
        family_of(pipe_or_transformer)  # TypeError listing the supported classes
        return [pipe_or_transformer]
    components = getattr(pipe_or_transformer, "components", None)
    if not isinstance(components, dict):
        raise TypeError(
            f"pasa.apply expects a diffusers pipeline or transformer, got "
            f"{type(pipe_or_transformer).__name__}; supported transformers: {', '.join(supported_names())}"
        )
    found = [components[n] for n in _DENOISER_NAMES if components.get(n) is not None]
    if not found:
        raise TypeError(f"{type(pipe_or_transformer).__name__} has no transformer to apply PASA to")
    for model in found:
        family_of(model)
    return found


@contextlib.contextmanager
def _inside_accelerate_hook(module: torch.nn.Module) -> Iterator[None]:
    """Register / remove our hook *inside* an accelerate hook (``enable_model_cpu_offload``).

    accelerate keeps the forward it wrapped in ``_old_forward`` and restores it when the pipeline
    re-installs its offload hooks after every call; a hook registered outside it would be lost.
    """
    if not hasattr(module, "_old_forward"):
        yield
        return
    outer = module.forward
    module.forward = module._old_forward
    try:
        yield
    finally:
        module._old_forward = module.forward
        module.forward = outer


def apply(
    pipe_or_transformer: Any,
    config: PASAConfig | None = None,
    *,
    budget: StepBudget | None = None,
    plan_provider: PlanProvider | None = None,
) -> RunState:
    """Turn PASA on for the video self-attention of every transformer block.

    Cross-attention is untouched; joint text+video attention (HunyuanVideo, CogVideoX) keeps its
    text tokens, always attended. On a pipeline every denoiser gets PASA (``transformer`` and, for
    Wan 2.2, ``transformer_2``) with one shared budget and report. The video tokens travel through
    the block stack in PASA's tiled order (re-ordered once per transformer call, not per attention
    call) wherever that is exact (``docs/diffusers.md``). Calling ``apply`` again replaces the
    earlier configuration. ``pasa.remove`` restores the stock model exactly.

    Args:
        pipe_or_transformer: a diffusers pipeline, or one of ``WanTransformer3DModel``,
            ``HunyuanVideoTransformer3DModel``, ``CogVideoXTransformer3DModel``,
            ``LTXVideoTransformer3DModel``.
        config: :class:`~pasa.PASAConfig`; ``PASAConfig()`` when None.
        budget: a :class:`~pasa.budget.StepBudget` giving each step's density instead of
            ``pasa.budget.make_budget(config, num_steps)`` (e.g. a schedule fixed in advance,
            ``pasa.eval.ScheduleBudget``); reset at the start of every generation, and it must
            plan as many steps as the generation runs (ValueError otherwise).
        plan_provider: ``(layout, step, layer, q, k) -> BlockPlan | None`` called by every
            sparse attention call (``q, k (B, S, H, D)``, ``layout`` the call's
            :class:`~pasa.layout.TokenLayout`); a plan it returns is computed instead of PASA's
            estimate and routing, None falls back to them. Dense steps never call it.

    Returns:
        The run state shared by the hooks (its ``last_report`` is ``pasa.last_report``'s).

    Raises:
        TypeError: an unsupported model, listing the supported transformer classes, or a
            ``budget`` that is not a ``StepBudget``.

    Example:
        >>> import torch, pasa
        >>> from diffusers import WanTransformer3DModel
        >>> from pasa.integrations.diffusers import apply, remove
        >>> model = WanTransformer3DModel(
        ...     patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
        ...     out_channels=4, text_dim=8, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
        ... ).eval()
        >>> _ = apply(model, pasa.PASAConfig(density=0.3, block_size=16, group_size=16))
        >>> x = torch.randn(1, 4, 5, 14, 18)  # (B, C, F, H, W): any frames and size
        >>> with torch.no_grad():
        ...     out = model(x, timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 7, 8))
        >>> out.sample.shape
        torch.Size([1, 4, 5, 14, 18])
        >>> remove(model)
    """
    config = PASAConfig() if config is None else config
    models = _denoisers(pipe_or_transformer)
    state = RunState(
        config,
        scheduler=getattr(pipe_or_transformer, "scheduler", None),
        budget=budget,
        plan_provider=plan_provider,
    )
    remove(pipe_or_transformer)
    for model in models:
        family = family_of(model)
        processor_cls = PROCESSORS[family.name]
        stock: dict[str, Any] = {}
        for layer, (name, attn) in enumerate(family.targets(model)):
            if type(attn.processor).__name__ != family.stock_processor:
                raise TypeError(
                    f"PASA replaces {family.stock_processor} in {type(model).__name__}, but "
                    f"{name} uses {type(attn.processor).__name__}; restore the default processor first"
                )
            stock[name] = attn.processor
            attn.set_processor(processor_cls(attn.processor, state, layer, family.name))
        with _inside_accelerate_hook(model):
            HookRegistry.check_if_exists_or_initialize(model).register_hook(
                PASAHook(state, family), HOOK_NAME
            )
        model._pasa = _Installed(state, stock, install_stream(model, family, state))
    return state


def remove(pipe_or_transformer: Any) -> None:
    """Turn PASA off: the stock processors and no hook, as if PASA had never been applied."""
    for model in _denoisers(pipe_or_transformer):
        installed: _Installed | None = getattr(model, "_pasa", None)
        if installed is None:
            continue
        modules = dict(model.named_modules())
        for name, processor in installed.stock.items():
            modules[name].set_processor(processor)
        for handle in installed.handles:
            handle.remove()
        with _inside_accelerate_hook(model):
            HookRegistry.check_if_exists_or_initialize(model).remove_hook(HOOK_NAME, recurse=False)
        del model._pasa


def last_report(pipe_or_transformer: Any) -> GenerationReport | None:
    """The report of the last finished generation (None before the first one)."""
    for model in _denoisers(pipe_or_transformer):
        installed: _Installed | None = getattr(model, "_pasa", None)
        if installed is not None:
            return installed.state.last_report
    raise ValueError("PASA is not applied to this model: call pasa.apply first")
