"""Dask cluster access: the single place where survey_engine talks to Dask distributed.

Every parallel job (simulation, tiled engine, benchmarks) gets its client from :func:`dask_client`
and maps pure functions over work items with :func:`map_tasks`, which streams results, shows a
progress bar and collects per-item failures instead of letting one bad item sink the others.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dask.config

__all__ = ["GPUUnavailable", "SchedulerUnreachable", "TaskFailure", "check_interrupt",
           "cluster_workers", "dask_client", "default_workers", "interrupts_deferred",
           "local_cluster", "map_tasks", "request_interrupt", "workers_with"]  # fmt: skip

logger = logging.getLogger(__name__)


def default_workers() -> int:
    """Number of worker processes for a LocalCluster sized to this machine (one per core)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def dask_client(*, workers: int | None = None, scheduler: str | None = None,
                client: Any | None = None, threads_per_worker: int = 1,
                memory_limit: str | float | None = "auto", processes: bool = True,
                gpu: bool = False, cluster: str = "local", slurm_jobs: int | None = None,
                slurm_config: str | None = None) -> Iterator[Any]:  # fmt: skip
    """Yield a ``distributed.Client``: the given one, one connected to ``scheduler``, or a new cluster.

    Parameters
    ----------
    scheduler : str, optional
        Address of an existing scheduler (``tcp://host:8786``); no cluster is started.
    client : distributed.Client, optional
        Use this client as is (it is not closed on exit).
    workers, threads_per_worker, memory_limit, processes, gpu
        Of a new cluster, as for :func:`local_cluster` (one thread per process scales best:
        the kernels are single-threaded C/numpy).
    cluster : {"local", "slurm"}
        The new cluster: a LocalCluster, or ``slurm_jobs`` (default 1) SLURM worker jobs of a
        ``dask_jobqueue.SLURMCluster`` configured by ``jobqueue.slurm.*`` (and the YAML file
        ``slurm_config``), cancelled on exit (:func:`survey_engine.slurm.slurm_cluster`).

    Yields
    ------
    distributed.Client
    """
    from distributed import Client

    if client is not None:
        yield client
        return
    if scheduler is not None:
        timeout = dask.config.get("survey_engine.scheduler-timeout", default=None) or "5s"
        logger.info("connecting to Dask scheduler %s (timeout %s)", scheduler, timeout)
        try:
            c = Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError) as err:
            msg = (
                f"cannot reach the Dask scheduler at {scheduler} within {timeout} "
                f"({type(err).__name__}); is `dask scheduler` running there? (the wait is "
                "survey_engine.scheduler-timeout in the Dask config)"
            )
            raise SchedulerUnreachable(msg) from None
        with c:
            yield c
        return
    if cluster == "slurm":
        from .slurm import slurm_cluster

        with slurm_cluster(slurm_jobs or 1, config_file=slurm_config) as sc, Client(sc) as c:
            yield c
        return
    new = local_cluster(workers, gpu=gpu, threads_per_worker=threads_per_worker,
                        memory_limit=memory_limit, processes=processes)  # fmt: skip
    with new, Client(new) as c:
        yield c


class GPUUnavailable(RuntimeError):
    """A GPU cluster was asked for where none can be started."""


