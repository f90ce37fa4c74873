"""Command-line interface: ``survey-engine demo | simulate | simulate-survey | ingest | info | run |
survey | bench``."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click
import numpy as np

__all__ = ["main"]


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.worker",
                 "distributed.core", "distributed.http.proxy"):  # fmt: skip
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def _fail(err: Exception) -> None:
    click.echo(f"error: {err}", err=True)
    sys.exit(1)


WORKERS = click.option("--workers", type=int, default=None,
                       help="LocalCluster workers (default: one per core).")  # fmt: skip
SCHEDULER = click.option("--scheduler", default=None, help="Address of an existing Dask scheduler.")


def _slurm_options(f):
    """``--slurm``, ``--slurm-jobs N``, ``--slurm-config FILE`` (either of the last two implies
    ``--slurm``)."""
    f = click.option("--slurm-config", default=None, type=click.Path(dir_okay=False),
                     help="Dask config YAML (jobqueue.slurm.*) for the SLURM worker jobs, over "
                     "~/.config/dask; e.g. deploy/slurm/jobqueue.yaml.")(f)  # fmt: skip
    f = click.option("--slurm-jobs", default=None, type=click.IntRange(min=1),
                     help="SLURM worker jobs to submit (default 1; implies --slurm).")(f)  # fmt: skip
    return click.option("--slurm", is_flag=True,
                        help="Run on SLURM worker jobs (dask-jobqueue SLURMCluster, configured by "
                        "jobqueue.slurm.* in the Dask config), cancelled when the run ends.")(f)  # fmt: skip


def _cluster(slurm: bool, slurm_jobs, slurm_config) -> str | None:
    return "slurm" if slurm or slurm_jobs or slurm_config else None


OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace the output if it exists.")
DEBLENDER = click.Choice(["sep", "unet"])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="survey_engine")
def main(verbose: int) -> None:
    """survey_engine: source catalogs for LSST-scale survey mosaics, on Dask."""
    _setup_logging(verbose)


# -- simulate ------------------------------------------------------------------------------
@main.command()
@click.argument("out", type=click.Path())
@click.option("--size", default="1024", show_default=True, help="Pixels per side, or NYxNX.")
@click.option("--bands", default="g,r,i", show_default=True, help="Comma-separated bands (ugrizy).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--depth", default=26.8, show_default=True, type=float,
              help="5-sigma point-source depth (r, AB).")  # fmt: skip
@click.option("--truth", type=click.Path(), default=None, help="Write the truth catalog (Parquet) here.")
@click.option("--psf", type=click.Choice(["kolmogorov", "moffat"]), default="kolmogorov",
              show_default=True)  # fmt: skip
@click.option("--masks/--no-masks", default=False, show_default=True,
              help="Add bad columns, a trail, a no-data corner.")  # fmt: skip
@click.option("--bright-stars", default=0, show_default=True, type=int, help="Saturated stars to add.")
@click.option("--cluster-stars", default=0, show_default=True, type=int, help="Add a King-profile globular cluster of N stars (crowded field).")  # fmt: skip
@click.option("--cluster-core-radius", default=30.0, show_default=True, type=float, help="Its core radius (pixels).")  # fmt: skip
@click.option("--cluster-tidal-radius", default=600.0, show_default=True, type=float, help="Its tidal radius (pixels).")  # fmt: skip
@click.option("--cluster-center", default=None, help="Its centre X,Y (pixels; default: the middle).")  # fmt: skip
@click.option("--cluster-distance-modulus", default=18.0, show_default=True, type=float, help="Its m - M (turn-off at r = m - M + 4).")  # fmt: skip
@WORKERS
@SCHEDULER
@OVERWRITE
def simulate(out, size, bands, seed, depth, truth, psf, masks, bright_stars, cluster_stars,
             cluster_core_radius, cluster_tidal_radius, cluster_center, cluster_distance_modulus,
             workers, scheduler, overwrite):  # fmt: skip
    """Simulate an LSST-like mosaic with GalSim into OUT (a Zarr store)."""
    from .simulate import KingCluster
    from .simulate import simulate as _simulate

    try:
        shape = tuple(int(v) for v in size.lower().split("x")) if "x" in size.lower() else int(size)
        center = None if cluster_center is None else tuple(cluster_center.split(","))
        cluster = KingCluster(cluster_stars, cluster_core_radius, cluster_tidal_radius, center,
                              cluster_distance_modulus) if cluster_stars else None  # fmt: skip
        t0 = time.perf_counter()
        res = _simulate(
            out, size=shape, bands=tuple(b for b in bands.split(",") if b), seed=seed, depth=depth,
            truth=truth, psf=psf, masks=masks, bright_stars=bright_stars, cluster=cluster,
            workers=workers, scheduler=scheduler, overwrite=overwrite,
        )  # fmt: skip
    except (ValueError, KeyError, FileExistsError, FileNotFoundError) as err:
        _fail(err)
    m = res.mosaic
    click.echo(f"simulated {out}: {m.ny}×{m.nx} px, bands {','.join(m.bands)}, {len(res.truth)} "
               f"objects in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    if truth:
        click.echo(f"truth catalog: {truth}")


# -- simulate-survey -----------------------------------------------------------------------
@main.command("simulate-survey")
@click.argument("out_dir", type=click.Path())
@click.option("--tracts", default="2x2", show_default=True, help="Tracts NYxNX (rows x columns).")
@click.option("--tract-size", default="1024", show_default=True, help="Pixels per tract side, or NYxNX.")  # fmt: skip
@click.option("--overlap", default=128, show_default=True, type=int, help="Pixels shared by neighbouring tracts.")  # fmt: skip
@click.option("--center", default="150.1,2.2", show_default=True, help="RA,DEC of the region centre (deg).")  # fmt: skip
@click.option("--pixel-scale", default=0.2, show_default=True, type=float, help="Arcsec per pixel.")
@click.option("--bands", default="g,r,i", show_default=True, help="Comma-separated bands (ugrizy).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--depth", default=26.8, show_default=True, type=float, help="5-sigma point-source depth (r, AB).")  # fmt: skip
@click.option("--density", default=1.0, show_default=True, type=float, help="Factor of the number counts.")  # fmt: skip
@click.option("--bright-stars", default=0, show_default=True, type=int, help="Saturated stars in the region.")  # fmt: skip
@click.option("--masks/--no-masks", default=False, show_default=True, help="Add artefacts per tract.")  # fmt: skip
@WORKERS
@SCHEDULER
@OVERWRITE
def simulate_survey(out_dir, tracts, tract_size, overlap, center, pixel_scale, bands, seed, depth,
                    density, bright_stars, masks, workers, scheduler, overwrite):  # fmt: skip
    """Simulate a survey into OUT_DIR: one scene over overlapping tract mosaics, own tangent points.

    Writes OUT_DIR/<tract>.zarr per tract, OUT_DIR/skymap.json and OUT_DIR/truth.parquet.
    """
    from .simulate import simulate_survey as _simulate_survey

    try:
        n_tracts = _pair(tracts, "--tracts", int)
        size = _pair(tract_size, "--tract-size", int)
        ra_dec = tuple(float(v) for v in center.split(",")) if center.count(",") == 1 else ()
        if len(ra_dec) != 2 or not -90 <= ra_dec[1] <= 90:
            raise ValueError(f"--center must be RA,DEC in degrees, got {center!r}")
        if min(n_tracts) < 1 or min(size) < 1 or overlap < 0:
            raise ValueError(f"--tracts and --tract-size must be positive and --overlap >= 0, "
                             f"got {tracts!r}, {tract_size!r}, {overlap!r}")  # fmt: skip
        t0 = time.perf_counter()
        res = _simulate_survey(
            out_dir, center=ra_dec, tracts=n_tracts, tract_size=size, overlap=overlap,
            pixel_scale=pixel_scale, bands=tuple(b for b in bands.split(",") if b), seed=seed,
            depth=depth, density=density, bright_stars=bright_stars, masks=masks,
            workers=workers, scheduler=scheduler, overwrite=overwrite,
        )  # fmt: skip
    except (ValueError, KeyError, FileExistsError, FileNotFoundError) as err:
        _fail(err)
    shared = int((np.asarray(res.truth["n_tracts"]) > 1).sum())
    click.echo(f"simulated survey {out_dir}: {len(res.skymap)} tracts of {size[0]}×{size[1]} px "
               f"({overlap} px overlap), {len(res.truth)} truth objects ({shared} in several "
               f"tracts) in {time.perf_counter() - t0:.1f} s")  # fmt: skip


def _pair(text: str, option: str, kind=int) -> tuple:
    """``N`` or ``AxB`` as a pair; ValueError naming the option otherwise."""
    parts = str(text).lower().split("x")
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise ValueError(f"{option} must be N or NYxNX, got {text!r}")
    return values


# -- ingest --------------------------------------------------------------------------------
@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--band", "bands", multiple=True, help="Band name per image (repeat).")
@click.option("--weight", "weights", multiple=True, help="Weight map per image (repeat).")
@click.option("--variance", "variances", multiple=True, help="Variance map per image (repeat).")
@click.option("--mask", "masks", multiple=True, help="Mask image per image (repeat); nonzero = BAD.")
@click.option("--hdu", "hdus", multiple=True,
              help="HDU to read (index or EXTNAME), per image (repeat) or one for all; needed for "
              "files with several image HDUs (DECam, HSC). IMAGE.fits[EXT] works too.")  # fmt: skip
@click.option("--zero-point", "zero_points", multiple=True, type=float,
              help="AB zero point per image (repeat) or one for all. Default: header MAGZERO, "
              "MAGZPT, MAGZP, ZP or FLUXMAG0; 22.5 for BUNIT nanomaggy.")  # fmt: skip
@click.option("--psf-fwhm", "psf_fwhm", multiple=True, type=float,
              help="PSF FWHM (arcsec) per image (repeat) or one for all.")  # fmt: skip
@click.option("--chunks", default=1024, show_default=True, type=int)
@OVERWRITE
def ingest(paths, bands, weights, variances, masks, hdus, zero_points, psf_fwhm, chunks,
           overwrite):  # fmt: skip
    """Ingest FITS images IMAGE.fits [IMAGE2.fits …] into the mosaic store OUT.zarr (last argument).

    OUT.zarr may be a URL (s3://bucket/m.zarr): endpoint and credentials from AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or AWS_PROFILE).

    Images without --weight or --variance get a variance estimated from the image (sky noise,
    plus image/GAIN when the header has GAIN); .fz, .gz and .bz2 files are read as they are.
    """
    from .ingest import ingest_fits

    if len(paths) < 2:
        _fail(ValueError("give at least one FITS image and the output OUT.zarr"))
    *images, out = paths
    try:
        m = ingest_fits(
            list(images), out, bands=list(bands) or None, weights=list(weights) or None,
            variances=list(variances) or None, masks=list(masks) or None,
            hdu=_one_or_per_image(
                tuple(int(h) if h.strip().isdigit() else h.strip() for h in hdus), len(images),
                "--hdu",
            ),
            zero_points=_one_or_per_image(zero_points, len(images), "--zero-point"),
            psf_fwhm=_one_or_per_image(psf_fwhm, len(images), "--psf-fwhm"),
            chunks=chunks, overwrite=overwrite,
        )  # fmt: skip
    except (ValueError, KeyError, TypeError, FileExistsError, FileNotFoundError, OSError) as err:
        _fail(err)
    click.echo(f"ingested {len(images)} image(s) into {out}: {m.ny}×{m.nx} px, bands {','.join(m.bands)}")


def _one_or_per_image(values: tuple, n: int, option: str) -> list | None:
    """A repeatable option's values: none, one for every image, or one per image."""
    if not values:
        return None
    if len(values) == 1:
        return list(values) * n
    if len(values) != n:
        _fail(ValueError(f"{option} given {len(values)} times for {n} image(s): give it once per image or once for all"))  # fmt: skip
    return list(values)


# -- info ----------------------------------------------------------------------------------
@main.command()
@click.argument("mosaic", type=click.Path())
def info(mosaic):
    """Print shape, bands, chunks, WCS summary and mask statistics of MOSAIC."""
    from .mosaic import open_mosaic

    try:
        text = describe_mosaic(open_mosaic(mosaic))
    except (ValueError, FileNotFoundError, OSError) as err:  # OSError: an unreadable chunk
        _fail(err)
    click.echo(text)


def describe_mosaic(m) -> str:
    """Human-readable summary of a mosaic (used by ``info`` and ``demo``)."""
    lines = [
        f"mosaic      {m.path}",
        f"shape       {m.ny} × {m.nx} px ({m.ny * m.nx / 1e6:.2f} Mpx per band), {len(m.bands)} band(s)",
        f"chunks      {m.chunks[1]} × {m.chunks[2]}",
        f"pixel scale {m.pixel_scale if m.pixel_scale is None else f'{m.pixel_scale:.4f}'} arcsec",
        f"units       {m.units.get('image', '?')}",
    ]
    if m.has_wcs:
        ra, dec = m.pixel_to_sky(np.array([(m.nx - 1) / 2]), np.array([(m.ny - 1) / 2]))
        lines.append(f"wcs         {' '.join(m.wcs.wcs.ctype)}; centre ra={ra[0]:.6f} dec={dec[0]:.6f} deg")
    else:
        lines.append("wcs         none")
    if m.has_truth_segmentation:
        lines.append("truth       truth_segmentation present")
    lines.append("band  zp      psf_fwhm  " + "  ".join(f"{k:>8s}" for k in m.mask_bits))
    step = max(1, int(np.ceil(max(m.ny, m.nx) / 4096)))
    for i, b in enumerate(m.bands):
        mask = m.mask[i, ::step, ::step]
        frac = [f"{np.mean((mask & v) != 0) * 100:7.3f}%" for v in m.mask_bits.values()]
        zp, fw = m.zero_points.get(b), m.psf_fwhm.get(b)
        zps, fws = "-" if zp is None else f"{zp:6.2f}", "-" if fw is None else f"{fw:6.3f}"
        lines.append(f"{b:5s} {zps}  {fws}    " + "  ".join(frac))
    if step > 1:
        lines.append(f"(mask fractions from every {step}th pixel)")
    return "\n".join(lines)


# -- run -----------------------------------------------------------------------------------
@main.command("run")
@click.argument("mosaic", type=click.Path())
@click.argument("outdir", type=click.Path())
@click.option("--tile", default=None, type=int,
              help="Tile core size (px; default survey_engine.tile: 2048, halved down to 512 until "
              "every worker has two tiles).")  # fmt: skip
@click.option("--halo", default=None, type=int,
              help="Halo read around each core (px; default survey_engine.halo, 128).")  # fmt: skip
@click.option("--origin", default=None, type=int, help="Offset of the tile grid (px; default 0).")
@click.option("--deblender", default=None, type=DEBLENDER,
              help="Deblender (default survey_engine.deblender, sep).")  # fmt: skip
@click.option("--model", "unet_model", default=None, type=click.Path(),
              help="U-Net checkpoint for --deblender unet (default: shipped).")  # fmt: skip
@click.option("--device", default=None, type=click.Choice(["cpu", "cuda"]),
              help="Where the unet deblender runs (default survey_engine.device, cpu).")  # fmt: skip
@click.option("--classifier-model", default=None, type=click.Path(),
              help="Stamp-classifier checkpoint for p_star and morphology, e.g. one fine-tuned "
              "for another survey with train-classifier (default: shipped).")  # fmt: skip
@click.option("--thresh", default=None, type=float,
              help="Detection threshold (sigma per pixel; default survey_engine.thresh, 1.5).")  # fmt: skip
@click.option("--minarea", default=None, type=int,
              help="Minimum object area (px; default survey_engine.minarea, 5).")  # fmt: skip
@click.option("--detection-band", default=None, help="Detect on this band (default: combine all bands).")
@click.option("--background-mask-thresh", default=None, type=float,
              help="Mask the sources (pixels above this many sigma over a first background) in a "
              "second background pass (default survey_engine.background_mask_thresh: off).")  # fmt: skip
@click.option("--background-mask-dilate", default=None, type=int,
              help="... and the pixels within this distance of them (px; default 4).")  # fmt: skip
@WORKERS
@SCHEDULER
@_slurm_options
@click.option("--resume", is_flag=True, help="Continue the run in OUTDIR, skipping finished tiles.")
@click.option("--overwrite", is_flag=True, help="Delete what OUTDIR holds first.")
@click.option("--format", "fmt", default="parquet", show_default=True,
              type=click.Choice(["parquet", "hats"]),
              help="hats: also write OUTDIR/hats/survey_engine, a HATS catalog for LSDB.")  # fmt: skip
@click.option("--gpu", is_flag=True,
              help="Every per-tile stage in torch on CUDA (unet deblender): a local Dask-CUDA "
              "cluster, or with --scheduler the workers started with --resources GPU=1.")  # fmt: skip
@click.option("--backend", default=None, type=click.Choice(["numpy", "torch"]),
              help="Per-tile kernels: numpy (sep/scipy, default) or torch (batched tiles; implies "
              "--deblender unet).")  # fmt: skip
@click.option("--amp/--no-amp", "unet_amp", default=None,
              help="bfloat16 autocast of the U-Net (default: on CUDA only); --no-amp on a GPU gives "
              "maps within float32 rounding of the CPU ones.")  # fmt: skip
def run_cmd(mosaic, outdir, tile, halo, origin, deblender, unet_model, device, classifier_model, thresh, minarea,
            detection_band, background_mask_thresh, background_mask_dilate, workers, scheduler,
            slurm, slurm_jobs, slurm_config, resume, overwrite, fmt, gpu, backend, unet_amp):  # fmt: skip
    """Detect, deblend and measure MOSAIC; write OUTDIR/catalog.parquet and segmentation.zarr.

    MOSAIC and OUTDIR may be URLs (s3://bucket/m.zarr …): endpoint and credentials from
    AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), read by the
    workers too.

    Options not given take their value from the Dask configuration (survey_engine.*: a YAML
    file in ~/.config/dask/ or DASK_SURVEY_ENGINE__TILE=… environment variables).
    """
    from .driver import RunError, RunInterrupted
    from .driver import run as _run

    try:
        res = _run(
            mosaic, outdir, tile=tile, halo=halo, origin=origin, deblender=deblender,
            unet_model=unet_model, device=device, thresh=thresh, minarea=minarea,
            **({} if classifier_model is None else {"classifier_model": classifier_model}),
            detection_band=detection_band, background_mask_thresh=background_mask_thresh,
            background_mask_dilate=background_mask_dilate, workers=workers, scheduler=scheduler,
            resume=resume, overwrite=overwrite, gpu=gpu, backend=backend, unet_amp=unet_amp,
            cluster=_cluster(slurm, slurm_jobs, slurm_config), slurm_jobs=slurm_jobs,
            slurm_config=slurm_config,
        )  # fmt: skip
    except (RunInterrupted, KeyboardInterrupt) as err:
        click.echo(f"\n{err or 'interrupted before the run started'}", err=True)
        sys.exit(130)
    except (RunError, ValueError, KeyError, FileNotFoundError, TypeError, OSError) as err:
        _fail(err)
    click.echo(summarise_run(res))
    if fmt == "hats":
        from .export import export_hats

        try:
            path = export_hats(res.catalog_path, res.outdir / "hats", workers=workers, scheduler=scheduler)
        except (ValueError, ImportError) as err:
            _fail(err)
        click.echo(f"hats          {path}")


# -- survey --------------------------------------------------------------------------------
@main.command("survey")
@click.argument("survey_dir", type=click.Path())
@click.argument("outdir", type=click.Path())
@click.option("--tracts", default=None,
              help="Comma-separated tract ids to run (default: all); add tracts later with --resume.")  # fmt: skip
@click.option("--tile", default=None, type=int, help="Tile core size (px; default as for run).")
@click.option("--halo", default=None, type=int,
              help="Halo read around each core (px; default survey_engine.halo, 128); the tracts "
              "must overlap by twice it.")  # fmt: skip
@click.option("--deblender", default=None, type=DEBLENDER,
              help="Deblender (default survey_engine.deblender, sep).")  # fmt: skip
@click.option("--thresh", default=None, type=float, help="Detection threshold (sigma per pixel).")
@click.option("--minarea", default=None, type=int, help="Minimum object area (px).")
@click.option("--detection-band", default=None, help="Detect on this band (default: combine all bands).")
@WORKERS
@SCHEDULER
@_slurm_options
@click.option("--resume", is_flag=True,
              help="Continue the survey run in OUTDIR: finished tracts kept, the others run.")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Delete what OUTDIR holds first.")
@click.option("--gpu", is_flag=True, help="Per-tile stages in torch on CUDA (unet deblender), as for run.")
@click.option("--format", "fmt", default="parquet", show_default=True,
              type=click.Choice(["parquet", "hats"]),
              help="hats: also write OUTDIR/hats/survey_engine from every tract's catalog, for LSDB.")  # fmt: skip
def survey_cmd(survey_dir, outdir, tracts, tile, halo, deblender, thresh, minarea, detection_band,
               workers, scheduler, slurm, slurm_jobs, slurm_config, resume, overwrite, gpu,
               fmt):  # fmt: skip
    """Run every tract mosaic of SURVEY_DIR (*.zarr, with or without skymap.json) on one cluster.

    Writes the global catalog to OUTDIR/catalog/ (Parquet partitioned by tract: each object
    once, kept by the tract whose inner region holds its peak; global ids) and each tract's run
    directory to OUTDIR/tracts/<id>/.
    """
    from .driver import RunError, RunInterrupted
    from .survey import run_survey

    try:
        ids = None if tracts is None else [int(t) for t in tracts.split(",") if t.strip()]
    except ValueError:
        _fail(ValueError(f"--tracts must be comma-separated tract ids, got {tracts!r}"))
    try:
        res = run_survey(
            survey_dir, outdir, tracts=ids, tile=tile, halo=halo, deblender=deblender,
            thresh=thresh, minarea=minarea, detection_band=detection_band, workers=workers,
            scheduler=scheduler, resume=resume, overwrite=overwrite, gpu=gpu,
            cluster=_cluster(slurm, slurm_jobs, slurm_config), slurm_jobs=slurm_jobs,
            slurm_config=slurm_config,
        )  # fmt: skip
    except (RunInterrupted, KeyboardInterrupt) as err:
        click.echo(f"\n{err or 'interrupted before the run started'}", err=True)
        sys.exit(130)
    except (RunError, ValueError, KeyError, FileNotFoundError, TypeError, OSError) as err:
        _fail(err)
    kept = f", {len(res.skipped)} kept from before" if res.skipped else ""
    click.echo(f"catalog       {res.catalog_path}  ({sum(res.n_objects.values())} objects in "
               f"{len(res.n_objects)} tract(s) run{kept})")  # fmt: skip
    for tid, n in res.n_objects.items():
        click.echo(f"tract {tid:<7} {n} objects, {res.timings[tid]:.1f}s")
    if fmt == "hats":
        from .export import export_hats

        try:
            path = export_hats(res.catalog_path, res.outdir / "hats", workers=workers, scheduler=scheduler)
        except (ValueError, ImportError, FileNotFoundError) as err:
            _fail(err)
        click.echo(f"hats          {path}")


def summarise_run(res) -> str:
    """Text summary of a :class:`~survey_engine.driver.RunResult`."""
    from .catalog import read_catalog
    from .schema import Flag

    cat = read_catalog(res.catalog_path)
    lines = [
        f"catalog       {res.catalog_path}  ({res.n_objects} objects)",
        f"segmentation  {res.segmentation_path}",
        f"tiles         {res.n_tiles} ({res.n_retried} object group(s) re-measured in a larger window)",
        "time          " + ", ".join(f"{k} {v:.1f}s" for k, v in res.timings.items()),
    ]
    if res.stages:
        total = sum(res.stages.values()) or 1.0
        shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in res.stages.items())
        lines.append(f"kernels       {res.backend} on {res.device}; worker time {shares}")
    if res.gpu_memory:
        lines.append(f"gpu memory    {res.gpu_memory / 2**30:.2f} GiB peak per GPU worker")
    if len(cat):
        blended = (np.asarray(cat["flags"]) & int(Flag.BLENDED)) != 0
        lines.append(f"blended       {np.mean(blended) * 100:.1f}% of objects")
        for b in cat.meta.get("bands", []):
            mag = _plain(cat[f"{b}_mag"])
            good = np.isfinite(mag)
            if good.any():
                lines.append(f"{b}-band mags   median {np.median(mag[good]):.2f}, 90th percentile "
                             f"{np.percentile(mag[good], 90):.2f} ({good.sum()} with positive flux)")  # fmt: skip
    return "\n".join(lines)


