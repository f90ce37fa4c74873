"""Training data of the U-Net deblender: GalSim objects blended artificially, written to Zarr.

:func:`draw_library` (GalSim, run once) draws isolated noiseless objects; :func:`compose` (numpy)
blends them into stamps with their targets; :func:`generate_training_set` writes a Zarr group or
a compact ``.npz`` that :func:`load_training_set` composes bit for bit anywhere; noise is added
per epoch (:func:`noisy_significance`). Targets, blend statistics, storage: ``docs/unet.md``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DATASET_FORMAT", "Library", "TrainingSet", "compose", "draw_library",
    "generate_training_set", "load_training_set", "noisy_significance",
]  # fmt: skip

logger = logging.getLogger(__name__)

#: Format tag of training sets (Zarr attribute / npz entry).
DATASET_FORMAT = "survey_engine.unet.dataset/1"
#: Probability of 1, 2, 3 and 4–8 (crowded) objects per stamp.
N_OBJECTS_P = (0.15, 0.35, 0.20, 0.30)
#: Most objects in one stamp.
MAX_OBJECTS = 8

_TAG_LIBRARY = 0x0B1E
_TAG_COMPOSE = 0xC0B1
_TAG_NOISE = 0x9015E


@dataclass
class Library:
    """Isolated noiseless objects, cropped, in units of each band's sky σ.

    Attributes
    ----------
    pixels : numpy.ndarray
        float16, all crops ``(C, h, w)`` flattened and concatenated.
    start, shape : numpy.ndarray
        int64 offset of each object's crop in ``pixels``; int32 ``(n, 2)`` its height and width.
    centre : numpy.ndarray
        float32 ``(n, 2)`` true centre ``(y, x)`` in crop pixel coordinates.
    condition : numpy.ndarray
        int32 index into ``conditions`` of each object.
    nu, det_flux : numpy.ndarray
        float32 matched-filter S/N of the noiseless detection image, and its flux in the
        detection significance image (sky σ · pixels).
    mag, star : numpy.ndarray
        float32 r-band magnitude; bool, point source.
    conditions : list of dict
        Per observing condition: ``psf``, ``psf_fwhm`` (r band, arcsec), ``fwhm_px``,
        ``sky_sigma`` and ``source_noise`` per band (``var / σ² = 1 + source_noise · m``
        for a model ``m`` in sky σ), ``det_weights`` (``D = Σ_b det_weights_b m_b``).
    attrs : dict
        How the library was drawn.
    """

    pixels: np.ndarray
    start: np.ndarray
    shape: np.ndarray
    centre: np.ndarray
    condition: np.ndarray
    nu: np.ndarray
    det_flux: np.ndarray
    mag: np.ndarray
    star: np.ndarray
    conditions: list[dict]
    attrs: dict = field(default_factory=dict)

    _ARRAYS = ("pixels", "start", "shape", "centre", "condition", "nu", "det_flux", "mag", "star")

    def __len__(self) -> int:
        return len(self.start)

    @property
    def n_bands(self) -> int:
        """Number of bands of the crops."""
        return len(self.conditions[0]["sky_sigma"])

    def crop(self, i: int) -> np.ndarray:
        """Object ``i``'s crop, ``(C, h, w)`` float32 in sky σ."""
        h, w = (int(v) for v in self.shape[i])
        n = self.n_bands * h * w
        s = int(self.start[i])
        return self.pixels[s : s + n].astype(np.float32).reshape(self.n_bands, h, w)

    def to_arrays(self, prefix: str = "library/") -> dict[str, np.ndarray]:
        """Flat dict of arrays (+ JSON metadata) for npz/Zarr storage."""
        out = {prefix + k: getattr(self, k) for k in self._ARRAYS}
        meta = {"conditions": self.conditions, "attrs": self.attrs}
        out[prefix + "meta"] = np.array(json.dumps(meta))
        return out

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "library/") -> Library:
        """Inverse of :meth:`to_arrays` (any mapping of array-likes)."""
        meta = json.loads(str(np.asarray(arrays[prefix + "meta"])[()]))
        kw = {k: np.asarray(arrays[prefix + k]) for k in cls._ARRAYS}
        return cls(**kw, conditions=meta["conditions"], attrs=meta["attrs"])


