"""Per-band survey parameters of the simulator: PSF, depth, noise, gain and saturation.

All the numbers that tie a band to its pixels live here, so the scene model, the drawing kernel
and the mosaic attributes agree on one definition. The noise model (sky σ from the 5σ depth, the
effective gain of the source Poisson noise) is described in ``docs/simulation.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..mosaic import _raise_if

__all__ = [
    "DEPTH_OFFSET", "EFFECTIVE_WAVELENGTH_NM", "LSST_BANDS", "SATURATION_MAG", "SKY_MAG",
    "ZERO_POINT", "BandSetup", "band_setups", "parse_bands",
]  # fmt: skip

LSST_BANDS: tuple[str, ...] = ("u", "g", "r", "i", "z", "y")  #: The LSST filters, blue to red.
#: Effective wavelengths (nm) of the LSST filters; the PSF FWHM scales as λ^-0.2.
EFFECTIVE_WAVELENGTH_NM = {"u": 367.0, "g": 482.5, "r": 622.2, "i": 754.5, "z": 869.1, "y": 971.0}
#: 5σ depth of each band relative to r (LSST 10-year design, Ivezić et al. 2019, table 1).
DEPTH_OFFSET = {"u": -1.4, "g": -0.1, "r": 0.0, "i": -0.7, "z": -1.4, "y": -2.6}
#: Dark-sky surface brightness (AB mag / arcsec²) used to set the effective gain.
SKY_MAG = {"u": 22.99, "g": 22.26, "r": 21.20, "i": 20.48, "z": 19.60, "y": 18.61}
ZERO_POINT = 28.0  #: AB magnitude of one image unit (``count``), the same in every band.
SATURATION_MAG = 17.0  #: A pixel-centred point source of this mag peaks at the saturation level.
MOFFAT_BETA = 3.5  #: Moffat β of the ``psf="moffat"`` option.
PSF_KINDS = ("kolmogorov", "moffat")  #: The PSF models on offer.
#: Noise-equivalent area of a Gaussian PSF in units of FWHM².
NEA_FACTOR = 4.0 * math.pi / (8.0 * math.log(2.0))


@dataclass(frozen=True)
class BandSetup:
    """Everything the drawing kernel needs to know about one band.

    Attributes
    ----------
    name : str
        Band name (one of ``ugrizy``).
    code : int
        Position of the band in :data:`LSST_BANDS` (used in noise seeds, so that
        a band's noise does not depend on which other bands are simulated).
    zero_point, depth : float
        AB magnitude of one count; 5σ point-source depth (AB mag).
    psf_fwhm, sky_sigma : float
        PSF FWHM in arcsec; sky noise per pixel (counts).
    gain, saturation : float
        Effective electrons per count for the source Poisson noise; pixel level (counts) at and
        above which a pixel is saturated.
    """

    name: str
    code: int
    zero_point: float
    psf_fwhm: float
    depth: float
    sky_sigma: float
    gain: float
    saturation: float


def parse_bands(bands: str | Sequence[str]) -> tuple[str, ...]:
    """Validate band names: a non-empty sequence (or ``"g,r,i"`` string) of unique ``ugrizy``.

    Parameters
    ----------
    bands : str or sequence of str

    Returns
    -------
    tuple of str
    """
    if isinstance(bands, str):
        bands = [b.strip() for b in bands.split(",") if b.strip()]
    try:
        names = tuple(bands)
    except TypeError:
        msg = f"bands must be a sequence of band names, got {bands!r}"
        raise TypeError(msg) from None
    _raise_if(not names, "bands must name at least one band")
    for b in names:
        _raise_if(not isinstance(b, str) or b not in LSST_BANDS, _unknown_band(b))
    _raise_if(len(set(names)) != len(names), f"band names must be unique, got {list(names)}")
    return names


def _unknown_band(band) -> str:
    """The message for a band name that is not one of ``ugrizy``."""
    return f"unknown band {band!r}: bands must be among {', '.join(LSST_BANDS)}"


def psf_fwhm_for(band: str, r_fwhm: float) -> float:
    """PSF FWHM (arcsec) in ``band`` for an r-band FWHM ``r_fwhm``: seeing ∝ λ^-0.2."""
    return r_fwhm * (EFFECTIVE_WAVELENGTH_NM[band] / EFFECTIVE_WAVELENGTH_NM["r"]) ** -0.2


def make_psf(kind: str, fwhm: float, gsparams=None):
    """The GalSim PSF profile (unit flux) of one band.

    Parameters
    ----------
    kind : {"kolmogorov", "moffat"}
        Kolmogorov turbulence or a Moffat with β = 3.5.
    fwhm : float
        FWHM in arcsec.
    gsparams : galsim.GSParams, optional

    Returns
    -------
    galsim.GSObject
    """
    import galsim

    if kind == "kolmogorov":
        return galsim.Kolmogorov(fwhm=fwhm, gsparams=gsparams)
    return galsim.Moffat(beta=MOFFAT_BETA, fwhm=fwhm, gsparams=gsparams)


def _sky_noise(band: str, m5: float, fwhm_px: float, pixel_scale: float) -> tuple[float, float]:
    """(sky σ per pixel, effective gain) of ``band`` at 5σ depth ``m5`` (``docs/simulation.md``)."""
    f5 = 10.0 ** (-0.4 * (m5 - ZERO_POINT))  # counts of a 5σ point source
    sky_sigma = f5 / (5.0 * math.sqrt(NEA_FACTOR * fwhm_px**2))
    sky_per_pixel = 10.0 ** (-0.4 * (SKY_MAG[band] - ZERO_POINT)) * pixel_scale**2
    return sky_sigma, sky_per_pixel / sky_sigma**2


def band_setups(
    bands: Sequence[str], *, depth: float | Mapping[str, float], psf: str, psf_fwhm: float,
    pixel_scale: float,
) -> tuple[BandSetup, ...]:  # fmt: skip
    """Per-band PSF, noise, gain and saturation for a simulated survey.

    Parameters
    ----------
    bands : sequence of str
        Validated band names.
    depth : float or mapping
        r-band 5σ depth (other bands offset by :data:`DEPTH_OFFSET`), or a
        ``{band: depth}`` mapping covering every band.
    psf : {"kolmogorov", "moffat"}
    psf_fwhm, pixel_scale : float
        r-band PSF FWHM (arcsec); arcsec per pixel.

    Returns
    -------
    tuple of BandSetup
    """
    out = []
    for band in bands:
        m5 = float(depth[band]) if isinstance(depth, Mapping) else float(depth) + DEPTH_OFFSET[band]
        fwhm = psf_fwhm_for(band, psf_fwhm)
        sky_sigma, gain = _sky_noise(band, m5, fwhm / pixel_scale, pixel_scale)
        n = 2 * math.ceil(3 * fwhm / pixel_scale) + 1  # peak: brightest pixel of a centred star
        peak = float(make_psf(psf, fwhm).drawImage(nx=n, ny=n, scale=pixel_scale).array.max())
        saturation = float(f"{10.0 ** (-0.4 * (SATURATION_MAG - ZERO_POINT)) * peak:.4g}")
        out.append(BandSetup(
            name=band, code=LSST_BANDS.index(band), zero_point=ZERO_POINT, psf_fwhm=fwhm,
            depth=m5, sky_sigma=sky_sigma, gain=gain, saturation=saturation,
        ))  # fmt: skip
    return tuple(out)
