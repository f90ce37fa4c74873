"""PSF-convolved exponential + de Vaucouleurs model fits and PSF fluxes on object stamps.

A pure, batched torch kernel (CPU or CUDA; no Dask, no I/O). Each model is a mixture of
Gaussians (:mod:`survey_engine.kernels.mog`): the profile's mixture sheared to the
object's shape and convolved with the PSF's mixture and the pixel (a Gaussian of variance
1/12, the box's variance) is again a mixture whose covariances are sums, so a model and
its derivatives are evaluated in closed form on the stamp's pixels.

Per object, :func:`fit_bulge_disk` fits an exponential disk + de Vaucouleurs bulge sharing
a centre and a distortion ``(e1, e2)``, each with its own half-light radius ``r`` (the
geometric mean of the semi-axes), their fluxes linear and non-negative, by a fixed number
of Levenberg–Marquardt iterations (no data-dependent stopping, so a result depends only on
the object's own stamp). :func:`templates` renders the fitted components (and the PSF at
the fitted centre) convolved with any band's PSF as fixed unit-flux templates, and
:func:`linear_fluxes` / :func:`two_fluxes` fit their amplitudes (forced photometry).

Every function works on fixed-size chunks of objects (:data:`CHUNK`, the last padded), so
that an object's numbers never depend on which other objects share its batch.
"""

from __future__ import annotations

import logging

import numpy as np

from .mog import GALAXY_MOG

__all__ = ["CHUNK", "ITERATIONS", "fit_bulge_disk", "linear_fluxes", "templates", "two_fluxes"]

logger = logging.getLogger(__name__)

CHUNK = 64  #: Objects per fixed-size chunk.
ITERATIONS = 8  #: Levenberg–Marquardt iterations per fit.
PIXEL_VAR = 1.0 / 12.0  #: Variance of the pixel box (its Gaussian approximation).
MAX_E = 0.9  #: Largest distortion of a fitted model.
R_MIN = 0.05  #: Smallest half-light radius fitted (pixels).


def _torch():
    import torch

    return torch


def _shape_matrix(p):
    """``(Txx, Txy, Tyy)`` of the profile covariance per unit variance, and their derivatives
    with respect to ``(ln r, e1, e2)``: each ``(N,)``; ``p`` is ``(N, 5)`` ``y, x, ln r, e1, e2``."""
    torch = _torch()
    r2 = torch.exp(2.0 * p[:, 2])
    e1, e2 = p[:, 3], p[:, 4]
    g = torch.rsqrt(1.0 - e1 * e1 - e2 * e2)
    t = (r2 * g * (1.0 + e1), r2 * g * e2, r2 * g * (1.0 - e1))
    g3 = r2 * g**3
    d_lnr = tuple(2.0 * c for c in t)
    d_e1 = (r2 * g + g3 * e1 * (1.0 + e1), g3 * e1 * e2, -r2 * g + g3 * e1 * (1.0 - e1))
    d_e2 = (g3 * e2 * (1.0 + e1), r2 * g + g3 * e2 * e2, g3 * e2 * (1.0 - e1))
    return t, (d_lnr, d_e1, d_e2)