# -- bench ---------------------------------------------------------------------------------
@main.command()
@click.option("--size", default=4096, show_default=True, type=int, help="Synthetic mosaic side (px).")
@click.option("--workers", type=int, default=None,
              help="Workers of the cluster started here (default: one per core, or per GPU with "
              "--gpu).")  # fmt: skip
@click.option("--gpu", is_flag=True, help="Run the GPU path (torch on CUDA, unet deblender).")
@SCHEDULER
@click.option("--backend", default=None, type=click.Choice(["numpy", "torch"]), help="Per-tile kernels.")
@click.option("--deblender", default=None, type=DEBLENDER,
              help="Default: sep with numpy, unet with torch or --gpu.")  # fmt: skip
@click.option("--tile", default=None, type=int, help="Tile core size (px; default: the engine's).")
@click.option("--workdir", default=None, type=click.Path(),
              help="Keep (and reuse) the synthetic mosaic and the run here (default: a temporary "
              "directory).")  # fmt: skip
@click.option("--repeat", default=1, show_default=True, type=int, help="Runs; the best is shown.")
@click.option("--json", "json_out", default=None, type=click.Path(), help="Write the figures here.")
def bench(size, workers, gpu, scheduler, backend, deblender, tile, workdir, repeat, json_out):
    """Time the engine on a synthetic mosaic (made without GalSim) and print Mpx/s per stage."""
    import json

    from .bench import run_benchmark
    from .driver import RunError

    try:
        res = run_benchmark(
            size, workers=workers, gpu=gpu, scheduler=scheduler, backend=backend,
            deblender=deblender, tile=tile, workdir=workdir, repeat=repeat,
        )  # fmt: skip
    except (RunError, ValueError, KeyError, FileNotFoundError, ImportError, OSError) as err:
        _fail(err)
    click.echo(res.table())
    if json_out:
        Path(json_out).write_text(json.dumps(res.to_dict(), indent=2))
        click.echo(f"figures written to {json_out}")


