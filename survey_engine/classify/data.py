"""Training and test stamps of GalSim stars and bulge + disk galaxies at LSST-like depth.

Each sample is one object (a PSF star, or a de Vaucouleurs bulge + exponential disk galaxy
with the simulator's size–magnitude relation and ellipticities), sometimes with a neighbour
inside the stamp, drawn with a Kolmogorov PSF, with the simulator's noise model (sky σ from
the 5σ depth plus source Poisson noise, :mod:`survey_engine.simulate._bands`). The stamp is
cut around the brightest pixel of the *noisy* image near the object, as the engine cuts it
around the catalog's peak pixel.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ..simulate._bands import ZERO_POINT, _sky_noise, make_psf
from ..simulate._scene import BULGE_TRUNCATION, MAX_ELLIPTICITY, _composite_hlr_ratio
from .stamps import STAMP_SIZE

__all__ = ["draw_galaxy", "galaxy_parameters", "make_stamps"]

logger = logging.getLogger(__name__)

_TAG = 0xC1A55


def galaxy_parameters(rng: np.random.Generator, r: np.ndarray, *, uniform_bf: float = 0.0) -> dict:
    """Bulge + disk parameters of galaxies of r magnitudes ``r``: the simulator's model.

    Parameters
    ----------
    rng : numpy.random.Generator
    r : numpy.ndarray
        r-band magnitudes.
    uniform_bf : float
        Fraction of galaxies whose bulge fraction is uniform on [0, 1] instead of the
        simulator's prior (15 % pure disks, else Beta(1, 2.5)).

    Returns
    -------
    dict of numpy.ndarray
        ``bulge_fraction``, ``disk_hlr``, ``bulge_hlr`` (arcsec), ``e1``, ``e2``.
    """
    n = len(r)
    log_r = math.log10(0.35) - 0.1 * (r - 24.0) + 0.15 * rng.standard_normal(n)
    hlr = np.clip(10.0**log_r, 0.05, 5.0)
    pure_disk = rng.random(n) < 0.15
    bf = np.where(pure_disk, 0.0, rng.beta(1.0, 2.5, n))
    bf = np.where(rng.random(n) < uniform_bf, rng.random(n), bf)
    ratio = np.clip(0.45 * np.exp(0.3 * rng.standard_normal(n)), 0.15, 1.0)
    disk_hlr = hlr / _composite_hlr_ratio(bf, ratio)
    sigma_e = 0.30 - 0.12 * bf
    e1, e2 = sigma_e * rng.standard_normal(n), sigma_e * rng.standard_normal(n)
    e = np.hypot(e1, e2)
    scale = np.where(e >= MAX_ELLIPTICITY, rng.uniform(0.0, MAX_ELLIPTICITY, n) / np.maximum(e, 1e-9), 1.0)
    return {"bulge_fraction": bf, "disk_hlr": disk_hlr, "bulge_hlr": ratio * disk_hlr,
            "e1": e1 * scale, "e2": e2 * scale}  # fmt: skip


def draw_galaxy(bf: float, disk_hlr: float, bulge_hlr: float, e1: float, e2: float):
    """The unit-flux GalSim profile of a bulge + disk galaxy (before the PSF)."""
    import galsim

    parts = []
    if bf < 1.0:
        parts.append(galsim.Exponential(half_light_radius=disk_hlr, flux=1.0 - bf))
    if bf > 0.0:
        parts.append(galsim.DeVaucouleurs(half_light_radius=bulge_hlr,
                                          trunc=BULGE_TRUNCATION * bulge_hlr, flux=bf))  # fmt: skip
    gal = parts[0] if len(parts) == 1 else galsim.Add(parts)
    if e1 or e2:
        gal = gal.shear(galsim.Shear(e1=e1, e2=e2))
    return gal


def make_stamps(
    n: int, *, seed: int = 0, mag_range: tuple[float, float] = (17.5, 26.0), star_fraction: float = 0.4,
    blend_fraction: float = 0.3, depth_range: tuple[float, float] = (26.4, 27.4),
    psf_fwhm_range: tuple[float, float] = (0.64, 0.76), pixel_scale: float = 0.2,
    uniform_bf: float = 0.3, size: int = STAMP_SIZE, galaxies_only: bool = False,
    isolated: bool = False,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Simulate ``n`` labelled stamps.

    Parameters
    ----------
    n, seed : int
        Number of stamps; random seed.
    mag_range : (float, float)
        Uniform range of the central object's r magnitude.
    star_fraction, blend_fraction : float
        Fraction of stars; of stamps with a neighbour (0.4–2.8″ away, up to 1.5 mag brighter).
    depth_range, psf_fwhm_range : (float, float)
        Uniform ranges of the 5σ point-source depth and of the Kolmogorov PSF FWHM (arcsec).
    pixel_scale : float
        Arcsec per pixel.
    uniform_bf : float
        See :func:`galaxy_parameters`.
    size : int
        Stamp side.
    galaxies_only, isolated : bool
        No stars; no neighbours.

    Returns
    -------
    dict of numpy.ndarray
        ``stamps`` ``(n, 2, size, size)`` float32 (image, variance) and per stamp ``star``,
        ``mag``, ``bulge_fraction``, ``r_bulge_arcsec``, ``r_disk_arcsec``, ``ellipticity``,
        ``e1``, ``e2``, ``blended``, ``flux``, ``sky_sigma``, ``psf_fwhm``, ``dy``, ``dx``
        (true centre minus stamp centre, px).
    """
    import galsim

    rng = np.random.default_rng([_TAG, seed])
    big = size + 6
    hb = big // 2
    star = np.zeros(n, bool) if galaxies_only else rng.random(n) < star_fraction
    mag = rng.uniform(*mag_range, n)
    gp = galaxy_parameters(rng, mag, uniform_bf=uniform_bf)
    blended = np.zeros(n, bool) if isolated else rng.random(n) < blend_fraction
    depth = rng.uniform(*depth_range, n)
    fwhm = rng.uniform(*psf_fwhm_range, n)
    off = rng.uniform(-0.5, 0.5, (n, 2))
    nb_star = rng.random(n) < 0.3
    nb_mag = mag + rng.uniform(-1.5, 3.0, n)
    nb_gp = galaxy_parameters(rng, nb_mag)
    nb_dist = rng.uniform(2.0, 14.0, n)
    nb_ang = rng.uniform(0, 2 * math.pi, n)
    out = {k: np.zeros(n, np.float32) for k in ("flux", "sky_sigma", "dy", "dx")}
    stamps = np.zeros((n, 2, size, size), np.float32)
    for i in range(n):
        psf = make_psf("kolmogorov", float(fwhm[i]))
        sky, gain = _sky_noise("r", float(depth[i]), fwhm[i] / pixel_scale, pixel_scale)
        flux = 10.0 ** (-0.4 * (mag[i] - ZERO_POINT))
        img = galsim.ImageD(big, big, scale=pixel_scale)
        prof = psf if star[i] else galsim.Convolve([draw_galaxy(*(float(gp[k][i]) for k in (
            "bulge_fraction", "disk_hlr", "bulge_hlr", "e1", "e2"))), psf])  # fmt: skip
        prof.withFlux(flux).drawImage(image=img, offset=galsim.PositionD(off[i, 1], off[i, 0]))
        model = img.array.copy()
        if blended[i]:
            nf = 10.0 ** (-0.4 * (nb_mag[i] - ZERO_POINT))
            nprof = psf if nb_star[i] else galsim.Convolve([draw_galaxy(*(float(nb_gp[k][i]) for k in (
                "bulge_fraction", "disk_hlr", "bulge_hlr", "e1", "e2"))), psf])  # fmt: skip
            ny, nx = nb_dist[i] * math.sin(nb_ang[i]), nb_dist[i] * math.cos(nb_ang[i])
            nimg = galsim.ImageD(big, big, scale=pixel_scale)
            nprof.withFlux(nf).drawImage(image=nimg, offset=galsim.PositionD(nx, ny), method="auto")
            model += nimg.array
        var = sky**2 + np.maximum(model, 0.0) / gain
        noisy = model + rng.standard_normal(model.shape) * np.sqrt(var)
        # the engine cuts the stamp at the brightest detection pixel of the object (its peak)
        c = noisy[hb - 2 : hb + 3, hb - 2 : hb + 3]
        py, px = np.unravel_index(int(np.argmax(c)), c.shape)
        py, px = hb - 2 + py, hb - 2 + px
        h = size // 2
        stamps[i, 0] = noisy[py - h : py + h + 1, px - h : px + h + 1]
        stamps[i, 1] = var[py - h : py + h + 1, px - h : px + h + 1]
        out["flux"][i], out["sky_sigma"][i] = flux, sky
        out["dy"][i], out["dx"][i] = hb + off[i, 0] - py, hb + off[i, 1] - px
    gal = ~star
    return {
        "stamps": stamps, "star": star, "mag": mag.astype(np.float32), "blended": blended,
        "bulge_fraction": np.where(gal, gp["bulge_fraction"], 0).astype(np.float32),
        "r_bulge_arcsec": np.where(gal, gp["bulge_hlr"], 0).astype(np.float32),
        "r_disk_arcsec": np.where(gal, gp["disk_hlr"], 0).astype(np.float32),
        "ellipticity": np.where(gal, np.hypot(gp["e1"], gp["e2"]), 0).astype(np.float32),
        "e1": np.where(gal, gp["e1"], 0).astype(np.float32), "e2": np.where(gal, gp["e2"], 0).astype(np.float32),
        "psf_fwhm": fwhm.astype(np.float32), **out,
    }  # fmt: skip
