"""Background in torch (CPU and CUDA, same code): mesh statistics and a local B-spline.

:func:`mesh_statistics_torch` is the torch backend's mesh statistics (numpy arrays or
tensors, one block or a batch; equal to the numpy ``mesh_statistics`` bit for bit on CPU);
:func:`background_spline`,
:func:`evaluate_background` and :func:`background_windows` evaluate scipy's background
spline as a local tensor-product B-spline, so that a pixel's value depends only on its
absolute mosaic position. How they match numpy/scipy, bit for bit or to one float32 ulp:
``docs/kernels.md``. The whole-mosaic mesh filtering stays in numpy (small and global).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .arrays import INF, is_torch, sqrt
from .background import MIN_VALID_FRACTION, BackgroundMesh, _scipy_spline

__all__ = [
    "BackgroundSpline", "background_spline", "background_windows", "evaluate_background",
    "mesh_statistics_torch",
]  # fmt: skip


def mesh_statistics_torch(image, bad, box: int, *, nsigma: float = 3.0, iterations: int = 5):
    """Sigma-clipped background level and rms of every mesh cell of a block (or a batch).

    The torch counterpart of :func:`~survey_engine.kernels.background.mesh_statistics`
    (same algorithm, binary searches for the clipping counts): per cell, a SExtractor-style
    mode (``2.5 median − 1.5 mean``, or the median in a crowded cell) of the unmasked
    pixels after sigma clipping, vectorised over all cells of all blocks; every block of a
    batch has the same shape and hence the same cell grid.

    Parameters
    ----------
    image : torch.Tensor or numpy.ndarray
        ``(H, W)`` block or ``(B, H, W)`` batch of blocks whose first pixel sits on a cell
        corner. A partial last row/column of cells is allowed (the mosaic edge). Cast to
        float32.
    bad : torch.Tensor or numpy.ndarray of bool, optional
        Pixels to ignore, ``(H, W)`` (the same for every block) or ``(B, H, W)``.
        Non-finite pixels are always ignored (−inf: see ``docs/kernels.md``).
    box : int
        Cell size in pixels (≥ 4).
    nsigma, iterations : float, int
        Clipping threshold around the median; clipping iterations.

    Returns
    -------
    level, rms : torch.Tensor or numpy.ndarray
        float64, ``(ceil(H / box), ceil(W / box))`` or ``(B, ceil(H / box),
        ceil(W / box))``, on the device of ``image`` (numpy arrays for a numpy ``image``);
        NaN where a cell has fewer than ``MIN_VALID_FRACTION`` usable pixels.

    Raises
    ------
    ValueError
        If ``image`` is not 2-D or 3-D, ``bad`` does not match it, or ``box < 4``.

    Notes
    -----
    The clipping loop stops early once no cell of the whole batch changes its clipping
    range (one host synchronisation per iteration). A cell that has converged keeps its
    range in later iterations, so the result of each block equals the result on that
    block alone.
    """
    if getattr(image, "ndim", None) not in (2, 3):
        msg = f"image must be a 2-D or 3-D array, got shape {tuple(getattr(image, 'shape', ()))}"
        raise ValueError(msg)
    if box < 4:
        msg = f"background box must be ≥ 4 pixels, got {box}"
        raise ValueError(msg)
    as_numpy = not is_torch(image)
    if as_numpy:  # copies: the input may be read-only, which torch.from_numpy warns about
        image = torch.from_numpy(np.array(image, dtype=np.float32))
        bad = None if bad is None else torch.from_numpy(np.array(bad, dtype=bool))
    single = image.dim() == 2
    img = image.unsqueeze(0) if single else image
    nblk, h, w = img.shape
    dev = img.device
    ncy, ncx = -(-h // box), -(-w // box)
    data = torch.full((nblk, ncy * box, ncx * box), float("nan"), dtype=torch.float32, device=dev)
    data[:, :h, :w] = img
    if bad is not None:
        bad = torch.as_tensor(bad, device=dev).to(torch.bool)
        bad = bad.unsqueeze(0) if bad.dim() == 2 else bad
        if bad.dim() != 3 or bad.shape[-2:] != (h, w) or bad.shape[0] not in (1, nblk):
            msg = f"bad has shape {tuple(bad.shape)}, image has shape {tuple(image.shape)}"
            raise ValueError(msg)
        data[:, :h, :w].masked_fill_(bad, float("nan"))
    npix = box * box
    cells = data.reshape(nblk, ncy, box, ncx, box).permute(0, 1, 3, 2, 4).reshape(-1, npix)
    cells = _sort_rows(cells)  # NaNs last, as numpy
    nan = torch.isnan(cells)
    not_nan = npix - nan.sum(dim=1)
    c64 = cells.to(torch.float64)
    # Prefix sums over each sorted cell, NaN counted as 0 (float64, sequential on CPU).
    zeroed = torch.nan_to_num(c64, nan=0.0, posinf=INF, neginf=-INF)
    csum = _cumsum_rows(zeroed)
    csq = _cumsum_rows(zeroed.mul_(zeroed))
    del zeroed
    # Clipping counts ``sum(cells < thr)`` and ``sum(cells <= thr)`` as binary searches in the
    # sorted cells, NaN (sorted last) read as +inf, except for a NaN threshold (counts
    # nothing) and ``<= +inf`` (counts every non-NaN pixel).
    bounds = c64.masked_fill_(nan, INF)
    del nan
    ends = torch.full_like(bounds[:, 0], INF)  # finite pixels: those < +inf less those <= −inf
    n = _count(bounds, ends, "left", not_nan) - _count(bounds, -ends, "right", not_nan)

    def window_stats(lo, hi):
        cnt = torch.clamp(hi - lo, min=1)
        mean = (_prefix(csum, hi) - _prefix(csum, lo)) / cnt
        std = sqrt(torch.clamp((_prefix(csq, hi) - _prefix(csq, lo)) / cnt - mean**2, min=0.0))
        return mean, std

    lo = torch.zeros_like(n)
    hi = n.clone()
    for _ in range(iterations):
        mean, std = window_stats(lo, hi)
        med = _sorted_median(cells, lo, hi)
        lo_new = _count(bounds, med - nsigma * std, "left", not_nan)
        hi_new = _count(bounds, med + nsigma * std, "right", not_nan)
        if torch.equal(lo_new, lo) and torch.equal(hi_new, hi):
            break
        lo, hi = lo_new, torch.maximum(hi_new, lo_new + 1)
    mean, std = window_stats(lo, hi)
    med = _sorted_median(cells, lo, hi)
    crowded = torch.abs(mean - med) > 0.3 * std
    level = torch.where(crowded, med, 2.5 * med - 1.5 * mean)
    hy = np.minimum(box, h - box * np.arange(ncy))
    wx = np.minimum(box, w - box * np.arange(ncx))
    area = torch.as_tensor(np.outer(hy, wx).ravel(), dtype=torch.float64, device=dev)
    valid = n >= (MIN_VALID_FRACTION * area).repeat(nblk)
    level = torch.where(valid, level, float("nan")).reshape(nblk, ncy, ncx)
    std = torch.where(valid, std, float("nan")).reshape(nblk, ncy, ncx)
    if single:
        level, std = level[0], std[0]
    return (level.numpy(), std.numpy()) if as_numpy else (level, std)


def _sort_rows(cells: torch.Tensor) -> torch.Tensor:
    """Sort each row ascending, NaN last (numpy's order; ``torch.sort`` agrees).

    On CPU numpy's SIMD sort (x86-simd-sort / Highway) is ~15× faster than
    ``torch.sort`` for float32 rows; sorted values do not depend on the algorithm.
    """
    if cells.device.type == "cpu":
        return torch.from_numpy(np.sort(cells.detach().numpy(), axis=1))
    return torch.sort(cells, dim=1).values


def _cumsum_rows(x: torch.Tensor) -> torch.Tensor:
    """Cumulative sums along rows; numpy's on CPU (torch's start from +0.0 and lose a −0.0)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.cumsum(x.numpy(), axis=1))
    return x.cumsum(dim=1)


