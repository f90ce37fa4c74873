"""survey_engine: distributed source catalogs for LSST-scale survey mosaics, on Dask."""

from __future__ import annotations

from .flags import MASK_BITS, MaskBit
from .mosaic import Mosaic, MosaicRegion, create_mosaic, open_mosaic

__version__ = "0.1.0"

__all__ = [
    "MASK_BITS",
    "MaskBit",
    "Mosaic",
    "MosaicRegion",
    "__version__",
    "create_mosaic",
    "open_mosaic",
]
