"""Text report and PNG plots of an evaluation (matplotlib imported on use; Agg, no pyplot)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from . import EvaluationResult

__all__ = ["format_report", "write_plots"]

logger = logging.getLogger(__name__)


# --- text ------------------------------------------------------------------------------
def _f(v: Any, fmt: str = ".3f") -> str:
    """``v`` formatted, ``-`` for None and non-finite values."""
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def format_report(s: dict[str, Any]) -> str:
    """Readable text tables of an evaluation summary.

    Parameters
    ----------
    s : dict
        :attr:`EvaluationResult.summary`.

    Returns
    -------
    str
    """
    b, lim = s["band"], s["mag_limit"]
    lines = [
        f"catalog vs truth: {s['n_catalog']} detections, {s['n_truth']} truth objects, "
        f'{s["n_matched"]} matched ({s["method"]}, radius {s["radius_arcsec"]:.2f}" = '
        f"{s['radius_pix']:.2f} px)",
        f"bright sample {b} < {lim:g}: {s['n_truth_bright']} objects, "
        f"{s['n_truth_blended_bright']} blended (neighbour with ≥ {s['blend_flux_ratio']:.0%} "
        f'of the flux within {s["blend_radius_arcsec"]:g}")',
        f"completeness {_f(s['completeness'])} (all), {_f(s['completeness_bright'])} "
        f"({b} < {lim:g}; isolated {_f(s['completeness_bright_isolated'])}, blended "
        f"{_f(s['completeness_bright_blended'])}); purity {_f(s['purity'])}",
        f"completeness 90% at {b} = {_f(s['mag_complete_90'], '.2f')}, "
        f"50% at {b} = {_f(s['mag_complete_50'], '.2f')}",
        "",
        f"{b + ' mag':>11s} {'truth':>6s} {'found':>6s} {'compl':>6s} {'c_iso':>6s} "
        f"{'detect':>6s} {'match':>6s} {'purity':>6s} {'Δmag':>7s} {'σΔmag':>6s}",
    ]
    for r in s["magnitude_bins"]:
        if r["n_truth"] == 0 and r["n_detected"] == 0:
            continue
        lines.append(f"{r['lo']:5.1f}–{r['hi']:<5.1f} {r['n_truth']:6d} {r['n_found']:6d} "
                     f"{_f(r['completeness']):>6s} {_f(r['completeness_isolated']):>6s} "
                     f"{r['n_detected']:6d} {r['n_matched']:6d} {_f(r['purity']):>6s} "
                     f"{_f(r['dmag_median'], '+.3f'):>7s} {_f(r['dmag_scatter']):>6s}")  # fmt: skip
    p = s["pairs"]
    lines += [
        "",
        f"close truth pairs (both {b} < {lim:g}): {p['n']}, both found {_f(p['fraction'])}",
        f"{'sep (arcsec)':>12s} {'pairs':>6s} {'both':>6s} {'one':>6s} {'none':>6s} {'both/n':>7s}",
    ]
    for r in p["bins"]:
        lines.append(f"{r['lo']:5.2f}–{r['hi']:<6.2f} {r['n']:6d} {r['both']:6d} {r['one']:6d} "
                     f"{r['none']:6d} {_f(r['fraction']):>7s}")  # fmt: skip
    lines += ["", f"Δmag ({b} < {lim:g}): median, robust scatter (1.4826 MAD)"]
    names = {
        "all": "all matched", "isolated": "isolated (truth)", "blended": "blended (truth)",
        "flag_isolated": "no BLENDED flag", "flag_blended": "BLENDED flag",
    }  # fmt: skip
    for k, label in names.items():
        if (d := s["dmag"].get(k)) is not None:
            lines.append(f"  {label:18s} n={d['n']:6d}  {_f(d['median'], '+.4f'):>8s}  "
                         f"{_f(d['scatter'], '.4f')}")  # fmt: skip
    pos = s["position"]
    lines.append(f"position (pix): dx {_f(pos['dx']['median'], '+.3f')} ± {_f(pos['dx']['scatter'])}, "
                 f"dy {_f(pos['dy']['median'], '+.3f')} ± {_f(pos['dy']['scatter'])}, "
                 f"median distance {_f(pos['dist_median'])}")  # fmt: skip
    if s["shape"]:
        parts = [
            f"{k.replace('_arcsec', ' (arcsec)')} {_f(v['median'], '+.3f')} ± {_f(v['scatter'])}"
            for k, v in s["shape"].items()
        ]
        lines.append("shape (catalog − truth, PSF-convolved vs intrinsic): " + ", ".join(parts))
    iou = s["segmentation_iou"]
    if iou:
        lines.append(f"segmentation IoU ({b} < {lim:g}, n={iou['n']}): median {_f(iou['median'])}, "
                     f"mean {_f(iou['mean'])}; median isolated {_f(iou['median_isolated'])}, "
                     f"blended {_f(iou['median_blended'])}")  # fmt: skip
    else:
        lines.append("segmentation IoU: not measured (no catalog or truth segmentation)")
    cl = s.get("classification")
    if cl:  # issue 17: p_star against the truth's star/galaxy kind
        lines += ["", f"star/galaxy (p_star > {cl['threshold']:g} = star): ROC AUC {_f(cl['auc'], '.4f')}",
                  f"{b + ' mag':>11s} {'stars':>6s} {'gals':>6s} {'AUC':>7s} {'s_comp':>6s} {'s_pur':>6s} {'g_comp':>6s}"]  # fmt: skip
        for r in cl["bins"]:
            if r["n_star"] + r["n_galaxy"] == 0:
                continue
            lines.append(f"{r['lo']:5.1f}–{r['hi']:<5.1f} {r['n_star']:6d} {r['n_galaxy']:6d} "
                         f"{_f(r['auc'], '.4f'):>7s} {_f(r['star_completeness']):>6s} "
                         f"{_f(r['star_purity']):>6s} {_f(r['galaxy_completeness']):>6s}")  # fmt: skip
    return "\n".join(lines)


# --- figures ---------------------------------------------------------------------------
def write_plots(result: EvaluationResult, outdir: Path, *, gallery: int = 12) -> list[Path]:
    """Write the evaluation plots; see :meth:`EvaluationResult.plot`."""
    outdir.mkdir(parents=True, exist_ok=True)
    written = [
        _completeness(result.summary, outdir / "completeness.png"),
        _pairs(result.summary, outdir / "pairs.png"),
        _dmag(result, outdir / "dmag.png"),
    ]
    if gallery > 0 and (path := _gallery(result, outdir / "missed_blends.png", gallery)):
        written.append(path)
    logger.info("wrote %d plot(s) to %s", len(written), outdir)
    return written


def _figure(w: float = 6.4, h: float = 4.4, *, axes: bool = True):
    """A figure and, with ``axes``, its one subplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    return (fig, fig.add_subplot()) if axes else fig


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, format="png")
    return path


