"""The sky map of a survey: its tracts (one mosaic each), their projections and inner regions.

Geometry only: no Dask, and no I/O besides the sky map's own JSON file (``skymap.json`` in a
survey directory) and, in :meth:`SkyMap.from_mosaics`, the attributes of existing mosaics.
The rules (``docs/survey.md``):

* A :class:`Tract` is a pixel grid with its own WCS (usually a TAN projection at its own
  centre); its pixel area is ``-0.5 <= x < nx - 0.5``, ``-0.5 <= y < ny - 0.5`` (0-based pixel
  centres at integers).
* **Inner regions** (who owns a sky position): a tract with a ``box`` inner region (the ring
  sky maps of :meth:`SkyMap.rings`) owns the positions of its RA × Dec box; every other position
  belongs to the tract whose centre is nearest on the sphere among the tracts whose pixel area
  contains it (LSST's ``findTract`` rule), ties to the lower tract id. Each inner region is thus
  the tract's spherical Voronoi cell clipped to its pixels (or its box), and the inner regions
  partition the union of the tracts' pixels.
* **Global ids** (:func:`global_ids`, :data:`GLOBAL_ID_SCHEME`): a HEALPix nested index of
  order :data:`HEALPIX_ORDER` of the peak's sky position, shifted left by
  :data:`DISAMBIGUATOR_BITS` bits for the owning tract's colour (:attr:`SkyMap.colours`:
  overlapping tracts differ), so ids made tract by tract are unique survey-wide.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.wcs import WCS

from .mosaic import _cards_to_wcs, _raise_if, header_to_cards, open_mosaic

__all__ = [
    "DISAMBIGUATOR_BITS", "GLOBAL_ID_SCHEME", "HEALPIX_ORDER", "SKYMAP_FILE", "SkyMap", "Tract",
    "TractRule", "global_ids", "tan_wcs",
]  # fmt: skip

logger = logging.getLogger(__name__)

SKYMAP_FILE = "skymap.json"  #: Name of the sky-map file in a survey directory.
SKYMAP_FORMAT_VERSION = 1
HEALPIX_ORDER = 26  #: HEALPix order of the global ids (cells of ~3.1 mas, 56 bits).
DISAMBIGUATOR_BITS = 7  #: Low bits of a global id: the owning tract's colour (1..127).
MAX_ABS_DEC_RINGS = 85.0  #: :meth:`SkyMap.rings` refuses regions beyond this |dec| (no polar caps).

#: How :func:`global_ids` forms an id (to store in a survey catalog's metadata).
GLOBAL_ID_SCHEME = (
    f"(healpix_nested(order={HEALPIX_ORDER}, ra_peak, dec_peak) << {DISAMBIGUATOR_BITS}) | colour, "
    "where (ra_peak, dec_peak) is the sky position of the centre of the peak pixel in the owning "
    "tract and colour (1..127) is the owning tract's colour in the sky map (neighbouring tracts "
    "have different colours; never 0, so no id is 0)"
)


# --- small spherical helpers ---------------------------------------------------------------
def _xyz(ra, dec) -> np.ndarray:
    """Unit vectors ``(..., 3)`` of positions in degrees."""
    ra, dec = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    cd = np.cos(dec)
    return np.stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)], axis=-1)


def _separation_deg(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle distance in degrees (Vincenty's formula, exact at any distance)."""
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(v, float)) for v in (ra1, dec1, ra2, dec2))
    d = ra2 - ra1
    num = np.hypot(np.cos(dec2) * np.sin(d),
                   np.cos(dec1) * np.sin(dec2) - np.sin(dec1) * np.cos(dec2) * np.cos(d))  # fmt: skip
    den = np.sin(dec1) * np.sin(dec2) + np.cos(dec1) * np.cos(dec2) * np.cos(d)
    return np.degrees(np.arctan2(num, den))