def _render(p, profile: str, psf, size: int, *, jacobian: bool):
    """Unit-flux model ``(N, size²)`` of parameters ``p`` (and its ``(N, size², 5)`` Jacobian).

    ``psf`` is ``(amplitudes, variances)`` in pixels²; ``p[:, :2]`` is the centre relative to
    the stamp's central pixel.
    """
    torch = _torch()
    dtype, dev = p.dtype, p.device
    h = size // 2
    off = torch.arange(-h, h + 1, dtype=dtype, device=dev)
    dy = (off[:, None].expand(size, size).reshape(1, -1) - p[:, 0:1])
    dx = (off[None, :].expand(size, size).reshape(1, -1) - p[:, 1:2])
    t, dt = _shape_matrix(p)
    amps, vars_ = GALAXY_MOG[profile]
    n, m = p.shape[0], size * size
    model = torch.zeros((n, m), dtype=dtype, device=dev)
    if jacobian:
        jy, jx = torch.zeros_like(model), torch.zeros_like(model)
        hxx, hxy, hyy = torch.zeros_like(model), torch.zeros_like(model), torch.zeros_like(model)
    for a_k, v_k in zip(amps, vars_, strict=True):
        for a_j, v_j in zip(psf[0], psf[1], strict=True):
            extra = float(v_j) + PIXEL_VAR
            cxx, cxy, cyy = v_k * t[0] + extra, v_k * t[1], v_k * t[2] + extra
            det = cxx * cyy - cxy * cxy
            ixx, ixy, iyy = (cyy / det)[:, None], (-cxy / det)[:, None], (cxx / det)[:, None]
            ux = (dx * ixx).addcmul_(dy, ixy)
            uy = (dx * ixy).addcmul_(dy, iyy)
            norm = (a_k * float(a_j) / (2.0 * np.pi)) * torch.rsqrt(det)[:, None]
            # exp(-Q/2), clamped: exp underflowing to denormal floats would slow the CPU ~10×.
            g = (dx * ux).addcmul_(dy, uy).mul_(-0.5).clamp_(min=-40.0).exp_().mul_(norm)
            model.add_(g)
            if jacobian:
                jy.addcmul_(g, uy)
                jx.addcmul_(g, ux)
                hxx.addcmul_((ux * ux).sub_(ixx), g, value=0.5 * v_k)
                hxy.addcmul_((ux * uy).sub_(ixy), g, value=v_k)
                hyy.addcmul_((uy * uy).sub_(iyy), g, value=0.5 * v_k)
    if not jacobian:
        return model, None
    shape = [hxx * d[0][:, None] + hxy * d[1][:, None] + hyy * d[2][:, None] for d in dt]
    return model, torch.stack([jy, jx, *shape], dim=-1)


