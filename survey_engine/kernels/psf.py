"""PSF width of an image from its point sources (pure numpy / sep / scipy; no Dask, no I/O).

:func:`estimate_psf_fwhm` is what ``ingest_fits`` records for a band whose PSF it is not told
(``docs/mosaic_format.md``, "Ingest of FITS images"): real images often come without one, and
the model fluxes and the classifier need it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize

__all__ = ["PIXEL_FWHM2", "PSFEstimate", "estimate_psf_fwhm"]

logger = logging.getLogger(__name__)

#: Smallest peak S/N of a source used (its core then constrains a Gaussian well).
MIN_PEAK_SNR = 20.0
#: Fewest point sources for an estimate.
MIN_STARS = 5
#: Most sources fitted (the brightest usable ones).
MAX_SOURCES = 200
_HALF = 3  # the 7 × 7 core fitted
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: (FWHM of a Gaussian with a pixel's variance, 1/12 px²)², px².
PIXEL_FWHM2 = _FWHM_PER_SIGMA**2 / 12.0


@dataclass(frozen=True)
class PSFEstimate:
    """What :func:`estimate_psf_fwhm` found.

    Attributes
    ----------
    fwhm : float
        PSF FWHM in pixels (NaN when too few point sources).
    n_stars : int
        Point sources on the stellar locus that gave it.
    n_fitted : int
        Sources whose core was fitted.
    """

    fwhm: float
    n_stars: int
    n_fitted: int


def _fit_core(stamp: np.ndarray) -> float:
    """FWHM (pixels) of a circular Gaussian + constant fitted to a ``7 × 7`` core (NaN if bad)."""
    yy, xx = np.mgrid[-_HALF : _HALF + 1, -_HALF : _HALF + 1].astype(np.float64)
    peak = float(stamp[_HALF, _HALF])

    def resid(p):
        amp, y0, x0, s, c = p
        return (amp * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / (2.0 * s * s)) + c - stamp).ravel()

    try:
        fit = optimize.least_squares(resid, [peak, 0.0, 0.0, 1.2, 0.0],
                                     bounds=([0, -1.5, -1.5, 0.3, -np.inf], [np.inf, 1.5, 1.5, 6.0, np.inf]))  # fmt: skip
    except (ValueError, np.linalg.LinAlgError):
        return float("nan")
    return float(fit.x[3] * _FWHM_PER_SIGMA) if fit.success else float("nan")


def estimate_psf_fwhm(image: np.ndarray, *, sigma: float | None = None, bad: np.ndarray | None = None,
                      saturation: float | None = None) -> PSFEstimate:  # fmt: skip
    """PSF FWHM of an image: the median core width of the sources on the stellar locus.

    sep finds the sources (background subtracted, 5σ, minarea 5); those with a peak S/N of at
    least :data:`MIN_PEAK_SNR`, not deblended, not touching the edge, a bad or a saturated
    pixel, get a circular Gaussian fitted to their 7 × 7 core. Point sources are the
    narrowest: the FWHMs within 15 % of the 20th percentile are the stellar locus and their
    median, less the pixel's width in quadrature, is the estimate (hot pixels and cosmic rays
    narrower than 1 px are left out).

    Parameters
    ----------
    image : numpy.ndarray
        2-D image (any background).
    sigma : float, optional
        Sky noise; default: sep's global background rms.
    bad : numpy.ndarray of bool, optional
        Pixels without usable data.
    saturation : float, optional
        Level at and above which pixels are saturated.

    Returns
    -------
    PSFEstimate
    """
    import sep

    data = np.ascontiguousarray(image, dtype=np.float32)
    if data.ndim != 2:
        msg = f"image must be 2-D, got shape {data.shape}"
        raise ValueError(msg)
    usable = np.isfinite(data) if bad is None else np.isfinite(data) & ~np.asarray(bad, bool)
    sat = np.zeros(data.shape, bool) if saturation is None else data >= float(saturation)
    masked = ~usable | sat
    clean = np.where(masked, np.float32(0.0), data)
    if usable.sum() < 100:
        return PSFEstimate(float("nan"), 0, 0)
    bkg = sep.Background(clean, mask=masked, bw=64, bh=64)
    sub = clean - bkg.back()
    err = float(sigma) if sigma is not None and sigma > 0 else float(bkg.globalrms)
    sep.set_extract_pixstack(max(300_000, data.size // 4))
    objs = sep.extract(sub, 5.0, err=err, mask=masked, minarea=5, deblend_cont=1.0)
    h, w = data.shape
    xi, yi = np.rint(objs["xpeak"]).astype(int), np.rint(objs["ypeak"]).astype(int)
    ok = ((objs["flag"] == 0) & (objs["peak"] >= MIN_PEAK_SNR * err) & (xi >= _HALF + 1) & (yi >= _HALF + 1)
          & (xi < w - _HALF - 1) & (yi < h - _HALF - 1))  # fmt: skip
    idx = np.flatnonzero(ok)
    idx = idx[np.argsort(-objs["peak"][idx], kind="stable")]
    fwhm = []
    for k in idx:
        sl = (slice(yi[k] - _HALF - 1, yi[k] + _HALF + 2), slice(xi[k] - _HALF - 1, xi[k] + _HALF + 2))
        if masked[sl].any():
            continue
        fwhm.append(_fit_core(sub[yi[k] - _HALF : yi[k] + _HALF + 1, xi[k] - _HALF : xi[k] + _HALF + 1]))
        if len(fwhm) >= MAX_SOURCES:
            break
    f = np.asarray(fwhm, dtype=np.float64)
    f = f[np.isfinite(f) & (f >= 1.0)]
    if len(f) < MIN_STARS:
        return PSFEstimate(float("nan"), 0, len(fwhm))
    locus = f[f <= 1.15 * np.percentile(f, 20)]
    if len(locus) < MIN_STARS:
        return PSFEstimate(float("nan"), len(locus), len(fwhm))
    # The fitted cores are the PSF convolved with the pixel: its variance, 1/12 px² per axis,
    # is removed so that the FWHM is the PSF's own, as the simulator and the header record it.
    core = float(np.median(locus))
    return PSFEstimate(math.sqrt(max(core * core - PIXEL_FWHM2, 0.0)), len(locus), len(fwhm))
