"""Tile reads from an S3 object store against local disk, in one run (issue 18).

Usage::

    python benchmarks/s3_throughput.py [--size 2048] [--tile 512] [--halo 128] [--workers 2]
                                       [--repeat 3] [--run-size 1024] [--workdir DIR] [--json F]

1. A ``--size``² g, r, i mosaic (``survey_engine.bench.synthesize_mosaic``: sky and source
   noise, chunks of 1024², blosc-zstd) is written to local disk and copied to a moto S3 server
   started as a separate process on loopback (``moto_server``; the endpoint and dummy
   credentials in the environment before the cluster starts, so the workers inherit them).
2. **reads** — the read windows of a ``--tile`` grid with ``--halo`` (what the tile stage
   reads) are read on a LocalCluster of ``--workers`` single-threaded worker processes, each
   window by one task with the engine's own reader (``tasks._mosaic(path).read``: image,
   variance and mask of every band), from local disk and from S3, alternating, ``--repeat``
   times. Reported: Mpx/s per worker (window pixels y × x, all bands and planes read, over the
   seconds the worker spent reading; median over workers, best pass) and the wall-clock
   aggregate.
3. **run** — a whole ``run`` of a ``--run-size``² mosaic with its mosaic and OUTDIR on local
   disk, then on S3 (same cluster): stage times; the two catalogs are checked identical, every
   value bit for bit.

moto is not S3: it keeps objects in a Python process's memory and answers one request at a
time per thread; on a 2-core machine it competes with the workers for the CPU. Real S3 has
higher per-request latency (10–30 ms first byte) and far more aggregate bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _read_window(window, *, path):
    """Read one window on a worker: (worker, pixels, bytes, seconds)."""
    from distributed import get_worker

    from survey_engine.tasks import _mosaic

    m = _mosaic(path)  # opened once per worker and path, as the engine's tasks do
    y0, y1, x0, x1 = window
    t0 = time.perf_counter()
    reg = m.read((y0, y1), (x0, x1))
    dt = time.perf_counter() - t0
    nbytes = reg.image.nbytes + reg.variance.nbytes + reg.mask.nbytes
    return get_worker().address, (y1 - y0) * (x1 - x0), nbytes, dt


def _same_bits(a, b) -> bool:
    """Two tables with the same schema (metadata aside) and every value bit for bit equal.

    Not ``Table.equals``: Arrow compares NaN unequal to NaN (a catalog with a NaN magnitude is
    not ``equals`` to itself read twice).
    """
    import numpy as np

    if not a.schema.equals(b.schema) or a.num_rows != b.num_rows:
        return False
    for x, y in zip(a.columns, b.columns, strict=True):
        x, y = x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False)
        if x.dtype.kind == "f":
            x, y = x.view(f"u{x.itemsize}"), y.view(f"u{y.itemsize}")
        if not np.array_equal(x, y):
            return False
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    log = open(workdir / "moto.log", "wb")  # closed when the process ends
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return proc, endpoint


def _reads(client, path: str, windows, repeat_index: int) -> dict:
    t0 = time.perf_counter()
    futures = client.map(_read_window, windows, path=path, pure=False,
                         key=[f"read-{repeat_index}-{i}-{path}" for i in range(len(windows))])  # fmt: skip
    out = client.gather(futures)
    wall = time.perf_counter() - t0
    per_worker: dict[str, list[float]] = {}
    for addr, px, nbytes, dt in out:
        acc = per_worker.setdefault(addr, [0, 0, 0.0])
        acc[0] += px
        acc[1] += nbytes
        acc[2] += dt
    rates = [px / dt / 1e6 for px, _, dt in per_worker.values()]
    mbs = [b / dt / 2**20 for _, b, dt in per_worker.values()]
    total_px = sum(px for _, px, _, _ in out)
    return {"mpx_s_per_worker": statistics.median(rates), "mib_s_per_worker": statistics.median(mbs),
            "aggregate_mpx_s": total_px / wall / 1e6, "wall_s": wall, "windows": len(out),
            "workers": len(per_worker)}  # fmt: skip


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--halo", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--run-size", type=int, default=1024, help="0: no whole run")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="se_s3bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    moto, endpoint = _start_moto(workdir)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    try:
        import fsspec
        import pyarrow.parquet as pq
        from distributed import Client, LocalCluster

        from survey_engine import run
        from survey_engine.bench import machine_info, synthesize_mosaic
        from survey_engine.tiling import make_tiles

        fs = fsspec.filesystem("s3", use_listings_cache=False)
        fs.mkdir("bench")
        local = str(workdir / "m.zarr")
        t0 = time.perf_counter()
        synthesize_mosaic(local, args.size, ("g", "r", "i"), seed=1, overwrite=True)
        t_synth = time.perf_counter() - t0
        t0 = time.perf_counter()
        fs.put(local, "bench/m.zarr", recursive=True)
        t_upload = time.perf_counter() - t0
        stored = sum(f.stat().st_size for f in Path(local).rglob("*") if f.is_file())
        grid = make_tiles((args.size, args.size), args.tile, args.halo)
        windows = [(t.read.y0, t.read.y1, t.read.x0, t.read.x1) for t in grid]
        result = {"machine": machine_info(), "load_average": os.getloadavg(), "args": vars(args),
                  "mosaic_bytes": stored,
                  "synthesize_s": t_synth, "upload_s": t_upload, "reads": {}, "run": {}}  # fmt: skip
        with (
            LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None) as c,
            Client(c) as client,
        ):
            paths = {"local": local, "s3": "s3://bench/m.zarr"}
            for path in paths.values():  # warm: open the mosaic on every worker
                client.gather(client.map(_read_window, windows[: args.workers * 2], path=path,
                                         pure=False))  # fmt: skip
            passes: dict[str, list[dict]] = {"local": [], "s3": []}
            for i in range(args.repeat):
                for name, path in paths.items():
                    passes[name].append(_reads(client, path, windows, i))
            for name, ps in passes.items():
                best = max(ps, key=lambda p: p["mpx_s_per_worker"])
                rates = [p["mpx_s_per_worker"] for p in ps]
                result["reads"][name] = {**best, "all_mpx_s_per_worker": rates}
            if args.run_size:
                small = str(workdir / "run.zarr")
                synthesize_mosaic(small, args.run_size, ("g", "r", "i"), seed=2, overwrite=True)
                fs.put(small, "bench/run.zarr", recursive=True)
                cats = {}
                for name, (mpath, out) in {
                    "local": (small, workdir / "out"), "s3": ("s3://bench/run.zarr", "s3://bench/out"),
                }.items():  # fmt: skip
                    res = run(mpath, out, tile=args.tile, halo=args.halo, client=client,
                              progress=False, overwrite=True)  # fmt: skip
                    result["run"][name] = {k: round(v, 2) for k, v in res.timings.items()}
                    result["run"][name]["objects"] = res.n_objects
                    url = str(res.catalog_path)
                    cats[name] = (pq.read_table(url.removeprefix("s3://"), filesystem=fs)
                                  if name == "s3" else pq.read_table(url))  # fmt: skip
                result["run"]["identical"] = _same_bits(cats["s3"], cats["local"])
    finally:
        moto.terminate()
        moto.wait(timeout=10)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    r = result["reads"]
    print(f"reads: local {r['local']['mpx_s_per_worker']:.1f} Mpx/s per worker, "
          f"S3 (moto) {r['s3']['mpx_s_per_worker']:.1f} Mpx/s per worker "
          f"(ratio {r['s3']['mpx_s_per_worker'] / r['local']['mpx_s_per_worker']:.2f})")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
