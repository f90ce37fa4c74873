"""U-Net instance extraction in torch, batched over windows (CPU and CUDA, same code).

:func:`extract_instances_batch` is :func:`~survey_engine.unet.infer.extract_instances` for a
batch of equally-sized windows, with no host round trip (no scipy) and no Python loop over
windows or objects; ``extract_instances_batch(...).window(b)`` equals ``extract_instances``
on window ``b`` array for array. :func:`connected_components` labels 8-connected
components as a graph of horizontal runs (min-hooking and pointer jumping), numbered as
``scipy.ndimage.label``. The algorithms, why CPU and CUDA results are identical, and the
host synchronisations: ``docs/kernels.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .detect import DetectionResult

__all__ = ["InstanceBatch", "connected_components", "extract_instances_batch"]

#: Largest number of pixel × candidate-peak pairs handled at once in the assignment.
_MAX_PAIRS = 1 << 22
#: Merging rounds between two convergence checks (host synchronisations).
_CHECK_EVERY = 4
#: Side (px) of the cells of the peak grid used by the pixel-to-peak assignment.
_CELL = 2
#: Rings of cells searched around a pixel's predicted centre, in turn, before the few
#: pixels still unresolved are compared with every peak of their component.
_RINGS = (1, 4, 16, 64)
#: Components with more peaks than this use the grid; smaller ones compare every pair.
_GRID_MIN = 16


@dataclass
class InstanceBatch:
    """Objects (children) and parents of a batch of windows.

    Attributes
    ----------
    labels : torch.Tensor
        ``(B, H, W)`` int32 object labels, ``1..n_b`` per window (0 = none), on the
        input device.
    parents : torch.Tensor
        ``(B, H, W)`` int32 parent (kept component) labels, ``1..p_b`` per window.
    n_objects : torch.Tensor
        ``(B,)`` int64 number of objects per window.
    parent : torch.Tensor
        ``(N,)`` int32, one entry per object (window-major, label order): the label of its
        parent within its window.
    n_children : torch.Tensor
        ``(N,)`` int32 per object: the number of objects of its parent.
    score : torch.Tensor or None
        ``(N,)`` float32 per object: the centre probability at its peak.
    """

    labels: torch.Tensor
    parents: torch.Tensor
    n_objects: torch.Tensor
    parent: torch.Tensor
    n_children: torch.Tensor
    score: torch.Tensor | None = None

    def window(self, b: int) -> DetectionResult:
        """The result of window ``b`` as a numpy :class:`DetectionResult` (host copy).

        Parameters
        ----------
        b : int
            Window index, ``0 <= b < B``.

        Returns
        -------
        DetectionResult
            As from :func:`~survey_engine.unet.infer.extract_instances`; ``overflow`` is
            False.
        """
        nb = self.labels.shape[0]
        if isinstance(b, bool) or int(b) != b or not -nb <= b < nb:
            msg = f"window index must be an integer in [0, {nb}), got {b!r}"
            raise IndexError(msg)
        b = int(b) % nb
        counts = self.n_objects.cpu().tolist()
        objects = slice(sum(counts[:b]), sum(counts[: b + 1]))

        def host(t):
            return t.cpu().numpy().astype(np.int32, copy=True)

        score = None if self.score is None else self.score[objects].cpu().numpy().astype(np.float32)
        return DetectionResult(
            host(self.labels[b]), host(self.parent[objects]), host(self.parents[b]),
            host(self.n_children[objects]), False, score=score,
        )  # fmt: skip


def _components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Components of the foreground of a ``(B, H, W)`` mask: ``gidx, comp, counts``.

    ``gidx``: int64 flat indices of the foreground pixels, increasing; ``comp``: the global
    component number of each, ``1..sum(counts)``, window-major then in raster order of the
    components' first pixels; ``counts``: ``(B,)`` components per window.
    """
    nb, h, w = mask.shape
    dev = mask.device
    gidx = torch.nonzero(mask.reshape(-1)).reshape(-1)
    n = gidx.numel()
    if n == 0:
        return gidx, gidx.clone(), torch.zeros(nb, dtype=torch.int64, device=dev)
    # Nodes: horizontal runs of foreground pixels (numbered in raster order of their
    # first pixel, so a component's smallest run holds its first pixel).
    flat = mask.reshape(-1)
    last = flat.numel() - 1
    x = gidx % w
    y = torch.div(gidx % (h * w), w, rounding_mode="floor")
    cont = torch.zeros(n, dtype=torch.bool, device=dev)  # left neighbour is foreground
    cont[1:] = (gidx[1:] - gidx[:-1] == 1) & (x[1:] > 0)
    first = ~cont
    run = torch.cumsum(first, 0) - 1
    run_win = torch.div(gidx[first], h * w, rounding_mode="floor")
    n_runs = run_win.numel()
    # Edges: pixel p to its down-left, down and down-right neighbour q (same window), kept
    # only where (p - 1, q - 1) is not also a pair of foreground pixels in the same rows:
    # that pair links the same two runs, so only the leftmost contact of each direction is
    # needed.
    src = torch.nonzero(y < h - 1).reshape(-1)
    below = gidx[src] + w
    xs, cs = x[src], cont[src]
    f = {k: flat[(below + k).clamp_(0, last)] for k in (-2, -1, 0, 1)}
    us, vs = [], []
    for dx, ok in (
        (-1, (xs > 0) & f[-1] & ~(cs & (xs > 1) & f[-2])),
        (0, f[0] & ~(cs & f[-1])),
        (1, (xs < w - 1) & f[1] & ~(cs & f[0])),
    ):
        us.append(run[src[ok]])
        vs.append(run[torch.searchsorted(gidx, below[ok] + dx)])
    u, v = torch.cat(us), torch.cat(vs)
    del us, vs, src, below, xs, cs, f, cont, first

    lab = torch.arange(n_runs, dtype=torch.int64, device=dev)
    while u.numel():
        for _ in range(_CHECK_EVERY):
            lu, lv = lab[u], lab[v]
            lab.scatter_reduce_(0, torch.maximum(lu, lv), torch.minimum(lu, lv), "amin")
            lab = lab[lab]
            lab = lab[lab]
        live = lab[u] != lab[v]
        u, v = u[live], v[live]
    while True:
        nxt = lab[lab]
        if bool(torch.equal(nxt, lab)):
            break
        lab = nxt

    root = lab == torch.arange(n_runs, dtype=torch.int64, device=dev)
    counts = torch.bincount(run_win[root], minlength=nb)
    number = torch.cumsum(root, 0)  # global 1-based number of each root
    return gidx, number[lab][run], counts


