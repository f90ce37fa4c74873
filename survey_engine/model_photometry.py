"""The engine's hook: model-fit total fluxes and PSF fluxes of every object of a batch of windows.

Stage 4c of :func:`survey_engine.stages.analyse_windows`, run for both backends. Per object:

1. **stamps** — the ``S × S`` block of every band's background-subtracted image around the
   object's peak pixel (15 × 15 px for footprints of at most :data:`SMALL_AREA` pixels,
   else 25 × 25, :data:`MODEL_SIZE`; by the integer area, the same for both backends),
   holding only the object's
   light: pixels of its parent's footprint weighted by its share of them (the symmetric
   templates of :func:`~survey_engine.deblend.rules.share_weights`, as for
   ``deblended_flux``; weight 1 for an isolated object), pixels of other parents'
   footprints and unusable pixels masked (inverse variance 0), pixels outside every
   footprint kept as they are;
2. **shape** — an exponential disk + de Vaucouleurs bulge convolved with the reference
   band's PSF fitted to the reference band's stamp
   (:func:`~survey_engine.kernels.model_fit.fit_bulge_disk`);
3. **forced fluxes** — in every band, the fitted shape convolved with that band's PSF is a
   fixed template (the bulge fraction from the reference band, like CModel's
   ``fracDev``); its least-squares amplitude is the band's **total flux**, and the PSF's
   amplitude at the fitted centre the band's **PSF flux**.

One rule (:func:`total_flux`): where the fit failed — no PSF recorded for the band, too few
usable pixels, a non-finite result, a component with ≥ 10 % of the flux at the largest
radius fitted (the stamp's side) — the total flux is the Kron flux and the band's
``MODEL_FAILED`` flag is set.

The kernel runs in torch on the backend's device (the numpy backend on the CPU), in fixed
chunks, on stamps cut on the host from the same numpy planes for both backends, so an
object's numbers depend only on its own pixels: the same under any tiling and batching, and
the same bits from the two backends on a CPU. It runs in float64: the fixed sequence of
Levenberg–Marquardt steps accepts a step where its χ² is lower, and in float32 last-bit
differences between CPUs' code paths (AVX2 vs AVX-512) flipped those choices for a few % of
objects and moved their exp/dev split by up to tens of % (measured on the demo mosaic).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .deblend import rules
from .kernels.mog import psf_mixture
from .schema import Flag

__all__ = ["MODEL_HALF", "MODEL_SIZE", "BandPSF", "model_fluxes", "object_stamps", "total_flux"]

logger = logging.getLogger(__name__)

MODEL_HALF = 12  #: Pixels from the peak to the edge of a model-fit stamp.
MODEL_SIZE = 2 * MODEL_HALF + 1  #: Stamp side.
MIN_PIXELS = 9  #: Fewest usable stamp pixels for a fit.
SMALL_AREA = 80  #: Objects of at most this footprint area (pixels) are fitted on small stamps,
SMALL_HALF = 7  #: of this half-size (15 × 15 px; the cost of a fit grows with the stamp's area).


@dataclass(frozen=True)
class BandPSF:
    """The PSF of one band as recorded in the mosaic: ``kind`` (None: only the FWHM known,
    a Gaussian is used) and FWHM in pixels."""

    kind: str | None
    fwhm_pix: float

    def mixture(self):
        """Amplitudes and variances (pixels²) of its Gaussian mixture."""
        return psf_mixture(self.kind, self.fwhm_pix)


def band_psfs(mosaic_attrs: dict, bands: Sequence[str], psf_fwhm_pix: dict) -> tuple:
    """Per band the :class:`BandPSF` recorded in a mosaic (None where unknown).

    Parameters
    ----------
    mosaic_attrs : dict
        The mosaic's attributes: the PSF kind (``psf_kind``, or the simulation's ``psf``).
    bands : sequence of str
        The bands, in mosaic order.
    psf_fwhm_pix : dict
        PSF FWHM in pixels per band (:attr:`survey_engine.mosaic.Mosaic.psf_fwhm_pix`).
    """
    kind = mosaic_attrs.get("psf_kind") or (mosaic_attrs.get("simulation") or {}).get("psf")
    out = []
    for b in bands:
        fwhm = psf_fwhm_pix.get(b)
        out.append(BandPSF(kind, float(fwhm)) if fwhm is not None and float(fwhm) > 0 else None)
    return tuple(out)


def object_stamps(res, det, images, variances, y_peak, x_peak, origin, *, half: int = MODEL_HALF,
                  select=None):  # fmt: skip
    """``(n, band, S, S)`` float64 image stamps holding only each object's light, and inverse variances.

    Parameters
    ----------
    res : DetectionResult
        Children and parents of the window.
    det : numpy.ndarray
        ``(H, W)`` detection image (for the shares of blended parents).
    images, variances : numpy.ndarray
        ``(band, H, W)`` background-subtracted images (0 where unusable) and variances (not
        finite where unusable).
    y_peak, x_peak : numpy.ndarray of int
        Peak pixels in window coordinates.
    origin : (int, int)
        Mosaic pixel of the window's first pixel.
    half : int
        Stamp half-size.
    select : numpy.ndarray of bool, optional
        The objects to cut stamps of (default: all).

    Returns
    -------
    img, ivar : numpy.ndarray
    """
    nb, h, w = images.shape
    s = 2 * half + 1
    off = np.arange(-half, half + 1)
    yy = np.asarray(y_peak, np.int64)[:, None, None] + off[None, :, None]
    xx = np.asarray(x_peak, np.int64)[:, None, None] + off[None, None, :]
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    flat = np.where(inside, np.clip(yy, 0, h - 1) * w + np.clip(xx, 0, w - 1), 0)
    parents = res.parents.ravel()[flat]
    own = parents == res.parent[:, None, None]
    weight = np.where(own, 1.0, 0.0)
    weight[parents == 0] = 1.0
    shares = rules.share_weights(res, det, origin)
    if shares is not None:
        multi, child, pix, wgt, owner, rest = shares
        weight[multi] = np.where(own[multi], 0.0, weight[multi])
        cy, cx = np.asarray(y_peak, np.int64), np.asarray(x_peak, np.int64)
        for c, p, v in ((child, pix, wgt), (owner, rest, np.ones(len(rest)))):
            sy, sx = p // w - cy[c] + half, p % w - cx[c] + half
            ok = (sy >= 0) & (sy < s) & (sx >= 0) & (sx < s)
            weight[c[ok], sy[ok], sx[ok]] = v[ok]
    if select is not None:
        sel = np.flatnonzero(select)
        flat, parents, own, weight, inside = flat[sel], parents[sel], own[sel], weight[sel], inside[sel]
    keep = inside & ((parents == 0) | own)
    img = images.reshape(nb, -1)[:, flat].astype(np.float64)  # (band, n, S, S)
    var = variances.reshape(nb, -1)[:, flat].astype(np.float64)
    good = keep[None] & np.isfinite(var) & (var > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ivar = np.where(good, 1.0 / np.where(good, var, 1.0), 0.0)
    img = np.where(good, img * weight[None], 0.0)
    return (np.ascontiguousarray(img.transpose(1, 0, 2, 3), dtype=np.float64),
            np.ascontiguousarray(ivar.transpose(1, 0, 2, 3), dtype=np.float64))  # fmt: skip


def total_flux(model, model_err, kron, kron_err, failed):
    """The rule for the total flux: the model flux, or the Kron flux where the fit ``failed``."""
    return np.where(failed, kron, model), np.where(failed, kron_err, model_err)


def model_fluxes(det, images, variances, results, meas_list, origins, bands, psfs, ref: int,
                 device: str) -> None:  # fmt: skip
    """Add the model-fit columns to each window's measurements (in place).

    Per band ``flux``/``flux_err`` (the total flux, :func:`total_flux`), ``model_flux``,
    ``exp_flux``, ``dev_flux``, ``psf_flux``/``psf_flux_err``, the ``MODEL_FAILED`` flag;
    per object ``frac_dev``, ``model_r_exp``, ``model_r_dev`` (pixels) and ``model_e1``,
    ``model_e2`` (before the PSF).

    Parameters
    ----------
    det, images, variances : numpy.ndarray
        ``(B, H, W)`` detection images, ``(B, band, H, W)`` images and variances (host).
    results : list of DetectionResult
    meas_list : list of Measurements
        Peaks in window pixels; per band ``kron_flux``/``kron_flux_err`` set.
    origins : list of (int, int)
        Mosaic pixel of each window's first pixel.
    bands : tuple of str
    psfs : sequence of BandPSF or None
        Per band.
    ref : int
        Index of the reference band (the shape's band).
    device : str
        Torch device of the fits.
    """
    import torch


    counts = [r.n_objects for r in results]
    n = sum(counts)
    nb = len(bands)
    out = {k: np.full((n, nb), np.nan) for k in ("model_flux", "model_flux_err", "exp_flux",
                                                 "dev_flux", "psf_flux", "psf_flux_err")}  # fmt: skip
    obj = {k: np.full(n, np.nan, np.float32) for k in ("frac_dev", "model_r_exp", "model_r_dev",
                                                       "model_e1", "model_e2")}  # fmt: skip
    failed = np.ones((n, nb), bool)
    if n and psfs[ref] is not None:
        area = np.concatenate([m.columns["area"] for m, k in zip(meas_list, counts, strict=True) if k])
        for half, pick in ((SMALL_HALF, area <= SMALL_AREA), (MODEL_HALF, area > SMALL_AREA)):
            rows = np.flatnonzero(pick)
            if len(rows) == 0:
                continue
            parts, start = [], 0
            for b, (r, m, o) in enumerate(zip(results, meas_list, origins, strict=True)):
                sel = pick[start : start + r.n_objects]
                start += r.n_objects
                if sel.any():
                    parts.append(object_stamps(r, det[b], images[b], variances[b], m.columns["y_peak"],
                                               m.columns["x_peak"], o, half=half, select=sel))  # fmt: skip
            img = torch.from_numpy(np.concatenate([p[0] for p in parts])).to(device)
            ivar = torch.from_numpy(np.concatenate([p[1] for p in parts])).to(device)
            _fit_class(img, ivar, psfs, ref, 2 * half + 1, rows, out, obj, failed)
        logger.debug("model fits of %d objects on %s", n, device)
    start = 0
    for m, k in zip(meas_list, counts, strict=True):
        sl = slice(start, start + k)
        m.columns.update({name: v[sl].astype(np.float32) for name, v in obj.items()})
        start += k
        if k == 0:  # an empty window has no band columns
            continue
        m.columns["flags"] = m.columns["flags"] | np.where(failed[sl, ref], int(Flag.MODEL_FAILED), 0)
        for bi, band in enumerate(bands):
            col = m.bands[band]
            for name, v in out.items():
                col[name] = v[sl, bi]
            col["flux"], col["flux_err"] = total_flux(col["model_flux"], col["model_flux_err"],
                                                      col["kron_flux"], col["kron_flux_err"], failed[sl, bi])  # fmt: skip
            col["flags"] = col["flags"] | np.where(failed[sl, bi], int(Flag.MODEL_FAILED), 0)


def _fit_class(img, ivar, psfs, ref: int, size: int, rows, out, obj, failed) -> None:
    """Fit the stamps ``img``/``ivar`` ``(N, band, S, S)`` of objects ``rows`` and write the
    results into the rows of ``out``, ``obj`` and ``failed``."""
    import torch

    from .kernels import model_fit as mf

    params, comp, _ = mf.fit_bulge_disk(img[:, ref], ivar[:, ref], psfs[ref].mixture())
    tot = comp.sum(1)
    frac = torch.where(tot > 0, comp[:, 1] / torch.where(tot > 0, tot, 1.0), 0.0).clamp(0.0, 1.0)
    npix = (ivar[:, ref] > 0).flatten(1).sum(1)
    # A component with ≥ 10 % of the flux at the largest radius fitted: no measure of its extent.
    at_bound = params[:, 2:4] >= float(np.log(size)) - 0.01
    big = (at_bound & (torch.stack([1.0 - frac, frac], 1) >= 0.1)).any(1)
    bad_ref = ~torch.isfinite(params).all(1) | ~torch.isfinite(comp).all(1) | (npix < MIN_PIXELS) | big
    for bi, psf in enumerate(psfs):
        if psf is None:
            continue
        t_exp, t_dev, t_psf = mf.templates(params, psf.mixture(), size)
        d, w = img[:, bi].flatten(1), ivar[:, bi].flatten(1)
        f, v = mf.linear_fluxes(d, w, (1.0 - frac[:, None]) * t_exp + frac[:, None] * t_dev)
        fe, fd = mf.two_fluxes(d, w, t_exp, t_dev)
        fp, vp = mf.linear_fluxes(d, w, t_psf)
        vals = {"model_flux": f, "model_flux_err": v.sqrt(), "exp_flux": fe, "dev_flux": fd,
                "psf_flux": fp, "psf_flux_err": vp.sqrt()}  # fmt: skip
        for k, t in vals.items():
            out[k][rows, bi] = t.double().cpu().numpy()
        failed[rows, bi] = (bad_ref | ~torch.isfinite(f) | ~torch.isfinite(v)).cpu().numpy()
    p = params.double().cpu().numpy()
    for k, v in (("frac_dev", frac.cpu().numpy()), ("model_r_exp", np.exp(p[:, 2])),
                 ("model_r_dev", np.exp(p[:, 3])), ("model_e1", p[:, 4]), ("model_e2", p[:, 5])):  # fmt: skip
        obj[k][rows] = v