# -- demo ----------------------------------------------------------------------------------
@main.command()
@click.option("--outdir", default="demo_output", show_default=True, type=click.Path())
@click.option("--size", default=1024, show_default=True, type=int, help="Mosaic side (px).")
@click.option("--bands", default="g,r,i", show_default=True)
@click.option("--tile", default=512, show_default=True, type=int)
@WORKERS
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--deblender", default="sep", show_default=True, type=DEBLENDER)
def demo(outdir, size, bands, tile, workers, seed, deblender):
    """Simulate a small mosaic, run the pipeline on a LocalCluster, summarise the catalog vs truth."""
    from .driver import RunError
    from .driver import run as _run
    from .mosaic import open_mosaic
    from .simulate import simulate as _simulate

    out = Path(outdir)
    mosaic_path, truth_path = out / "mosaic.zarr", out / "truth.parquet"
    try:
        out.mkdir(parents=True, exist_ok=True)
        click.echo(f"[1/3] simulating a {size}×{size} px mosaic in bands {bands} with GalSim …")
        t0 = time.perf_counter()
        sim = _simulate(
            str(mosaic_path), size=size, bands=tuple(bands.split(",")), seed=seed,
            truth=str(truth_path), bright_stars=1, workers=workers, overwrite=True,
        )  # fmt: skip
        click.echo(f"      {len(sim.truth)} objects drawn in {time.perf_counter() - t0:.1f} s")
        click.echo(describe_mosaic(open_mosaic(str(mosaic_path))))
        halo = 64 if deblender == "sep" else 96
        click.echo(f"[2/3] running the tiled pipeline ({deblender} deblender, tile {tile}, halo "
                   f"{halo}) on a LocalCluster …")  # fmt: skip
        res = _run(
            str(mosaic_path), out / "run", tile=tile, halo=halo, deblender=deblender,
            workers=workers, overwrite=True,
        )  # fmt: skip
        click.echo(summarise_run(res))
        click.echo("[3/3] comparison with the truth catalog (one-to-one matching within 1″, as "
                   "`survey-engine evaluate`) …")  # fmt: skip
        click.echo(compare_with_truth(res.catalog_path, truth_path, mosaic=str(mosaic_path)))
    except (RunError, ValueError, KeyError, FileExistsError, FileNotFoundError, OSError) as err:
        _fail(err)


