"""The torch measurement kernels against the numpy/sep reference (issue 6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from survey_engine.kernels.detect import DetectionConfig, detect_sources, matched_filter
from survey_engine.kernels.measure import MeasureConfig, measure_sources, windowed_centroid
from survey_engine.kernels.torch_measure import (
    measure_batch,
    measure_window,
    windowed_centroid_batch,
)

BANDS = ("g", "r")
FOOTPRINT = (
    "peak",
    "area",
    "det_iso_flux",
    "det_iso_flux_err",
    "x_iso",
    "y_iso",
    "a",
    "b",
    "theta",
    "e1",
    "e2",
)


def _scene(seed, shape=(150, 190), nsrc=24, nb=2):
    """Elliptical Gaussian blobs (some blended, some cut by the edge) plus unit noise."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    truth = np.zeros((nb, h, w))
    for _ in range(nsrc):
        x, y = rng.uniform(-5, w + 5), rng.uniform(-5, h + 5)
        flux, s = rng.uniform(200, 5000), rng.uniform(1.2, 3.0)
        q, t = rng.uniform(0.5, 1.0), rng.uniform(0, np.pi)
        dx, dy = xx - x, yy - y
        u = dx * np.cos(t) + dy * np.sin(t)
        v = -dx * np.sin(t) + dy * np.cos(t)
        g = np.exp(-0.5 * (u**2 + (v / q) ** 2) / s**2) / (2 * np.pi * s * s * q)
        for b in range(nb):
            truth[b] += flux * rng.uniform(0.5, 1.5) * g
    img = (truth + rng.normal(0, 1, truth.shape)).astype(np.float32)
    var = np.ones((nb, h, w), np.float32)
    # A few unusable pixels in one band (variance inf, image 0: the caller's contract).
    var[1, 10:14, 20:60] = np.inf
    img[1, 10:14, 20:60] = 0.0
    det = img.mean(0).astype(np.float32)
    det_var = np.full((h, w), 1.0 / nb, np.float32)
    return det, det_var, img, var


@pytest.fixture(scope="module")
def windows():
    dcfg = DetectionConfig()
    out = []
    for seed in range(3):
        det, det_var, img, var = _scene(seed)
        bad = ~np.isfinite(det_var)
        labels = detect_sources(det, det_var, bad, dcfg).labels
        filt = matched_filter(det, det_var, dcfg.kernel)
        ref = measure_sources(
            det,
            det_var,
            bad,
            img,
            var,
            np.zeros(img.shape, np.uint16),
            labels,
            BANDS,
            MeasureConfig(),
            usable_bits=1,
            sat_bit=2,
            filtered=filt,
        )
        out.append(
            {
                "det": det,
                "det_var": det_var,
                "filtered": filt,
                "images": img,
                "variances": var,
                "labels": labels,
                "ref": ref,
            }
        )
    return out


def _stack(windows, device="cpu"):
    keys = ("det", "det_var", "filtered", "images", "variances", "labels")
    return [torch.from_numpy(np.stack([w[k] for w in windows])).to(device) for k in keys]


@pytest.fixture(scope="module")
def batched(windows):
    return measure_batch(*_stack(windows))


def _rel(mine, ref):
    ref = np.asarray(ref, dtype=np.float64)
    mine = np.asarray(mine, dtype=np.float64)
    return np.abs(mine - ref) / np.maximum(np.abs(ref), 1e-300)


def test_footprint_quantities_equal_the_reference(windows, batched):
    assert sum(int(w["labels"].max()) for w in windows) == len(batched["window"]) > 50
    for i, w in enumerate(windows):
        sel = (batched["window"] == i).numpy()
        ref = w["ref"].columns
        assert np.array_equal(batched["label"][sel].numpy(), np.arange(1, sel.sum() + 1))
        assert np.array_equal(batched["x_peak"][sel].numpy(), ref["x_peak"])
        assert np.array_equal(batched["y_peak"][sel].numpy(), ref["y_peak"])
        # Same sums in the same pixel order: measured max 2e-16 relative.
        for k in FOOTPRINT:
            assert _rel(batched[k][sel].numpy(), ref[k]).max() < 1e-9, k
        for k in ("iso_flux", "iso_flux_err"):
            for b, band in enumerate(BANDS):
                assert _rel(batched[k][sel, b].numpy(), w["ref"].bands[band][k]).max() < 1e-9


