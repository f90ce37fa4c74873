"""Transfer to an SDSS-like survey with few labels (issue 17 item 3).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/transfer.py [--quick] [--workdir DIR] [--json OUT.json]
                                                    [--results benchmarks/RESULTS.md]

On simulated data of the ``sdss`` preset of :mod:`survey_engine.surveys` (0.396″/px, r-band
seeing 1.2/1.4/1.6″, 5σ depth 22.5; objects 14.7–22.7 mag for the U-Net, 13.5–21.6 for the
classifier), for both networks:

(a) the shipped (LSST-trained) model, no fine-tuning;
(b) fine-tuned from it (``init="default"``) on 1 % of the full training set;
(c) trained from scratch on the same 1 %;
(d) trained from scratch on the full set;

each scored on a held-back test set simulated with seeds used nowhere else (399 for the
U-Net, 398 for the classifier). The 1 % sets: the classifier's are the first 1 % of the
full set's stamps (an exact subset); the U-Net's is a set of ``full / 100`` blended stamps
composed from a library of ``full / 200`` objects (seed 302), as the full set's ``full``
stamps are composed from ``full / 2`` objects (seed 301): 1 % of the stamps and of the
distinct objects. Both trainers' few-label defaults are used for (b) and (c) (batch =
max(16, n/8), ≥ 500 optimiser steps, lr 1e-3 fine-tuning / 3e-3 from scratch, the last /
first 10 % of the few labels held out for validation).

Scores. U-Net: centre F1 (a predicted centre within 2 px of a true detectable centre, at
the model's own recorded centre threshold, tuned on its validation set), blend recall (true
centres with a detectable neighbour within 2 FWHM that are found), foreground IoU.
Classifier: ROC AUC of ``p_star`` (stars vs galaxies) and accuracy at ``p_star > 0.5``.
The table gives (b)/(d) and the target: (b) ≥ 0.9 × (d) and (b) > (c).

With ``--results`` the markdown section "Issue 17 item 3" is written into that file
(replacing an earlier one of the same title, leaving the rest alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

SECTION = "## Issue 17 item 3: transfer to an SDSS-like survey (2026-12-02)"
#: (full U-Net stamps, U-Net full-set epochs, U-Net test stamps,
#:  full classifier stamps, classifier full-set epochs, classifier test stamps)
SIZES = {"full": (20000, 8, 4000, 20000, 8, 10000), "quick": (2000, 2, 500, 2000, 3, 1000)}
SEEDS = {"unet_full": 301, "unet_small": 302, "unet_test": 399, "cls_full": 311, "cls_test": 398}
ARMS = ("default", "finetune_1pct", "scratch_1pct", "full")
ARM_LABEL = {"default": "(a) shipped model, no fine-tuning", "finetune_1pct": "(b) fine-tuned, 1 %",
             "scratch_1pct": "(c) from scratch, same 1 %", "full": "(d) from scratch, full set"}


def _unet(work: Path, n_full: int, epochs_full: int, n_test: int, log) -> dict:
    from survey_engine.surveys import SURVEYS
    from survey_engine.unet.data import generate_training_set
    from survey_engine.unet.train import evaluate, train

    opts = SURVEYS["sdss"].unet_options()
    t0 = time.perf_counter()
    full = generate_training_set(work / "unet_full.npz", samples=n_full, seed=SEEDS["unet_full"],
                                 overwrite=True, progress=False, **opts)
    small = generate_training_set(work / "unet_small.npz", samples=n_full // 100,
                                  seed=SEEDS["unet_small"], library_size=max(n_full // 200, 8),
                                  overwrite=True, progress=False, **opts)
    test = generate_training_set(work / "unet_test.npz", samples=n_test, seed=SEEDS["unet_test"],
                                 overwrite=True, progress=False, **opts)
    out = {"simulate_s": time.perf_counter() - t0, "sizes": {"full": n_full, "small": n_full // 100,
                                                              "test": n_test}}
    log(f"U-Net sets simulated in {out['simulate_s']:.0f} s")
    runs = {
        "default": None,
        "finetune_1pct": {"dataset_path": small, "init": "default"},
        "scratch_1pct": {"dataset_path": small},
        "full": {"dataset_path": full, "epochs": epochs_full},
    }
    for arm, kw in runs.items():
        t = time.perf_counter()
        ckpt = None
        hist = []
        if kw is not None:
            ckpt = work / f"unet_{arm}.pt"
            hist = train(out_path=ckpt, device="cpu", progress=False, seed=7, **kw)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        res = evaluate(ckpt, test, device="cpu")
        res.update({"train_s": train_s, "eval_s": time.perf_counter() - t,
                    "epochs": len(hist), "train_samples": None if not hist else
                    round(hist[-1]["samples_per_s"] * hist[-1]["seconds"])})
        out[arm] = res
        log(f"U-Net {arm}: centre F1 {res['centre_f1']:.4f} (threshold {res['centre_threshold']}), "
            f"blend recall {res['blend_recall']:.4f}, IoU {res['val_iou']:.4f}; "
            f"train {train_s:.0f} s, {len(hist)} epochs")
    return out


def _cls(work: Path, n_full: int, epochs_full: int, n_test: int, log) -> dict:
    import torch

    from survey_engine.classify.data import make_stamps
    from survey_engine.classify.metrics import roc_auc
    from survey_engine.classify.model import classify_stamps, default_model, load_model
    from survey_engine.classify.train import train
    from survey_engine.surveys import SURVEYS

    copts = SURVEYS["sdss"].classify_options()
    t0 = time.perf_counter()
    full = make_stamps(n_full, seed=SEEDS["cls_full"], **copts)
    small = {k: v[: n_full // 100] for k, v in full.items()}
    test = make_stamps(n_test, seed=SEEDS["cls_test"], **copts)
    out = {"simulate_s": time.perf_counter() - t0,
           "sizes": {"full": n_full, "small": n_full // 100, "test": n_test},
           "test_star_fraction": float(test["star"].mean())}
    log(f"classifier sets simulated in {out['simulate_s']:.0f} s")
    runs = {
        "default": None,
        "finetune_1pct": {"data": small, "init": "default"},
        "scratch_1pct": {"data": small},
        "full": {"data": full, "epochs": epochs_full},
    }
    for arm, kw in runs.items():
        t = time.perf_counter()
        info = {}
        if kw is None:
            model = default_model()
        else:
            ckpt = work / f"cls_{arm}.pt"
            info = train(ckpt, seed=7, conditions=copts, threads=torch.get_num_threads(), **kw)
            model = load_model(ckpt)
        train_s = time.perf_counter() - t
        p = classify_stamps(test["stamps"], model)["p_star"]
        star = test["star"]
        res = {"auc": roc_auc(p, star), "accuracy": float(np.mean((p > 0.5) == star)),
               "star_completeness": float(np.mean(p[star] > 0.5)),
               "galaxy_completeness": float(np.mean(p[~star] <= 0.5)),
               "train_s": train_s, "epochs": info.get("epochs", 0),
               "batch_size": info.get("batch_size"), "lr": info.get("lr")}
        out[arm] = res
        log(f"classifier {arm}: AUC {res['auc']:.4f}, accuracy {res['accuracy']:.4f}; "
            f"train {train_s:.0f} s, {res['epochs']} epochs")
    return out


def _table(u: dict, c: dict) -> str:
    rows = [("U-Net centre F1", u, "centre_f1"), ("U-Net blend recall", u, "blend_recall"),
            ("U-Net foreground IoU", u, "val_iou"), ("classifier p_star ROC AUC", c, "auc"),
            ("classifier accuracy (p_star > 0.5)", c, "accuracy")]
    head = ("| score | (a) shipped, no fine-tuning | (b) fine-tuned, 1 % | (c) scratch, same 1 % "
            "| (d) scratch, full set | (b)/(d) | (b) ≥ 0.9 (d) | (b) > (c) |")
    lines = [head, "|" + "---|" * 8]
    for name, r, key in rows:
        v = [r[a][key] for a in ARMS]
        frac = v[1] / v[3] if v[3] else float("nan")
        lines.append(f"| {name} | " + " | ".join(f"{x:.4f}" for x in v)
                     + f" | {frac:.3f} | {'yes' if frac >= 0.9 else 'no'} | {'yes' if v[1] > v[2] else 'no'} |")
    lines.append("")
    lines.append("| wall time (s) | (a) | (b) | (c) | (d) | simulate sets |")
    lines.append("|---|---|---|---|---|---|")
    lines.append("| U-Net train + eval | " + " | ".join(f"{u[a]['train_s'] + u[a]['eval_s']:.0f}" for a in ARMS)
                 + f" | {u['simulate_s']:.0f} |")
    lines.append("| classifier train | " + " | ".join(f"{c[a]['train_s']:.0f}" for a in ARMS)
                 + f" | {c['simulate_s']:.0f} |")
    return "\n".join(lines)


def _write_section(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else ""
    block = f"{SECTION}\n\n{body.rstrip()}\n"
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + block + ("" if nxt < 0 else "\n" + text[nxt + 1 :])
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sets (a smoke run, ~3 min)")
    p.add_argument("--workdir", default=None, help="keep the sets and checkpoints here")
    p.add_argument("--json", default=None, help="write all figures to this JSON file")
    p.add_argument("--results", default=None, help="write the markdown section into this file")
    p.add_argument("--only", choices=("unet", "classifier"), default=None)
    a = p.parse_args(argv)
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    n_u, e_u, t_u, n_c, e_c, t_c = SIZES["quick" if a.quick else "full"]
    t_all = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_all:7.0f} s] {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix="se_transfer_") as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        u = _unet(work, n_u, e_u, t_u, log) if a.only != "classifier" else None
        c = _cls(work, n_c, e_c, t_c, log) if a.only != "unet" else None
    wall = time.perf_counter() - t_all
    res = {"unet": u, "classifier": c, "wall_s": wall, "quick": a.quick,
           "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
           "torch": torch.__version__}
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=float))
    if u is None or c is None:
        return 0
    table = _table(u, c)
    print(table)
    print(f"total wall time {wall / 60:.1f} min")
    if a.results:
        _write_section(Path(a.results), table + f"\n\ntotal wall time {wall / 60:.1f} min\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
