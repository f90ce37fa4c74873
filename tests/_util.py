"""Helpers shared by the cluster, fault and bad-input tests (imported, not collected)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from survey_engine import create_mosaic

BIN = Path(sys.executable).parent


def assert_same_catalog(a, b):
    """Every column of two catalogs identical, bit for bit (NaN equal to NaN)."""
    assert a.colnames == b.colnames
    assert len(a) == len(b)
    for name in a.colnames:
        x = np.asarray(getattr(a[name], "value", a[name]))
        y = np.asarray(getattr(b[name], "value", b[name]))
        assert np.array_equal(x, y, equal_nan=True), f"column {name} differs"


def assert_same_table(got, want):
    """Two Arrow tables identical: schema (fields and types) and every column, bit for bit.

    ``pyarrow.Table.equals`` counts NaN unequal to NaN; a column that is NaN by design (e.g.
    model fluxes of a mosaic without PSFs) compares equal here where its bits are equal.
    """
    assert got.schema.equals(want.schema)
    assert got.num_rows == want.num_rows
    for name in want.column_names:
        x, y = got[name].combine_chunks(), want[name].combine_chunks()
        if pa.types.is_floating(x.type):
            assert x.is_null().equals(y.is_null()), f"column {name}: nulls differ"
            xv = x.to_numpy(zero_copy_only=False)
            yv = y.to_numpy(zero_copy_only=False)
            assert xv.tobytes() == yv.tobytes(), f"column {name} differs"
        else:
            assert x.equals(y), f"column {name} differs"


def tan_wcs(ny: int, nx: int) -> dict:
    """A simple TAN WCS (0.2″ pixels) centred on the mosaic."""
    return {
        "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRPIX1": nx / 2 + 0.5, "CRPIX2": ny / 2 + 0.5,
        "CRVAL1": 150.0, "CRVAL2": 2.0, "CD1_1": -0.2 / 3600, "CD1_2": 0.0, "CD2_1": 0.0,
        "CD2_2": 0.2 / 3600, "CUNIT1": "deg", "CUNIT2": "deg",
    }  # fmt: skip


def blob_pixels(
    shape: tuple[int, int], *, n: int, seed: int, bands: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Sky + Gaussian blobs + unit-variance noise: ``(image, variance)`` of shape (band, y, x)."""
    ny, nx = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:ny, :nx]
    ys, xs = rng.uniform(0, ny, n), rng.uniform(0, nx, n)
    sig = rng.uniform(1.2, 4.0, n)
    flux = 10 ** rng.uniform(2.0, 3.7, n)
    img = np.zeros((bands, ny, nx))
    for y, x, s, f in zip(ys, xs, sig, flux, strict=True):
        r2 = (yy - y) ** 2 + (xx - x) ** 2
        g = f / (2 * np.pi * s**2) * np.exp(-r2 / (2 * s**2))
        for b in range(bands):
            img[b] += g * (0.7 + 0.3 * b)
    img += 20.0 + 0.01 * xx + rng.normal(0.0, 1.0, img.shape)
    return img.astype(np.float32), np.ones(img.shape, np.float32)


def blob_mosaic(
    path,
    shape: tuple[int, int] = (256, 256),
    *,
    n: int = 60,
    seed: int = 1,
    chunks: int = 64,
    wcs: bool = True,
    image=None,
    variance=None,
    mask=None,
) -> str:
    """Write a 2-band (g, r) mosaic of Gaussian blobs; planes may be given to override."""
    ny, nx = shape
    img, var = blob_pixels(shape, n=n, seed=seed)
    img = img if image is None else image
    var = var if variance is None else variance
    msk = np.zeros(img.shape, np.uint16) if mask is None else mask
    m = create_mosaic(
        str(path), shape=shape, bands=["g", "r"], wcs=tan_wcs(ny, nx) if wcs else None,
        zero_points=[28.0, 28.0], chunks=chunks,
    )  # fmt: skip
    for b in range(2):
        m.write(b, 0, 0, image=img[b], variance=var[b], mask=msk[b])
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dask_cli() -> list[str]:
    exe = shutil.which("dask", path=str(BIN)) or shutil.which("dask")
    assert exe, "the dask command line (distributed) is not installed"
    return [exe]


def survey_engine_cli() -> list[str]:
    return [sys.executable, "-m", "survey_engine.cli"]


class LoopbackCluster:
    """A real Dask cluster of separate processes on 127.0.0.1: one scheduler, N workers.

    Each process runs in its own session so that it (with its nanny's child) can be killed
    as a group; :meth:`close` terminates everything, then kills what is left.
    """

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        self.scheduler = self._spawn(
            [*dask_cli(), "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
             "--no-dashboard", "--no-show"],
            "scheduler",
        )  # fmt: skip

    def _spawn(self, cmd: list[str], name: str) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # closed in close()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=self.workdir, env=env,
        )  # fmt: skip
        proc.log = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def add_worker(self, name: str) -> subprocess.Popen:
        proc = self._spawn(
            [*dask_cli(), "worker", self.address, "--nthreads", "1", "--no-dashboard",
             "--name", name, "--local-directory", str(self.workdir / f"{name}-space"),
             "--memory-limit", "2GiB"],
            name,
        )  # fmt: skip
        self.workers.append(proc)
        return proc

    def wait_for_workers(self, n: int, timeout: float = 60.0) -> None:
        from distributed import Client

        with Client(self.address, timeout="30s") as c:
            c.wait_for_workers(n, timeout=timeout)

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL a process and its children (a worker and its nanny)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def logs(self) -> str:
        out = []
        for f in sorted(self.workdir.glob("*.log")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill(proc)
            proc.log.close()  # type: ignore[attr-defined]
