"""Evaluate a catalog against a truth table: matching, completeness, purity, blends, residuals.

:func:`evaluate` matches a catalog to the truth one to one (:func:`match_positions`) and measures
completeness and purity per magnitude bin, close-pair recovery, flux, position and shape
residuals, and the segmentation IoU. ``docs/evaluation.md`` defines every figure, states the
conventions (units, matching, blends, the bright sample) and shows an example.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import astropy.units as u
import numpy as np
import zarr
from astropy.table import QTable, Table

from ..mosaic import Mosaic, _raise_if, open_mosaic
from ..schema import Flag
from . import _metrics
from ._metrics import MATCH_METHODS, match_positions, robust_stats
from ._plots import format_report, write_plots

__all__ = [
    "DEFAULT_MAG_BINS", "DEFAULT_PAIR_BINS", "MATCH_METHODS", "EvaluationResult", "evaluate",
    "match_positions", "robust_stats",
]  # fmt: skip

logger = logging.getLogger(__name__)

#: Default magnitude bin edges (AB).
DEFAULT_MAG_BINS = (16.0, 18.0, 20.0, 21.0, 22.0, 23.0, 23.5, 24.0, 24.5, 25.0, 25.5, 26.0, 26.5, 27.0, 27.5)  # fmt: skip
#: Default close-pair separation bin edges (arcsec); the last edge defines close pairs and blends.
DEFAULT_PAIR_BINS = (0.0, 0.4, 1.0, 2.0)
#: Pixel scale (arcsec) assumed when neither the arguments, the mosaic nor the truth give one.
DEFAULT_PIXEL_SCALE = 0.2


@dataclass
class EvaluationResult:
    """What :func:`evaluate` measured.

    Attributes
    ----------
    summary : dict
        Every figure, JSON-serialisable (see :meth:`to_json`): settings, counts,
        ``completeness``, ``completeness_bright``, ``purity``, ``mag_complete_90`` /
        ``mag_complete_50``, ``magnitude_bins`` (per bin: completeness, purity, Δmag),
        ``pairs`` (per separation bin), ``dmag``, ``position``, ``shape``, ``segmentation_iou``.
    matches : astropy.table.QTable
        One row per matched pair: ``cat_index``, ``truth_index`` (row numbers), ``cat_id`` /
        ``truth_id`` (when the tables have ``id``), ``dist``, ``dx``, ``dy`` (pix),
        ``truth_mag``, ``cat_mag``, ``dmag``, ``blended``, ``de1``, ``de2``, ``dhlr``
        (arcsec), ``iou`` where measured.
    pairs : astropy.table.QTable
        The close truth pairs counted in ``summary["pairs"]``: ``i``, ``j`` (truth rows),
        ``sep`` (arcsec), ``found_i``, ``found_j``, ``mag_i``, ``mag_j``.
    truth : astropy.table.QTable
        The truth with ``matched``, ``cat_index`` (−1 if none) and ``blended`` added.
    catalog : astropy.table.QTable
        The catalog with ``matched`` and ``truth_index`` added.
    """

    summary: dict[str, Any]
    matches: QTable = field(repr=False)
    pairs: QTable = field(repr=False)
    truth: QTable = field(repr=False)
    catalog: QTable = field(repr=False)
    mosaic: Mosaic | None = field(default=None, repr=False)
    segmentation: Any = field(default=None, repr=False)
    truth_segmentation: Any = field(default=None, repr=False)

    def to_json(self, path: str | os.PathLike | None = None, *, indent: int = 2) -> str:
        """The summary as JSON (NaN written as ``null``).

        Parameters
        ----------
        path, indent : path-like or None, int
            Also write it to this file; JSON indentation.

        Returns
        -------
        str
        """
        text = json.dumps(_jsonable(self.summary), indent=indent, allow_nan=False)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def table(self) -> str:
        """A readable text report of the summary."""
        return format_report(self.summary)

    def plot(self, outdir: str | os.PathLike, *, gallery: int = 12) -> list[Path]:
        """Write the PNG plots (matplotlib, Agg backend) into ``outdir``.

        ``completeness.png``, ``pairs.png``, ``dmag.png`` and, when the mosaic image or the
        catalog segmentation is available, ``missed_blends.png`` (see ``docs/evaluation.md``).

        Parameters
        ----------
        outdir, gallery : path-like, int
            Directory (created if needed); largest number of cutouts in the gallery (0: none).

        Returns
        -------
        list of pathlib.Path
            The files written.
        """
        return write_plots(self, Path(outdir), gallery=gallery)

    def __str__(self) -> str:
        return self.table()


def evaluate(
    catalog: str | os.PathLike | Table, truth: str | os.PathLike | Table, *,
    radius: float | u.Quantity = 1.0, method: str = "optimal", band: str | None = None,
    mosaic: str | os.PathLike | Mosaic | None = None, segmentation: Any = None,
    truth_segmentation: Any = None, mag_bins: Sequence[float] = DEFAULT_MAG_BINS,
    mag_limit: float = 25.0, pair_bins: Sequence[float] | u.Quantity = DEFAULT_PAIR_BINS,
    blend_flux_ratio: float = 0.1, pixel_scale: float | None = None,
) -> EvaluationResult:  # fmt: skip
    """Match a catalog to the truth and measure completeness, purity, blends and residuals.

    The definitions and conventions are in ``docs/evaluation.md``.

    Parameters
    ----------
    catalog : path-like or astropy.table.Table
        A survey_engine ``catalog.parquet`` (:func:`survey_engine.read_catalog`) or a table
        with ``x``, ``y`` (0-based pixels) and optionally ``id``, ``<band>_mag``, ``flags``,
        ``e1``, ``e2``, ``half_light_radius`` (pixels unless it has an angle unit).
    truth : path-like or astropy.table.Table
        A truth Parquet file (:func:`survey_engine.simulate.read_truth`) or a table with ``x``,
        ``y``, ``<band>_mag`` and optionally ``id``, ``e1``, ``e2``, ``half_light_radius``
        (arcsec unless it has a unit).
    radius : float or astropy.units.Quantity
        Match radius: arcsec, or a Quantity in arcsec-compatible units or ``u.pix``.
    method : {"optimal", "greedy"}
        One-to-one matching, see :func:`match_positions`.
    band : str, optional
        Band of the magnitudes. Default: the catalog's ``reference_band`` when both tables
        have its ``<band>_mag``, else the first band with ``<band>_mag`` in both (or in the
        truth); plain ``mag`` columns of single-band tables are used (see the docs).
    mosaic : path-like or Mosaic, optional
        The mosaic: pixel scale, ``truth_segmentation`` and image cutouts for the gallery.
    segmentation, truth_segmentation : path-like or array-like, optional
        The catalog's segmentation map (a ``segmentation.zarr`` group holding the array
        ``segmentation``, or a 2-D array of catalog ids); a 2-D array of truth ids (default:
        the mosaic's ``truth_segmentation``).
    mag_bins : sequence of float
        Magnitude bin edges.
    mag_limit : float
        Truth objects brighter than this are the *bright* sample: close pairs need both
        members brighter (detectable in isolation), and residuals are computed on it.
    pair_bins : sequence of float or astropy.units.Quantity
        Close-pair separation bin edges (arcsec, or a Quantity); the last edge is the
        largest separation of a close pair and the blend radius.
    blend_flux_ratio : float
        A truth neighbour within the blend radius with at least this fraction of an
        object's flux makes that object *blended*.
    pixel_scale : float, optional
        Arcsec per pixel (overrides the mosaic's and the truth's).

    Returns
    -------
    EvaluationResult

    Raises
    ------
    TypeError
        ``catalog``, ``truth``, ``mosaic`` or ``segmentation`` has an unsupported type.
    ValueError
        Missing ``x``/``y`` or magnitude columns, an unknown band, bad radius,
        bins or method, or segmentation maps of different shapes.
    FileNotFoundError
        A path does not exist.
    """
    _raise_if(method not in MATCH_METHODS,
              f"method must be one of {', '.join(MATCH_METHODS)}, got {method!r}")  # fmt: skip
    cat = _load_table(catalog, "catalog")
    tru = _load_table(truth, "truth")
    m = _load_mosaic(mosaic)
    scale = _pixel_scale(pixel_scale, m, tru)
    radius_pix = float(np.ravel(_to_pixels(radius, scale, "radius"))[0])
    _raise_if(not (np.ndim(radius) == 0 and math.isfinite(radius_pix) and radius_pix > 0),
              f"radius must be one positive length, got {radius!r}")  # fmt: skip
    pair_edges = _edges(np.ravel(_to_pixels(pair_bins, scale, "pair_bins")), "pair_bins")
    mag_edges = _edges(mag_bins, "mag_bins")
    band, tmag_col = _choose_band(band, cat, tru)
    cmag_col = _catalog_mag_column(cat, band)
    for name, t in (("catalog", cat), ("truth", tru)):
        if missing := [c for c in ("x", "y") if c not in t.colnames]:
            msg = f"the {name} has no {' or '.join(missing)} column (0-based pixel positions)"
            raise ValueError(msg)

    cx, cy = _values(cat, "x"), _values(cat, "y")
    tx, ty = _values(tru, "x"), _values(tru, "y")
    ci, ti, dist = match_positions(cx, cy, tx, ty, radius_pix, method=method)
    nc, nt = len(cat), len(tru)
    t_idx, c_idx = np.full(nt, -1, np.int64), np.full(nc, -1, np.int64)
    t_idx[ti], c_idx[ci] = ci, ti
    t_found, c_found = t_idx >= 0, c_idx >= 0

    tmag = _values(tru, tmag_col)
    cmag = _values(cat, cmag_col) if cmag_col is not None else np.full(nc, np.nan)
    bright = tmag < mag_limit
    pi, pj, psep = _metrics.close_pairs(tx, ty, pair_edges[-1])
    blended = _metrics.blended_in_truth(nt, pi, pj, 10.0 ** (-0.4 * tmag), blend_flux_ratio)

    # -- per magnitude bin ------------------------------------------------------------------
    comp = _metrics.binned_fraction(tmag, t_found, mag_edges)
    comp_iso = _metrics.binned_fraction(tmag[~blended], t_found[~blended], mag_edges)
    pur = _metrics.binned_fraction(cmag, c_found, mag_edges)
    dmag = cmag[ci] - tmag[ti]
    dstats = _metrics.binned_stats(tmag[ti], dmag, mag_edges)
    mag_rows = [
        {
            "lo": c["lo"], "hi": c["hi"], "n_truth": c["n"], "n_found": c["k"],
            "completeness": c["fraction"], "completeness_err": c["error"],
            "completeness_isolated": ciso["fraction"],
            "n_detected": p["n"], "n_matched": p["k"], "purity": p["fraction"],
            "dmag_n": d["n"], "dmag_median": d["median"], "dmag_scatter": d["scatter"],
        }
        for c, ciso, p, d in zip(comp, comp_iso, pur, dstats, strict=True)
    ]  # fmt: skip

    # -- close pairs ------------------------------------------------------------------------
    psel = bright[pi] & bright[pj]
    pi, pj, psep = pi[psel], pj[psel], psep[psel]
    pair_rows = _metrics.pair_recovery(psep, t_found[pi], t_found[pj], pair_edges)
    for r in pair_rows:
        r["lo_pix"], r["hi_pix"] = r["lo"], r["hi"]
        r["lo"], r["hi"] = r["lo"] * scale, r["hi"] * scale
    both = t_found[pi] & t_found[pj]
    pairs_summary = {"n": len(pi), "both": int(both.sum()), "fraction": _nanstat(np.mean, both)}
    pairs_summary["bins"] = pair_rows

    # -- residuals (bright matched objects) -------------------------------------------------
    mb = bright[ti]
    iso_m, bl_m = mb & ~blended[ti], mb & blended[ti]
    dmag_summary = {"all": robust_stats(dmag[mb]), "isolated": robust_stats(dmag[iso_m]),
                    "blended": robust_stats(dmag[bl_m])}  # fmt: skip
    fb = None  # per match: the catalog's own BLENDED flag
    if "flags" in cat.colnames:
        fb = ((np.asarray(_values(cat, "flags")).astype(np.int64) & int(Flag.BLENDED)) != 0)[ci]
        dmag_summary["flag_isolated"] = robust_stats(dmag[mb & ~fb])
        dmag_summary["flag_blended"] = robust_stats(dmag[mb & fb])
    dx, dy = cx[ci] - tx[ti], cy[ci] - ty[ti]
    position = {"dx": robust_stats(dx[mb]), "dy": robust_stats(dy[mb]),
                "dist_median": robust_stats(dist[mb])["median"]}  # fmt: skip
    shape: dict[str, Any] = {}
    matches = QTable()
    matches["cat_index"], matches["truth_index"] = ci, ti
    for name, table, rows in (("cat_id", cat, ci), ("truth_id", tru, ti)):
        if "id" in table.colnames:
            matches[name] = np.asarray(_values(table, "id")).astype(np.int64)[rows]
    matches["dist"], matches["dx"], matches["dy"] = dist * u.pix, dx * u.pix, dy * u.pix
    matches["truth_mag"], matches["cat_mag"], matches["dmag"] = tmag[ti], cmag[ci], dmag
    matches["blended"] = blended[ti]
    if fb is not None:
        matches["flag_blended"] = fb
    for e in ("e1", "e2"):
        if e in cat.colnames and e in tru.colnames:
            de = _values(cat, e)[ci] - _values(tru, e)[ti]
            matches[f"d{e}"] = de
            shape[e] = robust_stats(de[mb])
    if "half_light_radius" in cat.colnames and "half_light_radius" in tru.colnames:
        dh = _arcsec(cat["half_light_radius"], scale, u.pix)[ci]
        dh = dh - _arcsec(tru["half_light_radius"], scale, u.arcsec)[ti]
        matches["dhlr"] = dh * u.arcsec
        shape["half_light_radius_arcsec"] = robust_stats(dh[mb])

    # -- segmentation IoU -------------------------------------------------------------------
    seg, tseg = _load_segmentations(segmentation, truth_segmentation, m)
    iou_summary = None
    if seg is not None and tseg is not None:
        if "id" not in cat.colnames or "id" not in tru.colnames:
            logger.warning("segmentation IoU skipped: the catalog or the truth has no 'id' column")
        else:
            ids = _values(cat, "id"), _values(tru, "id")
            iou = _metrics.segmentation_iou(seg, tseg, *ids, ci, ti, strip=_strip_height(seg))
            matches["iou"] = iou
            iou_summary = {
                "n": int(np.isfinite(iou[mb]).sum()), "median": _nanstat(np.nanmedian, iou[mb]),
                "mean": _nanstat(np.nanmean, iou[mb]),
                "median_isolated": _nanstat(np.nanmedian, iou[iso_m]),
                "median_blended": _nanstat(np.nanmedian, iou[bl_m]),
            }  # fmt: skip
    elif seg is not None or tseg is not None:
        missing = "truth" if tseg is None else "catalog"
        logger.info("segmentation IoU skipped: %s segmentation missing", missing)

    # -- star/galaxy classification (issue 17: the catalog's p_star, the truth's kind) ------
    classification = None
    if "p_star" in cat.colnames and "kind" in tru.colnames:
        is_star = np.asarray(tru["kind"]).astype(str)[ti] == "star"
        ps = np.asarray(_values(cat, "p_star"), float)[ci]
        classification = {
            "threshold": 0.5, "auc": _metrics.roc_auc(ps, is_star),
            "bins": _metrics.classification_bins(ps, is_star, tmag[ti], mag_edges),
        }  # fmt: skip
        matches["p_star"], matches["truth_star"] = ps, is_star

    summary = {
        "band": band, "truth_mag_column": tmag_col, "catalog_mag_column": cmag_col,
        "method": method, "radius_arcsec": radius_pix * scale, "radius_pix": radius_pix,
        "pixel_scale_arcsec": scale, "mag_limit": float(mag_limit),
        "blend_radius_arcsec": float(pair_edges[-1] * scale),
        "blend_flux_ratio": float(blend_flux_ratio), "n_truth": nt,
        "n_truth_bright": int(bright.sum()),
        "n_truth_blended_bright": int((bright & blended).sum()), "n_catalog": nc,
        "n_matched": len(ci), "completeness": len(ci) / nt if nt else float("nan"),
        "completeness_bright": _nanstat(np.mean, t_found[bright]),
        "completeness_bright_isolated": _nanstat(np.mean, t_found[bright & ~blended]),
        "completeness_bright_blended": _nanstat(np.mean, t_found[bright & blended]),
        "purity": len(ci) / nc if nc else float("nan"),
        "mag_complete_90": _metrics.mag_at_fraction(comp, 0.9),
        "mag_complete_50": _metrics.mag_at_fraction(comp, 0.5),
        "magnitude_bins": mag_rows, "pairs": pairs_summary, "dmag": dmag_summary,
        "position": position, "shape": shape, "segmentation_iou": iou_summary,
        "classification": classification,
    }  # fmt: skip
    pairs = QTable({"i": pi, "j": pj, "sep": psep * scale * u.arcsec, "found_i": t_found[pi],
                    "found_j": t_found[pj], "mag_i": tmag[pi], "mag_j": tmag[pj]})  # fmt: skip
    truth_out = QTable(tru, copy=False)
    truth_out["matched"], truth_out["cat_index"], truth_out["blended"] = t_found, t_idx, blended
    cat_out = QTable(cat, copy=False)
    cat_out["matched"], cat_out["truth_index"] = c_found, c_idx
    logger.info("evaluated %d detections against %d truth objects: %d matched", nc, nt, len(ci))
    return EvaluationResult(
        summary=summary, matches=matches, pairs=pairs, truth=truth_out, catalog=cat_out,
        mosaic=m, segmentation=seg, truth_segmentation=tseg,
    )  # fmt: skip


# --- inputs ----------------------------------------------------------------------------
def _load_table(obj, name: str) -> Table:
    if isinstance(obj, Table):
        return obj
    if isinstance(obj, str | os.PathLike):
        if name == "truth":
            from ..simulate import read_truth

            return read_truth(obj)  # names the file when it is not Parquet
        from ..catalog import read_catalog

        try:
            return read_catalog(obj)
        except FileNotFoundError:
            raise
        except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
            msg = (f"catalog {os.fspath(obj)} is not a readable Parquet file "
                   f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})")  # fmt: skip
            raise ValueError(msg) from err
    msg = f"{name} must be a path or an astropy Table, got {type(obj).__name__}"
    raise TypeError(msg)


def _load_mosaic(obj) -> Mosaic | None:
    if obj is None or isinstance(obj, Mosaic):
        return obj
    if isinstance(obj, str | os.PathLike):
        return open_mosaic(os.fspath(obj))
    msg = f"mosaic must be a path or a Mosaic, got {type(obj).__name__}"
    raise TypeError(msg)


def _load_segmentations(obj, truth_obj, m: Mosaic | None) -> tuple[Any, Any]:
    """The catalog's and the truth's segmentation maps (each None when not available)."""
    seg = obj
    if isinstance(obj, str | os.PathLike):
        path = os.fspath(obj)
        if "://" not in path and not os.path.exists(path):
            msg = f"segmentation not found: {path}"
            raise FileNotFoundError(msg)
        seg = zarr.open_group(path, mode="r")["segmentation"]
    elif obj is not None:
        seg = _as_2d(obj, "segmentation")
    if truth_obj is not None:
        return seg, _as_2d(truth_obj, "truth_segmentation")
    if m is not None and m.has_truth_segmentation:
        return seg, m.group["truth_segmentation"]
    return seg, None


def _as_2d(obj, name: str):
    if not hasattr(obj, "shape") or len(obj.shape) != 2:
        msg = f"{name} must be a path or a 2-D array, got {type(obj).__name__} of shape {getattr(obj, 'shape', None)}"
        raise TypeError(msg)
    return obj


def _pixel_scale(value: float | None, m: Mosaic | None, truth: Table) -> float:
    if value is None and m is not None and m.pixel_scale:
        value = m.pixel_scale
    if value is None:
        value = truth.meta.get("pixel_scale_arcsec")
    if value is None:
        logger.info("no pixel scale given or recorded: assuming %g arcsec/pix", DEFAULT_PIXEL_SCALE)
        value = DEFAULT_PIXEL_SCALE
    value = float(value)
    _raise_if(not math.isfinite(value) or value <= 0,
              f"pixel_scale must be a positive number of arcsec, got {value!r}")  # fmt: skip
    return value


def _strip_height(arr) -> int:
    """Rows of the segmentation read at a time: whole chunks of a Zarr array, else 1024."""
    chunks = getattr(arr, "chunks", None)
    if isinstance(chunks, tuple) and chunks and isinstance(chunks[0], int | np.integer):
        return max(int(chunks[0]), 256)
    return 1024


def _to_pixels(value, scale: float, name: str) -> np.ndarray:
    if isinstance(value, u.Quantity):
        if value.unit == u.pix:
            return np.asarray(value.value, dtype=np.float64)
        if value.unit.physical_type == "angle":
            return value.to_value(u.arcsec) / scale
        msg = f"{name} must be in pixels or an angle unit, got unit {value.unit}"
        raise ValueError(msg)
    try:
        return np.asarray(value, dtype=np.float64) / scale
    except (TypeError, ValueError):
        msg = f"{name} must be a number of arcsec or a Quantity, got {value!r}"
        raise ValueError(msg) from None


def _edges(values, name: str) -> np.ndarray:
    """Bin edges as float64, checked finite and strictly increasing."""
    edges = np.asarray(values, dtype=np.float64)
    _raise_if(edges.ndim != 1 or len(edges) < 2 or not np.all(np.isfinite(edges)),
              f"{name} must hold at least two finite bin edges, got {edges.tolist()!r}")  # fmt: skip
    _raise_if(np.any(np.diff(edges) <= 0),
              f"{name} must be strictly increasing, got {edges.tolist()!r}")  # fmt: skip
    return edges


def _mag_bands(table: Table) -> list[str]:
    return [c[: -len("_mag")] for c in table.colnames if c.endswith("_mag") and c != "_mag"]


def _catalog_bands(cat: Table) -> list[str]:
    """The catalog's bands: its ``bands`` metadata, else its ``<band>_mag`` columns."""
    bands = cat.meta.get("bands")
    if isinstance(bands, list | tuple) and bands:
        return [str(b) for b in bands]
    return _mag_bands(cat)


def _choose_band(band: str | None, cat: Table, truth: Table) -> tuple[str, str]:
    """The band and the truth's magnitude column: ``<band>_mag``, else ``mag`` for a known band."""
    truth_bands = _mag_bands(truth)
    plain = "mag" in truth.colnames
    if band is not None:
        if band in truth_bands:
            return band, f"{band}_mag"
        if plain:
            logger.info("truth magnitudes: its 'mag' column, taken as band %r", band)
            return band, "mag"
        msg = f"band {band!r} has no magnitude column {band}_mag in the truth (bands: {', '.join(truth_bands) or 'none'})"
        raise ValueError(msg)
    if truth_bands:
        ref = cat.meta.get("reference_band")
        if ref in truth_bands and f"{ref}_mag" in cat.colnames:
            return ref, f"{ref}_mag"
        b = next((b for b in truth_bands if f"{b}_mag" in cat.colnames), truth_bands[0])
        return b, f"{b}_mag"
    if plain:
        cat_bands = _catalog_bands(cat)
        if len(cat_bands) == 1:
            logger.info("truth magnitudes: its 'mag' column, taken as the catalog's band %r", cat_bands[0])  # fmt: skip
            return cat_bands[0], "mag"
        if not cat_bands:  # no band anywhere: label the magnitudes "mag"
            return "mag", "mag"
        msg = (f"the truth has a plain 'mag' column but the catalog has bands "
               f"{', '.join(cat_bands)}: say which band it is with band= (--band)")  # fmt: skip
        raise ValueError(msg)
    msg = "the truth has no <band>_mag or mag column: cannot bin by magnitude"
    raise ValueError(msg)


def _catalog_mag_column(cat: Table, band: str) -> str | None:
    """The catalog's ``<band>_mag`` column, else its plain ``mag`` (single band), else None."""
    if f"{band}_mag" in cat.colnames:
        return f"{band}_mag"
    if "mag" in cat.colnames and len(_catalog_bands(cat)) <= 1:
        return "mag"
    return None


def _values(table: Table, name: str) -> np.ndarray:
    col = table[name]
    v = np.asarray(col.value if isinstance(col, u.Quantity) else col)
    if v.dtype.kind in "fiub":
        return v.astype(np.float64) if v.dtype.kind == "f" else v
    msg = f"column {name!r} is not numeric (dtype {v.dtype})"
    raise ValueError(msg)


def _arcsec(col, scale: float, default_unit: u.UnitBase) -> np.ndarray:
    """A length column in arcsec (plain columns are in ``default_unit``)."""
    unit = col.unit if isinstance(col, u.Quantity) else None
    if unit is not None and unit != u.dimensionless_unscaled:
        if unit == u.pix:
            return np.asarray(col.value, np.float64) * scale
        return np.asarray(col.to_value(u.arcsec), np.float64)
    v = np.asarray(col, np.float64)
    return v * scale if default_unit == u.pix else v


def _nanstat(fn, v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(fn(v)) if len(v) else float("nan")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
