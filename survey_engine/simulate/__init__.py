"""GalSim simulator of LSST-like multi-band survey mosaics, drawn in parallel on Dask.

:func:`simulate` writes a mosaic store (image, variance, mask, noiseless truth segmentation) and
returns the truth table; :func:`make_scene` draws the population alone; :func:`read_truth` reads a
truth table. Modules: ``_scene`` (population, truth tables), ``_bands`` (PSF, depth, noise),
``_cluster`` (crowded fields), ``_draw`` (stamps, blocks), ``_artefacts`` (``masks=True``); the
models: ``docs/simulation.md``.
"""

from __future__ import annotations

from ._bands import DEPTH_OFFSET, LSST_BANDS, SATURATION_MAG, SKY_MAG, ZERO_POINT
from ._cluster import KingCluster
from ._run import SimulationResult, simulate
from ._scene import TRUTH_COLUMNS, expected_counts, make_scene, make_wcs, read_truth, write_truth

__all__ = [
    "DEPTH_OFFSET", "LSST_BANDS", "SATURATION_MAG", "SKY_MAG", "TRUTH_COLUMNS", "ZERO_POINT",
    "KingCluster", "SimulationResult", "expected_counts", "make_scene", "make_wcs", "read_truth", "simulate",
    "write_truth",
]  # fmt: skip
