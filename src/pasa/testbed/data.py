"""Batches of procedural clips with their captions, the clips of each training step, and a
DDP-aware stream.

Clip ``index`` of stream ``data_seed`` is :func:`pasa.testbed.scene.make_scene`'s scene drawn by
:mod:`pasa.testbed.rendering`: a float tensor ``(3, F, H, W)`` in ``[-1, 1]``, the same whatever
process, rank or device renders it; a batch is ``(B, 3, F, H, W)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from pasa.testbed.rendering import render, render_batch
from pasa.testbed.scene import caption, check_caption_order, check_scene_style, make_scene

__all__ = ["ProceduralVideos", "caption", "make_batch", "make_scene", "render", "render_batch"]


def make_batch(
    indices: Sequence[int],
    *,
    data_seed: int,
    frames: int = 16,
    height: int = 256,
    width: int = 256,
    device: torch.device | str = "cpu",
    supersample: int = 1,
    caption_order: str = "scene_first",
    scene_style: str = "bold",
) -> tuple[torch.Tensor, list[str]]:
    """Clips ``indices`` of stream ``data_seed`` in ``scene_style``: ``(B, 3, F, H, W)`` in
    [-1, 1] and captions (in ``caption_order``, :func:`pasa.testbed.scene.caption`). A model's
    order and style are its config's (:meth:`pasa.testbed.model.TestbedConfig.clip_settings`)."""
    check_caption_order(caption_order)  # before any rendering
    check_scene_style(scene_style)
    scenes = [make_scene(data_seed, int(i), frames=frames, style=scene_style) for i in indices]
    clips = render_batch(
        scenes, frames=frames, height=height, width=width, device=device, supersample=supersample
    )
    return clips, [caption(sc, caption_order) for sc in scenes]


def clip_indices(step: int, *, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Clip indices of training ``step`` on ``rank``: disjoint across ranks and steps, so a
    resumed or re-sharded run sees exactly the clips it would have seen."""
    first = (step * world_size + rank) * batch_size
    return list(range(first, first + batch_size))


class ProceduralVideos(IterableDataset):
    """Endless stream of ``(clip (3, F, H, W), caption)`` for a DataLoader.

    Clip ``k`` of the stream goes to rank ``k % world_size`` and, within a rank, to DataLoader
    worker ``(k // world_size) % num_workers``, so ranks and workers never repeat each other.

    Args:
        data_seed: the stream.
        rank, world_size: DDP position (``torch.distributed`` rank and world size).
        start: first clip index of the whole stream (for resuming).
        caption_order, scene_style: as :func:`make_batch`.
    """

    def __init__(
        self,
        data_seed: int,
        *,
        frames: int = 16,
        height: int = 256,
        width: int = 256,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        supersample: int = 1,
        caption_order: str = "scene_first",
        scene_style: str = "bold",
    ) -> None:
        super().__init__()
        self.caption_order = check_caption_order(caption_order)
        self.scene_style = check_scene_style(scene_style)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.data_seed, self.rank, self.world_size, self.start = data_seed, rank, world_size, start
        self.frames, self.height, self.width, self.supersample = frames, height, width, supersample

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        stride = self.world_size * workers
        k = self.start + self.rank + self.world_size * worker
        while True:
            scene = make_scene(self.data_seed, k, frames=self.frames, style=self.scene_style)
            clip = render(
                scene,
                frames=self.frames,
                height=self.height,
                width=self.width,
                supersample=self.supersample,
            )
            yield clip, caption(scene, self.caption_order)
            k += stride
