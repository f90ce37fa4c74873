"""A real cluster of separate processes on loopback: scheduler + workers started with `dask`.

The catalog made through ``survey-engine run --scheduler`` on that cluster is identical to the
one made on a LocalCluster, and it stays identical when a worker is SIGKILLed half-way.
"""

from __future__ import annotations

import subprocess
import time

import pytest
from _util import LoopbackCluster, assert_same_catalog, blob_mosaic, survey_engine_cli
from distributed import Client

from survey_engine import read_catalog, run

pytestmark = pytest.mark.slow

SIZE = 384


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    return blob_mosaic(tmp_path_factory.mktemp("m") / "m.zarr", (SIZE, SIZE), n=150, seed=5)


@pytest.fixture(scope="module")
def reference(mosaic, tmp_path_factory):
    """The catalog of a LocalCluster run (one worker process)."""
    res = run(mosaic, tmp_path_factory.mktemp("ref"), tile=SIZE, halo=32, workers=1, progress=False)
    return read_catalog(res.catalog_path)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cl = LoopbackCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cl.add_worker("w1")
        cl.add_worker("w2")
        cl.wait_for_workers(2, timeout=60)
        yield cl
    finally:
        cl.close()


def _cli_run(mosaic, out, scheduler, *args) -> subprocess.Popen:
    cmd = [*survey_engine_cli(), "run", mosaic, str(out), "--scheduler", scheduler, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, cluster: LoopbackCluster, timeout: float = 120) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"survey-engine run timed out:\n{out.decode()}\n{cluster.logs()}")
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"survey-engine run failed:\n{text}\n{cluster.logs()}"
    return text


def test_cli_run_on_a_loopback_cluster_matches_localcluster(mosaic, reference, cluster, tmp_path):
    out = tmp_path / "run"
    text = _finish(_cli_run(mosaic, out, cluster.address, "--tile", "128", "--halo", "32"), cluster)
    assert "catalog" in text
    cat = read_catalog(out / "catalog.parquet")
    assert len(cat) > 80
    assert_same_catalog(reference, cat)


def test_worker_killed_mid_run_loses_nothing(mosaic, reference, cluster, tmp_path):
    """SIGKILL one of three workers once some tiles are done: its tasks are rescheduled."""
    victim = cluster.add_worker("w3")
    cluster.wait_for_workers(3, timeout=60)
    out = tmp_path / "run"
    n_tiles = (SIZE // 32) ** 2
    proc = _cli_run(mosaic, out, cluster.address, "--tile", "32", "--halo", "16")
    parts = out / "parts"
    deadline = time.time() + 90
    n_done, busy = 0, ()
    with Client(cluster.address, timeout="30s") as c:
        addr = next(a for a, w in c.scheduler_info()["workers"].items() if w["name"] == "w3")
        while time.time() < deadline and proc.poll() is None:
            n_done = len(list(parts.glob("tile-*"))) if parts.exists() else 0
            busy = c.processing(workers=[addr]).get(addr, ())
            if n_done >= 10 and any("tiles" in str(k) for k in busy):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before a worker could be killed"
        cluster.kill(victim)  # with tile tasks in flight: the scheduler must reschedule them
        assert any("tiles" in str(k) for k in busy)
        assert n_done < n_tiles
    _finish(proc, cluster)
    assert victim.returncode is not None
    assert_same_catalog(reference, read_catalog(out / "catalog.parquet"))
    assert len(list(parts.glob("tile-*"))) == n_tiles