class SchedulerUnreachable(RuntimeError):
    """No Dask scheduler answers at the address given."""


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored while worker processes start, so that they inherit it."""
    # Ctrl-C then reaches the driver alone (which stops the run and closes the cluster), not
    # every worker with its own traceback: an ignored signal stays ignored across ``exec``,
    # and Python installs its KeyboardInterrupt handler only where SIGINT is not ignored.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def local_cluster(workers: int | None = None, *, gpu: bool = False, threads_per_worker: int = 1,
                  memory_limit: str | float | None = "auto", processes: bool = True,
                  without_dask_cuda: bool = False):  # fmt: skip
    """Start a cluster on this machine (the caller closes it, e.g. ``with local_cluster() as c``).

    Parameters
    ----------
    workers : int, optional
        Worker processes (default: one per core); with ``gpu``, at most one per GPU (default: all).
    gpu : bool
        A ``dask_cuda.LocalCUDACluster`` (imported only here) of workers with resource ``GPU=1``.
    threads_per_worker, memory_limit, processes
        As for ``distributed.LocalCluster`` (``processes`` is ignored with ``gpu``).
    without_dask_cuda : bool
        With ``gpu`` and no importable dask-cuda, a plain LocalCluster of GPU=1 workers instead
        of failing (all on the default device: for benchmarks on a one-GPU host).

    Returns
    -------
    distributed.LocalCluster

    Raises
    ------
    GPUUnavailable
        ``gpu`` without a visible CUDA device, or without dask-cuda.
    """
    from distributed import LocalCluster

    common = {"threads_per_worker": threads_per_worker, "memory_limit": memory_limit,
              "dashboard_address": ":0", "silence_logs": logging.WARNING}  # fmt: skip
    if not gpu:
        n = default_workers() if workers is None else int(workers)
        if n < 1:
            msg = f"workers must be a positive integer, got {workers!r}"
            raise ValueError(msg)
        logger.info("starting LocalCluster with %d worker(s)", n)
        with _sigint_ignored():
            return LocalCluster(n_workers=n, processes=processes, **common)
    import torch

    if not torch.cuda.is_available():
        msg = (
            "--gpu: no CUDA GPU is visible on this machine (torch.cuda.is_available() is "
            f"False; torch {torch.__version__}). Run without --gpu, or pass the address of a "
            "cluster whose workers have GPUs (--scheduler; workers started with --resources GPU=1)."
        )
        raise GPUUnavailable(msg)
    n_gpus = torch.cuda.device_count()
    n = max(1, n_gpus if workers is None else min(int(workers), n_gpus))
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as err:  # dask-cuda or one of its dependencies (pynvml, numba …)
        if not without_dask_cuda:
            msg = (
                "--gpu needs dask-cuda to start a local GPU cluster: pip install "
                f"'survey_engine[gpu]' ({type(err).__name__}: {err}); or pass --scheduler with "
                "GPU workers started with --resources GPU=1"
            )
            raise GPUUnavailable(msg) from err
        logger.warning("dask-cuda does not import (%s: %s): %d GPU=1 worker(s) in a plain "
                       "LocalCluster", type(err).__name__, err, n)  # fmt: skip
        with _sigint_ignored():
            return LocalCluster(n_workers=n, processes=True, resources={"GPU": 1}, **common)
    logger.info("starting LocalCUDACluster with %d GPU worker(s)", n)
    with _sigint_ignored():
        return LocalCUDACluster(n_workers=n, resources={"GPU": 1}, **common)


def cluster_workers(client: Any) -> dict[str, dict]:
    """Every worker of the client's cluster: address → scheduler info (resources …)."""
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:  # distributed before 2025.4 lists every worker anyway
        info = client.scheduler_info()
    return dict(info.get("workers", {}))


def workers_with(client: Any, resource: str) -> list[str]:
    """Addresses of the cluster's workers that declare the Dask resource ``resource``."""
    return [a for a, w in cluster_workers(client).items() if w.get("resources", {}).get(resource)]


@dataclass
class TaskFailure:
    """A work item whose function raised.

    Attributes
    ----------
    key, error : Any, str
        The item's key (e.g. the tile index) and ``"ExceptionType: message"`` of the failure.
    """

    key: Any
    error: str


@dataclass
class TaskResults:
    """Results of :func:`map_tasks`, by key, plus the failures."""

    results: dict[Any, Any] = field(default_factory=dict)
    failures: list[TaskFailure] = field(default_factory=list)


