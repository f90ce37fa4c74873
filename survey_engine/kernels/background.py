"""Global background on a fixed mesh anchored at the mosaic origin (numpy/scipy; torch kernel).

Three steps, each independent of any tiling (``docs/kernels.md``):

1. :func:`mesh_statistics` — a sigma-clipped mode per ``box × box`` cell at ``k * box``
   from the mosaic origin, so blocks of whole cells can be processed anywhere;
2. :func:`filter_mesh` — the whole-mosaic mesh: empty cells filled from the nearest valid
   cell, then a median filter;
3. :func:`interpolate_background` — a bicubic spline through the cell centres, evaluated at
   absolute mosaic pixel positions, whichever tile asks (:func:`source_mask`: a second pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import interpolate, ndimage

from . import compiled
from .detect import matched_filter

__all__ = [
    "BackgroundMesh",
    "filter_mesh",
    "interpolate_background",
    "mesh_statistics",
    "source_mask",
]

#: Minimum fraction of usable pixels for a cell to count.
MIN_VALID_FRACTION = 0.3


def mesh_statistics(
    image: np.ndarray, bad: np.ndarray | None, box: int, *, nsigma: float = 3.0, iterations: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """Sigma-clipped background level and rms of every mesh cell of a block (numpy).

    SExtractor-style mode: ``2.5 median − 1.5 mean`` of the clipped pixels, or the median
    where the cell is crowded. The torch backend runs the same algorithm batched on its
    device (:func:`~survey_engine.kernels.torch_background.mesh_statistics_torch`; equal bit
    for bit on CPU, tested); this one needs no torch, so a numpy worker never imports it.

    Parameters
    ----------
    image : numpy.ndarray
        2-D block whose first pixel sits on a cell corner (``y0 % box == 0``); a partial
        last row/column of cells is allowed (the mosaic edge).
    bad : numpy.ndarray of bool, optional
        Pixels to ignore (masked, no data). Non-finite pixels are always ignored.
    box : int
        Cell size in pixels.
    nsigma, iterations : float, int
        Clipping threshold around the median; clipping iterations.

    Returns
    -------
    level, rms : numpy.ndarray
        ``(ceil(h / box), ceil(w / box))`` float64; NaN where a cell has fewer than
        ``MIN_VALID_FRACTION`` usable pixels.
    """
    if image.ndim != 2:
        msg = f"image must be 2-D, got shape {image.shape}"
        raise ValueError(msg)
    if box < 4:
        msg = f"background box must be ≥ 4 pixels, got {box}"
        raise ValueError(msg)
    if bad is not None and np.shape(bad) != image.shape:
        msg = f"bad has shape {tuple(np.shape(bad))}, image has shape {tuple(image.shape)}"
        raise ValueError(msg)
    with np.errstate(invalid="ignore"):  # inf - inf in cells holding ±inf pixels
        return _mesh_statistics(image, bad, box, nsigma, iterations)


def _mesh_statistics(image, bad, box, nsigma, iterations):
    h, w = image.shape
    ncy, ncx = -(-h // box), -(-w // box)
    data = np.full((ncy * box, ncx * box), np.nan, dtype=np.float32)
    data[:h, :w] = image
    if bad is not None:
        data[:h, :w][bad] = np.nan
    cells = data.reshape(ncy, box, ncx, box).transpose(0, 2, 1, 3).reshape(ncy * ncx, box * box)
    cells = np.sort(cells, axis=1)  # NaNs last
    n = np.count_nonzero(np.isfinite(cells), axis=1)
    # [0, nancumsum] of the values and their squares (float64), compiled; non-NaN counts.
    csum, csq, n_num = compiled.row_cumsums(cells)
    rows = np.arange(cells.shape[0])

    def median(lo, hi):
        cnt = hi - lo
        a = cells[rows, np.clip(lo + (cnt - 1) // 2, 0, cells.shape[1] - 1)]
        b = cells[rows, np.clip(lo + cnt // 2, 0, cells.shape[1] - 1)]
        return 0.5 * (a.astype(np.float64) + b)

    lo = np.zeros_like(n)
    hi = n.copy()
    for _ in range(iterations):
        cnt = np.maximum(hi - lo, 1)
        mean = (csum[rows, hi] - csum[rows, lo]) / cnt
        var = (csq[rows, hi] - csq[rows, lo]) / cnt - mean**2
        std = np.sqrt(np.maximum(var, 0.0))
        med = median(lo, hi)
        # sum(cells < thr), sum(cells <= thr) by binary search in the sorted rows
        lo_new = compiled.row_counts(cells, n_num, med - nsigma * std, False)
        hi_new = compiled.row_counts(cells, n_num, med + nsigma * std, True)
        if np.array_equal(lo_new, lo) and np.array_equal(hi_new, hi):
            break
        lo, hi = lo_new, np.maximum(hi_new, lo_new + 1)
    cnt = np.maximum(hi - lo, 1)
    mean = (csum[rows, hi] - csum[rows, lo]) / cnt
    std = np.sqrt(np.maximum((csq[rows, hi] - csq[rows, lo]) / cnt - mean**2, 0.0))
    med = median(lo, hi)
    crowded = np.abs(mean - med) > 0.3 * std
    level = np.where(crowded, med, 2.5 * med - 1.5 * mean)
    hy = np.minimum(box, h - box * np.arange(ncy))
    wx = np.minimum(box, w - box * np.arange(ncx))
    valid = n >= MIN_VALID_FRACTION * np.outer(hy, wx).ravel()
    level = np.where(valid, level, np.nan).reshape(ncy, ncx)
    std = np.where(valid, std, np.nan).reshape(ncy, ncx)
    return level, std


@dataclass(frozen=True)
class BackgroundMesh:
    """A filtered background mesh of one band over the whole mosaic.

    Attributes
    ----------
    level, rms : numpy.ndarray
        ``(ncy, ncx)`` filtered cell values (no NaN).
    box : int
        Cell size in pixels; cell ``(j, i)`` covers pixels
        ``[j*box, (j+1)*box) × [i*box, (i+1)*box)``.
    shape : (int, int)
        Mosaic shape.
    """

    level: np.ndarray
    rms: np.ndarray
    box: int
    shape: tuple[int, int]

    def cell_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (y, x) of the centres of the (possibly partial) cells."""
        ny, nx = self.shape
        (ncy, ncx), box = self.level.shape, self.box
        yc = np.minimum(np.arange(ncy) * box + (box - 1) / 2.0, ny - 1)
        xc = np.minimum(np.arange(ncx) * box + (box - 1) / 2.0, nx - 1)
        # A clipped last cell has its centre in the middle of its real pixels.
        yc[-1] = (ncy - 1) * box + (ny - (ncy - 1) * box - 1) / 2
        xc[-1] = (ncx - 1) * box + (nx - (ncx - 1) * box - 1) / 2
        return yc, xc


