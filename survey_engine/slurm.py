"""A Dask cluster of SLURM jobs (dask-jobqueue), started for one run and cancelled after it.

:func:`slurm_cluster` is what ``survey-engine run … --slurm`` and ``run(..., cluster="slurm")``
use (through :func:`~survey_engine.parallel.dask_client`): a ``dask_jobqueue.SLURMCluster``
configured, as dask-jobqueue users expect, by the Dask configuration ``jobqueue.slurm.*``
(``~/.config/dask/jobqueue.yaml``, ``DASK_JOBQUEUE__SLURM__CORES=…``, or a YAML file given as
``config_file``), scaled to a number of worker jobs. On the way out — a finished run, an error,
Ctrl-C — the cluster is closed and its jobs are checked with ``squeue`` and cancelled with
``scancel`` until none is left, so that no worker job outlives its run.

The scheduler runs in the calling process; the workers, one SLURM job each (``processes``
worker processes per job), must see the mosaic and the output directory and import the same
survey_engine (the job inherits the submitting environment; ``job-script-prologue`` can
activate a virtual environment).
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.config
import yaml
from dask.utils import parse_timedelta

from .parallel import SchedulerUnreachable, check_interrupt

__all__ = ["SlurmUnavailable", "load_jobqueue_config", "slurm_cluster", "slurm_jobs"]

logger = logging.getLogger(__name__)

#: how long a started cluster may take to bring its first worker (Dask config key)
TIMEOUT_KEY = "survey_engine.slurm-timeout"
DEFAULT_TIMEOUT = "600s"
#: workers to wait for before the run starts (Dask config key; default 1)
MIN_WORKERS_KEY = "survey_engine.slurm-min-workers"
#: how long the jobs of a closed cluster may take to leave squeue
GONE_TIMEOUT_S = 60.0


class SlurmUnavailable(SchedulerUnreachable):
    """No SLURM cluster can be had: dask-jobqueue or sbatch missing, a bad jobqueue
    configuration, or no worker job started within the timeout."""


def load_jobqueue_config(path: str | os.PathLike) -> dict[str, Any]:
    """The Dask configuration in a YAML file, as dotted keys (``{"jobqueue.slurm.cores": 4}``).

    Parameters
    ----------
    path : str or path
        A Dask configuration file (like ``~/.config/dask/jobqueue.yaml``: top-level
        ``jobqueue:``); every key in it is returned, so that ``dask.config.set`` replaces only
        those and keeps dask-jobqueue's defaults for the rest.

    Returns
    -------
    dict

    Raises
    ------
    SlurmUnavailable
        The file is missing, is not YAML, or is not a mapping.
    """
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as err:
        msg = f"--slurm-config {p}: {err.strerror or err}"
        raise SlurmUnavailable(msg) from None
    except yaml.YAMLError as err:
        msg = f"--slurm-config {p} is not valid YAML: {str(err).splitlines()[0]}"
        raise SlurmUnavailable(msg) from None
    if not isinstance(doc, dict):
        msg = f"--slurm-config {p} must hold a mapping (top-level `jobqueue:`), got {type(doc).__name__}"
        raise SlurmUnavailable(msg)
    return _flatten(doc)


def _flatten(doc: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key != "jobqueue.slurm.scheduler-options":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextlib.contextmanager
def slurm_cluster(jobs: int = 1, *, config_file: str | os.PathLike | None = None,
                  timeout: str | float | None = None,
                  min_workers: int | None = None) -> Iterator[Any]:  # fmt: skip
    """Start a ``dask_jobqueue.SLURMCluster`` of ``jobs`` worker jobs; cancel them on exit.

    Parameters
    ----------
    jobs : int
        SLURM jobs to submit (each runs ``jobqueue.slurm.processes`` worker processes).
    config_file : str or path, optional
        A Dask configuration YAML (``jobqueue.slurm.*`` …) applied over the current Dask
        configuration while the cluster is built.
    timeout : str or float, optional
        How long to wait for ``min_workers`` workers (default: Dask config
        ``survey_engine.slurm-timeout``, 600 s: jobs may queue).
    min_workers : int, optional
        Workers to wait for before returning (default: Dask config
        ``survey_engine.slurm-min-workers``, else 1; at most the workers of ``jobs`` jobs).

    Yields
    ------
    dask_jobqueue.SLURMCluster
        With at least ``min_workers`` workers connected.

    Raises
    ------
    SlurmUnavailable
        dask-jobqueue is not installed, ``sbatch`` is not on PATH, the jobqueue configuration
        is refused (e.g. no ``cores``/``memory``), submitting fails, or no worker connects
        within ``timeout``; the jobs already submitted are cancelled first.
    """
    if isinstance(jobs, bool) or int(jobs) != jobs or jobs < 1:
        msg = f"slurm_jobs must be a positive integer, got {jobs!r}"
        raise ValueError(msg)
    try:
        SLURMCluster = _import_slurm_cluster()
    except ImportError as err:
        msg = (
            f"--slurm needs dask-jobqueue: pip install 'survey_engine[slurm]' "
            f"({type(err).__name__}: {err})"
        )
        raise SlurmUnavailable(msg) from None
    for cmd in ("sbatch", "squeue", "scancel"):
        if shutil.which(cmd) is None:
            msg = f"--slurm: `{cmd}` is not on PATH; run on a SLURM login node (or start one: deploy/slurm/local_cluster.sh up)"
            raise SlurmUnavailable(msg)
    overrides = load_jobqueue_config(config_file) if config_file is not None else {}
    # the configuration stays set while the cluster lives: dask-jobqueue reads it again for
    # every job it submits
    with dask.config.set(overrides):
        yield from _started(SLURMCluster, jobs, timeout, min_workers)


def _started(cls, jobs: int, timeout, min_workers) -> Iterator[Any]:
    base = dask.config.get("jobqueue.slurm.name", default=None) or "dask-worker"
    name = f"{base}-{uuid.uuid4().hex[:6]}"  # this cluster's jobs, for squeue/scancel
    sched = {"dashboard_address": ":0",
             **(dask.config.get("jobqueue.slurm.scheduler-options", default=None) or {})}  # fmt: skip
    wait_s = parse_timedelta(
        timeout or dask.config.get(TIMEOUT_KEY, default=None) or DEFAULT_TIMEOUT
    )
    n_min = int(min_workers or dask.config.get(MIN_WORKERS_KEY, default=None) or 1)
    try:
        cluster = cls(job_name=name, scheduler_options=sched)
    except (ValueError, TypeError) as err:
        msg = (
            f"--slurm: dask-jobqueue refuses the jobqueue.slurm configuration ({_one_line(err)}); "
            "set jobqueue.slurm.cores, .memory … in ~/.config/dask/ or a --slurm-config file "
            "(e.g. deploy/slurm/jobqueue.yaml)"
        )
        raise SlurmUnavailable(msg) from None
    seen: set[str] = set()
    try:
        per_job = max(1, int(cluster._dummy_job.worker_processes))
        n_min = min(n_min, jobs * per_job)
        logger.info("SLURMCluster %s: %d job(s) of %d worker(s), scheduler %s", name, jobs,
                    per_job, cluster.scheduler_address)  # fmt: skip
        _check_submission(cluster.job_script())
        cluster.scale(jobs=jobs)
        _wait_for_workers(cluster, n_min, wait_s, name, seen, jobs)
        yield cluster
    finally:
        seen |= _job_ids(cluster)
        with contextlib.suppress(Exception):
            cluster.close()
        _cancel_until_gone(name, seen)


def _check_submission(script: str) -> None:
    """``sbatch --test-only`` of the job script: SlurmUnavailable with sbatch's own words if
    SLURM would refuse it (unknown partition or account, too much memory …), before any job
    is submitted (dask-jobqueue would only log the failure, and the run wait for workers)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".sh") as f:
        f.write(script)
        f.flush()
        out = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True,
                             timeout=60, check=False)  # fmt: skip
    if out.returncode != 0:
        why = "; ".join(line.removeprefix("sbatch: error: ") for line in out.stderr.splitlines()
                        if line.strip()) or f"exit status {out.returncode}"  # fmt: skip
        msg = f"--slurm: SLURM refuses the worker job script (sbatch --test-only): {why}"
        raise SlurmUnavailable(msg)


