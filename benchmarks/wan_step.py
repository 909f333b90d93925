"""One Wan2.1-1.3B denoising step, stock vs PASA: time and PASA report.

Full-size Wan2.1-T2V-1.3B architecture (official config values, random bf16 weights) at 480p,
81 frames: latent 16 x 21 x 60 x 104, 21 x 30 x 52 = 32,760 video tokens after the (1, 2, 2)
patch, 512 text tokens. One denoising step is two transformer calls (cond + uncond, as
WanPipeline runs classifier-free guidance). Stock and PASA are timed in the same process with
CUDA events after warm-up; the JSON also records the PASA report of the step and the relative
L2 error of the PASA output against stock.

    python benchmarks/wan_step.py                    # GPU, writes benchmarks/results/
    python benchmarks/wan_step.py --smoke            # CPU, tiny config, float32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _diffusers_common import (
    WAN_1_3B,
    WAN_TINY,
    build_wan,
    environment,
    relative_error,
    write_json,
)

import pasa
from pasa.backends.registry import get_backend
from pasa.integrations.diffusers import apply, remove

# (latent frames, latent height, latent width): 81 frames at 480 x 832 through the Wan VAE
# (x4 in time, x8 in space).
LATENT_480P_81F = (21, 60, 104)
LATENT_SMOKE = (3, 10, 14)
TEXT_TOKENS = 512


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def cuda_time(fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    def cpu_time(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)

    return cuda_time if device.type == "cuda" else cpu_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny config, float32, CPU ok")
    parser.add_argument("--density", type=float, default=0.15)
    parser.add_argument("--backend", default="auto", help="PASA backend (auto, reference, ...)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    config_kwargs = WAN_TINY if args.smoke else WAN_1_3B
    frames, height, width = LATENT_SMOKE if args.smoke else LATENT_480P_81F
    torch.manual_seed(0)
    model = build_wan(config_kwargs, device, dtype)
    channels, text_dim = config_kwargs["in_channels"], config_kwargs["text_dim"]
    latent = torch.randn(1, channels, frames, height, width, device=device, dtype=dtype)
    cond = torch.randn(1, TEXT_TOKENS, text_dim, device=device, dtype=dtype)
    uncond = torch.randn(1, TEXT_TOKENS, text_dim, device=device, dtype=dtype)
    timestep = torch.tensor([900.0], device=device)

    @torch.no_grad()
    def step() -> torch.Tensor:
        out = model(latent, timestep, cond, return_dict=False)[0]
        model(latent, timestep, uncond, return_dict=False)
        return out

    measure = _timer(device)

    def timed(before_each: Callable[[], object] = lambda: None) -> list[float]:
        times = []
        for i in range(args.warmup + args.iters):
            before_each()
            ms = measure(step)
            if i >= args.warmup:
                times.append(ms)
        return times

    stock_out = step()
    stock_ms = timed()

    # Smoke: 16-token blocks so that the toy grid has blocks to skip.
    blocks = dict(block_size=16, group_size=8) if args.smoke else {}
    config = pasa.PASAConfig(density=args.density, backend=args.backend, **blocks)
    state = apply(model, config)
    pasa_out = step()
    state.finish()  # every timed step is the first step of a fresh run
    pasa_ms = timed(before_each=state.finish)
    state.finish()
    report = state.last_report
    remove(model)

    grid = (frames, height // 2, width // 2)
    result = {
        "benchmark": "wan_step",
        "smoke": args.smoke,
        "model": "Wan2.1-T2V-1.3B architecture, random weights" if not args.smoke else "tiny Wan",
        "transformer_config": {
            k: list(v) if isinstance(v, tuple) else v for k, v in config_kwargs.items()
        },
        "latent": [1, channels, frames, height, width],
        "grid": list(grid),
        "video_tokens": grid[0] * grid[1] * grid[2],
        "text_tokens": TEXT_TOKENS,
        "dtype": str(dtype),
        "step": "cond + uncond transformer calls",
        "pasa_backend": get_backend(args.backend, device).name,
        "pasa_config": {
            "density": config.density,
            "block_size": config.block_size,
            "group_size": config.group_size,
            "temperature": config.temperature,
            "selection": config.selection,
        },
        "warmup": args.warmup,
        "iters": args.iters,
        "stock_ms": stock_ms,
        "pasa_ms": pasa_ms,
        "stock_ms_median": statistics.median(stock_ms),
        "pasa_ms_median": statistics.median(pasa_ms),
        "speedup": statistics.median(stock_ms) / statistics.median(pasa_ms),
        "pasa_vs_stock_relative_l2": relative_error(pasa_out.float(), stock_out.float()),
        "pasa_report": report.to_dict(),
        "environment": environment(),
    }
    gpu = (result["environment"]["gpu"] or "cpu").replace(" ", "_")
    out = args.out or f"benchmarks/results/wan_step_{'smoke_' if args.smoke else ''}{gpu}.json"
    print(report.summary())
    print(
        f"stock {result['stock_ms_median']:.1f} ms  PASA {result['pasa_ms_median']:.1f} ms  "
        f"speed-up {result['speedup']:.2f}x  rel. L2 vs stock {result['pasa_vs_stock_relative_l2']:.3g}"
    )
    print(f"wrote {write_json(result, out)}")


if __name__ == "__main__":
    main()
