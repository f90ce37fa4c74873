"""The object population of a simulated field: galaxies and stars, no pixels.

Model (all magnitudes AB, sizes in arcsec, ellipticities in the pixel frame)
---------------------------------------------------------------------------
Galaxies
    Differential counts ``dN/dm = 2.5e4 * 10**(0.33 * (r - 24))`` per deg² per
    mag from r = 18 to ``max_mag`` (3.2e5 deg⁻² ≈ 89 arcmin⁻² to r = 27).
    Bulge (de Vaucouleurs, truncated at :data:`BULGE_TRUNCATION` half-light
    radii) plus disk (exponential). Bulge fraction: 15 % pure disks, the rest
    Beta(1, 2.5). Circularised half-light radius of the composite from
    ``log10 R = log10 0.35 - 0.1 (r - 24)`` with 0.15 dex lognormal scatter,
    clipped to 0.05–5″; bulge to disk half-light radius ratio lognormal around
    0.45. Both components share the ellipticity (e1, e2) = distortion
    ``(a² - b²)/(a² + b²)``, Gaussian per component (σ 0.30, rounder for
    bulge-dominated galaxies), ``|e| < 0.7``. One SED per galaxy: colours
    (u-g, g-r, r-i, i-z, z-y) redden with the bulge fraction.
Stars
    Point sources, ``dN/dm = 5.8e3 * 10**(0.1 * (r - 24))`` per deg² per mag
    (flatter than galaxies; ~12 % of all objects to r = 27). Colours from a
    halo turn-off / disk dwarf mixture along a simple stellar locus.
Bright stars
    ``bright_stars`` extra stars with r uniform in 14–16 (they saturate).

Positions are uniform over the pixel area, ``[-0.5, n - 0.5)`` in 0-based
pixel coordinates (pixel centres at integers), so blends arise from the
density alone. Every random stream is seeded from ``(seed, component)``:
the population does not depend on the chunking, the workers or the bands
requested (all six colours are always drawn).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from astropy import units as u
from astropy.table import QTable
from astropy.wcs import WCS

from ._bands import LSST_BANDS, ZERO_POINT, parse_bands

__all__ = [
    "BULGE_TRUNCATION",
    "DEFAULT_CENTER",
    "GALAXY_COUNTS",
    "STAR_COUNTS",
    "expected_counts",
    "make_scene",
    "make_wcs",
]

#: (ra, dec) in degrees of the mosaic centre (COSMOS).
DEFAULT_CENTER = (150.1, 2.2)
#: Galaxy counts: (per deg² per mag at r = 24, slope d log10 N / dm).
GALAXY_COUNTS = (2.5e4, 0.33)
#: Star counts: (per deg² per mag at r = 24, slope d log10 N / dm).
STAR_COUNTS = (5.8e3, 0.10)
#: Bright end of the galaxy and star populations (r mag).
BRIGHT_LIMIT = 18.0
#: r-band range of the ``bright_stars``.
BRIGHT_STAR_RANGE = (14.0, 16.0)
#: The de Vaucouleurs bulge is truncated at this many half-light radii (and
#: normalised inside, so its flux and half-light radius are exact).
BULGE_TRUNCATION = 8.0
#: Exponential half-light radius over scale length.
EXP_HLR_OVER_SCALE = 1.6783469900166612
#: Largest |e| of a galaxy.
MAX_ELLIPTICITY = 0.7

_TAG = 0x5CE7E  # stream tag of the scene generator
_GALAXIES, _STARS, _BRIGHT = 1, 2, 3
_DEV_HLR_OVER_R0: float | None = None


def make_wcs(
    ny: int,
    nx: int,
    *,
    pixel_scale: float = 0.2,
    center: tuple[float, float] = DEFAULT_CENTER,
) -> WCS:
    """A north-up, east-left TAN WCS centred on the mosaic.

    Parameters
    ----------
    ny, nx : int
        Mosaic shape.
    pixel_scale : float
        Arcsec per pixel.
    center : (float, float)
        (ra, dec) of the mosaic centre in degrees.

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
    area_deg2 : float
        Area in square degrees.
    density : float
        Multiplies the number counts.
    max_mag : float
        Faint limit (r mag).

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


