"""The part store on an fsspec URL (``memory://``, in this process): parts finished by their
marker, half-written parts ignored and removed on resume, the same bytes as on disk."""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("upath")

from survey_engine.store import MARKER, Footprints, PartStore, StoreError, SurveyStore


def _part(store: PartStore, name: str, n: int = 3) -> None:
    fp = Footprints(np.arange(1, n + 1, dtype=np.int64), np.tile([0, 2, 0, 2], (n, 1)),
                    np.ones(4 * n, bool))  # fmt: skip
    store.write_tile(name, table=pa.table({"id": np.arange(n, dtype=np.int64)}),
                     core_labels=np.full((4, 5), 7, np.int64), footprints=fp,
                     pending=[{"key": f"{name}-1"}], info={"tile": [0, 0], "n": n})  # fmt: skip


@pytest.fixture
def url():
    fs = fsspec.filesystem("memory")
    yield "memory://se-store-test/run"
    if fs.exists("/se-store-test"):
        fs.rm("/se-store-test", recursive=True)


def test_parts_on_a_url_are_finished_by_their_marker(url, tmp_path):
    store = PartStore(url)
    assert store.prepare({"a": 1}, resume=False, overwrite=False)
    for name in ("tile-a", "tile-b"):
        _part(store, name)
    assert store.finished(["tile-a", "tile-b", "tile-c"]) == {"tile-a", "tile-b"}
    assert [t.num_rows for t in store.catalog_tables(["tile-a", "tile-b"])] == [3, 3]
    assert store.pending(["tile-a", "tile-b"]) == [{"key": "tile-a-1"}, {"key": "tile-b-1"}]
    assert np.array_equal(store.core_labels("tile-a", (4, 5)), np.full((4, 5), 7))
    assert list(store.footprint_boxes(["tile-a"])) == ["tile-a"]
    assert np.array_equal(store.footprints("tile-b").ids, [1, 2, 3])
    # the same files, byte for byte, as a local run directory holds
    local = PartStore(tmp_path / "run")
    local.prepare({"a": 1}, resume=False, overwrite=False)
    _part(local, "tile-a")
    fs = store.fs
    for f in ("catalog.parquet", "labels.bin", "footprints.npz", "pending.json", MARKER):
        assert (
            fs.cat_file(store._key("parts", "tile-a", f))
            == (local.parts / "tile-a" / f).read_bytes()
        )

    # a part cut short (no marker) is not finished, and a resumed run removes its files
    fs.rm_file(store._key("parts", "tile-b", MARKER))
    assert store.finished(["tile-a", "tile-b"]) == {"tile-a"}
    again = PartStore(url)
    assert not again.prepare({"a": 1}, resume=True, overwrite=False)
    assert not fs.exists(store._key("parts", "tile-b", "catalog.parquet"))
    assert fs.exists(store._key("parts", "tile-a", MARKER))
    # another run's parameters, or no flag, are refused as on disk
    with pytest.raises(StoreError, match=r"cannot resume: memory://se-store-test/run holds a "
                       r"different run \(differs in a\)"):  # fmt: skip
        PartStore(url).prepare({"a": 2}, resume=True, overwrite=False)
    with pytest.raises(StoreError, match="is not empty"):
        PartStore(url).prepare({"a": 1}, resume=False, overwrite=False)
    assert PartStore(url).prepare({"a": 2}, resume=False, overwrite=True)
    assert PartStore(url).finished(["tile-a"]) == set()


def test_survey_store_on_a_url(url):
    store = SurveyStore(url)
    store.prepare({"s": 1}, resume=False, overwrite=False)
    names = store.tract_catalog(3)
    staged = store.stage_dataset(*names)
    assert staged == f"{url}/catalog/tract=3"  # no rename on an object store: written in place
    from survey_engine.catalog import read_catalog, write_parquet_atomic

    write_parquet_atomic(pa.table({"id": [2, 1]}), f"{staged}/part-00000.parquet")
    write_parquet_atomic(pa.table({"id": [3]}), f"{staged}/part-00001.parquet")
    assert store.finished_tracts() == set()  # not published yet
    store.publish_dataset(staged, *names, schema=pa.schema([("id", pa.int64())]))
    assert store.finished_tracts() == {3}
    cat = read_catalog(url)
    assert list(cat["id"]) == [1, 2, 3] and list(cat["tract"]) == [3, 3, 3]
    assert store.tract(3).url == f"{url}/tracts/3"
    store.prepare({"s": 1}, resume=True, overwrite=False)
    with pytest.raises(StoreError, match="holds a different survey run"):
        store.prepare({"s": 2}, resume=True, overwrite=False)
