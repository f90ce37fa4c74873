"""Runs on SLURM worker jobs (``--slurm``, dask-jobqueue) of a real one-node SLURM cluster.

``deploy/slurm/local_cluster.sh up`` brings the cluster up (``.ci/run`` does); without it these
tests skip. A run on 2 worker jobs gives the catalog of a LocalCluster run, bit for bit; so does
one whose worker job is ``scancel``-ed mid-run; and every job is gone afterwards, also after a
failed or interrupted run.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from _util import assert_same_catalog, assert_same_table, blob_mosaic, survey_engine_cli

from survey_engine import read_catalog, run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SIZE = 384
JOB_NAME = "se-test"


def _cluster_up() -> str | None:
    """Why the SLURM tests cannot run here (None: they can)."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return (
            "no SLURM here (sinfo/sbatch not on PATH): deploy/slurm/local_cluster.sh up starts one"
        )
    if importlib.util.find_spec("dask_jobqueue") is None:  # not imported: it takes over SIGINT
        return "dask-jobqueue is not installed (pip install -e '.[slurm]')"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                             timeout=30, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s: deploy/slurm/local_cluster.sh up"
    states = out.stdout.split()
    if out.returncode != 0 or not any(s.rstrip("*~#").startswith(("idle", "mix")) for s in states):
        said = " ".join(states) or (out.stderr.strip().splitlines() or ["nothing"])[-1]
        return f"no idle SLURM node (sinfo: {said}): deploy/slurm/local_cluster.sh up"
    return None


_WHY = _cluster_up()
needs_slurm = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


def _squeue() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True,
                         timeout=30, check=True)  # fmt: skip
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def empty_queue():
    """The tests count jobs: they need an empty queue (a busy cluster skips them)."""
    if _squeue():
        pytest.skip(f"the SLURM queue is not empty: {_squeue()}")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """A jobqueue configuration for the one-node cluster: 1-core worker jobs of this checkout."""
    d = tmp_path_factory.mktemp("slurm")
    cfg = {
        "jobqueue": {"slurm": {
            "name": JOB_NAME, "cores": 1, "processes": 1, "memory": "2GiB", "walltime": "00:15:00",
            "log-directory": str(d / "logs"), "death-timeout": 30,
            "job-script-prologue": [f"export PYTHONPATH={ROOT} OMP_NUM_THREADS=1"],
        }},
        # both jobs' workers before the run starts (default 1: jobs may queue for long)
        "survey_engine": {"slurm-min-workers": 2, "slurm-timeout": "120s"},
    }  # fmt: skip
    path = d / "jobqueue.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    return blob_mosaic(tmp_path_factory.mktemp("m") / "m.zarr", (SIZE, SIZE), n=150, seed=5)


@pytest.fixture(scope="module")
def reference(mosaic, tmp_path_factory) -> Path:
    """The catalog of a LocalCluster run (one worker process, one tile)."""
    res = run(mosaic, tmp_path_factory.mktemp("ref"), tile=SIZE, halo=32, workers=1, progress=False)
    return res.catalog_path


def _same(reference: Path, catalog: Path) -> None:
    assert_same_table(pq.read_table(catalog), pq.read_table(reference))
    assert_same_catalog(read_catalog(reference), read_catalog(catalog))


