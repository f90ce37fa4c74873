"""GalSim simulator of LSST-like multi-band survey mosaics, drawn in parallel on Dask.

:func:`simulate` writes a mosaic store (see :mod:`survey_engine.mosaic`) with
image, variance and mask planes, a noiseless truth segmentation, and returns
the truth table of the objects drawn; :func:`make_scene` draws the object
population alone and :func:`read_truth` reads a truth table written to Parquet.

* Scene model (number counts, sizes, bulge + disk, colours, stars):
  :mod:`survey_engine.simulate._scene`.
* PSF, depth, noise, gain and saturation per band: :mod:`survey_engine.simulate._bands`.
* Stamps, block drawing, determinism and truth segmentation:
  :mod:`survey_engine.simulate._draw`.
* ``masks=True`` artefacts: :mod:`survey_engine.simulate._artefacts`.
"""

from __future__ import annotations

from ._bands import DEPTH_OFFSET, LSST_BANDS, SATURATION_MAG, SKY_MAG, ZERO_POINT
from ._run import SimulationResult, simulate
from ._scene import TRUTH_COLUMNS, expected_counts, make_scene, make_wcs
from ._truth import read_truth, write_truth

__all__ = [
    "DEPTH_OFFSET",
    "LSST_BANDS",
    "SATURATION_MAG",
    "SKY_MAG",
    "TRUTH_COLUMNS",
    "ZERO_POINT",
    "SimulationResult",
    "expected_counts",
    "make_scene",
    "make_wcs",
    "read_truth",
    "simulate",
    "write_truth",
]
