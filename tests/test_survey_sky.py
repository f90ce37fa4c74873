"""A simulated survey with different tangent points: each object once, overlaps as complete.

Four 320² tracts (2×2, 128 px shared, each a TAN projection at its own centre) drawn from one
GalSim scene with independent noise, run as a survey (sep, halo 32); the catalog is compared
with the truth, and read back through LSDB with a cone search across a tract boundary.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord

from survey_engine import read_catalog, run_survey
from survey_engine.simulate import read_truth, simulate_survey
from survey_engine.survey_io import open_survey

KW = {"tile": 128, "halo": 32, "deblender": "sep", "progress": False, "background_box": 32}


@pytest.fixture(scope="module")
def sky_survey(tmp_path_factory, client):
    d = tmp_path_factory.mktemp("skysurvey")
    simulate_survey(d / "tracts", tracts=(2, 2), tract_size=320, overlap=128, bands=("r",),
                    seed=11, density=3.0, client=client, progress=False)  # fmt: skip
    run_survey(d / "tracts", d / "out", client=client, **KW)
    return d, read_catalog(d / "out"), read_truth(d / "tracts" / "truth.parquet")


def _coords(t):
    return SkyCoord(
        np.asarray(t["ra"].to_value(u.deg)) * u.deg, np.asarray(t["dec"].to_value(u.deg)) * u.deg
    )


@pytest.mark.slow
def test_objects_in_the_overlaps_are_found_at_most_once(sky_survey):
    _, cat, truth = sky_survey
    ids = np.asarray(cat["id"])
    assert len(cat) > 120 and len(np.unique(ids)) == len(ids)
    in_overlap = np.asarray(truth["n_tracts"]) > 1
    assert in_overlap.sum() > 80  # the overlaps are a real part of the test
    # Catalog objects within 0.3″ of each truth object in the overlaps: never two.
    sep_ = 0.3 * u.arcsec
    idx_truth, _, _, _ = _coords(cat).search_around_sky(_coords(truth[in_overlap]), sep_)
    assert np.bincount(idx_truth, minlength=int(in_overlap.sum())).max() <= 1
    # And no two catalog objects on top of each other anywhere (a double would be ~0″ apart).
    i, j, _, _ = _coords(cat).search_around_sky(_coords(cat), 0.3 * u.arcsec)
    assert np.all(i == j), f"{int((i != j).sum())} catalog pairs closer than 0.3″"
    # Each object is kept by the tract whose inner region holds its peak pixel's position.
    sm = open_survey(sky_survey[0] / "tracts")
    tract = np.asarray(cat["tract"])
    for t in sm.tracts:
        mine = tract == t.id
        ra, dec = t.pixel_to_sky(_plain(cat["x_peak"])[mine], _plain(cat["y_peak"])[mine])
        assert np.all(sm.find_tract(ra, dec) == t.id)
    assert len(set(tract.tolist())) == 4


def _plain(col):
    return np.asarray(getattr(col, "value", col), dtype=float)


@pytest.mark.slow
def test_completeness_in_the_overlaps_equals_completeness_elsewhere(sky_survey):
    _, cat, truth = sky_survey
    mag = np.asarray(getattr(truth["r_mag"], "value", truth["r_mag"]), dtype=float)
    bright = (mag < 25.0) & (np.asarray(truth["n_tracts"]) >= 1)
    _, d2d, _ = _coords(truth).match_to_catalog_sky(_coords(cat))
    found = d2d < 0.4 * u.arcsec
    over = bright & (np.asarray(truth["n_tracts"]) > 1)
    rest = bright & (np.asarray(truth["n_tracts"]) == 1)
    assert over.sum() > 30 and rest.sum() > 30
    c_over, c_else = found[over].mean(), found[rest].mean()
    pooled = found[over | rest].mean()
    sigma = np.sqrt(pooled * (1 - pooled) * (1 / over.sum() + 1 / rest.sum()))
    print(
        f"completeness r < 25: overlaps {c_over:.3f} of {over.sum()}, elsewhere {c_else:.3f} of {rest.sum()}"
    )
    assert c_over > 0.7 and c_else > 0.7
    assert abs(c_over - c_else) < 3 * sigma, (c_over, c_else, sigma)


@pytest.mark.slow
def test_cone_search_across_a_tract_boundary_returns_each_object_once(sky_survey, client, tmp_path):
    lsdb = pytest.importorskip("lsdb")
    from survey_engine.export import export_hats

    d, cat, _ = sky_survey
    path = export_hats(d / "out", tmp_path, name="sky", client=client, progress=False)
    sm = open_survey(d / "tracts")
    # A cone centred between the four tracts' centres: it straddles every inner boundary.
    ra0 = float(np.mean([t.ra for t in sm.tracts]))
    dec0 = float(np.mean([t.dec for t in sm.tracts]))
    radius = 15.0  # arcsec, ~75 px: deep into all four tracts
    got = lsdb.open_catalog(path).cone_search(ra0, dec0, radius).compute()
    c = _coords(cat)
    want = np.asarray(cat["id"])[
        c.separation(SkyCoord(ra0 * u.deg, dec0 * u.deg)) < radius * u.arcsec
    ]
    assert len(want) > 20
    assert len(set(np.asarray(cat["tract"])[np.isin(np.asarray(cat["id"]), want)])) == 4
    ids = np.asarray(got["id"])
    assert len(np.unique(ids)) == len(ids)
    assert sorted(ids.tolist()) == sorted(want.tolist())
