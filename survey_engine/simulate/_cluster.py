"""A King (1962) globular cluster of stars over the field (crowded fields; ``docs/simulation.md``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..mosaic import _raise_if

__all__ = ["KingCluster"]

TURN_OFF, TIP = 4.0, -2.5  #: Absolute r of the main-sequence turn-off and of the giant-branch tip.
MS_SLOPE, GB_SLOPE = 0.10, 0.30  #: d log10 N / dM on the main sequence and the giant branch.
GB_STEP = 0.15  #: dN/dM of the giant branch just above the turn-off over the main sequence's.


def _number(value, name: str, positive: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    _raise_if(not math.isfinite(v) or (positive and v <= 0), f"cluster {name} must be a finite "
              f"{'positive ' if positive else ''}number, got {value!r}")  # fmt: skip
    return v


@dataclass(frozen=True)
class KingCluster:
    """A globular cluster: King-profile positions, a turn-off + giant-branch luminosity function.

    Attributes
    ----------
    n_stars : int
        Stars inside the tidal radius to the scene's ``max_mag`` (those off the mosaic are dropped).
    core_radius, tidal_radius : float
        King radii r_c < r_t, in pixels.
    center : (float, float) or None
        (x, y) of the centre in 0-based mosaic pixels; the mosaic centre when None.
    distance_modulus : float
        m - M: the turn-off (M_r = 4) is at r = ``distance_modulus + 4``.
    """

    n_stars: int
    core_radius: float = 30.0
    tidal_radius: float = 600.0
    center: tuple[float, float] | None = None
    distance_modulus: float = 18.0

    def __post_init__(self):
        n, center = self.n_stars, self.center
        ok = isinstance(n, int | np.integer) and not isinstance(n, bool | np.bool_) and n >= 0
        _raise_if(not ok, f"cluster n_stars must be a non-negative integer, got {n!r}")
        rc = _number(self.core_radius, "core_radius", True)
        rt = _number(self.tidal_radius, "tidal_radius", True)
        _raise_if(rt <= rc, f"cluster tidal_radius must exceed core_radius ({rc:g}), got {rt:g}")
        if center is not None:
            _raise_if(isinstance(center, str) or np.size(center) != 2, "cluster center must be an "
                      f"(x, y) pair of finite pixel positions, got {center!r}")  # fmt: skip
            center = tuple(_number(v, "center") for v in center)
        mu = _number(self.distance_modulus, "distance_modulus")
        for name, value in zip(("n_stars", "core_radius", "tidal_radius", "center",
                                "distance_modulus"), (int(n), rc, rt, center, mu), strict=True):  # fmt: skip
            object.__setattr__(self, name, value)

    def _cumulative(self, radius) -> np.ndarray:
        """King (1962) number inside ``radius``, unnormalised: ln(1+x) - 4c(√(1+x) - 1) + c²x."""
        xt = (self.tidal_radius / self.core_radius) ** 2
        x, c = np.minimum((np.asarray(radius, float) / self.core_radius) ** 2, xt), (1 + xt) ** -0.5
        return np.log1p(x) - 4.0 * c * (np.sqrt(1.0 + x) - 1.0) + c * c * x

    def fraction_within(self, radius) -> np.ndarray:
        """Fraction of the stars inside a projected radius (array_like, pixels)."""
        return self._cumulative(radius) / self._cumulative(self.tidal_radius)

    def surface_density(self, radius) -> np.ndarray:
        """Stars per px² (all magnitudes) at a projected radius (array_like, pixels)."""
        x, xt = (np.asarray(radius, float) / self.core_radius) ** 2, (self.tidal_radius / self.core_radius) ** 2  # fmt: skip
        shape = np.where(x < xt, ((1 + x) ** -0.5 - (1 + xt) ** -0.5) ** 2, 0.0)
        return self.n_stars * shape / (math.pi * self.core_radius**2 * self._cumulative(self.tidal_radius))  # fmt: skip

    def _segments(self, max_mag: float) -> list[tuple[float, float, float, float]]:
        """(number weight, slope, r0, r1) of the giant branch and the main sequence to max_mag."""
        mu, out = self.distance_modulus, []
        for amp, slope, m0, m1 in ((GB_STEP, GB_SLOPE, TIP, TURN_OFF), (1.0, MS_SLOPE, TURN_OFF, math.inf)):  # fmt: skip
            r0, r1, k = mu + m0, min(mu + m1, max_mag), slope * math.log(10.0)
            if r1 > r0:  # dN/dM = amp 10^(slope (M - TURN_OFF))
                a, b = (math.exp(k * (m - mu - TURN_OFF)) for m in (r0, r1))
                out.append((amp / k * (b - a), slope, r0, r1))
        return out

    def fraction_brighter(self, mag, max_mag: float) -> np.ndarray:
        """Fraction of the stars (to r = ``max_mag``) brighter than r = ``mag`` (array_like)."""
        mag, segs, acc = np.asarray(mag, float), self._segments(max_mag), 0.0
        for w, slope, r0, r1 in segs:
            k = slope * math.log(10.0)
            acc = acc + w * np.expm1(k * (np.clip(mag, r0, r1) - r0)) / math.expm1(k * (r1 - r0))
        return acc / sum(s[0] for s in segs)

    def sample(self, props, pos, ny: int, nx: int, max_mag: float) -> dict[str, np.ndarray]:
        """The stars on an ``ny`` × ``nx`` mosaic: ``x``, ``y``, ``r`` and ``colours``.

        ``props``, ``pos``: the numpy Generators of the magnitudes and colours, of the positions.
        """
        n, segs = self.n_stars, self._segments(max_mag)
        _raise_if(n > 0 and not segs, f"cluster has no stars brighter than max_mag {max_mag} "
                  f"(its tip is at r = {self.distance_modulus + TIP:g})")  # fmt: skip
        weights = np.array([s[0] for s in segs]) if segs else np.ones(1)
        which = np.searchsorted(np.cumsum(weights / weights.sum())[:-1], props.random(n), "right")
        q, r = props.random(n), np.zeros(n)
        for i, (_, slope, r0, r1) in enumerate(segs):  # inverse CDF of dN/dm ∝ 10^(slope m)
            k, sel = slope * math.log(10.0), which == i
            r[sel] = r0 + np.log1p(q[sel] * math.expm1(k * (r1 - r0))) / k
        m_abs, noise = r - self.distance_modulus, props.standard_normal((5, n))
        ms, gb = 0.25 + 0.16 * (m_abs - TURN_OFF), 0.45 + 0.09 * (3.5 - m_abs)
        gr = np.clip(np.where(m_abs >= TURN_OFF, ms, gb), 0.2, 1.5) + 0.02 * noise[0]
        ri = 0.38 * gr - 0.05 + 3.0 * np.maximum(gr - 1.2, 0.0) + 0.02 * noise[1]
        colours = {"ug": 0.5 + 1.4 * gr + 0.05 * noise[2], "gr": gr, "ri": ri,
                   "iz": 0.5 * ri + 0.02 * noise[3], "zy": 0.3 * ri + 0.02 * noise[4]}  # fmt: skip
        target = pos.random(n) * self._cumulative(self.tidal_radius)  # radii: bisection of N(<r)
        lo, hi = np.zeros(n), np.full(n, self.tidal_radius)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            below = self._cumulative(mid) < target
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        radius, angle = 0.5 * (lo + hi), pos.uniform(0.0, 2.0 * math.pi, n)
        cx, cy = self.center if self.center is not None else ((nx - 1) / 2.0, (ny - 1) / 2.0)
        x, y = cx + radius * np.cos(angle), cy + radius * np.sin(angle)
        keep = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
        return {"x": x[keep], "y": y[keep], "r": r[keep],
                "colours": {key: v[keep] for key, v in colours.items()}}  # fmt: skip
