"""simulate_survey: one scene drawn into overlapping tract mosaics with their own tangent points."""

from __future__ import annotations

import numpy as np
import pytest
from astropy import units as u
from click.testing import CliRunner

from survey_engine import open_mosaic, read_truth
from survey_engine.cli import main
from survey_engine.simulate import simulate_survey
from survey_engine.skymap import SkyMap

KW = {"tracts": (2, 2), "tract_size": 256, "overlap": 64, "bands": "r", "seed": 3,
      "density": 0.3, "bright_stars": 2, "chunks": 256, "progress": False}  # fmt: skip


@pytest.fixture(scope="module")
def survey(tmp_path_factory, client):
    out = tmp_path_factory.mktemp("survey") / "s"
    return simulate_survey(out, client=client, **KW)


def test_writes_tracts_skymap_and_truth(survey):
    out = survey.out_dir
    sm = SkyMap.from_json(out)
    assert sm.ids == [0, 1, 2, 3]
    crvals = set()
    for t in sm:
        m = open_mosaic(t.mosaic)
        assert (m.ny, m.nx) == (256, 256) and m.bands == ("r",)
        assert m.attrs["tract"]["id"] == t.id
        crvals.add(tuple(np.round(m.wcs.wcs.crval, 9)))
        assert t.mosaic == survey.mosaics[t.id]
    assert len(crvals) == 4  # each tract its own tangent point
    truth = read_truth(f"{out}/truth.parquet")
    assert len(truth) == len(survey.truth) and "x" not in truth.colnames
    assert {"ra", "dec", "r_mag", "tract", "n_tracts", "tracts"} <= set(truth.colnames)
    n = np.asarray(truth["n_tracts"])
    assert (n >= 2).any() and (n == 1).any()
    owner = np.asarray(truth["tract"])
    np.testing.assert_array_equal(owner >= 0, n >= 1)
    sm.check_overlap(30)  # the grid's inner boundaries lie mid-overlap (32 px), tilts aside


def test_truth_objects_sit_at_their_pixels_in_every_tract_holding_them(survey):
    truth = survey.truth
    ra, dec = truth["ra"].to_value(u.deg), truth["dec"].to_value(u.deg)
    mag = np.asarray(truth["r_mag"])
    segs = {t.id: open_mosaic(t.mosaic).group["truth_segmentation"][:] for t in survey.skymap}
    imgs = {t.id: open_mosaic(t.mosaic).image[0] for t in survey.skymap}
    checked_shared = checked = 0
    for k in np.argsort(mag):  # brightest first
        holders = [int(i) for i in str(truth["tracts"][k]).split(",") if i]
        if not holders or mag[k] > 22:
            continue
        for tid in holders:
            t = survey.skymap[tid]
            x, y = t.sky_to_pixel(ra[k], dec[k])
            ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
            # the noiseless truth footprint holds the object's own id at its centre ...
            seg = segs[tid][iy, ix]
            if seg != truth["id"][k]:
                continue  # a brighter neighbour owns the pixel
            # ... and the light is centred on it (centroid of a 7×7 box; a saturated star's
            # plateau included)
            if not (3 <= ix < t.shape[1] - 3 and 3 <= iy < t.shape[0] - 3):
                continue
            box = imgs[tid][iy - 3 : iy + 4, ix - 3 : ix + 4].astype(float)
            w = np.clip(box - np.median(imgs[tid]), 0, None)
            gy, gx = np.mgrid[-3:4, -3:4]
            cy, cx = iy + (w * gy).sum() / w.sum(), ix + (w * gx).sum() / w.sum()
            assert abs(cy - y) < 0.5 and abs(cx - x) < 0.5, (truth["id"][k], tid, cx - x, cy - y)
            checked += 1
            checked_shared += len(holders) > 1
    assert checked >= 5 and checked_shared >= 2  # a shared object checked in two tracts


