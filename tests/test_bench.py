"""The benchmark: the numpy-drawn synthetic mosaic, run_benchmark, `survey-engine bench`, --gpu."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from survey_engine import driver, open_mosaic
from survey_engine.bench import STAGES, BenchResult, run_benchmark, synthesize_mosaic
from survey_engine.cli import main
from survey_engine.flags import MaskBit


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _planes(m):
    r = m.read((0, m.ny), (0, m.nx))
    return r.image, r.variance, r.mask


def test_synthesis_is_deterministic_in_seed(tmp_path):
    a = synthesize_mosaic(tmp_path / "a.zarr", 256, ("g", "r"), seed=3)
    b = synthesize_mosaic(tmp_path / "b.zarr", 256, ("g", "r"), seed=3)
    c = synthesize_mosaic(tmp_path / "c.zarr", 256, ("g", "r"), seed=4)
    for pa, pb in zip(_planes(a), _planes(b), strict=True):
        np.testing.assert_array_equal(pa, pb)
    assert a.attrs["synthetic"] == b.attrs["synthetic"]
    assert not np.array_equal(_planes(a)[0], _planes(c)[0])


def test_synthetic_mosaic_layout_wcs_and_content(tmp_path):
    m = synthesize_mosaic(tmp_path / "m.zarr", (1024, 768), ("g", "r", "i"), seed=1, chunks=256)
    assert m.shape == (3, 1024, 768)
    assert m.bands == ("g", "r", "i")
    assert m.chunks == (1, 256, 256)
    assert m.zero_points == {"g": 28.0, "r": 28.0, "i": 28.0}
    assert m.pixel_scale == pytest.approx(0.2)
    assert m.psf_fwhm["g"] > m.psf_fwhm["r"] > m.psf_fwhm["i"] > 0.6
    assert tuple(m.wcs.wcs.ctype) == ("RA---TAN", "DEC--TAN")
    ra, dec = m.pixel_to_sky(np.array([383.5, 384.5]), np.array([511.5, 511.5]))
    assert ra[0] == pytest.approx(150.1, abs=1e-9) and dec[0] == pytest.approx(2.2, abs=1e-9)
    assert (ra[0] - ra[1]) * 3600 * np.cos(np.radians(2.2)) == pytest.approx(0.2, rel=1e-3)
    # 200 objects per Mpx by default: 157 expected; Poisson ± 5σ.
    syn = m.attrs["synthetic"]
    assert 95 <= syn["n_objects"] <= 220, syn
    assert 0 < syn["n_stars"] < syn["n_objects"] and 0 < syn["n_pairs"] < syn["n_objects"] / 4
    image, variance, mask = _planes(m)
    assert image.dtype == np.float32 and variance.dtype == np.float32 and mask.dtype == np.uint16
    assert np.all(np.isfinite(image)) and np.all(variance > 0)
    sky = np.sqrt(np.median(variance, axis=(1, 2)))
    for b, s in enumerate(sky):  # noise of the sky matches the variance plane
        assert syn["sky_sigma"][m.bands[b]] == pytest.approx(s, rel=0.02)
        resid = np.diff(image[b], axis=1)[mask[b][:, 1:] == 0] / np.sqrt(2)
        assert np.median(np.abs(resid)) / 0.6745 == pytest.approx(s, rel=0.1)
    bad = (mask & int(MaskBit.BAD)) != 0
    assert 0 < bad.sum() < 0.01 * mask.size
    assert image.max() > 100 * sky.max()  # real sources on top of the noise


def test_mosaic_opens_with_open_mosaic_and_xarray(tmp_path):
    path = tmp_path / "m.zarr"
    synthesize_mosaic(path, 256, ("r", "i"), seed=2)
    m = open_mosaic(str(path))
    assert m.bands == ("r", "i")
    ds = xr.open_zarr(path)
    assert ds["image"].dims == ("band", "y", "x")
    assert ds["image"].shape == (2, 256, 256)
    np.testing.assert_array_equal(ds["image"].values, m.image[...])


def test_synthesis_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown band 'q'"):
        synthesize_mosaic(tmp_path / "q.zarr", 64, ("q",))
    with pytest.raises(ValueError, match="at least 16 pixels"):
        synthesize_mosaic(tmp_path / "s.zarr", 8)
    synthesize_mosaic(tmp_path / "e.zarr", 64)
    with pytest.raises(FileExistsError):
        synthesize_mosaic(tmp_path / "e.zarr", 64)


def test_run_benchmark_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"the torch backend \(and --gpu\) runs the unet deblender"):
        run_benchmark(64, backend="torch", deblender="sep", workdir=tmp_path)
    with pytest.raises(ValueError, match="repeat must be"):
        run_benchmark(64, repeat=0, workdir=tmp_path)


@pytest.mark.skipif("_cuda()", reason="checks the error on a machine without CUDA")
def test_run_benchmark_gpu_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(driver.RunError, match="no CUDA GPU"):
        run_benchmark(64, gpu=True, workdir=tmp_path)


def _check_result(res: BenchResult, size: int) -> None:
    assert res.pixels == size * size
    assert res.n_objects > 0
    assert res.read_mpx_s > 0 and res.mpx_s > 0 and res.objects_s > 0
    assert res.workers >= 1
    table = res.table()
    for s in STAGES:
        assert s in table
    assert "end to end" in table and "Mpx/s" in table
    d = json.loads(json.dumps(res.to_dict()))
    assert d["mpx_s"] == pytest.approx(res.mpx_s)


@pytest.mark.slow
def test_run_benchmark_reports_rates_and_reuses_the_mosaic(tmp_path):
    res = run_benchmark(size=512, workers=1, workdir=tmp_path)
    _check_result(res, 512)
    assert res.device == "cpu" and res.deblender == "sep"
    assert res.synth_seconds is not None and res.gpu_memory is None
    for s, v in res.stages.items():  # per-stage rates when the engine reports stages
        assert v >= 0 and res.stage_mpx_s[s] > 0
    again = run_benchmark(size=512, workers=1, workdir=tmp_path, repeat=2)
    assert again.synth_seconds is None and len(again.walls) == 2
    assert again.n_objects == res.n_objects


@pytest.mark.slow
def test_bench_command_prints_the_table(tmp_path):
    out = tmp_path / "b.json"
    res = CliRunner().invoke(
        main,
        [
            "bench",
            "--size",
            "512",
            "--workers",
            "1",
            "--workdir",
            str(tmp_path),
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "end to end" in res.output
    for s in STAGES:
        assert s in res.output
    assert json.loads(out.read_text())["pixels"] == 512 * 512


@pytest.mark.slow
def test_benchmark_never_imports_galsim(tmp_path):
    """GPU hosts lack GalSim: a galsim that cannot be imported must not matter (workers too)."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "galsim.py").write_text("raise ImportError('galsim must not be imported')\n")
    code = textwrap.dedent(
        f"""
        import sys
        from survey_engine.bench import run_benchmark
        res = run_benchmark(256, workers=1, workdir={str(tmp_path / "w")!r})
        assert res.n_objects > 0, res
        assert "galsim" not in sys.modules
        print("ok", res.n_objects)
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


@pytest.mark.skipif("_cuda()", reason="checks the error on a machine without CUDA")
def test_run_gpu_without_cuda_exits_1_naming_it(tmp_path):
    synthesize_mosaic(tmp_path / "m.zarr", 128, ("r",))
    res = CliRunner().invoke(main, ["run", str(tmp_path / "m.zarr"), str(tmp_path / "o"), "--gpu"])
    assert res.exit_code != 0
    assert "no CUDA GPU" in res.output


@pytest.mark.gpu
@pytest.mark.skipif("not _cuda()", reason="needs a CUDA device")
def test_run_benchmark_on_the_gpu(tmp_path):
    res = run_benchmark(size=1024, gpu=True, workers=1, workdir=tmp_path)
    _check_result(res, 1024)
    assert res.backend == "torch" and res.deblender == "unet"
    assert res.device not in ("cpu", "cuda")  # the GPU's name
    assert res.gpu_memory is not None and res.gpu_memory > 0
