"""Evaluation against truth: matching, metrics with known answers, JSON, plots, CLI, end to end."""

import json

import astropy.units as u
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.table import QTable
from click.testing import CliRunner
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from survey_engine import run
from survey_engine.cli import main
from survey_engine.evaluate import evaluate, match_positions, robust_stats
from survey_engine.evaluate._metrics import mag_at_fraction, segmentation_iou
from survey_engine.schema import Flag
from survey_engine.simulate import simulate, write_truth

SIZE = 256
SCALE = 0.2
# Close pairs: centre, separation (px) → 0.3", 0.7", 1.5" (one per default separation bin).
PAIRS = [((40.0, 40.0), 1.5), ((120.0, 40.0), 3.5), ((200.0, 40.0), 7.5), ((40.0, 200.0), 3.0)]


def _scene():
    """A truth table: a 6×6 grid of isolated objects and four close pairs."""
    xs, ys, mags = [], [], []
    grid = np.arange(20, 240, 40, dtype=float)
    for k, (gy, gx) in enumerate((gy, gx) for gy in grid for gx in grid):
        xs.append(gx)
        ys.append(gy)
        mags.append(20.0 + 4.0 * k / 35)
    for (cx, cy), sep in PAIRS:
        xs += [cx - sep / 2, cx + sep / 2]
        ys += [cy, cy]
        mags += [22.0, 22.5]
    n = len(xs)
    rng = np.random.default_rng(1)
    t = QTable()
    t["id"] = np.arange(1, n + 1)
    t["x"] = np.array(xs) * u.pix
    t["y"] = np.array(ys) * u.pix
    t["r_mag"] = np.array(mags) * u.mag
    t["e1"] = rng.uniform(-0.3, 0.3, n)
    t["e2"] = rng.uniform(-0.3, 0.3, n)
    t["half_light_radius"] = rng.uniform(0.2, 0.8, n) * u.arcsec
    t.meta["pixel_scale_arcsec"] = SCALE
    return t


def _perfect(truth):
    """A catalog identical to the truth (different ids, BLENDED flag on pair members)."""
    c = QTable()
    c["id"] = np.asarray(truth["id"]) + 1000
    c["x"], c["y"] = truth["x"], truth["y"]
    c["r_mag"] = np.asarray(truth["r_mag"].value)
    flags = np.zeros(len(truth), np.int64)
    flags[36:] = int(Flag.BLENDED)
    c["flags"] = flags
    c["e1"], c["e2"] = truth["e1"], truth["e2"]
    c["half_light_radius"] = truth["half_light_radius"].to_value(u.arcsec) / SCALE * u.pix
    c.meta["reference_band"] = "r"
    return c


