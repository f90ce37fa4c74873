"""Survey scale: the driver's memory and time as the catalog grows, and the cost of a task.

Usage::

    python benchmarks/scale.py [--rows 20000,200000,2000000] [--parts 64] [--tasks 1000,10000]
                               [--workers 2] [--workdir DIR]

(a) **Catalog assembly** from synthetic parts (no GalSim; the real catalog schema of a 3-band
    mosaic, random values, written with ``PartStore.write_retry``), at 1×, 10× and 100× the
    objects, each scale in a fresh process so its peak RSS is its own:

    * *driver*: ``tasks.catalog_of_parts`` in the driver, one sorted Parquet file — what
      ``run`` did before the catalog stage moved to the workers;
    * *workers*: one task per partition (``tasks.catalog_of_parts`` on a worker, one Parquet
      file per partition), the driver holding only counts — what ``run`` (above
      ``catalog-partition-pixels``) and ``run_survey`` do now.

    Prints seconds and the driver's peak RSS (VmHWM).
(b) **Task overhead**: a no-op function over N items on a fresh LocalCluster of ``--workers``
    processes, through ``parallel.map_tasks`` (the engine's streaming loop: items from a
    generator, a bounded number in flight, results gathered a batch at a time, none kept),
    again with 8 items per task, and through plain ``client.map`` + ``wait`` (every future
    at once): tasks per second and the driver's RSS growth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa


def _status_mib(field: str = "VmHWM") -> float:
    """This process's peak (``VmHWM``) or current (``VmRSS``) resident memory, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _empty_catalog(workdir: Path):
    """The empty catalog table of a small real 3-band mosaic (schema and metadata)."""
    from survey_engine import create_mosaic
    from survey_engine.catalog import CatalogLayout
    from survey_engine.config import ScienceConfig

    wcs = {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRPIX1": 32.5, "CRPIX2": 32.5,
           "CRVAL1": 150.0, "CRVAL2": 2.0, "CD1_1": -0.2 / 3600, "CD1_2": 0.0, "CD2_1": 0.0,
           "CD2_2": 0.2 / 3600}  # fmt: skip
    m = create_mosaic(str(workdir / "m.zarr"), shape=(64, 64), bands=("g", "r", "i"), wcs=wcs,
                      zero_points=(28, 28, 28), overwrite=True)  # fmt: skip
    return CatalogLayout.for_mosaic(m, ScienceConfig()).table()


def _fill(schema: pa.Schema, n: int, rng, id0: int) -> pa.Table:
    cols = {}
    for f in schema:
        if f.name == "id":
            cols[f.name] = pa.array(id0 + rng.permutation(n).astype(np.int64))
        elif pa.types.is_floating(f.type):
            cols[f.name] = pa.array(rng.random(n).astype(f.type.to_pandas_dtype()))
        elif pa.types.is_integer(f.type):
            cols[f.name] = pa.array(rng.integers(0, 100, n).astype(f.type.to_pandas_dtype()))
        elif pa.types.is_boolean(f.type):
            cols[f.name] = pa.array(rng.random(n) < 0.5)
        else:
            cols[f.name] = pa.nulls(n, f.type)
    return pa.table(cols, schema=schema)


