"""Compact resumable training state: small enough to leave a GPU machine and come back.

A device call returns at most 8 files of 16 MiB and carries at most 64 MiB in, so the trainer's
``state.pt`` (16 bytes a parameter) is re-encoded to about 6 (docs/testbed-training.md):

- weights: fp32 (lossless) where the whole state fits 56 MiB, else fp24 (top 3 bytes, rounded:
  relative error <= 2^-16, 128x finer than the bf16 copy the forward computes with);
- EMA: int8 codes of ``ema - weights`` per 256 values (exact where they are equal);
- AdamW ``exp_avg_sq``: its square root in 8-bit log codes per 256 values (zeros exact);
- AdamW ``exp_avg``: int8 codes of ``exp_avg / (sqrt(exp_avg_sq) + eps)``, the normalised update
  Adam applies (bounded by about 2.4 for betas 0.9, 0.99), per 256 values.

Written as ``state.partNN`` files of at most 15 MiB and a JSON manifest with each part's sha256;
reading verifies every part and raises :class:`StateError` naming what is missing or damaged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

MANIFEST_FILE = "state.manifest.json"
PART_PREFIX = "state.part"
PART_BYTES = 15 * 2**20  # each part <= 15 MiB (a device call returns files of <= 16 MiB)
STATE_BUDGET_BYTES = 56 * 2**20  # what a call can carry beside the repo and the wheels
COMPACT_FORMAT = "pasa-testbed-train-state"
COMPACT_VERSION = 1
BLOCK = 256  # elements per scale of the 8-bit codes
_LOG_RANGE_OCTAVES = 40.0  # log-8 codes span at most 2^-40 .. 1 of a block's largest value


class StateError(RuntimeError):
    """A compact training state is missing, incomplete, corrupt or does not fit this run."""


def _blocks(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().float().reshape(-1)
    return F.pad(flat, (0, (-flat.numel()) % BLOCK)).view(-1, BLOCK)


def _unblock(blocks: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    return blocks.reshape(-1)[: math.prod(shape)].reshape(shape)


def _pad_codes(codes: torch.Tensor) -> torch.Tensor:
    return F.pad(codes.reshape(-1).float(), (0, (-codes.numel()) % BLOCK)).view(-1, BLOCK)


def encode_fp24(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the top 3 bytes (sign, exponent, 15 mantissa bits), rounded to nearest:
    relative error <= 2^-16; exact for values whose low 8 bits are zero. ``(n, 3)`` uint8."""
    bits = (
        x.detach().float().contiguous().reshape(-1).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    )
    finite = (bits & 0x7F800000) != 0x7F800000
    bits = torch.where(finite, torch.clamp(bits + 0x80, max=0xFFFFFFFF), bits)
    top = bits >> 8
    return torch.stack([top & 0xFF, (top >> 8) & 0xFF, (top >> 16) & 0xFF], 1).to(torch.uint8)