def _segmap(x, y, ids, r=2.5):
    """Nearest-object footprints within ``r`` px."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    seg = np.zeros((SIZE, SIZE), np.int64)
    best = np.full((SIZE, SIZE), np.inf)
    for xi, yi, i in zip(x, y, ids, strict=True):
        d = np.hypot(xx - xi, yy - yi)
        take = (d <= r) & (d < best)
        seg[take], best[take] = i, d[take]
    return seg


@pytest.fixture
def truth():
    return _scene()


def _bin(summary, sep_arcsec):
    for b in summary["pairs"]["bins"]:
        if b["lo"] <= sep_arcsec < b["hi"]:
            return b
    raise AssertionError(sep_arcsec)


# -- matching --------------------------------------------------------------------------------
def test_match_identical_and_empty():
    x = np.array([1.0, 5.0, 9.0])
    i, j, d = match_positions(x, x, x, x, 0.5)
    np.testing.assert_array_equal(i, [0, 1, 2])
    np.testing.assert_array_equal(j, [0, 1, 2])
    np.testing.assert_array_equal(d, 0.0)
    i, j, d = match_positions([], [], x, x, 0.5)
    assert len(i) == len(j) == len(d) == 0
    i, j, _ = match_positions([np.nan, 5.0], [0.0, 5.0], x, x, 0.5)
    np.testing.assert_array_equal(i, [1])


def test_optimal_beats_greedy_on_a_conflict():
    # C0 is closest to T0, but C1 can only reach T0: greedy matches one pair, optimal two.
    tx, cx = np.array([0.0, 1.2]), np.array([0.3, -0.6])
    z = np.zeros(2)
    i, j, _ = match_positions(cx, z, tx, z, 1.0, method="greedy")
    assert list(zip(i, j, strict=True)) == [(0, 0)]
    i, j, d = match_positions(cx, z, tx, z, 1.0, method="optimal")
    assert list(zip(i, j, strict=True)) == [(1, 0), (0, 1)]
    np.testing.assert_allclose(d, [0.6, 0.9])


def test_optimal_matches_a_dense_assignment():
    rng = np.random.default_rng(3)
    for _ in range(20):
        p1 = rng.uniform(0, 10, (30, 2))
        p2 = rng.uniform(0, 10, (25, 2))
        r = 1.2
        i, j, d = match_positions(p1[:, 0], p1[:, 1], p2[:, 0], p2[:, 1], r)
        assert len(np.unique(i)) == len(i) and len(np.unique(j)) == len(j)
        assert np.all(d <= r)
        dist = cdist(p1, p2)
        cost = np.where(dist <= r, dist, 1e6)
        rr, cc = linear_sum_assignment(cost)
        ok = dist[rr, cc] <= r
        assert len(i) == ok.sum()
        np.testing.assert_allclose(d.sum(), dist[rr, cc][ok].sum())


def test_match_errors():
    z = np.zeros(2)
    with pytest.raises(ValueError, match="radius must be a positive finite number"):
        match_positions(z, z, z, z, 0.0)
    with pytest.raises(ValueError, match="method must be one of optimal, greedy"):
        match_positions(z, z, z, z, 1.0, method="hungarian")
    with pytest.raises(ValueError, match="x and y of the second set differ"):
        match_positions(z, z, z, z[:1], 1.0)


# -- metrics with known answers --------------------------------------------------------------
def test_perfect_catalog_scores_one(truth):
    cat = _perfect(truth)
    seg = _segmap(truth["x"].value, truth["y"].value, cat["id"])
    tseg = _segmap(truth["x"].value, truth["y"].value, truth["id"])
    res = evaluate(cat, truth, segmentation=seg, truth_segmentation=tseg)
    s = res.summary
    assert s["band"] == "r"
    assert s["n_matched"] == s["n_truth"] == s["n_catalog"] == 44
    for key in ("completeness", "completeness_bright", "purity"):
        assert s[key] == 1.0
    assert s["pairs"]["n"] == 4 and s["pairs"]["fraction"] == 1.0
    assert [b["n"] for b in s["pairs"]["bins"]] == [1, 2, 1]
    assert all(b["fraction"] == 1.0 for b in s["pairs"]["bins"])
    for k in ("all", "isolated", "blended", "flag_blended", "flag_isolated"):
        assert s["dmag"][k]["median"] == 0.0 and s["dmag"][k]["scatter"] == 0.0
    assert s["dmag"]["blended"]["n"] == 8 and s["dmag"]["flag_blended"]["n"] == 8
    assert s["position"]["dx"]["scatter"] == 0.0 and s["position"]["dist_median"] == 0.0
    for k in ("e1", "e2", "half_light_radius_arcsec"):
        assert abs(s["shape"][k]["median"]) < 1e-12 and s["shape"][k]["scatter"] < 1e-12
    assert s["segmentation_iou"]["median"] == 1.0 and s["segmentation_iou"]["mean"] == 1.0
    np.testing.assert_array_equal(res.matches["cat_id"], np.asarray(res.matches["truth_id"]) + 1000)
    assert res.truth["matched"].all() and res.catalog["matched"].all()
    assert res.truth["blended"].sum() == 8
    rows = [r for r in s["magnitude_bins"] if r["n_truth"]]
    assert sum(r["n_truth"] for r in rows) == 44
    assert all(r["completeness"] == 1.0 and r["purity"] == 1.0 for r in rows)


def test_dropping_a_pair_member_lowers_pair_recovery_exactly(truth):
    cat = _perfect(truth)
    # Drop one member of the 0.7" pair (its bin holds two pairs: 0.7" and 0.6").
    drop = 36 + 2
    res = evaluate(cat[np.arange(len(cat)) != drop], truth)
    s = res.summary
    assert s["n_matched"] == 43
    assert s["completeness"] == pytest.approx(43 / 44)
    assert s["purity"] == 1.0
    b = _bin(s, 0.7)
    assert (b["n"], b["both"], b["one"], b["none"]) == (2, 1, 1, 0)
    assert b["fraction"] == 0.5
    assert _bin(s, 0.3)["fraction"] == 1.0 and _bin(s, 1.5)["fraction"] == 1.0
    assert s["pairs"]["fraction"] == 0.75
    assert not res.truth["matched"][drop]
    assert s["completeness_bright_blended"] == pytest.approx(7 / 8)


def test_shifted_catalog_fails_matching(truth):
    cat = _perfect(truth)
    cat["y"] = cat["y"] + 6 * u.pix  # 1.2" > 1" radius (pairs are along x)
    s = evaluate(cat, truth).summary
    assert s["n_matched"] == 0 and s["completeness"] == 0.0 and s["purity"] == 0.0
    assert s["pairs"]["fraction"] == 0.0
    # A shift inside the radius matches everything, and shows up in the position residuals.
    cat["y"] = truth["y"]
    cat["x"] = cat["x"] + 0.5 * u.pix
    s = evaluate(cat, truth).summary
    assert s["n_matched"] == 44
    assert s["position"]["dx"]["median"] == pytest.approx(0.5)
    assert s["position"]["dy"]["median"] == 0.0
    # The same radius in pixels: 1" = 5 px at 0.2"/px; 0.4 px is too small.
    assert evaluate(cat, truth, radius=5 * u.pix).summary["n_matched"] == 44
    assert evaluate(cat, truth, radius=0.4 * u.pix).summary["n_matched"] == 0
    assert evaluate(cat, truth, radius=0.08 * u.arcsec).summary["n_matched"] == 0


def test_flux_residuals_isolated_vs_blended(truth):
    cat = _perfect(truth)
    mag = np.asarray(cat["r_mag"], float)
    mag[36:] += 0.2  # blended objects measured too faint
    mag[:36] += np.where(np.arange(36) % 2 == 0, 0.05, -0.05)
    cat["r_mag"] = mag
    s = evaluate(cat, truth).summary
    assert s["dmag"]["blended"]["median"] == pytest.approx(0.2)
    assert s["dmag"]["blended"]["scatter"] == pytest.approx(0.0, abs=1e-12)
    assert s["dmag"]["isolated"]["median"] == pytest.approx(0.0, abs=1e-12)
    assert s["dmag"]["isolated"]["scatter"] == pytest.approx(1.4826 * 0.05)
    assert s["dmag"]["flag_blended"]["median"] == pytest.approx(0.2)


def test_magnitude_bins_and_limit(truth):
    cat = _perfect(truth)
    faint = np.asarray(truth["r_mag"].value) >= 23.0
    res = evaluate(cat[~faint], truth, mag_bins=[18, 21, 23, 25], mag_limit=23.0)
    rows = res.summary["magnitude_bins"]
    assert [r["completeness"] for r in rows] == [1.0, 1.0, 0.0]
    assert res.summary["completeness_bright"] == 1.0
    # linear between the bin centres (22, 1.0) and (24, 0.0)
    assert res.summary["mag_complete_90"] == pytest.approx(22.2)
    assert res.summary["mag_complete_50"] == pytest.approx(23.0)
    assert rows[2]["n_detected"] == 0 and np.isnan(rows[2]["purity"])


def test_segmentation_iou_known_answer():
    seg = np.zeros((10, 10), np.int64)
    tseg = np.zeros((10, 10), np.int64)
    tseg[2:6, 2:6] = 7  # 16 px
    seg[3:7, 2:6] = 70  # shifted by one row: intersection 12, union 20
    tseg[8:10, 8:10] = 8
    cat_ids, truth_ids = np.array([70, 71, 72]), np.array([8, 7, 9])
    iou = segmentation_iou(seg, tseg, cat_ids, truth_ids, [0, 1, 2], [1, 0, 2], strip=3)
    np.testing.assert_allclose(iou[:2], [12 / 20, 0.0])  # 71 has no pixel: 0 / 4
    assert np.isnan(iou[2])  # neither 72 nor 9 has a pixel
    with pytest.raises(ValueError, match="segmentation shape"):
        segmentation_iou(seg, tseg[:5], np.array([70]), np.array([7]), [0], [0])


def test_small_helpers():
    s = robust_stats(np.array([1.0, 2.0, 3.0, np.nan, 100.0]))
    assert s["n"] == 4 and s["median"] == 2.5 and s["scatter"] == pytest.approx(1.4826 * 1.0)
    assert robust_stats(np.array([np.nan]))["n"] == 0
    bins = [{"lo": m, "hi": m + 1, "n": 10, "fraction": f} for m, f in ((20, 1.0), (21, 0.8))]
    assert mag_at_fraction(bins, 0.9) == pytest.approx(21.0)
    assert np.isnan(mag_at_fraction(bins, 0.5))


def test_evaluate_errors(truth, tmp_path):
    cat = _perfect(truth)
    with pytest.raises(ValueError, match="radius must be one positive length"):
        evaluate(cat, truth, radius=-1.0)
    with pytest.raises(ValueError, match="radius must be in pixels or an angle unit"):
        evaluate(cat, truth, radius=1.0 * u.kg)
    with pytest.raises(ValueError, match="method must be one of"):
        evaluate(cat, truth, method="closest")
    with pytest.raises(ValueError, match="band 'z' has no magnitude column"):
        evaluate(cat, truth, band="z")
    with pytest.raises(ValueError, match="pair_bins must be strictly increasing"):
        evaluate(cat, truth, pair_bins=[0, 1, 1])
    with pytest.raises(ValueError, match="catalog has no x column"):
        evaluate(cat[["id", "y", "r_mag"]], truth)
    with pytest.raises(TypeError, match="catalog must be a path or an astropy Table"):
        evaluate({"x": [1]}, truth)
    with pytest.raises(FileNotFoundError, match="catalog not found"):
        evaluate(tmp_path / "nope.parquet", truth)
    with pytest.raises(TypeError, match="segmentation must be a path or a 2-D array"):
        evaluate(cat, truth, segmentation=np.zeros(3), truth_segmentation=np.zeros((2, 2)))


def test_truth_with_a_plain_mag_column(truth, tmp_path):
    cat = _perfect(truth)
    keep = np.arange(len(cat)) != 36  # one pair member missed
    cat = cat[keep]
    plain = truth.copy()
    plain.rename_column("r_mag", "mag")
    ref = json.loads(evaluate(cat, truth).to_json())  # NaN → null, so that == compares
    seg = _segmap(cat["x"].value, cat["y"].value, cat["id"])
    tseg = _segmap(truth["x"].value, truth["y"].value, truth["id"])
    for band in (None, "r"):  # the catalog's only band, or named
        res = evaluate(cat, plain, band=band, segmentation=seg, truth_segmentation=tseg)
        s = json.loads(res.to_json())
        assert s["band"] == "r" and s["truth_mag_column"] == "mag"
        assert s["catalog_mag_column"] == "r_mag"
        assert s["n_matched"] == ref["n_matched"] == 43
        assert s["magnitude_bins"] == ref["magnitude_bins"]
        assert s["pairs"] == ref["pairs"]
        assert len(res.plot(tmp_path / f"plots_{band}")) == 4  # the gallery reads "mag" too
    two_bands = cat.copy()
    two_bands["g_mag"] = two_bands["r_mag"] + 0.5
    with pytest.raises(
        ValueError,
        match=r"the truth has a plain 'mag' column but the catalog has bands r, g: say which band "
        r"it is with band= \(--band\)",
    ):
        evaluate(two_bands, plain)
    s = evaluate(two_bands, plain, band="g").summary
    assert s["catalog_mag_column"] == "g_mag"
    assert s["dmag"]["all"]["median"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"the truth has no <band>_mag or mag column"):
        evaluate(cat, plain[["id", "x", "y"]])

    # the command line: --band, or a single-band catalog
    cat_path, truth_path = tmp_path / "catalog.parquet", tmp_path / "truth.parquet"
    _write_catalog(cat, cat_path)
    write_truth(plain, truth_path)
    for extra in ([], ["--band", "r"]):
        r = CliRunner().invoke(
            main, ["evaluate", str(cat_path), str(truth_path), "--json", str(tmp_path / "e.json"), *extra]
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / "e.json").read_text())["n_matched"] == 43
    _write_catalog(two_bands, cat_path)
    r = CliRunner().invoke(main, ["evaluate", str(cat_path), str(truth_path)])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        "error: the truth has a plain 'mag' column but the catalog has bands r, g: say which "
        "band it is with band= (--band)"
    ]


def test_files_that_are_not_parquet_are_named(truth, tmp_path):
    from survey_engine.simulate import read_truth

    csv = tmp_path / "truth.csv"
    csv.write_text("x,y,mag\n1,2,20\n")
    with pytest.raises(
        ValueError, match=r"truth table .*truth\.csv is not a readable Parquet file"
    ):
        read_truth(csv)
    with pytest.raises(
        ValueError, match=r"truth table .*truth\.csv is not a readable Parquet file"
    ):
        evaluate(_perfect(truth), csv)
    with pytest.raises(ValueError, match=r"catalog .*truth\.csv is not a readable Parquet file"):
        evaluate(csv, truth)
    cat_path, truth_path = tmp_path / "catalog.parquet", tmp_path / "truth.parquet"
    _write_catalog(_perfect(truth), cat_path)
    write_truth(truth, truth_path)
    for args, where in (([cat_path, csv], "truth table"), ([csv, truth_path], "catalog")):
        r = CliRunner().invoke(main, ["evaluate", *map(str, args)])
        assert r.exit_code == 1 and "Traceback" not in r.output
        (line,) = r.output.strip().splitlines()
        assert line.startswith(
            f"error: {where} {csv} is not a readable Parquet file (ArrowInvalid: "
        )


def test_demo_summary_uses_the_evaluate_matching(tmp_path):
    """The demo's completeness is evaluate()'s: one to one within 1″, not nearest within 2 px."""
    from survey_engine.cli import compare_with_truth

    t = QTable()
    t["id"] = [1, 2, 3]
    t["x"] = [20.0, 60.0, 61.0] * u.pix  # objects 2 and 3: 1 px apart
    t["y"] = [20.0, 60.0, 60.0] * u.pix
    t["r_mag"] = [21.0, 23.0, 23.2] * u.mag
    t["r_flux"] = [1000.0, 200.0, 150.0]
    t.meta["pixel_scale_arcsec"] = SCALE
    c = QTable()
    c["id"] = [10, 20]
    c["x"] = [23.0, 60.5] * u.pix  # 3 px = 0.6″ from object 1; between objects 2 and 3
    c["y"] = [20.0, 60.0] * u.pix
    c["r_mag"] = [21.0, 23.0]
    c["r_flux"] = [990.0, 210.0]
    c.meta["reference_band"] = "r"
    cat_path, truth_path = tmp_path / "catalog.parquet", tmp_path / "truth.parquet"
    _write_catalog(c, cat_path)
    write_truth(t, truth_path)
    text = compare_with_truth(cat_path, truth_path)
    ev = evaluate(cat_path, truth_path)
    assert ev.summary["n_matched"] == 2
    assert text.splitlines() == [
        "truth objects 3, detected 2, matched 2 (within 1″ = 5.0 px; purity 100.0%)",
        "  r 18-22: completeness 100.0% of 1",  # nearest-within-2-px: 0 %
        "  r 22-24: completeness  50.0% of 2",  # nearest-within-2-px: 100 % (one detection twice)
        "  total/true flux (r < 23): median 0.990 over 1 objects",
    ]


# -- outputs ---------------------------------------------------------------------------------
def test_json_table_and_plots(truth, tmp_path):
    cat = _perfect(truth)
    keep = np.arange(len(cat)) != 36  # miss one member of the 0.3" pair
    cat = cat[keep]
    seg = _segmap(cat["x"].value, cat["y"].value, cat["id"])
    tseg = _segmap(truth["x"].value, truth["y"].value, truth["id"])
    res = evaluate(cat, truth, segmentation=seg, truth_segmentation=tseg)
    text = res.to_json(tmp_path / "eval.json")
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data == json.loads(text)
    assert data["n_matched"] == 43 and data["pairs"]["bins"][0]["fraction"] == 0.0
    assert data["magnitude_bins"][0]["completeness"] is None  # empty bin: NaN → null
    table = res.table()
    assert "close truth pairs" in table and "segmentation IoU" in table
    assert str(res) == table
    paths = res.plot(tmp_path / "plots")
    names = sorted(p.name for p in paths)
    assert names == ["completeness.png", "dmag.png", "missed_blends.png", "pairs.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    # Without a segmentation or a mosaic there is nothing to show in the gallery.
    assert len(evaluate(cat, truth).plot(tmp_path / "p2")) == 3


def _write_catalog(table, path):
    cols = {}
    for name in table.colnames:
        col = table[name]
        cols[name] = np.asarray(getattr(col, "value", col))
    pq.write_table(pa.table(cols), path)


def test_cli_evaluate(truth, tmp_path):
    cat_path, truth_path = tmp_path / "catalog.parquet", tmp_path / "truth.parquet"
    _write_catalog(_perfect(truth)[:-1], cat_path)
    write_truth(truth, truth_path)
    runner = CliRunner()
    out = tmp_path / "eval.json"
    r = runner.invoke(
        main,
        ["evaluate", str(cat_path), str(truth_path), "--json", str(out), "--plots",
         str(tmp_path / "plots"), "--method", "greedy"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "matched" in r.output and "close truth pairs" in r.output
    assert json.loads(out.read_text())["n_matched"] == 43
    assert (tmp_path / "plots" / "pairs.png").exists()
    r = runner.invoke(
        main, ["evaluate", str(cat_path), str(truth_path), "--radius", "5", "--pixels"]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["evaluate", str(tmp_path / "none.parquet"), str(truth_path)])
    assert r.exit_code == 1 and "catalog not found" in r.output


# -- end to end on a simulated mosaic --------------------------------------------------------


def test_end_to_end_on_a_simulation(client, tmp_path):
    mosaic = tmp_path / "m.zarr"
    sim = simulate(
        str(mosaic), size=384, bands=("r",), seed=23, chunks=192, truth=str(tmp_path / "t.parquet"),
        client=client, progress=False,
    )  # fmt: skip
    res = run(str(mosaic), tmp_path / "run", tile=192, halo=48, client=client, progress=False)
    ev = evaluate(
        res.catalog_path, sim.truth_path, mosaic=str(mosaic), segmentation=res.segmentation_path
    )
    s = ev.summary
    assert s["band"] == "r" and s["pixel_scale_arcsec"] == 0.2
    assert s["completeness_bright_isolated"] > 0.9
    assert s["purity"] > 0.9
    assert abs(s["dmag"]["isolated"]["median"]) < 0.15
    assert s["position"]["dist_median"] < 0.5
    assert s["segmentation_iou"]["median"] > 0.5
    assert 24.0 < s["mag_complete_90"] < 27.0
    paths = ev.plot(tmp_path / "plots")
    assert len(paths) >= 3
