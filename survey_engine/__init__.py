"""survey_engine: distributed source catalogs for LSST-scale survey mosaics, on Dask."""

from __future__ import annotations

from .catalog import read_catalog
from .config import ExecutionConfig, ScienceConfig
from .driver import RunError, RunResult, run
from .evaluate import EvaluationResult, evaluate
from .flags import MASK_BITS, MaskBit
from .ingest import ingest_fits
from .mosaic import Mosaic, MosaicRegion, create_mosaic, open_mosaic
from .simulate import read_truth, simulate  # GalSim itself is imported when drawing
from .survey import SurveyResult, run_survey

__version__ = "0.1.0"

__all__ = [
    "MASK_BITS",
    "EvaluationResult",
    "ExecutionConfig",
    "MaskBit",
    "Mosaic",
    "MosaicRegion",
    "RunError",
    "RunResult",
    "ScienceConfig",
    "SurveyResult",
    "__version__",
    "create_mosaic",
    "evaluate",
    "ingest_fits",
    "open_mosaic",
    "read_catalog",
    "read_truth",
    "run",
    "run_survey",
    "simulate",
]
