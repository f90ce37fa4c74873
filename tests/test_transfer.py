"""Transfer to another survey (issue 17 item 3): survey conditions of the simulated training
sets, fine-tuning the shipped networks from a few labels, a run's choice of classifier."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from survey_engine.classify import model as cmodel
from survey_engine.classify import pipeline
from survey_engine.classify import train as ctrain
from survey_engine.classify.stamps import STAMP_SIZE
from survey_engine.cli import main
from survey_engine.config import ScienceConfig
from survey_engine.surveys import SURVEYS, resolve_conditions
from survey_engine.unet.model import load_model as load_unet


def _max_change(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


def test_presets_and_overrides_give_the_conditions():
    s = resolve_conditions("sdss")
    assert (s.pixel_scale, s.psf_fwhm, s.depth, s.unet_stamp) == (0.396, (1.2, 1.4, 1.6), 22.5, 32)
    assert s.classify_psf_range == (1.2, 1.6)
    assert s.classify_depth_range == pytest.approx((22.2, 22.8))
    assert resolve_conditions() == SURVEYS["lsst"]
    # no options: exactly the shipped models' training conditions (the simulators' defaults)
    sig = inspect.signature(ctrain.make_stamps).parameters
    lsst = SURVEYS["lsst"].classify_options()
    assert lsst == {k: sig[k].default for k in lsst}
    from survey_engine.unet.data import generate_training_set

    sig = inspect.signature(generate_training_set).parameters
    assert SURVEYS["lsst"].unet_options() == {k: sig[k].default for k in SURVEYS["lsst"].unet_options()}
    c = resolve_conditions("sdss", psf_fwhm="1.3", depth=23.5)
    assert c.name == "sdss+custom" and c.psf_fwhm == (1.3,)
    assert c.classify_psf_range == pytest.approx((1.24, 1.36))
    # magnitude ranges follow the depth (+1 mag); the U-Net's never brighter than 18
    assert c.unet_mag_range == pytest.approx((19.0, 23.7))
    assert c.classify_mag_range == pytest.approx((14.5, 22.6))
    assert resolve_conditions(depth=20.0).unet_mag_range == pytest.approx((18.0, 20.2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"survey": "hst"}, r"survey must be one of \['lsst', 'sdss'\], got 'hst'"),
        ({"pixel_scale": -0.4}, r"pixel_scale must be in \(0, 5\] arcsec per pixel, got -0.4"),
        ({"psf_fwhm": "1.2,abc"}, r"psf_fwhm must be comma-separated FWHMs in arcsec.*'1.2,abc'"),
        ({"psf_fwhm": "0"}, r"psf_fwhm must be comma-separated FWHMs"),
        ({"depth": 40.0}, r"depth must be an r-band 5-sigma depth in \[19, 32\] AB mag, got 40.0"),
    ],
)
def test_bad_conditions_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_conditions(**kwargs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--survey", "hst"], "error: survey must be one of ['lsst', 'sdss'], got 'hst'"),
        (["--pixel-scale", "0"], "error: pixel_scale must be in (0, 5] arcsec per pixel, got 0.0"),
        (["--psf-fwhm", "1.2,x"], "error: psf_fwhm must be comma-separated FWHMs in arcsec, each in (0, 10), "
                                  "got '1.2,x'"),
        (["--depth", "12"], "error: depth must be an r-band 5-sigma depth in [19, 32] AB mag, got 12.0"),
    ],
)
@pytest.mark.parametrize("command", ["train", "train-classifier"])
def test_cli_bad_conditions_fail_with_one_line(tmp_path, command, args, message):
    res = CliRunner().invoke(main, [command, str(tmp_path / "m.pt"), *args])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [message]
    assert not (tmp_path / "m.pt").exists()


def test_cli_train_refuses_conditions_with_a_given_dataset(tmp_path):
    res = CliRunner().invoke(main, ["train", str(tmp_path / "m.pt"), "--dataset", "x.npz", "--survey", "sdss"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "error: --survey describe a simulated training set; --dataset has its own conditions"]


def test_cli_train_fine_tunes_the_unet_for_sdss(tmp_path):
    out = tmp_path / "unet_sdss.pt"
    res = CliRunner().invoke(main, ["train", str(out), "--survey", "sdss", "--samples", "48", "--epochs", "1",
                                    "--init", "default", "--device", "cpu", "--seed", "3"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert 'sdss: 0.396"/px, FWHM 1.2, 1.4, 1.6", depth 22.5' in res.output
    ck = torch.load(out, weights_only=True)
    info = ck["info"]
    # the conditions reached the simulated set: its library was drawn at 0.396"/px, depth 22.5
    assert info["conditions"] == {"pixel_scale": 0.396, "depth": 22.5, "psf_fwhm": [1.2, 1.4, 1.6],
                                  "mag_range": [18.0, 22.7], "stamp": 32}  # fmt: skip
    conds = info["dataset_attrs"]["conditions"]
    assert [c["fwhm_px"] for c in conds] == pytest.approx([1.2 / 0.396, 1.4 / 0.396, 1.6 / 0.396])
    lsst = load_unet(None).info["dataset_attrs"]["conditions"]
    assert conds[1]["sky_sigma"][0] > 50 * lsst[1]["sky_sigma"][0]  # 4.3 mag shallower, 4x pixel area
    assert ck["config"]["target"]["fwhm_px"] == pytest.approx([c["fwhm_px"] for c in conds])
    assert info["init"] == "default" and info["train_samples"] + info["val_samples"] == 48
    # few labels: batches of 16, enough epochs asked for 500 steps (1 here) -- the weights moved
    assert info["batch_size"] == 16 and info["epochs"] == 1
    change = _max_change(ck["state_dict"], load_unet(None).state_dict())
    assert change > 1e-4


def test_cli_train_classifier_records_its_conditions(tmp_path, monkeypatch):
    seen = {}
    real = ctrain.make_stamps

    def spy(n, **kw):
        seen.update(kw, n=n)
        return real(n, **kw)

    monkeypatch.setattr(ctrain, "make_stamps", spy)
    out = tmp_path / "cls_sdss.pt"
    res = CliRunner().invoke(main, ["train-classifier", str(out), "--survey", "sdss", "--psf-fwhm", "1.3",
                                    "--samples", "40", "--epochs", "2", "--init", "default"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert seen["n"] == 40 and seen["pixel_scale"] == 0.396
    assert seen["psf_fwhm_range"] == pytest.approx((1.24, 1.36))
    assert seen["depth_range"] == pytest.approx((22.2, 22.8)) and seen["mag_range"] == (13.5, 21.6)
    m = cmodel.load_model(out)
    assert m.config["pixel_scale"] == 0.396 and m.config["psf_fwhm"] == pytest.approx(1.3)
    assert m.info["conditions"]["pixel_scale"] == 0.396 and m.info["init"] == "default"
    assert m.info["lr"] == 1e-3 and m.info["batch_size"] == 16  # the fine-tuning defaults
    assert m.info["epochs"] == 2
    assert _max_change(m.state_dict(), cmodel.default_model().state_dict()) > 1e-4


def _stamps(n=96, seed=5):
    d = ctrain.make_stamps(n, seed=seed, **SURVEYS["sdss"].classify_options())
    return d["stamps"]


@pytest.fixture(scope="module")
def other_classifier(tmp_path_factory):
    """The shipped classifier with its last layer changed: other values for the same stamps."""
    m = cmodel.load_model(None)
    with torch.no_grad():
        m.head[-1].bias += torch.tensor([2.0, -1.0, 0.5, 0.5, 0.0])
    m.config["pixel_scale"] = 0.396
    return str(cmodel.save_model(m, tmp_path_factory.mktemp("cls") / "other.pt"))


def _meas_and_det(stamps):
    """One 'window' holding the stamps side by side, each object at its stamp centre."""
    n = len(stamps)
    h = STAMP_SIZE // 2
    img = np.concatenate(list(stamps[:, 0]), axis=1)
    var = np.concatenate(list(stamps[:, 1]), axis=1)
    det = SimpleNamespace(det=[img], var=[var])
    meas = SimpleNamespace(columns={"y_peak": np.full(n, h), "x_peak": h + STAMP_SIZE * np.arange(n)})
    return det, [meas]


def test_classify_windows_uses_the_configured_checkpoint(other_classifier):
    stamps = _stamps()
    det, meas = _meas_and_det(stamps)
    pipeline.classify_windows(det, meas, None)
    shipped = dict(meas[0].columns)
    np.testing.assert_array_equal(shipped["p_star"], cmodel.classify_stamps(stamps, cmodel.default_model())["p_star"])
    det, meas = _meas_and_det(stamps)
    pipeline.classify_windows(det, meas, None, ScienceConfig(classifier_model=other_classifier))
    other = meas[0].columns
    expect = cmodel.classify_stamps(stamps, cmodel.load_model(other_classifier))
    np.testing.assert_array_equal(other["p_star"], expect["p_star"])
    assert np.mean(np.abs(other["p_star"] - shipped["p_star"])) > 0.05
    assert np.all(other["bulge_fraction"] != shipped["bulge_fraction"])


def test_radii_are_rescaled_to_the_stamps_pixel_scale():
    stamps = _stamps(64)
    m = cmodel.default_model()  # trained at 0.2"/px
    own = cmodel.classify_stamps(stamps, m)
    same = cmodel.classify_stamps(stamps, m, pixel_scale=0.2)
    sdss = cmodel.classify_stamps(stamps, m, pixel_scale=0.396)
    np.testing.assert_array_equal(own["r_disk_arcsec"], same["r_disk_arcsec"])
    np.testing.assert_allclose(sdss["r_disk_arcsec"], own["r_disk_arcsec"] * 1.98, rtol=1e-6)
    np.testing.assert_allclose(sdss["r_bulge_arcsec"], own["r_bulge_arcsec"] * 1.98, rtol=1e-6)
    np.testing.assert_array_equal(sdss["p_star"], own["p_star"])


def test_a_bad_classifier_checkpoint_is_refused_naming_the_parameter(tmp_path):
    with pytest.raises(ValueError, match=r"classifier_model \(--classifier-model\): classifier weights not found: "):
        cmodel.check_model(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    torch.save({"format": "something else"}, bad)
    with pytest.raises(ValueError, match=r"classifier_model \(--classifier-model\): .* is not a survey_engine "
                                         r"classifier checkpoint"):  # fmt: skip
        cmodel.check_model(str(bad))


def test_run_with_a_bad_classifier_model_fails_with_one_line(tmp_path):
    from test_cli import _mosaic

    _mosaic(str(tmp_path / "m.zarr"))
    res = CliRunner().invoke(main, ["run", str(tmp_path / "m.zarr"), str(tmp_path / "out"), "--classifier-model",
                                    str(tmp_path / "nope.pt"), "--workers", "1"])  # fmt: skip
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: classifier_model (--classifier-model): classifier weights not found")


def test_a_run_with_a_classifier_checkpoint_uses_it(tmp_path, other_classifier, client):
    from test_cli import _mosaic

    from survey_engine import read_catalog, run

    _mosaic(str(tmp_path / "m.zarr"))
    cats = []
    for name, extra in (("a", {}), ("b", {"classifier_model": other_classifier})):
        run(str(tmp_path / "m.zarr"), tmp_path / name, tile=100, halo=32, client=client, progress=False, **extra)
        cats.append(read_catalog(tmp_path / name / "catalog.parquet"))
    assert len(cats[0]) == len(cats[1]) == 1
    assert abs(float(cats[0]["p_star"][0]) - float(cats[1]["p_star"][0])) > 0.01
    assert cats[1].meta["science"]["classifier_model"] == other_classifier
