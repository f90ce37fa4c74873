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
    out: str | Path, *, samples: int = 40000, epochs: int = 12, seed: int = 0, init: str | None = None,
    batch_size: int = 256, lr: float = 3e-3, max_minutes: float | None = None, val_fraction: float = 0.1,
    threads: int = 1, data: dict | None = None,
) -> dict:  # fmt: skip
    """Simulate a training set, train the classifier and save it to ``out``.

    Parameters
    ----------
    out : path-like
        Checkpoint to write.
    samples, epochs, seed : int
        Training stamps (simulated with ``seed``), epochs, seed.
    init : str, optional
        Start from this checkpoint (``"default"``: the shipped weights).
    batch_size, lr : int, float
        Mini-batch size; peak learning rate (one-cycle cosine schedule).
    max_minutes : float, optional
        Stop after this long (the last epoch finishes).
    val_fraction : float
        Held-out fraction for the validation AUC and MAE per epoch.
    threads : int
        torch CPU threads.
    data : dict, optional
        A :func:`make_stamps` result to train on instead of simulating.

    Returns
    -------
    dict
        Per-epoch history and final validation figures.
    """
    torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    d = data if data is not None else make_stamps(samples, seed=seed)
    logger.info("simulated %d stamps in %.0f s", len(d["star"]), time.perf_counter() - t0)
    x = normalise_stamps(torch.from_numpy(d["stamps"]))
    y = _targets(d)
    n = len(x)
    nval = max(1, int(n * val_fraction))
    xv, yv, xt, yt = x[:nval], y[:nval], x[nval:], y[nval:]
    model = StampNet() if init is None else load_model(None if init == "default" else init)
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
        mae = float(np.mean(np.abs(v["bulge_fraction"].numpy()[gal] - yv[gal, 1].numpy())))
        rec = {"epoch": ep + 1, "loss": tot / len(xt), "val_auc": roc_auc(v["p_star"].numpy(), star),
               "val_bf_mae": mae, "minutes": (time.perf_counter() - t0) / 60}  # fmt: skip
        history.append(rec)
        logger.info("epoch %(epoch)d loss %(loss).4f val AUC %(val_auc).5f bf MAE %(val_bf_mae).3f", rec)
        if max_minutes is not None and rec["minutes"] > max_minutes:
            break
    model.eval()
    info = {"samples": n, "epochs": len(history), "seed": seed, "history": history}
    save_model(model, out, info=info)
    return info


def main(argv: list[str] | None = None) -> int:
    """``python -m survey_engine.classify.train OUT.pt [--samples N --epochs E --init default]``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--samples", type=int, default=40000)
    p.add_argument("--epochs", type=int, default=12)
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