def filter_mesh(
    level: np.ndarray, rms: np.ndarray, box: int, shape: tuple[int, int], *, filter_size: int = 3
) -> BackgroundMesh:
    """Fill empty cells and median-filter a whole-mosaic mesh.

    Parameters
    ----------
    level, rms : numpy.ndarray
        Cell values from :func:`mesh_statistics`, assembled for the whole mosaic.
    box : int
        Cell size.
    shape : (int, int)
        Mosaic shape.
    filter_size : int
        Median filter size in cells (1 disables it).

    Returns
    -------
    BackgroundMesh
    """
    good = np.isfinite(level)
    if not good.any():
        level = np.zeros_like(level)
        rms = np.zeros_like(rms)
    elif not good.all():
        idx = ndimage.distance_transform_edt(~good, return_distances=False, return_indices=True)
        level = level[tuple(idx)]
        rms = rms[tuple(idx)]
    if filter_size > 1:
        level = ndimage.median_filter(level, size=filter_size, mode="nearest")
        rms = ndimage.median_filter(rms, size=filter_size, mode="nearest")
    return BackgroundMesh(np.asarray(level, float), np.asarray(rms, float), int(box), tuple(shape))


def interpolate_background(mesh: BackgroundMesh, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Background under mosaic pixels ``[y0, y1) × [x0, x1)`` (float32).

    A bicubic spline through the cell centres (lower order when the mesh has
    fewer than four cells along an axis), evaluated at absolute pixel
    positions: the value under a pixel does not depend on the region asked.

    Parameters
    ----------
    mesh : BackgroundMesh
        The filtered mesh of the whole mosaic.
    y0, y1, x0, x1 : int
        Half-open region in mosaic pixels.

    Returns
    -------
    numpy.ndarray
        ``(y1 - y0, x1 - x0)`` float32.
    """
    if mesh.level.shape == (1, 1):
        return np.full((y1 - y0, x1 - x0), mesh.level[0, 0], dtype=np.float32)
    spline, yc, xc = _scipy_spline(mesh)
    ys = np.clip(np.arange(y0, y1, dtype=float), yc[0], yc[-1])
    xs = np.clip(np.arange(x0, x1, dtype=float), xc[0], xc[-1])
    return spline(ys, xs, grid=True).astype(np.float32)


def _scipy_spline(mesh: BackgroundMesh):
    """scipy's spline through the cell centres (of a mesh of more than one cell), and the centres.

    Lower order when the mesh has fewer than four cells along an axis; an axis of a single
    cell gets the level row/column duplicated one pixel further.
    """
    yc, xc = mesh.cell_centres()
    level = mesh.level
    if level.shape[0] == 1:
        level, yc = np.vstack([level, level]), np.array([yc[0], yc[0] + 1.0])
    if level.shape[1] == 1:
        level, xc = np.hstack([level, level]), np.array([xc[0], xc[0] + 1.0])
    ky = min(3, len(yc) - 1)
    kx = min(3, len(xc) - 1)
    return interpolate.RectBivariateSpline(yc, xc, level, kx=ky, ky=kx, s=0), yc, xc


def source_mask(image, variance, usable, background, *, thresh: float, minarea: int, dilate: int,
                kernel=None) -> np.ndarray:  # fmt: skip
    """Source pixels, and those within ``dilate`` of them, to leave out of the mesh statistics.

    Source pixels: 8-connected groups of ≥ ``minarea`` pixels where, in any band, the
    matched-filtered ``image − background`` exceeds ``thresh`` × the per-pixel noise (the
    convention of ``DetectionConfig``). Farther than ``DetectionConfig.pad + minarea + dilate``
    from a cut window edge, the mask is the whole mosaic's (``docs/kernels.md``).

    Parameters
    ----------
    image, variance, background, usable : numpy.ndarray
        ``(band, H, W)``: the window, its variance, the first-pass background, and the pixels
        with signal (bool; the others count as no data).
    thresh, minarea, dilate : float, int, int
        Threshold (× sqrt ``variance``); smallest group and radius of the dilation disk (pixels).
    kernel : numpy.ndarray, optional
        Detection filter (None: none).

    Returns
    -------
    numpy.ndarray of bool
        ``(H, W)``.
    """
    k = None if kernel is None else np.asarray(kernel, dtype=np.float64)
    level = thresh if k is None else thresh * k.sum() / np.sqrt(np.square(k).sum())
    seeds = np.zeros(np.shape(image)[1:], dtype=bool)
    for b in range(len(image)):
        resid = np.where(usable[b], image[b] - background[b], 0.0).astype(np.float32)
        var = np.where(usable[b], variance[b], np.inf).astype(np.float32)
        seeds |= matched_filter(resid, var, k) > level
    labels, n = ndimage.label(seeds, structure=np.ones((3, 3), dtype=bool))
    seeds &= (np.bincount(labels.ravel(), minlength=n + 1) >= minarea)[labels]
    if dilate > 0 and seeds.any():  # the disk x² + y² ≤ dilate² (exact Euclidean distances)
        seeds = ndimage.distance_transform_edt(~seeds) <= dilate
    return seeds
