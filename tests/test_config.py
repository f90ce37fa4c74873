"""Run defaults from the Dask configuration (``survey_engine.*``), overridden by arguments."""

from __future__ import annotations

import dask.config
import pytest
import yaml
from _util import blob_mosaic
from click.testing import CliRunner

from survey_engine import read_catalog, run
from survey_engine.cli import main
from survey_engine.config import CONFIG_FILE, PIPELINE_KEYS
from survey_engine.pipeline import PipelineConfig


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    return blob_mosaic(tmp_path_factory.mktemp("m") / "m.zarr", (128, 128), n=15, seed=2)


def test_shipped_defaults_match_the_pipeline_defaults():
    with open(CONFIG_FILE) as f:
        shipped = yaml.safe_load(f)["survey_engine"]
    assert dask.config.get("survey_engine.tile") == shipped["tile"] == 2048
    assert dask.config.get("survey_engine.halo") == 128
    d = PipelineConfig().to_dict()
    flat = {**d, **d["detection"], **d["measure"]}
    for key in PIPELINE_KEYS:
        assert shipped[key.replace("_", "-")] == flat[key], key


def test_dask_config_sets_the_default_and_arguments_win(mosaic, client, tmp_path):
    with dask.config.set({"survey_engine.tile": 48, "survey_engine.halo": 20,
                          "survey_engine.thresh": 3.0}):  # fmt: skip
        res = run(mosaic, tmp_path / "a", client=client, progress=False)
        explicit = run(mosaic, tmp_path / "b", tile=64, thresh=2.0, client=client, progress=False)
    meta = read_catalog(res.catalog_path).meta
    assert meta["tile"] == [48, 48] and meta["halo"] == 20
    assert meta["config"]["detection"]["thresh"] == 3.0
    assert res.n_tiles == 9
    meta = read_catalog(explicit.catalog_path).meta
    assert meta["tile"] == [64, 64] and meta["halo"] == 20
    assert meta["config"]["detection"]["thresh"] == 2.0
    # Outside the block the shipped defaults are back.
    res = run(mosaic, tmp_path / "c", client=client, progress=False)
    meta = read_catalog(res.catalog_path).meta
    assert meta["tile"] == [2048, 2048] and meta["halo"] == 128
    assert meta["config"]["detection"]["thresh"] == 1.5


def test_an_explicit_pipeline_config_is_not_overridden_by_the_dask_config(mosaic, client, tmp_path):
    cfg = PipelineConfig.from_dict({"detection": {"thresh": 2.5}})
    with dask.config.set({"survey_engine.thresh": 4.0, "survey_engine.minarea": 9}):
        res = run(mosaic, tmp_path, tile=64, config=cfg, client=client, progress=False)
    det = read_catalog(res.catalog_path).meta["config"]["detection"]
    assert det["thresh"] == 2.5 and det["minarea"] == 5


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
    assert meta["config"]["detection"]["minarea"] == 7
    assert dask.config.get("survey_engine.tile") == 2048
