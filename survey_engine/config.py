"""Defaults of a run in the Dask configuration (``survey_engine.*``, see ``survey_engine.yaml``).

Importing survey_engine registers the defaults shipped in ``survey_engine.yaml`` with
:func:`dask.config.update_defaults` (user YAML files, ``DASK_SURVEY_ENGINE__*`` environment
variables and :func:`dask.config.set` take precedence) and, following the Dask convention, puts a
commented copy in ``~/.config/dask/`` to edit. :func:`survey_engine.run` and ``survey-engine run``
take every parameter left unset (``None``) from here.
"""

from __future__ import annotations

import os
from typing import Any

import dask.config
import yaml

__all__ = ["CONFIG_FILE", "PIPELINE_KEYS", "get", "pipeline_defaults"]

#: The YAML file of the shipped defaults.
CONFIG_FILE = os.path.join(os.path.dirname(__file__), "survey_engine.yaml")

#: Keys that are fields of :class:`~survey_engine.pipeline.PipelineConfig` (or of its detection
#: parameters): applied only when no explicit ``config=`` is given to :func:`~survey_engine.run`.
PIPELINE_KEYS = (
    "deblender", "device", "backend", "measure_dtype", "thresh", "minarea", "deblend_nthresh", "deblend_cont",
    "detection_band", "background_box",
)  # fmt: skip

with open(CONFIG_FILE) as _f:
    DEFAULTS: dict[str, Any] = yaml.safe_load(_f)

dask.config.ensure_file(source=CONFIG_FILE)  # commented copy in ~/.config/dask; never fails
dask.config.update_defaults(DEFAULTS)


def get(key: str, value: Any = None) -> Any:
    """``value`` when it is not None, else the configured ``survey_engine.<key>``."""
    if value is not None:
        return value
    return dask.config.get(f"survey_engine.{key}", default=None)


def pipeline_defaults() -> dict[str, Any]:
    """The configured pipeline parameters (``PIPELINE_KEYS``) that are set (not null)."""
    out = {}
    for key in PIPELINE_KEYS:
        v = get(key)
        if v is not None:
            out[key] = v
    return out
