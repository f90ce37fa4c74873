"""The engine's hook: the classification columns of every object of a batch of measured windows."""

from __future__ import annotations

import logging
import math

import numpy as np

from ..kernels.arrays import is_torch
from .stamps import STAMP_SIZE, extract_stamps, stamp_zoom

__all__ = ["classify_windows", "run_stamp_zoom"]

logger = logging.getLogger(__name__)


def run_stamp_zoom(science, psf_fwhm_pix, bands) -> float:
    """How much a run resamples its classifier stamps (resolved once, by the driver).

    The detection image's PSF FWHM in pixels — the detection band's, or the median of the
    bands' for combined bands — against the one the classifier was trained for
    (``config["psf_fwhm"] / config["pixel_scale"]``: 3.5 px for the shipped network), both
    convolved with the pixel, by
    :func:`~survey_engine.classify.stamps.stamp_zoom`; 1 when the mosaic's PSF is unknown.

    Parameters
    ----------
    science : ScienceConfig
        ``detection_band`` and ``classifier_model``.
    psf_fwhm_pix : mapping
        PSF FWHM in pixels per band (:attr:`survey_engine.mosaic.Mosaic.psf_fwhm_pix`).
    bands : sequence of str
        The mosaic's bands.

    Returns
    -------
    float
    """
    chosen = [science.detection_band] if science.detection_band is not None else list(bands)
    known = [float(v) for b in chosen if (v := psf_fwhm_pix.get(b))]
    if not known:
        return 1.0
    from ..kernels.psf import PIXEL_FWHM2
    from .model import cached_model

    cfg = cached_model(science.classifier_model, "cpu").config
    # Widths as they appear in the pixels, the PSF convolved with the pixel on both sides (the
    # training stamps were drawn so): what the network saw.
    mosaic = math.sqrt(float(np.median(known)) ** 2 + PIXEL_FWHM2)
    trained = math.sqrt((float(cfg["psf_fwhm"]) / float(cfg["pixel_scale"])) ** 2 + PIXEL_FWHM2)
    return stamp_zoom(mosaic, trained)


def classify_windows(det, meas_list, execution, science=None, *, zoom: float = 1.0,
                     pixel_scale: float | None = None) -> None:  # fmt: skip
    """Add ``p_star`` and the morphology columns to each window's ``Measurements.columns``.

    The stamps are cut from the background-subtracted detection image around each object's
    integer peak pixel (:func:`~survey_engine.classify.stamps.extract_stamps`) and classified
    by the run's network (``science.classifier_model``; the shipped one when None) in one
    batched call on the backend's device (:func:`~survey_engine.classify.model.classify_stamps`).

    Parameters
    ----------
    det : DetectionImages
        The batch's detection images and variances (numpy arrays or torch tensors).
    meas_list : list of Measurements
        One per window, peaks ``y_peak``, ``x_peak`` in window pixels; modified in place.
    execution : ExecutionConfig
        ``device`` of the torch backend (the numpy backend classifies on the CPU).
    science : ScienceConfig, optional
        ``classifier_model``: the checkpoint to use (None, or no ``science``: the shipped one).
    zoom : float
        Stamp pixels per mosaic pixel (:func:`~survey_engine.classify.stamps.stamp_zoom`,
        resolved once per run): the stamps get the PSF width in pixels the network was
        trained for.
    pixel_scale : float, optional
        The mosaic's arcsec per pixel; the radii are converted with ``pixel_scale / zoom``
        (None: the network's own pixel scale).
    """
    from .model import OUTPUT_COLUMNS, cached_model, classify_stamps

    counts = [len(m.columns.get("y_peak", ())) for m in meas_list]
    if not sum(counts):
        for m in meas_list:
            m.columns.update({k: np.zeros(0, np.float32) for k in OUTPUT_COLUMNS})
        return
    path = None if science is None else science.classifier_model
    parts = [extract_stamps(det.det[b], det.var[b], m.columns["y_peak"], m.columns["x_peak"],
                            size=STAMP_SIZE, zoom=zoom)
             for b, (m, n) in enumerate(zip(meas_list, counts, strict=True)) if n]  # fmt: skip
    if is_torch(parts[0]):
        import torch

        stamps = torch.cat(parts)
        device = str(stamps.device)
    else:
        stamps, device = np.concatenate(parts), "cpu"
    scale = None if pixel_scale is None else float(pixel_scale) / float(zoom)
    values = classify_stamps(stamps, cached_model(path, device), pixel_scale=scale)
    start = 0
    for m, n in zip(meas_list, counts, strict=True):
        m.columns.update({k: v[start : start + n] for k, v in values.items()})
        start += n
    logger.debug("classified %d objects on %s", start, device if execution is not None else "cpu")
