"""U-Net inference on windows of the mosaic: network maps on the mosaic-anchored patch grid.

:func:`network_maps` (a batch of windows; torch, any device) serves the ``unet`` deblender;
:func:`predict_window`, :func:`extract_instances` and :func:`unet_detect` are numpy wrappers for
one window. Why the grid is anchored at the mosaic origin and every forward pass gets as many
patches: ``docs/unet.md`` ("Inference on windows").
"""

from __future__ import annotations

import functools
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..kernels.arrays import as_dtype, namespace, sqrt
from ..kernels.detect import DetectionConfig, DetectionResult
from ..kernels.torch_instances import extract_instances_batch
from .model import UNet, load_model, normalise_input, receptive_radius

__all__ = ["UNetConfig", "UNetOutput", "cached_model", "extract_instances", "inference_thresholds",
           "network_maps", "predict", "predict_window", "significance", "unet_detect"]  # fmt: skip


@dataclass(frozen=True)
class UNetConfig:
    """Parameters of one-window U-Net inference (:func:`unet_detect`, :func:`predict_window`).

    Attributes
    ----------
    foreground_threshold, centre_threshold : float or None
        Foreground and centre-peak probability thresholds; None: the model's defaults
        (0.5, and one tuned on its validation set).
    minarea : int
        Smallest component kept (pixels).
    patch : int
        Side of the patches the network runs on (rounded down to a multiple of
        ``2^levels``); each contributes a core of ``patch - 2 × margin`` pixels.
    batch_size : int
        Patches per forward pass (1 is fastest on CPU; 8–32 on a GPU). Results are
        bit-identical across windows for a fixed batch size, device and thread count.
    device, amp : str, bool or None
        ``"cpu"`` or ``"cuda"`` (``"cuda:N"``); bfloat16 autocast (None: on for CUDA only).
    """

    foreground_threshold: float | None = None
    centre_threshold: float | None = None
    minarea: int = 5
    patch: int = 512
    batch_size: int = 1
    device: str = "cpu"
    amp: bool | None = None

    def __post_init__(self):
        for name in ("foreground_threshold", "centre_threshold"):
            if (v := getattr(self, name)) is not None and not 0 < v < 1:
                msg = f"{name} must be a probability in (0, 1), got {v!r}"
                raise ValueError(msg)
        for name in ("minarea", "patch", "batch_size"):
            _check_positive(name, getattr(self, name))
        if str(self.device).split(":")[0] not in ("cpu", "cuda"):
            msg = f"device must be 'cpu' or 'cuda', got {self.device!r}"
            raise ValueError(msg)


def _check_positive(name: str, v) -> None:
    if isinstance(v, bool) or int(v) != v or v < 1:
        msg = f"{name} must be a positive integer, got {v!r}"
        raise ValueError(msg)


@dataclass
class UNetOutput:
    """Network maps of a batch or of a window.

    Attributes
    ----------
    foreground, centre : numpy.ndarray or torch.Tensor
        Foreground and centre probabilities, ``(..., H, W)`` float32.
    offset : numpy.ndarray or torch.Tensor
        ``(..., 2, H, W)`` float32 vector (dy, dx) in pixels to the owning object's centre.
    """

    foreground: np.ndarray
    centre: np.ndarray
    offset: np.ndarray


def inference_thresholds(model: UNet, cfg: UNetConfig | None = None) -> tuple[float, float]:
    """(foreground, centre) probability thresholds: ``cfg``'s, else the model's own defaults."""
    inf = model.config.get("inference", {})
    cfg = cfg or UNetConfig()
    return (cfg.foreground_threshold or float(inf.get("foreground_threshold", 0.5)),
            cfg.centre_threshold or float(inf.get("centre_threshold", 0.3)))  # fmt: skip


@functools.lru_cache(maxsize=4)
def cached_model(path: str | None, device: str = "cpu") -> UNet:
    """The checkpoint ``path`` (None: the shipped model) on ``device``, loaded once per process."""
    return load_model(path, device=device)


@contextmanager
def _no_tf32(active: bool):
    """float32 convolutions and matmuls in true float32 (TF32 off) while active."""
    if not active:
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device {str(device)!r} requested but CUDA is not available"
        raise ValueError(msg)
    return dev


