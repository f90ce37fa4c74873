"""Crowded fields: cost and detection quality from a sparse field to a globular-cluster core.

Usage::

    python benchmarks/crowded.py [--size 1024] [--densities 0,0.01,0.1] [--bands r]
                                 [--workers 2] [--tile 512] [--workdir DIR] [--out results.json]

What it does, in one run, for each core density (stars per px² brighter than the 5σ depth at
the cluster centre; 0 = the plain field):

1. simulates the usual GalSim field (galaxies + stars, seed 90418) plus a King-profile cluster
   (``survey_engine.simulate.KingCluster``, core radius ``size / 8``, tidal radius ``size / 2``,
   distance modulus 18: turn-off at r = 22) of the richness that gives that core density;
2. runs ``survey_engine.run`` with ``deblender="sep"`` and ``deblender="unet"`` on a LocalCluster
   started beforehand (its start-up not counted), detecting on r;
3. runs **raw sep as a user would tune it** on the whole r image in memory: the sub-object limit
   raised (``sep.set_sub_object_limit(4096)``), a grid of background meshes 8/16/32/64 px ×
   thresholds 1.5/3/5/10 σ per pixel (``err`` = √variance), minarea 5, 32 thresholds, contrast
   0.005, no cleaning, Kron photometry (2.5 Kron radii, minimum 3.5 px);
4. matches every catalog to the truth one to one (optimal assignment, radius 1 px) and reports
   completeness per truth r magnitude, and purity: the matched fraction of the detections whose
   measured r is brighter than the depth.

*Tuned raw sep* is the grid point with the highest completeness at ``m_eval`` = depth − 1 (truth
r in ``[m_eval − 0.25, m_eval + 0.25)``) among those with purity ≥ ``--purity-floor``; for the
"unet ÷ tuned sep" ratio the grid point must instead reach at least the unet's own purity
(equal-or-better purity). Costs are wall seconds per Mpx (mosaic pixels per band): survey_engine
on all the workers (the first field's timed run follows an untimed warm-up run of each deblender),
raw sep on one core in memory, for the grid point shown.
The unet in the densest field dominates the time: 1024², densities 0 and 0.1 took 9.7 minutes on
2 cores shared with other jobs (load ≈ 12), 7 of them in that one unet run; the defaults (three
fields) should take 5–10 minutes on 2 idle cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import sep
from distributed import Client, LocalCluster

import survey_engine
from survey_engine import open_mosaic, read_catalog, run
from survey_engine.evaluate import match_positions
from survey_engine.evaluate._metrics import binned_fraction
from survey_engine.simulate import KingCluster, simulate

SEED = 90418  #: Seed of the benchmark scenes (no test uses it).
MESHES = (8, 16, 32, 64)
THRESHOLDS = (1.5, 3.0, 5.0, 10.0)
MAG_EDGES = (16.0, 20.0, 22.0, 23.0, 24.0, 25.0, 25.5, 26.0, 26.5, 27.0)
MATCH_RADIUS = 1.0  #: pixels
MAX_MAG = 27.0


def cluster_for(density: float, size: int, depth: float) -> KingCluster | None:
    """The cluster whose centre has ``density`` stars per px² brighter than ``depth``."""
    if density <= 0:
        return None
    unit = KingCluster(1, core_radius=size / 8, tidal_radius=size / 2)
    per_star = float(unit.surface_density(0.0) * unit.fraction_brighter(depth, MAX_MAG))
    return KingCluster(round(density / per_star), core_radius=size / 8, tidal_radius=size / 2)


def quality(cx, cy, cmag, truth, depth: float) -> dict:
    """Completeness per truth magnitude, purity brighter than the depth, at 1-px matching."""
    tx, ty = np.asarray(truth["x"].value), np.asarray(truth["y"].value)
    tmag = np.asarray(truth["r_mag"].value)
    ci, ti, _ = match_positions(cx, cy, tx, ty, MATCH_RADIUS)
    found = np.zeros(len(tx), bool)
    found[ti] = True
    matched = np.zeros(len(cx), bool)
    matched[ci] = True
    bright = np.isfinite(cmag) & (cmag < depth)
    m_eval = depth - 1.0
    sel = (tmag >= m_eval - 0.25) & (tmag < m_eval + 0.25)
    return {
        "n_detected": len(cx),
        "purity": float(matched[bright].mean()) if bright.any() else math.nan,
        "completeness_eval": float(found[sel].mean()) if sel.any() else math.nan,
        "completeness": [b["fraction"] for b in binned_fraction(tmag, found, MAG_EDGES)],
    }


def raw_sep(image, variance, mesh: int, thresh: float) -> tuple[float, np.ndarray, ...]:
    """One raw sep run: background, extraction, Kron photometry; (seconds, x, y, mag)."""
    t0 = time.perf_counter()
    bkg = sep.Background(image, bw=mesh, bh=mesh)
    data = image - bkg.back()
    err = np.sqrt(variance)
    objs = sep.extract(data, thresh, err=err, minarea=5, deblend_nthresh=32,
                       deblend_cont=0.005, clean=False)  # fmt: skip
    x, y, a, b, th = (objs[k] for k in ("x", "y", "a", "b", "theta"))
    a = np.maximum(a, 0.1)
    b = np.clip(b, 0.1, a)
    th = np.clip(th, -math.pi / 2, math.pi / 2)
    kron, _ = sep.kron_radius(data, x, y, a, b, th, 6.0)
    kron = np.where(np.isfinite(kron) & (kron > 0), kron, 1.0)
    r = np.maximum(2.5 * kron, 3.5 / np.sqrt(a * b))
    flux, _, _ = sep.sum_ellipse(data, x, y, a, b, th, r, subpix=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mag = np.where(flux > 0, 28.0 - 2.5 * np.log10(flux), np.nan)
    return time.perf_counter() - t0, x, y, mag


def engine(mosaic: str, deblender: str, client, tile: int, workdir: Path) -> tuple:
    """One survey_engine run: (wall seconds, x, y, r mag, per-stage worker seconds)."""
    out = workdir / f"run_{deblender}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = run(mosaic, out, tile=tile, deblender=deblender, client=client, progress=False,
              detection_band="r")  # fmt: skip
    wall = time.perf_counter() - t0
    cat = read_catalog(res.catalog_path)
    shutil.rmtree(out, ignore_errors=True)
    mag = np.asarray(getattr(cat["r_mag"], "value", cat["r_mag"]), float)
    return wall, cat["x"].value, cat["y"].value, mag, dict(res.timings)


def _f(v, fmt=".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def main() -> None:
    """Run the benchmark and print its tables."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--densities", default="0,0.01,0.1",
                    help="core densities (stars per px² brighter than the depth); 0 = no cluster")  # fmt: skip
    ap.add_argument("--bands", default="r", help="simulated bands (detection on r)")
    ap.add_argument("--depth", type=float, default=26.8, help="r-band 5σ depth")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--deblenders", default="sep,unet")
    ap.add_argument("--purity-floor", type=float, default=0.9)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    densities = [float(v) for v in args.densities.split(",")]
    deblenders = [d for d in args.deblenders.split(",") if d]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="se_crowded_"))
    workdir.mkdir(parents=True, exist_ok=True)
    sep.set_sub_object_limit(4096)
    sep.set_extract_pixstack(20_000_000)
    machine = (f"{platform.platform()}, {platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} cores; python {platform.python_version()}; sep {sep.__version__}; "
               f"survey_engine from {Path(survey_engine.__file__).parent}")  # fmt: skip
    print(f"machine: {machine}")
    m_eval = args.depth - 1.0
    mpx = args.size**2 / 1e6
    results = []
    with (
        LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None) as lc,
        Client(lc) as client,
    ):
        for density in densities:
            cluster = cluster_for(density, args.size, args.depth)
            path = str(workdir / f"field_{density:g}.zarr")
            t0 = time.perf_counter()
            sim = simulate(path, size=args.size, bands=args.bands, seed=SEED, depth=args.depth,
                           cluster=cluster, client=client, progress=False, overwrite=True)  # fmt: skip
            t_sim = time.perf_counter() - t0
            truth = sim.truth
            n_cluster = int(np.sum(truth["population"] == "cluster"))
            print(f"\ndensity {density:g}/px²: {len(truth)} truth objects ({n_cluster} cluster stars,"
                  f" n_stars {cluster.n_stars if cluster else 0}), simulated in {t_sim:.1f} s "
                  f"on {args.workers} workers")  # fmt: skip
            row = {"density": density, "n_truth": len(truth), "n_cluster": n_cluster,
                   "simulate_s": t_sim, "methods": {}}  # fmt: skip
            for deb in deblenders:
                if not results:  # warm-up on the first field (imports, model load), not timed
                    engine(path, deb, client, args.tile, workdir)
                wall, x, y, mag, stages = engine(path, deb, client, args.tile, workdir)
                q = quality(x, y, mag, truth, args.depth)
                row["methods"][f"engine {deb}"] = {"s_per_mpx": wall / mpx, **q, "stages": stages}
                print(f"  engine {deb}: {wall:.1f} s, {q['n_detected']} objects; "
                      + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items()))  # fmt: skip
            m = open_mosaic(path)
            reg = m.read((0, m.ny), (0, m.nx))
            band = m.bands.index("r")
            image = np.ascontiguousarray(reg.image[band], dtype=np.float64)
            variance = np.ascontiguousarray(reg.variance[band], dtype=np.float64)
            grid = {}
            for mesh in MESHES:
                for thresh in THRESHOLDS:
                    t, x, y, mag = raw_sep(image, variance, mesh, thresh)
                    grid[(mesh, thresh)] = {"s_per_mpx": t / mpx, "mesh": mesh, "thresh": thresh,
                                            **quality(x, y, mag, truth, args.depth)}  # fmt: skip
            row["sep_grid"] = list(grid.values())
            ok = [g for g in grid.values() if g["purity"] >= args.purity_floor]
            best = max(ok, key=lambda g: g["completeness_eval"], default=None)
            row["methods"]["tuned raw sep"] = best
            unet = row["methods"].get("engine unet")
            if unet is not None:
                fair = [g for g in grid.values() if g["purity"] >= unet["purity"]]
                match = max(fair, key=lambda g: g["completeness_eval"], default=None)
                row["unet_over_sep"] = (unet["completeness_eval"] / match["completeness_eval"]
                                        if match and match["completeness_eval"] > 0 else None)  # fmt: skip
                row["sep_at_unet_purity"] = match
            results.append(row)
            shutil.rmtree(path, ignore_errors=True)

    bins = [f"{lo:g}–{hi:g}" for lo, hi in itertools.pairwise(MAG_EDGES)]
    lines = [f"machine: {machine}", "",
             f"{args.size}² px, bands {args.bands}, r depth {args.depth}, seed {SEED}, "
             f"{args.workers} workers, tile {args.tile}; match ≤ {MATCH_RADIUS:g} px one to one; "
             f"purity: detections with measured r < {args.depth}; C(m_eval): completeness at truth "
             f"r = {m_eval:g} ± 0.25; tuned raw sep: best C(m_eval) with purity ≥ {args.purity_floor}", "",
             "| core density /px² | cluster stars | method | s/Mpx | detected | purity | C(m_eval) | "
             + " | ".join(f"C {b}" for b in bins) + " |",
             "|" + "---|" * (7 + len(bins))]  # fmt: skip
    for row in results:
        for name, r in row["methods"].items():
            if r is None:
                lines.append(f"| {row['density']:g} | {row['n_cluster']} | {name} | no grid point "
                             f"reaches purity {args.purity_floor} |" + " |" * (3 + len(bins)))  # fmt: skip
                continue
            label = f"raw sep (mesh {r['mesh']}, {r['thresh']:g}σ)" if "mesh" in r else name
            lines.append(f"| {row['density']:g} | {row['n_cluster']} | {label} | {r['s_per_mpx']:.2f} "
                         f"| {r['n_detected']} | {_f(r['purity'])} | {_f(r['completeness_eval'])} | "
                         + " | ".join(_f(c, ".2f") for c in r["completeness"]) + " |")  # fmt: skip
    lines.append("")
    sparse, crowded = results[0], results[-1]
    for deb in deblenders:
        key = f"engine {deb}"
        ratio = crowded["methods"][key]["s_per_mpx"] / sparse["methods"][key]["s_per_mpx"]
        lines.append(f"cost per Mpx, crowded ({crowded['density']:g}) ÷ sparse "
                     f"({sparse['density']:g}), {key}: {ratio:.2f}")  # fmt: skip
    for row in results:
        if "unet_over_sep" in row:
            match = row["sep_at_unet_purity"]
            where = (f"raw sep mesh {match['mesh']}, {match['thresh']:g}σ, purity {match['purity']:.3f}"
                     if match else "no raw sep grid point reaches the unet's purity")  # fmt: skip
            lines.append(f"density {row['density']:g}: completeness at r = {m_eval:g} (1 mag above the "
                         f"limit), unet ÷ tuned raw sep at equal-or-better purity: "
                         f"{_f(row['unet_over_sep'], '.2f')} ({where}; unet purity "
                         f"{row['methods']['engine unet']['purity']:.3f})")  # fmt: skip
    print("\n" + "\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "args": vars(args),
                                              "results": results}, indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
