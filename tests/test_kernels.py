"""Pure kernels: background mesh, detection/deblending, measurement against references."""

import numpy as np
import pytest
import sep

from survey_engine.kernels.background import filter_mesh, interpolate_background, mesh_statistics
from survey_engine.kernels.detect import DetectionConfig, detect_sources, detection_image
from survey_engine.kernels.measure import MeasureConfig, measure_sources


def _gauss(shape, x0, y0, flux, sigma):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (
        flux / (2 * np.pi * sigma**2) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2))
    )


def test_mesh_statistics_recovers_sky_under_sources():
    rng = np.random.default_rng(0)
    img = 50.0 + rng.normal(0, 2.0, (256, 384))
    img += _gauss(img.shape, 100, 100, 5e4, 3.0)  # a bright source must not bias its cell much
    level, rms = mesh_statistics(img.astype(np.float32), None, 64)
    assert level.shape == (4, 6)
    np.testing.assert_allclose(level, 50.0, atol=0.3)
    np.testing.assert_allclose(rms, 2.0, rtol=0.1)


def test_mesh_statistics_ignores_masked_and_empty_cells():
    img = np.full((128, 128), 10.0, np.float32)
    img[:64, :64] = 1e6  # masked garbage
    bad = np.zeros(img.shape, bool)
    bad[:64, :64] = True
    level, _ = mesh_statistics(img, bad, 64)
    assert np.isnan(level[0, 0])
    np.testing.assert_allclose(level[1:, 1:], 10.0)
    mesh = filter_mesh(level, np.ones_like(level), 64, img.shape, filter_size=1)
    assert np.isfinite(mesh.level).all()
    assert mesh.level[0, 0] == 10.0


def test_background_interpolation_is_independent_of_the_region():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:700, :900]
    img = (20 + 0.01 * xx + 0.02 * yy + rng.normal(0, 1, xx.shape)).astype(np.float32)
    level, rms = mesh_statistics(img, None, 64)
    mesh = filter_mesh(level, rms, 64, img.shape)
    full = interpolate_background(mesh, 0, 700, 0, 900)
    part = interpolate_background(mesh, 123, 456, 301, 777)
    assert np.array_equal(full[123:456, 301:777], part)
    # A linear gradient is followed within the noise of the cell estimates.
    np.testing.assert_allclose(
        full[64:-64, 64:-64], (20 + 0.01 * xx + 0.02 * yy)[64:-64, 64:-64], atol=0.3
    )


def test_mesh_statistics_rejects_bad_input():
    with pytest.raises(ValueError, match="image must be 2-D"):
        mesh_statistics(np.zeros((2, 8, 8)), None, 4)
    with pytest.raises(ValueError, match="background box must be ≥ 4"):
        mesh_statistics(np.zeros((8, 8)), None, 2)


def _scene(rng, shape=(200, 260), pairs=((60, 60, 6.5),), isolated=((180, 150),)):
    img = np.zeros(shape)
    for x, y, sep_px in pairs:
        img += _gauss(shape, x, y, 4000, 1.8)
        img += _gauss(shape, x + sep_px, y, 2500, 1.8)
    for x, y in isolated:
        img += _gauss(shape, x, y, 3000, 2.0)
    return (img + rng.normal(0, 1.0, shape)).astype(np.float32)


def test_detect_finds_isolated_sources_and_splits_a_close_pair():
    rng = np.random.default_rng(2)
    img = _scene(rng)
    var = np.ones_like(img)
    res = detect_sources(img, var, np.zeros(img.shape, bool), DetectionConfig())
    assert res.n_objects == 3
    assert sorted(res.n_children.tolist()) == [1, 2, 2]
    # The pair's children share one parent.
    pair = np.flatnonzero(res.n_children == 2)
    assert res.parent[pair[0]] == res.parent[pair[1]]


def test_detect_is_independent_of_the_window():
    rng = np.random.default_rng(3)
    pairs = tuple((40 + 45 * i, 50 + 30 * (i % 3), 5.5 + 0.5 * i) for i in range(4))
    img = _scene(rng, pairs=pairs, isolated=((200, 170), (30, 160)))
    var = np.ones_like(img)
    cfg = DetectionConfig()
    full = detect_sources(img, var, np.zeros(img.shape, bool), cfg)
    sub = detect_sources(img[20:190, 10:240], var[20:190, 10:240], np.zeros((170, 230), bool), cfg)
    # Same footprints up to renumbering: the partition of pixels into objects is identical.
    a = full.labels[20:190, 10:240]
    b = sub.labels
    assert np.array_equal(a > 0, b > 0)
    pairs_ab = np.unique(np.c_[a[a > 0], b[b > 0]], axis=0)
    assert len(np.unique(pairs_ab[:, 0])) == len(pairs_ab) == len(np.unique(pairs_ab[:, 1]))