def _chunks(n: int):
    return [(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]


def _pad(a, n: int):
    """``a`` with its first axis padded to ``n`` rows (copies of row 0 — results discarded)."""
    torch = _torch()
    if a.shape[0] == n:
        return a
    return torch.cat([a, a[:1].expand(n - a.shape[0], *a.shape[1:])])


def _initial(img, ivar, size: int):
    """Centre (clamped to ±2 px) and mean square radius from the stamp's positive pixels within
    half the stamp's half-size of its centre."""
    torch = _torch()
    h = size // 2
    off = torch.arange(-h, h + 1, dtype=img.dtype, device=img.device)
    yy = off[:, None].expand(size, size).reshape(1, -1)
    xx = off[None, :].expand(size, size).reshape(1, -1)
    w = torch.where((ivar > 0) & (yy * yy + xx * xx <= (h * 0.5) ** 2), img.clamp(min=0.0), 0.0)
    s = w.sum(1).clamp(min=1e-30)
    cy, cx = (w * yy).sum(1) / s, (w * xx).sum(1) / s
    cy, cx = cy.clamp(-2.0, 2.0), cx.clamp(-2.0, 2.0)
    r2 = (w * ((yy - cy[:, None]) ** 2 + (xx - cx[:, None]) ** 2)).sum(1) / s
    return cy, cx, r2


def fit_bulge_disk(img, ivar, psf, *, iterations: int = ITERATIONS):
    """Fit an exponential disk + de Vaucouleurs bulge, convolved with ``psf``, to every stamp.

    The two components share the centre and the distortion; each has its own half-light
    radius; their fluxes are linear (solved at every step, non-negative). A weak Gaussian
    prior ties ``ln r_dev − ln r_exp`` to ``ln 0.5`` (σ = :data:`PRIOR_SIGMA`), so the
    radius of a component with no flux stays defined.

    Parameters
    ----------
    img, ivar : torch.Tensor
        ``(N, S, S)`` float64 (or float32) stamps (the object's light only) and inverse variances (0:
        no data), centred on each object's peak pixel.
    psf : (numpy.ndarray, numpy.ndarray)
        The PSF mixture: amplitudes and variances in pixels²
        (:func:`~survey_engine.kernels.mog.psf_mixture`).
    iterations : int
        Levenberg–Marquardt iterations (fixed).

    Returns
    -------
    params : torch.Tensor
        ``(N, 6)``: centre ``y, x`` relative to the stamp's central pixel, ``ln r_exp``,
        ``ln r_dev`` (pixels), ``e1, e2``.
    fluxes : torch.Tensor
        ``(N, 2)`` the exponential and de Vaucouleurs fluxes.
    chi2 : torch.Tensor
        ``(N,)`` the fit's χ² (with the prior's term).
    """
    torch = _torch()
    n, size = img.shape[0], img.shape[-1]
    out_p, out_f, out_c = [], [], []
    for s, e in _chunks(n):
        d = _pad(img[s:e].reshape(e - s, -1), CHUNK)
        w = _pad(ivar[s:e].reshape(e - s, -1), CHUNK)
        p, f, c = _fit_chunk(d, w, psf, size, iterations)
        out_p.append(p[: e - s])
        out_f.append(f[: e - s])
        out_c.append(c[: e - s])
    if not out_p:
        z = torch.zeros(0, dtype=img.dtype, device=img.device)
        return (torch.zeros((0, 6), dtype=img.dtype, device=img.device),
                torch.zeros((0, 2), dtype=img.dtype, device=img.device), z)  # fmt: skip
    return torch.cat(out_p), torch.cat(out_f), torch.cat(out_c)


PRIOR_SIGMA = 0.7  #: σ of the prior on ln(r_dev / r_exp) about ln 0.5.
_EXP_IDX, _DEV_IDX = [0, 1, 2, 4, 5], [0, 1, 3, 4, 5]


def two_fluxes(d, w, t1, t2):
    """Best non-negative amplitudes of two templates ``(N, M)`` in data ``d`` with weights ``w``.

    Where the unconstrained solution has a negative amplitude, the better single template
    alone (its amplitude of either sign).
    """
    torch = _torch()
    a11, a22, a12 = (w * t1 * t1).sum(1), (w * t2 * t2).sum(1), (w * t1 * t2).sum(1)
    b1, b2 = (w * t1 * d).sum(1), (w * t2 * d).sum(1)
    det = a11 * a22 - a12 * a12
    ok = det > 1e-6 * (a11 * a22).clamp(min=1e-30)
    sd = torch.where(ok, det, 1.0)
    f1, f2 = (a22 * b1 - a12 * b2) / sd, (a11 * b2 - a12 * b1) / sd
    s1 = b1 / a11.clamp(min=1e-30)
    s2 = b2 / a22.clamp(min=1e-30)
    use2 = b2 * s2 > b1 * s1
    both = ok & (f1 >= 0) & (f2 >= 0)
    f1 = torch.where(both, f1, torch.where(use2, 0.0, s1))
    f2 = torch.where(both, f2, torch.where(use2, s2, 0.0))
    return f1, f2


def _fit_chunk(d, w, psf, size: int, iterations: int):
    torch = _torch()
    dt = d.dtype
    cy, cx, r2 = _initial(d, w, size)
    psf_r2 = float(np.sum(np.asarray(psf[0]) * np.asarray(psf[1]))) * 2.0 + 2 * PIXEL_VAR
    lnr = 0.5 * torch.log(((r2 - psf_r2).clamp(min=0.25)) * 0.69)
    z = torch.zeros_like(cy)
    p = torch.stack([cy, cx, lnr, lnr + float(np.log(0.5)), z, z], 1).to(torch.float64)
    dev = d.device
    lo = torch.tensor([-4.0, -4.0, np.log(R_MIN), np.log(R_MIN), -MAX_E, -MAX_E], dtype=torch.float64, device=dev)
    hi = torch.tensor([4.0, 4.0, np.log(size), np.log(size), MAX_E, MAX_E], dtype=torch.float64, device=dev)
    prior_v = torch.tensor([0, 0, -1.0, 1.0, 0, 0, 0, 0], dtype=torch.float64, device=dev)
    inv_s2 = 1.0 / PRIOR_SIGMA**2

    def evaluate(q):
        qd = q.to(dt)
        me, je = _render(qd[:, _EXP_IDX], "exp", psf, size, jacobian=True)
        md, jd = _render(qd[:, _DEV_IDX], "dev", psf, size, jacobian=True)
        fe, fd = two_fluxes(d, w, me, md)
        r = d - fe[:, None] * me - fd[:, None] * md
        delta = q[:, 3] - q[:, 2] - float(np.log(0.5))
        chi2 = (w * r * r).sum(1).to(torch.float64) + inv_s2 * delta * delta
        return (me, je, md, jd, fe, fd, r, delta), chi2

    state, chi2 = evaluate(p)
    lam = torch.full((d.shape[0],), 1e-2, dtype=torch.float64, device=dev)
    eye = torch.eye(8, dtype=torch.float64, device=dev)
    for _ in range(iterations):
        me, je, md, jd, fe, fd, r, delta = state
        fe3, fd3 = fe[:, None, None], fd[:, None, None]
        shared = fe3 * je[:, :, [0, 1, 3, 4]] + fd3 * jd[:, :, [0, 1, 3, 4]]
        jfull = torch.cat([shared[:, :, :2], fe3 * je[:, :, 2:3], fd3 * jd[:, :, 2:3],
                           shared[:, :, 2:], me[:, :, None], md[:, :, None]], dim=-1)  # fmt: skip
        jw = jfull * w[:, :, None]
        a = torch.einsum("nmi,nmj->nij", jw, jfull).to(torch.float64)
        g = torch.einsum("nmi,nm->ni", jw, r).to(torch.float64)
        a = a + inv_s2 * prior_v[:, None] * prior_v[None, :]
        g = g - inv_s2 * delta[:, None] * prior_v[None, :]
        diag = torch.diagonal(a, dim1=1, dim2=2).clamp(min=1e-9)
        damp = a + lam[:, None, None] * torch.diag_embed(diag) + 1e-9 * eye
        step = torch.linalg.solve(damp, g[:, :, None])[:, :6, 0]
        step = torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)
        trial = p + step
        e = torch.sqrt(trial[:, 4] ** 2 + trial[:, 5] ** 2)
        scale = torch.where(e > MAX_E, MAX_E / e.clamp(min=1e-12), torch.ones_like(e))
        trial = torch.cat([trial[:, :4], trial[:, 4:6] * scale[:, None]], 1)
        trial = torch.maximum(torch.minimum(trial, hi), lo)
        t_state, t_chi2 = evaluate(trial)
        better = torch.isfinite(t_chi2) & (t_chi2 < chi2)
        p = torch.where(better[:, None], trial, p)
        state = tuple(torch.where(better.view(-1, *([1] * (new.dim() - 1))), new, old)
                      for new, old in zip(t_state, state, strict=True))  # fmt: skip
        chi2 = torch.where(better, t_chi2, chi2)
        lam = torch.where(better, lam * 0.3, lam * 10.0).clamp(1e-6, 1e8)
    return p.to(dt), torch.stack([state[4], state[5]], 1), chi2.to(dt)


