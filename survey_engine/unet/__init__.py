"""The ``unet`` deblender: a small U-Net trained on artificially blended GalSim objects.

* :mod:`~survey_engine.unet.data`: training sets (GalSim library → blends → Zarr / npz);
* :mod:`~survey_engine.unet.model`: the network, its receptive field and checkpoints;
* :mod:`~survey_engine.unet.train`: the training loop (no GalSim; CUDA with bf16 autocast);
* :mod:`~survey_engine.unet.infer`: tiled, batched inference and instance extraction, returning
  the sep deblender's :class:`~survey_engine.kernels.detect.DetectionResult`.

Submodules are imported on first use: ``survey_engine.unet.train`` runs on a host that has torch
and numpy but neither GalSim, sep nor Zarr.
"""

from __future__ import annotations

import importlib

__all__ = ["DEFAULT_WEIGHTS", "UNet", "UNetConfig", "UNetOutput", "extract_instances",
           "generate_training_set", "load_model", "load_training_set", "model_pad", "predict",
           "receptive_radius", "save_model", "train", "unet_detect"]  # fmt: skip

_WHERE = {name: module for module, names in {
    "model": ("DEFAULT_WEIGHTS", "UNet", "load_model", "model_pad", "receptive_radius",
              "save_model"),
    "data": ("generate_training_set", "load_training_set"), "train": ("train",),
    "infer": ("UNetConfig", "UNetOutput", "extract_instances", "predict", "unet_detect"),
}.items() for name in names}  # fmt: skip


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__():
    return sorted(set(globals()) | set(__all__))
