"""Training loop of the U-Net deblender: torch + numpy (Zarr only to read a Zarr set), no GalSim.

Augmentation, fresh noise per epoch, the validation metrics and how to run this module on a host
that lacks the rest of the engine's dependencies: ``docs/unet.md``, section "Training".
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import _check_int, _progress, _raise_if, load_training_set, noisy_significance
from .model import UNet, load_model, normalise_input, save_model

__all__ = ["evaluate", "main", "make_targets", "train", "unet_loss"]

logger = logging.getLogger(__name__)

#: Weight of the offset loss (pixels, L1) in the total loss.
OFFSET_WEIGHT = 0.1
#: Fraction of training samples given a masked (zero) band of rows or columns.
MASK_FRACTION = 0.1
#: Centre thresholds tried on the validation set.
CENTRE_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
#: Validation figures of an epoch record, in the order the epoch log line shows them.
_VAL_KEYS = ("val_loss", "val_iou", "val_centre_f1", "val_centre_threshold", "val_blend_recall")
#: Attributes of the training set recorded in the checkpoint.
_SET_ATTRS = ("samples", "seed", "stamp", "library", "conditions")
#: Optimiser steps that ``epochs=None`` reaches at least (small fine-tuning sets).
MIN_STEPS = 500
#: Default epochs (``epochs=None`` on a large set) and largest default batch.
DEFAULT_EPOCHS, DEFAULT_BATCH = 10, 128


def _dihedral_tables(size: int) -> torch.Tensor:
    """``(8, size²)`` gather indices: ``out.flat[p] = in.flat[table[t, p]]`` for op ``t``."""
    idx = np.arange(size * size).reshape(size, size)
    out = []
    for t in range(8):
        a = np.rot90(idx, t % 4)
        if t >= 4:
            a = a[:, ::-1]
        out.append(a.ravel())
    return torch.from_numpy(np.stack(out).astype(np.int64))


def _dihedral_points(cy: torch.Tensor, cx: torch.Tensor, t: torch.Tensor, size: int):
    """Map points ``(cy, cx)`` (B, K) under per-sample op ``t`` (B,), as in ``data._dihedral``."""
    t = t[:, None]
    for step in range(3):
        rot = (t % 4) > step
        cy, cx = torch.where(rot, size - 1 - cx, cy), torch.where(rot, cy, cx)
    flip = t >= 4
    cx = torch.where(flip, size - 1 - cx, cx)
    return cy, cx


def _inside(py: torch.Tensor, px: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Whether pixel ``(py, px)`` lies in an ``h × w`` stamp."""
    return (py >= 0) & (py < h) & (px >= 0) & (px < w)


