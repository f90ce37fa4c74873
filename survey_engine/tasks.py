"""Worker tasks of a run: what one Dask task does, reading its own pixels and writing its part.

* :func:`background_block` — mesh statistics of one block of the mosaic;
* :func:`process_tiles` — the tile stage: analyse tiles, keep the objects each owns,
  write their parts;
* :func:`retry` — measure an owned object group whole in a window grown around it;
* :func:`segmentation_chunk` — one chunk of the segmentation map from the parts;
* :func:`catalog_partition` — one file of the catalog from the parts.

Pixel arrays never travel through the scheduler: every task reads its window from the
Zarr store and writes through the :class:`~survey_engine.store.PartStore`.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import zarr

from . import stages
from .catalog import CatalogLayout, numpy_column, sorted_by, write_parquet_atomic
from .kernels.background import interpolate_background, source_mask
from .mosaic import Mosaic, open_mosaic
from .schema import Flag
from .skymap import GLOBAL_ID_SCHEME, TractRule
from .stages import WindowPlan, WindowResult, usable_pixels
from .store import Footprints, PartStore
from .tiling import Box, Tile, TileGrid

__all__ = ["RepeatedObjects", "TaskContext", "TileError", "background_block", "catalog_of_parts",
           "catalog_partition", "layout_for", "process_tiles", "retry", "segmentation_chunk"]  # fmt: skip

logger = logging.getLogger(__name__)

#: Windows of a batch read concurrently (Zarr decompression releases the GIL).
READ_THREADS = 4


class TileError(RuntimeError):
    """A tile (or retry window) whose processing raised; the message names it and its pixels."""


@dataclass(frozen=True)
class TaskContext:
    """What every task of a run needs (small: sent with each task): the mosaic (each worker
    opens it once), the window plan, the part store and the tiling; in a survey run, the
    tract's ownership rule and global ids (``tract``; None: a single mosaic, the tile rule
    alone and the mosaic's ids)."""

    mosaic_path: str
    plan: WindowPlan
    store: PartStore
    grid: TileGrid
    tract: TractRule | None = None

    def layout(self, m: Mosaic) -> CatalogLayout:
        """The catalog layout of the run's mosaic ``m`` (global ids in a survey run)."""
        return layout_for(m, self.plan.science, self.tract)

    def owns(self, tile: Tile, y_peak: np.ndarray, x_peak: np.ndarray) -> np.ndarray:
        """Which peaks ``tile`` owns: in its core and, in a survey run, in the tract's inner region."""
        owned = np.asarray(tile.owns(y_peak, x_peak), dtype=bool)
        if self.tract is not None and owned.any():
            idx = np.flatnonzero(owned)
            owned[idx] = self.tract.inner(np.asarray(y_peak)[idx], np.asarray(x_peak)[idx])
        return owned


def layout_for(m: Mosaic, science, tract: TractRule | None) -> CatalogLayout:
    """The catalog layout of mosaic ``m``: with a survey tract's global ids when ``tract`` is given."""
    if tract is None:
        return CatalogLayout.for_mosaic(m, science)
    return CatalogLayout.for_mosaic(m, science, ids=tract.ids, id_scheme=GLOBAL_ID_SCHEME)


@functools.lru_cache(maxsize=4)
def _mosaic(path: str) -> Mosaic:
    return open_mosaic(path)


_POOLS: dict[str, cf.ThreadPoolExecutor] = {}


def _pool(name: str, threads: int = 1) -> cf.ThreadPoolExecutor:
    """A thread pool kept for the life of the worker process.

    Never torn down between tasks: Dask's profiler samples every thread's frames, which can
    crash CPython 3.11 when it races with an exiting thread (seen: per-task pools segfaulted
    an in-process worker).
    """
    if name not in _POOLS:
        _POOLS[name] = cf.ThreadPoolExecutor(threads, thread_name_prefix=f"survey_engine-{name}")
    return _POOLS[name]


def _failure(what: str | Tile, err: Exception) -> str:
    if isinstance(what, Tile):
        c, r = what.core, what.read
        what = (f"tile {what.name} (core y {c.y0}:{c.y1}, x {c.x0}:{c.x1}; "
                f"read window y {r.y0}:{r.y1}, x {r.x0}:{r.x1})")  # fmt: skip
    return f"{what}: {type(err).__name__}: {err}"


