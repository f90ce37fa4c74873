"""Background in crowded fields: sources masked in a second pass of the mesh statistics."""

import dataclasses

import numpy as np
import pytest
import zarr
from _util import assert_same_catalog, blob_mosaic
from click.testing import CliRunner

from survey_engine import read_catalog, run
from survey_engine.cli import main
from survey_engine.config import ExecutionConfig, ScienceConfig
from survey_engine.driver import RunError
from survey_engine.kernels.background import (
    filter_mesh,
    interpolate_background,
    mesh_statistics,
    source_mask,
)
from survey_engine.kernels.detect import DetectionConfig
from survey_engine.stages import WindowPlan
from survey_engine.store import PartStore
from survey_engine.tasks import background_block
from survey_engine.tiling import Box

SIGMA = 3.0  # sky noise per pixel
KERNEL = DetectionConfig().kernel


def cluster_field(size=384, n=2500, rc=18.0, seed=0, sky0=100.0):
    """A Plummer cluster of Moffat stars (FWHM 4 px) on a tilted sky: image, variance, true sky."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(float)
    sky = sky0 + 0.01 * xx + 0.005 * yy
    r = rc / np.sqrt((rng.uniform(0, 0.98, n)) ** (-2 / 3) - 1)
    th = rng.uniform(0, 2 * np.pi, n)
    ys, xs = size / 2 + r * np.sin(th), size / 2 + r * np.cos(th)
    flux = 10 ** rng.uniform(2.0, 4.0, n)
    alpha, beta = 2.0 / np.sqrt(2 ** (1 / 2.5) - 1), 2.5
    stars = np.zeros((size, size))
    for y, x, f in zip(ys, xs, flux, strict=True):
        y0, y1 = max(0, int(y) - 30), min(size, int(y) + 31)
        x0, x1 = max(0, int(x) - 30), min(size, int(x) + 31)
        if y0 < y1 and x0 < x1:
            r2 = (yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2
            stars[y0:y1, x0:x1] += (
                f * (beta - 1) / (np.pi * alpha**2) * (1 + r2 / alpha**2) ** -beta
            )
    img = (sky + stars + rng.normal(0, SIGMA, sky.shape)).astype(np.float32)
    return img, np.full(img.shape, SIGMA**2, np.float32), sky


@pytest.fixture(scope="module")
def field():
    return cluster_field()


def _background(img, bad, box=48):
    level, rms = mesh_statistics(img, bad, box)
    mesh = filter_mesh(level, rms, box, img.shape)
    return interpolate_background(mesh, 0, img.shape[0], 0, img.shape[1]), level


def _mask(img, var, first, **kw):
    kw = {"thresh": 2.0, "minarea": 5, "dilate": 4, "kernel": KERNEL} | kw
    return source_mask(img[None], var[None], np.ones((1, *img.shape), bool), first[None], **kw)


def test_masking_removes_the_starlight_bias_under_a_cluster(field):
    img, var, sky = field
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    core = (yy - 192) ** 2 + (xx - 192) ** 2 < 36**2
    first, _ = _background(img, None)
    bias_off = (first - sky)[core].mean() / SIGMA
    mask = _mask(img, var, first)
    second, level = _background(img, mask)
    bias_on = (second - sky)[core].mean() / SIGMA
    assert bias_off > 2.0  # the clipped mode alone: 2.5 σ of starlight
    assert abs(bias_on) < 0.12
    assert np.isnan(level).sum() >= 1  # the core's cells are mostly masked: filled from neighbours
    assert 0.1 < mask.mean() < 0.4 and mask[core].mean() > 0.9
    # Far from the cluster the background stays as good as before.
    far = (yy - 192) ** 2 + (xx - 192) ** 2 > 120**2
    assert np.sqrt(np.mean((second - sky)[far] ** 2)) / SIGMA < 0.12


def test_mask_groups_minarea_and_dilation_disk():
    img = np.zeros((64, 64), np.float32)
    img[10, 10] = 100.0  # one pixel: below minarea 2
    img[40:42, 30] = 100.0  # two pixels
    var, flat = np.ones_like(img), np.zeros_like(img)
    mask = _mask(img, var, flat, thresh=5.0, minarea=2, dilate=0, kernel=None)
    assert mask.sum() == 2 and mask[40:42, 30].all()
    mask = _mask(img, var, flat, thresh=5.0, minarea=1, dilate=4, kernel=None)
    yy, xx = np.mgrid[:64, :64]
    disk = (yy - 10) ** 2 + (xx - 10) ** 2 <= 16
    assert np.array_equal(mask[:25, :25], disk[:25, :25])  # x² + y² ≤ r²: 49 pixels
    assert disk.sum() == 49
    # Unusable pixels are no data, not sources; a flat residual masks nothing.
    usable = np.ones((1, 64, 64), bool)
    usable[0, 40:42, 30] = False
    kw = {"thresh": 5.0, "minarea": 1, "dilate": 4, "kernel": None}
    got = source_mask(img[None], var[None], usable, flat[None], **kw)
    assert got.sum() == 49
    assert not _mask(flat + 3.0, var, flat + 3.0).any()


@pytest.mark.parametrize(
    ("y0", "x0", "h", "w"), [(96, 96, 96, 96), (0, 150, 192, 100), (300, 300, 84, 84)]
)
def test_mask_of_a_block_read_with_the_margin_is_the_whole_fields(field, y0, x0, h, w):
    img, var, _ = field
    first, _ = _background(img, None)
    det = DetectionConfig()
    full = _mask(img, var, first)
    m = det.pad + det.minarea + 4  # what tasks.background_block reads around a block
    wy0, wx0 = max(0, y0 - m), max(0, x0 - m)
    win = np.s_[wy0 : y0 + h + m, wx0 : x0 + w + m]
    part = _mask(img[win], var[win], first[win])
    assert np.array_equal(
        part[y0 - wy0 : y0 - wy0 + h, x0 - wx0 : x0 - wx0 + w], full[y0 : y0 + h, x0 : x0 + w]
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"background_mask_thresh": -1.0},
            "background_mask_thresh must be None, 0 .off. or a positive",
        ),
        ({"background_mask_thresh": float("nan")}, "background_mask_thresh must be"),
        ({"background_mask_dilate": -1}, "background_mask_dilate must be an integer ≥ 0"),
        ({"background_mask_dilate": 2.5}, "background_mask_dilate must be an integer ≥ 0"),
    ],
)
def test_bad_masking_parameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScienceConfig(**kwargs)


def test_zero_threshold_means_off():
    assert ScienceConfig(background_mask_thresh=0).background_mask_thresh is None
    sci = ScienceConfig().with_params(background_mask_thresh=3, background_mask_dilate=6.0)
    assert (sci.background_mask_thresh, sci.background_mask_dilate) == (3.0, 6)
    assert ScienceConfig.from_dict(sci.to_dict()) == sci


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """A 2-band mosaic of a cluster on a tilted sky of ~20, unit noise; and the true sky."""
    img, _, sky = cluster_field(size=320, n=1500, rc=15.0, seed=3, sky0=20.0)
    noise = (img - sky) / SIGMA  # sky noise of 1 per pixel, stars scaled alike
    planes = np.stack([sky + noise, sky + 0.8 * noise]).astype(np.float32)
    path = blob_mosaic(tmp_path_factory.mktemp("crowded") / "m.zarr", (320, 320), image=planes,
                       variance=np.ones_like(planes), chunks=64)  # fmt: skip
    return path, sky


def _run(path, out, client, **kw):
    kw = {"background_box": 64, "thresh": 3.0, "client": client, "progress": False} | kw
    return run(path, out, **kw)


def test_masked_background_run_is_identical_for_any_tiling(crowded, client, tmp_path):
    path, sky = crowded
    on = {"background_mask_thresh": 2.0, "background_mask_dilate": 4}
    a = _run(path, tmp_path / "a", client, tile=320, halo=64, **on)
    b = _run(path, tmp_path / "b", client, tile=100, halo=32, origin=37, **on)
    off = _run(path, tmp_path / "off", client, tile=320, halo=64)
    ca, cb = read_catalog(a.catalog_path), read_catalog(b.catalog_path)
    assert_same_catalog(ca, cb)
    seg = [zarr.open_group(str(r.segmentation_path), mode="r")["segmentation"][:] for r in (a, b)]
    assert np.array_equal(*seg)
    assert ca.meta["science"]["background_mask_thresh"] == 2.0
    assert ca.meta["science"]["background_mask_dilate"] == 4
    # The masked background is nearer the true sky under the cluster (in units of the noise, 1).
    yy, xx = np.mgrid[:320, :320]
    core = (yy - 160) ** 2 + (xx - 160) ** 2 < 30**2
    bias = []
    for r in (a, off):
        level, rms = (x[0] for x in PartStore(r.outdir).load_background())
        sub = interpolate_background(filter_mesh(level, rms, 64, (320, 320)), 0, 320, 0, 320)
        bias.append((sub - sky)[core].mean())
    assert bias[1] > 1.0 and abs(bias[0]) < bias[1] / 3  # measured: +1.16 off, -0.30 on
    assert len(read_catalog(off.catalog_path)) != len(ca)
    # Resume keeps the masked background; other masking parameters are another run.
    again = _run(path, tmp_path / "a", client, tile=320, halo=64, resume=True, **on)
    assert_same_catalog(ca, read_catalog(again.catalog_path))
    with pytest.raises(RunError, match=r"holds a different run .*science"):
        _run(
            path, tmp_path / "a", client, tile=320, halo=64, resume=True, background_mask_thresh=3.0
        )


def test_cli_passes_the_masking_options(crowded, tmp_path, monkeypatch):
    import survey_engine.driver as driver

    seen = {}

    def fake_run(mosaic, outdir, **kw):
        seen.update(kw)
        raise RunError("stopped by the test")

    monkeypatch.setattr(driver, "run", fake_run)
    args = ["run", crowded[0], str(tmp_path / "o"), "--background-mask-thresh", "2.5",
            "--background-mask-dilate", "6"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "stopped by the test" in res.output
    assert (seen["background_mask_thresh"], seen["background_mask_dilate"]) == (2.5, 6)
    monkeypatch.undo()
    res = CliRunner().invoke(main,
                             ["run", crowded[0], str(tmp_path / "p"), "--background-mask-thresh", "-2"])  # fmt: skip
    assert res.exit_code == 1
    assert (
        "background_mask_thresh must be None, 0 (off) or a positive number of sigma" in res.output
    )


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_masked_block_statistics_do_not_depend_on_the_blocks(crowded, backend):
    path, _ = crowded
    sci = ScienceConfig(background_box=32, background_mask_thresh=2.0)
    plan = WindowPlan.build(sci, ExecutionConfig(backend=backend), (320, 320), ("g", "r"))
    whole = Box(0, 320, 0, 320)
    (_, first) = background_block(whole, mosaic_path=path, plan=plan)
    meshes = [filter_mesh(lv, rms, 32, (320, 320)) for lv, rms in first]
    plan = dataclasses.replace(plan, meshes=meshes)
    _, full = background_block(whole, mosaic_path=path, plan=plan, mask_sources=True)
    for box in (Box(96, 224, 128, 256), Box(0, 64, 256, 320)):
        _, part = background_block(box, mosaic_path=path, plan=plan, mask_sources=True)
        cells = np.s_[box.y0 // 32 : box.y1 // 32, box.x0 // 32 : box.x1 // 32]
        for (lv, rms), (lv_full, rms_full) in zip(part, full, strict=True):
            assert np.array_equal(lv, lv_full[cells], equal_nan=True)
            assert np.array_equal(rms, rms_full[cells], equal_nan=True)
    # The cluster core's cells: starlight read as sky (the sky is 20–25), then empty when masked.
    lv_first, lv_masked = first[0][0], full[0][0]
    assert (lv_first[4:6, 4:6] > 100).all() and np.isnan(lv_masked[4:6, 4:6]).all()
    assert np.nanmax(lv_masked) < 26 < np.nanmax(lv_first)
    if backend == "torch":  # the torch mesh statistics give the numpy backend's bits on CPU
        numpy_plan = dataclasses.replace(plan, execution=ExecutionConfig())
        _, ref = background_block(whole, mosaic_path=path, plan=numpy_plan, mask_sources=True)
        assert all(
            np.array_equal(a[0], b[0], equal_nan=True) for a, b in zip(ref, full, strict=True)
        )
