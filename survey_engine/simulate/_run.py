"""``simulate``: build the scene, create the mosaic store and draw its blocks on Dask."""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy import units as u
from astropy.table import QTable, Table

from ..mosaic import Mosaic, _raise_if, create_mosaic, open_mosaic
from ..parallel import dask_client, map_tasks
from ._artefacts import plan_artefacts
from ._bands import MOFFAT_BETA, PSF_KINDS, ZERO_POINT, band_setups, parse_bands
from ._cluster import KingCluster
from ._draw import _SHAPE_FIELDS, DrawConfig, _values, draw_block, object_plan, select_objects
from ._scene import BRIGHT_LIMIT, DEFAULT_CENTER, make_scene, make_wcs, write_truth

__all__ = ["SimulationResult", "simulate"]

logger = logging.getLogger(__name__)

_SCENE_COLUMNS = ("id", "x", "y", "kind", *_SHAPE_FIELDS)  # what the drawing plan reads


@dataclass
class SimulationResult:
    """What :func:`simulate` made.

    Attributes
    ----------
    path, mosaic : str, Mosaic
        The mosaic store, and the mosaic opened read-only.
    truth, truth_path : astropy.table.QTable, str or None
        The truth table, and the Parquet file it was written to when ``truth`` was given.
    n_blocks, elapsed_s : int, float
        Blocks drawn (the chunk grid); wall time of the drawing (cluster start-up included).
    block_stats : dict
        Per-block statistics returned by the workers, by (row, column).
    """

    path: str
    mosaic: Mosaic
    truth: QTable
    truth_path: str | None = None
    n_blocks: int = 0
    elapsed_s: float = 0.0
    block_stats: dict = field(default_factory=dict, repr=False)


