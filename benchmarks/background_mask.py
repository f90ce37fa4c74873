"""Background with the sources masked (``background_mask_thresh``): bias in a crowded field, cost.

Usage::

    python benchmarks/background_mask.py [--size 2048] [--thresh 2.0] [--dilate 4]
                                         [--workers 2] [--repeat 2] [--workdir DIR]

1. **crowded** — a 1024² GalSim r-band mosaic (sky-subtracted: the true sky is 0) with a
   Plummer cluster of 4000 Moffat stars (FWHM the band's PSF, β 2.5, fluxes 20–2000 σ_sky,
   core radius 40 px; the variance plane left as it was) added at its centre; the mean background under the core
   (r < 60 px) in units of the sky σ, with masking off and on;
2. **sparse** — a ``--size``² GalSim g, r, i mosaic (masks, 2 bright stars), run with masking
   off and on (``--repeat`` times each, alternating; best wall times): the background stage
   and the whole run, the number of objects, and the median ratio of the Kron fluxes of the
   objects found in both (same ID); the mean background (true sky 0); completeness, purity
   and magnitude residuals against the truth (``survey_engine.evaluate``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _cluster(shape, fwhm_px, sky_sigma, *, n=4000, rc=40.0, seed=1):
    rng = np.random.default_rng(seed)
    ny, nx = shape
    r = rc / np.sqrt(rng.uniform(0, 0.98, n) ** (-2 / 3) - 1)
    th = rng.uniform(0, 2 * np.pi, n)
    ys, xs = ny / 2 + r * np.sin(th), nx / 2 + r * np.cos(th)
    flux = sky_sigma * 10 ** rng.uniform(1.3, 3.3, n)
    beta = 2.5
    alpha = fwhm_px / (2 * np.sqrt(2 ** (1 / beta) - 1))
    out = np.zeros(shape)
    for y, x, f in zip(ys, xs, flux, strict=True):
        y0, y1, x0, x1 = (
            max(0, int(y) - 40),
            min(ny, int(y) + 41),
            max(0, int(x) - 40),
            min(nx, int(x) + 41),
        )
        if y0 < y1 and x0 < x1:
            yy, xx = np.mgrid[y0:y1, x0:x1]
            r2 = (yy - y) ** 2 + (xx - x) ** 2
            out[y0:y1, x0:x1] += f * (beta - 1) / (np.pi * alpha**2) * (1 + r2 / alpha**2) ** -beta
    return out


def crowded(root: Path, client, thresh: float, dilate: int) -> None:
    from survey_engine import open_mosaic, run
    from survey_engine.kernels.background import filter_mesh, interpolate_background
    from survey_engine.simulate import simulate
    from survey_engine.store import PartStore

    path = str(root / "crowded.zarr")
    simulate(path, size=1024, bands=("r",), seed=5, client=client, progress=False)
    m = open_mosaic(path, mode="r+")
    reg = m.read((0, m.ny), (0, m.nx))
    sky_sigma = float(np.sqrt(np.median(reg.variance[0])))
    stars = _cluster((m.ny, m.nx), m.psf_fwhm["r"] / m.pixel_scale, sky_sigma)
    m.write("r", 0, 0, image=reg.image[0] + stars)  # the variance plane: sky and galaxies only
    yy, xx = np.mgrid[: m.ny, : m.nx]
    core = (yy - m.ny / 2) ** 2 + (xx - m.nx / 2) ** 2 < 60**2
    for t in (None, thresh):
        out = root / f"crowded-{t}"
        res = run(path, out, client=client, progress=False, overwrite=True, tile=512,
                  background_mask_thresh=t, background_mask_dilate=dilate)  # fmt: skip
        level, rms = PartStore(out).load_background()
        bkg = interpolate_background(
            filter_mesh(level[0], rms[0], 128, (m.ny, m.nx)), 0, m.ny, 0, m.nx
        )
        print(f"crowded  mask {t}: background under the core {bkg[core].mean() / sky_sigma:+.2f} σ_sky "
              f"(max {bkg[core].max() / sky_sigma:+.2f}); empty cells {int(np.isnan(level).sum())}; "
              f"{res.n_objects} objects")  # fmt: skip


def sparse(root: Path, client, size: int, thresh: float, dilate: int, repeat: int) -> None:
    from survey_engine import open_mosaic, read_catalog, run
    from survey_engine.evaluate import evaluate
    from survey_engine.kernels.background import filter_mesh, interpolate_background
    from survey_engine.simulate import simulate
    from survey_engine.store import PartStore

    path = str(root / "sparse.zarr")
    simulate(path, size=size, bands=("g", "r", "i"), seed=2048, masks=True, bright_stars=2,
             truth=root / "truth.parquet", client=client, progress=False)  # fmt: skip
    best: dict = {}
    for _ in range(repeat):
        for t in (None, thresh):
            out = root / f"sparse-{t}"
            t0 = time.perf_counter()
            res = run(path, out, client=client, progress=False, overwrite=True, tile=1024,
                      background_mask_thresh=t, background_mask_dilate=dilate)  # fmt: skip
            wall = time.perf_counter() - t0
            prev = best.get(t, (np.inf, np.inf, None))
            best[t] = (min(prev[0], res.timings["background"]), min(prev[1], wall), out)
    cats = {t: read_catalog(v[2] / "catalog.parquet") for t, v in best.items()}
    m = open_mosaic(path)
    sigma = [
        float(np.sqrt(np.median(m.read((0, 512), (0, 512)).variance[b])))
        for b in range(len(m.bands))
    ]
    for t, (_, _, out) in best.items():
        level, rms = PartStore(out).load_background()
        bias = [interpolate_background(filter_mesh(level[b], rms[b], 128, (m.ny, m.nx)), 0, m.ny, 0, m.nx).mean()
                / sigma[b] for b in range(len(m.bands))]  # fmt: skip
        print(f"sparse   mask {t}: mean background (true sky 0) " + ", ".join(
            f"{b} {v:+.3f}" for b, v in zip(m.bands, bias, strict=True)) + " σ_sky")  # fmt: skip
        ev = evaluate(out / "catalog.parquet", root / "truth.parquet").summary
        print(f"sparse   mask {t}: vs truth: completeness {ev['completeness']:.4f}, purity "
              f"{ev['purity']:.4f}, Δmag {ev['dmag']}")  # fmt: skip
    (off_bg, off_wall, _), (on_bg, on_wall, _) = best[None], best[thresh]
    a, b = cats[None], cats[thresh]
    common, ia, ib = np.intersect1d(np.asarray(a["id"]), np.asarray(b["id"]), return_indices=True)
    fa, fb = np.asarray(a["flux"].value)[ia], np.asarray(b["flux"].value)[ib]
    ok = (fa > 0) & (fb > 0)
    print(f"sparse {size}²: background stage {off_bg:.2f} s → {on_bg:.2f} s ({on_bg / off_bg:.2f}×); "
          f"run {off_wall:.1f} s → {on_wall:.1f} s ({on_wall / off_wall:.2f}×)")  # fmt: skip
    print(f"sparse {size}²: objects {len(a)} → {len(b)} ({len(common)} in both); median flux ratio "
          f"(on/off) {np.median(fb[ok] / fa[ok]):.4f}, 5–95 % {np.percentile(fb[ok] / fa[ok], [5, 95])}")  # fmt: skip


def main() -> None:
    from distributed import Client, LocalCluster

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--thresh", type=float, default=2.0)
    ap.add_argument("--dilate", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--sparse-only", action="store_true")
    args = ap.parse_args()
    with (
        tempfile.TemporaryDirectory(dir=args.workdir) as tmp,
        LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None) as lc,
        Client(lc) as client,
    ):
        if not args.sparse_only:
            crowded(Path(tmp), client, args.thresh, args.dilate)
        sparse(Path(tmp), client, args.size, args.thresh, args.dilate, args.repeat)


if __name__ == "__main__":
    main()
