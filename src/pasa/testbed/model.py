"""The testbed model: a small diffusers ``WanTransformer3DModel`` on a weight-free pixel codec.

Latents: pixels ``(B, 3, F, H, W)`` in [-1, 1] -> space-to-depth by ``pixel_factor`` (f) ->
``(B, 3 f^2, F, H / f, W / f)``; exactly invertible, no weights ("the VAE"). The transformer's
``(1, 2, 2)`` patches then make a token grid ``(F, H / 2f, W / 2f)``: 16 x 256 x 256 pixels with
f = 4 is 16 x 32 x 32 tokens (16,384 tokens, 128 PASA blocks of 2 x 8 x 8).

Checkpoints are safetensors; the header's metadata key ``pasa_testbed`` holds JSON with the
:class:`TestbedConfig`, the training record (steps, data seed, ...) and a format version; a JSON
copy is written beside the file for people. :func:`load_testbed` raises :class:`CheckpointError`
naming the problem for a missing, truncated or foreign file.

What the transformer's output means is the config's ``prediction``. With ``"velocity"`` (runs
1-4) the network's last layer predicts the flow velocity ``v = noise - x_0`` directly. With
``"sample"`` it predicts the clean latents ``x_0`` and the model's forward turns them into the
velocity ``(x_t - x_0) / max(t, T_MIN)`` (x-prediction with a velocity loss, as in Li & He,
"Back to Basics: Let Denoising Generative Models Denoise", 2025). The two models are the same
``WanTransformer3DModel`` with the same weights' shapes and both return a velocity, so the
trainer's loss, the sampler and PASA's hooks cannot tell them apart. Why it matters here: a
token's patch holds ``3 f^2 * 4`` = 192 pixel values and the residual stream 256 channels; a
velocity head has to carry the token's noise, which fills most of that stream, through every
layer, while clean patches of procedural shapes lie near a far smaller set.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from pasa.testbed.scene import check_caption_order, check_scene_style
from pasa.testbed.text import CONTEXTS, HashedTextEncoder

FORMAT_VERSION = 1
METADATA_KEY = "pasa_testbed"
DEFAULT_CHECKPOINT = Path(__file__).parent / "checkpoint" / "testbed.safetensors"
PREDICTIONS = ("velocity", "sample")
# What tells a token where it is besides Wan's rotary code, which acts inside self-attention on
# relative offsets only: "none" (runs 1-5), or "sinusoidal", a fixed code of each token's frame,
# row and column added to the patch embedding with a learned per-channel gain that starts at zero
# (:func:`position_coded_wan`).
POSITION_CODES = ("none", "sinusoidal")
# A sample-predicting model divides by t; below this the velocity's error would be amplified
# without bound (Li & He clip the same division at 0.05).
T_MIN = 0.05


def describe_checkpoint(path: str | os.PathLike) -> str:
    """A machine-independent name for a checkpoint file: the shipped one by its package path,
    any other by its file name; both with the first 12 hex digits of the file's sha256."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "missing"
    shipped = path.resolve() == DEFAULT_CHECKPOINT.resolve()
    name = "pasa/testbed/checkpoint/" + path.name if shipped else path.name
    return f"{name} (sha256 {digest})"


class CheckpointError(RuntimeError):
    """A testbed checkpoint is missing, unreadable or does not describe a testbed model."""


