"""The ``sep`` deblender: sep's multi-threshold deblending, made independent of the window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..kernels.detect import DetectionConfig, detect_sources
from . import DetectionImages, DetectionList

__all__ = ["SepDeblender"]


@dataclass(frozen=True)
class SepDeblender:
    """sep detection and deblending (:func:`~survey_engine.kernels.detect.detect_sources`).

    Attributes
    ----------
    detection : DetectionConfig
        Threshold, minimum area, deblending levels and contrast, filter kernel.
    """

    detection: DetectionConfig
    name: ClassVar[str] = "sep"
    backends: ClassVar[tuple[str, ...]] = ("numpy",)

    @classmethod
    def from_science(cls, science) -> SepDeblender:
        """The deblender of a run's science parameters (which must not name a U-Net model)."""
        if science.unet_model is not None:
            msg = (
                f"unet_model (--model) is a U-Net checkpoint for --deblender unet; got "
                f"deblender={science.deblender!r} with unet_model={science.unet_model!r}"
            )
            raise ValueError(msg)
        return cls(science.detection)

    def receptive_radius(self) -> int:
        """The detection filter's reach (its radius + 1)."""
        return self.detection.pad

    def required_halo(self, guard: int) -> int:
        """Any halo works: objects larger than it are measured again in a larger window."""
        return 0

    def detect(self, images: DetectionImages, execution, times) -> DetectionList:
        """sep on each window of the batch (host numpy arrays)."""
        with times.stage("network"):
            return DetectionList([
                detect_sources(images.det[b], images.var[b], images.bad[b], self.detection)
                for b in range(len(images.origins))
            ])  # fmt: skip
