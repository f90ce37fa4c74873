"""Detection quality on a held-out simulated scene: survey_engine vs raw sep vs SExtractor.

Usage::

    python benchmarks/quality.py [--size 4096] [--deblenders sep,unet] [--workers 2]
                                 [--workdir DIR] [--no-write]

What it does, in one run:

1. simulates an r-band LSST-like mosaic with GalSim from the **held-out** seed
   :data:`HELD_OUT_SEED` (no test uses it, so no setting was tuned on this scene);
2. runs **survey_engine** with every deblender named in ``--deblenders`` (``sep``,
   ``unet``; unknown names are skipped with a message), detecting on r
   (``detection_band="r"``), tiled 1024 + 96 halo on a LocalCluster started beforehand;
3. runs **raw sep** on the whole image in memory with the same settings:
   ``sep.Background`` (128-px mesh, 3×3 filter), ``sep.extract`` with the per-pixel
   variance (matched filter: ``thresh`` = 1.5 × Σk/√Σk² = 4.0 with the 3×3 kernel),
   minarea 5, 32 thresholds, contrast 0.005, no cleaning; Kron radius and flux
   (2.5 × Kron, minimum 3.5) and half-light radius with neighbours masked by the
   segmentation map;
4. runs **SExtractor** (``source-extractor``; install with
   ``apt-get install -y source-extractor`` on Debian/Ubuntu; skipped with a message
   when absent) on a FITS copy of the image with the variance as ``MAP_VAR`` weight and
   matched settings (DETECT_THRESH 1.5, DETECT_MINAREA 5, the same 3×3 filter,
   DEBLEND_NTHRESH 32, DEBLEND_MINCONT 0.005, CLEAN N, BACK_SIZE 128,
   BACK_FILTERSIZE 3, PHOT_AUTOPARAMS 2.5, 3.5);
5. evaluates every catalog against the truth with :func:`survey_engine.evaluate.evaluate`
   (optimal one-to-one matching within 1″, bright sample r < 25), compares survey_engine
   with raw sep object by object, and, when ``../shared/data/real`` exists, repeats the
   real-image check of ``tests/test_real_image.py`` (survey_engine and raw sep against
   SExtractor's reference catalog of ``sep_image.fits``);
6. tabulates Δmag (median, MAD) against the truth per flux type (total/model, Kron/AUTO,
   PSF, isophotal, aperture, deblended) for isolated r < 23 galaxies, galaxies of pairs
   1–2″ (r < 24) and isolated stars, on the objects matched in every run, and the model
   fit's seconds per object (issue 16);
7. prints the tables and rewrites the ``<!-- quality:start -->`` …
   ``<!-- quality:end -->`` section of ``benchmarks/RESULTS.md`` (appended when absent;
   the rest of the file is left alone).

Takes about 2 minutes on 2 cores at the default size.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import astropy.units as u
import numpy as np
import sep
from astropy.io import ascii, fits
from astropy.table import QTable
from distributed import Client, LocalCluster

import survey_engine
from survey_engine import open_mosaic, read_catalog, run
from survey_engine.config import ScienceConfig
from survey_engine.deblend import deblender_class
from survey_engine.evaluate import evaluate, match_positions
from survey_engine.kernels.detect import DetectionConfig
from survey_engine.schema import Flag
from survey_engine.simulate import simulate

#: Seed of the benchmark scene. Held out: no test or other benchmark simulates with it.
HELD_OUT_SEED = 90417
BAND = "r"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
START, END = "<!-- quality:start -->", "<!-- quality:end -->"
APER_RADIUS, APER_TAG = 12.0, "12"  #: The circular aperture of the flux-type table (pixels).
#: Flux types of the flux-type table: label and column (without the band prefix) per kind of run.
FLUX_TYPES = {
    "engine": (("total (model)", "flux"), ("Kron", "kron_flux"), ("PSF", "psf_flux"),
               ("isophotal", "iso_flux"), (f"aperture r = {APER_RADIUS:g} px", f"aper_flux_{APER_TAG}"),
               ("deblended", "deblended_flux")),
    "other": (("Kron / AUTO", "flux"), ("isophotal", "iso_flux"),
              (f"aperture r = {APER_RADIUS:g} px", f"aper_flux_{APER_TAG}")),
}  # fmt: skip
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
SEX_PARAMS = (
    "NUMBER X_IMAGE Y_IMAGE XWIN_IMAGE YWIN_IMAGE X2_IMAGE Y2_IMAGE "
    "XY_IMAGE A_IMAGE B_IMAGE THETA_IMAGE KRON_RADIUS FLUX_AUTO FLUXERR_AUTO FLUX_RADIUS FLAGS "
    "FLUX_ISO FLUX_APER"
).split()


# ----------------------------------------------------------------------------------------
# Raw sep
# ----------------------------------------------------------------------------------------
def raw_sep(
    image: np.ndarray,
    variance: np.ndarray,
    bad: np.ndarray,
    *,
    thresh: float = 1.5,
    deblend_cont: float = 0.005,
    bw: int = 128,
    zero_point: float | None = None,
    background: np.ndarray | None = None,
) -> tuple[QTable, np.ndarray, float]:
    """sep on the whole image with survey_engine's settings; (catalog, segmentation, seconds).

    ``x``, ``y`` are windowed centroids (``sep.winpos``, σ = 2 × half-light radius / 2.35,
    as SExtractor's XWIN), ``x_iso``, ``y_iso`` sep's isophotal barycentres (the aperture
    centres). ``background`` replaces ``sep.Background`` when given.
    """
    det = DetectionConfig(thresh=thresh, deblend_cont=deblend_cont)
    t0 = time.perf_counter()
    if background is None:
        background = sep.Background(image, mask=bad, bw=bw, bh=bw, fw=3, fh=3).back()
    data = image - background
    sep.set_extract_pixstack(max(300_000, image.size))
    sep.set_sub_object_limit(4096)
    objs, seg = sep.extract(
        data, det.sep_thresh, var=variance, mask=bad, minarea=det.minarea,
        filter_kernel=det.kernel, deblend_nthresh=det.deblend_nthresh,
        deblend_cont=det.deblend_cont, clean=False, segmentation_map=True,
    )  # fmt: skip
    n = len(objs)
    ids = np.arange(1, n + 1, dtype=np.int32)
    x, y, a, b, th = (objs[k] for k in ("x", "y", "a", "b", "theta"))
    kron, _ = sep.kron_radius(data, x, y, a, b, th, 6.0, mask=bad, segmap=seg, seg_id=ids)
    kron = np.where(np.isfinite(kron) & (kron > 0), kron, 0.0)
    rk = np.maximum(2.5 * kron, 3.5)
    flux, _, _ = sep.sum_ellipse(
        data, x, y, a, b, th, rk, var=variance, mask=bad, segmap=seg, seg_id=ids, subpix=1
    )
    norm = np.where(flux > 0, flux, 1e-30)
    hlr, _ = sep.flux_radius(data, x, y, rk * a, 0.5, normflux=norm, mask=bad, subpix=1)
    hlr = np.where(np.isfinite(hlr) & (hlr > 0), hlr, np.sqrt(a * b))
    xw, yw, wflag = sep.winpos(data, x, y, 2.0 * hlr / 2.35, mask=bad)
    failed = (wflag != 0) | ~np.isfinite(xw) | (np.hypot(xw - x, yw - y) > 2.0 * hlr)
    xw, yw = np.where(failed, x, xw), np.where(failed, y, yw)
    wall = time.perf_counter() - t0
    cat = QTable()
    cat["id"] = ids.astype(np.int64)
    cat["x"], cat["y"] = xw * u.pix, yw * u.pix
    cat["x_iso"], cat["y_iso"] = x * u.pix, y * u.pix
    cat["x_peak"], cat["y_peak"] = objs["xpeak"].astype(np.int64), objs["ypeak"].astype(np.int64)
    cat[f"{BAND}_flux"] = flux
    cat[f"{BAND}_mag"] = _mag(flux, zero_point)
    cat[f"{BAND}_iso_flux"] = objs["flux"]
    cat[f"{BAND}_aper_flux_{APER_TAG}"] = sep.sum_circle(
        data, x, y, APER_RADIUS, var=variance, mask=bad, subpix=5
    )[0]
    x2, y2, xy = objs["x2"], objs["y2"], objs["xy"]
    cat["e1"], cat["e2"] = (x2 - y2) / (x2 + y2), 2 * xy / (x2 + y2)
    cat["half_light_radius"] = hlr * u.pix
    cat["flags"] = np.where((objs["flag"] & sep.OBJ_MERGED) != 0, int(Flag.BLENDED), 0)
    return cat, seg.astype(np.int64), wall


def _mag(flux: np.ndarray, zp: float | None) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, (zp or 0.0) - 2.5 * np.log10(flux), np.nan)


# ----------------------------------------------------------------------------------------
# SExtractor
# ----------------------------------------------------------------------------------------
def sextractor_binary() -> str | None:
    """Path of the SExtractor executable (``source-extractor`` or ``sex``), or None."""
    return shutil.which("source-extractor") or shutil.which("sex")


def sextractor_version(binary: str) -> str:
    """Version string printed by ``binary -v``."""
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).strip().splitlines()[0]


def run_sextractor(
    binary: str,
    image: np.ndarray,
    variance: np.ndarray | None,
    workdir: Path,
    *,
    settings: dict[str, str],
) -> tuple[QTable, np.ndarray, float]:
    """Run SExtractor on ``image``; (its catalog with 0-based x/y, segmentation, seconds)."""
    workdir.mkdir(parents=True, exist_ok=True)
    fits.writeto(workdir / "image.fits", image.astype(np.float32), overwrite=True)
    cfg = {
        "CATALOG_NAME": str(workdir / "cat.txt"),
        "CATALOG_TYPE": "ASCII_HEAD",
        "PARAMETERS_NAME": str(workdir / "cat.param"),
        "FILTER": "Y",
        "FILTER_NAME": str(workdir / "pyramid.conv"),
        "CHECKIMAGE_TYPE": "SEGMENTATION",
        "CHECKIMAGE_NAME": str(workdir / "seg.fits"),
        "MEMORY_PIXSTACK": str(max(300_000, image.size // 2)),
        "MEMORY_OBJSTACK": "60000",
        "MEMORY_BUFSIZE": "4096",
        "VERBOSE_TYPE": "QUIET",
        "WRITE_XML": "N",
        **settings,
    }
    if variance is not None:
        var = np.where(np.isfinite(variance), variance, 1e30).astype(np.float32)
        fits.writeto(workdir / "var.fits", var, overwrite=True)
        cfg |= {
            "WEIGHT_TYPE": "MAP_VAR",
            "WEIGHT_IMAGE": str(workdir / "var.fits"),
            "WEIGHT_THRESH": "1e29",
        }
    (workdir / "cat.param").write_text("\n".join(SEX_PARAMS) + "\n")
    (workdir / "pyramid.conv").write_text(
        "CONV NORM\n# 3x3 pyramid, as survey_engine and sep\n1 2 1\n2 4 2\n1 2 1\n"
    )
    (workdir / "default.sex").write_text("".join(f"{k:16s} {v}\n" for k, v in cfg.items()))
    cmd = [binary, str(workdir / "image.fits"), "-c", str(workdir / "default.sex")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        msg = f"SExtractor failed ({proc.returncode}): {proc.stderr[-2000:]}"
        raise RuntimeError(msg)
    raw = ascii.read(workdir / "cat.txt", format="sextractor")
    seg = fits.getdata(workdir / "seg.fits").astype(np.int64)
    cat = QTable()
    cat["id"] = np.asarray(raw["NUMBER"], np.int64)
    # SExtractor's pixel coordinates are 1-based.
    cat["x"] = (np.asarray(raw["XWIN_IMAGE"], float) - 1.0) * u.pix
    cat["y"] = (np.asarray(raw["YWIN_IMAGE"], float) - 1.0) * u.pix
    cat["x_iso"] = (np.asarray(raw["X_IMAGE"], float) - 1.0) * u.pix
    cat["y_iso"] = (np.asarray(raw["Y_IMAGE"], float) - 1.0) * u.pix
    flux = np.asarray(raw["FLUX_AUTO"], float)
    cat[f"{BAND}_flux"] = flux
    cat[f"{BAND}_mag"] = _mag(flux, float(settings.get("MAG_ZEROPOINT", 0.0)))
    cat[f"{BAND}_iso_flux"] = np.asarray(raw["FLUX_ISO"], float)
    cat[f"{BAND}_aper_flux_{APER_TAG}"] = np.asarray(raw["FLUX_APER"], float)
    x2, y2, xy = (np.asarray(raw[k], float) for k in ("X2_IMAGE", "Y2_IMAGE", "XY_IMAGE"))
    cat["e1"], cat["e2"] = (x2 - y2) / (x2 + y2), 2 * xy / (x2 + y2)
    cat["half_light_radius"] = np.asarray(raw["FLUX_RADIUS"], float) * u.pix
    cat["flags"] = np.where((np.asarray(raw["FLAGS"]) & 2) != 0, int(Flag.BLENDED), 0)
    return cat, seg, wall


def matched_settings(
    zero_point: float, pixel_scale: float, seeing: float, saturation: float | None
) -> dict[str, str]:
    """SExtractor settings matching survey_engine's defaults."""
    return {
        "DETECT_TYPE": "CCD",
        "DETECT_MINAREA": "5",
        "DETECT_THRESH": "1.5",
        "ANALYSIS_THRESH": "1.5",
        "THRESH_TYPE": "RELATIVE",
        "DEBLEND_NTHRESH": "32",
        "DEBLEND_MINCONT": "0.005",
        "CLEAN": "N",
        "MASK_TYPE": "CORRECT",
        "PHOT_AUTOPARAMS": "2.5, 3.5",
        "PHOT_FLUXFRAC": "0.5",
        "PHOT_APERTURES": f"{2 * APER_RADIUS:g}",  # a diameter
        "SATUR_LEVEL": f"{saturation or 1e20}",  # flags only; ≤ 1e30 is refused
        "MAG_ZEROPOINT": f"{zero_point}",
        "GAIN": "0.0",
        "PIXEL_SCALE": f"{pixel_scale}",
        "SEEING_FWHM": f"{seeing}",
        "BACK_TYPE": "AUTO",
        "BACK_SIZE": "128",
        "BACK_FILTERSIZE": "3",
        "BACKPHOTO_TYPE": "GLOBAL",
        "INTERP_TYPE": "NONE",
    }


# ----------------------------------------------------------------------------------------
# survey_engine
# ----------------------------------------------------------------------------------------
def available_deblender(name: str) -> str | None:
    """None if survey_engine knows deblender ``name``, else the reason it does not."""
    try:
        deblender_class(name)
    except ValueError as err:
        return str(err)
    return None


def engine_background(outdir: Path, m) -> np.ndarray:
    """The background survey_engine subtracted in a run (rebuilt from its ``background.npz``)."""
    from survey_engine.kernels.background import filter_mesh, interpolate_background
    from survey_engine.store import PartStore

    cfg = ScienceConfig()
    b = m.band_index(BAND)
    level, rms = PartStore(outdir).load_background()
    mesh = filter_mesh(level[b], rms[b], cfg.background_box, (m.ny, m.nx),
                       filter_size=cfg.background_filter)  # fmt: skip
    return interpolate_background(mesh, 0, m.ny, 0, m.nx)


def engine_run(mosaic: str, outdir: Path, client, deblender: str, **params):
    """One survey_engine run; (catalog, segmentation path, seconds); its stage seconds in
    :data:`ENGINE_STAGES` under ``outdir``'s name."""
    t0 = time.perf_counter()
    res = run(
        mosaic, outdir, client=client, deblender=deblender, overwrite=True, progress=False, **params
    )
    wall = time.perf_counter() - t0
    ENGINE_STAGES[Path(outdir).name] = dict(res.stages or {})
    return read_catalog(res.catalog_path), res.segmentation_path, wall


#: Seconds per stage of each survey_engine run (summed over workers), by output directory name.
ENGINE_STAGES: dict[str, dict[str, float]] = {}


# ----------------------------------------------------------------------------------------
# Comparisons and the report
# ----------------------------------------------------------------------------------------
def compare_catalogs(a: QTable, b: QTable, flux_a: str, flux_b: str, radius: float = 0.5) -> dict:
    """Object-by-object comparison of two catalogs of the same image.

    Matched on the isophotal barycentres ``x_iso``/``y_iso`` (the aperture centres),
    pixels, within ``radius``; ``same_peak`` is the fraction of matched pairs with the
    same peak pixel (NaN when a catalog has no ``x_peak``/``y_peak``).
    """
    ai, bi, d = match_positions(
        _v(a["x_iso"]), _v(a["y_iso"]), _v(b["x_iso"]), _v(b["y_iso"]), radius, method="optimal"
    )
    fa, fb = _v(a[flux_a])[ai], _v(b[flux_b])[bi]
    ok = (fa > 0) & (fb > 0)
    ratio = fa[ok] / fb[ok]
    same_peak = float("nan")
    if len(ai) and all("x_peak" in t.colnames and "y_peak" in t.colnames for t in (a, b)):
        same_peak = float(
            np.mean(
                (_v(a["x_peak"])[ai] == _v(b["x_peak"])[bi])
                & (_v(a["y_peak"])[ai] == _v(b["y_peak"])[bi])
            )
        )
    return {
        "same_peak": same_peak,
        "n_a": len(a),
        "n_b": len(b),
        "matched": len(ai),
        "frac_a": len(ai) / max(len(a), 1),
        "frac_b": len(ai) / max(len(b), 1),
        "dist_median": float(np.median(d)) if len(d) else float("nan"),
        "ratio_median": float(np.median(ratio)) if len(ratio) else float("nan"),
        "ratio_p10": float(np.percentile(ratio, 10)) if len(ratio) else float("nan"),
        "ratio_p90": float(np.percentile(ratio, 90)) if len(ratio) else float("nan"),
        "within_1pct": float(np.mean(np.abs(ratio - 1) < 0.01)) if len(ratio) else float("nan"),
    }


def _v(col) -> np.ndarray:
    return np.asarray(getattr(col, "value", col), dtype=np.float64)


def _f(v, fmt=".3f") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return format(v, fmt)


def quality_row(name: str, wall: float, s: dict) -> str:
    """One Markdown row of the truth-based table."""
    bins = {(round(b["lo"], 2), round(b["hi"], 2)): b for b in s["pairs"]["bins"]}

    def pair(lo, hi):
        b = bins.get((lo, hi))
        return "–" if b is None else f"{_f(b['fraction'], '.2f')} ({b['both']}/{b['n']})"

    def dm(key):
        d = s["dmag"].get(key)
        return "–" if d is None else f"{_f(d['median'], '+.3f')} ± {_f(d['scatter'])}"

    iou = s["segmentation_iou"]
    c24 = next(
        (r for r in s["magnitude_bins"] if r["lo"] == 23.5 and r["hi"] == 24.0),
        {"completeness": None},
    )
    return (
        f"| {name} | {wall:.1f} s | {s['n_catalog']:,} | {s['n_matched']:,} | "
        f"{_f(s['completeness_bright'])} ({_f(s['completeness_bright_isolated'])} / "
        f"{_f(s['completeness_bright_blended'])}) | {_f(c24['completeness'])} | {_f(s['purity'])} | "
        f"{_f(s['mag_complete_90'], '.2f')} / {_f(s['mag_complete_50'], '.2f')} | "
        f"{pair(0.0, 0.4)} | {pair(0.4, 1.0)} | {pair(1.0, 2.0)} | {dm('isolated')} | "
        f"{dm('blended')} | {_f(s['position']['dx']['scatter'], '.3f')} | "
        f"{_f(iou['median'] if iou else None, '.3f')} |"
    )


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace the quality section of RESULTS.md (append it when absent)."""
    block = f"{START}\n{text.rstrip()}\n{END}"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if START in old and END in old and old.index(START) < old.index(END):
        new = old[: old.index(START)] + block + old[old.index(END) + len(END) :]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(new)
    os.replace(tmp, path)


def real_image_check(binary: str | None, workdir: Path, client) -> tuple[list[str], list[str]]:
    """survey_engine / raw sep / our SExtractor run vs SExtractor's reference catalog of sep_image.fits."""
    from survey_engine import ingest_fits
    from survey_engine.ingest import IngestWarning

    ref = ascii.read(REAL / "sep_image.cat", format="sextractor")
    refc = QTable()
    refc["x_iso"], refc["y_iso"] = ref["X_IMAGE"] - 1.0, ref["Y_IMAGE"] - 1.0
    refc["flux"] = ref["FLUX_AUTO"]  # this image records no PSF: survey_engine's flux is Kron
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IngestWarning)  # ESO-LOG cards, no WCS
        m = ingest_fits(
            REAL / "sep_image.fits", workdir / "real.zarr", overwrite=True, progress=False
        )
    rows, notes = [], []
    # Settings of sep_default.sex: no deblending (MINCONT 1.0), BACK_SIZE 64.
    cat, _, wall = engine_run(
        str(workdir / "real.zarr"), workdir / "real_run", client, "sep", tile=128, halo=32,
        deblend_cont=1.0, background_box=64,
    )  # fmt: skip
    rows.append(
        ("survey_engine (sep), tile 128", wall, compare_catalogs(cat, refc, "flux", "flux", 1.0))
    )
    reg = m.read((0, m.ny), (0, m.nx))
    image, var = reg.image[0], reg.variance[0]
    raw, _, wall = raw_sep(image, var, np.zeros(image.shape, bool), deblend_cont=1.0, bw=64)
    rows.append(("raw sep", wall, compare_catalogs(raw, refc, f"{BAND}_flux", "flux", 1.0)))
    if binary:
        settings = {
            "DETECT_MINAREA": "5", "DETECT_THRESH": "1.5", "ANALYSIS_THRESH": "1.5",
            "DEBLEND_NTHRESH": "32", "DEBLEND_MINCONT": "1.0", "CLEAN": "Y", "CLEAN_PARAM": "1.0",
            "PHOT_AUTOPARAMS": "2.5, 0.0", "PHOT_FLUXFRAC": "0.5", "SATUR_LEVEL": "50000.0",
            "GAIN": "0.0", "BACK_SIZE": "64", "BACK_FILTERSIZE": "3", "BACKPHOTO_TYPE": "GLOBAL",
        }  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the non-standard ESO-LOG header cards
            image_fits = fits.getdata(REAL / "sep_image.fits").astype(np.float32)
        sx, _, wall = run_sextractor(
            binary, image_fits, None, workdir / "real_sex", settings=settings
        )
        rows.append((f"SExtractor rerun here ({sextractor_version(binary).split('(')[0].strip()})", wall,
                     compare_catalogs(sx, refc, f"{BAND}_flux", "flux", 1.0)))  # fmt: skip
    else:
        notes.append("SExtractor rerun skipped: not installed.")
    out = [
        "| run on sep_image.fits | wall | objects | reference objects matched (≤ 1 px) | "
        "median offset | flux ÷ FLUX_AUTO: median (10–90 %) |",
        "|---|---|---|---|---|---|",
    ]
    for name, wall, c in rows:
        out.append(
            f"| {name} | {wall:.2f} s | {c['n_a']} | {c['matched']} / {c['n_b']} "
            f"({c['frac_b']:.3f}) | {c['dist_median']:.3f} px | {c['ratio_median']:.3f} "
            f"({c['ratio_p10']:.2f}–{c['ratio_p90']:.2f}) |"
        )
    return out, notes