#: Truth-magnitude bins of the demo's completeness lines.
_DEMO_MAG_BINS = ((18, 22), (22, 24), (24, 25), (25, 26), (26, 27))


def compare_with_truth(catalog_path, truth_path, *, mosaic=None, radius: float = 1.0) -> str:
    """Short completeness / flux summary of a catalog against a simulation's truth.

    The matching is :func:`survey_engine.evaluate.evaluate`'s — one to one, optimal
    assignment within ``radius`` arcsec — so the figures are those ``survey-engine
    evaluate`` reports for the same files.

    Parameters
    ----------
    catalog_path, truth_path : path-like
        The run's ``catalog.parquet`` and the simulation's truth Parquet file.
    mosaic : path-like, optional
        The mosaic (its pixel scale converts ``radius`` to pixels).
    radius : float
        Match radius in arcsec.

    Returns
    -------
    str
    """
    from .evaluate import evaluate

    ev = evaluate(catalog_path, truth_path, radius=radius, mosaic=mosaic)
    s = ev.summary
    if s["n_catalog"] == 0:
        return "no objects detected"
    band = s["band"]
    found = np.asarray(ev.truth["matched"], bool)
    tmag = _plain(ev.truth[s["truth_mag_column"]])
    lines = [
        f"truth objects {s['n_truth']}, detected {s['n_catalog']}, matched {s['n_matched']} "
        f"(within {s['radius_arcsec']:g}″ = {s['radius_pix']:.1f} px; purity "
        f"{s['purity'] * 100:.1f}%)"
    ]
    for lo, hi in _DEMO_MAG_BINS:
        sel = (tmag >= lo) & (tmag < hi)
        if sel.any():
            lines.append(f"  {band} {lo}-{hi}: completeness {found[sel].mean() * 100:5.1f}% of {sel.sum()}")
    ci = np.asarray(ev.matches["cat_index"], np.int64)
    ti = np.asarray(ev.matches["truth_index"], np.int64)
    bright = tmag[ti] < 23
    flux_col = f"{band}_flux"
    if bright.any() and flux_col in ev.catalog.colnames and flux_col in ev.truth.colnames:
        ratio = _plain(ev.catalog[flux_col])[ci[bright]] / _plain(ev.truth[flux_col])[ti[bright]]
        lines.append(f"  total/true flux ({band} < 23): median {np.median(ratio):.3f} over "
                     f"{bright.sum()} objects")  # fmt: skip
    return "\n".join(lines)


