"""Tile geometry: cores partition the mosaic exactly, halos are clipped, bad values are refused."""

import numpy as np
import pytest

from survey_engine.tiling import Box, make_tiles


@pytest.mark.parametrize(
    ("shape", "tile", "halo", "origin"),
    [
        ((1000, 1000), 256, 32, 0),
        ((1000, 777), 333, 64, 0),
        ((1000, 777), 333, 64, 166),
        ((517, 1031), (97, 211), 16, (48, 5)),
        ((100, 100), 2048, 128, 0),  # mosaic smaller than one tile
    ],
)
def test_cores_partition_the_mosaic(shape, tile, halo, origin):
    grid = make_tiles(shape, tile, halo, origin=origin)
    cover = np.zeros(shape, dtype=np.int32)
    for t in grid:
        cover[t.core.slices()] += 1
        # The read window is the core grown by the halo, clipped to the mosaic.
        assert t.read.y0 == max(0, t.core.y0 - halo)
        assert t.read.x1 == min(shape[1], t.core.x1 + halo)
    assert cover.min() == 1
    assert cover.max() == 1
    # owner() agrees with owns() for every pixel of a sparse sample.
    ys, xs = np.mgrid[0 : shape[0] : 7, 0 : shape[1] : 5]
    owners = grid.owner(ys.ravel(), xs.ravel())
    for y, x, o in zip(ys.ravel()[::50], xs.ravel()[::50], owners[::50], strict=True):
        assert grid[int(o)].owns(y, x)
        assert sum(bool(t.owns(y, x)) for t in grid) == 1


def test_shifted_grid_edges():
    grid = make_tiles((1000, 1000), 400, 32, origin=200)
    assert grid.y_edges == (0, 200, 600, 1000)
    assert len(grid) == 9


def test_overlapping_finds_every_core_touching_a_box():
    grid = make_tiles((1000, 900), 128, 16, origin=(64, 10))
    box = Box(100, 390, 250, 700)
    found = {t.index for t in grid.overlapping(box)}
    expected = {t.index for t in grid if t.core.intersect(box) is not None}
    assert found == expected


@pytest.mark.parametrize(
    ("tile", "halo", "match"),
    [
        (16, 64, "tile must be an integer ≥ 32"),
        (256.5, 64, "tile must be an integer"),
        (256, 4, "halo must be an integer ≥ 16"),
        (256, -1, "halo must be"),
    ],
)
def test_bad_tile_or_halo_is_refused(tile, halo, match):
    with pytest.raises(ValueError, match=match):
        make_tiles((1000, 1000), tile, halo)


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match="mosaic shape must be positive"):
        make_tiles((0, 10), 64, 16)
