"""End-to-end denoising-step time on full-size video DiTs: dense vs PASA (issue 6).

Full-size architectures from the official configurations (values written below; random bf16
weights, whose values do not change the timing), one denoising step = every transformer call of
a step (Wan: cond + uncond for classifier-free guidance; HunyuanVideo: one call, its guidance is
embedded). In one process, after warm-up, timed with CUDA events:

- ``cudnn``: stock model on cuDNN SDPA (diffusers backend ``_native_cudnn``);
- ``fa4``: stock model with its self-attention calls sent to FlashAttention-4 dense (benchmark-only
  patch of the model module's ``dispatch_attention_fn``; cross-attention unchanged);
- ``floor``: self-attention replaced by a copy of ``v`` (what the step costs without attention:
  linear layers, norms, cross-attention), so ``attention share = 1 - floor / cudnn``;
- ``pasa-0.10``, ``pasa-0.15``: ``pasa.apply`` with a fixed density;
- ``pasa-online``: the default online curvature budget at mean 0.15 over a full
  ``--schedule-steps`` Euler schedule; the mean step time and the realised mean density;
- ``cudnn+compile``, ``pasa-0.10+compile``, ``pasa-0.15+compile``: the same after
  ``model.compile_repeated_blocks()`` (diffusers' regional torch.compile), timed after the eager
  variants (the warm-up step compiles).

PASA's overhead outside the kernel (hooks, permutation, estimate, routing) is
``pasa - floor - kernel``, with ``kernel`` the backend alone on one captured plan per layer,
timed in the same process. Peak memory per variant.

    python benchmarks/e2e.py --scenario wan2.1-1.3b-480p            # GPU
    python benchmarks/e2e.py --smoke                                  # CPU, toy config
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from _diffusers_common import (
    WAN_1_3B,
    WAN_TINY,
    build_model,
    environment,
    relative_error,
    write_json,
)

import pasa
from pasa.backends.registry import get_backend

WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
HUNYUAN = dict(  # HunyuanVideo 13B (diffusers' defaults are the official values)
    in_channels=16,
    out_channels=16,
    num_attention_heads=24,
    attention_head_dim=128,
    num_layers=20,
    num_single_layers=40,
    num_refiner_layers=2,
    mlp_ratio=4.0,
    patch_size=2,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    text_embed_dim=4096,
    pooled_projection_dim=768,
    rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
)
HUNYUAN_TINY = dict(
    HUNYUAN,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=1,
    num_single_layers=1,
    num_refiner_layers=1,
    text_embed_dim=16,
    pooled_projection_dim=8,
    rope_axes_dim=(4, 6, 6),
    in_channels=4,
    out_channels=4,
)


@dataclass(frozen=True)
class Scenario:
    family: str  # "wan" | "hunyuan"
    config: dict[str, Any]
    latent: tuple[int, int, int]  # latent (frames, height, width)
    text_tokens: int
    cfg_calls: int  # transformer calls per denoising step
    note: str = ""


SCENARIOS = {
    # 81 frames at 720x1280 -> Wan VAE (x4 time, x8 space) -> 21x90x160 -> (1,2,2) patch: 75,600
    "wan2.1-14b-720p": Scenario("wan", WAN_14B, (21, 90, 160), 512, 2),
    # 81 frames at 480x832 -> 21x60x104 -> 32,760 tokens
    "wan2.1-1.3b-480p": Scenario("wan", WAN_1_3B, (21, 60, 104), 512, 2),
    # 129 frames at 720x1280 -> HunyuanVideo VAE (x4, x8) -> 33x90x160 -> 118,800 tokens + text
    "hunyuan-720p": Scenario("hunyuan", HUNYUAN, (33, 90, 160), 256, 1),
    # 129 frames at 544x960 -> 33x68x120 -> 67,320 tokens, if 720p does not fit
    "hunyuan-544p": Scenario("hunyuan", HUNYUAN, (33, 68, 120), 256, 1),
    "smoke-wan": Scenario("wan", WAN_TINY, (3, 16, 16), 8, 2, "CPU smoke test"),
    "smoke-hunyuan": Scenario("hunyuan", HUNYUAN_TINY, (3, 16, 16), 8, 1, "CPU smoke test"),
}
APPROXIMATE = {"taylor": "taylor", "group_means": "group_means", "none": False}
VARIANTS = ("cudnn", "fa4", "floor", "pasa-0.10", "pasa-0.15", "pasa-online")
# The same with diffusers' regional compilation (``model.compile_repeated_blocks()``: one
# transformer block compiled by torch.compile, reused by every block). PASA's processor stays
# eager (one graph break per attention); the norms, modulation, MLP and cross-attention compile.
# Compilation cannot be undone in-process, so these run after every eager variant.
COMPILED = tuple(f"{v}+compile" for v in ("cudnn", "pasa-0.10", "pasa-0.15"))


@dataclass
class Inputs:
    calls: list[dict[str, Any]] = field(default_factory=list)  # kwargs of each call of a step


def make_inputs(s: Scenario, device: torch.device, dtype: torch.dtype, timestep: float) -> Inputs:
    ch = s.config["in_channels"]
    latent = torch.randn(1, ch, *s.latent, device=device, dtype=dtype)
    t = torch.tensor([timestep], device=device)
    calls = []
    for _ in range(s.cfg_calls):
        if s.family == "wan":
            text = torch.randn(1, s.text_tokens, s.config["text_dim"], device=device, dtype=dtype)
            calls.append(dict(hidden_states=latent, timestep=t, encoder_hidden_states=text))
        else:
            text = torch.randn(
                1, s.text_tokens, s.config["text_embed_dim"], device=device, dtype=dtype
            )
            calls.append(
                dict(
                    hidden_states=latent,
                    timestep=t,
                    encoder_hidden_states=text,
                    encoder_attention_mask=torch.ones(
                        1, s.text_tokens, device=device, dtype=torch.bool
                    ),
                    pooled_projections=torch.randn(
                        1, s.config["pooled_projection_dim"], device=device, dtype=dtype
                    ),
                    guidance=torch.tensor([6000.0], device=device),
                )
            )
    return Inputs(calls)


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Milliseconds of one call of ``fn``: CUDA events on GPU, perf_counter on CPU."""

    def cuda_ms(fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    def cpu_ms(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)

    return cuda_ms if device.type == "cuda" else cpu_ms


@contextlib.contextmanager
def self_attention_patched(
    model: torch.nn.Module, attend: Callable[..., torch.Tensor]
) -> Iterator[None]:
    """Send the model's self-attention ``dispatch_attention_fn`` calls to ``attend(q, k, v)``.

    Benchmark-only. q, k, v are ``(B, S, H, D)``; calls whose key length differs from the query
    length (cross-attention) keep the stock function.
    """
    module = sys.modules[type(model).__module__]
    stock = module.dispatch_attention_fn

    def patched(query, key, value, *args, **kwargs):
        if query.shape[1] != key.shape[1]:
            return stock(query, key, value, *args, **kwargs)
        return attend(query, key, value)

    module.dispatch_attention_fn = patched
    try:
        yield
    finally:
        module.dispatch_attention_fn = stock


def fa4_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from pasa.backends.fa4 import fa4_dense_attention

    return fa4_dense_attention(q, k, v)[0]


def run_scenario(name: str, args: argparse.Namespace) -> dict[str, Any]:
    s = SCENARIOS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build_model(s.family, s.config, device, dtype)
    dense_backend = "_native_cudnn" if device.type == "cuda" else "native"
    model.set_attention_backend(dense_backend)
    inputs = make_inputs(s, device, dtype, timestep=900.0)
    measure = timer(device)
    small = s.config["num_attention_heads"] * s.config["attention_head_dim"] < 256
    # PASAConfig keywords of every PASA variant: toy grids need small blocks.
    pasa_kw = dict(block_size=16, group_size=8) if small else {}
    pasa_kw["approximate"] = APPROXIMATE[args.approximate]

    @torch.no_grad()
    def step() -> None:
        for kwargs in inputs.calls:
            model(**kwargs, return_dict=False)

    def timed(before: Callable[[], object] = lambda: None) -> dict[str, float]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.warmup + args.iters):
            before()
            ms = measure(step)
            if i >= args.warmup:
                times.append(ms)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        return dict(ms=statistics.median(times), all_ms=times, peak_gib=peak)

    @torch.no_grad()
    def first_call() -> torch.Tensor:
        return model(**inputs.calls[0], return_dict=False)[0].float()

    stock_out = first_call()
    results: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    compiled = False
    eager_first = sorted(args.variants, key=lambda v: v.endswith("+compile"))
    for name_ in eager_first:
        variant = name_.removesuffix("+compile")
        if name_.endswith("+compile") and not compiled:
            model.compile_repeated_blocks(fullgraph=False)
            compiled = True
        if variant == "cudnn":
            results[name_] = timed()
        elif variant == "fa4":
            reason = get_backend("auto", device).name != "fa4" and "FA4 is not available here"
            if reason:
                unavailable[name_] = reason
                continue
            with self_attention_patched(model, fa4_dense):
                results[name_] = timed()
        elif variant == "floor":
            with self_attention_patched(model, lambda q, k, v: v):
                results[name_] = timed()
        elif variant.startswith("pasa-0"):
            config = pasa.PASAConfig(
                density=float(variant.split("-")[1]), backend=args.backend, **pasa_kw
            )
            state = pasa.apply(model, config)
            plans: dict[int, Any] = {}
            state.on_plan = lambda _s, layer, _h, plan, plans=plans: plans.setdefault(layer, plan)
            results[name_] = timed(before=state.finish)  # each timed step opens a fresh run
            state.finish()
            state.on_plan = None
            results[name_]["kernel_ms"] = kernel_ms(plans, s, device, dtype, config, measure)
            report = state.last_report.to_dict()
            results[name_]["realised_density"] = report["mean_density"]
            results[name_]["report"] = report
            results[name_]["relative_l2_vs_stock"] = relative_error(first_call(), stock_out)
            state.finish()
            pasa.remove(model)
        elif variant == "pasa-online":
            results[name_] = online_schedule(model, s, inputs, device, args, pasa_kw, measure)
    floor = results.get("floor", {}).get("ms")
    cudnn = results.get("cudnn", {}).get("ms")
    cudnn_compiled = results.get("cudnn+compile", {}).get("ms")
    for key, r in results.items():
        if cudnn:
            r["speedup_vs_cudnn"] = cudnn / r["ms"]
        if cudnn_compiled and key.endswith("+compile"):
            r["speedup_vs_cudnn_compiled"] = cudnn_compiled / r["ms"]
        if "fa4" in results:
            r["speedup_vs_fa4"] = results["fa4"]["ms"] / r["ms"]
        if floor is not None and "kernel_ms" in r and not key.endswith("+compile"):
            r["overhead_ms"] = r["ms"] - floor - r["kernel_ms"]
            r["overhead_share_of_step"] = r["overhead_ms"] / r["ms"]
    grid = (s.latent[0], s.latent[1] // 2, s.latent[2] // 2)
    return dict(
        scenario=name,
        family=s.family,
        transformer_config={k: list(v) if isinstance(v, tuple) else v for k, v in s.config.items()},
        latent=list(s.latent),
        grid=list(grid),
        video_tokens=grid[0] * grid[1] * grid[2],
        text_tokens=s.text_tokens,
        calls_per_step=s.cfg_calls,
        dtype=str(dtype),
        pasa_backend=get_backend(args.backend, device).name,
        attention_share_of_dense_step=None if floor is None or not cudnn else 1 - floor / cudnn,
        results=results,
        unavailable=unavailable,
    )


def kernel_ms(plans, s, device, dtype, config, measure) -> float:
    """Backend alone, on each layer's captured plan, summed over the layers and calls of a step."""
    backend = get_backend(config.backend, device)
    total = 0.0
    heads, dim = s.config["num_attention_heads"], s.config["attention_head_dim"]
    for plan in plans.values():
        seq = plan.layout.seq_len
        q, k, v = (torch.randn(1, seq, heads, dim, device=device, dtype=dtype) for _ in range(3))
        call = lambda q=q, k=k, v=v, plan=plan: backend.fn(q, k, v, plan)  # noqa: E731
        call()  # warm-up / compile
        total += statistics.median(measure(call) for _ in range(3))
    return total * s.cfg_calls


def online_schedule(model, s, inputs, device, args, pasa_kw, measure) -> dict[str, Any]:
    """A full Euler flow-matching schedule with the default online budget; mean step time."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(args.schedule_steps, device=device)
    pipe = types.SimpleNamespace(
        components={"transformer": model, "scheduler": scheduler}, scheduler=scheduler
    )
    config = pasa.PASAConfig(density=0.15, budget="online", backend=args.backend, **pasa_kw)
    state = pasa.apply(pipe, config)
    latent = inputs.calls[0]["hidden_states"].clone()

    @torch.no_grad()
    def run() -> None:
        nonlocal latent
        scheduler.set_timesteps(args.schedule_steps, device=device)
        for t in scheduler.timesteps:
            outs = [
                model(**dict(kw, hidden_states=latent, timestep=t.view(1)), return_dict=False)[0]
                for kw in inputs.calls
            ]
            v = outs[0] if len(outs) == 1 else outs[1] + 5.0 * (outs[0] - outs[1])
            latent = scheduler.step(v, t, latent, return_dict=False)[0]

    ms = measure(run)
    report = state.finish()  # what a pipeline's end-of-call hook reset does
    pasa.remove(pipe)
    return dict(
        ms=ms / args.schedule_steps,
        schedule_steps=args.schedule_steps,
        schedule_ms=ms,
        realised_density=report.to_dict().get("mean_density"),
        report=report.to_dict(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario", nargs="+", default=["wan2.1-1.3b-480p"], choices=list(SCENARIOS)
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + COMPILED
    )
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--approximate", default="taylor", choices=list(APPROXIMATE),
                        help="PASA's approximate branch (the default: taylor)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--schedule-steps", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="toy configs on CPU")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/e2e-<gpu>.json)")
    args = parser.parse_args()
    if args.smoke:
        args.scenario, args.schedule_steps = ["smoke-wan", "smoke-hunyuan"], 4
    env = environment()
    rows = []
    for name in args.scenario:
        r = run_scenario(name, args)
        rows.append(r)
        for variant, res in r["results"].items():
            extra = "".join(
                f"  {key} {res[key]:.3g}"
                for key in ("speedup_vs_cudnn", "overhead_share_of_step")
                if key in res
            )
            print(f"{name:18s} {variant:18s} {res['ms']:10.1f} ms/step{extra}")
        share = r["attention_share_of_dense_step"]
        if share is not None:
            print(f"{name:18s} attention share of the dense cuDNN step: {share:.1%}")
    gpu = (env.get("gpu") or "cpu").replace(" ", "_")
    out = args.out or f"benchmarks/results/e2e-{'smoke-' if args.smoke else ''}{gpu}.json"
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    report = dict(benchmark="e2e", environment=env, settings=settings, scenarios=rows)
    print(f"wrote {write_json(report, out)}")


if __name__ == "__main__":
    main()
