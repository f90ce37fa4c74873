"""The driver: resolves a run's configuration once, then lays out its stages on the cluster.

A run is five stages, each a stream of small tasks (:func:`survey_engine.parallel.map_tasks`)
of :mod:`survey_engine.tasks`; pixel arrays never travel through the scheduler:

1. **background** — mesh statistics of aligned blocks (again, sources masked) → a mesh per band;
2. **tiles** — each tile reads core + halo, runs the stage sequence, keeps the objects
   whose peak lies in its core and whose result is *safe*, and writes its part;
3. **retry** — every owned object that was not safe is measured again in a window grown
   around it until it is (doubling the margin, up to the whole mosaic);
4. **segmentation** — each chunk of the output segmentation map is written by exactly one
   task from the parts' core labels and footprints;
5. **catalog** — workers write it from the parts, each file's rows sorted by ID: one
   ``catalog.parquet``, or above ``survey_engine.catalog-partition-pixels`` a dataset
   ``catalog/part-*.parquet`` (:func:`catalog_partitions`).

``resume`` skips every part already written (:class:`~survey_engine.store.PartStore`), so a
crashed run continues where it stopped and a run with failed tiles retries only those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from . import config as _conf
from ._warnings import ignored
from .backends import BACKENDS
from .catalog import reference_band
from .classify.pipeline import run_stamp_zoom
from .config import ExecutionConfig, ScienceConfig
from .deblend import check_backend
from .kernels.background import filter_mesh
from .model_photometry import band_psfs
from .mosaic import Mosaic, open_mosaic
from .parallel import (
    GPUUnavailable,
    SchedulerUnreachable,
    TaskFailure,
    TaskResults,
    check_interrupt,
    cluster_workers,
    dask_client,
    interrupts_deferred,
    map_tasks,
    workers_with,
)
from .schema import ID_SCHEME, flag_descriptions
from .stages import WindowPlan, guard_band
from .store import PartStore, StoreError, retry_part
from .tasks import (
    TaskContext,
    background_block,
    catalog_partition,
    layout_for,
    process_tiles,
    resumed_retry_groups,
    retry,
    segmentation_chunk,
)
from .tiling import Box, TileGrid, make_tiles

__all__ = ["RunError", "RunInterrupted", "RunResult", "RunSettings", "resolve_run", "run"]

logger = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run that could not complete; ``failures`` names the tiles/objects that failed."""

    def __init__(self, message: str, failures: Sequence[TaskFailure] = ()):
        super().__init__(message)
        self.failures = list(failures)


@dataclass
class RunResult:
    """What a run produced."""

    outdir: Path
    catalog_path: Path
    segmentation_path: Path
    n_objects: int
    n_tiles: int
    n_retried: int
    timings: dict[str, float] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)
    pixels: int = 0
    gpu_memory: int | None = None
    backend: str = "numpy"
    device: str = "cpu"


