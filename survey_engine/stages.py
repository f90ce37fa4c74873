"""The per-window stages, written once and run by both backends (no Dask, no I/O).

:func:`analyse_windows` turns the pixels of a batch of equally-sized read windows into
labelled, measured objects and decides for each whether its result is *safe*: whether
every pixel that influenced it lies inside its window, so that any other window holding
the same pixels gives the identical result (unsafe objects are measured again by the
engine in a larger window). The numpy backend runs it window by window, the torch
backend on a batch; each rule below exists once and a backend supplies only array
operations (:mod:`survey_engine.backends`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from scipy import ndimage

from .backends import StageTimes, make_backend
from .classify.pipeline import classify_windows  # issue 17: p_star and morphology
from .classify.stamps import stamp_reach  # issue 17: the stamps lie inside the guard
from .config import ExecutionConfig, ScienceConfig
from .deblend import DetectionImages, DetectionList, make_deblender, rules
from .flags import UNUSABLE, MaskBit
from .kernels.arrays import INF, namespace
from .kernels.background import BackgroundMesh
from .kernels.detect import DetectionResult, detection_image
from .kernels.measure import Measurements
from .model_photometry import MODEL_HALF, model_fluxes  # issue 16: total and PSF fluxes
from .mosaic import MosaicRegion
from .schema import Flag
from .tiling import Box

__all__ = ["Prepared", "WindowPlan", "WindowResult", "analyse_regions", "analyse_windows",
           "finish_window", "guard_band", "usable_pixels"]  # fmt: skip


@dataclass(frozen=True)
class WindowPlan:
    """Everything the analysis of a window needs, resolved once per run by the driver.

    Attributes
    ----------
    science, execution : ScienceConfig, ExecutionConfig
        The run's parameters.
    deblender : object
        The deblender strategy (:mod:`survey_engine.deblend`).
    guard : int
        Pixels kept between a footprint and a cut window edge (:func:`guard_band`).
    mosaic : Box
        The whole mosaic (a window side at the mosaic edge needs no margin).
    bands : tuple of str
        The mosaic's bands.
    meshes : list of BackgroundMesh
        The global background, one mesh per band.
    psfs : tuple of BandPSF or None
        Per band the PSF recorded in the mosaic (:func:`~survey_engine.model_photometry.band_psfs`);
        empty or None: no model fits (the total flux is the Kron flux, flagged MODEL_FAILED).
    stamp_zoom : float
        Classifier stamp pixels per mosaic pixel
        (:func:`~survey_engine.classify.pipeline.run_stamp_zoom`; 1: the mosaic's own pixels).
    pixel_scale : float or None
        The mosaic's arcsec per pixel (the classifier's radii in arcsec).
    """

    science: ScienceConfig
    execution: ExecutionConfig
    deblender: Any
    guard: int
    mosaic: Box
    bands: tuple[str, ...]
    meshes: Sequence[BackgroundMesh] = ()
    psfs: tuple = ()
    stamp_zoom: float = 1.0
    pixel_scale: float | None = None

    @classmethod
    def build(cls, science: ScienceConfig, execution: ExecutionConfig, shape: tuple[int, int],
              bands: Sequence[str], meshes: Sequence[BackgroundMesh] = (), psfs: tuple = (),
              stamp_zoom: float = 1.0, pixel_scale: float | None = None) -> WindowPlan:  # fmt: skip
        """The plan of a mosaic of ``shape`` and ``bands``: deblender and guard from ``science``."""
        deblender = make_deblender(science)
        return cls(science, execution, deblender, guard_band(science, deblender, stamp_zoom),
                   Box(0, shape[0], 0, shape[1]), tuple(bands), meshes, tuple(psfs), stamp_zoom,
                   pixel_scale)  # fmt: skip

    @cached_property
    def backend(self):
        """The array backend of ``execution`` (made once per process that unpickles the plan)."""
        return make_backend(self.execution)

    def __getstate__(self):  # the backend is made again where the plan is unpickled
        return {k: v for k, v in self.__dict__.items() if k != "backend"}


def guard_band(science: ScienceConfig, deblender, stamp_zoom: float = 1.0) -> int:
    """Pixels kept between a footprint and a cut window edge for a result to be safe.

    The farther reach of detection (the deblender's receptive radius), of the matched
    filter that weights the moments and of the classifier's and the model fit's stamps around
    the peak, plus
    ``minarea`` (slivers of a footprint cut off by the edge), and at least the reach of the
    science rules (:func:`survey_engine.deblend.rules.reach`: a masked gap and the child
    across it).
    """
    stamps = stamp_reach(stamp_zoom)  # the classifier's stamp, resampled by stamp_zoom
    found = max(science.detection.pad, deblender.receptive_radius(), stamps, MODEL_HALF)
    return max(found + int(science.detection.minarea), rules.reach())


@dataclass
class WindowResult:
    """Objects found in one window (window pixel coordinates unless stated)."""

    window: Box
    detection: DetectionResult
    meas: Measurements
    safe: np.ndarray
    parent_safe: np.ndarray
    peak_y: np.ndarray  # mosaic coordinates
    peak_x: np.ndarray
    parent_peak_index: np.ndarray  # per object: index of the brightest child of its parent

    @property
    def n(self) -> int:
        """Number of objects."""
        return self.detection.n_objects


@dataclass
class Prepared:
    """Background-subtracted ``(B, band, H, W)`` planes of a batch; unusable pixels neutralised."""

    images: Any
    variances: Any
    masks: Any
    usable: Any


def usable_pixels(image, variance, mask):
    """Pixels with signal: no unusable mask bit, finite image and variance, variance > 0."""
    xp = namespace(image)
    return ((mask & UNUSABLE) == 0) & xp.isfinite(image) & xp.isfinite(variance) & (variance > 0)


def analyse_windows(
    host, windows: Sequence[Box], plan: WindowPlan, times: StageTimes | None = None
) -> list[WindowResult]:
    """Detect, deblend and measure every object of a batch of equally-sized windows.

    1. **prepare** — the global background subtracted; unusable pixels (mask bits,
       non-finite values, non-positive variance) get image 0, variance inf and NO_DATA;
    2. **detection image** — the detection band, or the bands combined;
    3. **deblend** — the deblender's objects (children) and parents, then the science rules
       (:func:`~survey_engine.deblend.rules.apply_rules`: saturated stars and objects split by
       masked pixels made one object);
    4. **measure** — the backend's measurement kernel, then flags, extents and footprint
       boxes (:func:`~survey_engine.kernels.measure.measurements_from`), the deblended
       fluxes (:func:`~survey_engine.deblend.rules.deblended_fluxes`), the classification
       and the model-fit total and PSF fluxes (:mod:`survey_engine.model_photometry`);
    5. **finish** — safety, edge and blend flags, parent IDs (:func:`finish_window`).

    Parameters
    ----------
    host : tuple
        ``(B, band, H, W)`` image, variance and mask (``plan.backend.stack(regions)``).
    windows : sequence of Box
        The windows in mosaic pixels, in the batch's order.
    plan : WindowPlan
        The run's resolved parameters and background.
    times : StageTimes, optional
        Accumulates seconds per stage.

    Returns
    -------
    list of WindowResult
    """
    times = times if times is not None else plan.backend.stage_times()
    px = prepare(host, windows, plan, times)
    det = detection_images(px, windows, plan, times)
    found = plan.deblender.detect(det, plan.execution, times)
    with times.stage("rules"):
        found, results = science_rules(px, det, found, len(windows), plan.science)
    with times.stage("measure"):
        meas = plan.backend.measure(px, det, found, results, plan.science, plan.bands, windows)
        host = _host(det.det), _host(px.images), _host(px.variances)
        add_deblended_fluxes(host, results, meas, plan.bands, windows)
        classify_windows(det, meas, plan.execution, plan.science, zoom=plan.stamp_zoom,
                         pixel_scale=plan.pixel_scale)  # issue 17: p_star, morphology
    with times.stage("model"):  # issue 16: total and PSF fluxes
        add_model_fluxes(host, px, results, meas, plan, windows)
    with times.stage("measure"):
        return [finish_window(w, r, m, guard=plan.guard, mosaic=plan.mosaic)
                for w, r, m in zip(windows, results, meas, strict=True)]  # fmt: skip


def _host(a) -> np.ndarray:
    """A numpy copy of a numpy array or a torch tensor."""
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def science_rules(
    px: Prepared, det: DetectionImages, found, n_windows: int, science: ScienceConfig
):
    """Stage 3b: :func:`~survey_engine.deblend.rules.apply_rules` on each window, on the host.

    Returns the batch to measure (``found`` itself when no rule changed anything) and the
    per-window :class:`~survey_engine.kernels.detect.DetectionResult` s.
    """
    results = [found.window(b) for b in range(n_windows)]
    if not any(r.n_objects for r in results):
        return found, results
    sat = _host((px.masks & int(MaskBit.SAT)) != 0).any(axis=1)
    dets, vars_, bads = _host(det.det), _host(det.var), _host(det.bad)
    cfg = science.detection
    out = [rules.apply_rules(r, dets[b], vars_[b], bads[b], sat[b], thresh=cfg.thresh,
                             minarea=int(cfg.minarea)) if r.n_objects else r
           for b, r in enumerate(results)]  # fmt: skip
    if all(o is r for o, r in zip(out, results, strict=True)):
        return found, results
    return DetectionList(out), out


def add_deblended_fluxes(host, results, meas, bands, windows) -> None:
    """Per band ``deblended_flux(_err)`` and ``parent_flux`` into each window's measurements;
    ``host``: the batch's detection images, images and variances as numpy arrays."""
    if not any(r.n_objects for r in results):
        return
    dets, images, variances = host
    for b, (res, m, w) in enumerate(zip(results, meas, windows, strict=True)):
        if res.n_objects == 0:
            continue
        flux, err, parent = rules.deblended_fluxes(
            res, dets[b], images[b], variances[b], (w.y0, w.x0)
        )
        for bi, band in enumerate(bands):
            col = m.bands[band]
            col["deblended_flux"], col["deblended_flux_err"] = flux[:, bi], err[:, bi]
            col["parent_flux"] = parent[:, bi]


def add_model_fluxes(host, px: Prepared, results, meas, plan: WindowPlan, windows) -> None:
    """Model-fit total fluxes and PSF fluxes (:func:`~survey_engine.model_photometry.model_fluxes`)
    on the backend's device (the numpy backend: the CPU); shapes from the reference band."""
    from .catalog import reference_band

    psfs = tuple(plan.psfs) if plan.psfs else (None,) * len(plan.bands)
    ref = plan.bands.index(reference_band(plan.bands, plan.science.detection_band))
    device = str(px.images.device) if hasattr(px.images, "device") else "cpu"
    model_fluxes(*host, results, meas, [(w.y0, w.x0) for w in windows], plan.bands, psfs, ref, device)


def analyse_regions(regions: Sequence[MosaicRegion], plan: WindowPlan, times=None) -> list[WindowResult]:
    """:func:`analyse_windows` of regions read from the mosaic."""
    windows = [Box(r.y0, r.y0 + r.shape[0], r.x0, r.x0 + r.shape[1]) for r in regions]
    return analyse_windows(plan.backend.stack(regions), windows, plan, times)


def prepare(host, windows: Sequence[Box], plan: WindowPlan, times: StageTimes) -> Prepared:
    """Stage 1: background subtraction and the usable-pixel rule (see :func:`usable_pixels`)."""
    with times.stage("background"):
        image, variance, mask = plan.backend.to_device(host)
        xp = namespace(image)
        background = plan.backend.background(plan.meshes, windows)
        usable = usable_pixels(image, variance, mask)
        # Non-finite pixels and non-positive variances are no data, exactly as if masked so:
        # the object flags (MASKED) then do not depend on how the gap was written.
        masks = xp.where(usable, mask, mask | int(MaskBit.NO_DATA))
        images = xp.where(usable, image - background, 0.0)
        variances = xp.where(usable, variance, INF)
        return Prepared(images, variances, masks, usable)


def detection_images(px: Prepared, windows, plan: WindowPlan, times: StageTimes) -> DetectionImages:
    """Stage 2: the detection band alone, or the bands combined (``science.combine``)."""
    with times.stage("background"):
        band = plan.science.detection_band
        if band is not None or len(plan.bands) == 1:
            bi = plan.bands.index(band) if band is not None else 0
            det, var = px.images[:, bi], px.variances[:, bi]
        else:
            det, var = detection_image(px.images, px.variances, px.usable, plan.science.combine)
        bad = ~namespace(det).isfinite(var)
        return DetectionImages(det, var, bad, [(w.y0, w.x0) for w in windows])


def finish_window(
    window: Box, res: DetectionResult, meas: Measurements, *, guard: int, mosaic: Box
) -> WindowResult:
    """Stage 5: safety, mosaic-edge/blend flags and parent IDs of one measured window.

    Parameters
    ----------
    window : Box
        The window in mosaic pixels.
    res : DetectionResult
        Labels and parents of the window.
    meas : Measurements
        Measurements (mosaic coordinates; ``bbox`` and ``extent`` set).
    guard : int
        Pixels kept between a footprint and a cut window edge.
    mosaic : Box
        The whole mosaic.

    Returns
    -------
    WindowResult
    """
    h, w = window.shape
    n = res.n_objects
    if n == 0:
        empty, none = np.zeros(0, dtype=np.int64), np.zeros(0, bool)
        return WindowResult(window, res, meas, none, none, empty, empty, empty)
    # Safety: every pixel that shaped the result lies inside the window.
    lo_y = 0 if window.y0 == mosaic.y0 else guard
    lo_x = 0 if window.x0 == mosaic.x0 else guard
    hi_y = h if window.y1 == mosaic.y1 else h - guard
    hi_x = w if window.x1 == mosaic.x1 else w - guard
    pbox = np.array([[s[0].start, s[0].stop, s[1].start, s[1].stop]
                     for s in ndimage.find_objects(res.parents)], dtype=np.int64)[res.parent - 1]  # fmt: skip
    parent_safe = (pbox[:, 0] >= lo_y) & (pbox[:, 1] <= hi_y) & (pbox[:, 2] >= lo_x) & (pbox[:, 3] <= hi_x)
    c, r = meas.columns, meas.extent
    yw, xw = c["y_iso"] - window.y0, c["x_iso"] - window.x0
    # Apertures are clipped by sep at the mosaic edge (flagged), so only cut window edges count.
    ext_ok = (
        ((yw - r >= lo_y - 0.5) | (window.y0 == mosaic.y0))
        & ((yw + r <= hi_y - 0.5) | (window.y1 == mosaic.y1))
        & ((xw - r >= lo_x - 0.5) | (window.x0 == mosaic.x0))
        & ((xw + r <= hi_x - 0.5) | (window.x1 == mosaic.x1))
    )
    safe = parent_safe & ext_ok
    # EDGE: footprint touches the mosaic edge.
    bb = meas.bbox
    at_edge = (
        ((bb[:, 0] == 0) & (window.y0 == mosaic.y0))
        | ((bb[:, 1] == h) & (window.y1 == mosaic.y1))
        | ((bb[:, 2] == 0) & (window.x0 == mosaic.x0))
        | ((bb[:, 3] == w) & (window.x1 == mosaic.x1))
    )
    flags = c["flags"]
    if res.flags is not None:
        flags |= res.flags
    flags |= np.where(at_edge, int(Flag.EDGE), 0)
    flags |= np.where(res.n_children > 1, int(Flag.BLENDED), 0)
    if res.overflow:
        flags |= int(Flag.DEBLEND_OVERFLOW)
    # Parent ID = the brightest child's ID (ties: lowest mosaic pixel index).
    peak_y, peak_x = c["y_peak"] + window.y0, c["x_peak"] + window.x0
    order = np.lexsort((peak_y * mosaic.x1 + peak_x, -c["peak"], res.parent))
    first = np.ones(n, dtype=bool)
    first[1:] = res.parent[order][1:] != res.parent[order][:-1]
    brightest = np.zeros(int(res.parent.max()) + 1, dtype=np.int64)
    brightest[res.parent[order][first]] = order[first]
    return WindowResult(window, res, meas, safe, parent_safe, peak_y, peak_x, brightest[res.parent])
