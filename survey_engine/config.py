"""Run parameters in two parts — science (decides the objects) and execution (how they are computed).

Both are stored with every catalog (``read_catalog(p).meta["science"]`` and ``["execution"]``);
only :meth:`ExecutionConfig.kernel_settings` among the latter can change a catalog's last bits.
Defaults come from the Dask configuration under ``survey_engine`` (``survey_engine.yaml``,
registered here); how the two parts and the defaults combine: ``docs/architecture.md``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import dask.config
import yaml

from .kernels.detect import DetectionConfig
from .kernels.measure import MeasureConfig

__all__ = ["CONFIG_FILE", "EXECUTION_KEYS", "SCIENCE_KEYS", "ExecutionConfig", "ScienceConfig",
           "configured", "get"]  # fmt: skip

#: The YAML file of the shipped defaults.
CONFIG_FILE = os.path.join(os.path.dirname(__file__), "survey_engine.yaml")

#: Dask-config keys of science parameters (fields of ScienceConfig or of its parts); applied
#: only when no explicit ``science=`` is given to a run.
SCIENCE_KEYS = ("deblender", "thresh", "minarea", "deblend_nthresh", "deblend_cont",
                "detection_band", "background_box", "background_mask_thresh",
                "background_mask_dilate")  # fmt: skip
#: Dask-config keys of execution parameters (fields of ExecutionConfig).
EXECUTION_KEYS = ("backend", "device", "measure_dtype", "tile_batch", "workers", "scheduler")

with open(CONFIG_FILE) as _f:
    DEFAULTS: dict[str, Any] = yaml.safe_load(_f)

dask.config.ensure_file(source=CONFIG_FILE)  # commented copy in ~/.config/dask; never fails
dask.config.update_defaults(DEFAULTS)


def get(key: str, value: Any = None) -> Any:
    """``value`` when it is not None, else the configured ``survey_engine.<key>``."""
    return value if value is not None else dask.config.get(f"survey_engine.{key}", default=None)


def configured(keys: tuple[str, ...]) -> dict[str, Any]:
    """The Dask-config values of ``keys`` that are set (not null)."""
    return {k: v for k in keys if (v := get(k)) is not None}


def _names(obj, parts: tuple[str, ...]) -> tuple[set[str], dict[str, set[str]]]:
    top = {f.name for f in dataclasses.fields(obj)}
    return top - set(parts), {p: {f.name for f in dataclasses.fields(getattr(obj, p))} for p in parts}


def _nested_replace(obj, params: dict[str, Any], parts: tuple[str, ...], what: str):
    """``obj`` with ``params`` replaced: top-level fields, or fields of its dataclass ``parts``."""
    top, sub = _names(obj, parts)
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {p: {} for p in parts}
    for k, v in params.items():
        if k in top:
            changes[k] = v
        elif owner := next((p for p in parts if k in sub[p]), None):
            nested[owner][k] = v
        else:
            known = sorted(top | set().union(*sub.values()))
            msg = f"unknown {what} parameter {k!r}; known: {', '.join(known)}"
            raise TypeError(msg)
    changes |= {p: dataclasses.replace(getattr(obj, p), **kv) for p, kv in nested.items() if kv}
    return dataclasses.replace(obj, **changes)


@dataclass(frozen=True)
class ScienceConfig:
    """The parameters that decide the objects of a catalog (stored with every catalog).

    Attributes
    ----------
    detection, measure : DetectionConfig, MeasureConfig
        Detection threshold, minimum area and sep's deblending parameters; apertures, Kron and
        windowed-centroid parameters.
    detection_band : str or None
        Detect on this band alone; None combines all bands (``combine``).
    combine : {"ivar", "chi2"}
        How bands are combined into the detection image.
    background_box, background_filter : int
        Background mesh cell (pixels, anchored at mosaic origin) and median filter (cells) sizes.
    background_mask_thresh, background_mask_dilate : float or None, int
        A second background pass leaves out pixels within ``dilate`` px of sources above
        ``thresh`` σ over the first one (detection filter, ``minarea``); None or 0: one pass.
    deblender : str
        A name of :data:`survey_engine.deblend.DEBLENDERS`: ``sep`` (window-independent
        multi-threshold deblending) or ``unet`` (the U-Net of :mod:`survey_engine.unet`).
    unet_model : str or None
        Checkpoint of the ``unet`` deblender; None: the model shipped with the package.
    classifier_model : str or None
        Checkpoint of the stamp classifier (``p_star`` and morphology columns), e.g. one
        fine-tuned for another survey (``survey-engine train-classifier --init default``);
        None: the model shipped with the package.
    """

    detection: DetectionConfig = field(default_factory=DetectionConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    detection_band: str | None = None
    combine: str = "ivar"
    background_box: int = 128
    background_filter: int = 3
    background_mask_thresh: float | None = None
    background_mask_dilate: int = 4
    deblender: str = "sep"
    unet_model: str | None = None
    classifier_model: str | None = None

    def __post_init__(self):
        if self.combine not in ("ivar", "chi2"):
            msg = f"combine must be 'ivar' or 'chi2', got {self.combine!r}"
            raise ValueError(msg)
        if int(self.background_box) != self.background_box or self.background_box < 8:
            msg = f"background_box must be an integer ≥ 8 pixels, got {self.background_box!r}"
            raise ValueError(msg)
        t, d = self.background_mask_thresh, self.background_mask_dilate
        if t is not None and (isinstance(t, bool) or not 0 <= t < float("inf")):  # NaN too
            msg = f"background_mask_thresh must be None, 0 (off) or a positive number of sigma, got {t!r}"
            raise ValueError(msg)
        if isinstance(d, bool) or int(d) != d or d < 0:
            msg = f"background_mask_dilate must be an integer ≥ 0 pixels, got {d!r}"
            raise ValueError(msg)
        object.__setattr__(self, "background_mask_thresh", float(t) if t else None)  # 0: None
        object.__setattr__(self, "background_mask_dilate", int(d))

    def with_params(self, **params: Any) -> ScienceConfig:
        """A copy with fields replaced by name: ``thresh=2`` sets ``detection.thresh``.

        Raises
        ------
        TypeError
            For a name that is no field of this class, of ``detection`` or of ``measure``.
        """
        return _nested_replace(self, params, ("detection", "measure"), "science")

    @classmethod
    def parameter_names(cls) -> set[str]:
        """Every name :meth:`with_params` accepts."""
        top, sub = _names(cls(), ("detection", "measure"))
        return top | set().union(*sub.values())

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ScienceConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        det = dict(d.pop("detection", {}))
        if det.get("filter_kernel") is not None:
            det["filter_kernel"] = tuple(tuple(r) for r in det["filter_kernel"])
        mea = dict(d.pop("measure", {}))
        if "apertures" in mea:
            mea["apertures"] = tuple(mea["apertures"])
        return cls(detection=DetectionConfig(**det), measure=MeasureConfig(**mea), **d)


@dataclass(frozen=True)
class ExecutionConfig:
    """How a run is computed: kernels, device, batches and cluster (not what it finds).

    Attributes
    ----------
    backend : {"numpy", "torch"}
        Array library of the per-window stages (:data:`survey_engine.backends.BACKENDS`):
        ``numpy`` (sep/scipy, window by window) or ``torch`` (on ``device``, batched over tiles).
    device : str
        ``"cpu"`` or ``"cuda"`` (``"cuda:N"``): where torch work (U-Net, torch backend) runs.
    unet_batch_size : int or None
        Patches per U-Net forward pass (None: 1 on CPU, where it is fastest, 32 on CUDA).
    unet_amp : bool or None
        bfloat16 autocast of the U-Net; None: on for CUDA, off on CPU. ``False`` on CUDA runs
        the network in float32 with TF32 off (maps within float32 rounding of the CPU ones).
    measure_dtype : {"float64", "float32"}
        Torch backend: precision of the measurement sums (float32 is faster on GPUs:
        positions within 3e-6 px, fluxes within 6e-7 relative of float64, measured on CPU).
    tile_batch : int or None
        Tiles per task (None: 1 for numpy; for torch 2 on CPU, from free GPU memory on CUDA).
    workers, scheduler, gpu : int or None, str or None, bool
        The cluster (:func:`~survey_engine.parallel.dask_client`): an existing scheduler's address,
        else a LocalCluster of ``workers`` processes (None: one per core) or, with ``gpu``, a
        ``dask_cuda.LocalCUDACluster`` (None: one worker per GPU).
    resources : dict
        Dask resources every tile task needs (``gpu`` implies ``{"GPU": 1}``).
    cluster : {"local", "slurm"}
        Without ``scheduler``: a LocalCluster, or a ``dask_jobqueue.SLURMCluster`` of
        ``slurm_jobs`` worker jobs (None: 1) configured by the Dask config ``jobqueue.slurm.*``
        and the YAML file ``slurm_config`` (:func:`survey_engine.slurm.slurm_cluster`).
    """

    backend: str = "numpy"
    device: str = "cpu"
    unet_batch_size: int | None = None
    unet_amp: bool | None = None
    measure_dtype: str = "float64"
    tile_batch: int | None = None
    workers: int | None = None
    scheduler: str | None = None
    gpu: bool = False
    resources: dict[str, float] = field(default_factory=dict)
    cluster: str = "local"
    slurm_jobs: int | None = None
    slurm_config: str | None = None

    def __post_init__(self):
        if str(self.device).split(":")[0] not in ("cpu", "cuda"):
            msg = f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {self.device!r}"
            raise ValueError(msg)
        if self.measure_dtype not in ("float64", "float32"):
            msg = f"measure_dtype must be 'float64' or 'float32', got {self.measure_dtype!r}"
            raise ValueError(msg)
        if self.cluster not in ("local", "slurm"):
            msg = f"cluster must be 'local' or 'slurm', got {self.cluster!r}"
            raise ValueError(msg)
        if self.cluster == "slurm" and self.scheduler is not None:
            msg = f"cluster='slurm' (--slurm) starts its own scheduler; got scheduler={self.scheduler!r} too"
            raise ValueError(msg)
        for name in ("tile_batch", "unet_batch_size", "workers", "slurm_jobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
                msg = f"{name} must be a positive integer, got {v!r}"
                raise ValueError(msg)

    @property
    def on_cuda(self) -> bool:
        """Whether torch work runs on a CUDA device."""
        return str(self.device).startswith("cuda")

    @property
    def network_batch(self) -> int:
        """Patches per U-Net forward pass (:attr:`unet_batch_size`, else 1 on CPU, 32 on CUDA)."""
        return int(self.unet_batch_size or (32 if self.on_cuda else 1))

    def kernel_settings(self) -> dict[str, Any]:
        """The settings that can change a catalog's bits (a resumed run must keep them)."""
        keys = ("backend", "device", "unet_batch_size", "unet_amp", "measure_dtype")
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return asdict(self)