@dataclass
class TrainingSet:
    """Composed noiseless samples and their targets (defined in ``docs/unet.md``).

    Attributes
    ----------
    model : numpy.ndarray
        float16 ``(N, C, H, W)`` noiseless image in units of each band's sky σ.
    sky_sigma, source_noise : numpy.ndarray
        float32 ``(N, C)``: noise model of each sample (see :func:`noisy_significance`).
    det_weights : numpy.ndarray
        float32 ``(N, C)``: detection-image weights of the noiseless model.
    foreground, owner : numpy.ndarray
        bool and uint8 ``(N, H, W)``: 1 + index into ``centres`` of the owning object, 0 for none.
    centres, detectable : numpy.ndarray
        float32 ``(N, MAX_OBJECTS, 2)`` true centres ``(y, x)`` (NaN for absent objects); bool
        ``(N, MAX_OBJECTS)``.
    nu, det_flux : numpy.ndarray
        float32 ``(N, MAX_OBJECTS)`` S/N and detection flux of each object (0 if absent).
    condition : numpy.ndarray
        int32 ``(N,)`` observing condition.
    image : numpy.ndarray or None
        float32 ``(N, 1, H, W)`` one noisy significance realisation (Zarr sets only).
    attrs : dict
        Generation parameters and target definition.
    """

    model: np.ndarray
    sky_sigma: np.ndarray
    source_noise: np.ndarray
    det_weights: np.ndarray
    foreground: np.ndarray
    owner: np.ndarray
    centres: np.ndarray
    detectable: np.ndarray
    nu: np.ndarray
    det_flux: np.ndarray
    condition: np.ndarray
    image: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)

    _ARRAYS = (
        "model", "sky_sigma", "source_noise", "det_weights", "foreground", "owner", "centres",
        "detectable", "nu", "det_flux", "condition",
    )  # fmt: skip

    def __len__(self) -> int:
        return len(self.model)


# -- validation helpers ----------------------------------------------------------------
def _raise_if(condition: bool, msg: str) -> None:
    """``mosaic._raise_if``, copied: this module and train run without the engine's dependencies."""
    if condition:
        raise ValueError(msg)


