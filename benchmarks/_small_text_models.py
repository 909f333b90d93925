"""Training small testbed models from scratch on the CPU, for the caption experiments.

One loop for every experiment that compares caption codes: the same model, optimiser, caption
dropout, time and noise draws, so two runs differ only in the text they are given.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def flow_loss(model, x0: torch.Tensor, text: torch.Tensor, t: torch.Tensor, noise_seed: int):
    """The trainer's flow-matching loss on ``x0`` at times ``t`` with noise of ``noise_seed``
    (drawn on the CPU, so the draws are the same on every device)."""
    from pasa.testbed.flow import NUM_TRAIN_TIMESTEPS, noisy_input

    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(noise_seed))
    t = t.to(x0.device)
    xt, target = noisy_input(x0, eps.to(x0.device), t)
    v = model(hidden_states=xt, timestep=t * NUM_TRAIN_TIMESTEPS, encoder_hidden_states=text,
              return_dict=False)[0]  # fmt: skip
    return ((v - target) ** 2).mean()


def train_small_model(
    config,
    latents: torch.Tensor,
    text: torch.Tensor,
    *,
    steps: int,
    batch: int,
    seed: int,
    every: int,
    on_every: Callable[[int, torch.nn.Module, list[float]], None],
    pure_noise_share: float = 0.0,
    prepare: Callable[[torch.nn.Module], None] | None = None,
    max_seconds: float | None = None,
    stages: int = 1,
) -> tuple[torch.nn.Module, list[float]]:
    """Train ``build_model(config)`` (seeded) on ``latents`` with captions ``text`` (row by row):
    AdamW at 1e-3, batches drawn with replacement, 10% caption dropout, the trainer's time draw
    (:func:`pasa.testbed.flow.sample_time`: logit-normal, unshifted here, a share
    ``pure_noise_share`` set to 1).
    ``on_every(step, model, losses)`` runs every ``every`` steps (the model in train mode);
    ``prepare(model)`` runs once before training (e.g. to add a hook). The model trains on
    ``latents``' device; the batch, time and noise draws are made on the CPU as on any device.
    With ``max_seconds`` it stops after the first step past that time (``len(losses)`` steps).
    With ``stages`` > 1 the rows are that many equal consecutive parts, a curriculum: the steps
    fall into as many equal stages, and stage ``k`` draws its batches from part ``k`` alone."""
    import time

    from pasa.testbed.flow import sample_time
    from pasa.testbed.model import build_model

    torch.manual_seed(seed)
    model = build_model(config).float().to(latents.device).train()
    if prepare is not None:
        prepare(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed + 1)
    losses: list[float] = []
    start = time.perf_counter()
    if stages < 1 or latents.shape[0] % stages:
        raise ValueError(f"{latents.shape[0]} rows do not split into {stages} equal stages")
    part = latents.shape[0] // stages
    for step in range(1, steps + 1):
        first = part * ((step - 1) * stages // steps)
        idx = first + torch.randint(0, part, (batch,), generator=gen)
        c = text[idx.to(text.device)].clone()
        c[(torch.rand(batch, generator=gen) < 0.1).to(c.device)] = 0.0  # caption dropout
        t = sample_time(batch, generator=gen, pure_noise_share=pure_noise_share)
        value = flow_loss(model, latents[idx.to(latents.device)], c, t, noise_seed=step + 100)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
        if step % every == 0:
            on_every(step, model, losses)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    return model, losses
