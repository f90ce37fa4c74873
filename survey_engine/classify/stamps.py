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

__all__ = ["STAMP_HALF", "STAMP_SIZE", "ZOOM_TOLERANCE", "extract_stamps", "stamp_reach", "stamp_zoom"]

STAMP_SIZE = 25  #: Stamp side (pixels).
STAMP_HALF = STAMP_SIZE // 2  #: Pixels from the peak to the stamp edge.


#: Relative difference of PSF widths (in pixels) below which stamps are not resampled.
ZOOM_TOLERANCE = 0.1


def stamp_zoom(psf_fwhm_pix: float | None, model_fwhm_pix: float | None) -> float:
    """Resampling factor that gives a mosaic's stamps the classifier's PSF width in pixels.

    ``model_fwhm_pix / psf_fwhm_pix``; 1 when either is unknown or they differ by less than
    :data:`ZOOM_TOLERANCE` (LSST-like mosaics keep their pixels as they are).
    """
    if not psf_fwhm_pix or not model_fwhm_pix or psf_fwhm_pix <= 0 or model_fwhm_pix <= 0:
        return 1.0
    zoom = float(model_fwhm_pix) / float(psf_fwhm_pix)
    return 1.0 if abs(zoom - 1.0) < ZOOM_TOLERANCE else zoom


def stamp_reach(zoom: float) -> int:
    """Pixels from the peak to the farthest mosaic pixel a stamp of ``zoom`` reads."""
    return int(np.ceil(STAMP_HALF / min(float(zoom), 1.0))) + (0 if zoom == 1.0 else 1)


def _resampled(image, variance, y, x, size: int, zoom: float):
    """Stamps of the image bilinearly resampled by ``zoom`` about each peak (numpy, host)."""
    img = np.asarray(image, np.float64)
    var = np.asarray(variance, np.float64)
    hgt, wid = img.shape
    h = size // 2
    t = (np.arange(size) - h) / zoom
    shape = (len(y), size, size)
    sy = np.broadcast_to(np.asarray(y, np.float64)[:, None, None] + t[None, :, None], shape)
    sx = np.broadcast_to(np.asarray(x, np.float64)[:, None, None] + t[None, None, :], shape)
    y0, x0 = np.floor(sy).astype(np.int64), np.floor(sx).astype(np.int64)
    fy, fx = sy - y0, sx - x0
    out = np.zeros(sy.shape)
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy < hgt) & (xx >= 0) & (xx < wid)
            out += np.where(inside, wy * wx * img[np.clip(yy, 0, hgt - 1), np.clip(xx, 0, wid - 1)], 0.0)
    ny, nx = np.rint(sy).astype(np.int64), np.rint(sx).astype(np.int64)
    inside = (ny >= 0) & (ny < hgt) & (nx >= 0) & (nx < wid)
    v = np.where(inside, var[np.clip(ny, 0, hgt - 1), np.clip(nx, 0, wid - 1)], INF)
    return np.stack([out, v], 1).astype(np.float32)


def extract_stamps(image, variance, y, x, *, size: int = STAMP_SIZE, zoom: float = 1.0):
    """``(N, 2, size, size)`` image and variance stamps centred on pixels ``(y, x)``.

    With ``zoom`` ≠ 1 (:func:`stamp_zoom`) the stamp samples the image every ``1 / zoom``
    pixels about the peak, bilinearly (the variance from the nearest pixel), on the host in
    float64 for both array libraries, so the two backends cut the same float32 stamps.

    Parameters
    ----------
    image, variance : numpy.ndarray or torch.Tensor
        2-D background-subtracted image and its variance (inf or non-finite: no data).
    y, x : array_like of int
        Peak pixels (row, column) in the image's coordinates.
    size : int
        Odd stamp side.
    zoom : float
        Resampling factor (> 0): stamp pixels per image pixel.

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
    if not zoom > 0:
        msg = f"zoom must be positive, got {zoom!r}"
        raise ValueError(msg)
    h = size // 2
    xp = namespace(image)
    if zoom != 1.0:
        host = (lambda a: a.detach().cpu().numpy()) if is_torch(image) else np.asarray
        stamps = _resampled(host(image), host(variance), y, x, size, float(zoom))
        return xp.as_tensor(stamps, device=image.device) if is_torch(image) else stamps
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
