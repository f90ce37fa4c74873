"""HATS export: the catalog partitioned by hats-import and read back with LSDB."""

import lsdb
import numpy as np
import pytest
from _util import blob_mosaic
from click.testing import CliRunner

from survey_engine import read_catalog, run
from survey_engine.cli import main
from survey_engine.export import export_hats


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, client):
    d = tmp_path_factory.mktemp("hats")
    m = blob_mosaic(d / "m.zarr", (256, 256), n=60, seed=3)
    return run(m, d / "out", tile=128, halo=32, client=client, progress=False).catalog_path


def _lsdb_frame(path):
    return lsdb.open_catalog(path).compute().sort_values("id")


def test_hats_catalog_reads_back_with_lsdb(catalog, tmp_path, client):
    path = export_hats(catalog, tmp_path, name="blobs", client=client, progress=False)
    assert path == tmp_path / "blobs"
    df = _lsdb_frame(path)
    ref = read_catalog(catalog)
    assert len(df) == len(ref) > 20
    np.testing.assert_array_equal(df["id"].to_numpy(), np.asarray(ref["id"]))
    np.testing.assert_array_equal(df["ra"].to_numpy(), np.asarray(ref["ra"].value))
    np.testing.assert_array_equal(df["r_flux"].to_numpy(), np.asarray(ref["r_flux"].value))


def test_run_format_hats_from_the_command_line(tmp_path):
    m = blob_mosaic(tmp_path / "m.zarr", (200, 200), n=30, seed=5)
    res = CliRunner().invoke(
        main, ["run", m, str(tmp_path / "out"), "--tile", "100", "--halo", "32", "--workers", "1",
               "--format", "hats"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    df = _lsdb_frame(tmp_path / "out" / "hats" / "survey_engine")
    assert len(df) == len(read_catalog(tmp_path / "out" / "catalog.parquet"))


def test_catalog_without_sky_positions_is_refused(tmp_path, client):
    m = blob_mosaic(tmp_path / "m.zarr", (128, 128), n=10, seed=2, wcs=False)
    cat = run(m, tmp_path / "out", tile=128, halo=32, client=client, progress=False).catalog_path
    with pytest.raises(ValueError, match=r"without ra/dec .*no WCS"):
        export_hats(cat, tmp_path / "h", client=client, progress=False)
    with pytest.raises(FileNotFoundError, match="catalog not found"):
        export_hats(tmp_path / "nope.parquet", tmp_path / "h", client=client)
