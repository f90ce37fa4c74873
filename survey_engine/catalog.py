"""Catalog rows and I/O: the schema's columns from measurements; Parquet with units; QTable out."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import BAND_INHERITED_FLAGS, ColumnSpec, catalog_columns, empty_columns, object_ids
from .storage import check_store, filesystem, is_url

__all__ = ["CatalogLayout", "catalog_metadata", "dataset_files", "read_catalog", "reference_band",
           "to_arrow", "write_parquet_atomic"]  # fmt: skip

#: Detection-image columns copied from the measurements unchanged.
_COPIED = ("x", "y", "x_iso", "y_iso", "x_err", "y_err", "a", "b", "theta", "e1", "e2",
           "half_light_radius", "kron_radius", "area", "peak", "flags",
           "p_star", "bulge_fraction", "r_bulge_arcsec", "r_disk_arcsec", "ellipticity",
           "frac_dev", "model_r_exp", "model_r_dev", "model_e1", "model_e2")  # fmt: skip

#: Per-band measurements copied under ``<band>_<name>`` (``flux``: the total flux).
_BAND_COPIED = ("kron_flux", "kron_flux_err", "iso_flux", "iso_flux_err", "psf_flux", "psf_flux_err",
                "exp_flux", "dev_flux", "deblended_flux", "deblended_flux_err", "parent_flux", "flags")  # fmt: skip


def reference_band(bands: tuple[str, ...], detection_band: str | None) -> str:
    """Band behind the unprefixed ``flux`` column: the detection band, else the last (reddest)."""
    return detection_band if detection_band is not None else bands[-1]


@dataclass(frozen=True)
class CatalogLayout:
    """How measured objects of one mosaic become catalog rows (the schema, applied).

    Attributes
    ----------
    specs : list of ColumnSpec
        The columns, in order (:func:`~survey_engine.schema.catalog_columns`).
    bands, reference_band : tuple of str, str
        Band order of the mosaic, and the band behind ``flux``/``flux_err``.
    zero_points : mapping
        AB zero point per band (None if unknown: nJy and magnitudes are NaN).
    width : int
        Mosaic width, for the IDs (:func:`~survey_engine.schema.object_ids`).
    pixel_to_sky : callable or None
        ``(x, y) -> (ra, dec)`` for 0-based mosaic pixels; None gives NaN.
    ids : callable or None
        ``(y_peak, x_peak) -> int64 ids`` for integer mosaic peak pixels (a survey's global
        ids); None: :func:`~survey_engine.schema.object_ids` with ``width``.
    """

    specs: list[ColumnSpec]
    bands: tuple[str, ...]
    reference_band: str
    zero_points: Mapping[str, float | None]
    width: int
    pixel_to_sky: Callable | None = None
    ids: Callable | None = None

    @classmethod
    def for_mosaic(cls, m, science, ids: Callable | None = None, id_scheme: str | None = None):
        """The catalog layout of mosaic ``m`` (a Mosaic) measured with ``science`` (a ScienceConfig);
        ``ids`` as the attribute (None: the mosaic's own ids), described in the ``id`` column's
        metadata by ``id_scheme``."""
        ref = reference_band(m.bands, science.detection_band)
        specs = catalog_columns(m.bands, science.measure.apertures,
                                image_unit=m.units.get("image", "count"), reference_band=ref)  # fmt: skip
        if id_scheme is not None:
            specs = [ColumnSpec(c.name, c.dtype, c.unit, f"object ID: {id_scheme}") if c.name == "id"
                     else c for c in specs]  # fmt: skip
        sky = m.pixel_to_sky if m.has_wcs else None
        return cls(specs, tuple(m.bands), ref, dict(m.zero_points), m.nx, sky, ids)

    def object_ids(self, y_peak, x_peak) -> np.ndarray:
        """The ids of objects with integer mosaic peak pixels ``(y_peak, x_peak)``."""
        if self.ids is not None:
            return np.asarray(self.ids(y_peak, x_peak), dtype=np.int64)
        return object_ids(y_peak, x_peak, self.width)

    def rows(self, meas, idx: np.ndarray, *, origin: tuple[int, int], parent_index: np.ndarray,
             n_children: np.ndarray) -> dict[str, np.ndarray]:  # fmt: skip
        """Catalog columns of objects ``idx`` of one measured window.

        Parameters
        ----------
        meas : Measurements
            Per-object measurements of the window (peaks in window pixels, positions in
            mosaic pixels; per-band columns in ``meas.bands``).
        idx : numpy.ndarray of int
            Objects to output.
        origin : (int, int)
            Mosaic pixel (y, x) of the window's first pixel.
        parent_index, n_children : numpy.ndarray
            Per object of the window: index of its parent's brightest child (whose ID is the
            parent ID), and the number of children of its parent.

        Returns
        -------
        dict of numpy.ndarray
            Exactly the schema's columns.
        """
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) == 0:
            return empty_columns(self.specs)
        c = meas.columns
        ids = self.object_ids(c["y_peak"] + origin[0], c["x_peak"] + origin[1])
        out: dict[str, np.ndarray] = {
            "id": ids[idx], "parent_id": ids[parent_index[idx]], "n_children": n_children[idx],
            "x_peak": c["x_peak"][idx] + origin[1], "y_peak": c["y_peak"][idx] + origin[0],
        }  # fmt: skip
        out.update({k: c[k][idx] for k in _COPIED})
        if self.pixel_to_sky is not None:
            out["ra"], out["dec"] = self.pixel_to_sky(out["x"], out["y"])
        else:
            out["ra"] = out["dec"] = np.full(len(idx), np.nan)
        for b in self.bands:
            out.update(self._band_columns(b, {k: v[idx] for k, v in meas.bands[b].items()}))
            out[f"{b}_flags"] = out[f"{b}_flags"] | (out["flags"] & BAND_INHERITED_FLAGS)
        out["flux"] = out[f"{self.reference_band}_flux"]
        out["flux_err"] = out[f"{self.reference_band}_flux_err"]
        return {s.name: out[s.name] for s in self.specs}

    def _band_columns(self, b: str, bc: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        f, fe = bc["flux"], bc["flux_err"]  # the total flux (survey_engine.model_photometry)
        out = {f"{b}_flux": f, f"{b}_flux_err": fe}
        out.update({f"{b}_{k}": bc[k] for k in _BAND_COPIED})
        out.update({f"{b}_{k}": v for k, v in bc.items() if k.startswith("aper_flux_")})
        zp = self.zero_points.get(b)
        if zp is None:
            nan = np.full(len(f), np.nan)
            out.update({f"{b}_flux_njy": nan, f"{b}_flux_njy_err": nan, f"{b}_mag": nan,
                        f"{b}_mag_err": nan})  # fmt: skip
            return out
        scale = 10.0 ** (-0.4 * (zp - 31.4))  # one image unit in nJy
        pos = f > 0
        safe = np.where(pos, f, 1.0)
        out[f"{b}_flux_njy"] = f * scale
        out[f"{b}_flux_njy_err"] = fe * scale
        with np.errstate(divide="ignore", invalid="ignore"):
            out[f"{b}_mag"] = np.where(pos, zp - 2.5 * np.log10(safe), np.nan)
            out[f"{b}_mag_err"] = np.where(pos, 2.5 / np.log(10) * fe / safe, np.nan)
        return out

    def table(self, rows: Mapping[str, np.ndarray] | None = None, meta=None) -> pa.Table:
        """An Arrow table of ``rows`` (None: an empty catalog) in schema order."""
        return to_arrow(empty_columns(self.specs) if rows is None else rows, self.specs, meta)


_META_KEY = b"survey_engine"


def to_arrow(columns: Mapping[str, np.ndarray], specs: list[ColumnSpec],
             meta: Mapping[str, Any] | None = None) -> pa.Table:  # fmt: skip
    """Build an Arrow table in schema order, with units and descriptions as field metadata.

    Parameters
    ----------
    columns : mapping of str to numpy.ndarray
        One array per column of the schema ``specs`` (extra keys are an error).
    specs : list of ColumnSpec
    meta : mapping, optional
        Catalog-level metadata (JSON-serialisable), stored under ``survey_engine``.

    Returns
    -------
    pyarrow.Table
    """
    names = {s.name for s in specs}
    extra, missing = set(columns) - names, names - set(columns)
    if extra or missing:
        msg = f"catalog columns do not match the schema: missing {sorted(missing)}, extra {sorted(extra)}"
        raise ValueError(msg)
    fields, arrays = [], []
    for s in specs:
        fmeta = {b"description": s.description.encode()}
        if s.unit:
            fmeta[b"unit"] = s.unit.encode()
        fields.append(pa.field(s.name, pa.from_numpy_dtype(np.dtype(s.dtype)), metadata=fmeta))
        arrays.append(_arrow_array(np.asarray(columns[s.name]).astype(s.dtype, copy=False)))
    schema_meta = {} if meta is None else {_META_KEY: json.dumps(meta, default=str).encode()}
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=schema_meta))


def _arrow_array(values: np.ndarray) -> pa.Array:
    """A numeric numpy array as an Arrow array (no copy, no nulls; NaN stays NaN).

    Built from its buffer: ``pa.array`` would import pandas where it is installed (to test
    for categoricals), ~0.5-1 s at every worker's first part.
    """
    if values.dtype.kind not in "iuf" or values.ndim != 1:
        return pa.array(values)
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(
        pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)]
    )


#: Arrow types read back as numpy arrays from their buffers.
_NUMPY_TYPES = {
    pa.from_numpy_dtype(np.dtype(d)): np.dtype(d) for d in ("i4", "i8", "u4", "u8", "f4", "f8")
}


def numpy_column(col: pa.ChunkedArray) -> np.ndarray:
    """A numeric column without nulls as a numpy array, from its buffers.

    ``to_numpy`` would import pandas where it is installed (~0.8 s in the driver); other
    columns go through it.
    """
    dtype = _NUMPY_TYPES.get(col.type)
    if dtype is None or col.null_count:
        return col.to_numpy()
    parts = [
        np.frombuffer(c.buffers()[1], dtype, len(c), c.offset * dtype.itemsize) for c in col.chunks
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def sorted_by(table: pa.Table, key: str) -> pa.Table:
    """``table.sort_by(key)``, stable, by numpy for numeric columns without nulls.

    Saves importing ``pyarrow.compute`` (~0.1-0.3 s) in the driver; other tables go to Arrow.
    """
    if any(c.type not in _NUMPY_TYPES or c.null_count for c in table.columns):
        return table.sort_by(key)
    order = np.argsort(numpy_column(table.column(key)), kind="stable")
    cols = [_arrow_array(numpy_column(c)[order]) for c in table.columns]
    return pa.Table.from_arrays(cols, schema=table.schema)


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike,
                         storage_options: dict | None = None) -> None:  # fmt: skip
    """Write a Parquet file atomically (temporary file, then rename; on an object store one
    object, which appears whole or not at all).

    Parameters
    ----------
    table : pyarrow.Table
    path : path-like or str
        Destination: a local path or an fsspec URL.
    storage_options : dict, optional
        fsspec options of a URL (default: those of a ``UPath``, else the environment).
    """
    if is_url(path):
        fs, key = filesystem(str(path), storage_options or getattr(path, "storage_options", None))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        fs.pipe_file(key, sink.getvalue().to_pybytes())
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def catalog_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The catalog-level metadata (run configuration, bands, flags…) of a catalog file."""
    raw = (pq.read_schema(path).metadata or {}).get(_META_KEY)
    return {} if raw is None else json.loads(raw)