def background_block(box: Box, *, mosaic_path: str, plan: WindowPlan, mask_sources: bool = False):
    """Mesh statistics of every band of one block: ``(box, [(level, rms) per band])``; with
    ``mask_sources``, less the sources over ``plan.meshes`` (read with a margin: source_mask)."""
    m, sci, det = _mosaic(mosaic_path), plan.science, plan.science.detection
    dilate = sci.background_mask_dilate
    win = box.grow(det.pad + det.minarea + dilate if mask_sources else 0, plan.mosaic)
    try:
        reg = m.read((win.y0, win.y1), (win.x0, win.x1))
    except Exception as err:
        what = f"background block y {box.y0}:{box.y1}, x {box.x0}:{box.x1}"
        raise TileError(_failure(what, err)) from err
    image, usable = reg.image, usable_pixels(reg.image, reg.variance, reg.mask)
    if mask_sources:
        first = [interpolate_background(me, win.y0, win.y1, win.x0, win.x1) for me in plan.meshes]
        sources = source_mask(image, reg.variance, usable, np.stack(first), minarea=det.minarea,
                              thresh=sci.background_mask_thresh, dilate=dilate, kernel=det.kernel)  # fmt: skip
        sy, sx = box.slices((win.y0, win.x0))
        image, usable = image[:, sy, sx], usable[:, sy, sx] & ~sources[sy, sx]
    return box, plan.backend.mesh_statistics(image, ~usable, sci.background_box)


def process_tiles(tiles: Sequence[Tile], *, ctx: TaskContext) -> dict[str, Any]:
    """One task of the tile stage: analyse ``tiles`` and write a part for each.

    1. **batches** — tiles of equal read shape, as many together as the device holds;
    2. **read** — a reader thread reads the next batch from the store while the current
       one is analysed (pinned host memory on CUDA);
    3. **analyse** — the stage sequence (:func:`survey_engine.stages.analyse_windows`); a
       batch that raises is analysed again tile by tile, so a bad tile is named and does
       not sink the others;
    4. **keep and write** — each tile keeps the objects whose peak lies in its core and
       writes its part (a writer thread, overlapping the next batch).

    Returns
    -------
    dict
        ``tiles`` (name → objects, retry items, footprint boxes: the part's manifest entry),
        ``failed`` (name → message),
        ``times`` (seconds per stage), ``gpu_memory`` (peak bytes, None on CPU).
    """
    run = _TileRun(ctx)
    groups = run.batches(tiles)
    # One writer thread: astropy WCS objects (sky positions) are not safe to share.
    reader, writer = _pool("reader"), _pool("writer")
    writes: list[tuple[Tile, cf.Future]] = []
    nxt = reader.submit(run.read, groups[0]) if groups else None
    for i, group in enumerate(groups):
        host = nxt.result()
        nxt = reader.submit(run.read, groups[i + 1]) if i + 1 < len(groups) else None
        for tile, wr in run.analyse(group, host):
            writes.append((tile, writer.submit(run.write, tile, wr)))
        del host
    for tile, fut in writes:
        run.collect(tile, fut)
    return run.report()


