"""Science rules applied to every deblender's children, written once for both backends.

The deblenders (:mod:`survey_engine.deblend`) find children and parents; these rules then
correct what neither should decide alone, on the host (numpy), for any deblender and backend:

* :func:`merge_saturated` — a saturated star is one object: the children whose peak lies
  inside the grown saturated footprint (its core, its bleed trails; grown in proportion to
  the core's size) are merged, with their parents, flagged ``SATURATED``;
* :func:`adopt_across_gaps` — the piece of a child across a masked gap that the deblender left
  to nobody is given to it, flagged ``MASKED``;
* :func:`join_masked_gaps` — masked pixels do not split objects: children facing each other
  across a run of at most :data:`GAP_MAX` masked pixels, one of them cut by the mask (its
  peak within :data:`TRUNCATION` px of it), and children cut by the mask that touch each
  other, are joined (with their parents), flagged ``MASKED``;
* :func:`merge_shreds` — a bright galaxy is not shredded: a fainter child of the same parent
  that lies inside a brighter child's extent, where the image is as symmetric about the
  brighter child's centre as a single galaxy's (and, for the U-Net, where the network's centre
  map gives the fainter child little support), is a piece of the brighter one;
* :func:`deblended_fluxes` — every parent's background-subtracted pixels apportioned among
  its children by symmetric templates, so that the children's fluxes add up to the parent's
  in every band.

Each rule reads pixels within :func:`reach` of a footprint only, so results stay
window-independent with the guard of :func:`survey_engine.stages.guard_band`
(``docs/architecture.md``, "Science rules").
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from ..kernels import compiled
from ..kernels.detect import DetectionResult
from ..schema import Flag

__all__ = ["GAP_MAX", "SAT_CORE_MAX", "SAT_GROW", "SAT_REACH_MAX", "SAT_SCALE", "SHRED_ASYMMETRY",
           "SHRED_MIN_AREA", "SHRED_SUPPORT", "SHRED_WEAK_ASYMMETRY", "TRUNCATION", "adopt_across_gaps",
           "apply_rules", "deblended_fluxes", "join_masked_gaps", "merge_saturated",
           "merge_shreds", "reach", "saturated_zone", "share_weights"]  # fmt: skip

logger = logging.getLogger(__name__)

#: Widest run of masked pixels (along a row or a column) bridged by :func:`join_masked_gaps`.
GAP_MAX = 6
#: A child whose peak lies within this many pixels (Chebyshev) of a masked pixel is cut by it.
TRUNCATION = 2
#: Pixels by which a saturated footprint is grown whatever its size.
SAT_GROW = 2.0
#: The saturated footprint is grown by this many times its core radius (a saturated pixel's
#: depth inside the saturated pixels: a star's core, not its narrow bleed trail).
SAT_SCALE = 3.0
#: Largest core depth (pixels) that sets a saturated pixel's reach.
SAT_CORE_MAX = 12
#: Largest growth of a saturated footprint (pixels).
SAT_REACH_MAX = SAT_GROW + SAT_SCALE * SAT_CORE_MAX

#: A fainter child is a piece of a brighter child of its parent when, inside the brighter
#: one's extent, its 3×3 peak sum exceeds the sum at the point mirrored through the brighter
#: child's centre by less than this fraction of itself (a second object adds light on one
#: side only; a galaxy's own clumps of light and isophote wiggles are nearly symmetric).
SHRED_ASYMMETRY = 0.10
#: A child whose deblender gives its centre a score below this (the U-Net's centre
#: probability at the child's peak) is a piece when its asymmetry is below
#: :data:`SHRED_WEAK_ASYMMETRY`.
SHRED_SUPPORT = 0.5
#: Asymmetry below which a weakly supported child is a piece (see :data:`SHRED_SUPPORT`).
SHRED_WEAK_ASYMMETRY = 0.25
#: Only a child of at least this many pixels has pieces: bright and large galaxies are what
#: deblenders shred; two small faint galaxies side by side are what they must keep apart.
SHRED_MIN_AREA = 80

_EIGHT = np.ones((3, 3), dtype=bool)


def reach() -> int:
    """Pixels beyond a footprint that the rules read.

    A child is safe in a window when its footprint keeps this far from a cut edge. The
    saturated-star merge reads the saturated pixels within :data:`SAT_REACH_MAX` of a
    child's peak and their depth (up to :data:`SAT_CORE_MAX` px more); the masked-gap rules
    read the masked run next to a footprint and the child on the other side (whose peak,
    when it decides the join, lies within ``GAP_MAX + TRUNCATION + 1`` px). Those pixels
    are then inside the window, or the merged parent (which holds the star's saturated
    pixels, or the child across) reaches the edge and is measured again in a larger window.
    """
    return int(max(GAP_MAX + TRUNCATION + 2, np.ceil(SAT_REACH_MAX) + SAT_CORE_MAX + 2))


class _Union:
    """Union-find over ``n`` items (the smaller root wins, so results are order-independent)."""

    def __init__(self, n: int):
        self.root = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        r = self.root
        while r[i] != i:
            r[i] = r[r[i]]
            i = r[i]
        return int(i)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.root[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.root))], dtype=np.int64)


def _peaks(labels: np.ndarray, det: np.ndarray, n: int):
    """Peak pixel (y, x) of each child: brightest, ties to the lowest index (as measured)."""
    _, _, peak_idx, _, _ = compiled.peaks(
        np.ascontiguousarray(labels, dtype=np.int32), np.ascontiguousarray(det, dtype=np.float32), n
    )
    w = labels.shape[1]
    return peak_idx // w, peak_idx % w


def saturated_zone(sat: np.ndarray) -> np.ndarray:
    """Pixels within a saturated pixel's reach: ``SAT_GROW + SAT_SCALE × min(e, SAT_CORE_MAX)``.

    ``e`` is the saturated pixel's distance to the nearest unsaturated one (its depth in the
    saturated core: large in a star's core, ~1 in a bleed trail), floored to whole pixels; so
    a saturated star's zone reaches ``SAT_SCALE`` times its core radius beyond the core, and
    ``SAT_GROW`` beyond its trails. Every pixel's membership depends on the pixels within
    :data:`SAT_REACH_MAX` ``+ SAT_CORE_MAX`` of it only.
    """
    depth = np.floor(np.minimum(ndimage.distance_transform_edt(sat), SAT_CORE_MAX))
    zone = np.zeros(sat.shape, dtype=bool)
    for level in np.unique(depth[sat]):
        core = depth >= level
        zone |= ndimage.distance_transform_edt(~core) <= SAT_GROW + SAT_SCALE * level
    return zone


def merge_saturated(res: DetectionResult, det: np.ndarray, sat: np.ndarray, uf: _Union,
                    flags: np.ndarray, parents_uf: _Union) -> int:  # fmt: skip
    """Merge the children whose peaks lie in a saturated star's zone into one object.

    Each child whose peak lies in :func:`saturated_zone` joins the children owning the
    8-connected set of saturated pixels (a star's core and its bleed trails) nearest to its
    peak, whatever its parent (a fragment of the star's halo found as a parent of its own
    joins too, with its parent); all are flagged ``SATURATED``.

    Returns
    -------
    int
        Number of children merged into another.
    """
    if not sat.any():
        return 0
    comps, _ = ndimage.label(sat, structure=_EIGHT)
    labels = res.labels
    py, px = _peaks(labels, det, res.n_objects)
    h, w = sat.shape
    # Each star in a box holding every pixel its children's membership depends on: the
    # saturated pixels within 2 reaches of it and their depth.
    margin = int(2 * np.ceil(SAT_REACH_MAX) + SAT_CORE_MAX + 2)
    stars, kids = [], []
    for j, sl in enumerate(ndimage.find_objects(comps), start=1):
        y0, y1 = max(0, sl[0].start - margin), min(h, sl[0].stop + margin)
        x0, x1 = max(0, sl[1].start - margin), min(w, sl[1].stop + margin)
        inside = np.flatnonzero((py >= y0) & (py < y1) & (px >= x0) & (px < x1))
        if len(inside) == 0:
            continue
        box_sat = sat[y0:y1, x0:x1]
        ky, kx = py[inside] - y0, px[inside] - x0
        in_zone = saturated_zone(box_sat)[ky, kx]
        _, (iy, ix) = ndimage.distance_transform_edt(~box_sat, return_indices=True)
        nearest = comps[y0:y1, x0:x1][iy[ky, kx], ix[ky, kx]]
        mine = inside[in_zone & (nearest == j)]
        stars.append(np.full(len(mine), j))
        kids.append(mine)
    # The children owning each star's saturated pixels, then those in its zone.
    own_c, own_l = comps[sat], labels[sat]
    pairs = np.unique(np.stack([own_c[own_l > 0], own_l[own_l > 0] - 1], axis=1), axis=0)
    members = np.concatenate([pairs.reshape(-1, 2),
                              np.stack([np.concatenate([np.zeros(0, np.int64), *stars]),
                                        np.concatenate([np.zeros(0, np.int64), *kids])], axis=1)])  # fmt: skip
    merged = 0
    first = {}
    for c, i in members.tolist():
        flags[i] |= int(Flag.SATURATED)
        j = first.setdefault(c, i)
        if uf.find(i) != uf.find(j):
            merged += 1
            uf.union(i, j)
            parents_uf.union(int(res.parent[i]), int(res.parent[j]))
    return merged


def _gap_contacts(labels: np.ndarray, bad: np.ndarray, gap_max: int):
    """Pairs of labels facing each other across ≤ ``gap_max`` masked pixels along rows.

    Returns ``(a, b)`` label arrays, one entry per row crossing (labels ≥ 1, a ≠ b).
    """
    h, w = labels.shape
    idx = np.broadcast_to(np.arange(w), (h, w))
    last_good = np.maximum.accumulate(np.where(~bad, idx, -1), axis=1)
    end = np.zeros((h, w), dtype=bool)  # first good pixel after a masked run
    end[:, 1:] = ~bad[:, 1:] & bad[:, :-1]
    ys, xs = np.nonzero(end)
    left = last_good[ys, xs - 1]
    ok = (left >= 0) & (xs - left - 1 <= gap_max)
    ys, xs, left = ys[ok], xs[ok], left[ok]
    a, b = labels[ys, left], labels[ys, xs]
    keep = (a > 0) & (b > 0) & (a != b)
    return a[keep], b[keep]


def _touching(labels: np.ndarray):
    """Pairs of different labels in 8-adjacent pixels: ``(a, b)`` arrays (labels ≥ 1)."""
    pairs = []
    for sa, sb in (
        ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
        ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
        ((slice(None, -1), slice(None, -1)), (slice(1, None), slice(1, None))),
        ((slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))),
    ):
        a, b = labels[sa].ravel(), labels[sb].ravel()
        keep = (a > 0) & (b > 0) & (a != b)
        pairs.append((a[keep], b[keep]))
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def join_masked_gaps(res: DetectionResult, det: np.ndarray, bad: np.ndarray, uf: _Union,
                     flags: np.ndarray, parents_uf: _Union) -> int:  # fmt: skip
    """Join children split by masked pixels (a masked strip, a bad column, a chip gap).

    Two children are one object when (a) they face each other across a run of at most
    :data:`GAP_MAX` masked pixels along at least two rows or columns and one of them is cut
    by the mask (its peak within :data:`TRUNCATION` px of a masked pixel), or (b) they
    touch and both are cut by the mask (pieces along the mask's edge). Joined children and
    their parents are flagged ``MASKED``. Children whose peaks lie away from the mask stay
    apart, even when their outskirts face each other across it.

    Returns
    -------
    int
        Number of children joined to another.
    """
    if not bad.any():
        return 0
    labels = res.labels
    py, px = _peaks(labels, det, res.n_objects)
    near = ndimage.binary_dilation(bad, structure=np.ones((2 * TRUNCATION + 1,) * 2, dtype=bool))
    cut = near[py, px]
    if not cut.any():
        return 0
    ra, rb = _gap_contacts(labels, bad, GAP_MAX)
    ca, cb = _gap_contacts(labels.T, bad.T, GAP_MAX)
    a, b = np.concatenate([ra, ca]) - 1, np.concatenate([rb, cb]) - 1
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pairs, counts = np.unique(np.stack([lo, hi], axis=1), axis=0, return_counts=True)
    pairs = pairs[(counts >= 2) & (cut[pairs[:, 0]] | cut[pairs[:, 1]])] if len(pairs) else pairs
    ta, tb = _touching(labels)
    ta, tb = ta - 1, tb - 1
    both = cut[ta] & cut[tb]
    side = np.unique(np.stack([np.minimum(ta, tb)[both], np.maximum(ta, tb)[both]], axis=1), axis=0)
    joined = 0
    for i, j in np.concatenate([pairs.reshape(-1, 2), side.reshape(-1, 2)]).tolist():
        if uf.find(i) != uf.find(j):
            joined += 1
        uf.union(i, j)
        parents_uf.union(int(res.parent[i]), int(res.parent[j]))
        flags[[i, j]] |= int(Flag.MASKED)
    return joined


def adopt_across_gaps(res: DetectionResult, det: np.ndarray, var: np.ndarray, bad: np.ndarray,
                      thresh: float, minarea: int) -> tuple[DetectionResult, np.ndarray]:  # fmt: skip
    """Give a child the piece of it across a masked gap that the deblender left to nobody.

    A deblender may keep one side of an object cut by a masked strip and drop the other
    (the U-Net finds no centre in it). Here a piece is a connected set of unlabelled usable
    pixels above ``thresh`` times the noise, of at least ``minarea`` pixels, cut by the
    mask (its brightest pixel within :data:`TRUNCATION` px of a masked pixel) and facing a
    child across at most :data:`GAP_MAX` masked pixels along at least two rows or columns;
    it joins the child it faces most (ties: the brightest). A piece that reaches the
    window's edge is given to its child whatever its size or peak, so that the child's
    parent reaches the edge too and is measured again in a larger window.

    Returns
    -------
    DetectionResult, numpy.ndarray of bool
        The result with the pieces added, and per child whether it received one.
    """
    n = res.n_objects
    got = np.zeros(n, dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        above = ~bad & (res.labels == 0) & (det > thresh * np.sqrt(var))
    if not above.any():
        return res, got
    pieces, n_pieces = ndimage.label(above, structure=_EIGHT)
    if n_pieces == 0:
        return res, got
    area = np.bincount(pieces.ravel(), minlength=n_pieces + 1)
    edge = np.zeros(n_pieces + 1, dtype=bool)
    for border in (pieces[0], pieces[-1], pieces[:, 0], pieces[:, -1]):
        edge[border] = True
    near = ndimage.binary_dilation(bad, structure=np.ones((2 * TRUNCATION + 1,) * 2, dtype=bool))
    # Brightest pixel of each piece (ties: lowest index) near the mask?
    _, _, peak_idx, _, _ = compiled.peaks(pieces.astype(np.int32), det.astype(np.float32), n_pieces)
    cut = np.zeros(n_pieces + 1, dtype=bool)
    cut[1:] = near.ravel()[peak_idx]
    ok = edge | ((area >= minarea) & cut)
    ok[0] = False
    both = np.where(res.labels > 0, res.labels, np.where(ok[pieces], pieces + n, 0))
    ra, rb = _gap_contacts(both, bad, GAP_MAX)
    ca, cb = _gap_contacts(both.T, bad.T, GAP_MAX)
    a, b = np.concatenate([ra, ca]), np.concatenate([rb, cb])
    child, piece = np.minimum(a, b), np.maximum(a, b)
    sel = (child <= n) & (piece > n)
    if not sel.any():
        return res, got
    pairs, counts = np.unique(np.stack([piece[sel] - n, child[sel]], axis=1), axis=0,
                              return_counts=True)  # fmt: skip
    keep = (counts >= 2) | edge[pairs[:, 0]]
    pairs, counts = pairs[keep], counts[keep]
    if len(pairs) == 0:
        return res, got
    _, _, cpeak_idx, cpeak_val, _ = compiled.peaks(
        np.ascontiguousarray(res.labels, dtype=np.int32), det.astype(np.float32), n
    )
    # Per piece: the child with most contacts, then the brightest, then the lowest peak index.
    order = np.lexsort((cpeak_idx[pairs[:, 1] - 1], -cpeak_val[pairs[:, 1] - 1], -counts,
                        pairs[:, 0]))  # fmt: skip
    pairs = pairs[order]
    first = np.ones(len(pairs), dtype=bool)
    first[1:] = pairs[1:, 0] != pairs[:-1, 0]
    owner = np.zeros(n_pieces + 1, dtype=np.int32)
    owner[pairs[first, 0]] = pairs[first, 1]
    add = owner[pieces]
    labels = np.where(add > 0, add, res.labels).astype(np.int32)
    parents = np.where(add > 0, res.parent[np.maximum(add, 1) - 1], res.parents).astype(np.int32)
    got[pairs[first, 1] - 1] = True
    logger.debug("science rules: %d piece(s) across masked gaps adopted", int(first.sum()))
    out = DetectionResult(labels, res.parent, parents, res.n_children, res.overflow, res.flags,
                          res.score)  # fmt: skip
    return out, got


def _box_sums(a: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Sum of ``a`` over the 3×3 box centred on each sub-pixel point, bilinear (NaN outside)."""
    out = np.zeros(len(y))
    for dy in (-1.0, 0.0, 1.0):
        for dx in (-1.0, 0.0, 1.0):
            out += ndimage.map_coordinates(a, [y + dy, x + dx], order=1, mode="constant",
                                           cval=np.nan, prefilter=False)  # fmt: skip
    return out


def merge_shreds(res: DetectionResult, det: np.ndarray, bad: np.ndarray, uf: _Union,
                 score: np.ndarray | None = None) -> int:  # fmt: skip
    """Merge the pieces of shredded galaxies into the child they belong to.

    A child ``j`` is a piece of a brighter child ``i`` (peak value, at least
    :data:`SHRED_MIN_AREA` pixels) of the same parent when (a) ``j``'s light, the barycentre ``p_j`` of its pixels, lies within ``i``'s extent,
    ``sqrt(area_i / π)`` of ``i``'s centre (the light-weighted centre of the 3×3 pixels around
    ``i``'s peak); (b) the point ``m_j`` mirrored through that centre, with its 3×3 box, lies
    inside the parent's bounding box, away from unusable pixels; and (c) the asymmetry
    ``(B(p_j) − B(m_j)) / B(p_j)`` of the 3×3 sums ``B`` (bilinear) at ``p_j`` and at ``m_j``
    is below :data:`SHRED_ASYMMETRY` — or
    below :data:`SHRED_WEAK_ASYMMETRY` when the deblender's ``score`` of ``j`` is below
    :data:`SHRED_SUPPORT`. A piece joins the brightest such ``i``. Only pixels of the
    parent's bounding box are read, so the result is window-independent for safe parents.

    Parameters
    ----------
    res : DetectionResult
        Children and parents of the window.
    det : numpy.ndarray
        ``(H, W)`` background-subtracted detection image (0 where unusable).
    bad : numpy.ndarray of bool
        Pixels without usable detection data.
    uf : _Union
        Union-find over the children, updated in place.
    score : numpy.ndarray, optional
        Per child, the deblender's support for its centre (None: the asymmetry alone).

    Returns
    -------
    int
        Number of children merged into another.
    """
    n = res.n_objects
    multi = np.flatnonzero(res.n_children > 1)
    if len(multi) == 0:
        return 0
    h, w = det.shape
    labels = np.ascontiguousarray(res.labels, dtype=np.int32)
    detf = np.ascontiguousarray(det, dtype=np.float32)
    _, _, peak_idx, peak_val, _ = compiled.peaks(labels, detf, n)
    py, px = peak_idx // w, peak_idx % w
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    pbox = np.array([[s[0].start, s[0].stop, s[1].start, s[1].stop]
                     for s in ndimage.find_objects(res.parents)], dtype=np.int64)  # fmt: skip
    # Light-weighted centre of the 3×3 pixels around each peak (clipped at 0, window edges).
    d64 = np.where(bad, 0.0, detf).astype(np.float64)
    cy, cx = py.astype(np.float64), px.astype(np.float64)
    wsum, sy, sx = np.zeros(n), np.zeros(n), np.zeros(n)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            yy, xx = np.clip(py + dy, 0, h - 1), np.clip(px + dx, 0, w - 1)
            v = np.maximum(d64[yy, xx], 0.0)
            wsum += v
            sy += v * dy
            sx += v * dx
    good = wsum > 0
    cy[good] += sy[good] / wsum[good]
    cx[good] += sx[good] / wsum[good]
    # Where each child's own light is: the barycentre of its pixels (a faint child beside a
    # bright one has its brightest pixel on their border, its light away from it).
    flat = labels.ravel()
    own = flat > 0
    wgt = np.maximum(d64.ravel()[own], 0.0)
    yy, xx = np.divmod(np.flatnonzero(own), w)
    wl = np.bincount(flat[own] - 1, weights=wgt, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        by = np.where(wl > 0, np.bincount(flat[own] - 1, weights=wgt * yy, minlength=n) / wl, py)
        bx = np.where(wl > 0, np.bincount(flat[own] - 1, weights=wgt * xx, minlength=n) / wl, px)
    # Candidate pairs (j fainter, i brighter) of the same parent, j inside i's extent.
    jj, ii = [], []
    for p in np.unique(res.parent[multi]):
        kids = multi[res.parent[multi] == p]
        dist = np.hypot(by[kids][:, None] - cy[kids][None, :], bx[kids][:, None] - cx[kids][None, :])
        key_j, key_i = peak_val[kids][:, None], peak_val[kids][None, :]
        fainter = (key_j < key_i) | ((key_j == key_i) & (peak_idx[kids][:, None] > peak_idx[kids][None, :]))
        big = (area[kids] >= SHRED_MIN_AREA)[None, :]
        a, b = np.nonzero(fainter & big & (dist <= np.sqrt(area[kids] / np.pi)[None, :]))
        jj.append(kids[a])
        ii.append(kids[b])
    if not jj or not sum(len(v) for v in jj):
        return 0
    jj, ii = np.concatenate(jj), np.concatenate(ii)
    jy, jx = by[jj], bx[jj]
    my, mx = 2.0 * cy[ii] - jy, 2.0 * cx[ii] - jx
    box = pbox[res.parent[jj] - 1]
    inside = (my - 2 >= box[:, 0]) & (my + 2 < box[:, 1]) & (mx - 2 >= box[:, 2]) & (mx + 2 < box[:, 3])
    badf = bad.astype(np.float64)
    near_bad = (_box_sums(badf, my, mx) > 0) | (_box_sums(badf, jy, jx) > 0)
    at_j = _box_sums(d64, jy, jx)
    at_m = _box_sums(d64, my, mx)
    with np.errstate(invalid="ignore", divide="ignore"):
        asym = (at_j - at_m) / at_j
    limit = np.full(len(jj), SHRED_ASYMMETRY)
    if score is not None:
        limit = np.where(np.asarray(score)[jj] < SHRED_SUPPORT, SHRED_WEAK_ASYMMETRY, limit)
    piece = inside & ~near_bad & (at_j > 0) & np.isfinite(asym) & (asym < limit)
    if not piece.any():
        return 0
    jj, ii = jj[piece], ii[piece]
    # Each piece joins its brightest qualifying child (ties: lowest peak index).
    order = np.lexsort((peak_idx[ii], -peak_val[ii], jj))
    jj, ii = jj[order], ii[order]
    first = np.ones(len(jj), dtype=bool)
    first[1:] = jj[1:] != jj[:-1]
    merged = 0
    for j, i in zip(jj[first].tolist(), ii[first].tolist(), strict=True):
        if uf.find(i) != uf.find(j):
            merged += 1
            uf.union(i, j)
    return merged


def _relabel(res: DetectionResult, uf: _Union, parents_uf: _Union, flags: np.ndarray):
    """The result with each group of children one child, each group of parents one parent."""
    n = res.n_objects
    roots = uf.roots()
    # Children of merged parents must have merged parents: groups follow the child roots.
    for i in range(n):
        parents_uf.union(int(res.parent[i]), int(res.parent[roots[i]]))
    proots = parents_uf.roots()
    kept_p = np.unique(proots[1:])
    plut = np.zeros(len(proots), dtype=np.int32)
    plut[1:] = np.searchsorted(kept_p, proots[1:]) + 1
    kept = np.unique(roots)  # in label order of their first child
    new_of = np.searchsorted(kept, roots)
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[1:] = new_of + 1
    new_flags = np.zeros(len(kept), dtype=np.int64)
    np.bitwise_or.at(new_flags, new_of, flags)
    parent = plut[res.parent[kept]]
    kids = np.bincount(parent, minlength=len(kept_p) + 1)
    score = None
    if res.score is not None:  # a merged child is as supported as its best-supported piece
        score = np.full(len(kept), -np.inf, dtype=np.float32)
        np.maximum.at(score, new_of, np.asarray(res.score, dtype=np.float32))
    return DetectionResult(lut[res.labels], parent.astype(np.int32), plut[res.parents],
                           kids[parent].astype(np.int32), res.overflow, new_flags, score)  # fmt: skip


def apply_rules(res: DetectionResult, det: np.ndarray, var: np.ndarray, bad: np.ndarray,
                sat: np.ndarray, *, thresh: float, minarea: int) -> DetectionResult:  # fmt: skip
    """The saturated-star merge, the masked-gap rules and the shred merge on one window's children.

    Parameters
    ----------
    res : DetectionResult
        The deblender's children and parents.
    det : numpy.ndarray
        ``(H, W)`` background-subtracted detection image (0 where unusable).
    var : numpy.ndarray
        Its variance (inf where unusable).
    bad : numpy.ndarray of bool
        Pixels without usable detection data (masked, no data).
    sat : numpy.ndarray of bool
        Pixels saturated in any band.
    thresh, minarea : float, int
        Detection threshold (noise sigma) and minimum area of a piece adopted across a gap.

    Returns
    -------
    DetectionResult
        ``res`` itself when no rule applies; else the merged children (``flags`` holds the
        bits the rules set).
    """
    n = res.n_objects
    if n == 0:
        return res
    det = np.where(bad, np.float32(0.0), det).astype(np.float32, copy=False)
    flags = np.zeros(n, dtype=np.int64) if res.flags is None else res.flags.copy()
    adopted = np.zeros(n, dtype=bool)
    if bad.any():
        res, adopted = adopt_across_gaps(res, det, var, bad, thresh, minarea)
        flags[adopted] |= int(Flag.MASKED)
    uf, parents_uf = _Union(n), _Union(int(res.parents.max()) + 1)
    merged = merge_saturated(res, det, sat, uf, flags, parents_uf)
    joined = join_masked_gaps(res, det, bad, uf, flags, parents_uf)
    shreds = merge_shreds(res, det, bad, uf, res.score)
    if not (merged or joined or shreds or flags.any()):
        return res
    if not (merged or joined or shreds):
        return DetectionResult(
            res.labels, res.parent, res.parents, res.n_children, res.overflow, flags, res.score
        )
    logger.debug("science rules: %d saturated piece(s) merged, %d masked-gap piece(s) joined, "
                 "%d shredded piece(s) merged", merged, joined, shreds)  # fmt: skip
    return _relabel(res, uf, parents_uf, flags)


def share_weights(res: DetectionResult, det: np.ndarray, origin: tuple[int, int]):
    """How the pixels of blended parents are shared among their children (sparse).

    The rule of :func:`deblended_fluxes`: child ``i`` gets weight ``T_i(p) / Σ_j T_j(p)`` of
    each pixel ``p`` of its parent that some template reaches, and the pixels of a blended
    parent that no template reaches go whole to their owner (else the brightest child).
    Children of isolated parents get weight 1 on all of their parent's pixels (not listed).

    Returns
    -------
    tuple or None
        None if no parent is blended; else ``(multi, child, pix, wgt, owner, rest)``: the
        blended children, then per shared pixel its child, flat window pixel and weight, then
        per unreached pixel its child and flat pixel.
    """
    n = res.n_objects
    h, w = det.shape
    parents = res.parents.ravel()
    ppix = np.flatnonzero(parents)
    npar = int(res.parents.max())
    multi = np.flatnonzero(res.n_children > 1)
    if len(multi) == 0:
        return None
    labels = np.ascontiguousarray(res.labels, dtype=np.int32)
    detf = np.ascontiguousarray(det, dtype=np.float32)
    _, _, peak_idx, peak_val, bbox = compiled.peaks(labels, detf, n)
    cy, cx = peak_idx // w, peak_idx % w
    # Children in mosaic peak order: every per-pixel sum over children runs in that order.
    order = multi[np.lexsort((cx[multi] + origin[1], cy[multi] + origin[0]))]
    hy = np.maximum(cy - bbox[:, 0], bbox[:, 1] - 1 - cy)[order]
    hx = np.maximum(cx - bbox[:, 2], bbox[:, 3] - 1 - cx)[order]
    side_y, side_x = 2 * hy + 1, 2 * hx + 1
    cnt = side_y * side_x
    child = np.repeat(order, cnt)
    k = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    dy = k // np.repeat(side_x, cnt) - np.repeat(hy, cnt)
    dx = k % np.repeat(side_x, cnt) - np.repeat(hx, cnt)
    yy, xx = cy[child] + dy, cx[child] + dx
    ym, xm = cy[child] - dy, cx[child] - dx
    ok = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w) & (ym >= 0) & (ym < h) & (xm >= 0)
          & (xm < w))  # fmt: skip
    child, pix, mir = child[ok], (yy * w + xx)[ok], (ym * w + xm)[ok]
    par = res.parent[child]
    ok = (parents[pix] == par) & (parents[mir] == par)
    child, pix, mir = child[ok], pix[ok], mir[ok]
    d = detf.ravel().astype(np.float64)
    tmpl = np.maximum(np.minimum(d[pix], d[mir]), 0.0)
    pos = tmpl > 0
    child, pix, tmpl = child[pos], pix[pos], tmpl[pos]
    total = np.bincount(pix, weights=tmpl, minlength=h * w)
    wgt = tmpl / total[pix]
    # Pixels of a blended parent that no template reaches: to their owner, else the brightest.
    blended = np.zeros(npar + 1, dtype=bool)
    blended[res.parent[multi]] = True
    blend_pix = ppix[blended[parents[ppix]]]
    rest = blend_pix[total[blend_pix] == 0]
    owner = labels.ravel()[rest].astype(np.int64) - 1
    bright = np.full(npar + 1, -1, dtype=np.int64)
    key = np.lexsort((cx[multi] + origin[1], cy[multi] + origin[0], -peak_val[multi]))
    for i in multi[key][::-1]:  # the first in (brightest, mosaic order) written last
        bright[res.parent[i]] = i
    owner = np.where(owner >= 0, owner, bright[parents[rest]])
    return multi, child, pix, wgt, owner, rest


def deblended_fluxes(res: DetectionResult, det: np.ndarray, images: np.ndarray, variances: np.ndarray,
                     origin: tuple[int, int]):  # fmt: skip
    """Per-band fluxes of each child from its parent's pixels shared by symmetric templates.

    Child ``i`` of a parent with several children gets the template ``T_i(p) = max(0,
    min(D(p), D(2 c_i − p)))`` (``D``: the detection image on the parent's pixels, 0
    elsewhere; ``c_i``: the child's peak) on the box symmetric about its peak that holds its
    footprint. Each parent pixel goes to the children in proportion to their templates
    (weights ``T_i / Σ_j T_j``, summing to 1), or whole to the child owning it (to the
    brightest child for pixels the deblender left to nobody) where no template reaches.
    A child's flux in a band is the sum of its weighted pixels, so the children's fluxes
    add up to the parent's (to rounding); an isolated child gets its parent's flux. Every
    sum runs in an order fixed by the children's mosaic peak positions and the pixels'
    raster order, so the numbers do not depend on the window.

    Parameters
    ----------
    res : DetectionResult
        Children and parents of the window.
    det : numpy.ndarray
        ``(H, W)`` background-subtracted detection image (0 where unusable).
    images, variances : numpy.ndarray
        ``(band, H, W)`` background-subtracted images (0 where unusable) and variances
        (not finite where unusable).
    origin : (int, int)
        Mosaic pixel of the window's first pixel.

    Returns
    -------
    flux, flux_err, parent_flux : numpy.ndarray
        ``(n, band)`` float64: deblended flux and its error (``sqrt(Σ w² V)``), and the flux
        of each child's parent.
    """
    n, nb = res.n_objects, images.shape[0]
    if n == 0:
        z = np.zeros((0, nb))
        return z, z, z
    img = images.reshape(nb, -1).astype(np.float64)
    var = variances.reshape(nb, -1).astype(np.float64)
    var = np.where(np.isfinite(var), var, 0.0)
    parents = res.parents.ravel()
    ppix = np.flatnonzero(parents)
    npar = int(res.parents.max())
    pflux = np.stack([np.bincount(parents[ppix], weights=img[b, ppix], minlength=npar + 1)
                      for b in range(nb)], axis=1)  # fmt: skip
    pvar = np.stack([np.bincount(parents[ppix], weights=var[b, ppix], minlength=npar + 1)
                     for b in range(nb)], axis=1)  # fmt: skip
    parent_flux = pflux[res.parent]
    flux, fvar = parent_flux.copy(), pvar[res.parent].copy()
    shares = share_weights(res, det, origin)
    if shares is None:
        return flux, np.sqrt(fvar), parent_flux
    multi, child, pix, wgt, owner, rest = shares
    for b in range(nb):
        flux[multi, b] = 0.0
        fvar[multi, b] = 0.0
        flux[:, b] += np.bincount(child, weights=wgt * img[b, pix], minlength=n)
        flux[:, b] += np.bincount(owner, weights=img[b, rest], minlength=n)
        fvar[:, b] += np.bincount(child, weights=wgt * wgt * var[b, pix], minlength=n)
        fvar[:, b] += np.bincount(owner, weights=var[b, rest], minlength=n)
    return flux, np.sqrt(fvar), parent_flux
