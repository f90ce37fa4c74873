"""The per-window pipeline: background → detection → measurement → safety (no Dask, no I/O).

:func:`analyse_window` turns the pixels of one read window into labelled,
measured objects and decides for each whether its result is *safe*: whether
every pixel that influenced it lies inside the window, so that any other
window holding the same pixels gives the identical result. Unsafe objects are
re-processed by the engine in a larger window.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from .flags import UNUSABLE, MaskBit
from .kernels.detect import (
    DetectionConfig,
    DetectionResult,
    detect_sources,
    detection_image,
    matched_filter,
)
from .kernels.measure import MeasureConfig, Measurements, measure_sources
from .mosaic import MosaicRegion
from .schema import ColumnSpec, Flag, catalog_columns, empty_columns
from .tiling import Box

__all__ = ["PipelineConfig", "WindowResult", "analyse_window", "catalog_rows", "finish_window"]


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that determines the catalog (stored with every catalog).

    Attributes
    ----------
    detection : DetectionConfig
        sep detection/deblending parameters.
    measure : MeasureConfig
        Measurement parameters.
    detection_band : str or None
        Detect on this band alone; None combines all bands (``combine``).
    combine : {"ivar", "chi2"}
        How bands are combined into the detection image.
    background_box : int
        Background mesh cell size (pixels), anchored at the mosaic origin.
    background_filter : int
        Median filter size of the background mesh (cells).
    deblender : {"sep", "unet"}
        ``sep``: sep's multi-threshold deblending (made window-independent);
        ``unet``: the U-Net of :mod:`survey_engine.unet` (foreground + centre maps → instances).
    unet_model : str or None
        Checkpoint of the ``unet`` deblender; None: the model shipped with the package.
    device : str
        Where the ``unet`` deblender runs: ``"cpu"`` or ``"cuda"``.
    unet_batch_size : int or None
        Patches per forward pass of the ``unet`` deblender (None: 1 on CPU, where it is
        fastest, 32 on CUDA).
    unet_amp : bool or None
        bfloat16 autocast of the U-Net; None: on for CUDA, off on CPU. ``False`` on CUDA
        runs the network in float32 with TF32 off, for maps within float32 rounding of the
        CPU ones (bf16 maps differ by ~1e-2, enough to move a few marginal objects).
    measure_dtype : {"float64", "float32"}
        Torch backend: working precision of the measurement sums. float64 (default) agrees
        with the numpy backend to rounding; float32 is faster on GPUs (measured on CPU:
        positions within 3e-6 px, fluxes within 6e-7 relative of float64, same flags).
    backend : {"numpy", "torch"}
        ``numpy``: sep/scipy/numpy kernels, one window at a time;
        ``torch``: every per-tile stage (background subtraction, detection image, U-Net,
        instances, matched filter, measurement) in torch on ``device``, batched over
        several tiles (:mod:`survey_engine.torch_pipeline`); needs ``deblender="unet"``.
    """

    detection: DetectionConfig = field(default_factory=DetectionConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    detection_band: str | None = None
    combine: str = "ivar"
    background_box: int = 128
    background_filter: int = 3
    deblender: str = "sep"
    unet_model: str | None = None
    device: str = "cpu"
    unet_batch_size: int | None = None
    unet_amp: bool | None = None
    measure_dtype: str = "float64"
    backend: str = "numpy"

    def __post_init__(self):
        if self.deblender not in DEBLENDERS:
            msg = f"unknown deblender {self.deblender!r}; available: {', '.join(map(repr, DEBLENDERS))}"
            raise ValueError(msg)
        if self.backend not in BACKENDS:
            msg = f"unknown backend {self.backend!r}; available: {', '.join(map(repr, BACKENDS))}"
            raise ValueError(msg)
        if self.backend == "torch" and self.deblender != "unet":
            msg = (
                "the torch backend (and --gpu) runs the unet deblender; got "
                f"deblender={self.deblender!r} (sep runs on the numpy backend only)"
            )
            raise ValueError(msg)
        if self.measure_dtype not in ("float64", "float32"):
            msg = f"measure_dtype must be 'float64' or 'float32', got {self.measure_dtype!r}"
            raise ValueError(msg)
        if str(self.device).split(":")[0] not in ("cpu", "cuda"):
            msg = f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {self.device!r}"
            raise ValueError(msg)
        if self.combine not in ("ivar", "chi2"):
            msg = f"combine must be 'ivar' or 'chi2', got {self.combine!r}"
            raise ValueError(msg)
        if int(self.background_box) != self.background_box or self.background_box < 8:
            msg = f"background_box must be an integer ≥ 8 pixels, got {self.background_box!r}"
            raise ValueError(msg)

    @property
    def guard(self) -> int:
        """Pixels kept between a footprint and a cut window edge (detection pad + minarea slivers).

        For the ``unet`` deblender the pad is the network's receptive radius.
        """
        pad = self.detection.pad
        if self.deblender == "unet":
            from .unet import model_pad

            # The architecture alone sets the pad: load on the CPU (the driver may have no GPU).
            pad = max(pad, model_pad(_unet_model(self.unet_model, "cpu")))
        return pad + int(self.detection.minarea)

    def unet(self):
        """The ``unet`` deblender's model, loaded once per process."""
        return _unet_model(self.unet_model, self.device)

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PipelineConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        det = dict(d.pop("detection", {}))
        if det.get("filter_kernel") is not None:
            det["filter_kernel"] = tuple(tuple(r) for r in det["filter_kernel"])
        mea = dict(d.pop("measure", {}))
        if "apertures" in mea:
            mea["apertures"] = tuple(mea["apertures"])
        return cls(detection=DetectionConfig(**det), measure=MeasureConfig(**mea), **d)

    def reference_band(self, bands: tuple[str, ...]) -> str:
        """Band behind the unprefixed ``flux`` column."""
        return self.detection_band if self.detection_band is not None else bands[-1]

    def columns(self, bands: tuple[str, ...], image_unit: str) -> list[ColumnSpec]:
        """Catalog schema for a mosaic with ``bands``."""
        return catalog_columns(
            bands,
            self.measure.apertures,
            image_unit=image_unit,
            reference_band=self.reference_band(bands),
        )


DEBLENDERS = ("sep", "unet")
BACKENDS = ("numpy", "torch")


@functools.lru_cache(maxsize=4)
def _unet_model(path: str | None, device: str):
    from .unet import load_model

    return load_model(path, device=device)


@dataclass
class WindowResult:
    """Objects found in one window (window pixel coordinates)."""

    window: Box
    detection: DetectionResult
    meas: Measurements
    safe: np.ndarray
    parent_safe: np.ndarray
    peak_y: np.ndarray  # mosaic coordinates
    peak_x: np.ndarray
    parent_peak_index: np.ndarray  # per object: index of the brightest child of its parent

    @property
    def n(self) -> int:
        """Number of objects."""
        return self.detection.n_objects


def analyse_window(
    region: MosaicRegion,
    backgrounds: np.ndarray,
    cfg: PipelineConfig,
    *,
    mosaic: Box,
    times: dict[str, float] | None = None,
) -> WindowResult:
    """Detect, deblend and measure every object of one window.

    Parameters
    ----------
    region : MosaicRegion
        Pixels of the window (all bands).
    backgrounds : numpy.ndarray
        ``(band, y, x)`` global background under the window.
    cfg : PipelineConfig
        Parameters.
    mosaic : Box
        The whole mosaic (sides of the window at the mosaic edge need no margin).
    times : dict, optional
        Accumulates seconds per stage (``background``, ``network`` — sep extraction or
        the U-Net —, ``instances``, ``measure``).

    Returns
    -------
    WindowResult
    """
    times = times if times is not None else {}
    clock = _Clock(times)
    h, w = region.shape
    window = Box(region.y0, region.y0 + h, region.x0, region.x0 + w)
    usable = (
        ((region.mask & UNUSABLE) == 0)
        & np.isfinite(region.image)
        & np.isfinite(region.variance)
        & (region.variance > 0)
    )
    # Non-finite pixels and non-positive variances are no data, exactly as if masked so:
    # the object flags (MASKED) then do not depend on how the gap was written.
    masks = np.where(usable, region.mask, region.mask | np.uint16(MaskBit.NO_DATA))
    images = np.where(usable, region.image - backgrounds, 0.0).astype(np.float32)
    variances = np.where(usable, region.variance, np.inf).astype(np.float32)
    if cfg.detection_band is not None:
        bi = region.bands.index(cfg.detection_band)
        det, det_var = images[bi], variances[bi]
    elif len(region.bands) == 1:
        det, det_var = images[0], variances[0]
    else:
        det, det_var = detection_image(images, variances, usable, cfg.combine)
    det_bad = ~np.isfinite(det_var)
    clock.lap("background")
    if cfg.deblender == "unet":
        from .unet import UNetConfig
        from .unet.infer import (
            extract_instances,
            inference_thresholds,
            predict_window,
            significance,
        )

        ucfg = UNetConfig(
            minarea=int(cfg.detection.minarea),
            device=cfg.device,
            batch_size=cfg.unet_batch_size or (1 if cfg.device == "cpu" else 32),
            amp=cfg.unet_amp,
        )
        net = cfg.unet()
        fg_t, c_t = inference_thresholds(net, ucfg)
        _, bad = significance(det, det_var, det_bad)
        maps = predict_window(net, det, det_var, bad, origin=(window.y0, window.x0), cfg=ucfg)
        clock.lap("network")
        res = extract_instances(
            maps, bad, foreground_threshold=fg_t, centre_threshold=c_t, minarea=ucfg.minarea
        )
        clock.lap("instances")
    else:
        res = detect_sources(det, det_var, det_bad, cfg.detection)
        clock.lap("network")
    meas = measure_sources(
        det,
        det_var,
        det_bad,
        images,
        variances,
        masks,
        res.labels,
        region.bands,
        cfg.measure,
        usable_bits=UNUSABLE,
        sat_bit=int(MaskBit.SAT),
        origin=(window.y0, window.x0),
        filtered=matched_filter(det, det_var, cfg.detection),
    )
    clock.lap("measure")
    return finish_window(window, res, meas, cfg, mosaic=mosaic)


class _Clock:
    """Adds the seconds since the previous lap to ``times[stage]``."""

    def __init__(self, times: dict[str, float]):
        self.times = times
        self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.times[stage] = self.times.get(stage, 0.0) + now - self.t
        self.t = now


def finish_window(
    window: Box,
    res: DetectionResult,
    meas: Measurements,
    cfg: PipelineConfig,
    *,
    mosaic: Box,
) -> WindowResult:
    """Safety, mosaic-edge/blend flags and parent IDs of one measured window (both backends).

    Parameters
    ----------
    window : Box
        The window in mosaic pixels.
    res : DetectionResult
        Labels and parents of the window.
    meas : Measurements
        Measurements (mosaic coordinates; ``bbox`` and ``extent`` set).
    cfg : PipelineConfig
        Parameters (the guard band).
    mosaic : Box
        The whole mosaic.

    Returns
    -------
    WindowResult
    """
    h, w = window.shape
    n = res.n_objects
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        none = np.zeros(0, bool)
        return WindowResult(window, res, meas, none, none, empty, empty, empty)

    # --- safety: every pixel that shaped the result lies inside the window -------------
    g = cfg.guard
    lo_y = 0 if window.y0 == mosaic.y0 else g
    lo_x = 0 if window.x0 == mosaic.x0 else g
    hi_y = h if window.y1 == mosaic.y1 else h - g
    hi_x = w if window.x1 == mosaic.x1 else w - g
    pslices = ndimage.find_objects(res.parents)
    pbox = np.array(
        [[s[0].start, s[0].stop, s[1].start, s[1].stop] for s in pslices], dtype=np.int64
    )[res.parent - 1]
    parent_safe = (
        (pbox[:, 0] >= lo_y) & (pbox[:, 1] <= hi_y) & (pbox[:, 2] >= lo_x) & (pbox[:, 3] <= hi_x)
    )
    c = meas.columns
    r = meas.extent
    yw = c["y_iso"] - window.y0
    xw = c["x_iso"] - window.x0
    # Apertures are clipped by sep at the mosaic edge (flagged), so only cut window edges count.
    ext_ok = (
        ((yw - r >= lo_y - 0.5) | (window.y0 == mosaic.y0))
        & ((yw + r <= hi_y - 0.5) | (window.y1 == mosaic.y1))
        & ((xw - r >= lo_x - 0.5) | (window.x0 == mosaic.x0))
        & ((xw + r <= hi_x - 0.5) | (window.x1 == mosaic.x1))
    )
    safe = parent_safe & ext_ok

    # EDGE: footprint touches the mosaic edge.
    bb = meas.bbox
    at_edge = (
        ((bb[:, 0] == 0) & (window.y0 == mosaic.y0))
        | ((bb[:, 1] == h) & (window.y1 == mosaic.y1))
        | ((bb[:, 2] == 0) & (window.x0 == mosaic.x0))
        | ((bb[:, 3] == w) & (window.x1 == mosaic.x1))
    )
    flags = c["flags"]
    flags |= np.where(at_edge, int(Flag.EDGE), 0)
    flags |= np.where(res.n_children > 1, int(Flag.BLENDED), 0)
    if res.overflow:
        flags |= int(Flag.DEBLEND_OVERFLOW)

    # Parent ID = the brightest child's ID (ties: lowest mosaic pixel index).
    peak_y = c["y_peak"] + window.y0
    peak_x = c["x_peak"] + window.x0
    flat = peak_y * mosaic.x1 + peak_x
    order = np.lexsort((flat, -c["peak"], res.parent))
    first = np.ones(n, dtype=bool)
    first[1:] = res.parent[order][1:] != res.parent[order][:-1]
    brightest = np.zeros(int(res.parent.max()) + 1, dtype=np.int64)
    brightest[res.parent[order][first]] = order[first]
    return WindowResult(window, res, meas, safe, parent_safe, peak_y, peak_x, brightest[res.parent])


def catalog_rows(
    wr: WindowResult,
    select: np.ndarray,
    *,
    mosaic_width: int,
    bands: tuple[str, ...],
    zero_points: dict[str, float | None],
    pixel_to_sky,
    cfg: PipelineConfig,
    image_unit: str,
) -> dict[str, np.ndarray]:
    """Catalog columns (mosaic coordinates, sky positions, nJy, magnitudes) of selected objects.

    Parameters
    ----------
    wr : WindowResult
        Result of :func:`analyse_window`.
    select : numpy.ndarray of bool or int
        Objects to output.
    mosaic_width : int
        For IDs (``y_peak * width + x_peak``).
    bands : tuple of str
        Band order.
    zero_points : dict
        AB zero point per band (None if unknown).
    pixel_to_sky : callable or None
        ``(x, y) -> (ra, dec)`` for 0-based mosaic pixels; None gives NaN.
    cfg : PipelineConfig
        Parameters (schema, reference band).
    image_unit : str
        Image unit.

    Returns
    -------
    dict of numpy.ndarray
        Exactly the schema's columns.
    """
    specs = cfg.columns(bands, image_unit)
    idx = np.flatnonzero(select) if np.asarray(select).dtype == bool else np.asarray(select)
    if len(idx) == 0:
        return empty_columns(specs)
    c = {k: v[idx] for k, v in wr.meas.columns.items()}
    oy, ox = wr.window.y0, wr.window.x0
    out: dict[str, np.ndarray] = {}
    ids_all = wr.peak_y * mosaic_width + wr.peak_x
    out["id"] = ids_all[idx]
    out["parent_id"] = ids_all[wr.parent_peak_index[idx]]
    out["n_children"] = wr.detection.n_children[idx]
    out["x_peak"] = c["x_peak"] + ox
    out["y_peak"] = c["y_peak"] + oy
    for k in (
        "x",
        "y",
        "x_iso",
        "y_iso",
        "x_err",
        "y_err",
        "a",
        "b",
        "theta",
        "e1",
        "e2",
        "half_light_radius",
        "kron_radius",
        "area",
        "peak",
        "flags",
    ):
        out[k] = c[k]
    if pixel_to_sky is not None and len(idx):
        out["ra"], out["dec"] = pixel_to_sky(out["x"], out["y"])
    else:
        out["ra"] = np.full(len(idx), np.nan)
        out["dec"] = np.full(len(idx), np.nan)
    for b in bands:
        bc = {k: v[idx] for k, v in wr.meas.bands[b].items()}
        out[f"{b}_flux"] = bc["kron_flux"]
        out[f"{b}_flux_err"] = bc["kron_flux_err"]
        out[f"{b}_iso_flux"] = bc["iso_flux"]
        out[f"{b}_iso_flux_err"] = bc["iso_flux_err"]
        for k, v in bc.items():
            if k.startswith("aper_flux_"):
                out[f"{b}_{k}"] = v
        zp = zero_points.get(b)
        if zp is None:
            out[f"{b}_flux_njy"] = np.full(len(idx), np.nan)
            out[f"{b}_flux_njy_err"] = np.full(len(idx), np.nan)
            out[f"{b}_mag"] = np.full(len(idx), np.nan)
            out[f"{b}_mag_err"] = np.full(len(idx), np.nan)
        else:
            scale = 10.0 ** (-0.4 * (zp - 31.4))  # one image unit in nJy
            f, fe = bc["kron_flux"], bc["kron_flux_err"]
            out[f"{b}_flux_njy"] = f * scale
            out[f"{b}_flux_njy_err"] = fe * scale
            with np.errstate(divide="ignore", invalid="ignore"):
                out[f"{b}_mag"] = np.where(
                    f > 0, zp - 2.5 * np.log10(np.where(f > 0, f, 1.0)), np.nan
                )
                out[f"{b}_mag_err"] = np.where(
                    f > 0, 2.5 / np.log(10) * fe / np.where(f > 0, f, 1.0), np.nan
                )
        out[f"{b}_flags"] = bc["flags"] | (
            c["flags"] & int(Flag.EDGE | Flag.SATURATED | Flag.BLENDED)
        )
    ref = cfg.reference_band(bands)
    out["flux"] = out[f"{ref}_flux"]
    out["flux_err"] = out[f"{ref}_flux_err"]
    return {s.name: out[s.name] for s in specs}
