"""Star/galaxy classification and bulge + disk morphology of catalog objects (a stamp CNN).

``classify_stamps`` is the pure kernel; ``classify_windows`` adds the catalog columns
``p_star``, ``bulge_fraction``, ``r_bulge_arcsec``, ``r_disk_arcsec`` and ``ellipticity`` to a
window's measurements (called once by :func:`survey_engine.stages.analyse_windows`). torch is
imported only when the network is used.
"""

from .stamps import STAMP_HALF, STAMP_SIZE, extract_stamps

__all__ = ["OUTPUT_COLUMNS", "STAMP_HALF", "STAMP_SIZE", "StampNet", "classify_stamps",
           "default_model", "extract_stamps", "load_model", "save_model"]  # fmt: skip

_LAZY = {"OUTPUT_COLUMNS", "StampNet", "classify_stamps", "default_model", "load_model", "save_model"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import model

        return getattr(model, name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
