"""Catalog I/O: Parquet with units and descriptions in the metadata; astropy QTable out."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import ColumnSpec

__all__ = ["catalog_metadata", "read_catalog", "to_arrow", "write_parquet_atomic"]

_META_KEY = b"survey_engine"


def to_arrow(
    columns: Mapping[str, np.ndarray],
    specs: list[ColumnSpec],
    meta: Mapping[str, Any] | None = None,
) -> pa.Table:
    """Build an Arrow table in schema order, with units and descriptions as field metadata.

    Parameters
    ----------
    columns : mapping of str to numpy.ndarray
        One array per column named in ``specs`` (extra keys are an error).
    specs : list of ColumnSpec
        The schema.
    meta : mapping, optional
        Catalog-level metadata (JSON-serialisable), stored under ``survey_engine``.

    Returns
    -------
    pyarrow.Table
    """
    names = [s.name for s in specs]
    extra = set(columns) - set(names)
    missing = set(names) - set(columns)
    if extra or missing:
        msg = f"catalog columns do not match the schema: missing {sorted(missing)}, extra {sorted(extra)}"
        raise ValueError(msg)
    fields, arrays = [], []
    for s in specs:
        fmeta = {b"description": s.description.encode()}
        if s.unit:
            fmeta[b"unit"] = s.unit.encode()
        fields.append(pa.field(s.name, pa.from_numpy_dtype(np.dtype(s.dtype)), metadata=fmeta))
        arrays.append(pa.array(np.asarray(columns[s.name]).astype(s.dtype, copy=False)))
    schema_meta = {} if meta is None else {_META_KEY: json.dumps(meta, default=str).encode()}
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=schema_meta))


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a Parquet file atomically (temporary file, then rename).

    Parameters
    ----------
    table : pyarrow.Table
        What to write.
    path : path-like
        Destination.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def catalog_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The catalog-level metadata (run configuration, bands, flags…) of a catalog file."""
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(_META_KEY)
    return {} if raw is None else json.loads(raw)


def read_catalog(path: str | os.PathLike):
    """Read a survey_engine catalog as an astropy QTable with units.

    Parameters
    ----------
    path : path-like
        ``catalog.parquet`` written by :func:`survey_engine.run`.

    Returns
    -------
    astropy.table.QTable
        Columns with units become Quantities; descriptions are kept;
        ``table.meta`` holds the catalog-level metadata.
    """
    import astropy.units as u
    from astropy.table import QTable

    path = Path(path)
    if not path.exists():
        msg = f"catalog not found: {path}"
        raise FileNotFoundError(msg)
    table = pq.read_table(path)
    out = QTable()
    for fld, col in zip(table.schema, table.columns, strict=True):
        data = col.to_numpy(zero_copy_only=False)
        fmeta = fld.metadata or {}
        unit = fmeta.get(b"unit")
        desc = fmeta.get(b"description", b"").decode()
        if unit:
            q = data * u.Unit(unit.decode(), parse_strict="silent")
            out[fld.name] = q
            out[fld.name].info.description = desc
        else:
            out[fld.name] = data
            out[fld.name].info.description = desc
    out.meta.update(catalog_metadata(path))
    return out