def connected_components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-connected components of a batch of boolean images, on the mask's device.

    Parameters
    ----------
    mask : torch.Tensor
        ``(B, H, W)`` bool.

    Returns
    -------
    labels : torch.Tensor
        ``(B, H, W)`` int64: 0 off the mask, ``1..n_b`` in window ``b``, numbered in
        raster order of each component's first pixel — exactly
        ``scipy.ndimage.label(mask[b], structure=numpy.ones((3, 3)))``.
    counts : torch.Tensor
        ``(B,)`` int64 number of components ``n_b`` per window.
    """
    mask = torch.as_tensor(mask)
    if mask.ndim != 3 or mask.dtype != torch.bool:
        msg = f"mask must be a (B, H, W) bool tensor, got {mask.dtype} {tuple(mask.shape)}"
        raise ValueError(msg)
    nb, h, w = mask.shape
    gidx, comp, counts = _components(mask)
    offsets = torch.cumsum(counts, 0) - counts
    labels = torch.zeros(nb * h * w, dtype=torch.int64, device=mask.device)
    if gidx.numel():
        labels[gidx] = comp - offsets[torch.div(gidx, h * w, rounding_mode="floor")]
    return labels.reshape(nb, h, w), counts


def _find_peaks(
    centre: torch.Tensor, gidx: torch.Tensor, threshold: float, h: int, w: int
) -> torch.Tensor:
    """Positions in ``gidx`` (sorted flat foreground indices) of the peaks, increasing.

    The batched ``_find_peaks`` of :mod:`survey_engine.unet.infer` at the foreground pixels
    above ``threshold`` only: a candidate has no larger 3×3 neighbour inside its window
    (``centre >= max_pool2d(centre)``, NaN never a candidate), a peak has, in addition, no
    candidate among its four earlier neighbours in raster order (plateaus keep their first
    pixel).
    """
    flat = centre.reshape(-1)
    last = flat.numel() - 1
    c = flat[gidx]
    pre = torch.nonzero(c > threshold).reshape(-1)
    p, cp = gidx[pre], c[pre]
    y = torch.div(p % (h * w), w, rounding_mode="floor")
    x = p % w
    inside = {}
    for d in (-1, 0, 1):
        inside["y", d] = (y + d >= 0) & (y + d < h)
        inside["x", d] = (x + d >= 0) & (x + d < w)
    is_max = torch.ones_like(pre, dtype=torch.bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                nv = flat[(p + dy * w + dx).clamp_(0, last)]
                is_max &= ~(inside["y", dy] & inside["x", dx]) | (cp >= nv)
    cand, cy, cx = p[is_max], y[is_max], x[is_max]
    if cand.numel() == 0:
        return pre[is_max]
    # Earlier candidates, looked up in the sorted candidate positions.
    earlier = torch.zeros_like(cand, dtype=torch.bool)
    for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1)):
        q = cand + dy * w + dx
        k = torch.searchsorted(cand, q).clamp_(max=cand.numel() - 1)
        earlier |= (cy + dy >= 0) & (cx + dx >= 0) & (cx + dx < w) & (cand[k] == q)
    return pre[is_max][~earlier]


def _per_window_rank(selected: torch.Tensor, window: torch.Tensor, nb: int):
    """1-based rank of each selected item within its window (0 if not selected).

    ``selected`` and ``window`` are aligned 1-D tensors over items sorted window-major.
    Returns the ranks (int64) and the number selected per window ``(nb,)``.
    """
    counts = torch.bincount(window[selected], minlength=nb)
    offsets = torch.cumsum(counts, 0) - counts
    rank = torch.cumsum(selected, 0) - offsets[window]
    return torch.where(selected, rank, torch.zeros_like(rank)), counts


class _Pixels(NamedTuple):
    """Pixels to assign: position, predicted offset to their centre, component, window."""

    y: torch.Tensor
    x: torch.Tensor
    dy: torch.Tensor
    dx: torch.Tensor
    comp: torch.Tensor
    win: torch.Tensor

    def take(self, idx: torch.Tensor) -> _Pixels:
        return _Pixels(*(t[idx] for t in self))


class _Peaks(NamedTuple):
    """Peaks sorted by (component, raster position): position in the window, component,
    window; ``first`` and ``count``: per component, its first peak and number of peaks."""

    y: torch.Tensor
    x: torch.Tensor
    comp: torch.Tensor
    first: torch.Tensor
    count: torch.Tensor
    win: torch.Tensor


def _distance2(q: _Pixels, pk: _Peaks, own: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Squared distance from each pixel's predicted centre to a candidate peak.

    Exact integer differences first, then the float offset: the same bits whatever the window
    or the set of candidates. Peaks of another component are at infinity.
    """
    ey = (pk.y[cand] - q.y[own]).float() - q.dy[own]
    ex = (pk.x[cand] - q.x[own]).float() - q.dx[own]
    d2 = ey * ey + ex * ex
    return torch.where(pk.comp[cand] == q.comp[own], d2, math.inf)


