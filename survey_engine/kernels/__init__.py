"""Pure kernels: numpy/sep in, arrays out. No Dask, no I/O."""

from .background import BackgroundMesh, filter_mesh, interpolate_background, mesh_statistics
from .detect import DetectionConfig, DetectionResult, detect_sources, detection_image
from .measure import MeasureConfig, measure_sources

__all__ = [
    "BackgroundMesh", "DetectionConfig", "DetectionResult", "MeasureConfig", "detect_sources",
    "detection_image", "filter_mesh", "interpolate_background", "measure_sources",
    "mesh_statistics",
]  # fmt: skip
