"""The object population of a simulated field (galaxies and stars, no pixels) and its truth table.

Bulge + disk galaxies, stars and optional saturating bright stars, uniform over the pixel area;
every random stream is seeded from ``(seed, component)``, so the population depends on neither the
chunking, the workers nor the bands requested (the model: ``docs/simulation.md``). Truth tables
are stored as Parquet with their units and column descriptions (:func:`write_truth`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence

import numpy as np
from astropy import units as u
from astropy.table import QTable
from astropy.wcs import WCS

from ._bands import LSST_BANDS, ZERO_POINT, parse_bands
from ._cluster import KingCluster

__all__ = [
    "BULGE_TRUNCATION", "DEFAULT_CENTER", "GALAXY_COUNTS", "STAR_COUNTS", "expected_counts",
    "make_scene", "make_wcs", "read_truth", "write_truth",
]  # fmt: skip

DEFAULT_CENTER = (150.1, 2.2)  #: (ra, dec) in degrees of the mosaic centre (COSMOS).
GALAXY_COUNTS = (2.5e4, 0.33)  #: Galaxy counts: (per deg² per mag at r = 24, slope d log10 N / dm).
STAR_COUNTS = (5.8e3, 0.10)  #: Star counts: (per deg² per mag at r = 24, slope d log10 N / dm).
BRIGHT_LIMIT = 18.0  #: Bright end of the galaxy and star populations (r mag).
BRIGHT_STAR_RANGE = (14.0, 16.0)  #: r-band range of the ``bright_stars``.
#: The de Vaucouleurs bulge is truncated at this many half-light radii (and
#: normalised inside, so its flux and half-light radius are exact).
BULGE_TRUNCATION = 8.0
EXP_HLR_OVER_SCALE = 1.6783469900166612  #: Exponential half-light radius over scale length.
MAX_ELLIPTICITY = 0.7  #: Largest |e| of a galaxy.

_TAG = 0x5CE7E  # stream tag of the scene generator
_GALAXIES, _STARS, _BRIGHT, _CLUSTER = 1, 2, 3, 4
#: Per-object shape columns of the truth table (zero for stars), in table order.
_SHAPE_COLUMNS = ("half_light_radius", "bulge_fraction", "disk_hlr", "bulge_hlr", "e1", "e2")


def make_wcs(
    ny: int, nx: int, *, pixel_scale: float = 0.2, center: tuple[float, float] = DEFAULT_CENTER
) -> WCS:
    """A north-up, east-left TAN WCS centred on the mosaic.

    Parameters
    ----------
    ny, nx : int
        Mosaic shape.
    pixel_scale, center : float, (float, float)
        Arcsec per pixel; (ra, dec) of the mosaic centre in degrees.

    Returns
    -------
    astropy.wcs.WCS
    """
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(center[0]), float(center[1])]
    # FITS pixels are 1-based: the centre of a 0-based (ny, nx) mosaic is at (n + 1) / 2.
    w.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
    scale = pixel_scale / 3600.0
    w.wcs.cd = [[-scale, 0.0], [0.0, scale]]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.radesys = "ICRS"
    w.pixel_shape = (nx, ny)
    return w


def expected_counts(
    area_deg2: float, *, density: float = 1.0, max_mag: float = 27.0
) -> tuple[float, float]:
    """Mean numbers of (galaxies, stars) in an area, excluding the ``bright_stars``.

    Parameters
    ----------
    area_deg2, density, max_mag : float
        Area in square degrees; factor of the number counts; faint limit (r mag).

    Returns
    -------
    (float, float)
    """
    return tuple(
        density * area_deg2 * _integral(a, slope, BRIGHT_LIMIT, max_mag)
        for a, slope in (GALAXY_COUNTS, STAR_COUNTS)
    )


def _integral(a: float, slope: float, m0: float, m1: float) -> float:
    k = slope * math.log(10.0)
    return a / k * (math.exp(k * (m1 - 24.0)) - math.exp(k * (m0 - 24.0)))


def _sample_mags(rng: np.random.Generator, n: int, slope: float, m0: float, m1: float):
    """Magnitudes with dN/dm ∝ 10^(slope m) on [m0, m1), by inverse CDF."""
    k = slope * math.log(10.0)
    q = rng.random(n)
    return m0 + np.log1p(q * np.expm1(k * (m1 - m0))) / k


@functools.cache
def _dev_hlr_over_r0() -> float:
    """Half-light radius over GalSim scale radius of the truncated de Vaucouleurs bulge."""
    import galsim

    return 1.0 / galsim.DeVaucouleurs(half_light_radius=1.0, trunc=BULGE_TRUNCATION).scale_radius


def enclosed_fraction(r, disk_hlr, bulge_hlr, bulge_fraction):
    """Flux fraction of a circular bulge + disk galaxy inside radius ``r`` (same units).

    Parameters
    ----------
    r, disk_hlr, bulge_hlr, bulge_fraction : array_like
        Broadcast together; half-light radii must be positive.

    Returns
    -------
    numpy.ndarray
    """
    from scipy.special import gammainc

    r = np.asarray(r, float)
    x = EXP_HLR_OVER_SCALE * r / disk_hlr
    f_disk = -np.expm1(-x) - x * np.exp(-x)
    k = _dev_hlr_over_r0()
    s = np.minimum(r / bulge_hlr, BULGE_TRUNCATION)
    f_bulge = gammainc(8.0, (s * k) ** 0.25) / gammainc(8.0, (BULGE_TRUNCATION * k) ** 0.25)
    return (1.0 - bulge_fraction) * f_disk + bulge_fraction * f_bulge


def _composite_hlr_ratio(bulge_fraction: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """Composite half-light radius in units of the disk half-light radius (bisection)."""
    lo = np.full(bulge_fraction.shape, 1e-3)
    hi = np.full(bulge_fraction.shape, 10.0)
    for _ in range(60):
        mid = np.sqrt(lo * hi)
        above = enclosed_fraction(mid, 1.0, ratio, bulge_fraction) > 0.5
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
    return np.sqrt(lo * hi)


def _galaxies(rng: np.random.Generator, n: int, max_mag: float) -> dict[str, np.ndarray]:
    r = _sample_mags(rng, n, GALAXY_COUNTS[1], BRIGHT_LIMIT, max_mag)
    log_r = math.log10(0.35) - 0.1 * (r - 24.0) + 0.15 * rng.standard_normal(n)
    hlr = np.clip(10.0**log_r, 0.05, 5.0)
    pure_disk = rng.random(n) < 0.15
    bf = np.where(pure_disk, 0.0, rng.beta(1.0, 2.5, n))
    ratio = np.clip(0.45 * np.exp(0.3 * rng.standard_normal(n)), 0.15, 1.0)
    disk_hlr = hlr / _composite_hlr_ratio(bf, ratio)
    bulge_hlr = ratio * disk_hlr
    sigma_e = 0.30 - 0.12 * bf
    e1, e2, bad = np.empty(n), np.empty(n), np.ones(n, bool)
    while bad.any():  # draw, then redraw the rejected ellipticities (few; order fixed by the seed)
        k = int(bad.sum())
        e1[bad] = sigma_e[bad] * rng.standard_normal(k)
        e2[bad] = sigma_e[bad] * rng.standard_normal(k)
        bad = np.hypot(e1, e2) >= MAX_ELLIPTICITY
    red = np.clip(bf + 0.15 * rng.standard_normal(n), 0.0, 1.0)
    noise = rng.standard_normal((5, n))
    colours = {  # u-g, g-r, r-i, i-z, z-y
        "ug": 0.70 + 0.90 * red + 0.15 * noise[0],
        "gr": 0.30 + 0.55 * red + 0.10 * noise[1],
        "ri": 0.15 + 0.30 * red + 0.08 * noise[2],
        "iz": 0.05 + 0.20 * red + 0.08 * noise[3],
        "zy": 0.02 + 0.08 * red + 0.06 * noise[4],
    }
    return {
        "r": r, "colours": colours, "half_light_radius": hlr, "bulge_fraction": bf,
        "disk_hlr": disk_hlr, "bulge_hlr": bulge_hlr, "e1": e1, "e2": e2,
    }  # fmt: skip


def _stars(rng: np.random.Generator, r: np.ndarray) -> dict[str, np.ndarray]:
    n = r.size
    halo = rng.random(n) < 0.55
    gr = np.where(halo, np.clip(0.45 + 0.12 * rng.standard_normal(n), 0.15, 1.0), 0.0)
    gr = np.where(halo, gr, rng.uniform(0.6, 1.5, n))
    noise = rng.standard_normal((4, n))
    ri = 0.38 * gr - 0.05 + 3.0 * np.maximum(gr - 1.2, 0.0) + 0.05 * noise[0]
    colours = {
        "ug": 0.5 + 1.4 * gr + 0.10 * noise[1], "gr": gr, "ri": ri,
        "iz": 0.5 * ri + 0.03 * noise[2], "zy": 0.3 * ri + 0.03 * noise[3],
    }  # fmt: skip
    return {"r": r, "colours": colours, **dict.fromkeys(_SHAPE_COLUMNS, np.zeros(n))}


def _band_mags(r: np.ndarray, c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    g = r + c["gr"]
    i = r - c["ri"]
    z = i - c["iz"]
    return {"u": g + c["ug"], "g": g, "r": r, "i": i, "z": z, "y": z - c["zy"]}


def _rng(seed: int, component: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _TAG, component]))


def make_scene(
    ny: int, nx: int, *, bands: str | Sequence[str] = ("g", "r", "i"), seed: int = 0,
    pixel_scale: float = 0.2, density: float = 1.0, max_mag: float = 27.0, bright_stars: int = 0,
    cluster: KingCluster | None = None, wcs: WCS | None = None,
) -> QTable:  # fmt: skip
    """Draw the object population of a field: the truth table, without any pixels.

    Deterministic in ``seed``; the model is described in ``docs/simulation.md``.

    Parameters
    ----------
    ny, nx : int
        Field shape in pixels.
    bands : sequence of str
        Bands whose ``<band>_flux`` / ``<band>_mag`` columns are returned.
    seed, pixel_scale : int, float
        Non-negative random seed; arcsec per pixel.
    density, max_mag : float
        Multiplies the galaxy and star number counts (not the bright stars); faint limit (r mag)
        of galaxies and stars.
    bright_stars : int
        Number of extra saturating stars (r 14–16).
    cluster : KingCluster, optional
        Add the stars of a globular cluster (``population`` = ``"cluster"``), to ``max_mag``.
    wcs : astropy.wcs.WCS, optional
        For ``ra``/``dec``; :func:`make_wcs` of the field by default.

    Returns
    -------
    astropy.table.QTable
        One row per object, ``id`` 1…N (galaxies, stars, bright stars, cluster stars),
        with the columns described in :data:`TRUTH_COLUMNS`.
    """
    bands = parse_bands(bands)
    ny, nx = int(ny), int(nx)
    if wcs is None:
        wcs = make_wcs(ny, nx, pixel_scale=pixel_scale)
    area = ny * nx * (pixel_scale / 3600.0) ** 2
    mean_gal, mean_star = expected_counts(area, density=density, max_mag=max_mag)

    rng = _rng(seed, _GALAXIES)
    galaxies = _galaxies(rng, int(rng.poisson(mean_gal)), max_mag)
    rng = _rng(seed, _STARS)
    n = int(rng.poisson(mean_star))
    stars = _stars(rng, _sample_mags(rng, n, STAR_COUNTS[1], BRIGHT_LIMIT, max_mag))
    rng = _rng(seed, _BRIGHT)
    bright = _stars(rng, rng.uniform(*BRIGHT_STAR_RANGE, int(bright_stars)))
    king = KingCluster(0) if cluster is None else cluster  # positions: a stream of their own
    crowd = king.sample(_rng(seed, _CLUSTER), _rng(seed, 16 * _CLUSTER + 1), ny, nx, max_mag)
    crowd.update(dict.fromkeys(_SHAPE_COLUMNS, np.zeros(crowd["r"].size)))

    rows = []
    parts = (("galaxy", _GALAXIES, galaxies), ("star", _STARS, stars), ("star", _BRIGHT, bright),
             ("star", _CLUSTER, crowd))  # fmt: skip
    for kind, component, props in parts:
        m = props["r"].size
        if component == _CLUSTER:
            x, y = props["x"], props["y"]
        else:
            prng = _rng(seed, 16 * component + 1)  # positions: a stream of their own
            x, y = prng.uniform(-0.5, nx - 0.5, m), prng.uniform(-0.5, ny - 0.5, m)
        mags = _band_mags(props["r"], props["colours"])
        population = np.full(m, "cluster" if component == _CLUSTER else "field")
        row = {"x": x, "y": y, "kind": np.full(m, kind), "population": population}
        for b in bands:
            row[f"{b}_flux"] = 10.0 ** (-0.4 * (mags[b] - ZERO_POINT))
            row[f"{b}_mag"] = mags[b]
        row.update((key, props[key]) for key in _SHAPE_COLUMNS)
        rows.append(row)
    data = {key: np.concatenate([row[key] for row in rows]) for key in rows[0]}
    n_obj = data["x"].size
    ra, dec = wcs.all_pix2world(data["x"], data["y"], 0) if n_obj else (np.zeros(0),) * 2
    table = QTable()
    table["id"] = np.arange(1, n_obj + 1, dtype=np.int64)
    table["x"], table["y"] = data["x"] * u.pix, data["y"] * u.pix
    table["ra"], table["dec"] = np.asarray(ra, float) * u.deg, np.asarray(dec, float) * u.deg
    table["kind"] = data["kind"].astype("<U6")
    table["population"] = data["population"].astype("<U7")
    for b in bands:
        table[f"{b}_flux"], table[f"{b}_mag"] = data[f"{b}_flux"] * u.ct, data[f"{b}_mag"] * u.mag
    for key in _SHAPE_COLUMNS:  # radii in arcsec, the bulge fraction and e1, e2 without unit
        table[key] = data[key] if key in ("bulge_fraction", "e1", "e2") else data[key] * u.arcsec
    for name, col in table.columns.items():
        col.info.description = _describe(name)
    table.meta.update({
        "survey_engine": "truth", "seed": int(seed), "shape": [ny, nx], "bands": list(bands),
        "zero_points": dict.fromkeys(bands, ZERO_POINT), "pixel_scale_arcsec": float(pixel_scale),
        "density": float(density), "max_mag": float(max_mag), "bright_stars": int(bright_stars),
        "cluster": None if cluster is None else dataclasses.asdict(cluster),
    })  # fmt: skip
    return table


#: Descriptions of the truth columns (``<band>`` stands for each band).
TRUTH_COLUMNS = {
    "id": "truth id (1-based; the value in the truth segmentation)",
    "x": "column of the centre, 0-based mosaic pixels (pixel centres at integers)",
    "y": "row of the centre, 0-based mosaic pixels",
    "ra": "right ascension of the centre (ICRS), from the mosaic WCS",
    "dec": "declination of the centre (ICRS), from the mosaic WCS",
    "kind": "'galaxy' or 'star'",
    "population": "'field' or 'cluster' (a star of the KingCluster of simulate(cluster=...))",
    "<band>_flux": "total flux in image units (count)",
    "<band>_mag": "total AB magnitude",
    "half_light_radius": "circularised half-light radius before the PSF (0 for stars)",
    "bulge_fraction": "fraction of the flux in the de Vaucouleurs bulge",
    "disk_hlr": "half-light radius of the exponential disk",
    "bulge_hlr": "half-light radius of the truncated de Vaucouleurs bulge",
    "e1": "ellipticity (a²-b²)/(a²+b²) cos 2θ, pixel frame (x right, y up)",
    "e2": "ellipticity (a²-b²)/(a²+b²) sin 2θ, pixel frame",
}


def _describe(name: str) -> str:
    """The description of a truth column (``<band>_...`` for the per-band ones)."""
    band, _, rest = name.partition("_")
    per_band = TRUTH_COLUMNS.get(f"<band>_{rest}", "") if band in LSST_BANDS else ""
    return TRUTH_COLUMNS.get(name, per_band)


def write_truth(table: QTable, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write a truth table to Parquet (astropy keeps units and table metadata in the file).

    Parameters
    ----------
    table : astropy.table.QTable
        Truth table from :func:`~survey_engine.simulate.make_scene` / ``simulate``.
    path, overwrite : str or path-like, bool
        Output ``.parquet`` file; replace an existing file.
    """
    out = table.copy(copy_data=False)
    out.meta["descriptions"] = {
        name: col.info.description for name, col in out.columns.items() if col.info.description
    }
    out.write(os.fspath(path), format="parquet", overwrite=overwrite)


def read_truth(path: str | os.PathLike) -> QTable:
    """Read a truth table written by ``simulate(truth=...)``.

    Parameters
    ----------
    path : str or path-like
        The Parquet file.

    Returns
    -------
    astropy.table.QTable
        With units (``pix``, ``deg``, ``ct``, ``mag``, ``arcsec``), column
        descriptions and the simulation metadata in ``meta``.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file is not a readable Parquet table (the message names it).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        msg = f"truth table not found: {path}"
        raise FileNotFoundError(msg)
    try:
        table = QTable.read(path, format="parquet")
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        msg = (f"truth table {path} is not a readable Parquet file ({type(err).__name__}: "
               f"{str(err).splitlines()[0] if str(err) else 'no detail'}); convert it, e.g. "
               "astropy.table.Table.read(FILE).write('truth.parquet')")  # fmt: skip
        raise ValueError(msg) from err
    for name, text in dict(table.meta.pop("descriptions", {})).items():
        if name in table.colnames:
            table[name].info.description = text
    return table