def map_tasks(client: Any, func: Callable[..., Any], items: Iterable[Any], *,
              keys: Iterable[Any] | None = None, desc: str = "tasks", progress: bool = True,
              on_result: Callable[[Any, Any], None] | None = None, retries: int = 0,
              resources: dict[str, float] | None = None, keep_results: bool = True,
              total: int | None = None, in_flight: int | None = None,
              **kwargs: Any) -> TaskResults:  # fmt: skip
    """Run ``func(item, **kwargs)`` for every item on the cluster, streaming results.

    Items are submitted in batches with a bounded number of tasks in flight, and finished
    tasks' results are gathered a batch at a time, so the driver's memory and the scheduler's
    task count do not grow with the number of items (with ``keep_results=False``) and the
    per-task cost is not a round trip per task (``benchmarks/scale.py``).

    Parameters
    ----------
    client : distributed.Client
        Where to run.
    func : callable
        A pure function of one item (plus ``kwargs``), importable on the workers.
    items : iterable
        Work items (small: tile descriptions, not pixel arrays); consumed lazily, so a
        generator of millions of items is never held whole.
    keys : iterable, optional
        One key per item for the results dict (default: the item's position).
    desc, progress
        Label of the tqdm progress bar (on stderr), and whether to show it.
    on_result : callable, optional
        Called as ``on_result(key, result)`` in the driver as each result arrives.
    retries : int
        Times the scheduler retries an item whose function raised.
    resources : dict, optional
        Dask resources each task needs (``{"GPU": 1}``): it runs only where declared, one per unit.
    keep_results : bool
        Keep every result in the returned ``results`` (False: only ``on_result`` sees them).
    total : int, optional
        Number of items, for the progress bar, when ``items`` has no length.
    in_flight : int, optional
        Most tasks submitted and not yet collected (default: the Dask config
        ``survey_engine.tasks-in-flight``, else 8 per worker thread, at least 64).
    **kwargs
        Shared keyword arguments, sent to the cluster once (not with every task) when their
        pickle is larger than 10 kB.

    Returns
    -------
    TaskResults
        Successful results by key (unless ``keep_results`` is False) and the list of failures
        (never raised).
    """
    from distributed import as_completed
    from tqdm.auto import tqdm

    if total is None and hasattr(items, "__len__"):
        total = len(items)
    keys_it = iter(keys) if keys is not None else itertools.count()
    pairs = _paired(keys_it, iter(items), keys is not None)
    out = TaskResults()
    limit = int(in_flight or dask.config.get("survey_engine.tasks-in-flight", default=None)
                or max(64, 8 * _threads(client)))  # fmt: skip
    call, token = _TaskCall(func), uuid.uuid4().hex[:8]
    shared: dict[str, Any] | None = None
    by_future: dict[Any, Any] = {}
    ac = as_completed()
    n_sent = 0

    def submit(n: int) -> None:
        nonlocal shared, n_sent
        batch = list(itertools.islice(pairs, n))
        if not batch:
            return
        if shared is None:
            shared = {k: _shared(client, v) for k, v in kwargs.items()}
        futures = client.map(
            call, [item for _, item in batch], pure=False, retries=retries, resources=resources,
            key=[f"{desc}-{token}-{n_sent + i}" for i in range(len(batch))], **shared,
        )  # fmt: skip
        n_sent += len(batch)
        by_future.update(zip(futures, (k for k, _ in batch), strict=True))
        ac.update(futures)

    step = max(1, limit // 4)
    submit(limit)
    with tqdm(total=total, desc=desc, disable=not progress, unit="task") as bar:
        for batch in _completed(ac):
            ok = [f for f in batch if f.status != "error"]
            for fut, res in zip(ok, _gathered(client, ok), strict=True):
                if isinstance(res, _Failed):
                    _failed(out, desc, by_future.pop(fut), res.error)
                    continue
                key = by_future.pop(fut)
                if keep_results:
                    out.results[key] = res
                if on_result is not None:
                    on_result(key, res)
            for fut in batch:
                if fut.status == "error" and fut in by_future:
                    _failed(out, desc, by_future.pop(fut), fut.exception())
                fut.release()
            bar.update(len(batch))
            if len(by_future) <= limit - step:
                submit(limit - len(by_future))
    return out


def _failed(out: TaskResults, desc: str, key: Any, exc: BaseException) -> None:
    out.failures.append(TaskFailure(key, f"{type(exc).__name__}: {exc}"))
    logger.error("%s %r failed: %s: %s", desc, key, type(exc).__name__, exc)


def _paired(keys: Iterator[Any], items: Iterator[Any], given: bool) -> Iterator[tuple[Any, Any]]:
    """(key, item) pairs; given keys must match the items one to one."""
    for item in items:
        try:
            key = next(keys)
        except StopIteration:
            msg = "got fewer keys than items"
            raise ValueError(msg) from None
        yield key, item
    if given and next(keys, _END) is not _END:
        msg = "got more keys than items"
        raise ValueError(msg)


_END = object()


def _gathered(client: Any, futures: list[Any]) -> list[Any]:
    """The results of finished futures in one round trip (one by one if that fails)."""
    if not futures:
        return []
    try:
        return client.gather(futures)
    except Exception:  # a result lost with its worker and failing on recomputation: mark it
        return [_result_or_error(f) for f in futures]


def _result_or_error(fut: Any) -> Any:
    """The future's result, or its error as a failure of the item; a cancelled future (the
    scheduler was lost, the client closed) raises, stopping the whole map."""
    from concurrent.futures import CancelledError

    try:
        return fut.result()
    except CancelledError:
        raise
    except Exception as err:
        return _Failed(err)


@dataclass
class _Failed:
    error: BaseException


def _threads(client: Any) -> int:
    return sum(w.get("nthreads", 1) for w in cluster_workers(client).values()) or 1


def _shared(client: Any, value: Any) -> Any:
    """``value`` as is when small, else scattered once to every worker (a future)."""
    import pickle

    if _is_big(value) or len(pickle.dumps(value, protocol=5)) > 10_000:
        return client.scatter(value, broadcast=True, hash=False)
    return value


def _completed(ac) -> Iterator[list[Any]]:
    """Batches of the futures of ``ac`` as they finish, stopping cleanly on a deferred interrupt."""
    while True:
        check_interrupt()
        batch = ac.next_batch(block=False)
        if batch:
            yield batch
        elif ac.is_empty():
            return
        else:
            time.sleep(0.01)


_INTERRUPTED = threading.Event()


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """A first Ctrl-C (SIGINT) in the block stops :func:`map_tasks` between two results.

    It only sets a flag that :func:`check_interrupt` turns into ``KeyboardInterrupt`` at a
    safe point, so the interrupt never lands inside Dask's own calls (which then log
    tracebacks from the event loop); a second Ctrl-C interrupts at once. Nothing changes
    outside the main thread or where SIGINT is ignored (a background job).
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous == signal.SIG_IGN:
        try:
            yield
        finally:
            _INTERRUPTED.clear()  # a stop asked for by request_interrupt
        return

    def handler(signum, frame):
        if _INTERRUPTED.is_set():
            raise KeyboardInterrupt
        _INTERRUPTED.set()

    _INTERRUPTED.clear()
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _INTERRUPTED.clear()


def check_interrupt() -> None:
    """Raise ``KeyboardInterrupt`` if a deferred interrupt is pending."""
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt


def request_interrupt() -> None:
    """Stop every :func:`map_tasks` in progress (in any thread) at its next safe point, as a
    first Ctrl-C does; cleared when the :func:`interrupts_deferred` block ends."""
    _INTERRUPTED.set()


class _TaskCall:
    """Runs a task function on a worker with the allocator tuned for large arrays."""

    def __init__(self, func: Callable[..., Any]):
        self.func = func
        functools.update_wrapper(self, func)

    def __call__(self, item: Any, **kwargs: Any) -> Any:
        from ._malloc import task_allocator

        with task_allocator():
            return self.func(item, **kwargs)


def _is_big(value: Any) -> bool:
    nbytes = getattr(value, "nbytes", 0)
    return isinstance(nbytes, int) and nbytes > 1_000_000
