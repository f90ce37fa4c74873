"""Deblenders: strategies that turn a batch of detection images into objects and parents.

A deblender is a small configured object (photutils' ``SourceFinder`` is the model) with ``name``,
``backends``, ``from_science(science)``, ``receptive_radius()``, ``required_halo(guard)`` and
``detect(images, execution, times)``: the protocol is in ``docs/architecture.md`` ("Deblenders").
A new deblender is one module in this package and one entry in :data:`DEBLENDERS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..kernels.detect import DetectionResult

__all__ = ["DEBLENDERS", "DetectionImages", "DetectionList", "check_backend", "deblender_class",
           "make_deblender"]  # fmt: skip

#: Registered deblenders: name → (module, class).
DEBLENDERS: dict[str, tuple[str, str]] = {
    "sep": ("survey_engine.deblend.sep", "SepDeblender"),
    "unet": ("survey_engine.deblend.unet", "UNetDeblender"),
}


@dataclass
class DetectionImages:
    """The detection images of a batch of windows (numpy arrays or torch tensors).

    Attributes
    ----------
    det, var, bad : array
        ``(B, H, W)`` background-subtracted detection image, its variance (inf where unusable)
        and the pixels without usable detection data (bool).
    origins : list of (int, int)
        Mosaic pixel (y0, x0) of each window's first pixel.
    """

    det: Any
    var: Any
    bad: Any
    origins: list[tuple[int, int]]


class DetectionList:
    """Per-window :class:`~survey_engine.kernels.detect.DetectionResult` s as a batch."""

    def __init__(self, results: list[DetectionResult]):
        self.results = results

    @property
    def labels(self) -> np.ndarray:
        """``(B, H, W)`` label images."""
        return np.stack([r.labels for r in self.results])

    def window(self, b: int) -> DetectionResult:
        """The result of window ``b``."""
        return self.results[b]


def deblender_class(name: str) -> type:
    """The class registered as ``name`` in :data:`DEBLENDERS`."""
    if name not in DEBLENDERS:
        msg = f"unknown deblender {name!r}; available: {', '.join(map(repr, DEBLENDERS))}"
        raise ValueError(msg)
    module, cls = DEBLENDERS[name]
    return getattr(importlib.import_module(module), cls)


def check_backend(name: str, backend: str) -> type:
    """The class of deblender ``name``, refusing a backend it does not run on."""
    cls = deblender_class(name)
    if backend not in cls.backends:
        able = [n for n in DEBLENDERS if backend in deblender_class(n).backends]
        gpu = " (and --gpu)" if backend == "torch" else ""
        msg = (
            f"the {backend} backend{gpu} runs the {' or '.join(able)} deblender; got "
            f"deblender={name!r} ({name} runs on the {' or '.join(cls.backends)} backend only)"
        )
        raise ValueError(msg)
    return cls


def make_deblender(science):
    """The deblender of a :class:`~survey_engine.config.ScienceConfig`."""
    return deblender_class(science.deblender).from_science(science)
