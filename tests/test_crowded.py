"""Crowded fields: the King-profile globular cluster of ``simulate(cluster=...)``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from click.testing import CliRunner
from numpy.testing import assert_allclose, assert_array_equal
from scipy.integrate import quad

from survey_engine.cli import main
from survey_engine.simulate import KingCluster, make_scene, read_truth, simulate
from survey_engine.simulate._bands import band_setups, make_psf
from survey_engine.simulate._cluster import GB_STEP, TURN_OFF
from survey_engine.simulate._draw import (
    FAST_ERROR,
    DrawConfig,
    _fast_star,
    _gsparams,
    _psf_phases,
    draw_stamps,
    object_plan,
    render_block,
    select_objects,
)

KING = KingCluster(20000, core_radius=20.0, tidal_radius=200.0)  # inside a 512² field


def _cluster(table):
    return table[table["population"] == "cluster"]


def test_counts_follow_the_king_profile():
    """Star counts in rings around the centre match n_stars × the King fraction (4σ binomial)."""
    stars = _cluster(make_scene(512, 512, bands="r", seed=5, density=0.0, cluster=KING))
    assert len(stars) == 20000  # the tidal radius lies inside the field: nothing dropped
    r = np.hypot(stars["x"].value - 255.5, stars["y"].value - 255.5)
    assert r.max() <= 200.0
    edges = np.array([0.0, 10.0, 20.0, 40.0, 80.0, 200.0])
    counts = np.histogram(r, edges)[0]
    p = np.diff(KING.fraction_within(edges))
    expected = 20000 * p
    assert_allclose(p.sum(), 1.0)
    assert np.all(np.abs(counts - expected) < 4 * np.sqrt(expected * (1 - p))), (counts, expected)
    # The closed form of the cumulative number is the integral of the surface density.
    inner = quad(lambda s: 2 * math.pi * s * float(KING.surface_density(s)), 0.0, 20.0)[0]
    assert_allclose(inner, 20000 * KING.fraction_within(20.0), rtol=1e-6)
    # Central density n (1 - c)² / (π rc² F(xt)), c = 1/√101, F = ln 101 - 4c(√101 - 1) + 100 c².
    c = 1 / math.sqrt(101.0)
    f = math.log(101.0) - 4 * c * (math.sqrt(101.0) - 1) + 100 * c * c
    assert_allclose(KING.surface_density(0.0), 20000 * (1 - c) ** 2 / (math.pi * 400 * f))
    assert 6.43 < float(KING.surface_density(0.0)) < 6.45  # stars per px², all magnitudes
    n5 = int(np.sum(r < 5.0))
    assert abs(n5 - 20000 * KING.fraction_within(5.0)) < 4 * math.sqrt(n5)


def test_luminosity_function_shape():
    """Magnitudes follow the turn-off + giant-branch luminosity function, to max_mag."""
    king = KingCluster(60000, core_radius=40.0, tidal_radius=250.0, distance_modulus=18.0)
    r = _cluster(make_scene(512, 512, bands="r", seed=2, density=0.0, cluster=king))["r_mag"].value
    assert r.min() >= 18.0 - 2.5 and r.max() < 27.0
    edges = np.array([15.5, 18.0, 20.0, 21.0, 22.0, 23.0, 24.0, 25.0, 26.0, 27.0])
    counts = np.histogram(r, edges)[0]
    expected = len(r) * np.diff(king.fraction_brighter(edges, 27.0))
    assert np.all(np.abs(counts - expected) < 4 * np.sqrt(expected) + 1), (counts, expected)
    # Turn-off at r = μ + 4 = 22: dN/dm jumps by 1 / GB_STEP across it.
    f = king.fraction_brighter([21.8, 22.0, 22.2], 27.0)
    above, below = np.sum((r > 21.8) & (r < 22.0)), np.sum((r > 22.0) & (r < 22.2))
    jump = ((10**0.02 - 1) / 0.1) / (GB_STEP * (1 - 10**-0.06) / 0.3)  # = 7.30
    assert_allclose((f[2] - f[1]) / (f[1] - f[0]), jump, rtol=1e-9)
    assert abs(below / above - jump) < 4 * jump * math.sqrt(1 / above + 1 / below)
    # Main-sequence slope 0.1 dex/mag: counts rise by 10^0.4 from r = 22-23 to r = 26-27.
    ratio = counts[-1] / counts[4]
    assert abs(ratio - 10**0.4) < 0.15
    # The giant branch (M_r < 4) is a sparse ~2 % of the stars.
    assert 0.015 < np.mean(r < 18.0 + TURN_OFF) < 0.03


def test_colours_are_one_population():
    """g - r follows the single-population colour-magnitude relation with 0.02 mag scatter."""
    t = _cluster(make_scene(512, 512, bands="g,r,i", seed=3, density=0.0, cluster=KING))
    gr = t["g_mag"].value - t["r_mag"].value
    m_abs = t["r_mag"].value - 18.0
    ms = m_abs > 6.0
    assert_allclose(np.median(gr[ms] - (0.25 + 0.16 * (m_abs[ms] - 4.0))), 0.0, atol=0.005)
    assert 0.015 < np.std(gr[ms] - (0.25 + 0.16 * (m_abs[ms] - 4.0))) < 0.025
    assert np.all(t["kind"] == "star") and np.all(t["half_light_radius"].value == 0)


def test_scene_with_a_cluster_keeps_the_field_and_is_deterministic():
    plain = make_scene(300, 200, bands="r", seed=9)
    crowded = make_scene(300, 200, bands="r", seed=9, cluster=KingCluster(500, 10.0, 80.0))
    again = make_scene(300, 200, bands="r", seed=9, cluster=KingCluster(500, 10.0, 80.0))
    n = len(plain)
    for name in ("x", "y", "r_flux", "kind"):
        assert_array_equal(crowded[name][:n], plain[name], err_msg=name)
        assert_array_equal(crowded[name], again[name], err_msg=name)
    assert np.all(plain["population"] == "field")
    assert np.all(crowded["population"][n:] == "cluster") and 300 < len(crowded) - n <= 500
    assert crowded.meta["cluster"]["n_stars"] == 500
    off = make_scene(300, 200, bands="r", seed=9, cluster=KingCluster(500, 10.0, 80.0, (0.0, 0.0)))
    x, y = _cluster(off)["x"].value, _cluster(off)["y"].value
    assert np.all((x >= -0.5) & (y >= -0.5)) and 100 < len(x) < 200  # a quarter lands inside


@pytest.mark.parametrize("psf", ["kolmogorov", "moffat"])
def test_fast_point_sources_match_galsim(psf):
    """The interpolated PSF stamps of cluster stars agree with GalSim to FAST_ERROR × flux."""
    bands = ("g", "r")
    setups = band_setups(bands, depth=26.8, psf=psf, psf_fwhm=0.7, pixel_scale=0.2)
    scene = make_scene(128, 128, bands=bands, seed=4, cluster=KING)
    plan = object_plan(scene, setups, 0.2)
    fast = plan[plan["fast"]]
    cluster = np.asarray(scene["population"] == "cluster")
    faint = scene["r_flux"].value * FAST_ERROR <= 0.05 * setups[1].sky_sigma  # r ≳ 19.4
    assert_array_equal(plan["fast"], cluster & faint)
    assert len(fast) > 1000 and np.sum(cluster & ~faint) > 0  # the bright giants go to GalSim
    cubes = [_psf_phases(psf, b.psf_fwhm, 0.2) for b in setups]
    psfs = [make_psf(psf, b.psf_fwhm, _gsparams()) for b in setups]
    for obj in fast[:: len(fast) // 25]:
        exact = draw_stamps(obj, psfs, 0.2, _gsparams())
        err = np.abs(_fast_star(obj, cubes) - exact).max(axis=(1, 2))
        assert np.all(err <= FAST_ERROR * obj["flux"]), (err, obj["flux"])


def test_crowded_model_is_independent_of_the_blocks():
    """Blocks of a crowded field stitch to the one-block model, bit for bit."""
    bands = ("r",)
    setups = band_setups(bands, depth=26.8, psf="kolmogorov", psf_fwhm=0.7, pixel_scale=0.2)
    scene = make_scene(160, 192, bands=bands, seed=3, cluster=KingCluster(3000, 15.0, 120.0))
    plan = object_plan(scene, setups, 0.2)
    config = DrawConfig(setups, 0.2, "kolmogorov", 3, 0.2, None)
    whole, seg = render_block(select_objects(plan, 0, 160, 0, 192), 0, 160, 0, 192, config)
    tiled, tiled_seg = np.zeros_like(whole), np.zeros_like(seg)
    for y0, y1 in ((0, 70), (70, 160)):
        for x0, x1 in ((0, 101), (101, 192)):
            m, s = render_block(select_objects(plan, y0, y1, x0, x1), y0, y1, x0, x1, config)
            tiled[:, y0:y1, x0:x1], tiled_seg[y0:y1, x0:x1] = m, s
    assert_array_equal(tiled, whole)
    assert_array_equal(tiled_seg, seg)
    cluster_ids = scene["id"][scene["population"] == "cluster"]
    assert np.isin(seg, cluster_ids).mean() > 0.3  # the core is tiled with cluster footprints


def test_simulate_a_crowded_field(tmp_path, client):
    """Two chunkings give the same truth segmentation; the truth table keeps the population."""
    kw = {"size": 192, "bands": ("r",), "seed": 7, "client": client, "progress": False,
          "cluster": {"n_stars": 2000, "core_radius": 12.0, "tidal_radius": 90.0}}  # fmt: skip
    a = simulate(tmp_path / "a.zarr", chunks=192, truth=tmp_path / "a.parquet", **kw)
    b = simulate(tmp_path / "b.zarr", chunks=80, **kw)
    seg_a = a.mosaic.group["truth_segmentation"][:]
    assert_array_equal(seg_a, b.mosaic.group["truth_segmentation"][:])
    t = read_truth(tmp_path / "a.parquet")
    assert set(t["population"]) == {"field", "cluster"}
    assert "cluster" in t["population"].info.description
    assert t.meta["cluster"]["tidal_radius"] == 90.0
    assert a.mosaic.attrs["simulation"]["cluster"]["n_stars"] == 2000
    img = a.mosaic.read((0, 192), (0, 192)).image[0]
    core = img[86:106, 86:106].mean()
    assert core > 20 * img[:30, :30].mean() + 1.0  # the cluster core is bright


def test_cli_simulate_crowded(tmp_path, client):
    out = tmp_path / "c.zarr"
    args = ["simulate", str(out), "--size", "128", "--bands", "r", "--truth",
            str(tmp_path / "t.parquet"), "--cluster-stars", "800", "--cluster-core-radius", "8",
            "--cluster-tidal-radius", "60", "--cluster-center", "40,50",
            "--scheduler", client.scheduler.address]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    stars = _cluster(read_truth(tmp_path / "t.parquet"))
    assert 500 < len(stars) <= 800
    assert abs(np.median(stars["x"].value) - 40) < 3 and abs(np.median(stars["y"].value) - 50) < 3
    bad = CliRunner().invoke(main, [*args[:2], "--cluster-stars", "10", "--cluster-center", "1,x"])
    assert bad.exit_code == 1
    assert bad.output.strip() == "error: cluster center must be a finite number, got 'x'"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_stars": -1}, "cluster n_stars must be a non-negative integer, got -1"),
        ({"n_stars": 2.5}, "cluster n_stars must be a non-negative integer"),
        ({"n_stars": 10, "core_radius": 0.0}, "cluster core_radius must be a finite positive"),
        ({"n_stars": 10, "tidal_radius": float("nan")}, "cluster tidal_radius must be"),
        ({"n_stars": 10, "core_radius": 50.0, "tidal_radius": 40.0}, r"must exceed core_radius \(50\)"),
        ({"n_stars": 10, "center": (1.0,)}, r"cluster center must be an \(x, y\) pair"),
        ({"n_stars": 10, "distance_modulus": "far"}, "cluster distance_modulus must be a finite"),
    ],
)  # fmt: skip
def test_bad_cluster_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KingCluster(**kwargs)


def test_bad_cluster_arguments(tmp_path):
    with pytest.raises(ValueError, match="cluster must be a KingCluster or a mapping"):
        simulate(tmp_path / "x.zarr", size=64, cluster=500, progress=False)
    with pytest.raises(ValueError, match="give cluster or scene, not both"):
        simulate(tmp_path / "x.zarr", size=64, cluster=KING, scene=make_scene(64, 64))
    with pytest.raises(ValueError, match=r"no stars brighter than max_mag 27.0 \(its tip .* 27.5"):
        make_scene(64, 64, cluster=KingCluster(10, distance_modulus=30.0))
    with pytest.raises(ValueError, match=r"cluster mapping needs n_stars .* got \['stars'\]"):
        simulate(tmp_path / "x.zarr", size=64, cluster={"stars": 5})
    assert not (tmp_path / "x.zarr").exists()