class _TileRun:
    """State of one :func:`process_tiles` task: timings, results and failures per tile."""

    def __init__(self, ctx: TaskContext):
        self.ctx = ctx
        self.plan = ctx.plan
        self.backend = ctx.plan.backend
        self.backend.check_device()
        self.backend.reset_peak_memory()
        self.m = _mosaic(ctx.mosaic_path)
        self.layout = ctx.layout(self.m)
        self.times = self.backend.stage_times()
        self.results: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, str] = {}

    def batches(self, tiles: Sequence[Tile]) -> list[list[Tile]]:
        by_shape: dict[tuple[int, int], list[Tile]] = {}
        for t in tiles:
            by_shape.setdefault(t.read.shape, []).append(t)
        caps = {shape: self.backend.capacity(shape, len(self.m.bands)) for shape in by_shape}
        return [g[i : i + caps[s]] for s, g in by_shape.items() for i in range(0, len(g), caps[s])]

    def read(self, group: list[Tile]):
        """The batch's pixels, stacked (or the exception, reported per tile later)."""
        with self.times.stage("read"):
            try:
                pool = _pool("read", READ_THREADS)
                regs = list(pool.map(lambda t: _read(self.m, t.read), group))
                return self.backend.stack(regs)
            except Exception as err:
                return err

    def analyse(self, group: list[Tile], host) -> Iterator[tuple[Tile, WindowResult]]:
        results = None
        if not isinstance(host, Exception):
            try:
                results = stages.analyse_windows(host, [t.read for t in group], self.plan, self.times)
            except Exception as err:  # redo one by one below
                if len(group) > 1:
                    logger.warning("batch of %d tiles failed (%s); redoing them one by one", len(group), err)
                self.backend.release_memory()  # e.g. out of memory: hand the cache back first
        for k, tile in enumerate(group):
            try:
                wr = results[k] if results is not None else self.analyse_one(tile)
            except Exception as err:
                self.fail(tile, err)
                continue
            yield tile, wr

    def analyse_one(self, tile: Tile) -> WindowResult:
        with self.times.stage("read"):
            reg = _read(self.m, tile.read)
        (wr,) = stages.analyse_regions([reg], self.plan, self.times)
        return wr

    def write(self, tile: Tile, wr: WindowResult) -> tuple[dict[str, int], float]:
        t0 = time.perf_counter()
        owned = self.ctx.owns(tile, wr.peak_y, wr.peak_x)
        return write_tile_part(tile, wr, self.ctx.store, self.layout, owned), time.perf_counter() - t0

    def collect(self, tile: Tile, fut: cf.Future) -> None:
        try:
            self.results[tile.name], seconds = fut.result()
            self.times.add("write", seconds)
        except Exception as err:
            self.fail(tile, err)

    def fail(self, tile: Tile, err: Exception) -> None:
        self.failed[tile.name] = _failure(tile, err)
        logger.error("%s", self.failed[tile.name])

    def report(self) -> dict[str, Any]:
        return {"tiles": self.results, "failed": self.failed, "times": dict(self.times),
                "gpu_memory": self.backend.peak_memory()}  # fmt: skip


def _read(m: Mosaic, box: Box):
    return m.read((box.y0, box.y1), (box.x0, box.x1))


def _rows(layout: CatalogLayout, wr: WindowResult, idx: np.ndarray):
    rows = layout.rows(wr.meas, idx, origin=(wr.window.y0, wr.window.x0),
                       parent_index=wr.parent_peak_index, n_children=wr.detection.n_children)  # fmt: skip
    return layout.table(rows)


def footprints_of(wr: WindowResult, idx: np.ndarray, layout: CatalogLayout) -> Footprints:
    """Footprints of objects ``idx`` of a window as mosaic boxes + flattened boolean crops
    (keyed by the layout's object ids)."""
    boxes, crops = [], []
    for i in idx:
        y0, y1, x0, x1 = wr.meas.bbox[i]
        crops.append((wr.detection.labels[y0:y1, x0:x1] == i + 1).ravel())
        boxes.append([y0 + wr.window.y0, y1 + wr.window.y0, x0 + wr.window.x0, x1 + wr.window.x0])
    ids = np.asarray(layout.object_ids(wr.peak_y[idx], wr.peak_x[idx]), dtype=np.int64)
    return Footprints(ids, np.asarray(boxes, dtype=np.int64).reshape(-1, 4),
                      np.concatenate(crops) if crops else np.zeros(0, bool))  # fmt: skip


