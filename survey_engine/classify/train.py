"""Training of the stamp classifier on simulated stamps (:func:`~survey_engine.classify.data.make_stamps`).

Loss: binary cross-entropy of the star logit on every stamp, plus on galaxies the L1 error
of the bulge fraction, of the log disk radius, of the log bulge radius (weighted by the
bulge fraction: a faint bulge's radius is not measurable) and of |e|. Augmentation: the 8
flips/rotations of the square (the targets are invariant).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from .data import make_stamps
from .metrics import roc_auc
from .model import StampNet, decode, load_model, normalise_stamps, save_model

__all__ = ["main", "roc_auc", "train"]

logger = logging.getLogger(__name__)

#: Optimiser steps that ``epochs=None`` reaches at least (small fine-tuning sets).
MIN_STEPS = 500
#: Default epochs (``epochs=None`` on a large set) and largest default batch.
DEFAULT_EPOCHS, DEFAULT_BATCH = 12, 256
#: Keywords of :func:`make_stamps` that are survey conditions (recorded in the checkpoint).
CONDITION_KEYS = ("pixel_scale", "psf_fwhm_range", "depth_range", "mag_range")


def _targets(d: dict) -> torch.Tensor:
    return torch.from_numpy(np.stack([
        d["star"].astype(np.float32), d["bulge_fraction"],
        np.log(np.maximum(d["r_bulge_arcsec"], 1e-3)), np.log(np.maximum(d["r_disk_arcsec"], 1e-3)),
        d["ellipticity"],
    ], 1).astype(np.float32))  # fmt: skip


def _loss(raw: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    star = y[:, 0]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(raw[:, 0], star)
    v = decode(raw)
    gal = 1.0 - star
    k = gal.sum().clamp(min=1.0)
    reg = (
        (v["bulge_fraction"] - y[:, 1]).abs()
        + 0.5 * y[:, 1] * (raw[:, 2] - y[:, 2]).abs()
        + 0.5 * (raw[:, 3] - y[:, 3]).abs()
        + (v["ellipticity"] - y[:, 4]).abs()
    )
    return bce + (reg * gal).sum() / k


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    t = int(torch.randint(0, 8, (1,), generator=gen))
    if t & 1:
        x = x.flip(-1)
    if t & 2:
        x = x.flip(-2)
    if t & 4:
        x = x.transpose(-1, -2)
    return x


def train(
    out: str | Path, *, samples: int = 40000, epochs: int | None = None, seed: int = 0,
    init: str | None = None, batch_size: int | None = None, lr: float | None = None,
    max_minutes: float | None = None, val_fraction: float = 0.1, threads: int = 1,
    data: dict | None = None, conditions: dict | None = None,
) -> dict:  # fmt: skip
    """Simulate a training set, train the classifier and save it to ``out``.

    Parameters
    ----------
    out : path-like
        Checkpoint to write.
    samples, seed : int
        Training stamps (simulated with ``seed``), seed.
    epochs : int, optional
        Default max(12, enough epochs for :data:`MIN_STEPS` optimiser steps): 180 training
        stamps (200 labels less the validation tenth) get batches of 22 over 56 epochs.
    init : str, optional
        Start from this checkpoint (``"default"``: the shipped weights): fine-tuning.
    batch_size : int, optional
        Mini-batch size; default min(256, max(16, training stamps // 8)).
    lr : float, optional
        Peak learning rate (one-cycle cosine schedule); default 3e-3, 1e-3 with ``init``.
    max_minutes : float, optional
        Stop after this long (the last epoch finishes).
    val_fraction : float
        Held-out fraction for the validation AUC and MAE per epoch.
    threads : int
        torch CPU threads.
    data : dict, optional
        A :func:`make_stamps` result to train on instead of simulating.
    conditions : dict, optional
        Survey conditions: :func:`make_stamps` keywords ``pixel_scale``, ``psf_fwhm_range``,
        ``depth_range``, ``mag_range`` (``SurveyConditions.classify_options()`` of
        :mod:`survey_engine.surveys`); used to simulate, and recorded in the checkpoint
        (``config["pixel_scale"]``, ``config["psf_fwhm"]`` = mid FWHM, ``info["conditions"]``).
        With ``data``, they describe it. Default: the shipped model's (LSST-like).

    Returns
    -------
    dict
        Per-epoch history and final validation figures.
    """
    conditions = dict(conditions or {})
    unknown = set(conditions) - set(CONDITION_KEYS)
    if unknown:
        msg = f"unknown classifier conditions {sorted(unknown)}; known: {list(CONDITION_KEYS)}"
        raise ValueError(msg)
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("samples", samples)):
        if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
            msg = f"{name} must be a positive integer, got {v!r}"
            raise ValueError(msg)
    if lr is not None and not lr > 0:
        msg = f"lr must be positive, got {lr!r}"
        raise ValueError(msg)
    torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    d = data if data is not None else make_stamps(samples, seed=seed, **conditions)
    logger.info("simulated %d stamps in %.0f s", len(d["star"]), time.perf_counter() - t0)
    x = normalise_stamps(torch.from_numpy(d["stamps"]))
    y = _targets(d)
    n = len(x)
    nval = max(1, int(n * val_fraction))
    xv, yv, xt, yt = x[:nval], y[:nval], x[nval:], y[nval:]
    if len(xt) < 1:
        msg = f"no training stamps left: {n} stamps, val_fraction={val_fraction!r}"
        raise ValueError(msg)
    batch_size = min(DEFAULT_BATCH, max(16, len(xt) // 8)) if batch_size is None else int(batch_size)
    if epochs is None:
        epochs = max(DEFAULT_EPOCHS, math.ceil(MIN_STEPS / math.ceil(len(xt) / batch_size)))
    lr = (3e-3 if init is None else 1e-3) if lr is None else float(lr)
    model = StampNet() if init is None else load_model(None if init == "default" else init)
    full = {"pixel_scale": 0.2, "psf_fwhm_range": (0.64, 0.76), **conditions}
    model.config["pixel_scale"] = float(full["pixel_scale"])
    model.config["psf_fwhm"] = float(sum(full["psf_fwhm_range"]) / 2)
    logger.info("training the classifier on %d stamps (%d validation), %d epochs of batches of %d, "
                "lr %.0e%s", len(xt), nval, epochs, batch_size, lr,
                f", from {init}" if init is not None else "")  # fmt: skip
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(xt) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        tot = 0.0
        for i in range(0, len(xt), batch_size):
            idx = perm[i : i + batch_size]
            loss = _loss(model(_augment(xt[idx], gen)), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
        model.eval()
        with torch.inference_mode():
            v = decode(model(xv))
        star = yv[:, 0].numpy() > 0.5
        gal = ~star
        err = np.abs(v["bulge_fraction"].numpy()[gal] - yv[gal, 1].numpy())
        mae = float(np.mean(err)) if len(err) else float("nan")
        rec = {"epoch": ep + 1, "loss": tot / len(xt), "val_auc": roc_auc(v["p_star"].numpy(), star),
               "val_bf_mae": mae, "minutes": (time.perf_counter() - t0) / 60}  # fmt: skip
        history.append(rec)
        logger.info("epoch %(epoch)d loss %(loss).4f val AUC %(val_auc).5f bf MAE %(val_bf_mae).3f", rec)
        if max_minutes is not None and rec["minutes"] > max_minutes:
            break
    model.eval()
    info = {"samples": n, "epochs": len(history), "seed": seed, "init": init, "lr": lr,
            "batch_size": batch_size, "conditions": {k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in conditions.items()},
            "history": history}  # fmt: skip
    save_model(model, out, info=info)
    return info


def main(argv: list[str] | None = None) -> int:
    """``python -m survey_engine.classify.train OUT.pt [--samples N --epochs E --init default]``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--samples", type=int, default=40000)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(a.out, samples=a.samples, epochs=a.epochs, seed=a.seed, init=a.init,
          max_minutes=a.max_minutes, threads=a.threads)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
