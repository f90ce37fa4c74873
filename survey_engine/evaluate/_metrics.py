"""One-to-one matching and the metrics of a matched catalog, pure numpy/scipy (for ``evaluate``)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from ..classify.metrics import roc_auc, roc_auc_error

__all__ = [
    "MAD_TO_SIGMA", "MATCH_METHODS", "binned_fraction", "binned_stats", "blended_in_truth",
    "close_pairs", "mag_at_fraction", "match_positions", "pair_recovery", "robust_stats",
    "segmentation_iou",
]  # fmt: skip

#: Matching methods understood by :func:`match_positions`.
MATCH_METHODS = ("optimal", "greedy")
#: Scale of the median absolute deviation to a Gaussian σ.
MAD_TO_SIGMA = 1.4826


# --- matching --------------------------------------------------------------------------
def match_positions(
    x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray, radius: float, *,
    method: str = "optimal",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Match two sets of positions one to one, within ``radius``.

    Each point of either set is used at most once; points with a non-finite coordinate are
    never matched. ``"optimal"``: the **most pairs**, then the **smallest total distance**
    (linear assignment per connected component of candidate pairs); ``"greedy"``: pairs by
    increasing distance (ties by ``i``, then ``j``). See ``docs/evaluation.md``.

    Parameters
    ----------
    x1, y1 : numpy.ndarray
        Positions of the first set (e.g. the catalog), any common unit.
    x2, y2 : numpy.ndarray
        Positions of the second set (e.g. the truth), same unit.
    radius : float
        Largest distance of a match, same unit.
    method : {"optimal", "greedy"}
        How conflicts between candidate pairs are resolved.

    Returns
    -------
    idx1, idx2 : numpy.ndarray of int64
        Indices of the matched points in the first and second set, sorted by ``idx2``.
    dist : numpy.ndarray of float64
        Distance of each match.

    Raises
    ------
    ValueError
        ``radius`` is not a positive finite number, ``method`` is unknown, or
        the coordinate arrays of one set differ in length.
    """
    radius = float(radius)
    if not np.isfinite(radius) or radius <= 0:
        msg = f"radius must be a positive finite number, got {radius!r}"
        raise ValueError(msg)
    if method not in MATCH_METHODS:
        msg = f"method must be one of {', '.join(MATCH_METHODS)}, got {method!r}"
        raise ValueError(msg)
    p1, p2 = _points(x1, y1, "first"), _points(x2, y2, "second")
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    ok1, ok2 = (np.flatnonzero(np.isfinite(p).all(axis=1)) for p in (p1, p2))
    if len(ok1) == 0 or len(ok2) == 0:
        return empty
    cand = cKDTree(p1[ok1]).sparse_distance_matrix(cKDTree(p2[ok2]), radius, output_type="ndarray")
    if len(cand) == 0:
        return empty
    i = ok1[cand["i"].astype(np.int64)]
    j = ok2[cand["j"].astype(np.int64)]
    d = cand["v"].astype(np.float64)
    keep = _greedy(i, j, d) if method == "greedy" else _optimal(i, j, d, len(p1), len(p2), radius)
    i, j, d = i[keep], j[keep], d[keep]
    order = np.argsort(j, kind="stable")
    return i[order], j[order], d[order]


