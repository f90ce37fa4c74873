"""The two array backends: same objects, batched == one by one, tiling-invariant catalogs for
both, GPU selection errors, resource routing, failures named per tile.

Everything runs on CPU torch here; the ``gpu`` tests compare CUDA with CPU where a GPU exists.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _util import assert_same_catalog, blob_mosaic
from distributed import Client

import survey_engine.stages as stages
from survey_engine import open_mosaic, read_catalog, run
from survey_engine.backends import TorchBackend
from survey_engine.config import ExecutionConfig, ScienceConfig
from survey_engine.driver import RunError
from survey_engine.kernels.background import filter_mesh, mesh_statistics
from survey_engine.stages import WindowPlan, analyse_regions
from survey_engine.tiling import Box, make_tiles

SIZE = 320
HALO = 72
BACKENDS = ["numpy", "torch"]
UNET = ScienceConfig(deblender="unet")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    path = tmp_path_factory.mktemp("tm") / "m.zarr"
    return blob_mosaic(path, (SIZE, SIZE), n=140, seed=5, chunks=64)


@pytest.fixture(scope="module")
def meshes(mosaic):
    m = open_mosaic(mosaic)
    reg = m.read((0, m.ny), (0, m.nx))
    out = []
    for b in range(len(m.bands)):
        lvl, rms = mesh_statistics(reg.image[b], None, 64)
        out.append(filter_mesh(lvl, rms, 64, (m.ny, m.nx)))
    return out


def _windows(m, boxes, meshes, backend="torch", **execution):
    """Analyse windows: numpy one by one, torch as one batch."""
    plan = WindowPlan.build(UNET, ExecutionConfig(backend=backend, **execution), (m.ny, m.nx),
                            m.bands, meshes)  # fmt: skip
    regs = [m.read((b.y0, b.y1), (b.x0, b.x1)) for b in boxes]
    if backend == "numpy":
        return [analyse_regions([r], plan)[0] for r in regs]
    return analyse_regions(regs, plan)


def test_torch_window_has_the_numpy_objects_and_measurements(mosaic, meshes):
    m = open_mosaic(mosaic)
    box = Box(20, 300, 10, 290)
    (ref,) = _windows(m, [box], meshes, "numpy")
    (got,) = _windows(m, [box], meshes)
    assert ref.n > 60
    # Same detection image, network maps and instances: identical labels and parents.
    np.testing.assert_array_equal(got.detection.labels, ref.detection.labels)
    np.testing.assert_array_equal(got.detection.parent, ref.detection.parent)
    np.testing.assert_array_equal(got.detection.n_children, ref.detection.n_children)
    np.testing.assert_array_equal(got.peak_y, ref.peak_y)
    np.testing.assert_array_equal(got.peak_x, ref.peak_x)
    np.testing.assert_array_equal(got.meas.bbox, ref.meas.bbox)
    c, r = got.meas.columns, ref.meas.columns
    for k in ("x_peak", "y_peak", "area"):
        np.testing.assert_array_equal(c[k], r[k], err_msg=k)
    # The stamp classifier (issue 17): the same stamps, the same float32 network, the same bits.
    for k in ("p_star", "bulge_fraction", "r_bulge_arcsec", "r_disk_arcsec", "ellipticity"):
        np.testing.assert_array_equal(c[k], r[k], err_msg=k)
    # Footprint sums and moments: the same numbers in the same order (rounding only).
    for k in ("peak", "det_iso_flux", "det_iso_flux_err", "x_iso", "y_iso", "a", "b", "e1", "e2"):
        np.testing.assert_allclose(c[k], r[k], rtol=1e-9, atol=1e-9, err_msg=k)
    np.testing.assert_allclose(c["kron_radius"], r["kron_radius"], rtol=1e-7, err_msg="kron")
    for band in m.bands:
        g, rb = got.meas.bands[band], ref.meas.bands[band]
        np.testing.assert_allclose(g["iso_flux"], rb["iso_flux"], rtol=1e-9, atol=1e-6)
        np.testing.assert_allclose(g["kron_flux"], rb["kron_flux"], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(g["flags"], rb["flags"])
        # 3-px apertures: pixel centres vs sep's 5x5 sub-pixels (boundary effect).
        rel = np.abs(g["aper_flux_3"] / rb["aper_flux_3"] - 1)
        assert np.median(rel) < 0.03, np.median(rel)
        rel12 = np.abs(g["aper_flux_12"] / rb["aper_flux_12"] - 1)
        assert np.median(rel12) < 0.005, np.median(rel12)
    # Windowed positions: the window sigma comes from a half-light radius measured slightly
    # differently (pixel centres vs sep's binned profile).
    dpos = np.hypot(c["x"] - r["x"], c["y"] - r["y"])
    assert np.median(dpos) < 2e-3 and np.percentile(dpos, 95) < 0.05, dpos.max()
    hlr = np.abs(c["half_light_radius"] / r["half_light_radius"] - 1)
    assert np.median(hlr) < 0.03
    same_flags = np.mean(c["flags"] == r["flags"])
    assert same_flags > 0.97, same_flags
    assert np.mean(got.safe == ref.safe) > 0.97


def test_batched_windows_equal_one_by_one(mosaic, meshes):
    m = open_mosaic(mosaic)
    boxes = [Box(0, 200, 0, 200), Box(100, 300, 57, 257), Box(120, 320, 120, 320)]
    together = _windows(m, boxes, meshes)
    for box, wr in zip(boxes, together, strict=True):
        (alone,) = _windows(m, [box], meshes)
        np.testing.assert_array_equal(wr.detection.labels, alone.detection.labels)
        for k, v in alone.meas.columns.items():
            np.testing.assert_array_equal(wr.meas.columns[k], v, err_msg=k)
        for band, cols in alone.meas.bands.items():
            for k, v in cols.items():
                np.testing.assert_array_equal(wr.meas.bands[band][k], v, err_msg=f"{band} {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_object_measures_the_same_in_any_window(mosaic, meshes, backend):
    """Background, network, instances and measurement are anchored to the mosaic."""
    m = open_mosaic(mosaic)
    a, b = _windows(m, [Box(0, 320, 0, 261), Box(0, 320, 37, 298)], meshes, backend)
    ida = dict(zip(a.peak_y * SIZE + a.peak_x, range(a.n), strict=True))
    idb = dict(zip(b.peak_y * SIZE + b.peak_x, range(b.n), strict=True))
    both = [k for k in ida if k in idb and a.safe[ida[k]] and b.safe[idb[k]]]
    assert len(both) > 15
    ia = np.array([ida[k] for k in both])
    ib = np.array([idb[k] for k in both])
    for k in ("x", "y", "x_iso", "a", "theta", "kron_radius", "half_light_radius", "flags",
              "p_star", "bulge_fraction", "r_bulge_arcsec", "r_disk_arcsec", "ellipticity"):
        np.testing.assert_array_equal(a.meas.columns[k][ia], b.meas.columns[k][ib], err_msg=k)
    for k in ("kron_flux", "aper_flux_3", "iso_flux"):
        np.testing.assert_array_equal(a.meas.bands["r"][k][ia], b.meas.bands["r"][k][ib])


@pytest.fixture(scope="module")
def references(mosaic, client, tmp_path_factory):
    """The untiled unet catalog of each backend."""
    return {
        b: run(mosaic, tmp_path_factory.mktemp(f"ref-{b}"), tile=SIZE, halo=HALO, client=client,
               backend=b, deblender="unet", progress=False)
        for b in BACKENDS
    }  # fmt: skip


@pytest.fixture(scope="module")
def torch_reference(references):
    return references["torch"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("tile", "origin", "batch"), [(128, 0, 2), (100, 50, 3)])
def test_unet_catalog_is_tiling_invariant_on_both_backends(
    mosaic, client, references, tmp_path, tile, origin, batch, backend
):
    res = run(mosaic, tmp_path, tile=tile, halo=HALO, origin=origin, client=client,
              backend=backend, deblender="unet", tile_batch=batch, progress=False)  # fmt: skip
    ref = read_catalog(references[backend].catalog_path)
    assert len(ref) > 80
    assert_same_catalog(ref, read_catalog(res.catalog_path))
    import zarr

    seg_a = zarr.open_group(str(references[backend].segmentation_path), mode="r")["segmentation"][:]
    seg_b = zarr.open_group(str(res.segmentation_path), mode="r")["segmentation"][:]
    np.testing.assert_array_equal(seg_a, seg_b)
    # Stage timings and the backend are reported.
    assert res.backend == backend and res.device == "cpu"
    assert {"read", "background", "network", "instances", "measure", "write"} <= set(res.stages)
    assert res.pixels == SIZE * SIZE and res.gpu_memory is None


@pytest.mark.slow
def test_torch_and_numpy_backends_find_the_same_objects(references):
    res, torch_reference = references["numpy"], references["torch"]
    a = read_catalog(res.catalog_path)
    b = read_catalog(torch_reference.catalog_path)
    # The background mesh statistics (numpy vs torch) are the same numbers.
    with (
        np.load(res.outdir / "background.npz") as na,
        np.load(torch_reference.outdir / "background.npz") as tb,
    ):
        np.testing.assert_array_equal(na["level"], tb["level"])
        np.testing.assert_array_equal(na["rms"], tb["rms"])
    np.testing.assert_array_equal(a["id"], b["id"])
    np.testing.assert_array_equal(a["parent_id"], b["parent_id"])
    np.testing.assert_allclose(a["r_flux"].value, b["r_flux"].value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["x_iso"].value, b["x_iso"].value, atol=1e-9)
    assert np.median(np.abs(a["x"].value - b["x"].value)) < 2e-3


def test_gpu_without_cuda_is_a_clear_error(mosaic, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(RunError, match=r"--gpu: no CUDA GPU is visible on this machine"):
        run(mosaic, tmp_path, gpu=True, progress=False)
    assert not (tmp_path / "catalog.parquet").exists()


def test_gpu_on_a_cluster_without_gpu_workers_is_a_clear_error(mosaic, client, tmp_path):
    with pytest.raises(RunError, match=r"declares the Dask resource 'GPU'.*--resources GPU=1"):
        run(mosaic, tmp_path, gpu=True, client=client, progress=False)


def test_gpu_conflicting_options_are_refused(mosaic, client, tmp_path):
    with pytest.raises(ValueError, match=r"torch backend \(and --gpu\) runs the unet deblender"):
        run(mosaic, tmp_path / "a", gpu=True, deblender="sep", client=client, progress=False)
    with pytest.raises(ValueError, match=r"gpu=True runs on CUDA; got device='cpu'"):
        run(mosaic, tmp_path / "b", gpu=True, device="cpu", client=client, progress=False)
    with pytest.raises(ValueError, match=r"torch backend \(and --gpu\) runs the unet"):
        run(mosaic, tmp_path / "c", backend="torch", deblender="sep", client=client,
            progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown backend 'jax'"):
        run(mosaic, tmp_path / "d", backend="jax", client=client, progress=False)


@pytest.mark.slow
def test_tile_tasks_run_only_on_workers_with_the_resource(mosaic, torch_reference, tmp_path):
    from distributed import Scheduler, SpecCluster, Worker, get_task_stream

    spec = {
        "plain": {"cls": Worker, "options": {"nthreads": 1}},
        "gpu": {"cls": Worker, "options": {"nthreads": 1, "resources": {"GPU": 1}}},
    }
    sched = {"cls": Scheduler, "options": {"dashboard_address": None}}
    with SpecCluster(workers=spec, scheduler=sched) as cluster, Client(cluster) as c:
        c.wait_for_workers(2)
        gpu_addr = [a for a, w in c.scheduler_info()["workers"].items() if w["resources"]]
        assert len(gpu_addr) == 1
        with get_task_stream(client=c) as ts:
            res = run(mosaic, tmp_path, tile=160, halo=HALO, client=c, backend="torch",
                      deblender="unet", resources={"GPU": 1}, progress=False)  # fmt: skip
        tile_tasks = [t for t in ts.data if str(t["key"]).startswith("tiles-")]
        assert len(tile_tasks) == 2  # 4 tiles, 2 per task
        assert {t["worker"] for t in tile_tasks} == set(gpu_addr)
    assert_same_catalog(read_catalog(torch_reference.catalog_path), read_catalog(res.catalog_path))


@pytest.mark.slow
def test_a_failing_tile_in_a_batch_is_named_and_the_others_finish(
    mosaic, client, torch_reference, tmp_path, monkeypatch
):
    grid = make_tiles((SIZE, SIZE), 160, HALO)
    bad = grid[1]
    real = stages.analyse_windows

    def failing(host, windows, *args, **kwargs):  # the batch with the tile, and the tile alone
        if bad.read in windows:
            raise FloatingPointError("device kernel blew up")
        return real(host, windows, *args, **kwargs)

    monkeypatch.setattr(stages, "analyse_windows", failing)
    with pytest.raises(RunError) as info:
        run(mosaic, tmp_path, tile=160, halo=HALO, client=client, backend="torch",
            deblender="unet", tile_batch=4, progress=False)  # fmt: skip
    msg = str(info.value)
    assert f"1 task(s) failed: {bad.name}" in msg
    assert "FloatingPointError: device kernel blew up" in msg
    assert f"tile {bad.name} (core y 0:160, x 160:320" in msg
    parts = {p.name for p in (tmp_path / "parts").iterdir() if p.name.startswith("tile-")}
    assert parts == {t.name for t in grid} - {bad.name}

    monkeypatch.setattr(stages, "analyse_windows", real)
    res = run(mosaic, tmp_path, tile=160, halo=HALO, client=client, backend="torch",
              deblender="unet", tile_batch=4, progress=False, resume=True)  # fmt: skip
    assert_same_catalog(read_catalog(torch_reference.catalog_path), read_catalog(res.catalog_path))


def _match(cpu, gpu):
    ic = dict(zip(cpu.peak_y * SIZE + cpu.peak_x, range(cpu.n), strict=True))
    common = [(ic[k], j) for j, k in enumerate(gpu.peak_y * SIZE + gpu.peak_x) if k in ic]
    return np.array(common, dtype=np.int64).reshape(-1, 2).T


@cuda
@pytest.mark.gpu
def test_cuda_fp32_and_cpu_torch_backends_give_the_same_catalog(mosaic, meshes):
    """Network in float32 (TF32 off) on CUDA: same objects, numbers within float tolerance."""
    m = open_mosaic(mosaic)
    box = Box(0, SIZE, 0, SIZE)
    (cpu,) = _windows(m, [box], meshes)
    (gpu,) = _windows(m, [box], meshes, device="cuda", unet_batch_size=1, unet_amp=False)
    np.testing.assert_array_equal(np.sort(gpu.peak_y * SIZE + gpu.peak_x),
                                  np.sort(cpu.peak_y * SIZE + cpu.peak_x))  # fmt: skip
    i, j = _match(cpu, gpu)
    same = cpu.meas.columns["area"][i] == gpu.meas.columns["area"][j]
    assert same.mean() > 0.99
    for k in ("x", "y", "x_iso", "y_iso"):
        d = np.abs(cpu.meas.columns[k][i][same] - gpu.meas.columns[k][j][same])
        assert d.max() < 1e-4, (k, d.max())
    for band in m.bands:
        f_c = cpu.meas.bands[band]["kron_flux"][i][same]
        f_g = gpu.meas.bands[band]["kron_flux"][j][same]
        np.testing.assert_allclose(f_g, f_c, rtol=1e-5, atol=1e-6)


@cuda
@pytest.mark.gpu
def test_cuda_bf16_and_cpu_torch_backends_find_the_same_objects(mosaic, meshes):
    m = open_mosaic(mosaic)
    box = Box(0, SIZE, 0, SIZE)
    (cpu,) = _windows(m, [box], meshes)
    (gpu,) = _windows(m, [box], meshes, device="cuda")
    # bf16 autocast: maps differ by ~1e-2; a few marginal objects may change.
    assert abs(gpu.n - cpu.n) <= max(2, 0.02 * cpu.n)
    i, j = _match(cpu, gpu)
    assert len(i) >= 0.97 * cpu.n
    same = cpu.meas.columns["area"][i] == gpu.meas.columns["area"][j]
    assert same.mean() > 0.8
    d = np.hypot(*(cpu.meas.columns[k][i][same] - gpu.meas.columns[k][j][same] for k in "xy"))
    assert np.median(d) < 1e-3
    f_c = cpu.meas.bands["r"]["kron_flux"][i][same]
    f_g = gpu.meas.bands["r"]["kron_flux"][j][same]
    assert np.median(np.abs(f_g / f_c - 1)) < 1e-3


def test_backend_from_the_dask_config_implies_the_unet(mosaic, client, torch_reference, tmp_path):
    import dask

    with dask.config.set({"survey_engine.backend": "torch", "survey_engine.tile_batch": 3}):
        res = run(mosaic, tmp_path, tile=SIZE, halo=HALO, client=client, progress=False)
    assert res.backend == "torch"
    assert_same_catalog(read_catalog(torch_reference.catalog_path), read_catalog(res.catalog_path))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_unet_with_gaps_masks_and_blank_tiles_on_both_backends(client, tmp_path, backend):
    from _util import blob_pixels

    from survey_engine.flags import MaskBit

    shape = (256, 256)
    img, var = blob_pixels(shape, n=60, seed=9)
    img[:, 20:60, 150:200] = np.nan  # a gap written as NaN
    var[:, 100:130, 10:40] = 0.0  # non-positive variance
    mask = np.zeros(img.shape, np.uint16)
    mask[:, 180:256, 0:128] = MaskBit.BAD  # a fully masked quarter
    yy, xx = np.mgrid[:256, :256]
    img += (3000 / (2 * np.pi * 4) * np.exp(-((yy - 92) ** 2 + (xx - 202) ** 2) / 8.0))[None]
    mask[0, 91:94, 201:204] = MaskBit.SAT  # the star's core, saturated in g
    path = blob_mosaic(tmp_path / "gaps.zarr", shape, image=img, variance=var, mask=mask)
    kw = {"halo": HALO, "client": client, "backend": backend, "deblender": "unet", "progress": False}
    runs = [run(path, tmp_path / f"o{t}", tile=t, **kw) for t in (256, 96)]
    a, b = (read_catalog(r.catalog_path) for r in runs)
    assert len(a) > 20
    assert_same_catalog(a, b)
    x, y = np.asarray(a["x_peak"].value), np.asarray(a["y_peak"].value)
    assert not np.any((y >= 180) & (x < 128)), "objects found in the fully masked quarter"
    assert not np.any((y >= 20) & (y < 60) & (x >= 150) & (x < 200)), "objects in the NaN gap"
    star = np.flatnonzero((np.abs(y - 92) <= 1) & (np.abs(x - 202) <= 1))
    assert len(star) == 1
    assert a["flags"][star[0]] & 4, "the saturated star is not flagged SATURATED"


def test_tile_batch_must_be_a_positive_integer(mosaic, client, tmp_path):
    with pytest.raises(ValueError, match=r"tile_batch must be a positive integer, got 0"):
        run(mosaic, tmp_path, backend="torch", tile_batch=0, client=client, progress=False)


def test_batch_capacity_on_cpu_is_the_configured_size():
    from survey_engine.backends import NumpyBackend, windows_fitting

    assert TorchBackend(ExecutionConfig(backend="torch")).capacity((2304, 2304), 3) == 2
    assert TorchBackend(ExecutionConfig(backend="torch", tile_batch=5)).capacity((2304, 2304), 3) == 5
    assert NumpyBackend(ExecutionConfig(tile_batch=5)).capacity((2304, 2304), 3) == 1
    # On a GPU: 60 % of the free memory at BYTES_PER_PIXEL, between 1 and 32 windows.
    assert windows_fitting((2304, 2304), 3, 80 * 2**30) == 12  # 0.6 × 80 GiB / 4.2 GB
    assert windows_fitting((2304, 2304), 3, 2**20) == 1
    assert windows_fitting((512, 512), 3, 80 * 2**30) == 32


def test_windows_of_one_batch_must_share_a_shape(mosaic, meshes):
    m = open_mosaic(mosaic)
    with pytest.raises(ValueError, match=r"windows of one batch must have the same shape"):
        _windows(m, [Box(0, 100, 0, 100), Box(0, 120, 0, 100)], meshes)


def test_float32_measurement_is_close_to_float64(mosaic, meshes):
    m = open_mosaic(mosaic)
    box = Box(0, SIZE, 0, SIZE)
    (ref,) = _windows(m, [box], meshes)
    (got,) = _windows(m, [box], meshes, measure_dtype="float32")
    np.testing.assert_array_equal(got.detection.labels, ref.detection.labels)
    for k in ("x", "y", "x_iso", "y_iso"):
        assert np.abs(got.meas.columns[k] - ref.meas.columns[k]).max() < 1e-4, k
    for band in m.bands:
        g, r = got.meas.bands[band]["kron_flux"], ref.meas.bands[band]["kron_flux"]
        rel = np.abs(g - r) / np.maximum(np.abs(r), 1.0)
        assert np.median(rel) < 1e-6 and rel.max() < 1e-5, (np.median(rel), rel.max())
    with pytest.raises(ValueError, match=r"measure_dtype must be 'float64' or 'float32'"):
        ExecutionConfig(measure_dtype="float16")


@pytest.mark.parametrize("weights", ["ivar", "chi2"])
def test_detection_and_significance_images_have_the_same_bits_for_numpy_and_torch(weights):
    """One implementation, dispatched on the array type: torch on CPU gives numpy's bits."""
    from survey_engine.kernels.detect import detection_image, matched_filter
    from survey_engine.unet.infer import significance

    rng = np.random.default_rng(3)
    images = rng.normal(0, 3, (3, 64, 80)).astype(np.float32)
    variances = rng.uniform(0.5, 4, images.shape).astype(np.float32)
    usable = rng.random(images.shape) > 0.1
    variances[~usable] = np.inf
    variances[1, :5] = 0.0  # non-positive variance in one band
    ref_img, ref_var = detection_image(images, variances, usable, weights)
    img, var = detection_image(*(torch.from_numpy(a)[None] for a in (images, variances, usable)), weights)
    np.testing.assert_array_equal(img[0].numpy(), ref_img)
    np.testing.assert_array_equal(var[0].numpy(), ref_var)
    assert img.dtype == torch.float32 and ref_img.dtype == np.float32
    # numpy's band sum (axis 0) is the same as the explicit band-after-band sum.
    with np.errstate(divide="ignore"):
        w = np.where(usable & (variances > 0) & np.isfinite(variances), 1 / variances, 0)
        if weights == "ivar":
            np.testing.assert_array_equal(ref_var, np.where(w.sum(0) > 0, 1 / w.sum(0), np.inf))
    # The U-Net's input from it, and the matched filter: numpy's bits too.
    ref_sig, ref_bad = significance(ref_img, ref_var, ~np.isfinite(ref_var))
    sig, bad = significance(img, var, ~torch.isfinite(var))
    np.testing.assert_array_equal(sig[0].numpy(), ref_sig)
    np.testing.assert_array_equal(bad[0].numpy(), ref_bad)
    kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32)
    np.testing.assert_array_equal(matched_filter(img, var, kernel)[0].numpy(),
                                  matched_filter(ref_img, ref_var, kernel))  # fmt: skip