def read_catalog(path: str | os.PathLike):
    """Read a survey_engine catalog as an astropy QTable with units.

    Parameters
    ----------
    path : path-like
        ``catalog.parquet`` written by :func:`survey_engine.run` (or its output directory), or
        a survey run's output directory (:func:`survey_engine.run_survey`) or its ``catalog``
        dataset: every tract's part, in tract order, with a ``tract`` column. A local path or
        an fsspec URL (``s3://bucket/run``).

    Returns
    -------
    astropy.table.QTable
        Columns with units become Quantities; descriptions are kept;
        ``table.meta`` holds the catalog-level metadata.
    """
    if is_url(path):
        url = str(path)
        check_store(url, getattr(path, "storage_options", None), "catalog")
        fs, key = filesystem(url, getattr(path, "storage_options", None))
    else:
        import fsspec

        fs, key = fsspec.filesystem("file"), str(Path(path).absolute())
    key = key.rstrip("/")
    if not fs.exists(key):
        msg = f"catalog not found: {path}"
        raise FileNotFoundError(msg)
    if fs.isfile(key):
        return _read_file(fs, key)
    if fs.isfile(f"{key}/catalog.parquet"):
        return _read_file(fs, f"{key}/catalog.parquet")
    root = f"{key}/catalog" if fs.isdir(f"{key}/catalog") else key
    if not dataset_files(root, fs) and not fs.isfile(f"{root}/_common_metadata"):
        msg = f"no catalog in {path} (neither catalog.parquet nor a catalog/ dataset)"
        raise FileNotFoundError(msg)
    return _read_dataset(root, fs)


