"""Tile geometry: plain data, no Dask.

A :class:`TileGrid` cuts a mosaic into tiles whose *cores* partition it exactly
(half-open intervals; edge tiles clipped). Each tile is *read* with a halo of
``halo`` pixels on every side (clipped at the mosaic edges). An object belongs
to the one tile whose core holds its integer peak pixel (:meth:`Tile.owns`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["MIN_HALO", "MIN_TILE", "Box", "Tile", "TileGrid", "make_tiles"]

#: Smallest tile core side accepted (pixels).
MIN_TILE = 32
#: Smallest halo accepted (pixels): the detection filter, minarea slivers and the
#: smallest apertures must fit; larger objects are re-processed in a bigger window.
MIN_HALO = 16


@dataclass(frozen=True, order=True)
class Box:
    """A half-open pixel rectangle ``[y0, y1) × [x0, x1)`` in mosaic coordinates."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width)."""
        return (self.y1 - self.y0, self.x1 - self.x0)

    @property
    def size(self) -> int:
        """Number of pixels."""
        return (self.y1 - self.y0) * (self.x1 - self.x0)

    def contains(self, y, x):
        """Whether integer pixel(s) ``(y, x)`` lie inside (vectorised)."""
        y = np.asarray(y)
        x = np.asarray(x)
        return (y >= self.y0) & (y < self.y1) & (x >= self.x0) & (x < self.x1)

    def intersect(self, other: Box) -> Box | None:
        """Intersection with another box, or None when empty."""
        y0, y1 = max(self.y0, other.y0), min(self.y1, other.y1)
        x0, x1 = max(self.x0, other.x0), min(self.x1, other.x1)
        if y0 >= y1 or x0 >= x1:
            return None
        return Box(y0, y1, x0, x1)

    def grow(self, margin: int, limit: Box) -> Box:
        """This box grown by ``margin`` on every side, clipped to ``limit``."""
        return Box(
            max(limit.y0, self.y0 - margin),
            min(limit.y1, self.y1 + margin),
            max(limit.x0, self.x0 - margin),
            min(limit.x1, self.x1 + margin),
        )

    def slices(self, origin: tuple[int, int] = (0, 0)) -> tuple[slice, slice]:
        """Numpy slices of this box in an array whose first pixel is ``origin`` (y, x)."""
        oy, ox = origin
        return (slice(self.y0 - oy, self.y1 - oy), slice(self.x0 - ox, self.x1 - ox))


@dataclass(frozen=True)
class Tile:
    """One tile: its core (owned pixels) and its read window (core + halo).

    Attributes
    ----------
    index : int
        Position in the grid, row-major.
    row, col : int
        Grid row and column.
    core : Box
        Pixels this tile owns; the cores of a grid partition the mosaic.
    read : Box
        Pixels this tile reads: the core grown by the halo, clipped to the mosaic.
    """

    index: int
    row: int
    col: int
    core: Box
    read: Box

    def owns(self, y, x):
        """Whether this tile owns objects with integer peak pixel ``(y, x)`` (vectorised)."""
        return self.core.contains(y, x)

    @property
    def name(self) -> str:
        """Stable name used in logs, error messages and part files."""
        return f"tile-r{self.row:04d}-c{self.col:04d}"


@dataclass(frozen=True)
class TileGrid:
    """A grid of tiles over a mosaic of shape ``(ny, nx)``."""

    ny: int
    nx: int
    tile: tuple[int, int]
    halo: int
    origin: tuple[int, int]
    y_edges: tuple[int, ...]
    x_edges: tuple[int, ...]

    @property
    def bounds(self) -> Box:
        """The whole mosaic as a box."""
        return Box(0, self.ny, 0, self.nx)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of tiles."""
        return (len(self.y_edges) - 1, len(self.x_edges) - 1)

    def __len__(self) -> int:
        r, c = self.shape
        return r * c

    def __iter__(self) -> Iterator[Tile]:
        nr, nc = self.shape
        for r in range(nr):
            for c in range(nc):
                yield self[r * nc + c]

    def __getitem__(self, index: int) -> Tile:
        nr, nc = self.shape
        if not 0 <= index < nr * nc:
            msg = f"tile index {index} out of range for a {nr}×{nc} grid"
            raise IndexError(msg)
        r, c = divmod(index, nc)
        core = Box(self.y_edges[r], self.y_edges[r + 1], self.x_edges[c], self.x_edges[c + 1])
        return Tile(index, r, c, core, core.grow(self.halo, self.bounds))

    def owner(self, y, x) -> np.ndarray:
        """Index of the tile owning integer pixel(s) ``(y, x)`` (vectorised)."""
        r = np.searchsorted(self.y_edges, np.asarray(y), side="right") - 1
        c = np.searchsorted(self.x_edges, np.asarray(x), side="right") - 1
        return r * self.shape[1] + c

    def overlapping(self, box: Box) -> list[Tile]:
        """Tiles whose core intersects ``box``."""
        r0 = max(0, int(np.searchsorted(self.y_edges, box.y0, side="right")) - 1)
        r1 = int(np.searchsorted(self.y_edges, box.y1, side="left"))
        c0 = max(0, int(np.searchsorted(self.x_edges, box.x0, side="right")) - 1)
        c1 = int(np.searchsorted(self.x_edges, box.x1, side="left"))
        nc = self.shape[1]
        return [self[r * nc + c] for r in range(r0, r1) for c in range(c0, c1)]


def _edges(n: int, size: int, origin: int) -> tuple[int, ...]:
    start = origin % size
    inner = list(range(start if start > 0 else size, n, size))
    return tuple([0, *inner, n])


def make_tiles(
    shape: tuple[int, int],
    tile: int | tuple[int, int],
    halo: int,
    *,
    origin: int | tuple[int, int] = 0,
) -> TileGrid:
    """Cut a mosaic of ``shape`` into tiles of ``tile`` pixels read with ``halo``.

    Parameters
    ----------
    shape : (ny, nx)
        Mosaic size in pixels.
    tile : int or (int, int)
        Core size in y and x (any size ≥ ``MIN_TILE``, odd sizes included).
        Edge tiles are clipped; a mosaic smaller than one tile is one tile.
    halo : int
        Extra pixels read on every side (≥ ``MIN_HALO``).
    origin : int or (int, int)
        Offset of the grid: core edges lie at ``origin + k * tile``. Use
        ``tile // 2`` for a grid shifted by half a tile.

    Returns
    -------
    TileGrid
    """
    ny, nx = (int(s) for s in shape)
    if ny <= 0 or nx <= 0:
        msg = f"mosaic shape must be positive, got {shape}"
        raise ValueError(msg)
    ty, tx = (tile, tile) if np.isscalar(tile) else tile
    for name, v in (("tile", ty), ("tile", tx)):
        if int(v) != v or v < MIN_TILE:
            msg = f"{name} must be an integer ≥ {MIN_TILE} pixels, got {tile!r}"
            raise ValueError(msg)
    if int(halo) != halo or halo < MIN_HALO:
        msg = f"halo must be an integer ≥ {MIN_HALO} pixels, got {halo!r}"
        raise ValueError(msg)
    oy, ox = (origin, origin) if np.isscalar(origin) else origin
    return TileGrid(
        ny=ny,
        nx=nx,
        tile=(int(ty), int(tx)),
        halo=int(halo),
        origin=(int(oy), int(ox)),
        y_edges=_edges(ny, int(ty), int(oy)),
        x_edges=_edges(nx, int(tx), int(ox)),
    )
