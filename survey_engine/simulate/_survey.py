"""``simulate_survey``: one GalSim scene over a sky region, drawn into overlapping tract mosaics.

The truth objects are drawn once over the whole region (positions uniform on the tangent plane
of the region's centre) and each tract's mosaic is simulated with :func:`simulate` on its own
WCS: every object whose stamp can reach the tract is placed at its tract pixel position, so an
object in an overlap appears in several tracts' pixels. Each tract has its own noise (seeded
from ``(seed, tract id)``), as separate coadds of the same sky would.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy import units as u
from astropy.table import QTable

from ..mosaic import _raise_if
from ..parallel import dask_client
from ..skymap import SKYMAP_FILE, SkyMap, tan_wcs
from ..survey_io import tag_tract
from ._draw import MAX_HALF
from ._run import _local_abspath, _non_negative_int, simulate
from ._scene import DEFAULT_CENTER, make_scene, write_truth

__all__ = ["SurveySimulation", "simulate_survey"]

logger = logging.getLogger(__name__)

_SEED_TAG = 0x7AC75  # stream tag of the per-tract noise seeds
#: Truth columns that belong to one pixel frame (dropped from the survey truth table).
_FRAME_COLUMNS = ("x", "y")


@dataclass
class SurveySimulation:
    """What :func:`simulate_survey` made.

    Attributes
    ----------
    out_dir : str
        The survey directory.
    skymap : SkyMap
        Its sky map (also in ``out_dir/skymap.json``), mosaic paths set.
    truth : astropy.table.QTable
        One row per truth object of the region (also ``out_dir/truth.parquet``): ``ra``,
        ``dec``, fluxes, magnitudes, shapes, ``tract`` (the owning tract by
        :meth:`SkyMap.find_tract`, −1 outside every tract), ``n_tracts`` (tracts whose pixels
        hold its centre) and ``tracts`` (their ids, comma-separated).
    mosaics : dict
        ``{tract id: mosaic path}``.
    elapsed_s : float
        Wall time.
    """

    out_dir: str
    skymap: SkyMap
    truth: QTable
    mosaics: dict[int, str] = field(default_factory=dict)
    elapsed_s: float = 0.0


def simulate_survey(
    out_dir: str | os.PathLike, *, skymap: SkyMap | None = None,
    center: tuple[float, float] = DEFAULT_CENTER, tracts: tuple[int, int] = (2, 2),
    tract_size: int | tuple[int, int] = 1024, overlap: int = 128, pixel_scale: float = 0.2,
    bands: str | Sequence[str] = ("g", "r", "i"), seed: int = 0,
    depth: float | Mapping[str, float] = 26.8, psf: str = "kolmogorov", psf_fwhm: float = 0.7,
    chunks: int | tuple[int, int] = 1024, masks: bool = False, bright_stars: int = 0,
    density: float = 1.0, max_mag: float = 27.0, truth_segmentation: bool = True,
    workers: int | None = None, scheduler: str | None = None, client: Any | None = None,
    progress: bool = True, overwrite: bool = False,
) -> SurveySimulation:  # fmt: skip
    """Simulate a survey: one scene over a sky region, drawn into each tract's own mosaic.

    Parameters
    ----------
    out_dir : str or path-like
        The survey directory to create: ``<tract id>.zarr`` per tract, ``skymap.json``,
        ``truth.parquet``.
    skymap : SkyMap, optional
        The tracts (e.g. :meth:`SkyMap.rings`); by default :meth:`SkyMap.grid` of ``tracts``
        tracts of ``tract_size`` pixels sharing ``overlap`` pixels around ``center``, each a
        TAN projection at its own centre (different tangent points).
    center, tracts, tract_size, overlap, pixel_scale
        The default grid: (ra, dec) in degrees; (rows, columns); pixels per side or (ny, nx);
        pixels shared by neighbours; arcsec per pixel (with ``skymap``, the tracts' own scale
        is used).
    bands, seed, depth, psf, psf_fwhm, chunks, masks, bright_stars, density, max_mag
        As for :func:`~survey_engine.simulate.simulate`; the scene and the artefacts' seed is
        ``seed``, each tract's noise has a seed of its own. ``bright_stars`` is the number in
        the whole region.
    truth_segmentation : bool
        Store each tract's noiseless truth segmentation (global truth ids).
    workers, scheduler, client
        Dask cluster (one for all tracts), see :func:`survey_engine.parallel.dask_client`.
    progress, overwrite : bool
        Progress bars; replace ``out_dir``.

    Returns
    -------
    SurveySimulation

    Notes
    -----
    The scene is uniform on the tangent plane of the region's centre and its ellipticities are
    in that plane's pixel frame; each tract draws them in its own pixel frame, which is rotated
    from it by the convergence of the meridians (≈ Δra · sin dec: 0.01° at 1° from the centre
    at dec 0.6°) — negligible for fields of a few degrees, the scope of this simulator.
    """
    t0 = time.perf_counter()
    seed = _non_negative_int(seed, "seed")
    if skymap is None:
        skymap = SkyMap.grid(center, tracts, tract_shape=tract_size, overlap=overlap,
                             pixel_scale=pixel_scale)  # fmt: skip
    _raise_if(not isinstance(skymap, SkyMap), f"skymap must be a SkyMap, got {skymap!r}")
    scales = [t.pixel_scale for t in skymap]
    pixel_scale = float(np.median(scales))
    _raise_if(max(scales) - min(scales) > 1e-6 * pixel_scale,
              f"the tracts' pixel scales differ ({min(scales):.6g} to {max(scales):.6g} arcsec): "
              "simulate_survey draws them all at one scale")  # fmt: skip
    out_dir = _local_abspath(out_dir)
    _raise_if("://" in out_dir, f"simulate_survey writes a local directory, got {out_dir}")
    if os.path.exists(out_dir):
        if not overwrite:
            msg = f"{out_dir} already exists; pass overwrite=True to replace it"
            raise FileExistsError(msg)
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)

    frame, (fny, fnx) = _scene_frame(skymap, pixel_scale)
    scene = make_scene(fny, fnx, bands=bands, seed=seed, pixel_scale=pixel_scale,
                       density=density, max_mag=max_mag, bright_stars=bright_stars,
                       wcs=frame)  # fmt: skip
    ra, dec = (np.asarray(scene[c].to_value(u.deg)) for c in ("ra", "dec"))
    logger.info("survey scene: %d objects over %d tracts (frame %d × %d px)", len(scene),
                len(skymap), fny, fnx)  # fmt: skip

    mosaics: dict[int, str] = {}
    holders = skymap.containing(ra, dec)
    with dask_client(workers=workers, scheduler=scheduler, client=client) as c:
        for t in skymap:
            x, y = t.sky_to_pixel(ra, dec)
            ny, nx = t.shape
            reach = MAX_HALF + 1  # a stamp centred this far outside can still touch the tract
            near = (
                np.isfinite(x) & (x > -reach) & (x < nx + reach) & (y > -reach) & (y < ny + reach)
            )
            sub = scene[near]
            sub["x"], sub["y"] = x[near] * u.pix, y[near] * u.pix
            path = os.path.join(out_dir, f"{t.id}.zarr")
            simulate(
                path, size=t.shape, bands=bands, seed=_tract_seed(seed, t.id), depth=depth,
                pixel_scale=pixel_scale, psf=psf, psf_fwhm=psf_fwhm, chunks=chunks,
                masks=masks, truth_segmentation=truth_segmentation, scene=sub, wcs=t.wcs,
                client=c, progress=progress, overwrite=True,
            )  # fmt: skip
            tag_tract(path, t.id, survey=out_dir)
            mosaics[t.id] = path
            logger.info("tract %d: %s, %d objects drawn", t.id, path, int(near.sum()))

    skymap = SkyMap(
        [type(t)(t.id, t.ra, t.dec, t.shape, t.wcs_cards, t.inner, mosaics[t.id]) for t in skymap],
        meta={**skymap.meta, "simulation": {"generator": "simulate_survey", "seed": seed}},
    )  # fmt: skip
    skymap.to_json(os.path.join(out_dir, SKYMAP_FILE))
    truth = _survey_truth(scene, skymap, holders)
    write_truth(truth, os.path.join(out_dir, "truth.parquet"))
    elapsed = time.perf_counter() - t0
    logger.info("simulated survey %s: %d tracts, %d truth objects in %.1f s", out_dir,
                len(skymap), len(truth), elapsed)  # fmt: skip
    return SurveySimulation(out_dir, skymap, truth, mosaics, elapsed)


def _tract_seed(seed: int, tract_id: int) -> int:
    """The noise seed of one tract: independent streams per (seed, tract)."""
    state = np.random.SeedSequence([seed, _SEED_TAG, int(tract_id)]).generate_state(1)
    return int(state[0])


def _scene_frame(skymap: SkyMap, pixel_scale: float):
    """A TAN frame at the region's centre whose pixels cover every tract plus a stamp's reach."""
    xyz = np.stack([_unit(t.ra, t.dec) for t in skymap]).mean(axis=0)
    ra0 = math.degrees(math.atan2(xyz[1], xyz[0])) % 360.0
    dec0 = math.degrees(math.atan2(xyz[2], math.hypot(xyz[0], xyz[1])))
    probe = tan_wcs((ra0, dec0), (1, 1), pixel_scale)  # pixel (0, 0) at the tangent point
    xs, ys = [], []
    for t in skymap:
        ny, nx = t.shape
        e = np.linspace(0.0, 1.0, 17)
        bx = np.concatenate([e * nx, e * nx, np.zeros(17), np.full(17, nx)]) - 0.5
        by = np.concatenate([np.zeros(17), np.full(17, ny), e * ny, e * ny]) - 0.5
        px, py = probe.all_world2pix(*t.pixel_to_sky(bx, by), 0)
        xs.append(px), ys.append(py)
    xs, ys = np.concatenate(xs), np.concatenate(ys)
    margin = MAX_HALF + 2
    half_x = math.ceil(max(abs(xs.min()), abs(xs.max())) + margin)
    half_y = math.ceil(max(abs(ys.min()), abs(ys.max())) + margin)
    shape = (2 * half_y + 1, 2 * half_x + 1)
    return tan_wcs((ra0, dec0), shape, pixel_scale), shape


def _unit(ra: float, dec: float) -> np.ndarray:
    r, d = math.radians(ra), math.radians(dec)
    return np.array([math.cos(d) * math.cos(r), math.cos(d) * math.sin(r), math.sin(d)])


def _survey_truth(scene: QTable, skymap: SkyMap, holders: np.ndarray) -> QTable:
    """The survey truth table: the scene without its frame pixels, plus the tracts holding it."""
    truth = scene.copy()
    truth.remove_columns([c for c in _FRAME_COLUMNS if c in truth.colnames])
    ra, dec = (np.asarray(truth[c].to_value(u.deg)) for c in ("ra", "dec"))
    ids = np.asarray(skymap.ids)
    truth["tract"] = skymap.find_tract(ra, dec)
    truth["tract"].info.description = "owning tract (find_tract of ra, dec); -1: in no tract"
    truth["n_tracts"] = holders.sum(axis=0).astype(np.int16)
    truth["n_tracts"].info.description = "number of tracts whose pixels hold the centre"
    truth["tracts"] = [",".join(str(i) for i in ids[holders[:, k]]) for k in range(len(truth))]
    truth["tracts"].info.description = "ids of the tracts whose pixels hold the centre"
    truth.meta.update(survey_engine="survey truth", n_tracts=len(skymap))
    truth.meta.pop("shape", None)
    return truth
