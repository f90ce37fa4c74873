"""The tiled engine: the catalog does not depend on the tiling or the number of workers."""

import os
import signal
import subprocess
import sys
import time

import astropy.units as u
import numpy as np
import pyarrow.parquet as pq
import pytest
import sep
import zarr
from _util import assert_same_catalog as _assert_same_catalog

from survey_engine import create_mosaic, open_mosaic, read_catalog, run
from survey_engine.driver import RunError
from survey_engine.simulate import simulate
from survey_engine.tiling import make_tiles

SIZE = 640


@pytest.fixture(scope="module")
def client(process_client):
    """Two worker processes (the conftest default is one in-process worker)."""
    return process_client


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory, client):
    path = tmp_path_factory.mktemp("sim") / "mosaic.zarr"
    simulate(
        str(path), size=SIZE, bands=("g", "r"), seed=7, chunks=256, masks=True, bright_stars=1,
        client=client, progress=False,
    )  # fmt: skip
    return str(path)


@pytest.fixture(scope="module")
def reference(mosaic, client, tmp_path_factory):
    """One tile holding the whole mosaic: the untiled result."""
    out = tmp_path_factory.mktemp("ref")
    res = run(mosaic, out, tile=SIZE, halo=64, client=client, progress=False)
    return res, read_catalog(res.catalog_path), _seg(res)


def _seg(res):
    return zarr.open_group(str(res.segmentation_path), mode="r")["segmentation"][:]


def test_reference_catalog_is_sane(reference):
    _, cat, seg = reference
    assert len(cat) > 200
    ids = np.asarray(cat["id"])
    assert len(np.unique(ids)) == len(ids)
    # IDs are the peak pixel; every object owns exactly `area` pixels of the segmentation map.
    np.testing.assert_array_equal(
        ids, np.asarray(cat["y_peak"].value) * SIZE + np.asarray(cat["x_peak"].value)
    )
    labels, counts = np.unique(seg[seg > 0], return_counts=True)
    np.testing.assert_array_equal(labels, ids)
    np.testing.assert_array_equal(counts, np.asarray(cat["area"].value))
    # Units and descriptions survive the Parquet round trip.
    assert cat["x"].unit == u.pix
    assert cat["ra"].unit == u.deg
    assert "Kron" in cat["r_kron_flux"].info.description
    assert "model" in cat["r_flux"].info.description  # issue 16: the total flux
    assert cat.meta["reference_band"] == "r"
    assert np.all(np.isfinite(np.asarray(cat["ra"].value)))
    flags = np.asarray(cat["flags"])
    assert np.any(flags & 8)  # some blended objects
    assert np.any(flags & 4)  # the bright star is saturated
    assert np.any(flags & 2)  # masked pixels (masks=True)


@pytest.mark.parametrize(
    ("tile", "halo", "origin"),
    [(256, 64, 0), (199, 40, 0), (256, 48, 128), (97, 16, (31, 60))],
    ids=["aligned-256", "odd-199", "shifted-half-tile", "small-97-halo16"],
)
def test_catalog_identical_for_any_tiling(mosaic, client, reference, tmp_path, tile, halo, origin):
    _, ref, ref_seg = reference
    out = run(mosaic, tmp_path, tile=tile, halo=halo, origin=origin, client=client, progress=False)
    cat = read_catalog(out.catalog_path)
    _assert_same_catalog(ref, cat)
    assert np.array_equal(_seg(out), ref_seg)
    if tile == 97:
        assert out.n_retried > 0  # objects larger than the halo went through the retry pass


