"""The few array operations that numpy and torch spell differently, dispatched on the array type.

Kernels written once for both libraries (the detection image, the significance image)
take their namespace from their input (:func:`namespace`), as dask-image dispatches on
the array type, and use the helpers here where the spellings differ. torch is imported
only when a tensor is seen.
"""

from __future__ import annotations

import contextlib
import math
from types import ModuleType

import numpy as np

__all__ = ["as_dtype", "clip_min", "is_torch", "namespace", "quiet", "sqrt"]

INF = math.inf


def is_torch(x) -> bool:
    """Whether ``x`` is a torch tensor (checked without importing torch)."""
    return type(x).__module__.split(".", 1)[0] == "torch"


def namespace(x) -> ModuleType:
    """``torch`` for a tensor, ``numpy`` otherwise."""
    if is_torch(x):
        import torch

        return torch
    return np


def quiet(xp: ModuleType):
    """A context in which division by zero and invalid operations do not warn (numpy)."""
    if xp is np:
        return np.errstate(divide="ignore", invalid="ignore")
    return contextlib.nullcontext()


def as_dtype(x, name: str):
    """``x`` converted to the dtype called ``name`` (``"float32"``, ``"float64"``, ``"int64"``)."""
    if is_torch(x):
        import torch

        return x.to(getattr(torch, name))
    return x.astype(name, copy=False)


def clip_min(x, lo: float):
    """Element-wise ``max(x, lo)``."""
    return x.clamp(min=lo) if is_torch(x) else np.maximum(x, lo)


def sqrt(x):
    """Correctly rounded square root (float32 or float64) for numpy arrays and tensors.

    ``torch.sqrt`` on CPU goes through SLEEF's vectorised routines (AVX2/AVX-512 builds),
    which are off by one ulp for ~17 % of float32 and ~1 % of float64 inputs on the
    development machine; numpy uses the hardware instruction, and CUDA's ``sqrt`` is
    correctly rounded too. Kernels use this one so that torch on CPU gives numpy's bits.
    """
    if not is_torch(x):
        return np.sqrt(x)
    import torch

    if x.device.type == "cpu":
        return torch.from_numpy(np.sqrt(x.detach().numpy()))
    return torch.sqrt(x)
