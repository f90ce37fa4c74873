"""The survey driver: every tract of a survey through the engine on one Dask cluster.

:func:`run_survey` runs the stages of :mod:`survey_engine.driver` on each tract's mosaic into
its own run directory, with the tract's ownership rule and global ids
(:class:`~survey_engine.skymap.TractRule`): an object is kept by exactly one tract — the one
whose inner region holds its peak's sky position — and within it by the tile rule. Each
tract's catalog is written by a worker into a Parquet dataset partitioned by tract
(``OUTDIR/catalog/tract=<id>/part-0.parquet``, :class:`~survey_engine.store.SurveyStore`), so
the driver never holds the catalog. See ``docs/survey.md``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import config as _conf
from .config import ExecutionConfig, ScienceConfig
from .driver import (
    RunError,
    RunInterrupted,
    RunSettings,
    _catalog_meta,
    _catalog_stage,
    _connect,
    _lost,
    _QuietShutdown,
    _stages,
    resolve_run,
)
from .mosaic import Mosaic, open_mosaic
from .parallel import check_interrupt, cluster_workers, interrupts_deferred, request_interrupt
from .skymap import GLOBAL_ID_SCHEME, SkyMap, TractRule
from .store import StoreError, SurveyStore
from .survey_io import open_survey
from .tasks import layout_for

__all__ = ["SurveyResult", "run_survey"]

logger = logging.getLogger(__name__)


@dataclass
class SurveyResult:
    """What a survey run produced.

    Attributes
    ----------
    outdir, catalog_path : Path
        The output directory and the partitioned catalog dataset in it.
    n_objects : dict
        Tract id → objects in its catalog, for the tracts run (or kept) by this call.
    skipped : list of int
        Tracts whose catalog was already written (``resume``) and were not run again.
    timings : dict
        Tract id → seconds.
    """

    outdir: Path
    catalog_path: Path
    n_objects: dict[int, int] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)
    timings: dict[int, float] = field(default_factory=dict)


def run_survey(
    survey_dir: str | os.PathLike,
    outdir: str | os.PathLike,
    *,
    tracts: Sequence[int] | None = None,
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
) -> SurveyResult:
    """Produce the global catalog of a survey: every tract's tiles on one Dask cluster.

    Tracts run one after another on the cluster (each a :func:`survey_engine.run` of its
    mosaic with the survey's ownership and ids); a tract that fails does not stop the others.

    Parameters
    ----------
    survey_dir : str or path
        A directory of ``*.zarr`` tract mosaics, with or without ``skymap.json``
        (:func:`~survey_engine.survey_io.open_survey`).
    outdir : str or path
        Output directory (:class:`~survey_engine.store.SurveyStore`): ``catalog/tract=<id>/``
        (the catalog), ``tracts/<id>/`` (each tract's run directory: parts, segmentation map
        with global ids), ``survey.json``.
    tracts : sequence of int, optional
        Run only these tracts (default: all). Ownership always follows the whole sky map,
        so tracts run in several calls (``resume=True``) give the catalog of one call.
    tile, halo, origin, deblender, science, execution, client, progress, gpu, **params
        As for :func:`survey_engine.run`; the same for every tract.
    resume : bool
        Continue the survey run in ``outdir``: tracts whose catalog is written are kept,
        the others run (resuming their parts); also how tracts are added to a survey run.
    overwrite : bool
        Delete what ``outdir`` holds first.

    Returns
    -------
    SurveyResult

    Raises
    ------
    ValueError
        No mosaics in ``survey_dir``, an unknown tract, tracts that overlap too little for
        the halo (naming them), or a bad parameter.
    FileNotFoundError
        ``survey_dir`` does not exist.
    RunError
        Tracts failed (named; the others' catalogs are written, ``resume=True`` reruns only
        the failed ones), ``outdir`` cannot hold this run, no cluster, lost scheduler;
        :class:`~survey_engine.driver.RunInterrupted` on Ctrl-C.
    """
    survey_dir = os.path.abspath(os.fspath(survey_dir))
    if not os.path.isdir(survey_dir):
        msg = f"survey directory not found: {survey_dir}"
        raise FileNotFoundError(msg)
    skymap = open_survey(survey_dir)
    ids = _selected(skymap, tracts, survey_dir)
    mosaics = {tid: open_mosaic(_mosaic_path(skymap, tid, survey_dir)) for tid in ids}
    external = client is not None or params.get("scheduler") is not None
    settings = {
        tid: resolve_run(m, science=science, execution=execution, tile=tile, halo=halo,
                         origin=origin, deblender=deblender, gpu=gpu, external_cluster=external,
                         **params)
        for tid, m in mosaics.items()
    }  # fmt: skip
    first = settings[ids[0]]
    _check_overlap(skymap, first.halo, survey_dir)
    store = SurveyStore(outdir)  # local paths made absolute, URLs kept
    try:
        store.prepare(_survey_info(survey_dir, skymap, first), resume=resume, overwrite=overwrite)
    except StoreError as err:
        raise RunError(str(err)) from None
    result = SurveyResult(store.root, store.catalog)
    done = store.finished_tracts() if resume else set()
    result.skipped = [tid for tid in ids if tid in done]
    failed: dict[int, str] = {}
    stopped: tuple[type, str] | None = None
    quiet = _QuietShutdown()
    todo = [tid for tid in ids if tid not in done]
    for tid in result.skipped:
        logger.info("tract %d: catalog already written, kept", tid)
    concurrent = max(1, min(len(todo), int(_conf.get("concurrent-tracts") or 1)))
    skymap.colours  # noqa: B018 - computed once here, not by each tract's thread
    with quiet, interrupts_deferred(), contextlib.ExitStack() as stack:
        c = _connect(stack, first.execution, client)
        n_workers = len(cluster_workers(c))
        halt = threading.Event()

        def one(tid: int) -> int:
            if halt.is_set():
                raise _NotStarted
            check_interrupt()
            t0 = time.perf_counter()
            try:
                return _run_tract(c, mosaics[tid], settings[tid], store, TractRule(skymap, tid),
                                  n_workers, resume, progress and concurrent == 1)  # fmt: skip
            finally:
                result.timings[tid] = time.perf_counter() - t0

        pool = stack.enter_context(cf.ThreadPoolExecutor(concurrent, "survey_engine-tract"))
        futures = {pool.submit(one, tid): tid for tid in todo}
        with tqdm(total=len(todo), desc="tracts", unit="tract", disable=not progress or concurrent == 1) as bar:
            for fut in _finished(futures):
                tid = futures[fut]
                bar.update(1)
                try:
                    result.n_objects[tid] = fut.result()
                except _NotStarted:
                    continue
                except KeyboardInterrupt:
                    stopped = stopped or (RunInterrupted, "interrupted")
                except RunError as err:
                    failed[tid] = str(err)
                except Exception as err:
                    if not _lost(c, err):
                        failed[tid] = f"{type(err).__name__}: {err}"
                        logger.debug("tract %d failed", tid, exc_info=err)
                    else:
                        where = f" at {first.execution.scheduler}" if first.execution.scheduler else ""
                        stopped = stopped or (RunError, f"lost the connection to the Dask scheduler{where}")
                if tid in failed:
                    logger.error("tract %d failed: %s", tid, failed[tid])
                if stopped and not halt.is_set():
                    halt.set()
                    request_interrupt()  # the tracts in progress stop at their next safe point
                    quiet.engage(c)
    if stopped:
        cls, what = stopped
        msg = (f"{what}: {len(result.n_objects)} tract(s) finished; rerun with --resume "
               f"(resume=True) to continue in {store.root}")  # fmt: skip
        raise cls(msg)
    if failed:
        names = ", ".join(map(str, failed))
        tid, err = next(iter(failed.items()))
        msg = (
            f"{len(failed)} of {len(ids)} tract(s) failed: {names}; tract {tid}: {err}. The "
            f"other tracts' catalogs are written in {store.catalog}: rerun with resume=True "
            "(--resume) to run only the failed tracts."
        )
        raise RunError(msg)
    logger.info("survey catalog %s: %d objects in %d tract(s) run, %d kept", store.catalog,
                sum(result.n_objects.values()), len(result.n_objects), len(result.skipped))  # fmt: skip
    return result


class _NotStarted(Exception):
    """A tract not started because the survey run was stopping."""


def _finished(futures) -> Iterator[cf.Future]:
    """The futures as they finish, waking every 0.1 s so that Ctrl-C reaches the tracts."""
    pending = set(futures)
    while pending:
        done, pending = cf.wait(pending, timeout=0.1, return_when=cf.FIRST_COMPLETED)
        yield from done


def _selected(skymap: SkyMap, tracts: Sequence[int] | None, survey_dir: str) -> list[int]:
    if tracts is None:
        return list(skymap.ids)
    ids = [int(t) for t in tracts]
    if unknown := sorted(set(ids) - set(skymap.ids)):
        msg = (f"unknown tract(s) {', '.join(map(str, unknown))} in survey {survey_dir} (tracts: "
               f"{', '.join(map(str, skymap.ids))})")  # fmt: skip
        raise ValueError(msg)
    if not ids:
        msg = "tracts is empty: give at least one tract id, or None for all"
        raise ValueError(msg)
    return sorted(set(ids))


def _mosaic_path(skymap: SkyMap, tract_id: int, survey_dir: str) -> str:
    path = skymap[tract_id].mosaic or os.path.join(survey_dir, f"{tract_id}.zarr")
    return os.path.abspath(path)


def _check_overlap(skymap: SkyMap, halo: int, survey_dir: str) -> None:
    """Every owned position at least ``halo`` px inside its tract where the sky continues."""
    try:
        skymap.check_overlap(halo)
    except ValueError as err:
        msg = (
            f"survey {survey_dir}: tracts must reach the halo ({halo} px) beyond every position "
            f"they own, i.e. overlap by at least 2 × halo for pixel-aligned cuts; {err}"
        )
        raise ValueError(msg) from None


def _survey_info(survey_dir: str, skymap: SkyMap, s: RunSettings) -> dict[str, Any]:
    """What identifies a survey run (``survey.json``): not the tracts run, so tracts can be added."""
    digest = hashlib.sha1(json.dumps(skymap.to_dict(), sort_keys=True, default=str).encode())
    return {
        "survey": survey_dir, "skymap_sha1": digest.hexdigest(),
        "tile": list(s.grid.tile) if s.grid is not None else "auto", "halo": s.halo,
        "origin": s.origin, "science": s.science.to_dict(), "kernels": s.execution.kernel_settings(),
        "id": GLOBAL_ID_SCHEME,
    }  # fmt: skip


def _run_tract(client, m: Mosaic, s: RunSettings, store: SurveyStore, rule: TractRule,
               n_workers: int, resume: bool, progress: bool) -> int:  # fmt: skip
    """One tract: stages 1–4 into its run directory, then its catalog written by a worker."""
    parts = store.tract(rule.tract_id)
    s = s.tiled(m, n_workers, parts.previous_run() if resume else None)
    info = {**s.run_info(m), "tract": rule.tract_id}
    try:
        fresh = parts.prepare(info, resume=resume, overwrite=False)
    except StoreError as err:
        raise RunError(str(err)) from None
    timings: dict[str, float] = {}
    try:
        _, pending = _stages(client, m, s, parts, progress, timings, tract=rule)
    except Exception:
        if fresh and "background" not in timings:
            parts.discard()
        raise
    meta = {**_catalog_meta(s, m), "id": GLOBAL_ID_SCHEME, "tract": rule.tract_id}
    path, n = _catalog_stage(client, m, s, parts, pending, progress, timings, tract=rule, meta=meta,
                             out=store, names=store.tract_catalog(rule.tract_id))  # fmt: skip
    layout = layout_for(m, s.science, rule)
    store.write_schema(layout.table(meta={**meta, "tract": None}).schema)  # the same every time
    logger.info("tract %d: %d objects (%d object group(s) retried) in %s", rule.tract_id, n,
                len(pending), path)  # fmt: skip
    return n
