"""The per-window pipeline in torch, batched over windows (the ``torch`` backend; CPU or CUDA).

:func:`analyse_windows` is the torch counterpart of
:func:`survey_engine.pipeline.analyse_window`: it takes the pixels of several
equally-sized read windows and runs every per-tile stage on one device, batched:

1. **background** — the global background mesh evaluated under each window as a
   local B-spline (:mod:`~survey_engine.kernels.torch_background`) and subtracted;
   unusable pixels (mask bits, non-finite values, non-positive variance) zeroed;
2. **network** — the detection image (inverse-variance combination of the bands),
   its significance, and the U-Net on the mosaic-anchored patch grid, the patches of
   all windows in fixed-size batches (bfloat16 autocast on CUDA);
3. **instances** — connected components, centre peaks and the offset-vector
   assignment of pixels to peaks (:mod:`~survey_engine.kernels.torch_instances`);
4. **measure** — the matched-filtered image that weights the moments, then every
   measurement as segment reductions over one global object index
   (:mod:`~survey_engine.kernels.torch_measure`).

Only the labels and the per-object numbers come back to the host, where the
window bookkeeping shared with the numpy backend
(:func:`~survey_engine.pipeline.finish_window`: safety, edge and blend flags,
parent IDs) runs. No Dask here: the engine maps this over batches of tiles.

Agreement with the numpy backend on the same pixels: the detection image,
significance and network maps are computed with the same float32 operations in the
same order and the labels are identical on CPU (tested); measurements agree as
documented in :mod:`~survey_engine.kernels.torch_measure` (footprint and Kron
quantities to rounding, 3-px apertures ~1–2 %, half-light radius ~1–2 %). On CUDA
the sums use atomics, so numbers match the CPU ones to rounding, not bit for bit.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .flags import UNUSABLE, MaskBit
from .kernels._torchmath import sqrt
from .kernels.detect import DetectionResult
from .kernels.measure import Measurements
from .mosaic import MosaicRegion
from .pipeline import PipelineConfig, WindowResult, finish_window
from .schema import Flag, aper_tag
from .tiling import Box

__all__ = ["StageTimes", "analyse_windows", "batch_capacity", "stack_regions"]

logger = logging.getLogger(__name__)

#: Device bytes per window pixel (3 bands) budgeted by :func:`batch_capacity`. The arrays
#: a batch allocates add up to ~46 B × bands + 80 B per pixel (inputs, background, float64
#: working copies, network maps, labels), ~220 B for 3 bands, plus the ragged aperture
#: gathers (a few % of that in a normal field, more around bright stars); the U-Net's
#: activations depend on its batch of patches, not on the tiles. 800 leaves a margin of ~3.
#: (An estimate from the allocations, not a measured peak: no GPU was available to measure.)
BYTES_PER_PIXEL = 800


class StageTimes(dict):
    """Seconds per stage, accumulated (``read``, ``background``, ``network`` …).

    On CUDA the device is synchronised at each stage boundary so that the time of
    asynchronous kernels lands in the stage that launched them.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__()
        self._cuda = torch.device(device).type == "cuda"

    @contextmanager
    def stage(self, name: str):
        """Time the enclosed block as ``name``."""
        if self._cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._cuda:
                torch.cuda.synchronize()
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0


#: Windows per batch on CPU (the worker's memory is not sized here).
CPU_BATCH = 2


