"""Throughput benchmark of the engine on a synthetic mosaic made without GalSim.

:func:`synthesize_mosaic` draws an LSST-like scene with numpy in a few seconds (it runs on GPU
hosts that lack GalSim); :func:`run_benchmark` times the raw Zarr reads of that mosaic and a full
:func:`survey_engine.run`, and reports pixel and object rates per run and per stage in a
:class:`BenchResult`. The scene and the definition of the rates: ``docs/simulation.md``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .flags import MaskBit
from .mosaic import Mosaic, _raise_if, create_mosaic, open_mosaic
from .parallel import GPUUnavailable, cluster_workers, local_cluster
from .simulate import _bands
from .simulate._bands import LSST_BANDS, MOFFAT_BETA, ZERO_POINT, psf_fwhm_for

__all__ = ["STAGES", "BenchResult", "machine_info", "run_benchmark", "synthesize_mosaic"]

logger = logging.getLogger(__name__)

#: The per-tile stages the engine reports worker-seconds for (``RunResult.stages``).
STAGES: tuple[str, ...] = ("read", "background", "network", "instances", "measure", "write")
_STAGE_NOTES = {
    "read": "zarr window", "background": "sky, det. image", "network": "U-Net / sep extract",
    "instances": "objects, deblend", "measure": "photometry, shapes", "write": "part files",
}  # fmt: skip

SCENE_VERSION = 1  #: Scene model version stored in the mosaic (a reused mosaic must match).
# ZERO_POINT (AB mag of one count), MOFFAT_BETA, the wavelengths, depth offsets and sky
# brightness are the GalSim simulator's (survey_engine.simulate._bands).
PIXEL_SCALE = 0.2  #: Pixel scale, arcsec.
FWHM_R = 0.7  #: r-band PSF FWHM, arcsec; band b gets ``FWHM_R (λ_b / λ_r) ** -0.2``.
DEPTH_R = 26.8  #: r-band 5σ point-source depth; other bands offset as in LSST's 10-year design.
SATURATION = 2000.0  #: Pixels at or above this (counts) are saturated: an r ≈ 17 star's peak.
#: Half-widths (px) of the stamp size classes; stamps of one class are drawn in one array.
_HALF_WIDTHS = (4, 6, 8, 12, 16, 24, 32, 48, 64)


# --- Synthetic mosaic -------------------------------------------------------------------
@dataclass(frozen=True)
class _Band:
    name: str
    fwhm_px: float
    sky_sigma: float
    gain: float


def _band(name: str) -> _Band:
    """PSF FWHM (pixels), sky σ and gain of one band, by the GalSim simulator's noise model."""
    _raise_if(name not in LSST_BANDS, _bands._unknown_band(name))
    fwhm = psf_fwhm_for(name, FWHM_R) / PIXEL_SCALE
    m5 = DEPTH_R + _bands.DEPTH_OFFSET[name]
    return _Band(name, fwhm, *_bands._sky_noise(name, m5, fwhm, PIXEL_SCALE))


@dataclass
class _Scene:
    """Objects in pixel coordinates; shapes are in r-band-independent units."""

    x: np.ndarray
    y: np.ndarray
    mag_r: np.ndarray
    color: np.ndarray  # mag_b = mag_r + color * (λ_r - λ_b) / 100 nm
    star: np.ndarray
    exponential: np.ndarray
    cov: np.ndarray  # (n, 2, 2) intrinsic second moments (px²) of galaxies, 0 for stars
    n_pairs: int


def _counts_mags(rng: np.random.Generator, n: int, lo: float, hi: float, slope: float):
    """Magnitudes with dN/dm ∝ 10^(slope m) between lo and hi (inverse CDF)."""
    a, b = 10.0 ** (slope * lo), 10.0 ** (slope * hi)
    return np.log10(a + rng.random(n) * (b - a)) / slope


def _tan_wcs(ny: int, nx: int) -> dict[str, Any]:
    scale = PIXEL_SCALE / 3600.0
    return {
        "WCSAXES": 2, "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 150.1, "CRVAL2": 2.2,
        "CRPIX1": (nx + 1) / 2.0, "CRPIX2": (ny + 1) / 2.0,
        "CD1_1": -scale, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": scale,
        "CUNIT1": "deg", "CUNIT2": "deg", "RADESYS": "ICRS",
    }  # fmt: skip


