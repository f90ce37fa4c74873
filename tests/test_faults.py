"""Failures inside a run: a tile whose kernel raises, an unreadable chunk. Nothing else is lost.

(A worker SIGKILLed mid-run is in ``test_cluster.py``; the driver killed mid-run in
``test_engine.py``.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _util import assert_same_catalog, blob_mosaic

import survey_engine.stages as stages
from survey_engine import read_catalog, run
from survey_engine.driver import RunError
from survey_engine.tiling import make_tiles

SIZE = 256
TILE, HALO = 64, 16


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    return blob_mosaic(tmp_path_factory.mktemp("m") / "m.zarr", (SIZE, SIZE), n=70, seed=11)


@pytest.fixture(scope="module")
def reference(mosaic, client, tmp_path_factory):
    res = run(mosaic, tmp_path_factory.mktemp("ref"), tile=SIZE, halo=32, client=client,
              progress=False)  # fmt: skip
    return read_catalog(res.catalog_path)


def _part_stamps(outdir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in (outdir / "parts").iterdir()}


def test_tile_whose_kernel_raises_is_named_and_resume_retries_only_it(
    mosaic, client, reference, tmp_path, monkeypatch
):
    grid = make_tiles((SIZE, SIZE), TILE, HALO)
    bad = grid[5]
    real = stages.analyse_windows

    def failing(host, windows, *args, **kwargs):
        if bad.read in windows:
            raise FloatingPointError("kernel blew up")
        return real(host, windows, *args, **kwargs)

    monkeypatch.setattr(stages, "analyse_windows", failing)
    with pytest.raises(RunError) as info:
        run(mosaic, tmp_path, tile=TILE, halo=HALO, client=client, progress=False)
    msg = str(info.value)
    assert f"1 task(s) failed: {bad.name}" in msg
    assert f"tile {bad.name} (core y 64:128, x 64:128" in msg
    assert "FloatingPointError: kernel blew up" in msg
    assert "resume=True" in msg
    assert [f.key for f in info.value.failures] == [bad.name]
    # Every other tile finished and kept its part; no catalog was written.
    names = {t.name for t in grid}
    stamps = _part_stamps(tmp_path)
    assert {n for n in stamps if n.startswith("tile-")} == names - {bad.name}
    assert not (tmp_path / "catalog.parquet").exists()

    monkeypatch.setattr(stages, "analyse_windows", real)
    res = run(mosaic, tmp_path, tile=TILE, halo=HALO, client=client, progress=False, resume=True)
    after = _part_stamps(tmp_path)
    assert {k: after[k] for k in stamps} == stamps  # finished parts were not rewritten
    new = set(after) - set(stamps)
    assert bad.name in new
    assert all(n == bad.name or n.startswith(f"retry-{bad.name}-") for n in new)
    assert_same_catalog(reference, read_catalog(res.catalog_path))


def _chunk_file(mosaic: str, band: int, cy: int, cx: int) -> Path:
    path = Path(mosaic) / "image" / "c" / str(band) / str(cy) / str(cx)
    assert path.is_file(), f"no chunk file {path}"
    return path


def test_corrupt_chunk_is_named_and_resume_recovers(mosaic, client, reference, tmp_path):
    copy = str(tmp_path / "copy.zarr")
    shutil.copytree(mosaic, copy)
    chunk = _chunk_file(copy, 1, 2, 1)  # r band, y 128:192, x 64:128 (chunks of 64)
    good = chunk.read_bytes()

    # A fresh run: the background pass reads every pixel and names the unreadable region.
    chunk.write_bytes(b"\x00garbage" * 8)
    with pytest.raises(RunError) as info:
        run(copy, tmp_path / "fresh", tile=TILE, halo=HALO, client=client, progress=False)
    msg = str(info.value)
    assert "background block y 0:256, x 0:256" in msg
    assert f"mosaic {copy}: reading image[bands g,r, y 0:256, x 0:256] failed" in msg

    # The chunk breaks while tiles run: finish a run, lose the parts of the tile whose
    # core holds the chunk, corrupt the chunk, resume.
    chunk.write_bytes(good)
    out = tmp_path / "run"
    run(copy, out, tile=TILE, halo=HALO, client=client, progress=False)
    grid = make_tiles((SIZE, SIZE), TILE, HALO)
    victim = grid[2 * 4 + 1]
    shutil.rmtree(out / "parts" / victim.name)
    (out / "catalog.parquet").unlink()
    stamps = _part_stamps(out)
    chunk.write_bytes(b"\x00garbage" * 8)
    with pytest.raises(RunError) as info:
        run(copy, out, tile=TILE, halo=HALO, client=client, progress=False, resume=True)
    msg = str(info.value)
    assert f"1 task(s) failed: {victim.name}" in msg
    assert f"tile {victim.name} (core y 128:192, x 64:128; read window y 112:208, x 48:144)" in msg
    assert "reading image[bands g,r, y 112:208, x 48:144] failed" in msg

    # Restored: only the failed tile is processed, the catalog is the reference.
    chunk.write_bytes(good)
    res = run(copy, out, tile=TILE, halo=HALO, client=client, progress=False, resume=True)
    after = _part_stamps(out)
    assert {k: after[k] for k in stamps} == stamps
    assert {n for n in set(after) - set(stamps) if not n.startswith("retry-")} == {victim.name}
    assert_same_catalog(reference, read_catalog(res.catalog_path))
