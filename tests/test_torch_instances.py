"""Batched torch instance extraction against the scipy/one-window reference."""

from __future__ import annotations

import _reference
import numpy as np
import pytest
import torch
from _reference import extract_instances_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_array_equal
from scipy import ndimage

from survey_engine.kernels.detect import DetectionResult
from survey_engine.kernels.torch_instances import (
    InstanceBatch,
    connected_components,
    extract_instances_batch,
)
from survey_engine.unet.infer import UNetConfig, UNetOutput, predict_window
from survey_engine.unet.model import DEFAULT_WEIGHTS

EIGHT = np.ones((3, 3), dtype=bool)


# --- connected components ----------------------------------------------------------------


def _assert_cc_matches_scipy(mask: np.ndarray) -> None:
    labels, counts = connected_components(torch.from_numpy(mask))
    assert labels.dtype == torch.int64 and counts.dtype == torch.int64
    assert labels.shape == mask.shape and counts.shape == (mask.shape[0],)
    for b in range(mask.shape[0]):
        ref, n = ndimage.label(mask[b], structure=EIGHT)
        assert int(counts[b]) == n
        assert_array_equal(labels[b].numpy(), ref)


def _spiral(n: int) -> np.ndarray:
    """A one-pixel-wide square spiral (one component, a path of ~n²/2 pixels)."""
    m = np.zeros((n, n), bool)
    y, x, dy, dx = 0, 0, 0, 1
    m[0, 0] = True
    seen = np.zeros_like(m)
    while True:
        moved = False
        for _ in range(2):
            ny, nx = y + 2 * dy, x + 2 * dx
            if 0 <= ny < n and 0 <= nx < n and not seen[ny, nx]:
                m[y + dy, x + dx] = m[ny, nx] = True
                seen[max(ny - 1, 0) : ny + 2, max(nx - 1, 0) : nx + 2] = True
                seen[y, x] = True
                y, x = ny, nx
                moved = True
                break
            dy, dx = dx, -dy  # turn right
        if not moved:
            return m


def _serpentine(h: int, w: int) -> np.ndarray:
    """Rows joined alternately at the right and left ends: a path through every other row."""
    m = np.zeros((h, w), bool)
    m[::2] = True
    for i, y in enumerate(range(1, h, 2)):
        m[y, w - 1 if i % 2 == 0 else 0] = True
    return m


@pytest.mark.parametrize("density", [0.05, 0.2, 0.4, 0.5, 0.6, 0.8])
def test_cc_random_masks_match_scipy(density):
    rng = np.random.default_rng(int(density * 100))
    _assert_cc_matches_scipy(rng.random((3, 61, 83)) < density)


def test_cc_smoothed_blobs_match_scipy():
    rng = np.random.default_rng(7)
    field = ndimage.gaussian_filter(rng.standard_normal((2, 128, 96)), (0, 2.5, 2.5))
    _assert_cc_matches_scipy(field > 0.05)


def test_cc_long_paths_match_scipy():
    spiral = _spiral(121)
    assert ndimage.label(spiral, structure=EIGHT)[1] == 1
    snake = _serpentine(121, 121)
    # Diagonal staircase and its mirror: 8-connected only through corners.
    stairs = np.eye(121, dtype=bool) | np.eye(121, k=1, dtype=bool)[:, ::-1]
    mask = np.stack([spiral, snake, stairs, spiral[::-1, ::-1], snake.T[:, ::-1]])
    _assert_cc_matches_scipy(mask)


def test_cc_empty_full_and_thin_windows():
    _assert_cc_matches_scipy(np.zeros((2, 10, 12), bool))
    _assert_cc_matches_scipy(np.ones((3, 10, 12), bool))
    _assert_cc_matches_scipy(np.zeros((0, 5, 5), bool))
    rng = np.random.default_rng(3)
    _assert_cc_matches_scipy(rng.random((4, 1, 57)) < 0.6)
    _assert_cc_matches_scipy(rng.random((4, 57, 1)) < 0.6)
    _assert_cc_matches_scipy(np.ones((3, 1, 1), bool))


