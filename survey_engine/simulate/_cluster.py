"""A King (1962) globular cluster of stars over the field, for crowded fields.

``simulate(cluster=KingCluster(...))``; the model and its numbers: ``docs/simulation.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..mosaic import _raise_if

__all__ = ["KingCluster"]

TURN_OFF = 4.0  #: Absolute r magnitude of the main-sequence turn-off.
TIP = -2.5  #: Absolute r magnitude of the tip of the giant branch (its bright end).
MS_SLOPE, GB_SLOPE = 0.10, 0.30  #: d log10 N / dM on the main sequence and the giant branch.
GB_STEP = 0.15  #: dN/dM of the giant branch just above the turn-off over the main sequence's.


def _number(value, name: str, *, positive: bool = False) -> float:
    """``value`` as a finite (positive) float, or a ``ValueError`` naming the parameter."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    what = "a finite positive number" if positive else "a finite number"
    _raise_if(not math.isfinite(v) or (positive and v <= 0),
              f"cluster {name} must be {what}, got {value!r}")  # fmt: skip
    return v


@dataclass(frozen=True)
class KingCluster:
    """A globular cluster: King-profile positions, a turn-off + giant-branch luminosity function.

    Attributes
    ----------
    n_stars : int
        Cluster stars inside the tidal radius with r brighter than the scene's ``max_mag``
        (those that fall outside the mosaic are then dropped).
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
        n = self.n_stars
        ok = isinstance(n, int | np.integer) and not isinstance(n, bool | np.bool_) and n >= 0
        _raise_if(not ok, f"cluster n_stars must be a non-negative integer, got {n!r}")
        rc = _number(self.core_radius, "core_radius", positive=True)
        rt = _number(self.tidal_radius, "tidal_radius", positive=True)
        _raise_if(rt <= rc, f"cluster tidal_radius must exceed core_radius ({rc:g}), got {rt:g}")
        center = self.center
        if center is not None:
            msg = f"cluster center must be an (x, y) pair of finite pixel positions, got {center!r}"
            _raise_if(isinstance(center, str) or np.size(center) != 2, msg)
            center = tuple(_number(v, "center") for v in center)
        for name, value in (("n_stars", int(n)), ("core_radius", rc), ("tidal_radius", rt),
                            ("center", center),
                            ("distance_modulus", _number(self.distance_modulus, "distance_modulus"))):  # fmt: skip
            object.__setattr__(self, name, value)

    def _cumulative(self, radius) -> np.ndarray:
        """King (1962) number of stars inside ``radius``, unnormalised (closed form)."""
        x = np.minimum((np.asarray(radius, float) / self.core_radius) ** 2, self._xt)
        c = 1.0 / math.sqrt(1.0 + self._xt)
        return np.log1p(x) - 4.0 * c * (np.sqrt(1.0 + x) - 1.0) + c * c * x

    @property
    def _xt(self) -> float:
        return (self.tidal_radius / self.core_radius) ** 2

    def fraction_within(self, radius) -> np.ndarray:
        """Fraction of the cluster stars inside a projected radius (pixels).

        Parameters
        ----------
        radius : array_like

        Returns
        -------
        numpy.ndarray
        """
        return self._cumulative(radius) / self._cumulative(self.tidal_radius)

    def surface_density(self, radius) -> np.ndarray:
        """Stars per square pixel at a projected radius (pixels), all magnitudes.

        Parameters
        ----------
        radius : array_like

        Returns
        -------
        numpy.ndarray
        """
        x = (np.asarray(radius, float) / self.core_radius) ** 2
        c = 1.0 / math.sqrt(1.0 + self._xt)
        shape = np.where(x < self._xt, (1.0 / np.sqrt(1.0 + x) - c) ** 2, 0.0)
        norm = math.pi * self.core_radius**2 * float(self._cumulative(self.tidal_radius))
        return self.n_stars * shape / norm

    def _segments(self, max_mag: float) -> list[tuple[float, float, float, float]]:
        """(number weight, slope, r0, r1) of the giant branch and the main sequence to max_mag."""
        mu, out = self.distance_modulus, []
        parts = ((GB_STEP, GB_SLOPE, TIP, TURN_OFF), (1.0, MS_SLOPE, TURN_OFF, math.inf))
        for amp, slope, m0, m1 in parts:  # dN/dM = amp 10^(slope (M - TURN_OFF))
            r0, r1, k = mu + m0, min(mu + m1, max_mag), slope * math.log(10.0)
            if r1 > r0:
                a, b = (math.exp(k * (m - mu - TURN_OFF)) for m in (r0, r1))
                w = amp / k * (b - a)
                out.append((w, slope, r0, r1))
        return out

    def fraction_brighter(self, mag, max_mag: float) -> np.ndarray:
        """Fraction of the cluster stars brighter than r = ``mag`` (stars to r = ``max_mag``).

        Parameters
        ----------
        mag : array_like
            r magnitude(s).
        max_mag : float
            Faint limit of the cluster population (the scene's ``max_mag``).

        Returns
        -------
        numpy.ndarray
        """
        mag = np.asarray(mag, float)
        segs = self._segments(max_mag)
        total, acc = sum(s[0] for s in segs), np.zeros(mag.shape)
        for w, slope, r0, r1 in segs:
            k = slope * math.log(10.0)
            t = np.clip(mag, r0, r1) - r0
            acc += w * np.expm1(k * t) / math.expm1(k * (r1 - r0))
        return acc / total

    def sample(self, props: np.random.Generator, pos: np.random.Generator, ny: int, nx: int,
               max_mag: float) -> dict[str, np.ndarray]:  # fmt: skip
        """Draw the stars: ``x``, ``y`` (inside the mosaic only), ``r`` and the ``colours``.

        Parameters
        ----------
        props, pos : numpy.random.Generator
            Streams of the magnitudes and colours, and of the positions.
        ny, nx : int
            Mosaic shape.
        max_mag : float
            Faint limit (r mag).

        Returns
        -------
        dict
            ``x``, ``y``, ``r`` arrays and ``colours`` (``ug``, ``gr``, ``ri``, ``iz``, ``zy``).
        """
        n, segs = self.n_stars, self._segments(max_mag)
        msg = f"cluster has no stars brighter than max_mag {max_mag} (its tip is at r = {self.distance_modulus + TIP:g})"  # fmt: skip
        _raise_if(n > 0 and not segs, msg)
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
        # Radii by bisection of the King cumulative number, uniform position angles.
        target = pos.random(n) * self._cumulative(self.tidal_radius)
        lo, hi = np.zeros(n), np.full(n, self.tidal_radius)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            below = self._cumulative(mid) < target
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        radius, angle = 0.5 * (lo + hi), pos.uniform(0.0, 2.0 * math.pi, n)
        cx, cy = self.center if self.center is not None else ((nx - 1) / 2.0, (ny - 1) / 2.0)
        x, y = cx + radius * np.cos(angle), cy + radius * np.sin(angle)
        inside = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
        return {"x": x[inside], "y": y[inside], "r": r[inside],
                "colours": {key: v[inside] for key, v in colours.items()}}  # fmt: skip
