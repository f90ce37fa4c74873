"""Reference implementations the package's kernels are tested against (imported, not collected).

``extract_instances_reference`` is the straightforward one-window instance extraction the
batched torch kernel replaced (scipy's connected components, then every pixel of a
multi-peak component compared with every peak of its component): slow, but simple enough
to trust.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from survey_engine.kernels.detect import DetectionResult

_EIGHT = np.ones((3, 3), dtype=bool)
_MAX_PAIRS = 1 << 22


def _shift(a: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[y, x] = a[y - dy, x - dx]`` (False outside)."""
    h, w = a.shape
    out = torch.zeros_like(a)
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = a[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def _find_peaks(centre: torch.Tensor, fg: torch.Tensor, threshold: float) -> torch.Tensor:
    """3×3 local maxima above ``threshold`` on foreground; plateaus keep the first pixel."""
    mx = F.max_pool2d(centre[None, None], 3, stride=1, padding=1)[0, 0]
    cand = (centre >= mx) & (centre > threshold) & fg
    earlier = _shift(cand, 1, 1) | _shift(cand, 1, 0) | _shift(cand, 1, -1) | _shift(cand, 0, 1)
    return cand & ~earlier


def extract_instances_reference(
    maps,
    bad: np.ndarray | None = None,
    *,
    foreground_threshold: float = 0.5,
    centre_threshold: float = 0.3,
    minarea: int = 5,
) -> DetectionResult:
    """Turn the maps of one window into labelled objects (children) and parents.

    Parameters
    ----------
    maps : UNetOutput
        ``(H, W)`` foreground and centre probabilities, ``(2, H, W)`` offsets (pixels).
    bad : numpy.ndarray of bool, optional
        Pixels that belong to no object.
    foreground_threshold, centre_threshold : float
        Probability thresholds.
    minarea : int
        Smallest component kept.

    Returns
    -------
    DetectionResult
    """
    fgp = torch.as_tensor(np.asarray(maps.foreground, dtype=np.float32))
    cen = torch.as_tensor(np.asarray(maps.centre, dtype=np.float32))
    off = torch.as_tensor(np.asarray(maps.offset, dtype=np.float32))
    if fgp.ndim != 2 or cen.shape != fgp.shape or off.shape != (2, *fgp.shape):
        msg = (
            "maps must hold (H, W) foreground and centre maps and (2, H, W) offsets, got "
            f"{tuple(fgp.shape)}, {tuple(cen.shape)}, {tuple(off.shape)}"
        )
        raise ValueError(msg)
    h, w = fgp.shape
    fg = fgp > foreground_threshold
    if bad is not None:
        bad = np.asarray(bad, dtype=bool)
        if bad.shape != (h, w):
            msg = f"bad must have the maps' shape {(h, w)}, got {bad.shape}"
            raise ValueError(msg)
        fg &= ~torch.from_numpy(bad)
    empty = DetectionResult(
        np.zeros((h, w), np.int32),
        np.zeros(0, np.int32),
        np.zeros((h, w), np.int32),
        np.zeros(0, np.int32),
        False,
    )
    peaks = _find_peaks(cen, fg, centre_threshold)
    comp_np, n_comp = ndimage.label(fg.numpy(), structure=_EIGHT)
    if n_comp == 0 or not bool(peaks.any()):
        return empty
    comp = torch.from_numpy(comp_np.astype(np.int64))
    area = torch.bincount(comp.ravel(), minlength=n_comp + 1)
    pk_flat = torch.nonzero(peaks.ravel()).ravel()  # raster order
    pk_comp = comp.ravel()[pk_flat]
    npk = torch.bincount(pk_comp, minlength=n_comp + 1)
    keep = (npk > 0) & (area >= minarea)
    keep[0] = False
    if not bool(keep.any()):
        return empty
    # Peaks of kept components, sorted by (component, raster position).
    sel = keep[pk_comp]
    pk_flat, pk_comp = pk_flat[sel], pk_comp[sel]
    order = torch.argsort(pk_comp, stable=True)
    pk_flat, pk_comp = pk_flat[order], pk_comp[order]
    n_pk = len(pk_flat)
    pk_y, pk_x = pk_flat // w, pk_flat % w
    npk = torch.bincount(pk_comp, minlength=n_comp + 1)
    first = torch.cumsum(npk, 0) - npk  # index of each component's first peak

    pix = torch.nonzero((comp > 0).ravel() & keep[comp.ravel()]).ravel()
    pc = comp.ravel()[pix]
    assign = first[pc].clone()  # single-peak components: their peak
    multi = npk[pc] > 1
    if bool(multi.any()):
        mp = pix[multi]
        mc = pc[multi]
        py, px = mp // w, mp % w
        dy, dx = off[0].ravel()[mp], off[1].ravel()[mp]
        counts = npk[mc]
        best = torch.empty(len(mp), dtype=torch.long)
        # Chunks of pixels with a bounded number of (pixel, candidate peak) pairs.
        csum = torch.cumsum(counts, 0)
        a = 0
        while a < len(mp):
            base = int(csum[a - 1]) if a else 0
            b = int(torch.searchsorted(csum, base + _MAX_PAIRS, right=True))
            b = max(b, a + 1)
            cnt = counts[a:b]
            owner = torch.repeat_interleave(torch.arange(a, b), cnt)
            within = torch.arange(len(owner)) - torch.repeat_interleave(
                torch.cumsum(cnt, 0) - cnt, cnt
            )
            cand = first[mc[owner]] + within
            # Exact integer differences first, then the float offset: window-independent.
            ey = (pk_y[cand] - py[owner]).float() - dy[owner]
            ex = (pk_x[cand] - px[owner]).float() - dx[owner]
            d2 = ey * ey + ex * ex
            local = owner - a
            dmin = torch.full((b - a,), math.inf).scatter_reduce(0, local, d2, "amin")
            is_min = d2 <= dmin[local]
            big = torch.full((b - a,), n_pk, dtype=torch.long)
            best[a:b] = big.scatter_reduce(0, local[is_min], cand[is_min], "amin")
            a = b
        assign[multi] = best

    # Instances = peaks with at least one pixel; labels 1..n in (component, raster) order.
    counts = torch.bincount(assign, minlength=n_pk)
    alive = counts > 0
    lut = torch.zeros(n_pk, dtype=torch.long)
    lut[alive] = torch.arange(1, int(alive.sum()) + 1)
    labels = torch.zeros(h * w, dtype=torch.int32)
    labels[pix] = lut[assign].to(torch.int32)
    # Parents: kept components renumbered 1..n (raster order of their first pixel).
    plut = torch.zeros(n_comp + 1, dtype=torch.long)
    plut[keep] = torch.arange(1, int(keep.sum()) + 1)
    parents = torch.zeros(h * w, dtype=torch.int32)
    parents[pix] = plut[pc].to(torch.int32)
    obj_comp = pk_comp[alive]
    kids = torch.bincount(obj_comp, minlength=n_comp + 1)
    return DetectionResult(
        labels.reshape(h, w).numpy(),
        plut[obj_comp].to(torch.int32).numpy(),
        parents.reshape(h, w).numpy(),
        kids[obj_comp].to(torch.int32).numpy(),
        False,
    )