@dataclass(frozen=True)
class TestbedConfig:
    """Shapes of the testbed clip, codec, text encoder and transformer."""

    __test__ = False  # not a pytest test class

    frames: int = 16
    height: int = 256
    width: int = 256
    pixel_factor: int = 4
    num_layers: int = 8
    num_heads: int = 4
    head_dim: int = 64
    ffn_dim: int = 1024
    freq_dim: int = 256
    text_dim: int = 64
    max_text_tokens: int = 96
    # "none": one hashed vector per word (run 1); "bigram": each word also carries its bigrams
    # with its neighbours (pasa/testbed/text.py), the preset and the shipped checkpoint's.
    # A config without one of these three fields means what the first runs used.
    text_context: str = "none"
    # How captions are written (pasa/testbed/scene.py's caption()): "objects_first" (runs 1-2) or
    # "scene_first" (count, camera and background first), the preset and the shipped checkpoint's.
    caption_order: str = "objects_first"
    # What the clips look like (pasa/testbed/scene.py's SCENE_STYLES and STYLE_MIXES): "original"
    # (runs 1-3: 3-8 objects, often small, full-contrast backgrounds), "bold" (2-6 bigger objects,
    # backgrounds at a third of the contrast; the preset, and run 4's) or the mixture "bold+solo"
    # (half the clips with one big object; the shipped checkpoint's, run 5).
    scene_style: str = "original"
    # What the network's last layer predicts (module docstring): "velocity" (runs 1-4, and what
    # a config without the field means) or "sample" (the clean latents). Both models return
    # the velocity.
    prediction: str = "velocity"
    # An absolute position code on the patch embedding (POSITION_CODES): "none" (runs 1-5, and
    # what a config without the field means) or "sinusoidal".
    position_code: str = "none"

    def __post_init__(self) -> None:
        check_caption_order(self.caption_order)
        check_scene_style(self.scene_style)
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.position_code not in POSITION_CODES:
            raise ValueError(
                f"position_code must be one of {POSITION_CODES}, got {self.position_code!r}"
            )
        if self.text_context not in CONTEXTS:
            raise ValueError(f"text_context must be one of {CONTEXTS}, got {self.text_context!r}")
        step = 2 * self.pixel_factor
        if self.height % step or self.width % step:
            raise ValueError(
                f"height and width must be multiples of 2 * pixel_factor = {step}, "
                f"got {self.height}x{self.width}"
            )
        if self.head_dim < 6 or self.head_dim % 2:
            raise ValueError(
                f"head_dim={self.head_dim} must be even and >= 6 (Wan's 3D rotary code)"
            )

    def clip_settings(self, scene_style: str | None = None) -> dict[str, str]:
        """``caption_order`` and ``scene_style``: how this model's clips and captions are made,
        as keyword arguments of :func:`pasa.testbed.data.make_batch` and
        :func:`pasa.eval.generate.eval_captions`. ``scene_style`` draws them in another style
        (ValueError naming ``--scene-style`` if it is none), e.g. to compare checkpoints trained
        on different styles on the same clips."""
        if scene_style is not None:
            check_scene_style(scene_style, "--scene-style")
        return {"caption_order": self.caption_order, "scene_style": scene_style or self.scene_style}

    def text_encoder(self) -> HashedTextEncoder:
        """The caption encoder this model was (or is being) trained with."""
        return HashedTextEncoder(self.text_dim, self.max_text_tokens, self.text_context)

    @property
    def latent_channels(self) -> int:
        return 3 * self.pixel_factor**2

    def token_grid(
        self, frames: int | None = None, height: int | None = None, width: int | None = None
    ):
        """``(F, H, W)`` tokens of a clip (this config's size unless given, in pixels)."""
        step = 2 * self.pixel_factor
        return (
            frames or self.frames,
            (height or self.height) // step,
            (width or self.width) // step,
        )

    def transformer_kwargs(self) -> dict[str, Any]:
        return dict(
            patch_size=(1, 2, 2),
            num_attention_heads=self.num_heads,
            attention_head_dim=self.head_dim,
            in_channels=self.latent_channels,
            out_channels=self.latent_channels,
            text_dim=self.text_dim,
            freq_dim=self.freq_dim,
            ffn_dim=self.ffn_dim,
            num_layers=self.num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TestbedConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TestbedConfig fields {sorted(unknown)}")
        return cls(**data)


# The shipped model's shape (9.15M parameters, 18.3 MB in bf16) with bigram captions, the scene
# first and bold clips (run 4's data; the shipped checkpoint, run 5, went on to bold+solo clips
# with --pure-noise-share 0.15: docs/testbed.md), for new training runs; and a tiny one for CPU
# tests.
TESTBED = TestbedConfig(text_context="bigram", caption_order="scene_first", scene_style="bold")
TINY = TestbedConfig(
    frames=4, height=32, width=32, pixel_factor=2, num_layers=2, num_heads=2, head_dim=12,
    ffn_dim=48, freq_dim=16, text_dim=8, max_text_tokens=96, text_context="bigram",
    caption_order="scene_first", scene_style="bold",
)  # fmt: skip
PRESETS = {"testbed": TESTBED, "tiny": TINY}


def pixels_to_latents(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """``(B, 3, F, H, W)`` -> ``(B, 3 f^2, F, H / f, W / f)`` (space-to-depth per frame)."""
    b, c, f, h, w = pixels.shape
    x = pixels.reshape(b, c, f, h // factor, factor, w // factor, factor)
    x = x.permute(0, 1, 4, 6, 2, 3, 5)  # (B, C, fy, fx, F, H/f, W/f)
    return x.reshape(b, c * factor * factor, f, h // factor, w // factor)


def latents_to_pixels(latents: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse of :func:`pixels_to_latents`."""
    b, ch, f, h, w = latents.shape
    c = ch // (factor * factor)
    x = latents.reshape(b, c, factor, factor, f, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(b, c, f, h * factor, w * factor)  # (B, C, F, H, W)


def build_model(config: TestbedConfig = TESTBED):
    """A freshly initialised ``WanTransformer3DModel`` for ``config`` (fp32): the diffusers class
    itself for ``prediction="velocity"``, :func:`sample_predicting_wan`'s subclass for
    ``"sample"``; either with :func:`position_coded_wan`'s code for
    ``position_code="sinusoidal"``."""
    if config.prediction == "sample":
        base = sample_predicting_wan()
    else:
        from diffusers import WanTransformer3DModel

        base = WanTransformer3DModel
    if config.position_code == "sinusoidal":
        side = config.token_grid()[1]
        return position_coded_wan(base)(**config.transformer_kwargs(), position_side=side)
    return base(**config.transformer_kwargs())


def velocity_from_sample(
    x_t: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """The flow velocity ``(x_t - x_0) / max(t, T_MIN)`` of predicted clean latents ``sample``
    at Wan timesteps ``timestep`` (``1000 t``; a scalar or one per batch item), in float32."""
    t = timestep.detach().to(torch.float32) / 1000.0
    if t.dim() > 1 or (t.dim() == 1 and t.numel() not in (1, x_t.shape[0])):
        raise ValueError(
            f"timestep of shape {tuple(timestep.shape)}: give one per batch item "
            f"({x_t.shape[0]}) or a scalar"
        )
    t = t.clamp(min=T_MIN).reshape(-1, *([1] * (x_t.dim() - 1)))
    return (x_t.to(torch.float32) - sample.to(torch.float32)) / t


@lru_cache(maxsize=1)
def sample_predicting_wan() -> type:
    """``SamplePredictingWan``: a ``WanTransformer3DModel`` whose network predicts the clean
    latents and whose ``forward`` returns their velocity (:func:`velocity_from_sample`), float32.
    Made on first use so that importing this module does not import diffusers."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    class SamplePredictingWan(WanTransformer3DModel):
        """Wan with an x-prediction head; returns the velocity like its parent."""

        def forward(self, hidden_states, timestep, *args, return_dict=True, **kwargs):
            sample = super().forward(hidden_states, timestep, *args, return_dict=False, **kwargs)[0]
            velocity = velocity_from_sample(hidden_states, sample, timestep)
            return Transformer2DModelOutput(sample=velocity) if return_dict else (velocity,)

    return SamplePredictingWan


POSITION_GAIN = "patch_embedding.position_gain"


def token_positions(n: int, side: int | None = None) -> torch.Tensor:
    """The positions of ``n`` tokens along an axis: their indices, or with ``side`` their
    centres measured in tokens of an axis ``side`` tokens long (a coarse token sits at the mean
    of the fine ones it covers)."""
    pos = torch.arange(n, dtype=torch.float32)
    return pos if side is None else (pos + 0.5) * (side / n) - 0.5


@lru_cache(maxsize=16)  # one per clip shape, device and dtype, not one per forward pass
def sinusoidal_position_code(
    channels: int,
    frames: int,
    height: int,
    width: int,
    side: int | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(channels, frames, height, width)``: a third of the channels code the token's frame,
    a third its row, the rest its column, each as sines and cosines of its position at
    frequencies from 1 to 1/100 radian per token; unit RMS over the channels.

    Positions are token indices; with ``side`` the rows and columns are measured in tokens of a
    frame ``side`` tokens across instead, so that a clip at another size (fewer tokens for the
    same scene) gives each place in the frame the code it has at full size."""
    import math

    parts = []
    for axis, n in enumerate((frames, height, width)):
        k = channels // 3 if axis < 2 else channels - 2 * (channels // 3)
        pos = token_positions(n, side if axis else None)
        freqs = torch.exp(-math.log(100.0) * torch.arange(0, k, 2) / k)
        angles = pos[:, None] * freqs[None]
        axis_code = torch.cat([angles.sin(), angles.cos()], 1)[:, :k]  # (n, k)
        shape = [k, 1, 1, 1]
        shape[axis + 1] = n
        parts.append(axis_code.T.reshape(shape).expand(k, frames, height, width))
    code = torch.cat(parts) * math.sqrt(2.0)
    return code.to(device=device, dtype=dtype)


def _add_position_code(module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a position-coded model's patch embedding: its output ``(B, D, F, H, W)``
    plus the module's ``position_gain`` (D) times :func:`sinusoidal_position_code` (rows and
    columns in tokens of the module's ``position_side``)."""
    code = sinusoidal_position_code(
        *output.shape[1:], module.position_side, device=output.device, dtype=output.dtype
    )
    return output + module.position_gain.to(output.dtype).view(-1, 1, 1, 1) * code


@lru_cache(maxsize=2)
def position_coded_wan(base: type) -> type:
    """``base`` (a ``WanTransformer3DModel`` class) with an absolute position code. Its
    constructor takes ``position_side`` (the token grid's side at the training size; None: raw
    token indices) besides ``base``'s arguments; the patch embedding gets a parameter
    ``position_gain`` (one per channel, :data:`POSITION_GAIN` in the state dict) initialised at
    zero, and a forward hook that adds the gain times :func:`sinusoidal_position_code` to its
    output. At zero gain the model computes exactly what ``base`` does, so a warm start from a
    model without the code begins where that model was. Attention, and so PASA's hooks, are
    untouched."""

    class PositionCoded(base):
        def __init__(self, *args, position_side: int | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            channels = self.patch_embedding.out_channels
            self.patch_embedding.position_gain = torch.nn.Parameter(torch.zeros(channels))
            self.patch_embedding.position_side = position_side
            self.patch_embedding.register_forward_hook(_add_position_code)

    PositionCoded.__name__ = PositionCoded.__qualname__ = "PositionCoded" + base.__name__
    return PositionCoded


CODEC_FIELDS = ("pixel_factor", "height", "width")
CODEC_LAYERS = ("patch_embedding.weight", "proj_out.weight", "proj_out.bias")  # change shape


def with_pixel_factor(config: TestbedConfig, factor: int) -> TestbedConfig:
    """``config`` with pixel factor ``factor`` and the same token grid: the clip's side scales
    with the factor (the testbed's 16 x 32 x 32 tokens are 256 x 256 pixels at 4, 128 x 128 at
    2), so attention, PASA's blocks and their cost stay as they were."""
    if factor < 1:
        raise ValueError(f"pixel factor must be >= 1, got {factor}")
    (height, h_left), (width, w_left) = (
        divmod(side * factor, config.pixel_factor) for side in (config.height, config.width)
    )
    if h_left or w_left:
        raise ValueError(
            f"a {config.height}x{config.width} clip at pixel factor {config.pixel_factor} has no "
            f"whole-pixel size at pixel factor {factor}"
        )
    return replace(config, pixel_factor=factor, height=height, width=width)


def _tile_pixels(x: torch.Tensor, factor: int, channel_dim: int) -> torch.Tensor:
    """The codec layers' per-token axes as pixels: ``x``'s ``channel_dim`` indexes
    ``(colour, fy, fx)`` of the latent and the two dims after it the 2 x 2 patch ``(py, px)``;
    returns ``x`` with those three dims replaced by ``(colour, 2 f, 2 f)`` pixel rows and columns
    of the token's tile (pixel row ``py f + fy``)."""
    shape = x.shape
    x = x.reshape(*shape[:channel_dim], 3, factor, factor, 2, 2, *shape[channel_dim + 3 :])
    d = channel_dim  # dims d..d+4: colour, fy, fx, py, px
    order = [*range(d), d, d + 3, d + 1, d + 4, d + 2, *range(d + 5, x.dim())]
    x = x.permute(order)
    return x.reshape(*shape[:channel_dim], 3, 2 * factor, 2 * factor, *shape[channel_dim + 3 :])


def _untile_pixels(x: torch.Tensor, factor: int, channel_dim: int) -> torch.Tensor:
    """Inverse of :func:`_tile_pixels`."""
    shape = x.shape
    d = channel_dim
    x = x.reshape(*shape[:d], 3, 2, factor, 2, factor, *shape[d + 3 :])  # colour, py, fy, px, fx
    x = x.permute([*range(d), d, d + 2, d + 4, d + 1, d + 3, *range(d + 5, x.dim())])
    return x.reshape(*shape[:d], 3 * factor * factor, 2, 2, *shape[d + 3 :])


def _resample_tile(x: torch.Tensor, source: int, target: int, dims: tuple[int, int], how: str):
    """A token tile's pixel axes ``dims`` from ``2 source`` to ``2 target`` pixels a side:
    coarser by summing (``how="sum"``) or averaging (``"mean"``) each ``s x s`` block; finer by
    repeating each pixel (divided by ``s^2`` for ``"sum"``)."""
    a, b = dims
    if source % target == 0:
        s = source // target
        shape = list(x.shape)
        shape[a : a + 1] = [shape[a] // s, s]
        x = x.reshape(shape)
        b += 1
        shape = list(x.shape)
        shape[b : b + 1] = [shape[b] // s, s]
        x = x.reshape(shape)
        return x.sum((a + 1, b + 1)) if how == "sum" else x.mean((a + 1, b + 1))
    s = target // source
    x = x.repeat_interleave(s, a).repeat_interleave(s, b)
    return x / (s * s) if how == "sum" else x


def transfer_codec_weights(
    weights: dict[str, torch.Tensor], source: int, target: int
) -> dict[str, torch.Tensor]:
    """``weights`` of a model at pixel factor ``source`` as weights of the same model at
    ``target`` (one must divide the other), for a warm start onto another codec: only
    :data:`CODEC_LAYERS` change shape. A token covers the same share of the frame at both
    factors; the input layer sums the source's weights over each block of pixels that one
    target pixel stands for, so a coarser clip is embedded as its pixel-repeated upsampling was,
    and the output layer averages them, so it predicts each block's mean. The noise's statistics
    do differ (one value per coarse pixel), which training then adapts to."""
    if source == target:
        return dict(weights)
    if source % target and target % source:
        raise ValueError(f"pixel factors {source} and {target}: one must divide the other")
    out = dict(weights)
    weights = {name: weights[name].detach() for name in CODEC_LAYERS}
    embed = _tile_pixels(weights["patch_embedding.weight"].squeeze(2), source, 1)  # D, 3, 2f, 2f
    embed = _resample_tile(embed, source, target, (2, 3), "sum")
    out["patch_embedding.weight"] = _untile_pixels(embed, target, 1).unsqueeze(2)
    for name in ("proj_out.weight", "proj_out.bias"):
        w = weights[name]  # rows ordered (py, px, colour, fy, fx)
        rows = w.reshape(2, 2, 3, source, source, *w.shape[1:])
        rows = rows.movedim((0, 1), (3, 4)).reshape(3 * source * source, 2, 2, *w.shape[1:])
        tile = _resample_tile(_tile_pixels(rows, source, 0), source, target, (1, 2), "mean")
        back = _untile_pixels(tile, target, 0)  # (colour fy fx), py, px, ...
        back = back.reshape(3, target, target, 2, 2, *w.shape[1:]).movedim((3, 4), (0, 1))
        out[name] = back.reshape(-1, *w.shape[1:]).contiguous()
    return out


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_testbed(
    model: torch.nn.Module,
    config: TestbedConfig,
    path: str | os.PathLike,
    *,
    training: dict[str, Any],
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write ``model``'s weights in ``dtype`` with config and training record (atomic)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT_VERSION, "config": asdict(config), "training": training}
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(record)})
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON record in a checkpoint's header (config, training) without loading weights."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"testbed checkpoint {path} not found: train one with `python -m pasa.testbed.train` "
            "or pass the path of an existing .safetensors file"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(
            f"testbed checkpoint {path} is unreadable ({exc}); re-download or retrain"
        ) from exc
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not a PASA testbed checkpoint")
    try:
        record = json.loads(metadata[METADATA_KEY])
        TestbedConfig.from_dict(record["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} has a damaged testbed record: {exc}") from exc
    if record.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {record.get('format')}, this PASA reads {FORMAT_VERSION}"
        )
    return record


def load_testbed(
    path: str | os.PathLike | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """Load a testbed checkpoint.

    Returns:
        ``(model, config, record)``: the ``WanTransformer3DModel`` in eval mode on ``device`` in
        ``dtype``, its :class:`TestbedConfig`, and the record dict (``record["training"]``).
    Raises:
        CheckpointError: missing, truncated or foreign file, or weights that do not fit.
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    record = read_record(path)
    config = TestbedConfig.from_dict(record["config"])
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"testbed checkpoint {path} has damaged tensors ({exc})") from exc
    model = build_model(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {path} do not fit its config: {exc}") from exc
    model = model.to(device)
    if dtype != torch.float32:  # Wan keeps some modules in fp32 only via from_pretrained
        model = model.to(dtype)
    return model.eval(), config, record