def test_the_same_object_is_drawn_in_two_tracts_with_independent_noise(survey):
    truth = survey.truth
    shared = np.flatnonzero(np.asarray(truth["n_tracts"]) >= 2)
    k = shared[np.argmin(np.asarray(truth["r_mag"])[shared])]
    a, b = (int(i) for i in str(truth["tracts"][k]).split(",")[:2])
    cuts = []
    for tid in (a, b):
        t = survey.skymap[tid]
        x, y = t.sky_to_pixel(truth["ra"][k].to_value(u.deg), truth["dec"][k].to_value(u.deg))
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        cuts.append(open_mosaic(t.mosaic).image[0, iy - 2 : iy + 3, ix - 2 : ix + 3])
        assert open_mosaic(t.mosaic).group["truth_segmentation"][iy, ix] == truth["id"][k]
    # same object, same flux in both (to the noise); the noise itself differs
    assert cuts[0].sum() == pytest.approx(cuts[1].sum(), rel=0.25)
    assert not np.array_equal(cuts[0], cuts[1])


def test_bad_values_are_refused(tmp_path, client):
    with pytest.raises(ValueError, match="must exceed the overlap"):
        simulate_survey(tmp_path / "a", client=client, **{**KW, "overlap": 256})
    with pytest.raises(ValueError, match="n_tracts must be positive"):
        simulate_survey(tmp_path / "b", client=client, **{**KW, "tracts": (0, 2)})
    (tmp_path / "c").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        simulate_survey(tmp_path / "c", client=client, **KW)


def _error_line(res) -> str:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, res.output
    return lines[0]


def test_cli_simulate_survey(tmp_path, client, monkeypatch):
    import contextlib
    import importlib

    # (``survey_engine.simulate`` the attribute is the function: import the module by name)
    mod = importlib.import_module("survey_engine.simulate._survey")

    asked = {}

    @contextlib.contextmanager
    def in_process(**kwargs):  # the module's in-process cluster, not new worker processes
        asked.update(kwargs)
        yield client

    monkeypatch.setattr(mod, "dask_client", in_process)
    runner = CliRunner()
    for args, text in (
        (["--tracts", "0x2"], "--tracts and --tract-size must be positive"),
        (["--tracts", "2y2"], "--tracts must be N or NYxNX"),
        (["--tract-size", "64", "--overlap", "64"], "must exceed the overlap"),
        (["--center", "150"], "--center must be RA,DEC"),
    ):
        res = runner.invoke(main, ["simulate-survey", str(tmp_path / "bad"), *args])
        assert text in _error_line(res)
    out = tmp_path / "s"
    res = runner.invoke(main, ["simulate-survey", str(out), "--tracts", "1x2", "--tract-size",
                               "96", "--overlap", "32", "--bands", "r", "--density", "0.2",
                               "--workers", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "simulated survey" in res.output and "2 tracts of 96×96 px" in res.output
    assert SkyMap.from_json(out).ids == [0, 1]
    assert asked == {"workers": 1, "scheduler": None, "client": None}
    res = runner.invoke(main, ["simulate-survey", str(out), "--tracts", "1x2"])
    assert "already exists" in _error_line(res)


def test_a_ring_sky_map_is_simulated_too(tmp_path, client):
    sm = SkyMap.rings((150.095, 150.105), (2.195, 2.205), tract_size_deg=0.006, overlap_deg=0.002,
                      pixel_scale=0.2)  # fmt: skip
    assert len(sm) == 4
    res = simulate_survey(tmp_path / "rings", skymap=sm, bands="r", seed=1, density=0.5,
                          chunks=256, client=client, progress=False)  # fmt: skip
    for t in res.skymap:
        assert open_mosaic(t.mosaic).shape[1:] == t.shape and t.inner["kind"] == "box"
    truth = res.truth
    ra, dec = truth["ra"].to_value(u.deg), truth["dec"].to_value(u.deg)
    inside = (ra >= 150.095) & (ra < 150.105) & (dec >= 2.195) & (dec < 2.205)
    owner = np.asarray(truth["tract"])
    assert inside.any() and (owner[inside] >= 0).all()
    for t in res.skymap:
        np.testing.assert_array_equal(owner[inside] == t.id, t.in_box(ra[inside], dec[inside]))
    res.skymap.check_overlap(0.001 * 3600 / 0.2 * 0.99)


def test_simulate_refuses_a_wcs_that_is_not_one(tmp_path):
    from survey_engine.simulate import simulate

    with pytest.raises(ValueError, match="wcs must be a 2-D celestial astropy WCS"):
        simulate(tmp_path / "x.zarr", size=32, wcs="RA---TAN", progress=False)