def _plain(col) -> np.ndarray:
    return np.asarray(getattr(col, "value", col), dtype=float)


# -- evaluate ------------------------------------------------------------------------------
@main.command("evaluate")
@click.argument("catalog", type=click.Path())
@click.argument("truth", type=click.Path())
@click.option("--radius", default=1.0, show_default=True, type=float,
              help="Match radius in arcsec (in pixels with --pixels).")  # fmt: skip
@click.option("--pixels", is_flag=True, help="--radius is in pixels.")
@click.option("--method", default="optimal", show_default=True,
              type=click.Choice(["optimal", "greedy"]),
              help="One-to-one matching: linear assignment, or greedy by distance.")  # fmt: skip
@click.option("--band", default=None, help="Band of the magnitudes (default: the catalog's reference band).")
@click.option("--mosaic", default=None, type=click.Path(),
              help="Mosaic (truth segmentation, cutouts). Default: the one named in the catalog, "
              "if it exists.")  # fmt: skip
@click.option("--segmentation", default=None, type=click.Path(),
              help="Catalog segmentation map. Default: segmentation.zarr beside CATALOG, if present.")  # fmt: skip
@click.option("--mag-limit", default=25.0, show_default=True, type=float,
              help="Bright sample for close pairs and residuals.")  # fmt: skip