def _nearest(q: _Pixels, pk: _Peaks, rows: tuple, order: torch.Tensor | None):
    """The nearest candidate peak of each pixel: ``(d2 min, smallest peak index attaining it)``.

    ``rows = (owner, start, count)``: row ``j`` offers pixel ``owner[j]`` (nondecreasing) the
    candidates ``order[start[j] : start[j] + count[j]]`` (``order`` None: the identity). The
    (row, candidate) pairs are expanded in chunks of at most ``_MAX_PAIRS``; a pixel without
    candidates gets ``inf`` and the index ``len(pk.y)``.
    """
    owner, start, count = rows
    n, dev = q.y.numel(), q.y.device
    dmin = torch.full((n,), math.inf, device=dev)
    best = torch.full((n,), pk.y.numel(), dtype=torch.int64, device=dev)
    csum = torch.cumsum(count, 0)
    a, n_rows = 0, count.numel()
    while a < n_rows:
        base = int(csum[a - 1]) if a else 0
        b = max(int(torch.searchsorted(csum, base + _MAX_PAIRS, right=True)), a + 1)
        cnt = count[a:b]
        row = torch.repeat_interleave(torch.arange(a, b, device=dev), cnt)
        within = torch.arange(row.numel(), device=dev) - torch.repeat_interleave(
            torch.cumsum(cnt, 0) - cnt, cnt
        )
        cand = start[row] + within
        if order is not None:
            cand = order[cand]
        own = owner[row]
        d2 = _distance2(q, pk, own, cand)
        o0 = int(owner[a])
        span = int(owner[b - 1]) - o0 + 1
        local = own - o0
        ld = torch.full((span,), math.inf, device=dev).scatter_reduce(0, local, d2, "amin")
        is_min = d2 <= ld[local]
        lb = torch.full((span,), pk.y.numel(), dtype=torch.int64, device=dev).scatter_reduce(
            0, local[is_min], cand[is_min], "amin"
        )
        cd, cb = dmin[o0 : o0 + span], best[o0 : o0 + span]
        best[o0 : o0 + span] = torch.where(
            ld < cd, lb, torch.where(ld == cd, torch.minimum(cb, lb), cb)
        )
        dmin[o0 : o0 + span] = torch.minimum(cd, ld)
        a = b
    return dmin, best


