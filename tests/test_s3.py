"""Mosaics, runs and catalogs on an object store: moto's S3 server on loopback, s3fs over HTTP.

moto answers the S3 protocol in a thread of this process; the engine, zarr and the Dask
workers (separate processes, which inherit the endpoint and dummy credentials from the
environment set before the cluster starts) talk to it exactly as to AWS.
"""

from __future__ import annotations

import json
import traceback

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from _util import assert_same_catalog, assert_same_table, blob_pixels, free_port, tan_wcs
from astropy.io import fits
from click.testing import CliRunner

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from survey_engine import ingest_fits, open_mosaic, read_catalog, run  # noqa: E402
from survey_engine.cli import main  # noqa: E402
from survey_engine.driver import RunError  # noqa: E402
from survey_engine.store import MARKER  # noqa: E402
from survey_engine.tiling import make_tiles  # noqa: E402

pytestmark = pytest.mark.slow

SIZE, TILE, HALO = 256, 64, 16
BUCKET = "survey"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port, the environment pointing at it, one bucket."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
        fs.mkdir(BUCKET)
        yield fs
    server.stop()


@pytest.fixture(scope="module")
def s3_client(s3):
    """Two single-threaded worker processes, started after the S3 environment is set."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as c,
        Client(c) as cl,
    ):
        yield cl


@pytest.fixture(scope="module")
def fits_images(tmp_path_factory):
    """The blob mosaic as FITS files: an image and a variance map per band (g, r)."""
    d = tmp_path_factory.mktemp("fits")
    img, var = blob_pixels((SIZE, SIZE), n=70, seed=11)
    header = fits.Header(list(tan_wcs(SIZE, SIZE).items()))
    files = {}
    for b, band in enumerate("gr"):
        for kind, data in (("image", img[b]), ("variance", var[b])):
            path = d / f"{band}_{kind}.fits"
            fits.PrimaryHDU(data, header=header if kind == "image" else None).writeto(path)
            files[band, kind] = str(path)
    return files


def _ingest(files, out):
    return ingest_fits(
        [files["g", "image"], files["r", "image"]], out, bands=["g", "r"],
        variances=[files["g", "variance"], files["r", "variance"]], zero_points=[28.0, 28.0],
        chunks=64, progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def local_run(fits_images, s3_client, tmp_path_factory):
    """The reference: ingest and run on local disk."""
    d = tmp_path_factory.mktemp("local")
    _ingest(fits_images, str(d / "m.zarr"))
    return run(str(d / "m.zarr"), d / "out", tile=TILE, halo=HALO, client=s3_client, progress=False)


@pytest.fixture(scope="module")
def s3_mosaic(fits_images, s3):
    url = f"s3://{BUCKET}/m.zarr"
    _ingest(fits_images, url)
    return url


@pytest.fixture(scope="module")
def s3_run(s3_mosaic, s3_client):
    """The same run with the mosaic and OUTDIR on S3."""
    out = f"s3://{BUCKET}/run-a"
    return run(s3_mosaic, out, tile=TILE, halo=HALO, client=s3_client, progress=False)


def _table(fs, url):
    return pq.read_table(url.removeprefix("s3://"), filesystem=fs)


def _stamps(fs, prefix):
    """ETag of every object under ``prefix``: unchanged objects were not rewritten."""
    return {k: v["ETag"] for k, v in fs.find(prefix, detail=True).items()}


def test_ingest_run_and_catalog_on_s3_match_the_local_run(s3, s3_mosaic, s3_run, local_run):
    local = open_mosaic(str(local_run.outdir.parent / "m.zarr"))
    remote = open_mosaic(s3_mosaic)
    assert remote.bands == local.bands and remote.shape == local.shape
    for plane in ("image", "variance", "mask"):
        assert np.array_equal(getattr(remote, plane)[:], getattr(local, plane)[:])

    res, out = s3_run, f"s3://{BUCKET}/run-a"
    assert str(res.catalog_path) == f"{out}/catalog.parquet"
    assert res.n_objects == local_run.n_objects > 20
    want = pq.read_table(local_run.catalog_path)
    got = _table(s3, str(res.catalog_path))
    assert_same_table(got, want)  # every column and field, bit for bit
    assert_same_catalog(read_catalog(local_run.catalog_path), read_catalog(out))
    assert_same_catalog(read_catalog(local_run.catalog_path), read_catalog(res.catalog_path))
    seg = zarr.open_group(str(res.segmentation_path), mode="r")["segmentation"][:]
    ref = zarr.open_group(str(local_run.segmentation_path), mode="r")["segmentation"][:]
    assert np.array_equal(seg, ref) and seg.any()
    # every part on the store is finished: its marker exists, next to its files
    files = s3.find(f"{BUCKET}/run-a/parts")
    parts = {f.split("/")[3] for f in files} - {"_manifest"}  # the driver's records
    assert len([p for p in parts if p.startswith("tile-")]) == (SIZE // TILE) ** 2
    assert {f"{BUCKET}/run-a/parts/{p}/{MARKER}" for p in parts} <= set(files)


def test_run_failing_mid_way_resumes_on_s3_and_half_written_parts_are_redone(
    s3, s3_client, s3_mosaic, local_run
):
    out, key = f"s3://{BUCKET}/run-b", f"{BUCKET}/run-b"
    grid = make_tiles((SIZE, SIZE), TILE, HALO)
    bad, half = grid[6], grid[9]

    def failing_kernel(bad_read):  # on every worker: the tile reading bad_read raises (None: undo)
        import survey_engine.stages as st

        real = st.__dict__.setdefault("_real_analyse_windows", st.analyse_windows)

        def failing(host, windows, *args, **kwargs):
            if bad_read in windows:
                raise FloatingPointError("kernel blew up")
            return real(host, windows, *args, **kwargs)

        st.analyse_windows = real if bad_read is None else failing

    s3_client.run(failing_kernel, bad.read)
    try:
        with pytest.raises(
            RunError, match=rf"1 task\(s\) failed: {bad.name}; .*FloatingPointError"
        ):
            run(s3_mosaic, out, tile=TILE, halo=HALO, client=s3_client, progress=False)
    finally:
        s3_client.run(failing_kernel, None)
    files = s3.find(f"{key}/parts")
    tiles = {f.split("/")[3] for f in files if f.endswith(f"/{MARKER}") and "/tile-" in f}
    assert tiles == {t.name for t in grid} - {bad.name}
    assert not s3.exists(f"{key}/catalog.parquet")
    # One part cut short, as a worker killed while writing it leaves it: files, one of them
    # garbage, and no marker.
    s3.rm_file(f"{key}/parts/{half.name}/{MARKER}")
    s3.pipe_file(f"{key}/parts/{half.name}/catalog.parquet", b"not parquet")
    kept = {k: v for k, v in _stamps(s3, f"{key}/parts").items() if f"/{half.name}/" not in k}

    res = run(s3_mosaic, out, tile=TILE, halo=HALO, client=s3_client, progress=False, resume=True)
    after = _stamps(s3, f"{key}/parts")
    assert {k: after[k] for k in kept} == kept  # finished parts were not rewritten
    redone = {k.split("/")[3] for k in set(after) - set(kept)} - {"_manifest"}
    assert {bad.name, half.name} <= redone
    assert all(p in (bad.name, half.name) or p.startswith("retry-") for p in redone)
    assert {f"{key}/parts/{t}/{MARKER}" for t in (bad.name, half.name)} <= set(after)
    assert_same_table(_table(s3, str(res.catalog_path)), pq.read_table(local_run.catalog_path))
    seg = zarr.open_group(str(res.segmentation_path), mode="r")["segmentation"][:]
    ref = zarr.open_group(str(local_run.segmentation_path), mode="r")["segmentation"][:]
    assert np.array_equal(seg, ref)
    assert json.loads(s3.cat_file(f"{key}/run.json"))["mosaic"] == s3_mosaic


def _one_line_error(res, *needles):
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output and res.exc_info[0] is SystemExit, "".join(
        traceback.format_exception(*res.exc_info)
    )
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_unreachable_endpoint_and_missing_bucket_are_one_line(s3, s3_mosaic, fits_images,
                                                              monkeypatch, tmp_path):  # fmt: skip
    runner = CliRunner()
    # a bucket that does not exist: as the mosaic, as ingest's output, as the run's OUTDIR
    line = _one_line_error(runner.invoke(main, ["run", "s3://nobucket/m.zarr", str(tmp_path / "o")]),
                           "mosaic s3://nobucket/m.zarr", "bucket 'nobucket' does not exist")  # fmt: skip
    assert not (tmp_path / "o").exists(), line
    _one_line_error(runner.invoke(main, ["ingest", fits_images["g", "image"], "s3://nobucket/x.zarr"]),
                    "output mosaic s3://nobucket/x.zarr", "bucket 'nobucket' does not exist")  # fmt: skip
    _one_line_error(runner.invoke(main, ["run", s3_mosaic, "s3://nobucket/out", "--workers", "1"]),
                    "output directory s3://nobucket/out", "bucket 'nobucket' does not exist")  # fmt: skip
    _one_line_error(runner.invoke(main, ["info", f"s3://{BUCKET}/absent.zarr"]),
                    f"mosaic not found: s3://{BUCKET}/absent.zarr")  # fmt: skip
    # an endpoint where nothing answers: named, in about a second, no retry storm
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    _one_line_error(runner.invoke(main, ["run", s3_mosaic, str(tmp_path / "o")]),
                           f"cannot reach the object store at {closed} for mosaic {s3_mosaic}",
                           "AWS_ENDPOINT_URL")  # fmt: skip
    _one_line_error(runner.invoke(main, ["info", s3_mosaic]), f"at {closed} for mosaic {s3_mosaic}")


def test_survey_run_writes_its_catalog_dataset_to_s3(s3, s3_client, tmp_path):
    from _util import blob_mosaic

    from survey_engine import run_survey
    from survey_engine.survey_io import cut_into_tracts

    blob_mosaic(tmp_path / "m.zarr", (128, 256), n=40, seed=5)
    cut_into_tracts(tmp_path / "m.zarr", tmp_path / "tracts", 1, 2, overlap_px=96)
    kw = {"tile": 64, "halo": 32, "client": s3_client, "progress": False, "background_box": 32}
    local = run_survey(tmp_path / "tracts", tmp_path / "out", **kw)
    url = f"s3://{BUCKET}/survey-out"
    remote = run_survey(tmp_path / "tracts", url, **kw)
    assert remote.n_objects == local.n_objects and sum(local.n_objects.values()) > 10
    assert_same_catalog(read_catalog(tmp_path / "out"), read_catalog(url))
    keys = set(s3.find(f"{BUCKET}/survey-out/catalog"))
    assert keys == {f"{BUCKET}/survey-out/catalog/_common_metadata"} | {
        f"{BUCKET}/survey-out/catalog/tract={t}/{name}" for t in range(2)
        for name in ("part-00000.parquet", "_common_metadata", "_SUCCESS")
    }  # fmt: skip
    again = run_survey(tmp_path / "tracts", url, resume=True, **kw)  # everything is finished
    assert sorted(again.skipped) == [0, 1] and not again.n_objects
