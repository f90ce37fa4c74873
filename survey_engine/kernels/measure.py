"""Measurement of labelled sources, vectorised over sources (pure numpy/sep).

:func:`measure_sources` returns every catalog column that does not need the WCS: footprint
quantities by segment reductions (``np.bincount``: area, peak, isophotal flux, barycentre,
moments), aperture quantities with sep's C routines, neighbours masked through the label
image (Kron radius and flux, apertures, half-light radius, windowed centroid); every band
on the detection footprints and apertures (forced photometry).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import sep
from scipy import ndimage

from ..schema import Flag, aper_tag
from . import compiled
from .detect import matched_filter

__all__ = ["MeasureConfig", "Measurements", "matched_filter_at", "measure_sources", "measurements_from",
           "windowed_centroid"]  # fmt: skip


@dataclass(frozen=True)
class MeasureConfig:
    """Measurement parameters.

    Attributes
    ----------
    apertures : tuple of float
        Circular aperture radii in pixels.
    kron_factor : float
        Kron aperture = ``kron_factor × kron_radius`` (in units of a, b).
    kron_min : float
        Minimum Kron aperture (units of a, b), SExtractor's second AUTO parameter.
    kron_max_radius : float
        Ellipse (units of a, b) within which the Kron radius is computed.
    window_iterations : int
        Maximum iterations of the windowed centroid.
    """

    apertures: tuple[float, ...] = (3.0, 6.0, 12.0)
    kron_factor: float = 2.5
    kron_min: float = 3.5
    kron_max_radius: float = 6.0
    window_iterations: int = 16

    def __post_init__(self):
        if not self.apertures or any((not np.isfinite(r)) or r <= 0 for r in self.apertures):
            msg = f"apertures must be positive radii in pixels, got {self.apertures!r}"
            raise ValueError(msg)

    @property
    def max_aperture(self) -> float:
        """Largest circular aperture radius."""
        return float(max(self.apertures))


@dataclass
class Measurements:
    """Per-object measurements in window pixel coordinates."""

    columns: dict[str, np.ndarray] = field(default_factory=dict)
    bands: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    bbox: np.ndarray | None = None  # (n, 4) y0, y1, x0, x1 of the footprint (window coords)
    extent: np.ndarray | None = None  # (n,) radius around (x, y) read by the apertures


def _peaks(labels: np.ndarray, values: np.ndarray, n: int):
    """Peak pixel (brightest, ties: lowest index) of every label, and the footprint pixels.

    Returns ``py, px, peak value, flat indices of the labelled pixels, their labels, boxes``.
    """
    flat, lab, peak_idx, peak_val, bbox = compiled.peaks(labels, values, n)
    w = labels.shape[1]
    return peak_idx // w, peak_idx % w, peak_val.astype(np.float64), flat, lab, bbox


def measure_sources(
    det: np.ndarray, det_var: np.ndarray, det_bad: np.ndarray, images: np.ndarray,
    variances: np.ndarray, masks: np.ndarray, labels: np.ndarray, bands: tuple[str, ...],
    cfg: MeasureConfig, *, usable_bits: int, sat_bit: int, origin: tuple[int, int] = (0, 0),
    filtered: np.ndarray | None = None,
) -> Measurements:  # fmt: skip
    """Measure every labelled object of a window.

    Parameters
    ----------
    det, det_var : numpy.ndarray
        2-D background-subtracted detection image and variance.
    det_bad : numpy.ndarray of bool
        Pixels with no usable detection data.
    images, variances : numpy.ndarray
        ``(band, y, x)`` background-subtracted band images and variances; unusable
        pixels must hold image 0 and variance inf.
    masks : numpy.ndarray
        ``(band, y, x)`` uint16 mask planes.
    labels : numpy.ndarray
        int32 label image, objects ``1..n``.
    bands : tuple of str
        Band names along the first axis.
    cfg : MeasureConfig
        Parameters.
    usable_bits : int
        Mask bits that make a pixel unusable.
    sat_bit : int
        Mask bit of saturated pixels.
    origin : (int, int)
        Mosaic pixel (y, x) of the window's first pixel; positions are returned
        in mosaic coordinates.
    filtered : numpy.ndarray or callable, optional
        The filtered detection image sep detected on (:func:`~survey_engine.kernels.detect.matched_filter`),
        or a function of flat pixel indices giving it there (:func:`matched_filter_at`).
        Like sep (and SExtractor), the barycentre and second moments are weighted
        by it; without it, by the unfiltered detection image clipped at zero.

    Returns
    -------
    Measurements
    """
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return measurements_from({"area": np.zeros(0)}, labels, bands, cfg, origin)
    oy, ox = origin
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    det = np.ascontiguousarray(np.where(det_bad, 0.0, det), dtype=np.float32)
    det_var_clean = np.where(det_bad | ~np.isfinite(det_var), 0.0, det_var)
    py, px, peak, flat, lab, bbox = _peaks(labels, det, n)
    w = labels.shape[1]
    yy, xx = np.divmod(flat, w)
    ids = np.arange(1, n + 1, dtype=np.int32)

    def bsum(weights):
        return np.bincount(lab, weights=weights, minlength=n + 1)[1:]

    area = bsum(None).astype(np.int64)
    v = det.ravel()[flat].astype(np.float64)
    iso = bsum(v)
    iso_var = bsum(det_var_clean.ravel()[flat].astype(np.float64))
    if filtered is None:
        wgt = np.maximum(v, 0.0)
    else:
        wgt = (filtered(flat) if callable(filtered) else filtered.ravel()[flat]).astype(np.float64)
    wsum = bsum(wgt)
    # Barycentre and moments relative to the peak pixel: the sums see the same numbers in
    # the same (raster) order in any window holding the footprint, so they are bit-identical.
    dx = xx - px[lab - 1]
    dy = yy - py[lab - 1]
    safe_w = np.where(wsum > 0, wsum, 1.0)
    mx = bsum(wgt * dx) / safe_w
    my = bsum(wgt * dy) / safe_w
    x2 = bsum(wgt * dx * dx) / safe_w - mx**2
    y2 = bsum(wgt * dy * dy) / safe_w - my**2
    xy = bsum(wgt * dx * dy) / safe_w - mx * my
    singular = x2 * y2 - xy**2 < 1.0 / 144.0
    x2 = np.where(singular, x2 + 1.0 / 12.0, x2)
    y2 = np.where(singular, y2 + 1.0 / 12.0, y2)
    vpix = det_var_clean.ravel()[flat]
    ex, ey = dx - mx[lab - 1], dy - my[lab - 1]
    x_err = np.sqrt(bsum(vpix * ex * ex)) / safe_w
    y_err = np.sqrt(bsum(vpix * ey * ey)) / safe_w
    # Mosaic coordinates first, then the window's integer origin subtracted: exact, so sep
    # sees pixel offsets (i - x) that do not depend on where the window starts.
    xb = ((px + ox) + mx) - ox
    yb = ((py + oy) + my) - oy
    t1 = 0.5 * (x2 + y2)
    t2 = np.sqrt(0.25 * (x2 - y2) ** 2 + xy**2)
    a = np.sqrt(np.maximum(t1 + t2, 1e-6))
    b = np.sqrt(np.maximum(t1 - t2, 1e-6))
    theta = 0.5 * np.arctan2(2.0 * xy, x2 - y2)
    e1 = (x2 - y2) / (x2 + y2)
    e2 = 2.0 * xy / (x2 + y2)

    det_mask = np.ascontiguousarray(det_bad, dtype=np.uint8)
    var_det = det_var_clean.astype(np.float32, copy=False)
    kron, _ = sep.kron_radius(
        det, xb, yb, a, b, theta, cfg.kron_max_radius, mask=det_mask, segmap=labels, seg_id=ids
    )
    kron = np.where(np.isfinite(kron) & (kron > 0), kron, 0.0)
    rk = np.maximum(cfg.kron_factor * kron, cfg.kron_min)
    kflux, kerr, kapflag = sep.sum_ellipse(
        det, xb, yb, a, b, theta, rk, var=var_det, mask=det_mask, segmap=labels, seg_id=ids,
        subpix=1,
    )  # fmt: skip
    rmax = rk * a
    norm = np.where(kflux > 0, kflux, np.maximum(iso, 1e-30))
    hlr, _ = sep.flux_radius(det, xb, yb, rmax, 0.5, normflux=norm, mask=det_mask, subpix=1)
    hlr = np.where(np.isfinite(hlr) & (hlr > 0), hlr, np.sqrt(a * b))

    sig = np.maximum(2.0 * hlr / 2.3548, 0.5)
    uw, vw, uw_err, vw_err, wfail = windowed_centroid(
        det, var_det, labels, py, px, mx, my, sig, max_iter=cfg.window_iterations
    )

    raw = {
        "x_peak": px, "y_peak": py, "peak": peak, "area": area,
        "dx_iso": mx, "dy_iso": my,
        "dx": np.where(wfail, mx, uw), "dy": np.where(wfail, my, vw),
        "x_err": np.where(wfail, x_err, uw_err), "y_err": np.where(wfail, y_err, vw_err),
        "a": a, "b": b, "theta": theta, "e1": e1, "e2": e2,
        "half_light_radius": hlr, "kron_radius": kron, "kron_aperture": rk,
        "window_sigma": sig, "window_failed": wfail,
        "det_iso_flux": iso, "det_iso_flux_err": np.sqrt(iso_var),
        "det_kron_flux": kflux, "det_kron_flux_err": kerr,
        "kron_truncated": (kapflag & sep.APER_TRUNC) != 0, "bbox": bbox,
    }  # fmt: skip
    # Mask bits of the footprint pixels, OR-ed over bands.
    fp_bits = np.bitwise_or.reduce(masks.reshape(masks.shape[0], -1)[:, flat], axis=0)
    raw["masked"] = bsum(((fp_bits & usable_bits) != 0).astype(float)) > 0
    raw["saturated"] = bsum(((fp_bits & sat_bit) != 0).astype(float)) > 0

    per_band: dict[str, list[np.ndarray]] = {}
    for bi in range(len(bands)):
        # Unusable pixels carry image 0 and variance inf (the caller's contract).
        bad = ~np.isfinite(variances[bi])
        img = np.ascontiguousarray(images[bi], dtype=np.float32)
        var = np.where(bad, np.float32(0.0), variances[bi]).astype(np.float32, copy=False)
        bmask = bad.view(np.uint8)
        col = {
            "iso_flux": bsum(img.ravel()[flat].astype(np.float64)),
            "iso_flux_err": np.sqrt(bsum(var.ravel()[flat].astype(np.float64))),
        }
        f, fe, fl = sep.sum_ellipse(
            img, xb, yb, a, b, theta, rk, var=var, mask=bmask, segmap=labels, seg_id=ids, subpix=1
        )
        col["kron_flux"], col["kron_flux_err"] = f, fe
        col["kron_masked"] = (fl & sep.APER_HASMASKED) != 0
        for r in cfg.apertures:
            f, fe, fl = sep.sum_circle(
                img, xb, yb, r, var=var, mask=bmask, segmap=labels, seg_id=ids, subpix=5
            )
            tag = aper_tag(r)
            col[f"aper_flux_{tag}"], col[f"aper_flux_{tag}_err"] = f, fe
        for k, v in col.items():
            per_band.setdefault(k, []).append(v)
    raw.update({k: np.stack(v, axis=1) for k, v in per_band.items()})
    return measurements_from(raw, labels, bands, cfg, origin)


def measurements_from(
    raw: dict[str, np.ndarray], labels: np.ndarray, bands: tuple[str, ...], cfg: MeasureConfig,
    origin: tuple[int, int],
) -> Measurements:  # fmt: skip
    """:class:`Measurements` of one window from a measurement kernel's per-object arrays.

    The one place where measured quantities become catalog-ready columns, whichever
    kernel measured them (:func:`measure_sources` or
    :func:`~survey_engine.kernels.torch_measure.measure_batch`): positions in mosaic
    coordinates, the object flags, each band's flags, footprint boxes and the extent the
    measurement read.

    Parameters
    ----------
    raw : dict of numpy.ndarray
        Per object (label order): the keys of
        :func:`~survey_engine.kernels.torch_measure.measure_batch` (window coordinates;
        positions as offsets ``dx``, ``dy``, ``dx_iso``, ``dy_iso`` from the integer peak
        pixel; per-band quantities as ``(n, n_bands)`` arrays); optionally ``bbox``, the
        footprint boxes (else found in ``labels``).
    labels : numpy.ndarray
        The window's label image (objects ``1..n``).
    bands : tuple of str
        Band names, in the order of the per-band arrays' second axis.
    cfg : MeasureConfig
        Parameters (Kron and aperture radii for the extent).
    origin : (int, int)
        Mosaic pixel (y, x) of the window's first pixel.

    Returns
    -------
    Measurements
    """
    n = len(raw["area"])
    if n == 0:
        return Measurements(bbox=np.zeros((0, 4), dtype=np.int64), extent=np.zeros(0))
    m = Measurements()
    oy, ox = origin
    px = raw["x_peak"].astype(np.int64)
    py = raw["y_peak"].astype(np.int64)
    flags = np.zeros(n, dtype=np.int64)
    for key, flag in (
        ("window_failed", Flag.WINDOW_FAILED), ("kron_truncated", Flag.APERTURE_TRUNCATED),
        ("masked", Flag.MASKED), ("saturated", Flag.SATURATED),
    ):  # fmt: skip
        flags |= np.where(raw[key], int(flag), 0)
    m.columns = {
        "x": (px + ox) + raw["dx"], "y": (py + oy) + raw["dy"],
        "x_err": raw["x_err"], "y_err": raw["y_err"],
        "x_iso": (px + ox) + raw["dx_iso"], "y_iso": (py + oy) + raw["dy_iso"],
        "x_peak": px, "y_peak": py,
        "peak": raw["peak"].astype(np.float64), "area": raw["area"].astype(np.int64),
        "flags": flags,
    }  # fmt: skip
    for k in ("a", "b", "theta", "e1", "e2", "half_light_radius", "kron_radius", "det_iso_flux",
              "det_iso_flux_err", "det_kron_flux", "det_kron_flux_err"):  # fmt: skip
        m.columns[k] = raw[k]
    m.bbox = raw.get("bbox")
    if m.bbox is None:
        slices = ndimage.find_objects(labels, max_label=n)
        m.bbox = np.array(
            [[s[0].start, s[0].stop, s[1].start, s[1].stop] for s in slices], dtype=np.int64
        )
    # Pixels read by the measurement, as a radius around the barycentre.
    a, sig = raw["a"], raw["window_sigma"]
    radii = [cfg.kron_max_radius * a, raw["kron_aperture"] * a, np.full(n, cfg.max_aperture)]
    m.extent = np.maximum.reduce([*radii, np.ceil(4 * sig) + 3]) + 2.0
    band_keys = [k for k in raw if k.startswith(("iso_flux", "kron_flux", "aper_flux_"))]
    for bi, band in enumerate(bands):
        col = {k: raw[k][:, bi] for k in band_keys}
        col["flags"] = np.where(raw["kron_masked"][:, bi], int(Flag.MASKED), 0).astype(np.int64)
        m.bands[band] = col
    return m


def matched_filter_at(
    data: np.ndarray, variance: np.ndarray, kernel: np.ndarray | None, flat: np.ndarray
):
    """:func:`~survey_engine.kernels.detect.matched_filter` at the flat pixel indices ``flat`` only.

    The same numbers bit for bit: the products in float32, each pixel's sums in float64
    over the kernel's non-negligible weights (``|w| > eps``) in raster order with zeros
    outside the array, cast to float32 (``scipy.ndimage.correlate``'s arithmetic), compiled.
    """
    if kernel is None:
        return matched_filter(data.ravel()[flat], variance.ravel()[flat], None)
    if data.dtype != np.float32 or variance.dtype != np.float32:  # not the engine's: numpy's
        return matched_filter(data, variance, kernel).ravel()[flat]
    k = np.asarray(kernel, dtype=np.float64)
    data, variance = np.ascontiguousarray(data), np.ascontiguousarray(variance)
    return compiled.matched_at(data, variance, k, k * k, np.asarray(flat, dtype=np.int64))


def windowed_centroid(
    image: np.ndarray, variance: np.ndarray, labels: np.ndarray, py: np.ndarray, px: np.ndarray,
    u0: np.ndarray, v0: np.ndarray, sig: np.ndarray, *, max_iter: int = 16, tol: float = 2e-4,
):  # fmt: skip
    """Gaussian-windowed centroids (SExtractor's XWIN/YWIN), vectorised over objects.

    Iterates ``x ← x + 2 Σ w I (x_i − x) / Σ w I`` with ``w = exp(−r² / 2σ²)`` over the
    pixels within ``4σ``, neighbours' pixels excluded. Everything is computed in
    offsets from each object's integer peak pixel and summed in a fixed pixel
    order, so the result is bit-identical in any window holding the object.

    The loops over pixels are compiled (numba); the exponentials are numpy's (whose SIMD
    ``exp`` differs from libm's in the last bit for a few % of arguments), so the numbers
    are those of the vectorised numpy formulation term by term.

    Parameters
    ----------
    image, variance : numpy.ndarray
        Background-subtracted detection image and its variance (0 where unusable).
    labels : numpy.ndarray
        Label image; object ``i`` has label ``i + 1``.
    py, px : numpy.ndarray
        Integer peak pixel of every object (window coordinates).
    u0, v0 : numpy.ndarray
        Starting offsets (x, y) from the peak, e.g. the isophotal barycentre.
    sig : numpy.ndarray
        Window sigma per object (pixels), ``2 × half_light_radius / 2.3548``.
    max_iter : int
        Maximum number of iterations.
    tol : float
        Convergence threshold on the step (pixels).

    Returns
    -------
    u, v, u_err, v_err : numpy.ndarray
        Offsets from the peak and their 1-sigma errors.
    failed : numpy.ndarray of bool
        Objects that did not converge or ran away (more than 4σ from the peak).
    """
    n = len(py)
    sig = np.asarray(sig, dtype=np.float64)
    half = (np.ceil(4.0 * sig).astype(np.int64) + 2).clip(2, 32)
    # Pixel offsets of each object: a disc of radius half − 0.5 around the peak (≥ 4σ + 1.5,
    # as the centre stays within ~1 px of the peak), in raster order whatever window or
    # other objects there are; neighbours' pixels excluded.
    obj, dx, dy, val, var = compiled.wc_pixels(
        np.ascontiguousarray(image), np.ascontiguousarray(variance),
        np.ascontiguousarray(labels, dtype=np.int32), py.astype(np.int64), px.astype(np.int64), half,
    )  # fmt: skip
    inv2s2 = 1.0 / (2.0 * sig**2)
    r2max = (4.0 * sig) ** 2
    u, v = u0.astype(np.float64).copy(), v0.astype(np.float64).copy()
    state = np.zeros(n, dtype=np.int8)  # 0 active, 1 converged, 2 stopped (no flux)
    # Working copies of the elements of the objects still iterating (compacted in place).
    e_obj, e_dx, e_dy, e_val = obj.copy(), dx.copy(), dy.copy(), val.copy()
    m, neg = len(obj), np.empty(len(obj))
    wgt = np.empty(len(obj))
    for _ in range(max_iter):
        compiled.wc_args(e_obj[:m], e_dx[:m], e_dy[:m], u, v, inv2s2, neg[:m])
        np.exp(neg[:m], out=wgt[:m])
        m = compiled.wc_step(e_obj, e_dx, e_dy, e_val, m, neg, wgt, u, v, state, tol * tol)
        if not (state == 0).any():
            break
    # Final window and errors over all pixels of each object.
    neg = np.empty(len(obj))
    compiled.wc_args(obj, dx, dy, u, v, inv2s2, neg, final=True)
    s0, u_err, v_err = compiled.wc_errors(obj, dx, dy, val, var, u, v, r2max, np.exp(neg), n)
    failed = (state != 1) | (s0 <= 0) | (u * u + v * v > (4.0 * sig) ** 2)
    return u, v, u_err, v_err, failed
