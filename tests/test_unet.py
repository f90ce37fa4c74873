"""The U-Net deblender: model, training data, training loop, tiled inference, instances."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal
from scipy import ndimage

from survey_engine.kernels.detect import DetectionConfig, DetectionResult
from survey_engine.unet import data as udata
from survey_engine.unet.infer import (
    UNetConfig,
    UNetOutput,
    extract_instances,
    predict,
    predict_window,
    unet_detect,
)
from survey_engine.unet.model import (
    DEFAULT_WEIGHTS,
    UNet,
    load_model,
    model_pad,
    normalise_input,
    receptive_radius,
    save_model,
)
from survey_engine.unet.train import _dihedral_points, _dihedral_tables, make_targets, train

TINY = {"levels": 2, "base_channels": 8}
REPO = Path(__file__).resolve().parents[1]


def _tiny_model(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(TINY)
    # Non-trivial BatchNorm statistics, so eval mode is not the identity.
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("unet") / "tiny.npz"
    udata.generate_training_set(path, samples=96, seed=3, library_size=48, progress=False)
    return path


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory, tiny_set) -> Path:
    """A tiny model trained for a few seconds on the tiny set."""
    out = tmp_path_factory.mktemp("unet_model") / "tiny.pt"
    train(
        tiny_set,
        out,
        epochs=6,
        batch_size=16,
        device="cpu",
        val_fraction=0.25,
        seed=1,
        config=TINY,
        lr=5e-3,
        progress=False,
    )
    return out


# --- model -------------------------------------------------------------------------------


def test_receptive_radius_is_exact():
    model = _tiny_model()
    r = receptive_radius(model.config)
    assert r == 23
    assert model_pad(model) == r + 1
    x = torch.randn(1, 1, 96, 96)
    with torch.no_grad():
        ref = model(normalise_input(x, model.config))
    reached = False
    for p in range(40, 44):  # every alignment on the 4-pixel pooling grid
        for d, must_change in ((r + 1, False), (r + 2, False), (r, None)):
            for sign in (1, -1):
                x2 = x.clone()
                x2[0, 0, p + sign * d, 50] += 50.0
                with torch.no_grad():
                    out = model(normalise_input(x2, model.config))
                changed = bool((out[0, :, p, 50] != ref[0, :, p, 50]).any())
                if must_change is False:
                    assert not changed, (p, d, sign)
                elif changed:
                    reached = True
    assert reached  # the radius is tight for some alignment


def test_default_architecture_size():
    model = UNet()
    assert model.n_parameters < 1_000_000  # a few MB of float32 weights
    assert receptive_radius(model.config) == 51
    assert model.alignment == 8


def test_save_load_round_trip(tmp_path):
    model = _tiny_model()
    path = save_model(model, tmp_path / "m.pt", info={"note": "test", "when": np.float32(1.5)})
    loaded = load_model(path)
    assert loaded.config == model.config
    assert loaded.info["note"] == "test"
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(
        ValueError, match="not a survey_engine U-Net checkpoint: torch cannot read it"
    ):
        load_model(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="format tag"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="levels must be a positive integer"):
        UNet({"levels": 0})
    with pytest.raises(ValueError, match="unknown U-Net config keys"):
        UNet({"depth": 3})
    with pytest.raises(TypeError, match=r"must be a survey_engine\.unet\.UNet"):
        save_model(torch.nn.Conv2d(1, 1, 1), tmp_path / "x.pt")


# --- prediction --------------------------------------------------------------------------


def test_predict_batch_equals_one_by_one():
    model = _tiny_model()
    x = normalise_input(torch.randn(5, 1, 48, 64) * 3, model.config)
    batch = predict(model, x, batch_size=5)
    for i in range(5):
        one = predict(model, x[i : i + 1], batch_size=1)
        assert_allclose(one.foreground[0], batch.foreground[i], rtol=1e-5, atol=1e-6)
        assert_allclose(one.centre[0], batch.centre[i], rtol=1e-5, atol=1e-6)
        assert_allclose(one.offset[0], batch.offset[i], rtol=1e-5, atol=1e-5)
    assert batch.foreground.shape == (5, 48, 64)
    assert batch.offset.shape == (5, 2, 48, 64)


def test_predict_errors():
    model = _tiny_model()
    with pytest.raises(ValueError, match=r"images must be \(B, 1, H, W\)"):
        predict(model, np.zeros((32, 32), np.float32))
    with pytest.raises(ValueError, match="multiples of 4"):
        predict(model, np.zeros((1, 1, 30, 32), np.float32))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        predict(model, np.zeros((1, 1, 32, 32), np.float32), batch_size=0)
    with pytest.raises(TypeError, match=r"must be a survey_engine\.unet\.UNet"):
        predict("model.pt", np.zeros((1, 1, 32, 32), np.float32))


# --- instances ---------------------------------------------------------------------------


def _two_blob_maps(h=40, w=60, centres=((20, 22), (21, 31)), radius=7):
    yy, xx = np.mgrid[:h, :w]
    fg = np.zeros((h, w), np.float32)
    cen = np.zeros((h, w), np.float32)
    d = []
    for cy, cx in centres:
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        fg[r2 <= radius**2] = 0.9
        cen = np.maximum(cen, np.exp(-r2 / 2.0) * 0.95)
        d.append(r2)
    near = np.argmin(np.stack(d), axis=0)  # each pixel points at its nearer centre
    c = np.array(centres, np.float32)
    off = np.stack([c[near, 0] - yy, c[near, 1] - xx]).astype(np.float32)
    return UNetOutput(fg, cen, off)


def test_extract_instances_splits_touching_blobs():
    maps = _two_blob_maps()
    res = extract_instances(maps, foreground_threshold=0.5, centre_threshold=0.3)
    assert isinstance(res, DetectionResult)
    assert res.n_objects == 2
    assert res.parents.max() == 1
    assert_array_equal(res.parent, [1, 1])
    assert_array_equal(res.n_children, [2, 2])
    assert res.labels[20, 22] != res.labels[21, 31]
    assert res.labels[20, 22] > 0 and res.labels[21, 31] > 0
    # Every pixel goes to the centre its offset points at.
    assert (res.labels[:, :26][res.labels[:, :26] > 0] == res.labels[20, 22]).all()
    assert_array_equal(res.parents > 0, res.labels > 0)


def test_extract_instances_isolated_peakless_small_and_masked():
    maps = _two_blob_maps(centres=((10, 10), (30, 45)), radius=4)
    # A peakless blob and a tiny blob with a peak.
    maps.foreground[2:6, 30:36] = 0.9
    maps.foreground[35, 5] = 0.9
    maps.centre[35, 5] = 0.9
    res = extract_instances(maps, foreground_threshold=0.5, centre_threshold=0.3, minarea=5)
    assert res.n_objects == 2
    assert_array_equal(res.n_children, [1, 1])
    assert res.labels[2:6, 30:36].max() == 0
    assert res.labels[35, 5] == 0
    bad = np.zeros(maps.foreground.shape, bool)
    bad[5:16, 5:16] = True  # masks the first object with its peak
    res = extract_instances(maps, bad, foreground_threshold=0.5, centre_threshold=0.3)
    assert res.n_objects == 1
    assert res.labels[bad].max() == 0


def test_extract_instances_plateau_gives_one_peak():
    maps = _two_blob_maps(centres=((20, 20), (20, 40)), radius=5)
    maps.centre[:] = 0.0
    maps.centre[20, 20:22] = 0.8  # a two-pixel plateau
    maps.centre[19:21, 40] = 0.8
    res = extract_instances(maps, foreground_threshold=0.5, centre_threshold=0.3)
    assert res.n_objects == 2
    assert_array_equal(res.n_children, [1, 1])


def test_extract_instances_errors():
    maps = _two_blob_maps()
    with pytest.raises(ValueError, match="maps must hold"):
        extract_instances(UNetOutput(maps.foreground, maps.centre, maps.offset[0]))
    with pytest.raises(ValueError, match="bad must have the maps' shape"):
        extract_instances(maps, np.zeros((3, 3), bool))


def _structured_image(shape, seed):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal(shape).astype(np.float32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(40):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        amp, s = rng.uniform(3, 60), rng.uniform(1.0, 4.0)
        img += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return img


def _objects(res: DetectionResult, origin, box):
    """Objects (sets of mosaic pixels) whose parent's bounding box lies inside ``box``.

    ``box = (y0, y1, x0, x1)`` in the result's window coordinates.
    """
    out = set()
    slices = ndimage.find_objects(res.parents)
    for lab in range(1, res.n_objects + 1):
        s = slices[res.parent[lab - 1] - 1]
        if s[0].start < box[0] or s[0].stop > box[1] or s[1].start < box[2] or s[1].stop > box[3]:
            continue
        ys, xs = np.nonzero(res.labels == lab)
        out.add(frozenset(zip((ys + origin[0]).tolist(), (xs + origin[1]).tolist(), strict=True)))
    return out


def test_unet_detect_is_window_independent():
    model = _tiny_model(seed=1)
    img = _structured_image((200, 220), seed=2)
    var = np.ones_like(img)
    bad = np.zeros(img.shape, bool)
    bad[120:124, :] = True
    cfg = UNetConfig(patch=96, batch_size=3)
    full_maps = predict_window(model, img, var, bad, cfg=cfg)
    # Thresholds that give a rich set of (blended) components for this random network.
    fg_t = float(np.quantile(full_maps.foreground, 0.65))
    c_t = float(np.quantile(full_maps.centre[full_maps.foreground > fg_t], 0.7))
    cfg = UNetConfig(patch=96, batch_size=3, foreground_threshold=fg_t, centre_threshold=c_t)
    full = unet_detect(img, var, bad, model=model, cfg=cfg)
    g = model_pad(model) + 1  # parents this far inside a window are window-independent
    for oy, ox, h, w in ((13, 21, 170, 180), (5, 3, 150, 200), (30, 30, 160, 160)):
        win = (slice(oy, oy + h), slice(ox, ox + w))
        maps = predict_window(model, img[win], var[win], bad[win], cfg=cfg, origin=(oy, ox))
        inner = (slice(g, h - g), slice(g, w - g))
        ref = (slice(oy + g, oy + h - g), slice(ox + g, ox + w - g))
        assert_array_equal(maps.foreground[inner], full_maps.foreground[ref])
        assert_array_equal(maps.centre[inner], full_maps.centre[ref])
        assert_array_equal(maps.offset[:, inner[0], inner[1]], full_maps.offset[:, ref[0], ref[1]])
        sub = unet_detect(img[win], var[win], bad[win], model=model, cfg=cfg, origin=(oy, ox))
        got = _objects(sub, (oy, ox), (g, h - g, g, w - g))
        expected = _objects(full, (0, 0), (oy + g, oy + h - g, ox + g, ox + w - g))
        assert len(got) >= 10
        assert got == expected
        n_blended = sum(
            sub.n_children[sub.labels[tuple(np.array(next(iter(o))) - (oy, ox))] - 1] > 1
            for o in got
        )
        assert n_blended >= 5
    # Without the mosaic origin the patch grid moves and the maps differ.
    oy, ox, h, w = 13, 21, 170, 180
    win = (slice(oy, oy + h), slice(ox, ox + w))
    maps = predict_window(model, img[win], var[win], bad[win], cfg=cfg, origin=(0, 0))
    assert not np.array_equal(maps.foreground[g:-g, g:-g], full_maps.foreground[win][g:-g, g:-g])


def test_unet_detect_masked_and_errors():
    model = _tiny_model()
    img = np.ones((64, 64), np.float32)
    res = unet_detect(img, np.ones_like(img), np.ones(img.shape, bool), model=model)
    assert res.n_objects == 0 and res.labels.shape == (64, 64)
    res = unet_detect(img, np.full(img.shape, np.inf), np.zeros(img.shape, bool), model=model)
    assert res.n_objects == 0
    res = unet_detect(
        img, np.ones_like(img), np.zeros(img.shape, bool), model=model, cfg=DetectionConfig()
    )
    assert isinstance(res, DetectionResult)
    with pytest.raises(ValueError, match="must have the same shape"):
        unet_detect(img, np.ones((3, 3)), np.zeros(img.shape, bool), model=model)
    with pytest.raises(ValueError, match="det_image must be 2-D"):
        unet_detect(img[None], img[None], img[None] > 0, model=model)
    with pytest.raises(ValueError, match="origin must be two non-negative integers"):
        unet_detect(img, img, img > 5, model=model, origin=(-1, 0))
    with pytest.raises(TypeError, match="cfg must be a UNetConfig"):
        unet_detect(img, img, img > 5, model=model, cfg={"minarea": 3})
    with pytest.raises(ValueError, match="patch 16 too small"):
        unet_detect(img, img, img > 5, model=model, cfg=UNetConfig(patch=16))
    with pytest.raises(ValueError, match="centre_threshold must be a probability"):
        UNetConfig(centre_threshold=1.5)
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        UNetConfig(device="tpu")


# --- training data -----------------------------------------------------------------------


def test_dihedral_transforms_agree():
    size = 12
    tables = _dihedral_tables(size)
    a = np.zeros((1, size, size), np.float32)
    a[0, 3, 8] = 1.0
    for t in range(8):
        b, cy, cx = udata._dihedral(a, 3.0, 8.0, t)
        assert b[0, int(cy), int(cx)] == 1.0
        flat = torch.from_numpy(a.reshape(-1))[tables[t]].reshape(size, size).numpy()
        assert_array_equal(flat, b[0])
        ty, tx = _dihedral_points(
            torch.tensor([[3.0]]), torch.tensor([[8.0]]), torch.tensor([t]), size
        )
        assert (float(ty), float(tx)) == (cy, cx)


def test_training_set_deterministic_and_compact(tmp_path, tiny_set):
    zpath = udata.generate_training_set(
        tmp_path / "tiny.zarr", samples=96, seed=3, library_size=48, progress=False
    )
    z = udata.load_training_set(zpath)
    n = udata.load_training_set(tiny_set, progress=False)
    for name in udata.TrainingSet._ARRAYS:
        assert_array_equal(getattr(z, name), getattr(n, name), err_msg=name)
    assert z.image.shape == (96, 1, 64, 64) and z.image.dtype == np.float32
    assert z.model.shape == (96, 1, 64, 64)
    assert not (z.owner.astype(bool) & ~z.foreground).any()  # owned pixels are foreground
    assert 0.02 < z.foreground.mean() < 0.6
    assert z.detectable.any(axis=1).mean() > 0.5
    k = np.arange(udata.MAX_OBJECTS)
    assert (
        z.owner.max(axis=(1, 2)) <= (np.isfinite(z.centres[..., 0]) * (k + 1)).max(axis=1)
    ).all()
    # Another seed gives other blends; more samples can be composed from the library.
    other = udata.load_training_set(tiny_set, seed=4, progress=False)
    assert not np.array_equal(other.model, n.model)
    more = udata.load_training_set(zpath, samples=120, progress=False)
    assert len(more) == 120


def test_training_set_errors(tmp_path, tiny_set):
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        udata.generate_training_set(tmp_path / "x.npz", samples=0)
    with pytest.raises(FileExistsError, match="already exists"):
        udata.generate_training_set(tiny_set, samples=4)
    with pytest.raises(TypeError, match="unknown compose options"):
        udata.generate_training_set(tmp_path / "y.npz", samples=4, spacing=3)
    with pytest.raises(FileNotFoundError, match="training set not found"):
        udata.load_training_set(tmp_path / "none.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a U-Net training set"):
        udata.load_training_set(tmp_path / "other.npz")


def test_make_targets():
    fg = torch.zeros(1, 16, 16, dtype=torch.bool)
    fg[0, 4:12, 4:12] = True
    owner = torch.zeros(1, 16, 16, dtype=torch.uint8)
    owner[0, 4:12, 4:8] = 1
    owner[0, 4:12, 8:12] = 2
    centres = torch.tensor([[[7.3, 5.6], [8.0, 10.2], [float("nan")] * 2]])
    detectable = torch.tensor([[True, True, False]])
    t = make_targets(fg, owner, centres, detectable, centre_sigma=1.0)
    assert t["heatmap"][0, 7, 6] == 1.0 and t["heatmap"][0, 8, 10] == 1.0
    assert int((t["heatmap"] == 1.0).sum()) == 2
    assert_allclose(t["offset"][0, :, 4, 4].numpy(), [3.3, 1.6], rtol=1e-6)
    assert_allclose(t["offset"][0, :, 11, 11].numpy(), [-3.0, -0.8], rtol=1e-5)
    assert t["offset"][0, :, 0, 0].abs().sum() == 0
    assert t["owned"].sum() == 64


# --- training ----------------------------------------------------------------------------


def test_tiny_model_trains_and_loss_falls(tmp_path, tiny_set, trained_tiny):
    out = trained_tiny
    history = load_model(out).info["history"]
    assert len(history) == 6
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert 0.0 <= history[-1]["val_iou"] <= 1.0
    model = load_model(out)
    assert model.config["levels"] == 2
    assert model.info["epochs"] == 6 and len(model.info["history"]) == 6
    assert model.config["target"]["nu_min"] == 5.0
    # Fine-tuning from the checkpoint keeps its architecture.
    hist = train(tiny_set, tmp_path / "ft.pt", epochs=1, batch_size=32, init=out, progress=False)
    assert len(hist) == 1
    assert load_model(tmp_path / "ft.pt").info["init"] == str(out)


def test_train_errors(tmp_path, tiny_set):
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        train(tiny_set, tmp_path / "m.pt", epochs=0)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        train(tiny_set, tmp_path / "m.pt", val_fraction=1.0)
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        train(tiny_set, tmp_path / "m.pt", device="mps")
    with pytest.raises(FileNotFoundError, match="training set not found"):
        train(tmp_path / "none.npz", tmp_path / "m.pt")


def test_training_code_needs_no_galsim_sep_or_zarr(tiny_set, tmp_path):
    code = (
        "import sys, types\n"
        "for name in ('galsim', 'sep', 'zarr', 'astropy', 'dask'):\n"
        "    sys.modules[name] = None\n"
        "pkg = types.ModuleType('survey_engine'); pkg.__path__ = ['survey_engine']\n"
        "sys.modules['survey_engine'] = pkg\n"
        "from survey_engine.unet.train import main\n"
        f"main([{str(tiny_set)!r}, {str(tmp_path / 'gpu.pt')!r}, '--epochs', '1',"
        " '--levels', '2', '--base-channels', '4', '--no-progress', '--device', 'cpu'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "gpu.pt").is_file()


# --- the shipped model -------------------------------------------------------------------


def _draw_pair(sep_px: float, seed: int = 0):
    from astropy.table import Table

    from survey_engine.simulate._bands import band_setups
    from survey_engine.simulate._draw import DrawConfig, finish_band, object_plan, render_block

    setups = band_setups(("r",), depth=26.8, psf="kolmogorov", psf_fwhm=0.7, pixel_scale=0.2)
    n = 96
    ys = np.array([47.3, 47.3 + 0.3 * sep_px])
    xs = np.array([45.2, 45.2 + 0.95 * sep_px])
    truth = Table(
        {
            "id": [1, 2],
            "x": xs,
            "y": ys,
            "kind": ["galaxy", "galaxy"],
            "r_flux": 10 ** (-0.4 * (np.array([22.0, 22.6]) - 28.0)),
            "disk_hlr": [0.35, 0.3],
            "bulge_hlr": [0.15, 0.12],
            "bulge_fraction": [0.2, 0.1],
            "e1": [0.1, -0.05],
            "e2": [0.05, 0.1],
        }
    )
    cfg = DrawConfig(setups, 0.2, "kolmogorov", seed, None, None)
    model, _ = render_block(object_plan(truth, setups, 0.2), 0, n, 0, n, cfg)
    image, variance, mask = finish_band(model[0], setups[0], (0, 0), 0, 0, cfg)
    return image, variance, mask != 0, np.stack([ys, xs], axis=1)


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="no shipped U-Net weights")
def test_shipped_model_finds_both_members_of_a_pair():
    model = load_model()
    assert model_pad(model) >= receptive_radius(model.config)
    image, variance, bad, truth = _draw_pair(sep_px=7.0)
    res = unet_detect(image, variance, bad)  # the shipped model
    assert res.n_objects == 2
    assert_array_equal(res.n_children, [2, 2])
    found = []
    for lab in (1, 2):
        yy, xx = np.nonzero(res.labels == lab)
        wgt = np.clip(image[yy, xx], 0, None)
        found.append((np.average(yy, weights=wgt), np.average(xx, weights=wgt)))
    found = np.array(sorted(found, key=lambda p: p[1]))
    assert_allclose(found, truth, atol=1.5)


def test_noisy_significance_matches_detection_image():
    from survey_engine.kernels.detect import detection_image

    rng = np.random.default_rng(0)
    model = torch.from_numpy(rng.exponential(3.0, (2, 3, 16, 16)).astype(np.float32))
    sky = torch.tensor([[0.1, 0.2, 0.4], [0.3, 0.1, 0.2]])
    srcn = torch.tensor([[0.01, 0.02, 0.005], [0.0, 0.1, 0.03]])
    sig = udata.noisy_significance(model, sky, srcn, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(model.shape, generator=torch.Generator().manual_seed(5)).numpy()
    m, s, k = model.numpy(), sky.numpy()[:, :, None, None], srcn.numpy()[:, :, None, None]
    v = 1 + k * m
    images = s * (m + np.sqrt(v) * noise)
    variances = s * s * v
    for i in range(2):
        img, var = detection_image(images[i], variances[i], np.ones(images[i].shape, bool))
        assert_allclose(sig[i, 0].numpy(), img / np.sqrt(var), rtol=2e-4, atol=2e-4)


def test_multiband_training_set(tmp_path):
    path = udata.generate_training_set(
        tmp_path / "gr.npz", samples=8, seed=1, bands=("g", "r"), library_size=8, progress=False
    )
    ts = udata.load_training_set(path, progress=False)
    assert ts.model.shape == (8, 2, 64, 64)
    assert ts.det_weights.shape == (8, 2)
    sig = udata.noisy_significance(
        torch.from_numpy(ts.model),
        torch.from_numpy(ts.sky_sigma),
        torch.from_numpy(ts.source_noise),
    )
    assert sig.shape == (8, 1, 64, 64) and bool(torch.isfinite(sig).all())


def test_package_exports_are_lazy():
    import survey_engine.unet as unet

    assert unet.unet_detect is unet_detect
    assert unet.load_model is load_model
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        _ = unet.nothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_requested_without_cuda():
    model = _tiny_model()
    img = np.zeros((32, 32), np.float32)
    with pytest.raises(ValueError, match="CUDA is not available"):
        unet_detect(img, img + 1, img > 0, model=model, cfg=UNetConfig(device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inference_matches_cpu():
    model = _tiny_model()
    x = normalise_input(torch.randn(4, 1, 64, 64) * 3, model.config)
    cpu = predict(model, x, batch_size=4)
    gpu = predict(model, x, batch_size=4, device="cuda", amp=False)
    assert_allclose(gpu.foreground, cpu.foreground, rtol=1e-3, atol=1e-4)
    assert_allclose(gpu.offset, cpu.offset, rtol=1e-3, atol=1e-3)
    bf16 = predict(model, x, batch_size=4, device="cuda")  # autocast bfloat16
    assert_allclose(bf16.foreground, cpu.foreground, atol=3e-2)
    model.to("cpu")
