"""Bad input: each case gives a clear error or a flagged result, and nothing else is lost.

(Tile/halo values that cannot work and an output directory holding another run are tested in
``test_engine.py``: ``test_bad_parameters_are_refused``,
``test_output_directory_holding_another_run_is_refused``.)
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from _util import assert_same_catalog, blob_mosaic, blob_pixels
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from survey_engine import MaskBit, open_mosaic, read_catalog, run

SIZE = 256


def _run(mosaic, out, client, **kw):
    kw = {"tile": 64, "halo": 16, **kw}
    return read_catalog(run(mosaic, out, client=client, progress=False, **kw).catalog_path)


def _col(cat, name):
    return np.asarray(getattr(cat[name], "value", cat[name]))


def _peaks_in(cat, y0, y1, x0, x1):
    y, x = _col(cat, "y_peak"), _col(cat, "x_peak")
    return (y >= y0) & (y < y1) & (x >= x0) & (x < x1)


def _far_from(cat, boxes, margin):
    y, x = _col(cat, "y"), _col(cat, "x")
    far = np.ones(len(cat), bool)
    for y0, y1, x0, x1 in boxes:
        far &= ~((y > y0 - margin) & (y < y1 + margin) & (x > x0 - margin) & (x < x1 + margin))
    return far


PATCHES = [(100, 140, 30, 90), (20, 50, 180, 230)]  # y0, y1, x0, x1


def test_nan_and_inf_pixels_are_masked(client, tmp_path):
    img, _ = blob_pixels((SIZE, SIZE), n=80, seed=3)
    clean = _run(
        blob_mosaic(tmp_path / "clean.zarr", (SIZE, SIZE), n=80, seed=3), tmp_path / "c", client
    )
    bad, masked = img.copy(), img.copy()
    mask = np.zeros(img.shape, np.uint16)
    (a0, a1, b0, b1), (c0, c1, d0, d1) = PATCHES
    bad[1, a0:a1, b0:b1] = np.nan
    bad[:, c0:c1, d0:d1] = np.inf
    bad[0, c0:c1, d0 : d0 + 10] = -np.inf
    for b, (y0, y1, x0, x1) in ((1, PATCHES[0]), (0, PATCHES[1]), (1, PATCHES[1])):
        mask[b, y0:y1, x0:x1] = MaskBit.NO_DATA
        masked[b, y0:y1, x0:x1] = 0.0
    with_nan = _run(blob_mosaic(tmp_path / "nan.zarr", image=bad), tmp_path / "n", client)
    with_mask = _run(
        blob_mosaic(tmp_path / "mask.zarr", image=masked, mask=mask), tmp_path / "m", client
    )
    # Non-finite pixels are exactly NO_DATA pixels: same catalog, same MASKED flags.
    assert_same_catalog(with_mask, with_nan)
    for name in with_nan.colnames:
        if name.endswith(("flux", "mag", "_err", "x", "y", "ra", "dec")):
            assert not np.any(np.isinf(_col(with_nan, name))), name
    touching = (_col(with_nan, "flags") & 2) != 0
    assert touching.any()
    # Objects well away from the gaps: the same objects, at the same places.
    far_clean = clean[_far_from(clean, PATCHES, 30)]
    far_nan = with_nan[_far_from(with_nan, PATCHES, 30)]
    assert len(far_clean) > 30
    np.testing.assert_array_equal(_col(far_clean, "id"), _col(far_nan, "id"))
    np.testing.assert_allclose(_col(far_clean, "x"), _col(far_nan, "x"), atol=0.1)
    # Fluxes move by far less than their errors (the sky mesh and Kron radii see the gaps).
    dflux = np.abs(_col(far_clean, "r_flux") - _col(far_nan, "r_flux"))
    assert np.all(dflux < _col(far_clean, "r_flux_err")), dflux / _col(far_clean, "r_flux_err")
    assert np.median(dflux / _col(far_clean, "r_flux")) < 0.005


def test_zero_or_negative_variance_is_no_data(client, tmp_path):
    img, var = blob_pixels((SIZE, SIZE), n=80, seed=4)
    bad_var = var.copy()
    mask = np.zeros(img.shape, np.uint16)
    (a0, a1, b0, b1), (c0, c1, d0, d1) = PATCHES
    bad_var[:, a0:a1, b0:b1] = 0.0
    bad_var[1, c0:c1, d0:d1] = -1.0
    mask[:, a0:a1, b0:b1] = MaskBit.NO_DATA
    mask[1, c0:c1, d0:d1] = MaskBit.NO_DATA
    a = _run(blob_mosaic(tmp_path / "v.zarr", image=img, variance=bad_var), tmp_path / "v", client)
    b = _run(blob_mosaic(tmp_path / "m.zarr", image=img, mask=mask), tmp_path / "m", client)
    assert_same_catalog(b, a)
    assert np.all(np.isfinite(_col(a, "r_flux_err")))
    assert len(a) > 40


def test_all_blank_and_all_masked_tiles(client, tmp_path):
    img, _ = blob_pixels((SIZE, SIZE), n=80, seed=5)
    mask = np.zeros(img.shape, np.uint16)
    blank = (48, 144, 48, 144)  # tile r1c1 with its whole halo: nothing there
    bad = (128, 192, 160, 256)  # tile r2c3's core (and part of r2c2's): every pixel BAD
    mask[:, blank[0] : blank[1], blank[2] : blank[3]] = MaskBit.NO_DATA
    mask[:, bad[0] : bad[1], bad[2] : bad[3]] = MaskBit.BAD
    img[:, blank[0] : blank[1], blank[2] : blank[3]] = 0.0
    cat = _run(blob_mosaic(tmp_path / "b.zarr", image=img, mask=mask), tmp_path / "o", client)
    assert len(cat) > 30
    assert not _peaks_in(cat, *blank).any()
    assert not _peaks_in(cat, *bad).any()
    # The same with a grid that does not line up with the blank regions.
    other = _run(tmp_path / "b.zarr", tmp_path / "o2", client, tile=100, halo=24, origin=17)
    assert_same_catalog(cat, other)


def test_all_blank_mosaic_gives_an_empty_catalog(client, tmp_path):
    m = blob_mosaic(
        tmp_path / "e.zarr", (128, 128), image=np.zeros((2, 128, 128), np.float32),
        mask=np.full((2, 128, 128), MaskBit.NO_DATA, np.uint16),
    )  # fmt: skip
    res = run(m, tmp_path / "o", tile=64, halo=16, client=client, progress=False)
    assert res.n_objects == 0
    assert len(read_catalog(res.catalog_path)) == 0
    seg = zarr.open_group(str(res.segmentation_path), mode="r")["segmentation"][:]
    assert not seg.any()


def test_mosaic_smaller_than_one_tile(client, tmp_path):
    m = blob_mosaic(tmp_path / "s.zarr", (90, 70), n=12, seed=6, chunks=32)
    whole = _run(m, tmp_path / "w", client, tile=2048, halo=128)
    tiled = _run(m, tmp_path / "t", client, tile=32, halo=16)
    assert len(whole) >= 5
    assert_same_catalog(whole, tiled)


def test_missing_wcs_gives_nan_sky_positions(client, tmp_path):
    with_wcs = _run(blob_mosaic(tmp_path / "a.zarr", n=40, seed=8), tmp_path / "a", client)
    no_wcs = _run(blob_mosaic(tmp_path / "b.zarr", n=40, seed=8, wcs=False), tmp_path / "b", client)
    assert len(no_wcs) == len(with_wcs) > 10
    assert np.all(np.isnan(_col(no_wcs, "ra"))) and np.all(np.isnan(_col(no_wcs, "dec")))
    assert np.all(np.isfinite(_col(with_wcs, "ra")))
    for name in ("id", "x", "y", "r_flux", "g_mag", "flags"):
        np.testing.assert_array_equal(_col(no_wcs, name), _col(with_wcs, name))


@pytest.mark.parametrize(
    ("plane", "dtype", "expected"),
    [("image", np.float64, "float32"), ("mask", np.int32, "uint16"), ("variance", np.int16, "float32")],
)  # fmt: skip
def test_wrong_dtype_is_named(tmp_path, plane, dtype, expected):
    path = blob_mosaic(tmp_path / "d.zarr", (64, 64), n=3)
    g = zarr.open_group(path, mode="r+")
    g.create_array(plane, shape=(2, 64, 64), chunks=(1, 64, 64), dtype=dtype, overwrite=True)
    match = rf"array '{plane}' has dtype {np.dtype(dtype)}, expected {expected}"
    with pytest.raises(ValueError, match=match):
        open_mosaic(path)
    with pytest.raises(ValueError, match=match):
        run(path, tmp_path / "out", progress=False)


def test_planes_of_different_shapes_are_refused(tmp_path):
    path = blob_mosaic(tmp_path / "d.zarr", (64, 64), n=3)
    g = zarr.open_group(path, mode="r+")
    g.create_array("mask", shape=(2, 64, 60), chunks=(1, 64, 60), dtype=np.uint16, overwrite=True)
    with pytest.raises(ValueError, match="image, variance and mask shapes differ"):
        open_mosaic(path)


# ---- property: gaps and grids never change the catalog --------------------------------------
TINY = 128
_TINY_IMG, _TINY_VAR = blob_pixels((TINY, TINY), n=25, seed=9)

rects = st.tuples(
    st.integers(0, TINY - 1), st.integers(1, 48), st.integers(0, TINY - 1), st.integers(1, 48),
    st.integers(0, 1), st.sampled_from(["nan", "no_data", "bad", "zero_var"]),
)  # fmt: skip


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    patches=st.lists(rects, min_size=1, max_size=3),
    tile=st.integers(32, 80),
    halo=st.integers(16, 40),
    origin=st.tuples(st.integers(0, 79), st.integers(0, 79)),
)
def test_property_gaps_and_grids_keep_the_catalog(
    client, tmp_path_factory, patches, tile, halo, origin
):
    img, var = _TINY_IMG.copy(), _TINY_VAR.copy()
    mask = np.zeros(img.shape, np.uint16)
    for y0, h, x0, w, band, kind in patches:
        sl = (band, slice(y0, y0 + h), slice(x0, x0 + w))
        if kind == "nan":
            img[sl] = np.nan
        elif kind == "zero_var":
            var[sl] = 0.0
        else:
            mask[sl] |= np.uint16(MaskBit.NO_DATA if kind == "no_data" else MaskBit.BAD)
    d = tmp_path_factory.mktemp("prop")
    m = blob_mosaic(d / "m.zarr", (TINY, TINY), image=img, variance=var, mask=mask, chunks=32)
    whole = _run(m, d / "whole", client, tile=TINY, halo=16)
    tiled = _run(
        m, d / "tiled", client, tile=tile, halo=halo, origin=(origin[0] % tile, origin[1] % tile)
    )
    assert_same_catalog(whole, tiled)
