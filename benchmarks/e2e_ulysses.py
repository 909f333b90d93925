"""Wan2.1-14B 720p denoising step on several GPUs with Ulysses: dense cuDNN against PASA.

Launch with ``torchrun --nproc_per_node 2 benchmarks/e2e_ulysses.py`` (NCCL, bf16). Every rank
builds the same random-weight Wan2.1-14B (``e2e.WAN_14B``) and inputs, then
``enable_parallelism(ContextParallelConfig(ulysses_degree=N))``: each rank holds the whole model
and 1/N of the tokens, and an all-to-all before and after attention gives it all tokens of 1/N of
the heads. One step = both guidance calls, timed on every rank between a barrier and a device
synchronisation (the slowest rank's time is the step's), after warm-up:

- ``cudnn``: stock model on cuDNN SDPA;
- ``pasa-<density>``: ``pasa.apply`` with a fixed density (each rank routes its own heads; the
  plans are those of one GPU, see ulysses_check.py).

Rank 0 writes JSON with the step times, the speedup, PASA's realised density and its output's
relative L2 distance from dense (random weights: a sanity check, not a quality figure).

    torchrun --nproc_per_node 2 benchmarks/e2e_ulysses.py --out benchmarks/results/e2e-ulysses.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from _diffusers_common import build_model, environment, relative_error, write_json
from diffusers import ContextParallelConfig
from e2e import SCENARIOS, make_inputs

import pasa


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="wan2.1-14b-720p", choices=sorted(SCENARIOS))
    parser.add_argument("--densities", type=float, nargs="+", default=[0.10])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, float32, toy config")
    args = parser.parse_args()

    dist.init_process_group("gloo" if args.smoke else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.smoke:
        device, dtype, args.scenario = torch.device("cpu"), torch.float32, "smoke-wan"
        torch.accelerator.device_count = lambda: 1  # one CPU "device" per rank (ulysses_check.py)
    else:
        device, dtype = (
            torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))),
            torch.bfloat16,
        )
        torch.cuda.set_device(device)
    s = SCENARIOS[args.scenario]
    blocks = dict(block_size=16, group_size=8) if args.smoke else {}
    if s.family != "wan":
        raise SystemExit("this benchmark runs the Wan scenarios")
    torch.manual_seed(0)  # same weights and inputs on every rank
    model = build_model(s.family, s.config, device, dtype)
    model.set_attention_backend("native" if args.smoke else "_native_cudnn")
    inputs = make_inputs(s, device, dtype, timestep=900.0)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))

    @torch.no_grad()
    def step() -> torch.Tensor:
        outs = [model(**kw, return_dict=False)[0] for kw in inputs.calls]
        return outs[0]

    def timed(before=lambda: None) -> dict:
        times = []
        for i in range(args.warmup + args.iters):
            before()
            dist.barrier()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ms = torch.tensor([1e3 * (time.perf_counter() - t0)], device=device)
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank does
            if i >= args.warmup:
                times.append(float(ms))
        return {"ms": statistics.median(times), "all_ms": times}

    results = {"cudnn": timed()}
    dense_out = step().float()
    for density in args.densities:
        name = f"pasa-{density:.2f}"
        state = pasa.apply(model, pasa.PASAConfig(density=density, **blocks))
        results[name] = timed(before=state.finish)
        state.finish()
        out = step().float()
        report = state.finish()
        results[name]["realised_density"] = report.to_dict()["mean_density"]
        results[name]["relative_l2_vs_dense"] = relative_error(out, dense_out)
        results[name]["speedup_vs_cudnn"] = results["cudnn"]["ms"] / results[name]["ms"]
        pasa.remove(model)
    if rank == 0:
        for name, r in results.items():
            extra = f"  {r['speedup_vs_cudnn']:.2f}x" if "speedup_vs_cudnn" in r else ""
            print(f"{args.scenario} ulysses {world}: {name:10s} {r['ms']:10.1f} ms/step{extra}")
        env = environment()
        gpu = (env.get("gpu") or "gpu").replace(" ", "_")
        path = write_json(
            {
                "benchmark": "e2e_ulysses",
                "scenario": args.scenario,
                "ulysses_degree": world,
                "calls_per_step": s.cfg_calls,
                "environment": env,
                "results": results,
            },
            args.out or f"benchmarks/results/e2e-ulysses-{world}x{gpu}.json",
        )
        print(f"wrote {path}")
    dist.barrier()  # no rank tears down while another still has collectives in flight
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
