"""The engine in a crowded field: the catalog still independent of the tiling, each object once."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from _util import assert_same_catalog

from survey_engine import read_catalog, run
from survey_engine.simulate import KingCluster, simulate
from survey_engine.tasks import resumed_retry_groups, retry_groups

SIZE = 384


@pytest.fixture(scope="module")
def crowded(tmp_path_factory, process_client):
    """A globular cluster whose core is one giant parent, cut by every tiling below."""
    path = tmp_path_factory.mktemp("crowd") / "crowd.zarr"
    simulate(
        str(path), size=SIZE, bands=("r",), seed=3, chunks=128, progress=False,
        cluster=KingCluster(2500, core_radius=25.0, tidal_radius=180.0), client=process_client,
    )  # fmt: skip
    return str(path)


def _seg(res):
    return zarr.open_group(str(res.segmentation_path), mode="r")["segmentation"][:]


@pytest.mark.slow
@pytest.mark.parametrize("deblender", ["sep", "unet"])
def test_crowded_catalog_identical_for_any_tiling(crowded, process_client, tmp_path, deblender):
    halo = 32 if deblender == "sep" else 72  # the U-Net needs its receptive field
    ref = run(crowded, tmp_path / "whole", tile=SIZE, halo=halo, deblender=deblender,
              client=process_client, progress=False)  # fmt: skip
    cat = read_catalog(ref.catalog_path)
    assert len(cat) > 120
    ids = np.asarray(cat["id"])
    assert len(np.unique(ids)) == len(ids)
    for tile, origin in ((128, 0), (150, 37)):
        out = run(crowded, tmp_path / f"t{tile}", tile=tile, halo=halo, origin=origin,
                  deblender=deblender, client=process_client, progress=False)  # fmt: skip
        # The cluster's parent is cut by several tiles (and leaves some and comes back):
        # their retry items went into fewer groups, and no object came out twice.
        assert out.n_retried >= 1
        assert_same_catalog(cat, read_catalog(out.catalog_path))
        assert np.array_equal(_seg(out), _seg(ref))


def _item(key, box, tile=0):
    return {
        "tile": tile,
        "key": key,
        "mode": "parent",
        "seed": [box[0], box[2]],
        "peaks": [],
        "box": box,
    }


def test_retry_groups_merge_overlapping_boxes_transitively():
    items = [
        _item("a", [0, 10, 0, 10]),
        _item("b", [50, 60, 50, 60]),
        _item("c", [8, 20, 8, 20], tile=1),  # overlaps a
        _item("d", [18, 52, 18, 52], tile=2),  # overlaps c (so a) and b
        _item("e", [100, 110, 0, 10]),  # alone
    ]
    groups = retry_groups(items, max_pixels=10**6)
    assert groups[0]["key"].startswith("a-g4-") and groups[1]["key"] == "e"
    assert [it["key"] for it in groups[0]["items"]] == ["a", "b", "c", "d"]  # in the items' order
    assert groups[0]["box"] == [0, 60, 0, 60]
    # Deterministic: the same items give the same groups (a resumed run finds its parts).
    assert retry_groups(items, max_pixels=10**6) == groups


def test_retry_groups_stop_at_the_size_limit():
    items = [_item("a", [0, 10, 0, 10]), _item("b", [5, 40, 5, 40]), _item("c", [35, 45, 35, 45])]
    groups = retry_groups(items, max_pixels=40 * 40)
    assert [[it["key"] for it in g["items"]] for g in groups] == [["a", "b"], ["c"]]
    assert all((g["box"][1] - g["box"][0]) * (g["box"][3] - g["box"][2]) <= 1600 for g in groups)
    assert retry_groups([], max_pixels=100) == []


def test_resumed_retry_groups_reuse_what_was_written():
    items = [_item("a", [0, 10, 0, 10]), _item("b", [5, 15, 5, 15]), _item("c", [50, 60, 0, 10])]
    first = retry_groups(items[:2], max_pixels=10**6)  # "c"'s tile had failed
    written = {g["key"]: [it["key"] for it in g["items"]] for g in first}
    # Resumed with c's tile done, and an item overlapping the written group: that group is
    # reused as written, the new items grouped among themselves.
    late = _item("d", [8, 30, 8, 30], tile=3)
    groups = resumed_retry_groups([*items, late], written, max_pixels=10**6)
    assert groups[0] == first[0]
    assert [[it["key"] for it in g["items"]] for g in groups[1:]] == [["c"], ["d"]]
    # A written group whose items changed is not reused (its key names its items).
    stale = {first[0]["key"]: ["a", "zz"]}
    again = resumed_retry_groups(items, stale, max_pixels=10**6)
    assert [[it["key"] for it in g["items"]] for g in again] == [["a", "b"], ["c"]]