def _gnomonic(ra, dec, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Tangent-plane coordinates (degrees, x towards east = increasing RA) about (ra0, dec0)."""
    ra, dec = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    a0, d0 = math.radians(ra0), math.radians(dec0)
    cos_c = np.sin(d0) * np.sin(dec) + np.cos(d0) * np.cos(dec) * np.cos(ra - a0)
    x = np.cos(dec) * np.sin(ra - a0) / cos_c
    y = (np.cos(d0) * np.sin(dec) - np.sin(d0) * np.cos(dec) * np.cos(ra - a0)) / cos_c
    return np.degrees(x), np.degrees(y)


def tan_wcs(center: tuple[float, float], shape: tuple[int, int], pixel_scale: float) -> WCS:
    """A north-up, east-left TAN WCS whose tangent point is the centre of the pixel grid.

    Parameters
    ----------
    center : (float, float)
        (ra, dec) of the tangent point in degrees.
    shape : (int, int)
        (ny, nx) of the pixel grid.
    pixel_scale : float
        Arcsec per pixel.

    Returns
    -------
    astropy.wcs.WCS
    """
    ny, nx = (int(v) for v in shape)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(center[0]) % 360.0, float(center[1])]
    w.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]  # FITS pixels are 1-based
    scale = float(pixel_scale) / 3600.0
    w.wcs.cd = [[-scale, 0.0], [0.0, scale]]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.radesys = "ICRS"
    w.pixel_shape = (nx, ny)
    return w


# --- tracts --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tract:
    """One tract of a sky map: a pixel grid with its own WCS.

    Attributes
    ----------
    id : int
        Tract id (non-negative, unique in its sky map).
    ra, dec : float
        Centre in degrees: the sky position of the grid's central point, pixel
        ``((nx - 1) / 2, (ny - 1) / 2)``.
    shape : (int, int)
        (ny, nx) in pixels.
    wcs_cards : dict
        FITS WCS cards (as stored in a mosaic's ``wcs`` attribute).
    inner : dict or None
        The inner region when it is not the nearest-centre rule: ``{"kind": "box",
        "ra": [ra_start, ra_width], "dec": [dec_min, dec_max]}`` (degrees; RA from
        ``ra_start`` eastwards through ``ra_width``, wrapping at 360).
    mosaic : str or None
        Path of the tract's mosaic (relative to the sky-map file once written).
    """

    id: int
    ra: float
    dec: float
    shape: tuple[int, int]
    wcs_cards: dict[str, Any] = field(repr=False)
    inner: dict[str, Any] | None = None
    mosaic: str | None = None

    def __post_init__(self):
        _raise_if(not isinstance(self.id, int | np.integer) or self.id < 0,
                  f"tract id must be a non-negative integer, got {self.id!r}")  # fmt: skip
        ny, nx = self.shape
        _raise_if(ny <= 0 or nx <= 0, f"tract {self.id}: shape must be positive, got {self.shape}")
        if self.inner is not None:
            _raise_if(self.inner.get("kind") != "box",
                      f"tract {self.id}: unknown inner region {self.inner!r}")  # fmt: skip

    @classmethod
    def from_wcs(cls, tract_id: int, wcs: WCS | Mapping[str, Any], shape: tuple[int, int], *,
                 inner: Mapping[str, Any] | None = None, mosaic: str | None = None) -> Tract:  # fmt: skip
        """A tract of a WCS and pixel shape; the centre is the sky position of the central pixel.

        Parameters
        ----------
        tract_id : int
        wcs : astropy.wcs.WCS or mapping of FITS cards
        shape : (int, int)
            (ny, nx).
        inner : mapping, optional
            See the class attributes.
        mosaic : str, optional

        Returns
        -------
        Tract
        """
        ny, nx = (int(v) for v in shape)
        cards = header_to_cards(wcs)
        cards.update(NAXIS=2, NAXIS1=nx, NAXIS2=ny)
        w = _cards_to_wcs(cards)
        ra, dec = w.all_pix2world((nx - 1) / 2.0, (ny - 1) / 2.0, 0)
        return cls(int(tract_id), float(ra) % 360.0, float(dec), (ny, nx), cards,
                   None if inner is None else dict(inner), mosaic)  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        # A snapshot: another thread may fill a cached property while this is pickled (the
        # driver pickles a survey's shared sky map while tracts run); dict() is atomic.
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @functools.cached_property
    def wcs(self) -> WCS:
        """The tract's astropy WCS."""
        return _cards_to_wcs(self.wcs_cards)

    @functools.cached_property
    def radius_deg(self) -> float:
        """Largest distance from the centre to the pixel area's boundary (degrees)."""
        ny, nx = self.shape
        tx, ty = np.linspace(-0.5, nx - 0.5, 33), np.linspace(-0.5, ny - 0.5, 33)
        xs = np.concatenate([tx, tx, np.full(33, -0.5), np.full(33, nx - 0.5)])
        ys = np.concatenate([np.full(33, -0.5), np.full(33, ny - 0.5), ty, ty])
        ra, dec = self.wcs.all_pix2world(xs, ys, 0)
        return float(np.max(_separation_deg(self.ra, self.dec, ra, dec)))

    @property
    def pixel_scale(self) -> float:
        """Mean pixel scale (arcsec)."""
        from astropy.wcs.utils import proj_plane_pixel_scales

        return float(np.mean(proj_plane_pixel_scales(self.wcs.celestial)) * 3600)

    def sky_to_pixel(self, ra, dec) -> tuple[np.ndarray, np.ndarray]:
        """0-based pixel coordinates (x, y) of sky positions; NaN beyond 90° of the centre.

        Parameters
        ----------
        ra, dec : array_like
            Degrees.

        Returns
        -------
        x, y : numpy.ndarray
        """
        ra, dec = np.broadcast_arrays(np.asarray(ra, float), np.asarray(dec, float))
        x, y = np.full(ra.shape, np.nan), np.full(ra.shape, np.nan)
        near = _separation_deg(self.ra, self.dec, ra, dec) < 89.0
        if near.any():
            px, py = self.wcs.all_world2pix(ra[near], dec[near], 0)
            x[near], y[near] = px, py
        return x, y

    def pixel_to_sky(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """(ra, dec) in degrees of 0-based pixel coordinates.

        Parameters
        ----------
        x, y : array_like

        Returns
        -------
        ra, dec : numpy.ndarray
        """
        ra, dec = self.wcs.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
        return np.asarray(ra) % 360.0, np.asarray(dec)

    def contains(self, ra, dec) -> np.ndarray:
        """Whether sky positions lie in the tract's pixel area.

        Parameters
        ----------
        ra, dec : array_like
            Degrees.

        Returns
        -------
        numpy.ndarray of bool
        """
        ra, dec = np.broadcast_arrays(np.asarray(ra, float), np.asarray(dec, float))
        out = np.zeros(ra.shape, bool)
        near = _separation_deg(self.ra, self.dec, ra, dec) <= self.radius_deg * 1.01 + 1e-6
        if near.any():
            x, y = self.wcs.all_world2pix(ra[near], dec[near], 0)
            ny, nx = self.shape
            out[near] = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
        return out

    def in_box(self, ra, dec) -> np.ndarray:
        """Whether positions lie in the tract's ``box`` inner region (all False without one)."""
        ra, dec = np.broadcast_arrays(np.asarray(ra, float), np.asarray(dec, float))
        if self.inner is None:
            return np.zeros(ra.shape, bool)
        ra0, width = self.inner["ra"]
        d0, d1 = self.inner["dec"]
        return ((ra - ra0) % 360.0 < width) & (dec >= d0) & (dec < d1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (see :meth:`SkyMap.to_json`)."""
        out = {"id": int(self.id), "ra": self.ra, "dec": self.dec, "shape": list(self.shape),
               "wcs": dict(self.wcs_cards)}  # fmt: skip
        if self.inner is not None:
            out["inner"] = dict(self.inner)
        if self.mosaic is not None:
            out["mosaic"] = self.mosaic
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Tract:
        """The tract of :meth:`to_dict`."""
        return cls(int(d["id"]), float(d["ra"]), float(d["dec"]), tuple(int(v) for v in d["shape"]),
                   dict(d["wcs"]), d.get("inner"), d.get("mosaic"))  # fmt: skip


# --- the sky map ---------------------------------------------------------------------------
class SkyMap:
    """The tracts of a survey and the rule of which tract owns each sky position.

    Parameters
    ----------
    tracts : iterable of Tract
        Unique ids; kept sorted by id.
    meta : mapping, optional
        How the sky map was made (stored in its JSON file).
    """

    def __init__(self, tracts: Iterable[Tract], *, meta: Mapping[str, Any] | None = None):
        self.tracts: tuple[Tract, ...] = tuple(sorted(tracts, key=lambda t: t.id))
        ids = [t.id for t in self.tracts]
        _raise_if(not ids, "a sky map needs at least one tract")
        dup = [i for i, n in collections.Counter(ids).items() if n > 1]
        _raise_if(bool(dup), f"tract ids must be unique, got {dup} more than once")
        self._by_id = {t.id: t for t in self.tracts}
        self.meta: dict[str, Any] = dict(meta or {})

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)  # a snapshot, as Tract.__getstate__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # --- access ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tracts)

    def __iter__(self) -> Iterator[Tract]:
        return iter(self.tracts)

    def __getitem__(self, tract_id: int) -> Tract:
        try:
            return self._by_id[int(tract_id)]
        except KeyError:
            listed = ", ".join(map(str, self.ids[:10])) + (", …" if len(self) > 10 else "")
            msg = f"no tract {tract_id} in the sky map (tracts {listed})"
            raise KeyError(msg) from None

    def __repr__(self) -> str:
        return f"<SkyMap {len(self)} tracts {self.ids[:8]}{'…' if len(self) > 8 else ''}>"

    @property
    def ids(self) -> list[int]:
        """Tract ids in increasing order."""
        return [t.id for t in self.tracts]

    # --- ownership ------------------------------------------------------------------------
    def containing(self, ra, dec) -> np.ndarray:
        """Which tracts' pixel areas contain each position.

        Parameters
        ----------
        ra, dec : array_like
            Degrees.

        Returns
        -------
        numpy.ndarray of bool
            ``(n_tracts, *shape)``, rows in the order of :attr:`ids`.
        """
        return np.stack([t.contains(ra, dec) for t in self.tracts])

    def find_tract(self, ra, dec) -> np.ndarray:
        """The tract that owns each sky position (its inner region holds it), −1 outside all.

        A position in a tract's ``box`` inner region (and its pixels) is that tract's; any
        other position belongs to the tract whose centre is nearest on the sphere among those
        whose pixel area contains it (ties to the lower id).

        Parameters
        ----------
        ra, dec : array_like
            Degrees (any RA, wrapped at 360).

        Returns
        -------
        numpy.ndarray of int64
            Tract id per position (the broadcast shape of ``ra``, ``dec``).
        """
        ra, dec = np.broadcast_arrays(np.asarray(ra, float), np.asarray(dec, float))
        shape = ra.shape
        ra, dec = ra.ravel(), dec.ravel()
        out = np.full(ra.size, -1, np.int64)
        best = np.full(ra.size, -np.inf)  # cosine of the distance to the best centre so far
        boxed = np.zeros(ra.size, bool)
        for t, idx in self._candidates(ra, dec):
            r, d = ra[idx], dec[idx]
            inside = t.contains(r, d)
            if t.inner is not None:
                mine = inside & ~boxed[idx] & t.in_box(r, d)
                out[idx[mine]], boxed[idx[mine]] = t.id, True
            cos_d = _xyz(r, d) @ _xyz(t.ra, t.dec)
            better = inside & ~boxed[idx] & (cos_d > best[idx])
            out[idx[better]], best[idx[better]] = t.id, cos_d[better]
        return out.reshape(shape)

    def _candidates(self, ra: np.ndarray, dec: np.ndarray) -> Iterator[tuple[Tract, np.ndarray]]:
        """``(tract, indices of the positions near it)`` for the tracts in id order.

        Near: within 1.01 × the tract's radius of its centre, found with a k-d tree of the
        positions' unit vectors, so a lookup costs little per tract of a large sky map.
        """
        from scipy.spatial import cKDTree

        if ra.size == 0:
            return
        tree = cKDTree(_xyz(ra, dec))
        for t in self.tracts:
            chord = 2 * math.sin(math.radians(min(180.0, t.radius_deg * 1.01 + 1e-6)) / 2)
            idx = np.asarray(tree.query_ball_point(_xyz(t.ra, t.dec), chord), dtype=np.intp)
            if idx.size:
                yield t, np.sort(idx)

    def neighbours(self, tract_id: int) -> list[int]:
        """Ids of the tracts whose pixel areas may overlap tract ``tract_id``'s (itself excluded).

        Parameters
        ----------
        tract_id : int

        Returns
        -------
        list of int
            Tracts whose centres are closer than the sum of the two radii (a superset of the
            overlapping ones).
        """
        t = self[tract_id]
        ra, dec, radius = self._centres
        near = _separation_deg(t.ra, t.dec, ra, dec) <= 1.01 * (t.radius_deg + radius) + 1e-6
        return [u.id for u, n in zip(self.tracts, near, strict=True) if n and u.id != t.id]

    @functools.cached_property
    def _centres(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ra, dec, radius) of the tracts, in id order."""
        return tuple(
            np.array([getattr(t, k) for t in self.tracts]) for k in ("ra", "dec", "radius_deg")
        )

    def peak_ids(self, tract, y_peak, x_peak) -> np.ndarray:
        """Global ids (:func:`global_ids`) of peaks given as pixels of their owning tracts.

        Parameters
        ----------
        tract, y_peak, x_peak : array_like of int
            Owning tract and peak pixel in it.

        Returns
        -------
        numpy.ndarray of int64
        """
        tract, y_peak, x_peak = (
            np.atleast_1d(np.asarray(v, np.int64)) for v in (tract, y_peak, x_peak)
        )
        ra, dec = np.zeros(tract.size), np.zeros(tract.size)
        colour = np.zeros(tract.size, np.int64)
        for k in np.unique(tract):
            sel = tract == k
            ra[sel], dec[sel] = self[int(k)].pixel_to_sky(x_peak[sel], y_peak[sel])
            colour[sel] = self.colours[int(k)]
        return global_ids(ra, dec, colour)

    @functools.cached_property
    def colours(self) -> dict[int, int]:
        """Tract id → colour (1..127) for the global ids: tracts that may overlap differ.

        A greedy colouring of the :meth:`neighbours` graph in tract-id order (each tract
        takes the smallest colour none of its lower-id neighbours has): a few colours for
        any tiling of the sky by tracts, fixed by the sky map alone.

        Raises
        ------
        ValueError
            More than 127 colours would be needed (a tract overlapping > 126 others).
        """
        out: dict[int, int] = {}
        for t in self.tracts:
            used = {out[k] for k in self.neighbours(t.id) if k in out}
            c = next(c for c in range(1, len(used) + 2) if c not in used)
            _raise_if(c >= 1 << DISAMBIGUATOR_BITS,
                      f"tract {t.id} overlaps too many tracts to give global ids distinct "
                      f"colours (at most {(1 << DISAMBIGUATOR_BITS) - 1})")  # fmt: skip
            out[t.id] = c
        return out

    def is_inner(self, tract_id: int, ra, dec) -> np.ndarray:
        """Whether positions lie in the inner region of tract ``tract_id``.

        Parameters
        ----------
        tract_id : int
        ra, dec : array_like
            Degrees.

        Returns
        -------
        numpy.ndarray of bool
        """
        self[tract_id]  # an unknown id raises
        return self.find_tract(ra, dec) == int(tract_id)

    def overlap_margins(self, max_pixels: float) -> dict[tuple[int, int], float]:
        """Where tracts own sky closer than ``max_pixels`` to an edge shared with a neighbour.

        For each tract, points of the strip of width ``max_pixels`` along each pixel edge are
        sampled (depths to within 0.25 px of ``max_pixels``, every ``min(n / 256,
        max_pixels / 2)`` px along the edge); a point the tract owns (:meth:`find_tract`) while
        the sky just across that edge lies in another tract's pixels means that an object of
        radius ``max_pixels`` owned there would be cut by the tract's edge. Edges of the survey
        (no tract across) do not count, nor, for a tract with a box inner region, the sky
        outside its box (beyond the region of a ring sky map).

        Parameters
        ----------
        max_pixels : float
            Width of the strips searched (pixels of each tract).

        Returns
        -------
        dict
            ``{(tract, neighbour across the edge): smallest depth found (pixels)}``, only the
            pairs with owned sky in the strip; empty when every margin is ≥ ``max_pixels``.
        """
        m = float(max_pixels)
        _raise_if(not math.isfinite(m) or m <= 0,
                  f"min_pixels must be a finite positive number, got {max_pixels!r}")  # fmt: skip
        depths = np.linspace(min(0.25, m / 2), max(m - 0.25, m / 2), max(2, min(8, int(m))))
        found: dict[tuple[int, int], float] = {}
        for t in self.tracts:
            near = self.neighbours(t.id)
            if not near:
                continue  # no neighbour: nothing to check
            local = SkyMap([t, *(self[k] for k in near)])
            p_in, p_out, depth = _edge_strips(t.shape, depths, m)
            ra_i, dec_i = t.pixel_to_sky(*p_in)
            ra_o, dec_o = t.pixel_to_sky(*p_out)
            nb = local.find_tract(ra_o, dec_o)
            bad = (nb >= 0) & (local.find_tract(ra_i, dec_i) == t.id)
            if t.inner is not None:  # sky beyond every box is outside the survey's region
                bad &= t.in_box(ra_i, dec_i)
            for k in np.unique(nb[bad]):
                found[(t.id, int(k))] = float(depth[bad & (nb == k)].min())
        return found

    def check_overlap(self, min_pixels: float) -> None:
        """Check that every tract holds what it owns with ``min_pixels`` of its own pixels around.

        An object of radius < ``min_pixels`` whose peak a tract owns is then whole in that
        tract's pixels wherever the sky continues in a neighbour (:meth:`overlap_margins`).
        With inner boundaries in the middle of the overlaps (pixel-aligned cuts,
        :meth:`grid`) this holds for ``min_pixels`` up to half the overlap: the overlap must
        be at least twice the engine's tile halo.

        Parameters
        ----------
        min_pixels : float
            Margin in pixels of each tract (e.g. the halo).

        Raises
        ------
        ValueError
            Naming the tract pair with the smallest margin, and that margin.
        """
        found = self.overlap_margins(min_pixels)
        if found:
            (a, b), depth = min(found.items(), key=lambda kv: (kv[1], kv[0]))
            msg = (f"tracts {a} and {b} overlap too little: tract {a} owns sky {depth:.2f} px "
                   f"inside its edge where tract {b}'s pixels continue, less than the "
                   f"min_pixels={float(min_pixels):g} required ({len(found)} tract pair(s) "
                   "fail); make the overlap at least twice the halo")  # fmt: skip
            raise ValueError(msg)

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_mosaics(cls, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> SkyMap:
        """The sky map of existing tract mosaics (one tract per mosaic, nearest-centre rule).

        Parameters
        ----------
        paths : path or sequence of paths
            The mosaics, or a directory whose ``*.zarr`` entries are the mosaics.

        Returns
        -------
        SkyMap
            Tract ids from the mosaics' ``tract`` attribute (``{"id": …}``) when every mosaic
            has one, else 0, 1, … in sorted path order; the centre of a tract is the sky
            position of its mosaic's central pixel.
        """
        if isinstance(paths, str | os.PathLike):
            root = os.fspath(paths)
            _raise_if(not os.path.isdir(root), f"{root} is not a directory of tract mosaics")
            paths = sorted(os.path.join(root, p) for p in os.listdir(root) if p.endswith(".zarr"))
            _raise_if(not paths, f"no *.zarr mosaics in {root}")
        paths = sorted(os.fspath(p) for p in paths)
        _raise_if(not paths, "from_mosaics needs at least one mosaic")
        mosaics = [open_mosaic(p) for p in paths]
        tags = [m.attrs.get("tract") for m in mosaics]
        tagged = all(isinstance(tag, Mapping) and "id" in tag for tag in tags)
        tracts = []
        for k, (p, m) in enumerate(zip(paths, mosaics, strict=True)):
            tid = int(tags[k]["id"]) if tagged else k
            tracts.append(Tract.from_wcs(tid, m.wcs_cards, (m.ny, m.nx), mosaic=p))
        logger.info("sky map of %d tract mosaics (ids %s)", len(tracts),
                    "from their attributes" if tagged else "in path order")  # fmt: skip
        return cls(tracts, meta={"generator": "from_mosaics"})

    @classmethod
    def grid(cls, center: tuple[float, float], n_tracts: tuple[int, int], *,
             tract_shape: int | tuple[int, int], overlap: int, pixel_scale: float = 0.2) -> SkyMap:  # fmt: skip
        """A small ``ny × nx`` grid of overlapping tracts, each a TAN projection at its own centre.

        The tract centres are laid out on the tangent plane at ``center`` (north up) with a
        spacing of ``tract_shape - overlap`` pixels, so neighbours share ``overlap`` pixels along
        the grid lines; the inner regions (nearest centre) meet near the middle of the overlaps.
        Suited to fields of a few degrees at most, away from the poles.

        Parameters
        ----------
        center : (float, float)
            (ra, dec) of the grid centre, degrees.
        n_tracts : (int, int)
            Tracts along dec (rows) and RA (columns); tract id = ``row * nx + column``.
        tract_shape : int or (int, int)
            Pixels per tract side, or (ny, nx).
        overlap : int
            Pixels shared by neighbouring tracts.
        pixel_scale : float
            Arcsec per pixel.

        Returns
        -------
        SkyMap
        """
        nty, ntx = (int(v) for v in n_tracts)
        _raise_if(nty < 1 or ntx < 1, f"n_tracts must be positive, got {n_tracts!r}")
        ty, tx = (
            (tract_shape, tract_shape) if isinstance(tract_shape, int | np.integer) else tract_shape
        )
        ty, tx, overlap = int(ty), int(tx), int(overlap)
        _raise_if(overlap < 0, f"overlap must be non-negative, got {overlap}")
        _raise_if(min(ty, tx) <= overlap,
                  f"tract_shape {tract_shape!r} must exceed the overlap ({overlap} px)")  # fmt: skip
        _raise_if(not pixel_scale > 0, f"pixel_scale must be positive, got {pixel_scale!r}")
        _raise_if(abs(center[1]) > MAX_ABS_DEC_RINGS, f"grid centre dec must be within ±{MAX_ABS_DEC_RINGS}, got {center[1]!r}")  # fmt: skip
        frame = tan_wcs(center, (1, 1), pixel_scale)
        tracts = []
        for iy in range(nty):
            for ix in range(ntx):
                x = (ix - (ntx - 1) / 2) * (tx - overlap)
                y = (iy - (nty - 1) / 2) * (ty - overlap)
                ra, dec = frame.all_pix2world(x, y, 0)
                w = tan_wcs((float(ra), float(dec)), (ty, tx), pixel_scale)
                tracts.append(Tract.from_wcs(iy * ntx + ix, w, (ty, tx)))
        meta = {"generator": "grid", "center": [float(center[0]), float(center[1])],
                "n_tracts": [nty, ntx], "tract_shape": [ty, tx], "overlap_px": overlap,
                "pixel_scale_arcsec": float(pixel_scale)}  # fmt: skip
        return cls(tracts, meta=meta)

    @classmethod
    def rings(cls, ra_range: tuple[float, float], dec_range: tuple[float, float], *,
              tract_size_deg: float, overlap_deg: float, pixel_scale: float = 0.2) -> SkyMap:  # fmt: skip
        """LSST-style rings of tracts covering an RA × Dec region.

        The region is cut into ``ceil(Δdec / tract_size_deg)`` dec rings of equal height; each
        ring into as few equal RA slices as keep a slice at most ``tract_size_deg`` wide at the
        ring's latitude nearest the equator (where slices are widest). Each slice is a tract's
        ``box`` inner region; the tract is a TAN projection at the box centre whose pixels cover
        the box plus a border of at least ``overlap_deg / 2`` on every side (on the sky), so
        neighbouring tracts share at least ``overlap_deg`` across every inner boundary; the
        pixel shapes differ from ring to ring.

        Parameters
        ----------
        ra_range : (float, float)
            (start, stop) in degrees, eastwards from start; ``start > stop`` wraps through 0,
            (0, 360) is the full circle.
        dec_range : (float, float)
            (min, max) in degrees, within ±:data:`MAX_ABS_DEC_RINGS` (polar caps are not made).
        tract_size_deg : float
            Largest side of an inner region (degrees).
        overlap_deg : float
            Sky shared by neighbours across an inner boundary (degrees, ≥ 0).
        pixel_scale : float
            Arcsec per pixel.

        Returns
        -------
        SkyMap
            Tract ids 0, 1, … ring by ring from the south, eastwards in each ring.
        """
        size, overlap, scale = float(tract_size_deg), float(overlap_deg), float(pixel_scale)
        _raise_if(not (math.isfinite(size) and 0 < size <= 30),
                  f"tract_size_deg must be in (0, 30], got {tract_size_deg!r}")  # fmt: skip
        _raise_if(not (math.isfinite(overlap) and 0 <= overlap < size),
                  f"overlap_deg must be in [0, tract_size_deg), got {overlap_deg!r}")  # fmt: skip
        _raise_if(not (math.isfinite(scale) and scale > 0),
                  f"pixel_scale must be a positive number of arcsec, got {pixel_scale!r}")  # fmt: skip
        d0, d1 = (float(v) for v in dec_range)
        _raise_if(not -MAX_ABS_DEC_RINGS <= d0 < d1 <= MAX_ABS_DEC_RINGS,
                  f"dec_range must satisfy -{MAX_ABS_DEC_RINGS} <= min < max <= {MAX_ABS_DEC_RINGS} "
                  f"(no polar caps), got {dec_range!r}")  # fmt: skip
        a0, a1 = (float(v) for v in ra_range)
        _raise_if(
            not (math.isfinite(a0) and math.isfinite(a1)),
            f"ra_range must be finite, got {ra_range!r}",
        )
        width = 360.0 if (a1 - a0) >= 360.0 else (a1 - a0) % 360.0
        _raise_if(width <= 0, f"ra_range is empty: {ra_range!r}")
        a0 %= 360.0
        n_rings = max(1, math.ceil((d1 - d0) / size - 1e-9))
        h = (d1 - d0) / n_rings
        tracts: list[Tract] = []
        for j in range(n_rings):
            lo, hi = d0 + j * h, d0 + (j + 1) * h
            nearest_eq = 0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))
            n_ra = max(1, math.ceil(width * math.cos(math.radians(nearest_eq)) / size - 1e-9))
            w = width / n_ra
            for k in range(n_ra):
                start = (a0 + k * w) % 360.0
                box = {"kind": "box", "ra": [start, w], "dec": [lo, hi]}
                tracts.append(_ring_tract(len(tracts), box, overlap, scale))
        meta = {"generator": "rings", "ra_range": [a0, (a0 + width) % 360.0 or 360.0],
                "dec_range": [d0, d1], "tract_size_deg": size, "overlap_deg": overlap,
                "pixel_scale_arcsec": scale, "n_rings": n_rings}  # fmt: skip
        logger.info("ring sky map: %d rings, %d tracts", n_rings, len(tracts))
        return cls(tracts, meta=meta)

    # --- the JSON file --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description: format, meta and the tracts."""
        return {"survey_engine": {"kind": "skymap", "format_version": SKYMAP_FORMAT_VERSION},
                "meta": self.meta, "tracts": [t.to_dict() for t in self.tracts]}  # fmt: skip

    def to_json(self, path: str | os.PathLike) -> str:
        """Write the sky map as JSON (``path`` or, for a directory, ``path/skymap.json``).

        Mosaic paths inside the file's directory are written relative to it.

        Parameters
        ----------
        path : str or path-like

        Returns
        -------
        str
            The file written.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, SKYMAP_FILE)
        root = os.path.dirname(os.path.abspath(path))
        d = self.to_dict()
        for t in d["tracts"]:
            if t.get("mosaic"):
                rel = os.path.relpath(os.path.abspath(t["mosaic"]), root)
                t["mosaic"] = os.path.abspath(t["mosaic"]) if rel.startswith("..") else rel
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(d, f, indent=1)
        os.replace(tmp, path)
        return path

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> SkyMap:
        """Read a sky map written by :meth:`to_json` (a file, or a directory holding one).

        Relative mosaic paths are resolved against the file's directory.

        Parameters
        ----------
        path : str or path-like

        Returns
        -------
        SkyMap
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, SKYMAP_FILE)
        if not os.path.isfile(path):
            msg = f"sky map not found: {path}"
            raise FileNotFoundError(msg)
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError) as err:
            msg = f"{path} is not a readable sky-map JSON file: {err}"
            raise ValueError(msg) from err
        fmt = d.get("survey_engine", {}) if isinstance(d, dict) else {}
        _raise_if(fmt.get("kind") != "skymap", f"{path} is not a survey_engine sky map")
        root = os.path.dirname(os.path.abspath(path))
        tracts = []
        for t in d["tracts"]:
            t = dict(t)
            if t.get("mosaic") and not os.path.isabs(t["mosaic"]):
                t["mosaic"] = os.path.join(root, t["mosaic"])
            tracts.append(Tract.from_dict(t))
        return cls(tracts, meta=d.get("meta"))


def _edge_strips(shape: tuple[int, int], depths: np.ndarray, m: float):
    """Sample points of the four edge strips of a pixel grid.

    Returns ``((x, y) inside, (x, y) half a pixel outside the same edge, depth inside)``.
    """
    ny, nx = shape
    xs_in, ys_in, xs_out, ys_out, ds = [], [], [], [], []
    for axis, n_along, n_across in ((0, ny, nx), (1, nx, ny)):
        along = np.arange(0.0, n_along, max(1.0, min(n_along / 256, m / 2)))
        d = depths[depths < n_across]
        a, dd = (v.ravel() for v in np.meshgrid(along, d, indexing="ij"))
        for edge, sign in ((-0.5, 1.0), (n_across - 0.5, -1.0)):
            inner, outer = edge + sign * dd, np.full(dd.shape, edge - sign * 0.5)
            if axis == 0:  # the edges x = const; ``along`` runs over y
                xs_in.append(inner), ys_in.append(a), xs_out.append(outer), ys_out.append(a)
            else:
                xs_in.append(a), ys_in.append(inner), xs_out.append(a), ys_out.append(outer)
            ds.append(dd)
    cat = np.concatenate
    return (cat(xs_in), cat(ys_in)), (cat(xs_out), cat(ys_out)), cat(ds)


def _ring_tract(tract_id: int, box: dict[str, Any], overlap: float, scale: float) -> Tract:
    """The tract of a ring sky map's box: TAN at the box centre, box + overlap / 2 of border."""
    start, w = box["ra"]
    lo, hi = box["dec"]
    ra_c, dec_c = (start + w / 2) % 360.0, (lo + hi) / 2
    t = np.linspace(0.0, 1.0, 129)
    ra = np.concatenate(
        [start + w * t, start + w * t, np.full(129, start), np.full(129, start + w)]
    )
    dec = np.concatenate(
        [np.full(129, lo), np.full(129, hi), lo + (hi - lo) * t, lo + (hi - lo) * t]
    )
    x, y = _gnomonic(ra, dec, ra_c, dec_c)
    hx, hy = float(np.max(np.abs(x))), float(np.max(np.abs(y)))
    # A gnomonic plane stretches the sky by ≥ 1 (sec² radially): pad the border by the worst
    # stretch at the tract's corner so the border is ≥ overlap / 2 on the sky, plus one pixel.
    border = overlap / 2
    r = math.radians(math.hypot(hx + border, hy + border))
    pad = border * (1 + r * r) * 1.001 + scale / 3600.0
    nx = math.ceil(2 * (hx + pad) * 3600.0 / scale)
    ny = math.ceil(2 * (hy + pad) * 3600.0 / scale)
    return Tract.from_wcs(tract_id, tan_wcs((ra_c, dec_c), (ny, nx), scale), (ny, nx), inner=box)


# --- one tract's objects in a survey run -------------------------------------------------
@dataclass(frozen=True)
class TractRule:
    """Which objects found in one tract's mosaic it owns, and their global ids.

    Small and picklable (sent with every task of the tract's run). Peaks are integer pixels
    of the tract mosaic; their sky position is that of the pixel centre through the tract's
    WCS (:meth:`Tract.pixel_to_sky`).

    Attributes
    ----------
    skymap : SkyMap
        The survey's sky map (every tract: ownership depends on the neighbours).
    tract_id : int
        The tract whose mosaic is processed.
    """

    skymap: SkyMap
    tract_id: int

    def _sky(self, y_peak, x_peak) -> tuple[np.ndarray, np.ndarray]:
        return self.skymap[self.tract_id].pixel_to_sky(np.asarray(x_peak), np.asarray(y_peak))

    def inner(self, y_peak, x_peak) -> np.ndarray:
        """Whether the tract's inner region holds each peak pixel's centre (bool array)."""
        y_peak, x_peak = np.atleast_1d(y_peak), np.atleast_1d(x_peak)
        if y_peak.size == 0:
            return np.zeros(0, bool)
        return self.skymap.find_tract(*self._sky(y_peak, x_peak)) == self.tract_id

    def ids(self, y_peak, x_peak) -> np.ndarray:
        """Global ids (:func:`global_ids`) of peaks owned by this tract (int64 array).

        Each id depends on its object alone (and the sky map's tract colours), so the ids of
        any subset of the tract's objects are those of the whole.
        """
        y_peak, x_peak = np.atleast_1d(y_peak), np.atleast_1d(x_peak)
        ra, dec = self._sky(y_peak, x_peak)
        return global_ids(ra, dec, self.skymap.colours[self.tract_id])


# --- global ids ----------------------------------------------------------------------------
def global_ids(ra, dec, colour) -> np.ndarray:
    """Survey-wide object ids from the peaks' sky positions (:data:`GLOBAL_ID_SCHEME`).

    ``id = (healpix_nested(order 26, ra, dec) << 7) | colour``: the HEALPix index (56 bits,
    cells of ~3.1 mas) of the sky position of the peak pixel's centre, and the colour (1..127)
    of the owning tract (:meth:`SkyMap.colours`). The id is positive and fits in int64 (63
    bits). It depends on nothing but the object and the sky map: not on the tiling, the
    workers, the order of the input or which tracts are run together.

    Why it is unique: two peaks of one tract never share a cell (pixels ≥ 5 mas are wider than
    a cell's diagonal; checked), and objects of two tracts share one only when their peaks lie
    within ~3 mas of each other across an inner boundary — so the tracts overlap, are
    neighbours and have different colours. Ids computed tract by tract are unique survey-wide
    without any tract seeing another's objects. Never 0, the segmentation maps' "no object".

    Parameters
    ----------
    ra, dec : array_like
        Sky position of the peak pixel's centre in the owning tract, degrees.
    colour : int or array_like of int
        The owning tract's colour (1..127), one for all or one per object.

    Returns
    -------
    numpy.ndarray of int64

    Raises
    ------
    ValueError
        Inputs of different lengths, non-finite positions, a colour outside 1..127, or two
        objects of one colour in one HEALPix cell (duplicated peaks).
    """
    from astropy import units as u
    from astropy.coordinates import Latitude, Longitude
    from cdshealpix.nested import lonlat_to_healpix

    ra, dec = np.atleast_1d(np.asarray(ra, float)), np.atleast_1d(np.asarray(dec, float))
    n = ra.size
    colour = np.broadcast_to(np.asarray(colour, np.int64), (n,)) if np.ndim(colour) == 0 else np.atleast_1d(np.asarray(colour, np.int64))
    _raise_if(dec.shape != (n,) or colour.shape != (n,),
              "global_ids: ra, dec and colour must be 1-D and of equal length")  # fmt: skip
    _raise_if(not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))
                   and np.all(np.abs(dec) <= 90)),
              "global_ids: ra and dec must be finite, |dec| <= 90")  # fmt: skip
    _raise_if(n > 0 and (colour.min() < 1 or colour.max() >= 1 << DISAMBIGUATOR_BITS),
              f"global_ids: tract colours must be 1..{(1 << DISAMBIGUATOR_BITS) - 1}")  # fmt: skip
    if n == 0:
        return np.zeros(0, np.int64)
    cells = lonlat_to_healpix(Longitude(ra % 360.0, u.deg), Latitude(dec, u.deg), HEALPIX_ORDER,
                              num_threads=1).astype(np.int64)  # fmt: skip
    ids = (cells << DISAMBIGUATOR_BITS) | colour
    if n > 1:
        srt = np.sort(ids)
        _raise_if(bool(np.any(srt[1:] == srt[:-1])),
                  f"global_ids: {int(np.sum(srt[1:] == srt[:-1]))} pair(s) of objects of one "
                  f"tract share an order-{HEALPIX_ORDER} HEALPix cell (~3 mas); duplicated peaks?")  # fmt: skip
    return ids
