"""Survey runs: a mosaic cut into 2×2 overlapping tracts gives the whole mosaic's catalog.

One simulated 384² mosaic (one band, sep) is cut into 2×2 pixel-aligned tract mosaics of 256²
sharing 128 px (the inner boundaries in the middle of the overlaps, 64 px from each tract edge;
halo 32) and run as a survey; its global catalog is compared with the run on the whole mosaic.
"""

from __future__ import annotations

import shutil

import dask
import numpy as np
import pytest
import zarr
from _util import assert_same_catalog
from astropy import units as u
from astropy.coordinates import SkyCoord
from click.testing import CliRunner

from survey_engine import RunError, open_mosaic, read_catalog, run, run_survey, simulate
from survey_engine.cli import main
from survey_engine.skymap import GLOBAL_ID_SCHEME, global_ids
from survey_engine.survey_io import cut_into_tracts, open_survey

SIZE, OVERLAP, HALO, TILE = 384, 128, 32, 96
# background cells of 32 px: many cells per tract, aligned with the tract origins
KW = {"tile": TILE, "halo": HALO, "deblender": "sep", "progress": False, "background_box": 32}


@pytest.fixture(scope="module")
def survey(tmp_path_factory, client):
    d = tmp_path_factory.mktemp("survey")
    simulate(d / "mosaic.zarr", size=SIZE, bands=("r",), seed=3, chunks=128, density=2.0,
             truth_segmentation=False, client=client, progress=False)  # fmt: skip
    cut_into_tracts(d / "mosaic.zarr", d / "tracts", 2, 2, overlap_px=OVERLAP)
    return d


@pytest.fixture(scope="module")
def whole(survey, client):
    res = run(survey / "mosaic.zarr", survey / "whole", client=client, **KW)
    return read_catalog(res.catalog_path)


@pytest.fixture(scope="module")
def together(survey, client):
    res = run_survey(survey / "tracts", survey / "together", client=client, **KW)
    assert sorted(res.n_objects) == [0, 1, 2, 3]
    return read_catalog(survey / "together")


def _plain(col):
    return np.asarray(getattr(col, "value", col))


def _mosaic_peaks(survey, cat):
    """Peak pixels of a survey catalog in the uncut mosaic (tract origin added)."""
    origin = {
        t: open_mosaic(survey / "tracts" / f"{t}.zarr").attrs["tract"]["origin"] for t in range(4)
    }
    oy = np.array([origin[t][0] for t in cat["tract"]])
    ox = np.array([origin[t][1] for t in cat["tract"]])
    return _plain(cat["y_peak"]) + oy, _plain(cat["x_peak"]) + ox