def windows_fitting(shape: tuple[int, int], n_bands: int, free_bytes: int) -> int:
    """How many windows of ``shape`` fit in 60 % of ``free_bytes`` of device memory (1–32)."""
    per_window = BYTES_PER_PIXEL * (n_bands + 2) / 5 * shape[0] * shape[1]
    return int(min(32, max(1, (0.6 * free_bytes) // per_window)))


def batch_capacity(
    shape: tuple[int, int],
    n_bands: int,
    device: str | torch.device,
    *,
    cpu_default: int = CPU_BATCH,
) -> int:
    """Windows of ``shape`` processed together: from free device memory on CUDA.

    Parameters
    ----------
    shape : (int, int)
        Read-window shape.
    n_bands : int
        Bands per window.
    device : str or torch.device
        Where the batch runs.
    cpu_default : int
        Batch size on CPU (memory there is the worker's, not sized here).

    Returns
    -------
    int
        Between 1 and 32 on CUDA (:func:`windows_fitting`).
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return max(1, int(cpu_default))
    return windows_fitting(shape, n_bands, torch.cuda.mem_get_info(dev)[0])


def stack_regions(regions: Sequence[MosaicRegion], *, pin: bool = False):
    """Host tensors ``(B, nb, H, W)`` of image, variance (float32) and mask (int32).

    Parameters
    ----------
    regions : sequence of MosaicRegion
        Equally-sized windows with the same bands.
    pin : bool
        Page-locked memory, for asynchronous host→device copies.

    Returns
    -------
    image, variance, mask : torch.Tensor
    """
    shapes = {(r.image.shape) for r in regions}
    if len(shapes) != 1:
        msg = f"windows of one batch must have the same shape, got {sorted(shapes)}"
        raise ValueError(msg)
    img = torch.from_numpy(np.stack([np.asarray(r.image, np.float32) for r in regions]))
    var = torch.from_numpy(np.stack([np.asarray(r.variance, np.float32) for r in regions]))
    msk = torch.from_numpy(np.stack([r.mask.astype(np.int32) for r in regions]))
    if pin:
        img, var, msk = img.pin_memory(), var.pin_memory(), msk.pin_memory()
    return img, var, msk


def _detection_image(images, variances, usable, weights: str):
    """Torch twin of :func:`~survey_engine.kernels.detect.detection_image` (same float32 ops).

    The band sums run band after band, as numpy reduces the leading axis, so the
    result is bit-identical to the numpy function on CPU.
    """

    def band_sum(t):  # (B, nb, H, W) -> (B, H, W), band after band
        acc = t[:, 0]
        for b in range(1, t.shape[1]):
            acc = acc + t[:, b]
        return acc

    ok = usable & (variances > 0) & torch.isfinite(variances)
    w = torch.where(ok, 1.0 / variances, torch.zeros((), dtype=variances.dtype, device=ok.device))
    wsum = band_sum(w)
    zero = torch.zeros((), dtype=torch.float32, device=images.device)
    if weights == "ivar":
        acc = band_sum(w * torch.where(usable, images, zero))
        img = torch.where(wsum > 0, acc / wsum, zero)
        var = torch.where(wsum > 0, 1.0 / wsum, torch.full((), math.inf, device=images.device))
        return img.float(), var.float()
    pos = w > 0
    n = pos.sum(dim=1)
    chi2 = band_sum(torch.where(pos, images, zero) ** 2 * w)
    stat = sqrt(chi2).double() - sqrt(torch.clamp(n.double() - 0.5, min=0.0))
    img = torch.where(n > 0, stat, 0.0).float()
    var = torch.where(n > 0, 1.0, math.inf).float()
    return img, var


def _significance(det, det_var, det_bad):
    """Torch twin of :func:`survey_engine.unet.infer.significance`."""
    bad = det_bad | ~torch.isfinite(det_var) | ~(det_var > 0) | ~torch.isfinite(det)
    one = torch.ones((), dtype=det_var.dtype, device=det.device)
    sig = torch.where(bad, 0.0, det / sqrt(torch.where(bad, one, det_var)))
    return sig.float(), bad


def _matched_filter(det, det_var, kernel):
    """Torch twin of :func:`survey_engine.kernels.detect.matched_filter` (float32 result).

    The correlation is a sum of shifted images over the kernel elements in row-major
    order, accumulated in float64, as ``scipy.ndimage.correlate`` does: every pixel's
    value is computed the same way in any window (and equals the numpy result), which
    a convolution routine (blocked, algorithm chosen by size) would not guarantee.
    """
    ivar = torch.where(
        torch.isfinite(det_var) & (det_var > 0),
        1.0 / det_var,
        torch.zeros((), dtype=det_var.dtype, device=det.device),
    )
    if kernel is None:
        return torch.where(ivar > 0, det * sqrt(ivar), 0.0)
    k = np.asarray(kernel, np.float64)
    kh, kw = k.shape
    h, w = det.shape[-2:]
    cy, cx = kh // 2, kw // 2

    def corr(x, kk):
        xp = F.pad(x.double(), (cx, kw - 1 - cx, cy, kh - 1 - cy))
        acc = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        for i in range(kh):
            for j in range(kw):
                if kk[i, j] != 0.0:
                    acc = acc + xp[..., i : i + h, j : j + w] * float(kk[i, j])
        return acc.float()

    num = corr(det * ivar, k)
    den = corr(ivar, k * k)
    return torch.where(den > 0, num / sqrt(torch.where(den > 0, den, 1.0)), 0.0)


def _network_maps(model, sig, origins, *, patch: int, batch_size: int, amp: bool | None):
    """U-Net maps of every window, on the mosaic-anchored patch grid of
    :func:`survey_engine.unet.infer.predict_window`, all windows' patches batched.
    """
    from .unet.infer import _geometry
    from .unet.model import normalise_input

    dev = sig.device
    bsz, h, w = sig.shape
    margin, core = _geometry(model, patch)
    side = core + 2 * margin
    geo, patches = [], []
    for b in range(bsz):
        y0, x0 = (int(v) for v in origins[b])
        ky0, kx0 = y0 // core, x0 // core
        ky1, kx1 = (y0 + h - 1) // core + 1, (x0 + w - 1) // core + 1
        ny, nx = ky1 - ky0, kx1 - kx0
        canvas = torch.zeros((ny * core + 2 * margin, nx * core + 2 * margin), device=dev)
        oy, ox = y0 - (ky0 * core - margin), x0 - (kx0 * core - margin)
        canvas[oy : oy + h, ox : ox + w] = sig[b]
        x = normalise_input(canvas, model.config)
        p = x.unfold(0, side, core).unfold(1, side, core).reshape(ny * nx, 1, side, side)
        patches.append(p)
        geo.append((ny, nx, y0 - ky0 * core, x0 - kx0 * core))
    allp = torch.cat(patches)
    n = len(allp)
    if n % batch_size:  # every forward pass gets exactly batch_size patches
        allp = torch.cat([allp, allp.new_zeros((batch_size - n % batch_size, 1, side, side))])
    amp = dev.type == "cuda" if amp is None else bool(amp)
    if next(model.parameters()).device != dev:
        model = model.to(dev)
    probe = model.bottleneck[0].weight
    if not probe.is_contiguous(memory_format=torch.channels_last):
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    cores = torch.empty((len(allp), 4, core, core), dtype=torch.float32, device=dev)
    with torch.inference_mode(), _no_tf32(dev.type == "cuda" and not amp):
        for a in range(0, len(allp), batch_size):
            xb = allp[a : a + batch_size].contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                yb = model(xb)
            cores[a : a + batch_size] = yb.float()[
                :, :, margin : margin + core, margin : margin + core
            ]
    scale = float(model.config["offset_scale"])
    fg = torch.empty((bsz, h, w), dtype=torch.float32, device=dev)
    cen = torch.empty_like(fg)
    off = torch.empty((bsz, 2, h, w), dtype=torch.float32, device=dev)
    start = 0
    for b, (ny, nx, sy, sx) in enumerate(geo):
        c = cores[start : start + ny * nx].reshape(ny, nx, 4, core, core)
        full = c.permute(2, 0, 3, 1, 4).reshape(4, ny * core, nx * core)
        raw = full[:, sy : sy + h, sx : sx + w].contiguous()[None]
        # Per window, as predict_window does: same element-wise kernels, same bits.
        fg[b] = torch.sigmoid(raw[:, 0])[0]
        cen[b] = torch.sigmoid(raw[:, 1])[0]
        off[b] = (raw[:, 2:4] * scale)[0]
        start += ny * nx
    return fg, cen, off


@contextmanager
def _no_tf32(active: bool):
    """float32 convolutions and matmuls in true float32 (TF32 off) while active."""
    if not active:
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def analyse_windows(
    regions: Sequence[MosaicRegion],
    cfg: PipelineConfig,
    *,
    mosaic: Box,
    splines: Sequence,
    times: StageTimes | None = None,
    host: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> list[WindowResult]:
    """Detect, deblend and measure every object of a batch of equally-sized windows.

    Parameters
    ----------
    regions : sequence of MosaicRegion
        The windows' pixels (all bands, same shape).
    cfg : PipelineConfig
        Parameters; ``cfg.backend`` should be ``"torch"`` and ``cfg.device`` says where.
    mosaic : Box
        The whole mosaic.
    splines : sequence of BackgroundSpline
        One per band (:func:`~survey_engine.kernels.torch_background.background_spline`).
    times : StageTimes, optional
        Accumulates seconds per stage.
    host : tuple of torch.Tensor, optional
        The windows already stacked by :func:`stack_regions` (e.g. pinned by a reader
        thread).

    Returns
    -------
    list of WindowResult
        One per window, as :func:`~survey_engine.pipeline.analyse_window` returns.
    """
    from .kernels.torch_background import background_windows
    from .kernels.torch_instances import extract_instances_batch
    from .kernels.torch_measure import measure_batch
    from .unet.infer import inference_thresholds

    if not regions:
        return []
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device {cfg.device!r} requested but no CUDA GPU is visible to this process"
        raise RuntimeError(msg)
    times = times if times is not None else StageTimes(dev)
    bands = regions[0].bands
    h, w = regions[0].shape
    bsz = len(regions)
    windows = [Box(r.y0, r.y0 + h, r.x0, r.x0 + w) for r in regions]
    origins = torch.tensor([[b.y0, b.x0] for b in windows], dtype=torch.int64)
    model = cfg.unet()
    fg_t, c_t = inference_thresholds(model)
    minarea = int(cfg.detection.minarea)

    with times.stage("background"):
        img_h, var_h, msk_h = host if host is not None else stack_regions(regions)
        nb_ = dev.type == "cuda"
        img = img_h.to(dev, non_blocking=nb_)
        var = var_h.to(dev, non_blocking=nb_)
        msk = msk_h.to(dev, non_blocking=nb_)
        boxes = [(b.y0, b.y1, b.x0, b.x1) for b in windows]
        bkg = background_windows(splines, boxes, device=dev)
        usable = (
            ((msk & int(UNUSABLE)) == 0) & torch.isfinite(img) & torch.isfinite(var) & (var > 0)
        )
        masks = torch.where(usable, msk, msk | int(MaskBit.NO_DATA))
        zero = torch.zeros((), dtype=torch.float32, device=dev)
        images = torch.where(usable, img - bkg, zero)
        variances = torch.where(usable, var, torch.full((), math.inf, device=dev))
        del img, var, msk, bkg

    with times.stage("network"):
        if cfg.detection_band is not None or len(bands) == 1:
            bi = bands.index(cfg.detection_band) if cfg.detection_band is not None else 0
            det, det_var = images[:, bi], variances[:, bi]
        else:
            det, det_var = _detection_image(images, variances, usable, cfg.combine)
        det_bad = ~torch.isfinite(det_var)
        sig, bad = _significance(det, det_var, det_bad)
        bs = cfg.unet_batch_size or (1 if dev.type == "cpu" else 32)
        fg, cen, off = _network_maps(
            model, sig, origins, patch=512, batch_size=bs, amp=cfg.unet_amp
        )

    with times.stage("instances"):
        inst = extract_instances_batch(
            fg, cen, off, bad,
            foreground_threshold=fg_t, centre_threshold=c_t,
            minarea=minarea,
        )  # fmt: skip
        del fg, cen, off

    with times.stage("measure"):
        n_per = inst.n_objects.cpu().numpy()
        if int(n_per.sum()):
            filtered = _matched_filter(det, det_var, cfg.detection.kernel)
            res = measure_batch(
                det, det_var, filtered, images, variances, inst.labels, cfg.measure,
                origin=origins.to(dev), masks=masks, usable_bits=int(UNUSABLE),
                sat_bit=int(MaskBit.SAT), dtype=getattr(torch, cfg.measure_dtype),
            )  # fmt: skip
            res = {k: v.cpu().numpy() for k, v in res.items()}
            res = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in res.items()}
        else:
            res = None
        out = []
        offsets = np.concatenate([[0], np.cumsum(n_per)])
        for b in range(bsz):
            detres = inst.window(b)
            sl = slice(int(offsets[b]), int(offsets[b + 1]))
            meas = _measurements(res, sl, detres, bands, cfg, windows[b])
            out.append(finish_window(windows[b], detres, meas, cfg, mosaic=mosaic))
    return out


def _measurements(res, sl, detres: DetectionResult, bands, cfg: PipelineConfig, window: Box):
    """Host :class:`~survey_engine.kernels.measure.Measurements` of one window's objects."""
    m = Measurements()
    n = detres.n_objects
    if n == 0 or res is None:
        m.bbox = np.zeros((0, 4), dtype=np.int64)
        m.extent = np.zeros(0)
        return m
    r = {k: v[sl] for k, v in res.items()}
    if len(r["label"]) != n:
        msg = f"internal error: {len(r['label'])} measured objects for {n} labels"
        raise RuntimeError(msg)
    oy, ox = window.y0, window.x0
    px = r["x_peak"].astype(np.int64)
    py = r["y_peak"].astype(np.int64)
    mc = cfg.measure
    a, rk, sig = r["a"], r["kron_aperture"], r["window_sigma"]
    flags = np.zeros(n, dtype=np.int64)
    flags |= np.where(r["window_failed"], int(Flag.WINDOW_FAILED), 0)
    flags |= np.where(r["kron_truncated"], int(Flag.APERTURE_TRUNCATED), 0)
    flags |= np.where(r["masked"], int(Flag.MASKED), 0)
    flags |= np.where(r["saturated"], int(Flag.SATURATED), 0)
    m.columns = {
        "x": (px + ox) + r["dx"],
        "y": (py + oy) + r["dy"],
        "x_err": r["x_err"],
        "y_err": r["y_err"],
        "x_iso": (px + ox) + r["dx_iso"],
        "y_iso": (py + oy) + r["dy_iso"],
        "x_peak": px,
        "y_peak": py,
        "peak": r["peak"].astype(np.float64),
        "area": r["area"].astype(np.int64),
        "a": a,
        "b": r["b"],
        "theta": r["theta"],
        "e1": r["e1"],
        "e2": r["e2"],
        "half_light_radius": r["half_light_radius"],
        "kron_radius": r["kron_radius"],
        "det_iso_flux": r["det_iso_flux"],
        "det_iso_flux_err": r["det_iso_flux_err"],
        "det_kron_flux": r["det_kron_flux"],
        "det_kron_flux_err": r["det_kron_flux_err"],
        "flags": flags,
    }
    slices = ndimage.find_objects(detres.labels, max_label=n)
    m.bbox = np.array(
        [[s[0].start, s[0].stop, s[1].start, s[1].stop] for s in slices], dtype=np.int64
    )
    m.extent = (
        np.maximum.reduce(
            [mc.kron_max_radius * a, rk * a, np.full(n, mc.max_aperture), np.ceil(4 * sig) + 3]
        )
        + 2.0
    )
    for bi, band in enumerate(bands):
        col = {
            "iso_flux": r["iso_flux"][:, bi],
            "iso_flux_err": r["iso_flux_err"][:, bi],
            "kron_flux": r["kron_flux"][:, bi],
            "kron_flux_err": r["kron_flux_err"][:, bi],
        }
        for rad in mc.apertures:
            tag = aper_tag(rad)
            col[f"aper_flux_{tag}"] = r[f"aper_flux_{tag}"][:, bi]
            col[f"aper_flux_{tag}_err"] = r[f"aper_flux_{tag}_err"][:, bi]
        col["flags"] = np.where(r["kron_masked"][:, bi], int(Flag.MASKED), 0).astype(np.int64)
        m.bands[band] = col
    return m
