"""Truth tables on disk: Parquet with the units and descriptions in its metadata."""

from __future__ import annotations

import os

from astropy.table import QTable

__all__ = ["read_truth", "write_truth"]


def write_truth(table: QTable, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write a truth table to Parquet (astropy keeps units and table metadata in the file).

    Parameters
    ----------
    table : astropy.table.QTable
        Truth table from :func:`~survey_engine.simulate.make_scene` / ``simulate``.
    path : str or path-like
        Output ``.parquet`` file.
    overwrite : bool
        Replace an existing file.
    """
    out = table.copy(copy_data=False)
    out.meta["descriptions"] = {
        name: col.info.description for name, col in out.columns.items() if col.info.description
    }
    out.write(os.fspath(path), format="parquet", overwrite=overwrite)


def read_truth(path: str | os.PathLike) -> QTable:
    """Read a truth table written by ``simulate(truth=...)``.

    Parameters
    ----------
    path : str or path-like
        The Parquet file.

    Returns
    -------
    astropy.table.QTable
        With units (``pix``, ``deg``, ``ct``, ``mag``, ``arcsec``), column
        descriptions and the simulation metadata in ``meta``.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file is not a readable Parquet table (the message names it).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        msg = f"truth table not found: {path}"
        raise FileNotFoundError(msg)
    try:
        table = QTable.read(path, format="parquet")
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        msg = (
            f"truth table {path} is not a readable Parquet file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); convert it, e.g. "
            "astropy.table.Table.read(FILE).write('truth.parquet')"
        )
        raise ValueError(msg) from err
    for name, text in dict(table.meta.pop("descriptions", {})).items():
        if name in table.colnames:
            table[name].info.description = text
    return table
