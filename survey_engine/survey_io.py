"""Survey directories on disk: tract mosaics ``<id>.zarr`` beside a sky map ``skymap.json``.

:func:`cut_into_tracts` cuts one mosaic into pixel-aligned, overlapping tract mosaics (same
projection, CRPIX shifted); :func:`open_survey` reads a survey directory's sky map (or derives it
from the mosaics). See ``docs/survey.md``.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from .mosaic import _raise_if, create_mosaic, open_mosaic
from .skymap import SKYMAP_FILE, SkyMap

__all__ = ["cut_into_tracts", "open_survey", "tag_tract", "tract_bounds"]

logger = logging.getLogger(__name__)

#: Group attributes of a source mosaic copied into its tract mosaics.
_COPIED_ATTRS = ("saturation", "simulation", "ingest")


def tract_bounds(n: int, parts: int, overlap: int) -> list[tuple[int, int]]:
    """Half-open pixel ranges of ``parts`` overlapping pieces of an axis of ``n`` pixels.

    The axis is split at ``round(i n / parts)``; piece ``i`` reaches ``overlap // 2`` pixels
    before and ``overlap - overlap // 2`` after its share (clipped to the axis), so neighbours
    share exactly ``overlap`` pixels.

    Parameters
    ----------
    n, parts, overlap : int

    Returns
    -------
    list of (int, int)
    """
    cuts = [round(i * n / parts) for i in range(parts + 1)]
    lo, hi = overlap // 2, overlap - overlap // 2
    return [(max(0, cuts[i] - lo), min(n, cuts[i + 1] + hi)) for i in range(parts)]


def tag_tract(path: str | os.PathLike, tract_id: int, **info: Any) -> None:
    """Record a mosaic's tract id in its ``tract`` group attribute (``{"id": …, **info}``).

    Parameters
    ----------
    path : str or path-like
        The mosaic.
    tract_id : int
    **info
        More JSON-safe entries (e.g. the parent mosaic and pixel origin of a cut tract).
    """
    m = open_mosaic(os.fspath(path), mode="r+")
    m.group.attrs["tract"] = {"id": int(tract_id), **info}
    m.consolidate()


def cut_into_tracts(
    mosaic_path: str | os.PathLike, out_dir: str | os.PathLike, ny: int, nx: int,
    overlap_px: int, *, overwrite: bool = False,
) -> SkyMap:  # fmt: skip
    """Cut a mosaic into ``ny × nx`` pixel-aligned, overlapping tract mosaics and a sky map.

    Every tract keeps the mosaic's projection, its CRPIX shifted to the tract's origin (SIP and
    TPV terms are relative to CRPIX, so they stay exact): a pixel of a tract is the same sky
    pixel as in the mosaic. Neighbouring tracts share ``overlap_px`` pixels
    (:func:`tract_bounds`). Tract ``iy * nx + ix`` is written to ``out_dir/<id>.zarr`` with the
    mosaic's bands, zero points, PSF, units, chunks, saturation and provenance, plus a
    ``tract`` attribute (id, parent path, origin ``[y0, x0]``); the truth segmentation is cut
    too when present. The sky map (:meth:`SkyMap.from_mosaics`: nearest-centre inner regions)
    is written to ``out_dir/skymap.json``.

    Parameters
    ----------
    mosaic_path : str or path-like
        The mosaic to cut.
    out_dir : str or path-like
        The survey directory to create.
    ny, nx : int
        Tracts along y and x.
    overlap_px : int
        Pixels shared by neighbouring tracts (≥ 0).
    overwrite : bool
        Replace ``out_dir`` if it exists.

    Returns
    -------
    SkyMap
    """
    src = open_mosaic(os.fspath(mosaic_path))
    _raise_if(not src.has_wcs, f"mosaic {src.path} has no WCS: tracts need one")
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (ny, nx, overlap_px))
    _raise_if(not ok or ny < 1 or nx < 1 or overlap_px < 0,
              f"ny, nx must be positive integers and overlap_px a non-negative one, got "
              f"{ny!r}, {nx!r}, {overlap_px!r}")  # fmt: skip
    by, bx = tract_bounds(src.ny, ny, overlap_px), tract_bounds(src.nx, nx, overlap_px)
    smallest = min(min(b - a for a, b in by), min(b - a for a, b in bx))
    _raise_if(smallest <= overlap_px,
              f"{ny}×{nx} tracts with {overlap_px} px overlap do not fit mosaic {src.path} of "
              f"{src.ny}×{src.nx} px (a tract would be {smallest} px wide)")  # fmt: skip
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir):
        _raise_if(not overwrite, f"{out_dir} already exists; pass overwrite=True to replace it")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    extra = {k: src.attrs[k] for k in _COPIED_ATTRS if k in src.attrs}
    _, cy, cx = src.chunks
    paths = []
    for iy, (y0, y1) in enumerate(by):
        for ix, (x0, x1) in enumerate(bx):
            tid = iy * nx + ix
            cards = dict(src.wcs_cards)
            cards["CRPIX1"] = float(cards.get("CRPIX1", 0.0)) - x0
            cards["CRPIX2"] = float(cards.get("CRPIX2", 0.0)) - y0
            path = os.path.join(out_dir, f"{tid}.zarr")
            tag = {"id": tid, "parent": src.path, "origin": [y0, x0]}
            dst = create_mosaic(
                path, shape=(y1 - y0, x1 - x0), bands=src.bands, wcs=cards,
                zero_points=src.zero_points, pixel_scale=src.pixel_scale, psf_fwhm=src.psf_fwhm,
                image_unit=src.units.get("image", "count"), chunks=(cy, cx),
                truth_segmentation=src.has_truth_segmentation,
                extra_attrs={**extra, "tract": tag},
            )  # fmt: skip
            for ys in range(y0, y1, cy):  # strips one chunk high: memory stays small
                ye = min(y1, ys + cy)
                reg = src.read((ys, ye), (x0, x1))
                for b, band in enumerate(src.bands):
                    dst.write(band, ys - y0, 0, image=reg.image[b], variance=reg.variance[b],
                              mask=reg.mask[b])  # fmt: skip
                if src.has_truth_segmentation:
                    seg = src.group["truth_segmentation"][ys:ye, x0:x1]
                    dst.group["truth_segmentation"][ys - y0 : ye - y0, :] = seg
            dst.consolidate()
            paths.append(path)
            logger.info("tract %d: %s, y %d:%d, x %d:%d of %s", tid, path, y0, y1, x0, x1, src.path)
    skymap = SkyMap.from_mosaics(paths)
    skymap.meta.update(generator="cut_into_tracts", parent=src.path, n_tracts=[ny, nx],
                       overlap_px=overlap_px)  # fmt: skip
    skymap.to_json(os.path.join(out_dir, SKYMAP_FILE))
    return skymap


def open_survey(path: str | os.PathLike) -> SkyMap:
    """The sky map of a survey directory: its ``skymap.json``, else derived from its mosaics.

    Parameters
    ----------
    path : str or path-like
        A survey directory (``<id>.zarr`` tract mosaics, optionally ``skymap.json``).

    Returns
    -------
    SkyMap
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, SKYMAP_FILE)):
        return SkyMap.from_json(path)
    return SkyMap.from_mosaics(path)
