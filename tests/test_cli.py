"""The command line: real commands on real files, errors with exit status 1."""

import numpy as np
from click.testing import CliRunner

from survey_engine import create_mosaic, read_catalog
from survey_engine.cli import main
from survey_engine.unet import load_model


def _mosaic(path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:200, :220]
    img = rng.normal(0, 1, (200, 220)) + 500 * np.exp(-((xx - 100) ** 2 + (yy - 90) ** 2) / 8.0)
    m = create_mosaic(path, shape=(200, 220), bands=["r"], wcs=None, zero_points=[27.0], chunks=128)
    m.write("r", 0, 0, image=img, variance=np.ones_like(img), mask=np.zeros(img.shape))
    return m


def test_info_describes_the_mosaic(tmp_path):
    _mosaic(str(tmp_path / "m.zarr"))
    res = CliRunner().invoke(main, ["info", str(tmp_path / "m.zarr")])
    assert res.exit_code == 0, res.output
    assert "200 × 220 px" in res.output
    assert "wcs         none" in res.output


def test_run_writes_a_catalog(tmp_path):
    _mosaic(str(tmp_path / "m.zarr"))
    out = tmp_path / "out"
    res = CliRunner().invoke(
        main,
        [
            "run",
            str(tmp_path / "m.zarr"),
            str(out),
            "--tile",
            "100",
            "--halo",
            "32",
            "--workers",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    cat = read_catalog(out / "catalog.parquet")
    assert len(cat) == 1
    assert abs(cat["x"][0].value - 100) < 0.05
    assert "(1 objects)" in res.output
    assert "kernels       numpy on cpu; worker time read " in res.output


def test_run_errors_exit_1_with_the_reason(tmp_path):
    res = CliRunner().invoke(main, ["run", str(tmp_path / "missing.zarr"), str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "mosaic not found" in res.output
    _mosaic(str(tmp_path / "m.zarr"))
    res = CliRunner().invoke(
        main, ["run", str(tmp_path / "m.zarr"), str(tmp_path / "o"), "--halo", "4"]
    )
    assert res.exit_code == 1
    assert "halo must be an integer ≥ 16" in res.output


def test_train_writes_a_loadable_model(tmp_path):
    out = tmp_path / "tiny.pt"
    res = CliRunner().invoke(
        main,
        [
            "train",
            str(out),
            "--samples",
            "200",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "validation IoU" in res.output
    model = load_model(out)
    assert model.info["epochs"] == 1
