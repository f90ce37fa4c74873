"""The drawing kernel: GalSim stamps of each object and the pixels of one mosaic block.

No Dask here: :func:`draw_block` is the pure per-block function that
:func:`survey_engine.simulate.simulate` maps over the chunk grid. Each stamp has fixed global
bounds and noise is seeded per (band, block), so the pixels depend on the seed and the chunk grid,
never on the workers. Determinism, stamp sizes and the truth segmentation: ``docs/simulation.md``.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np

from .._malloc import drawing_allocator
from ..flags import MaskBit
from ._artefacts import ArtefactPlan, apply_artefacts, no_data_mask
from ._bands import BandSetup, make_psf
from ._scene import BULGE_TRUNCATION

__all__ = ["DrawConfig", "draw_block", "object_plan", "render_block", "select_objects"]

MAX_HALF = 127  #: Largest stamp half size (stamps are at most 2 * MAX_HALF + 1 = 255 pixels wide).
MIN_HALF = 4  #: Smallest stamp half size.
MIN_PSF_RADIUS = 6.0  #: Stamp radius covers at least this many PSF FWHM.
DISK_RADIUS = 8.0  #: ... and this many disk half-light radii.
KOLMOGOROV_WING = 0.09  #: Kolmogorov flux fraction outside R: KOLMOGOROV_WING (R / FWHM)^(-5/3).
EDGE_SIGMA = 0.05  #: PSF wing level at the stamp edge, in sky σ per pixel.
LOST_FRACTION = 1e-3  #: Flux allowed outside the stamp: a fraction of the flux ...
LOST_NOISE = 0.2  #: ... or this fraction of the point-source noise, whichever is larger.
MAX_FFT_SIZE = 16384  #: GalSim FFT size limit (the default 8192 fails for the largest bulges).
FAST_PHASES = 8  #: Fast path of cluster stars (docs/simulation.md): PSF phases per pixel and axis,
FAST_HALF = 64  #: ... for stamps up to this half size ...
FAST_ERROR = 2e-6  #: ... and fluxes whose interpolation error bound (per unit flux) ≤ 0.05 sky σ.

_NOISE_TAG = 0x401CE


@dataclass(frozen=True)
class DrawConfig:
    """Settings shared by all blocks of one simulation.

    Attributes
    ----------
    bands : tuple of BandSetup
        Per-band PSF, noise and saturation, in mosaic band order.
    pixel_scale, psf, seed : float, str, int
        Arcsec per pixel; ``"kolmogorov"`` or ``"moffat"``; simulation seed (noise streams).
    seg_threshold : float or None
        Truth-segmentation threshold on the band-summed noiseless image (None: no segmentation).
    artefacts : ArtefactPlan or None
        Bad columns, trail and no-data corner (``masks=True``).
    """

    bands: tuple[BandSetup, ...]
    pixel_scale: float
    psf: str
    seed: int
    seg_threshold: float | None
    artefacts: ArtefactPlan | None


_SHAPE_FIELDS = ("disk_hlr", "bulge_hlr", "bulge_fraction", "e1", "e2")


def plan_dtype(n_bands: int) -> np.dtype:
    """Structured dtype of the per-object drawing plan."""
    return np.dtype([
        ("id", "i8"), ("x", "f8"), ("y", "f8"), ("cx", "i8"), ("cy", "i8"), ("half", "i8"),
        ("star", "?"), ("fast", "?"), ("flux", "f8", (n_bands,)), *((name, "f8") for name in _SHAPE_FIELDS),
    ])  # fmt: skip


def _values(column) -> np.ndarray:
    """A table column (a Quantity or not) as a float array, without its unit."""
    return np.asarray(getattr(column, "value", column), dtype=float)


def object_plan(truth, bands: tuple[BandSetup, ...], pixel_scale: float) -> np.ndarray:
    """Turn a truth table into the drawing plan: one record per object, sorted by id.

    Parameters
    ----------
    truth : astropy.table.Table
        Truth table (see :func:`~survey_engine.simulate.make_scene`).
    bands : tuple of BandSetup
    pixel_scale : float

    Returns
    -------
    numpy.ndarray
        Structured array of :func:`plan_dtype`, with the stamp geometry.
    """
    plan = np.zeros(len(truth), dtype=plan_dtype(len(bands)))
    plan["id"] = np.asarray(truth["id"], dtype=np.int64)
    for name in ("x", "y", *_SHAPE_FIELDS):
        plan[name] = _values(truth[name])
    plan["cx"], plan["cy"] = np.floor(plan["x"] + 0.5), np.floor(plan["y"] + 0.5)
    plan["star"] = np.asarray(truth["kind"]) == "star"
    for i, b in enumerate(bands):
        plan["flux"][:, i] = _values(truth[f"{b.name}_flux"])
    plan["half"] = stamp_half_sizes(plan, bands, pixel_scale)
    if "population" in truth.colnames:  # cluster stars faint enough for the fast path
        sky = np.array([b.sky_sigma for b in bands])
        plan["fast"] = (plan["star"] & (np.asarray(truth["population"]) == "cluster") & (plan["half"] <= FAST_HALF)
                        & np.all(plan["flux"] * FAST_ERROR <= EDGE_SIGMA * sky, axis=1))  # fmt: skip
    return plan[np.argsort(plan["id"], kind="stable")]


def stamp_half_sizes(plan: np.ndarray, bands: tuple[BandSetup, ...], pixel_scale: float):
    """Stamp half sizes (pixels) of the objects of a plan (``docs/simulation.md``)."""
    galaxy = ~plan["star"]
    bf = plan["bulge_fraction"]
    e = np.minimum(np.hypot(plan["e1"], plan["e2"]), 0.99)
    axis = ((1.0 + e) / (1.0 - e)) ** 0.25
    r_disk = np.where(galaxy & (bf < 1.0), DISK_RADIUS * plan["disk_hlr"], 0.0)
    r_bulge = np.where(galaxy & (bf > 0.0), BULGE_TRUNCATION * plan["bulge_hlr"], 0.0)
    r_gal = axis * np.maximum(r_disk, r_bulge)
    r_psf = np.zeros(len(plan))
    for i, b in enumerate(bands):
        flux = np.maximum(plan["flux"][:, i], 0.0)
        edge = (
            flux * (5.0 / 3.0) * KOLMOGOROV_WING * b.psf_fwhm ** (5.0 / 3.0) * pixel_scale**2
            / (2.0 * math.pi * EDGE_SIGMA * b.sky_sigma)
        ) ** (3.0 / 11.0)  # fmt: skip
        point_sigma = 10.0 ** (-0.4 * (b.depth - b.zero_point)) / 5.0
        lost = np.maximum(LOST_FRACTION * flux, LOST_NOISE * point_sigma)
        wing = b.psf_fwhm * (KOLMOGOROV_WING * flux / lost) ** 0.6
        r_psf = np.maximum(r_psf, np.maximum(MIN_PSF_RADIUS * b.psf_fwhm, np.maximum(edge, wing)))
    half = np.ceil(np.hypot(r_gal, r_psf) / pixel_scale)
    return np.clip(half, MIN_HALF, MAX_HALF).astype(np.int64)


def select_objects(plan: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Objects of ``plan`` whose stamps overlap the half-open block ``[y0, y1) × [x0, x1)``."""
    h, cx, cy = plan["half"], plan["cx"], plan["cy"]
    return plan[(cx + h >= x0) & (cx - h < x1) & (cy + h >= y0) & (cy - h < y1)]