def _every_peak(q: _Pixels, pk: _Peaks) -> torch.Tensor:
    """Nearest peak of each pixel among all the peaks of its component (brute force)."""
    n = q.y.numel()
    rows = (torch.arange(n, device=q.y.device), pk.first[q.comp], pk.count[q.comp])
    return _nearest(q, pk, rows, None)[1]


def _grid_rows(q: _Pixels, cells: tuple, ring: int, ncy: int, ncx: int):
    """Candidate rows of the cells within ``ring`` cells of each pixel's predicted centre.

    One row per cell row: the cells of one cell row are consecutive in the sorted peak order.
    ``cells``: the first sorted peak and the number of peaks of each cell; ``ncy, ncx``: the
    grid's shape per window.
    """
    cstart, ccount = cells
    dev = q.y.device
    qy = (q.y.double() + q.dy.double()).nan_to_num(nan=-1e9).clamp(-1e9, 1e9)
    qx = (q.x.double() + q.dx.double()).nan_to_num(nan=-1e9).clamp(-1e9, 1e9)
    cy0 = torch.floor(qy / _CELL).long()
    cx0 = torch.floor(qx / _CELL).long()
    lo, hi = (cx0 - ring).clamp(0, ncx - 1), (cx0 + ring).clamp(0, ncx - 1)
    x_ok = (cx0 + ring >= 0) & (cx0 - ring <= ncx - 1)
    cy = cy0[:, None] + torch.arange(-ring, ring + 1, device=dev)
    ok = x_ok[:, None] & (cy >= 0) & (cy < ncy)
    row0 = q.win[:, None] * (ncy * ncx) + cy.clamp(0, ncy - 1) * ncx
    k_lo, k_hi = row0 + lo[:, None], row0 + hi[:, None]
    start = cstart[k_lo]
    count = torch.where(ok, cstart[k_hi] + ccount[k_hi] - start, 0)
    owner = torch.arange(q.y.numel(), device=dev).repeat_interleave(2 * ring + 1)
    return owner, start.reshape(-1), count.reshape(-1)