def write_tile_part(tile: Tile, wr: WindowResult, store: PartStore, layout: CatalogLayout,
                    owned: np.ndarray | None = None) -> dict[str, int]:  # fmt: skip
    """Keep a tile's owned objects and write its part (rows, core labels, footprints, pending).

    An object is the tile's when its peak lies in the core (and, in a survey run, in the
    tract's inner region: ``owned``, from :meth:`TaskContext.owns`); it is finished when its
    result is safe (:func:`~survey_engine.stages.finish_window`), else it becomes a retry item.
    """
    owned = tile.owns(wr.peak_y, wr.peak_x) if owned is None else owned
    done = owned & wr.safe
    ids = layout.object_ids(wr.peak_y, wr.peak_x)
    # Core labels: IDs of the owned, finished objects on the core pixels.
    cy, cx = tile.core.slices((tile.read.y0, tile.read.x0))
    lut = np.zeros(wr.n + 1, dtype=np.int64)
    lut[1:][done] = ids[done]
    core = lut[wr.detection.labels[cy, cx]]
    # Footprints of finished objects that leave the core (painted into other cores later).
    bb, (ry, rx), core_box = wr.meas.bbox, (tile.read.y0, tile.read.x0), tile.core
    leaves = done & ((bb[:, 0] + ry < core_box.y0) | (bb[:, 1] + ry > core_box.y1)
                     | (bb[:, 2] + rx < core_box.x0) | (bb[:, 3] + rx > core_box.x1))  # fmt: skip
    pending = pending_items(tile, wr, np.flatnonzero(owned & ~wr.safe))
    n = int(done.sum())
    fps = footprints_of(wr, np.flatnonzero(leaves), layout)
    store.write_tile(
        tile.name, table=_rows(layout, wr, np.flatnonzero(done)), core_labels=core,
        footprints=fps, pending=pending,
        info={"tile": tile.index, "core": [tile.core.y0, tile.core.y1, tile.core.x0, tile.core.x1], "n": n},
    )  # fmt: skip
    return {"objects": n, "pending": pending, "boxes": fps.boxes.tolist()}


def pending_items(tile: Tile, wr: WindowResult, idx: np.ndarray) -> list[dict]:
    """Group owned-but-unsafe objects by parent into retry items (one pass, sorted by parent)."""
    if len(idx) == 0:
        return []
    det, c, (oy, ox) = wr.detection, wr.meas.columns, (wr.window.y0, wr.window.x0)
    r, bb = wr.meas.extent, wr.meas.bbox
    lo_y, hi_y = np.floor(c["y"] - r), np.ceil(c["y"] + r) + 1
    lo_x, hi_x = np.floor(c["x"] - r), np.ceil(c["x"] + r) + 1
    by_parent = np.argsort(det.parent, kind="stable")  # every object, grouped by parent
    bounds = np.r_[0, np.flatnonzero(np.diff(det.parent[by_parent])) + 1, len(by_parent)]
    group_of = np.searchsorted(det.parent[by_parent][bounds[:-1]], det.parent)
    mine = idx[np.argsort(det.parent[idx], kind="stable")]
    cuts = np.r_[0, np.flatnonzero(np.diff(det.parent[mine])) + 1, len(mine)]
    items = []
    for k in range(len(cuts) - 1):
        members = mine[cuts[k] : cuts[k + 1]]
        g = group_of[members[0]]
        sib = by_parent[bounds[g] : bounds[g + 1]]
        box = [
            int(min(bb[sib, 0].min() + oy, lo_y[sib].min())),
            int(max(bb[sib, 1].max() + oy, hi_y[sib].max())),
            int(min(bb[sib, 2].min() + ox, lo_x[sib].min())),
            int(max(bb[sib, 3].max() + ox, hi_x[sib].max())),
        ]
        seed = [int(wr.peak_y[members[0]]), int(wr.peak_x[members[0]])]
        items.append({
            "tile": tile.index,
            "key": f"{tile.name}-y{seed[0]}-x{seed[1]}",
            "mode": "objects" if wr.parent_safe[members[0]] else "parent",
            "seed": seed,
            "peaks": [[int(wr.peak_y[i]), int(wr.peak_x[i])] for i in members],
            "box": box,
        })  # fmt: skip
    return items


def retry_groups(items: Sequence[dict], max_pixels: int) -> list[dict]:
    """Retry items whose boxes overlap, merged into groups measured in one window each.

    A giant parent cut by several tiles (a cluster core) gives an item in each, and a parent
    that leaves a tile window and comes back gives several in one; each would analyse the
    whole parent again. Groups are built in the items' order (so a resumed run finds the
    same), none beyond ``max_pixels`` px, each named by its first item (:func:`_group`). Each
    item's objects are chosen as if it were alone (they are whole in the group's window), so
    the catalog does not depend on the grouping.
    """
    groups: list[tuple[int, list[int], list[int]]] = []  # (first item, box, item numbers)
    for n, it in enumerate(items):
        cur = (n, list(it["box"]), [n])
        while True:
            for g, (first, box, members) in enumerate(groups):
                y0, y1, x0, x1 = cur[1]
                if box[0] < y1 and box[1] > y0 and box[2] < x1 and box[3] > x0:
                    union = [min(box[0], y0), max(box[1], y1), min(box[2], x0), max(box[3], x1)]
                    if (union[1] - union[0]) * (union[3] - union[2]) <= max_pixels:
                        groups.pop(g)
                        cur = (min(first, cur[0]), union, sorted(members + cur[2]))
                        break
            else:
                groups.append(cur)
                break
    return [_group([items[i] for i in members]) for _, _, members in sorted(groups)]