def _gsparams():
    """GalSim parameters of every profile drawn (a larger FFT limit)."""
    import galsim

    return galsim.GSParams(maximum_fft_size=MAX_FFT_SIZE)


def draw_stamps(obj, psfs, pixel_scale: float, gsparams) -> np.ndarray:
    """Noiseless stamps of one object in every band.

    Parameters
    ----------
    obj : numpy.void
        One record of the drawing plan.
    psfs : list of galsim.GSObject
        Unit-flux PSF of each band.
    pixel_scale : float
    gsparams : galsim.GSParams

    Returns
    -------
    numpy.ndarray
        ``(band, 2 half + 1, 2 half + 1)`` float64; pixel ``[.., 0, 0]`` is mosaic pixel
        ``(cy - half, cx - half)``.
    """
    import galsim

    h, cx, cy = int(obj["half"]), int(obj["cx"]), int(obj["cy"])
    bounds = galsim.BoundsI(cx - h, cx + h, cy - h, cy + h)
    offset = galsim.PositionD(float(obj["x"]) - cx, float(obj["y"]) - cy)
    out = np.zeros((len(psfs), 2 * h + 1, 2 * h + 1))
    gal = None
    if not obj["star"]:
        bf = float(obj["bulge_fraction"])
        parts = []
        hd, hb = float(obj["disk_hlr"]), float(obj["bulge_hlr"])
        if bf < 1.0:
            parts.append(galsim.Exponential(half_light_radius=hd, flux=1.0 - bf, gsparams=gsparams))
        if bf > 0.0:
            parts.append(galsim.DeVaucouleurs(
                half_light_radius=hb, trunc=BULGE_TRUNCATION * hb, flux=bf, gsparams=gsparams
            ))  # fmt: skip
        gal = parts[0] if len(parts) == 1 else galsim.Add(parts, gsparams=gsparams)
        e1, e2 = float(obj["e1"]), float(obj["e2"])
        if e1 or e2:
            gal = gal.shear(galsim.Shear(e1=e1, e2=e2))
    for i, psf in enumerate(psfs):
        flux = float(obj["flux"][i])
        if flux == 0.0:
            continue
        if gal is None:
            prof = psf.withFlux(flux)
        else:
            prof = galsim.Convolve([gal.withFlux(flux), psf], gsparams=gsparams)
        img = galsim.ImageD(bounds, scale=pixel_scale)
        prof.drawImage(image=img, offset=offset)
        out[i] = img.array
    return out


