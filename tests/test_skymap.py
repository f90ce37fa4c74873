"""The sky map: tract lookup, inner regions, rings, JSON, tracts cut from a mosaic, global ids."""

from __future__ import annotations

import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord

from survey_engine import create_mosaic, open_mosaic
from survey_engine.simulate import make_wcs
from survey_engine.skymap import (
    DISAMBIGUATOR_BITS,
    HEALPIX_ORDER,
    SkyMap,
    Tract,
    global_ids,
    tan_wcs,
)
from survey_engine.survey_io import cut_into_tracts, open_survey, tract_bounds


def _brute_force(skymap: SkyMap, ra, dec) -> np.ndarray:
    """Nearest centre (astropy separations) among the tracts whose pixels contain each point."""
    pts = SkyCoord(ra * u.deg, dec * u.deg)
    best = np.full(len(ra), -1)
    best_sep = np.full(len(ra), np.inf)
    for t in skymap:
        x, y = t.wcs.all_world2pix(ra, dec, 0)
        inside = (x >= -0.5) & (x < t.shape[1] - 0.5) & (y >= -0.5) & (y < t.shape[0] - 0.5)
        sep = pts.separation(SkyCoord(t.ra * u.deg, t.dec * u.deg)).deg
        better = inside & (sep < best_sep)
        best[better], best_sep[better] = t.id, sep[better]
    return best


def _wrapped_map() -> SkyMap:
    """Nine overlapping tracts with different tangent points across RA = 0/360."""
    tracts = []
    for k, (ra, dec) in enumerate([(359.2, -0.8), (0.0, -0.8), (0.8, -0.8), (359.2, 0.0),
                                   (0.0, 0.0), (0.8, 0.0), (359.2, 0.8), (0.0, 0.8), (0.8, 0.8)]):  # fmt: skip
        tracts.append(Tract.from_wcs(k, tan_wcs((ra, dec), (120, 130), 36.0), (120, 130)))
    return SkyMap(tracts)


def test_find_tract_is_the_nearest_containing_centre_across_ra_zero():
    sm = _wrapped_map()
    rng = np.random.default_rng(5)
    ra = rng.uniform(-2.0, 2.0, 4000) % 360.0
    dec = rng.uniform(-2.0, 2.0, 4000)
    got = sm.find_tract(ra, dec)
    np.testing.assert_array_equal(got, _brute_force(sm, ra, dec))
    assert (got == -1).any() and len(set(got.tolist()) - {-1}) == 9
    # RA given as negative or > 360 is the same position
    np.testing.assert_array_equal(sm.find_tract(ra - 360.0, dec), got)
    assert sm.find_tract(np.zeros((2, 3)), np.zeros((2, 3))).shape == (2, 3)


def test_inner_regions_partition_the_union_of_the_tracts():
    sm = _wrapped_map()
    rng = np.random.default_rng(6)
    ra, dec = rng.uniform(-2.0, 2.0, 3000) % 360.0, rng.uniform(-2.0, 2.0, 3000)
    inner = np.stack([sm.is_inner(t.id, ra, dec) for t in sm])
    in_any = sm.containing(ra, dec).any(axis=0)
    np.testing.assert_array_equal(inner.sum(axis=0), in_any.astype(int))  # exactly one, or none
    with pytest.raises(KeyError, match="no tract 42"):
        sm.is_inner(42, ra, dec)


def test_grid_inner_boundaries_sit_in_the_middle_of_the_overlaps():
    sm = SkyMap.grid((150.1, 2.2), (2, 2), tract_shape=256, overlap=64)
    assert len({(round(t.ra, 9), round(t.dec, 9)) for t in sm}) == 4  # own tangent points
    sm.check_overlap(31)
    with pytest.raises(ValueError, match=r"tracts 0 and 1 overlap too little.*min_pixels=33"):
        sm.check_overlap(33)
    with pytest.raises(ValueError, match="min_pixels must be a finite positive"):
        sm.check_overlap(0)


