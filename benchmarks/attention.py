"""Attention benchmark: dense baselines, FA4 / Flex on one plan, and PASA's whole call, split.

Run from the repo root on a GPU machine::

    PYTHONPATH=src python benchmarks/attention.py                      # every scenario, density
    PYTHONPATH=src python benchmarks/attention.py --scenario wan14b-720p --densities 0.1 1
    PYTHONPATH=src python benchmarks/attention.py --quick              # one scenario, few reps

FLOPs (forward, non-causal, the dense-equivalent count): ``4 * B * H * S^2 * D``
(``2 * S^2 * D`` for ``Q K^T`` and as many for ``P V``, per batch and head). *Effective* TFLOP/s of
every row divides this dense count by the row's time, so a sparse kernel at density 0.1 that runs
10x faster than dense shows the same effective TFLOP/s; the real work is ``density`` times that.

Everything is measured in one process on the same random bf16 tensors: cuDNN SDPA dense, FA4 dense
(when flash-attn-4 is installed), FA4 and FlexAttention on the identical plan (kernel only), and
PASA's ``sparse_attention`` end to end (re-ordering, estimate, routing, kernel, order restored),
with its parts timed separately. Results: JSON under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from _diffusers_common import git_commit, nvidia_driver  # benchmarks/ is the script's folder

import pasa
from pasa.estimate import block_mass_from_means, group_pool
from pasa.kernels.estimate_triton import grouped_block_estimate, noise_key
from pasa.kernels.pipeline import from_tiled, group_means, plan_from_means, to_tiled
from pasa.kernels.route_triton import route_from_scores
from pasa.layout import make_layout
from pasa.route import _MASS_FLOOR


@dataclass(frozen=True)
class Scenario:
    name: str
    grid: tuple[int, int, int]  # (F, H, W) latent tokens after patchify
    text_tokens: int
    heads: int
    head_dim: int = 128
    batch: int = 1


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("wan1.3b-480p", (21, 30, 52), 0, 12),  # 32,760 tokens
        Scenario("wan14b-720p", (21, 45, 80), 0, 40),  # 75,600 tokens
        Scenario("hunyuan-720p", (33, 45, 80), 256, 24),  # 118,800 video + 256 text
    )
}
DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)
GROUP_SIZES = (32, 64, 128)  # estimate_g{g} parts: the estimate's cost at other group sizes
# --flex-sweep: compiled FlexAttention tiles timed on the plan; the fastest that matches the
# default's output runs the PASA flex rows (pasa.backends.flex.set_kernel_options).
FLEX_CANDIDATES = {
    "torch": {},
    "safe_rows": {"ROWS_GUARANTEED_SAFE": True},
    "safe_rows_n128_s2": {
        "ROWS_GUARANTEED_SAFE": True,
        "BLOCK_M": 128,
        "BLOCK_N": 128,
        "num_warps": 8,
        "num_stages": 2,
    },
    "safe_rows_tma": {"ROWS_GUARANTEED_SAFE": True, "USE_TMA": True},
    "safe_rows_n128_s2_tma": {
        "ROWS_GUARANTEED_SAFE": True,
        "BLOCK_M": 128,
        "BLOCK_N": 128,
        "num_warps": 8,
        "num_stages": 2,
        "USE_TMA": True,
    },
}
# --quick: the bars (Wan2.1-14B 720p dense and at 0.1) and the two other models at 0.1.
QUICK = {"wan14b-720p": (1.0, 0.1), "wan1.3b-480p": (0.1,), "hunyuan-720p": (0.1,)}


def cuda_time_ms(fn, *, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs (CUDA events), after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def environment() -> dict:
    def version(mod: str) -> str | None:
        try:
            from importlib.metadata import version as v

            return v(mod)
        except Exception:
            return None

    return {
        "gpu": torch.cuda.get_device_name(),
        "driver": nvidia_driver(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "flash_attn_4": version("flash-attn-4"),
        "python": platform.python_version(),
    }


def _sdpa_dense_ms(q, k, v, *, warmup: int, reps: int) -> float:
    """cuDNN SDPA on contiguous ``(B, H, S, D)`` copies (its best case: no transpose timed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, S, D)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return cuda_time_ms(
            lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh),
            warmup=warmup,
            reps=reps,
        )


