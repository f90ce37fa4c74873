"""End-to-end and per-stage throughput of survey_engine, CPU path and GPU path, without GalSim.

Usage::

    python benchmarks/throughput.py [--size 4096] [--workers N] [--gpu [yes|no|auto]]
                                    [--backend numpy|torch] [--deblender sep|unet] [--tile N]
                                    [--gpu-workers N] [--repeat N] [--no-cpu] [--workdir DIR]
                                    [--json OUT.json]

Synthesises a g,r,i mosaic with numpy (``survey_engine.bench.synthesize_mosaic``; reused
from ``--workdir``), then for each path times the raw Zarr reads and ``survey_engine.run`` on a
cluster started beforehand (its start-up is not counted):

* **GPU** first (``--gpu``, or ``--gpu auto`` where CUDA is available): ``survey_engine.run(gpu=True)``,
  the torch backend with the unet deblender on a Dask-CUDA cluster (a LocalCluster whose
  workers declare ``GPU=1`` when dask-cuda is missing), ``--gpu-workers`` (default one per GPU);
* **CPU**: ``--backend`` (default numpy: sep/scipy kernels) with ``--deblender`` (default sep)
  on a LocalCluster of ``--workers`` single-threaded processes (default one per core).

Prints the machine, one table per path and a one-line ratio. Rates are in mosaic pixels per
band: end to end = pixels / wall time of the run; per stage = pixels / worker-seconds summed
over the tile tasks (the rate of one worker). GalSim is never imported.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from survey_engine.bench import machine_info, run_benchmark
from survey_engine.driver import RunError


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark(s), print the tables; return the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096, help="mosaic side (px)")
    ap.add_argument("--workers", type=int, default=None, help="CPU workers (default: one per core)")
    ap.add_argument(
        "--gpu", nargs="?", const="yes", default="no", choices=["yes", "no", "auto"],
        help="run the GPU path too (auto: where CUDA is available)",
    )  # fmt: skip
    ap.add_argument("--gpu-workers", type=int, default=None, help="GPU workers (default: per GPU)")
    ap.add_argument("--backend", choices=["numpy", "torch"], default=None, help="CPU-path kernels")
    ap.add_argument("--deblender", choices=["sep", "unet"], default=None, help="CPU-path deblender")
    ap.add_argument("--tile", type=int, default=None, help="tile core size (default: the engine's)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per path, best reported")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU path")
    ap.add_argument("--workdir", default=None, help="keep/reuse the mosaic and runs here")
    ap.add_argument("--json", default=None, help="write every figure here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("survey_engine").setLevel(logging.INFO)

    gpu = args.gpu == "yes" or (args.gpu == "auto" and _cuda_available())
    machine = machine_info(gpu=gpu)
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
        + f"; {machine['platform']}; python {machine['python']}, survey_engine "
        f"{machine['survey_engine']}, dask {machine['dask']}, zarr {machine['zarr']}"
        + (f", torch {machine['torch']}" if "torch" in machine else ""),
        flush=True,
    )
    workdir = args.workdir
    if workdir is None:
        import tempfile

        workdir = tempfile.mkdtemp(prefix="se_throughput_")
    results = {}
    status = 0
    # The GPU path first: on a device host with little time left it is the figure that matters.
    paths = (["gpu"] if gpu else []) + ([] if args.no_cpu else ["cpu"])
    for path in paths:
        t0 = time.perf_counter()
        try:
            if path == "cpu":
                res = run_benchmark(
                    args.size, workers=args.workers, backend=args.backend,
                    deblender=args.deblender, tile=args.tile, workdir=workdir,
                    repeat=args.repeat,
                )  # fmt: skip
            else:
                res = run_benchmark(
                    args.size, workers=args.gpu_workers, gpu=True, tile=args.tile,
                    workdir=workdir, repeat=args.repeat,
                )  # fmt: skip
        except (RunError, ValueError, ImportError) as err:
            print(f"\n[{path}] failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            status = 1
            continue
        results[path] = res
        print(f"\n== {path.upper()} path ({time.perf_counter() - t0:.0f} s with set-up) ==")
        print(res.table(), flush=True)
        if args.json:  # after every path, so that a run cut short keeps what it measured
            out = {"machine": machine, **{k: v.to_dict() for k, v in results.items()}}
            Path(args.json).write_text(json.dumps(out, indent=2))
    if "cpu" in results and "gpu" in results:
        c, g = results["cpu"], results["gpu"]
        print(
            f"\nGPU ÷ CPU end to end: {g.mpx_s / c.mpx_s:.2f}× ({g.mpx_s:.2f} Mpx/s on "
            f"{g.workers} × {g.device}, {g.backend}/{g.deblender} vs {c.mpx_s:.2f} Mpx/s on "
            f"{c.workers} CPU worker(s), {c.backend}/{c.deblender}); objects {g.n_objects:,} vs "
            f"{c.n_objects:,}"
        )
    elif results:
        r = next(iter(results.values()))
        print(
            f"\n{r.device}: {r.mpx_s:.2f} Mpx/s end to end, {r.objects_s:.0f} objects/s, "
            f"{r.workers} worker(s), {r.backend}/{r.deblender}"
        )
    if args.json and results:
        print(f"figures written to {args.json}")
    if "galsim" in sys.modules:  # GPU hosts have no GalSim: this script must not need it
        print("error: GalSim was imported", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
