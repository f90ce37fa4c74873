"""Compiled (numba) loops of the numpy backend's measurement kernels (:mod:`.measure`).

Each loop performs the floating-point operations of the vectorised numpy formulation it
replaced, in the same order, so the results are the same bits; exponentials stay numpy's
(its SIMD ``exp`` differs from libm's in the last bit for a few % of arguments), computed
between the loops. Compiled once per installation (``cache=True``: the machine code is kept
in ``__pycache__`` beside this module, ~10 s the first time, ~0.3 s to load afterwards);
kept in a module of its own so that editing the callers does not invalidate the cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["matched_at", "peaks", "row_counts", "row_cumsums", "wc_args", "wc_errors", "wc_pixels",
           "wc_step"]  # fmt: skip


@njit(cache=True, nogil=True)
def peaks(labels, values, n):  # pragma: no cover - compiled
    """Labelled pixels (flat index, label) in raster order, each label's peak (index, value)
    and bounding box ``(n, 4)``: y0, y1, x0, x1 (half-open; ``ndimage.find_objects``)."""
    h, w = labels.shape
    lab_flat, val_flat = labels.ravel(), values.ravel()
    m = 0
    for j in range(lab_flat.size):
        m += lab_flat[j] != 0
    flat, lab = np.empty(m, np.int64), np.empty(m, labels.dtype)
    peak_idx = np.full(n, -1, np.int64)
    peak_val = np.zeros(n, values.dtype)
    bbox = np.empty((n, 4), np.int64)
    bbox[:, 0], bbox[:, 1], bbox[:, 2], bbox[:, 3] = h, 0, w, 0
    k = 0
    for j in range(lab_flat.size):
        lj = lab_flat[j]
        if lj == 0:
            continue
        flat[k], lab[k] = j, lj
        k += 1
        v, i, y, x = val_flat[j], lj - 1, j // w, j % w
        # Raster order: the first of equal values is the lowest index; NaN never wins.
        if peak_idx[i] < 0 or v > peak_val[i] or (np.isnan(peak_val[i]) and not np.isnan(v)):
            peak_idx[i], peak_val[i] = j, v
        bbox[i, 0], bbox[i, 1] = min(bbox[i, 0], y), max(bbox[i, 1], y + 1)
        bbox[i, 2], bbox[i, 3] = min(bbox[i, 2], x), max(bbox[i, 3], x + 1)
    return flat, lab, peak_idx, peak_val, bbox


@njit(cache=True, nogil=True)
def matched_at(data, variance, k, kk, flat):  # pragma: no cover - compiled
    """The matched-filtered image at pixels ``flat`` (see ``measure.matched_filter_at``)."""
    h, w = data.shape
    ky, kx = k.shape
    cy, cx = ky // 2, kx // 2
    eps = np.finfo(np.float64).eps
    out = np.empty(len(flat), np.float32)
    for e in range(len(flat)):
        y, x = flat[e] // w, flat[e] % w
        num, den = 0.0, 0.0
        for j in range(ky):
            for i in range(kx):
                yy, xx = y + j - cy, x + i - cx
                dv, iv = np.float32(0.0), np.float32(0.0)
                if 0 <= yy < h and 0 <= xx < w:
                    vv = variance[yy, xx]
                    if np.isfinite(vv) and vv > 0:
                        iv = np.float32(1.0) / vv
                    dv = data[yy, xx] * iv
                if abs(k[j, i]) > eps:
                    num += k[j, i] * np.float64(dv)
                if abs(kk[j, i]) > eps:
                    den += kk[j, i] * np.float64(iv)
        n32, d32 = np.float32(num), np.float32(den)
        out[e] = n32 / np.sqrt(d32) if d32 > 0 else np.float32(0.0)
    return out


@njit(cache=True, nogil=True)
def wc_pixels(image, variance, labels, py, px, half):  # pragma: no cover - compiled
    """Pixels of each object's window disc (radius ``half − 0.5``), raster order, no neighbours."""
    h, w = image.shape
    total = 0
    for i in range(len(py)):
        total += (2 * half[i] + 1) ** 2
    obj = np.empty(total, np.int32)
    dxs, dys, val, var = np.empty(total), np.empty(total), np.empty(total), np.empty(total)
    k = 0
    for i in range(len(py)):
        hv = half[i]
        rr = (hv - 0.5) ** 2
        for ty in range(-hv, hv + 1):
            y = py[i] + ty
            if y < 0 or y >= h:
                continue
            for tx in range(-hv, hv + 1):
                x = px[i] + tx
                if ty * ty + tx * tx > rr or x < 0 or x >= w:
                    continue
                lab = labels[y, x]
                if lab != 0 and lab != i + 1:
                    continue
                obj[k], dxs[k], dys[k] = i, tx, ty
                val[k], var[k] = image[y, x], variance[y, x]
                k += 1
    return obj[:k], dxs[:k], dys[:k], val[:k], var[:k]


