"""The fitting baseline (a GALFIT stand-in): a PSF-convolved bulge + disk GalSim model fitted
to a stamp with :func:`scipy.optimize.least_squares`.

Free parameters: flux, bulge fraction, bulge and disk half-light radii (log), one
ellipticity (e1, e2) shared by bulge and disk, and the centre; the PSF is given (known
exactly here, which favours the fit over the network, which is not told the PSF).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from ..simulate._bands import make_psf
from .data import draw_galaxy

__all__ = ["FitResult", "fit_bulge_disk"]

logger = logging.getLogger(__name__)

_E_MAX = 0.69
_LOG_R = (math.log(0.02), math.log(4.0))


@dataclass
class FitResult:
    """Best-fit bulge + disk parameters of one stamp.

    Attributes
    ----------
    flux, bulge_fraction, r_bulge_arcsec, r_disk_arcsec, ellipticity, e1, e2, dx, dy : float
        Parameters (radii before the PSF; centre offset from the stamp centre in pixels).
    chi2 : float
        Reduced χ² of the fit.
    nfev : int
        Model evaluations.
    seconds : float
        Wall time of the fit.
    success : bool
        ``least_squares``' status.
    """

    flux: float
    bulge_fraction: float
    r_bulge_arcsec: float
    r_disk_arcsec: float
    ellipticity: float
    e1: float
    e2: float
    dx: float
    dy: float
    chi2: float
    nfev: int
    seconds: float
    success: bool


def _model(p, psf, size: int, scale: float) -> np.ndarray:
    import galsim

    flux, bf, lrb, lrd, e1, e2, dx, dy = p
    e = math.hypot(e1, e2)
    if e > _E_MAX:
        e1, e2 = e1 * _E_MAX / e, e2 * _E_MAX / e
    gal = draw_galaxy(float(min(max(bf, 0.0), 1.0)), math.exp(lrd), math.exp(lrb), e1, e2)
    img = galsim.ImageD(size, size, scale=scale)
    galsim.Convolve([gal.withFlux(flux), psf]).drawImage(image=img, offset=galsim.PositionD(dx, dy))
    return img.array


def fit_bulge_disk(
    image: np.ndarray, variance: np.ndarray, *, psf_fwhm: float = 0.7, psf: str = "kolmogorov",
    pixel_scale: float = 0.2, max_nfev: int = 300,
) -> FitResult:  # fmt: skip
    """Fit a PSF-convolved bulge + disk model to one background-subtracted stamp.

    Parameters
    ----------
    image, variance : numpy.ndarray
        Square stamp (odd side) centred on the object's peak; variance inf or ≤ 0 where
        there is no data.
    psf_fwhm, psf : float, str
        The PSF (FWHM in arcsec; ``"kolmogorov"`` or ``"moffat"``).
    pixel_scale : float
        Arcsec per pixel.
    max_nfev : int
        Largest number of model evaluations.

    Returns
    -------
    FitResult

    Raises
    ------
    ValueError
        The stamp is not square with an odd side, or has no usable pixel.
    """
    from scipy.optimize import least_squares

    image, variance = np.asarray(image, float), np.asarray(variance, float)
    if image.ndim != 2 or image.shape[0] != image.shape[1] or image.shape[0] % 2 != 1 \
            or variance.shape != image.shape:  # fmt: skip
        msg = f"stamp must be square with an odd side and a variance of its shape, got {image.shape}, {variance.shape}"
        raise ValueError(msg)
    good = np.isfinite(variance) & (variance > 0) & np.isfinite(image)
    if not good.any():
        msg = "stamp has no usable pixel"
        raise ValueError(msg)
    t0 = time.perf_counter()
    size = image.shape[0]
    prof = make_psf(psf, psf_fwhm)
    w = np.where(good, 1.0 / np.sqrt(np.where(good, variance, 1.0)), 0.0)
    data = np.where(good, image, 0.0)
    flux0 = max(float(data.sum()), 1e-3)
    x0 = np.array([flux0, 0.3, math.log(0.25), math.log(0.5), 0.0, 0.0, 0.0, 0.0])
    lo = np.array([0.0, 0.0, _LOG_R[0], _LOG_R[0], -_E_MAX, -_E_MAX, -2.0, -2.0])
    hi = np.array([20 * flux0 + 1.0, 1.0, _LOG_R[1], _LOG_R[1], _E_MAX, _E_MAX, 2.0, 2.0])

    def resid(p):
        return ((_model(p, prof, size, pixel_scale) - data) * w).ravel()

    r = least_squares(resid, x0, bounds=(lo, hi), x_scale=np.array([flux0, 0.3, 0.5, 0.5, 0.2, 0.2, 0.3, 0.3]),
                      max_nfev=max_nfev, diff_step=1e-3)  # fmt: skip
    p = r.x
    dof = max(int(good.sum()) - len(p), 1)
    return FitResult(
        flux=float(p[0]), bulge_fraction=float(p[1]), r_bulge_arcsec=math.exp(p[2]),
        r_disk_arcsec=math.exp(p[3]), ellipticity=min(math.hypot(p[4], p[5]), _E_MAX),
        e1=float(p[4]), e2=float(p[5]), dx=float(p[6]), dy=float(p[7]),
        chi2=float(2 * r.cost / dof), nfev=int(r.nfev), seconds=time.perf_counter() - t0,
        success=bool(r.success),
    )  # fmt: skip
