"""survey_engine: distributed source catalogs for LSST-scale survey mosaics, on Dask."""

from __future__ import annotations

from .catalog import read_catalog
from .engine import RunError, RunResult, run
from .flags import MASK_BITS, MaskBit
from .mosaic import Mosaic, MosaicRegion, create_mosaic, open_mosaic

__version__ = "0.1.0"

__all__ = [
    "MASK_BITS",
    "MaskBit",
    "Mosaic",
    "MosaicRegion",
    "RunError",
    "RunResult",
    "__version__",
    "create_mosaic",
    "open_mosaic",
    "read_catalog",
    "run",
]


def __getattr__(name):
    # Heavy optional parts are imported on first use.
    if name in ("simulate", "read_truth"):
        from . import simulate as _sim

        return getattr(_sim, name) if name == "read_truth" else _sim.simulate
    if name == "ingest_fits":
        from .ingest import ingest_fits

        return ingest_fits
    msg = f"module 'survey_engine' has no attribute {name!r}"
    raise AttributeError(msg)
