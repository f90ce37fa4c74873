"""The tiled engine: the one place where the Dask work of a catalog run is laid out.

A run has five stages, each a stream of small tasks over the cluster
(:func:`survey_engine.parallel.map_tasks`); pixel arrays never travel through
the scheduler, every task reads its own window from the Zarr store:

1. **background** — mesh statistics of aligned blocks → one global mesh per band;
2. **tiles** — each tile reads core + halo, runs :func:`~survey_engine.pipeline.analyse_window`,
   keeps the objects whose peak lies in its core and whose result is *safe*,
   and writes a part (catalog rows, core labels, footprints of objects that
   leave the core, and the owned objects that were not safe) atomically;
3. **retry** — every owned object that was not safe is measured again in a window
   grown around it until it is (doubling the margin, up to the whole mosaic);
4. **segmentation** — each chunk of the output segmentation map is written by
   exactly one task from the parts' core labels and footprints;
5. **catalog** — parts concatenated, sorted by ID, written as Parquet.

``--resume`` skips every part already written, so a crashed run continues
where it stopped and a run with failed tiles retries only those.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from . import config as _conf
from .catalog import to_arrow, write_parquet_atomic
from .flags import UNUSABLE
from .kernels.background import (
    BackgroundMesh,
    filter_mesh,
    interpolate_background,
    mesh_statistics,
)
from .mosaic import Mosaic, open_mosaic
from .parallel import (
    GPUUnavailable,
    TaskFailure,
    TaskResults,
    dask_client,
    map_tasks,
    workers_with,
)
from .pipeline import PipelineConfig, WindowResult, analyse_window, catalog_rows
from .schema import Flag, flag_descriptions
from .tiling import Box, Tile, TileGrid, make_tiles

__all__ = ["RunError", "RunResult", "TileError", "run"]

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
#: Torch backend: windows of a batch read concurrently (Zarr decompression releases the GIL).
READ_THREADS = 4
_BLOSC = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)


class RunError(RuntimeError):
    """A run that could not complete; ``failures`` names the tiles/objects that failed."""

    def __init__(self, message: str, failures: Sequence[TaskFailure] = ()):
        super().__init__(message)
        self.failures = list(failures)


class TileError(RuntimeError):
    """A tile (or retry window) whose processing raised; the message names it and its pixels."""


def _named_failure(what: str, err: Exception) -> TileError:
    return TileError(f"{what}: {type(err).__name__}: {err}")


@dataclass
class RunResult:
    """What a run produced."""

    outdir: Path
    catalog_path: Path
    segmentation_path: Path
    n_objects: int
    n_tiles: int
    n_retried: int
    timings: dict[str, float] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)
    pixels: int = 0
    gpu_memory: int | None = None
    backend: str = "numpy"
    device: str = "cpu"


# ----------------------------------------------------------------------------------------
# Worker-side functions (pure apart from reading the mosaic and writing part files)
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _mosaic(path: str) -> Mosaic:
    return open_mosaic(path)


def _background_block(box: Box, *, mosaic_path: str, cfg: PipelineConfig):
    m = _mosaic(mosaic_path)
    try:
        reg = m.read((box.y0, box.y1), (box.x0, box.x1))
    except Exception as err:
        what = f"background block y {box.y0}:{box.y1}, x {box.x0}:{box.x1}"
        raise _named_failure(what, err) from err
    bad = ((reg.mask & UNUSABLE) != 0) | ~np.isfinite(reg.image) | ~(reg.variance > 0)
    if cfg.backend == "torch":
        return box, _mesh_statistics_torch(reg.image, bad, cfg)
    return box, [
        mesh_statistics(reg.image[b], bad[b], cfg.background_box) for b in range(len(reg.bands))
    ]


def _mesh_statistics_torch(image: np.ndarray, bad: np.ndarray, cfg: PipelineConfig):
    """All bands of a block at once on the run's device (equal to the numpy statistics)."""
    import torch

    from .kernels.torch_background import mesh_statistics_torch

    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        dev = torch.device("cpu")  # a CPU worker of a mixed cluster: same numbers
    level, rms = mesh_statistics_torch(
        torch.from_numpy(np.ascontiguousarray(image)).to(dev),
        torch.from_numpy(bad).to(dev),
        cfg.background_box,
    )
    level, rms = level.cpu().numpy(), rms.cpu().numpy()
    return [(level[b], rms[b]) for b in range(len(level))]


def _window(
    m: Mosaic,
    box: Box,
    meshes: Sequence[BackgroundMesh],
    cfg: PipelineConfig,
    times: dict[str, float] | None = None,
) -> WindowResult:
    times = times if times is not None else {}
    t0 = time.perf_counter()
    reg = m.read((box.y0, box.y1), (box.x0, box.x1))
    times["read"] = times.get("read", 0.0) + time.perf_counter() - t0
    if cfg.backend == "torch":
        from .torch_pipeline import analyse_windows

        st = _stage_times(cfg, times)
        (wr,) = analyse_windows(
            [reg], cfg, mosaic=Box(0, m.ny, 0, m.nx), splines=_splines(meshes), times=st
        )
        times.update(st)
        return wr
    t0 = time.perf_counter()
    bkg = np.stack(
        [interpolate_background(mesh, box.y0, box.y1, box.x0, box.x1) for mesh in meshes]
    )
    times["background"] = times.get("background", 0.0) + time.perf_counter() - t0
    return analyse_window(reg, bkg, cfg, mosaic=Box(0, m.ny, 0, m.nx), times=times)


