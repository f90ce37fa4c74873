"""Runs that stop early — Ctrl-C, a lost scheduler, a full disk, a failed start, an unusable
OUTDIR: one clear line (no traceback), the right exit status, finished parts kept, and a
resumed run that ends with the catalog of an uninterrupted one.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _util import LoopbackCluster, assert_same_catalog, blob_mosaic, free_port, survey_engine_cli
from click.testing import CliRunner

from survey_engine import open_mosaic, read_catalog, run
from survey_engine.cli import main
from survey_engine.driver import RunError, resolve_run
from survey_engine.store import PartStore

SIZE = 256
TILE, HALO = 32, 16  # 64 small tiles: a run lasts long enough to be stopped half-way


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    return blob_mosaic(tmp_path_factory.mktemp("m") / "m.zarr", (SIZE, SIZE), n=70, seed=13)


@pytest.fixture(scope="module")
def reference(mosaic, client, tmp_path_factory):
    res = run(mosaic, tmp_path_factory.mktemp("ref"), tile=SIZE, halo=HALO, client=client,
              progress=False)  # fmt: skip
    return read_catalog(res.catalog_path)


def _message_lines(stderr: str) -> list[str]:
    """stderr without the progress bars."""
    return [ln for ln in stderr.splitlines() if ln.strip() and "task/s]" not in ln and "/task]" not in ln]


def _n_parts(out: Path) -> int:
    return len(PartStore(out).finished(f"tile-r{r:04d}-c{c:04d}" for r in range(8) for c in range(8)))


def _start(mosaic, out, *args) -> subprocess.Popen:
    cmd = [*survey_engine_cli(), "run", mosaic, str(out), "--tile", str(TILE), "--halo", str(HALO),
           *args]  # fmt: skip
    # Its own session: SIGINT goes to the whole group, as a terminal's Ctrl-C does.
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for_parts(proc, out: Path, n: int, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while _n_parts(out) < n:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the run ended or stalled before {n} parts: {proc.communicate()}")
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_prints_one_line_exits_130_and_resume_finishes(mosaic, reference, tmp_path):
    out = tmp_path / "run"
    proc = _start(mosaic, out, "--workers", "2")
    _wait_for_parts(proc, out, 5)
    os.killpg(proc.pid, signal.SIGINT)  # the driver and its worker processes, like Ctrl-C
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Aborted" not in err, err
    lines = _message_lines(err)
    assert len(lines) == 1, lines
    done = _n_parts(out)
    assert lines[0] == (
        f"interrupted after {done} of 64 tiles: the finished parts are kept in {out / 'parts'}; "
        "rerun with --resume (resume=True) to continue"
    )
    assert 5 <= done < 64
    assert not (out / "catalog.parquet").exists()
    res = CliRunner().invoke(main, ["run", mosaic, str(out), "--tile", str(TILE), "--halo",
                                    str(HALO), "--workers", "1", "--resume"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert_same_catalog(reference, read_catalog(out / "catalog.parquet"))


@pytest.mark.slow
def test_scheduler_lost_mid_run_is_one_line_and_resume_finishes(mosaic, reference, tmp_path):
    out = tmp_path / "run"
    for d in ("c1", "c2"):
        (tmp_path / d).mkdir()
    cluster = LoopbackCluster(tmp_path / "c1")
    try:
        cluster.add_worker("w1")
        cluster.wait_for_workers(1)
        proc = _start(mosaic, out, "--scheduler", cluster.address)
        _wait_for_parts(proc, out, 5)
        cluster.kill(cluster.scheduler)
        _, err = proc.communicate(timeout=90)
    finally:
        cluster.close()
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    lines = _message_lines(err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: lost the connection to the Dask scheduler at {cluster.address} after ")
    assert "finished parts are kept" in lines[0] and "--resume" in lines[0]
    kept = _n_parts(out)
    assert kept >= 5
    # A new cluster, --resume: nothing lost, nothing duplicated.
    again = LoopbackCluster(tmp_path / "c2")
    try:
        again.add_worker("w1")
        again.wait_for_workers(1)
        proc = _start(mosaic, out, "--scheduler", again.address, "--resume")
        _, err = proc.communicate(timeout=120)
    finally:
        again.close()
    assert proc.returncode == 0, err
    assert_same_catalog(reference, read_catalog(out / "catalog.parquet"))


def test_disk_full_while_writing_a_part(mosaic, reference, client, tmp_path, monkeypatch):
    real = PartStore._write_files
    full = {"tile-r0000-c0003", "tile-r0003-c0001"}

    def no_space(tmp, files):
        if any(tmp.name.startswith(f".{n}.") for n in full):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tmp, files)

    monkeypatch.setattr(PartStore, "_write_files", staticmethod(no_space))
    with pytest.raises(RunError) as info:
        run(mosaic, tmp_path, tile=64, halo=HALO, client=client, progress=False)
    msg = str(info.value)
    assert msg.startswith("2 task(s) failed: tile-r0000-c0003, tile-r0003-c0001")
    assert f"cannot write part tile-r0000-c0003 in {tmp_path}: No space left on device" in msg
    assert "resume=True" in msg
    parts = {p.name for p in (tmp_path / "parts").iterdir()}
    assert len([p for p in parts if p.startswith("tile-")]) == 14 and not parts & full
    assert not [p for p in parts if p.startswith(".")], "half-written parts left behind"
    monkeypatch.setattr(PartStore, "_write_files", staticmethod(real))  # space is back
    res = run(mosaic, tmp_path, tile=64, halo=HALO, client=client, progress=False, resume=True)
    assert_same_catalog(reference, read_catalog(res.catalog_path))


def test_a_failed_start_leaves_outdir_as_it_found_it(mosaic, client, tmp_path):
    runner = CliRunner()
    for args in (["--workers", "0"], ["--scheduler", f"tcp://127.0.0.1:{free_port()}"]):
        out = tmp_path / "new"
        res = runner.invoke(main, ["run", mosaic, str(out), *args])
        assert res.exit_code == 1, res.output
        assert not out.exists(), args
    # A background stage that fails (unreadable chunk): OUTDIR removed again, an empty one kept.
    import shutil

    broken = tmp_path / "broken.zarr"
    shutil.copytree(mosaic, broken)
    (broken / "image" / "c" / "0" / "0" / "0").write_bytes(b"\x00garbage")
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new", empty):
        with pytest.raises(RunError, match="background failed"):
            run(broken, out, tile=64, halo=HALO, client=client, progress=False)
    assert not (tmp_path / "new").exists() and empty.is_dir() and not any(empty.iterdir())
    # The corrected rerun is not refused as "not empty".
    res = run(mosaic, empty, tile=64, halo=HALO, client=client, progress=False)
    assert res.n_objects > 30


def test_unreachable_scheduler_fails_in_seconds_naming_it(mosaic, tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["run", mosaic, str(tmp_path / "o"), "--scheduler", address])
    assert time.perf_counter() - t0 < 10
    assert res.exit_code == 1
    assert res.output.strip() == (
        f"error: cannot reach the Dask scheduler at {address} within 5s (OSError); is `dask "
        "scheduler` running there? (the wait is survey_engine.scheduler-timeout in the Dask config)"
    )


def test_outdir_that_is_a_file_or_cannot_be_written(mosaic, tmp_path, monkeypatch):
    f = tmp_path / "f"
    f.write_text("x\n")
    res = CliRunner().invoke(main, ["run", mosaic, str(f), "--workers", "1"])
    assert res.exit_code == 1
    assert res.output.strip() == f"error: output directory {f} is a file, not a directory: give another OUTDIR"
    assert f.read_text() == "x\n"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.is_relative_to(tmp_path / "ro"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    res = CliRunner().invoke(main, ["run", mosaic, str(tmp_path / "ro" / "out"), "--workers", "1"])
    assert res.exit_code == 1
    assert res.output.strip() == (
        f"error: cannot write to output directory {tmp_path / 'ro' / 'out'}: Read-only file system"
    )


def test_default_tile_gives_every_worker_two_tiles(tmp_path):
    m = open_mosaic(blob_mosaic(tmp_path / "f.zarr", (1489, 2048), n=5, seed=1, chunks=512))
    s = resolve_run(m)
    assert s.grid is None  # chosen once the cluster's size is known
    assert s.tiled(m, 1).grid.tile == (1024, 1024)  # 2048 px would give one tile only
    two = s.tiled(m, 2).grid
    assert two.tile == (1024, 1024) and len(two) == 4
    assert s.tiled(m, 8).grid.tile == (512, 512)  # never below 512 px
    # A resumed run keeps the tile it started with; an explicit tile is kept as given.
    assert s.tiled(m, 8, {"tile": [1024, 1024], "halo": 128}).grid.tile == (1024, 1024)
    assert resolve_run(m, tile=300).tiled(m, 2).grid.tile == (300, 300)