@click.option("--plots", "plots_dir", default=None, type=click.Path(), help="Write PNG plots here.")
@click.option("--json", "json_out", default=None, type=click.Path(), help="Write the summary as JSON.")
def evaluate_cmd(catalog, truth, radius, pixels, method, band, mosaic, segmentation, mag_limit,
                 plots_dir, json_out):  # fmt: skip
    """Compare CATALOG (Parquet) with the simulation's TRUTH table: completeness, purity, blends."""
    import astropy.units as u

    from .catalog import catalog_metadata
    from .evaluate import evaluate as _evaluate

    cat_path = Path(catalog)
    if mosaic is None and cat_path.is_file():
        try:
            named = catalog_metadata(cat_path).get("mosaic")
        except (ValueError, OSError):  # not Parquet: evaluate() below says so, naming the file
            named = None
        if named and ("://" in named or Path(named).exists()):
            mosaic = named
    if segmentation is None and (cat_path.parent / "segmentation.zarr").exists():
        segmentation = str(cat_path.parent / "segmentation.zarr")
    try:
        res = _evaluate(
            catalog, truth, radius=radius * u.pix if pixels else radius, method=method, band=band,
            mosaic=mosaic, segmentation=segmentation, mag_limit=mag_limit,
        )  # fmt: skip
        click.echo(res.table())
        if json_out:
            res.to_json(json_out)
            click.echo(f"summary written to {json_out}")
        if plots_dir:
            paths = res.plot(plots_dir)
            click.echo(f"{len(paths)} plot(s) written to {plots_dir}")
    except (ValueError, KeyError, TypeError, FileNotFoundError, OSError) as err:
        _fail(err)


