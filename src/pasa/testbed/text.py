"""A text encoder without weights: every word gets a fixed pseudo-random vector.

``encode(["a red circle ..."]) -> (embeddings (B, L, text_dim), mask (B, L))``. Words are lower-case
runs of letters, digits and hyphens; a word's vector is a standard Gaussian drawn from a
counter-based hash of the word (BLAKE2b over ``(word, counter)``, Box-Muller), scaled to unit RMS,
so it is identical on every process and machine and needs no vocabulary. A fixed sinusoidal code of
the word's position is added (0.5 RMS) so that word order ("bounces left while the camera pans
right") is visible to the model's cross-attention. Padding positions are zeros, as in the Wan
pipeline's padded T5 embeddings; the mask says which positions hold words.

``context="bigram"`` adds, before the position code, the vectors of the word's two bigrams (with
the word before and the word after, each hashed as one string) and rescales to unit RMS: a fixed
stand-in for the context a learned encoder such as T5 mixes into every token. Without it the word
"blue" is the same vector whether it names the background or a shape, and a small model has to
bind colours to nouns through cross-attention alone; in a CPU experiment
(``benchmarks/testbed_caption_experiment.py``) a small Wan model did not learn to use whole
captions at all in 3,000 steps without context, and did with bigrams.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from functools import lru_cache
from itertools import pairwise

import torch

_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_POSITION_RMS = 0.5
CONTEXTS = ("none", "bigram")


def tokenize(text: str) -> list[str]:
    """Lower-case words of ``text`` (punctuation dropped)."""
    return _WORD.findall(text.lower())


@lru_cache(maxsize=4096)
def word_vector(word: str, dim: int) -> tuple[float, ...]:
    """Unit-RMS Gaussian vector of ``word``: BLAKE2b(word, counter) bytes -> uniforms -> Box-Muller."""
    needed = 2 * ((dim + 1) // 2)  # uniforms, in pairs
    raw = b""
    counter = 0
    while len(raw) < 4 * needed:
        raw += hashlib.blake2b(f"{counter}:{word}".encode(), digest_size=64).digest()
        counter += 1
    ints = struct.unpack(f"<{needed}I", raw[: 4 * needed])
    uniforms = [(i + 0.5) / 2**32 for i in ints]  # (0, 1), never 0
    values = []
    for u1, u2 in zip(uniforms[0::2], uniforms[1::2], strict=True):
        radius = math.sqrt(-2.0 * math.log(u1))
        values += [radius * math.cos(2 * math.pi * u2), radius * math.sin(2 * math.pi * u2)]
    values = values[:dim]
    rms = math.sqrt(sum(v * v for v in values) / dim)
    return tuple(v / rms for v in values)


@lru_cache(maxsize=1 << 16)
def _word_tensor(word: str, dim: int) -> torch.Tensor:
    """:func:`word_vector` as a float32 tensor, cached: a training step encodes hundreds of
    captions' words and bigrams, most of them seen before (about 256 bytes an entry)."""
    return torch.tensor(word_vector(word, dim))


def _word_tensors(words: list[str], dim: int) -> torch.Tensor:
    """``(len(words), dim)`` float32 vectors of ``words``."""
    if not words:
        return torch.zeros(0, dim)
    return torch.stack([_word_tensor(w, dim) for w in words])


def position_codes(length: int, dim: int) -> torch.Tensor:
    """``(length, dim)`` sinusoidal position code with RMS ``_POSITION_RMS``."""
    pos = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    freqs = torch.exp(-math.log(1000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    code = torch.zeros(length, dim, dtype=torch.float64)
    code[:, 0::2] = torch.sin(pos * freqs)
    code[:, 1::2] = torch.cos(pos * freqs)[:, : dim // 2]
    return (code * _POSITION_RMS * math.sqrt(2.0)).float()


class HashedTextEncoder:
    """Captions -> ``(B, max_tokens, dim)`` embeddings and ``(B, max_tokens)`` bool mask.

    Captions longer than ``max_tokens`` words are cut (and counted in :attr:`truncated`).
    The empty caption gives all zeros (the unconditional input for classifier-free guidance).
    """

    def __init__(self, dim: int = 64, max_tokens: int = 96, context: str = "none") -> None:
        if dim < 2 or max_tokens < 1:
            raise ValueError(f"need dim >= 2 and max_tokens >= 1, got {dim}, {max_tokens}")
        if context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
        self.dim, self.max_tokens, self.context = dim, max_tokens, context
        self._positions = position_codes(max_tokens, dim)
        self.truncated = 0

    def __call__(
        self, captions: list[str] | str, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str):
            captions = [captions]
        out = torch.zeros(len(captions), self.max_tokens, self.dim)
        mask = torch.zeros(len(captions), self.max_tokens, dtype=torch.bool)
        for b, text in enumerate(captions):
            words = tokenize(text)
            if len(words) > self.max_tokens:
                self.truncated += 1
                words = words[: self.max_tokens]
            if not words:
                continue
            vectors = _word_tensors(words, self.dim)  # (n, dim)
            if self.context == "bigram":
                vectors = self._with_bigrams(words, vectors)
            out[b, : len(words)] = vectors + self._positions[: len(words)]
            mask[b, : len(words)] = True
        return out.to(device), mask.to(device)

    def _with_bigrams(self, words: list[str], vectors: torch.Tensor) -> torch.Tensor:
        """Each word's vector plus those of its bigrams with its neighbours, unit RMS again."""
        pairs = [f"{a} {b}" for a, b in pairwise(words)]
        pair_vectors = _word_tensors(pairs, self.dim)
        mixed = vectors.clone()
        mixed[1:] += pair_vectors  # the bigram with the word before
        mixed[:-1] += pair_vectors  # the bigram with the word after
        return mixed / mixed.pow(2).mean(-1, keepdim=True).sqrt()