def _assign(q: _Pixels, pk: _Peaks, nb: int, h: int, w: int) -> torch.Tensor:
    """Index of the peak of each pixel: the nearest to its predicted centre, ties to the first.

    Components of at most ``_GRID_MIN`` peaks compare every (pixel, peak) pair. Larger ones
    look up the peaks in a grid of ``_CELL``-px cells: a ring of ``r`` cells around the
    predicted centre holds every peak within ``r * _CELL`` px of it, so a nearest peak found
    within that radius is the nearest of all (a margin covers float32 rounding), and a
    pixel costs the peaks near it, not the peaks of its blend. Pixels with no peak that
    near try the next ring, then every peak of their component. The result is the brute
    force's, bit for bit (``docs/kernels.md``).
    """
    dev = q.y.device
    out = torch.empty(q.y.numel(), dtype=torch.int64, device=dev)
    big = pk.count[q.comp] > _GRID_MIN
    small = torch.nonzero(~big).reshape(-1)
    if small.numel():
        out[small] = _every_peak(q.take(small), pk)
    todo = torch.nonzero(big).reshape(-1)
    if todo.numel() == 0:
        return out
    ncy, ncx = -(-h // _CELL), -(-w // _CELL)
    # Peaks of the gridded components by cell (window, cell row, cell column), stable.
    on_grid = torch.nonzero(pk.count[pk.comp] > _GRID_MIN).reshape(-1)
    key = (pk.win[on_grid] * ncy + torch.div(pk.y[on_grid], _CELL, rounding_mode="floor")) * ncx
    key += torch.div(pk.x[on_grid], _CELL, rounding_mode="floor")
    sort = torch.argsort(key, stable=True)
    order = on_grid[sort]
    ccount = torch.bincount(key, minlength=nb * ncy * ncx)
    cells = (torch.cumsum(ccount, 0) - ccount, ccount)
    for ring in _RINGS:
        chunk = max(1, _MAX_PAIRS // (2 * ring + 1))
        limit = float(ring * _CELL) ** 2 * (1 - 1e-5)
        still = []
        for c0 in range(0, todo.numel(), chunk):
            idx = todo[c0 : c0 + chunk]
            sub = q.take(idx)
            d2, best = _nearest(sub, pk, _grid_rows(sub, cells, ring, ncy, ncx), order)
            found = d2 <= limit
            out[idx[found]] = best[found]
            still.append(idx[~found])
        todo = torch.cat(still)
        if todo.numel() == 0:
            return out
    out[todo] = _every_peak(q.take(todo), pk)
    return out


def extract_instances_batch(
    foreground: torch.Tensor, centre: torch.Tensor, offset: torch.Tensor,
    bad: torch.Tensor | None = None, *, foreground_threshold: float = 0.5,
    centre_threshold: float = 0.3, minarea: int = 5,
) -> InstanceBatch:  # fmt: skip
    """Objects and parents of a batch of windows from their U-Net maps.

    Parameters
    ----------
    foreground, centre : torch.Tensor
        ``(B, H, W)`` foreground and centre probabilities (computed in float32).
    offset : torch.Tensor
        ``(B, 2, H, W)`` vector (dy, dx) in pixels to the owning object's centre.
    bad : torch.Tensor of bool, optional
        ``(B, H, W)`` pixels that belong to no object.
    foreground_threshold, centre_threshold : float
        Probability thresholds.
    minarea : int
        Smallest component kept (pixels).

    Returns
    -------
    InstanceBatch
        On the device of ``foreground``; ``window(b)`` equals
        :func:`~survey_engine.unet.infer.extract_instances` of window ``b``.
    """
    fgp = torch.as_tensor(foreground)
    dev = fgp.device
    fgp = fgp.to(torch.float32)
    cen = torch.as_tensor(centre, device=dev).to(torch.float32)
    off = torch.as_tensor(offset, device=dev).to(torch.float32)
    if fgp.ndim != 3 or cen.shape != fgp.shape or off.shape != (fgp.shape[0], 2, *fgp.shape[1:]):
        msg = (
            "maps must be (B, H, W) foreground and centre maps and (B, 2, H, W) offsets, got "
            f"{tuple(fgp.shape)}, {tuple(cen.shape)}, {tuple(off.shape)}"
        )
        raise ValueError(msg)
    nb, h, w = fgp.shape
    hw = h * w
    off_flat = off.contiguous().reshape(-1)
    fg = fgp > foreground_threshold
    if bad is not None:
        bad = torch.as_tensor(bad, device=dev).to(torch.bool)
        if bad.shape != fg.shape:
            msg = f"bad must have the maps' shape {tuple(fg.shape)}, got {tuple(bad.shape)}"
            raise ValueError(msg)
        fg &= ~bad

    # Foreground pixels and their global component numbers 1..n_comp (window-major).
    gidx, comp, ccount = _components(fg)
    n_comp = int(ccount.sum())
    # Window of each component (entry 0: background, counted in window 0 and never kept).
    zero = torch.zeros(1, dtype=torch.int64, device=dev)
    comp_win = torch.cat([zero, torch.repeat_interleave(torch.arange(nb, device=dev), ccount)])
    area = torch.bincount(comp, minlength=n_comp + 1)
    pk_node = _find_peaks(cen, gidx, centre_threshold, h, w)
    pk_flat, pk_comp = gidx[pk_node], comp[pk_node]
    npk = torch.bincount(pk_comp, minlength=n_comp + 1)
    keep = (npk > 0) & (area >= minarea)
    keep[0] = False
    # Peaks of kept components, sorted by (component, raster position).
    sel = keep[pk_comp]
    pk_flat, pk_comp = pk_flat[sel], pk_comp[sel]
    order = torch.argsort(pk_comp, stable=True)
    pk_flat, pk_comp = pk_flat[order], pk_comp[order]
    n_pk = pk_flat.numel()
    pk_in = pk_flat % hw
    pk_y, pk_x = torch.div(pk_in, w, rounding_mode="floor"), pk_in % w
    npk = torch.bincount(pk_comp, minlength=n_comp + 1)
    first = torch.cumsum(npk, 0) - npk  # index of each component's first peak

    in_kept = keep[comp]
    pix = gidx[in_kept]
    pc = comp[in_kept]
    assign = first[pc].clone()  # single-peak components: their peak
    multi = npk[pc] > 1
    if bool(multi.any()):
        mp, mc = pix[multi], pc[multi]
        mp_in = mp % hw
        at = torch.div(mp, hw, rounding_mode="floor") * (2 * hw) + mp_in
        q = _Pixels(torch.div(mp_in, w, rounding_mode="floor"), mp_in % w, off_flat[at],
                    off_flat[at + hw], mc, torch.div(mp, hw, rounding_mode="floor"))  # fmt: skip
        assign[multi] = _assign(
            q, _Peaks(pk_y, pk_x, pk_comp, first, npk, comp_win[pk_comp]), nb, h, w
        )

    # Objects = peaks with at least one pixel, numbered per window in (component, raster)
    # order; parents = kept components numbered per window.
    alive = torch.bincount(assign, minlength=n_pk) > 0
    lut, n_objects = _per_window_rank(alive, comp_win[pk_comp], nb)
    plut, _ = _per_window_rank(keep, comp_win, nb)
    labels = torch.zeros(nb * hw, dtype=torch.int32, device=dev)
    parents = torch.zeros(nb * hw, dtype=torch.int32, device=dev)
    if pix.numel():
        labels[pix] = lut[assign].to(torch.int32)
        parents[pix] = plut[pc].to(torch.int32)
    obj_comp = pk_comp[alive]
    kids = torch.bincount(obj_comp, minlength=n_comp + 1)
    obj_flat = pk_flat[alive]  # window-major flat index of each object's centre peak
    score = cen.reshape(-1)[obj_flat].to(torch.float32)
    return InstanceBatch(
        labels=labels.reshape(nb, h, w), parents=parents.reshape(nb, h, w), n_objects=n_objects,
        parent=plut[obj_comp].to(torch.int32), n_children=kids[obj_comp].to(torch.int32),
        score=score,
    )  # fmt: skip
