"""The torch background kernels against the numpy/scipy reference.

Measured on the meshes and windows below (CPU): :func:`mesh_statistics_torch` (the torch
backend's, binary searches on the device) equals the numpy :func:`mesh_statistics` (full
comparisons, no torch) bit for bit (the tests allow 1e-9 relative); the
B-spline evaluation equals :func:`interpolate_background` bit for bit in float32, in both
accumulation orders (the tests allow one float32 ulp for the default separable order,
and require bit equality for ``scipy_order=True``).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from survey_engine.kernels import torch_background as tbg
from survey_engine.kernels.background import (
    BackgroundMesh,
    interpolate_background,
    mesh_statistics,
)
from survey_engine.kernels.torch_background import (
    BackgroundSpline,
    background_spline,
    background_windows,
    evaluate_background,
    mesh_statistics_torch,
)

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _block(seed, shape, *, nsrc=6, bad_fraction=0.03):
    """Noise on a gradient, a few bright blobs (crowded cells), bad pixels, NaN, +inf."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    img = 50.0 + 0.01 * yy - 0.02 * xx + rng.normal(0.0, 3.0, shape)
    for _ in range(nsrc):
        cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 25)
        img += rng.uniform(20, 2000) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    img = img.astype(np.float32)
    bad = rng.random(shape) < bad_fraction
    bad[: h // 4, : w // 5] = True  # some cells entirely or mostly masked
    img[rng.random(shape) < 0.002] = np.nan
    img[rng.random(shape) < 0.001] = np.inf
    return img, bad


def _reference(img, bad, box, **kw):
    """The numpy mesh statistics (an implementation of its own: full comparisons, no torch)."""
    return mesh_statistics(img, bad, box, **kw)


def _assert_close_nan(got, ref, rtol):
    got = np.asarray(got)
    assert got.shape == ref.shape
    assert got.dtype == np.float64
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(got[ok], ref[ok], rtol=rtol, atol=0.0)


def _mesh(seed, ncy, ncx, box, *, partial=(0, 0)):
    """A mesh of ``ncy × ncx`` cells; the last row/column of cells is cut by ``partial``."""
    rng = np.random.default_rng(seed)
    shape = (ncy * box - partial[0], ncx * box - partial[1])
    jj, ii = np.mgrid[:ncy, :ncx]
    level = 100.0 + 3.0 * np.sin(jj / 2.3) * np.cos(ii / 3.1) + rng.normal(0, 0.5, (ncy, ncx))
    rms = 2.0 + 0.1 * rng.random((ncy, ncx))
    return BackgroundMesh(level, rms, box, shape)


def _ulps(got, ref):
    """|got − ref| in units of the float32 spacing at ``ref``."""
    got = np.asarray(got, dtype=np.float32).astype(np.float64)
    ref32 = np.asarray(ref, dtype=np.float32)
    return np.abs(got - ref32) / np.spacing(np.abs(ref32)).astype(np.float64)


def _windows(shape, box):
    """Windows at the corners, edges, middle and partly outside a mosaic."""
    ny, nx = shape
    hy, hx = min(ny, 150), min(nx, 170)
    return [
        (0, hy, 0, hx),
        (ny - hy, ny, nx - hx, nx),
        (0, hy, nx - hx, nx),
        (ny - hy, ny, 0, hx),
        (max(0, ny // 2 - 61), max(0, ny // 2 - 61) + min(ny, 123), nx // 3, nx // 3 + 37),
        (-7, hy - 7, nx - hx + 9, nx + 9),  # beyond the mosaic: clipped positions
        (box - 1, box + 2, box - 2, box + 3),  # across a cell boundary
    ]


MESHES = [
    # (ncy, ncx, box, partial last cell rows/cols)
    (1, 1, 64, (0, 0)),
    (1, 1, 32, (13, 5)),
    (1, 7, 64, (0, 20)),
    (6, 1, 32, (9, 0)),
    (2, 2, 128, (0, 0)),
    (2, 3, 64, (50, 63)),
    (3, 5, 32, (0, 0)),
    (3, 5, 128, (100, 1)),
    (4, 4, 64, (0, 0)),
    (17, 23, 32, (0, 0)),
    (17, 23, 64, (31, 7)),
    (17, 23, 128, (0, 127)),
]


# --------------------------------------------------------------------------------------
# mesh statistics
# --------------------------------------------------------------------------------------


def test_torch_sort_puts_nan_last():
    x = torch.tensor([[3.0, float("nan"), -1.0, float("inf"), float("-inf"), 2.0, float("nan")]])
    got = torch.sort(x, dim=1).values.numpy()
    np.testing.assert_array_equal(got, np.sort(x.numpy(), axis=1))
    assert np.isnan(got[0, -2:]).all()
    assert got[0, -3] == np.inf


@pytest.mark.parametrize(
    ("shape", "box"),
    [((256, 256), 64), ((300, 257), 64), ((100, 70), 32), ((129, 200), 128), ((37, 41), 8)],
)
def test_mesh_statistics_matches_numpy(shape, box):
    img, bad = _block(shape[0] * shape[1] + box, shape)
    bad[:box, :box] = True  # an empty cell
    bad[-1, -box:] = True  # a partial cell with few usable pixels when the last row is short
    level, rms = _reference(img, bad, box)
    tl, tr = mesh_statistics_torch(torch.from_numpy(img), torch.from_numpy(bad), box)
    assert np.isnan(level).any() and np.isfinite(level).any()
    _assert_close_nan(tl.numpy(), level, 1e-9)
    _assert_close_nan(tr.numpy(), rms, 1e-9)
    # no mask, float64 input (cast to float32 as numpy does), other clipping settings
    level, rms = _reference(img.astype(np.float64), None, box, nsigma=2.0, iterations=9)
    tl, tr = mesh_statistics_torch(
        torch.from_numpy(img.astype(np.float64)), None, box, nsigma=2.0, iterations=9
    )
    _assert_close_nan(tl.numpy(), level, 1e-9)
    _assert_close_nan(tr.numpy(), rms, 1e-9)


def test_mesh_statistics_large_block_bitwise():
    """A 1024² block, box 128: the CPU results are bit-identical to numpy's."""
    img, bad = _block(7, (1024, 1024), nsrc=30)
    level, rms = _reference(img, bad, 128)
    tl, tr = mesh_statistics_torch(torch.from_numpy(img), torch.from_numpy(bad), 128)
    np.testing.assert_array_equal(tl.numpy(), level)
    np.testing.assert_array_equal(tr.numpy(), rms)
    nl, nr = mesh_statistics(img, bad, 128)  # the numpy entry point
    np.testing.assert_array_equal(nl, level)
    np.testing.assert_array_equal(nr, rms)


def test_mesh_statistics_infinities_like_numpy():
    """Cells with ±inf pixels follow the reference.

    −inf pixels are not skipped by the reference (they sort first, inside the initial
    clipping range), so a single −inf turns its cell into NaN; a cell whose only usable
    pixels are +inf takes a +inf median and an ``<= +inf`` count in its first iteration.
    """
    img, _ = _block(3, (64, 96), nsrc=0)
    bad = np.zeros(img.shape, bool)
    img[3, 5] = -np.inf
    bad[32:, :32] = True
    img[40, 7] = img[50, 9] = np.inf
    bad[40, 7] = bad[50, 9] = False
    level, rms = _reference(img, bad, 32)
    assert np.isnan(level[0, 0]) and np.isfinite(level[0, 1])
    tl, tr = mesh_statistics_torch(torch.from_numpy(img), torch.from_numpy(bad), 32)
    _assert_close_nan(tl.numpy(), level, 1e-9)
    _assert_close_nan(tr.numpy(), rms, 1e-9)


def test_mesh_statistics_batched():
    shape, box = (200, 150), 32
    blocks = [_block(s, shape) for s in range(3)]
    imgs = torch.from_numpy(np.stack([b[0] for b in blocks]))
    bads = torch.from_numpy(np.stack([b[1] for b in blocks]))
    tl, tr = mesh_statistics_torch(imgs, bads, box)
    assert tl.shape == (3, 7, 5) and tl.dtype == torch.float64
    for i, (img, bad) in enumerate(blocks):
        level, rms = _reference(img, bad, box)
        _assert_close_nan(tl[i].numpy(), level, 1e-9)
        _assert_close_nan(tr[i].numpy(), rms, 1e-9)
    # one mask shared by the whole batch
    tl, tr = mesh_statistics_torch(imgs, bads[1], box)
    for i, (img, _) in enumerate(blocks):
        level, rms = _reference(img, blocks[1][1], box)
        _assert_close_nan(tl[i].numpy(), level, 1e-9)
        _assert_close_nan(tr[i].numpy(), rms, 1e-9)


def test_mesh_statistics_torch_sort_path(monkeypatch):
    """The ``torch.sort`` path (used off-CPU) gives the same numbers as numpy's sort."""
    img, bad = _block(11, (300, 257))
    ref = mesh_statistics_torch(torch.from_numpy(img), torch.from_numpy(bad), 64)
    monkeypatch.setattr(tbg, "_sort_rows", lambda c: torch.sort(c, dim=1).values)
    got = mesh_statistics_torch(torch.from_numpy(img), torch.from_numpy(bad), 64)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_array_equal(g.numpy(), r.numpy())


def test_mesh_statistics_numpy_in_numpy_out():
    """numpy input (read-only, one block or a batch): numpy results, equal to the tensor path."""
    img, bad = _block(13, (200, 150))
    ref = mesh_statistics_torch(torch.from_numpy(img), torch.from_numpy(bad), 32)
    img.flags.writeable = bad.flags.writeable = False
    one = mesh_statistics_torch(img, bad, 32)
    two = mesh_statistics_torch(np.stack([img, img]), bad, 32)
    for o, t, r in zip(one, two, ref, strict=True):
        assert isinstance(o, np.ndarray) and isinstance(t, np.ndarray)
        np.testing.assert_array_equal(o, r.numpy())
        np.testing.assert_array_equal(t[1], r.numpy())


def test_mesh_statistics_sign_of_zero_like_numpy():
    """A cell of −0.0 pixels: numpy's cumulative sums keep −0.0, so the level is +0.0."""
    img = np.full((32, 32), -0.0, np.float32)
    for level in (_reference(img, None, 16)[0], mesh_statistics(img, None, 16)[0],
                  mesh_statistics_torch(torch.from_numpy(img), None, 16)[0].numpy()):  # fmt: skip
        assert np.all(level == 0.0) and not np.signbit(level).any()


def test_mesh_statistics_errors():
    with pytest.raises(ValueError, match="≥ 4"):
        mesh_statistics_torch(torch.zeros(16, 16), None, 2)
    with pytest.raises(ValueError, match="2-D or 3-D"):
        mesh_statistics_torch(torch.zeros(16), None, 4)
    with pytest.raises(ValueError, match="2-D or 3-D"):
        mesh_statistics_torch(np.zeros(16), None, 4)
    with pytest.raises(ValueError, match="bad has shape"):
        mesh_statistics_torch(torch.zeros(16, 16), torch.zeros(8, 16, dtype=torch.bool), 4)


# --------------------------------------------------------------------------------------
# background spline
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ncy", "ncx", "box", "partial"), MESHES)
def test_evaluate_background_matches_scipy(ncy, ncx, box, partial):
    mesh = _mesh(ncy * 100 + ncx, ncy, ncx, box, partial=partial)
    spline = background_spline(mesh)
    assert spline.coef.shape == (len(spline.ty) - spline.ky - 1, len(spline.tx) - spline.kx - 1)
    worst = 0.0
    for win in _windows(mesh.shape, box):
        ref = interpolate_background(mesh, *win)
        fast = evaluate_background(spline, *win)
        exact = evaluate_background(spline, *win, scipy_order=True)
        assert fast.dtype == torch.float32 and tuple(fast.shape) == ref.shape
        np.testing.assert_array_equal(exact.numpy(), ref)  # FITPACK order: bit for bit
        worst = max(worst, float(_ulps(fast.numpy(), ref).max()))
    assert worst <= 1.0


def test_spline_degrees_and_bounds():
    s = background_spline(_mesh(0, 1, 1, 64))
    assert (s.ky, s.kx) == (0, 0)
    assert s.coef.shape == (1, 1)
    s = background_spline(_mesh(0, 1, 7, 64))
    assert (s.ky, s.kx) == (1, 3)
    s = background_spline(_mesh(0, 3, 2, 64, partial=(10, 0)))
    assert (s.ky, s.kx) == (2, 1)
    assert s.ybounds == (31.5, 128 + (192 - 10 - 128 - 1) / 2)
    s = background_spline(_mesh(0, 17, 23, 32))
    assert (s.ky, s.kx) == (3, 3)


def test_same_pixel_from_overlapping_windows():
    """A pixel's value never depends on the window that contains it (bit for bit)."""
    mesh = _mesh(5, 17, 23, 64, partial=(31, 7))
    spline = background_spline(mesh)
    ny, nx = mesh.shape
    for scipy_order in (False, True):
        big = evaluate_background(spline, 100, 500, 300, 777, scipy_order=scipy_order).numpy()
        for y0, y1, x0, x1 in [(137, 170, 301, 650), (101, 499, 555, 556), (450, 500, 700, 777)]:
            sub = evaluate_background(spline, y0, y1, x0, x1, scipy_order=scipy_order).numpy()
            np.testing.assert_array_equal(sub, big[y0 - 100 : y1 - 100, x0 - 300 : x1 - 300])
        # at the far mosaic corner, from inside and from a window hanging over the edge
        a = evaluate_background(spline, ny - 90, ny, nx - 80, nx, scipy_order=scipy_order)
        b = evaluate_background(spline, ny - 40, ny + 25, nx - 33, nx + 3, scipy_order=scipy_order)
        np.testing.assert_array_equal(b.numpy()[:40, :33], a.numpy()[50:, 47:])


def test_batched_equals_one_by_one():
    meshes = [_mesh(1, 17, 23, 64, partial=(31, 7)), _mesh(2, 9, 12, 128, partial=(95, 0))]
    splines = [background_spline(m) for m in meshes]
    boxes = [(0, 70, 0, 90), (500, 570, 1300, 1390), (-3, 67, 1380, 1470), (1050, 1120, 2, 92)]
    for scipy_order in (False, True):
        got = background_windows(splines, boxes, scipy_order=scipy_order)
        assert got.shape == (4, 2, 70, 90) and got.dtype == torch.float32
        for i, win in enumerate(boxes):
            for j, spline in enumerate(splines):
                one = evaluate_background(spline, *win, scipy_order=scipy_order)
                np.testing.assert_array_equal(got[i, j].numpy(), one.numpy())
                if scipy_order:
                    np.testing.assert_array_equal(
                        got[i, j].numpy(), interpolate_background(meshes[j], *win)
                    )


@pytest.mark.parametrize("scipy_order", [False, True])
def test_chunked_and_whole_batch_paths_agree(scipy_order):
    """The CPU row-chunked path and the one-pass path (used on CUDA) agree bit for bit."""
    spline = background_spline(_mesh(4, 17, 23, 32, partial=(3, 30)))
    boxes = [(10, 113, 20, 97), (400, 503, 600, 677)]
    ref = tbg._evaluate_batch(spline, boxes, "cpu", scipy_order, chunk_rows=0)
    for chunk in (1, 7, 32, 500):
        got = tbg._evaluate_batch(spline, boxes, "cpu", scipy_order, chunk_rows=chunk)
        np.testing.assert_array_equal(got.numpy(), ref.numpy())


def test_spline_is_small_and_picklable():
    mesh = _mesh(8, 17, 23, 64)
    spline = background_spline(mesh)
    assert isinstance(spline, BackgroundSpline)
    for arr in (spline.ty, spline.tx, spline.coef):
        assert isinstance(arr, np.ndarray) and arr.dtype == np.float64
    again = pickle.loads(pickle.dumps(spline))
    win = (30, 90, 1400, 1472)
    np.testing.assert_array_equal(
        evaluate_background(again, *win).numpy(), evaluate_background(spline, *win).numpy()
    )
    with pytest.raises(AttributeError):
        spline.kx = 1  # frozen


def test_window_errors_and_empty():
    spline = background_spline(_mesh(0, 3, 5, 32))
    with pytest.raises(ValueError, match="same size"):
        background_windows([spline], [(0, 10, 0, 10), (0, 11, 0, 10)])
    with pytest.raises(ValueError, match="at least one"):
        background_windows([spline], [])
    with pytest.raises(ValueError, match="inverted"):
        evaluate_background(spline, 10, 5, 0, 3)
    assert evaluate_background(spline, 5, 5, 0, 3).shape == (0, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    meshes = [_mesh(1, 17, 23, 64, partial=(31, 7)), _mesh(2, 1, 5, 128)]
    splines = [background_spline(m) for m in meshes]
    boxes = [(0, 300, 0, 310), (800, 1100, 1100, 1410)]
    for scipy_order in (False, True):
        cpu = background_windows(splines, boxes, scipy_order=scipy_order)
        gpu = background_windows(splines, boxes, device="cuda", scipy_order=scipy_order)
        assert gpu.device.type == "cuda"
        np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), rtol=1e-6, atol=0.0)
    blocks = [_block(s, (300, 257)) for s in range(2)]
    imgs = torch.from_numpy(np.stack([b[0] for b in blocks]))
    bads = torch.from_numpy(np.stack([b[1] for b in blocks]))
    cpu = mesh_statistics_torch(imgs, bads, 64)
    gpu = mesh_statistics_torch(imgs.cuda(), bads.cuda(), 64)
    for g, c in zip(gpu, cpu, strict=True):
        assert g.device.type == "cuda"
        _assert_close_nan(g.cpu().numpy(), c.numpy(), 1e-9)
