"""Instrumental artefacts of ``simulate(masks=True)``: bad columns, a satellite trail, no-data.

Planned once for the whole mosaic from the seed (:class:`ArtefactPlan`), applied block by block in
global pixel coordinates, so every block agrees whatever the chunking. Bad columns and the trail
are ``BAD``, the corner triangle ``NO_DATA``; sizes and levels in ``docs/simulation.md``.
:func:`saturate_with_bleed` saturates a whole image with CCD bleed trails (charge spilling
along columns), for scenes drawn in one piece (the science-rule tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..flags import MaskBit
from ._bands import BandSetup

__all__ = [
    "ArtefactPlan",
    "apply_artefacts",
    "no_data_mask",
    "plan_artefacts",
    "saturate_with_bleed",
]

_TAG = 0xA47EF  # stream tag of the artefact planner
BAD_COLUMN_OFFSET = 5.0  # sky sigma
TRAIL_PEAK = 20.0  # sky sigma
TRAIL_SIGMA = 1.5  # pixels
TRAIL_HALF_WIDTH = 4.5  # pixels flagged BAD either side of the axis
CORNER_FRACTION = 0.15


@dataclass(frozen=True)
class ArtefactPlan:
    """Where the artefacts of a simulated mosaic are (global 0-based pixels).

    Attributes
    ----------
    bad_columns : tuple of (band_code, x, y_start, y_stop)
        Half-open row range of each bad column.
    trail : (band_code, x0, y0, angle) or None
        A point on the trail axis and its angle (radians from the x axis).
    corner : (cy, cx, ly, lx)
        Corner pixel (0 or n - 1 on each axis) and the legs of the no-data triangle.
    """

    bad_columns: tuple[tuple[int, int, int, int], ...]
    trail: tuple[int, float, float, float] | None
    corner: tuple[int, int, int, int]


def plan_artefacts(ny: int, nx: int, band_codes: tuple[int, ...], seed: int) -> ArtefactPlan:
    """Plan the artefacts of a mosaic, deterministically from ``seed``.

    Parameters
    ----------
    ny, nx, seed : int
        Mosaic shape; simulation seed.
    band_codes : tuple of int
        Codes (positions in ``ugrizy``) of the simulated bands.

    Returns
    -------
    ArtefactPlan
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG]))
    columns = []
    for code in band_codes:
        for _ in range(2):
            x, y = int(rng.integers(0, nx)), int(rng.integers(0, ny))
            start, stop = (0, y + 1) if rng.random() < 0.5 else (y, ny)
            columns.append((int(code), x, start, stop))
    trail_band = int(band_codes[int(rng.integers(0, len(band_codes)))])
    tx, ty = float(rng.uniform(0.25, 0.75) * nx), float(rng.uniform(0.25, 0.75) * ny)
    trail = (trail_band, tx, ty, float(rng.uniform(0.0, math.pi)))
    cy = 0 if rng.random() < 0.5 else ny - 1
    cx = 0 if rng.random() < 0.5 else nx - 1
    corner = (cy, cx, max(1, round(CORNER_FRACTION * ny)), max(1, round(CORNER_FRACTION * nx)))
    return ArtefactPlan(bad_columns=tuple(columns), trail=trail, corner=corner)


def apply_artefacts(
    image: np.ndarray, mask: np.ndarray, y0: int, x0: int, band: BandSetup, plan: ArtefactPlan
) -> None:
    """Add the bad columns and the trail of ``band`` to one block, in place.

    Parameters
    ----------
    image, mask : numpy.ndarray
        (h, w) float64 pixels and uint16 mask of the block.
    y0, x0 : int
        Mosaic pixel of the block's first row/column.
    band : BandSetup
        The band of this block.
    plan : ArtefactPlan
    """
    h, w = image.shape
    bad = int(MaskBit.BAD)
    for code, x, start, stop in plan.bad_columns:
        if code != band.code or not x0 <= x < x0 + w:
            continue
        lo, hi = max(start, y0) - y0, min(stop, y0 + h) - y0
        if lo < hi:
            image[lo:hi, x - x0] += BAD_COLUMN_OFFSET * band.sky_sigma
            mask[lo:hi, x - x0] |= bad
    if plan.trail is not None and plan.trail[0] == band.code:
        _, tx, ty, angle = plan.trail
        yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w]
        dist = (xx - tx) * math.sin(angle) - (yy - ty) * math.cos(angle)
        near = np.abs(dist) <= TRAIL_HALF_WIDTH
        if near.any():
            profile = np.exp(-0.5 * (dist[near] / TRAIL_SIGMA) ** 2)
            image[near] += TRAIL_PEAK * band.sky_sigma * profile
            mask[near] |= bad


def no_data_mask(y0: int, y1: int, x0: int, x1: int, plan: ArtefactPlan) -> np.ndarray:
    """Boolean (h, w) map of the no-data corner inside a block.

    Parameters
    ----------
    y0, y1, x0, x1 : int
        Half-open block bounds in mosaic pixels.
    plan : ArtefactPlan

    Returns
    -------
    numpy.ndarray
    """
    cy, cx, ly, lx = plan.corner
    yy, xx = np.mgrid[y0:y1, x0:x1]
    return np.abs(yy - cy) / ly + np.abs(xx - cx) / lx < 1.0


def saturate_with_bleed(image: np.ndarray, mask: np.ndarray, level: float) -> int:
    """Saturate ``image`` at ``level`` in place, the excess charge bleeding along columns.

    Each run of pixels at or above ``level`` in a column keeps its excess charge
    (``Σ (image − level)``), which fills the pixels above and below the run, alternately
    one row up and one row down, each up to ``level``, until it is spent or the column
    ends (charge past the column's ends is lost, as at a CCD's serial register). Every
    pixel at the full well is set to ``level`` and flagged ``SAT``: the saturated core
    and its bleed trail.

    Parameters
    ----------
    image : numpy.ndarray
        ``(h, w)`` float pixels (a noisy, unsaturated image), modified in place.
    mask : numpy.ndarray
        ``(h, w)`` uint16 mask, ``SAT`` OR-ed in place.
    level : float
        Full-well (saturation) level, in the image's unit.

    Returns
    -------
    int
        Number of saturated pixels.
    """
    h, _ = image.shape
    sat = image >= level
    for x in np.flatnonzero(sat.any(axis=0)):
        col, full = image[:, x], sat[:, x]
        edges = np.flatnonzero(np.diff(np.r_[0, full.astype(np.int8), 0]))
        for start, stop in zip(edges[::2], edges[1::2], strict=True):
            excess = float(np.sum(col[start:stop] - level))
            lo, hi, up = start - 1, stop, True
            while excess > 0 and (lo >= 0 or hi < h):
                if (up and lo >= 0) or hi >= h:
                    i, lo = lo, lo - 1
                else:
                    i, hi = hi, hi + 1
                up = not up
                room = level - col[i]
                if room > 0:
                    take = min(room, excess)
                    col[i] += take
                    excess -= take
                full[i] = col[i] >= level
        sat[:, x] = full
    image[sat] = level
    mask[sat] |= int(MaskBit.SAT)
    return int(sat.sum())
