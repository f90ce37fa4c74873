"""The command line: real commands on real files, errors with exit status 1."""

import numpy as np
import pytest
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


# -- every failure a user can cause: one line "error: …", exit status 1, no traceback ---------
def _one_error_line(res) -> str:
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("error: "), res.output
    assert sum(line.startswith("error: ") for line in lines) == 1
    return lines[-1]


def test_a_path_that_is_not_a_mosaic_says_what_it_is(tmp_path):
    import zarr
    from astropy.io import fits

    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("x")
    fits.writeto(tmp_path / "image.fits", np.zeros((4, 4), np.float32))
    zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2)
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3).attrs["a"] = 1
    d = tmp_path
    expected = {
        "plain": f"error: {d / 'plain'} is not a survey_engine mosaic: no zarr.json",
        "image.fits": f"error: {d / 'image.fits'} is a FITS file, not a mosaic: make a mosaic of "
        f"it first with `survey-engine ingest {d / 'image.fits'} OUT.zarr` (survey_engine.ingest_fits)",
        "v2.zarr": f"error: {d / 'v2.zarr'} is not a survey_engine mosaic: a Zarr v2 store "
        "(survey_engine mosaics are Zarr v3)",
        "other.zarr": f"error: {d / 'other.zarr'} is not a survey_engine mosaic (no "
        "'survey_engine' group attribute)",
        "missing.zarr": f"error: mosaic not found: {d / 'missing.zarr'}",
    }
    for name, line in expected.items():
        assert _one_error_line(CliRunner().invoke(main, ["info", str(d / name)])) == line
    # the same from run (before any cluster starts)
    res = CliRunner().invoke(main, ["run", str(d / "image.fits"), str(d / "out")])
    assert _one_error_line(res) == expected["image.fits"]
    assert not (d / "out").exists()


def test_unknown_band_is_printed_without_quotes(tmp_path):
    from survey_engine.mosaic import UnknownBandError, open_mosaic

    _mosaic(str(tmp_path / "m.zarr"))
    m = open_mosaic(str(tmp_path / "m.zarr"))
    for kind in (KeyError, ValueError, UnknownBandError):  # caught as either
        with pytest.raises(kind, match=r"^unknown band 'z': mosaic .*m\.zarr has bands r$"):
            m.band_index("z")
    res = CliRunner().invoke(
        main, ["run", str(tmp_path / "m.zarr"), str(tmp_path / "o"), "--detection-band", "z"]
    )
    assert _one_error_line(res) == f"error: unknown band 'z': mosaic {tmp_path / 'm.zarr'} has bands r"  # fmt: skip
    with pytest.raises(KeyError) as info:
        create_mosaic(str(tmp_path / "n.zarr"), shape=(4, 4), bands=["r"], wcs=None, zero_points={"g": 1})  # fmt: skip
    assert str(info.value) == "zero_points given for unknown band(s) ['g']; bands are ['r']"


def test_a_corrupt_model_checkpoint_is_not_a_torch_lecture(tmp_path):
    import torch

    _mosaic(str(tmp_path / "m.zarr"))
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04not a checkpoint")
    torch.save({"weights": np.arange(3)}, tmp_path / "pickled.pt")  # needs weights_only=False
    for name in ("junk.pt", "pickled.pt"):
        res = CliRunner().invoke(
            main,
            ["run", str(tmp_path / "m.zarr"), str(tmp_path / "o"), "--deblender", "unet",
             "--model", str(tmp_path / name), "--halo", "96"],
        )  # fmt: skip
        line = _one_error_line(res)
        assert line.startswith(
            f"error: '{tmp_path / name}' is not a survey_engine U-Net checkpoint: torch cannot "
            "read it as plain tensors and settings (UnpicklingError); give a file written by "
            "`survey-engine train`"
        )
        assert "weights_only" not in res.output


def test_demo_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(main, ["demo", "--outdir", str(tmp_path / "d"), "--bands", "q"])
    assert _one_error_line(res) == "error: unknown band 'q': bands must be among u, g, r, i, z, y"


def test_bench_removes_its_temporary_directory(tmp_path, monkeypatch, client):
    import tempfile

    import survey_engine.bench as bench

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    res = CliRunner().invoke(
        main, ["bench", "--size", "128", "--scheduler", client.scheduler.address]
    )
    assert res.exit_code == 0, res.output
    assert "(temporary, removed)" in res.output
    assert list(tmp_path.glob("se_bench_*")) == []

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bench, "synthesize_mosaic", broken)
    res = CliRunner().invoke(
        main, ["bench", "--size", "128", "--scheduler", client.scheduler.address]
    )
    assert _one_error_line(res) == "error: disk full"
    assert list(tmp_path.glob("se_bench_*")) == []
