"""Survey runs: tracts one at a time vs several in progress at once, on one cluster.

Usage::

    python benchmarks/survey_concurrency.py [--size 768] [--tracts 3] [--workers 2] [--tile 64]

A mosaic of Gaussian blobs (numpy, no GalSim) is cut into ``tracts × tracts`` pixel-aligned
overlapping tract mosaics and run as a survey (sep) with ``survey_engine.concurrent-tracts`` =
1, 2 and 4 on the same LocalCluster: seconds of each, and whether the catalogs are identical.
Each tract's stages end in a barrier (background → tiles → retry → segmentation → catalog);
with one tract at a time the workers idle at every barrier, with several another tract's
tasks fill them.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import dask
import numpy as np


def blob_mosaic(path: Path, size: int, n: int, seed: int = 1) -> None:
    """A 1-band mosaic of Gaussian blobs with unit-variance noise and a TAN WCS."""
    from survey_engine import create_mosaic

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = rng.normal(0, 1, (size, size))
    for _ in range(n):
        y, x, s, a = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(1, 3), rng.uniform(5, 80)
        box = (slice(max(0, int(y - 5 * s)), int(y + 5 * s) + 1), slice(max(0, int(x - 5 * s)), int(x + 5 * s) + 1))
        img[box] += a * np.exp(-((yy[box] - y) ** 2 + (xx[box] - x) ** 2) / (2 * s * s))
    wcs = {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRPIX1": size / 2 + 0.5,
           "CRPIX2": size / 2 + 0.5, "CRVAL1": 150.0, "CRVAL2": 2.0, "CD1_1": -0.2 / 3600,
           "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": 0.2 / 3600}  # fmt: skip
    m = create_mosaic(str(path), shape=(size, size), bands=["r"], wcs=wcs, zero_points=[28.0],
                      chunks=256)  # fmt: skip
    m.write(0, 0, 0, image=img, variance=np.ones_like(img), mask=np.zeros(img.shape, np.uint16))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--tracts", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tile", type=int, default=64)
    args = ap.parse_args()
    from survey_engine import read_catalog, run_survey
    from survey_engine.parallel import dask_client
    from survey_engine.survey_io import cut_into_tracts

    work = Path(tempfile.mkdtemp(prefix="survey_conc_"))
    blob_mosaic(work / "m.zarr", args.size, n=args.size**2 // 600)
    cut_into_tracts(work / "m.zarr", work / "tracts", args.tracts, args.tracts, overlap_px=64)
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(f"{args.size}² mosaic, {args.tracts}×{args.tracts} tracts (overlap 64), tile {args.tile}, "
          f"halo 16, sep, {args.workers} workers\n")  # fmt: skip
    print("| concurrent tracts | seconds | objects | catalog = one-at-a-time's |")
    print("|---|---|---|---|")
    with dask_client(workers=args.workers) as client:
        # warm the workers (imports, numba) once
        run_survey(work / "tracts", work / "warm", tile=args.tile, halo=16, deblender="sep",
                   client=client, progress=False, tracts=[0])  # fmt: skip
        ref = None
        for k in (1, 2, 4):
            with dask.config.set({"survey_engine.concurrent-tracts": k}):
                t0 = time.perf_counter()
                run_survey(work / "tracts", work / f"c{k}", tile=args.tile, halo=16,
                           deblender="sep", client=client, progress=False)  # fmt: skip
                dt = time.perf_counter() - t0
            cat = read_catalog(work / f"c{k}")
            ids = np.asarray(cat["id"])
            same = "—" if ref is None else str(bool(np.array_equal(ids, ref)))
            ref = ids if ref is None else ref
            print(f"| {k} | {dt:.1f} | {len(cat)} | {same} |", flush=True)


if __name__ == "__main__":
    main()
