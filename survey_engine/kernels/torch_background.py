"""Background estimation and evaluation in torch (CPU and CUDA, same code).

The torch counterparts of :mod:`survey_engine.kernels.background`:

* :func:`mesh_statistics_torch` — the sigma-clipped mode of every ``box × box`` cell of
  one block or of a batch of equally-shaped blocks, vectorised over all cells with the
  very algorithm of :func:`~survey_engine.kernels.background.mesh_statistics` (cells
  sorted with NaN last, float64 cumulative sums, the same clipping iterations, early
  stop, crowded rule and ``MIN_VALID_FRACTION``; non-finite pixels are handled as
  numpy handles them, −inf included). The clipping counts are binary searches in the
  sorted cells instead of full comparisons. On CPU the float64 cumulative sums run in
  numpy's sequential order, the rows are sorted by numpy (its SIMD sort is ~15× faster
  than ``torch.sort`` there) and square roots are correctly rounded (``torch.sqrt`` is
  not on AVX-512 CPUs), so the results equal numpy's bit for bit in practice; on CUDA
  the cumulative sums are parallel scans and agree to rounding.
* :func:`background_spline` / :func:`evaluate_background` /
  :func:`background_windows` — the background under any window as a **local**
  tensor-product B-spline. The knots, coefficients and degrees are taken from the
  very same :class:`scipy.interpolate.RectBivariateSpline` that
  :func:`~survey_engine.kernels.background.interpolate_background` builds (with the
  same special cases for meshes one cell high or wide and the same clipping to the
  first and last cell centre). The one-dimensional basis values (knot interval and the
  ``k + 1`` non-zero B-splines) are computed on the host exactly as FITPACK's
  ``fpbisp``/``fpbspl`` do; the tensor product is evaluated on the device in float64
  with elementwise operations only (gathers, one multiplication or one addition per
  kernel, so no fused multiply-add can creep in), then cast to float32:

  - by default in the separable order ``Σ_b (Σ_a C[iy+a, ix+b] · By[y, a]) · Bx[x, b]``
    (``kx + 1`` full-size terms): equal to scipy to float32 rounding (≤ 1 ulp; no pixel
    differed in the tests);
  - with ``scipy_order=True`` in FITPACK's own order ``Σ_a Σ_b (C · By) · Bx``
    (``(ky + 1)(kx + 1)`` terms): bit-identical to scipy, ~3.5× slower on CPU.

  No reduction over cells (matmul, ``sum``) is involved, so every pixel's value depends
  only on its absolute mosaic position: never on the window asked, the batch it belongs
  to, the CPU chunking, or the device (CUDA float64 ``*``/``+`` are IEEE operations
  too, so CUDA should agree with CPU bit for bit; the tests only assert 1e-6).

The filtering of the whole-mosaic mesh (:func:`~survey_engine.kernels.background.filter_mesh`)
stays on the host in numpy: it is small and global.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import interpolate

from .arrays import sqrt
from .background import MIN_VALID_FRACTION, BackgroundMesh, _cell_area

__all__ = [
    "BackgroundSpline",
    "background_spline",
    "background_windows",
    "evaluate_background",
    "mesh_statistics_torch",
]


# --------------------------------------------------------------------------------------
# Mesh statistics
# --------------------------------------------------------------------------------------


def mesh_statistics_torch(
    image: torch.Tensor,
    bad: torch.Tensor | None,
    box: int,
    *,
    nsigma: float = 3.0,
    iterations: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigma-clipped background level and rms of every mesh cell of a block (or a batch).

    The torch version of :func:`~survey_engine.kernels.background.mesh_statistics`,
    vectorised over all cells of all blocks; every block of a batch has the same shape
    and hence the same cell grid.

    Parameters
    ----------
    image : torch.Tensor
        ``(H, W)`` block or ``(B, H, W)`` batch of blocks whose first pixel sits on a cell
        corner. A partial last row/column of cells is allowed (the mosaic edge). Cast to
        float32, as the numpy version does.
    bad : torch.Tensor of bool, optional
        Pixels to ignore, ``(H, W)`` (the same for every block) or ``(B, H, W)``.
        Non-finite pixels are ignored as in the numpy version.
    box : int
        Cell size in pixels (≥ 4).
    nsigma : float
        Clipping threshold around the median.
    iterations : int
        Clipping iterations.

    Returns
    -------
    level, rms : torch.Tensor
        float64, ``(ceil(H / box), ceil(W / box))`` or ``(B, ceil(H / box),
        ceil(W / box))`` on the device of ``image``; NaN where a cell has fewer than
        ``MIN_VALID_FRACTION`` usable pixels.

    Raises
    ------
    ValueError
        If ``image`` is not 2-D or 3-D, ``bad`` does not match it, or ``box < 4``.

    Notes
    -----
    The clipping loop stops early, as numpy's does, once no cell of the whole batch
    changes its clipping range (one host synchronisation per iteration). A cell that has
    converged keeps its range in later iterations, so the result of each block equals
    the result of the numpy function on that block alone.
    """
    if not isinstance(image, torch.Tensor) or image.dim() not in (2, 3):
        msg = f"image must be a 2-D or 3-D tensor, got shape {tuple(getattr(image, 'shape', ()))}"
        raise ValueError(msg)
    if box < 4:
        msg = f"background box must be ≥ 4 pixels, got {box}"
        raise ValueError(msg)
    single = image.dim() == 2
    img = image.unsqueeze(0) if single else image
    nblk, h, w = img.shape
    dev = img.device
    ncy, ncx = -(-h // box), -(-w // box)
    data = torch.full((nblk, ncy * box, ncx * box), float("nan"), dtype=torch.float32, device=dev)
    data[:, :h, :w] = img
    if bad is not None:
        bad = torch.as_tensor(bad, device=dev).to(torch.bool)
        if bad.dim() == 2 and not single:
            bad = bad.unsqueeze(0)
        elif single:
            bad = bad.reshape(1, *bad.shape[-2:]) if bad.dim() == 2 else bad
        if bad.dim() != 3 or bad.shape[-2:] != (h, w) or bad.shape[0] not in (1, nblk):
            msg = f"bad has shape {tuple(bad.shape)}, image has shape {tuple(image.shape)}"
            raise ValueError(msg)
        data[:, :h, :w].masked_fill_(bad, float("nan"))
    npix = box * box
    cells = (
        data.reshape(nblk, ncy, box, ncx, box).permute(0, 1, 3, 2, 4).reshape(-1, npix)
    )  # (ncell, npix)
    cells = _sort_rows(cells)  # NaNs last, as numpy
    n = torch.isfinite(cells).sum(dim=1)
    c64 = cells.to(torch.float64)
    nan = torch.isnan(c64)
    zero = torch.zeros((cells.shape[0], 1), dtype=torch.float64, device=dev)
    csum = torch.cat([zero, torch.where(nan, 0.0, c64).cumsum(dim=1)], dim=1)
    csq = torch.cat([zero, torch.where(nan, 0.0, c64 * c64).cumsum(dim=1)], dim=1)
    # numpy counts ``sum(cells < thr)`` and ``sum(cells <= thr)`` over each sorted cell; a
    # binary search gives the same counts with NaN (sorted last) read as +inf, except for
    # a NaN threshold (counts nothing) and ``<= +inf`` (counts every non-NaN pixel).
    not_nan = cells.shape[1] - nan.sum(dim=1)
    bounds = c64.masked_fill_(nan, float("inf"))
    del nan

    def count(thr, side):
        k = torch.searchsorted(bounds, thr[:, None].contiguous(), side=side)[:, 0]
        if side == "right":
            k = torch.where(thr == float("inf"), not_nan, k)
        return torch.where(torch.isnan(thr), 0, k)

    def window_stats(lo, hi):
        cnt = torch.clamp(hi - lo, min=1)
        s = csum.gather(1, hi[:, None])[:, 0] - csum.gather(1, lo[:, None])[:, 0]
        q = csq.gather(1, hi[:, None])[:, 0] - csq.gather(1, lo[:, None])[:, 0]
        mean = s / cnt
        std = sqrt(torch.clamp(q / cnt - mean**2, min=0.0))
        return mean, std

    lo = torch.zeros_like(n)
    hi = n.clone()
    for _ in range(iterations):
        mean, std = window_stats(lo, hi)
        med = _sorted_median(cells, lo, hi)
        lo_new = count(med - nsigma * std, "left")
        hi_new = count(med + nsigma * std, "right")
        if torch.equal(lo_new, lo) and torch.equal(hi_new, hi):
            break
        lo, hi = lo_new, torch.maximum(hi_new, lo_new + 1)
    mean, std = window_stats(lo, hi)
    med = _sorted_median(cells, lo, hi)
    crowded = torch.abs(mean - med) > 0.3 * std
    level = torch.where(crowded, med, 2.5 * med - 1.5 * mean)
    area = torch.as_tensor(_cell_area(h, w, box).ravel(), dtype=torch.float64, device=dev)
    valid = n >= (MIN_VALID_FRACTION * area).repeat(nblk)
    level = torch.where(valid, level, float("nan")).reshape(nblk, ncy, ncx)
    std = torch.where(valid, std, float("nan")).reshape(nblk, ncy, ncx)
    if single:
        return level[0], std[0]
    return level, std


def _sort_rows(cells: torch.Tensor) -> torch.Tensor:
    """Sort each row ascending, NaN last (numpy's order; ``torch.sort`` agrees).

    On CPU numpy's SIMD sort (x86-simd-sort / Highway) is ~15× faster than
    ``torch.sort`` for float32 rows; sorted values do not depend on the algorithm.
    """
    if cells.device.type == "cpu":
        return torch.from_numpy(np.sort(cells.detach().numpy(), axis=1))
    return torch.sort(cells, dim=1).values


def _sorted_median(cells: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Median of ``cells[i, lo[i]:hi[i]]`` of row-sorted cells, as the numpy helper."""
    cnt = hi - lo
    last = cells.shape[1] - 1
    ia = torch.clamp(lo + torch.div(cnt - 1, 2, rounding_mode="floor"), 0, last)
    ib = torch.clamp(lo + torch.div(cnt, 2, rounding_mode="floor"), 0, last)
    a = cells.gather(1, ia[:, None])[:, 0].to(torch.float64)
    b = cells.gather(1, ib[:, None])[:, 0].to(torch.float64)
    return 0.5 * (a + b)


# --------------------------------------------------------------------------------------
# Background spline
# --------------------------------------------------------------------------------------


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
    yc, xc = mesh.cell_centres()
    ncy, ncx = mesh.level.shape
    shape = (int(mesh.shape[0]), int(mesh.shape[1]))
    if ncy == 1 and ncx == 1:
        knots_y = np.array([yc[0], yc[0] + 1.0])
        knots_x = np.array([xc[0], xc[0] + 1.0])
        return BackgroundSpline(
            ty=knots_y,
            tx=knots_x,
            ky=0,
            kx=0,
            coef=np.array([[float(mesh.level[0, 0])]]),
            ybounds=(float(yc[0]), float(yc[0])),
            xbounds=(float(xc[0]), float(xc[0])),
            shape=shape,
        )
    level = mesh.level
    if ncy == 1:
        level, yc = np.vstack([level, level]), np.array([yc[0], yc[0] + 1.0])
    if ncx == 1:
        level, xc = np.hstack([level, level]), np.array([xc[0], xc[0] + 1.0])
    ky = min(3, len(yc) - 1)
    kx = min(3, len(xc) - 1)
    spline = interpolate.RectBivariateSpline(yc, xc, level, kx=ky, ky=kx, s=0)
    ty, tx = (np.asarray(t, dtype=np.float64).copy() for t in spline.get_knots())
    deg_y, deg_x = (int(d) for d in spline.degrees)
    coef = np.asarray(spline.get_coeffs(), dtype=np.float64).reshape(
        len(ty) - deg_y - 1, len(tx) - deg_x - 1
    )
    return BackgroundSpline(
        ty=ty,
        tx=tx,
        ky=deg_y,
        kx=deg_x,
        coef=coef.copy(),
        ybounds=(float(yc[0]), float(yc[-1])),
        xbounds=(float(xc[0]), float(xc[-1])),
        shape=shape,
    )


def _basis(
    t: np.ndarray, k: int, bounds: tuple[float, float], pos: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Knot interval and the ``k + 1`` non-zero B-spline values at each position.

    Replicates FITPACK's ``fpbisp`` interval search (clamped to the spline's base
    interval) and ``fpbspl`` Cox–de Boor recursion operation for operation, in float64.

    Parameters
    ----------
    t : numpy.ndarray
        Knot vector.
    k : int
        Degree.
    bounds : (float, float)
        Clipping range of the positions.
    pos : numpy.ndarray
        Positions (pixel coordinates).

    Returns
    -------
    first : numpy.ndarray of int64
        Index of the first coefficient of each position's non-zero basis functions.
    values : numpy.ndarray
        ``(len(pos), k + 1)`` basis values.
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
    spline: BackgroundSpline,
    boxes: Sequence[tuple[int, int, int, int]],
    device: str | torch.device,
    scipy_order: bool,
    chunk_rows: int | None = None,
) -> torch.Tensor:
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
        total = factors[0]
        for f in factors[1:]:
            total = total + f
        factors = [total]
    ncx = coef.shape[1]
    nterm_x = spline.kx + 1
    if chunk_rows is None:
        chunk_rows = _CPU_CHUNK_ROWS if device.type == "cpu" else 0
    if chunk_rows <= 0:
        facs = [f.reshape(nwin, h, ncx) for f in factors]
        acc = None
        for fac in facs:
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
            first = True
            for fac in factors:
                rows = fac[i * h + r0 : i * h + r1]
                for b in range(nterm_x):
                    if first:
                        torch.index_select(rows, 1, cols[b], out=a_)
                        a_.mul_(weights[b])
                        first = False
                    else:
                        torch.index_select(rows, 1, cols[b], out=g_)
                        a_.add_(g_.mul_(weights[b]))
            out[i, r0:r1].copy_(a_)
    return out


def evaluate_background(
    spline: BackgroundSpline,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    *,
    device: str | torch.device = "cpu",
    scipy_order: bool = False,
) -> torch.Tensor:
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
        ``Σ_b (Σ_a C[iy+a, ix+b] · By[y, a]) · Bx[x, b]`` (the row sums are computed once
        per row), which differs from scipy only in the last float64 bits, hence by at most
        one float32 ulp on the rare pixels where that changes the float32 rounding.

    Returns
    -------
    torch.Tensor
        ``(y1 - y0, x1 - x0)`` float32.
    """
    return _evaluate_batch(spline, [(int(y0), int(y1), int(x0), int(x1))], device, scipy_order)[0]


def background_windows(
    splines: Sequence[BackgroundSpline],
    boxes: Sequence[tuple[int, int, int, int]],
    *,
    device: str | torch.device = "cpu",
    scipy_order: bool = False,
) -> torch.Tensor:
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
