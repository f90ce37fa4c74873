"""Catalog export for LSST-scale use: HATS (HEALPix-partitioned Parquet) readable by LSDB.

:func:`export_hats` hands a survey_engine catalog to hats-import, which partitions it by HEALPix
pixel on the same Dask cluster the engine uses; ``lsdb.open_catalog(path)`` opens the result for
cross-matching and analysis at survey scale. Needs ``pip install "survey_engine[hats]"``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from .catalog import dataset_files
from .parallel import dask_client

__all__ = ["export_hats"]

logger = logging.getLogger(__name__)


def export_hats(
    catalog: str | os.PathLike, output_path: str | os.PathLike, *, name: str = "survey_engine",
    pixel_threshold: int = 1_000_000, highest_healpix_order: int = 10, workers: int | None = None,
    scheduler: str | None = None, client: Any | None = None, progress: bool = True,
) -> Path:  # fmt: skip
    """Write a catalog as a HATS catalog (hats-import) readable by LSDB.

    Parameters
    ----------
    catalog : path-like
        ``catalog.parquet`` of :func:`survey_engine.run` (needs ``ra``/``dec``: a mosaic WCS), or
        a catalog partitioned in ``key=value`` directories: a survey run's output directory
        (:func:`survey_engine.run_survey`) or its ``catalog`` dataset (the partition column,
        ``tract``, is not carried over).
    output_path, name
        The HATS catalog named ``name`` (str) is written to the directory ``output_path / name``.
    pixel_threshold, highest_healpix_order : int
        Largest number of rows in one HEALPix partition, and the finest order it may have.
    workers, scheduler, client, progress
        Cluster to run hats-import on (see :func:`survey_engine.parallel.dask_client`), and
        whether to show its progress bars.

    Returns
    -------
    pathlib.Path
        The HATS catalog directory.
    """
    try:
        from hats_import import ImportArguments, pipeline_with_client
    except ImportError as err:  # pragma: no cover - depends on the installed extras
        msg = 'HATS export needs hats-import: pip install "survey_engine[hats]"'
        raise ImportError(msg) from err
    catalog = Path(catalog)
    files = _input_files(catalog)
    for f in files:
        ra = pq.read_table(f, columns=["ra", "dec"]).column("ra").to_numpy(zero_copy_only=False)
        if len(ra) and not np.all(np.isfinite(ra)):
            msg = (
                f"catalog {f} has objects without ra/dec (the mosaic has no WCS?): "
                "HATS partitions by sky position"
            )
            raise ValueError(msg)
    out = Path(output_path)
    out.mkdir(parents=True, exist_ok=True)
    args = ImportArguments(
        input_file_list=[str(f) for f in files], file_reader="parquet", ra_column="ra", dec_column="dec",
        sort_columns="id", output_path=str(out), output_artifact_name=name,
        pixel_threshold=int(pixel_threshold), highest_healpix_order=int(highest_healpix_order),
        progress_bar=progress, tmp_dir=str(out / f".{name}-tmp"), resume=False,
    )  # fmt: skip
    with dask_client(workers=workers, scheduler=scheduler, client=client) as c:
        pipeline_with_client(args, c)
    logger.info("HATS catalog written to %s", out / name)
    return out / name


def _input_files(catalog: Path) -> list[Path]:
    """The Parquet files of a catalog: the file itself, or a dataset's files."""
    if catalog.is_file():
        return [catalog]
    if (catalog / "catalog.parquet").is_file():
        return [catalog / "catalog.parquet"]
    root = catalog / "catalog" if (catalog / "catalog").is_dir() else catalog
    files = [Path(f) for f in dataset_files(root)] if catalog.is_dir() else []
    if not files:
        msg = f"catalog not found: {catalog}"
        raise FileNotFoundError(msg)
    return files