@dataclass(frozen=True)
class RunSettings:
    """A run's configuration, resolved once (:func:`resolve_run`).

    Attributes
    ----------
    science, execution : ScienceConfig, ExecutionConfig
        The two parts of the parameters.
    grid : TileGrid
        The tiling.
    deblender : object
        The deblender strategy.
    guard : int
        Pixels between a footprint and a cut window edge for a result to be safe.
    stamp_zoom : float
        Classifier stamp pixels per mosaic pixel (:func:`~survey_engine.classify.pipeline.run_stamp_zoom`).
    """

    science: ScienceConfig
    execution: ExecutionConfig
    grid: TileGrid | None
    deblender: Any
    guard: int
    halo: int = 128
    origin: Any = 0
    stamp_zoom: float = 1.0

    def tiled(self, m: Mosaic, n_workers: int, previous: dict | None = None) -> RunSettings:
        """These settings with the grid fixed: an automatic tile needs the number of workers.

        Unless given, the tile is the largest of 2048, 1024, 512 that gives every worker at
        least two tiles (the catalog does not depend on it); a resumed run keeps its own.
        """
        if self.grid is not None:
            return self
        if previous and previous.get("halo") == self.halo:
            tile = tuple(previous["tile"])
        else:
            tile = next(t for t in AUTO_TILES if t == AUTO_TILES[-1]
                        or -(-m.ny // t) * -(-m.nx // t) >= 2 * n_workers)  # fmt: skip
        grid = make_tiles((m.ny, m.nx), tile, self.halo, origin=self.origin)
        return dataclasses.replace(self, grid=grid)

    def run_info(self, m: Mosaic) -> dict[str, Any]:
        """What identifies the run (``run.json``; a resumed run must match it)."""
        return {
            "mosaic": os.path.abspath(m.path) if "://" not in m.path else m.path,
            "shape": [m.ny, m.nx], "bands": list(m.bands), "tile": list(self.grid.tile),
            "halo": self.grid.halo, "origin": list(self.grid.origin),
            "science": self.science.to_dict(), "kernels": self.execution.kernel_settings(),
        }  # fmt: skip


_EXECUTION_FIELDS = {f.name for f in dataclasses.fields(ExecutionConfig)}
#: Tile sizes tried, largest first, when none is given (see :meth:`RunSettings.tiled`).
AUTO_TILES = (2048, 1024, 512)


def resolve_run(
    m: Mosaic, *, science: ScienceConfig | None = None, execution: ExecutionConfig | None = None,
    tile=None, halo=None, origin=None, deblender: str | None = None, gpu: bool = False,
    external_cluster: bool = False, **params: Any,
) -> RunSettings:  # fmt: skip
    """Resolve a run's parameters from its arguments and the Dask configuration, once.

    Explicit arguments win over the Dask configuration (``survey_engine.*``), which wins over
    the built-in defaults; a full ``science`` (or ``execution``) object replaces the
    configured values of its part. ``params`` are :class:`~survey_engine.config.ExecutionConfig`
    fields or science parameters by name. The torch backend implies the unet deblender unless
    ``deblender`` is given; ``gpu`` implies the torch backend on CUDA.

    Raises
    ------
    ValueError
        An invalid value or combination, naming the parameter.
    TypeError
        An unknown parameter.
    """
    science_names = ScienceConfig.parameter_names()
    if unknown := sorted(set(params) - _EXECUTION_FIELDS - science_names):
        msg = (
            f"unknown run parameter {unknown[0]!r}: neither an execution parameter "
            f"({', '.join(sorted(_EXECUTION_FIELDS))}) nor a science parameter "
            f"({', '.join(sorted(science_names))})"
        )
        raise TypeError(msg)
    ex_params = {k: params.pop(k) for k in list(params) if k in _EXECUTION_FIELDS}
    ex_params = {k: v for k, v in ex_params.items() if v is not None}
    if execution is None:
        skip = ("workers", "scheduler") if external_cluster else ()
        execution = ExecutionConfig(**_conf.configured(tuple(k for k in _conf.EXECUTION_KEYS if k not in skip)))
    sci = dict(_conf.configured(_conf.SCIENCE_KEYS)) if science is None else {}
    sci.update({k: v for k, v in params.items() if v is not None})
    if deblender is not None:
        sci["deblender"] = deblender
    elif ex_params.get("backend", execution.backend) == "torch" or gpu:
        sci["deblender"] = "unet"  # the torch backend's deblender
    if gpu:
        dev = ex_params.get("device") or "cuda"
        if str(dev).split(":")[0] != "cuda":
            msg = f"gpu=True runs on CUDA; got device={dev!r}"
            raise ValueError(msg)
        if ex_params.get("backend", "torch") != "torch":
            msg = f"gpu=True runs the torch backend; got backend={ex_params['backend']!r}"
            raise ValueError(msg)
        ex_params.update(device=dev, backend="torch", gpu=True,
                         resources=dict(ex_params.get("resources") or {}) or {"GPU": 1})  # fmt: skip
    execution = dataclasses.replace(execution, **ex_params)
    if execution.backend not in BACKENDS:
        msg = f"unknown backend {execution.backend!r}; available: {', '.join(map(repr, BACKENDS))}"
        raise ValueError(msg)
    science = (science or ScienceConfig()).with_params(**sci)
    strategy = check_backend(science.deblender, execution.backend).from_science(science)
    if science.classifier_model is not None:
        from .classify.model import check_model

        check_model(science.classifier_model)
    if science.detection_band is not None:
        m.band_index(science.detection_band)  # raises for an unknown band
    tile, halo, origin = _conf.get("tile", tile), _conf.get("halo", halo), _conf.get("origin", origin)
    grid = make_tiles((m.ny, m.nx), tile or AUTO_TILES[0], halo, origin=origin)  # checks them
    zoom = run_stamp_zoom(science, m.psf_fwhm_pix, m.bands)  # issue 17: the classifier's PSF sampling
    guard = guard_band(science, strategy, zoom)
    need = strategy.required_halo(guard)
    if grid.halo < need:
        msg = (
            f"halo must be ≥ {need} pixels for the {science.deblender} deblender (its "
            f"receptive radius + 1, {guard - science.detection.minarea} px, plus minarea and "
            f"a margin), got {grid.halo}"
        )
        raise ValueError(msg)
    return RunSettings(science, execution, grid if tile else None, strategy, guard, halo, origin, zoom)


def run(
    mosaic: str | os.PathLike | Mosaic,
    outdir: str | os.PathLike,
    *,
    tile: int | tuple[int, int] | None = None,
    halo: int | None = None,
    origin: int | tuple[int, int] | None = None,
    deblender: str | None = None,
    science: ScienceConfig | None = None,
    execution: ExecutionConfig | None = None,
    client: Any | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    gpu: bool = False,
    **params: Any,
) -> RunResult:
    """Produce the catalog and segmentation map of a mosaic on a Dask cluster.

    Parameters left as None come from the Dask configuration (``survey_engine.*``; shipped
    defaults in ``survey_engine/survey_engine.yaml``); explicit arguments win
    (:func:`resolve_run`).

    Parameters
    ----------
    mosaic : str, path or Mosaic
        The mosaic store.
    outdir : str or path
        Output directory: ``catalog.parquet``, ``segmentation.zarr``, ``run.json``, ``parts/``
        (per-tile results, kept for ``resume``).
    tile, halo, origin : int or (int, int)
        Tile core size (≥ 32; default: 2048, halved down to 512 until every worker has two
        tiles), halo read around each core (≥ 16; objects larger than it are measured whole in
        a larger window, so it affects speed only) and grid offset.
    deblender : str
        A name of :data:`survey_engine.deblend.DEBLENDERS` (``"sep"``, ``"unet"``).
    science, execution : ScienceConfig, ExecutionConfig, optional
        Full parameter sets replacing the configured ones (``params`` still override fields).
    client : distributed.Client, optional
        An existing client (else one for ``scheduler``, else a new local cluster).
    resume, overwrite : bool
        Continue the run in ``outdir`` (finished tiles skipped) / delete what it holds first.
    progress : bool
        Show progress bars.
    gpu : bool
        The ``torch`` backend on ``cuda`` with the ``unet`` deblender: on a
        ``dask_cuda.LocalCUDACluster``, or with ``scheduler``/``client`` on the workers that
        declare the Dask resource ``GPU``.
    **params
        Execution parameters (``backend``, ``device``, ``workers``, ``scheduler``,
        ``tile_batch``, ``unet_amp``, ``unet_batch_size``, ``measure_dtype``, ``resources``)
        and science parameters by name (``thresh``, ``minarea``, ``apertures``,
        ``detection_band``, ``background_box``, ``unet_model``, ``classifier_model`` …).

    Returns
    -------
    RunResult

    Raises
    ------
    RunError
        Tiles failed (named; finished parts are kept, ``resume=True`` retries only those),
        ``outdir`` holds another run or cannot be written, no cluster or GPU could be had,
        the scheduler was lost; :class:`RunInterrupted` on Ctrl-C.
    """
    t_start = time.perf_counter()
    if not isinstance(mosaic, Mosaic) and "://" not in str(mosaic):
        mosaic = os.path.abspath(mosaic)  # workers may run elsewhere
    m = mosaic if isinstance(mosaic, Mosaic) else open_mosaic(mosaic)
    external = client is not None or params.get("scheduler") is not None
    s = resolve_run(m, science=science, execution=execution, tile=tile, halo=halo, origin=origin,
                    deblender=deblender, gpu=gpu, external_cluster=external, **params)  # fmt: skip
    store = PartStore(outdir)  # local paths made absolute, URLs kept
    stopped: tuple[type, str] | None = None
    quiet = _QuietShutdown()
    with quiet, interrupts_deferred(), contextlib.ExitStack() as stack:
        c = _connect(stack, s.execution, client)
        s = s.tiled(m, len(cluster_workers(c)), store.previous_run() if resume else None)
        try:
            fresh = store.prepare(s.run_info(m), resume=resume, overwrite=overwrite)
        except StoreError as err:
            raise RunError(str(err)) from None
        timings: dict[str, float] = {}
        try:
            tiles, pending = _stages(c, m, s, store, progress, timings)
            cat_path, n = _catalog_stage(c, m, s, store, pending, progress, timings, out=store,
                                         names=("catalog",), single="catalog.parquet")  # fmt: skip
        except KeyboardInterrupt:
            stopped = (RunInterrupted, "interrupted")
        except Exception as err:
            if not _lost(c, err):
                if fresh and "background" not in timings:  # a failed start leaves OUTDIR as it was
                    store.discard()
                raise
            where = f" at {s.execution.scheduler}" if s.execution.scheduler else ""
            stopped = (RunError, f"lost the connection to the Dask scheduler{where}")
        if stopped:  # close the cluster without worker noise, then say where the run stands
            quiet.engage(c)
    if stopped:
        raise _stopped(store, s.grid, fresh, *stopped)
    seg_path = store.root / "segmentation.zarr"
    timings["total"] = time.perf_counter() - t_start
    logger.info("catalog %s: %d objects (%d retried)", cat_path, n, len(pending))
    return RunResult(
        store.root, cat_path, seg_path, n, len(s.grid), len(pending), timings,
        stages=tiles.stages, pixels=m.ny * m.nx, gpu_memory=tiles.gpu_memory,
        backend=s.execution.backend, device=s.execution.device,
    )  # fmt: skip


class RunInterrupted(RunError):
    """A run stopped by an interrupt (Ctrl-C); finished parts are kept for ``resume``."""


def _connect(stack: contextlib.ExitStack, ex: ExecutionConfig, client):
    """The run's Dask client (closed with ``stack``); RunError when none can be had."""
    local_gpu = ex.gpu and client is None and ex.scheduler is None and ex.cluster == "local"
    try:
        c = stack.enter_context(dask_client(workers=ex.workers, scheduler=ex.scheduler,
                                            client=client, gpu=local_gpu, cluster=ex.cluster,
                                            slurm_jobs=ex.slurm_jobs, slurm_config=ex.slurm_config))  # fmt: skip
    except (GPUUnavailable, SchedulerUnreachable) as err:
        raise RunError(str(err)) from None
    _check_resources(c, ex.resources, ex.scheduler)
    return c


def _stages(client, m: Mosaic, s: RunSettings, store: PartStore, progress: bool, timings: dict,
            tract=None):  # fmt: skip
    """Stages 1–4 on the cluster: background, tiles, retry, segmentation (seconds in ``timings``);
    ``tract``: a survey run's :class:`~survey_engine.skymap.TractRule` (None: a single mosaic)."""
    clock = _Clock(timings)
    plan = WindowPlan(s.science, s.execution, s.deblender, s.guard, Box(0, m.ny, 0, m.nx), tuple(m.bands),
                      psfs=band_psfs(m.attrs, m.bands, m.psf_fwhm_pix),  # issue 16: model fits
                      stamp_zoom=s.stamp_zoom, pixel_scale=m.pixel_scale)  # issue 17: classifier stamps
    plan = dataclasses.replace(plan, meshes=_background_stage(client, m, plan, store, progress))
    clock.lap("background")
    ctx = TaskContext(m.path, plan, store, s.grid, tract)
    tiles = _tile_stage(client, ctx, progress)
    clock.lap("tiles")
    pending, retried = _retry_stage(client, ctx, progress)
    clock.lap("retry")
    _raise_failures([*tiles.failures, *retried.failures], store)
    _segmentation_stage(client, m, s.grid, store, pending, store.root / "segmentation.zarr", progress)
    clock.lap("segmentation")
    return tiles, pending


def _lost(client, err: Exception) -> bool:
    """Whether ``err`` means the connection to the scheduler is gone."""
    from concurrent.futures import CancelledError

    from distributed.comm.core import CommClosedError

    closed = getattr(client, "status", "running") != "running"
    return closed or isinstance(err, (CommClosedError, ConnectionError, CancelledError))


def _stopped(store: PartStore, grid: TileGrid, fresh: bool, cls: type, what: str) -> RunError:
    """The error of a run that stopped early; a fresh run with no part written leaves nothing."""
    done = len(store.finished(t.name for t in grid))
    if fresh and done == 0:
        store.discard()
        return cls(f"{what}: no tile was finished; {store.root} is left as it was")
    return cls(
        f"{what} after {done} of {len(grid)} tiles: the finished parts are kept in {store.parts}; "
        "rerun with --resume (resume=True) to continue"
    )


def _silence() -> dict[str, int]:
    """Set distributed's and tornado's loggers to CRITICAL; their previous levels."""
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in ("distributed", "tornado")]
    levels = {n: logging.getLogger(n).level for n in {"distributed", "tornado", *names}}
    for n in levels:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    return levels


class _QuietShutdown:
    """Once engaged, distributed's logs are silenced (here and on the workers) until the block ends.

    A stopped run (interrupt, lost scheduler) closes its cluster with tasks still running:
    their cancellation is expected, not worth a warning per task.
    """

    def __init__(self):
        self.levels: dict[str, int] | None = None

    def engage(self, client) -> None:
        self.levels = _silence()
        if getattr(client, "status", None) == "running":
            with contextlib.suppress(Exception):
                client.run(_silence)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for n, level in (self.levels or {}).items():
            logging.getLogger(n).setLevel(level)


class _Clock:
    """Adds the seconds since the previous lap to ``timings[stage]``."""

    def __init__(self, timings: dict[str, float]):
        self.timings, self.t = timings, time.perf_counter()

    def lap(self, stage: str) -> None:
        check_interrupt()
        now = time.perf_counter()
        self.timings[stage] = now - self.t
        self.t = now


def _catalog_meta(s: RunSettings, m: Mosaic) -> dict[str, Any]:
    from importlib.metadata import version

    return {
        **s.run_info(m), "execution": s.execution.to_dict(),
        "software": f"survey_engine {version('survey_engine')}", "reference_band": reference_band(m.bands, s.science.detection_band),
        "zero_points": m.zero_points, "flags": flag_descriptions(), "id": ID_SCHEME,
    }  # fmt: skip


def _check_resources(client, resources: Mapping[str, float], scheduler: str | None) -> None:
    for name in resources:
        if not workers_with(client, name):
            where = f"the cluster at {scheduler}" if scheduler else "the cluster"
            msg = (
                f"no worker of {where} declares the Dask resource {name!r} that the tile tasks "
                f"need; start GPU workers with `dask worker <scheduler> --resources {name}=1` "
                f"(or `dask cuda worker <scheduler> --resources {name}=1`)"
            )
            raise RunError(msg)


def _background_stage(client, m: Mosaic, plan: WindowPlan, store: PartStore, progress: bool):
    """Stage 1: the mesh statistics of aligned blocks, assembled and filtered per band; with
    ``background_mask_thresh`` again, less the sources over the first pass's background."""
    sci, box = plan.science, plan.science.background_box
    saved = store.load_background()

    def filtered(levels, rmss):
        return [filter_mesh(levels[b], rmss[b], box, (m.ny, m.nx), filter_size=sci.background_filter)
                for b in range(len(m.bands))]  # fmt: skip

    passes = () if saved is not None else (False, True) if sci.background_mask_thresh else (False,)
    step = box * max(1, 1024 // box)
    blocks = [Box(y, min(y + step, m.ny), x, min(x + step, m.nx))
              for y in range(0, m.ny, step) for x in range(0, m.nx, step)]  # fmt: skip
    for masked in passes:
        levels = np.full((len(m.bands), -(-m.ny // box), -(-m.nx // box)), np.nan)
        rmss = levels.copy()
        res = map_tasks(client, background_block, blocks, desc="background" + "-masked" * masked,
                        progress=progress, mosaic_path=m.path, plan=plan, mask_sources=masked,
                        retries=1)  # fmt: skip
        if res.failures:
            msg = f"background failed for {len(res.failures)} block(s): {res.failures[0].error}"
            raise RunError(msg, res.failures)
        for bbox, per_band in res.results.values():
            cy0, cx0 = bbox.y0 // box, bbox.x0 // box
            for b, (lvl, rms) in enumerate(per_band):
                levels[b, cy0 : cy0 + lvl.shape[0], cx0 : cx0 + lvl.shape[1]] = lvl
                rmss[b, cy0 : cy0 + lvl.shape[0], cx0 : cx0 + lvl.shape[1]] = rms
        saved = levels, rmss
        plan = dataclasses.replace(plan, meshes=filtered(*saved))  # for the masked pass
    if passes:
        store.save_background(*saved)
    return filtered(*saved)


@dataclass
class TileStage:
    """What the tile stage reports: failures, seconds per pipeline stage, peak GPU memory;
    it records the finished tiles in the run's manifest as their reports arrive
    (:meth:`~survey_engine.store.PartStore.record`, every ``RECORD_EVERY`` tiles)."""

    store: PartStore
    failures: list[TaskFailure] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    gpu_memory: int | None = None
    unrecorded: dict[str, dict] = field(default_factory=dict)

    RECORD_EVERY = 256

    def add(self, report: dict[str, Any]) -> None:
        """Fold in one task's report (:func:`~survey_engine.tasks.process_tiles`)."""
        self.failures += [TaskFailure(name, err) for name, err in report["failed"].items()]
        for k, v in report.get("times", {}).items():
            self.stages[k] = self.stages.get(k, 0.0) + v
        if mem := report.get("gpu_memory"):
            self.gpu_memory = max(self.gpu_memory or 0, mem)
        self.unrecorded.update({name: {"pending": t["pending"], "boxes": t["boxes"]}
                                for name, t in report["tiles"].items()})  # fmt: skip
        if len(self.unrecorded) >= self.RECORD_EVERY:
            self.record()

    def record(self) -> None:
        """Write the tiles finished since the last record to the manifest."""
        self.store.record(self.unrecorded)
        self.unrecorded = {}


def _tile_stage(client, ctx: TaskContext, progress: bool) -> TileStage:
    """Stage 2: the unfinished tiles in tasks of one or several tiles (equal read shapes together).

    The tasks' reports are folded in as they arrive (none is kept), so the driver's memory
    does not grow with the number of tiles beyond the grid itself.
    """
    grid, ex = ctx.grid, ctx.plan.execution
    done = ctx.store.finished(t.name for t in grid)
    todo = [t for t in grid if t.name not in done]
    logger.info("%d tiles, %d to process", len(grid), len(todo))
    per_task = 1
    if todo:
        per_task = BACKENDS[ex.backend].tiles_per_task(client, todo[0].read.shape, len(ctx.plan.bands), ex)
    ordered = sorted(todo, key=lambda t: (t.read.shape, t.index)) if per_task > 1 else todo
    batches = [ordered[i : i + per_task] for i in range(0, len(ordered), per_task)]
    keys = [f"{b[0].name}+{len(b) - 1}" if len(b) > 1 else b[0].name for b in batches]
    out = TileStage(ctx.store)
    if unrecorded := done - set(ctx.store.manifest() or ()):  # written, not recorded: the
        ctx.store.record(ctx.store.entries_of(unrecorded))  # driver stopped first
    try:
        res = map_tasks(client, process_tiles, batches, keys=keys, desc="tiles", progress=progress,
                        resources=ex.resources or None, ctx=ctx, keep_results=False,
                        on_result=lambda _, report: out.add(report))  # fmt: skip
    finally:  # also when interrupted: what finished is recorded
        out.record()
    by_key = dict(zip(keys, batches, strict=True))
    for f in res.failures:  # the whole task died: name its tiles
        names = ", ".join(t.name for t in by_key[f.key])
        out.failures.append(TaskFailure(f.key, f"tiles {names}: {f.error}" if len(by_key[f.key]) > 1 else f.error))
    return out


def _retry_stage(client, ctx: TaskContext, progress: bool) -> tuple[list[dict], TaskResults]:
    """Stage 3: the tiles' retry items, grouped where their boxes overlap; groups not written yet."""
    items = ctx.store.pending(t.name for t in ctx.grid)
    written = ctx.store.written_retry_groups()
    pending = resumed_retry_groups(items, written, max_pixels=4 * max(t.read.size for t in ctx.grid))
    done = ctx.store.finished_retries(p["key"] for p in pending)
    todo = [p for p in pending if p["key"] not in done]
    res = map_tasks(client, retry, todo, keys=[p["key"] for p in todo], desc="retry",
                    progress=progress, ctx=ctx, resources=ctx.plan.execution.resources or None)  # fmt: skip
    return pending, res


def _raise_failures(failures: list[TaskFailure], store: PartStore) -> None:
    if not failures:
        return
    names = ", ".join(str(f.key) for f in failures[:10])
    more = f" and {len(failures) - 10} more" if len(failures) > 10 else ""
    msg = (
        f"{len(failures)} task(s) failed: {names}{more}; first error: {failures[0].error}. "
        f"Finished parts are kept in {store.parts}: rerun with resume=True (--resume) to retry "
        "only the failures."
    )
    raise RunError(msg, failures)


def _segmentation_stage(client, m: Mosaic, grid: TileGrid, store: PartStore, pending, seg_path: Path,
                        progress: bool) -> None:  # fmt: skip
    """Stage 4: each chunk of the map written by one task from the core labels and footprints."""
    cy, cx = m.chunks[1], m.chunks[2]
    group = zarr.open_group(str(seg_path), mode="w", zarr_format=3)
    group.attrs.update({"wcs": m.wcs_cards, "description": "object ID per pixel (0 = none)"})
    group.create_array(
        "segmentation", shape=(m.ny, m.nx), chunks=(cy, cx), dtype=np.int64, fill_value=0,
        dimension_names=("y", "x"), attributes={"description": "catalog id of the object owning the pixel"},
    )  # fmt: skip
    # Footprints that leave their owner's core, and every retried object's footprint.
    boxes = store.footprint_boxes([t.name for t in grid] + [retry_part(p["key"]) for p in pending])
    items = []
    for y in range(0, m.ny, cy):
        for x in range(0, m.nx, cx):
            ch = Box(y, min(y + cy, m.ny), x, min(x + cx, m.nx))
            tiles = [(t.name, (t.core.y0, t.core.y1, t.core.x0, t.core.x1)) for t in grid.overlapping(ch)]
            fps = [name for name, b in boxes.items()
                   if np.any((b[:, 0] < ch.y1) & (b[:, 1] > ch.y0) & (b[:, 2] < ch.x1) & (b[:, 3] > ch.x0))]  # fmt: skip
            items.append((ch, tiles, fps))
    res = map_tasks(client, segmentation_chunk, items, desc="segmentation", progress=progress,
                    store=store, seg_path=str(seg_path), retries=1)  # fmt: skip
    if res.failures:
        msg = f"writing the segmentation map failed for {len(res.failures)} chunk(s): {res.failures[0].error}"
        raise RunError(msg, res.failures)
    with ignored():  # consolidated metadata is a zarr-python extension to v3
        zarr.consolidate_metadata(str(seg_path))


def catalog_partitions(grid: TileGrid, pending: Sequence[dict], max_pixels: int) -> list[list[str]]:
    """The parts that make each file of the catalog.

    One file unless the tiles cover more than ``max_pixels``; then one file per run of
    consecutive tiles covering at most that many, and one for the retried objects (the only
    parts that can repeat an object: it is kept once within that file). Objects of different
    tiles are distinct, so the files never share an object.
    """
    tiles = [t.name for t in grid]
    retries = [retry_part(p["key"]) for p in pending]
    tile_pixels = grid.tile[0] * grid.tile[1]
    if len(tiles) * tile_pixels <= max_pixels:
        return [tiles + retries]
    per = max(1, max_pixels // tile_pixels)
    return [tiles[i : i + per] for i in range(0, len(tiles), per)] + ([retries] if retries else [])


def _catalog_stage(client, m: Mosaic, s: RunSettings, store: PartStore, pending, progress: bool,
                   timings: dict, *, out, names: tuple[str, ...], single: str | None = None,
                   tract=None, meta: dict | None = None) -> tuple[Any, int]:  # fmt: skip
    """Stage 5: workers write the catalog from the parts (the driver never holds it).

    Into the file ``single`` (a name under ``out``'s root) when the catalog is one partition
    and ``single`` is given; else a dataset ``names/part-NNNNN.parquet`` with
    ``_common_metadata``, published whole (:meth:`~survey_engine.store.PartStore.publish_dataset`),
    replacing an earlier one. ``out`` is the store holding the catalog (the run's, or a survey's).

    Returns
    -------
    (Path or UPath, int)
        Where the catalog is, and its rows.
    """
    clock = _Clock(timings)
    meta = _catalog_meta(s, m) if meta is None else meta
    max_pixels = int(_conf.get("catalog-partition-pixels") or 2**28)
    parts = catalog_partitions(s.grid, pending, max_pixels)
    if single is not None and len(parts) == 1:
        out.remove(*names)  # an earlier run's dataset
        staged, paths = None, [out.path_of(single)]
    else:
        staged = out.stage_dataset(*names)
        paths = [f"{staged}/part-{k:05d}.parquet" for k in range(len(parts))]
    res = map_tasks(client, catalog_partition, list(zip(parts, paths, strict=True)),
                    desc="catalog", progress=progress and len(parts) > 1, store=store,
                    mosaic_path=m.path, science=s.science, tract=tract, meta=meta, retries=1)  # fmt: skip
    if res.failures:
        err = res.failures[0].error.removeprefix("RepeatedObjects: ")
        raise RunError(f"writing the catalog failed for {len(res.failures)} partition(s): {err}", res.failures)
    if staged is None:
        target = out.root / single
    else:
        out.publish_dataset(staged, *names, schema=layout_for(m, s.science, tract).table(meta=meta).schema)
        if single is not None:
            out.remove(single)
        target = out.root.joinpath(*names)
    clock.lap("catalog")
    return target, sum(res.results.values())