def _centres(rows) -> np.ndarray:
    return np.array([0.5 * (r["lo"] + r["hi"]) for r in rows])


def _completeness(s: dict[str, Any], path: Path) -> Path:
    rows = s["magnitude_bins"]
    x = _centres(rows)
    fig, ax = _figure()
    comp = np.array([r["completeness"] for r in rows], float)
    err = np.array([r["completeness_err"] for r in rows], float)
    ax.errorbar(x, comp, yerr=err, marker="o", label="completeness (truth mag)")
    ax.plot(x, [r["completeness_isolated"] for r in rows], "s--", ms=4, label="isolated truth")
    ax.plot(x, [r["purity"] for r in rows], "^-", ms=5, label="purity (catalog mag)")
    for level in (0.9, 0.5):
        ax.axhline(level, color="0.6", lw=0.8, ls=":")
    ax.axvline(s["mag_limit"], color="0.6", lw=0.8, ls="--")
    ax.set(xlabel=f"{s['band']} magnitude (AB)", ylabel="fraction", ylim=(-0.02, 1.05))
    title = f"{s['n_matched']} / {s['n_truth']} matched; 90% at {_f(s['mag_complete_90'], '.2f')}"
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def _pairs(s: dict[str, Any], path: Path) -> Path:
    rows = s["pairs"]["bins"]
    x = _centres(rows)
    fig, ax = _figure()
    frac, err = (np.array([r[k] for r in rows], float) for k in ("fraction", "error"))
    widths = np.array([r["hi"] - r["lo"] for r in rows])
    ax.bar(x, np.nan_to_num(frac), width=0.9 * widths, yerr=np.nan_to_num(err), alpha=0.7)
    for xi, r in zip(x, rows, strict=True):
        ax.annotate(f"n={r['n']}", (xi, 0.02), ha="center", fontsize=8)
    ax.set(xlabel="separation of the truth pair (arcsec)", ylim=(0, 1.05),
           ylabel="fraction with both members found",
           title=f"close pairs, both {s['band']} < {s['mag_limit']:g}")  # fmt: skip
    return _save(fig, path)


def _dmag(result: EvaluationResult, path: Path) -> Path:
    s, mt = result.summary, result.matches
    tm, dm = (np.asarray(mt[c], float) for c in ("truth_mag", "dmag"))
    bl = np.asarray(mt["blended"], bool)
    fig, ax = _figure()
    ax.scatter(tm[~bl], dm[~bl], s=2, alpha=0.4, label="isolated", rasterized=True)
    ax.scatter(tm[bl], dm[bl], s=3, alpha=0.6, label="blended", rasterized=True)
    rows = [r for r in s["magnitude_bins"] if r["dmag_n"] >= 3]
    if rows:
        x = _centres(rows)
        med, sig = (np.array([r[k] for r in rows]) for k in ("dmag_median", "dmag_scatter"))
        ax.plot(x, med, "k-", lw=1.5, label="median")
        ax.fill_between(x, med - sig, med + sig, color="k", alpha=0.15, label="±1.4826 MAD")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.axvline(s["mag_limit"], color="0.6", lw=0.8, ls="--")
    ax.set(ylim=(-1, 1), xlabel=f"truth {s['band']} magnitude", ylabel="Δmag = catalog − truth")
    ax.legend(loc="upper left", fontsize=8, markerscale=3)
    return _save(fig, path)