def _scene(rng: np.random.Generator, ny: int, nx: int, density: float) -> _Scene:
    blend_fraction, star_fraction = 0.15, 0.12
    n_primary = int(rng.poisson(density * ny * nx / 1e6 / (1.0 + blend_fraction)))
    is_star = rng.random(n_primary) < star_fraction
    n_pairs = int(rng.binomial(n_primary, blend_fraction))
    x, y = rng.uniform(-0.5, nx - 0.5, n_primary), rng.uniform(-0.5, ny - 0.5, n_primary)
    # Companions: 0.4–2.5″ from a random primary, any position angle.
    host = rng.choice(n_primary, n_pairs, replace=False) if n_pairs else np.zeros(0, int)
    sep = rng.uniform(0.4, 2.5, n_pairs) / PIXEL_SCALE
    ang = rng.uniform(0.0, 2 * math.pi, n_pairs)
    x = np.concatenate([x, np.clip(x[host] + sep * np.cos(ang), -0.5, nx - 0.51)])
    y = np.concatenate([y, np.clip(y[host] + sep * np.sin(ang), -0.5, ny - 0.51)])
    is_star = np.concatenate([is_star, np.zeros(n_pairs, bool)])
    n = len(x)
    mag = _counts_mags(rng, n, 19.5, 26.5, 0.3)
    mag[is_star] = _counts_mags(rng, int(is_star.sum()), 15.5, 25.5, 0.12)
    color = np.where(is_star, rng.normal(0.25, 0.15, n), rng.normal(0.12, 0.1, n))
    # Galaxies: half-light radius shrinking with magnitude, axis ratio 0.2–1, random angle.
    r_half = np.clip(0.35 * 10.0 ** (-0.08 * (mag - 24.0)) * rng.lognormal(0.0, 0.35, n), 0.08, 3.0)
    r_half /= PIXEL_SCALE
    exponential = rng.random(n) < 0.7
    # σ per axis of the profile's second moments: exponential r_h = 1.678 h, <x²> = 3 h²;
    # Gaussian r_h = 1.177 σ.
    sigma = np.where(exponential, math.sqrt(3.0) * r_half / 1.678, r_half / 1.177)
    q = rng.uniform(0.2, 1.0, n)
    theta = rng.uniform(0.0, math.pi, n)
    c, s = np.cos(theta), np.sin(theta)
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    diag = np.zeros((n, 2, 2))
    diag[:, 0, 0] = sigma**2
    diag[:, 1, 1] = (sigma * q) ** 2
    cov = rot @ diag @ np.swapaxes(rot, 1, 2)
    cov[is_star] = 0.0
    return _Scene(x, y, mag, color, is_star, exponential & ~is_star, cov, n_pairs)


def _stamp_half_width(scene: _Scene, band: _Band, flux: np.ndarray) -> np.ndarray:
    sigma_psf = band.fwhm_px / 2.3548
    lam = np.linalg.eigvalsh(scene.cov)[:, 1] + sigma_psf**2
    hw = np.where(scene.exponential, 6.0, 4.5) * np.sqrt(lam)
    # Stars: out to where the Moffat wing falls to 0.1 sky σ per pixel.
    alpha = band.fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / MOFFAT_BETA) - 1.0))
    peak = flux * (MOFFAT_BETA - 1.0) / (math.pi * alpha**2)
    wing = alpha * np.maximum(peak / (0.1 * band.sky_sigma), 1.0) ** (1.0 / (2.0 * MOFFAT_BETA))
    hw = np.where(scene.star, np.maximum(wing, 2.0 * band.fwhm_px), hw)
    classes = np.asarray(_HALF_WIDTHS)
    return classes[np.minimum(np.searchsorted(classes, hw), len(classes) - 1)]