def test_windowed_centroid_equals_the_reference(windows):
    for w in windows:
        ref = w["ref"].columns
        det = torch.from_numpy(w["det"][None]).double()
        var = torch.from_numpy(w["det_var"][None]).double()
        labels = torch.from_numpy(w["labels"][None]).long()
        n = len(ref["x_peak"])
        py, px = ref["y_peak"], ref["x_peak"]
        u0, v0 = ref["x_iso"] - px, ref["y_iso"] - py
        sig = np.maximum(2.0 * ref["half_light_radius"] / 2.3548, 0.5)
        exp = windowed_centroid(w["det"], w["det_var"], w["labels"], py, px, u0, v0, sig)
        got = windowed_centroid_batch(
            det,
            var,
            labels,
            torch.zeros(n, dtype=torch.long),
            torch.arange(1, n + 1),
            torch.from_numpy(py),
            torch.from_numpy(px),
            torch.from_numpy(u0),
            torch.from_numpy(v0),
            torch.from_numpy(sig),
        )
        # Measured: max |Δ| ~1e-15 px.
        for g, e in zip(got[:4], exp[:4], strict=True):
            assert np.abs(g.numpy() - e).max() < 1e-9
        assert np.array_equal(got[4].numpy(), exp[4])


def test_aperture_quantities_close_to_sep(windows, batched):
    for i, w in enumerate(windows):
        sel = (batched["window"] == i).numpy()
        ref = w["ref"]
        # sep's own pixel-centre rules (kron_radius; sum_ellipse with subpix=1): measured max
        # 2e-16 relative, so the test asks for the stated 2 % only as an upper bound.
        assert (
            np.median(_rel(batched["kron_radius"][sel].numpy(), ref.columns["kron_radius"])) < 0.02
        )
        for k in ("det_kron_flux", "det_kron_flux_err"):
            assert np.median(_rel(batched[k][sel].numpy(), ref.columns[k])) < 1e-9
        for b, band in enumerate(BANDS):
            for k in ("kron_flux", "kron_flux_err"):
                assert np.median(_rel(batched[k][sel, b].numpy(), ref.bands[band][k])) < 1e-9
            # Pixel-centre circles against sep's 5×5 sub-pixel boundary: measured medians
            # 1.0-1.5 % (3 px, max 9 %), 0.15-0.18 % (6 px), 0.08-0.16 % (12 px).
            for k in ("aper_flux_3", "aper_flux_6", "aper_flux_12"):
                assert np.median(_rel(batched[k][sel, b].numpy(), ref.bands[band][k])) < 0.02
        # Half-light radius (interpolated pixel profile vs sep's binned one): medians 1.2-1.9 %.
        hlr = _rel(batched["half_light_radius"][sel].numpy(), ref.columns["half_light_radius"])
        assert np.median(hlr) < 0.03
        # Its window sigma moves the windowed positions by a small fraction of a pixel.
        for k in ("x", "y"):
            d = np.abs(batched[k][sel].numpy() - ref.columns[k])
            assert np.median(d) < 1e-3 and d.max() < 0.1


def test_batched_equals_one_by_one_bit_for_bit(windows, batched):
    for i, w in enumerate(windows):
        one = measure_window(*(t[0] for t in _stack([w])))
        sel = batched["window"] == i
        for k, v in one.items():
            if k == "window":
                continue
            assert torch.equal(batched[k][sel], v), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu(windows, batched):
    # Measured on an H100 (same measure_batch, CUDA vs CPU, labels from ndimage.label because
    # sep was not installed there): float64 max 4e-13 relative (theta, e1; cancellation),
    # 3e-15 elsewhere; float32 max 1e-4 (theta, e1), 4e-4 (one 12 px aperture), ~1e-7 median.
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-3)):
        got = measure_batch(*_stack(windows, "cuda"), dtype=dtype)
        assert torch.equal(got["window"].cpu(), batched["window"])
        assert torch.equal(got["x_peak"].cpu(), batched["x_peak"])
        assert torch.equal(got["area"].cpu(), batched["area"])
        for k in (*FOOTPRINT, "kron_radius", "det_kron_flux", "iso_flux", "aper_flux_6"):
            mine, ref = got[k].cpu().double(), batched[k]
            assert ((mine - ref).abs() <= tol * ref.abs().clamp(min=1.0)).float().mean() > 0.99, k


def test_errors_on_bad_inputs(windows):
    det, det_var, filt, img, var, labels = _stack(windows[:1])
    with pytest.raises(ValueError, match="det_var has shape"):
        measure_batch(det, det_var[:, :-1], filt, img, var, labels)
    with pytest.raises(ValueError, match=r"images must have shape \(B, nb, H, W\)"):
        measure_batch(det, det_var, filt, img[:, 0], var, labels)
    with pytest.raises(ValueError, match="variances has shape"):
        measure_batch(det, det_var, filt, img, var[:, :1], labels)
    with pytest.raises(ValueError, match=r"det must be a \(B, H, W\) tensor"):
        measure_batch(det[0], det_var, filt, img, var, labels)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        measure_batch(det, det_var, filt, img, var, labels.float())


def test_empty_window():
    z = torch.zeros(1, 8, 9)
    got = measure_batch(z, z + 1, z, torch.zeros(1, 2, 8, 9), torch.ones(1, 2, 8, 9), z.long())
    assert got["window"].shape == (0,) and got["aper_flux_3"].shape == (0, 2)