def _stage_times(cfg: PipelineConfig, times: Mapping[str, float]):
    from .torch_pipeline import StageTimes

    st = StageTimes(cfg.device)
    st.update(times)
    return st


_SPLINES: dict[tuple, Any] = {}


def _splines(meshes: Sequence[BackgroundMesh]) -> list:
    """Device-evaluable background splines of the meshes (fitted once per process and mesh)."""
    from .kernels.torch_background import background_spline

    out = []
    for mesh in meshes:
        key = (mesh.box, tuple(mesh.shape), hashlib.sha1(mesh.level.tobytes()).hexdigest())
        if key not in _SPLINES:
            if len(_SPLINES) > 32:
                _SPLINES.clear()
            _SPLINES[key] = background_spline(mesh)
        out.append(_SPLINES[key])
    return out


def _rows(
    m: Mosaic, wr: WindowResult, sel: np.ndarray, cfg: PipelineConfig
) -> dict[str, np.ndarray]:
    return catalog_rows(
        wr,
        sel,
        mosaic_width=m.nx,
        bands=m.bands,
        zero_points=m.zero_points,
        pixel_to_sky=m.pixel_to_sky if m.has_wcs else None,
        cfg=cfg,
        image_unit=m.units.get("image", "count"),
    )


def _footprints(wr: WindowResult, idx: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Footprints of objects ``idx`` as mosaic boxes + flattened boolean crops."""
    boxes, crops = [], []
    for i in idx:
        y0, y1, x0, x1 = wr.meas.bbox[i]
        crops.append((wr.detection.labels[y0:y1, x0:x1] == i + 1).ravel())
        boxes.append([y0 + wr.window.y0, y1 + wr.window.y0, x0 + wr.window.x0, x1 + wr.window.x0])
    return {
        "ids": np.asarray(ids, dtype=np.int64),
        "boxes": np.asarray(boxes, dtype=np.int64).reshape(-1, 4),
        "pixels": np.concatenate(crops) if crops else np.zeros(0, bool),
    }


def _write_part(outdir: Path, name: str, files: Mapping[str, Any]) -> None:
    """Write a part directory atomically: all files into a temporary directory, then rename."""
    parts = outdir / "parts"
    final = parts / name
    tmp = parts / f".{name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir(parents=True)
    for fname, content in files.items():
        path = tmp / fname
        if isinstance(content, pa.Table):
            pq.write_table(content, path, compression="zstd")
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, dict) and fname.endswith(".npz"):
            np.savez(path, **content)
        else:
            path.write_text(json.dumps(content))
    if final.exists():  # a previous attempt of the same item finished meanwhile
        shutil.rmtree(tmp)
        return
    os.rename(tmp, final)


def _process_tile(tile: Tile, **kwargs: Any) -> dict[str, int]:
    try:
        return _process_tile_inner(tile, **kwargs)
    except Exception as err:
        c, r = tile.core, tile.read
        what = (
            f"tile {tile.name} (core y {c.y0}:{c.y1}, x {c.x0}:{c.x1}; "
            f"read window y {r.y0}:{r.y1}, x {r.x0}:{r.x1})"
        )
        raise _named_failure(what, err) from err


def _process_tile_inner(
    tile: Tile,
    *,
    mosaic_path: str,
    meshes: Sequence[BackgroundMesh],
    cfg: PipelineConfig,
    outdir: str,
    meta: Mapping[str, Any],
) -> dict[str, int]:
    m = _mosaic(mosaic_path)
    times: dict[str, float] = {}
    wr = _window(m, tile.read, meshes, cfg, times)
    out = _tile_part(tile, wr, m=m, cfg=cfg, outdir=outdir, meta=meta, times=times)
    out["times"] = times
    return out


def _tile_part(
    tile: Tile,
    wr: WindowResult,
    *,
    m: Mosaic,
    cfg: PipelineConfig,
    outdir: str,
    meta: Mapping[str, Any],
    times: dict[str, float],
) -> dict[str, Any]:
    """Keep a tile's owned objects and write its part (catalog rows, core labels, footprints)."""
    t0 = time.perf_counter()
    specs = cfg.columns(m.bands, m.units.get("image", "count"))
    owned = tile.owns(wr.peak_y, wr.peak_x)
    done = owned & wr.safe
    pending_idx = np.flatnonzero(owned & ~wr.safe)
    rows = _rows(m, wr, done, cfg)
    ids_all = wr.peak_y * m.nx + wr.peak_x

    # Core labels: IDs of the owned, finished objects on the core pixels.
    cy, cx = tile.core.slices((tile.read.y0, tile.read.x0))
    lut = np.zeros(wr.n + 1, dtype=np.int64)
    lut[1:][done] = ids_all[done]
    core = lut[wr.detection.labels[cy, cx]]
    # Footprints of finished objects that leave the core (painted into other cores later).
    bb = wr.meas.bbox
    leaves = done & (
        (bb[:, 0] + tile.read.y0 < tile.core.y0)
        | (bb[:, 1] + tile.read.y0 > tile.core.y1)
        | (bb[:, 2] + tile.read.x0 < tile.core.x0)
        | (bb[:, 3] + tile.read.x0 > tile.core.x1)
    )
    fp_idx = np.flatnonzero(leaves)
    pending = _pending_items(tile, wr, pending_idx, m.nx)
    _write_part(
        Path(outdir),
        tile.name,
        {
            "catalog.parquet": to_arrow(rows, specs, meta),
            "labels.bin": _BLOSC.encode(np.ascontiguousarray(core)),
            "footprints.npz": _footprints(wr, fp_idx, ids_all[fp_idx]),
            "pending.json": pending,
            "info.json": {
                "tile": tile.index,
                "core": list(_box_tuple(tile.core)),
                "n": int(done.sum()),
            },
        },
    )
    times["write"] = times.get("write", 0.0) + time.perf_counter() - t0
    return {"objects": int(done.sum()), "pending": len(pending)}


def _process_tile_batch(
    batch: Sequence[Tile],
    *,
    mosaic_path: str,
    meshes: Sequence[BackgroundMesh],
    cfg: PipelineConfig,
    outdir: str,
    meta: Mapping[str, Any],
    cpu_batch: int | None = None,
) -> dict[str, Any]:
    """Torch backend: process several tiles per task, batched on the device.

    Windows of equal shape are stacked into sub-batches sized from the device's free
    memory; a reader thread reads (and pins) the next sub-batch from the store while
    the device works on the current one, and a writer thread writes the parts of the
    previous one. A sub-batch that raises is redone tile by tile, so one bad tile is
    reported by name and does not sink the others.
    """
    import concurrent.futures as cf

    import torch

    from .torch_pipeline import CPU_BATCH, StageTimes, batch_capacity, stack_regions

    m = _mosaic(mosaic_path)
    dev = torch.device(cfg.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            msg = f"worker has no CUDA GPU (device {cfg.device!r} requested)"
            raise RuntimeError(msg)
        torch.cuda.reset_peak_memory_stats(dev)
    splines = _splines(meshes)
    times = StageTimes(dev)
    results: dict[str, Any] = {}
    failed: dict[str, str] = {}
    by_shape: dict[tuple[int, int], list[Tile]] = {}
    for t in batch:
        by_shape.setdefault(t.read.shape, []).append(t)
    groups: list[list[Tile]] = []
    for shape, tiles in by_shape.items():
        cap = batch_capacity(shape, len(m.bands), dev, cpu_default=cpu_batch or CPU_BATCH)
        groups += [tiles[i : i + cap] for i in range(0, len(tiles), cap)]

    def read(group: list[Tile]):
        t0 = time.perf_counter()
        try:
            with cf.ThreadPoolExecutor(min(len(group), READ_THREADS)) as pool:
                regs = list(
                    pool.map(
                        lambda t: m.read((t.read.y0, t.read.y1), (t.read.x0, t.read.x1)), group
                    )
                )
            host = stack_regions(regs, pin=dev.type == "cuda")
            return regs, host, None, time.perf_counter() - t0
        except Exception as err:  # reported per tile below
            return None, None, err, time.perf_counter() - t0

    def describe(t: Tile, e: Exception) -> str:
        c, r = t.core, t.read
        return (
            f"tile {t.name} (core y {c.y0}:{c.y1}, x {c.x0}:{c.x1}; read window "
            f"y {r.y0}:{r.y1}, x {r.x0}:{r.x1}): {type(e).__name__}: {e}"
        )

    def write(t: Tile, wr: WindowResult):
        tt: dict[str, float] = {}
        out = _tile_part(t, wr, m=m, cfg=cfg, outdir=outdir, meta=meta, times=tt)
        return out, tt

    mosaic_box = Box(0, m.ny, 0, m.nx)
    writes: list[tuple[Tile, cf.Future]] = []
    # Three overlapping streams: the reader thread reads batch k + 1, this thread runs batch k
    # on the device, a writer thread writes the parts of batch k - 1 (rows, labels, Parquet;
    # one thread: astropy WCS objects are not safe to share between threads).
    with (
        cf.ThreadPoolExecutor(1, thread_name_prefix="survey_engine-reader") as reader,
        cf.ThreadPoolExecutor(1, thread_name_prefix="survey_engine-writer") as writer,
    ):
        nxt = reader.submit(read, groups[0]) if groups else None
        for gi, group in enumerate(groups):
            regs, host, err, dt = nxt.result()
            times["read"] = times.get("read", 0.0) + dt
            nxt = reader.submit(read, groups[gi + 1]) if gi + 1 < len(groups) else None
            wrs = None
            if err is None:
                try:
                    wrs = analyse_windows_batch(regs, cfg, mosaic_box, splines, times, host)
                except Exception as e:  # redo one by one below
                    logger.warning(
                        "batch of %d tiles failed (%s); redoing them one by one", len(group), e
                    )
                    if dev.type == "cuda":  # e.g. out of memory: hand the cache back first
                        torch.cuda.empty_cache()
            del regs, host
            for k, t in enumerate(group):
                try:
                    if wrs is None:
                        tt: dict[str, float] = {}
                        wr = _window(m, t.read, meshes, cfg, tt)
                        for key, v in tt.items():
                            times[key] = times.get(key, 0.0) + v
                    else:
                        wr = wrs[k]
                except Exception as e:
                    failed[t.name] = describe(t, e)
                    logger.error("%s", failed[t.name])
                    continue
                writes.append((t, writer.submit(write, t, wr)))
            del wrs
        for t, fut in writes:
            try:
                results[t.name], tt = fut.result()
                times["write"] = times.get("write", 0.0) + tt.get("write", 0.0)
            except Exception as e:
                failed[t.name] = describe(t, e)
                logger.error("%s", failed[t.name])
    gpu_mem = int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None
    return {"tiles": results, "failed": failed, "times": dict(times), "gpu_memory": gpu_mem}


def analyse_windows_batch(regs, cfg, mosaic_box, splines, times, host):
    """:func:`survey_engine.torch_pipeline.analyse_windows` (kept importable for tests)."""
    from .torch_pipeline import analyse_windows

    return analyse_windows(regs, cfg, mosaic=mosaic_box, splines=splines, times=times, host=host)


def _box_tuple(b: Box) -> tuple[int, int, int, int]:
    return (b.y0, b.y1, b.x0, b.x1)


def _pending_items(tile: Tile, wr: WindowResult, idx: np.ndarray, width: int) -> list[dict]:
    """Group owned-but-unsafe objects by parent into retry items."""
    if len(idx) == 0:
        return []
    det = wr.detection
    c = wr.meas.columns
    oy, ox = wr.window.y0, wr.window.x0
    items = []
    for p in np.unique(det.parent[idx]):
        members = idx[det.parent[idx] == p]
        siblings = np.flatnonzero(det.parent == p)
        parent_unsafe = not bool(wr.parent_safe[members[0]])
        r = wr.meas.extent[siblings]
        bb = wr.meas.bbox[siblings]
        box = [
            int(min(bb[:, 0].min() + oy, np.floor(c["y"][siblings] - r).min())),
            int(max(bb[:, 1].max() + oy, np.ceil(c["y"][siblings] + r).max() + 1)),
            int(min(bb[:, 2].min() + ox, np.floor(c["x"][siblings] - r).min())),
            int(max(bb[:, 3].max() + ox, np.ceil(c["x"][siblings] + r).max() + 1)),
        ]
        seed = [int(wr.peak_y[members[0]]), int(wr.peak_x[members[0]])]
        items.append(
            {
                "tile": tile.index,
                "key": f"{tile.name}-y{seed[0]}-x{seed[1]}",
                "mode": "parent" if parent_unsafe else "objects",
                "seed": seed,
                "peaks": [[int(wr.peak_y[i]), int(wr.peak_x[i])] for i in members],
                "box": box,
            }
        )
    return items


def _retry(item: Mapping[str, Any], **kwargs: Any) -> dict[str, int]:
    try:
        return _retry_inner(item, **kwargs)
    except Exception as err:
        raise _named_failure(f"retry {item['key']} (objects near box {item['box']})", err) from err


def _retry_inner(
    item: Mapping[str, Any],
    *,
    mosaic_path: str,
    meshes: Sequence[BackgroundMesh],
    cfg: PipelineConfig,
    grid: TileGrid,
    outdir: str,
    meta: Mapping[str, Any],
) -> dict[str, int]:
    m = _mosaic(mosaic_path)
    tile = grid[item["tile"]]
    bounds = Box(0, m.ny, 0, m.nx)
    box = Box(*item["box"]).intersect(bounds) or bounds
    margin = grid.halo
    seed_y, seed_x = item["seed"]
    peaks = {tuple(p) for p in item["peaks"]}
    while True:
        win = box.grow(margin, bounds)
        wr = _window(m, win, meshes, cfg)
        lab = int(wr.detection.labels[seed_y - win.y0, seed_x - win.x0])
        if lab == 0:
            logger.warning("retry %s: seed pixel holds no object; nothing to add", item["key"])
            sel = np.zeros(wr.n, dtype=bool)
            break
        p = wr.detection.parent[lab - 1]
        if item["mode"] == "parent":
            sel = (wr.detection.parent == p) & tile.owns(wr.peak_y, wr.peak_x)
        else:
            sel = np.array(
                [(int(y), int(x)) in peaks for y, x in zip(wr.peak_y, wr.peak_x, strict=True)]
            )
        if wr.safe[sel].all() or win == bounds:
            break
        margin *= 2
    wr.meas.columns["flags"][sel & ~wr.safe] |= int(Flag.TRUNCATED)
    specs = cfg.columns(m.bands, m.units.get("image", "count"))
    rows = _rows(m, wr, sel, cfg)
    idx = np.flatnonzero(sel)
    ids = wr.peak_y[idx] * m.nx + wr.peak_x[idx]
    _write_part(
        Path(outdir),
        f"retry-{item['key']}",
        {
            "catalog.parquet": to_arrow(rows, specs, meta),
            "footprints.npz": _footprints(wr, idx, ids),
            "info.json": {"window": list(_box_tuple(win)), "n": len(idx)},
        },
    )
    return {"objects": len(idx), "window_pixels": win.size}


def _write_segmentation_chunk(
    chunk: Box,
    *,
    seg_path: str,
    tiles: Sequence[tuple[str, tuple[int, int, int, int]]],
    footprint_parts: Sequence[str],
    outdir: str,
) -> int:
    out = np.zeros(chunk.shape, dtype=np.int64)
    parts = Path(outdir) / "parts"
    for name, core in tiles:
        cbox = Box(*core)
        inter = cbox.intersect(chunk)
        if inter is None:
            continue
        raw = (parts / name / "labels.bin").read_bytes()
        labels = np.frombuffer(_BLOSC.decode(raw), dtype=np.int64).reshape(cbox.shape)
        out[inter.slices((chunk.y0, chunk.x0))] = labels[inter.slices((cbox.y0, cbox.x0))]
    for name in footprint_parts:
        with np.load(parts / name / "footprints.npz") as fp:
            ids, boxes, pixels = fp["ids"], fp["boxes"], fp["pixels"]
        offset = 0
        for oid, (y0, y1, x0, x1) in zip(ids, boxes, strict=True):
            n = (y1 - y0) * (x1 - x0)
            fbox = Box(int(y0), int(y1), int(x0), int(x1))
            inter = fbox.intersect(chunk)
            if inter is not None:
                crop = pixels[offset : offset + n].reshape(fbox.shape)[
                    inter.slices((fbox.y0, fbox.x0))
                ]
                region = out[inter.slices((chunk.y0, chunk.x0))]
                region[crop] = oid
            offset += n
    arr = zarr.open_group(seg_path, mode="r+", zarr_format=3)["segmentation"]
    arr[chunk.y0 : chunk.y1, chunk.x0 : chunk.x1] = out
    return int(np.count_nonzero(out))


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------
def _config_from(config: PipelineConfig | None, overrides: Mapping[str, Any]) -> PipelineConfig:
    cfg = config or PipelineConfig()
    if not overrides:
        return cfg
    d = cfg.to_dict()
    det_keys = set(d["detection"])
    mea_keys = set(d["measure"])
    for k, v in overrides.items():
        if v is None:
            continue
        if k in det_keys:
            d["detection"][k] = v
        elif k in mea_keys:
            d["measure"][k] = v
        elif k in d:
            d[k] = v
        else:
            msg = f"unknown run parameter {k!r}"
            raise TypeError(msg)
    return PipelineConfig.from_dict(d)


def _prepare_outdir(outdir: Path, run_info: dict, *, resume: bool, overwrite: bool) -> None:
    run_file = outdir / RUN_FILE
    run_info = json.loads(json.dumps(run_info))  # compare as stored (tuples become lists)
    if outdir.exists() and any(outdir.iterdir()):
        if overwrite:
            shutil.rmtree(outdir)
        elif resume:
            if not run_file.exists():
                msg = f"cannot resume: {outdir} holds no {RUN_FILE} (not a survey_engine run)"
                raise RunError(msg)
            previous = json.loads(run_file.read_text())
            if previous != run_info:
                diff = sorted(k for k in run_info if previous.get(k) != run_info[k])
                msg = (
                    f"cannot resume: {outdir} holds a different run (differs in {', '.join(diff)}); "
                    "use another output directory or overwrite=True"
                )
                raise RunError(msg)
            return
        else:
            msg = (
                f"output directory {outdir} is not empty (it holds an earlier run); "
                "pass resume=True (--resume) to continue it or overwrite=True (--overwrite)"
            )
            raise RunError(msg)
    (outdir / "parts").mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(run_info, indent=2))


def _background(client, m: Mosaic, cfg: PipelineConfig, outdir: Path, progress: bool):
    path = outdir / "background.npz"
    box = cfg.background_box
    ncy, ncx = -(-m.ny // box), -(-m.nx // box)
    if path.exists():
        with np.load(path) as f:
            levels, rmss = f["level"], f["rms"]
    else:
        step = box * max(1, 1024 // box)
        blocks = [
            Box(y, min(y + step, m.ny), x, min(x + step, m.nx))
            for y in range(0, m.ny, step)
            for x in range(0, m.nx, step)
        ]
        levels = np.full((len(m.bands), ncy, ncx), np.nan)
        rmss = np.full((len(m.bands), ncy, ncx), np.nan)
        res = map_tasks(
            client, _background_block, blocks, desc="background", progress=progress,
            mosaic_path=m.path, cfg=cfg, retries=1,
        )  # fmt: skip
        if res.failures:
            msg = f"background failed for {len(res.failures)} block(s): {res.failures[0].error}"
            raise RunError(msg, res.failures)
        for bbox, per_band in res.results.values():
            cy0, cx0 = bbox.y0 // box, bbox.x0 // box
            for b, (lvl, rms) in enumerate(per_band):
                levels[b, cy0 : cy0 + lvl.shape[0], cx0 : cx0 + lvl.shape[1]] = lvl
                rmss[b, cy0 : cy0 + lvl.shape[0], cx0 : cx0 + lvl.shape[1]] = rms
        np.savez(path, level=levels, rms=rmss)
    return [
        filter_mesh(levels[b], rmss[b], box, (m.ny, m.nx), filter_size=cfg.background_filter)
        for b in range(len(m.bands))
    ]


def run(
    mosaic: str | os.PathLike | Mosaic,
    outdir: str | os.PathLike,
    *,
    tile: int | tuple[int, int] | None = None,
    halo: int | None = None,
    origin: int | tuple[int, int] | None = None,
    deblender: str | None = None,
    config: PipelineConfig | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    client: Any | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    gpu: bool = False,
    backend: str | None = None,
    tile_batch: int | None = None,
    worker_resources: Mapping[str, float] | None = None,
    **params: Any,
) -> RunResult:
    """Produce the catalog and segmentation map of a mosaic on a Dask cluster.

    Every parameter left as None takes its value from the Dask configuration
    (``survey_engine.tile``, ``survey_engine.thresh`` … ; defaults in
    ``survey_engine/survey_engine.yaml``: tile 2048, halo 128, origin 0, deblender sep,
    thresh 1.5, minarea 5). Explicit arguments win; a full ``config`` replaces the
    configured pipeline parameters (``params`` still override its fields).

    Parameters
    ----------
    mosaic : str, path or Mosaic
        The mosaic store.
    outdir : str or path
        Output directory: ``catalog.parquet``, ``segmentation.zarr``, ``run.json``,
        ``parts/`` (per-tile results, kept for ``resume``).
    tile : int or (int, int)
        Tile core size in pixels (any size ≥ 32; odd sizes work).
    halo : int
        Halo read around each core (≥ 16). Objects larger than the halo are
        re-measured whole in a larger window, so the halo affects speed only.
    origin : int or (int, int)
        Offset of the tile grid (e.g. ``tile // 2``).
    deblender : str
        ``"sep"`` or ``"unet"``.
    config : PipelineConfig, optional
        Full parameter set; ``params`` override single fields
        (``thresh``, ``minarea``, ``deblend_cont``, ``apertures``,
        ``detection_band``, ``background_box`` …).
    workers : int, optional
        Worker processes of the LocalCluster started when neither
        ``scheduler`` nor ``client`` is given (default: one per core).
    scheduler : str, optional
        Address of an existing Dask scheduler.
    client : distributed.Client, optional
        An existing client.
    resume : bool
        Continue a run in ``outdir``, skipping finished tiles.
    overwrite : bool
        Delete whatever ``outdir`` holds first.
    progress : bool
        Show progress bars.
    gpu : bool
        Run every per-tile stage on GPUs: the ``torch`` backend on ``cuda`` with the
        ``unet`` deblender, on a ``dask_cuda.LocalCUDACluster`` (one worker per GPU), or,
        with ``scheduler``/``client``, on the workers that declare the Dask resource
        ``GPU`` (``dask worker … --resources GPU=1``).
    backend : {"numpy", "torch"}, optional
        Kernels of the per-tile stages (see :class:`~survey_engine.pipeline.PipelineConfig`);
        ``torch`` batches several tiles per task.
    tile_batch : int, optional
        Torch backend: tiles per task (default: from the free GPU memory of the
        workers on CUDA, 2 on CPU).
    worker_resources : dict, optional
        Dask resources every tile task needs (``gpu`` implies ``{"GPU": 1}``).
    **params
        Overrides of :class:`~survey_engine.pipeline.PipelineConfig` fields.

    Returns
    -------
    RunResult

    Raises
    ------
    RunError
        When tiles failed (named in the message; finished parts are kept so
        ``resume=True`` retries only the failures), or ``outdir`` holds another run,
        or ``gpu`` was asked for where no GPU (or no GPU worker) is available.
    """
    t_start = time.perf_counter()
    tile, halo, origin = (
        _conf.get("tile", tile),
        _conf.get("halo", halo),
        _conf.get("origin", origin),
    )
    if client is None and scheduler is None:
        scheduler = _conf.get("scheduler")
        workers = _conf.get("workers", workers)
    # The configured pipeline parameters apply unless a full ``config`` is given;
    # explicit arguments win either way.
    overrides = _conf.pipeline_defaults() if config is None else {}
    extra = {"deblender": deblender, "backend": backend, **params}
    overrides.update({k: v for k, v in extra.items() if v is not None})
    tile_batch = _conf.get("tile_batch", tile_batch)
    if overrides.get("backend") == "torch" and deblender is None:
        overrides["deblender"] = "unet"  # the torch backend's deblender
    if gpu:
        dev = params.get("device") or "cuda"
        if str(dev).split(":")[0] != "cuda":
            msg = f"gpu=True runs on CUDA; got device={dev!r}"
            raise ValueError(msg)
        overrides["device"] = dev
        if backend not in (None, "torch"):
            msg = f"gpu=True runs the torch backend; got backend={backend!r}"
            raise ValueError(msg)
        overrides["backend"] = "torch"
        if deblender is None and overrides.get("deblender") != "unet":
            overrides["deblender"] = "unet"
        worker_resources = dict(worker_resources or {}) or {"GPU": 1}
    m = mosaic if isinstance(mosaic, Mosaic) else open_mosaic(mosaic)
    cfg = _config_from(config, overrides)
    if cfg.detection_band is not None:
        m.band_index(cfg.detection_band)  # raises for an unknown band
    grid = make_tiles((m.ny, m.nx), tile, halo, origin=origin)
    if cfg.deblender == "unet" and grid.halo < cfg.guard + 8:
        msg = (
            f"halo must be ≥ {cfg.guard + 8} pixels for the unet deblender (its receptive "
            f"field, {cfg.guard - int(cfg.detection.minarea)} px, plus margin), got {grid.halo}"
        )
        raise ValueError(msg)
    outdir = Path(outdir)
    run_info = {
        "mosaic": os.path.abspath(m.path) if "://" not in m.path else m.path,
        "shape": [m.ny, m.nx],
        "bands": list(m.bands),
        "tile": list(grid.tile),
        "halo": grid.halo,
        "origin": list(grid.origin),
        "config": cfg.to_dict(),
    }
    _prepare_outdir(outdir, run_info, resume=resume, overwrite=overwrite)
    from . import __version__

    meta = {
        **run_info,
        "software": f"survey_engine {__version__}",
        "reference_band": cfg.reference_band(m.bands),
        "zero_points": m.zero_points,
        "flags": flag_descriptions(),
        "id": "y_peak * mosaic_width + x_peak",
    }
    timings: dict[str, float] = {}
    stages: dict[str, float] = {}
    gpu_memory: list[int] = []
    local_gpu = gpu and client is None and scheduler is None
    with contextlib.ExitStack() as stack:
        try:
            c = stack.enter_context(
                dask_client(workers=workers, scheduler=scheduler, client=client, gpu=local_gpu)
            )
        except GPUUnavailable as err:
            raise RunError(str(err)) from err
        if worker_resources:
            _check_resources(c, worker_resources, scheduler)
        t0 = time.perf_counter()
        meshes = _background(c, m, cfg, outdir, progress)
        timings["background"] = time.perf_counter() - t0

        parts = outdir / "parts"
        todo = [t for t in grid if not (parts / t.name).exists()]
        logger.info("%d tiles, %d to process", len(grid), len(todo))
        t0 = time.perf_counter()
        res = _run_tiles(
            c, todo, cfg=cfg, progress=progress, tile_batch=tile_batch, n_bands=len(m.bands),
            resources=worker_resources, mosaic_path=m.path, meshes=meshes, outdir=str(outdir),
            meta=meta,
        )  # fmt: skip
        timings["tiles"] = time.perf_counter() - t0
        failures = list(res.failures)
        for r in res.results.values():
            for k, v in r.get("times", {}).items():
                stages[k] = stages.get(k, 0.0) + v
            if r.get("gpu_memory") is not None:
                gpu_memory.append(r["gpu_memory"])

        pending = []
        for t in grid:
            pfile = parts / t.name / "pending.json"
            if pfile.exists():
                pending += json.loads(pfile.read_text())
        retry_todo = [p for p in pending if not (parts / f"retry-{p['key']}").exists()]
        t0 = time.perf_counter()
        res2 = map_tasks(
            c, _retry, retry_todo, keys=[p["key"] for p in retry_todo], desc="retry", progress=progress,
            mosaic_path=m.path, meshes=meshes, cfg=cfg, grid=grid, outdir=str(outdir), meta=meta,
            resources=worker_resources or None,
        )  # fmt: skip
        timings["retry"] = time.perf_counter() - t0
        failures += res2.failures
        if failures:
            names = ", ".join(str(f.key) for f in failures[:10])
            more = f" and {len(failures) - 10} more" if len(failures) > 10 else ""
            msg = (
                f"{len(failures)} task(s) failed: {names}{more}; first error: {failures[0].error}. "
                f"Finished parts are kept in {parts}: rerun with resume=True (--resume) to retry "
                "only the failures."
            )
            raise RunError(msg, failures)

        t0 = time.perf_counter()
        seg_path = outdir / "segmentation.zarr"
        _segmentation(c, m, grid, outdir, seg_path, pending, progress)
        timings["segmentation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cat_path = outdir / "catalog.parquet"
    n = _stitch_catalog(grid, pending, parts, cat_path, cfg, m, meta)
    timings["catalog"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    logger.info("catalog %s: %d objects (%d retried)", cat_path, n, len(pending))
    return RunResult(
        outdir, cat_path, seg_path, n, len(grid), len(pending), timings,
        stages=stages, pixels=m.ny * m.nx, gpu_memory=max(gpu_memory) if gpu_memory else None,
        backend=cfg.backend, device=cfg.device,
    )  # fmt: skip


def _check_resources(client, resources: Mapping[str, float], scheduler: str | None) -> None:
    for name in resources:
        if not workers_with(client, name):
            where = f"the cluster at {scheduler}" if scheduler else "the cluster"
            msg = (
                f"no worker of {where} declares the Dask resource {name!r} that the tile tasks "
                f"need; start GPU workers with `dask worker <scheduler> --resources {name}=1` "
                f"(or `dask cuda worker <scheduler> --resources {name}=1`)"
            )
            raise RunError(msg)


def _run_tiles(client, todo: Sequence[Tile], *, cfg, progress, tile_batch, n_bands, resources,
               **kwargs):  # fmt: skip
    """Map the tile stage: one task per tile (numpy), or per batch of tiles (torch)."""
    if cfg.backend != "torch":
        return map_tasks(
            client, _process_tile, todo, keys=[t.name for t in todo], desc="tiles",
            progress=progress, cfg=cfg, resources=resources or None, **kwargs,
        )  # fmt: skip
    per_task = _tiles_per_task(client, todo, cfg, tile_batch, n_bands)
    # Equal read shapes next to each other, so that a task's tiles stack into one batch.
    ordered = sorted(todo, key=lambda t: (t.read.shape, t.index))
    batches = [ordered[i : i + per_task] for i in range(0, len(ordered), per_task)]
    keys = [f"{b[0].name}+{len(b) - 1}" if len(b) > 1 else b[0].name for b in batches]
    logger.info("torch backend: %d tiles in %d tasks of ≤%d", len(todo), len(batches), per_task)
    res = map_tasks(
        client, _process_tile_batch, batches, keys=keys, desc="tiles", progress=progress,
        cfg=cfg, resources=resources or None, cpu_batch=tile_batch, **kwargs,
    )  # fmt: skip
    by_key = dict(zip(keys, batches, strict=True))
    out = TaskResults()
    for f in res.failures:  # the whole task died: name its tiles
        names = ", ".join(t.name for t in by_key[f.key])
        out.failures.append(TaskFailure(f.key, f"tiles {names}: {f.error}"))
    for key, r in res.results.items():
        out.results[key] = r
        for name, err in r["failed"].items():
            out.failures.append(TaskFailure(name, err))
    return out


def _tiles_per_task(client, todo, cfg, tile_batch, n_bands) -> int:
    if tile_batch is not None:
        if int(tile_batch) != tile_batch or tile_batch < 1:
            msg = f"tile_batch must be a positive integer, got {tile_batch!r}"
            raise ValueError(msg)
        return int(tile_batch)
    from .torch_pipeline import CPU_BATCH, windows_fitting

    if not todo or not cfg.device.startswith("cuda"):
        return CPU_BATCH
    # From the free memory of the GPU workers: each task fills its device once.
    free = [v for v in client.run(_free_gpu_memory).values() if v]
    if not free:  # no worker reported a GPU (yet): tasks re-size their batches themselves
        return 2 * CPU_BATCH
    return windows_fitting(todo[0].read.shape, n_bands, min(free))


def _free_gpu_memory() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0])
    except Exception:  # a worker without a usable GPU
        pass
    return 0


def _segmentation(
    client, m: Mosaic, grid: TileGrid, outdir: Path, seg_path: Path, pending, progress
):
    parts = outdir / "parts"
    cy, cx = m.chunks[1], m.chunks[2]
    group = zarr.open_group(str(seg_path), mode="w", zarr_format=3)
    group.attrs.update({"wcs": m.wcs_cards, "description": "object ID per pixel (0 = none)"})
    group.create_array(
        "segmentation", shape=(m.ny, m.nx), chunks=(cy, cx), dtype=np.int64, fill_value=0,
        dimension_names=("y", "x"), attributes={"description": "catalog id of the object owning the pixel"},
    )  # fmt: skip
    # Footprints that leave their owner's core, and every retried object's footprint.
    fp_parts: list[tuple[str, np.ndarray]] = []
    names = [t.name for t in grid] + [f"retry-{p['key']}" for p in pending]
    for name in names:
        with np.load(parts / name / "footprints.npz") as fp:
            if len(fp["ids"]):
                fp_parts.append((name, fp["boxes"]))
    chunks = [
        Box(y, min(y + cy, m.ny), x, min(x + cx, m.nx))
        for y in range(0, m.ny, cy)
        for x in range(0, m.nx, cx)
    ]
    items = []
    for ch in chunks:
        tiles = [(t.name, _box_tuple(t.core)) for t in grid.overlapping(ch)]
        fps = [
            name
            for name, boxes in fp_parts
            if np.any(
                (boxes[:, 0] < ch.y1)
                & (boxes[:, 1] > ch.y0)
                & (boxes[:, 2] < ch.x1)
                & (boxes[:, 3] > ch.x0)
            )
        ]
        items.append((ch, tiles, fps))
    res = map_tasks(
        client, _seg_item, items, desc="segmentation", progress=progress,
        seg_path=str(seg_path), outdir=str(outdir), retries=1,
    )  # fmt: skip
    if res.failures:
        msg = f"writing the segmentation map failed for {len(res.failures)} chunk(s): {res.failures[0].error}"
        raise RunError(msg, res.failures)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consolidated metadata is a zarr-python extension to v3
        zarr.consolidate_metadata(str(seg_path))


def _seg_item(item, *, seg_path: str, outdir: str) -> int:
    chunk, tiles, fps = item
    return _write_segmentation_chunk(
        chunk, seg_path=seg_path, tiles=tiles, footprint_parts=fps, outdir=outdir
    )


def _stitch_catalog(grid, pending, parts: Path, path: Path, cfg, m: Mosaic, meta) -> int:
    tables = [pq.read_table(parts / t.name / "catalog.parquet") for t in grid]
    tables += [pq.read_table(parts / f"retry-{p['key']}" / "catalog.parquet") for p in pending]
    specs = cfg.columns(m.bands, m.units.get("image", "count"))
    table = (
        pa.concat_tables(tables)
        if tables
        else to_arrow({s.name: np.zeros(0, s.dtype) for s in specs}, specs, meta)
    )
    table = table.sort_by("id")
    ids = table.column("id").to_numpy()
    dup = ids[1:][ids[1:] == ids[:-1]]
    if len(dup):
        msg = f"internal error: {len(dup)} duplicate object IDs after stitching (first {dup[0]})"
        raise RunError(msg)
    table = table.replace_schema_metadata(
        to_arrow({s.name: np.zeros(0, s.dtype) for s in specs}, specs, meta).schema.metadata
    )
    write_parquet_atomic(table, path)
    return table.num_rows