def _draw_band(scene: _Scene, band: _Band, ny: int, nx: int) -> np.ndarray:
    """Noiseless model image of one band: every object's stamp, vectorised per size class."""
    model = np.zeros(ny * nx, dtype=np.float32)
    lam = _bands.EFFECTIVE_WAVELENGTH_NM
    mag = scene.mag_r + scene.color * (lam["r"] - lam[band.name]) / 100.0
    flux = 10.0 ** (-0.4 * (mag - ZERO_POINT))
    hws = _stamp_half_width(scene, band, flux)
    sigma_psf2 = (band.fwhm_px / 2.3548) ** 2
    alpha2 = (band.fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / MOFFAT_BETA) - 1.0))) ** 2
    xi, yi = np.rint(scene.x).astype(np.int64), np.rint(scene.y).astype(np.int64)
    for hw in np.unique(hws):
        sel = np.flatnonzero(hws == hw)
        d = np.arange(-hw, hw + 1, dtype=np.float64)
        # (n, s, s) offsets of each stamp pixel from the object's true centre
        dx = d[None, None, :] - (scene.x[sel] - xi[sel])[:, None, None]
        dy = d[None, :, None] - (scene.y[sel] - yi[sel])[:, None, None]
        cov = scene.cov[sel] + sigma_psf2 * np.eye(2)  # Gaussian approximation of the convolution
        det = cov[:, 0, 0] * cov[:, 1, 1] - cov[:, 0, 1] ** 2
        ia, ib, ic = cov[:, 1, 1] / det, -cov[:, 0, 1] / det, cov[:, 0, 0] / det
        rho2 = (
            ia[:, None, None] * dx**2 + 2 * ib[:, None, None] * dx * dy + ic[:, None, None] * dy**2
        )
        star, expo = scene.star[sel][:, None, None], scene.exponential[sel][:, None, None]
        r2 = dx**2 + dy**2
        galaxy = np.where(expo, np.exp(-math.sqrt(3.0) * np.sqrt(rho2 + 0.25)), np.exp(-0.5 * rho2))
        prof = np.where(star, (1.0 + r2 / alpha2) ** -MOFFAT_BETA, galaxy)
        prof *= (flux[sel] / prof.sum(axis=(1, 2)))[:, None, None]
        py = yi[sel][:, None, None] + np.arange(-hw, hw + 1)[None, :, None]
        px = xi[sel][:, None, None] + np.arange(-hw, hw + 1)[None, None, :]
        inside = (py >= 0) & (py < ny) & (px >= 0) & (px < nx)
        np.add.at(model, (py * nx + px)[inside], prof[inside].astype(np.float32))
    return model.reshape(ny, nx)


def _sky_pattern(ny: int, nx: int, phase: float) -> np.ndarray:
    """A smooth sky residual (≈ ±1 sky σ over ~1000 px), evaluated separably."""
    gy = np.sin(2 * math.pi * np.arange(ny) / 1500.0 + phase).astype(np.float32)
    gx = np.cos(2 * math.pi * np.arange(nx) / 1100.0 - phase).astype(np.float32)
    return 0.5 * (gy[:, None] + gx[None, :])


