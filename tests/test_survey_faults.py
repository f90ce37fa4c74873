"""A survey run on a real cluster of separate processes survives what a long run meets.

A 2×2 survey of small tiles (64 tile tasks over four tracts, two tracts in progress at
once) is run with ``survey-engine survey --scheduler`` on a loopback cluster: a worker
SIGKILLed while it holds tile tasks loses nothing, and a scheduler killed mid-survey gives one
line, exit 1, and a ``--resume`` on a new cluster ends with the uninterrupted catalog —
nothing lost, nothing duplicated.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from _util import LoopbackCluster, assert_same_catalog, blob_mosaic, survey_engine_cli
from distributed import Client

from survey_engine import read_catalog, run_survey
from survey_engine.survey_io import cut_into_tracts

pytestmark = pytest.mark.slow

SIZE, OVERLAP, TILE, HALO = 288, 64, 44, 16  # tracts of 176²: 4×4 tiles each, 64 in all
N_TILES = 4 * 16
ARGS = ["--tile", str(TILE), "--halo", str(HALO), "--deblender", "sep"]


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    d = tmp_path_factory.mktemp("survey")
    blob_mosaic(d / "mosaic.zarr", (SIZE, SIZE), n=160, seed=21)
    cut_into_tracts(d / "mosaic.zarr", d / "tracts", 2, 2, overlap_px=OVERLAP)
    return d / "tracts"


@pytest.fixture(scope="module")
def reference(survey, client, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run_survey(survey, out, tile=TILE, halo=HALO, deblender="sep", client=client, progress=False)
    cat = read_catalog(out)
    assert len(cat) > 100 and len(np.unique(cat["id"])) == len(cat)
    return cat


def _start(survey, out, *args) -> subprocess.Popen:
    cmd = [*survey_engine_cli(), "survey", str(survey), str(out), *ARGS, *args]
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _n_parts(out: Path) -> int:
    return len(list(out.glob("tracts/*/parts/tile-*")))


def _lines(stderr: str) -> list[str]:
    """stderr without the progress bars."""
    return [ln for ln in stderr.splitlines() if ln.strip() and "%|" not in ln]


def test_worker_killed_mid_survey_loses_nothing(survey, reference, tmp_path):
    (tmp_path / "cluster").mkdir()
    cluster = LoopbackCluster(tmp_path / "cluster")
    try:
        for name in ("w1", "w2", "w3"):
            victim = cluster.add_worker(name)
        cluster.wait_for_workers(3, timeout=60)
        out = tmp_path / "run"
        proc = _start(survey, out, "--scheduler", cluster.address)
        deadline, busy = time.time() + 120, ()
        with Client(cluster.address, timeout="30s") as c:
            addr = next(a for a, w in c.scheduler_info()["workers"].items() if w["name"] == "w3")
            while time.time() < deadline and proc.poll() is None:
                busy = c.processing(workers=[addr]).get(addr, ())
                if _n_parts(out) >= 8 and any("tiles" in str(k) for k in busy):
                    break
                time.sleep(0.02)
            assert proc.poll() is None, f"the survey ended before a worker could be killed: {proc.communicate()}"
            cluster.kill(victim)  # with tile tasks in flight: the scheduler reschedules them
        assert any("tiles" in str(k) for k in busy) and _n_parts(out) < N_TILES
        _, err = proc.communicate(timeout=180)
    finally:
        cluster.close()
    assert proc.returncode == 0, f"{err}\n{cluster.logs()}"
    assert_same_catalog(reference, read_catalog(out))
    assert _n_parts(out) == N_TILES


def test_scheduler_lost_mid_survey_then_resume_gives_the_same_catalog(survey, reference, tmp_path):
    out = tmp_path / "run"
    for d in ("c1", "c2"):
        (tmp_path / d).mkdir()
    cluster = LoopbackCluster(tmp_path / "c1")
    try:
        cluster.add_worker("w1")
        cluster.wait_for_workers(1)
        proc = _start(survey, out, "--scheduler", cluster.address)
        deadline = time.time() + 120
        while _n_parts(out) < 12 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"the survey ended before the scheduler was killed: {proc.communicate()}"
        cluster.kill(cluster.scheduler)
        _, err = proc.communicate(timeout=90)
    finally:
        cluster.close()
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    lines = _lines(err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: lost the connection to the Dask scheduler at {cluster.address}: ")
    assert "--resume" in lines[0]
    kept = _n_parts(out)
    assert 12 <= kept < N_TILES
    again = LoopbackCluster(tmp_path / "c2")
    try:
        again.add_worker("w1")
        again.add_worker("w2")
        again.wait_for_workers(2)
        proc = _start(survey, out, "--scheduler", again.address, "--resume")
        _, err = proc.communicate(timeout=180)
    finally:
        again.close()
    assert proc.returncode == 0, err
    assert_same_catalog(reference, read_catalog(out))
    assert _n_parts(out) == N_TILES