@functools.lru_cache(maxsize=8)
def _psf_phases(kind: str, fwhm: float, pixel_scale: float) -> np.ndarray:
    """GalSim unit-flux PSF images ``[j, i]`` at offsets ``(-0.5 + (i - 1) / FAST_PHASES, same j)``."""
    import galsim

    psf, h = make_psf(kind, fwhm, _gsparams()), FAST_HALF
    phases = -0.5 + np.arange(-1, FAST_PHASES + 2) / FAST_PHASES
    out = np.empty((phases.size, phases.size, 2 * h + 1, 2 * h + 1))
    for j, py in enumerate(phases):
        for i, px in enumerate(phases):
            img = galsim.ImageD(galsim.BoundsI(-h, h, -h, h), scale=pixel_scale)
            out[j, i] = psf.drawImage(image=img, offset=galsim.PositionD(px, py)).array
    return out


def _fast_star(obj, cubes: list[np.ndarray]) -> np.ndarray:
    """:func:`draw_stamps` of a star, Catmull-Rom interpolated in :func:`_psf_phases` of each band."""
    h, ks, ws = int(obj["half"]), [], []
    for d in (float(obj["y"] - obj["cy"]), float(obj["x"] - obj["cx"])):
        f = (d + 0.5) * FAST_PHASES
        k = min(max(math.floor(f), 0), FAST_PHASES - 1)
        t = f - k
        ks.append(k)
        ws.append([(-t**3 + 2 * t**2 - t) / 2, (3 * t**3 - 5 * t**2 + 2) / 2,
                   (-3 * t**3 + 4 * t**2 + t) / 2, (t**3 - t**2) / 2])  # fmt: skip
    w, crop = np.outer(*ws), slice(FAST_HALF - h, FAST_HALF + h + 1)
    out = np.empty((len(cubes), 2 * h + 1, 2 * h + 1))
    for i, cube in enumerate(cubes):
        sub = cube[ks[0] : ks[0] + 4, ks[1] : ks[1] + 4, crop, crop]
        out[i] = float(obj["flux"][i]) * np.einsum("ji,jiab->ab", w, sub)
    return out