def test_large_catalog_is_written_by_workers_as_a_dataset(mosaic, client, reference, tmp_path):
    """Above ``catalog-partition-pixels`` the catalog is a dataset of files written by the
    workers (tile runs plus the retried objects): together, the untiled catalog."""
    import dask

    _, ref, _ = reference
    with dask.config.set({"survey_engine.catalog-partition-pixels": 3 * 97 * 97}):
        out = run(mosaic, tmp_path, tile=97, halo=16, origin=(31, 60), client=client, progress=False)
    assert out.catalog_path == tmp_path / "catalog" and not (tmp_path / "catalog.parquet").exists()
    files = sorted(out.catalog_path.glob("part-*.parquet"))
    assert len(files) == -(-len(make_tiles((SIZE, SIZE), 97, 16, origin=(31, 60))) // 3) + 1
    ids = [pq.read_table(f).column("id").to_numpy() for f in files]
    assert all(np.all(np.diff(i) > 0) for i in ids)  # each file sorted, each object once
    assert len(np.unique(np.concatenate(ids))) == sum(map(len, ids)) == len(ref) == out.n_objects
    assert len(ids[-1]) > 0  # the retried objects' file
    _assert_same_catalog(ref, read_catalog(tmp_path))
    # a resumed run with the default size replaces the dataset by one file
    again = run(mosaic, tmp_path, tile=97, halo=16, origin=(31, 60), client=client, progress=False,
                resume=True)  # fmt: skip
    assert again.catalog_path == tmp_path / "catalog.parquet" and not (tmp_path / "catalog").exists()
    _assert_same_catalog(ref, read_catalog(again.catalog_path))


def test_manifest_holds_what_the_later_stages_need(mosaic, client, reference, tmp_path):
    """The driver records each finished tile's retry items and footprint boxes in the
    manifest: the retry and segmentation stages (and a resumed run) read those few files,
    not two per tile — shown by deleting the tiles' own copies before a resume."""
    import json

    _, ref, ref_seg = reference
    run(mosaic, tmp_path, tile=160, halo=64, origin=(31, 60), client=client, progress=False)
    grid = make_tiles((SIZE, SIZE), 160, 64, origin=(31, 60))
    files = sorted((tmp_path / "parts" / "_manifest").glob("*.jsonl"))
    assert len(files) == 1  # one record every 256 tiles, and the last
    entries = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted(e["part"] for e in entries) == sorted(t.name for t in grid)
    assert sum(len(e["pending"]) for e in entries) > 0 and any(e["boxes"] for e in entries)
    boxes = {e["part"]: e["boxes"] for e in entries}
    for t in grid:  # the footprints a segmentation chunk paints are still read, by its task
        (tmp_path / "parts" / t.name / "pending.json").unlink()
        if not boxes[t.name]:
            (tmp_path / "parts" / t.name / "footprints.npz").unlink()
    again = run(mosaic, tmp_path, tile=160, halo=64, origin=(31, 60), client=client,
                progress=False, resume=True)  # fmt: skip
    _assert_same_catalog(ref, read_catalog(again.catalog_path))
    assert np.array_equal(_seg(again), ref_seg)


def test_one_and_two_workers_give_the_same_catalog(mosaic, reference, tmp_path):
    _, ref, _ = reference
    out = run(mosaic, tmp_path, tile=256, halo=64, workers=1, progress=False)
    _assert_same_catalog(ref, read_catalog(out.catalog_path))


def test_objects_on_tile_corners_are_found_exactly_once(mosaic, client, reference, tmp_path):
    _, ref, _ = reference
    out = run(mosaic, tmp_path, tile=96, halo=32, client=client, progress=False)
    cat = read_catalog(out.catalog_path)
    seg = _seg(out)
    grid = make_tiles((SIZE, SIZE), 96, 32)
    yy, xx = np.nonzero(seg)
    pairs = np.unique(np.c_[seg[yy, xx], grid.owner(yy, xx)], axis=0)
    ids, n_tiles = np.unique(pairs[:, 0], return_counts=True)
    corner = ids[n_tiles >= 3]  # footprints spread over three or four tile cores
    assert len(corner) >= 2, "the scene should put objects on some tile corners"
    cat_ids = np.asarray(cat["id"])
    for oid in corner:
        assert np.count_nonzero(cat_ids == oid) == 1
    assert set(corner) <= set(np.asarray(ref["id"]))


def test_object_larger_than_the_halo_is_measured_whole(tmp_path, client):
    ny = nx = 400
    yy, xx = np.mgrid[:ny, :nx]
    rng = np.random.default_rng(3)
    img = 2e6 / (2 * np.pi * 25**2) * np.exp(-((xx - 210.3) ** 2 + (yy - 190.7) ** 2) / (2 * 25**2))
    img = img + rng.normal(0, 1, img.shape)
    m = create_mosaic(tmp_path / "big.zarr", shape=(ny, nx), bands=["r"], wcs=None, chunks=128)
    m.write("r", 0, 0, image=img, variance=np.ones_like(img), mask=np.zeros(img.shape))
    whole = run(m.path, tmp_path / "whole", tile=400, halo=16, client=client, progress=False)
    tiled = run(m.path, tmp_path / "tiled", tile=64, halo=16, client=client, progress=False)
    a, b = read_catalog(whole.catalog_path), read_catalog(tiled.catalog_path)
    _assert_same_catalog(a, b)
    big = np.argmax(np.asarray(a["area"].value))
    assert a["area"][big].value > 5000  # far larger than a 64 px tile + 16 px halo
    assert tiled.n_retried >= 1
    assert abs(a["x"][big].value - 210.3) < 0.2
    assert (np.asarray(b["flags"])[big] & 32) == 0  # not truncated


def test_counts_agree_with_raw_sep_on_the_untiled_image(mosaic, reference):
    _, cat, _ = reference
    m = open_mosaic(mosaic)
    reg = m.read((0, SIZE), (0, SIZE), bands=["r"])
    img = reg.image[0].astype(np.float32)
    bad = reg.mask[0] != 0
    var = np.where(bad, 1.0, reg.variance[0]).astype(np.float32)
    bkg = sep.Background(img, mask=bad, bw=128, bh=128)
    objs = sep.extract(img - bkg.back(), 4.0, var=var, mask=bad, minarea=5, clean=False)
    # Our catalog detects on the g+r combination, sep on r alone: counts agree within 25%.
    ours_r = run_single_band_count(mosaic)
    assert abs(ours_r - len(objs)) <= 0.05 * len(objs) + 3
    assert 0.75 < len(cat) / len(objs) < 1.5


def run_single_band_count(mosaic):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        res = run(mosaic, d, tile=SIZE, halo=64, detection_band="r", workers=1, progress=False)
        return res.n_objects


def test_resume_after_the_driver_is_killed(mosaic, reference, tmp_path):
    _, ref, ref_seg = reference
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "survey_engine.cli", "run", mosaic, str(out), "--tile", "64",
           "--halo", "32", "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    parts = out / "parts"
    while time.time() < deadline:
        done = [p for p in parts.glob("tile-*")] if parts.exists() else []
        if len(done) >= 20:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(list(parts.glob("tile-*")))
    assert 20 <= n_done < 100, "the run should have been killed half-way"
    assert not (out / "catalog.parquet").exists()
    res = run(mosaic, out, tile=64, halo=32, workers=1, resume=True, progress=False)
    _assert_same_catalog(ref, read_catalog(res.catalog_path))
    assert np.array_equal(_seg(res), ref_seg)


def test_output_directory_holding_another_run_is_refused(mosaic, client, tmp_path):
    run(mosaic, tmp_path, tile=320, halo=32, client=client, progress=False)
    with pytest.raises(RunError, match="is not empty"):
        run(mosaic, tmp_path, tile=320, halo=32, client=client, progress=False)
    with pytest.raises(RunError, match=r"holds a different run .*tile"):
        run(mosaic, tmp_path, tile=256, halo=32, client=client, progress=False, resume=True)


def test_parquet_metadata_holds_units_and_config(reference):
    res, _, _ = reference
    schema = pq.read_schema(res.catalog_path)
    field = schema.field("r_flux")
    assert field.metadata[b"unit"] == b"count"
    assert b"description" in field.metadata
    meta = read_catalog(res.catalog_path).meta
    assert meta["science"]["detection"]["thresh"] == 1.5
    assert meta["tile"] == [SIZE, SIZE]
    # Each flag carries its own description (not the Flag class docstring for all of them).
    flags = meta["flags"]
    assert flags["SATURATED"] == [4, "footprint contains saturated pixels"]
    assert flags["EDGE"][1] == "footprint touches the mosaic edge"
    assert len({desc for _, desc in flags.values()}) == len(flags) == 9  # issue 16: MODEL_FAILED


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"tile": 8}, ValueError, "tile must be an integer ≥ 32"),
        ({"halo": 2}, ValueError, "halo must be an integer ≥ 16"),
        ({"deblender": "magic"}, ValueError, "unknown deblender 'magic'"),
        ({"detection_band": "z"}, KeyError, "unknown band 'z'"),
        ({"thresh": -1.0}, ValueError, "thresh must be a positive"),
        ({"nonsense": 1}, TypeError, "unknown run parameter 'nonsense'"),
    ],
)
def test_bad_parameters_are_refused(mosaic, tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        run(mosaic, tmp_path, progress=False, **kwargs)


def test_missing_mosaic_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mosaic not found: .*nowhere\.zarr"):
        run(tmp_path / "nowhere.zarr", tmp_path / "out", progress=False)


def test_deblending_overflow_is_flagged_not_fatal(mosaic, client, tmp_path):
    out = run(
        mosaic, tmp_path, tile=SIZE, halo=64, client=client, progress=False,
        sub_object_limit=1, max_sub_object_limit=1,
    )  # fmt: skip
    cat = read_catalog(out.catalog_path)
    flags = np.asarray(cat["flags"])
    assert len(cat) > 100
    assert np.all(flags & 16)  # DEBLEND_OVERFLOW on every object of the window
    assert not np.any(flags & 8)  # nothing deblended