def _group(members: list[dict]) -> dict:
    """A retry group: its items' union box; a key naming its first item and, for several, a
    digest of them all."""
    b = np.array([m["box"] for m in members])
    box = [int(b[:, 0].min()), int(b[:, 1].max()), int(b[:, 2].min()), int(b[:, 3].max())]
    key = members[0]["key"]
    if len(members) > 1:
        digest = hashlib.sha1(" ".join(m["key"] for m in members).encode()).hexdigest()[:10]
        key = f"{key}-g{len(members)}-{digest}"
    return {"key": key, "box": box, "items": members}


def resumed_retry_groups(items: Sequence[dict], written: dict[str, list[str]],
                         max_pixels: int) -> list[dict]:  # fmt: skip
    """The retry groups of a run that may have written some already (``written``: key → items).

    A written group whose items are all still pending is kept as it is (its part is
    reused: a resumed run redoes only what is missing); the other items are grouped anew
    (:func:`retry_groups`).
    """
    by_key = {it["key"]: it for it in items}
    kept, covered = [], set()
    for key, members in written.items():
        if members and set(members) <= by_key.keys() and not covered & set(members):
            group = _group([by_key[k] for k in members])
            if group["key"] == key:
                kept.append(group)
                covered |= set(members)
    rest = [it for it in items if it["key"] not in covered]
    return kept + retry_groups(rest, max_pixels)


def retry(item: dict[str, Any], *, ctx: TaskContext) -> dict[str, int]:
    """Measure a retry group's objects whole: its window doubles its margin until they are safe.

    Per item, ``mode`` ``parent``: the parent itself was cut, so every child of the parent
    found around the seed pixel that the item's tile owns is kept; ``objects``: only the
    listed peaks. Objects still unsafe in the whole mosaic are flagged TRUNCATED.
    """
    try:
        return _retry(item, ctx)
    except Exception as err:
        raise TileError(_failure(f"retry {item['key']} (objects near box {item['box']})", err)) from err


def _chosen(items: Sequence[dict], wr: WindowResult, win: Box, ctx: TaskContext) -> np.ndarray:
    """The objects of a group's retry items in a window's result (boolean over its objects).

    ``objects`` items name their peaks; a ``parent`` item takes every child of the parent at
    its seed pixel that its tile owns (``ctx.owns``: the tile rule, and the tract's). One pass over the window's objects per tile, not per
    item.
    """
    sel = np.zeros(wr.n, dtype=bool)
    key = (wr.peak_y.astype(np.int64) << 32) | wr.peak_x.astype(np.int64)
    named = [(y << 32) | x for it in items if it["mode"] != "parent" for y, x in it["peaks"]]
    if named:
        sel |= np.isin(key, np.asarray(named, dtype=np.int64))
    seeds: dict[int, list[int]] = {}
    for it in items:
        if it["mode"] == "parent":
            lab = int(wr.detection.labels[it["seed"][0] - win.y0, it["seed"][1] - win.x0])
            if lab == 0:
                logger.warning("retry %s: seed pixel holds no object; nothing to add", it["key"])
            else:
                seeds.setdefault(it["tile"], []).append(int(wr.detection.parent[lab - 1]))
    for t, parents in seeds.items():
        sel |= np.isin(wr.detection.parent, parents) & ctx.owns(ctx.grid[t], wr.peak_y, wr.peak_x)
    return sel