def synthesize_mosaic(
    path: str | os.PathLike, size: int | tuple[int, int] = 4096,
    bands: Sequence[str] = ("g", "r", "i"), *, seed: int = 0, density: float = 200.0,
    chunks: int = 1024, overwrite: bool = False,
) -> Mosaic:  # fmt: skip
    """Write a realistic-looking LSST-like mosaic drawn with numpy alone (no GalSim).

    Exponential and Gaussian galaxies, Moffat stars and close pairs, with sky and source
    noise, a variance plane, a bad column, hot pixels (BAD) and saturated star cores (SAT);
    the scene model is described in ``docs/simulation.md``.

    Parameters
    ----------
    path : str or path-like
        Where to write the Zarr v3 mosaic.
    size : int or (int, int)
        Pixels per side, or ``(ny, nx)``.
    bands : sequence of str
        Band names among ``ugrizy``.
    seed : int
        The scene and the noise are a function of ``seed`` (and the band) only.
    density : float
        Objects per million pixels (200 ≈ 5 per arcmin² … at 0.2″/px, 8,000 per deg²;
        LSST's detectable density at full depth is a few times higher).
    chunks, overwrite : int, bool
        Chunk side of the pixel arrays; replace an existing store at ``path``.

    Returns
    -------
    Mosaic
        The new mosaic, opened read-only. Its ``attrs["synthetic"]`` records the
        parameters and ``n_objects``, ``n_stars``, ``n_pairs``.
    """
    ny, nx = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    _raise_if(ny < 16 or nx < 16, f"size must be at least 16 pixels per side, got {size!r}")
    _raise_if(not density >= 0, f"density must be ≥ 0 objects per million pixels, got {density!r}")
    bands = [str(b) for b in bands]
    setups = [_band(b) for b in bands]
    t0 = time.perf_counter()
    scene = _scene(np.random.default_rng([seed, 0]), ny, nx, density)
    info = {
        "version": SCENE_VERSION, "generator": "survey_engine.bench.synthesize_mosaic",
        "seed": int(seed), "density_per_mpx": float(density), "n_objects": len(scene.x),
        "n_stars": int(scene.star.sum()), "n_pairs": scene.n_pairs,
        "sky_sigma": {b.name: b.sky_sigma for b in setups}, "saturation": SATURATION,
    }  # fmt: skip
    m = create_mosaic(
        str(path), shape=(ny, nx), bands=bands, wcs=_tan_wcs(ny, nx),
        zero_points=dict.fromkeys(bands, ZERO_POINT), pixel_scale=PIXEL_SCALE,
        psf_fwhm={b.name: b.fwhm_px * PIXEL_SCALE for b in setups}, chunks=chunks,
        extra_attrs={"synthetic": info}, overwrite=overwrite,
    )  # fmt: skip
    layout = np.random.default_rng([seed, 1])
    bad_x = int(layout.integers(0, nx))
    bad_y = sorted(int(v) for v in layout.integers(0, ny, 2))
    for band in setups:
        code = LSST_BANDS.index(band.name)
        rng = np.random.default_rng([seed, 2, code])
        model = _draw_band(scene, band, ny, nx)
        variance = np.maximum(model, 0.0)
        variance *= np.float32(1.0 / band.gain)
        variance += np.float32(band.sky_sigma**2)
        image = rng.standard_normal((ny, nx), dtype=np.float32)
        image *= np.sqrt(variance)
        image += model
        del model
        image += np.float32(band.sky_sigma) * _sky_pattern(ny, nx, 0.3 * code)
        mask = np.zeros((ny, nx), dtype=np.uint16)
        image[bad_y[0] : bad_y[1] + 1, bad_x] += np.float32(5.0 * band.sky_sigma)
        mask[bad_y[0] : bad_y[1] + 1, bad_x] |= np.uint16(MaskBit.BAD)
        n_hot = int(rng.poisson(2e-6 * ny * nx)) + 1
        hy, hx = rng.integers(0, ny, n_hot), rng.integers(0, nx, n_hot)
        image[hy, hx] = np.float32(SATURATION * 0.5)
        mask[hy, hx] |= np.uint16(MaskBit.BAD)
        sat = image >= SATURATION
        image[sat] = SATURATION
        mask[sat] |= np.uint16(MaskBit.SAT)
        m.write(band.name, 0, 0, image=image, variance=variance, mask=mask)
        del image, variance, mask
    m.consolidate()
    logger.info(
        "synthesized %s: %d×%d px, bands %s, %d objects in %.1f s",
        path, ny, nx, ",".join(bands), info["n_objects"], time.perf_counter() - t0,
    )  # fmt: skip
    return open_mosaic(str(path))


# --- Benchmark --------------------------------------------------------------------------
def machine_info(*, gpu: bool = False) -> dict[str, Any]:
    """CPU model, core count, platform and library versions (and the GPU name when ``gpu``).

    Parameters
    ----------
    gpu : bool
        Also name the first CUDA device (imports torch).

    Returns
    -------
    dict
    """
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        cpu = next(names, cpu)
    linux = hasattr(os, "sched_getaffinity")
    cores = len(os.sched_getaffinity(0)) if linux else os.cpu_count() or 1
    import dask
    import zarr

    from . import __version__

    info: dict[str, Any] = {
        "cpu": cpu, "cores": cores, "platform": platform.platform(),
        "python": platform.python_version(), "survey_engine": __version__,
        "dask": dask.__version__, "zarr": zarr.__version__, "numpy": np.__version__, "gpu": None,
    }  # fmt: skip
    if gpu:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    return info


