"""Tests of the GalSim simulator (survey_engine.simulate)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy import units as u
from numpy.testing import assert_allclose, assert_array_equal

from survey_engine._malloc import drawing_allocator
from survey_engine.flags import MaskBit
from survey_engine.mosaic import open_mosaic
from survey_engine.parallel import dask_client
from survey_engine.simulate import (
    SimulationResult,
    expected_counts,
    make_scene,
    make_wcs,
    read_truth,
    simulate,
)
from survey_engine.simulate._bands import band_setups, make_psf
from survey_engine.simulate._draw import (
    MAX_HALF,
    DrawConfig,
    _gsparams,
    draw_stamps,
    object_plan,
    render_block,
    select_objects,
)
from survey_engine.simulate._scene import enclosed_fraction

PIXEL_AREA_DEG2 = (0.2 / 3600.0) ** 2


@pytest.fixture(scope="module")
def client():
    with dask_client(workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def field(tmp_path_factory, client) -> SimulationResult:
    """A realistic 512² g, r, i field with one bright star, drawn in 4 blocks."""
    d = tmp_path_factory.mktemp("field")
    return simulate(
        d / "field.zarr",
        size=512,
        seed=11,
        bright_stars=1,
        chunks=256,
        truth=d / "truth.parquet",
        client=client,
        progress=False,
    )


def _planes(result: SimulationResult) -> dict[str, np.ndarray]:
    m = open_mosaic(result.path)
    out = {p: m.group[p][:] for p in ("image", "variance", "mask")}
    if m.has_truth_segmentation:
        out["truth_segmentation"] = m.group["truth_segmentation"][:]
    return out


@pytest.fixture(scope="module")
def masked_pair(tmp_path_factory, client):
    """The same masked simulation with 1 worker and with 2 workers (9 blocks, shared stamps)."""
    d = tmp_path_factory.mktemp("pair")
    kw = dict(size=(320, 384), chunks=128, seed=5, masks=True, bright_stars=1, progress=False)
    one = simulate(d / "one.zarr", workers=1, truth=d / "one.parquet", **kw)
    two = simulate(d / "two.zarr", client=client, truth=d / "two.parquet", **kw)
    return one, two


# --- determinism -----------------------------------------------------------------------------


def test_bit_identical_with_one_and_two_workers(masked_pair):
    one, two = masked_pair
    a, b = _planes(one), _planes(two)
    assert set(a) == {"image", "variance", "mask", "truth_segmentation"}
    for plane in a:
        assert_array_equal(a[plane], b[plane], err_msg=plane)
    ta, tb = read_truth(one.truth_path), read_truth(two.truth_path)
    assert ta.colnames == tb.colnames
    for name in ta.colnames:
        assert_array_equal(np.asarray(ta[name]), np.asarray(tb[name]), err_msg=name)


def test_tiled_model_equals_untiled():
    """A stamp is identical whichever block draws it: 4 blocks stitch to the 1-block model."""
    bands = ("g", "r")
    setups = band_setups(bands, depth=26.8, psf="kolmogorov", psf_fwhm=0.7, pixel_scale=0.2)
    scene = make_scene(160, 192, bands=bands, seed=3, bright_stars=1)
    plan = object_plan(scene, setups, 0.2)
    config = DrawConfig(setups, 0.2, "kolmogorov", 3, 0.2, None)
    whole, seg = render_block(select_objects(plan, 0, 160, 0, 192), 0, 160, 0, 192, config)
    tiled = np.zeros_like(whole)
    tiled_seg = np.zeros_like(seg)
    for y0, y1 in ((0, 70), (70, 160)):
        for x0, x1 in ((0, 101), (101, 192)):
            m, s = render_block(select_objects(plan, y0, y1, x0, x1), y0, y1, x0, x1, config)
            tiled[:, y0:y1, x0:x1] = m
            tiled_seg[y0:y1, x0:x1] = s
    assert_array_equal(tiled, whole)
    assert_array_equal(tiled_seg, seg)
    assert whole.sum() > 0 and seg.max() > 0


def test_huge_bulges_draw_within_capped_stamps(monkeypatch):
    """Extreme sizes neither fail in GalSim (FFT size) nor exceed the stamp cap."""
    bands = ("u", "y")
    setups = band_setups(bands, depth=26.8, psf="kolmogorov", psf_fwhm=0.7, pixel_scale=0.2)
    scene = make_scene(64, 64, bands=bands, seed=0)[:2]
    scene["kind"] = ["galaxy", "galaxy"]
    scene["bulge_fraction"] = [1.0, 0.5]
    scene["bulge_hlr"] = [5.0, 5.0] * u.arcsec
    scene["disk_hlr"] = [1.0, 10.0] * u.arcsec
    scene["e1"] = [0.69, 0.0]
    scene["e2"] = [0.0, -0.69]
    plan = object_plan(scene, setups, 0.2)
    assert np.all(plan["half"] == MAX_HALF)
    gsparams = _gsparams()
    psfs = [make_psf("kolmogorov", b.psf_fwhm, gsparams) for b in setups]
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with drawing_allocator():
        for obj in plan:
            stamps = draw_stamps(obj, psfs, 0.2, gsparams)
            assert stamps.shape == (2, 2 * MAX_HALF + 1, 2 * MAX_HALF + 1)
            assert np.all(np.isfinite(stamps))
            assert_allclose(stamps.sum(axis=(1, 2)) / obj["flux"], 0.9, atol=0.1)


def test_scene_is_deterministic_and_band_independent():
    a = make_scene(300, 200, bands=("g", "r", "i"), seed=9, bright_stars=2)
    b = make_scene(300, 200, bands=("r", "z"), seed=9, bright_stars=2)
    c = make_scene(300, 200, bands=("r",), seed=10)
    assert_array_equal(a["x"], b["x"])
    assert_array_equal(a["r_flux"], b["r_flux"])
    assert_array_equal(a["half_light_radius"], b["half_light_radius"])
    assert len(a) != len(c) or not np.array_equal(a["x"], c["x"])


# --- photometry and noise --------------------------------------------------------------------


def test_flux_matches_truth(tmp_path, client):
    """Isolated objects on a grid: aperture sums equal the truth fluxes within the noise."""
    scene = make_scene(2048, 2048, seed=4)
    r = scene["r_mag"].value
    pick = np.flatnonzero((r > 19.0) & (r < 24.0))
    stars = pick[scene["kind"][pick] == "star"][:8]
    galaxies = pick[scene["kind"][pick] == "galaxy"][: 36 - len(stars)]
    scene = scene[np.concatenate([galaxies, stars])]
    rng = np.random.default_rng(0)
    gy, gx = np.divmod(np.arange(len(scene)), 6)
    scene["x"] = (48.0 + 80.0 * gx + rng.uniform(-0.5, 0.5, len(scene))) * u.pix
    scene["y"] = (48.0 + 80.0 * gy + rng.uniform(-0.5, 0.5, len(scene))) * u.pix
    res = simulate(
        tmp_path / "grid.zarr", size=512, chunks=192, scene=scene, client=client, progress=False
    )
    m = res.mosaic
    assert_array_equal(res.truth["id"], scene["id"])
    img, var = m.group["image"][:], m.group["variance"][:]
    half = 38
    for b, band in enumerate(m.bands):
        flux = res.truth[f"{band}_flux"].value
        meas, sigma = np.empty(len(scene)), np.empty(len(scene))
        for k, row in enumerate(res.truth):
            cx, cy = round(row["x"].value), round(row["y"].value)
            box = (b, slice(cy - half, cy + half + 1), slice(cx - half, cx + half + 1))
            meas[k], sigma[k] = img[box].sum(), math.sqrt(var[box].sum())
        pull = (meas - flux) / np.hypot(sigma, 3e-3 * flux)
        assert np.all(np.abs(pull) < 5), (band, pull)
        total = np.sqrt(np.sum(sigma**2))
        assert abs(meas.sum() - flux.sum()) < 5 * total + 2e-3 * flux.sum()
    # star centroids at the truth positions (pixel centres at integer coordinates)
    rb = m.band_index("r")
    for row in res.truth[res.truth["kind"] == "star"]:
        cx, cy = round(row["x"].value), round(row["y"].value)
        cut = img[rb, cy - 5 : cy + 6, cx - 5 : cx + 6].astype(float)
        yy, xx = np.mgrid[cy - 5 : cy + 6, cx - 5 : cx + 6]
        w = np.clip(cut, 0, None)
        assert abs((w * xx).sum() / w.sum() - row["x"].value) < 0.1
        assert abs((w * yy).sum() / w.sum() - row["y"].value) < 0.1


def test_noise_equals_sqrt_variance_in_empty_field(tmp_path, client):
    res = simulate(
        tmp_path / "empty.zarr",
        size=256,
        chunks=128,
        density=0.0,
        truth=tmp_path / "empty.parquet",
        client=client,
        progress=False,
    )
    m = res.mosaic
    assert len(res.truth) == 0 and len(read_truth(res.truth_path)) == 0
    sky = m.attrs["simulation"]["sky_sigma"]
    for b, band in enumerate(m.bands):
        img = m.group["image"][b].astype(float)
        var = m.group["variance"][b].astype(float)
        assert_allclose(var, np.float32(sky[band] ** 2))
        z = img / np.sqrt(var)
        assert abs(z.mean()) < 5 / math.sqrt(z.size)
        assert abs(z.std() - 1.0) < 0.015
    assert not m.group["mask"][:].any()
    assert not m.group["truth_segmentation"][:].any()
    # different bands, same seed: independent noise
    assert abs(np.corrcoef(m.group["image"][0].ravel(), m.group["image"][1].ravel())[0, 1]) < 0.02


def test_noise_between_objects(field):
    m = field.mosaic
    seg = m.group["truth_segmentation"][:]
    from scipy.ndimage import binary_dilation

    empty = ~binary_dilation(seg > 0, iterations=4)
    assert empty.mean() > 0.5
    for b in range(len(m.bands)):
        z = m.group["image"][b][empty] / np.sqrt(m.group["variance"][b][empty])
        assert abs(np.std(z) - 1.0) < 0.05
        assert abs(np.mean(z)) < 0.05


def test_variance_includes_source_poisson_noise(field):
    m = field.mosaic
    rb = m.band_index("r")
    star = field.truth[-1]
    cx, cy = round(star["x"].value), round(star["y"].value)
    sky = m.attrs["simulation"]["sky_sigma"]["r"]
    gain = m.attrs["simulation"]["gain"]["r"]
    var = m.group["variance"][rb, cy, cx]
    assert var > sky**2 + 100.0 / gain


# --- population ------------------------------------------------------------------------------


def _expected(area_deg2: float) -> tuple[float, float]:
    k_gal, k_star = 0.33 * math.log(10), 0.1 * math.log(10)
    n_gal = 2.5e4 / k_gal * (math.exp(k_gal * 3) - math.exp(-k_gal * 6)) * area_deg2
    n_star = 5.8e3 / k_star * (math.exp(k_star * 3) - math.exp(-k_star * 6)) * area_deg2
    return n_gal, n_star


def test_number_counts_for_the_area(field):
    kinds = np.asarray(field.truth["kind"])
    n_gal, n_star = _expected(512 * 512 * PIXEL_AREA_DEG2)
    assert_allclose(expected_counts(512 * 512 * PIXEL_AREA_DEG2), (n_gal, n_star))
    assert abs((kinds == "galaxy").sum() - n_gal) < 5 * math.sqrt(n_gal)
    assert abs((kinds == "star").sum() - 1 - n_star) < 5 * math.sqrt(n_star)


def test_population_model():
    scene = make_scene(4096, 4096, bands=("u", "g", "r", "i", "z", "y"), seed=1)
    gal = scene[scene["kind"] == "galaxy"]
    r = gal["r_mag"].value
    n_bright, n_faint = np.sum((r >= 24) & (r < 25)), np.sum((r >= 26) & (r < 27))
    assert_allclose(n_faint / n_bright, 10**0.66, rtol=0.1)
    assert 18.0 <= r.min() and r.max() < 27.0
    star_fraction = np.mean(scene["kind"] == "star")
    assert 0.10 < star_fraction < 0.15
    e = np.hypot(gal["e1"], gal["e2"])
    assert e.max() < 0.7 and 0.2 < np.std(gal["e1"]) < 0.35
    bf = gal["bulge_fraction"]
    assert bf.min() == 0.0 and bf.max() <= 1.0 and 0.2 < bf.mean() < 0.35
    hlr = gal["half_light_radius"].to_value(u.arcsec)
    assert np.median(hlr[(r > 23.5) & (r < 24.5)]) == pytest.approx(0.35, rel=0.15)
    assert np.median(hlr[r < 21]) > 2 * np.median(hlr[r > 26])
    frac = enclosed_fraction(
        hlr, gal["disk_hlr"].value, gal["bulge_hlr"].value, np.asarray(bf, float)
    )
    assert_allclose(frac, 0.5, atol=1e-6)
    gr = (gal["g_mag"] - gal["r_mag"]).value
    assert np.corrcoef(gr, bf)[0, 1] > 0.3  # bulges are red
    for band in ("u", "g", "r", "i", "z", "y"):
        assert_allclose(
            scene[f"{band}_flux"].value, 10 ** (-0.4 * (scene[f"{band}_mag"].value - 28.0))
        )
    stars = scene[scene["kind"] == "star"]
    assert np.all(stars["half_light_radius"] == 0) and np.all(stars["e1"] == 0)


def test_density_scales_counts():
    n1 = len(make_scene(1024, 1024, seed=2))
    n2 = len(make_scene(1024, 1024, seed=2, density=2.0))
    assert n2 / n1 == pytest.approx(2.0, rel=0.15)


# --- metadata, WCS and truth -----------------------------------------------------------------


def test_mosaic_metadata_and_wcs(field):
    m = field.mosaic
    assert m.bands == ("g", "r", "i") and m.shape == (3, 512, 512)
    assert m.chunks == (1, 256, 256)
    assert m.pixel_scale == pytest.approx(0.2)
    assert m.zero_points == {"g": 28.0, "r": 28.0, "i": 28.0}
    assert m.units["image"] == "count"
    assert m.psf_fwhm["r"] == pytest.approx(0.7)
    assert m.psf_fwhm["g"] > m.psf_fwhm["r"] > m.psf_fwhm["i"]
    assert set(m.attrs["saturation"]) == {"g", "r", "i"}
    ra, dec = m.pixel_to_sky(255.5, 255.5)
    assert_allclose([ra, dec], [150.1, 2.2], atol=1e-9)
    t = field.truth
    ra, dec = m.pixel_to_sky(t["x"].value, t["y"].value)
    assert_allclose(t["ra"].to_value(u.deg), ra, rtol=0, atol=1e-10)
    assert_allclose(t["dec"].to_value(u.deg), dec, rtol=0, atol=1e-10)
    # east is left: ra decreases with x
    assert m.pixel_to_sky(0, 0)[0] > m.pixel_to_sky(511, 0)[0]
    corners = ([0, 511, 0, 511], [0, 0, 511, 511])
    assert_allclose(m.wcs.all_pix2world(*corners, 0), make_wcs(512, 512).all_pix2world(*corners, 0))


def test_truth_table_round_trip(field):
    t = read_truth(field.truth_path)
    expected = ["id", "x", "y", "ra", "dec", "kind"]
    for band in ("g", "r", "i"):
        expected += [f"{band}_flux", f"{band}_mag"]
    expected += ["half_light_radius", "bulge_fraction", "e1", "e2"]
    assert all(c in t.colnames for c in expected)
    assert t["id"].dtype == np.int64 and t["id"].min() >= 1
    assert len(np.unique(t["id"])) == len(t)
    assert t["x"].unit == u.pix and t["ra"].unit == u.deg and t["r_flux"].unit == u.ct
    assert t["r_mag"].unit == u.mag and t["half_light_radius"].unit == u.arcsec
    assert set(t["kind"]) == {"galaxy", "star"}
    assert "pixel centres" in t["x"].info.description
    assert t.meta["seed"] == 11 and t.meta["bands"] == ["g", "r", "i"]
    for name in t.colnames:
        assert_array_equal(np.asarray(t[name]), np.asarray(field.truth[name]), err_msg=name)
    x, y = t["x"].value, t["y"].value
    assert x.min() >= -0.5 and x.max() < 511.5 and y.min() >= -0.5 and y.max() < 511.5
    assert np.any(x != np.round(x))


def test_bright_star_saturates(field):
    m = field.mosaic
    star = field.truth[-1]
    assert star["kind"] == "star" and 14.0 <= star["r_mag"].value <= 16.0
    rb = m.band_index("r")
    cx, cy = round(star["x"].value), round(star["y"].value)
    y0, x0 = max(cy - 10, 0), max(cx - 10, 0)
    mask = m.group["mask"][rb, y0 : cy + 11, x0 : cx + 11]
    img = m.group["image"][rb, y0 : cy + 11, x0 : cx + 11]
    sat = (mask & MaskBit.SAT) > 0
    assert sat.sum() >= 1
    assert_array_equal(img[sat], np.float32(m.attrs["saturation"]["r"]))
    assert img.max() == np.float32(m.attrs["saturation"]["r"])
    # nothing else saturates
    all_sat = (m.group["mask"][rb] & MaskBit.SAT) > 0
    yy, xx = np.nonzero(all_sat)
    assert np.all(np.hypot(yy - cy, xx - cx) < 15)


def test_truth_segmentation(field):
    m = field.mosaic
    seg = m.group["truth_segmentation"][:]
    assert seg.dtype == np.int64
    ids = np.unique(seg[seg > 0])
    assert np.isin(ids, field.truth["id"]).all()
    assert 0.02 < np.mean(seg > 0) < 0.5
    t = field.truth
    bright = t[(t["r_mag"].value < 22.5)]
    own = [seg[round(row["y"].value), round(row["x"].value)] == row["id"] for row in bright]
    assert np.mean(own) > 0.9
    star = t[-1]
    assert seg[round(star["y"].value), round(star["x"].value)] == star["id"]
    # faint objects can fall below the 1σ threshold: they have no footprint
    assert len(ids) < len(t)


def test_masks(masked_pair):
    one, _ = masked_pair
    m = one.mosaic
    img, var, mask = (m.group[p][:] for p in ("image", "variance", "mask"))
    no_data = (mask & MaskBit.NO_DATA) > 0
    assert no_data.any(axis=(1, 2)).all()
    assert_array_equal(no_data[0], no_data[1])
    assert np.all(img[no_data] == 0) and np.all(np.isinf(var[no_data]))
    assert np.all(mask[no_data] == MaskBit.NO_DATA)
    assert np.all(np.isfinite(var[~no_data]))
    bad = (mask & MaskBit.BAD) > 0
    assert bad.any(axis=(1, 2)).all()  # bad columns in every band
    assert 0 < no_data[0].mean() < 0.05
    assert m.attrs["simulation"]["masks"] is True


def test_moffat_psf_option(tmp_path, client):
    res = simulate(
        tmp_path / "moffat.zarr", size=128, psf="moffat", psf_fwhm=0.9, bands="r",
        bright_stars=1, truth_segmentation=False, client=client, progress=False,
    )  # fmt: skip
    m = res.mosaic
    assert m.bands == ("r",) and not m.has_truth_segmentation
    assert m.attrs["simulation"]["psf"] == "moffat"
    assert m.attrs["simulation"]["moffat_beta"] == 3.5
    assert m.psf_fwhm["r"] == pytest.approx(0.9)
    assert np.isfinite(m.group["image"][:]).all()
    # overwrite replaces the store
    again = simulate(
        tmp_path / "moffat.zarr", size=64, bands="r", overwrite=True, client=client, progress=False
    )
    assert again.mosaic.shape == (1, 64, 64)


# --- argument errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"size": 0}, ValueError, "size must be a positive integer"),
        ({"size": -5}, ValueError, "size must be a positive integer"),
        ({"size": (64, 0)}, ValueError, r"got \(64, 0\)"),
        ({"size": 1.5}, ValueError, "size must be"),
        ({"bands": ("g", "q")}, ValueError, "unknown band 'q'"),
        ({"bands": "g,x"}, ValueError, "unknown band 'x'"),
        ({"bands": ("r", "r")}, ValueError, "unique"),
        ({"bands": ()}, ValueError, "at least one band"),
        ({"depth": float("nan")}, ValueError, "depth must be a finite"),
        ({"depth": float("inf")}, ValueError, "depth must be a finite"),
        ({"depth": {"g": 26.0}}, ValueError, r"no value for band\(s\)"),
        ({"seed": -1}, ValueError, "seed must be a non-negative integer"),
        ({"psf": "gaussian"}, ValueError, "psf must be one of kolmogorov, moffat"),
        ({"psf_fwhm": 0.0}, ValueError, "psf_fwhm must be a finite positive"),
        ({"pixel_scale": -0.2}, ValueError, "pixel_scale must be"),
        ({"bright_stars": -2}, ValueError, "bright_stars must be"),
        ({"density": -1.0}, ValueError, "density must be"),
        ({"max_mag": 17.0}, ValueError, "max_mag must be"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        simulate(tmp_path / "bad.zarr", progress=False, **{"size": 64, **kwargs})
    assert not (tmp_path / "bad.zarr").exists()


def test_existing_path_needs_overwrite(tmp_path):
    (tmp_path / "taken.zarr").mkdir()
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        simulate(tmp_path / "taken.zarr", size=64, progress=False)
    (tmp_path / "truth.parquet").write_bytes(b"")
    with pytest.raises(FileExistsError, match=r"truth\.parquet already exists"):
        simulate(tmp_path / "new.zarr", size=64, truth=tmp_path / "truth.parquet")


def test_bad_scene(tmp_path):
    scene = make_scene(64, 64, seed=0)
    scene.remove_column("e1")
    with pytest.raises(ValueError, match=r"scene lacks column\(s\) \['e1'\]"):
        simulate(tmp_path / "s.zarr", size=64, scene=scene)


def test_read_truth_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="truth table not found"):
        read_truth(tmp_path / "nope.parquet")