def test_detection_threshold_means_sigma_per_pixel():
    rng = np.random.default_rng(4)
    noise = rng.normal(0, 3.0, (1000, 1000)).astype(np.float32)
    var = np.full_like(noise, 9.0)
    res = detect_sources(noise, var, np.zeros(noise.shape, bool), DetectionConfig(thresh=1.5))
    assert res.n_objects <= 2  # pure noise: SExtractor's 1.5 sigma finds (almost) nothing
    res = detect_sources(noise, var, np.zeros(noise.shape, bool), DetectionConfig(thresh=0.8))
    assert res.n_objects > 100  # a low threshold does find noise peaks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"thresh": 0}, "thresh must be a positive"),
        ({"minarea": 0}, "minarea must be a positive integer"),
        ({"deblend_cont": 0}, "deblend_cont must be in"),
    ],
)
def test_detection_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DetectionConfig(**kwargs)


def test_detection_image_inverse_variance_weighting():
    imgs = np.stack([np.full((4, 4), 10.0), np.full((4, 4), 20.0)]).astype(np.float32)
    var = np.stack([np.full((4, 4), 1.0), np.full((4, 4), 4.0)]).astype(np.float32)
    usable = np.ones(imgs.shape, bool)
    usable[1, 0, 0] = False
    d, v = detection_image(imgs, var, usable)
    np.testing.assert_allclose(d[1, 1], (10 / 1 + 20 / 4) / (1 + 1 / 4))
    np.testing.assert_allclose(v[1, 1], 1 / (1 + 1 / 4))
    assert d[0, 0] == 10.0
    assert v[0, 0] == 1.0


def test_measurement_matches_truth_and_sep_reference():
    rng = np.random.default_rng(5)
    shape = (120, 140)
    truth = [(40.3, 50.7, 5000.0, 2.0), (100.6, 70.2, 8000.0, 2.5)]
    img = sum(_gauss(shape, x, y, f, s) for x, y, f, s in truth) + rng.normal(0, 1.0, shape)
    img = img.astype(np.float32)
    var = np.ones_like(img)
    bad = np.zeros(shape, bool)
    det = detect_sources(img, var, bad, DetectionConfig())
    assert det.n_objects == 2
    m = measure_sources(
        img, var, bad, img[None], var[None], np.zeros((1, *shape), np.uint16), det.labels, ("r",),
        MeasureConfig(), usable_bits=9, sat_bit=2,
    )  # fmt: skip
    c = m.columns
    assert not np.any(c["flags"] & 128)  # windowed centroid converged
    np.testing.assert_allclose(c["x"], c["x_iso"], atol=0.1)
    order = np.argsort(c["x"])
    for k, (x, y, f, s) in zip(order, truth, strict=True):
        assert abs(c["x"][k] - x) < 0.05
        assert abs(c["y"][k] - y) < 0.05
        assert 0 < c["x_err"][k] < 0.05
        # Kron flux recovers ≳94% of a Gaussian's light, within the error.
        assert 0.93 * f < m.bands["r"]["kron_flux"][k] < 1.02 * f
        assert abs(c["half_light_radius"][k] - 1.1774 * s) < 0.15 * s
    # Footprint moments equal sep's own on the same segmentation.
    ref, _ = sep.extract(img, 1.5 * 16 / 6, var=var, segmentation_map=det.labels)
    for k in range(2):
        j = np.argmin(np.hypot(ref["x"] - c["x_iso"][k], ref["y"] - c["y_iso"][k]))
        np.testing.assert_allclose(c["x_iso"][k], ref["x"][j], atol=0.02)
        np.testing.assert_allclose(c["a"][k], ref["a"][j], rtol=0.05)
        np.testing.assert_allclose(m.bands["r"]["iso_flux"][k], ref["flux"][j], rtol=0.02)


def _ring(rng):
    yy, xx = np.mgrid[:100, :100]
    img = np.zeros((100, 100))
    for i in range(12):
        x0, y0 = 50 + 8 * np.cos(i / 2), 50 + 8 * np.sin(i / 2)
        img += 3000 / (2 * np.pi * 2.25) * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / 4.5)
    return (img + rng.normal(0, 1, img.shape)).astype(np.float32)


def test_deblending_overflow_is_retried_with_larger_limits():
    img = _ring(np.random.default_rng(0))
    cfg = DetectionConfig(sub_object_limit=1, max_sub_object_limit=4096)
    res = detect_sources(img, np.ones_like(img), np.zeros(img.shape, bool), cfg)
    assert not res.overflow
    assert res.n_objects >= 1


def test_deblending_overflow_beyond_the_limit_is_flagged_not_fatal():
    img = _ring(np.random.default_rng(0))
    cfg = DetectionConfig(sub_object_limit=1, max_sub_object_limit=1)
    res = detect_sources(img, np.ones_like(img), np.zeros(img.shape, bool), cfg)
    assert res.overflow
    assert res.n_objects == 1  # the parent, kept whole
    assert np.count_nonzero(res.labels) > 100


def test_pixel_stack_overflow_is_retried():
    img = _ring(np.random.default_rng(1))
    cfg = DetectionConfig(pixstack=16, max_pixstack=16)  # far too small: grown to the array size
    res = detect_sources(img, np.ones_like(img), np.zeros(img.shape, bool), cfg)
    assert res.n_objects >= 1
    assert not res.overflow
