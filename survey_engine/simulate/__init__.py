"""GalSim simulator of LSST-like multi-band survey mosaics, drawn in parallel on Dask.

:func:`simulate` writes a mosaic store (image, variance, mask, noiseless truth segmentation) and
returns the truth table; :func:`make_scene` draws the population alone; :func:`read_truth` reads a
truth table; :func:`simulate_survey` draws one scene into the overlapping tract mosaics of a
sky map (``docs/survey.md``). Modules: ``_scene`` (population, truth tables), ``_bands`` (PSF, depth, noise),
``_cluster`` (crowded fields), ``_draw`` (stamps, blocks), ``_artefacts`` (``masks=True``), ``_survey`` (surveys); the
models: ``docs/simulation.md``.
"""

from __future__ import annotations

from ._bands import DEPTH_OFFSET, LSST_BANDS, SATURATION_MAG, SKY_MAG, ZERO_POINT
from ._cluster import KingCluster
from ._run import SimulationResult, simulate
from ._scene import TRUTH_COLUMNS, expected_counts, make_scene, make_wcs, read_truth, write_truth
from ._survey import SurveySimulation, simulate_survey

__all__ = [
    "DEPTH_OFFSET", "LSST_BANDS", "SATURATION_MAG", "SKY_MAG", "TRUTH_COLUMNS", "ZERO_POINT",
    "KingCluster", "SimulationResult", "SurveySimulation", "expected_counts", "make_scene", "make_wcs",
    "read_truth", "simulate", "simulate_survey", "write_truth",
]  # fmt: skip