def make_parts(root: Path, rows: int, parts: int) -> tuple[list[str], int]:
    """A part store of ``parts`` synthetic retry parts holding ``rows`` objects in all."""
    from survey_engine.store import Footprints, PartStore, retry_part

    store = PartStore(root)
    store.parts.mkdir(parents=True, exist_ok=True)
    empty = _empty_catalog(root)
    rng = np.random.default_rng(0)
    none = Footprints(np.zeros(0, np.int64), np.zeros((0, 4), np.int64), np.zeros(0, bool))
    per = -(-rows // parts)
    for p in range(parts):
        n = min(per, rows - p * per)
        store.write_retry(f"p{p:05d}", table=_fill(empty.schema, n, rng, p * per), footprints=none,
                          info={"n": n})  # fmt: skip
    return [retry_part(f"p{p:05d}") for p in range(parts)], len(empty.schema)


def assemble(root: str, names: list[str], mode: str, workers: int, out: str) -> dict:
    """One scale's assembly in this (fresh) process: seconds and the driver's peak RSS."""
    from survey_engine.catalog import write_parquet_atomic
    from survey_engine.store import PartStore
    from survey_engine.tasks import catalog_of_parts

    store = PartStore(root)
    empty = _empty_catalog(Path(root))
    base = _status_mib()
    t0 = time.perf_counter()
    if mode == "driver":
        table = catalog_of_parts(store, names, empty)
        write_parquet_atomic(table, Path(out) / "catalog.parquet")
        n = table.num_rows
        del table
    else:
        from distributed import Client, LocalCluster

        from survey_engine.parallel import map_tasks

        with (LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as c,
              Client(c) as client):  # fmt: skip
            t0 = time.perf_counter()
            groups = [names[i::16] for i in range(16)]
            res = map_tasks(client, _partition, list(enumerate(groups)), desc="partitions",
                            progress=False, root=root, out=out)  # fmt: skip
            n = sum(res.results.values())
    return {"seconds": time.perf_counter() - t0, "rows": n, "driver_peak_mib": _status_mib(),
            "driver_base_mib": base}  # fmt: skip


def _partition(item, *, root: str, out: str) -> int:
    from survey_engine.catalog import write_parquet_atomic
    from survey_engine.store import PartStore
    from survey_engine.tasks import catalog_of_parts

    i, names = item
    store = PartStore(root)
    empty = _empty_catalog(Path(root) / f"w{i}")
    table = catalog_of_parts(store, names, empty)
    path = Path(out) / f"part={i}"
    path.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(table, path / "part-0.parquet")
    return table.num_rows


def _noop(item):
    return item


def overhead(n_tasks: int, workers: int, per_task: int = 8) -> dict:
    """Tasks per second for ``n_tasks`` no-op items: map_tasks, and client.map + wait.

    map_tasks runs as the tile stage does: items from a generator, reports folded in as they
    arrive (``keep_results=False``); then again with ``per_task`` tiles per task (the tile
    stage's batching), counted in tiles per second.
    """
    from distributed import Client, LocalCluster, wait

    from survey_engine.parallel import map_tasks

    out = {}
    with (LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as c,
          Client(c) as client):  # fmt: skip
        seen = []
        rss0 = _status_mib("VmRSS")
        t0 = time.perf_counter()
        map_tasks(client, _noop, (i for i in range(n_tasks)), total=n_tasks, desc="noop",
                  progress=False, keep_results=False, on_result=lambda k, r: seen.append(1))  # fmt: skip
        out["map_tasks_per_s"] = n_tasks / (time.perf_counter() - t0)
        out["map_tasks_driver_growth_mib"] = _status_mib("VmRSS") - rss0
        assert len(seen) == n_tasks
        t0 = time.perf_counter()
        batches = (list(range(i, min(i + per_task, n_tasks))) for i in range(0, n_tasks, per_task))
        map_tasks(client, _noop, batches, desc="noop-batched", progress=False, keep_results=False)
        out["batched_tiles_per_s"] = n_tasks / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        futs = client.map(
            _noop, range(n_tasks), key=[f"noop-{n_tasks}-{i}" for i in range(n_tasks)]
        )
        wait(futs)
        out["client_map_per_s"] = n_tasks / (time.perf_counter() - t0)
        del futs
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="20000,200000,2000000")
    ap.add_argument("--parts", type=int, default=64)
    ap.add_argument("--tasks", default="1000,10000")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one scale, in a fresh process
        root, mode, out, names = args.child
        print(json.dumps(assemble(root, json.loads(names), mode, args.workers, out)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="scale_"))
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores; python {platform.python_version()}"
    )
    print("\n(a) catalog assembly: seconds, driver peak RSS (MiB)\n")
    print(
        "| objects | columns | parts | driver: s | driver: peak MiB | workers: s | workers: driver peak MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        root = work / f"parts_{rows}"
        shutil.rmtree(root, ignore_errors=True)
        names, ncol = make_parts(root, rows, args.parts)
        got = {}
        for mode in ("driver", "workers"):
            out = work / f"out_{rows}_{mode}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            cmd = [sys.executable, __file__, "--workers", str(args.workers), "--child", str(root),
                   mode, str(out), json.dumps(names)]  # fmt: skip
            got[mode] = json.loads(subprocess.check_output(cmd, text=True).strip().splitlines()[-1])
            assert got[mode]["rows"] == rows
        d, w = got["driver"], got["workers"]
        print(f"| {rows:,} | {ncol} | {args.parts} | {d['seconds']:.2f} | {d['driver_peak_mib']:.0f} "
              f"| {w['seconds']:.2f} | {w['driver_peak_mib']:.0f} |")  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n(b) task overhead, no-op tasks on a LocalCluster of {args.workers} workers\n")
    print(
        "| tasks | map_tasks tasks/s | map_tasks driver RSS growth MiB "
        "| map_tasks, 8 tiles/task: tiles/s | client.map + wait tasks/s |"
    )
    print("|---|---|---|---|---|")
    for n in (int(t) for t in args.tasks.split(",")):
        o = overhead(n, args.workers)
        print(f"| {n:,} | {o['map_tasks_per_s']:.0f} | {o['map_tasks_driver_growth_mib']:.0f} "
              f"| {o['batched_tiles_per_s']:.0f} | {o['client_map_per_s']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
