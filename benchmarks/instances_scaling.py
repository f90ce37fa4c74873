"""How the U-Net instance extraction's cost grows with pixels and with objects per blend.

Usage::

    python benchmarks/instances_scaling.py [--sizes 256,512,1024,2048] [--densities 0.01,0.1]

Synthetic U-Net maps (no network, no GalSim): a crowded star field whose foreground is one
component holding every peak (``density`` stars per px²), offsets pointing at the nearest star
with 0.7 px noise. Times ``extract_instances_batch`` on one CPU thread with the peak grid (the
shipped assignment) and, where it finishes in reasonable time, with every (pixel, peak) pair of
the component compared (the brute force the grid replaced: ``_GRID_MIN`` raised above the
number of peaks), checks both give the same labels, and prints µs per pixel.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from scipy.spatial import cKDTree

import survey_engine.kernels.torch_instances as ti


def crowded_maps(n: int, density: float, seed: int = 3):
    """Foreground, centre and offset maps of ``density`` stars per px² over an n × n window."""
    rng = np.random.default_rng(seed)
    stars = rng.uniform(1, n - 1, (int(density * n * n), 2))
    fg = np.zeros((n, n), np.float32)
    fg[1:-1, 1:-1] = 0.9
    cen = rng.uniform(0, 0.1, (n, n)).astype(np.float32)
    iy, ix = np.round(stars).astype(int).T
    cen[iy, ix] = rng.uniform(0.5, 0.95, len(stars))
    yy, xx = np.mgrid[:n, :n]
    grid = np.stack([yy.ravel(), xx.ravel()], 1)
    _, near = cKDTree(stars).query(grid)
    off = (stars[near] - grid).T.reshape(2, n, n) + rng.normal(0, 0.7, (2, n, n))
    return [torch.from_numpy(a[None].astype(np.float32)) for a in (fg, cen, off)]


def timed(maps, brute: bool):
    saved = ti._GRID_MIN
    ti._GRID_MIN = 1 << 62 if brute else saved
    try:
        t0 = time.perf_counter()
        out = ti.extract_instances_batch(*maps)
        return time.perf_counter() - t0, out
    finally:
        ti._GRID_MIN = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,512,1024,2048")
    ap.add_argument("--densities", default="0.01,0.1")
    ap.add_argument("--brute-max-pairs", type=float, default=3e8,
                    help="skip the brute force above this many (pixel, peak) pairs")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, 1 thread")  # fmt: skip
    print("| window | stars/px² | objects | grid µs/px | brute force µs/px | same labels |")
    print("|---|---|---|---|---|---|")
    for density in (float(d) for d in args.densities.split(",")):
        for n in (int(s) for s in args.sizes.split(",")):
            maps = crowded_maps(n, density)
            t_grid, out = timed(maps, brute=False)
            n_obj = int(out.n_objects[0])
            if n * n * n_obj <= args.brute_max_pairs:
                t_brute, ref = timed(maps, brute=True)
                same = bool(torch.equal(out.labels, ref.labels))
                brute = f"{1e6 * t_brute / (n * n):.2f}"
            else:
                brute, same = "(skipped)", "–"
            print(
                f"| {n}² | {density} | {n_obj:,} | {1e6 * t_grid / (n * n):.2f} | {brute} | {same} |"
            )


if __name__ == "__main__":
    main()