def _gallery(result: EvaluationResult, path: Path, n_max: int) -> Path | None:
    m, seg = result.mosaic, result.segmentation
    if m is None and seg is None:
        logger.info("missed-blend gallery skipped: neither the mosaic nor a segmentation given")
        return None
    pairs = result.pairs
    missed = ~(np.asarray(pairs["found_i"], bool) & np.asarray(pairs["found_j"], bool))
    if not missed.any():
        logger.info("missed-blend gallery skipped: every close pair was recovered")
        return None
    sep = np.asarray(pairs["sep"].value, float)
    mags = np.maximum(np.asarray(pairs["mag_i"], float), np.asarray(pairs["mag_j"], float))
    idx = np.flatnonzero(missed)
    idx = idx[np.lexsort((mags[idx], sep[idx]))][:n_max]
    tx, ty = (np.asarray(_plain(result.truth[c]), float) for c in ("x", "y"))
    cx, cy = (np.asarray(_plain(result.catalog[c]), float) for c in ("x", "y"))
    found = np.asarray(result.truth["matched"], bool)
    tmag = np.asarray(_plain(result.truth[result.summary["truth_mag_column"]]), float)
    ny, nx = (m.ny, m.nx) if m is not None else tuple(seg.shape)
    band = result.summary["band"]
    bi = None if m is None else (m.bands.index(band) if band in m.bands else 0)
    ncol = min(4, len(idx))
    nrow = math.ceil(len(idx) / ncol)
    fig = _figure(3.0 * ncol, 3.1 * nrow, axes=False)
    scale = result.summary["pixel_scale_arcsec"]
    for k, p in enumerate(idx):
        i, j = int(pairs["i"][p]), int(pairs["j"][p])
        xc, yc = 0.5 * (tx[i] + tx[j]), 0.5 * (ty[i] + ty[j])
        half = max(16, int(sep[p] / scale) + 12)
        iy, ix = int(np.rint(yc)), int(np.rint(xc))
        y0, y1 = max(0, iy - half), min(ny, iy + half + 1)
        x0, x1 = max(0, ix - half), min(nx, ix + half + 1)
        ax = fig.add_subplot(nrow, ncol, k + 1)
        ext = (x0 - 0.5, x1 - 0.5, y0 - 0.5, y1 - 0.5)
        if m is not None:
            img = m.read((y0, y1), (x0, x1), bands=[bi]).image[0].astype(float)
            lo, hi = np.nanpercentile(img, [5, 99.5])
            soft = max(hi - lo, 1e-12) / 20
            ax.imshow(np.arcsinh((img - lo) / soft), origin="lower", cmap="gray", extent=ext)
        if seg is not None:
            s = np.asarray(seg[y0:y1, x0:x1])
            edge = np.zeros(s.shape, bool)
            edge[:, 1:] |= s[:, 1:] != s[:, :-1]
            edge[1:, :] |= s[1:, :] != s[:-1, :]
            overlay = np.zeros((*s.shape, 4))
            overlay[edge] = (1.0, 0.8, 0.0, 0.9)
            if m is None:
                ax.imshow(s > 0, origin="lower", cmap="gray", extent=ext, vmin=0, vmax=2)
            ax.imshow(overlay, origin="lower", extent=ext, interpolation="nearest")
        inc = (cx >= x0 - 0.5) & (cx < x1 - 0.5) & (cy >= y0 - 0.5) & (cy < y1 - 0.5)
        ax.plot(cx[inc], cy[inc], "+", color="cyan", ms=8, mew=1.2)
        for t in (i, j):
            color = "lime" if found[t] else "red"
            ax.plot(tx[t], ty[t], "o" if found[t] else "x", ms=9, mfc="none", color=color, mew=1.5)
        ax.set(xlim=(ext[0], ext[1]), ylim=(ext[2], ext[3]))
        ax.set_title(f'{sep[p]:.2f}"  {tmag[i]:.1f} / {tmag[j]:.1f}', fontsize=9)
        ax.tick_params(labelsize=6)
    title = "missed blends\ntruth found (o) / missed (x), detections (+), footprints (yellow)"
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _plain(col) -> np.ndarray:
    """A column's values without unit."""
    return np.asarray(getattr(col, "value", col))