def templates(params, psf, size: int):
    """Unit-flux exponential and de Vaucouleurs templates ``(N, S²)`` of fitted ``params``
    (:func:`fit_bulge_disk`) convolved with ``psf``, and the PSF at their centre."""
    torch = _torch()
    n = params.shape[0]
    out = ([], [], [])
    for s, e in _chunks(n):
        p = _pad(params[s:e], CHUNK)
        point = torch.cat([p[:, :2], torch.full_like(p[:, :1], -30.0), torch.zeros_like(p[:, :2])], 1)
        for o, q, prof in ((out[0], p[:, _EXP_IDX], "exp"), (out[1], p[:, _DEV_IDX], "dev"),
                           (out[2], point, "exp")):  # fmt: skip
            o.append(_render(q, prof, psf, size, jacobian=False)[0][: e - s])
    if not n:
        z = torch.zeros((0, size * size), dtype=params.dtype, device=params.device)
        return z, z, z
    return tuple(torch.cat(o) for o in out)


def linear_fluxes(img, ivar, template):
    """Weighted least-squares amplitude of a unit-flux ``template`` in each stamp, and its variance.

    Parameters
    ----------
    img, ivar : torch.Tensor
        ``(N, S, S)`` stamps and inverse variances.
    template : torch.Tensor
        ``(N, S²)`` unit-flux templates (:func:`templates`).

    Returns
    -------
    flux, variance : torch.Tensor
        ``(N,)``; NaN where the template has no weight.
    """
    torch = _torch()
    d, w = img.reshape(img.shape[0], -1), ivar.reshape(ivar.shape[0], -1)
    a = (w * template * template).sum(1)
    b = (w * template * d).sum(1)
    ok = a > 0
    nan = torch.full_like(a, float("nan"))
    return torch.where(ok, b / torch.where(ok, a, 1.0), nan), torch.where(ok, 1.0 / torch.where(ok, a, 1.0), nan)