# -- survey conditions of the simulated training sets (issue 17 item 3: transfer) ---------
def _condition_options(f):
    """``--survey``, ``--pixel-scale``, ``--psf-fwhm``, ``--depth`` (see survey_engine.surveys)."""
    opts = [
        click.option("--survey", default=None,
                     help="Conditions preset of the simulated training set: lsst (default: the "
                     "shipped models', 0.2\"/px, FWHM 0.6-0.9\", depth 26.8) or sdss (0.396\"/px, "
                     "FWHM 1.2/1.4/1.6\", depth 22.5)."),
        click.option("--pixel-scale", default=None, type=float, help="Arcsec per pixel (overrides --survey)."),
        click.option("--psf-fwhm", default=None,
                     help="r-band PSF FWHM(s), arcsec, comma-separated (e.g. 1.2,1.4,1.6)."),
        click.option("--depth", default=None, type=float,
                     help="r-band 5-sigma point-source depth (AB); magnitude ranges follow it."),
    ]  # fmt: skip
    for o in reversed(opts):
        f = o(f)
    return f


def _conditions(survey, pixel_scale, psf_fwhm, depth):
    """The resolved :class:`~survey_engine.surveys.SurveyConditions`; one error line, exit 1."""
    from .surveys import resolve_conditions

    try:
        return resolve_conditions(survey, pixel_scale=pixel_scale, psf_fwhm=psf_fwhm, depth=depth)
    except ValueError as err:
        _fail(err)


# -- train ---------------------------------------------------------------------------------
@main.command()
@click.argument("out", type=click.Path())
@click.option("--samples", default=20000, show_default=True, type=int, help="Training stamps (blends).")
@click.option("--epochs", default=None, type=int,
              help="Default max(10, enough for 500 steps): many epochs over a few labels.")  # fmt: skip
@click.option("--batch-size", default=None, type=int,
              help="Default min(128, max(16, training stamps / 8)).")  # fmt: skip
@click.option("--lr", default=None, type=float, help="Peak learning rate (default 3e-3; 1e-3 with --init).")
@click.option("--device", default=None, type=click.Choice(["cpu", "cuda"]), help="Default: cuda if available.")
@click.option("--init", "init", default=None, help="Checkpoint to fine-tune ('default' = the shipped model).")
@click.option("--dataset", default=None, type=click.Path(),
              help="Existing training set (.zarr/.npz); else one is simulated.")  # fmt: skip
