"""Run a survey_engine catalog on a SLURM cluster through dask-jobqueue.

The driver (this script) runs on a login or head node; workers are SLURM jobs configured by
``jobqueue.yaml`` (copy it to ``~/.config/dask/`` or set ``DASK_CONFIG``). The mosaic and the output
directory must be on a filesystem every node sees (or an object-store URL). A run that stops
(walltime, preemption, a failed tile) continues with ``--resume``.

    pip install dask-jobqueue
    python deploy/slurm/run_slurm.py /shared/mosaic.zarr /shared/run --jobs 8 --resume

GPU partitions: give ``--gpu`` (driver flag passed to the run) and, in ``jobqueue.yaml``, a GPU
queue with ``job-extra-directives: ["--gres=gpu:1"]``, ``processes: 1`` per GPU and
``worker-extra-args: ["--resources", "GPU=1"]``.
"""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mosaic", help="mosaic store (shared path or fsspec URL)")
    p.add_argument("outdir", help="output directory (shared path)")
    p.add_argument("--jobs", type=int, default=4, help="SLURM jobs to start (default 4)")
    p.add_argument("--adapt", type=int, default=None, metavar="MAX_JOBS",
                   help="scale adaptively between 1 and MAX_JOBS jobs instead of --jobs")  # fmt: skip
    p.add_argument("--wait-workers", type=int, default=1,
                   help="workers to wait for before submitting (default 1)")  # fmt: skip
    p.add_argument("--tile", type=int, default=None)
    p.add_argument("--halo", type=int, default=None)
    p.add_argument("--deblender", choices=["sep", "unet"], default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--gpu", action="store_true",
                   help="torch backend on the workers declaring the GPU resource")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue the run in OUTDIR")
    p.add_argument("--print-job-script", action="store_true",
                   help="print the sbatch script dask-jobqueue would submit and exit")  # fmt: skip
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    import survey_engine

    with SLURMCluster() as cluster:  # everything from the jobqueue.slurm configuration
        if args.print_job_script:
            print(cluster.job_script())
            return 0
        if args.adapt:
            cluster.adapt(minimum_jobs=1, maximum_jobs=args.adapt)
        else:
            cluster.scale(jobs=args.jobs)
        with Client(cluster) as client:
            client.wait_for_workers(args.wait_workers, timeout=3600)
            res = survey_engine.run(
                args.mosaic, args.outdir, tile=args.tile, halo=args.halo,
                deblender=args.deblender, device=args.device, resume=args.resume, client=client,
                gpu=args.gpu,
            )  # fmt: skip
    print(f"catalog {res.catalog_path}: {res.n_objects} objects from {res.n_tiles} tiles")
    print("timings " + ", ".join(f"{k} {v:.1f}s" for k, v in res.timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