def decode_fp24(codes: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    c = codes.to(torch.int64)
    bits = (c[:, 0] << 8) | (c[:, 1] << 16) | (c[:, 2] << 24)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    return bits.view(torch.float32).reshape(shape)


def encode_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear int8 codes with one fp32 scale (block max / 127) per ``BLOCK`` elements: absolute
    error <= scale / 2; exact for zeros."""
    b = _blocks(x)
    scale = b.abs().amax(1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (b / safe[:, None]).round().clamp(-127, 127).to(torch.int8)
    return codes.reshape(-1)[: x.numel()], scale


def decode_q8(codes: torch.Tensor, scale: torch.Tensor, shape) -> torch.Tensor:
    return _unblock(_pad_codes(codes) * scale[:, None], shape)


def encode_log8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-negative values as 8-bit logarithms: code 0 is exactly 0, codes 1..255 are 255
    log-spaced levels from a block's smallest to its largest value (at most 40 octaves below
    it): relative error <= 2^(range / 508) - 1, e.g. 1.1% over a 16-octave block. Returns
    ``(codes uint8, lo, hi)`` with ``lo, hi`` the log2 range of each block."""
    b = _blocks(x)
    pos = b > 0
    lg = torch.log2(torch.where(pos, b, torch.ones_like(b)))
    hi = torch.where(pos, lg, torch.full_like(lg, -math.inf)).amax(1)
    lo = torch.where(pos, lg, torch.full_like(lg, math.inf)).amin(1)
    empty = ~pos.any(1)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    lo = torch.where(empty, hi, torch.maximum(lo, hi - _LOG_RANGE_OCTAVES))
    step = _log8_step(lo, hi)
    level = ((lg - lo[:, None]) / step[:, None]).round().clamp(0, 254)
    codes = torch.where(pos, level + 1, torch.zeros_like(level)).to(torch.uint8)
    return codes.reshape(-1)[: x.numel()], lo, hi


def _log8_step(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    step = (hi - lo) / 254
    return torch.where(step > 0, step, torch.ones_like(step))


def decode_log8(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, shape) -> torch.Tensor:
    c = _pad_codes(codes)
    value = torch.exp2(lo[:, None] + (c - 1) * _log8_step(lo, hi)[:, None])
    return _unblock(torch.where(c > 0, value, torch.zeros_like(value)), shape)


def compact_weights_codec(model: torch.nn.Module, *, ema: bool, optimizer: bool = True) -> str:
    """``fp32`` (lossless) if the whole state then fits ``STATE_BUDGET_BYTES``, else ``fp24``."""
    fp32 = estimate_state_bytes(model, "fp32", ema=ema, optimizer=optimizer)
    return "fp32" if fp32 <= STATE_BUDGET_BYTES else "fp24"


def estimate_state_bytes(
    model: torch.nn.Module, weights: str, *, ema: bool = True, optimizer: bool = True
) -> int:
    """Size of the compact state's parts (tensor bytes plus an allowance for the header)."""
    total = 0
    for p in model.parameters():
        n, nb = p.numel(), -(-p.numel() // BLOCK)
        total += n * (4 if weights == "fp32" else 3) + 160
        total += (n + 4 * nb + 160) if ema else 0
        total += (2 * n + 12 * nb + 480) if optimizer else 0
    return total


def write_state_parts(
    tensors: dict[str, torch.Tensor],
    meta: dict,
    directory: str | os.PathLike,
    *,
    part_bytes: int = PART_BYTES,
) -> dict:
    """Serialise ``tensors`` (safetensors) into ``state.partNN`` files of at most ``part_bytes``
    and write ``state.manifest.json`` (``meta``, each part's size and sha256) last, atomically.
    Stale parts of an earlier save are removed. Returns the manifest."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    chunks = [blob[i : i + part_bytes] for i in range(0, len(blob), part_bytes)] or [b""]
    parts = [
        {"name": f"{PART_PREFIX}{i:02d}", "bytes": len(c), "sha256": hashlib.sha256(c).hexdigest()}
        for i, c in enumerate(chunks)
    ]
    manifest = {
        "format": COMPACT_FORMAT,
        "version": COMPACT_VERSION,
        **meta,
        "total_bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "parts": parts,
    }
    # Everything goes to .tmp files first; then the old manifest goes, the parts are renamed and
    # the new manifest comes last, so a save cut short leaves either the old state or no manifest.
    for part, chunk in zip(parts, chunks, strict=True):
        (directory / (part["name"] + ".tmp")).write_bytes(chunk)
    (directory / (MANIFEST_FILE + ".tmp")).write_text(json.dumps(manifest, indent=1) + "\n")
    (directory / MANIFEST_FILE).unlink(missing_ok=True)
    for part in parts:
        os.replace(directory / (part["name"] + ".tmp"), directory / part["name"])
    os.replace(directory / (MANIFEST_FILE + ".tmp"), directory / MANIFEST_FILE)
    keep = {p["name"] for p in parts}
    for stale in directory.glob(PART_PREFIX + "*"):
        if stale.name not in keep:
            stale.unlink()
    return manifest


def read_state_parts(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and manifest of a state written by :func:`write_state_parts`; every part's
    size and sha256 are checked. Raises :class:`StateError` naming what is missing or damaged."""
    from safetensors.torch import load

    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise StateError(
            f"no training state in {directory}: {MANIFEST_FILE} is missing (pass the folder that "
            "holds every file a --state-out call returned)"
        )
    try:
        manifest = json.loads(path.read_text())
        parts = manifest["parts"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{path} is not a readable state manifest: {exc}") from exc
    if manifest.get("format") != COMPACT_FORMAT or manifest.get("version") != COMPACT_VERSION:
        raise StateError(
            f"{path} has format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this trainer reads {COMPACT_FORMAT!r} version {COMPACT_VERSION}"
        )
    names = [p["name"] for p in parts]
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise StateError(
            f"training state in {directory} is incomplete: {', '.join(missing)} missing (the "
            f"manifest lists {len(names)} parts: {', '.join(names)}); copy every state.part* file "
            "of the same call beside its manifest"
        )
    chunks = []
    for part in parts:
        data = (directory / part["name"]).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != part["bytes"] or digest != part["sha256"]:
            raise StateError(
                f"{directory / part['name']} is corrupt: {len(data)} bytes, sha256 {digest[:16]}…; "
                f"the manifest says {part['bytes']} bytes, sha256 {part['sha256'][:16]}… (a "
                "truncated copy, or parts of different saves mixed)"
            )
        chunks.append(data)
    blob = b"".join(chunks)
    if hashlib.sha256(blob).hexdigest() != manifest.get("sha256"):
        raise StateError(f"the parts in {directory} do not join to the state the manifest names")
    try:
        tensors = load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise StateError(f"the state in {directory} has damaged tensors ({exc})") from exc
    return tensors, manifest