@needs_slurm
def test_cli_run_on_two_slurm_jobs_matches_localcluster(
    mosaic, reference, config, tmp_path, empty_queue
):
    out = tmp_path / "run"
    cmd = [*survey_engine_cli(), "-v", "run", mosaic, str(out), "--slurm", "--slurm-jobs", "2",
           "--slurm-config", str(config), "--tile", "128", "--halo", "32"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 worker(s) connected" in proc.stderr
    _same(reference, out / "catalog.parquet")
    meta = read_catalog(out / "catalog.parquet").meta["execution"]
    assert (meta["cluster"], meta["slurm_jobs"]) == ("slurm", 2)
    assert _squeue() == []  # the run cancelled its jobs


@needs_slurm
def test_slurm_job_cancelled_mid_run_loses_nothing(
    mosaic, reference, config, tmp_path, empty_queue
):
    """``scancel`` one of the two worker jobs once some tiles are done: its tasks are redone."""
    out = tmp_path / "run"
    n_tiles = (SIZE // 48) ** 2
    killed: dict = {}

    def cancel_one():
        deadline = time.time() + 200
        while time.time() < deadline and not killed:
            parts = out / "parts"
            n_done = len(list(parts.glob("tile-*"))) if parts.exists() else 0
            if n_done >= 10:
                jobs = [j.split() for j in _squeue() if j.split()[1].startswith(JOB_NAME)]
                running = [j for j in jobs if j[2] == "RUNNING"]
                if len(running) == 2:
                    subprocess.run(["scancel", running[-1][0]], check=True, timeout=30)
                    killed.update(job=running[-1][0], n_done=n_done)
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=cancel_one, daemon=True)
    watcher.start()
    res = run(mosaic, out, tile=48, halo=16, cluster="slurm", slurm_jobs=2,
              slurm_config=str(config), progress=False)  # fmt: skip
    watcher.join(timeout=5)
    assert killed, "the run ended before a worker job could be cancelled"
    assert 10 <= killed["n_done"] < n_tiles
    (log,) = (config.parent / "logs").glob(f"{JOB_NAME}-*-{killed['job']}.err")
    assert f"JOB {killed['job']} ON" in log.read_text() and "CANCELLED" in log.read_text()
    assert res.n_tiles == n_tiles
    assert len(list((out / "parts").glob("tile-*"))) == n_tiles
    _same(reference, res.catalog_path)
    assert _squeue() == []


@needs_slurm
def test_no_worker_in_time_is_one_line_and_cancels_the_jobs(mosaic, config, tmp_path, empty_queue):
    out = tmp_path / "run"
    env = {**os.environ, "DASK_SURVEY_ENGINE__SLURM_TIMEOUT": "0.1s"}
    cfg = yaml.safe_load(config.read_text())
    del cfg["survey_engine"]  # the environment's timeout, not the file's
    (tmp_path / "jq.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [*survey_engine_cli(), "run", mosaic, str(out), "--slurm-jobs", "2",
           "--slurm-config", str(tmp_path / "jq.yaml")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: --slurm: no Dask worker connected within 0s"
    )
    assert "2 job(s)" in lines[0] and "the jobs are cancelled" in lines[0]
    assert not out.exists()  # a failed start leaves OUTDIR as it was
    assert _squeue() == []


@needs_slurm
def test_a_job_slurm_refuses_is_one_line_at_once(mosaic, config, tmp_path, empty_queue):
    cfg = yaml.safe_load(config.read_text())
    cfg["jobqueue"]["slurm"]["queue"] = "no-such-partition"
    (tmp_path / "jq.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [*survey_engine_cli(), "run", mosaic, str(tmp_path / "out"), "--slurm-config",
           str(tmp_path / "jq.yaml")]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert time.perf_counter() - t0 < 60  # not the 120 s wait for workers
    assert proc.stderr.strip() == (
        "error: --slurm: SLURM refuses the worker job script (sbatch --test-only): invalid "
        "partition specified: no-such-partition; allocation failure: Invalid partition name "
        "specified"
    )
    assert _squeue() == []


@needs_slurm
def test_ctrl_c_cancels_the_jobs(mosaic, config, tmp_path, empty_queue):
    """SIGINT to ``survey-engine run --slurm`` once tiles are done: status 130, the finished
    parts kept for --resume, and no job left."""
    out = tmp_path / "run"
    cmd = [*survey_engine_cli(), "run", mosaic, str(out), "--slurm-config", str(config),
           "--tile", "32", "--halo", "16"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None:
            if (out / "parts").exists() and len(list((out / "parts").glob("tile-*"))) >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        jobs = _squeue()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(jobs) == 1 and JOB_NAME in jobs[0]  # --slurm-config alone: one job
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted after" in err and "--resume" in err
    assert _squeue() == []


def test_missing_sbatch_is_a_clear_error(tmp_path, monkeypatch):
    if importlib.util.find_spec("dask_jobqueue") is None:
        pytest.skip("dask-jobqueue is not installed")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, squeue …
    from survey_engine.slurm import SlurmUnavailable, slurm_cluster

    with pytest.raises(SlurmUnavailable, match=r"`sbatch` is not on PATH"), slurm_cluster(1):
        pass


def test_cluster_parameters_are_checked():
    from survey_engine.config import ExecutionConfig

    with pytest.raises(ValueError, match="cluster must be 'local' or 'slurm', got 'pbs'"):
        ExecutionConfig(cluster="pbs")
    with pytest.raises(ValueError, match="starts its own scheduler; got scheduler='tcp://h:8786'"):
        ExecutionConfig(cluster="slurm", scheduler="tcp://h:8786")
    with pytest.raises(ValueError, match="slurm_jobs must be a positive integer, got 0"):
        ExecutionConfig(cluster="slurm", slurm_jobs=0)
    assert ExecutionConfig(cluster="slurm", slurm_jobs=3).to_dict()["slurm_jobs"] == 3


def test_slurm_config_file_is_flattened_over_the_defaults(tmp_path):
    from survey_engine.slurm import SlurmUnavailable, load_jobqueue_config

    path = tmp_path / "jq.yaml"
    path.write_text(yaml.safe_dump({"jobqueue": {"slurm": {
        "cores": 2, "memory": "4GiB", "job-script-prologue": ["a", "b"],
        "scheduler-options": {"interface": "ib0"},
    }}}))  # fmt: skip
    assert load_jobqueue_config(path) == {
        "jobqueue.slurm.cores": 2, "jobqueue.slurm.memory": "4GiB",
        "jobqueue.slurm.job-script-prologue": ["a", "b"],
        "jobqueue.slurm.scheduler-options": {"interface": "ib0"},
    }  # fmt: skip
    with pytest.raises(SlurmUnavailable, match=r"--slurm-config .*nope.yaml: No such file"):
        load_jobqueue_config(tmp_path / "nope.yaml")
    path.write_text("- a list\n")
    with pytest.raises(SlurmUnavailable, match="must hold a mapping"):
        load_jobqueue_config(path)


def test_cli_refuses_slurm_with_a_scheduler(mosaic, tmp_path):
    from click.testing import CliRunner

    from survey_engine.cli import main

    res = CliRunner().invoke(main, ["run", mosaic, str(tmp_path / "out"), "--slurm-jobs", "2",
                                    "--scheduler", "tcp://127.0.0.1:1"])  # fmt: skip
    assert res.exit_code == 1
    assert res.stderr.strip() == (
        "error: cluster='slurm' (--slurm) starts its own scheduler; got "
        "scheduler='tcp://127.0.0.1:1' too"
    )
    assert not (tmp_path / "out").exists()


def test_dask_jobqueue_does_not_take_over_ctrl_c():
    """Importing dask-jobqueue sets a SIGINT handler calling sys.exit(); ours is kept."""
    if importlib.util.find_spec("dask_jobqueue") is None:
        pytest.skip("dask-jobqueue is not installed")
    code = (
        "import signal\n"
        "from survey_engine.slurm import _import_slurm_cluster\n"
        "before = signal.getsignal(signal.SIGINT)\n"
        "_import_slurm_cluster()\n"
        "import dask_jobqueue.runner\n"
        "print(signal.getsignal(signal.SIGINT) is before, before is signal.default_int_handler)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    assert out.stdout.split() == ["True", "True"]
