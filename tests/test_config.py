"""Run defaults from the Dask configuration (``survey_engine.*``), overridden by arguments."""

from __future__ import annotations

import dask.config
import pytest
import yaml
from _util import blob_mosaic
from click.testing import CliRunner

from survey_engine import read_catalog, run
from survey_engine.cli import main
from survey_engine.config import (
    CONFIG_FILE,
    EXECUTION_KEYS,
    SCIENCE_KEYS,
    ExecutionConfig,
    ScienceConfig,
)


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    return blob_mosaic(tmp_path_factory.mktemp("m") / "m.zarr", (128, 128), n=15, seed=2)


def test_shipped_defaults_match_the_pipeline_defaults():
    with open(CONFIG_FILE) as f:
        shipped = yaml.safe_load(f)["survey_engine"]
    assert dask.config.get("survey_engine.tile") is shipped["tile"] is None  # chosen per run
    assert dask.config.get("survey_engine.halo") == 128
    d = ScienceConfig().to_dict()
    flat = {**d, **d["detection"], **d["measure"], **ExecutionConfig().to_dict()}
    for key in SCIENCE_KEYS + EXECUTION_KEYS:
        assert shipped[key.replace("_", "-")] == flat[key], key


def test_dask_config_sets_the_default_and_arguments_win(mosaic, client, tmp_path):
    with dask.config.set({"survey_engine.tile": 48, "survey_engine.halo": 20,
                          "survey_engine.thresh": 3.0}):  # fmt: skip
        res = run(mosaic, tmp_path / "a", client=client, progress=False)
        explicit = run(mosaic, tmp_path / "b", tile=64, thresh=2.0, client=client, progress=False)
    meta = read_catalog(res.catalog_path).meta
    assert meta["tile"] == [48, 48] and meta["halo"] == 20
    assert meta["science"]["detection"]["thresh"] == 3.0
    assert res.n_tiles == 9
    meta = read_catalog(explicit.catalog_path).meta
    assert meta["tile"] == [64, 64] and meta["halo"] == 20
    assert meta["science"]["detection"]["thresh"] == 2.0
    # Outside the block the shipped defaults are back: a 128² mosaic, one worker → 512 px.
    res = run(mosaic, tmp_path / "c", client=client, progress=False)
    meta = read_catalog(res.catalog_path).meta
    assert meta["tile"] == [512, 512] and meta["halo"] == 128
    assert meta["science"]["detection"]["thresh"] == 1.5


def test_an_explicit_science_config_is_not_overridden_by_the_dask_config(mosaic, client, tmp_path):
    cfg = ScienceConfig.from_dict({"detection": {"thresh": 2.5}})
    with dask.config.set({"survey_engine.thresh": 4.0, "survey_engine.minarea": 9}):
        res = run(mosaic, tmp_path, tile=64, science=cfg, client=client, progress=False)
    meta = read_catalog(res.catalog_path).meta
    det = meta["science"]["detection"]
    assert det["thresh"] == 2.5 and det["minarea"] == 5
    # Execution parameters are stored beside the science ones, not mixed with them.
    assert meta["execution"]["backend"] == "numpy" and "backend" not in meta["science"]
    assert meta["kernels"] == {"backend": "numpy", "device": "cpu", "unet_batch_size": None,
                               "unet_amp": None, "measure_dtype": "float64"}  # fmt: skip


def test_science_parameters_by_name_reach_their_part():
    s = ScienceConfig().with_params(thresh=2.0, apertures=(2.5, 5.0), detection_band="r")
    assert s.detection.thresh == 2.0 and s.measure.apertures == (2.5, 5.0)
    assert s.detection_band == "r" and s.detection.minarea == 5
    with pytest.raises(TypeError, match=r"unknown science parameter 'thresold'; known: .*thresh"):
        ScienceConfig().with_params(thresold=2.0)
    assert ScienceConfig.from_dict(s.to_dict()) == s


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"backend": "jax"}, ValueError, r"unknown backend 'jax'; available: 'numpy', 'torch'"),
        ({"device": "tpu"}, ValueError, r"device must be 'cpu' or 'cuda'"),
        ({"measure_dtype": "float16"}, ValueError, r"measure_dtype must be 'float64' or 'float32'"),
        ({"tile_batch": 0}, ValueError, r"tile_batch must be a positive integer, got 0"),
        ({"workers": -1}, ValueError, r"workers must be a positive integer, got -1"),
        ({"deblender": "scarlet"}, ValueError, r"unknown deblender 'scarlet'; available: 'sep', 'unet'"),
        ({"deblender": "sep", "backend": "torch"}, ValueError,
         r"the torch backend \(and --gpu\) runs the unet deblender; got deblender='sep'"),
        ({"deblender": "sep", "unet_model": "m.pt"}, ValueError,
         r"unet_model \(--model\) is a U-Net checkpoint for --deblender unet"),
        ({"thresh": -1.0}, ValueError, r"thresh must be a positive number of sigma"),
        ({"detection_band": "q"}, KeyError, r"unknown band 'q'"),
        ({"deblender": "unet", "halo": 32}, ValueError, r"halo must be ≥ 65 pixels for the unet deblender"),
        ({"gpu": True, "device": "cpu"}, ValueError, r"gpu=True runs on CUDA; got device='cpu'"),
        ({"gpu": True, "backend": "numpy"}, ValueError, r"gpu=True runs the torch backend"),
        ({"colour": "red"}, TypeError, r"unknown run parameter 'colour': neither an execution"),
    ],
)
def test_invalid_parameters_are_refused_in_one_place_naming_them(mosaic, kwargs, exc, match):
    from survey_engine import open_mosaic
    from survey_engine.driver import resolve_run

    with pytest.raises(exc, match=match):
        resolve_run(open_mosaic(mosaic), **kwargs)


def test_resolution_implies_the_unet_for_torch_and_the_gpu(mosaic):
    from survey_engine import open_mosaic
    from survey_engine.driver import resolve_run

    m = open_mosaic(mosaic)
    s = resolve_run(m, backend="torch", halo=80)
    assert s.science.deblender == "unet" and s.execution.backend == "torch"
    s = resolve_run(m, gpu=True, halo=80)
    assert (s.execution.backend, s.execution.device, s.execution.resources) == ("torch", "cuda", {"GPU": 1})
    assert s.guard == s.deblender.receptive_radius() + 5  # the network reaches further than the filter
    with dask.config.set({"survey_engine.backend": "torch"}):
        assert resolve_run(m, halo=80).science.deblender == "unet"


def test_cli_flags_default_to_the_dask_config(mosaic, tmp_path, monkeypatch):
    monkeypatch.setenv("DASK_SURVEY_ENGINE__TILE", "64")
    monkeypatch.setenv("DASK_SURVEY_ENGINE__MINAREA", "7")
    dask.config.refresh()
    try:
        out = tmp_path / "o"
        res = CliRunner().invoke(main, ["run", mosaic, str(out), "--halo", "16", "--workers", "1"])
        assert res.exit_code == 0, res.output
    finally:
        monkeypatch.delenv("DASK_SURVEY_ENGINE__TILE")
        monkeypatch.delenv("DASK_SURVEY_ENGINE__MINAREA")
        dask.config.refresh()
    meta = read_catalog(out / "catalog.parquet").meta
    assert meta["tile"] == [64, 64] and meta["halo"] == 16
    assert meta["science"]["detection"]["minarea"] == 7
    assert dask.config.get("survey_engine.tile") is None
