"""``pasa eval --devices cuda:0 cuda:1 ...``: one suite spread over several GPUs.

The suite's caption x seed pairs are independent, so each device runs a share of them in a
process of its own (:func:`~pasa.eval.suite.run_suite` with ``pairs``), writing into
``OUT/shards/<k>/``; this process then merges the shares into ``OUT`` and writes the same files
and results page as a one-device run. Every share allocates from one calibration profile,
recorded once here on the first device (or kept from an earlier run with ``resume``), so the
merged table is the one a single device would have written, up to the kernels' rounding.

With ``resume`` the pairs already finished in ``OUT/results.json`` or in any share's folder are
kept and only the rest are dealt out, so a run cut off by a time limit can be finished on another
number of devices.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pasa.eval import suite as _suite

SHARDS = "shards"
_POLL_S = 2.0


def resolve_devices(devices: Sequence[str]) -> list[str]:
    """``devices`` as given, with ``all`` meaning every visible CUDA device (a device named
    twice runs two shares)."""
    out: list[str] = []
    for name in devices:
        if name == "all":
            count = torch.cuda.device_count()
            if count == 0:
                raise ValueError("--devices all: no CUDA device is visible")
            out += [f"cuda:{i}" for i in range(count)]
        else:
            torch.device(name)  # raises on a malformed name
            out.append(name)
    if not out:
        raise ValueError("no device given")
    return out


def deal(pairs: Sequence[tuple[int, int]], count: int) -> list[list[tuple[int, int]]]:
    """``pairs`` dealt round-robin into ``count`` shares (some may be empty)."""
    return [list(pairs[k::count]) for k in range(count)]


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _sources(out: Path, resume: bool) -> list[Path]:
    """Results files whose finished pairs count: the shares' and, with ``resume``, ``OUT``'s."""
    files = sorted((out / SHARDS).glob("*/results.json"), key=lambda p: int(p.parent.name))
    if resume and (out / "results.json").is_file():
        files.insert(0, out / "results.json")
    return files


def _finished(files: Sequence[Path]) -> set[tuple[int, int]]:
    done: set[tuple[int, int]] = set()
    for path in files:
        data = _load(path)
        if data is not None:
            done |= {(d["caption"], d["seed"]) for d in data["dense"]}
    return done


def merge_results(files: Sequence[Path], devices: Sequence[str]) -> dict[str, Any]:
    """One results dict from shares of one run: their settings must agree on everything the
    suite checks when it resumes; each caption x seed pair is taken from the first file that
    has it, and pairs are ordered by caption, then seed."""
    parts = [(p, _load(p)) for p in files]
    bad = [str(p) for p, data in parts if data is None]
    if bad:
        raise ValueError(f"unreadable results file(s): {', '.join(bad)}")
    (first_path, first), *rest = parts
    keys = (*_suite._RESUME_KEYS, "seeds", "captions")
    for path, data in rest:
        differ = [k for k in keys if data["settings"].get(k) != first["settings"].get(k)]
        if data["captions"] != first["captions"]:
            differ.append("caption texts")
        if differ:
            raise ValueError(
                f"cannot merge {path} with {first_path}: their {', '.join(differ)} differ"
            )
    profiles = {json.dumps(d["settings"].get("budget profile"), sort_keys=True) for _, d in parts}
    if len(profiles) > 1:
        raise ValueError("the shares allocated from different budget profiles; cannot merge")
    dense: dict[tuple[int, int], dict] = {}
    runs: dict[tuple[int, int], list[dict]] = {}
    for _, data in parts:
        for d in data["dense"]:
            key = (d["caption"], d["seed"])
            if key not in dense:
                dense[key] = d
                runs[key] = [r for r in data["runs"] if (r["caption"], r["seed"]) == key]
    seeds = first["settings"]["seeds"]
    order = sorted(dense, key=lambda k: (k[0], seeds.index(k[1]) if k[1] in seeds else k[1]))
    names = sorted({d["settings"]["device"] for _, d in parts})
    settings = {**first["settings"], "device": f"{' / '.join(names)} x {len(devices)}"}
    return {
        "settings": settings,
        "captions": first["captions"],
        "dense": [dense[k] for k in order],
        "runs": [r for k in order for r in runs[k]],
    }


def _shard_main(device: str, kwargs: dict[str, Any], log: str, threads: int) -> None:
    """One share, in its own process: the suite on ``device`` with output to ``log``, its CPU
    work (the metrics: SSIM's convolutions in torch, optical flow in OpenCV) on ``threads``
    threads, so that the shares do not each start one per core of the machine."""
    torch.set_num_threads(threads)
    try:
        import cv2

        cv2.setNumThreads(threads)
    except ImportError:  # run_suite names the missing extra
        pass
    with open(log, "a", buffering=1) as handle:
        sys.stdout = sys.stderr = handle
        try:
            _suite.run_suite(device=device, progress=False, **kwargs)
        except BaseException:
            traceback.print_exc()
            raise SystemExit(1) from None


def run_suite_parallel(
    checkpoint: str | Path | None,
    *,
    devices: Sequence[str],
    out_dir: str | Path = "eval_results",
    results_md: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    command: str = "pasa eval",
    budget_profile: str | Path | None = None,
    **options: Any,
) -> _suite.SuiteResult:
    """:func:`~pasa.eval.suite.run_suite` over ``devices``, one process each (see the module
    docstring); ``options`` are run_suite's (captions, seeds, densities, strategies, steps,
    size, frames); ``budget_profile`` is shared by every share instead of one recorded here.
    Raises what run_suite raises, and RuntimeError naming the log of a share that failed (after
    merging what the others finished)."""
    import multiprocessing

    from tqdm import tqdm

    from pasa.eval.generate import eval_captions, load_model, require
    from pasa.eval.strategies import STRATEGIES, get_strategy
    from pasa.testbed.model import DEFAULT_CHECKPOINT

    require("diffusers", "safetensors", "matplotlib", "cv2", command=command)
    devices = resolve_devices(devices)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / SHARDS).exists():
        shutil.rmtree(out / SHARDS)
    checkpoint = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    names = [n for n in (options.get("strategies") or list(STRATEGIES)) if n != "dense"]
    steps = options.get("steps", 20)

    model, config, _ = load_model(checkpoint, torch.device(devices[0]))
    size = options.get("size") or config.height
    frames = options.get("frames") or config.frames
    captions = options.get("captions", 4)
    count = captions if isinstance(captions, int) else len(captions)
    if isinstance(captions, int):
        settings = config.clip_settings(options.get("scene_style"))
        options["captions"] = eval_captions(count, **settings)
        options["scene_style"] = settings["scene_style"]  # what the shards record
    profile_path = out / "budget_profile.json"
    if any(get_strategy(n).calibrated for n in names):
        _suite.suite_profile(
            model, config, profile_path, given=budget_profile, reuse=resume,
            num_steps=steps, frames=frames, size=size,
        )  # fmt: skip
        options["budget_profile"] = profile_path
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    seeds = list(options.get("seeds", (0, 1)))
    every = [(ci, seed) for ci in range(count) for seed in seeds]
    done = _finished(_sources(out, resume))
    shares = deal([p for p in every if p not in done], len(devices))
    per_pair = 1 + len(names) * len(options.get("densities", _suite.DENSITIES))
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // max(1, sum(1 for s in shares if s)))
    procs: list[tuple[int, Any, Path]] = []
    for k, (device, share) in enumerate(zip(devices, shares, strict=True)):
        if not share:
            continue
        folder = out / SHARDS / str(k)
        folder.mkdir(parents=True, exist_ok=True)
        kwargs = dict(options, checkpoint=checkpoint, out_dir=folder, pairs=share,
                      results_md=folder / "results.md", resume=resume, command=command)  # fmt: skip
        log = folder / "log.txt"
        proc = ctx.Process(
            target=_shard_main, args=(device, kwargs, str(log), threads), daemon=False
        )
        proc.start()
        procs.append((k, proc, log))

    def finished_now() -> int:
        return len(_finished(_sources(out, resume)) - done)

    todo = sum(len(s) for s in shares)
    with tqdm(total=todo * per_pair, desc="pasa eval", unit="clip", disable=not progress) as bar:
        bar.set_postfix_str(f"{len(procs)} devices")
        while any(p.is_alive() for _, p, _ in procs):
            time.sleep(_POLL_S)
            bar.update(finished_now() * per_pair - bar.n)
        bar.update(finished_now() * per_pair - bar.n)
    failed = [(k, log) for k, p, log in procs if p.exitcode != 0]

    files = _sources(out, resume)
    if not files:
        raise RuntimeError(f"no share finished anything; see {failed[0][1] if failed else out}")
    results = merge_results(files, devices)
    labels = {s.name: s.label for s in STRATEGIES.values()}
    md = Path(results_md) if results_md is not None else out / "results.md"
    written, table = _suite._write(out, results, labels, md, command)
    if failed:
        tails = "; ".join(f"share {k}: {_tail(log)}" for k, log in failed)
        raise RuntimeError(f"{len(failed)} share(s) failed ({tails}); the others are merged")
    return _suite.SuiteResult(results, written, table)


def _tail(log: Path, lines: int = 3) -> str:
    try:
        text = log.read_text().strip().splitlines()
    except OSError:
        return f"no log at {log}"
    return f"{log}: " + " | ".join(text[-lines:])