def _retry(group: dict[str, Any], ctx: TaskContext) -> dict[str, int]:
    m = _mosaic(ctx.mosaic_path)
    bounds = Box(0, m.ny, 0, m.nx)
    box = Box(*group["box"]).intersect(bounds) or bounds
    margin = ctx.grid.halo
    while True:
        win = box.grow(margin, bounds)
        (wr,) = stages.analyse_regions([_read(m, win)], ctx.plan)
        sel = _chosen(group["items"], wr, win, ctx)
        if wr.safe[sel].all() or win == bounds:
            break
        margin *= 2
    wr.meas.columns["flags"][sel & ~wr.safe] |= int(Flag.TRUNCATED)
    idx = np.flatnonzero(sel)
    layout = ctx.layout(m)
    ctx.store.write_retry(
        group["key"], table=_rows(layout, wr, idx), footprints=footprints_of(wr, idx, layout),
        info={"window": [win.y0, win.y1, win.x0, win.x1], "n": len(idx),
              "members": [it["key"] for it in group["items"]]},
    )  # fmt: skip
    return {"objects": len(idx), "window_pixels": win.size}


def segmentation_chunk(item, *, store: PartStore, seg_path: str) -> int:
    """Write one chunk of the segmentation map: core labels, then footprints painted over.

    ``item`` is ``(chunk box, [(tile name, core box) overlapping it], [parts whose
    footprints touch it])``; returns the number of labelled pixels.
    """
    chunk, tiles, footprint_parts = item
    out = np.zeros(chunk.shape, dtype=np.int64)
    for name, core in tiles:
        cbox = Box(*core)
        inter = cbox.intersect(chunk)
        if inter is not None:
            labels = store.core_labels(name, cbox.shape)
            out[inter.slices((chunk.y0, chunk.x0))] = labels[inter.slices((cbox.y0, cbox.x0))]
    for name in footprint_parts:
        store.footprints(name).paint(out, chunk.y0, chunk.x0)
    arr = zarr.open_group(seg_path, mode="r+", zarr_format=3)["segmentation"]
    arr[chunk.y0 : chunk.y1, chunk.x0 : chunk.x1] = out
    return int(np.count_nonzero(out))


class RepeatedObjects(RuntimeError):
    """Internal error: one object id measured twice, differently."""


def catalog_of_parts(store: PartStore, names: Sequence[str], empty: pa.Table) -> pa.Table:
    """The rows of parts ``names`` concatenated, sorted by id, each object once.

    ``empty`` is the catalog's empty table: its schema and metadata are the result's.
    """
    tables = list(store.catalog_tables(names))
    table = pa.concat_tables(tables) if tables else empty
    table = _without_repeats(sorted_by(table, "id"))
    return table.replace_schema_metadata(empty.schema.metadata)


def _without_repeats(table: pa.Table) -> pa.Table:
    """The ID-sorted catalog with objects measured twice kept once.

    Two retry groups of one tile may hold the same parent (it left the tile window and came
    back, in boxes that do not overlap); each measures it whole, so the rows are equal. Any
    other repeated ID is an internal error (:class:`RepeatedObjects`).
    """
    ids = numpy_column(table.column("id"))
    again = np.flatnonzero(ids[1:] == ids[:-1]) + 1
    if len(again) == 0:
        return table
    first, second = table.take(again - 1).to_pylist(), table.take(again).to_pylist()
    differ = [a["id"] for a, b in zip(first, second, strict=True)
              if any(u != v and not (u != u and v != v) for u, v in zip(a.values(), b.values(), strict=True))]  # fmt: skip
    if differ:
        msg = f"internal error: {len(differ)} object IDs measured twice, differently (first {differ[0]})"
        raise RepeatedObjects(msg)
    logger.info("%d objects measured whole by two retry groups, kept once", len(again))
    keep = np.ones(len(ids), dtype=bool)
    keep[again] = False
    return table.filter(pa.array(keep))


def catalog_partition(item: tuple[Sequence[str], str], *, store: PartStore, mosaic_path: str,
                      science, tract: TractRule | None, meta: dict) -> int:  # fmt: skip
    """The catalog task: one partition of the catalog from the parts that make it.

    ``item`` is ``(names, path)``: the parts' rows (each object once, sorted by id) are
    written to ``path`` atomically. It runs on a worker, so the driver never holds the
    catalog; ``tract`` is a survey run's tract (global ids), None for a single mosaic.

    Returns
    -------
    int
        The partition's rows.
    """
    names, path = item
    layout = layout_for(_mosaic(mosaic_path), science, tract)
    table = catalog_of_parts(store, names, layout.table(meta=meta))
    write_parquet_atomic(table, path)
    return table.num_rows
