"""sep detection in crowded windows: the result of the plain path, at a fraction of the cost."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from survey_engine.kernels.detect import DetectionConfig, detect_sources


def _cluster(n: int = 256, n_stars: int = 3000, core: float = 25.0, seed: int = 0):
    """A dense star cluster (Gaussian PSF, sigma 1.5 px) on a sky of unit noise."""
    rng = np.random.default_rng(seed)
    r = core * np.sqrt(np.expm1(rng.random(n_stars) * np.log1p((n / 2 / core) ** 2)))
    th = rng.uniform(0, 2 * np.pi, n_stars)
    y, x = n / 2 + r * np.sin(th), n / 2 + r * np.cos(th)
    keep = (y > 1) & (y < n - 2) & (x > 1) & (x < n - 2)
    flux = 200 * 10 ** (-0.4 * rng.uniform(0, 6, keep.sum()))
    yy, xx = np.mgrid[:n, :n]
    img = np.zeros((n, n))
    for yi, xi, f in zip(y[keep], x[keep], flux, strict=True):
        iy, ix = int(yi), int(xi)
        sl = (slice(max(iy - 7, 0), iy + 8), slice(max(ix - 7, 0), ix + 8))
        img[sl] += f / (2 * np.pi * 2.25) * np.exp(-((yy[sl] - yi) ** 2 + (xx[sl] - xi) ** 2) / 4.5)
    return (img + rng.normal(0, 1, img.shape)).astype(np.float32)


def _footprints(res):
    """The partition of the pixels into objects, independent of the numbering."""
    lab = res.labels.ravel()
    idx = np.flatnonzero(lab)
    order = np.argsort(lab[idx], kind="stable")
    lab_sorted, pix = lab[idx][order], idx[order]
    starts = np.r_[0, np.flatnonzero(np.diff(lab_sorted)) + 1]
    sizes = np.diff(np.r_[starts, len(lab_sorted)])
    kids = res.n_children[lab_sorted[starts] - 1]
    return sorted(zip(pix[starts].tolist(), sizes.tolist(), kids.tolist(), strict=True))


@pytest.fixture(scope="module")
def cluster():
    return _cluster()


def test_crowded_window_equals_the_plain_path(cluster, caplog):
    img, var, bad = cluster, np.ones_like(cluster), np.zeros(cluster.shape, bool)
    # Limits too small for this window: the crowded path (giants deblended alone).
    small = DetectionConfig(pixstack=2000, sub_object_limit=64)
    with caplog.at_level(logging.INFO, logger="survey_engine.kernels.detect"):
        crowded = detect_sources(img, var, bad, small)
    assert "crowded window: 1 giant parent(s)" in caplog.text
    # Limits large enough from the start: one deblending call over the window.
    plain = detect_sources(img, var, bad, DetectionConfig(pixstack=10**7, sub_object_limit=65536))
    assert not crowded.overflow and not plain.overflow
    assert crowded.n_objects == plain.n_objects > 150
    assert int(np.bincount(plain.parents.ravel())[1:].max()) > 4096  # a giant parent
    assert int(plain.n_children.max()) >= 5
    assert _footprints(crowded) == _footprints(plain)
    np.testing.assert_array_equal(crowded.parents, plain.parents)


def test_crowded_window_is_independent_of_the_window(cluster):
    var, cfg = np.ones_like(cluster), DetectionConfig(pixstack=2000, sub_object_limit=64)
    full = detect_sources(cluster, var, np.zeros(cluster.shape, bool), cfg)
    # A window that cuts the sparse outskirts, keeping the cluster whole.
    sub = (slice(30, 240), slice(12, 250))
    part = detect_sources(cluster[sub], var[sub], np.zeros(cluster[sub].shape, bool), cfg)
    a, b = full.labels[sub], part.labels
    inner = np.zeros(a.shape, bool)
    inner[20:-20, 20:-20] = True  # objects cut by the smaller window differ, by design
    keep = np.isin(a, np.unique(a[inner & (a > 0)]))
    assert np.array_equal(a[keep] > 0, b[keep] > 0)
    pairs = np.unique(np.c_[a[keep & (a > 0)], b[keep & (a > 0)]], axis=0)
    assert len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1])) > 100


def test_crowded_giant_beyond_the_limits_is_flagged_not_fatal(cluster):
    cfg = DetectionConfig(pixstack=2000, sub_object_limit=4, max_sub_object_limit=16)
    res = detect_sources(cluster, np.ones_like(cluster), np.zeros(cluster.shape, bool), cfg)
    assert res.overflow
    # The giant kept whole, its sparse neighbours deblended as usual.
    assert res.n_objects > 20
    assert int(np.bincount(res.labels.ravel())[1:].max()) > 4096