def _estimate_route_parts(qt, kt, qg, kg, layout, config, density, time) -> dict:
    """Estimate and routing times, by variant, and the estimate's error on these inputs.

    ``estimate`` / ``route`` are what ``sparse_attention`` runs (defaults: bf16x3 two-pass
    estimate with Gumbel keys, top-k select, the local window forced or as configured);
    ``estimate_tau0`` the estimate without the Gumbel keys; ``estimate_g{g}`` the estimate at
    another group size, ``route_no_local`` routing with ``local_share=0``,
    ``route_forced_window`` with the window forced in every head (``window_trust=None``),
    ``route_trusted_window`` / ``route_soft_window`` with ``window_trust=0.7`` / ``window_bonus=1``
    (their estimate writes the row share: ``estimate_with_share`` where the defaults skip it), and
    ``estimate_no_share`` the estimate without the row share that only top-p and the trusted
    window read. ``*_err`` = max |mass - fp32 torch
    reference| / (1e-3 |ref| + 1e-7): <= 1 is inside the test bound (random inputs give flat
    attention: a mild case).
    ``plan_jaccard_tf32`` = selected blocks shared by the tf32 and the default plan / union.
    """
    seq = layout.seq_len
    routing = {
        "first_text_block": layout.first_text_block,
        "noise_key": noise_key(config.seed, 7, 3),
        "head_offset": 0,
        "temperature": config.temperature,
        "mass_floor": _MASS_FLOOR,
    }
    common = dict(seq_len=seq, block_size=config.block_size, group_size=config.group_size)
    top_k = config.selection == "top_k"
    # The estimate writes the row share where routing reads it (kernels/pipeline.py's rule).
    need_share = not top_k or config.window_trust is not None

    def estimate(**opts):
        return grouped_block_estimate(
            qg, kg, routing=routing, need_share=need_share, **common, **opts
        )

    out = {"estimate": time(estimate)}
    variants = {
        "estimate_bf16x3": dict(precision="bf16x3"),
        "estimate_tf32": dict(precision="tf32"),
    }
    for name, opts in variants.items():
        out[name] = time(lambda opts=opts: estimate(**opts))
    if config.temperature > 0:  # the Gumbel keys' share of the estimate
        no_noise = {**routing, "temperature": 0.0}
        out["estimate_tau0"] = time(
            lambda: grouped_block_estimate(
                qg, kg, routing=no_noise, need_share=need_share, **common
            )
        )
    # The estimate at the other group sizes (group means taken outside the timing, as the
    # default's come from the re-ordering), and routing without the local window share.
    for g in GROUP_SIZES:
        if g != config.group_size:
            qg_g, kg_g = group_means(qt, kt, g)
            opts = {**common, "group_size": g}
            out[f"estimate_g{g}"] = time(
                lambda qg_g=qg_g, kg_g=kg_g, opts=opts: grouped_block_estimate(
                    qg_g, kg_g, routing=routing, need_share=need_share, **opts
                )
            )
            del qg_g, kg_g
    share, scores = estimate()
    route = lambda cfg, share=share, scores=scores: route_from_scores(  # noqa: E731
        share, scores, layout=layout, config=cfg, density=density
    )
    out["route"] = time(lambda: route(config))
    out["route_no_local"] = time(lambda: route(config.replace(local_share=0.0)))
    # The window forced in every head (no agreement to weigh; the same as "route" under the
    # defaults), and the estimate without the share only top-p and window_trust read.
    forced = config.replace(window_trust=None, window_bonus=None)
    out["route_forced_window"] = time(lambda: route(forced))
    # The trusted (0.7, the measured setting) and soft (bonus 1) windows, from an estimate that
    # writes the share they read (timed as estimate_with_share when the defaults skip it).
    if need_share:
        share_w, scores_w = share, scores
    else:
        with_share = lambda: grouped_block_estimate(  # noqa: E731
            qg, kg, routing=routing, need_share=True, **common
        )
        out["estimate_with_share"] = time(with_share)
        share_w, scores_w = with_share()
    for name, cfg in (
        ("route_trusted_window", forced.replace(window_trust=0.7)),
        ("route_soft_window", forced.replace(window_bonus=1.0)),
    ):
        out[name] = time(lambda cfg=cfg, sh=share_w, sc=scores_w: route(cfg, sh, sc))
    del share_w, scores_w
    out["estimate_no_share"] = time(
        lambda: grouped_block_estimate(qg, kg, routing=routing, need_share=not top_k, **common)
    )
    share_p, scores_p = grouped_block_estimate(qg, kg, routing=routing, **common)
    out["route_top_p"] = time(
        lambda: route_from_scores(
            share_p,
            scores_p,
            layout=layout,
            config=config.replace(selection="top_p"),
            density=density,
        )
    )
    # Error of each precision against the fp32 torch reference (mass only, no routing).
    counts = torch.full((qg.shape[2],), float(config.group_size), device=qg.device)
    counts[-1] = seq - (qg.shape[2] - 1) * config.group_size
    ref = block_mass_from_means(
        qg, kg, counts, block_size=config.block_size, group_size=config.group_size
    )
    for precision in ("tf32x3", "bf16x3", "tf32"):
        got, _ = grouped_block_estimate(qg, kg, precision=precision, **common)
        ratio = ((got - ref).abs() / (1e-3 * ref.abs() + 1e-7)).max().item()
        out[f"{precision}_err"] = round(ratio, 4)
    del ref
    base = route(config).to_dense_mask()
    _, scores_tf32 = grouped_block_estimate(
        qg, kg, routing=routing, need_share=need_share, precision="tf32", **common
    )
    other = route_from_scores(
        share, scores_tf32, layout=layout, config=config, density=density
    ).to_dense_mask()
    out["plan_jaccard_tf32"] = round(((base & other).sum() / (base | other).sum()).item(), 5)
    return out


