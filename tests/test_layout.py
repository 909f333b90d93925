import pytest
import torch

from pasa.layout import auto_tile, make_layout, tiled_permutation


# Grids chosen to hit every ragged case: divisible, ragged in each axis, a single frame,
# a single token, and text tokens that share the last video block.
@pytest.mark.parametrize(
    "grid,tile",
    [
        ((4, 16, 16), (2, 8, 8)),
        ((3, 7, 9), (2, 8, 8)),
        ((1, 5, 13), (1, 8, 16)),
        ((1, 1, 1), "auto"),
        ((5, 9, 11), "auto"),
        ((21, 30, 52), "auto"),
    ],
)
@pytest.mark.parametrize("text", [0, 13])
def test_permutation_round_trips_and_covers_every_token_once(grid, tile, text):
    layout = make_layout(grid, tile=tile, num_text_tokens=text)
    s = layout.seq_len
    assert sorted(layout.perm.tolist()) == list(range(s))
    x = torch.randn(2, s, 3, 4)
    assert torch.equal(layout.from_blocks(layout.to_blocks(x)), x)
    blocks = layout.block_of_token()
    assert blocks.shape == (s,)
    counts = torch.bincount(blocks, minlength=layout.num_blocks)
    assert counts.sum() == s and bool((counts[:-1] == layout.block_size).all())
    assert 1 <= counts[-1] <= layout.block_size
    # Text tokens keep their order at the end.
    assert layout.perm[layout.num_video_tokens :].tolist() == list(
        range(layout.num_video_tokens, s)
    )


def test_a_whole_tile_is_one_block():
    grid = (4, 16, 16)
    layout = make_layout(grid, tile=(2, 8, 8))
    first = layout.perm[:128]
    f, rem = first // 256, first % 256
    h, w = rem // 16, rem % 16
    assert (
        set(f.tolist()) == {0, 1}
        and set(h.tolist()) == set(range(8))
        and set(w.tolist()) == set(range(8))
    )


def test_ragged_tiles_are_short_not_padded():
    perm = tiled_permutation((1, 3, 5), (1, 2, 4))
    # tiles in raster order: rows 0-1 x cols 0-3, rows 0-1 x col 4, row 2 x cols 0-3, row 2 x col 4
    assert perm.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 4, 9, 10, 11, 12, 13, 14]


def test_auto_tile_fills_a_block():
    assert auto_tile((21, 30, 52), 128) == (2, 8, 8)
    assert auto_tile((1, 60, 104), 128) == (1, 8, 16)
    tf, th, tw = auto_tile((2, 3, 200), 128)
    assert th == 3 and tf * th * tw <= 128


def test_bad_grid_raises():
    with pytest.raises(ValueError, match="grid"):
        make_layout((0, 4, 4))


@pytest.mark.parametrize(
    "grid,text,count", [((8, 32, 32), 0, 5), ((4, 16, 20), 7, 3), ((3, 10, 12), 0, 9)]
)
def test_nearest_blocks_are_the_nearest(grid, text, count):
    from pasa.layout import block_distance, nearest_blocks

    layout = make_layout(grid, num_text_tokens=text)
    mask = nearest_blocks(layout, count)
    n, video = layout.num_blocks, layout.first_text_block
    assert mask.shape == (n, n) and not mask[video:].any() and not mask[:, video:].any()
    k = min(count, video)
    assert (mask[:video].sum(-1) == k).all() and mask.diagonal()[:video].all()
    dist = block_distance(layout)[:video, :video]
    chosen = dist.masked_fill(~mask[:video, :video], float("-inf")).amax(-1)
    others = dist.masked_fill(mask[:video, :video], float("inf")).amin(-1)
    assert (chosen <= others).all()  # nothing left out is nearer than what was kept
    assert nearest_blocks(layout, count) is mask  # cached per layout and count


def test_nearest_blocks_of_an_inner_block_are_its_face_neighbours():
    from pasa.layout import nearest_blocks

    layout = make_layout((8, 32, 32))  # 2x8x8 tiles: 4 x 4 x 4 blocks, raster order
    inner = (1 * 4 + 1) * 4 + 1  # tile (1, 1, 1)
    kept = set(nearest_blocks(layout, 7)[inner].nonzero().flatten().tolist())
    assert kept == {inner, inner - 16, inner + 16, inner - 4, inner + 4, inner - 1, inner + 1}


def test_nearest_blocks_break_exact_ties_toward_the_lower_index():
    """Blocks 1 and 3 are equally near block 2 on this one-frame grid; the lower index wins, the
    same on every device (the distances are computed on the CPU, the sort is stable)."""
    from pasa.layout import block_distance, nearest_blocks

    layout = make_layout((1, 7, 97), num_text_tokens=13)  # tiles (1, 7, 18): 5 video blocks
    dist = block_distance(layout)
    assert dist[2, 1] == dist[2, 3]
    assert nearest_blocks(layout, 2)[2].nonzero().flatten().tolist() == [1, 2]


def test_a_window_stretched_in_time_reaches_two_time_tiles():
    """time_scale 0.5: the inner block's next time tiles rank first, and the 9 nearest hold the
    time tiles two away (tied with the 4 spatial faces); time_scale 1: the 9 nearest are the 6
    faces and 2 edges, one time tile at most."""
    from pasa.layout import block_centres, nearest_blocks

    layout = make_layout((16, 32, 32))  # tiles (8, 4, 4) of 2 x 8 x 8 tokens
    centres = block_centres(layout)
    inner = int(((centres - torch.tensor([4.25, 1.4375, 1.4375], dtype=torch.float64)).abs()
                 .sum(-1)).argmin())  # fmt: skip

    def kept(count, scale):
        rows = nearest_blocks(layout, count, scale)[inner].nonzero().flatten()
        return {tuple((centres[i] - centres[inner]).tolist()) for i in rows.tolist()}

    two_away = {(-2.0, 0.0, 0.0), (2.0, 0.0, 0.0)}
    assert kept(3, 0.5) == {(0.0, 0.0, 0.0), (-1.0, 0.0, 0.0), (1.0, 0.0, 0.0)}
    assert two_away <= kept(9, 0.5)
    assert two_away.isdisjoint(kept(9, 1.0))
    assert max(abs(d[0]) for d in kept(9, 1.0)) == 1.0
    assert nearest_blocks(layout, 7, 0.5) is nearest_blocks(layout, 7, 0.5)  # cached
