"""Flow-matching trainer for the testbed model; resumable, time-budgeted, DDP under torchrun.

    torchrun --nproc-per-node 4 -m pasa.testbed.train --out /tmp/run --max-minutes 8.5 \
        --resume-from .train --state-out $OUT

Every random draw is keyed by a counter, not by hidden RNG state: the clips of step s on rank r are
``clip_indices(s, rank=r)`` of stream ``--data-seed``, and the times, noise and caption dropout of
step s on rank r come from a generator seeded by ``(--seed, s, r)``. A resumed run therefore sees
exactly what an uninterrupted one would (on CPU the weights are bit-identical). ``--max-minutes``
stops cleanly before the limit and writes ``state.pt`` (model, EMA, optimizer, step, elapsed time,
arguments) atomically; ``--resume`` continues from it. ``--export`` writes the EMA weights as a
bf16 testbed checkpoint (see :mod:`pasa.testbed.model`).

``--state-out DIR`` also writes the *compact* state (:mod:`pasa.testbed.state`, about 6 bytes a
parameter in sha256-checked parts of at most 15 MiB), small enough to leave a GPU machine and come
back in the next call (docs/testbed-training.md); ``--resume-from DIR`` continues from it.
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import json
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from pasa.testbed.data import clip_indices, make_batch
from pasa.testbed.flow import NUM_TRAIN_TIMESTEPS, noisy_input, sample_time
from pasa.testbed.model import (
    CODEC_FIELDS,
    POSITION_CODES,
    POSITION_GAIN,
    PREDICTIONS,
    PRESETS,
    CheckpointError,
    TestbedConfig,
    build_model,
    count_parameters,
    describe_checkpoint,
    load_testbed,
    pixels_to_latents,
    save_testbed,
    transfer_codec_weights,
    with_pixel_factor,
)
from pasa.testbed.scene import CAPTION_ORDERS, SCENE_STYLE_NAMES, mix_seed
from pasa.testbed.state import (
    BLOCK,
    STATE_BUDGET_BYTES,
    StateError,
    compact_weights_codec,
    decode_fp24,
    decode_log8,
    decode_q8,
    encode_fp24,
    encode_log8,
    encode_q8,
    read_state_parts,
    write_state_parts,
)
from pasa.testbed.text import CONTEXTS

STATE_FILE = "state.pt"
_SAVE_MARGIN_S = 30.0  # stop this long before --max-minutes: time to write the checkpoint


# -- the compact state: what travels between calls -------------------------------------------


def _read_log(path: Path, upto_step: int) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row.get("step", 0) <= upto_step]


# The config fields that say what the model was trained on and what its output means rather than
# its shape: a warm start (--init-from) may change them; a resume must keep them (the flags name
# the saved ones).
WARM_START_FIELDS = ("text_context", "caption_order", "scene_style", "prediction", "position_code")


def _warm_start_settings(config: TestbedConfig) -> dict[str, str]:
    """``config``'s :data:`WARM_START_FIELDS`, by name."""
    return {k: getattr(config, k) for k in WARM_START_FIELDS}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pasa.testbed.train", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, help="run directory (state.pt, log.jsonl)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="testbed")
    p.add_argument(
        "--text-context",
        choices=CONTEXTS,
        default=None,
        help="caption encoding (default: the preset's, 'bigram'; 'none' continues a state "
        "trained before bigram captions, such as run 1's)",
    )
    p.add_argument(
        "--caption-order",
        choices=CAPTION_ORDERS,
        default=None,
        help="how captions are written (default: the preset's, 'scene_first'; 'objects_first' "
        "continues a state trained before, such as run 2's)",
    )
    p.add_argument(
        "--scene-style",
        choices=SCENE_STYLE_NAMES,
        default=None,
        help="what the clips look like (default: the preset's, 'bold'; 'original' continues a "
        "state trained before, such as run 3's)",
    )
    p.add_argument(
        "--prediction",
        choices=PREDICTIONS,
        default=None,
        help="what the network's last layer predicts: 'velocity' (default: the preset's, runs "
        "1-4) or 'sample', the clean clip, turned into the velocity in the model's forward "
        "(pasa/testbed/model.py); --init-from a velocity checkpoint may switch it",
    )
    p.add_argument(
        "--position-code",
        choices=POSITION_CODES,
        default=None,
        help="an absolute position code on the patch embedding: 'none' (default: the preset's, "
        "runs 1-5) or 'sinusoidal' (pasa/testbed/model.py; its gain starts at zero, so "
        "--init-from a checkpoint without one begins where that checkpoint was)",
    )
    p.add_argument(
        "--pixel-factor",
        type=int,
        default=None,
        help="pixels a latent pixel stands for, per side (default: the preset's, 4); the token "
        "grid stays, so 2 trains on 128 x 128 clips; --init-from a checkpoint at another factor "
        "resamples its input and output layers",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt if present")
    p.add_argument(
        "--state-out",
        default=None,
        metavar="DIR",
        help="also write the compact state (state.partNN, state.manifest.json, log.jsonl) here "
        "at every save, e.g. $OUT",
    )
    p.add_argument(
        "--resume-from",
        default=None,
        metavar="DIR",
        help="continue from the compact state in DIR (when --resume found no OUT/state.pt)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="DIR|FILE",
        help="start a new run (step 0, fresh optimizer and warm-up) from the EMA weights of the "
        "compact state in DIR or of a testbed checkpoint (.safetensors); the text encoding may "
        "differ (a warm start onto new captions)",
    )
    p.add_argument(
        "--state-weights",
        choices=("auto", "fp32", "fp24"),
        default="auto",
        help="weights in the compact state: fp32 if it then fits 56 MiB (auto), or as given",
    )
    p.add_argument("--max-minutes", type=float, default=8.5, help="wall-clock budget of this call")
    p.add_argument("--total-steps", type=int, default=None, help="stop (and end the LR decay) here")
    p.add_argument(
        "--decay-steps",
        type=int,
        default=None,
        help="cosine over the last N steps before --total-steps only (default: from warm-up)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="clips per rank at the largest size")
    p.add_argument("--sizes", default=None, help="pixel sizes, e.g. '256,128' (default: preset's)")
    p.add_argument("--size-weights", default=None, help="relative frequency of each size")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (0 = no EMA)")
    p.add_argument("--time-dist", choices=("logit_normal", "uniform"), default="logit_normal")
    p.add_argument("--shift", type=float, default=3.0, help="time shift, as in the sampler")
    p.add_argument(
        "--pure-noise-share",
        type=float,
        default=0.0,
        help="share of training times set to 1 (pure noise), where the model can only read its "
        "caption (pasa/testbed/flow.py's sample_time; default 0)",
    )
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--save-minutes", type=float, default=4.0, help="also save every N minutes")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument(
        "--export", default=None, help="write EMA weights here (.safetensors) at the end"
    )
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    p.add_argument(
        "--prefetch",
        choices=("auto", "on", "off"),
        default="auto",
        help="prepare the next step's clips in a background thread while this step trains "
        "(auto: on CUDA); the batches are the same either way",
    )
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument(
        "--stall-seconds",
        type=float,
        default=180.0,
        help="if no step (or the final save) finishes for this long, append every thread's "
        "stack to OUT/stall-rank<R>.txt every SECONDS and keep waiting; 0: off",
    )
    return p


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def _parse_sizes(args: argparse.Namespace, config: TestbedConfig) -> tuple[list[int], list[float]]:
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [config.height]
    weights = (
        [float(w) for w in args.size_weights.split(",")]
        if args.size_weights
        else [1.0] * len(sizes)
    )
    if len(weights) != len(sizes):
        raise ValueError(f"--size-weights has {len(weights)} entries for {len(sizes)} sizes")
    step = 2 * config.pixel_factor
    for s in sizes:
        if s % step or max(sizes) % s:
            raise ValueError(f"size {s} must divide {max(sizes)} and be a multiple of {step}")
    return sizes, weights


def _step_size(step: int, seed: int, sizes: list[int], weights: list[float]) -> int:
    """The pixel size of ``step`` (the same on every rank)."""
    u = (mix_seed(seed, step, salt=7) % 2**24) / 2**24 * sum(weights)
    for size, weight in zip(sizes, weights, strict=True):
        if u < weight:
            return size
        u -= weight
    return sizes[-1]


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then constant, or cosine down to 10% at ``--total-steps``: over the whole
    run, or over its last ``--decay-steps`` only (constant before)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.total_steps is None:
        return args.lr
    decay = getattr(args, "decay_steps", None)
    start = args.warmup if decay is None else max(args.warmup, args.total_steps - decay)
    progress = min(1.0, max(0.0, (step - start) / max(1, args.total_steps - start)))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    """One run: model, EMA, optimizer, step counter, and the step function."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.init_from and args.resume_from:
            raise ValueError(
                "--init-from starts a new run and --resume-from continues one: give one"
            )
        self.args = args
        self.rank, local_rank, self.world = _dist_info()
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if args.device:
            self.device = torch.device(args.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.config = PRESETS[args.preset]
        chosen = {k: getattr(args, k, None) for k in WARM_START_FIELDS}
        self.config = replace(self.config, **{k: v for k, v in chosen.items() if v is not None})
        if getattr(args, "pixel_factor", None) is not None:
            self.config = with_pixel_factor(self.config, args.pixel_factor)
        self.sizes, self.size_weights = _parse_sizes(args, self.config)
        self.text = self.config.text_encoder()
        torch.manual_seed(args.seed)  # identical initial weights on every rank
        self.model = build_model(self.config).to(self.device).train()
        if args.grad_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if args.ema > 0 else None
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99)
        )
        self.step, self.elapsed_s, self.samples = 0, 0.0, 0
        self.out = Path(args.out)
        self.history: list[dict] = []  # log rows of earlier calls (carried in the compact state)
        self.own_record = self._train_record()
        self.trained_by = self.own_record  # who made the weights: this call, or the state's
        if args.resume and (self.out / STATE_FILE).is_file():
            self._load(self.out / STATE_FILE)
        elif args.resume_from:
            self._load_compact(Path(args.resume_from))
        elif args.init_from:
            self._init_from(Path(args.init_from))
        net = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
        self.net = torch.compile(net) if args.compile else net

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "elapsed_s": self.elapsed_s,
            "samples": self.samples,
            "config": asdict(self.config),
            "args": vars(self.args),
            "trained_by": self.trained_by,
            "history": self.history,
        }

    def _check_config(
        self, saved: dict | None, where: Path, any_data: bool = False
    ) -> TestbedConfig:
        """The saved config; refuse a state trained with another model or data (fields missing
        from an older state take the defaults of the first runs: ``text_context`` "none",
        ``caption_order`` "objects_first", ``scene_style`` "original", ``prediction`` "velocity").
        ``any_data`` accepts other :data:`WARM_START_FIELDS` (captions, clips, prediction; the
        same model shapes)."""
        try:
            config = TestbedConfig.from_dict(saved or {})
        except (TypeError, ValueError) as exc:
            raise StateError(f"{where} holds no usable testbed config ({exc})") from exc
        ours = _warm_start_settings(self.config)
        codec = {k: getattr(self.config, k) for k in CODEC_FIELDS}
        if replace(config, **ours, **codec) != self.config:
            raise StateError(f"{where} was trained with a different config: {asdict(config)}")
        if config != self.config and not any_data:
            flags = [f"--{k.replace('_', '-')} {getattr(config, k)}" for k, v in ours.items()
                     if getattr(config, k) != v]  # fmt: skip
            if config.pixel_factor != self.config.pixel_factor:
                flags.append(f"--pixel-factor {config.pixel_factor}")
            raise StateError(f"{where} was trained with a different config: {asdict(config)} "
                             f"(pass {' '.join(flags)} to continue it)")  # fmt: skip
        return config

    def _init_from(self, source: Path) -> None:
        """Warm start from a compact state's folder or a testbed checkpoint file: model and EMA
        both take the source's EMA weights (a state's live weights when it has no EMA; a
        checkpoint holds its run's EMA in bf16); step, optimizer, warm-up and log start afresh.
        The source's own record is kept as ``init_from`` in this run's training record."""
        if source.is_file():
            source_weights, saved, origin = self._checkpoint_source(source)
        else:
            tensors, manifest = read_state_parts(source)
            saved = self._check_config(manifest.get("config"), source, any_data=True)
            weights, ema = self._decode_weights(tensors, manifest, source, saved)
            source_weights = ema if ema else weights
            origin = {
                "steps": manifest["step"],
                "samples": manifest["samples"],
                "train_hours": round(manifest["elapsed_s"] / 3600, 3),
                **_warm_start_settings(saved),
                "data_seed": manifest.get("rng", {}).get("data_seed"),
                "trained_by": manifest.get("trained_by"),
            }
        switched = saved.prediction != self.config.prediction
        recoded = saved.pixel_factor != self.config.pixel_factor
        coded = saved.position_code != self.config.position_code
        if coded and saved.position_code != "none":
            raise StateError(
                f"{source} has a learned position code ({saved.position_code}); a warm start "
                f"cannot drop it (pass --position-code {saved.position_code})"
            )
        if recoded:
            source_weights = transfer_codec_weights(
                source_weights, saved.pixel_factor, self.config.pixel_factor
            )
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name == POSITION_GAIN and coded:
                    continue  # a new code: its gain stays at zero, the source's function
                p.copy_(source_weights[name])
            if switched:  # the output means something else now: start the head at zero (DiT)
                self.model.proj_out.weight.zero_()
                self.model.proj_out.bias.zero_()
            if self.ema is not None:
                self.ema.load_state_dict(self.model.state_dict())
        self.own_record = {**self.own_record, "init_from": origin}
        self.trained_by = self.own_record
        if self.rank == 0:
            before = " ".join(_warm_start_settings(saved).values())
            after = " ".join(_warm_start_settings(self.config).values())
            print(f"note: new run initialised from the weights of step {origin['steps']} "
                  f"(captions, clips, prediction: {before} -> {after})")  # fmt: skip
            if switched:
                print(f"note: the output layer starts at zero ({saved.prediction} -> "
                      f"{self.config.prediction} prediction)")  # fmt: skip
            if coded:
                print(f"note: the {self.config.position_code} position code starts at zero gain")
            if recoded:
                print(
                    f"note: pixel factor {saved.pixel_factor} -> {self.config.pixel_factor}: "
                    f"{self.config.height}x{self.config.width} clips on the same token grid; "
                    "the input and output layers resampled (transfer_codec_weights)"
                )

    def _checkpoint_source(self, path: Path) -> tuple[dict[str, torch.Tensor], TestbedConfig, dict]:
        """A testbed checkpoint's weights (fp32), config and record, for :meth:`_init_from`."""
        try:
            model, config, record = load_testbed(path)
        except CheckpointError as exc:
            raise StateError(str(exc)) from exc
        self._check_config(asdict(config), path, any_data=True)
        training = dict(record.get("training") or {})
        origin = {"checkpoint": describe_checkpoint(path), **training}
        origin.setdefault("steps", None)
        origin.update(_warm_start_settings(config))
        return dict(model.named_parameters()), config, origin

    def _decode_weights(
        self,
        tensors: dict[str, torch.Tensor],
        manifest: dict,
        directory: Path,
        config: TestbedConfig | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The compact state's weights and EMA (empty when it has none), by parameter name;
        shaped as this run's model, or as ``config``'s (a warm start from another codec or
        position code)."""
        codec = manifest["codecs"]["weights"]
        model = self.model
        differ = ("pixel_factor", "position_code")  # the fields that change parameters
        if config is not None and any(
            getattr(config, k) != getattr(self.config, k) for k in differ
        ):
            model = build_model(config)
        shapes = {n: p.shape for n, p in model.named_parameters()}
        if sorted(f"w.{n}" for n in shapes) != sorted(k for k in tensors if k.startswith("w.")):
            raise StateError(f"the state in {directory} holds other parameters than this model")
        weights, ema = {}, {}
        for name, shape in shapes.items():
            w = tensors[f"w.{name}"]
            w = decode_fp24(w, shape) if codec == "fp24" else w.reshape(shape)
            weights[name] = w
            if f"ema.{name}.q" in tensors:
                ema[name] = w + decode_q8(tensors[f"ema.{name}.q"], tensors[f"ema.{name}.s"], shape)
        return weights, ema

    def _load(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=True)
        self._check_config(state["config"], path)
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.elapsed_s, self.samples = (
            state["step"],
            state["elapsed_s"],
            state["samples"],
        )
        self.trained_by = state.get("trained_by", self.trained_by)
        self._keep_init_record()
        self.history = state.get("history") or _read_log(path.parent / "log.jsonl", self.step)

    def _keep_init_record(self) -> None:
        """A resumed warm-started run keeps saying where its weights started."""
        if "init_from" in self.trained_by:
            self.own_record = {**self.own_record, "init_from": self.trained_by["init_from"]}

    def _train_record(self) -> dict:
        """What the export's training record says of the run (besides steps and time)."""
        return {
            "data_seed": self.args.data_seed,
            "seed": self.args.seed,
            "world_size": self.world,
            "batch_size_per_rank": self.args.batch_size,
            "sizes": self.sizes,
            "lr": self.args.lr,
            "ema": self.args.ema,
            "shift": self.args.shift,
            "pure_noise_share": self.args.pure_noise_share,
            "device": torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else "cpu",
        }

    def compact_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The compact state's tensors and the manifest's metadata (see the module docstring)."""
        codec = self.args.state_weights
        if codec == "auto":
            codec = compact_weights_codec(self.model, ema=self.ema is not None)
        ema = dict(self.ema.named_parameters()) if self.ema is not None else {}
        tensors: dict[str, torch.Tensor] = {}
        steps = []
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                w = p.detach().float()
                if codec == "fp24":
                    tensors[f"w.{name}"] = encode_fp24(w)
                    w = decode_fp24(tensors[f"w.{name}"], w.shape)
                else:
                    tensors[f"w.{name}"] = w
                if name in ema:
                    q, s = encode_q8(ema[name].float() - w)
                    tensors[f"ema.{name}.q"], tensors[f"ema.{name}.s"] = q, s
                st = self.opt.state.get(p, {})
                if "exp_avg" not in st:
                    steps.append(-1)
                    continue
                steps.append(int(st["step"]))
                c, lo, hi = encode_log8(st["exp_avg_sq"].float().sqrt())
                tensors[f"rms.{name}.c"], tensors[f"rms.{name}.lo"] = c, lo
                tensors[f"rms.{name}.hi"] = hi
                denom = decode_log8(c, lo, hi, p.shape) + self.opt.defaults["eps"]
                q, s = encode_q8(st["exp_avg"].float() / denom)
                tensors[f"upd.{name}.q"], tensors[f"upd.{name}.s"] = q, s
        tensors["adam.step"] = torch.tensor(steps, dtype=torch.int64)
        meta = {
            "step": self.step,
            "samples": self.samples,
            "elapsed_s": self.elapsed_s,
            "data_cursor": {"next_step": self.step, "samples": self.samples},
            "rng": {
                "seed": self.args.seed,
                "data_seed": self.args.data_seed,
                "keyed_by": "(seed, step, rank): no generator state to carry",
            },
            "config": asdict(self.config),
            "args": vars(self.args),
            "trained_by": self.trained_by,
            "codecs": {
                "weights": codec,
                "ema": "int8 of ema - weights" if ema else None,
                "exp_avg_sq": "log8 of sqrt",
                "exp_avg": "int8 of exp_avg / (sqrt(exp_avg_sq) + eps)",
                "block": BLOCK,
            },
            "parameters": count_parameters(self.model),
        }
        return tensors, meta

    def _load_compact(self, directory: Path) -> None:
        tensors, manifest = read_state_parts(directory)
        self._check_config(manifest.get("config"), directory)
        weights, saved_ema = self._decode_weights(tensors, manifest, directory)
        ema = dict(self.ema.named_parameters()) if self.ema is not None else {}
        steps = tensors["adam.step"].tolist()
        opt_state = self.opt.state_dict()
        with torch.no_grad():
            for i, (name, p) in enumerate(self.model.named_parameters()):
                p.copy_(weights[name])
                if name in ema:  # a state saved without EMA: start the average at the weights
                    ema[name].copy_(saved_ema.get(name, weights[name]))
                if steps[i] < 0:
                    continue
                rms = decode_log8(tensors[f"rms.{name}.c"], tensors[f"rms.{name}.lo"],
                                  tensors[f"rms.{name}.hi"], p.shape)  # fmt: skip
                upd = decode_q8(tensors[f"upd.{name}.q"], tensors[f"upd.{name}.s"], p.shape)
                opt_state["state"][i] = {
                    "step": torch.tensor(float(steps[i])),
                    "exp_avg": upd * (rms + self.opt.defaults["eps"]),
                    "exp_avg_sq": rms * rms,
                }
        self.opt.load_state_dict(opt_state)
        self.step, self.samples = manifest["step"], manifest["samples"]
        self.elapsed_s = manifest["elapsed_s"]
        self.trained_by = manifest.get("trained_by", self.trained_by)
        self._keep_init_record()
        self.history = _read_log(directory / "log.jsonl", self.step)
        saved = manifest.get("args", {})
        keys = ("seed", "data_seed", "batch_size", "sizes", "size_weights", "preset")
        changed = {k: (saved.get(k), getattr(self.args, k)) for k in keys}
        changed = {k: v for k, v in changed.items() if v[0] != v[1]}
        if self.trained_by.get("world_size") != self.world:
            changed["world_size"] = (self.trained_by.get("world_size"), self.world)
        if changed and self.rank == 0:
            what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            print(f"note: resuming step {self.step} with other settings: {what}")

    def save(self) -> None:
        """Atomically write ``state.pt`` and, with ``--state-out``, the compact state (rank 0),
        then wait for every rank."""
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = self.out / (STATE_FILE + ".tmp")
            torch.save(self.state_dict(), tmp)
            os.replace(tmp, self.out / STATE_FILE)
            if self.args.state_out:
                self.save_compact(self.args.state_out)
        if self.world > 1:
            dist.barrier()

    def save_compact(self, directory: str | os.PathLike) -> dict:
        """Write the compact state's parts, manifest and the whole ``log.jsonl`` to ``directory``;
        returns the manifest."""
        tensors, meta = self.compact_state()
        manifest = write_state_parts(tensors, meta, directory)
        rows = "".join(json.dumps(row) + "\n" for row in self.history)
        tmp = Path(directory) / "log.jsonl.tmp"
        tmp.write_text(rows)
        os.replace(tmp, Path(directory) / "log.jsonl")
        if manifest["total_bytes"] > STATE_BUDGET_BYTES:
            print(f"warning: compact state is {manifest['total_bytes'] / 2**20:.1f} MiB, over the "
                  f"{STATE_BUDGET_BYTES / 2**20:.0f} MiB a call can carry")  # fmt: skip
        return manifest

    def export(self, path: str | os.PathLike) -> Path:
        """EMA (or live) weights as a bf16 testbed checkpoint with the training record."""
        record = {"steps": self.step, "samples": self.samples, **self.trained_by,
                  "train_hours": round(self.elapsed_s / 3600, 3)}  # fmt: skip
        return save_testbed(self.ema or self.model, self.config, path, training=record)

    # -- training ------------------------------------------------------------------------

    def step_clips(self, step: int) -> tuple[int, list[int]]:
        """Clip size in pixels and clip indices of ``step`` on this rank."""
        size = _step_size(step, self.args.seed, self.sizes, self.size_weights)
        batch = self.args.batch_size * (max(self.sizes) // size) ** 2  # same tokens at every size
        return size, clip_indices(step, batch_size=batch, rank=self.rank, world_size=self.world)

    def render_clips(self, size: int, indices: list[int]) -> tuple[torch.Tensor, list[str]]:
        """Pixels ``(B, 3, F, size, size)`` on the device and captions of clips ``indices``."""
        return make_batch(
            indices,
            data_seed=self.args.data_seed,
            frames=self.config.frames,
            height=size,
            width=size,
            device=self.device,
            supersample=max(self.sizes) // size,
            **self.config.clip_settings(),
        )

    def batch_for(self, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Latents ``(B, C, F, h, w)`` and text ``(B, L, text_dim)`` of ``step`` on this rank."""
        size, indices = self.step_clips(step)
        batch = len(indices)
        pixels, captions = self.render_clips(size, indices)
        gen = torch.Generator().manual_seed(mix_seed(self.args.seed, step, salt=self.rank + 1))
        drop = torch.rand(batch, generator=gen) < self.args.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        text, _ = self.text(captions, device=self.device)
        latents = pixels_to_latents(pixels, self.config.pixel_factor)
        return latents, text, batch

    def train_step(self, prepared: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> float:
        """One optimizer step on ``prepared`` (this step's :meth:`batch_for`, made now when None);
        returns the (rank-local) loss."""
        step = self.step
        latents, text, batch = prepared if prepared is not None else self.batch_for(step)
        gen = torch.Generator().manual_seed(mix_seed(self.args.seed, step, salt=1000 + self.rank))
        t = sample_time(
            batch,
            generator=gen,
            distribution=self.args.time_dist,
            shift=self.args.shift,
            pure_noise_share=self.args.pure_noise_share,
        )
        noise_gen = torch.Generator(self.device).manual_seed(
            mix_seed(self.args.seed, step, 2000 + self.rank)
        )
        noise = torch.randn(latents.shape, generator=noise_gen, device=self.device)
        t = t.to(self.device)
        x_t, target = noisy_input(latents, noise, t)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, self.args)
        with torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
            pred = self.net(
                hidden_states=x_t,
                timestep=t * NUM_TRAIN_TIMESTEPS,
                encoder_hidden_states=text,
                return_dict=False,
            )[0]
        loss = F.mse_loss(pred.float(), target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        self.opt.step()
        if self.ema is not None:
            decay = min(self.args.ema, (1 + step) / (10 + step))  # short warm-up of the average
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
        self.step += 1
        self.samples += batch * self.world
        self.trained_by = self.own_record
        return float(loss.detach())

    def _log(self, row: dict) -> None:
        self.history.append(row)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "log.jsonl", "a") as handle:
                handle.write(json.dumps(row) + "\n")

    def _should_stop(self, call_start: float) -> bool:
        """Every rank stops at the same step: rank 0's clock decides."""
        limit = self.args.max_minutes * 60 - _SAVE_MARGIN_S
        stop = torch.tensor([time.monotonic() - call_start > limit], device=self.device)
        if self.world > 1:
            dist.broadcast(stop, 0)
        return bool(stop.item())

    def run(self) -> dict:
        """Train until ``--total-steps`` or the time budget; save; return a summary."""
        args, start = self.args, time.monotonic()
        last_save, losses, log = start, [], []
        total = args.total_steps
        bar = tqdm(
            total=total, initial=self.step, disable=self.rank != 0, desc="train", unit="step"
        )
        if self.rank == 0:
            params = count_parameters(self.model)
            bar.write(f"testbed: {params / 1e6:.2f}M params, grid {self.config.token_grid()}, "
                      f"world {self.world}, from step {self.step}")  # fmt: skip
        on_cuda = self.device.type == "cuda"
        prefetch = args.prefetch == "on" or (args.prefetch == "auto" and on_cuda)
        batches = BatchPrefetcher(self) if prefetch else None
        watchdog = StallWatchdog(self.out / f"stall-rank{self.rank}.txt", args.stall_seconds)
        try:
            while total is None or self.step < total:
                watchdog.arm()
                if self._should_stop(start):
                    break
                t0 = time.monotonic()
                prepared = batches.get(self.step) if batches is not None else None
                losses.append(self.train_step(prepared))
                self.elapsed_s += time.monotonic() - t0
                bar.update(1)
                if self.step % args.log_every == 0 or self.step == total:
                    mean = sum(losses) / len(losses)
                    bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr_at(self.step - 1, args):.2e}")
                    row = {"step": self.step, "loss": mean, "samples": self.samples,
                           "elapsed_s": round(self.elapsed_s, 1)}  # fmt: skip
                    log.append(row)
                    self._log(row)
                    losses = []
                if time.monotonic() - last_save > args.save_minutes * 60:
                    self.save()
                    last_save = time.monotonic()
            if batches is not None:
                batches.close()  # before the final save (closing twice is harmless)
            watchdog.arm()  # the final save waits for every rank
            bar.close()
            self.save()
            if self.rank == 0 and args.export:
                self.export(args.export)
        finally:
            watchdog.close()
            if batches is not None:
                batches.close()
        return {"step": self.step, "samples": self.samples, "log": log}


class StallWatchdog:
    """Writes every thread's Python stack to ``path`` when :meth:`arm` is not called again
    within ``seconds``, and again every ``seconds`` after (``faulthandler.dump_traceback_later``;
    the run goes on). A hung collective or a stuck batch thread then leaves a trace that a call
    script can bring back after ending the run with ``timeout``. An unused file is removed on
    :meth:`close`. ``seconds`` <= 0 turns it off."""

    def __init__(self, path: Path, seconds: float) -> None:
        self.path, self.seconds, self.file = path, float(seconds), None

    def arm(self) -> None:
        if self.seconds <= 0:
            return
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a")  # noqa: SIM115 (kept open for the dump thread)
        faulthandler.dump_traceback_later(self.seconds, repeat=True, file=self.file)

    def close(self) -> None:
        if self.file is None:
            return
        faulthandler.cancel_dump_traceback_later()
        self.file.close()
        self.file = None
        try:
            if self.path.stat().st_size == 0:
                self.path.unlink()  # no stall: leave nothing behind
        except OSError:
            pass


class BatchPrefetcher:
    """Makes step ``s + 1``'s batch in a background thread while step ``s`` trains.

    A step's batch is a pure function of the step (counter-keyed draws, ``Trainer.batch_for``),
    so prefetching changes when it is made, never what it holds. On CUDA the thread works on a
    stream of its own; the training stream waits for it through an event, and the batch's tensors
    are recorded on the training stream so that the allocator keeps them until that stream is
    done with them. Rendering and caption hashing are mostly Python and small kernels: they run
    while the training thread waits for the GPU.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.device = trainer.device
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="pasa-batch")
        self.pending: tuple[int, Future] | None = None

    def _make(self, step: int):
        if self.stream is None:
            return self.trainer.batch_for(step), None
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            prepared = self.trainer.batch_for(step)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return prepared, ready

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Step ``step``'s batch (made now unless it was prefetched); starts on ``step + 1``'s."""
        if self.pending is not None and self.pending[0] == step:
            prepared, ready = self.pending[1].result()
        else:
            if self.pending is not None:
                self.pending[1].result()  # a step was skipped: drop that batch
            prepared, ready = self._make(step)
        self.pending = (step + 1, self.pool.submit(self._make, step + 1))
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for tensor in prepared[:2]:
                tensor.record_stream(current)
        return prepared

    def close(self) -> None:
        """Stop the thread; a batch still being made is finished and dropped, its errors too
        (nothing will train on it)."""
        if self.pending is not None and not self.pending[1].cancel():
            self.pending[1].exception()  # waits; an error there concerns no step that ran
        self.pool.shutdown(wait=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.pure_noise_share <= 1.0:
        parser.error(f"--pure-noise-share must be in [0, 1], got {args.pure_noise_share}")
    if args.pixel_factor is not None:
        try:
            with_pixel_factor(PRESETS[args.preset], args.pixel_factor)
        except ValueError as exc:
            parser.error(f"--pixel-factor: {exc}")
    trainer = Trainer(args)
    try:
        trainer.run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
