"""End-to-end CPU throughput of survey_engine against a raw sep call on the same mosaic.

Usage::

    python benchmarks/throughput_cpu.py [--size 2048] [--tile 1024] [--workdir bench_output]
                                        [--mosaic M.zarr]   # reuse a mosaic

Simulates one LSST-like r-band mosaic with GalSim (not timed), then times, in one run:

* **raw sep**: one process, one call chain on the whole image held in memory:
  ``sep.Background`` → ``sep.extract`` (per-pixel variance, deblending, no cleaning)
  → ``sep.kron_radius`` + ``sep.sum_ellipse`` (Kron photometry);
* **survey_engine** with 1 and 2 worker processes on a LocalCluster started
  beforehand (its start-up is not counted): Zarr read → background → detection →
  measurement → retry pass → segmentation map → Parquet catalog written.

It prints Mpix/s, the ratios (engine per core ÷ raw sep; 2 workers ÷ 1 worker),
peak resident memory of the driver and of each worker, and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import sep
from distributed import Client, LocalCluster

from survey_engine import open_mosaic, run
from survey_engine.simulate import simulate


def raw_sep(image: np.ndarray, variance: np.ndarray, bad: np.ndarray) -> tuple[float, int]:
    """Background + extract + Kron photometry with sep on the whole image; (seconds, objects)."""
    t0 = time.perf_counter()
    bkg = sep.Background(image, mask=bad, bw=128, bh=128)
    data = image - bkg.back()
    sep.set_extract_pixstack(5_000_000)
    objs = sep.extract(data, 4.0, var=variance, mask=bad, minarea=5, clean=False)
    kron, _ = sep.kron_radius(data, objs["x"], objs["y"], objs["a"], objs["b"], objs["theta"], 6.0)
    kron = np.where(np.isfinite(kron) & (kron > 0), kron, 1.0)
    sep.sum_ellipse(
        data, objs["x"], objs["y"], objs["a"], objs["b"], objs["theta"], 2.5 * kron,
        err=np.sqrt(variance), subpix=1,
    )  # fmt: skip
    return time.perf_counter() - t0, len(objs)


def _maxrss_mib() -> float:
    """Peak resident memory of this process (VmHWM), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def engine(mosaic: str, workers: int, tile: int, halo: int, workdir: Path) -> dict:
    """Time one survey_engine run on a fresh LocalCluster of ``workers`` processes."""
    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        out = workdir / f"run_w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        res = run(mosaic, out, tile=tile, halo=halo, client=client, progress=False)
        wall = time.perf_counter() - t0
        rss = client.run(_maxrss_mib)
    return {
        "wall": wall,
        "n": res.n_objects,
        "timings": res.timings,
        "worker_rss": list(rss.values()),
    }


def main() -> None:
    """Run the benchmark and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--halo", type=int, default=64)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--mosaic", default=None,
                    help="reuse this mosaic instead of simulating one (e.g. to time two versions "
                    "of the package on the same pixels)")  # fmt: skip
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="se_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    import survey_engine

    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; python {platform.python_version()}; sep {sep.__version__}; "
          f"survey_engine from {Path(survey_engine.__file__).parent}")  # fmt: skip
    mosaic = args.mosaic or str(workdir / "mosaic.zarr")
    if args.mosaic is None:
        t0 = time.perf_counter()
        sim = simulate(mosaic, size=args.size, bands=("r",), seed=args.seed, overwrite=True,
                       progress=False)  # fmt: skip
        print(f"simulated {args.size}² r-band mosaic with {len(sim.truth)} objects in "
              f"{time.perf_counter() - t0:.1f} s (not timed below)")  # fmt: skip

    m = open_mosaic(mosaic)
    reg = m.read((0, m.ny), (0, m.nx))
    image = reg.image[0]
    bad = reg.mask[0] != 0
    variance = np.where(bad, 1.0, reg.variance[0]).astype(np.float32)
    mpix = m.ny * m.nx / 1e6
    raw_sep(image, variance, bad)  # warm-up
    t_sep, n_sep = min((raw_sep(image, variance, bad) for _ in range(3)), key=lambda r: r[0])
    print(f"raw sep (1 core, in memory): {t_sep:.2f} s, {mpix / t_sep:.2f} Mpix/s, {n_sep} objects")

    results = {w: engine(mosaic, w, args.tile, args.halo, workdir) for w in (1, 2)}
    for w, r in results.items():
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in r["timings"].items())
        print(f"survey_engine, {w} worker(s): {r['wall']:.2f} s, {mpix / r['wall']:.2f} Mpix/s, "
              f"{r['n']} objects; peak RSS per worker {max(r['worker_rss']):.0f} MiB; {stages}")  # fmt: skip
    per_core = (mpix / results[1]["wall"]) / (mpix / t_sep)
    speedup = results[1]["wall"] / results[2]["wall"]
    print(f"ratio engine (1 worker) / raw sep: {per_core:.2f}  (target ≥ 0.7)")
    print(f"speed-up 1 → 2 workers: {speedup:.2f}×  (target ≥ 1.8)")
    print(f"driver peak RSS: {_maxrss_mib():.0f} MiB (holds the whole image for the raw sep run)")


if __name__ == "__main__":
    main()