def _import_slurm_cluster():
    """``dask_jobqueue.SLURMCluster``, keeping this process's SIGINT handler.

    Importing dask-jobqueue (its ``runner`` module) replaces the SIGINT handler by one calling
    ``sys.exit()``: Ctrl-C would then end a run silently with status 0 instead of stopping it
    between two results (:func:`~survey_engine.parallel.interrupts_deferred`).
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        from dask_jobqueue import SLURMCluster
    finally:
        if main and previous is not None and signal.getsignal(signal.SIGINT) is not previous:
            signal.signal(signal.SIGINT, previous)
    return SLURMCluster


def slurm_jobs(name: str | None = None, job_ids: set[str] | None = None) -> list[str]:
    """Ids of this user's SLURM jobs still listed by ``squeue`` (named ``name`` or in ``job_ids``).

    Parameters
    ----------
    name : str, optional
        A job name (``sbatch -J``); None with no ``job_ids``: every job of the user.
    job_ids : set of str, optional
        Job ids to look for.

    Returns
    -------
    list of str
        Pending, running and completing jobs (``squeue -h``); empty when none is left.
    """
    out = subprocess.run(
        ["squeue", "-h", "-u", getpass.getuser(), "-o", "%i %j"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        msg = f"squeue failed: {out.stderr.strip() or out.returncode}"
        raise RuntimeError(msg)
    rows = [line.split(" ", 1) for line in out.stdout.splitlines() if line.strip()]
    if name is None and not job_ids:
        return [r[0] for r in rows]
    return [r[0] for r in rows if (len(r) > 1 and r[1] == name) or r[0] in (job_ids or ())]


def _job_ids(cluster) -> set[str]:
    return {
        str(j.job_id)
        for j in getattr(cluster, "workers", {}).values()
        if getattr(j, "job_id", None)
    }


def _wait_for_workers(cluster, n: int, wait_s: float, name: str, seen: set[str], jobs: int) -> None:
    """Return once ``n`` workers are connected; SlurmUnavailable (naming the jobs) after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        seen |= _job_ids(cluster)
        if len(cluster.scheduler_info.get("workers", {})) >= n:
            logger.info("SLURMCluster %s: %d worker(s) connected (jobs %s)", name,
                        len(cluster.scheduler_info["workers"]), ", ".join(sorted(seen)))  # fmt: skip
            return
        if time.monotonic() > deadline:
            break
        check_interrupt()  # a deferred Ctrl-C stops the wait (the jobs are cancelled)
        time.sleep(0.2)
    states = _states(seen)
    log_dir = dask.config.get("jobqueue.slurm.log-directory", default=None) or os.getcwd()
    msg = (
        f"--slurm: no Dask worker connected within {wait_s:.0f}s of submitting {jobs} job(s) "
        f"({states or 'none listed by squeue'}); the jobs are cancelled. See their output "
        f"(slurm-<jobid>.out) in {log_dir}; the wait is survey_engine.slurm-timeout in the Dask config"
    )
    raise SlurmUnavailable(msg)


