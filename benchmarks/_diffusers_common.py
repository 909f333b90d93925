"""Shared bits of the diffusers benchmarks: environment record, Wan configs, timing."""

from __future__ import annotations

import contextlib
import json
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pasa.provenance import git_commit, nvidia_driver

# Wan2.1-T2V-1.3B, the official config values (random weights: timing does not depend on them).
WAN_1_3B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
# CPU smoke test: the same code path at toy size.
WAN_TINY = dict(
    WAN_1_3B,
    num_attention_heads=2,
    attention_head_dim=16,
    text_dim=32,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    in_channels=4,
    out_channels=4,
    rope_max_seq_len=32,
)


def build_model(
    family: str, config: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """A random-weight transformer of ``family`` ("wan" or "hunyuan") in ``dtype``.

    Its ``_keep_in_fp32_modules`` stay fp32: the same precision split as
    ``from_pretrained(..., torch_dtype=dtype)``.
    """
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    cls = {"wan": WanTransformer3DModel, "hunyuan": HunyuanVideoTransformer3DModel}[family]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(default)
    keep = set(model._keep_in_fp32_modules or ())
    for name, module in model.named_modules():
        if keep.intersection(name.split(".")):
            module.float()
    return model.eval()


def environment() -> dict[str, Any]:
    """GPU name, driver, library versions and git commit, for the results JSON."""
    import diffusers

    import pasa

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "pasa": pasa.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["driver"] = nvidia_driver()
    else:
        env["gpu"] = None
    return env


@contextlib.contextmanager
def sparse_attention_replaced(make: Callable[[Callable], Callable]) -> Iterator[None]:
    """Inside the block, PASA's diffusers processors call ``make(original)`` instead of
    ``pasa.sparse_attention`` (``original``), for benchmarks that compute more per call or
    change its density; the original is restored on the way out."""
    from pasa.integrations.diffusers import processors

    original = processors.sparse_attention
    processors.sparse_attention = make(original)
    try:
        yield
    finally:
        processors.sparse_attention = original


@dataclass
class HeldOutClip:
    """The testbed model with one held-out clip's latents and caption embedding
    (:func:`held_out_clip`); :meth:`model_call` noises the clip to level ``t``."""

    model: Any
    config: Any
    latents: torch.Tensor
    text: torch.Tensor
    caption: str
    generator: torch.Generator

    def model_call(self, t: float) -> dict[str, Any]:
        """Keyword arguments of one model call on the clip noised to ``t`` (fresh noise from the
        clip's generator at every call, so the levels of one run differ in noise)."""
        from pasa.testbed.flow import NUM_TRAIN_TIMESTEPS, noisy_input

        device = self.latents.device
        dtype = next(self.model.parameters()).dtype
        noise = torch.randn(self.latents.shape, generator=self.generator).to(device)
        tt = torch.full((1,), float(t), device=device)
        x_t, _ = noisy_input(self.latents, noise, tt)
        return dict(
            hidden_states=x_t.to(dtype), timestep=tt * NUM_TRAIN_TIMESTEPS,
            encoder_hidden_states=self.text.to(dtype), return_dict=False,
        )  # fmt: skip


def held_out_clip(checkpoint: Any, clip: int, device: torch.device) -> HeldOutClip:
    """The testbed checkpoint at ``checkpoint`` and held-out clip ``clip`` of the evaluation
    stream (noise generator seeded with ``clip``)."""
    from pasa.eval.generate import EVAL_DATA_SEED, load_model
    from pasa.testbed.data import make_batch
    from pasa.testbed.model import pixels_to_latents

    model, config, _ = load_model(checkpoint, device)
    pixels, captions = make_batch(
        [clip], data_seed=EVAL_DATA_SEED, frames=config.frames, height=config.height,
        width=config.width, device=device, **config.clip_settings(),
    )  # fmt: skip
    latents = pixels_to_latents(pixels, config.pixel_factor)
    text, _ = config.text_encoder()(captions, device=device)
    generator = torch.Generator().manual_seed(clip)
    return HeldOutClip(model, config, latents, text, captions[0], generator)


class TestbedRun(NamedTuple):
    """A testbed benchmark's model on its device, with the clip size it samples."""

    device: torch.device
    model: torch.nn.Module
    config: Any  # pasa.testbed.model.TestbedConfig
    size: int


def open_testbed(args: Any) -> TestbedRun:
    """The checkpoint ``args.checkpoint`` on ``args.device`` (CUDA when available), sampled at
    ``args.size`` pixels (the training size when None): what the testbed benchmarks'
    command lines share."""
    from pasa.eval.generate import load_model, resolve_device

    device = resolve_device(args.device)
    model, config, _ = load_model(args.checkpoint, device)
    return TestbedRun(device, model, config, args.size or config.height)


def testbed_header(benchmark: str, args: Any, device: torch.device) -> dict[str, Any]:
    """The fields every testbed benchmark's JSON starts with: its name, the checkpoint (path
    and hash), the device, versions, commit, and the command-line settings (``args``, an
    ``argparse.Namespace`` with ``checkpoint`` and ``out``)."""
    import diffusers

    from pasa.testbed.model import describe_checkpoint

    return {
        "benchmark": benchmark,
        "checkpoint": describe_checkpoint(args.checkpoint),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": f"torch {torch.__version__}, diffusers {diffusers.__version__}",
        "platform": platform.platform(terse=True),
        "commit": git_commit(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("checkpoint", "out")},
    }


def save_testbed_report(
    benchmark: str, args: Any, device: torch.device, start: float | None = None, **fields: Any
) -> dict[str, Any]:
    """:func:`testbed_header`, then ``fields``, then the seconds since ``start``
    (``time.monotonic()``) when given; written to ``args.out`` when that is set."""
    report = {**testbed_header(benchmark, args, device), **fields}
    if start is not None:
        report["seconds"] = round(time.monotonic() - start, 1)
    if args.out:
        write_json(report, args.out)
    return report


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` in float64 over all elements."""
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))