def make_targets(
    foreground: torch.Tensor, owner: torch.Tensor, centres: torch.Tensor, detectable: torch.Tensor,
    *, centre_sigma: float = 1.0,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Network targets from a batch of stored targets.

    Parameters
    ----------
    foreground, owner : torch.Tensor
        bool and integer ``(B, H, W)``: 1 + object index, 0 for none.
    centres, detectable : torch.Tensor
        float ``(B, K, 2)`` true centres (NaN for absent objects); bool ``(B, K)``.
    centre_sigma : float
        σ of the heatmap Gaussians (pixels).

    Returns
    -------
    dict
        ``foreground`` (float, B×H×W), ``heatmap`` (B×H×W, exactly 1 at the rounded
        centre of every detectable object inside the stamp), ``offset`` (B×2×H×W,
        pixels to the owner's centre) and ``owned`` (bool, B×H×W).
    """
    b, h, w = foreground.shape
    dev = foreground.device
    cy, cx = centres[..., 0], centres[..., 1]
    py, px = torch.floor(cy + 0.5), torch.floor(cx + 0.5)
    valid = detectable & torch.isfinite(cy) & torch.isfinite(cx) & _inside(py, px, h, w)
    yy = torch.arange(h, device=dev, dtype=torch.float32)[None, None, :, None]
    xx = torch.arange(w, device=dev, dtype=torch.float32)[None, None, None, :]
    py0 = torch.nan_to_num(py, nan=-1e4)[..., None, None]
    px0 = torch.nan_to_num(px, nan=-1e4)[..., None, None]
    g = torch.exp(-((yy - py0) ** 2 + (xx - px0) ** 2) / (2 * centre_sigma**2))
    g = torch.where(valid[..., None, None], g, torch.zeros((), device=dev))
    heat = g.amax(dim=1) if g.shape[1] else torch.zeros((b, h, w), device=dev)
    own = owner.long()
    pad = torch.cat([torch.zeros((b, 1, 2), device=dev), torch.nan_to_num(centres.float())], 1)
    tgt = torch.gather(pad, 1, own.reshape(b, -1, 1).expand(-1, -1, 2)).reshape(b, h, w, 2)
    offset = torch.stack([tgt[..., 0] - yy[0, 0], tgt[..., 1] - xx[0, 0]], dim=1)
    owned = own > 0
    offset = torch.where(owned[:, None], offset, torch.zeros((), device=dev))
    return {"foreground": foreground.float(), "heatmap": heat, "offset": offset, "owned": owned}


def unet_loss(
    out: torch.Tensor, targets: dict[str, torch.Tensor], *, offset_scale: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of a batch: foreground BCE + centre focal loss + 0.1 × offset L1 (pixels).

    Parameters
    ----------
    out : torch.Tensor
        Raw network output ``(B, 4, H, W)``.
    targets : dict
        From :func:`make_targets`.
    offset_scale : float
        The model's offset scale (output × scale = pixels).

    Returns
    -------
    loss, parts : torch.Tensor, dict of float
        The scalar loss; the three terms (detached).
    """
    out = out.float()
    fg_loss = F.binary_cross_entropy_with_logits(out[:, 0], targets["foreground"])
    x = out[:, 1]
    heat = targets["heatmap"]
    pos = heat >= 1.0 - 1e-6
    p = torch.sigmoid(x)
    pos_term = -((1 - p) ** 2) * F.logsigmoid(x)
    neg_term = -((1 - heat) ** 4) * p**2 * F.logsigmoid(-x)
    n_pos = pos.sum().clamp(min=1)
    centre_loss = torch.where(pos, pos_term, neg_term).sum() / n_pos
    owned = targets["owned"]
    d = (out[:, 2:4] * offset_scale - targets["offset"]).abs().sum(dim=1)
    off_loss = (d * owned).sum() / owned.sum().clamp(min=1)
    loss = fg_loss + centre_loss + OFFSET_WEIGHT * off_loss
    parts = {"foreground": fg_loss, "centre": centre_loss, "offset_px": off_loss}
    return loss, {k: float(v.detach()) for k, v in parts.items()}


class _Data:
    """A training set (``data.TrainingSet``) on the device, with augmentation and noise."""

    def __init__(self, ts, idx: np.ndarray, device: torch.device):
        def t(a):
            return torch.from_numpy(np.ascontiguousarray(a[idx])).to(device)

        self.model, self.sky, self.srcn = t(ts.model), t(ts.sky_sigma), t(ts.source_noise)
        self.fg, self.owner, self.centres = t(ts.foreground), t(ts.owner), t(ts.centres)
        self.det, self.cond = t(ts.detectable), t(ts.condition).long()
        self.n = len(idx)
        self.size = ts.model.shape[-1]
        self.tables = _dihedral_tables(self.size).to(device)

    def batch(self, sel: torch.Tensor, gen: torch.Generator | None, augment: bool):
        m, fg, own, cen = self.model[sel], self.fg[sel], self.owner[sel], self.centres[sel]
        if augment:
            b, c = m.shape[:2]
            ops = torch.randint(8, (b,), generator=gen, device=m.device)
            tab = self.tables[ops]  # (B, HW)
            per_band = tab[:, None].expand(-1, c, -1)
            m = torch.gather(m.reshape(b, c, -1), 2, per_band).reshape(m.shape)
            fg = torch.gather(fg.reshape(b, -1), 1, tab).reshape(fg.shape)
            own = torch.gather(own.reshape(b, -1), 1, tab).reshape(own.shape)
            cy, cx = _dihedral_points(cen[..., 0], cen[..., 1], ops, self.size)
            cen = torch.stack([cy, cx], dim=-1)
        sig = noisy_significance(m, self.sky[sel], self.srcn[sel], generator=gen)
        if augment:  # masked rows/columns (no data) in 10 % of the samples
            b, _, h, w = sig.shape
            u = torch.rand((b, 3), generator=gen, device=sig.device)
            pos = (u[:, 1] * h).long()[:, None, None, None]
            width = 1 + (u[:, 2] * 3).long()[:, None, None, None]
            yy = torch.arange(h, device=sig.device)[None, None, :, None]
            xx = torch.arange(w, device=sig.device)[None, None, None, :]
            on = (u[:, 0] < MASK_FRACTION)[:, None, None, None]
            rows = (u[:, 0] < MASK_FRACTION / 2)[:, None, None, None]
            coord = torch.where(rows, yy.expand(-1, -1, h, w), xx.expand(-1, -1, h, w))
            hit = on & (coord >= pos) & (coord < pos + width)
            sig = torch.where(hit, torch.zeros((), device=sig.device), sig)
        return sig, fg, own, cen, self.det[sel]


def _peaks(logit: torch.Tensor, threshold_logit: float) -> torch.Tensor:
    """3×3 local maxima above a logit threshold, ``(B, H, W)`` bool."""
    mx = F.max_pool2d(logit[:, None], 3, stride=1, padding=1)[:, 0]
    return (logit >= mx) & (logit > threshold_logit)


@torch.no_grad()
def _evaluate(model, data: _Data, inputs: torch.Tensor, cfg: dict, batch_size: int, amp: bool,
              fixed: float | None = None):  # fmt: skip
    """Validation loss, foreground IoU, centre F1 and blend recall at the best threshold.

    With ``fixed``, also ``centre_f1`` / ``blend_recall`` / ``centre_precision`` /
    ``centre_recall`` at that centre threshold (the model's own, for a test set).
    """
    thresholds = CENTRE_THRESHOLDS if fixed is None else tuple(sorted({*CENTRE_THRESHOLDS, fixed}))
    model.eval()
    dev = inputs.device
    inter = union = ntrue = nblend = 0.0
    tp, npred, hit, blend_hit = ({t: 0.0 for t in thresholds} for _ in range(4))
    losses = []
    sigma = float(cfg["target"].get("centre_sigma", 1.0))
    fwhm = torch.tensor(cfg["target"].get("fwhm_px", [3.5]), device=dev, dtype=torch.float32)
    for a in range(0, data.n, batch_size):
        sel = torch.arange(a, min(a + batch_size, data.n), device=dev)
        x = normalise_input(inputs[sel], cfg).contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        out = out.float()
        tg = make_targets(data.fg[sel], data.owner[sel], data.centres[sel], data.det[sel],
                          centre_sigma=sigma)  # fmt: skip
        loss, _ = unet_loss(out, tg, offset_scale=cfg["offset_scale"])
        losses.append(float(loss) * len(sel))
        pf = out[:, 0] > 0
        tf = tg["foreground"] > 0.5
        inter += float((pf & tf).sum())
        union += float((pf | tf).sum())
        true_c = tg["heatmap"] >= 1.0 - 1e-6
        near_true = F.max_pool2d(true_c[:, None].float(), 5, stride=1, padding=2)[:, 0] > 0
        ntrue += float(true_c.sum())
        # Blended true centres: another detectable object within 2 FWHM.
        cen = data.centres[sel]
        valid = data.det[sel] & torch.isfinite(cen[..., 0])
        dist = torch.cdist(torch.nan_to_num(cen, nan=-1e4), torch.nan_to_num(cen, nan=-1e4))
        k = cen.shape[1]
        eye = torch.eye(k, dtype=torch.bool, device=dev)[None]
        pair_ok = valid[:, :, None] & valid[:, None, :] & ~eye
        lim = 2 * fwhm[data.cond[sel]][:, None, None]
        blended = ((dist < lim) & pair_ok).any(dim=2) & valid
        py = torch.floor(cen[..., 0] + 0.5).nan_to_num(nan=-1).long()
        px = torch.floor(cen[..., 1] + 0.5).nan_to_num(nan=-1).long()
        h, w = true_c.shape[1:]
        inside = blended & _inside(py, px, h, w)
        nblend += float(inside.sum())
        bidx = torch.arange(len(sel), device=dev)[:, None].expand_as(py)
        for t in thresholds:
            pk = _peaks(out[:, 1], math.log(t / (1 - t)))
            npred[t] += float(pk.sum())
            tp[t] += float((pk & near_true).sum())
            near_pk = F.max_pool2d(pk[:, None].float(), 5, stride=1, padding=2)[:, 0] > 0
            hit[t] += float((near_pk & true_c).sum())
            got = near_pk[bidx.clamp(min=0), py.clamp(0, h - 1), px.clamp(0, w - 1)]
            blend_hit[t] += float((got & inside).sum())
    f1, prec, rec = {}, {}, {}
    for t in thresholds:
        prec[t] = tp[t] / max(npred[t], 1.0)
        rec[t] = hit[t] / max(ntrue, 1.0)
        f1[t] = 2 * prec[t] * rec[t] / max(prec[t] + rec[t], 1e-12)
    best = max(CENTRE_THRESHOLDS, key=lambda t: f1[t])
    res = {
        "val_loss": sum(losses) / max(data.n, 1), "val_iou": inter / max(union, 1.0),
        "val_centre_f1": f1[best], "val_centre_threshold": best,
        "val_blend_recall": blend_hit[best] / max(nblend, 1.0),
    }  # fmt: skip
    if fixed is not None:
        res.update({"centre_threshold": fixed, "centre_f1": f1[fixed], "centre_precision": prec[fixed],
                    "centre_recall": rec[fixed], "blend_recall": blend_hit[fixed] / max(nblend, 1.0),
                    "true_centres": ntrue, "blended_centres": nblend})  # fmt: skip
    return res


def _lr_at(frac: float, peak: float) -> float:
    """Learning rate at fraction ``frac`` of training: 5 % linear warm-up, cosine to 1 %."""
    warm = 0.05
    if frac < warm:
        return peak * (0.05 + 0.95 * frac / warm)
    c = 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - warm) / (1 - warm))))
    return peak * (0.01 + 0.99 * c)


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    _raise_if(dev.type == "cuda" and not torch.cuda.is_available(),
              f"device {str(device)!r} requested but CUDA is not available")  # fmt: skip
    _raise_if(dev.type not in ("cpu", "cuda"), f"device must be 'cpu' or 'cuda', got {device!r}")
    return dev


