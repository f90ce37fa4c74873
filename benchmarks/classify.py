"""Star/galaxy classification (issue 17): p_star ROC AUC per magnitude bin on an LSST-like scene.

Usage::

    python benchmarks/classify.py [--size 4096] [--seed 1717] [--workers 2] [--workdir DIR]
                                  [--reuse] [--json OUT.json] [--model CHECKPOINT.pt]

1. simulates a g, r, i LSST-like mosaic with GalSim (depth 26.8, Kolmogorov 0.7″ PSF,
   0.2″/px; seed 1717, used by no test and not by the classifier's training set, which is
   drawn by :func:`survey_engine.classify.data.make_stamps` from other seeds);
2. runs survey_engine (sep deblender, numpy backend, tile 1024) — the catalog has p_star;
3. evaluates it against the truth (:func:`survey_engine.evaluate.evaluate`): ROC AUC of
   p_star for stars vs galaxies per r-magnitude bin with its standard error (DeLong's:
   at 2048² the 24–25 bin has ~90 stars and its AUC is uncertain by ~0.009, so the
   default scene is 4096²), star completeness and purity at p_star > 0.5;
4. when ``../shared/data/real/scarlet_hsc_cosmos_35.npz`` exists, classifies the 7 peaks of
   that HSC blend (i band, its 0.168″ pixels, no resampling) and prints p_star and the
   morphology per peak.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

MAG_EDGES = (18.0, 20.0, 22.0, 23.0, 24.0, 25.0, 26.0)
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def scene(size: int, seed: int, workers: int, workdir: Path, reuse: bool = False,
          model: str | None = None) -> dict:
    import survey_engine as se

    t0 = time.perf_counter()
    if not (reuse and (workdir / "truth.parquet").exists()):
        se.simulate(workdir / "m.zarr", size=size, bands=("g", "r", "i"), seed=seed,
                    truth=workdir / "truth.parquet", workers=workers, progress=False, overwrite=True)  # fmt: skip
    t1 = time.perf_counter()
    extra = {} if model is None else {"classifier_model": model}
    res = se.run(workdir / "m.zarr", workdir / "run", tile=1024, workers=workers, progress=False,
                 overwrite=True, **extra)  # fmt: skip
    t2 = time.perf_counter()
    ev = se.evaluate(res.catalog_path, workdir / "truth.parquet", mag_bins=MAG_EDGES)
    cl = ev.summary["classification"]
    m = ev.matches
    mag, st, ps = np.asarray(m["truth_mag"]), np.asarray(m["truth_star"]), np.asarray(m["p_star"])
    from survey_engine.classify.metrics import roc_auc, roc_auc_error

    for key, sel in (("r_lt_24", mag < 24), ("24_25", (mag >= 24) & (mag < 25))):
        cl[f"auc_{key}"] = roc_auc(ps[sel], st[sel])
        cl[f"auc_{key}_err"] = roc_auc_error(ps[sel], st[sel])
    cl["simulate_s"], cl["run_s"] = t1 - t0, t2 - t1
    cl["stages_s"] = dict(res.stages)
    return cl


def real_hsc() -> list[dict] | None:
    path = REAL / "scarlet_hsc_cosmos_35.npz"
    if not path.exists():
        return None
    from survey_engine.classify import classify_stamps, default_model, extract_stamps

    d = np.load(path)
    bi = list(d["filters"]).index("i")
    img, var = d["images"][bi].astype(np.float32), d["variance"][bi].astype(np.float32)
    cat = d["catalog"]  # (the mask's bits include HSC's DETECTED: not used; the variance is)
    y, x = np.round(cat["y"]).astype(int), np.round(cat["x"]).astype(int)
    for i in range(len(y)):  # the peak pixel, as the engine takes it: brightest within 2 px
        y0, x0 = max(y[i] - 2, 0), max(x[i] - 2, 0)
        cut = img[y0 : y[i] + 3, x0 : x[i] + 3]
        dy, dx = np.unravel_index(int(np.argmax(cut)), cut.shape)
        y[i], x[i] = y0 + dy, x0 + dx
    out = classify_stamps(extract_stamps(img, var, y, x), default_model())
    return [{"x": int(x[i]), "y": int(y[i]), **{k: float(v[i]) for k, v in out.items()}}
            for i in range(len(y))]  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1717)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--reuse", action="store_true", help="reuse the mosaic already in --workdir")
    p.add_argument("--model", default=None, help="classifier checkpoint (default: the shipped weights)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        cl = scene(a.size, a.seed, a.workers, work, a.reuse, a.model)
    print(f"scene {a.size}² seed {a.seed}: AUC r<24 {cl['auc_r_lt_24']:.5f} ± {cl['auc_r_lt_24_err']:.5f}, "
          f"24<r<25 {cl['auc_24_25']:.5f} ± {cl['auc_24_25_err']:.5f}, "
          f"all {cl['auc']:.5f} (simulate {cl['simulate_s']:.0f} s, run {cl['run_s']:.0f} s)")
    print(f"{'r':>11s} {'stars':>6s} {'gals':>6s} {'AUC':>8s} {'±':>8s} {'s_comp':>6s} {'s_pur':>6s} "
          f"{'g_comp':>6s}")
    for r in cl["bins"]:
        print(f"{r['lo']:5.1f}–{r['hi']:<5.1f} {r['n_star']:6d} {r['n_galaxy']:6d} {r['auc']:8.5f} {r['auc_err']:8.5f} "
              f"{r['star_completeness']:6.3f} {r['star_purity']:6.3f} {r['galaxy_completeness']:6.3f}")
    hsc = real_hsc()
    if hsc is not None:
        print("HSC blend scarlet_hsc_cosmos_35 (i band, 0.168″/px):")
        for r in hsc:
            print(f"  peak ({r['x']:3d}, {r['y']:3d}): p_star {r['p_star']:.3f} bulge_fraction "
                  f"{r['bulge_fraction']:.2f} r_disk {r['r_disk_arcsec']:.2f}″ |e| {r['ellipticity']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"scene": cl, "hsc": hsc}, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
