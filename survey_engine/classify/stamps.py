"""Fixed-size stamps around object peaks, for numpy arrays and torch tensors alike.

The stamp of an object is the ``S × S`` block of the background-subtracted detection image
and its variance centred on the object's integer peak pixel. Pixels outside the window get
image 0 and variance inf (no data), so the stamp depends only on the mosaic pixels it
covers: an object whose stamp lies inside the window (the safety guard covers
:data:`STAMP_HALF`) has the same stamp under any tiling.
"""

from __future__ import annotations

import numpy as np

from ..kernels.arrays import INF, is_torch, namespace

__all__ = ["STAMP_HALF", "STAMP_SIZE", "extract_stamps"]

STAMP_SIZE = 25  #: Stamp side (pixels).
STAMP_HALF = STAMP_SIZE // 2  #: Pixels from the peak to the stamp edge.


def extract_stamps(image, variance, y, x, *, size: int = STAMP_SIZE):
    """``(N, 2, size, size)`` image and variance stamps centred on pixels ``(y, x)``.

    Parameters
    ----------
    image, variance : numpy.ndarray or torch.Tensor
        2-D background-subtracted image and its variance (inf or non-finite: no data).
    y, x : array_like of int
        Peak pixels (row, column) in the image's coordinates.
    size : int
        Odd stamp side.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        float32, of the input's array library (and device); outside the image: image 0,
        variance inf.

    Raises
    ------
    ValueError
        ``size`` is not odd and positive, or the planes are not 2-D of one shape.
    """
    if size < 1 or size % 2 != 1:
        msg = f"stamp size must be odd and positive, got {size}"
        raise ValueError(msg)
    if image.ndim != 2 or tuple(image.shape) != tuple(variance.shape):
        msg = f"image and variance must be 2-D of one shape, got {tuple(image.shape)}, {tuple(variance.shape)}"
        raise ValueError(msg)
    h = size // 2
    xp = namespace(image)
    off = np.arange(-h, h + 1)
    yy = np.asarray(y, np.int64)[:, None, None] + h + off[None, :, None]
    xx = np.asarray(x, np.int64)[:, None, None] + h + off[None, None, :]
    if is_torch(image):
        import torch.nn.functional as F

        img = F.pad(image.float()[None, None], (h, h, h, h), value=0.0)[0, 0]
        var = F.pad(variance.float()[None, None], (h, h, h, h), value=INF)[0, 0]
        iy, ix = (xp.as_tensor(a, device=image.device) for a in (yy, xx))
    else:
        img = np.pad(np.asarray(image, np.float32), h, constant_values=0.0)
        var = np.pad(np.asarray(variance, np.float32), h, constant_values=INF)
        iy, ix = yy, xx
    return xp.stack([img[iy, ix], var[iy, ix]], 1)