def flux_samples(truth: QTable, zp: float, pixel_scale: float, mag_max: float = 23.0,
                 pair_mag_max: float = 24.0) -> dict:  # fmt: skip
    """Truth rows of the flux-type table: isolated r < ``mag_max`` galaxies (no truth
    neighbour within 2″ with ≥ 10 % of the flux), galaxies r < ``pair_mag_max`` of pairs
    1–2″ (such a neighbour at 1–2″, none closer) and isolated r < ``mag_max`` stars."""
    from survey_engine.evaluate._metrics import close_pairs

    x, y = _v(truth["x"]), _v(truth["y"])
    tmag = _v(truth[f"{BAND}_mag"])
    flux = 10.0 ** (-0.4 * tmag)
    i, j, sep_pix = close_pairs(x, y, 2.0 / pixel_scale)
    sep_as = sep_pix * pixel_scale
    near = np.full(len(truth), np.inf)
    for a, b in ((i, j), (j, i)):  # a's neighbour b, counted if ≥ 10 % of a's flux
        ok = flux[b] >= 0.1 * flux[a]
        np.minimum.at(near, a[ok], sep_as[ok])
    galaxy = np.asarray(truth["kind"]) == "galaxy"
    bright = tmag < mag_max
    return {"isolated": np.flatnonzero(galaxy & bright & ~np.isfinite(near)),
            "pairs 1–2″": np.flatnonzero(galaxy & (tmag < pair_mag_max) & (near >= 1.0) & (near < 2.0)),
            "stars": np.flatnonzero(~galaxy & bright & ~np.isfinite(near))}  # fmt: skip