def _dev_hlr_over_r0() -> float:
    """Half-light radius over GalSim scale radius of the truncated de Vaucouleurs bulge."""
    global _DEV_HLR_OVER_R0
    if _DEV_HLR_OVER_R0 is None:
        import galsim

        prof = galsim.DeVaucouleurs(half_light_radius=1.0, trunc=BULGE_TRUNCATION)
        _DEV_HLR_OVER_R0 = 1.0 / prof.scale_radius
    return _DEV_HLR_OVER_R0


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
    e1 = sigma_e * rng.standard_normal(n)
    e2 = sigma_e * rng.standard_normal(n)
    bad = np.hypot(e1, e2) >= MAX_ELLIPTICITY
    while bad.any():  # redraw the rejected ellipticities (few; order fixed by the seed)
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
        "r": r,
        "colours": colours,
        "half_light_radius": hlr,
        "bulge_fraction": bf,
        "disk_hlr": disk_hlr,
        "bulge_hlr": bulge_hlr,
        "e1": e1,
        "e2": e2,
    }


def _stars(rng: np.random.Generator, r: np.ndarray) -> dict[str, np.ndarray]:
    n = r.size
    halo = rng.random(n) < 0.55
    gr = np.where(halo, np.clip(0.45 + 0.12 * rng.standard_normal(n), 0.15, 1.0), 0.0)
    gr = np.where(halo, gr, rng.uniform(0.6, 1.5, n))
    noise = rng.standard_normal((4, n))
    ri = 0.38 * gr - 0.05 + 3.0 * np.maximum(gr - 1.2, 0.0) + 0.05 * noise[0]
    colours = {
        "ug": 0.5 + 1.4 * gr + 0.10 * noise[1],
        "gr": gr,
        "ri": ri,
        "iz": 0.5 * ri + 0.03 * noise[2],
        "zy": 0.3 * ri + 0.03 * noise[3],
    }
    zeros = np.zeros(n)
    return {
        "r": r,
        "colours": colours,
        "half_light_radius": zeros,
        "bulge_fraction": zeros,
        "disk_hlr": zeros,
        "bulge_hlr": zeros,
        "e1": zeros,
        "e2": zeros,
    }


def _band_mags(r: np.ndarray, c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    g = r + c["gr"]
    i = r - c["ri"]
    z = i - c["iz"]
    return {"u": g + c["ug"], "g": g, "r": r, "i": i, "z": z, "y": z - c["zy"]}


def _rng(seed: int, component: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _TAG, component]))


