"""Tiled, batched U-Net inference and instance extraction: the ``unet`` deblender.

:func:`unet_detect` has the contract of :func:`~survey_engine.kernels.detect.detect_sources`:
a window of the detection image in, a :class:`~survey_engine.kernels.detect.DetectionResult`
out (children = instances, parents = 8-connected components of the foreground), so
the measurement kernel and the ownership rules of the sep path apply unchanged.

Window independence
-------------------
A U-Net with zero padding and pooling is translation-equivariant only for shifts by
multiples of ``A = 2^levels``, and its output near a patch edge depends on the
padding. Inference therefore never runs on the window as given: the mosaic is cut
into a *global* grid of square cores of side ``S`` (a multiple of ``A``) anchored at
mosaic pixel (0, 0); the network runs on each core grown by a margin ``M ≥ R``
(:func:`~survey_engine.unet.model.receptive_radius`, rounded up to a multiple of
``A``), read from the window (zeros outside it, as for masked pixels), and only the
core of each patch is kept. Every patch starts at a multiple of ``A`` in mosaic
coordinates, so the output at a mosaic pixel is a function of the input within ``R``
pixels of it alone, whichever window, patch or batch computes it — for every pixel at
least ``R`` pixels inside the window. The caller passes the window's mosaic origin
(``origin=(y0, x0)``). Instance extraction then only looks at 3×3 neighbourhoods
(peaks), whole connected components, and exact integer coordinate differences, so a
component whose bounding box lies ``model_pad(model) + 1`` pixels inside the window
is found identically (same pixels, same children) in every window.

Instances
---------
Foreground = probability > ``foreground_threshold``, unmasked. Peaks = 3×3 local
maxima of the centre probability above ``centre_threshold`` on foreground pixels
(plateaus: the first pixel in raster order). Components = 8-connected foreground
components (``scipy.ndimage.label``); those without a peak or smaller than
``minarea`` are dropped. Each pixel of a component goes to the peak of that component
nearest to the centre its offset vector points at (ties: the first peak in raster
order) — computed for all pixels at once in torch, in bounded chunks of
pixel × candidate-peak pairs, with no loop over objects.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..kernels.detect import DetectionConfig, DetectionResult
from .model import UNet, load_model, normalise_input, receptive_radius

__all__ = [
    "UNetConfig",
    "UNetOutput",
    "extract_instances",
    "predict",
    "predict_window",
    "unet_detect",
]

logger = logging.getLogger(__name__)

_EIGHT = np.ones((3, 3), dtype=bool)
#: Largest number of pixel × peak pairs handled at once in the assignment.
_MAX_PAIRS = 1 << 22
_DEFAULT_MODELS: dict[tuple[str, str], UNet] = {}


@dataclass(frozen=True)
class UNetConfig:
    """Parameters of the ``unet`` deblender.

    Attributes
    ----------
    foreground_threshold : float or None
        Foreground probability threshold; None: the model's default (0.5).
    centre_threshold : float or None
        Centre-peak probability threshold; None: the model's default (tuned on its
        validation set).
    minarea : int
        Smallest component kept (pixels).
    patch : int
        Side of the patches the network runs on (rounded down to a multiple of
        ``2^levels``); each contributes a core of ``patch - 2 × margin`` pixels.
    batch_size : int
        Patches per forward pass (1 is fastest on CPU; 8–32 on a GPU). Results are
        bit-identical across windows for a fixed batch size, device and thread count.
    device : str
        ``"cpu"`` or ``"cuda"`` (``"cuda:N"``).
    amp : bool or None
        bfloat16 autocast; None: on for CUDA, off on CPU.
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
            v = getattr(self, name)
            if v is not None and not 0 < v < 1:
                msg = f"{name} must be a probability in (0, 1), got {v!r}"
                raise ValueError(msg)
        for name in ("minarea", "patch", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                msg = f"{name} must be a positive integer, got {v!r}"
                raise ValueError(msg)
        if str(self.device).split(":")[0] not in ("cpu", "cuda"):
            msg = f"device must be 'cpu' or 'cuda', got {self.device!r}"
            raise ValueError(msg)


@dataclass
class UNetOutput:
    """Network maps of a batch or of a window.

    Attributes
    ----------
    foreground : numpy.ndarray
        Foreground probability, ``(..., H, W)`` float32.
    centre : numpy.ndarray
        Centre probability, ``(..., H, W)`` float32.
    offset : numpy.ndarray
        ``(..., 2, H, W)`` float32 vector (dy, dx) in pixels to the owning object's centre.
    """

    foreground: np.ndarray
    centre: np.ndarray
    offset: np.ndarray


def inference_thresholds(model: UNet, cfg: UNetConfig | None = None) -> tuple[float, float]:
    """(foreground, centre) probability thresholds: ``cfg``'s, else the model's own defaults."""
    inf = model.config.get("inference", {})
    cfg = cfg or UNetConfig()
    return (
        cfg.foreground_threshold or float(inf.get("foreground_threshold", 0.5)),
        cfg.centre_threshold or float(inf.get("centre_threshold", 0.3)),
    )


def _resolve_model(model) -> UNet:
    if isinstance(model, UNet):
        return model
    if model is None or isinstance(model, (str, os.PathLike)):
        key = (str(model), "cpu")
        if key not in _DEFAULT_MODELS:
            _DEFAULT_MODELS[key] = load_model(model)
        return _DEFAULT_MODELS[key]
    msg = f"model must be a UNet, a checkpoint path or None, got {type(model).__name__}"
    raise TypeError(msg)


def _forward_batches(
    model: UNet, x: torch.Tensor, *, batch_size: int, device: str | torch.device, amp: bool | None
):
    """Yield ``(start, raw outputs)`` of ``x`` (N, C, H, W), ``batch_size`` at a time.

    The outputs are float32 CPU tensors ``(b, 4, H, W)``.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device {str(device)!r} requested but CUDA is not available"
        raise ValueError(msg)
    amp = dev.type == "cuda" if amp is None else bool(amp)
    if next(model.parameters()).device != dev:
        model = model.to(dev)
    # NHWC is several times faster for these narrow convolutions on CPU (oneDNN) and
    # suits tensor cores on GPU; converted once (the weights' values do not change).
    probe = model.bottleneck[0].weight  # a 3x3 convolution with several input channels
    if not probe.is_contiguous(memory_format=torch.channels_last):
        model = model.to(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for a in range(0, x.shape[0], batch_size):
                xb = x[a : a + batch_size].to(dev, torch.float32, non_blocking=True)
                xb = xb.contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    yb = model(xb)
                yield a, yb.float().cpu()
    finally:
        if was_training:
            model.train()


def _forward(
    model: UNet, x: torch.Tensor, *, batch_size: int, device: str | torch.device, amp: bool | None
) -> torch.Tensor:
    """Raw outputs for ``x`` (N, C, H, W) on CPU float32, ``batch_size`` at a time."""
    out = torch.empty((x.shape[0], 4, *x.shape[2:]), dtype=torch.float32)
    for a, yb in _forward_batches(model, x, batch_size=batch_size, device=device, amp=amp):
        out[a : a + len(yb)] = yb
    return out


def _to_output(raw: torch.Tensor, offset_scale: float) -> UNetOutput:
    return UNetOutput(
        foreground=torch.sigmoid(raw[:, 0]).numpy(),
        centre=torch.sigmoid(raw[:, 1]).numpy(),
        offset=(raw[:, 2:4] * offset_scale).numpy(),
    )


def predict(
    model: UNet,
    images: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    amp: bool | None = None,
) -> UNetOutput:
    """Run the network on a batch of normalised images.

    Parameters
    ----------
    model : UNet
    images : numpy.ndarray or torch.Tensor
        ``(B, C, H, W)`` float32 network inputs
        (:func:`~survey_engine.unet.model.normalise_input` of a significance image);
        ``H`` and ``W`` multiples of ``model.alignment``.
    batch_size : int
        Images per forward pass.
    device : str or torch.device
        ``"cpu"`` or ``"cuda"``.
    amp : bool, optional
        bfloat16 autocast (default: on for CUDA).

    Returns
    -------
    UNetOutput
        ``(B, H, W)`` probabilities and ``(B, 2, H, W)`` offsets.
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
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        msg = f"batch_size must be a positive integer, got {batch_size!r}"
        raise ValueError(msg)
    raw = _forward(model, x.float(), batch_size=int(batch_size), device=device, amp=amp)
    return _to_output(raw, model.config["offset_scale"])


def _geometry(model: UNet, patch: int) -> tuple[int, int]:
    """(margin, core) of the patch grid: margin ≥ receptive radius, both multiples of A."""
    a = model.alignment
    margin = math.ceil(receptive_radius(model.config) / a) * a
    side = (int(patch) // a) * a
    core = side - 2 * margin
    if core < a:
        msg = f"patch {patch!r} too small for this model: need at least {2 * margin + a} pixels"
        raise ValueError(msg)
    return margin, core


def significance(det_image: np.ndarray, det_var: np.ndarray, det_bad: np.ndarray):
    """Significance image (``image / sqrt(var)``, 0 where bad) and the full bad mask."""
    det = np.asarray(det_image, dtype=np.float32)
    var = np.asarray(det_var, dtype=np.float32)
    bad = np.asarray(det_bad, dtype=bool) | ~np.isfinite(var) | ~(var > 0) | ~np.isfinite(det)
    with np.errstate(divide="ignore", invalid="ignore"):
        sig = np.where(bad, 0.0, det / np.sqrt(np.where(bad, 1.0, var))).astype(np.float32)
    return sig, bad


def predict_window(
    model: UNet,
    det_image: np.ndarray,
    det_var: np.ndarray,
    det_bad: np.ndarray,
    *,
    origin: tuple[int, int] = (0, 0),
    cfg: UNetConfig | None = None,
) -> UNetOutput:
    """Network maps of one window, computed on the mosaic-anchored patch grid.

    Parameters
    ----------
    model : UNet
    det_image, det_var : numpy.ndarray
        2-D background-subtracted detection image and its variance.
    det_bad : numpy.ndarray of bool
        Pixels excluded from detection.
    origin : (int, int)
        Mosaic coordinates of the window's pixel (0, 0).
    cfg : UNetConfig, optional

    Returns
    -------
    UNetOutput
        ``(H, W)`` maps of the window.
    """
    cfg = cfg or UNetConfig()
    if model.config["in_channels"] != 1:
        msg = "the unet deblender needs a model with in_channels=1 (the detection image)"
        raise ValueError(msg)
    sig, _ = significance(det_image, det_var, det_bad)
    h, w = sig.shape
    y0, x0 = (int(v) for v in origin)
    margin, core = _geometry(model, cfg.patch)
    side = core + 2 * margin
    ky0, kx0 = y0 // core, x0 // core
    ky1, kx1 = (y0 + h - 1) // core + 1, (x0 + w - 1) // core + 1
    ny, nx = ky1 - ky0, kx1 - kx0
    # Padded canvas covering mosaic rows [ky0*core - margin, ky1*core + margin).
    pad = np.zeros((ny * core + 2 * margin, nx * core + 2 * margin), np.float32)
    oy, ox = y0 - (ky0 * core - margin), x0 - (kx0 * core - margin)
    pad[oy : oy + h, ox : ox + w] = sig
    x = normalise_input(torch.from_numpy(pad), model.config)
    patches = x.unfold(0, side, core).unfold(1, side, core)  # (ny, nx, side, side)
    patches = patches.reshape(ny * nx, 1, side, side)
    # Every forward pass gets exactly batch_size patches (the last batch is padded):
    # oneDNN/cuDNN may pick other kernels for other batch sizes, which changes the
    # results in the last bit and would make them depend on the window.
    n = ny * nx
    bs = cfg.batch_size
    if n % bs:
        patches = torch.cat([patches, patches.new_zeros((bs - n % bs, 1, side, side))])
    full = torch.empty((4, ny * core, nx * core), dtype=torch.float32)
    batches = _forward_batches(model, patches, batch_size=bs, device=cfg.device, amp=cfg.amp)
    for a, yb in batches:
        for k in range(min(len(yb), n - a)):
            iy, ix = divmod(a + k, nx)
            full[:, iy * core : (iy + 1) * core, ix * core : (ix + 1) * core] = yb[
                k, :, margin : margin + core, margin : margin + core
            ]
    sy, sx = y0 - ky0 * core, x0 - kx0 * core
    win = full[:, sy : sy + h, sx : sx + w].contiguous()
    out = _to_output(win[None], model.config["offset_scale"])
    return UNetOutput(out.foreground[0], out.centre[0], out.offset[0])


def _shift(a: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[y, x] = a[y - dy, x - dx]`` (False outside)."""
    h, w = a.shape
    out = torch.zeros_like(a)
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = a[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def _find_peaks(centre: torch.Tensor, fg: torch.Tensor, threshold: float) -> torch.Tensor:
    """3×3 local maxima above ``threshold`` on foreground; plateaus keep the first pixel."""
    mx = F.max_pool2d(centre[None, None], 3, stride=1, padding=1)[0, 0]
    cand = (centre >= mx) & (centre > threshold) & fg
    earlier = _shift(cand, 1, 1) | _shift(cand, 1, 0) | _shift(cand, 1, -1) | _shift(cand, 0, 1)
    return cand & ~earlier


def extract_instances(
    maps: UNetOutput,
    bad: np.ndarray | None = None,
    *,
    foreground_threshold: float = 0.5,
    centre_threshold: float = 0.3,
    minarea: int = 5,
) -> DetectionResult:
    """Turn the maps of one window into labelled objects (children) and parents.

    Parameters
    ----------
    maps : UNetOutput
        ``(H, W)`` foreground and centre probabilities, ``(2, H, W)`` offsets (pixels).
    bad : numpy.ndarray of bool, optional
        Pixels that belong to no object.
    foreground_threshold, centre_threshold : float
        Probability thresholds.
    minarea : int
        Smallest component kept.

    Returns
    -------
    DetectionResult
    """
    fgp = torch.as_tensor(np.asarray(maps.foreground, dtype=np.float32))
    cen = torch.as_tensor(np.asarray(maps.centre, dtype=np.float32))
    off = torch.as_tensor(np.asarray(maps.offset, dtype=np.float32))
    if fgp.ndim != 2 or cen.shape != fgp.shape or off.shape != (2, *fgp.shape):
        msg = (
            "maps must hold (H, W) foreground and centre maps and (2, H, W) offsets, got "
            f"{tuple(fgp.shape)}, {tuple(cen.shape)}, {tuple(off.shape)}"
        )
        raise ValueError(msg)
    h, w = fgp.shape
    fg = fgp > foreground_threshold
    if bad is not None:
        bad = np.asarray(bad, dtype=bool)
        if bad.shape != (h, w):
            msg = f"bad must have the maps' shape {(h, w)}, got {bad.shape}"
            raise ValueError(msg)
        fg &= ~torch.from_numpy(bad)
    empty = DetectionResult(
        np.zeros((h, w), np.int32),
        np.zeros(0, np.int32),
        np.zeros((h, w), np.int32),
        np.zeros(0, np.int32),
        False,
    )
    peaks = _find_peaks(cen, fg, centre_threshold)
    comp_np, n_comp = ndimage.label(fg.numpy(), structure=_EIGHT)
    if n_comp == 0 or not bool(peaks.any()):
        return empty
    comp = torch.from_numpy(comp_np.astype(np.int64))
    area = torch.bincount(comp.ravel(), minlength=n_comp + 1)
    pk_flat = torch.nonzero(peaks.ravel()).ravel()  # raster order
    pk_comp = comp.ravel()[pk_flat]
    npk = torch.bincount(pk_comp, minlength=n_comp + 1)
    keep = (npk > 0) & (area >= minarea)
    keep[0] = False
    if not bool(keep.any()):
        return empty
    # Peaks of kept components, sorted by (component, raster position).
    sel = keep[pk_comp]
    pk_flat, pk_comp = pk_flat[sel], pk_comp[sel]
    order = torch.argsort(pk_comp, stable=True)
    pk_flat, pk_comp = pk_flat[order], pk_comp[order]
    n_pk = len(pk_flat)
    pk_y, pk_x = pk_flat // w, pk_flat % w
    npk = torch.bincount(pk_comp, minlength=n_comp + 1)
    first = torch.cumsum(npk, 0) - npk  # index of each component's first peak

    pix = torch.nonzero((comp > 0).ravel() & keep[comp.ravel()]).ravel()
    pc = comp.ravel()[pix]
    assign = first[pc].clone()  # single-peak components: their peak
    multi = npk[pc] > 1
    if bool(multi.any()):
        mp = pix[multi]
        mc = pc[multi]
        py, px = mp // w, mp % w
        dy, dx = off[0].ravel()[mp], off[1].ravel()[mp]
        counts = npk[mc]
        best = torch.empty(len(mp), dtype=torch.long)
        # Chunks of pixels with a bounded number of (pixel, candidate peak) pairs.
        csum = torch.cumsum(counts, 0)
        a = 0
        while a < len(mp):
            base = int(csum[a - 1]) if a else 0
            b = int(torch.searchsorted(csum, base + _MAX_PAIRS, right=True))
            b = max(b, a + 1)
            cnt = counts[a:b]
            owner = torch.repeat_interleave(torch.arange(a, b), cnt)
            within = torch.arange(len(owner)) - torch.repeat_interleave(
                torch.cumsum(cnt, 0) - cnt, cnt
            )
            cand = first[mc[owner]] + within
            # Exact integer differences first, then the float offset: window-independent.
            ey = (pk_y[cand] - py[owner]).float() - dy[owner]
            ex = (pk_x[cand] - px[owner]).float() - dx[owner]
            d2 = ey * ey + ex * ex
            local = owner - a
            dmin = torch.full((b - a,), math.inf).scatter_reduce(0, local, d2, "amin")
            is_min = d2 <= dmin[local]
            big = torch.full((b - a,), n_pk, dtype=torch.long)
            best[a:b] = big.scatter_reduce(0, local[is_min], cand[is_min], "amin")
            a = b
        assign[multi] = best

    # Instances = peaks with at least one pixel; labels 1..n in (component, raster) order.
    counts = torch.bincount(assign, minlength=n_pk)
    alive = counts > 0
    lut = torch.zeros(n_pk, dtype=torch.long)
    lut[alive] = torch.arange(1, int(alive.sum()) + 1)
    labels = torch.zeros(h * w, dtype=torch.int32)
    labels[pix] = lut[assign].to(torch.int32)
    # Parents: kept components renumbered 1..n (raster order of their first pixel).
    plut = torch.zeros(n_comp + 1, dtype=torch.long)
    plut[keep] = torch.arange(1, int(keep.sum()) + 1)
    parents = torch.zeros(h * w, dtype=torch.int32)
    parents[pix] = plut[pc].to(torch.int32)
    obj_comp = pk_comp[alive]
    kids = torch.bincount(obj_comp, minlength=n_comp + 1)
    return DetectionResult(
        labels.reshape(h, w).numpy(),
        plut[obj_comp].to(torch.int32).numpy(),
        parents.reshape(h, w).numpy(),
        kids[obj_comp].to(torch.int32).numpy(),
        False,
    )


def unet_detect(
    det_image: np.ndarray,
    det_var: np.ndarray,
    det_bad: np.ndarray,
    *,
    model: UNet | str | os.PathLike | None = None,
    cfg: UNetConfig | DetectionConfig | None = None,
    origin: tuple[int, int] = (0, 0),
) -> DetectionResult:
    """Detect and deblend the sources of one window with the U-Net.

    Parameters
    ----------
    det_image : numpy.ndarray
        2-D background-subtracted detection image.
    det_var : numpy.ndarray
        Its variance (inf or NaN where unusable).
    det_bad : numpy.ndarray of bool
        Pixels excluded from detection.
    model : UNet or path or None
        The network; a checkpoint path; None for the shipped model (loaded once).
    cfg : UNetConfig or DetectionConfig, optional
        Thresholds and batching; a :class:`~survey_engine.kernels.detect.DetectionConfig`
        contributes its ``minarea`` only.
    origin : (int, int)
        Mosaic coordinates ``(y0, x0)`` of the window's pixel (0, 0): the patch grid
        is anchored at the mosaic origin (see the module docstring).

    Returns
    -------
    DetectionResult
        As from :func:`~survey_engine.kernels.detect.detect_sources`; ``overflow`` is
        always False.
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
    net = _resolve_model(model)
    fg_t, c_t = inference_thresholds(net, cfg)
    if det.size == 0:
        z = np.zeros(det.shape, np.int32)
        return DetectionResult(z, np.zeros(0, np.int32), z.copy(), np.zeros(0, np.int32), False)
    _, bad = significance(det, det_var, det_bad)
    maps = predict_window(net, det, det_var, bad, origin=origin, cfg=cfg)
    return extract_instances(
        maps, bad, foreground_threshold=fg_t, centre_threshold=c_t, minarea=cfg.minarea
    )