def _parquet(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def _meta_of(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(_META_KEY)
    return {} if raw is None else json.loads(raw)


def _read_file(fs, path: str):
    table = _parquet(fs, path)
    return _to_qtable(table, _meta_of(table.schema))


def dataset_files(root: str | os.PathLike, fs=None) -> list[str]:
    """The visible Parquet files of a catalog dataset: ``part-*.parquet`` or ``key=value/*.parquet``.

    Parameters
    ----------
    root : str or path-like
        The dataset directory (a path of ``fs``).
    fs : fsspec.AbstractFileSystem, optional
        Its file system (default: local).

    Returns
    -------
    list of str
        Paths of ``fs``, sorted; hidden (``.``/``_``) files and directories left out.
    """
    if fs is None:
        import fsspec

        fs, root = fsspec.filesystem("file"), str(Path(root).absolute())
    root = str(root).rstrip("/")
    out = []
    for f in fs.find(root):
        rel = f[len(root) + 1 :].split("/") if f.startswith(root + "/") else []
        visible = rel and not any(r.startswith((".", "_")) for r in rel)
        if visible and rel[-1].endswith(".parquet") and (len(rel) == 1 or (len(rel) == 2 and "=" in rel[0])):
            out.append(f)
    return sorted(out)


def _read_dataset(root: str, fs):
    """A catalog dataset: files partitioned by ``key=value`` directories (partitions in value
    order, a ``key`` column added) or plain ``part-*.parquet`` files; rows sorted by
    (partition, id), so the table is the same however the catalog was split into files."""

    def value(f: str):
        parent = f.rsplit("/", 2)[-2] if f.rsplit("/", 1)[0] != root else ""
        if not parent:
            return (0, 0, "")
        v = parent.split("=", 1)[1]
        return (0, int(v), "") if v.lstrip("-").isdigit() else (1, 0, v)

    files = sorted(dataset_files(root, fs), key=lambda f: (value(f), f))
    common = f"{root}/_common_metadata"
    if fs.isfile(common):
        with fs.open(common, "rb") as f:
            schema = pq.read_schema(f)
    else:
        schema = _parquet(fs, files[0]).schema
    nested = [f for f in files if f.rsplit("/", 1)[0] != root]
    partitioned = bool(nested) or not files
    key = nested[0].rsplit("/", 2)[-2].split("=", 1)[0] if nested else "tract"
    tables = []
    for f in files:
        t = _parquet(fs, f).replace_schema_metadata(None)
        if partitioned:
            t = t.append_column(key, pa.array(np.full(t.num_rows, value(f)[1], np.int64)))
        tables.append(t)
    if tables:
        table = pa.concat_tables(tables)
    else:
        table = schema.empty_table().append_column(key, pa.array(np.zeros(0, np.int64)))
    if len(files) > 1 and "id" in table.column_names:
        table = table.sort_by([(key, "ascending"), ("id", "ascending")] if partitioned else "id")
    # field metadata (units, descriptions) from the schema
    fields = [schema.field(f.name) if f.name in schema.names else f for f in table.schema]
    table = table.cast(pa.schema(fields))
    meta = _meta_of(schema)
    if partitioned:
        meta["partitioning"] = key
    return _to_qtable(table, meta)


def _to_qtable(table: pa.Table, meta: dict[str, Any]):
    import astropy.units as u
    from astropy.table import QTable

    out = QTable()
    for fld, col in zip(table.schema, table.columns, strict=True):
        data = col.to_numpy(zero_copy_only=False)
        fmeta = fld.metadata or {}
        unit = fmeta.get(b"unit")
        out[fld.name] = data * u.Unit(unit.decode(), parse_strict="silent") if unit else data
        out[fld.name].info.description = fmeta.get(b"description", b"").decode()
    out.meta.update(meta)
    return out
