"""The PASA testbed: a small video diffusion model trained on procedural clips, for measuring
quality. See ``docs/testbed.md``.

- :mod:`pasa.testbed.scene` / :mod:`pasa.testbed.rendering` / :mod:`pasa.testbed.data`: seeded
  procedural scenes, their rendering (one clip or a batch at once), batches with captions.
- :mod:`pasa.testbed.text`: the weight-free hashed-word text encoder.
- :mod:`pasa.testbed.model`: config, pixel codec, checkpoint save / load (``CheckpointError``).
- :mod:`pasa.testbed.train`: flow-matching trainer (DDP, time-budgeted, resumable).
- :mod:`pasa.testbed.sample`: Euler sampler with the PASA hook point.

Nothing here is imported by ``import pasa``; diffusers is needed for the model.
"""

from pasa.testbed.data import ProceduralVideos, make_batch
from pasa.testbed.model import (
    DEFAULT_CHECKPOINT,
    TESTBED,
    TINY,
    CheckpointError,
    TestbedConfig,
    build_model,
    latents_to_pixels,
    load_testbed,
    pixels_to_latents,
    save_testbed,
)
from pasa.testbed.rendering import render, render_batch
from pasa.testbed.scene import Scene, caption, make_scene
from pasa.testbed.text import HashedTextEncoder

__all__ = [
    "DEFAULT_CHECKPOINT",
    "TESTBED",
    "TINY",
    "CheckpointError",
    "HashedTextEncoder",
    "ProceduralVideos",
    "Scene",
    "TestbedConfig",
    "build_model",
    "caption",
    "latents_to_pixels",
    "load_testbed",
    "make_batch",
    "make_scene",
    "pixels_to_latents",
    "render",
    "render_batch",
    "save_testbed",
]
