"""Simulation rate of ``survey_engine.simulate`` with 1 and 2 Dask workers.

Simulates the same mosaic (default 2048² in g, r, i, 1024-pixel blocks) on a
LocalCluster of each size, after a small warm-up run on that cluster (imports,
GalSim tables), and prints objects/s, band-pixels/s and the speed-up (best of
``--repeat`` runs, so that other load on a shared machine counts less). The
mosaics are checked to be bit-identical.

Usage::

    python benchmarks/simulate_rate.py [--size 2048] [--bands g,r,i] [--chunks 1024]
                                       [--workers 1,2] [--seed 0] [--repeat 2]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time

import numpy as np


def _machine() -> str:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count()
    import galsim

    return (
        f"{platform.platform()}; {platform.processor() or platform.machine()}; "
        f"{cores} usable cores ({os.cpu_count()} logical); Python {platform.python_version()}; "
        f"GalSim {galsim.__version__}"
    )


def run(
    size: int, bands: str, chunks: int, workers: list[int], seed: int, repeat: int = 2
) -> dict[int, float]:
    """Time the simulation for each worker count; return the best wall times."""
    from survey_engine.parallel import dask_client
    from survey_engine.simulate import simulate

    print(f"machine: {_machine()}")
    print(
        f"mosaic: {size}x{size} px, bands {bands}, blocks {chunks}x{chunks}, seed {seed}, "
        f"best of {repeat}"
    )
    times: dict[int, float] = {}
    images = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in workers:
            with dask_client(workers=n) as client:
                simulate(
                    os.path.join(tmp, f"warm{n}.zarr"),
                    size=128, bands=bands, client=client, progress=False,
                )  # fmt: skip
                dt = math.inf
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    res = simulate(
                        os.path.join(tmp, f"w{n}.zarr"),
                        size=size, bands=bands, chunks=chunks, seed=seed, client=client,
                        progress=False, overwrite=True,
                    )  # fmt: skip
                    dt = min(dt, time.perf_counter() - t0)
            times[n] = dt
            nb = len(res.mosaic.bands)
            n_obj = len(res.truth)
            stamps = sum(s["objects"] for s in res.block_stats.values())
            draw_s = sum(s["draw_s"] for s in res.block_stats.values())
            print(
                f"workers={n}: {dt:6.2f} s  {n_obj} objects ({stamps} block stamps, "
                f"{res.n_blocks} blocks)  {n_obj / dt:7.1f} objects/s  "
                f"{n_obj * nb / dt:7.1f} object-bands/s  {size * size * nb / dt / 1e6:5.2f} Mpix/s "
                f"(band-pixels)  drawing {stamps * nb / draw_s:6.1f} object-bands/s per core"
            )
            images[n] = res.mosaic.group["image"][:]
    if len(times) > 1:
        first, *rest = workers
        for n in rest:
            same = np.array_equal(images[first], images[n])
            print(
                f"speed-up {n} vs {first} worker(s): {times[first] / times[n]:.2f}x  "
                f"(bit-identical: {same})"
            )
    return times


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--bands", default="g,r,i")
    parser.add_argument("--chunks", type=int, default=1024)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    run(args.size, args.bands, args.chunks, workers, args.seed, args.repeat)


if __name__ == "__main__":
    main()