def simulate(
    path: str | os.PathLike, *, size: int | tuple[int, int] = 1024,
    bands: str | Sequence[str] = ("g", "r", "i"), seed: int = 0,
    depth: float | Mapping[str, float] = 26.8, truth: str | os.PathLike | None = None,
    pixel_scale: float = 0.2, psf: str = "kolmogorov", psf_fwhm: float = 0.7,
    chunks: int | tuple[int, int] = 1024, masks: bool = False, bright_stars: int = 0,
    truth_segmentation: bool = True, density: float = 1.0, max_mag: float = 27.0,
    cluster: KingCluster | Mapping[str, Any] | None = None, scene: Table | None = None, workers: int | None = None, scheduler: str | None = None,
    client: Any | None = None, progress: bool = True, overwrite: bool = False,
) -> SimulationResult:  # fmt: skip
    """Simulate an LSST-like multi-band mosaic with GalSim and write it as a mosaic store.

    The field is drawn block by block (the chunk grid) on a Dask cluster; the result depends
    only on the arguments and the chunk grid, never on the workers (``docs/simulation.md``).

    Parameters
    ----------
    path : str or path-like
        The new Zarr v3 mosaic store (local path or fsspec URL visible to the workers).
    size : int or (int, int)
        Mosaic size in pixels: ``N`` for N × N, or ``(ny, nx)``.
    bands : sequence of str or str
        Bands among ``ugrizy`` (or ``"g,r,i"``), in mosaic order.
    seed : int
        Non-negative seed of the scene, the noise and the artefacts.
    depth : float or mapping
        r-band 5σ point-source depth (AB); other bands get the LSST offsets
        (:data:`~survey_engine.simulate.DEPTH_OFFSET`). Or ``{band: depth}``.
    truth : str or path-like, optional
        Also write the truth table to this Parquet file.
    pixel_scale : float
        Arcsec per pixel (TAN WCS centred on (ra, dec) = (150.1, 2.2)).
    psf : {"kolmogorov", "moffat"}
        PSF model (the Moffat has β = 3.5).
    psf_fwhm : float
        r-band PSF FWHM in arcsec; band ``b`` gets ``psf_fwhm (λ_b / λ_r)^-0.2``.
    chunks : int or (int, int)
        Chunk size of the store = drawing block size.
    masks, truth_segmentation : bool
        Add bad columns, a satellite trail (``BAD``) and a no-data corner (``NO_DATA``); store
        the noiseless truth segmentation (truth ids, 0 = none).
    bright_stars : int
        Number of extra saturating stars (r 14–16).
    density, max_mag : float
        Multiplies the galaxy and star number counts; faint limit (r mag) of the population.
    cluster : KingCluster or mapping, optional
        Add a King-profile globular cluster of stars (a crowded field), e.g.
        ``KingCluster(20000, core_radius=30, tidal_radius=600)`` or the same as a dict.
    scene : astropy.table.Table, optional
        Draw this truth table (e.g. an edited :func:`make_scene`) instead of a random
        population; needs ``id``, ``x``, ``y``, ``kind``, ``<band>_flux``, ``disk_hlr``,
        ``bulge_hlr``, ``bulge_fraction``, ``e1``, ``e2`` (``ra``/``dec`` from the mosaic WCS).
    workers, scheduler, client
        Dask cluster, see :func:`survey_engine.parallel.dask_client`.
    progress, overwrite : bool
        Show a progress bar; replace an existing store (and truth file).

    Returns
    -------
    SimulationResult
    """
    ny, nx = _parse_size(size)
    bands = parse_bands(bands)
    seed = _non_negative_int(seed, "seed")
    bright_stars = _non_negative_int(bright_stars, "bright_stars")
    depth = _parse_depth(depth, bands)
    pixel_scale = _positive_float(pixel_scale, "pixel_scale")
    psf_fwhm = _positive_float(psf_fwhm, "psf_fwhm")
    psf = str(psf).lower()
    _raise_if(psf not in PSF_KINDS, f"psf must be one of {', '.join(PSF_KINDS)}, got {psf!r}")
    density = float(density)
    _raise_if(not math.isfinite(density) or density < 0,
              f"density must be a finite non-negative number, got {density!r}")  # fmt: skip
    max_mag = float(max_mag)
    msg = f"max_mag must be a finite magnitude fainter than {BRIGHT_LIMIT}, got {max_mag!r}"
    _raise_if(not math.isfinite(max_mag) or max_mag <= BRIGHT_LIMIT, msg)
    if isinstance(cluster, Mapping):
        fields = tuple(KingCluster.__dataclass_fields__)
        _raise_if("n_stars" not in cluster or not set(cluster) <= set(fields), f"cluster mapping needs n_stars and takes only {', '.join(fields)}; got {sorted(cluster)}")  # fmt: skip
        cluster = KingCluster(**cluster)
    _raise_if(cluster is not None and not isinstance(cluster, KingCluster), f"cluster must be a KingCluster or a mapping of its fields, got {cluster!r}")  # fmt: skip
    _raise_if(cluster is not None and scene is not None, "give cluster or scene, not both")
    path = _local_abspath(path)
    truth_path = None if truth is None else _local_abspath(truth)
    for target in (path, truth_path):
        if target is not None and not overwrite and "://" not in target and os.path.exists(target):
            msg = f"{target} already exists; pass overwrite=True to replace it"
            raise FileExistsError(msg)

    setups = band_setups(bands, depth=depth, psf=psf, psf_fwhm=psf_fwhm, pixel_scale=pixel_scale)
    wcs = make_wcs(ny, nx, pixel_scale=pixel_scale)
    if scene is None:
        table = make_scene(ny, nx, bands=bands, seed=seed, pixel_scale=pixel_scale, density=density,
                           max_mag=max_mag, bright_stars=bright_stars, cluster=cluster,
                           wcs=wcs)  # fmt: skip
    else:
        table = _check_scene(scene, bands, wcs)
    seg_threshold = math.sqrt(sum(b.sky_sigma**2 for b in setups)) if truth_segmentation else None
    artefacts = plan_artefacts(ny, nx, tuple(b.code for b in setups), seed) if masks else None

    attrs = {
        "saturation": _by_band(setups, "saturation"),
        "simulation": {
            "generator": "survey_engine.simulate", "seed": seed, "n_objects": len(table),
            "depth_5sigma": _by_band(setups, "depth"), "sky_sigma": _by_band(setups, "sky_sigma"),
            "gain": _by_band(setups, "gain"), "psf": psf,
            "moffat_beta": MOFFAT_BETA if psf == "moffat" else None, "background": 0.0,
            "noise": "gaussian, variance = sky_sigma**2 + max(model, 0) / gain",
            "density": density, "max_mag": max_mag, "bright_stars": bright_stars,
            "masks": bool(masks), "truth_segmentation_threshold": seg_threshold,
            "truth_segmentation_image": "noiseless model summed over the bands",
            "center_radec": list(DEFAULT_CENTER), "cluster": table.meta.get("cluster"),
        },
    }  # fmt: skip
    mosaic = create_mosaic(
        path, shape=(ny, nx), bands=bands, wcs=wcs, zero_points=_by_band(setups, "zero_point"),
        pixel_scale=pixel_scale, psf_fwhm=_by_band(setups, "psf_fwhm"), chunks=chunks,
        image_unit="count", truth_segmentation=truth_segmentation, extra_attrs=attrs,
        overwrite=overwrite,
    )  # fmt: skip
    config = DrawConfig(setups, pixel_scale, psf, seed, seg_threshold, artefacts)
    plan = object_plan(table, setups, pixel_scale)
    _, cy, cx = mosaic.chunks
    items = []
    for iy, ix in itertools.product(range(-(-ny // cy)), range(-(-nx // cx))):
        y0, y1, x0, x1 = iy * cy, min(ny, (iy + 1) * cy), ix * cx, min(nx, (ix + 1) * cx)
        objects = select_objects(plan, y0, y1, x0, x1)
        items.append({"block": (iy, ix), "bounds": (y0, y1, x0, x1), "objects": objects})
    logger.info("simulating %s: %d x %d px, bands %s, %d objects, %d blocks",
                path, ny, nx, ",".join(bands), len(table), len(items))  # fmt: skip

    t0 = time.perf_counter()
    with dask_client(workers=workers, scheduler=scheduler, client=client) as c:
        done = map_tasks(
            c, draw_block, items, keys=[item["block"] for item in items], desc="simulate",
            progress=progress, path=path, config=config,
        )  # fmt: skip
    elapsed = time.perf_counter() - t0
    if done.failures:
        first = done.failures[0]
        msg = (f"{len(done.failures)} of {len(items)} blocks of {path} failed; "
               f"first: block {first.key}: {first.error}")  # fmt: skip
        raise RuntimeError(msg)
    mosaic.consolidate()
    if truth_path is not None:
        write_truth(table, truth_path, overwrite=overwrite)
    draws = sum(s["objects"] for s in done.results.values())
    logger.info("simulated %s in %.1f s (%d object stamps in %d blocks)",
                path, elapsed, draws, len(items))  # fmt: skip
    return SimulationResult(
        path=path, mosaic=open_mosaic(path), truth=table, truth_path=truth_path,
        n_blocks=len(items), elapsed_s=elapsed, block_stats=done.results,
    )  # fmt: skip


def _by_band(setups, attr: str) -> dict:
    """``{band: value}`` of one attribute of the band setups."""
    return {b.name: getattr(b, attr) for b in setups}


def _local_abspath(path: str | os.PathLike) -> str:
    """Absolute local path; URLs unchanged."""
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(path)


def _is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _finite_float(value: Any, msg: str, *, positive: bool = False) -> float:
    """``value`` as a float; ``ValueError(msg)`` unless it is a finite (positive) number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    _raise_if(not math.isfinite(v) or (positive and v <= 0), msg)
    return v


def _non_negative_int(value: Any, name: str) -> int:
    """``value`` as an int, refused unless a non-negative integer."""
    _raise_if(not _is_int(value) or value < 0,
              f"{name} must be a non-negative integer, got {value!r}")  # fmt: skip
    return int(value)


def _positive_float(value: Any, name: str) -> float:
    """``value`` as a float, refused unless finite and positive."""
    msg = f"{name} must be a finite positive number, got {value!r}"
    return _finite_float(value, msg, positive=True)


def _parse_size(size: Any) -> tuple[int, int]:
    """``N`` or ``(ny, nx)`` as ``(ny, nx)`` of positive integers."""
    dims = (size, size) if _is_int(size) else size
    try:
        ny, nx = dims
    except (TypeError, ValueError):
        ny = nx = None
    msg = f"size must be a positive integer or a (ny, nx) pair of them, got {size!r}"
    _raise_if(not (_is_int(ny) and _is_int(nx) and ny > 0 and nx > 0), msg)
    return int(ny), int(nx)


def _parse_depth(depth: Any, bands: tuple[str, ...]) -> float | dict[str, float]:
    """The r-band depth, or the ``{band: depth}`` of every band, as finite floats."""
    if not isinstance(depth, Mapping):
        return _finite_float(depth, f"depth must be a finite AB magnitude, got {depth!r}")
    missing = [b for b in bands if b not in depth]
    _raise_if(bool(missing), f"depth mapping has no value for band(s) {missing}")
    return {b: _finite_float(v, f"depth must be a finite AB magnitude, got {v!r}")
            for b, v in {b: depth[b] for b in bands}.items()}  # fmt: skip


def _check_scene(scene: Table, bands: tuple[str, ...], wcs) -> QTable:
    """A copy of a user scene, checked, with ``ra``/``dec`` from the mosaic WCS."""
    table = QTable(scene, copy=True)
    needed = [*_SCENE_COLUMNS, *(f"{b}_flux" for b in bands)]
    missing = [c for c in needed if c not in table.colnames]
    _raise_if(bool(missing), f"scene lacks column(s) {missing}")
    ids = np.asarray(table["id"])
    _raise_if(bool(len(ids) and (ids.min() < 1 or len(np.unique(ids)) != len(ids))),
              "scene ids must be unique integers >= 1")  # fmt: skip
    kinds = set(np.asarray(table["kind"]).tolist())
    _raise_if(not kinds <= {"galaxy", "star"},
              f"scene kind must be 'galaxy' or 'star', got {sorted(kinds)}")  # fmt: skip
    for b in bands:
        flux = _values(table[f"{b}_flux"])
        _raise_if(not np.all(np.isfinite(flux) & (flux >= 0)),
                  f"scene {b}_flux must be finite and non-negative")  # fmt: skip
    x, y = _values(table["x"]), _values(table["y"])
    ra, dec = wcs.all_pix2world(x, y, 0) if len(table) else (np.zeros(0), np.zeros(0))
    table["ra"], table["dec"] = np.asarray(ra, float) * u.deg, np.asarray(dec, float) * u.deg
    table.meta.setdefault("zero_points", dict.fromkeys(bands, ZERO_POINT))
    return table
