"""How concentrated is the testbed's attention? Exact per-layer block recall at given densities.

:func:`capture_qk` runs one forward of a ``WanTransformer3DModel`` and returns the self-attention
queries and keys of every block after QK-norm and rotary embedding (what the attention sees);
:func:`attention_recall_report` feeds it noisy data clips at several noise levels and reports, per
layer, the share of attention mass kept by the best ``density`` of the 128-token blocks (the
issue's yardstick: at least 0.6 at 10% averaged over layers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from pasa.analysis import true_block_mass
from pasa.eval.metrics import oracle_recall
from pasa.integrations.diffusers.processors import wan_rotary
from pasa.layout import make_layout


class _CaptureProcessor:
    """Wraps the stock self-attention processor; records ``q, k (B, S, H, D)`` then runs it."""

    def __init__(self, stock: Any, sink: list) -> None:
        self.stock, self.sink = stock, sink

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            q, k = wan_rotary(q, *rotary_emb), wan_rotary(k, *rotary_emb)
        self.sink.append((q.detach(), k.detach()))
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


@contextlib.contextmanager
def capturing(model: torch.nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Inside the block, every forward appends each layer's ``(q, k)`` to the yielded list."""
    sink: list[tuple[torch.Tensor, torch.Tensor]] = []
    stock = [block.attn1.processor for block in model.blocks]
    for block, proc in zip(model.blocks, stock, strict=True):
        block.attn1.set_processor(_CaptureProcessor(proc, sink))
    try:
        yield sink
    finally:
        for block, proc in zip(model.blocks, stock, strict=True):
            block.attn1.set_processor(proc)


@torch.no_grad()
def capture_qk(model: torch.nn.Module, hidden_states, timestep, encoder_hidden_states):
    """Per-layer self-attention ``[(q, k)]``, each ``(B, S, H, D)``, video tokens frame-major."""
    with capturing(model) as sink:
        model(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            return_dict=False,
        )
    return list(sink)


@torch.no_grad()
def attention_recall_report(
    model: torch.nn.Module,
    config,
    *,
    densities: Sequence[float] = (0.1, 0.2),
    times: Sequence[float] = (0.25, 0.5, 0.75),
    num_clips: int = 1,
    data_seed: int = 10_000,
    block_size: int = 128,
    scene_style: str | None = None,
) -> dict[str, Any]:
    """Oracle block recall per layer on noised data clips (``config``: a ``TestbedConfig``) of
    the checkpoint's own scene style, or of ``scene_style`` (ValueError if it is none).

    Returns:
        ``{"densities": [...], "per_layer": {"0.1": [layer0, ...]}, "mean": {"0.1": x},
        "per_time": {"0.1": {"0.25": x, ...}}, "per_head": {"0.1": [[layer0 head0, ...], ...]},
        "grid": (F, H, W), "times": [...]}``: recall averaged over rows and clips, and over
        heads and times (``per_layer``), heads and layers (``per_time``) or times
        (``per_head``).
    """
    from pasa.testbed.data import make_batch
    from pasa.testbed.flow import NUM_TRAIN_TIMESTEPS, noisy_input
    from pasa.testbed.model import pixels_to_latents

    settings = config.clip_settings(scene_style)  # ValueError for an unknown style
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    pixels, captions = make_batch(
        range(num_clips),
        data_seed=data_seed,
        frames=config.frames,
        height=config.height,
        width=config.width,
        device=device,
        **settings,
    )
    latents = pixels_to_latents(pixels, config.pixel_factor)
    text, _ = config.text_encoder()(captions, device=device)
    grid = config.token_grid()
    layout = make_layout(grid, block_size=block_size, device=device)
    gen = torch.Generator().manual_seed(data_seed)
    sums = {d: [0.0] * config.num_layers for d in densities}
    by_time = {d: {} for d in densities}  # density -> {t: mean over layers}
    by_head = {d: [[0.0] * config.num_heads for _ in range(config.num_layers)] for d in densities}
    for t in times:
        noise = torch.randn(latents.shape, generator=gen).to(device)
        tt = torch.full((num_clips,), float(t), device=device)
        x_t, _ = noisy_input(latents, noise, tt)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            layers = capture_qk(model, x_t.to(dtype), tt * NUM_TRAIN_TIMESTEPS, text.to(dtype))
        for i, (q, k) in enumerate(layers):
            mass = true_block_mass(q.float(), k.float(), layout)
            for d in densities:
                # Every head has as many rows, so the layer's recall is its heads' mean.
                heads = [oracle_recall(mass[:, h : h + 1], d) for h in range(mass.shape[1])]
                recall = sum(heads) / len(heads)
                sums[d][i] += recall / len(times)
                for h, head_recall in enumerate(heads):
                    by_head[d][i][h] += head_recall / len(times)
                by_time[d][t] = by_time[d].get(t, 0.0) + recall / len(layers)
    per_layer = {str(d): [round(v, 4) for v in sums[d]] for d in densities}
    return {
        "scene_style": settings["scene_style"],
        "grid": grid,
        "block_size": block_size,
        "times": list(times),
        "densities": list(densities),
        "per_layer": per_layer,
        "mean": {str(d): round(sum(sums[d]) / len(sums[d]), 4) for d in densities},
        "per_time": {
            str(d): {str(t): round(v, 4) for t, v in by_time[d].items()} for d in densities
        },
        "per_head": {str(d): [[round(v, 4) for v in row] for row in by_head[d]] for d in densities},
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m pasa.eval.probe CHECKPOINT [--json OUT]``: per-layer recall of a checkpoint."""
    import argparse
    import json

    from pasa.provenance import git_commit
    from pasa.testbed.model import load_testbed
    from pasa.testbed.scene import SCENE_STYLE_NAMES

    parser = argparse.ArgumentParser(prog="python -m pasa.eval.probe", description=main.__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--times", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                        help="noise levels t in (0, 1) (default 0.25 0.5 0.75)")  # fmt: skip
    parser.add_argument("--scene-style", choices=SCENE_STYLE_NAMES,
                        help="clips of this style (default: the checkpoint's own)")  # fmt: skip
    args = parser.parse_args(argv)
    if not all(0.0 < t < 1.0 for t in args.times):
        parser.error(f"--times must lie in (0, 1), got {args.times}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, config, record = load_testbed(args.checkpoint, device=device)
    report = attention_recall_report(
        model, config, num_clips=args.clips, times=args.times, scene_style=args.scene_style
    )
    report["training"] = record["training"]
    report["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    report["commit"] = git_commit()
    for d, values in report["per_layer"].items():
        print(f"recall at density {d}: mean {report['mean'][d]:.3f}, per layer {values}, "
              f"per noise level t {report['per_time'][d]}, per layer and head "
              f"{report['per_head'][d]}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