def _states(job_ids: set[str]) -> str:
    if not job_ids:
        return ""
    out = subprocess.run(["squeue", "-h", "-j", ",".join(sorted(job_ids)), "-o", "%i %T %R"],
                         capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    return "; ".join(line.strip() for line in out.stdout.splitlines() if line.strip())


def _cancel_until_gone(name: str, job_ids: set[str]) -> None:
    """``scancel`` the cluster's jobs until ``squeue`` lists none (logged, never raised: it runs
    while the run's own error, if any, propagates)."""
    deadline = time.monotonic() + GONE_TIMEOUT_S
    cancelled = False
    left: list[str] = []
    while time.monotonic() < deadline:
        try:
            left = slurm_jobs(name, job_ids)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
            logger.error("cannot check that the SLURM jobs %s are gone: %s", name, err)
            return
        if not left:
            logger.info(
                "SLURMCluster %s: every job is gone (%s)",
                name,
                ", ".join(sorted(job_ids)) or "none",
            )
            return
        if not cancelled:
            subprocess.run(["scancel", *left], capture_output=True, timeout=30, check=False)
            cancelled = True
        time.sleep(0.5)
    logger.error("SLURM jobs %s (%s) still listed by squeue %.0fs after their cluster closed; "
                 "cancel them with `scancel %s`", ", ".join(left), name, GONE_TIMEOUT_S,
                 " ".join(left))  # fmt: skip


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())