def _forward(model: UNet, x: torch.Tensor, *, batch_size: int, device, amp: bool | None,
             crop: int = 0) -> torch.Tensor:  # fmt: skip
    """Raw outputs ``(N, 4, H - 2 crop, W - 2 crop)`` float32 on ``device``, batch after batch.

    NHWC (several times faster on CPU for these narrow convolutions, suits GPU tensor cores);
    bfloat16 autocast if ``amp`` (default: CUDA only), else TF32 off; ``x`` moved batch by batch.
    """
    dev = _device(device)
    amp = dev.type == "cuda" if amp is None else bool(amp)
    if next(model.parameters()).device != dev:
        model = model.to(dev)
    if not model.bottleneck[0].weight.is_contiguous(memory_format=torch.channels_last):
        model = model.to(memory_format=torch.channels_last)  # converted once per model
    was_training = model.training
    model.eval()
    n, _, h, w = x.shape
    out = torch.empty((n, 4, h - 2 * crop, w - 2 * crop), dtype=torch.float32, device=dev)
    try:
        with torch.inference_mode(), _no_tf32(dev.type == "cuda" and not amp):
            for a in range(0, n, batch_size):
                xb = x[a : a + batch_size].to(dev, torch.float32, non_blocking=True)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    yb = model(xb.contiguous(memory_format=torch.channels_last))
                out[a : a + batch_size] = yb.float()[:, :, crop : h - crop, crop : w - crop]
    finally:
        if was_training:
            model.train()
    return out


def _maps(raw: torch.Tensor, offset_scale: float) -> UNetOutput:
    """Probabilities and offsets from raw outputs ``(B, 4, H, W)``, element-wise per window."""
    return UNetOutput(torch.sigmoid(raw[:, 0]), torch.sigmoid(raw[:, 1]), raw[:, 2:4] * offset_scale)


def predict(model: UNet, images: np.ndarray | torch.Tensor, *, batch_size: int = 8,
            device: str | torch.device = "cpu", amp: bool | None = None) -> UNetOutput:  # fmt: skip
    """Run the network on a batch of normalised images.

    Parameters
    ----------
    model : UNet
    images : numpy.ndarray or torch.Tensor
        ``(B, C, H, W)`` float32 network inputs (:func:`~survey_engine.unet.model.normalise_input`
        of a significance image); ``H`` and ``W`` multiples of ``model.alignment``.
    batch_size, device, amp
        Images per forward pass; ``"cpu"`` or ``"cuda"`` (or a torch.device); bfloat16 autocast
        (None: on for CUDA only).

    Returns
    -------
    UNetOutput
        ``(B, H, W)`` probabilities and ``(B, 2, H, W)`` offsets (numpy).
    """
    if not isinstance(model, UNet):
        msg = f"model must be a survey_engine.unet.UNet, got {type(model).__name__}"
        raise TypeError(msg)
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] != model.config["in_channels"]:
        msg = f"images must be (B, {model.config['in_channels']}, H, W), got shape {tuple(x.shape)}"
        raise ValueError(msg)
    a = model.alignment
    if x.shape[2] % a or x.shape[3] % a:
        msg = f"image sides must be multiples of {a} (2^levels), got {tuple(x.shape[2:])}"
        raise ValueError(msg)
    _check_positive("batch_size", batch_size)
    raw = _forward(model, x.float(), batch_size=int(batch_size), device=device, amp=amp).cpu()
    out = _maps(raw, model.config["offset_scale"])
    return UNetOutput(out.foreground.numpy(), out.centre.numpy(), out.offset.numpy())


