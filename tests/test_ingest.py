"""Tests of FITS ingest into the Zarr mosaic store."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from numpy.testing import assert_allclose, assert_array_equal

from survey_engine.flags import MaskBit
from survey_engine.ingest import IngestWarning, ingest_fits
from survey_engine.mosaic import open_mosaic

NO_DATA, SAT, BAD = int(MaskBit.NO_DATA), int(MaskBit.SAT), int(MaskBit.BAD)


# --- helpers ---------------------------------------------------------------------------------
def tan_header(ny: int = 60, nx: int = 80, **extra) -> fits.Header:
    """A plain TAN header, 0.2 arcsec pixels, slightly rotated."""
    h = fits.Header()
    cards = {
        "CTYPE1": "RA---TAN",
        "CTYPE2": "DEC--TAN",
        "CRPIX1": nx / 2 + 0.5,
        "CRPIX2": ny / 2 - 0.25,
        "CRVAL1": 150.1163213,
        "CRVAL2": 2.2058257,
        "CD1_1": -5.5555555555556e-05,
        "CD1_2": 1.2345678901234e-07,
        "CD2_1": 1.1234567890123e-07,
        "CD2_2": 5.5555555555556e-05,
        "CUNIT1": "deg",
        "CUNIT2": "deg",
        "RADESYS": "ICRS",
        "EQUINOX": 2000.0,
    }
    cards.update(extra)
    for key, value in cards.items():
        h[key] = value
    return h


def sip_header(ny: int = 60, nx: int = 80) -> fits.Header:
    """TAN-SIP with forward and inverse polynomials of order 2/3 (distortion ~ 0.5 px)."""
    h = tan_header(ny, nx, CTYPE1="RA---TAN-SIP", CTYPE2="DEC--TAN-SIP")
    sip = {
        "A_ORDER": 2, "A_0_2": 2.1e-5, "A_1_1": -1.3e-5, "A_2_0": 3.3e-5,
        "B_ORDER": 2, "B_0_2": -1.7e-5, "B_1_1": 2.9e-5, "B_2_0": 1.1e-5,
        "AP_ORDER": 3, "AP_0_2": -2.1e-5, "AP_1_1": 1.3e-5, "AP_2_0": -3.3e-5, "AP_3_0": 1.0e-9,
        "BP_ORDER": 3, "BP_0_2": 1.7e-5, "BP_1_1": -2.9e-5, "BP_2_0": -1.1e-5, "BP_0_3": 2.0e-9,
    }  # fmt: skip
    for key, value in sip.items():
        h[key] = value
    return h


def tpv_header(ny: int = 60, nx: int = 80) -> fits.Header:
    """DECam-like TPV header with quadratic and cubic PV terms."""
    h = tan_header(ny, nx, CTYPE1="RA---TPV", CTYPE2="DEC--TPV")
    pv = {
        "PV1_0": 1.2e-4, "PV1_1": 1.0012, "PV1_2": -3.1e-4, "PV1_4": 2.3e-2, "PV1_5": -1.1e-2,
        "PV1_6": 7.7e-3, "PV1_7": -1.5e-1, "PV1_9": 4.2e-2, "PV1_10": -2.6e-2,
        "PV2_0": -9.8e-5, "PV2_1": 0.9991, "PV2_2": 2.2e-4, "PV2_4": -1.9e-2, "PV2_5": 1.4e-2,
        "PV2_6": -5.5e-3, "PV2_7": 1.2e-1, "PV2_8": -3.3e-2, "PV2_10": 2.1e-2,
    }  # fmt: skip
    for key, value in pv.items():
        h[key] = value
    return h


def write(path, data, header=None):
    fits.writeto(path, data, header=header, overwrite=True)
    return path


def noise_image(shape=(60, 80), sigma=2.0, sky=100.0, seed=0):
    rng = np.random.default_rng(seed)
    return (sky + rng.normal(0.0, sigma, shape)).astype(np.float32)


# --- round trip ------------------------------------------------------------------------------
def test_round_trip_arrays_and_attributes(tmp_path):
    image = noise_image()
    weight = np.full(image.shape, 0.25, np.float32)
    weight[5:8, 10:12] = 4.0
    mask = np.zeros(image.shape, np.int16)
    mask[20, 30] = 7
    header = tan_header(MAGZERO=27.5, BUNIT="adu", FILTER="r DECam SDSS c0002 6300.0 1517.0")
    img = write(tmp_path / "r.fits", image, header)
    wht = write(tmp_path / "r.weight.fits", weight)
    msk = write(tmp_path / "r.mask.fits", mask)
    out = tmp_path / "m.zarr"

    mosaic = ingest_fits(
        [img], out, weights=[wht], masks=[msk], psf_fwhm={"r": 0.9}, chunks=32, progress=False
    )
    reopened = open_mosaic(str(out))
    for m in (mosaic, reopened):
        assert m.bands == ("r",)
        assert m.shape == (1, 60, 80)
        assert m.chunks == (1, 32, 32)
        assert m.zero_points == {"r": 27.5}
        assert m.psf_fwhm == {"r": 0.9}
        assert m.units["image"] == "adu"
        assert_allclose(m.pixel_scale, 0.2, rtol=1e-5)
        assert m.attrs["ingest"]["variance_source"] == {"r": "weight"}
        assert m.attrs["ingest"]["zero_point_source"] == {"r": "header:MAGZERO"}
        assert m.attrs["ingest"]["images"] == {"r": str(img)}
        assert m.attrs["ingest"]["weights"] == {"r": str(wht)}
        assert m.attrs["ingest"]["masks"] == {"r": str(msk)}
        assert m.attrs["saturation"] == {"r": None}
    region = reopened.read((0, 60), (0, 80))
    assert_array_equal(region.image[0], image)
    assert_array_equal(region.variance[0], 1 / weight)
    expected = np.zeros(image.shape, np.uint16)
    expected[20, 30] = BAD
    assert_array_equal(region.mask[0], expected)
    assert reopened.image.dtype == np.float32
    assert reopened.mask.dtype == np.uint16


def test_variance_map_and_progress_bar(tmp_path, capsys):
    image = noise_image()
    variance = np.linspace(1, 2, image.size, dtype=np.float32).reshape(image.shape)
    img = write(tmp_path / "i.fits", image, tan_header())
    var = write(tmp_path / "v.fits", variance)
    mosaic = ingest_fits(img, tmp_path / "m.zarr", variances=[var], chunks=16)
    assert "strip" in capsys.readouterr().err  # tqdm wrote its bar to stderr
    assert mosaic.attrs["ingest"]["variance_source"] == {"b0": "variance"}
    assert_array_equal(mosaic.variance[0], variance)
    assert_array_equal(mosaic.mask[0], 0)


def test_open_zarr_with_xarray(tmp_path):
    xr = pytest.importorskip("xarray")
    image = noise_image()
    img = write(tmp_path / "i.fits", image, tan_header())
    ingest_fits([img], tmp_path / "m.zarr", bands=["g"], progress=False)
    ds = xr.open_zarr(tmp_path / "m.zarr")
    assert ds.image.dims == ("band", "y", "x")
    assert ds.image.shape == (1, 60, 80)
    assert_array_equal(ds.image[0].values, image)
    assert np.isposinf(ds.variance.values).sum() == 0
    assert ds.attrs["bands"] == ["g"]


# --- WCS -------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_header", [tan_header, sip_header, tpv_header])
def test_wcs_equals_astropy_on_source_header(tmp_path, make_header):
    ny, nx = 60, 80
    img = write(tmp_path / "i.fits", noise_image((ny, nx)), make_header(ny, nx))
    mosaic = ingest_fits([img], tmp_path / "m.zarr", progress=False)
    source = WCS(fits.getheader(img))
    rng = np.random.default_rng(1)
    x = np.concatenate([[0, nx - 1, 0, nx - 1], rng.uniform(-0.5, nx - 0.5, 200)])
    y = np.concatenate([[0, 0, ny - 1, ny - 1], rng.uniform(-0.5, ny - 0.5, 200)])

    ra, dec = mosaic.pixel_to_sky(x, y)
    ra_src, dec_src = source.all_pix2world(x, y, 0)
    assert_array_equal(ra, ra_src)
    assert_array_equal(dec, dec_src)
    xb, yb = open_mosaic(str(tmp_path / "m.zarr")).sky_to_pixel(ra, dec)
    xs, ys = source.all_world2pix(ra, dec, 0)
    assert_array_equal(xb, xs)
    assert_array_equal(yb, ys)
    assert_allclose(xb, x, atol=1e-6)
    assert_allclose(yb, y, atol=1e-6)

    # the distortion really is there, and the pixel scale comes from the WCS
    plain = WCS(tan_header(ny, nx))
    ra_tan, dec_tan = plain.all_pix2world(x, y, 0)
    shift = np.hypot((ra - ra_tan) * np.cos(np.radians(dec)), dec - dec_tan).max() * 3600
    if make_header is tan_header:
        assert shift == 0
    else:
        assert shift > 0.01
    assert_allclose(mosaic.pixel_scale, 0.2, rtol=0.01)


def test_cube_with_leading_unit_axis(tmp_path):
    image = noise_image()
    header = tan_header(WCSAXES=3, CTYPE3="WAVE", CRPIX3=1.0, CRVAL3=6.2e-7, CDELT3=1e-9)
    img = write(tmp_path / "cube.fits", image[None], header)
    mosaic = ingest_fits([img], tmp_path / "m.zarr", progress=False)
    assert_array_equal(mosaic.image[0], image)
    assert mosaic.wcs.naxis == 2
    x, y = np.array([0.0, 40.0]), np.array([0.0, 30.0])
    expected = WCS(tan_header()).all_pix2world(x, y, 0)
    assert_array_equal(mosaic.pixel_to_sky(x, y), expected)


# --- pixel conventions -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i2", ">i4", ">u2"])
def test_big_endian_input(tmp_path, dtype):
    rng = np.random.default_rng(3)
    values = np.abs(rng.normal(0, 1000, (40, 50)))
    data = values.astype(dtype)
    img = write(tmp_path / "be.fits", data, tan_header(40, 50))
    if dtype == ">u2":
        assert fits.getheader(img)["BZERO"] == 32768  # stored as scaled big-endian int16
    else:
        assert fits.getdata(img).dtype.byteorder == ">"
    mosaic = ingest_fits([img], tmp_path / "m.zarr", progress=False)
    out = mosaic.image[0]
    assert out.dtype == np.float32
    assert_array_equal(out, data.astype(np.float32))


def test_scaled_integer_with_blank(tmp_path):
    rng = np.random.default_rng(5)
    raw = rng.integers(-3000, 3000, (40, 50)).astype(np.int16)
    raw[3, 4] = -32768
    path = write(tmp_path / "scaled.fits", raw, tan_header(40, 50))
    for key, value in (("BSCALE", 0.25), ("BZERO", 100.0), ("BLANK", -32768)):
        fits.setval(path, key, value=value)
    expected = fits.getdata(path)  # astropy's scaled read, NaN at BLANK
    assert expected.dtype == np.float32
    assert np.isnan(expected[3, 4])
    mosaic = ingest_fits([path], tmp_path / "m.zarr", progress=False)
    good = np.isfinite(expected)
    assert_array_equal(mosaic.image[0][good], expected[good])
    assert_array_equal(mosaic.mask[0] == NO_DATA, ~good)


def test_invalid_header_card_warns_once(tmp_path):
    header = tan_header(**{"DATE-OBS": "2020-01-01T00:00:00"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(3):
            header.append(fits.Card.fromstring(f"ESO-LOG 00:00:0{i}> DATE = '1992-10-26'"))
        fits.writeto(tmp_path / "bad.fits", noise_image(), header, output_verify="ignore")
    with pytest.warns(IngestWarning, match=r"bad\.fits: dropped 3 invalid .*ESO-LOG") as record:
        mosaic = ingest_fits([tmp_path / "bad.fits"], tmp_path / "m.zarr", progress=False)
    assert len(record) == 1
    assert mosaic.wcs_cards["DATE-OBS"] == "2020-01-01T00:00:00"
    x, y = np.array([0.0, 79.0]), np.array([0.0, 59.0])
    # no FITSFixedWarning from wcslib's date fix (filterwarnings = error would raise)
    assert_array_equal(mosaic.pixel_to_sky(x, y), WCS(tan_header()).all_pix2world(x, y, 0))


def test_nan_and_zero_weight_become_no_data(tmp_path):
    image = noise_image()
    image[1, 1] = np.nan
    image[2, 2] = np.inf
    image[3, 3] = -np.inf
    weight = np.ones(image.shape, np.float32)
    weight[4, 4] = 0
    weight[5, 5] = -1
    weight[6, 6] = np.nan
    img = write(tmp_path / "i.fits", image, tan_header())
    wht = write(tmp_path / "w.fits", weight)
    mosaic = ingest_fits([img], tmp_path / "m.zarr", weights=[wht], progress=False)
    bad = np.zeros(image.shape, bool)
    for k in range(1, 7):
        bad[k, k] = True
    assert_array_equal(mosaic.mask[0] & NO_DATA > 0, bad)
    assert_array_equal(mosaic.image[0][bad], 0)
    assert np.isposinf(mosaic.variance[0][bad]).all()
    assert_array_equal(mosaic.image[0][~bad], image[~bad])
    assert_array_equal(mosaic.variance[0][~bad], 1)


def test_bad_variance_becomes_no_data(tmp_path):
    image = noise_image()
    variance = np.full(image.shape, 4.0, np.float32)
    variance[0, :3] = [0, -2, np.nan]
    variance[1, 0] = np.inf
    img = write(tmp_path / "i.fits", image, tan_header())
    var = write(tmp_path / "v.fits", variance)
    mosaic = ingest_fits([img], tmp_path / "m.zarr", variances=[var], progress=False)
    mask = mosaic.mask[0]
    assert_array_equal(mask[0, :3], NO_DATA)
    assert mask[1, 0] == NO_DATA
    assert mask[0, 3] == 0
    assert np.isposinf(mosaic.variance[0][0, :3]).all()


@pytest.mark.parametrize("key", ["SATURATE", "SATLEVEL"])
def test_saturation_level_sets_sat_bit(tmp_path, key):
    image = noise_image()
    image[10, 10:13] = [999.0, 1000.0, 5000.0]
    img = write(tmp_path / "i.fits", image, tan_header(**{key: 1000.0}))
    mosaic = ingest_fits([img], tmp_path / "m.zarr", progress=False)
    sat = mosaic.mask[0] & SAT > 0
    expected = np.zeros(image.shape, bool)
    expected[10, 11:13] = True
    assert_array_equal(sat, expected)
    assert_array_equal(mosaic.mask[0] & NO_DATA, 0)
    assert mosaic.attrs["saturation"] == {"b0": 1000.0}


def test_estimated_variance_and_gain_term(tmp_path):
    sigma, sky, gain = 3.0, 200.0, 2.5
    image = noise_image((200, 150), sigma=sigma, sky=sky)
    image[50, 60] = 5000.0
    plain = write(tmp_path / "plain.fits", image, tan_header(200, 150))
    with_gain = write(tmp_path / "gain.fits", image, tan_header(200, 150, GAIN=gain))

    m1 = ingest_fits([plain], tmp_path / "a.zarr", progress=False)
    info = m1.attrs["ingest"]
    assert info["variance_source"] == {"b0": "estimated"}
    assert_allclose(info["sky_level"]["b0"], sky, atol=0.1)
    assert_allclose(info["sky_sigma"]["b0"], sigma, rtol=0.05)
    var = m1.variance[0]
    assert_array_equal(var, var[0, 0])  # a constant
    assert_allclose(var[0, 0], info["sky_sigma"]["b0"] ** 2, rtol=1e-6)

    m2 = ingest_fits([with_gain], tmp_path / "b.zarr", progress=False)
    info = m2.attrs["ingest"]
    assert info["gain"] == {"b0": gain}
    sky_var = info["sky_sigma"]["b0"] ** 2
    expected = sky_var + max(5000.0 - info["sky_level"]["b0"], 0) / gain
    assert_allclose(m2.variance[0][50, 60], expected, rtol=1e-5)
    assert m2.variance[0].min() >= np.float32(sky_var)


def test_multiband_ingest(tmp_path):
    shape = (60, 80)
    paths, images = [], []
    for i, band in enumerate("gri"):
        images.append(noise_image(shape, sky=10.0 * (i + 1), seed=i))
        paths.append(write(tmp_path / f"{band}.fits", images[-1], tan_header(FILTER=band, ZP=30.0)))
    mosaic = ingest_fits(
        paths,
        tmp_path / "m.zarr",
        zero_points={"i": 31.0},
        psf_fwhm=[1.0, 0.8, 0.7],
        progress=False,
    )
    assert mosaic.bands == ("g", "r", "i")
    assert mosaic.zero_points == {"g": 30.0, "r": 30.0, "i": 31.0}
    assert mosaic.psf_fwhm == {"g": 1.0, "r": 0.8, "i": 0.7}
    assert mosaic.attrs["ingest"]["zero_point_source"]["i"] == "argument"
    for band, image in zip("gri", images, strict=True):
        assert_array_equal(mosaic.image[mosaic.band_index(band)], image)

    renamed = ingest_fits(
        paths[:2], tmp_path / "n.zarr", bands=["G", "R"], zero_points=[25.0, None], progress=False
    )
    assert renamed.bands == ("G", "R")
    assert renamed.zero_points == {"G": 25.0, "R": 30.0}


def test_chunked_ingest_of_large_image_is_exact(tmp_path):
    ny, nx = 2500, 1300
    rng = np.random.default_rng(7)
    image = rng.normal(0, 1, (ny, nx)).astype(np.float32)
    image[::97, ::89] = np.nan
    img = write(tmp_path / "big.fits", image, tan_header(ny, nx))
    mosaic = ingest_fits([img], tmp_path / "m.zarr", chunks=512, progress=False)
    assert mosaic.chunks == (1, 512, 512)
    nodata = ~np.isfinite(image)
    out = mosaic.image[0]
    assert_array_equal(out[~nodata], image[~nodata])
    assert_array_equal(out[nodata], 0)
    assert_array_equal(mosaic.mask[0] == NO_DATA, nodata)


def mef(path, *hdus, primary=None):
    """Write a multi-extension FITS file: an empty primary HDU then ``(name, data, header)``."""
    hdul = fits.HDUList([fits.PrimaryHDU(header=primary)])
    for name, data, header in hdus:
        hdul.append(fits.ImageHDU(data, header=header, name=name))
    hdul.writeto(path, overwrite=True)
    return path


def two_ccds(path, shape=(60, 80)):
    """A DECam-like file: FILTER and MAGZERO in the primary header, two CCD extensions."""
    ccd1, ccd2 = noise_image(shape, sky=100.0, seed=1), noise_image(shape, sky=300.0, seed=2)
    primary = fits.Header({"FILTER": "r DECam SDSS c0002 6300.0 1517.0", "MAGZERO": 28.25})
    mef(path, ("CCD1", ccd1, tan_header(*shape)), ("CCD2", ccd2, tan_header(*shape)), primary=primary)  # fmt: skip
    return path, ccd1, ccd2


def test_hdu_by_extname_index_or_suffix(tmp_path):
    path, _, ccd2 = two_ccds(tmp_path / "mef.fits")
    for i, (image, hdu) in enumerate(
        [(path, "CCD2"), (path, 2), (f"{path}[CCD2]", None), (f"{path}[2]", "CCD1")]
    ):
        mosaic = ingest_fits([image], tmp_path / f"m{i}.zarr", hdu=hdu, progress=False)
        assert_array_equal(mosaic.image[0], ccd2)
        info = mosaic.attrs["ingest"]
        assert info["hdu"] == {"r": 2} and info["extname"] == {"r": "CCD2"}
        assert info["images"] == {"r": str(path)}
        # band and zero point inherited from the primary header
        assert mosaic.bands == ("r",) and mosaic.zero_points == {"r": 28.25}
        assert info["zero_point_source"] == {"r": "primary header:MAGZERO"}


def test_file_with_several_image_hdus_needs_one_chosen(tmp_path):
    path, _, _ = two_ccds(tmp_path / "mef.fits")
    with pytest.raises(
        ValueError,
        match=r"mef\.fits has 2 image HDUs \(1 'CCD1' 60×80, 2 'CCD2' 60×80\): choose one with "
        r"--hdu INDEX\|EXTNAME \(hdu= in Python\) or FILE\[EXTNAME\]$",
    ):
        ingest_fits([path], tmp_path / "m.zarr", progress=False)
    assert not (tmp_path / "m.zarr").exists()
    with pytest.raises(
        ValueError, match=r"mef\.fits has no HDU 'NOPE' \(3 HDUs; image HDUs: 1 'CCD1'"
    ):
        ingest_fits([path], tmp_path / "m.zarr", hdu="NOPE", progress=False)
    with pytest.raises(
        ValueError, match=r"HDU 0 of .*mef\.fits holds no image data \(PrimaryHDU\)"
    ):
        ingest_fits([path], tmp_path / "m.zarr", hdu=0, progress=False)
    with pytest.raises(ValueError, match=r"hdu has 2 entries but 1 image\(s\)"):
        ingest_fits([path], tmp_path / "m.zarr", hdu=[1, 2], progress=False)
    with pytest.raises(TypeError, match=r"hdu must be an HDU index \(int\) or EXTNAME"):
        ingest_fits([path], tmp_path / "m.zarr", hdu=1.5, progress=False)
    # more than a dozen image HDUs: the first twelve are named, then a count
    many = mef(tmp_path / "many.fits", *((f"S{i}", np.ones((4, 4), np.float32), None) for i in range(20)))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"has 20 image HDUs \(1 'S0' 4×4, .*12 'S11' 4×4, … 8 more\)"
    ):
        ingest_fits([many], tmp_path / "m.zarr", progress=False)


def test_hdu_per_image_and_for_weight_files(tmp_path):
    shape = (60, 80)
    path, ccd1, ccd2 = two_ccds(tmp_path / "ooi.fits", shape)
    w1, w2 = np.full(shape, 0.5, np.float32), np.full(shape, 0.125, np.float32)
    wpath = mef(tmp_path / "oow.fits", ("CCD1", w1, None), ("CCD2", w2, None))
    single = write(tmp_path / "w.fits", np.full(shape, 0.25, np.float32))
    mosaic = ingest_fits(
        [path, path], tmp_path / "m.zarr", bands=["a", "b"], hdu=["CCD1", 2],
        weights=[wpath, single], progress=False,
    )  # fmt: skip
    assert_array_equal(mosaic.image[0], ccd1)
    assert_array_equal(mosaic.image[1], ccd2)
    assert_array_equal(mosaic.variance[0], 2.0)  # oow.fits read at the image's HDU, CCD1
    assert_array_equal(mosaic.variance[1], 4.0)  # a single-HDU weight file is read where it is

    # HSC-like: image, mask and variance planes in one file, named by [EXT]
    image, variance = noise_image(shape), np.full(shape, 9.0, np.float32)
    mask = np.zeros(shape, np.int32)
    mask[3, 4] = 16
    calexp = mef(
        tmp_path / "calexp.fits", ("IMAGE", image, tan_header()), ("MASK", mask, None),
        ("VARIANCE", variance, None),
    )  # fmt: skip
    m = ingest_fits(
        [f"{calexp}[IMAGE]"], tmp_path / "h.zarr", variances=[f"{calexp}[VARIANCE]"],
        masks=[f"{calexp}[MASK]"], progress=False,
    )  # fmt: skip
    assert_array_equal(m.image[0], image)
    assert_array_equal(m.variance[0], variance)
    assert m.mask[0][3, 4] == BAD and m.mask[0].sum() == BAD
    with pytest.raises(
        ValueError, match=r"variance map .*calexp\.fits is HDU 1 of .*the image itself"
    ):
        ingest_fits([calexp], tmp_path / "x.zarr", hdu="IMAGE", variances=[calexp], progress=False)


# --- zero points and compressed files --------------------------------------------------------
@pytest.mark.parametrize(
    ("cards", "zp", "source"),
    [
        ({"MAGZERO": 27.5}, 27.5, "header:MAGZERO"),
        ({"MAGZPT": 25.1}, 25.1, "header:MAGZPT"),
        ({"MAGZP": 30.0}, 30.0, "header:MAGZP"),
        ({"ZP": 26.25}, 26.25, "header:ZP"),
        ({"FLUXMAG0": 1e11}, 27.5, "header:FLUXMAG0"),  # 2.5 log10(1e11)
        ({"FLUXMAG0": 63095734448.0194}, 27.0, "header:FLUXMAG0"),
        ({"BUNIT": "nanomaggy"}, 22.5, "header:BUNIT"),  # SDSS frames
        ({"BUNIT": "nanomaggies"}, 22.5, "header:BUNIT"),
        ({"BUNIT": "nMgy"}, 22.5, "header:BUNIT"),
        ({"MAGZERO": 27.5, "FLUXMAG0": 1e12, "BUNIT": "nanomaggy"}, 27.5, "header:MAGZERO"),
        ({"FLUXMAG0": -1.0, "BUNIT": "adu"}, None, None),
        ({}, None, None),
    ],
)
def test_zero_point_from_header_keywords(tmp_path, caplog, cards, zp, source):
    img = write(tmp_path / "i.fits", noise_image(), tan_header(**cards))
    with caplog.at_level("INFO", logger="survey_engine.ingest"):
        mosaic = ingest_fits([img], tmp_path / "m.zarr", bands=["r"], progress=False)
    if zp is None:
        assert mosaic.zero_points == {"r": None}
        assert "band 'r' has no zero point" in caplog.text
    else:
        assert mosaic.zero_points["r"] == pytest.approx(zp, abs=1e-9)
        key = source.split(":")[1]
        assert f"zero point {zp:.1f}" in caplog.text and key in caplog.text  # the keyword is logged
    assert mosaic.attrs["ingest"]["zero_point_source"] == {"r": source}
    given = ingest_fits(
        [img], tmp_path / "g.zarr", zero_points=[31.4], overwrite=True, progress=False
    )
    assert given.zero_points == {"b0": 31.4}
    assert given.attrs["ingest"]["zero_point_source"] == {"b0": "argument"}


def test_compressed_inputs(tmp_path):
    import bz2
    import gzip

    rng = np.random.default_rng(11)
    counts = rng.poisson(500, (70, 90)).astype(np.int32)
    plain = write(tmp_path / "c.fits", counts, tan_header(70, 90))
    raw = plain.read_bytes()
    (tmp_path / "c.fits.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "c.fits.bz2").write_bytes(bz2.compress(raw))
    # tile-compressed (fpack .fz): an empty primary HDU, the image in a CompImageHDU
    fits.HDUList(
        [fits.PrimaryHDU(), fits.CompImageHDU(counts, header=tan_header(70, 90), compression_type="RICE_1")]
    ).writeto(tmp_path / "c.fits.fz")  # fmt: skip
    values = noise_image((70, 90))
    fits.HDUList(
        [fits.PrimaryHDU(), fits.CompImageHDU(values, header=tan_header(70, 90), quantize_level=16.0)]
    ).writeto(tmp_path / "f.fits.fz")  # fmt: skip
    for name in ("c.fits.gz", "c.fits.bz2", "c.fits.fz"):
        mosaic = ingest_fits(
            [tmp_path / name], tmp_path / f"{name}.zarr", chunks=32, progress=False
        )
        assert_array_equal(mosaic.image[0], counts.astype(np.float32))  # lossless
        assert mosaic.attrs["ingest"]["hdu"] == {"b0": 1 if name.endswith(".fz") else 0}
        assert mosaic.has_wcs
    lossy = ingest_fits([tmp_path / "f.fits.fz"], tmp_path / "f.zarr", chunks=32, progress=False)
    expected = fits.getdata(tmp_path / "f.fits.fz")  # astropy's decompression (quantised floats)
    assert_array_equal(lossy.image[0], expected)
    assert 0 < np.abs(expected - values).max() < 2.0 / 16  # quantisation step sigma/16


def test_estimated_variance_matches_the_true_noise(tmp_path, caplog):
    """An image in ADU with sky, galaxies, Poisson noise (GAIN e-/ADU) and read noise."""
    ny, nx, sky, gain, read_noise = 300, 320, 400.0, 2.0, 6.0  # read noise in e-
    yy, xx = np.mgrid[:ny, :nx]
    rng = np.random.default_rng(12)
    signal = np.full((ny, nx), sky)
    for x0, y0, flux, r in zip(
        rng.uniform(20, nx - 20, 25), rng.uniform(20, ny - 20, 25), rng.uniform(2e4, 2e5, 25),
        rng.uniform(1.5, 4.0, 25), strict=True,
    ):  # fmt: skip
        signal += (
            flux / (2 * np.pi * r**2) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * r**2))
        )
    true_var = signal / gain + (read_noise / gain) ** 2  # ADU²
    image = rng.poisson(signal * gain) / gain + rng.normal(0, read_noise / gain, (ny, nx))
    img = write(tmp_path / "adu.fits", image.astype(np.float32), tan_header(ny, nx, GAIN=gain))
    with caplog.at_level("WARNING", logger="survey_engine.ingest"):
        mosaic = ingest_fits([img], tmp_path / "m.zarr", progress=False)
    assert "adu.fits: no weight or variance map for band 'b0': variance estimated" in caplog.text
    assert "GAIN = 2" in caplog.text
    est = mosaic.variance[0].astype(np.float64)
    sky_px = signal - sky < 0.1 * np.sqrt(sky / gain)
    bright = signal - sky > 20 * np.sqrt(sky / gain)
    assert sky_px.sum() > 50_000 and bright.sum() > 500
    ratio_sky = np.median(est[sky_px] / true_var[sky_px])
    ratio_bright = np.median(est[bright] / true_var[bright])
    assert ratio_sky == pytest.approx(1.0, abs=0.1)  # sky: σ² = sky/GAIN + read noise²
    assert ratio_bright == pytest.approx(1.0, abs=0.1)  # + (image − sky)/GAIN per pixel
    assert mosaic.attrs["ingest"]["sky_sigma"]["b0"] ** 2 == pytest.approx(
        sky / gain + (read_noise / gain) ** 2, rel=0.1
    )


# --- command line ----------------------------------------------------------------------------
def _cli(*args):
    from click.testing import CliRunner

    from survey_engine.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _one_error_line(res) -> str:
    """The output of a refused command: exit status 1, one line "error: …", no traceback."""
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_cli_ingest_chooses_the_hdu_by_index_or_extname(tmp_path):
    path, ccd1, ccd2 = two_ccds(tmp_path / "mef.fits")
    for i, (hdu, expected) in enumerate([("2", ccd2), ("CCD1", ccd1), ("CCD2", ccd2)]):
        out = tmp_path / f"m{i}.zarr"
        res = _cli("ingest", path, out, "--hdu", hdu)
        assert res.exit_code == 0, res.output
        assert f"into {out}: 60×80 px, bands r" in res.output
        m = open_mosaic(str(out))
        assert_array_equal(m.image[0], expected)
        assert m.attrs["ingest"]["extname"] == {"r": "CCD2" if expected is ccd2 else "CCD1"}
    # one --hdu per image; per-image zero points and PSF FWHM
    out = tmp_path / "two.zarr"
    res = _cli(
        "ingest", path, path, out, "--band", "g", "--band", "r", "--hdu", "1", "--hdu", "CCD2",
        "--zero-point", "27.0", "--zero-point", "27.5", "--psf-fwhm", "0.9", "--psf-fwhm", "0.8",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    m = open_mosaic(str(out))
    assert_array_equal(m.image[0], ccd1)
    assert_array_equal(m.image[1], ccd2)
    assert m.zero_points == {"g": 27.0, "r": 27.5}
    assert m.psf_fwhm == {"g": 0.9, "r": 0.8}
    # one value for all images
    res = _cli(
        "ingest", path, path, out, "--band", "g", "--band", "r", "--hdu", "CCD1",
        "--zero-point", "30", "--psf-fwhm", "1.1", "--overwrite",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    m = open_mosaic(str(out))
    assert m.zero_points == {"g": 30.0, "r": 30.0} and m.psf_fwhm == {"g": 1.1, "r": 1.1}
    assert_array_equal(m.image[1], ccd1)


def test_cli_ingest_refusals_are_one_line(tmp_path):
    path, _, _ = two_ccds(tmp_path / "mef.fits")
    line = _one_error_line(_cli("ingest", path, tmp_path / "m.zarr"))
    assert line == (
        f"error: {path} has 2 image HDUs (1 'CCD1' 60×80, 2 'CCD2' 60×80): choose one with "
        "--hdu INDEX|EXTNAME (hdu= in Python) or FILE[EXTNAME]"
    )
    assert not (tmp_path / "m.zarr").exists()
    line = _one_error_line(_cli("ingest", path, tmp_path / "m.zarr", "--hdu", "CCD9"))
    assert line == (
        f"error: {path} has no HDU 'CCD9' (3 HDUs; image HDUs: 1 'CCD1' 60×80, 2 'CCD2' 60×80)"
    )
    line = _one_error_line(_cli("ingest", path, tmp_path / "m.zarr", "--hdu", "1", "--hdu", "2"))
    assert line == "error: --hdu given 2 times for 1 image(s): give it once per image or once for all"  # fmt: skip
    zps = ["--zero-point", "1", "--zero-point", "2", "--zero-point", "3"]
    line = _one_error_line(_cli("ingest", path, path, tmp_path / "m.zarr", "--hdu", "1", *zps))
    assert line == (
        "error: --zero-point given 3 times for 2 image(s): give it once per image or once for all"
    )
    line = _one_error_line(
        _cli("ingest", path, tmp_path / "m.zarr", "--hdu", "1", "--band", "r", "--band", "g")
    )
    assert "bands has 2 entries but 1 image(s)" in line
    (tmp_path / "junk.fits").write_bytes(b"this is not FITS")
    line = _one_error_line(_cli("ingest", tmp_path / "junk.fits", tmp_path / "j.zarr"))
    assert line.startswith(f"error: {tmp_path / 'junk.fits'} is not a readable FITS file: ")
    assert "ignore_missing_simple" not in line  # astropy's advice on open() options is cut


# --- real data -------------------------------------------------------------------------------
def test_real_sep_image_ingests(tmp_path, shared_data):
    path = shared_data / "sep_image.fits"
    with pytest.warns(IngestWarning) as record:
        mosaic = ingest_fits([path], tmp_path / "sep.zarr", progress=False)
    messages = [str(w.message) for w in record]
    assert any("dropped 4 invalid or non-standard FITS header card(s)" in m for m in messages)
    assert any("no 2-D celestial WCS" in m for m in messages)
    with pytest.warns(UserWarning), fits.open(path, memmap=False) as hdul:
        expected = hdul[0].data
    assert expected.dtype == np.float32  # int16 scaled by BSCALE/BZERO
    assert_array_equal(mosaic.image[0], expected)
    assert mosaic.bands == ("b0",)
    assert not mosaic.has_wcs
    info = mosaic.attrs["ingest"]
    assert info["variance_source"] == {"b0": "estimated"}
    assert 0 < info["sky_sigma"]["b0"] < 100
    assert_array_equal(mosaic.mask[0], 0)


# --- errors ----------------------------------------------------------------------------------
def test_error_mismatched_band_geometry(tmp_path):
    a = write(tmp_path / "a.fits", noise_image((60, 80)), tan_header(60, 80))
    b = write(tmp_path / "b.fits", noise_image((61, 80)), tan_header(61, 80))
    with pytest.raises(ValueError, match=r"a\.fits is \(60, 80\) but .*b\.fits is \(61, 80\)"):
        ingest_fits([a, b], tmp_path / "m.zarr", progress=False)
    w = write(tmp_path / "w.fits", np.ones((61, 80), np.float32))
    with pytest.raises(ValueError, match=r"weight map .*w\.fits has shape \(61, 80\).*a\.fits"):
        ingest_fits([a], tmp_path / "m.zarr", weights=[w], progress=False)


def test_error_mismatched_wcs(tmp_path):
    a = write(tmp_path / "a.fits", noise_image(), tan_header())
    b = write(tmp_path / "b.fits", noise_image(), tan_header(CRVAL1=150.1173213))
    with pytest.raises(ValueError, match=r"WCS of .*b\.fits differs from that of .*a\.fits"):
        ingest_fits([a, b], tmp_path / "m.zarr", progress=False)
    # a sub-0.05-pixel difference is tolerated
    c = write(tmp_path / "c.fits", noise_image(), tan_header(CRPIX1=40.51))
    mosaic = ingest_fits([a, c], tmp_path / "m.zarr", progress=False)
    assert mosaic.bands == ("b0", "b1")


def test_error_missing_file(tmp_path):
    a = write(tmp_path / "a.fits", noise_image(), tan_header())
    with pytest.raises(FileNotFoundError, match=r"nope\.fits"):
        ingest_fits([a, tmp_path / "nope.fits"], tmp_path / "m.zarr", progress=False)
    with pytest.raises(FileNotFoundError, match=r"w\.fits"):
        ingest_fits([a], tmp_path / "m.zarr", weights=[tmp_path / "w.fits"], progress=False)
    assert not (tmp_path / "m.zarr").exists()


def test_error_non_2d_data(tmp_path):
    cube = write(tmp_path / "cube.fits", np.zeros((2, 10, 12), np.float32))
    with pytest.raises(ValueError, match=r"cube\.fits .*3-D data of shape \(2, 10, 12\)"):
        ingest_fits([cube], tmp_path / "m.zarr", progress=False)
    line = write(tmp_path / "line.fits", np.zeros(10, np.float32))
    with pytest.raises(ValueError, match=r"line\.fits .*1-D data of shape \(10,\)"):
        ingest_fits([line], tmp_path / "m.zarr", progress=False)


def test_error_duplicate_and_unknown_band(tmp_path):
    a = write(tmp_path / "a.fits", noise_image(), tan_header(FILTER="r"))
    b = write(tmp_path / "b.fits", noise_image(), tan_header(BAND="r"))
    with pytest.raises(ValueError, match=r"duplicate band 'r' .*a\.fits and .*b\.fits"):
        ingest_fits([a, b], tmp_path / "m.zarr", progress=False)
    with pytest.raises(ValueError, match=r"duplicate band 'g'"):
        ingest_fits([a, b], tmp_path / "m.zarr", bands=["g", "g"], progress=False)
    with pytest.raises(KeyError, match=r"zero_points given for unknown band\(s\) \['z'\]"):
        ingest_fits([a, b], tmp_path / "m.zarr", bands=["g", "r"], zero_points={"z": 27.0})
    with pytest.raises(KeyError, match=r"psf_fwhm given for unknown band"):
        ingest_fits([a], tmp_path / "m.zarr", psf_fwhm={"g": 1.0}, progress=False)


def test_error_wrong_list_lengths(tmp_path):
    a = write(tmp_path / "a.fits", noise_image(), tan_header())
    b = write(tmp_path / "b.fits", noise_image(), tan_header())
    with pytest.raises(ValueError, match=r"bands has 1 entries but 2 image\(s\)"):
        ingest_fits([a, b], tmp_path / "m.zarr", bands=["r"], progress=False)
    for name in ("weights", "variances", "masks"):
        with pytest.raises(ValueError, match=rf"{name} has 3 entries but 2 image\(s\)"):
            ingest_fits([a, b], tmp_path / "m.zarr", **{name: [a, a, a]}, progress=False)
    with pytest.raises(ValueError, match=r"zero_points has 1 values for 2 band"):
        ingest_fits([a, b], tmp_path / "m.zarr", zero_points=[27.0], progress=False)
    with pytest.raises(ValueError, match=r"both a weight .* and a variance"):
        ingest_fits([a], tmp_path / "m.zarr", weights=[a], variances=[a], progress=False)
    with pytest.raises(ValueError, match=r"images is empty"):
        ingest_fits([], tmp_path / "m.zarr", progress=False)


def test_error_output_exists(tmp_path):
    a = write(tmp_path / "a.fits", noise_image(), tan_header())
    ingest_fits([a], tmp_path / "m.zarr", progress=False)
    with pytest.raises(FileExistsError, match=r"m\.zarr already exists; pass overwrite=True"):
        ingest_fits([a], tmp_path / "m.zarr", progress=False)
    mosaic = ingest_fits([a], tmp_path / "m.zarr", bands=["z"], overwrite=True, progress=False)
    assert open_mosaic(str(tmp_path / "m.zarr")).bands == mosaic.bands == ("z",)


# --- PSF estimate (an image without a recorded PSF) --------------------------------------------
def _star_field(psf_fwhm_pix: float, n_stars: int = 40, n_gal: int = 30, size: int = 256, seed: int = 5):
    """Kolmogorov stars and larger exponential galaxies of one PSF, sky 100, noise σ = 2."""
    galsim = pytest.importorskip("galsim")
    rng = np.random.default_rng(seed)
    im = galsim.ImageF(size, size, scale=1.0)
    psf = galsim.Kolmogorov(fwhm=psf_fwhm_pix)
    for k in range(n_stars + n_gal):
        x, y = rng.uniform(12, size - 12, 2)
        flux = 10 ** rng.uniform(3.3, 4.5)
        prof = psf if k < n_stars else galsim.Convolve(
            galsim.Exponential(half_light_radius=rng.uniform(1.5, 4.0)), psf)
        prof.withFlux(flux).drawImage(im, add_to_image=True, offset=(x - size / 2, y - size / 2))
    return (im.array + noise_image((size, size), seed=seed)).astype(np.float32)


@pytest.mark.parametrize("fwhm", [2.5, 4.0])
def test_psf_fwhm_estimated_from_point_sources(tmp_path, fwhm):
    img = write(tmp_path / "r.fits", _star_field(fwhm), tan_header(256, 256))
    m = ingest_fits([img], tmp_path / "m.zarr", bands=["r"], progress=False)
    est = m.attrs["psf_fwhm_pix"]["r"]
    assert est == pytest.approx(fwhm, rel=0.05)
    assert m.attrs["psf_fwhm_source"]["r"].startswith("estimated from ")
    assert m.psf_fwhm["r"] == pytest.approx(est * 0.2, rel=1e-3)  # arcsec: 0.2″ pixels
    assert open_mosaic(str(tmp_path / "m.zarr")).psf_fwhm_pix["r"] == pytest.approx(est, rel=1e-3)


def test_psf_fwhm_given_is_kept_and_noise_gives_none(tmp_path, caplog):
    img = write(tmp_path / "r.fits", _star_field(3.0), tan_header(256, 256))
    m = ingest_fits([img], tmp_path / "a.zarr", bands=["r"], psf_fwhm={"r": 0.7}, progress=False)
    assert m.psf_fwhm == {"r": 0.7}
    assert m.attrs["psf_fwhm_source"] == {"r": "argument"}
    assert m.psf_fwhm_pix["r"] == pytest.approx(3.5, rel=1e-4)
    noise = write(tmp_path / "n.fits", noise_image((128, 128)), tan_header(128, 128))
    with caplog.at_level("WARNING", logger="survey_engine.ingest"):
        m = ingest_fits([noise], tmp_path / "n.zarr", bands=["r"], progress=False)
    assert m.psf_fwhm_pix == {"r": None} and m.psf_fwhm == {"r": None}
    assert "too few point sources" in caplog.text


@pytest.mark.filterwarnings("ignore::survey_engine.ingest.IngestWarning")  # ESO cards, no WCS
def test_psf_fwhm_of_the_real_ntt_image(shared_data, tmp_path):
    # SExtractor 2.25 on this image (SEEING 2.4 px): FWHM_IMAGE of its CLASS_STAR > 0.9 objects
    # 2.0–2.5 px, median 2.46; a Gaussian fitted to the core gives a little less.
    m = ingest_fits(shared_data / "sep_image.fits", tmp_path / "real.zarr", progress=False)
    assert 2.0 <= m.psf_fwhm_pix["b0"] <= 2.6
    assert m.psf_fwhm == {"b0": None}  # no WCS, no pixel scale: only pixels are known