def test_rings_cover_the_region_with_the_requested_overlap():
    # across RA = 0 and the equator; 2° tracts with 0.2° overlap, 36"/px to stay small
    sm = SkyMap.rings((355.0, 5.0), (-3.0, 3.0), tract_size_deg=2.0, overlap_deg=0.2,
                      pixel_scale=36.0)  # fmt: skip
    assert sm.meta["n_rings"] == 3 and len(sm) == 15
    sm.check_overlap(0.1 * 3600 / 36.0 * 0.99)  # every owned point ≥ overlap / 2 inside
    rng = np.random.default_rng(7)
    ra, dec = rng.uniform(-5.0, 5.0, 5000) % 360.0, rng.uniform(-3.0, 3.0, 5000)
    owner = sm.find_tract(ra, dec)
    assert (owner >= 0).all()  # the region is covered
    for t in sm:  # the owner is the box holding the point
        np.testing.assert_array_equal(owner == t.id, t.in_box(ra, dec))
    # the tracts reach overlap / 2 = 0.1° beyond their boxes on the sky (checked at box edges)
    for t in sm:
        ra0, w = t.inner["ra"]
        d0, d1 = t.inner["dec"]
        mid_ra, mid_dec = ra0 + w / 2, (d0 + d1) / 2
        cos = np.cos(np.radians(mid_dec))
        probes = [(ra0 - 0.099 / cos, mid_dec), (ra0 + w + 0.099 / cos, mid_dec),
                  (mid_ra, d0 - 0.099), (mid_ra, d1 + 0.099)]  # fmt: skip
        assert t.contains(*np.array(probes).T).all(), t.id
    with pytest.raises(ValueError, match="no polar caps"):
        SkyMap.rings((0, 360), (80, 90), tract_size_deg=2.0, overlap_deg=0.1)


def test_rings_of_a_full_circle_wrap():
    sm = SkyMap.rings((0, 360), (-1.0, 1.0), tract_size_deg=30.0, overlap_deg=1.0,
                      pixel_scale=600.0)  # fmt: skip
    assert len(sm) == 12
    ra = np.linspace(0, 360, 721)[:-1]
    assert (sm.find_tract(ra, np.zeros_like(ra)) >= 0).all()