@njit(cache=True, nogil=True)
def wc_args(obj, dx, dy, u, v, k, neg, final=False):  # pragma: no cover - compiled
    """``neg = −(Δx² + Δy²)/2σ²`` per pixel (the iteration's rounding; ``final``: the errors')."""
    for e in range(len(obj)):
        i = obj[e]
        ex, ey = dx[e] - u[i], dy[e] - v[i]
        if final:
            neg[e] = -(ex * ex + ey * ey) * k[i]
        else:
            neg[e] = -((ex * ex + ey * ey) * k[i])


@njit(cache=True, nogil=True)
def wc_step(obj, dx, dy, val, m, neg, wgt, u, v, state, tol2):  # pragma: no cover - compiled
    """One iteration: sums in pixel order, steps, convergence; compacts the pixel lists."""
    n = len(u)
    s0, sx, sy = np.zeros(n), np.zeros(n), np.zeros(n)
    for e in range(m):
        i = obj[e]
        wv = 0.0 if neg[e] <= -8.0 else wgt[e]  # the window stops at r = 4σ
        wv *= val[e]
        s0[i] += wv
        sx[i] += (dx[e] - u[i]) * wv
        sy[i] += (dy[e] - v[i]) * wv
    for i in range(n):
        ok = state[i] == 0 and s0[i] > 0
        su = 2.0 * sx[i] / s0[i] if ok else 0.0
        sv = 2.0 * sy[i] / s0[i] if ok else 0.0
        u[i] += su  # + 0.0 for the others, as the vectorised form adds
        v[i] += sv
        if state[i] == 0:
            state[i] = (1 if su * su + sv * sv < tol2 else 0) if ok else 2
    k = 0
    for e in range(m):
        if state[obj[e]] == 0:
            obj[k], dx[k], dy[k], val[k] = obj[e], dx[e], dy[e], val[e]
            k += 1
    return k


@njit(cache=True, nogil=True)
def wc_errors(obj, dx, dy, val, var, u, v, r2max, ex_neg, n):  # pragma: no cover - compiled
    """Final window sum and position errors of the windowed centroid."""
    s0, qx, qy = np.zeros(n), np.zeros(n), np.zeros(n)
    for e in range(len(obj)):
        i = obj[e]
        ex, ey = dx[e] - u[i], dy[e] - v[i]
        win = ex_neg[e] if ex * ex + ey * ey < r2max[i] else 0.0
        s0[i] += win * val[e]
        qx[i] += win * win * var[e] * ex * ex
        qy[i] += win * win * var[e] * ey * ey
    safe = np.where(s0 > 0, s0, 1.0)
    return s0, 2.0 * np.sqrt(qx) / safe, 2.0 * np.sqrt(qy) / safe


@njit(cache=True, nogil=True)
def row_cumsums(cells):  # pragma: no cover - compiled
    """Per row of sorted cells: ``[0, nancumsum(x)]``, ``[0, nancumsum(x²)]`` (float64) and the
    number of non-NaN values; numpy's sequential sums (a NaN adds +0.0) bit for bit."""
    rows, m = cells.shape
    csum, csq = np.zeros((rows, m + 1)), np.zeros((rows, m + 1))
    nn = np.zeros(rows, np.int64)
    for r in range(rows):
        s, q = 0.0, 0.0
        for j in range(m):
            x = np.float64(cells[r, j])
            nan = np.isnan(x)
            nn[r] += not nan
            x = 0.0 if nan else x
            s = x if j == 0 else s + x
            q = x * x if j == 0 else q + x * x
            csum[r, j + 1], csq[r, j + 1] = s, q
    return csum, csq, nn


@njit(cache=True, nogil=True)
def row_counts(cells, nn, thr, inclusive):  # pragma: no cover - compiled
    """Per row of sorted cells (NaN last, ``nn`` non-NaN): how many are ``< thr`` (or ``<=``)."""
    out = np.zeros(len(thr), np.int64)
    for r in range(len(thr)):
        t = thr[r]
        if np.isnan(t):
            continue
        lo, hi = 0, nn[r]
        while lo < hi:
            mid = (lo + hi) // 2
            x = cells[r, mid]
            if x < t or (inclusive and x == t):
                lo = mid + 1
            else:
                hi = mid
        out[r] = lo
    return out