def _flex_sweep(qt, kt, vt, plan, time) -> tuple[dict | None, list[dict]]:
    """Each of :data:`FLEX_CANDIDATES` on ``plan``: its kernel time, and its output's largest
    difference from torch's default tile (a tile that fails or differs by more than 2e-2 is
    not eligible). Returns the fastest eligible options and the sweep's rows."""
    from pasa.backends.flex import flex_block_attention, set_kernel_options

    rows, best, ref = [], None, None
    for name, options in FLEX_CANDIDATES.items():
        set_kernel_options(options)
        try:
            out, _ = flex_block_attention(qt, kt, vt, plan)
            if ref is None:
                ref = out.float()
            diff = (out.float() - ref).abs().max().item()
            ms = time(lambda: flex_block_attention(qt, kt, vt, plan))
        except Exception as exc:  # an option this torch / Triton / GPU cannot compile
            rows.append({"name": name, "options": options, "error": repr(exc)[:300]})
            print(f"flex sweep {name:24s} failed: {exc!r}"[:200], flush=True)
            continue
        finally:
            set_kernel_options(None)
        rows.append({"name": name, "options": options, "ms": round(ms, 3), "max_diff": diff})
        print(f"flex sweep {name:24s} {ms:9.3f} ms  max diff {diff:.2e}", flush=True)
        if diff <= 2e-2 and (best is None or ms < best[0]):
            best = (ms, options)
    return (None if best is None else best[1]), rows