def test_json_round_trip(tmp_path):
    sm = SkyMap.rings((10.0, 14.0), (-1.0, 1.0), tract_size_deg=2.0, overlap_deg=0.2,
                      pixel_scale=36.0)  # fmt: skip
    path = sm.to_json(tmp_path / "skymap.json")
    back = SkyMap.from_json(tmp_path)  # a directory holding skymap.json
    assert back.ids == sm.ids and back.meta == sm.meta
    for a, b in zip(sm, back, strict=True):
        assert (a.id, a.ra, a.dec, a.shape, a.inner) == (b.id, b.ra, b.dec, b.shape, b.inner)
        assert a.wcs_cards == b.wcs_cards
    rng = np.random.default_rng(8)
    ra, dec = rng.uniform(9, 15, 500), rng.uniform(-1.5, 1.5, 500)
    np.testing.assert_array_equal(sm.find_tract(ra, dec), back.find_tract(ra, dec))
    with pytest.raises(FileNotFoundError, match="sky map not found"):
        SkyMap.from_json(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text('{"tracts": []}')
    with pytest.raises(ValueError, match="not a survey_engine sky map"):
        SkyMap.from_json(tmp_path / "bad.json")
    assert path.endswith("skymap.json")


def _write_mosaic(path, ny=448, nx=448):
    """A one-band mosaic whose pixel value encodes its position (y * nx + x)."""
    m = create_mosaic(path, shape=(ny, nx), bands=["r"], wcs=make_wcs(ny, nx), chunks=128,
                      zero_points=[27.0], truth_segmentation=True)  # fmt: skip
    yy, xx = np.mgrid[0:ny, 0:nx]
    m.write("r", 0, 0, image=(yy * nx + xx).astype(np.float32), variance=np.ones((ny, nx)),
            mask=np.zeros((ny, nx), np.uint16))  # fmt: skip
    m.group["truth_segmentation"][:] = yy * nx + xx
    m.consolidate()
    return open_mosaic(path)


def test_cut_into_tracts_is_pixel_aligned_and_the_inner_regions_tile_the_mosaic(tmp_path):
    src = _write_mosaic(tmp_path / "m.zarr")
    sm = cut_into_tracts(tmp_path / "m.zarr", tmp_path / "survey", 2, 2, 64)
    assert tract_bounds(448, 2, 64) == [(0, 256), (192, 448)]
    assert sm.ids == [0, 1, 2, 3] and all(t.shape == (256, 256) for t in sm)
    for t in sm:
        m = open_mosaic(t.mosaic)
        y0, x0 = m.attrs["tract"]["origin"]
        assert m.attrs["tract"]["id"] == t.id
        img = m.read((0, 256), (0, 256)).image[0]
        np.testing.assert_array_equal(img, src.image[0, y0 : y0 + 256, x0 : x0 + 256])
        np.testing.assert_array_equal(m.group["truth_segmentation"][:], img.astype(np.int64))
        # the same sky pixel: pixel (y, x) of the tract is (y0 + y, x0 + x) of the mosaic
        ra, dec = m.pixel_to_sky(np.array([0.0, 100.0, 255.0]), np.array([0.0, 37.0, 255.0]))
        x, y = src.sky_to_pixel(ra, dec)
        np.testing.assert_allclose(x, x0 + np.array([0.0, 100.0, 255.0]), atol=1e-7)
        np.testing.assert_allclose(y, y0 + np.array([0.0, 37.0, 255.0]), atol=1e-7)
    # every mosaic pixel is owned by exactly one tract: the quadrant, boundaries in the middle
    # of the 64-px overlaps (mosaic pixel 223 | 224)
    lines = np.array([0, 1, 100, 191, 192, 222, 223, 224, 225, 255, 256, 300, 446, 447])
    yy, xx = np.mgrid[0:448, 0:448]
    keep = np.isin(yy, lines) | np.isin(xx, lines)  # whole rows and columns across the overlaps
    yy, xx = yy[keep], xx[keep]
    owner = sm.find_tract(*src.pixel_to_sky(xx, yy))
    np.testing.assert_array_equal(owner, (yy >= 224) * 2 + (xx >= 224))
    sm.check_overlap(32)
    # the survey directory's sky map, read back or derived again from the mosaics
    again = open_survey(tmp_path / "survey")
    assert again.ids == sm.ids and [t.mosaic for t in again] == [t.mosaic for t in sm]
    derived = SkyMap.from_mosaics(tmp_path / "survey")
    assert [(t.id, t.ra, t.dec) for t in derived] == [(t.id, t.ra, t.dec) for t in sm]
    with pytest.raises(ValueError, match="already exists"):
        cut_into_tracts(tmp_path / "m.zarr", tmp_path / "survey", 2, 2, 64)
    with pytest.raises(ValueError, match="do not fit mosaic"):
        cut_into_tracts(tmp_path / "m.zarr", tmp_path / "s2", 16, 16, 64)


def test_from_mosaics_without_tract_attributes_numbers_them_in_path_order(tmp_path):
    for name, center in (("b.zarr", (10.0, 0.0)), ("a.zarr", (10.01, 0.0))):
        create_mosaic(tmp_path / name, shape=(64, 64), bands=["r"],
                      wcs=tan_wcs(center, (64, 64), 1.0))  # fmt: skip
    sm = SkyMap.from_mosaics(tmp_path)
    assert sm.ids == [0, 1]
    assert sm[0].mosaic.endswith("a.zarr") and sm[0].ra == pytest.approx(10.01)


def test_global_ids_unique_deterministic_and_independent_of_order():
    rng = np.random.default_rng(9)
    # 200k peaks of one tract on a 0.2″ grid (distinct pixels), 16 mas jitter-free centres
    n = 200_000
    pix = rng.choice(3000 * 3000, n, replace=False)
    ra, dec = 150 + (pix % 3000) * 0.2 / 3600, 2 + (pix // 3000) * 0.2 / 3600
    ids = global_ids(ra, dec, 3)
    assert ids.dtype == np.int64 and (ids > 0).all() and len(np.unique(ids)) == n
    perm = rng.permutation(n)
    np.testing.assert_array_equal(global_ids(ra[perm], dec[perm], 3), ids[perm])
    # the high bits are the order-26 HEALPix cell (cdshealpix), the low 7 bits the colour
    from astropy.coordinates import Latitude, Longitude
    from cdshealpix.nested import lonlat_to_healpix

    cells = lonlat_to_healpix(Longitude(ra[:10], u.deg), Latitude(dec[:10], u.deg), HEALPIX_ORDER)
    np.testing.assert_array_equal(ids[:10] >> DISAMBIGUATOR_BITS, cells.astype(np.int64))
    assert (ids & 127 == 3).all()


def test_global_ids_of_neighbouring_tracts_never_collide():
    # one position seen by two overlapping tracts: different colours, different ids
    sm = SkyMap.grid((150.1, 2.2), (3, 3), tract_shape=128, overlap=32)
    colours = sm.colours
    assert all(colours[t] != colours[k] for t in sm.ids for k in sm.neighbours(t))
    assert 1 <= min(colours.values()) and max(colours.values()) <= 9
    both = global_ids([45.0, 45.0], [10.0, 10.0], [colours[0], colours[1]])
    assert both[0] >> DISAMBIGUATOR_BITS == both[1] >> DISAMBIGUATOR_BITS and both[0] != both[1]
    # cell 0 (the first HEALPix cell) with the smallest colour is still not 0
    from cdshealpix.nested import healpix_to_lonlat

    lon, lat = healpix_to_lonlat(np.array([0]), HEALPIX_ORDER)
    assert global_ids(lon.deg, lat.deg, 1)[0] == 1
    with pytest.raises(ValueError, match="share an order-26 HEALPix cell"):
        global_ids([45.0, 45.0], [10.0, 10.0], 1)
    with pytest.raises(ValueError, match=r"colours must be 1\.\.127"):
        global_ids([45.0], [10.0], 0)
    with pytest.raises(ValueError, match="equal length"):
        global_ids([1.0], [1.0, 2.0], 1)
    assert global_ids([], [], 1).shape == (0,)


def test_tract_colours_of_a_ring_sky_map():
    sm = SkyMap.rings((0.0, 40.0), (-10.0, 10.0), tract_size_deg=2.0, overlap_deg=0.5,
                      pixel_scale=36.0)  # fmt: skip
    colours = sm.colours
    assert len(colours) == len(sm) > 100
    assert all(colours[t] != colours[k] for t in sm.ids for k in sm.neighbours(t))
    assert max(colours.values()) <= 12


def test_overlap_margins_of_a_partial_ring_map_ignore_sky_outside_the_boxes():
    sm = SkyMap.rings((0.0, 8.0), (-4.0, 0.0), tract_size_deg=2.0, overlap_deg=0.2,
                      pixel_scale=36.0)  # fmt: skip
    need = 0.1 * 3600 / 36.0  # half the overlap, in pixels
    assert SkyMap(sm.tracts[:6]).overlap_margins(0.99 * need) == {}  # a ring and a half
    found = sm.overlap_margins(1.2 * need)
    assert found and min(found.values()) >= 0.99 * need
    assert sm.neighbours(0) == [1, 4, 5] and 0 not in sm.neighbours(0)


def test_peak_ids_use_the_owning_tracts_pixels():
    sm = SkyMap.grid((150.1, 2.2), (1, 2), tract_shape=128, overlap=32)
    tract, yp, xp = np.array([0, 1, 1]), np.array([10, 10, 64]), np.array([100, 4, 64])
    ra = np.array([sm[k].pixel_to_sky(x, y)[0] for k, y, x in zip(tract, yp, xp, strict=True)])
    dec = np.array([sm[k].pixel_to_sky(x, y)[1] for k, y, x in zip(tract, yp, xp, strict=True)])
    colour = np.array([sm.colours[k] for k in tract])
    np.testing.assert_array_equal(sm.peak_ids(tract, yp, xp), global_ids(ra, dec, colour))
