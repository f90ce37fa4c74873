"""Mixture-of-Gaussians (MoG) approximations of galaxy profiles and PSFs.

A circular profile ``I(r)`` of unit flux is approximated by ``Σ_k a_k N(r; v_k)`` (2-D
circular Gaussians of variance ``v_k`` and flux ``a_k``, ``Σ a_k = 1``), so that a sheared,
PSF-convolved model is again a sum of Gaussians with covariances added — convolution is
analytic (:mod:`survey_engine.kernels.model_fit`). Radii are in units of the profile's
half-light radius (galaxies) or FWHM (PSFs).

The tables below were fitted by :func:`regenerate` (``python -m
survey_engine.kernels.mog``) to GalSim's exact profiles: the exponential, the de
Vaucouleurs truncated at 8 half-light radii (as the simulator draws its bulges), the
Kolmogorov and the β = 3.5 Moffat PSF. The fit minimises the squared difference of the
profiles weighted by ``r`` (flux per annulus), with the amplitudes summing to one.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["GALAXY_MOG", "PSF_MOG", "fit_mixture", "psf_mixture", "regenerate"]

logger = logging.getLogger(__name__)

#: ``{profile: (amplitudes, variances)}``, variances in units of the half-light radius squared.
GALAXY_MOG: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "exp": ((0.0006597235215118595, 0.008500136452974169, 0.05675136486280093,
             0.22909260436433268, 0.4610672357017496, 0.24392893509663052),
            (0.0026960393976203224, 0.019829192959361593, 0.08679770684347773,
             0.2965208377596833, 0.8719991622625397, 2.3668135951639426)),
    "dev": ((0.00016596777898380543, 0.0014492900197698828, 0.007422386009435475,
             0.027512706099232148, 0.07936424102800603, 0.18126344855402637,
             0.31837556919197196, 0.3844463913185743),
            (2.4022375691959732e-06, 3.788861476515356e-05, 0.0003429025593338031,
             0.0024248183566233563, 0.015301110434830584, 0.09462540692447187,
             0.6409958119106396, 6.19028191977873)),
}  # fmt: skip

#: ``{psf kind: (amplitudes, variances)}``, variances in units of the FWHM squared.
PSF_MOG: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "gaussian": ((1.0,), (1.0 / (8.0 * np.log(2.0)),)),
    "kolmogorov": ((0.5558982358484258, 0.3697434921336491, 0.07435827201792514),
                   (0.15216962538242634, 0.3666176459968236, 2.4316692047946877)),
    "moffat": ((0.24198208673887545, 0.5782305263557594, 0.17978738690536505),
               (0.11341419876295726, 0.2825224569071543, 0.9403087143272201)),
}  # fmt: skip


def fit_mixture(radius: np.ndarray, profile: np.ndarray, k: int, seed_var: np.ndarray):
    """Amplitudes and variances of a ``k``-Gaussian mixture fitted to a circular profile.

    Parameters
    ----------
    radius, profile : numpy.ndarray
        The profile ``I(r)`` of unit total flux sampled on ``radius``.
    k : int
        Number of Gaussians.
    seed_var : numpy.ndarray
        ``k`` starting variances.

    Returns
    -------
    amplitudes, variances : numpy.ndarray
        Sorted by variance; amplitudes sum to 1.
    """
    from scipy.optimize import least_squares

    r = np.asarray(radius, float)
    w = np.sqrt(np.maximum(r, 1e-6) * np.gradient(r))

    def model(p):
        a = np.exp(p[:k] - p[:k].max())
        a = a / a.sum()
        v = np.exp(np.clip(p[k:], -40.0, 40.0))
        return (a[None] / (2 * np.pi * v[None]) * np.exp(-0.5 * r[:, None] ** 2 / v[None])).sum(1)

    p0 = np.concatenate([np.zeros(k), np.log(seed_var)])
    fit = least_squares(lambda p: (model(p) - profile) * w, p0, method="lm", max_nfev=20000,
                        xtol=1e-14, ftol=1e-14)  # fmt: skip
    a = np.exp(fit.x[:k] - fit.x[:k].max())
    a, v = a / a.sum(), np.exp(fit.x[k:])
    order = np.argsort(v)
    return a[order], v[order]


def regenerate() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fit the tables of this module again from GalSim's exact profiles (needs GalSim)."""
    import galsim

    out = {}
    cases = {
        "exp": (galsim.Exponential(half_light_radius=1.0), 6, 8.0),
        "dev": (galsim.DeVaucouleurs(half_light_radius=1.0, trunc=8.0), 8, 8.0),
        "kolmogorov": (galsim.Kolmogorov(fwhm=1.0), 3, 8.0),
        "moffat": (galsim.Moffat(beta=3.5, fwhm=1.0), 3, 8.0),
    }
    for name, (prof, k, rmax) in cases.items():
        r = np.concatenate([np.linspace(0, 0.2, 400, endpoint=False), np.geomspace(0.2, rmax, 2000)])
        p = np.array([prof.xValue(galsim.PositionD(x, 0.0)) for x in r]) / prof.flux
        out[name] = fit_mixture(r, p, k, np.geomspace(1e-3, 4.0, k))
        logger.info("%s: %s", name, out[name])
    return out


def psf_mixture(kind: str | None, fwhm_pix: float) -> tuple[np.ndarray, np.ndarray]:
    """Amplitudes and variances (pixels²) of the PSF of ``kind`` with FWHM ``fwhm_pix`` pixels.

    ``kind`` None or unknown: a Gaussian of that FWHM (only the FWHM is recorded).
    """
    a, v = PSF_MOG.get(str(kind).lower() if kind else "gaussian", PSF_MOG["gaussian"])
    return np.asarray(a, float), np.asarray(v, float) * float(fwhm_pix) ** 2


if __name__ == "__main__":  # pragma: no cover
    np.set_printoptions(precision=17)
    for name, (a, v) in regenerate().items():
        print(f'"{name}": ({tuple(float(x) for x in a)},\n    {tuple(float(x) for x in v)}),')