def _points(x, y, which: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        msg = f"x and y of the {which} set differ in length: {len(x)} and {len(y)}"
        raise ValueError(msg)
    return np.column_stack([x, y])


def _greedy(i: np.ndarray, j: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Indices of the candidate pairs kept by increasing distance (ties: by ``i``, then ``j``)."""
    used1: set[int] = set()
    used2: set[int] = set()
    keep = []
    for k in np.lexsort((j, i, d)):
        a, b = int(i[k]), int(j[k])
        if a not in used1 and b not in used2:
            used1.add(a)
            used2.add(b)
            keep.append(k)
    return np.asarray(keep, dtype=np.int64)


def _optimal(
    i: np.ndarray, j: np.ndarray, d: np.ndarray, n1: int, n2: int, radius: float
) -> np.ndarray:
    """Indices of the candidate pairs kept by a per-component linear assignment."""
    graph = sparse.coo_matrix((np.ones(len(i)), (i, n1 + j)), shape=(n1 + n2, n1 + n2))
    _, comp = connected_components(graph, directed=False)
    label = comp[i]
    order = np.argsort(label, kind="stable")
    starts = np.flatnonzero(np.r_[True, label[order][1:] != label[order][:-1]])
    stops = np.r_[starts[1:], len(order)]
    keep = []
    for s0, s1 in zip(starts, stops, strict=True):
        ks = order[s0:s1]
        if len(ks) == 1:
            keep.append(ks)
            continue
        rows, ri = np.unique(i[ks], return_inverse=True)
        cols, cj = np.unique(j[ks], return_inverse=True)
        # A missing pair costs more than any complete set of real pairs, so the
        # assignment maximises the number of real pairs first, then minimises distance.
        big = radius * (min(len(rows), len(cols)) + 2.0)
        cost = np.full((len(rows), len(cols)), big)
        cost[ri, cj] = d[ks]
        lut = np.full((len(rows), len(cols)), -1, dtype=np.int64)
        lut[ri, cj] = ks
        r, c = linear_sum_assignment(cost)
        chosen = lut[r, c]
        keep.append(chosen[chosen >= 0])
    return np.concatenate(keep) if keep else np.zeros(0, np.int64)


# --- metrics ---------------------------------------------------------------------------
def robust_stats(values: np.ndarray) -> dict[str, Any]:
    """Median and robust scatter (1.4826 × MAD) of the finite values.

    Parameters
    ----------
    values : numpy.ndarray
        Sample (non-finite entries are ignored).

    Returns
    -------
    dict
        ``n``, ``median``, ``scatter`` (NaN when ``n`` is 0).
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"n": 0, "median": float("nan"), "scatter": float("nan")}
    med = float(np.median(v))
    return {"n": len(v), "median": med, "scatter": float(MAD_TO_SIGMA * np.median(np.abs(v - med)))}


def binned_fraction(
    values: np.ndarray, success: np.ndarray, edges: Sequence[float]
) -> list[dict[str, Any]]:
    """Fraction of successes per bin ``[lo, hi)`` of ``values``.

    Parameters
    ----------
    values, success : numpy.ndarray
        Quantity binned (e.g. magnitude; non-finite values fall in no bin); per entry, whether
        it counts as a success (bool).
    edges : sequence of float
        Increasing bin edges.

    Returns
    -------
    list of dict
        Per bin: ``lo``, ``hi``, ``n``, ``k`` (successes), ``fraction`` (NaN when
        empty) and ``error`` (binomial, ``sqrt(f (1 - f) / n)``).
    """
    v = np.asarray(values, dtype=np.float64)
    s = np.asarray(success, dtype=bool)
    edges = np.asarray(edges, dtype=np.float64)
    idx = np.digitize(v, edges) - 1
    inside = np.isfinite(v) & (idx >= 0) & (idx < len(edges) - 1)
    n = np.bincount(idx[inside], minlength=len(edges) - 1)
    k = np.bincount(idx[inside], weights=s[inside].astype(float), minlength=len(edges) - 1)
    out = []
    for b in range(len(edges) - 1):
        nb, kb = int(n[b]), int(np.rint(k[b]))
        f = kb / nb if nb else float("nan")
        err = float(np.sqrt(f * (1 - f) / nb)) if nb else float("nan")
        lo, hi = float(edges[b]), float(edges[b + 1])
        out.append({"lo": lo, "hi": hi, "n": nb, "k": kb, "fraction": f, "error": err})
    return out


def binned_stats(
    values: np.ndarray, sample: np.ndarray, edges: Sequence[float]
) -> list[dict[str, Any]]:
    """:func:`robust_stats` of ``sample`` per bin ``[lo, hi)`` of ``values``.

    Parameters
    ----------
    values, sample : numpy.ndarray
        Quantity binned; quantity summarised (same length).
    edges : sequence of float
        Increasing bin edges.

    Returns
    -------
    list of dict
        Per bin: ``lo``, ``hi``, ``n``, ``median``, ``scatter``.
    """
    v, s = np.asarray(values, dtype=np.float64), np.asarray(sample, dtype=np.float64)
    return [
        {"lo": float(lo), "hi": float(hi), **robust_stats(s[(v >= lo) & (v < hi)])}
        for lo, hi in itertools.pairwise(edges)
    ]


def mag_at_fraction(bins: list[dict[str, Any]], level: float, min_n: int = 5) -> float:
    """Magnitude where a binned fraction first drops below ``level``.

    Interpolated linearly between the centres of the last bin at or above ``level`` and the
    first bin below it.

    Parameters
    ----------
    bins : list of dict
        Output of :func:`binned_fraction` over increasing magnitudes.
    level, min_n : float, int
        The fraction (e.g. 0.9); bins with fewer entries are skipped.

    Returns
    -------
    float
        The magnitude, or NaN when the fraction never reaches or never drops below ``level``.
    """
    pts = [(0.5 * (b["lo"] + b["hi"]), b["fraction"]) for b in bins if b["n"] >= min_n]
    prev = None
    for m, f in pts:
        if f < level:
            if prev is None:
                return float("nan")
            m0, f0 = prev
            return float(m0 + (f0 - level) / (f0 - f) * (m - m0))
        prev = (m, f)
    return float("nan")


def close_pairs(
    x: np.ndarray, y: np.ndarray, max_sep: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``i < j`` closer than ``max_sep``.

    Parameters
    ----------
    x, y : numpy.ndarray
        Positions.
    max_sep : float
        Largest separation (exclusive), same unit.

    Returns
    -------
    i, j : numpy.ndarray of int64
        Members of each pair, ``i < j``, sorted by ``(i, j)``.
    sep : numpy.ndarray of float64
        Separations.
    """
    p = np.column_stack([np.asarray(x, np.float64), np.asarray(y, np.float64)])
    ok = np.flatnonzero(np.isfinite(p).all(axis=1))
    if len(ok) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    pairs = cKDTree(p[ok]).query_pairs(max_sep, output_type="ndarray")  # (0, 2) int64 if none
    i, j = ok[pairs[:, 0]], ok[pairs[:, 1]]
    i, j = np.minimum(i, j), np.maximum(i, j)
    sep = np.hypot(p[i, 0] - p[j, 0], p[i, 1] - p[j, 1])
    keep = sep < max_sep
    i, j, sep = i[keep], j[keep], sep[keep]
    order = np.lexsort((j, i))
    return i[order], j[order], sep[order]


def blended_in_truth(
    n: int, i: np.ndarray, j: np.ndarray, flux: np.ndarray, ratio: float
) -> np.ndarray:
    """Objects with a close neighbour at least ``ratio`` times as bright.

    Parameters
    ----------
    n, ratio : int, float
        Number of objects; neighbour flux ÷ own flux from which an object counts as blended.
    i, j, flux : numpy.ndarray
        Close pairs (from :func:`close_pairs`); flux of every object (any linear unit).

    Returns
    -------
    numpy.ndarray of bool
    """
    out = np.zeros(n, dtype=bool)
    f = np.asarray(flux, dtype=np.float64)
    out[i[f[j] >= ratio * f[i]]] = True
    out[j[f[i] >= ratio * f[j]]] = True
    return out


def pair_recovery(
    sep: np.ndarray, found_i: np.ndarray, found_j: np.ndarray, edges: Sequence[float]
) -> list[dict[str, Any]]:
    """How many close pairs have both, one or none of their members found, per separation bin.

    Parameters
    ----------
    sep, found_i, found_j : numpy.ndarray
        Separation of each pair; whether each member was matched (bool).
    edges : sequence of float
        Separation bin edges (``[lo, hi)``).

    Returns
    -------
    list of dict
        Per bin: ``lo``, ``hi``, ``n``, ``both``, ``one``, ``none``,
        ``fraction`` (both found ÷ n; NaN when empty), ``error`` (binomial).
    """
    both = np.asarray(found_i, bool) & np.asarray(found_j, bool)
    one = np.asarray(found_i, bool) ^ np.asarray(found_j, bool)
    rows = binned_fraction(sep, both, edges)
    sep = np.asarray(sep, np.float64)
    for r in rows:
        sel = (sep >= r["lo"]) & (sep < r["hi"])
        r["both"] = r.pop("k")
        r["one"] = int(one[sel].sum())
        r["none"] = r["n"] - r["both"] - r["one"]
    return rows


def segmentation_iou(
    segmentation, truth_segmentation, catalog_ids: np.ndarray, truth_ids: np.ndarray,
    cat_index: np.ndarray, truth_index: np.ndarray, *, strip: int = 1024,
) -> np.ndarray:  # fmt: skip
    """Intersection over union of the footprints of matched objects.

    Both maps are read in row strips (numpy, Zarr: any numpy-style 2-D slicing), so mosaics
    larger than memory can be evaluated.

    Parameters
    ----------
    segmentation, truth_segmentation : array-like
        ``(y, x)`` catalog and truth segmentations: catalog or truth id per pixel, 0 = none.
    catalog_ids, truth_ids : numpy.ndarray
        Ids of the catalog rows and truth rows (values in the maps).
    cat_index, truth_index : numpy.ndarray
        Row indices of the matched pairs.
    strip : int
        Rows read at a time.

    Returns
    -------
    numpy.ndarray of float64
        IoU of each pair (NaN when neither footprint has a pixel).

    Raises
    ------
    ValueError
        The two maps differ in shape.
    """
    if tuple(segmentation.shape) != tuple(truth_segmentation.shape):
        msg = (f"segmentation shape {tuple(segmentation.shape)} differs from the truth "
               f"segmentation shape {tuple(truth_segmentation.shape)}")  # fmt: skip
        raise ValueError(msg)
    cids, tids = np.asarray(catalog_ids, dtype=np.int64), np.asarray(truth_ids, dtype=np.int64)
    nc, nt = len(cids), len(tids)
    c_order, t_order = np.argsort(cids), np.argsort(tids)
    c_sorted, t_sorted = cids[c_order], tids[t_order]
    area_c, area_t = np.zeros(nc, np.int64), np.zeros(nt, np.int64)
    keys, counts = [], []
    ny = int(segmentation.shape[0])
    for y0 in range(0, ny, strip):
        s = np.asarray(segmentation[y0 : y0 + strip], dtype=np.int64).ravel()
        t = np.asarray(truth_segmentation[y0 : y0 + strip], dtype=np.int64).ravel()
        ci = _lookup(s, c_sorted, c_order)
        ti = _lookup(t, t_sorted, t_order)
        area_c += np.bincount(ci[ci >= 0], minlength=nc)
        area_t += np.bincount(ti[ti >= 0], minlength=nt)
        both = (ci >= 0) & (ti >= 0)
        if both.any():
            k, c = np.unique(ci[both] * nt + ti[both], return_counts=True)
            keys.append(k)
            counts.append(c)
    ci, ti = np.asarray(cat_index, np.int64), np.asarray(truth_index, np.int64)
    want = ci * nt + ti
    inter = np.zeros(len(want))
    if keys:  # pixel counts of every (catalog, truth) overlap
        allk, inv = np.unique(np.concatenate(keys), return_inverse=True)
        allc = np.bincount(inv, weights=np.concatenate(counts))
        pos = np.clip(np.searchsorted(allk, want), 0, len(allk) - 1)
        inter = np.where(allk[pos] == want, allc[pos], 0.0)
    union = area_c[ci] + area_t[ti] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)


def _lookup(values: np.ndarray, sorted_ids: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Row index of each value among ``sorted_ids`` (−1 for 0 and unknown ids)."""
    out = np.full(len(values), -1, dtype=np.int64)
    if len(sorted_ids) == 0:
        return out
    nz = np.flatnonzero(values != 0)
    v = values[nz]
    pos = np.clip(np.searchsorted(sorted_ids, v), 0, len(sorted_ids) - 1)
    hit = sorted_ids[pos] == v
    out[nz[hit]] = order[pos[hit]]
    return out


def classification_bins(
    p_star: np.ndarray, star: np.ndarray, mag: np.ndarray, edges: np.ndarray, threshold: float = 0.5
) -> list[dict[str, Any]]:
    """Star/galaxy separation of matched objects per truth-magnitude bin.

    Parameters
    ----------
    p_star : numpy.ndarray
        The catalog's star probability of each matched object.
    star : numpy.ndarray of bool
        Whether its truth counterpart is a star.
    mag : numpy.ndarray
        Truth magnitudes.
    edges : numpy.ndarray
        Bin edges.
    threshold : float
        Objects with ``p_star > threshold`` are called stars.

    Returns
    -------
    list of dict
        Per bin: ``lo``, ``hi``, ``n_star``, ``n_galaxy``, ``auc`` and its standard error
        ``auc_err`` (:func:`~survey_engine.classify.metrics.roc_auc_error`), ``star_completeness``
        (true stars called stars), ``star_purity`` (called stars that are stars),
        ``galaxy_completeness``.
    """
    rows = []
    called = p_star > threshold
    for lo, hi in itertools.pairwise(edges):
        s = (mag >= lo) & (mag < hi) & np.isfinite(p_star)
        st, ca = star[s], called[s]
        ns, ng, nc = int(st.sum()), int((~st).sum()), int(ca.sum())
        rows.append({
            "lo": float(lo), "hi": float(hi), "n_star": ns, "n_galaxy": ng,
            "auc": roc_auc(p_star[s], st), "auc_err": roc_auc_error(p_star[s], st),
            "star_completeness": float((st & ca).sum() / ns) if ns else float("nan"),
            "star_purity": float((st & ca).sum() / nc) if nc else float("nan"),
            "galaxy_completeness": float((~st & ~ca).sum() / ng) if ng else float("nan"),
        })  # fmt: skip
    return rows
