"""Detection and deblending with sep, made independent of the read window (pure numpy/sep).

sep allocates a blended parent's faint pixels to its children at random, so
:func:`detect_sources` finds the parents in one ``sep.extract`` call over the window and
deblends every parent of several children again in a call of its own, on a cutout anchored
at the parent's bounding box in mosaic coordinates (``docs/kernels.md``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import sep
from scipy import ndimage

from .arrays import INF, as_dtype, clip_min, namespace, quiet, sqrt

__all__ = [
    "DetectionConfig", "DetectionResult", "detect_sources", "detection_image", "matched_filter",
]  # fmt: skip

logger = logging.getLogger(__name__)

_EIGHT = np.ones((3, 3), dtype=bool)
#: Parents of this many pixels and more are deblended alone in a crowded window.
_GIANT_AREA = 4096


@dataclass(frozen=True)
class DetectionConfig:
    """Detection and deblending parameters.

    Attributes
    ----------
    thresh : float
        Detection threshold in units of the per-pixel noise (sqrt of the variance plane),
        SExtractor's ``DETECT_THRESH`` convention: the filtered image is compared with
        ``thresh`` times the noise of an unfiltered pixel (sep, which normalises to the
        *filtered* noise, is given :attr:`sep_thresh` = ``thresh × Σk / sqrt(Σk²)``).
    minarea : int
        Minimum number of pixels above threshold.
    deblend_nthresh : int
        Number of deblending sub-thresholds.
    deblend_cont : float
        Minimum contrast for deblending (1.0 disables deblending).
    filter_kernel : tuple of tuple of float or None
        Detection filter (default: sep's 3×3 pyramid); None disables filtering.
    pixstack : int
        Initial sep pixel-stack size (capped at the array size); grown ×4 on overflow
        (up to ``max_pixstack``).
    max_pixstack : int
        Largest pixel stack tried before the window is flagged.
    sub_object_limit : int
        Initial sep deblending sub-object limit; grown ×4 on overflow.
    max_sub_object_limit : int
        Largest sub-object limit tried; beyond it the window (or the parent) is
        processed without deblending and its objects get ``DEBLEND_OVERFLOW``.
    """

    thresh: float = 1.5
    minarea: int = 5
    deblend_nthresh: int = 32
    deblend_cont: float = 0.005
    filter_kernel: tuple[tuple[float, ...], ...] | None = ((1, 2, 1), (2, 4, 2), (1, 2, 1))
    pixstack: int = 300_000
    max_pixstack: int = 64_000_000
    sub_object_limit: int = 1024
    max_sub_object_limit: int = 65536

    def __post_init__(self):
        if not np.isfinite(self.thresh) or self.thresh <= 0:
            msg = f"thresh must be a positive number of sigma, got {self.thresh!r}"
            raise ValueError(msg)
        if int(self.minarea) != self.minarea or self.minarea < 1:
            msg = f"minarea must be a positive integer, got {self.minarea!r}"
            raise ValueError(msg)
        if not 0 < self.deblend_cont <= 1:
            msg = f"deblend_cont must be in (0, 1], got {self.deblend_cont!r}"
            raise ValueError(msg)
        if int(self.deblend_nthresh) != self.deblend_nthresh or self.deblend_nthresh < 1:
            msg = f"deblend_nthresh must be a positive integer, got {self.deblend_nthresh!r}"
            raise ValueError(msg)

    @property
    def kernel(self) -> np.ndarray | None:
        """The filter kernel as a float32 array (or None)."""
        k = self.filter_kernel
        return None if k is None else np.asarray(k, dtype=np.float32)

    @property
    def sep_thresh(self) -> float:
        """Threshold passed to sep's matched filter (in units of the filtered noise)."""
        k = self.kernel
        if k is None:
            return float(self.thresh)
        return float(self.thresh * k.sum() / np.sqrt(np.square(k).sum()))

    @property
    def pad(self) -> int:
        """Pixels beyond a footprint that influence its detection (filter radius + 1)."""
        k = self.kernel
        return 1 if k is None else max(k.shape) // 2 + 1


@dataclass
class DetectionResult:
    """Footprints found in one window.

    Attributes
    ----------
    labels : numpy.ndarray
        int32 label image of the window: 0 = no object, ``i`` = object ``i`` (1-based).
    parent : numpy.ndarray
        Per object (index ``i - 1``): label of its parent (8-connected component),
        same numbering as ``parents``.
    parents : numpy.ndarray
        int32 image of parent components (0 = none).
    n_children : numpy.ndarray
        Per object: number of children of its parent (1 = isolated).
    overflow : bool
        True when sep's limits were hit and the window was processed with
        reduced deblending; objects must be flagged.
    flags : numpy.ndarray or None
        Per object: :class:`~survey_engine.schema.Flag` bits set by the science rules
        (:mod:`survey_engine.deblend.rules`), OR-ed into the object flags; None: none.
    score : numpy.ndarray or None
        Per object: the deblender's support for its centre (the U-Net's centre probability
        at its peak), read by :func:`~survey_engine.deblend.rules.merge_shreds`; None: the
        deblender gives none (sep).
    """

    labels: np.ndarray
    parent: np.ndarray
    parents: np.ndarray
    n_children: np.ndarray
    overflow: bool = False
    flags: np.ndarray | None = None
    score: np.ndarray | None = None

    @property
    def n_objects(self) -> int:
        """Number of objects (children)."""
        return len(self.parent)


def _band_sum(t, axis: int):
    """Sum over the band axis, band after band (numpy's order for an outer axis)."""
    idx = [slice(None)] * t.ndim
    idx[axis] = 0
    acc = t[tuple(idx)]
    for b in range(1, t.shape[axis]):
        idx[axis] = b
        acc = acc + t[tuple(idx)]
    return acc


def detection_image(images, variances, usable, weights: str = "ivar"):
    """Combine background-subtracted bands into one detection image (numpy or torch).

    Parameters
    ----------
    images, variances : numpy.ndarray or torch.Tensor
        ``(band, y, x)`` or ``(window, band, y, x)`` background-subtracted images and
        their variances.
    usable : numpy.ndarray or torch.Tensor of bool
        Same shape: pixels with valid data.
    weights : {"ivar", "chi2"}
        ``ivar``: inverse-variance weighted mean (variance ``1 / Σ w``);
        ``chi2``: ``Σ I² / V`` per pixel transformed to a unit-variance
        significance image ``sqrt(χ²) − sqrt(n_bands)``-like statistic.

    Returns
    -------
    image, variance
        float32 detection image and its variance (inf where no band is usable), without
        the band axis. The same float32 operations in the same order for both array
        libraries, so torch on CPU gives numpy's bits.
    """
    if weights not in ("ivar", "chi2"):
        msg = f"weights must be 'ivar' or 'chi2', got {weights!r}"
        raise ValueError(msg)
    xp = namespace(images)
    axis = images.ndim - 3
    with quiet(xp):
        w = xp.where(usable & (variances > 0) & xp.isfinite(variances), 1.0 / variances, 0.0)
        if weights == "ivar":
            wsum = _band_sum(w, axis)
            img = xp.where(wsum > 0, _band_sum(w * xp.where(usable, images, 0.0), axis) / wsum, 0.0)
            var = xp.where(wsum > 0, 1.0 / wsum, INF)
        else:
            pos = w > 0
            nb = _band_sum(as_dtype(pos, "int64"), axis)
            chi2 = _band_sum(xp.where(pos, images, 0.0) ** 2 * w, axis)
            stat = as_dtype(sqrt(chi2), "float64") - sqrt(
                clip_min(as_dtype(nb, "float64") - 0.5, 0.0)
            )
            img = xp.where(nb > 0, stat, 0.0)
            var = xp.where(nb > 0, 1.0, INF)
    return as_dtype(img, "float32"), as_dtype(var, "float32")


def matched_filter(data, variance, kernel: np.ndarray | None):
    """The filtered image sep thresholds: ``Σ k d / V`` over ``sqrt(Σ k² / V)`` (S/N per pixel).

    Same formula as sep's ``filter_type="matched"`` with a variance array; used to
    weight footprint moments exactly as sep does. Unusable pixels (``V = inf``)
    contribute nothing; outside the array counts as no data.

    Parameters
    ----------
    data, variance : numpy.ndarray or torch.Tensor
        Detection image and its variance (inf where unusable); a tensor may carry leading
        (window) axes.
    kernel : numpy.ndarray or None
        The detection filter (:attr:`DetectionConfig.kernel`); None: the image divided by
        its noise.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        The filtered image (float32): ``scipy.ndimage.correlate`` in numpy, the same sums
        in the same order in torch, the same in any window (``docs/kernels.md``).
    """
    xp = namespace(data)
    with quiet(xp):
        ok = xp.isfinite(variance) & (variance > 0)
        ivar = xp.where(ok, 1.0 / variance, 0.0)
        if kernel is None:
            return xp.where(ivar > 0, data * sqrt(ivar), 0.0)
        k = np.asarray(kernel, dtype=np.float64)
        if xp is np:
            num = ndimage.correlate(data * ivar, k, mode="constant", cval=0.0)
            den = ndimage.correlate(ivar, k * k, mode="constant", cval=0.0)
        else:
            num, den = _correlate_torch(data * ivar, k), _correlate_torch(ivar, k * k)
        return xp.where(den > 0, num / sqrt(xp.where(den > 0, den, 1.0)), 0.0)


def _correlate_torch(x, k: np.ndarray):
    """``ndimage.correlate(x, k, mode="constant")`` over the last two axes, in its order."""
    import torch.nn.functional as F

    kh, kw = k.shape
    h, w = x.shape[-2:]
    cy, cx = kh // 2, kw // 2
    xp_ = F.pad(x.double(), (cx, kw - 1 - cx, cy, kh - 1 - cy))
    acc = x.new_zeros(x.shape, dtype=xp_.dtype)
    for i in range(kh):
        for j in range(kw):
            if k[i, j] != 0.0:
                acc = acc + xp_[..., i : i + h, j : j + w] * float(k[i, j])
    return acc.float()


class _Overflow(RuntimeError):
    """sep's pixel stack or sub-object limit was reached at the limits it was given."""


def _extract(data, var, mask, cfg: DetectionConfig, deblend_cont: float, *, grow: bool = True,
             sublimit: int | None = None):  # fmt: skip
    """sep.extract with the project's fixed options: ``(objects, segmentation, sub-object limit)``.

    sep's limits are grown ×4 on overflow (``grow``; up to the configured maxima) or the
    overflow is raised as :class:`_Overflow`. ``sublimit`` starts the sub-object limit
    higher than configured (a limit learned from an earlier call on the same pixels).
    """
    # sep allocates (and clears) its whole pixel stack on every call, so the stack is sized to
    # the array: a cutout call with a large stack costs ~30x more than the deblending itself.
    # A stack as large as the array can never overflow, so the growth is bounded by that.
    max_stack = max(int(cfg.max_pixstack), data.size + 16)
    pixstack = max(1024, min(int(cfg.pixstack), data.size + 16))
    sublimit = max(int(cfg.sub_object_limit), sublimit or 0)
    saved = (sep.get_extract_pixstack(), sep.get_sub_object_limit())
    try:
        while True:
            sep.set_extract_pixstack(pixstack)
            sep.set_sub_object_limit(sublimit)
            try:
                objects, seg = sep.extract(
                    data, cfg.sep_thresh, var=var, mask=mask, minarea=int(cfg.minarea),
                    filter_kernel=cfg.kernel, filter_type="matched",
                    deblend_nthresh=int(cfg.deblend_nthresh), deblend_cont=deblend_cont,
                    clean=False, segmentation_map=True,
                )  # fmt: skip
                return objects, seg, sublimit
            except Exception as err:
                text = str(err)
                full = "pixel buffer full" in text
                if not grow and (full or "deblending overflow" in text):
                    raise _Overflow(text) from err
                if full and pixstack < max_stack:
                    pixstack = min(pixstack * 4, max_stack)
                    logger.info("sep pixel stack full; retrying with %d", pixstack)
                elif "deblending overflow" in text and sublimit < cfg.max_sub_object_limit:
                    sublimit = min(sublimit * 4, int(cfg.max_sub_object_limit))
                    logger.info("sep sub-object limit reached; retrying with %d", sublimit)
                else:
                    raise
    finally:  # sep's limits are process-global: leave them as the caller had them
        sep.set_extract_pixstack(saved[0])
        sep.set_sub_object_limit(saved[1])


def _children_per_parent(seg: np.ndarray, parents: np.ndarray, n_parents: int) -> np.ndarray:
    """Number of sep objects of ``seg`` on each parent of ``parents`` (index 0: none)."""
    n_seg = int(seg.max()) if seg.size else 0
    flat = np.flatnonzero(seg)
    child_parent = np.zeros(n_seg + 1, dtype=np.int64)
    child_parent[seg.ravel()[flat]] = parents.ravel()[flat]
    return np.bincount(child_parent[child_parent > 0], minlength=n_parents + 1)


def _parents_in_a_crowd(data, var, mask, cfg: DetectionConfig):
    """Parents and children counts of a window whose deblending overflowed sep's limits.

    The parents come from a call without deblending (the same footprints: deblending only
    splits them). Giant parents (``_GIANT_AREA`` px and more) are masked, ``cfg.pad`` px
    wide, in one deblending call that counts the children of the others; every parent within
    ``cfg.pad + 1`` px of the masked zone (whose filtered pixels the mask could change) and
    the giants are marked blended, to be deblended each in a call of its own. So a giant is deblended once, not once
    in the window and again in its cutout, and the result is the plain path's.
    """
    plain = dataclasses.replace(cfg, deblend_nthresh=1)
    _, seg0, _ = _extract(data, var, mask, plain, 1.0)
    parents, n_parents = ndimage.label(seg0 > 0, structure=_EIGHT)
    area = np.bincount(parents.ravel(), minlength=n_parents + 1)
    area[0] = 0
    giant = area >= _GIANT_AREA
    zone = ndimage.binary_dilation(giant[parents], _EIGHT, iterations=cfg.pad)
    near = np.zeros(n_parents + 1, dtype=bool)
    near[parents[ndimage.binary_dilation(zone, _EIGHT, iterations=cfg.pad + 1)]] = True
    near[0] = False
    logger.info("crowded window: %d giant parent(s), %d parent(s) beside them deblended alone",
                int(giant.sum()), int(near.sum()))  # fmt: skip
    masked = np.ascontiguousarray(mask | zone, dtype=np.uint8)
    _, seg, sublimit = _extract(data, var, masked, cfg, cfg.deblend_cont)
    kids = _children_per_parent(seg, parents, n_parents)
    kids[near] = np.maximum(kids[near], 2)
    return parents, n_parents, kids, sublimit


def detect_sources(
    data: np.ndarray, variance: np.ndarray, mask: np.ndarray, cfg: DetectionConfig
) -> DetectionResult:
    """Detect and deblend sources in one window, independently of the window's extent.

    Parameters
    ----------
    data : numpy.ndarray
        2-D background-subtracted detection image (float32, C-contiguous).
    variance : numpy.ndarray
        Its per-pixel variance (inf where unusable).
    mask : numpy.ndarray of bool
        Pixels excluded from detection.
    cfg : DetectionConfig
        Parameters.

    Returns
    -------
    DetectionResult
    """
    data = np.ascontiguousarray(data, dtype=np.float32)
    var = np.ascontiguousarray(np.where(mask, 1.0, variance), dtype=np.float32)
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    overflow = False
    sublimit = None
    try:
        _, seg, _ = _extract(data, var, mask, cfg, cfg.deblend_cont, grow=False)
        parents, n_parents = ndimage.label(seg > 0, structure=_EIGHT)
        kids = _children_per_parent(seg, parents, n_parents)
    except _Overflow:
        try:
            parents, n_parents, kids, sublimit = _parents_in_a_crowd(data, var, mask, cfg)
        except Exception as err:
            # Limits beyond the maxima even so: no deblending, flagged.
            logger.warning("sep failed with deblending (%s); retrying without deblending", err)
            overflow = True
            plain = dataclasses.replace(
                cfg, deblend_nthresh=1, sub_object_limit=1024, max_sub_object_limit=1024
            )
            _, seg, _ = _extract(data, var, mask, plain, 1.0)
            parents, n_parents = ndimage.label(seg > 0, structure=_EIGHT)
            kids = _children_per_parent(seg, parents, n_parents)
    if n_parents == 0:
        none = np.zeros(0, np.int32)
        return DetectionResult(np.zeros(data.shape, np.int32), none, parents, none, overflow)

    # Isolated parents keep their single child as found, relabelled 1..n in parent order
    # (a window-independent order is not required: final IDs come from peak positions).
    iso_ids = np.flatnonzero(kids == 1)
    remap = np.zeros(n_parents + 1, dtype=np.int32)
    remap[iso_ids] = np.arange(1, len(iso_ids) + 1, dtype=np.int32)
    labels = remap[parents]  # blended parents map to 0 and are filled below
    out_parent = [iso_ids.astype(np.int32)]
    n_children = [np.ones(len(iso_ids), dtype=np.int32)]
    next_label = len(iso_ids) + 1

    # Blended parents: deblend each in a call of its own on a mosaic-anchored cutout.
    blended = np.flatnonzero(kids > 1)
    if len(blended):
        slices = ndimage.find_objects(parents)
        pad = cfg.pad
        h, w = data.shape
        for p in blended:
            sy, sx = slices[p - 1]
            y0, y1 = max(0, sy.start - pad), min(h, sy.stop + pad)
            x0, x1 = max(0, sx.start - pad), min(w, sx.stop + pad)
            cut = (slice(y0, y1), slice(x0, x1))
            in_parent = parents[cut] == p
            try:
                cutouts = (np.ascontiguousarray(a[cut]) for a in (data, var, mask))
                # A giant starts at the largest sub-object limit: a failed try costs about
                # as much as the deblending itself.
                start = cfg.max_sub_object_limit if in_parent.sum() >= _GIANT_AREA else sublimit
                _, cseg, _ = _extract(*cutouts, cfg, cfg.deblend_cont, sublimit=start)
            except Exception as err:
                logger.warning("deblending overflow in a parent of %d px: %s", in_parent.sum(), err)
                overflow = True
                cseg = np.where(in_parent, 1, 0).astype(np.int32)
            # Children = labels present on the parent's pixels: never empty, so no renumbering
            # is needed afterwards.
            child_ids = np.unique(cseg[in_parent])
            child_ids = child_ids[child_ids > 0]
            if len(child_ids) == 0:  # cannot happen for a parent found above; keep it whole
                child_ids = np.array([1])
                cseg = np.where(in_parent, 1, 0).astype(np.int32)
            lut = np.zeros(int(cseg.max()) + 1, dtype=np.int32)
            lut[child_ids] = np.arange(next_label, next_label + len(child_ids), dtype=np.int32)
            # Pixels of the parent that the cutout call left unassigned go to nobody.
            labels[cut][in_parent] = lut[cseg][in_parent]
            out_parent.append(np.full(len(child_ids), p, dtype=np.int32))
            n_children.append(np.full(len(child_ids), len(child_ids), dtype=np.int32))
            next_label += len(child_ids)
    return DetectionResult(
        labels, np.concatenate(out_parent), parents, np.concatenate(n_children), overflow
    )