def patch_geometry(model: UNet, patch: int) -> tuple[int, int]:
    """(margin, core) of the patch grid: margin ≥ receptive radius, both multiples of A."""
    a = model.alignment
    margin = math.ceil(receptive_radius(model.config) / a) * a
    core = (int(patch) // a) * a - 2 * margin
    if core < a:
        msg = f"patch {patch!r} too small for this model: need at least {2 * margin + a} pixels"
        raise ValueError(msg)
    return margin, core


def significance(det_image, det_var, det_bad):
    """Significance image (``image / sqrt(var)``, 0 where bad) and the full bad mask.

    numpy arrays or torch tensors (any leading axes); the same float32 operations for both.
    """
    xp = namespace(det_image)
    bad = det_bad | ~xp.isfinite(det_var) | ~(det_var > 0) | ~xp.isfinite(det_image)
    sig = xp.where(bad, 0.0, det_image / sqrt(xp.where(bad, 1.0, det_var)))
    return as_dtype(sig, "float32"), bad


def network_maps(model: UNet, sig: torch.Tensor, origins, *, patch: int = 512, batch_size: int = 1,
                 amp: bool | None = None) -> UNetOutput:  # fmt: skip
    """U-Net maps of a batch of windows on the mosaic-anchored patch grid, all patches batched.

    Parameters
    ----------
    model : UNet
        The network (moved to ``sig``'s device).
    sig : torch.Tensor
        ``(B, H, W)`` significance images (:func:`significance`), on the device to use.
    origins : sequence of (int, int)
        Mosaic pixel (y0, x0) of each window's first pixel.
    patch, batch_size, amp
        Patch side, patches per forward pass, bfloat16 autocast (None: on CUDA only).

    Returns
    -------
    UNetOutput
        ``(B, H, W)`` probabilities and ``(B, 2, H, W)`` offsets, on ``sig``'s device.
    """
    if model.config["in_channels"] != 1:
        msg = "the unet deblender needs a model with in_channels=1 (the detection image)"
        raise ValueError(msg)
    dev = sig.device
    bsz, h, w = sig.shape
    margin, core = patch_geometry(model, patch)
    side = core + 2 * margin
    geo, patches = [], []
    for b in range(bsz):
        y0, x0 = (int(v) for v in origins[b])
        ky0, kx0 = y0 // core, x0 // core
        ny, nx = (y0 + h - 1) // core + 1 - ky0, (x0 + w - 1) // core + 1 - kx0
        # Canvas covering mosaic rows [ky0 core - margin, (ky0 + ny) core + margin).
        canvas = torch.zeros((ny * core + 2 * margin, nx * core + 2 * margin), device=dev)
        oy, ox = y0 - (ky0 * core - margin), x0 - (kx0 * core - margin)
        canvas[oy : oy + h, ox : ox + w] = sig[b]
        x = normalise_input(canvas, model.config)
        patches.append(x.unfold(0, side, core).unfold(1, side, core).reshape(ny * nx, 1, side, side))
        geo.append((ny, nx, y0 - ky0 * core, x0 - kx0 * core))
    allp = torch.cat(patches)
    if len(allp) % batch_size:  # every forward pass gets exactly batch_size patches
        pad = allp.new_zeros((batch_size - len(allp) % batch_size, 1, side, side))
        allp = torch.cat([allp, pad])
    cores = _forward(model, allp, batch_size=batch_size, device=dev, amp=amp, crop=margin)
    raw = torch.empty((bsz, 4, h, w), dtype=torch.float32, device=dev)
    start = 0
    for b, (ny, nx, sy, sx) in enumerate(geo):
        c = cores[start : start + ny * nx].reshape(ny, nx, 4, core, core)
        full = c.permute(2, 0, 3, 1, 4).reshape(4, ny * core, nx * core)
        raw[b] = full[:, sy : sy + h, sx : sx + w]
        start += ny * nx
    # Per window, so that every window's maps are the same element-wise kernels on the same
    # (1, H, W) layout: the same bits whatever the batch.
    maps = [_maps(raw[b : b + 1].contiguous(), float(model.config["offset_scale"])) for b in range(bsz)]
    return UNetOutput(*(torch.cat([getattr(m, k) for m in maps]) for k in ("foreground", "centre", "offset")))


def predict_window(model: UNet, det_image: np.ndarray, det_var: np.ndarray, det_bad: np.ndarray, *,
                   origin: tuple[int, int] = (0, 0),
                   cfg: UNetConfig | None = None) -> UNetOutput:  # fmt: skip
    """Network maps of one window (numpy), computed on the mosaic-anchored patch grid.

    Parameters
    ----------
    model : UNet
    det_image, det_var, det_bad : numpy.ndarray
        2-D background-subtracted detection image, its variance, and excluded pixels (bool).
    origin : (int, int)
        Mosaic coordinates of the window's pixel (0, 0).
    cfg : UNetConfig, optional

    Returns
    -------
    UNetOutput
        ``(H, W)`` maps of the window.
    """
    cfg = cfg or UNetConfig()
    sig, _ = significance(torch.as_tensor(np.asarray(det_image, np.float32)),
                          torch.as_tensor(np.asarray(det_var, np.float32)),
                          torch.as_tensor(np.asarray(det_bad, bool)))  # fmt: skip
    sig = sig.to(_device(cfg.device))
    maps = network_maps(model, sig[None], [origin], patch=cfg.patch, batch_size=cfg.batch_size,
                        amp=cfg.amp)  # fmt: skip
    return UNetOutput(*(getattr(maps, k)[0].cpu().numpy() for k in ("foreground", "centre", "offset")))


def extract_instances(maps: UNetOutput, bad: np.ndarray | None = None, *,
                      foreground_threshold: float = 0.5, centre_threshold: float = 0.3,
                      minarea: int = 5) -> DetectionResult:  # fmt: skip
    """Objects (children) and parents of one window from its maps (numpy in and out).

    :func:`~survey_engine.kernels.torch_instances.extract_instances_batch` on a batch of
    one window: foreground = probability above ``foreground_threshold`` and not ``bad``;
    peaks = 3×3 maxima of the centre map above ``centre_threshold``; 8-connected
    components without a peak or smaller than ``minarea`` dropped; each pixel goes to
    the peak of its component nearest to where its offset points.

    Parameters
    ----------
    maps : UNetOutput
        ``(H, W)`` foreground and centre probabilities, ``(2, H, W)`` offsets (pixels).
    bad : numpy.ndarray of bool, optional
        Pixels that belong to no object.
    foreground_threshold, centre_threshold, minarea
        Probability thresholds (float) and smallest component kept (int, pixels).

    Returns
    -------
    DetectionResult
    """
    fg, cen, off = (torch.as_tensor(np.asarray(getattr(maps, k), dtype=np.float32))
                    for k in ("foreground", "centre", "offset"))  # fmt: skip
    if fg.ndim != 2 or cen.shape != fg.shape or off.shape != (2, *fg.shape):
        msg = (
            "maps must hold (H, W) foreground and centre maps and (2, H, W) offsets, got "
            f"{tuple(fg.shape)}, {tuple(cen.shape)}, {tuple(off.shape)}"
        )
        raise ValueError(msg)
    if bad is not None:
        bad = np.asarray(bad, dtype=bool)
        if bad.shape != tuple(fg.shape):
            msg = f"bad must have the maps' shape {tuple(fg.shape)}, got {bad.shape}"
            raise ValueError(msg)
        bad = torch.from_numpy(bad)[None]
    return extract_instances_batch(
        fg[None], cen[None], off[None], bad, foreground_threshold=foreground_threshold,
        centre_threshold=centre_threshold, minarea=minarea,
    ).window(0)  # fmt: skip


def unet_detect(det_image: np.ndarray, det_var: np.ndarray, det_bad: np.ndarray, *,
                model: UNet | str | os.PathLike | None = None,
                cfg: UNetConfig | DetectionConfig | None = None,
                origin: tuple[int, int] = (0, 0)) -> DetectionResult:  # fmt: skip
    """Detect and deblend the sources of one window with the U-Net.

    Parameters
    ----------
    det_image, det_var, det_bad : numpy.ndarray
        2-D background-subtracted detection image, its variance (inf or NaN where unusable) and
        the pixels excluded from detection (bool).
    model : UNet or path or None
        The network; a checkpoint path; None for the shipped model (loaded once).
    cfg : UNetConfig or DetectionConfig, optional
        Thresholds and batching; a :class:`~survey_engine.kernels.detect.DetectionConfig`
        contributes its ``minarea`` only.
    origin : (int, int)
        Mosaic ``(y0, x0)`` of the window's pixel (0, 0) (the patch grid is mosaic-anchored).

    Returns
    -------
    DetectionResult
        As from :func:`~survey_engine.kernels.detect.detect_sources`; ``overflow`` always False.
    """
    det = np.asarray(det_image)
    if det.ndim != 2:
        msg = f"det_image must be 2-D, got shape {det.shape}"
        raise ValueError(msg)
    if np.shape(det_var) != det.shape or np.shape(det_bad) != det.shape:
        msg = (
            f"det_image, det_var and det_bad must have the same shape, got {det.shape}, "
            f"{np.shape(det_var)}, {np.shape(det_bad)}"
        )
        raise ValueError(msg)
    if len(origin) != 2 or any(int(v) != v or v < 0 for v in origin):
        msg = f"origin must be two non-negative integers (y0, x0), got {origin!r}"
        raise ValueError(msg)
    if isinstance(cfg, DetectionConfig):
        cfg = UNetConfig(minarea=int(cfg.minarea))
    cfg = cfg or UNetConfig()
    if not isinstance(cfg, UNetConfig):
        msg = f"cfg must be a UNetConfig or DetectionConfig, got {type(cfg).__name__}"
        raise TypeError(msg)
    if model is not None and not isinstance(model, (UNet, str, os.PathLike)):
        msg = f"model must be a UNet, a checkpoint path or None, got {type(model).__name__}"
        raise TypeError(msg)
    net = model if isinstance(model, UNet) else cached_model(None if model is None else str(model))
    fg_t, c_t = inference_thresholds(net, cfg)
    if det.size == 0:
        z = np.zeros(det.shape, np.int32)
        return DetectionResult(z, np.zeros(0, np.int32), z.copy(), np.zeros(0, np.int32), False)
    _, bad = significance(det.astype(np.float32), np.asarray(det_var, np.float32),
                          np.asarray(det_bad, bool))  # fmt: skip
    maps = predict_window(net, det, det_var, bad, origin=origin, cfg=cfg)
    return extract_instances(maps, bad, foreground_threshold=fg_t, centre_threshold=c_t,
                             minarea=cfg.minarea)  # fmt: skip