def test_cc_windows_do_not_connect():
    # Components touching every border of every window, full windows next to empty ones.
    mask = np.zeros((4, 9, 11), bool)
    mask[0, -1, :] = True
    mask[1, 0, :] = True  # would join window 0's last row if windows leaked
    mask[1, :, -1] = True
    mask[2, :, 0] = True  # would join window 1's last column through the flat index
    mask[2, -1, -1] = True
    mask[3] = True
    _assert_cc_matches_scipy(mask)
    _, counts = connected_components(torch.from_numpy(mask))
    assert_array_equal(counts.numpy(), [1, 1, 2, 1])


def test_cc_rejects_bad_input():
    with pytest.raises(ValueError, match="bool tensor"):
        connected_components(torch.zeros((2, 3), dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor"):
        connected_components(torch.zeros((1, 2, 3)))


# --- instances ---------------------------------------------------------------------------


def _blob_maps(h: int, w: int, seed: int, n_blobs: int = 18, pairs: int = 4):
    """Synthetic U-Net maps of Gaussian blobs, some of them blended pairs.

    Returns ``(foreground, centre, offset)`` float32 arrays ``(H, W)``, ``(H, W)``,
    ``(2, H, W)``: foreground is a logistic function of the summed profiles, centre
    peaks sit at the (sub-pixel) blob centres, offsets point (with noise) at the
    nearest centre.
    """
    rng = np.random.default_rng(seed)
    centres = [rng.uniform((2, 2), (h - 2, w - 2)) for _ in range(n_blobs)]
    for _ in range(pairs):  # blended pairs 3-6 pixels apart
        c = rng.uniform((6, 6), (h - 6, w - 6))
        ang = rng.uniform(0, np.pi)
        sep = rng.uniform(3, 6)
        centres += [c, c + sep * np.array([np.sin(ang), np.cos(ang)])]
    centres = np.array(centres)
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    prof = np.zeros((h, w))
    cen = np.zeros((h, w))
    d2 = []
    for cy, cx in centres:
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        s = rng.uniform(1.0, 3.0)
        prof += rng.uniform(0.5, 3.0) * np.exp(-r2 / (2 * s * s))
        cen = np.maximum(cen, rng.uniform(0.5, 0.95) * np.exp(-r2 / 2.0))
        d2.append(r2)
    fg = 1.0 / (1.0 + np.exp(-8.0 * (prof - 0.3)))
    near = np.argmin(np.stack(d2), axis=0)
    off = np.stack([centres[near, 0] - yy, centres[near, 1] - xx])
    off += rng.normal(0, 0.6, off.shape)
    cen += rng.uniform(0, 0.05, cen.shape)  # noise: spurious low peaks and ties broken
    return fg.astype(np.float32), cen.astype(np.float32), off.astype(np.float32)


def _assert_same(res: DetectionResult, ref: DetectionResult) -> None:
    for name in ("labels", "parent", "parents", "n_children"):
        got, want = getattr(res, name), getattr(ref, name)
        assert got.dtype == np.int32, name
        assert got.shape == want.shape, name
        assert_array_equal(got, want, err_msg=name)
    assert res.overflow is False


def _check_batch(fg, cen, off, bad=None, **kw) -> InstanceBatch:
    """Batched result on CPU, checked window by window against the reference (tests/_reference.py)."""
    out = extract_instances_batch(
        torch.from_numpy(fg),
        torch.from_numpy(cen),
        torch.from_numpy(off),
        None if bad is None else torch.from_numpy(bad),
        **kw,
    )
    assert out.labels.dtype == torch.int32 and out.parents.dtype == torch.int32
    assert out.n_objects.dtype == torch.int64 and out.parent.dtype == torch.int32
    assert out.n_children.dtype == torch.int32
    assert len(out.parent) == len(out.n_children) == int(out.n_objects.sum())
    for b in range(fg.shape[0]):
        maps = UNetOutput(fg[b], cen[b], off[b])
        ref = extract_instances_reference(maps, None if bad is None else bad[b], **kw)
        _assert_same(out.window(b), ref)
        assert int(out.n_objects[b]) == ref.n_objects
    return out


@pytest.fixture(scope="module")
def blob_batch():
    maps = [_blob_maps(96, 128, seed) for seed in (11, 12, 13)]
    fg, cen, off = (np.stack(m) for m in zip(*maps, strict=True))
    bad = np.zeros(fg.shape, bool)
    bad[0, 30:45, 50:70] = True
    bad[1, :, 60] = True  # splits components
    bad[2, 80:, :] = True
    return fg, cen, off, bad


def test_batch_equals_reference_on_blobs(blob_batch):
    fg, cen, off, bad = blob_batch
    out = _check_batch(fg, cen, off, bad)
    # The maps make a real test: several objects per window, blended parents.
    assert (out.n_objects >= 10).all()
    assert int((out.n_children > 1).sum()) >= 4
    _check_batch(fg, cen, off)


@pytest.mark.parametrize(
    ("fg_t", "c_t", "minarea"), [(0.3, 0.2, 1), (0.5, 0.3, 5), (0.7, 0.5, 20), (0.5, 0.05, 3)]
)
def test_batch_equals_reference_across_thresholds(blob_batch, fg_t, c_t, minarea):
    fg, cen, off, bad = blob_batch
    _check_batch(
        fg, cen, off, bad, foreground_threshold=fg_t, centre_threshold=c_t, minarea=minarea
    )


def _tie_maps():
    h, w = 24, 30
    fg = np.zeros((2, h, w), np.float32)
    cen = np.zeros((2, h, w), np.float32)
    off = np.zeros((2, 2, h, w), np.float32)  # every pixel points at itself
    fg[:, 5:16, 4:26] = 0.9
    cen[:, 10, 10] = cen[:, 10, 14] = cen[:, 10, 20] = 0.9  # columns 12 and 17 are ties
    cen[1, 4, 5] = 0.9  # off the foreground: no peak
    cen[1, 10, 20:23] = 0.9  # a plateau: its first pixel is the peak
    return fg, cen, off


def test_batch_exact_ties_go_to_the_first_peak():
    fg, cen, off = _tie_maps()
    out = _check_batch(fg, cen, off)
    res = out.window(0)
    assert res.n_objects == 3
    assert (res.labels[5:16, 12] == res.labels[10, 10]).all()
    assert (res.labels[5:16, 17] == res.labels[10, 14]).all()


@pytest.mark.parametrize("max_pairs", [2, 97])
def test_batch_equals_reference_with_small_chunks(blob_batch, monkeypatch, max_pairs):
    # 2: single pixels with more candidate peaks than a chunk holds; 97: many chunks.
    import survey_engine.kernels.torch_instances as ti

    monkeypatch.setattr(ti, "_MAX_PAIRS", max_pairs)
    monkeypatch.setattr(_reference, "_MAX_PAIRS", max_pairs)
    if max_pairs == 2:
        _check_batch(*_tie_maps())
    else:
        fg, cen, off, bad = blob_batch
        _check_batch(fg, cen, off, bad, centre_threshold=0.1)


def test_batch_offsets_use_exact_integer_differences():
    # A pixel whose offset points 2^-20 px off the midpoint of two peaks: the float32
    # distance (peak - pixel) - offset resolves it; (peak - (pixel + offset)) would round
    # the target to the midpoint at x ~ 4000 and give the tie to the first peak.
    w = 4100
    fg = np.zeros((2, 5, w), np.float32)
    cen = np.zeros((2, 5, w), np.float32)
    off = np.zeros((2, 2, 5, w), np.float32)
    for b, c in enumerate((10, 4000)):
        fg[b, :, c - 4 : c + 4] = 0.9
        cen[b, 2, c - 3] = cen[b, 2, c + 2] = 0.9
        off[b, 1, 2, c] = np.float32(-0.5 + 2.0**-20)
    out = _check_batch(fg, cen, off)
    for b, c in enumerate((10, 4000)):
        res = out.window(b)
        assert res.n_objects == 2
        assert res.labels[2, c] == res.labels[2, c + 2] == 2


def test_batch_edge_cases():
    h, w = 32, 40
    fg = np.zeros((5, h, w), np.float32)
    cen = np.zeros((5, h, w), np.float32)
    off = np.zeros((5, 2, h, w), np.float32)
    # 0: no foreground at all (but a centre peak).
    cen[0, 10, 10] = 0.9
    # 1: foreground without peaks.
    fg[1, 5:15, 5:15] = 0.9
    # 2: components below minarea, with peaks.
    fg[2, 3:5, 3:5] = 0.9
    cen[2, 3, 3] = 0.9
    fg[2, 20, 20] = 0.9
    cen[2, 20, 20] = 0.9
    # 3: a normal window between degenerate ones.
    b3 = _blob_maps(h, w, 5, n_blobs=5, pairs=1)
    fg[3], cen[3], off[3] = b3
    # 4: everything masked.
    fg[4], cen[4], off[4] = b3
    bad = np.zeros(fg.shape, bool)
    bad[4] = True
    out = _check_batch(fg, cen, off, bad)
    assert_array_equal(out.n_objects.numpy()[[0, 1, 2, 4]], 0)
    assert int(out.n_objects[3]) > 0
    # A batch with no objects anywhere.
    out = _check_batch(fg[:3], cen[:3], off[:3])
    assert out.parent.shape == (0,) and int(out.labels.abs().sum()) == 0


def test_batch_errors_and_window_index(blob_batch):
    fg, cen, off, bad = (torch.from_numpy(a) for a in blob_batch)
    with pytest.raises(ValueError, match="maps must be"):
        extract_instances_batch(fg, cen, off[:, 0])
    with pytest.raises(ValueError, match="bad must have"):
        extract_instances_batch(fg, cen, off, bad[:, :3])
    out = extract_instances_batch(fg, cen, off, bad)
    with pytest.raises(IndexError):
        out.window(3)
    _assert_same(out.window(-1), out.window(2))


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="no shipped U-Net weights")
def test_batch_equals_reference_on_shipped_network():
    from survey_engine.unet import load_model

    model = load_model()
    rng = np.random.default_rng(1)
    h = w = 96
    yy, xx = np.mgrid[:h, :w]
    cfg = UNetConfig(patch=256)
    inf = model.config["inference"]
    kw = {
        "foreground_threshold": float(inf.get("foreground_threshold", 0.5)),
        "centre_threshold": float(inf.get("centre_threshold", 0.3)),
        "minarea": 5,
    }
    maps = []
    bads = []
    for _ in range(2):
        img = rng.standard_normal((h, w)).astype(np.float32)
        for _ in range(14):
            cy, cx = rng.uniform(4, h - 4, 2)
            amp, s = rng.uniform(5, 60), rng.uniform(1.0, 3.0)
            img += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        var = np.ones_like(img)
        bad = np.zeros(img.shape, bool)
        bad[70:75, 10:30] = True
        maps.append(predict_window(model, img, var, bad, cfg=cfg))
        bads.append(bad)
    fg = np.stack([m.foreground for m in maps])
    cen = np.stack([m.centre for m in maps])
    off = np.stack([m.offset for m in maps])
    out = _check_batch(fg, cen, off, np.stack(bads), **kw)
    assert (out.n_objects > 3).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu(blob_batch):
    fg, cen, off, bad = (torch.from_numpy(a) for a in blob_batch)
    rng = np.random.default_rng(2)
    mask = torch.from_numpy(np.concatenate([rng.random((3, 96, 96)) < 0.55, _spiral(96)[None]]))
    lab_cpu, n_cpu = connected_components(mask)
    lab_gpu, n_gpu = connected_components(mask.cuda())
    assert lab_gpu.is_cuda
    assert torch.equal(lab_gpu.cpu(), lab_cpu) and torch.equal(n_gpu.cpu(), n_cpu)
    for kw in ({}, {"foreground_threshold": 0.3, "centre_threshold": 0.1, "minarea": 2}):
        cpu = extract_instances_batch(fg, cen, off, bad, **kw)
        gpu = extract_instances_batch(fg.cuda(), cen.cuda(), off.cuda(), bad.cuda(), **kw)
        assert gpu.labels.is_cuda and gpu.parent.is_cuda
        for name in ("labels", "parents", "n_objects", "parent", "n_children"):
            assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name


# --- the grid assignment in crowded fields -------------------------------------------------


def _crowded_maps(h: int, w: int, seed: int, per_px2: float = 1 / 10, wild: float = 0.02):
    """Maps of a crowded stellar field: one foreground component holding many peaks.

    Stars at ``per_px2`` per pixel, the foreground on everywhere but a border, centre peaks
    at the stars, offsets to the nearest star with noise; a fraction ``wild`` of the pixels
    point anywhere (tens to thousands of px away), the pixels the grid must hand on to its
    wider ring and then to the brute force.
    """
    rng = np.random.default_rng(seed)
    n = int(per_px2 * h * w)
    stars = rng.uniform((1, 1), (h - 1, w - 1), (n, 2))
    yy, xx = np.mgrid[:h, :w]
    fg = np.zeros((h, w), np.float32)
    fg[1:-1, 1:-1] = 0.9
    cen = rng.uniform(0, 0.1, (h, w)).astype(np.float32)
    iy, ix = np.round(stars).astype(int).T
    cen[iy, ix] = rng.uniform(0.5, 0.95, n)
    from scipy.spatial import cKDTree

    _, near = cKDTree(stars).query(np.stack([yy.ravel(), xx.ravel()], 1))
    off = (stars[near].T - np.stack([yy.ravel(), xx.ravel()])).reshape(2, h, w)
    off += rng.normal(0, 0.7, off.shape)
    odd = rng.random((h, w)) < wild
    off[:, odd] = rng.normal(0, 1, (2, int(odd.sum()))) * 10.0 ** rng.uniform(
        1, 3.5, int(odd.sum())
    )
    return fg, cen, off.astype(np.float32)


@pytest.mark.parametrize(("cell", "grid_min"), [(8, 16), (3, 1), (1, 1), (40, 2)])
def test_grid_assignment_equals_brute_force_in_a_crowd(monkeypatch, cell, grid_min):
    import survey_engine.kernels.torch_instances as ti

    monkeypatch.setattr(ti, "_CELL", cell)
    monkeypatch.setattr(ti, "_GRID_MIN", grid_min)
    maps = [_crowded_maps(70, 90, seed) for seed in (1, 2)]
    fg, cen, off = (np.stack(m) for m in zip(*maps, strict=True))
    bad = np.zeros(fg.shape, bool)
    bad[1, :, 45] = True  # two crowded components in window 1
    out = _check_batch(fg, cen, off, bad, centre_threshold=0.3)
    # One parent of hundreds of children per window: the grid is what assigned them.
    assert int(out.n_children.max()) > 300
    # The blob windows, with every multi-peak component on the grid, too.
    blob = [_blob_maps(96, 128, seed) for seed in (11, 12)]
    _check_batch(*(np.stack(m) for m in zip(*blob, strict=True)), centre_threshold=0.1)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.tuples(st.integers(3, 40), st.integers(3, 40)),
    density=st.floats(0.02, 0.5),
    scale=st.sampled_from([0.0, 1.0, 5.0, 100.0, 1e4]),
    cell=st.integers(1, 12),
)
def test_grid_assignment_property(seed, shape, density, scale, cell):
    # Random peaks, random offsets at every scale (0: every pixel points at itself, with
    # exact ties; 1e4: far outside the window): the grid's choice is the brute force's.
    import survey_engine.kernels.torch_instances as ti

    rng = np.random.default_rng(seed)
    h, w = shape
    fg = (rng.random((1, h, w)) < 0.9).astype(np.float32)
    cen = (rng.random((1, h, w)) < density).astype(np.float32) * 0.9
    off = (rng.normal(0, 1, (1, 2, h, w)) * scale).astype(np.float32)
    if scale == 1.0:
        off = np.round(off * 2) / 2  # half-pixel offsets: many exact ties
    saved = ti._CELL, ti._GRID_MIN
    try:
        ti._CELL, ti._GRID_MIN = cell, 1
        _check_batch(fg, cen, off, minarea=1)
    finally:
        ti._CELL, ti._GRID_MIN = saved


def test_crowded_window_costs_its_pixels_not_its_pairs():
    # 512² px, ~26,000 peaks in one component: the brute force would compare ~7e9 pairs
    # (minutes); the grid compares each pixel with the few peaks near its predicted centre.
    import time

    fg, cen, off = _crowded_maps(512, 512, 3, wild=0.001)
    t0 = time.perf_counter()
    out = extract_instances_batch(*(torch.from_numpy(a[None]) for a in (fg, cen, off)))
    elapsed = time.perf_counter() - t0
    assert int(out.n_objects[0]) > 15_000
    assert int(out.n_children.max()) > 15_000
    assert elapsed < 30, f"{elapsed:.1f} s for one crowded 512² window"