def _check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int; ValueError unless it is an integer >= ``minimum`` (1 or 0)."""
    kind = "positive" if minimum == 1 else "non-negative"
    bad = isinstance(value, bool) or int(value) != value or value < minimum
    _raise_if(bad, f"{name} must be a {kind} integer, got {value!r}")
    return int(value)


def _as_tuple(value) -> tuple:
    """A scalar or a string as a 1-tuple, a sequence as a tuple."""
    return (value,) if isinstance(value, str) or not isinstance(value, Sequence) else tuple(value)


# -- stage 1: the library (GalSim) -----------------------------------------------------
def draw_library(
    *, n_objects: int, seed: int = 0, bands: str | Sequence[str] = ("r",),
    psf: str | Sequence[str] = ("kolmogorov",),
    psf_fwhm: float | Sequence[float] = (0.6, 0.75, 0.9), depth: float = 26.8,
    pixel_scale: float = 0.2, mag_range: tuple[float, float] = (19.0, 27.0),
    mag_slope: float = 0.1, star_fraction: float = 0.15, max_half: int = 64,
    crop_level: float = 0.03, progress: bool = True,
) -> Library:  # fmt: skip
    """Draw isolated galaxies and stars with GalSim (the simulator's population and kernel).

    Parameters
    ----------
    n_objects : int
        Objects in the library, split evenly over the conditions.
    seed : int
        Non-negative seed.
    bands : sequence of str or str
        Bands (``ugrizy``); the network sees their inverse-variance weighted sum.
    psf : str or sequence of str
        PSF kinds (``kolmogorov``, ``moffat``).
    psf_fwhm : float or sequence of float
        r-band PSF FWHMs (arcsec). Conditions are all (psf, psf_fwhm) pairs.
    depth, pixel_scale : float
        r-band 5σ point-source depth (AB; other bands get the LSST offsets); arcsec per pixel.
    mag_range : (float, float)
        r-band magnitude range of the library.
    mag_slope : float
        ``d log10 N / d m`` of the library's magnitude distribution (0: flat; the
        sky's galaxy counts have 0.33).
    star_fraction, max_half : float, int
        Fraction of stars; largest stamp half size drawn (pixels).
    crop_level : float
        Crops keep the pixels above this many sky σ (in some band).
    progress : bool
        Show a progress bar.

    Returns
    -------
    Library
    """
    from ..simulate._bands import band_setups, make_psf, parse_bands
    from ..simulate._draw import _gsparams, draw_stamps, object_plan
    from ..simulate._scene import GALAXY_COUNTS, expected_counts, make_scene

    n_objects = _check_int("n_objects", n_objects)
    seed = _check_int("seed", seed, 0)
    bands = parse_bands(bands)
    psfs_kinds = tuple(str(p) for p in _as_tuple(psf))
    fwhms = tuple(float(f) for f in _as_tuple(psf_fwhm))
    for kind in psfs_kinds:
        _raise_if(kind not in ("kolmogorov", "moffat"),
                  f"psf must be 'kolmogorov' or 'moffat', got {kind!r}")  # fmt: skip
    _raise_if(not fwhms or any(not (0 < f < 10) for f in fwhms),
              f"psf_fwhm must be positive FWHMs in arcsec, got {psf_fwhm!r}")  # fmt: skip
    m0, m1 = (float(m) for m in mag_range)
    _raise_if(not m0 < m1,
              f"mag_range must be (bright, faint) with bright < faint, got {mag_range!r}")  # fmt: skip
    _raise_if(not 0 <= star_fraction <= 1,
              f"star_fraction must be in [0, 1], got {star_fraction!r}")  # fmt: skip
    conditions_in = [(k, f) for k in psfs_kinds for f in fwhms]
    scene_bands = tuple(dict.fromkeys((*bands, "r")))

    # One population pool for all conditions, resampled to the library's magnitude law.
    n_star = round(n_objects * star_fraction)
    n_gal = n_objects - n_star
    slope = GALAXY_COUNTS[1]
    k = slope * math.log(10)
    if mag_slope >= slope:
        accept_mean = 1.0
    elif mag_slope > 0:
        grow = (10 ** (mag_slope * (m1 - m0)) - 1) / (mag_slope * math.log(10))
        accept_mean = k * 10 ** (slope * (m0 - m1)) * grow
    else:
        accept_mean = k * (m1 - m0) * 10 ** (slope * (m0 - m1))
    per_deg2, stars_deg2 = expected_counts(1.0, max_mag=m1)
    want = max(n_gal / max(accept_mean, 1e-6), n_star / 0.5 * per_deg2 / stars_deg2)
    side = 2048
    area = (side * pixel_scale / 3600.0) ** 2
    density = 1.3 * want / (per_deg2 * area) + 1e-3
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_LIBRARY]))
    scene_seed = int(rng.integers(2**31))
    t0 = time.perf_counter()
    pool = make_scene(side, side, bands=scene_bands, seed=scene_seed, pixel_scale=pixel_scale,
                      density=density, max_mag=m1)  # fmt: skip
    rmag = np.asarray(pool["r_mag"].value)
    star = np.asarray(pool["kind"]) == "star"
    inside = (rmag >= m0) & (rmag < m1)
    u = rng.random(len(pool))
    gal_idx = np.flatnonzero(inside & ~star & (u < 10 ** ((mag_slope - slope) * (rmag - m0))))
    star_idx = np.flatnonzero(inside & star)
    if len(gal_idx) < n_gal or len(star_idx) < n_star:  # pragma: no cover - pool is oversized
        msg = "internal error: population pool too small; increase its density"
        raise RuntimeError(msg)
    chosen = np.concatenate([rng.choice(gal_idx, n_gal, replace=False),
                             rng.choice(star_idx, n_star, replace=False)])  # fmt: skip
    rng.shuffle(chosen)
    table = pool[np.sort(chosen)]
    table = table[rng.permutation(len(table))]
    logger.info("library population: %d galaxies, %d stars (pool %d, %.1f s)",
                n_gal, n_star, len(pool), time.perf_counter() - t0)  # fmt: skip

    conditions = []
    gsparams = _gsparams()
    cond_of = np.arange(n_objects) % len(conditions_in)
    crops: list = [None] * n_objects  # object j's crop, drawn condition by condition
    shapes = np.zeros((n_objects, 2), np.int32)
    centres = np.zeros((n_objects, 2), np.float32)
    nu = np.zeros(n_objects, np.float32)
    det_flux = np.zeros(n_objects, np.float32)
    sub = rng.uniform(-0.5, 0.5, size=(n_objects, 2))
    bar = _progress(total=n_objects, desc="drawing library", enabled=progress)
    for c, (kind, fwhm) in enumerate(conditions_in):
        setups = band_setups(bands, depth=depth, psf=kind, psf_fwhm=fwhm, pixel_scale=pixel_scale)
        sigma = np.array([b.sky_sigma for b in setups])
        w = (1 / sigma) / np.sqrt(np.sum(1 / sigma**2))
        conditions.append({
            "psf": kind, "psf_fwhm": fwhm, "fwhm_px": fwhm / pixel_scale,
            "sky_sigma": sigma.tolist(),
            "source_noise": [1.0 / (b.sky_sigma * b.gain) for b in setups],
            "det_weights": w.tolist(), "band_fwhm": [b.psf_fwhm for b in setups],
        })  # fmt: skip
        psfs = [make_psf(kind, b.psf_fwhm, gsparams) for b in setups]
        idx = np.flatnonzero(cond_of == c)
        plan = object_plan(table[idx], setups, pixel_scale)
        # object_plan sorts by id; keep the table order instead.
        order = np.argsort(np.argsort(np.asarray(table["id"][idx])))
        plan = plan[order]
        plan["y"], plan["x"] = sub[idx, 0], sub[idx, 1]
        plan["cy"] = plan["cx"] = 0
        plan["half"] = np.minimum(plan["half"], max_half)
        for j, obj in zip(idx, plan, strict=True):
            st = draw_stamps(obj, psfs, pixel_scale, gsparams) / sigma[:, None, None]
            h = int(obj["half"])
            keep = (st > crop_level).any(axis=0)
            keep[h - 1 : h + 2, h - 1 : h + 2] = True
            ys, xs = np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))
            y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
            crop = st[:, y0:y1, x0:x1]
            crops[j] = crop.astype(np.float16).ravel()
            shapes[j] = crop.shape[1:]
            centres[j] = (h + obj["y"] - y0, h + obj["x"] - x0)
            det = np.tensordot(w, st, axes=1)
            nu[j] = np.sqrt(np.sum(det**2))
            det_flux[j] = det.sum()
            bar.update(1)
    bar.close()
    sizes = np.array([len(a) for a in crops], dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    lib = Library(
        pixels=np.concatenate(crops), start=start, shape=shapes, centre=centres,
        condition=cond_of.astype(np.int32), nu=nu, det_flux=det_flux,
        mag=np.asarray(table["r_mag"].value, np.float32), star=np.asarray(table["kind"]) == "star",
        conditions=conditions,
        attrs={"seed": seed, "n_objects": n_objects, "bands": list(bands), "depth": float(depth),
               "pixel_scale": float(pixel_scale), "mag_range": [m0, m1],
               "mag_slope": float(mag_slope), "star_fraction": float(star_fraction),
               "max_half": int(max_half), "crop_level": float(crop_level)},
    )  # fmt: skip
    logger.info("drew %d library objects in %.1f s (%.1f MB)",
                n_objects, time.perf_counter() - t0, lib.pixels.nbytes / 1e6)  # fmt: skip
    return lib


# -- stage 2: blends (numpy) -----------------------------------------------------------
def _dihedral(a: np.ndarray, cy: float, cx: float, t: int):
    """Apply dihedral op ``t`` (0–7) to ``a`` (..., h, w) and map the point (cy, cx)."""
    for _ in range(t % 4):  # np.rot90: out[i, j] = a[j, w - 1 - i]
        w = a.shape[-1]
        a = np.rot90(a, 1, axes=(-2, -1))
        cy, cx = w - 1 - cx, cy
    if t >= 4:
        a = a[..., ::-1]
        cx = a.shape[-1] - 1 - cx
    return np.ascontiguousarray(a), cy, cx


def _n_objects(rng: np.random.Generator) -> int:
    """Objects in a stamp, drawn from :data:`N_OBJECTS_P` (4–8 uniform)."""
    n = 1 + int(np.searchsorted(np.cumsum(N_OBJECTS_P)[:3], rng.random(), side="right"))
    return n if n < 4 else int(rng.integers(4, MAX_OBJECTS + 1))


def compose(
    library: Library, *, samples: int, seed: int = 0, stamp: int = 64,
    close_fraction: float = 0.6, separation: tuple[float, float] = (0.3, 4.0),
    max_flux_ratio: float = 20.0, fg_threshold: float = 1.0, nu_min: float = 5.0,
    centre_sigma: float = 1.0, progress: bool = True,
) -> TrainingSet:  # fmt: skip
    """Blend library objects into noiseless training samples with their targets.

    Parameters
    ----------
    library : Library
        From :func:`draw_library`.
    samples, stamp : int
        Number of stamps; stamp side (pixels).
    seed : int
        Non-negative seed (the samples are a deterministic function of it and the library).
    close_fraction : float
        Probability that a companion is placed close to an object already in the stamp.
    separation : (float, float)
        Range of close separations in PSF FWHM (log-uniform).
    max_flux_ratio : float
        Largest flux ratio of a close pair (either way, log-uniform).
    fg_threshold : float
        Foreground: noiseless detection significance above this (sky σ per pixel).
    nu_min : float
        An object is detectable when its matched-filter S/N reaches this.
    centre_sigma : float
        σ (pixels) of the centre heatmap (recorded for the training loop).
    progress : bool
        Show a progress bar.

    Returns
    -------
    TrainingSet
    """
    samples = _check_int("samples", samples)
    seed = _check_int("seed", seed, 0)
    stamp = _check_int("stamp", stamp)
    _raise_if(stamp < 16, f"stamp must be at least 16 pixels, got {stamp!r}")
    _raise_if(not (separation[0] > 0 and separation[1] >= separation[0]),
              f"separation must be (min, max) FWHM with 0 < min <= max, got {separation!r}")  # fmt: skip
    _raise_if(not max_flux_ratio >= 1, f"max_flux_ratio must be >= 1, got {max_flux_ratio!r}")
    _raise_if(len(library) == 0, "the library is empty")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_COMPOSE]))
    nb = library.n_bands
    conds = library.conditions
    n_cond = len(conds)
    by_cond = []
    for c in range(n_cond):
        idx = np.flatnonzero(library.condition == c)
        idx = idx[np.argsort(np.log10(np.maximum(library.det_flux[idx], 1e-3)), kind="stable")]
        by_cond.append((idx, np.log10(np.maximum(library.det_flux[idx], 1e-3))))
    present = [c for c in range(n_cond) if len(by_cond[c][0])]
    sky = np.array([c["sky_sigma"] for c in conds], np.float32)
    srcn = np.array([c["source_noise"] for c in conds], np.float32)
    detw = np.array([c["det_weights"] for c in conds], np.float32)

    h = w = stamp
    out_model = np.zeros((samples, nb, h, w), np.float16)
    out_fg = np.zeros((samples, h, w), bool)
    out_owner = np.zeros((samples, h, w), np.uint8)
    out_centres = np.full((samples, MAX_OBJECTS, 2), np.nan, np.float32)
    out_det = np.zeros((samples, MAX_OBJECTS), bool)
    out_nu = np.zeros((samples, MAX_OBJECTS), np.float32)
    out_flux = np.zeros((samples, MAX_OBJECTS), np.float32)
    out_cond = np.zeros(samples, np.int32)
    lo_sep, hi_sep = math.log(separation[0]), math.log(separation[1])
    lr = math.log10(max_flux_ratio)
    objs = np.zeros((MAX_OBJECTS, nb, h, w), np.float32)
    bar = _progress(total=samples, desc="composing blends", enabled=progress)
    for s in range(samples):
        c = present[int(rng.integers(len(present)))]
        idx, logf = by_cond[c]
        fwhm = conds[c]["fwhm_px"]
        k_obj = _n_objects(rng)
        objs[:k_obj] = 0.0
        placed: list[tuple[float, float, float]] = []  # (y, x, log flux)
        for k in range(k_obj):
            if k > 0 and rng.random() < close_fraction:
                ay, ax, alf = placed[int(rng.integers(len(placed)))]
                sep = fwhm * math.exp(rng.uniform(lo_sep, hi_sep))
                ang = rng.uniform(0, 2 * math.pi)
                ty, tx = ay + sep * math.sin(ang), ax + sep * math.cos(ang)
                target = alf + rng.uniform(-lr, lr)
                r = int(np.searchsorted(logf, target)) + int(rng.integers(-3, 4))
                j = int(idx[min(max(r, 0), len(idx) - 1)])
            else:
                margin = 4 if k == 0 else -4
                ty, tx = rng.uniform(margin, h - margin, 2)
                j = int(idx[int(rng.integers(len(idx)))])
            crop, cy, cx = _dihedral(library.crop(j), *library.centre[j], int(rng.integers(8)))
            iy, ix = round(ty - cy), round(tx - cx)
            y, x = iy + cy, ix + cx
            placed.append((y, x, math.log10(max(float(library.det_flux[j]), 1e-3))))
            ch, cw = crop.shape[1:]
            ya, yb, xa, xb = max(iy, 0), min(iy + ch, h), max(ix, 0), min(ix + cw, w)
            if ya < yb and xa < xb:
                objs[k, :, ya:yb, xa:xb] = crop[:, ya - iy : yb - iy, xa - ix : xb - ix]
            out_centres[s, k] = (y, x)
            out_nu[s, k] = library.nu[j]
            out_flux[s, k] = library.det_flux[j]
            out_det[s, k] = library.nu[j] >= nu_min
        o = objs[:k_obj]
        out_model[s] = o.sum(axis=0)
        det = np.tensordot(detw[c], o, axes=([0], [1]))  # (k, h, w)
        fg = det.sum(axis=0) > fg_threshold
        out_fg[s] = fg
        detk = np.where(out_det[s, :k_obj, None, None], det, -np.inf)
        best = detk.argmax(axis=0)
        top = np.take_along_axis(detk, best[None], axis=0)[0]
        out_owner[s] = np.where(fg & (top > 1e-3), best + 1, 0)
        out_cond[s] = c
        bar.update(1)
    bar.close()
    return TrainingSet(
        model=out_model, sky_sigma=sky[out_cond], source_noise=srcn[out_cond],
        det_weights=detw[out_cond], foreground=out_fg, owner=out_owner, centres=out_centres,
        detectable=out_det, nu=out_nu, det_flux=out_flux, condition=out_cond,
        attrs={
            "samples": samples, "seed": seed, "stamp": stamp,
            "close_fraction": float(close_fraction),
            "separation_fwhm": [float(v) for v in separation],
            "max_flux_ratio": float(max_flux_ratio),
            "target": {"fg_threshold": float(fg_threshold), "nu_min": float(nu_min),
                       "centre_sigma": float(centre_sigma)},
            "library": library.attrs, "conditions": library.conditions,
        },
    )  # fmt: skip


def noisy_significance(
    model: torch.Tensor, sky_sigma: torch.Tensor, source_noise: torch.Tensor, *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """Add noise to noiseless samples and return the detection significance image.

    Each band gets Gaussian noise of variance ``σ_b² (1 + source_noise_b · max(m_b, 0))``
    (sky + source Poisson, as in the simulator); bands are combined with
    inverse-variance weights like :func:`~survey_engine.kernels.detect.detection_image`
    (``ivar``), and the result is divided by the square root of its variance.

    Parameters
    ----------
    model : torch.Tensor
        ``(B, C, H, W)`` noiseless images in units of each band's sky σ.
    sky_sigma, source_noise : torch.Tensor
        ``(B, C)``.
    generator : torch.Generator, optional
        Noise generator (on the device of ``model``).

    Returns
    -------
    torch.Tensor
        ``(B, 1, H, W)`` float32 significance.
    """
    m = model.float()
    v = 1.0 + source_noise.float()[:, :, None, None] * m.clamp(min=0)  # var / sigma^2
    n = torch.randn(m.shape, generator=generator, device=m.device, dtype=torch.float32)
    img = m + v.sqrt() * n  # I_b / sigma_b
    if m.shape[1] == 1:
        return img / v.sqrt()
    s = sky_sigma.float()[:, :, None, None]
    wsum = (1.0 / (s * s * v)).sum(dim=1, keepdim=True)
    num = (img / (s * v)).sum(dim=1, keepdim=True)
    return num / wsum.sqrt()


# -- storage ---------------------------------------------------------------------------
def generate_training_set(
    path: str | os.PathLike, *, samples: int, seed: int = 0, stamp: int = 64,
    bands: str | Sequence[str] = ("r",), psf: str | Sequence[str] = ("kolmogorov",),
    psf_fwhm: float | Sequence[float] = (0.6, 0.75, 0.9), depth: float = 26.8,
    pixel_scale: float = 0.2, mag_range: tuple[float, float] = (19.0, 27.0),
    library_size: int | None = None, library: Library | None = None,
    overwrite: bool = False, progress: bool = True, **compose_options: Any,
) -> Path:  # fmt: skip
    """Draw a library with GalSim, blend it into training samples and write them.

    Parameters
    ----------
    path : str or path-like
        Output: a Zarr v3 group (samples, targets, one noise realisation and the library),
        or, if it ends in ``.npz``, a compact file with the library and the composition
        parameters only (:func:`load_training_set` composes the samples).
    samples, stamp : int
        Number of stamps; stamp side in pixels.
    seed : int
        Non-negative seed of the library, the blends and the stored noise.
    bands, psf, psf_fwhm, depth, pixel_scale
        Survey conditions (see :func:`draw_library`; presets: :mod:`survey_engine.surveys`).
    mag_range : (float, float)
        r-band magnitude range of the library (see :func:`draw_library`; shift it with
        ``depth`` for a shallower survey).
    library_size : int, optional
        Objects in the library (default ``max(64, samples // 2)``, at most 20000);
        each is reused in several blends under different transforms and partners.
    library : Library, optional
        Reuse an existing library instead of drawing one (no GalSim needed).
    overwrite, progress : bool
        Replace an existing output; show progress bars.
    **compose_options
        Passed to :func:`compose` (``close_fraction``, ``separation``, ``max_flux_ratio``,
        ``fg_threshold``, ``nu_min``, ``centre_sigma``).

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    samples = _check_int("samples", samples)
    seed = _check_int("seed", seed, 0)
    if path.exists() and not overwrite:
        msg = f"{str(path)!r} already exists (pass overwrite=True to replace it)"
        raise FileExistsError(msg)
    unknown = set(compose_options) - {"close_fraction", "separation", "max_flux_ratio",
                                      "fg_threshold", "nu_min", "centre_sigma"}  # fmt: skip
    if unknown:
        msg = f"unknown compose options {sorted(unknown)}"
        raise TypeError(msg)
    t0 = time.perf_counter()
    if library is None:
        n_lib = library_size if library_size is not None else min(max(64, samples // 2), 20000)
        library = draw_library(n_objects=n_lib, seed=seed, bands=bands, psf=psf, psf_fwhm=psf_fwhm,
                               depth=depth, pixel_scale=pixel_scale, mag_range=mag_range,
                               progress=progress)  # fmt: skip
    t_lib = time.perf_counter() - t0
    recipe = {"samples": samples, "seed": seed, "stamp": stamp, **compose_options}
    if "separation" in recipe:
        recipe["separation"] = list(recipe["separation"])
    if path.suffix == ".npz":
        arrays = library.to_arrays()
        arrays["format"] = np.array(DATASET_FORMAT)
        arrays["recipe"] = np.array(json.dumps(recipe))
        tmp = path.with_name(path.name + ".tmp.npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
        logger.info("wrote %s: library of %d objects, recipe for %d samples (%.1f MB, %.1f s)",
                    path, len(library), samples, path.stat().st_size / 1e6,
                    time.perf_counter() - t0)  # fmt: skip
        return path

    ts = _compose_recipe(library, recipe, None, None, progress)
    noise_seed = int(np.random.SeedSequence([seed, _TAG_NOISE]).generate_state(1)[0])
    gen = torch.Generator().manual_seed(noise_seed)
    images = np.empty((samples, 1, stamp, stamp), np.float32)
    noise_in = (ts.model, ts.sky_sigma, ts.source_noise)
    for a in range(0, samples, 1024):
        b = min(a + 1024, samples)
        batch = (torch.from_numpy(x[a:b]) for x in noise_in)
        images[a:b] = noisy_significance(*batch, generator=gen).numpy()
    ts.image = images
    _write_zarr(path, ts, library, recipe, overwrite=overwrite)
    dt = time.perf_counter() - t0
    logger.info("wrote %s: %d samples of %d² (library %.1f s, total %.1f s, %.0f samples/s)",
                path, samples, stamp, t_lib, dt, samples / dt)  # fmt: skip
    return path


def _write_zarr(path: Path, ts: TrainingSet, library: Library, recipe: dict, *, overwrite: bool):
    """The samples, targets, noisy image and library as a Zarr v3 group."""
    import zarr

    group = zarr.open_group(str(path), mode="w" if overwrite else "w-", zarr_format=3)
    group.attrs.update({
        "format": DATASET_FORMAT, "recipe": recipe, "attrs": ts.attrs,
        "description": "U-Net deblender training set: image = noisy detection significance "
        "(N, 1, H, W); model = noiseless image in sky sigma per band; targets "
        "foreground/owner/centres/detectable; library/ = isolated objects",
    })  # fmt: skip
    rows = min(256, len(ts))  # samples per chunk
    for name in (*TrainingSet._ARRAYS, "image"):
        a = getattr(ts, name)
        group.create_array(name, shape=a.shape, chunks=(rows, *a.shape[1:]), dtype=a.dtype)
        group[name][...] = a
    lib = group.create_group("library")
    for key, a in library.to_arrays(prefix="").items():
        if key == "meta":
            lib.attrs["meta"] = str(a[()])
            continue
        lib.create_array(key, shape=a.shape, chunks=a.shape if a.size else (1,), dtype=a.dtype)
        lib[key][...] = a


def load_training_set(
    path: str | os.PathLike, *, samples: int | None = None, seed: int | None = None,
    progress: bool = True,
) -> TrainingSet:  # fmt: skip
    """Read a training set written by :func:`generate_training_set`.

    Parameters
    ----------
    path : str or path-like
        A Zarr group or a compact ``.npz``.
    samples, seed : int, optional
        Compose this many samples from the stored library with this seed instead of
        the stored ones (an ``.npz`` is always composed; its recipe gives the defaults).
        Needs neither GalSim nor, for ``.npz``, Zarr.
    progress : bool
        Show a progress bar while composing.

    Returns
    -------
    TrainingSet
    """
    path = Path(path)
    if not path.exists():
        msg = f"training set not found: {str(path)!r}"
        raise FileNotFoundError(msg)
    not_a_set = f"{str(path)!r} is not a U-Net training set (format {DATASET_FORMAT!r})"
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            if "format" not in f.files or str(f["format"][()]) != DATASET_FORMAT:
                raise ValueError(not_a_set)
            library = Library.from_arrays(f)
            recipe = json.loads(str(f["recipe"][()]))
        return _compose_recipe(library, recipe, samples, seed, progress)
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as err:
        msg = f"{str(path)!r} is not a readable Zarr training set: {err}"
        raise ValueError(msg) from err
    if group.attrs.get("format") != DATASET_FORMAT:
        raise ValueError(not_a_set)
    recipe = dict(group.attrs["recipe"])
    if any(v is not None and v != recipe[k] for k, v in (("samples", samples), ("seed", seed))):
        lib = group["library"]
        arrays = {**{k: lib[k][...] for k in Library._ARRAYS}, "meta": np.array(lib.attrs["meta"])}
        library = Library.from_arrays(arrays, prefix="")
        return _compose_recipe(library, recipe, samples, seed, progress)
    kw = {k: group[k][...] for k in TrainingSet._ARRAYS}
    return TrainingSet(**kw, image=group["image"][...], attrs=dict(group.attrs["attrs"]))


def _compose_recipe(library, recipe, samples, seed, progress) -> TrainingSet:
    """:func:`compose` of a stored recipe, ``samples`` and ``seed`` overriding it unless None."""
    recipe = dict(recipe)
    if samples is not None:
        recipe["samples"] = samples
    if seed is not None:
        recipe["seed"] = seed
    if "separation" in recipe:
        recipe["separation"] = tuple(recipe["separation"])
    return compose(library, **recipe, progress=progress)


def _progress(*, total: int, desc: str, enabled: bool):
    """A tqdm bar (stderr), or a no-op stand-in when disabled or tqdm is missing."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="it", leave=False)
        except ImportError:  # pragma: no cover - tqdm is a dependency; absent on bare GPU hosts
            pass
    return _NoBar()


class _NoBar:
    """What the training code uses of a tqdm bar, doing nothing."""

    def update(self, *args, **kwargs) -> None:
        """Do nothing (also stands for ``set_postfix`` and ``close``)."""

    set_postfix = close = update