@_condition_options
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--max-minutes", default=None, type=float, help="Stop after about this long.")
def train(out, samples, epochs, batch_size, lr, device, init, dataset, survey, pixel_scale, psf_fwhm,
          depth, seed, max_minutes):  # fmt: skip
    """Train the U-Net deblender on artificially blended GalSim objects and write OUT.pt.

    The training set is simulated under the survey conditions (--survey, --pixel-scale,
    --psf-fwhm, --depth), recorded in the checkpoint; --init default fine-tunes the shipped
    model for them (a few hundred stamps suffice: docs/unet.md, "Transfer").
    """
    import tempfile

    from .unet.data import generate_training_set
    from .unet.train import train as _train

    given = [n for n, v in (("--survey", survey), ("--pixel-scale", pixel_scale), ("--psf-fwhm", psf_fwhm),
                            ("--depth", depth)) if v is not None]  # fmt: skip
    if dataset is not None and given:
        _fail(ValueError(f"{', '.join(given)} describe a simulated training set; --dataset has its own conditions"))
    cond = _conditions(survey, pixel_scale, psf_fwhm, depth)
    with tempfile.TemporaryDirectory(prefix="se_train_") as tmp:
        try:
            if dataset is None:
                dataset = str(Path(tmp) / "train.npz")
                click.echo(f"simulating a training set of {samples} blended stamps with GalSim (seed {seed}, "
                           f"{cond.name}: {cond.pixel_scale}\"/px, FWHM {', '.join(map(str, cond.psf_fwhm))}\", "
                           f"depth {cond.depth}) …")  # fmt: skip
                generate_training_set(dataset, samples=samples, seed=seed, overwrite=True, **cond.unet_options())
            history = _train(
                dataset, out, epochs=epochs, batch_size=batch_size, device=device, init=init,
                seed=seed, samples=samples, max_minutes=max_minutes, lr=lr,
            )  # fmt: skip
        except (ValueError, FileNotFoundError) as err:
            _fail(err)
    last = history[-1]
    click.echo(f"wrote {out}: {len(history)} epochs, validation IoU {last['val_iou']:.3f}, centre F1 "
               f"{last['val_centre_f1']:.3f}, blend recall {last['val_blend_recall']:.3f}")  # fmt: skip


# -- export-hats ---------------------------------------------------------------------------
@main.command("export-hats")
@click.argument("catalog", type=click.Path())
@click.argument("output_path", type=click.Path())
@click.option("--name", default="survey_engine", show_default=True, help="HATS catalog name.")
@click.option("--pixel-threshold", default=1_000_000, show_default=True, type=int,
              help="Rows per partition at most.")  # fmt: skip
@WORKERS
@SCHEDULER
def export_hats_cmd(catalog, output_path, name, pixel_threshold, workers, scheduler):
    """Write CATALOG (catalog.parquet) as a HATS catalog OUTPUT_PATH/NAME, readable by LSDB."""
    from .export import export_hats

    try:
        path = export_hats(catalog, output_path, name=name, pixel_threshold=pixel_threshold,
                           workers=workers, scheduler=scheduler)  # fmt: skip
    except (ValueError, FileNotFoundError, ImportError) as err:
        _fail(err)
    click.echo(f"HATS catalog: {path}  (lsdb.open_catalog({str(path)!r}))")


# -- train-classifier (issue 17: the stamp classifier, survey_engine.classify) ---------------
@main.command("train-classifier")
@click.argument("out", type=click.Path())
@click.option("--samples", default=40000, show_default=True, type=int, help="Simulated stamps.")
@click.option("--epochs", default=None, type=int,
              help="Default max(12, enough for 500 steps): many epochs over a few labels.")  # fmt: skip
@click.option("--batch-size", default=None, type=int, help="Default min(256, max(16, training stamps / 8)).")
@click.option("--lr", default=None, type=float, help="Peak learning rate (default 3e-3; 1e-3 with --init).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--init", default=None, help="Checkpoint to start from ('default': the shipped one).")
@_condition_options
@click.option("--max-minutes", default=None, type=float, help="Stop after this long.")
def train_classifier(out, samples, epochs, batch_size, lr, seed, init, survey, pixel_scale, psf_fwhm, depth,
                     max_minutes):  # fmt: skip
    """Simulate GalSim stars and galaxies and train the p_star / morphology CNN into OUT.

    The stamps are simulated under the survey conditions (--survey, --pixel-scale, --psf-fwhm,
    --depth), recorded in the checkpoint (its radii in arcsec are for that pixel scale);
    --init default fine-tunes the shipped model (docs/classify.md, "Transfer"). Use the result
    with survey-engine run --classifier-model OUT.
    """
    from .classify.train import train as train_stamps

    cond = _conditions(survey, pixel_scale, psf_fwhm, depth)
    try:
        info = train_stamps(out, samples=samples, epochs=epochs, seed=seed, init=init, batch_size=batch_size,
                            lr=lr, max_minutes=max_minutes, conditions=cond.classify_options())  # fmt: skip
    except (ValueError, FileNotFoundError) as err:
        _fail(err)
    last = info["history"][-1]
    click.echo(f"wrote {out}: {info['epochs']} epochs, validation AUC {last['val_auc']:.4f}, "
               f"bulge_fraction MAE {last['val_bf_mae']:.3f}")


if __name__ == "__main__":
    main()
