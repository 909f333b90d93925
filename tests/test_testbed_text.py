"""The hashed-word text encoder: fixed values, masks, padding, order."""

import pytest
import torch

from pasa.testbed.text import HashedTextEncoder, tokenize, word_vector


def test_word_vectors_are_fixed_constants():
    # BLAKE2b is the same everywhere, so these values hold on every machine and process.
    assert word_vector("red", 8)[:3] == pytest.approx(
        (1.2460596790982454, -1.3339823324586846, 1.1497863642360526), abs=1e-12
    )
    v = torch.tensor(word_vector("bounces", 64))
    assert v.pow(2).mean().sqrt() == pytest.approx(1.0)
    assert not torch.allclose(v, torch.tensor(word_vector("bounce", 64)))


def test_encode_shapes_mask_padding():
    enc = HashedTextEncoder(dim=16, max_tokens=8)
    emb, mask = enc(["A red circle.", "", "one two three four five six seven eight nine ten"])
    assert emb.shape == (3, 8, 16) and mask.shape == (3, 8) and mask.dtype == torch.bool
    assert mask[0].tolist() == [True] * 3 + [False] * 5
    assert not mask[1].any() and emb[1].abs().sum() == 0  # empty caption: unconditional zeros
    assert emb[0, 3:].abs().sum() == 0
    assert mask[2].all() and enc.truncated == 1
    again, _ = HashedTextEncoder(dim=16, max_tokens=8)(["a red circle"])
    assert torch.equal(again[0], emb[0])


def test_order_matters_and_tokenize():
    enc = HashedTextEncoder(dim=16, max_tokens=4)
    a, _ = enc("pans left")
    b, _ = enc("left pans")
    assert not torch.allclose(a, b)
    assert tokenize("Bounces UP-LEFT, then 3 spins.") == [
        "bounces",
        "up-left",
        "then",
        "3",
        "spins",
    ]


def test_bigram_context_gives_each_word_its_neighbours():
    plain = HashedTextEncoder(dim=32, max_tokens=8)
    ctx = HashedTextEncoder(dim=32, max_tokens=8, context="bigram")
    a, mask = ctx(["a striped blue background", "a big blue circle"])
    again, _ = HashedTextEncoder(dim=32, max_tokens=8, context="bigram")(
        ["a striped blue background"]
    )
    assert torch.equal(a[0], again[0])  # deterministic
    assert mask[0].tolist() == [True] * 4 + [False] * 4 and a[0, 4:].abs().sum() == 0
    # "blue" is one vector without context and two different ones with it
    p, _ = plain(["a striped blue background", "a big blue circle"])
    assert torch.equal(p[0, 2], p[1, 2])
    assert not torch.allclose(a[0, 2], a[1, 2])
    # before the position code each word vector keeps unit RMS
    words = a[0, :4] - plain._positions[:4]
    assert words.pow(2).mean(-1).sqrt().tolist() == pytest.approx([1.0] * 4)
    assert ctx([""])[0].abs().sum() == 0  # unconditional input unchanged
    one, _ = ctx(["circle"])  # a single word has no bigrams: the plain vector
    assert torch.allclose(one[0, 0], plain(["circle"])[0][0, 0])
    with pytest.raises(ValueError, match="context must be one of"):
        HashedTextEncoder(dim=8, context="trigram")
