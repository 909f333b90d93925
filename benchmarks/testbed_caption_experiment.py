"""Why the testbed ignores its captions: a small Wan model trained on CPU with four caption codes.

The shipped testbed checkpoint barely uses its captions (``docs/testbed.md``). This experiment
trains the same small model several times on the same clips, seeds and steps, changing only what the
cross-attention sees:

- ``none``: the hashed words as shipped (one fixed vector per word, zero padding);
- ``repeat``: the same, with the caption's words repeated instead of zero padding (is the padding
  an attention sink?);
- ``bigram``: each word also carries its bigrams with its neighbours
  (``HashedTextEncoder(context="bigram")``);
- ``oracle``: only the background colour word (the easiest attribute; shows the setup can learn
  from text at all);
- ``pairs``: each word carries, instead of bigrams, its unordered pairs with every other content
  word of its sentence ("red + circle", "circle + bounces"; built here, not in the library: it
  did not work);
- ``bigram_scene_first``, ``pairs_scene_first``: as ``bigram`` and ``pairs``, with the caption's
  count, camera and background sentences moved before the objects.

Every quarter of the run it measures, on held-out clips, the flow-matching loss with the true
captions and with the captions of other clips (rolled by one): ``gain`` = (shuffled - true) /
shuffled, 0 when the model ignores the text.

    PYTHONPATH=src python benchmarks/testbed_caption_experiment.py \\
        --out benchmarks/results/testbed-caption-experiment-cpu.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from _diffusers_common import write_json
from _small_text_models import flow_loss, train_small_model

VARIANTS = (
    "none",
    "repeat",
    "bigram",
    "oracle",
    "pairs",
    "bigram_scene_first",
    "pairs_scene_first",
)
SETUP = dict(
    frames=4, height=32, width=32, num_layers=2, num_heads=2, head_dim=32, ffn_dim=256,
    freq_dim=64, text_dim=64, max_text_tokens=96,
)  # fmt: skip


_STOP_WORDS = frozenset({"a", "an", "the", "and", "over", "that"})


def _with_sentence_pairs(caption: str, vectors: torch.Tensor, dim: int) -> torch.Tensor:
    """Word vectors ``(n, dim)`` plus each content word's unordered pairs with the other content
    words of its sentence, unit RMS again."""
    from pasa.testbed.text import tokenize, word_vector

    mixed, position = vectors.clone(), 0
    for sentence in caption.split("."):
        words = tokenize(sentence)
        content = [w for w in words if w not in _STOP_WORDS]
        for offset, word in enumerate(words):
            if position + offset < len(mixed) and word not in _STOP_WORDS:
                for other in content:
                    if other != word:
                        pair = word_vector(" + ".join(sorted((word, other))), dim)
                        mixed[position + offset] += torch.tensor(pair)
        position += len(words)
    return mixed / mixed.pow(2).mean(-1, keepdim=True).sqrt()


def _scene_first(caption: str) -> str:
    """The caption with its last two sentences (count, camera and background) moved first."""
    sentences = [s.strip() + "." for s in caption.split(".") if s.strip()]
    return " ".join(sentences[-2:] + sentences[:-2])


def _text(variant: str, captions: list[str], config) -> torch.Tensor:
    from pasa.testbed.text import HashedTextEncoder, position_codes

    dim, length = config.text_dim, config.max_text_tokens
    if variant == "oracle":
        captions = [re.search(r"(\w+) background", c).group(1) for c in captions]
    if variant.endswith("_scene_first"):  # camera and background first, then the objects
        captions = [_scene_first(c) for c in captions]
    context = "bigram" if variant.startswith("bigram") else "none"
    text, mask = HashedTextEncoder(dim, length, context)(captions)
    if variant.startswith("pairs"):
        for i, caption in enumerate(captions):
            n = int(mask[i].sum())
            text[i, :n] = _with_sentence_pairs(caption, text[i, :n] - position_codes(n, dim), dim)
            text[i, :n] += position_codes(n, dim)
    if variant == "repeat":
        for i in range(text.shape[0]):
            n = int(mask[i].sum())
            if n:
                text[i] = text[i, torch.arange(length) % n]
    return text


def run_variant(variant: str, clips: int, held: int, steps: int, batch: int, seed: int) -> dict:
    """Train one model from scratch; the held-out losses every quarter of the run."""
    from pasa.testbed.data import make_batch
    from pasa.testbed.model import TestbedConfig, pixels_to_latents

    torch.set_num_threads(1)
    config = TestbedConfig(**SETUP)
    # The captions as first written (objects first); the *_scene_first variants reorder them.
    pixels, captions = make_batch(range(clips + held), data_seed=7, frames=config.frames,
                                  height=config.height, width=config.width,
                                  caption_order="objects_first",
                                  scene_style="original")  # fmt: skip
    latents = pixels_to_latents(pixels, config.pixel_factor)
    text = _text(variant, captions, config)
    rows, start = [], time.perf_counter()
    held_x, held_c = latents[clips:], text[clips:]

    def measure(step: int, model, losses) -> None:
        model.eval()
        row = {"step": step, "seconds": round(time.perf_counter() - start, 1)}
        with torch.no_grad():
            for tv in (0.9, 0.6):
                t = torch.full((held,), tv)
                true = flow_loss(model, held_x, held_c, t, 0).item()
                shuffled = flow_loss(model, held_x, held_c.roll(1, 0), t, 0).item()
                row[f"t={tv}"] = {
                    "true": round(true, 4),
                    "shuffled": round(shuffled, 4),
                    "gain": round((shuffled - true) / shuffled, 4),
                }
        model.train()
        rows.append(row)
        print(variant, json.dumps(row), flush=True)

    train_small_model(config, latents[:clips], text[:clips], steps=steps, batch=batch, seed=seed,
                      every=steps // 4, on_every=measure)  # fmt: skip
    return {"variant": variant, "log": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--clips", type=int, default=4000)
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="variants trained at once (1 thread each)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.steps < 4:
        ap.error("--steps must be at least 4 (one measurement per quarter)")
    work = (args.clips, args.held_out, args.steps, args.batch, args.seed)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(
            pool.map(run_variant, args.variants, *[[w] * len(args.variants) for w in work])
        )
    setup = dict(SETUP, clips=args.clips, held_out=args.held_out, steps=args.steps)
    setup.update(batch=args.batch, seed=args.seed, lr=1e-3, caption_dropout=0.1, data_seed=7)
    setup.update(device="cpu", torch=torch.__version__)
    out = {"benchmark": "testbed_caption_experiment", "setup": setup, "results": results}
    for r in results:
        last = r["log"][-1]
        print(f"{r['variant']:8s} gain at t=0.9 {last['t=0.9']['gain']:+.4f}, "
              f"t=0.6 {last['t=0.6']['gain']:+.4f}")  # fmt: skip
    if args.out:
        write_json(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