def _prefix(csum: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Sum of the first ``k[i]`` values of row ``i`` (0 for none) from its cumulative sums."""
    return torch.where(k > 0, csum.gather(1, (k - 1).clamp(min=0)[:, None])[:, 0], 0.0)


def _count(bounds: torch.Tensor, thr: torch.Tensor, side: str, not_nan: torch.Tensor):
    """Per row, the values ``< thr`` (left) or ``<= thr`` (right), as numpy's comparisons count."""
    k = torch.searchsorted(bounds, thr[:, None].contiguous(), side=side)[:, 0]
    if side == "right":
        k = torch.where(thr == INF, not_nan, k)
    return torch.where(torch.isnan(thr), 0, k)


def _sorted_median(cells: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Median of ``cells[i, lo[i]:hi[i]]`` of row-sorted cells."""
    cnt = hi - lo
    last = cells.shape[1] - 1
    ia = torch.clamp(lo + torch.div(cnt - 1, 2, rounding_mode="floor"), 0, last)
    ib = torch.clamp(lo + torch.div(cnt, 2, rounding_mode="floor"), 0, last)
    a = cells.gather(1, ia[:, None])[:, 0].to(torch.float64)
    b = cells.gather(1, ib[:, None])[:, 0].to(torch.float64)
    return 0.5 * (a + b)


@dataclass(frozen=True, eq=False)
class BackgroundSpline:
    """A tensor-product B-spline of the background of one band over the whole mosaic.

    Attributes
    ----------
    ty, tx : numpy.ndarray
        float64 knot vectors along y (rows) and x (columns).
    ky, kx : int
        Degrees along y and x (0 to 3).
    coef : numpy.ndarray
        ``(len(ty) - ky - 1, len(tx) - kx - 1)`` float64 B-spline coefficients.
    ybounds, xbounds : (float, float)
        Pixel coordinates are clipped to these ranges (the first and last cell centre)
        before evaluation.
    shape : (int, int)
        Mosaic shape (for reference; pixels outside it are still evaluated, clipped).
    """

    ty: np.ndarray
    tx: np.ndarray
    ky: int
    kx: int
    coef: np.ndarray
    ybounds: tuple[float, float]
    xbounds: tuple[float, float]
    shape: tuple[int, int]


def background_spline(mesh: BackgroundMesh) -> BackgroundSpline:
    """The B-spline that :func:`~survey_engine.kernels.background.interpolate_background` evaluates.

    Builds the same :class:`scipy.interpolate.RectBivariateSpline` through the cell
    centres (lower degree when the mesh has fewer than four cells along an axis, the
    level row/column duplicated one pixel further when it has a single one) and keeps
    its knots, coefficients and degrees. A one-cell mesh becomes a degree-0 spline with
    the cell level as its only coefficient.

    Parameters
    ----------
    mesh : BackgroundMesh
        The filtered mesh of the whole mosaic.

    Returns
    -------
    BackgroundSpline
    """
    shape = (int(mesh.shape[0]), int(mesh.shape[1]))
    if mesh.level.shape == (1, 1):
        yc, xc = mesh.cell_centres()
        return BackgroundSpline(
            ty=np.array([yc[0], yc[0] + 1.0]), tx=np.array([xc[0], xc[0] + 1.0]), ky=0, kx=0,
            coef=np.array([[float(mesh.level[0, 0])]]), ybounds=(float(yc[0]), float(yc[0])),
            xbounds=(float(xc[0]), float(xc[0])), shape=shape,
        )  # fmt: skip
    spline, yc, xc = _scipy_spline(mesh)
    ty, tx = (np.asarray(t, dtype=np.float64).copy() for t in spline.get_knots())
    ky, kx = (int(d) for d in spline.degrees)
    coef = np.asarray(spline.get_coeffs(), dtype=np.float64)
    return BackgroundSpline(
        ty=ty, tx=tx, ky=ky, kx=kx, coef=coef.reshape(len(ty) - ky - 1, len(tx) - kx - 1).copy(),
        ybounds=(float(yc[0]), float(yc[-1])), xbounds=(float(xc[0]), float(xc[-1])), shape=shape,
    )  # fmt: skip


def _basis(
    t: np.ndarray, k: int, bounds: tuple[float, float], pos: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """First coefficient index and the ``k + 1`` non-zero B-splines at each clipped position.

    FITPACK's ``fpbisp`` interval search and ``fpbspl`` recursion, operation for operation.
    """
    x = np.clip(np.asarray(pos, dtype=np.float64), bounds[0], bounds[1])
    nt = len(t)
    x = np.clip(x, t[k], t[nt - k - 1])
    # l: 0-based interval index with t[l] <= x < t[l + 1], kept within [k, nt - k - 2].
    l = np.clip(np.searchsorted(t, x, side="right") - 1, k, nt - k - 2)  # noqa: E741
    h = np.zeros((len(x), k + 1))
    h[:, 0] = 1.0
    for j in range(1, k + 1):
        hh = h[:, :j].copy()
        h[:, 0] = 0.0
        for i in range(1, j + 1):
            tli = t[l + i]
            tlj = t[l + i - j]
            same = tli == tlj
            with np.errstate(divide="ignore", invalid="ignore"):
                f = hh[:, i - 1] / (tli - tlj)
                new_i = h[:, i - 1] + f * (tli - x)
                new_i1 = f * (x - tlj)
            h[:, i - 1] = np.where(same, h[:, i - 1], new_i)
            h[:, i] = np.where(same, 0.0, new_i1)
    return (l - k).astype(np.int64), h


def _check_box(y0: int, y1: int, x0: int, x1: int) -> tuple[int, int]:
    if y1 < y0 or x1 < x0:
        msg = f"empty or inverted window [{y0}, {y1}) × [{x0}, {x1})"
        raise ValueError(msg)
    return y1 - y0, x1 - x0


#: Rows per chunk of the CPU accumulation (keeps the float64 work arrays in cache).
_CPU_CHUNK_ROWS = 32


def _evaluate_batch(
    spline: BackgroundSpline, boxes: Sequence[tuple[int, int, int, int]],
    device: str | torch.device, scipy_order: bool, chunk_rows: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """``(B, h, w)`` float32 background of one band under equally-sized windows.

    ``chunk_rows`` None picks row chunks on CPU and one pass over the whole batch
    elsewhere; both do the same elementwise operations, so they agree bit for bit.
    """
    device = torch.device(device)
    h, w = _check_box(*boxes[0])
    nwin = len(boxes)
    out = torch.empty((nwin, h, w), dtype=torch.float32, device=device)
    if h == 0 or w == 0:
        return out
    ys = np.concatenate([np.arange(b[0], b[1], dtype=np.float64) for b in boxes])
    xs = np.concatenate([np.arange(b[2], b[3], dtype=np.float64) for b in boxes])
    iy, by = _basis(spline.ty, spline.ky, spline.ybounds, ys)
    ix, bx = _basis(spline.tx, spline.kx, spline.xbounds, xs)
    coef = torch.as_tensor(spline.coef, dtype=torch.float64, device=device)
    iy_t = torch.as_tensor(iy, device=device)
    by_t = torch.as_tensor(by, device=device)  # (B*h, ky+1)
    ix_t = torch.as_tensor(ix, device=device).reshape(nwin, w)
    bx_t = torch.as_tensor(bx, device=device).reshape(nwin, w, spline.kx + 1)
    # Row factors: (B*h, ncx) float64, each then combined with the kx+1 column terms.
    # FITPACK order: term (a, b) = (C[iy+a, ix+b] · By[y, a]) · Bx[x, b], a outer, b inner.
    # Separable order: R[y, :] = Σ_a C[iy+a, :] · By[y, a] first, then Σ_b R · Bx[x, b].
    factors = [coef.index_select(0, iy_t + a) * by_t[:, a, None] for a in range(spline.ky + 1)]
    if not scipy_order:
        factors = [sum(factors[1:], factors[0])]  # ((F0 + F1) + F2) + …, in this order
    ncx = coef.shape[1]
    nterm_x = spline.kx + 1
    if chunk_rows is None:
        chunk_rows = _CPU_CHUNK_ROWS if device.type == "cpu" else 0
    if chunk_rows <= 0:
        acc = None
        for fac in (f.reshape(nwin, h, ncx) for f in factors):
            for b in range(nterm_x):
                idx = (ix_t + b)[:, None, :].expand(nwin, h, w)
                term = fac.gather(2, idx).mul_(bx_t[:, None, :, b])
                acc = term if acc is None else acc.add_(term)
        out.copy_(acc)
        return out
    acc = torch.empty((chunk_rows, w), dtype=torch.float64, device=device)
    buf = torch.empty((chunk_rows, w), dtype=torch.float64, device=device)
    for i in range(nwin):
        cols = [ix_t[i] + b for b in range(nterm_x)]
        weights = [bx_t[i, :, b].contiguous() for b in range(nterm_x)]
        for r0 in range(0, h, chunk_rows):
            r1 = min(h, r0 + chunk_rows)
            a_, g_ = acc[: r1 - r0], buf[: r1 - r0]
            for j, (fac, b) in enumerate((f, b) for f in factors for b in range(nterm_x)):
                rows = fac[i * h + r0 : i * h + r1]
                torch.index_select(rows, 1, cols[b], out=g_ if j else a_)
                if j:
                    a_.add_(g_.mul_(weights[b]))
                else:
                    a_.mul_(weights[b])
            out[i, r0:r1].copy_(a_)
    return out


def evaluate_background(
    spline: BackgroundSpline, y0: int, y1: int, x0: int, x1: int, *,
    device: str | torch.device = "cpu", scipy_order: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Background under mosaic pixels ``[y0, y1) × [x0, x1)`` (float32, on ``device``).

    Each pixel's value is a function of its absolute position only; it equals
    :func:`~survey_engine.kernels.background.interpolate_background` on the same mesh to
    float32 rounding.

    Parameters
    ----------
    spline : BackgroundSpline
        From :func:`background_spline`.
    y0, y1, x0, x1 : int
        Half-open region in mosaic pixels.
    device : str or torch.device
        Where to evaluate.
    scipy_order : bool
        Accumulate the ``(ky + 1)(kx + 1)`` terms in FITPACK's own order,
        ``Σ_a Σ_b (C[iy+a, ix+b] · By[y, a]) · Bx[x, b]``: bit-identical to scipy in
        practice, ~3.5× slower on CPU. By default the separable order
        ``Σ_b (Σ_a C[iy+a, ix+b] · By[y, a]) · Bx[x, b]``, at most one float32 ulp from scipy.

    Returns
    -------
    torch.Tensor
        ``(y1 - y0, x1 - x0)`` float32.
    """
    return _evaluate_batch(spline, [(int(y0), int(y1), int(x0), int(x1))], device, scipy_order)[0]


def background_windows(
    splines: Sequence[BackgroundSpline], boxes: Sequence[tuple[int, int, int, int]], *,
    device: str | torch.device = "cpu", scipy_order: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Background of every band under a batch of equally-sized windows.

    Parameters
    ----------
    splines : sequence of BackgroundSpline
        One per band.
    boxes : sequence of (y0, y1, x0, x1)
        Half-open windows in mosaic pixels, all of the same size.
    device : str or torch.device
        Where to evaluate.
    scipy_order : bool
        As in :func:`evaluate_background`.

    Returns
    -------
    torch.Tensor
        ``(B, nb, h, w)`` float32, bit for bit the stack of :func:`evaluate_background`
        of each window and band (elementwise operations only).

    Raises
    ------
    ValueError
        If there are no windows or bands, or the windows differ in size.
    """
    boxes = [tuple(int(v) for v in b) for b in boxes]
    if not boxes or not splines:
        msg = "need at least one window and one band"
        raise ValueError(msg)
    size = _check_box(*boxes[0])
    for b in boxes[1:]:
        if _check_box(*b) != size:
            msg = f"all windows must have the same size, got {size} and {_check_box(*b)}"
            raise ValueError(msg)
    return torch.stack([_evaluate_batch(s, boxes, device, scipy_order) for s in splines], dim=1)
