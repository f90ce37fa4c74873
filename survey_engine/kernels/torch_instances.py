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

import numpy as np
import torch

from .detect import DetectionResult

__all__ = ["InstanceBatch", "connected_components", "extract_instances_batch"]

#: Largest number of pixel × candidate-peak pairs handled at once in the assignment.
_MAX_PAIRS = 1 << 22
#: Merging rounds between two convergence checks (host synchronisations).
_CHECK_EVERY = 4


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
    """

    labels: torch.Tensor
    parents: torch.Tensor
    n_objects: torch.Tensor
    parent: torch.Tensor
    n_children: torch.Tensor

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

        return DetectionResult(
            host(self.labels[b]), host(self.parent[objects]), host(self.parents[b]),
            host(self.n_children[objects]), False,
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
    mp = pix[multi]
    if mp.numel():
        mc = pc[multi]
        mp_in = mp % hw
        py, px = torch.div(mp_in, w, rounding_mode="floor"), mp_in % w
        at = torch.div(mp, hw, rounding_mode="floor") * (2 * hw) + mp_in
        dy, dx = off_flat[at], off_flat[at + hw]
        counts = npk[mc]
        best = torch.empty(mp.numel(), dtype=torch.int64, device=dev)
        # Chunks of pixels with a bounded number of (pixel, candidate peak) pairs.
        csum = torch.cumsum(counts, 0)
        a = 0
        while a < mp.numel():
            base = int(csum[a - 1]) if a else 0
            b = max(int(torch.searchsorted(csum, base + _MAX_PAIRS, right=True)), a + 1)
            cnt = counts[a:b]
            owner = torch.repeat_interleave(torch.arange(a, b, device=dev), cnt)
            within = torch.arange(owner.numel(), device=dev) - torch.repeat_interleave(
                torch.cumsum(cnt, 0) - cnt, cnt
            )
            cand = first[mc[owner]] + within
            # Exact integer differences first, then the float offset (as the reference).
            ey = (pk_y[cand] - py[owner]).float() - dy[owner]
            ex = (pk_x[cand] - px[owner]).float() - dx[owner]
            d2 = ey * ey + ex * ex
            local = owner - a
            dmin = torch.full((b - a,), math.inf, device=dev).scatter_reduce(0, local, d2, "amin")
            is_min = d2 <= dmin[local]
            big = torch.full((b - a,), n_pk, dtype=torch.int64, device=dev)
            best[a:b] = big.scatter_reduce(0, local[is_min], cand[is_min], "amin")
            a = b
        assign[multi] = best

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
    return InstanceBatch(
        labels=labels.reshape(nb, h, w), parents=parents.reshape(nb, h, w), n_objects=n_objects,
        parent=plut[obj_comp].to(torch.int32), n_children=kids[obj_comp].to(torch.int32),
    )  # fmt: skip
