"""The ``unet`` deblender: the U-Net's foreground, centre and offset maps turned into instances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..kernels.torch_instances import InstanceBatch, extract_instances_batch
from ..unet.infer import cached_model, inference_thresholds, network_maps, significance
from ..unet.model import model_pad
from . import DetectionImages

__all__ = ["UNetDeblender"]

#: Side of the patches the network runs on.
PATCH = 512


@dataclass(frozen=True)
class UNetDeblender:
    """The U-Net of :mod:`survey_engine.unet` on the mosaic-anchored patch grid.

    Attributes
    ----------
    model, minarea : str or None, int
        Checkpoint (None: the model shipped with the package); smallest instance kept (pixels).
    """

    model: str | None = None
    minarea: int = 5
    name: ClassVar[str] = "unet"
    backends: ClassVar[tuple[str, ...]] = ("numpy", "torch")

    @classmethod
    def from_science(cls, science) -> UNetDeblender:
        """The deblender of a run's science parameters."""
        return cls(science.unet_model, int(science.detection.minarea))

    def receptive_radius(self) -> int:
        """The network's receptive radius + 1 (the peak search), from the checkpoint on the CPU."""
        return model_pad(cached_model(self.model, "cpu"))

    def required_halo(self, guard: int) -> int:
        """The network needs its receptive field inside the window, plus a margin."""
        return guard + 8

    def detect(self, images: DetectionImages, execution, times) -> InstanceBatch:
        """Network maps of the batch on ``execution.device``, then instances, all in torch."""
        import torch

        with times.stage("network"):
            dev = torch.device(execution.device)
            det, var, bad = (torch.as_tensor(a).to(dev) for a in (images.det, images.var, images.bad))
            sig, bad = significance(det, var, bad)
            model = cached_model(self.model, execution.device)
            maps = network_maps(model, sig, images.origins, patch=PATCH,
                                batch_size=execution.network_batch, amp=execution.unet_amp)  # fmt: skip
        with times.stage("instances"):
            fg_t, c_t = inference_thresholds(model)
            return extract_instances_batch(
                maps.foreground, maps.centre, maps.offset, bad, foreground_threshold=fg_t,
                centre_threshold=c_t, minarea=self.minarea,
            )  # fmt: skip