def run_scenario(
    sc: Scenario,
    densities,
    *,
    warmup: int,
    reps: int,
    fa4_ok: bool,
    backends=("fa4", "flex"),
    sdpa: bool = True,
    flex_sweep: bool = False,
) -> list[dict]:
    from pasa.backends.flex import flex_block_attention, set_kernel_options

    torch.manual_seed(0)
    seq = sc.grid[0] * sc.grid[1] * sc.grid[2] + sc.text_tokens
    shape = (sc.batch, seq, sc.heads, sc.head_dim)  # (B, S, H, D)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * sc.batch * sc.heads * seq * seq * sc.head_dim
    tflops = lambda ms: flops / ms / 1e9  # noqa: E731
    rows = []

    def row(name: str, density: float, ms: float, **extra) -> None:
        rows.append(
            {
                "scenario": sc.name,
                "method": name,
                "density": density,
                "ms": round(ms, 3),
                "eff_tflops": round(tflops(ms), 1),
                **extra,
            }
        )
        print(
            f"{sc.name:14s} {name:24s} d={density:<5} {ms:9.3f} ms {tflops(ms):7.1f} TF/s",
            " ".join(f"{k}={v}" for k, v in extra.items()),
            flush=True,
        )

    dense_ms = {}
    if sdpa:
        dense_ms["sdpa"] = _sdpa_dense_ms(q, k, v, warmup=warmup, reps=reps)
        row("sdpa_cudnn_dense", 1.0, dense_ms["sdpa"])
    if fa4_ok and "fa4" in backends:
        from pasa.backends.fa4 import fa4_dense_attention

        dense_ms["fa4"] = cuda_time_ms(
            lambda: fa4_dense_attention(q, k, v), warmup=warmup, reps=reps
        )
        row("fa4_dense", 1.0, dense_ms["fa4"])
    layout = make_layout(sc.grid, num_text_tokens=sc.text_tokens, device="cuda")
    backends = [b for b in backends if b != "fa4" or fa4_ok]

    def measure(density: float) -> None:
        config = pasa.PASAConfig(density=min(density, 1.0), backend=backends[0])
        qt, kt, vt, qg, kg = to_tiled(q, k, v, layout, config.group_size)
        kw = dict(layout=layout, config=config, density=density, step=7, layer=3, head_offset=0)
        plan = plan_from_means(qg, kg, **kw)
        real = plan.density()
        time = lambda fn: cuda_time_ms(fn, warmup=warmup, reps=reps)  # noqa: E731
        # PASA's parts
        parts = {
            "permute": time(
                lambda: (
                    to_tiled(q, k, v, layout, config.group_size if density < 1 else None),
                    from_tiled(qt, layout),
                )
            ),
        }
        tiled_parts = {}
        if density < 1:
            parts.update(_estimate_route_parts(qt, kt, qg, kg, layout, config, density, time))
            tiled_parts = {
                "pool": time(lambda: group_means(qt, kt, config.group_size)),
                "pool_torch": time(
                    lambda: (group_pool(qt, config.group_size), group_pool(kt, config.group_size))
                ),
                "estimate": parts["estimate"],
                "route": parts["route"],
            }
        for name in backends:
            extra = {}
            if name == "fa4":
                from pasa.backends.fa4 import fa4_block_attention as fn
            else:
                fn = flex_block_attention
                if flex_sweep and density < 1:
                    chosen, sweep = _flex_sweep(qt, kt, vt, plan, time)
                    set_kernel_options(chosen)
                    extra = {"flex_options": chosen, "flex_sweep": sweep}
            kernel_ms = time(lambda fn=fn: fn(qt, kt, vt, plan))
            row(f"{name}_kernel_on_plan", round(real, 4), kernel_ms, **extra)
            cfg = config.replace(backend=name, check_finite=False)
            call = dict(
                grid=sc.grid,
                config=cfg,
                num_text_tokens=sc.text_tokens,
                density=density,
                step=7,
                layer=3,
            )
            overhead = parts["estimate"] + parts["route"] if density < 1 else 0.0
            for label, inputs, tiled, split in (
                ("pasa_total", (q, k, v), False, parts),
                ("pasa_total_tiled", (qt, kt, vt), True, tiled_parts),
            ):
                total = time(
                    lambda inputs=inputs, tiled=tiled, call=call: pasa.sparse_attention(
                        *inputs, tiled=tiled, **call
                    )
                )
                split = {part: round(ms, 4) for part, ms in split.items()}
                split["kernel"] = round(kernel_ms, 3)
                row(
                    f"{label}_{name}",
                    round(real, 4),
                    total,
                    target_density=density,
                    parts=split,
                    estimate_route_over_kernel=round(overhead / kernel_ms, 4),
                    x_sdpa=round(dense_ms["sdpa"] / total, 2) if "sdpa" in dense_ms else None,
                )
            set_kernel_options(None)

    for density in densities:
        measure(density)
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="scenario(s) to run (default: all)",
    )
    p.add_argument("--densities", type=float, nargs="+", default=None)
    p.add_argument(
        "--quick",
        action="store_true",
        help="wan14b-720p at 1 and 0.1, wan1.3b-480p and hunyuan-720p at 0.1; 5 reps",
    )
    p.add_argument("--backends", nargs="+", default=["fa4", "flex"], choices=["fa4", "flex"])
    p.add_argument("--no-sdpa", action="store_true", help="skip the cuDNN dense baseline")
    p.add_argument(
        "--flex-sweep",
        action="store_true",
        help="time FlexAttention's tile options on each sparse plan; the PASA flex rows use the "
        "fastest (recorded as flex_options)",
    )
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: results/...)")
    p.add_argument("--note", default="", help="free text stored with the results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    names = args.scenario or list(QUICK if args.quick else SCENARIOS)
    reps, warmup = (5, 2) if args.quick else (args.reps, args.warmup)
    from pasa.backends.fa4 import fa4_unavailable

    fa4_reason = fa4_unavailable(torch.device("cuda"))
    if fa4_reason:
        print(f"FA4 rows skipped: {fa4_reason}", flush=True)
    root = Path(__file__).resolve().parent
    commit = git_commit()
    result = {
        "benchmark": "attention",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "env": environment(),
        "commit": commit,
        "note": args.note,
        "flops_formula": "4 * B * H * S^2 * D (dense-equivalent; effective TFLOP/s = that / time)",
        "fa4_unavailable": fa4_reason,
        "rows": [],
    }
    out = args.out or root / "results" / f"attention-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        densities = args.densities or (QUICK.get(name, (0.1,)) if args.quick else DENSITIES)
        result["rows"] += run_scenario(
            SCENARIOS[name],
            densities,
            warmup=warmup,
            reps=reps,
            fa4_ok=fa4_reason is None,
            backends=tuple(args.backends),
            sdpa=not args.no_sdpa,
            flex_sweep=args.flex_sweep,
        )
        out.write_text(json.dumps(result, indent=1))  # after every scenario: a cut run keeps some
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
