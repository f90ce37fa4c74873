"""Golden catalogs: fixed runs whose catalog and segmentation map must not change by one bit.

The SHA-256 of every catalog column (name, dtype, bytes) and of the segmentation map of
fixed runs — the demo mosaic and a 2048² GalSim mosaic; the sep and unet deblenders; the
numpy and torch backends; two tilings each — were recorded before the code was
restructured (``tests/data/golden_hashes.json``) and are asserted here. Catalog
*metadata* (configuration layout, software version) is not hashed: only the objects.

Set ``SURVEY_ENGINE_RECORD_GOLDEN=1`` to (re)write the file instead of asserting: do that
only for a change that is meant to change the catalogs, and say so in its commit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from survey_engine import run
from survey_engine.simulate import simulate

GOLDEN = Path(__file__).parent / "data" / "golden_hashes.json"
RECORD = os.environ.get("SURVEY_ENGINE_RECORD_GOLDEN") == "1"

#: (mosaic, simulate options, tilings as (tile, halo, origin)).
MOSAICS = {
    "demo1024": (
        {"size": 1024, "bands": ("g", "r", "i"), "seed": 42, "bright_stars": 1},
        [(512, 96, 0), (300, 96, 77)],
    ),
    "galsim2048": (
        {"size": 2048, "bands": ("g", "r", "i"), "seed": 2048, "masks": True, "bright_stars": 2},
        [(1024, 128, 0), (700, 128, 350)],
    ),
}
#: Modes: (deblender, backend).
MODES = [("sep", "numpy"), ("unet", "numpy"), ("unet", "torch")]


def catalog_digest(catalog: Path, segmentation: Path) -> dict[str, str]:
    """SHA-256 of the catalog's columns (names, dtypes, values) and of the segmentation map."""
    table = pq.read_table(catalog)
    h = hashlib.sha256()
    columns = {}
    for name, col in zip(table.column_names, table.columns, strict=True):
        arr = np.ascontiguousarray(col.to_numpy(zero_copy_only=False))
        h.update(name.encode())
        h.update(str(arr.dtype).encode())
        h.update(arr.tobytes())
        columns[name] = hashlib.sha256(arr.tobytes()).hexdigest()[:12]
    seg = zarr.open_group(str(segmentation), mode="r")["segmentation"][:]
    return {
        "catalog": h.hexdigest(),
        "segmentation": hashlib.sha256(np.ascontiguousarray(seg).tobytes()).hexdigest(),
        "n_objects": table.num_rows,
        "columns": columns,
    }


@pytest.fixture(scope="module")
def client(process_client):
    """Two worker processes (the conftest default is one in-process worker)."""
    return process_client


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory, client):
    root = tmp_path_factory.mktemp("golden")
    out = {}
    for name, (opts, _) in MOSAICS.items():
        path = root / f"{name}.zarr"
        simulate(str(path), client=client, progress=False, **opts)
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def golden():
    if RECORD:
        recorded: dict = {}
        yield recorded
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    yield json.loads(GOLDEN.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("mosaic_name", sorted(MOSAICS))
@pytest.mark.parametrize(("deblender", "backend"), MODES)
def test_catalog_bits_unchanged(mosaics, golden, client, tmp_path, mosaic_name, deblender, backend):
    key = f"{mosaic_name}/{deblender}/{backend}"
    digests = []
    for tile, halo, origin in MOSAICS[mosaic_name][1]:
        res = run(
            mosaics[mosaic_name], tmp_path / f"t{tile}", tile=tile, halo=halo, origin=origin,
            deblender=deblender, backend=backend, client=client, progress=False,
        )  # fmt: skip
        digests.append(catalog_digest(res.catalog_path, res.segmentation_path))
    # Tiling invariance first: both tilings give the same bits.
    assert digests[0] == digests[1], f"{key}: the two tilings differ"
    assert digests[0]["n_objects"] > 100
    if RECORD:
        golden[key] = digests[0]
    else:
        want = golden[key]
        changed = sorted(k for k, v in want["columns"].items() if digests[0]["columns"].get(k) != v)
        assert digests[0] == want, f"{key}: catalog bits changed (columns {changed})"