def render_block(objects: np.ndarray, y0: int, y1: int, x0: int, x1: int, config: DrawConfig):
    """Noiseless model and truth segmentation of one block.

    Parameters
    ----------
    objects : numpy.ndarray
        Plan records of the objects overlapping the block, sorted by id.
    y0, y1, x0, x1 : int
        Half-open block bounds (mosaic pixels).
    config : DrawConfig

    Returns
    -------
    model : numpy.ndarray
        ``(band, h, w)`` float64 noiseless image.
    segmentation : numpy.ndarray or None
        ``(h, w)`` int64 truth ids (0 = none); None when ``config.seg_threshold`` is None.
    """
    h, w = y1 - y0, x1 - x0
    model = np.zeros((len(config.bands), h, w))
    seg = best = None
    if config.seg_threshold is not None:
        seg = np.zeros((h, w), dtype=np.int64)
        best = np.full((h, w), float(config.seg_threshold))
    gsparams = _gsparams()
    psfs = [make_psf(config.psf, b.psf_fwhm, gsparams) for b in config.bands]
    cubes = None
    if len(objects) and objects["fast"].any():
        cubes = [_psf_phases(config.psf, b.psf_fwhm, config.pixel_scale) for b in config.bands]
    for obj in objects:
        half = int(obj["half"])
        sy0, sx0 = int(obj["cy"]) - half, int(obj["cx"]) - half
        ya, yb = max(sy0, y0), min(sy0 + 2 * half + 1, y1)
        xa, xb = max(sx0, x0), min(sx0 + 2 * half + 1, x1)
        if ya >= yb or xa >= xb:
            continue
        if obj["fast"]:
            stamps = _fast_star(obj, cubes)
        else:
            stamps = draw_stamps(obj, psfs, config.pixel_scale, gsparams)
        dst = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
        src = (slice(ya - sy0, yb - sy0), slice(xa - sx0, xb - sx0))
        model[(slice(None), *dst)] += stamps[(slice(None), *src)]
        if seg is not None:
            total = stamps[0].copy()
            for s in stamps[1:]:
                total += s
            sub = total[src]
            win = sub > best[dst]
            best[dst][win] = sub[win]
            seg[dst][win] = int(obj["id"])
    return model, seg


def finish_band(
    model: np.ndarray, band: BandSetup, block: tuple[int, int], y0: int, x0: int, config: DrawConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise, artefacts, saturation and no-data of one band of one block.

    Parameters
    ----------
    model : numpy.ndarray
        (h, w) float64 noiseless image.
    band : BandSetup
    block : (int, int)
        Block row and column in the chunk grid (noise seed).
    y0, x0 : int
        Mosaic pixel of the block's first row/column.
    config : DrawConfig

    Returns
    -------
    image, variance, mask : numpy.ndarray
        float32, float32 and uint16 :class:`~survey_engine.flags.MaskBit` values.
    """
    seq = np.random.SeedSequence([config.seed, _NOISE_TAG, band.code, block[0], block[1]])
    rng = np.random.default_rng(seq)
    variance = band.sky_sigma**2 + np.maximum(model, 0.0) / band.gain
    image = model + rng.standard_normal(model.shape) * np.sqrt(variance)
    mask = np.zeros(model.shape, dtype=np.uint16)
    if config.artefacts is not None:
        apply_artefacts(image, mask, y0, x0, band, config.artefacts)
    sat = image >= band.saturation
    image[sat] = band.saturation
    mask[sat] |= int(MaskBit.SAT)
    if config.artefacts is not None:
        h, w = model.shape
        empty = no_data_mask(y0, y0 + h, x0, x0 + w, config.artefacts)
        image[empty] = 0.0
        variance[empty] = np.inf
        mask[empty] = int(MaskBit.NO_DATA)
    return image.astype(np.float32), variance.astype(np.float32), mask


def draw_block(item: dict, *, path: str, config: DrawConfig) -> dict:
    """Draw one block of the mosaic and write it into the store (run on a worker).

    Parameters
    ----------
    item : dict
        ``block`` (row, column) in the chunk grid, ``bounds`` (y0, y1, x0, x1)
        and ``objects`` (plan records overlapping the block, by id).
    path : str
        The mosaic store (created beforehand; this block is its chunk's only writer).
    config : DrawConfig

    Returns
    -------
    dict
        Small statistics: ``objects`` drawn, ``saturated`` pixels (all bands),
        ``draw_s`` and ``total_s`` seconds.
    """
    from ..mosaic import open_mosaic

    t0 = time.perf_counter()
    y0, y1, x0, x1 = item["bounds"]
    with drawing_allocator():
        model, seg = render_block(item["objects"], y0, y1, x0, x1, config)
    t1 = time.perf_counter()
    mosaic = open_mosaic(path, mode="r+")
    saturated = 0
    for i, band in enumerate(config.bands):
        image, variance, mask = finish_band(model[i], band, item["block"], y0, x0, config)
        saturated += int(np.count_nonzero(mask & int(MaskBit.SAT)))
        mosaic.write(i, y0, x0, image=image, variance=variance, mask=mask)
    if seg is not None:
        mosaic.group["truth_segmentation"][y0:y1, x0:x1] = seg
    n, total = len(item["objects"]), time.perf_counter() - t0
    return {"objects": n, "saturated": saturated, "draw_s": t1 - t0, "total_s": total}
