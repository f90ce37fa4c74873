"""One-to-one positional matching of two point sets within a radius (pure numpy/scipy)."""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

__all__ = ["MATCH_METHODS", "match_positions"]

#: Matching methods understood by :func:`match_positions`.
MATCH_METHODS = ("optimal", "greedy")


def match_positions(
    x1: np.ndarray,
    y1: np.ndarray,
    x2: np.ndarray,
    y2: np.ndarray,
    radius: float,
    *,
    method: str = "optimal",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Match two sets of positions one to one, within ``radius``.

    Candidate pairs are all ``(i, j)`` with distance ``≤ radius``. Each point
    of either set is used at most once.

    * ``"optimal"``: the candidate graph is split into connected components;
      in each, :func:`scipy.optimize.linear_sum_assignment` finds the matching
      with the **largest number of pairs** and, among those, the **smallest
      total distance**. Components of one candidate pair (the common case) are
      taken directly.
    * ``"greedy"``: candidate pairs are taken in order of increasing distance
      (ties broken by index ``i``, then ``j``), each kept when neither point is
      used yet. Fast and simple, but a point may steal the only partner of a
      neighbour, which ``"optimal"`` avoids.

    Points with a non-finite coordinate are never matched.

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
    p1 = _points(x1, y1, "first")
    p2 = _points(x2, y2, "second")
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    ok1 = np.flatnonzero(np.isfinite(p1).all(axis=1))
    ok2 = np.flatnonzero(np.isfinite(p2).all(axis=1))
    if len(ok1) == 0 or len(ok2) == 0:
        return empty
    cand = cKDTree(p1[ok1]).sparse_distance_matrix(cKDTree(p2[ok2]), radius, output_type="ndarray")
    if len(cand) == 0:
        return empty
    i = ok1[cand["i"].astype(np.int64)]
    j = ok2[cand["j"].astype(np.int64)]
    d = cand["v"].astype(np.float64)
    if method == "greedy":
        keep = _greedy(i, j, d)
    else:
        keep = _optimal(i, j, d, len(p1), len(p2), radius)
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
    order = np.lexsort((j, i, d))
    used1: set[int] = set()
    used2: set[int] = set()
    keep = []
    for k in order:
        a, b = int(i[k]), int(j[k])
        if a in used1 or b in used2:
            continue
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