def make_scene(
    ny: int,
    nx: int,
    *,
    bands: str | Sequence[str] = ("g", "r", "i"),
    seed: int = 0,
    pixel_scale: float = 0.2,
    density: float = 1.0,
    max_mag: float = 27.0,
    bright_stars: int = 0,
    wcs: WCS | None = None,
) -> QTable:
    """Draw the object population of a field: the truth table, without any pixels.

    Deterministic in ``seed``; see the module docstring for the model.

    Parameters
    ----------
    ny, nx : int
        Field shape in pixels.
    bands : sequence of str
        Bands whose ``<band>_flux`` / ``<band>_mag`` columns are returned.
    seed : int
        Non-negative random seed.
    pixel_scale : float
        Arcsec per pixel.
    density : float
        Multiplies the galaxy and star number counts (not the bright stars).
    max_mag : float
        Faint limit (r mag) of galaxies and stars.
    bright_stars : int
        Number of extra saturating stars (r 14–16).
    wcs : astropy.wcs.WCS, optional
        For ``ra``/``dec``; :func:`make_wcs` of the field by default.

    Returns
    -------
    astropy.table.QTable
        One row per object, ``id`` 1…N (galaxies, then stars, then bright stars),
        with the columns described in :data:`TRUTH_COLUMNS`.
    """
    bands = parse_bands(bands)
    ny, nx = int(ny), int(nx)
    if wcs is None:
        wcs = make_wcs(ny, nx, pixel_scale=pixel_scale)
    area = ny * nx * (pixel_scale / 3600.0) ** 2
    mean_gal, mean_star = expected_counts(area, density=density, max_mag=max_mag)

    parts = []
    rng = _rng(seed, _GALAXIES)
    n = int(rng.poisson(mean_gal))
    parts.append(("galaxy", _GALAXIES, _galaxies(rng, n, max_mag)))
    rng = _rng(seed, _STARS)
    n = int(rng.poisson(mean_star))
    r = _sample_mags(rng, n, STAR_COUNTS[1], BRIGHT_LIMIT, max_mag)
    parts.append(("star", _STARS, _stars(rng, r)))
    rng = _rng(seed, _BRIGHT)
    r = rng.uniform(*BRIGHT_STAR_RANGE, int(bright_stars))
    parts.append(("star", _BRIGHT, _stars(rng, r)))

    cols: dict[str, list[np.ndarray]] = {}
    for kind, component, props in parts:
        m = props["r"].size
        prng = _rng(seed, 16 * component + 1)  # positions: a stream of their own
        x = prng.uniform(-0.5, nx - 0.5, m)
        y = prng.uniform(-0.5, ny - 0.5, m)
        mags = _band_mags(props["r"], props["colours"])
        row = {"x": x, "y": y, "kind": np.full(m, kind)}
        for b in bands:
            row[f"{b}_flux"] = 10.0 ** (-0.4 * (mags[b] - ZERO_POINT))
            row[f"{b}_mag"] = mags[b]
        for key in ("half_light_radius", "bulge_fraction", "disk_hlr", "bulge_hlr", "e1", "e2"):
            row[key] = props[key]
        for key, val in row.items():
            cols.setdefault(key, []).append(val)
    data = {k: np.concatenate(v) for k, v in cols.items()}
    n_obj = data["x"].size
    data["kind"] = data["kind"].astype("<U6")
    ra, dec = wcs.all_pix2world(data["x"], data["y"], 0) if n_obj else (np.zeros(0),) * 2
    table = QTable()
    table["id"] = np.arange(1, n_obj + 1, dtype=np.int64)
    table["x"] = data["x"] * u.pix
    table["y"] = data["y"] * u.pix
    table["ra"] = np.asarray(ra, float) * u.deg
    table["dec"] = np.asarray(dec, float) * u.deg
    table["kind"] = data["kind"]
    for b in bands:
        table[f"{b}_flux"] = data[f"{b}_flux"] * u.ct
        table[f"{b}_mag"] = data[f"{b}_mag"] * u.mag
    table["half_light_radius"] = data["half_light_radius"] * u.arcsec
    table["bulge_fraction"] = data["bulge_fraction"]
    table["disk_hlr"] = data["disk_hlr"] * u.arcsec
    table["bulge_hlr"] = data["bulge_hlr"] * u.arcsec
    table["e1"] = data["e1"]
    table["e2"] = data["e2"]
    for name, col in table.columns.items():
        col.info.description = _describe(name)
    table.meta.update(
        {
            "survey_engine": "truth",
            "seed": int(seed),
            "shape": [ny, nx],
            "bands": list(bands),
            "zero_points": dict.fromkeys(bands, ZERO_POINT),
            "pixel_scale_arcsec": float(pixel_scale),
            "density": float(density),
            "max_mag": float(max_mag),
            "bright_stars": int(bright_stars),
        }
    )
    return table


#: Descriptions of the truth columns (``<band>`` stands for each band).
TRUTH_COLUMNS = {
    "id": "truth id (1-based; the value in the truth segmentation)",
    "x": "column of the centre, 0-based mosaic pixels (pixel centres at integers)",
    "y": "row of the centre, 0-based mosaic pixels",
    "ra": "right ascension of the centre (ICRS), from the mosaic WCS",
    "dec": "declination of the centre (ICRS), from the mosaic WCS",
    "kind": "'galaxy' or 'star'",
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
    if name in TRUTH_COLUMNS:
        return TRUTH_COLUMNS[name]
    band, _, rest = name.partition("_")
    if band in LSST_BANDS:
        return TRUTH_COLUMNS.get(f"<band>_{rest}", "")
    return ""
