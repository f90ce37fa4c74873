"""The engine's hook: the classification columns of every object of a batch of measured windows."""

from __future__ import annotations

import logging

import numpy as np

from ..kernels.arrays import is_torch
from .stamps import STAMP_SIZE, extract_stamps

__all__ = ["classify_windows"]

logger = logging.getLogger(__name__)


def classify_windows(det, meas_list, execution, science=None) -> None:
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
    """
    from .model import OUTPUT_COLUMNS, cached_model, classify_stamps

    counts = [len(m.columns.get("y_peak", ())) for m in meas_list]
    if not sum(counts):
        for m in meas_list:
            m.columns.update({k: np.zeros(0, np.float32) for k in OUTPUT_COLUMNS})
        return
    path = None if science is None else science.classifier_model
    parts = [extract_stamps(det.det[b], det.var[b], m.columns["y_peak"], m.columns["x_peak"], size=STAMP_SIZE)
             for b, (m, n) in enumerate(zip(meas_list, counts, strict=True)) if n]  # fmt: skip
    if is_torch(parts[0]):
        import torch

        stamps = torch.cat(parts)
        device = str(stamps.device)
    else:
        stamps, device = np.concatenate(parts), "cpu"
    values = classify_stamps(stamps, cached_model(path, device))
    start = 0
    for m, n in zip(meas_list, counts, strict=True):
        m.columns.update({k: v[start : start + n] for k, v in values.items()})
        start += n
    logger.debug("classified %d objects on %s", start, device if execution is not None else "cpu")