def test_survey_gives_the_whole_mosaic_catalog(survey, whole, together):
    assert len(whole) > 100
    # each object once: no peak pixel of the mosaic twice, ids unique
    py, px = _mosaic_peaks(survey, together)
    assert len(set(zip(py.tolist(), px.tolist(), strict=True))) == len(together)
    assert len(np.unique(_plain(together["id"]))) == len(together)
    # ≥ 99% of the whole mosaic's objects found within 0.05″, one to one (the background is
    # estimated per tract, so objects at the detection limit can differ)
    a = SkyCoord(_plain(whole["ra"]) * u.deg, _plain(whole["dec"]) * u.deg)
    b = SkyCoord(_plain(together["ra"]) * u.deg, _plain(together["dec"]) * u.deg)
    idx, sep, _ = a.match_to_catalog_sky(b)
    close = sep < 0.05 * u.arcsec
    assert close.mean() >= 0.99, close.mean()
    assert len(np.unique(idx[close])) == close.sum()
    assert abs(len(together) - len(whole)) <= 0.01 * len(whole)
    # objects in the overlaps, each kept by the tract whose inner region holds it (quadrants)
    in_overlap = (np.abs(py - SIZE / 2) < OVERLAP / 2) | (np.abs(px - SIZE / 2) < OVERLAP / 2)
    assert in_overlap.sum() > 40
    owner = (py >= SIZE // 2) * 2 + (px >= SIZE // 2)
    assert np.array_equal(_plain(together["tract"]), owner)
    # matched objects have the same peak pixel; bright ones the same flux (measured whole)
    w, t = whole[close], together[idx[close]]
    assert np.array_equal(_plain(w["y_peak"]), py[idx[close]])
    assert np.array_equal(_plain(w["x_peak"]), px[idx[close]])
    bright = _plain(w["r_mag"]) < 23
    assert bright.sum() > 10
    ratio = _plain(t["r_flux"])[bright] / _plain(w["r_flux"])[bright]
    assert np.max(np.abs(ratio - 1)) < 0.005, ratio


def test_global_ids_are_healpix_of_the_peak(survey, together):
    skymap = open_survey(survey / "tracts")
    tract = _plain(together["tract"])
    y, x = _plain(together["y_peak"]), _plain(together["x_peak"])
    expected = skymap.peak_ids(tract, y, x)
    assert np.array_equal(_plain(together["id"]), expected)
    assert together.meta["id"] == GLOBAL_ID_SCHEME
    assert together["id"].info.description == f"object ID: {GLOBAL_ID_SCHEME}"
    # the parent id is the global id of the parent's brightest child
    solo = _plain(together["n_children"]) == 1
    assert np.array_equal(_plain(together["parent_id"])[solo], _plain(together["id"])[solo])
    ra, dec = skymap[int(tract[0])].pixel_to_sky(x[:1], y[:1])
    assert global_ids(ra, dec, skymap.colours[int(tract[0])])[0] == expected[0]
    # each tract's segmentation map holds the global ids of the objects it owns
    seg = zarr.open_group(str(survey / "together" / "tracts" / "2" / "segmentation.zarr"), mode="r")
    labels = np.unique(seg["segmentation"][:])
    assert set(labels[labels != 0].tolist()) == set(_plain(together["id"])[tract == 2].tolist())


def test_tracts_run_one_at_a_time_give_the_same_catalog(survey, together, client):
    out = survey / "later"
    first = run_survey(survey / "tracts", out, tracts=[0], client=client, **KW)
    assert list(first.n_objects) == [0]
    assert set(read_catalog(out)["tract"]) == {0}
    with pytest.raises(RunError, match="not empty"):
        run_survey(survey / "tracts", out, tracts=[1], client=client, **KW)
    rest = run_survey(survey / "tracts", out, tracts=[3, 1, 2, 0], resume=True, client=client, **KW)
    assert rest.skipped == [0] and sorted(rest.n_objects) == [1, 2, 3]
    assert_same_catalog(read_catalog(out), together)
    with pytest.raises(RunError, match="differs in halo"):
        run_survey(survey / "tracts", out, resume=True, client=client, **{**KW, "halo": 40})


def test_a_failed_tract_does_not_stop_the_others(survey, together, client, tmp_path):
    src = tmp_path / "tracts"
    shutil.copytree(survey / "tracts", src)
    chunk = src / "1.zarr" / "image" / "c" / "0" / "0" / "0"
    good = chunk.read_bytes()
    chunk.write_bytes(b"not a chunk")
    with pytest.raises(RunError, match=r"1 of 4 tract\(s\) failed: 1; tract 1: .*resume"):
        run_survey(src, tmp_path / "out", client=client, **KW)
    assert set(read_catalog(tmp_path / "out")["tract"]) == {0, 2, 3}
    chunk.write_bytes(good)
    res = run_survey(src, tmp_path / "out", resume=True, client=client, **KW)
    assert res.skipped == [0, 2, 3] and list(res.n_objects) == [1]
    assert_same_catalog(read_catalog(tmp_path / "out"), together)


def test_bad_surveys_are_refused(survey, tmp_path, client):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \*\.zarr mosaics"):
        run_survey(tmp_path / "empty", tmp_path / "o", client=client, **KW)
    with pytest.raises(FileNotFoundError, match="survey directory not found"):
        run_survey(tmp_path / "nowhere", tmp_path / "o", client=client, **KW)
    with pytest.raises(ValueError, match=r"unknown tract\(s\) 7"):
        run_survey(survey / "tracts", tmp_path / "o", tracts=[7], client=client, **KW)
    cut_into_tracts(survey / "mosaic.zarr", tmp_path / "thin", 2, 2, overlap_px=2 * HALO - 2)
    with pytest.raises(ValueError, match=r"halo \(32 px\).*tracts 0 and 1 overlap too little"):
        run_survey(tmp_path / "thin", tmp_path / "o", client=client, **KW)
    assert not (tmp_path / "o").exists()
    res = CliRunner().invoke(
        main, ["survey", str(tmp_path / "thin"), str(tmp_path / "o"), "--halo", "32"]
    )
    assert res.exit_code == 1
    assert res.output.startswith("error: survey ") and res.output.count("\n") == 1, res.output


def test_survey_catalog_exports_to_hats(survey, together, client, tmp_path):
    lsdb = pytest.importorskip("lsdb")
    from survey_engine.export import export_hats

    path = export_hats(survey / "together", tmp_path, name="survey", client=client, progress=False)
    df = lsdb.open_catalog(path).compute().sort_values("id")
    ref = np.sort(_plain(together["id"]))
    np.testing.assert_array_equal(df["id"].to_numpy(), ref)


def test_survey_command_runs_tracts_and_adds_one_later(survey, together, client, tmp_path):
    out = str(tmp_path / "cli")
    args = ["survey", str(survey / "tracts"), out, "--tile", str(TILE), "--halo", str(HALO),
            "--deblender", "sep", "--scheduler", client.scheduler.address]  # fmt: skip
    with dask.config.set({"survey_engine.background-box": 32}):
        res = CliRunner().invoke(main, [*args, "--tracts", "0,1,2"])
        assert res.exit_code == 0, res.output
        assert "in 3 tract(s) run" in res.output and "tract 2" in res.output
        res = CliRunner().invoke(main, [*args, "--resume"])
        assert res.exit_code == 0, res.output
        assert "in 1 tract(s) run, 3 kept from before" in res.output
    assert_same_catalog(read_catalog(out), together)
    res = CliRunner().invoke(main, [*args, "--tracts", "a,b"])
    assert res.exit_code == 1 and "--tracts must be comma-separated" in res.output