def train(
    dataset_path: str | os.PathLike, out_path: str | os.PathLike, *, epochs: int | None = None,
    batch_size: int | None = None, device: str | torch.device | None = None,
    init: str | os.PathLike | None = None, lr: float | None = None, val_fraction: float = 0.1,
    seed: int = 0, samples: int | None = None, config: dict | None = None,
    amp: bool | None = None, max_minutes: float | None = None, progress: bool = True,
) -> list[dict]:  # fmt: skip
    """Train (or fine-tune) the U-Net deblender and save the checkpoint.

    Parameters
    ----------
    dataset_path : str or path-like
        A training set from :func:`~survey_engine.unet.data.generate_training_set`
        (Zarr group or compact ``.npz``).
    out_path : str or path-like
        Checkpoint to write (``.pt``).
    epochs, batch_size : int, optional
        Passes over the training samples; samples per step. Defaults suit both a full set
        and a few labels: ``batch_size`` = min(128, max(16, training samples // 8)),
        ``epochs`` = max(10, enough epochs for :data:`MIN_STEPS` optimiser steps), so 180
        training samples get batches of 22 over 56 epochs.
    device : {"cpu", "cuda"} or torch.device, optional
        Default: CUDA when available.
    init : str or path-like, optional
        Fine-tune this checkpoint (its architecture is kept) instead of starting from
        random weights; ``"default"`` means the shipped model.
    lr : float, optional
        Peak learning rate (5 % warm-up, cosine decay) (default 3e-3, or 1e-3 with ``init``).
    val_fraction : float
        Fraction of the samples held out for validation (the last ones), in [0, 1).
    seed : int
        Seed of weights, order, augmentation and noise.
    samples : int, optional
        Compose this many samples from the set's library (default: the set's own).
    config : dict, optional
        Architecture overrides for a new model (e.g. ``{"levels": 2, "base_channels": 8}``).
    amp : bool, optional
        bfloat16 autocast; default on for CUDA, off on CPU.
    max_minutes : float, optional
        Wall-time budget: after the first epoch the number of epochs (and the
        learning-rate schedule) is reduced to fit it.
    progress : bool
        Show a progress bar.

    Returns
    -------
    list of dict
        One record per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``val_iou``,
        ``val_centre_f1``, ``val_centre_threshold``, ``val_blend_recall``, ``lr``,
        ``seconds``, ``samples_per_s``.
    """
    if epochs is not None:
        _check_int("epochs", epochs)
    if batch_size is not None:
        _check_int("batch_size", batch_size)
    _raise_if(not 0 <= val_fraction < 1, f"val_fraction must be in [0, 1), got {val_fraction!r}")
    _raise_if(lr is not None and not lr > 0, f"lr must be positive, got {lr!r}")
    dev = _device(device)
    amp = dev.type == "cuda" if amp is None else bool(amp)
    t_start = time.perf_counter()
    ts = load_training_set(dataset_path, samples=samples, progress=progress)
    n = len(ts)
    n_val = max(round(n * val_fraction), 1) if val_fraction > 0 else 0
    n_train = n - n_val
    _raise_if(n_train < 1, f"no training samples left: {n} samples, val_fraction={val_fraction!r}")
    if batch_size is None:
        batch_size = min(DEFAULT_BATCH, max(16, n_train // 8))
    if epochs is None:
        epochs = max(DEFAULT_EPOCHS, math.ceil(MIN_STEPS / math.ceil(n_train / batch_size)))
    _raise_if(bool(ts.model.shape[-1] % 8 or ts.model.shape[-2] % 8),
              f"stamp sides must be multiples of 8, got {ts.model.shape[-2:]}")  # fmt: skip
    torch.manual_seed(seed)
    target = {
        **ts.attrs.get("target", {}),
        "fwhm_px": [c["fwhm_px"] for c in ts.attrs.get("conditions", [])] or [3.5],
    }
    if init is not None:
        model = copy.deepcopy(load_model(None if str(init) == "default" else init))
        _raise_if(bool(config),
                  "config cannot be combined with init (the checkpoint fixes the architecture)")  # fmt: skip
        model.config["target"] = target
    else:
        model = UNet({**(config or {}), "target": target})
    lr = (3e-3 if init is None else 1e-3) if lr is None else lr
    cfg = model.config
    _raise_if(bool(ts.model.shape[-1] % model.alignment or ts.model.shape[-2] % model.alignment),
              f"stamp sides {ts.model.shape[-2:]} must be multiples of {model.alignment}")  # fmt: skip
    # NHWC: ~1.4x faster training on CPU (oneDNN), the layout tensor cores want on GPU.
    model.to(dev, memory_format=torch.channels_last)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_data = _Data(ts, np.arange(n_train), dev)
    val_data = _Data(ts, np.arange(n_train, n), dev) if n_val else None
    gen = torch.Generator(device=dev).manual_seed(seed)
    val_inputs = None
    if val_data is not None:
        vgen = torch.Generator(device=dev).manual_seed(seed + 1)
        val_inputs = torch.cat([
            val_data.batch(torch.arange(a, min(a + 1024, n_val), device=dev), vgen, False)[0]
            for a in range(0, n_val, 1024)
        ])  # fmt: skip
    steps_per_epoch = math.ceil(n_train / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    plan_epochs = int(epochs)
    sigma = float(target.get("centre_sigma", 1.0))
    logger.info("training U-Net (%d parameters) on %d samples (%d validation), %d epochs, %s%s",
                model.n_parameters, n_train, n_val, epochs, dev, " bf16" if amp else "")  # fmt: skip
    bar = _progress(total=epochs * steps_per_epoch, desc="training", enabled=progress)
    history: list[dict] = []
    cpu_gen = torch.Generator().manual_seed(seed + 2)
    t_train = time.perf_counter()
    step_global = epoch = 0
    while epoch < plan_epochs:
        epoch += 1
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(n_train, generator=cpu_gen).to(dev)
        total = torch.zeros((), device=dev)
        for step in range(steps_per_epoch):
            sel = order[step * batch_size : (step + 1) * batch_size]
            sig, fg, own, cen, det = train_data.batch(sel, gen, True)
            tg = make_targets(fg, own, cen, det, centre_sigma=sigma)
            x = normalise_input(sig, cfg).contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                out = model(x)
            loss, _ = unet_loss(out, tg, offset_scale=cfg["offset_scale"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step_global / (plan_epochs * steps_per_epoch), lr)
            opt.step()
            step_global += 1
            total += loss.detach() * len(sel)
            bar.update(1)
        dt = time.perf_counter() - t0
        rec = {"epoch": epoch, "train_loss": float(total) / n_train,
               "lr": float(opt.param_groups[0]["lr"]), "seconds": dt,
               "samples_per_s": n_train / dt}  # fmt: skip
        if val_data is not None:
            rec.update(_evaluate(model, val_data, val_inputs, cfg, max(batch_size, 256), amp))
        history.append(rec)
        val = {k: rec.get(k, float("nan")) for k in _VAL_KEYS}
        bar.set_postfix(loss=f"{rec['train_loss']:.3f}", val_iou=f"{val['val_iou']:.3f}",
                        f1=f"{val['val_centre_f1']:.3f}")  # fmt: skip
        logger.info("epoch %d/%d: loss %.4f, val loss %.4f, val IoU %.4f, centre F1 %.4f "
                    "(threshold %.1f), blend recall %.3f, %.0f samples/s", epoch, plan_epochs,
                    rec["train_loss"], *val.values(), rec["samples_per_s"])  # fmt: skip
        if max_minutes is not None and epoch == 1 and plan_epochs > 1:
            # Fit the schedule into the time budget, measured on the first epoch.
            per_epoch = time.perf_counter() - t_train
            left = 60 * max_minutes - (time.perf_counter() - t_start)
            fit = max(1, 1 + int(left // per_epoch))
            if fit < plan_epochs:
                logger.info("time budget of %.1f min: %d epochs instead of %d",
                            max_minutes, fit, plan_epochs)  # fmt: skip
                plan_epochs = fit
                bar.total = plan_epochs * steps_per_epoch
    bar.close()
    model.eval()
    if history and "val_centre_threshold" in history[-1]:
        cfg["inference"]["centre_threshold"] = history[-1]["val_centre_threshold"]
    info = {
        "trained": time.strftime("%Y-%m-%dT%H:%M:%S"), "dataset": str(dataset_path),
        "dataset_attrs": {k: ts.attrs.get(k) for k in _SET_ATTRS},
        "conditions": _conditions(ts.attrs),
        "samples": n, "train_samples": n_train, "val_samples": n_val, "epochs": len(history),
        "batch_size": batch_size, "lr": lr, "seed": seed,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "amp": amp, "init": None if init is None else str(init), "torch": torch.__version__,
        "python": platform.python_version(), "wall_s": time.perf_counter() - t_start,
        "history": history,
    }  # fmt: skip
    save_model(model, out_path, info=info)
    return history


def _conditions(attrs: dict) -> dict:
    """Survey conditions of a training set: pixel scale, PSF FWHMs, depth (from its library)."""
    lib = attrs.get("library") or {}
    conds = attrs.get("conditions") or []
    return {"pixel_scale": lib.get("pixel_scale"), "depth": lib.get("depth"),
            "psf_fwhm": [c.get("psf_fwhm") for c in conds], "mag_range": lib.get("mag_range"),
            "stamp": attrs.get("stamp")}  # fmt: skip


def evaluate(
    model: UNet | str | os.PathLike | None, dataset_path: str | os.PathLike, *,
    samples: int | None = None, batch_size: int = 256, device: str | torch.device | None = "cpu",
    seed: int = 0, threshold: float | None = None, progress: bool = False,
) -> dict:  # fmt: skip
    """Scores of a model on a (held-back) training set: the validation metrics on all its samples.

    Parameters
    ----------
    model : UNet, str, path-like or None
        A model, a checkpoint, or None / ``"default"`` for the shipped model.
    dataset_path : str or path-like
        A set from :func:`~survey_engine.unet.data.generate_training_set`.
    samples : int, optional
        Compose this many samples (default: the set's own).
    batch_size : int
        Samples per forward pass.
    device : str or torch.device, optional
        Default CPU.
    seed : int
        Seed of the noise realisation.
    threshold : float, optional
        Centre threshold of ``centre_f1`` etc. (default: the model's own,
        ``config["inference"]["centre_threshold"]``).
    progress : bool
        Show a progress bar while composing.

    Returns
    -------
    dict
        ``centre_f1``, ``centre_precision``, ``centre_recall``, ``blend_recall`` at the
        threshold; ``val_iou`` (foreground IoU), ``val_loss``; ``val_centre_f1``,
        ``val_blend_recall`` at the best threshold of :data:`CENTRE_THRESHOLDS`
        (``val_centre_threshold``); ``samples``.
    """
    if model is None or isinstance(model, str | os.PathLike):
        model = load_model(None if model is None or str(model) == "default" else model)
    dev = _device(device)
    model = model.to(dev).eval()
    cfg = model.config
    ts = load_training_set(dataset_path, samples=samples, progress=progress)
    # the blend criterion (2 FWHM) uses the set's own PSFs, not the model's training ones
    cfg = {**cfg, "target": {**cfg["target"], "fwhm_px": [c["fwhm_px"] for c in ts.attrs["conditions"]]}}
    data = _Data(ts, np.arange(len(ts)), dev)
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    inputs = torch.cat([data.batch(torch.arange(a, min(a + 1024, data.n), device=dev), gen, False)[0]
                        for a in range(0, data.n, 1024)])  # fmt: skip
    thr = float(cfg["inference"]["centre_threshold"] if threshold is None else threshold)
    res = _evaluate(model, data, inputs, cfg, batch_size, False, fixed=thr)
    res["samples"] = data.n
    return res


def main(argv: list[str] | None = None) -> int:
    """Command line: ``DATASET OUT.pt [--epochs E] [--batch-size B] [--device D] …``."""
    p = argparse.ArgumentParser(prog="survey_engine.unet.train",
                                description="Train the U-Net deblender.")  # fmt: skip
    p.add_argument("dataset", help="training set (.zarr or .npz)")
    p.add_argument("out", help="checkpoint to write (.pt)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--samples", type=int, default=None, help="compose this many samples")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--init", default=None, help="checkpoint to fine-tune ('default': shipped)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levels", type=int, default=None)
    p.add_argument("--base-channels", type=int, default=None)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    arch = {"levels": args.levels, "base_channels": args.base_channels}
    config = {k: v for k, v in arch.items() if v is not None}
    history = train(
        args.dataset, args.out, epochs=args.epochs, batch_size=args.batch_size,
        device=args.device, init=args.init, lr=args.lr, val_fraction=args.val_fraction,
        seed=args.seed, samples=args.samples, config=config or None,
        max_minutes=args.max_minutes, progress=not args.no_progress,
    )  # fmt: skip
    logger.info("wrote %s (final val IoU %s)", Path(args.out), history[-1].get("val_iou"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