def flux_type_table(runs: dict, truth: QTable, zp: float, pixel_scale: float) -> tuple[list[str], dict]:
    """Δmag (median, MAD) against the truth per run and flux type.

    ``runs``: name → (catalog, kind ``"engine"``/``"other"``). Each sample holds only the
    truth objects matched (within 1″) in every run, so all rows see the same objects.
    Returns the table's lines and ``{(run, flux label, sample): stats}``.
    """
    from survey_engine.evaluate._metrics import MAD_TO_SIGMA, robust_stats

    samples = flux_samples(truth, zp, pixel_scale)
    tx, ty = _v(truth["x"]), _v(truth["y"])
    tmag = _v(truth[f"{BAND}_mag"])
    matches = {}
    for name, (cat, _) in runs.items():
        ci, ti, _ = match_positions(_v(cat["x"]), _v(cat["y"]), tx, ty, 1.0 / pixel_scale)
        row = np.full(len(truth), -1)
        row[ti] = ci
        matches[name] = row
    common = np.all([r >= 0 for r in matches.values()], axis=0)
    stats = {}
    lines = [
        "| run | flux | isolated r < 23 galaxies: median Δmag | MAD | pairs 1–2″, r < 24: median | "
        "MAD | isolated r < 23 stars: median | MAD |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (cat, kind) in runs.items():
        for label, col in FLUX_TYPES[kind]:
            key = f"{BAND}_{col}"
            if key not in cat.colnames:
                continue
            f = _v(cat[key])
            cells = []
            for sample, rows in samples.items():
                rows = rows[common[rows]]
                with np.errstate(divide="ignore", invalid="ignore"):
                    fm = f[matches[name][rows]]
                    dmag = np.where(fm > 0, zp - 2.5 * np.log10(np.where(fm > 0, fm, 1.0)), 99.0) - tmag[rows]
                st = robust_stats(dmag)
                stats[(name, label, sample)] = st
                cells += [f"{st['median']:+.3f}", f"{st['scatter'] / MAD_TO_SIGMA:.3f}"]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    n = {k: int(common[v].sum()) for k, v in samples.items()}
    lines.append("")
    lines.append(f"Objects (matched within 1″ in every run): {n['isolated']:,} isolated galaxies, "
                 f"{n['pairs 1–2″']:,} galaxies of pairs 1–2″, {n['stars']:,} isolated stars.")  # fmt: skip
    return lines, stats


def main() -> None:
    """Run the benchmark, print the tables and update RESULTS.md."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096, help="Mosaic side (px).")
    ap.add_argument(
        "--deblenders", default="sep", help="Comma-separated survey_engine deblenders to run."
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--halo", type=int, default=96)  # ≥ the unet deblender's receptive field
    ap.add_argument("--workdir", default=None, help="Scratch directory (default: a temporary one).")
    ap.add_argument("--no-write", action="store_true", help="Do not touch RESULTS.md.")
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="se_quality_"))
    workdir.mkdir(parents=True, exist_ok=True)
    binary = sextractor_binary()
    sx_version = sextractor_version(binary) if binary else None
    machine = (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, survey_engine {survey_engine.__version__}, sep "
        f"{sep.__version__}, {sx_version or 'SExtractor not installed'}"
    )
    print(f"machine: {machine}")
    notes: list[str] = []
    if binary is None:
        msg = (
            "SExtractor not found (no source-extractor or sex on PATH): its rows are skipped. "
            "Install it with `apt-get install -y source-extractor`."
        )
        print(msg, file=sys.stderr)
        notes.append(msg)

    rows_q: list[str] = []
    with (
        LocalCluster(
            n_workers=args.workers, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        mosaic = str(workdir / "mosaic.zarr")
        t0 = time.perf_counter()
        sim = simulate(
            mosaic, size=args.size, bands=(BAND,), seed=HELD_OUT_SEED, client=client,
            truth=str(workdir / "truth.parquet"), overwrite=True, progress=False,
        )  # fmt: skip
        print(f"simulated {args.size}² {BAND} mosaic, seed {HELD_OUT_SEED} (held out), "
              f"{len(sim.truth):,} objects, in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        m = open_mosaic(mosaic)
        zp = m.zero_points[BAND]
        ev_kw = {"mosaic": m, "radius": 1.0, "mag_limit": 25.0}

        engine_cats, engine_walls = {}, {}
        for name in [d.strip() for d in args.deblenders.split(",") if d.strip()]:
            why = available_deblender(name)
            if why is not None:
                msg = f"deblender {name!r} skipped: {why}"
                print(msg, file=sys.stderr)
                notes.append(msg)
                continue
            try:
                cat, seg_path, wall = engine_run(
                    mosaic, workdir / f"run_{name}", client, name, tile=args.tile, halo=args.halo,
                    detection_band=BAND,
                )  # fmt: skip
            except Exception as err:  # a deblender that exists but cannot run here
                msg = f"deblender {name!r} failed: {type(err).__name__}: {err}"
                print(msg, file=sys.stderr)
                notes.append(msg)
                continue
            engine_cats[name] = cat
            engine_walls[name] = wall
            ev = evaluate(cat, sim.truth, segmentation=seg_path, **ev_kw)
            ev.plot(workdir / f"plots_{name}")
            label = f"survey_engine ({name}), {args.workers} workers, tile {args.tile}"
            rows_q.append(quality_row(label, wall, ev.summary))
            print(ev.table())

    reg = m.read((0, m.ny), (0, m.nx))
    image, var = reg.image[0], reg.variance[0]
    bad = (reg.mask[0] != 0) | ~np.isfinite(var)
    var_sep = np.where(bad, 1.0, var).astype(np.float32)
    raw, raw_seg, wall = raw_sep(image, var_sep, bad, zero_point=zp)
    ev = evaluate(raw, sim.truth, segmentation=raw_seg, **ev_kw)
    rows_q.append(quality_row("raw sep, 1 core, in memory", wall, ev.summary))

    if binary:
        settings = matched_settings(
            zp, m.pixel_scale or 0.2, m.psf_fwhm.get(BAND) or 0.7,
            m.attrs.get("saturation", {}).get(BAND),
        )  # fmt: skip
        sx, sx_seg, wall = run_sextractor(binary, image, var, workdir / "sex", settings=settings)
        ev = evaluate(sx, sim.truth, segmentation=sx_seg, **ev_kw)
        rows_q.append(quality_row("SExtractor 2.25, 1 core (process)", wall, ev.summary))
    else:
        sx = None

    runs = {f"survey_engine ({k})": (c, "engine") for k, c in engine_cats.items()}
    runs["raw sep"] = (raw, "other")
    if sx is not None:
        runs["SExtractor"] = (sx, "other")
    flux_lines, _ = flux_type_table(runs, sim.truth, zp, m.pixel_scale or 0.2)
    cost_lines = []
    for k, c in engine_cats.items():
        st = ENGINE_STAGES.get(f"run_{k}", {})
        busy = sum(st.values())
        model = st.get("model", float("nan"))
        cost_lines.append(
            f"| survey_engine ({k}) | {len(c):,} | {engine_walls[k]:.1f} s | {busy:.1f} s | "
            f"{model:.1f} s | {1e3 * model / max(len(c), 1):.2f} ms | {_f(model / busy if busy else np.nan)} |"
        )
    for line in flux_lines:
        print(line)
    flux, kron = f"{BAND}_flux", f"{BAND}_kron_flux"  # survey_engine's flux is the model's
    cmp_rows = []
    if "sep" in engine_cats:
        cat = engine_cats["sep"]
        cmp_rows.append(("survey_engine (sep) vs raw sep", compare_catalogs(cat, raw, kron, flux)))
        try:
            bkg = engine_background(workdir / "run_sep", m)
        except (OSError, KeyError, ValueError) as err:
            notes.append(f"raw sep on survey_engine's background skipped: {err}")
        else:
            raw_eb, _, _ = raw_sep(image, var_sep, bad, zero_point=zp, background=bkg)
            cmp_rows.append((
                "survey_engine (sep) vs raw sep given survey_engine's background",
                compare_catalogs(cat, raw_eb, kron, flux),
            ))  # fmt: skip
        if sx is not None:
            cmp_rows.append(("survey_engine (sep) vs SExtractor", compare_catalogs(cat, sx, kron, flux)))  # fmt: skip
    if sx is not None:
        cmp_rows.append(("raw sep vs SExtractor", compare_catalogs(raw, sx, flux, flux)))

    real_rows: list[str] = []
    if REAL.is_dir():
        with (
            LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):  # fmt: skip
            real_rows, real_notes = real_image_check(binary, workdir / "real", client)
        notes += real_notes
    else:
        notes.append(f"real-image check skipped: {REAL} not found.")

    today = datetime.date.today().isoformat()
    n_truth = len(sim.truth)
    lines = [
        f"## Detection quality: `benchmarks/quality.py` ({today})",
        "",
        f"`python benchmarks/quality.py --size {args.size} --deblenders {args.deblenders}` — "
        f"GalSim {BAND}-band mosaic {args.size}² at LSST depth, {n_truth:,} truth objects "
        f"(r ≤ 27), **held-out seed {HELD_OUT_SEED}** (used by no test). Every catalog is "
        "matched one to one to the truth (optimal assignment, radius 1″ = 5 px) by "
        "`survey_engine.evaluate`; *bright* = truth r < 25; *blended* = a truth neighbour "
        "within 2″ with ≥ 10 % of the flux. Settings matched: 1.5 σ per pixel, minarea 5, "
        "3×3 pyramid filter, 32 thresholds, contrast 0.005, no cleaning, 128-px background "
        "mesh, Kron 2.5 (min 3.5). Machine: " + machine + ".",
        "",
        "| run | wall | detections | matched | completeness r < 25 (isolated / blended) | "
        "compl. 23.5–24 | purity | r at 90 % / 50 % compl. | pairs both found 0–0.4″ | "
        "0.4–1″ | 1–2″ | Δmag isolated (median ± σ) | Δmag blended | σ(dx) px | IoU median |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows_q,
        "",
        "Wall: survey_engine end to end on a LocalCluster started beforehand (background, "
        "tiles, retry pass, segmentation map, Parquet); raw sep in memory on one core; "
        "SExtractor as one process reading FITS (writing the FITS files is not counted). "
        "Δmag is the catalog's magnitude − true total magnitude: survey_engine's total "
        "(model-fit) flux, raw sep's Kron and SExtractor's AUTO flux (Kron apertures miss a few "
        "% of the light; the flux-type table below compares like with like). IoU: catalog footprint vs noiseless truth footprint.",
        "",
        "Object by object on the same image: isophotal barycentres (the aperture centres) "
        "matched one to one within 0.5 px; *same peak* = matched pairs with the same peak "
        "pixel; flux = Kron / AUTO (survey_engine's `r_kron_flux`).",
        "",
        "| comparison (a vs b) | objects a / b | matched | fraction of a / of b | same peak | "
        "median offset | flux ratio a ÷ b: median (10–90 %) | within 1 % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in cmp_rows:
        lines.append(
            f"| {name} | {c['n_a']:,} / {c['n_b']:,} | {c['matched']:,} | {c['frac_a']:.4f} / "
            f"{c['frac_b']:.4f} | {_f(c['same_peak'], '.4f')} | {c['dist_median']:.4f} px | "
            f"{c['ratio_median']:.4f} ({c['ratio_p10']:.3f}–{c['ratio_p90']:.3f}) | "
            f"{c['within_1pct']:.3f} |"
        )
    lines += [
        "",
        "Δmag per flux type (issue 16): catalog magnitude of that flux − true total magnitude, "
        "on the same truth objects for every run (matched within 1″ in all of them); MAD = "
        "median |Δmag − median| (the robust σ of the tables above is 1.4826 × MAD). *Isolated*: no truth neighbour within 2″ with ≥ 10 % of the flux; "
        "*pairs 1–2″*: r < 24 galaxies with such a neighbour at 1–2″ and none closer. *Total (model)* = the "
        "`flux` column (PSF-convolved exponential + de Vaucouleurs fit, "
        "`survey_engine.model_photometry`); SExtractor has no PSF or model fluxes here (no PSFEx).",
        "",
        *flux_lines,
        "",
        "Cost of the model fit: seconds in the `model` stage summed over the workers, per "
        "catalog object, and as a fraction of all timed stage seconds.",
        "",
        "| run | objects | wall | stage seconds (all) | model stage | per object | fraction |",
        "|---|---|---|---|---|---|---|",
        *cost_lines,
    ]
    if real_rows:
        lines += [
            "",
            "Real image (`../shared/data/real/sep_image.fits`, 256², no WCS, variance estimated "
            "by the ingest) against SExtractor's reference catalog `sep_image.cat` "
            "(X/Y_IMAGE made 0-based), with the settings of `sep_default.sex`: no deblending, "
            "BACK_SIZE 64; SExtractor also cleans, survey_engine and sep never do. "
            "`tests/test_real_image.py` asserts the survey_engine row.",
            "",
            *real_rows,
        ]
    if notes:
        lines += ["", *[f"* {n}" for n in notes]]
    section = "\n".join(lines)
    print()
    print(section)
    if not args.no_write:
        write_section(section)
        print(f"\nwrote the quality section of {RESULTS}")
    print(f"scratch files and plots: {workdir}")


if __name__ == "__main__":
    main()