@dataclass
class BenchResult:
    """Figures of one :func:`run_benchmark` call (the best of ``repeat`` engine runs).

    Attributes
    ----------
    shape, bands : (int, int), tuple of str
        Mosaic pixels (ny, nx) and bands.
    pixels : int
        Mosaic pixels per band; every rate below is in these pixels.
    n_objects, workers : int
        Objects in the catalog; Dask workers that ran the tiles.
    device : str
        ``"cpu"`` or the GPU's name.
    backend, deblender : str
        Kernels and deblender used (``"default"`` when left to the engine).
    tile : int or None
        Tile core size (None: the engine's default).
    read_seconds : float
        Raw read of every band and plane of the mosaic, in this process.
    wall, walls : float, list of float
        Wall seconds of the best ``survey_engine.run`` (cluster already started), of every run.
    timings, stages : dict
        Of the best run: the engine's wall seconds per phase; worker-seconds per per-tile stage
        (empty when the engine does not report them).
    gpu_memory : int or None
        Peak bytes allocated on a GPU worker.
    synth_seconds : float or None
        Time to synthesise the mosaic (None when it was reused).
    mosaic, machine : str, dict
        Path of the mosaic; :func:`machine_info`.
    """

    shape: tuple[int, int]
    bands: tuple[str, ...]
    pixels: int
    n_objects: int
    workers: int
    device: str
    backend: str
    deblender: str
    tile: int | None
    read_seconds: float
    wall: float
    walls: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)
    gpu_memory: int | None = None
    synth_seconds: float | None = None
    mosaic: str = ""
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def mpx(self) -> float:
        """Mosaic megapixels per band."""
        return self.pixels / 1e6

    @property
    def read_mpx_s(self) -> float:
        """Raw Zarr read + decompress rate, Mpx/s (all bands and planes of each pixel)."""
        return self.mpx / self.read_seconds if self.read_seconds > 0 else math.nan

    @property
    def mpx_s(self) -> float:
        """End-to-end rate: pixels over the wall time of the run, Mpx/s."""
        return self.mpx / self.wall if self.wall > 0 else math.nan

    @property
    def objects_s(self) -> float:
        """Catalog objects per wall second."""
        return self.n_objects / self.wall if self.wall > 0 else math.nan

    @property
    def stage_mpx_s(self) -> dict[str, float]:
        """Per-worker rate of each stage: pixels over its summed worker-seconds, Mpx/s."""
        return {k: (self.mpx / v if v > 0 else math.inf) for k, v in self.stages.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field plus the derived rates."""
        d = asdict(self)
        stage_rates = {k: (None if math.isinf(v) else v) for k, v in self.stage_mpx_s.items()}
        d.update(
            mpx=self.mpx, read_mpx_s=self.read_mpx_s, mpx_s=self.mpx_s, objects_s=self.objects_s,
            stage_mpx_s=stage_rates, shape=list(self.shape), bands=list(self.bands),
        )  # fmt: skip
        return d

    def table(self) -> str:
        """A readable table of the figures."""
        mach = self.machine
        gpu = f", GPU {mach['gpu']}" if mach.get("gpu") else ""
        rep = f"best of {len(self.walls)}: " + ", ".join(f"{w:.2f}" for w in self.walls)
        lines = [
            f"survey_engine benchmark: {self.shape[0]} × {self.shape[1]} px "
            f"({self.mpx:.2f} Mpx per band), bands {','.join(self.bands)}, "
            f"{self.n_objects:,} objects",
            f"machine    {mach.get('cpu', '?')}, {mach.get('cores', '?')} cores{gpu}",
            f"run        backend {self.backend}, deblender {self.deblender}, "
            f"{self.workers} worker(s) on {self.device}, tile {self.tile or 'default'}",
            "",
            f"{'measure':<34s}{'seconds':>9s}{'Mpx/s':>10s}",
            f"{'zarr read + decompress (1 proc.)':<34s}{self.read_seconds:9.2f}"
            f"{self.read_mpx_s:10.2f}",
            f"{'end to end (run wall)':<34s}{self.wall:9.2f}{self.mpx_s:10.2f}   ({rep} s)",
            f"{'objects per second':<34s}{'':9s}{self.objects_s:10.0f}",
            "",
            f"{'stage (summed over tile tasks)':<34s}{'worker-s':>9s}{'Mpx/s/wkr':>10s}{'share':>8s}",
        ]
        total = sum(self.stages.values())
        rates = self.stage_mpx_s
        for s in (*STAGES, *(k for k in self.stages if k not in STAGES)):
            name = f"{s} ({_STAGE_NOTES[s]})" if s in _STAGE_NOTES else s
            if s in self.stages:
                share = self.stages[s] / total * 100 if total > 0 else 0.0
                lines.append(f"  {name:<32s}{self.stages[s]:9.2f}{rates[s]:10.2f}{share:7.1f}%")
            else:
                lines.append(f"  {name:<32s}{'–':>9s}{'–':>10s}")
        rate = self.mpx / total if total else math.inf
        lines.append(
            f"  {'all stages':<32s}{total:9.2f}{rate:10.2f}" if self.stages
            else "  (this engine reports no per-stage times: RunResult.stages is absent)"
        )  # fmt: skip
        mem = "–" if self.gpu_memory is None else f"{self.gpu_memory / 2**30:.2f} GiB peak"
        syn = self.synth_seconds
        made = "reused" if syn is None else f"synthesised in {syn:.1f} s"
        lines += [
            "", "engine     " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()),
            f"gpu memory {mem}", f"mosaic     {self.mosaic} ({made})",
        ]  # fmt: skip
        return "\n".join(lines)


def _time_reads(m: Mosaic) -> float:
    """Seconds to read and decompress every plane of every band, one chunk row at a time."""
    step = m.chunks[1]
    t0 = time.perf_counter()
    for y in range(0, m.ny, step):
        m.read((y, min(y + step, m.ny)), (0, m.nx))
    return time.perf_counter() - t0


def _reuse(path: Path, shape: tuple[int, int], bands: Sequence[str], seed: int) -> Mosaic | None:
    """The synthetic mosaic at ``path`` when it has this shape, bands, seed and scene version."""
    try:
        m = open_mosaic(str(path))
    except (ValueError, FileNotFoundError, KeyError):
        return None
    syn = m.attrs.get("synthetic") or {}
    same = (m.ny, m.nx) == shape and list(m.bands) == list(bands) and syn.get("seed") == seed
    return m if same and syn.get("version") == SCENE_VERSION else None


def _worker_gpu() -> tuple[str, str] | None:
    """(name of the first CUDA device, torch version) on a worker, None without CUDA."""
    import torch

    return (torch.cuda.get_device_name(0), torch.__version__) if torch.cuda.is_available() else None


def run_benchmark(
    size: int | tuple[int, int] = 4096, *, workers: int | None = None, gpu: bool = False,
    scheduler: str | None = None, backend: str | None = None, deblender: str | None = None,
    tile: int | None = None, workdir: str | os.PathLike | None = None, repeat: int = 1,
    progress: bool = False, bands: Sequence[str] = ("g", "r", "i"), seed: int = 0,
) -> BenchResult:  # fmt: skip
    """Synthesise (or reuse) a mosaic, time its raw reads and a full engine run.

    Parameters
    ----------
    size : int or (int, int)
        Mosaic side, or ``(ny, nx)``.
    workers : int, optional
        Workers of the cluster started here (CPU: one per core; GPU: one per GPU).
        Ignored with ``scheduler``.
    gpu : bool
        Run every per-tile stage in torch on CUDA (``survey_engine.run(gpu=True)``) on a
        ``dask_cuda.LocalCUDACluster`` whose workers declare the resource ``GPU=1``,
        or on a plain LocalCluster declaring it when dask-cuda is missing.
    scheduler : str, optional
        Address of an existing cluster to use instead (its workers must see ``workdir``;
        for ``gpu`` they must declare the resource ``GPU``).
    backend : {"numpy", "torch"}, optional
        Kernel backend (engine default when None).
    deblender : {"sep", "unet"}, optional
        Default: ``"sep"`` on the numpy backend, ``"unet"`` on torch or with ``gpu``.
    tile : int, optional
        Tile core size (engine default when None).
    workdir : str or path, optional
        Keeps the mosaic (reused by later calls with the same size, bands and seed) and the
        run's output. Default: a new temporary directory, removed (also when the run fails).
    repeat : int
        Engine runs on the same cluster; the fastest is reported (later runs have
        warm workers: imports, model, CUDA context).
    progress : bool
        Progress bars of the engine (stderr).
    bands, seed : sequence of str, int
        Bands and seed of the synthetic mosaic.

    Returns
    -------
    BenchResult

    Raises
    ------
    survey_engine.driver.RunError
        ``gpu`` without a CUDA device, or a failed run.
    ValueError
        Bad arguments (a torch backend with the sep deblender, repeat < 1 …).
    """
    from . import driver
    from .deblend import check_backend

    _raise_if(repeat < 1, f"repeat must be ≥ 1, got {repeat!r}")
    _raise_if(backend not in (None, "numpy", "torch"),
              f"backend must be 'numpy' or 'torch', got {backend!r}")  # fmt: skip
    torch_path = gpu or backend == "torch"
    if deblender is None:
        deblender = "unet" if torch_path else "sep"
    check_backend(deblender, "torch" if torch_path else "numpy")
    run_kw: dict[str, Any] = {"tile": tile, "deblender": deblender, "progress": progress}
    run_kw.update(gpu=gpu, backend=backend)
    if gpu:  # explicit, so that a configured ``survey_engine.device: cpu`` does not conflict
        run_kw["device"] = "cuda"
    _raise_if(workers is not None and workers < 1,
              f"workers must be a positive integer, got {workers!r}")  # fmt: skip
    with contextlib.ExitStack() as cleanup:  # on exit: the temporary directory, then the cluster
        if scheduler is None:  # started first: a GPU run without a GPU stops before any work
            try:
                cluster = local_cluster(workers, gpu=gpu, without_dask_cuda=True)
            except GPUUnavailable as err:
                raise driver.RunError(str(err)) from err
            cleanup.callback(cluster.close)
            scheduler = cluster.scheduler_address
        if workdir is None:  # removed afterwards, also when the run fails
            tmp = tempfile.TemporaryDirectory(prefix="se_bench_", ignore_cleanup_errors=True)
            work = Path(cleanup.enter_context(tmp))
        else:
            work = Path(workdir)
        res = _run_benchmark(scheduler, work, size, tuple(bands), seed, repeat, run_kw)
    if workdir is None:
        res.mosaic = f"{res.mosaic} (temporary, removed)"
    return res


def _run_benchmark(scheduler, work, size, bands, seed, repeat, run_kw) -> BenchResult:
    """Synthesise (or reuse) the mosaic in ``work``, time its reads and ``repeat`` engine runs."""
    from distributed import Client

    from .driver import run

    work.mkdir(parents=True, exist_ok=True)
    shape = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    gpu, backend = run_kw["gpu"], run_kw["backend"]
    mpath = work / f"synthetic_{shape[0]}x{shape[1]}_{''.join(bands)}_s{seed}.zarr"
    m = _reuse(mpath, shape, bands, seed)
    synth_seconds = None
    if m is None:
        t0 = time.perf_counter()
        m = synthesize_mosaic(mpath, shape, bands, seed=seed, overwrite=True)
        synth_seconds = time.perf_counter() - t0
    read_seconds = _time_reads(m)
    machine = machine_info()

    with Client(scheduler, timeout="30s") as c:
        n_workers = len(cluster_workers(c))
        if gpu:  # the GPU as the workers see it (the driver may have none)
            names = [v for v in c.run(_worker_gpu).values() if v is not None]
            if names:
                machine["gpu"], machine["torch"] = names[0]
    runs = []
    for i in range(repeat):
        t0 = time.perf_counter()
        res = run(m, work / "run", scheduler=scheduler, overwrite=True, **run_kw)
        wall = time.perf_counter() - t0
        logger.info("benchmark run %d/%d: %.2f s, %d objects", i + 1, repeat, wall, res.n_objects)
        runs.append((wall, res))
    wall, res = min(runs, key=lambda r: r[0])
    return BenchResult(
        shape=(m.ny, m.nx), bands=m.bands, pixels=int(getattr(res, "pixels", 0) or m.ny * m.nx),
        n_objects=int(res.n_objects), workers=n_workers, tile=run_kw["tile"],
        device=(machine.get("gpu") or "cuda") if gpu else "cpu", deblender=run_kw["deblender"],
        backend=getattr(res, "backend", None) or backend or ("torch" if gpu else "numpy"),
        read_seconds=read_seconds, wall=wall, walls=[r[0] for r in runs], timings=dict(res.timings),
        stages=dict(getattr(res, "stages", None) or {}), synth_seconds=synth_seconds,
        gpu_memory=getattr(res, "gpu_memory", None), mosaic=str(mpath), machine=machine,
    )  # fmt: skip
