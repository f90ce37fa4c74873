"""The part store: the one place that knows the on-disk layout of a run directory.

A run directory (``OUTDIR``) holds::

    run.json                  what the run is (mosaic, tiling, parameters): checked on resume
    background.npz            the global background mesh statistics (reused on resume)
    parts/<tile>/             one directory per finished tile, written atomically:
        catalog.parquet         the rows of the objects it owns (the catalog schema)
        labels.bin              its core's object IDs per pixel (int64, blosc-zstd)
        footprints.npz          footprints of its objects that leave the core
        pending.json            owned objects to measure again in a larger window
        info.json               tile index, core, object count
    parts/retry-<key>/        one per re-measured object group: catalog, footprints, info
    parts/_manifest/*.jsonl   the finished tiles, recorded by the driver in batches: each
                              tile's retry items and footprint boxes (resume reads these few
                              files, not one per tile)
    catalog.parquet, segmentation.zarr   the stitched results

A survey run directory (:class:`SurveyStore`) holds::

    survey.json               what the survey run is (survey, sky map, parameters): checked on resume
    tracts/<id>/              one run directory (above) per tract
    catalog/tract=<id>/part-NNNNN.parquet   the global catalog, a Parquet dataset partitioned by tract
    catalog/_common_metadata  its schema and catalog-level metadata

Writers (workers), resume (the driver) and the segmentation and catalog stages all go
through :class:`PartStore`; nothing else lists or opens part files, so the format can
change here alone (the catalog can be read as a partitioned dataset straight from the
parts' ``catalog.parquet``: :meth:`PartStore.catalog_tables`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["Footprints", "PartStore", "StoreError", "SurveyStore"]

RUN_FILE = "run.json"
MANIFEST_DIR = "_manifest"
SURVEY_FILE = "survey.json"
_BLOSC = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)


class StoreError(RuntimeError):
    """An output directory that cannot hold (or continue) this run."""


@dataclass
class Footprints:
    """Footprints of some objects as mosaic boxes and flattened boolean crops.

    Attributes
    ----------
    ids, boxes, pixels : numpy.ndarray
        int64 object IDs; ``(n, 4)`` int64 mosaic boxes ``y0, y1, x0, x1``; bool, the crops
        (each ``(y1 - y0) × (x1 - x0)``, row-major) one after the other.
    """

    ids: np.ndarray
    boxes: np.ndarray
    pixels: np.ndarray

    def paint(self, out: np.ndarray, y0: int, x0: int) -> None:
        """Write each object's ID on its pixels into ``out``, whose first pixel is mosaic (y0, x0)."""
        h, w = out.shape
        offset = 0
        for oid, (by0, by1, bx0, bx1) in zip(self.ids, self.boxes, strict=True):
            n = (by1 - by0) * (bx1 - bx0)
            iy0, iy1, ix0, ix1 = max(by0, y0), min(by1, y0 + h), max(bx0, x0), min(bx1, x0 + w)
            if iy0 < iy1 and ix0 < ix1:
                crop = self.pixels[offset : offset + n].reshape(by1 - by0, bx1 - bx0)
                crop = crop[iy0 - by0 : iy1 - by0, ix0 - bx0 : ix1 - bx0]
                out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0][crop] = oid
            offset += n


class PartStore:
    """A run directory: its run description, background, per-tile and retry parts.

    Parameters
    ----------
    root : path-like
        The run's output directory.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.parts = self.root / "parts"

    def __repr__(self) -> str:
        return f"PartStore({str(self.root)!r})"

    # -- the run -----------------------------------------------------------------------
    def prepare(self, run_info: dict[str, Any], *, resume: bool, overwrite: bool) -> bool:
        """Make the directory ready for a run described by ``run_info``.

        An empty or missing directory is set up; ``overwrite`` clears one that is not; ``resume``
        continues one that holds the same run (same ``run.json``; half-written parts removed).

        Returns
        -------
        bool
            True when the run starts from nothing here (:meth:`discard` then undoes it).

        Raises
        ------
        StoreError
            The path is a file or unwritable; it holds another run (or no run) without
            ``overwrite``, or a run and neither flag is given.
        """
        run_info = json.loads(json.dumps(run_info))  # compare as stored (tuples become lists)
        if self.root.exists() and not self.root.is_dir():
            msg = f"output directory {self.root} is a file, not a directory: give another OUTDIR"
            raise StoreError(msg)
        self._existed = self.root.exists()
        try:
            if self._existed and any(self.root.iterdir()):
                if overwrite:
                    shutil.rmtree(self.root)
                elif resume:
                    self._check_resumable(run_info)
                    for tmp in self.parts.glob(".*.tmp-*"):
                        shutil.rmtree(tmp, ignore_errors=True)
                    return False
                else:
                    msg = (
                        f"output directory {self.root} is not empty (it holds an earlier run); "
                        "pass resume=True (--resume) to continue it or overwrite=True (--overwrite)"
                    )
                    raise StoreError(msg)
            self.parts.mkdir(parents=True, exist_ok=True)
            (self.root / RUN_FILE).write_text(json.dumps(run_info, indent=2))
        except OSError as err:
            msg = f"cannot write to output directory {self.root}: {err.strerror or err}"
            raise StoreError(msg) from None
        return True

    def _check_resumable(self, run_info: dict[str, Any]) -> None:
        _check_same_run(self.root / RUN_FILE, run_info, "survey_engine run", "run")

    def previous_run(self) -> dict[str, Any] | None:
        """The ``run.json`` of the run this directory holds, if any."""
        path = self.root / RUN_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def discard(self) -> None:
        """Undo :meth:`prepare` of a run that stopped before any part was written."""
        shutil.rmtree(self.parts, ignore_errors=True)
        for name in (RUN_FILE, "background.npz"):
            (self.root / name).unlink(missing_ok=True)
        if not getattr(self, "_existed", True):
            with contextlib.suppress(OSError):
                self.root.rmdir()

    def load_background(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The saved mesh statistics ``(level, rms)``, or None."""
        path = self.root / "background.npz"
        if not path.exists():
            return None
        with np.load(path) as f:
            return f["level"], f["rms"]

    def save_background(self, level: np.ndarray, rms: np.ndarray) -> None:
        """Keep the mesh statistics for a resumed run."""
        np.savez(self.root / "background.npz", level=level, rms=rms)

    # -- writing parts (workers) ---------------------------------------------------------
    def write_tile(self, name: str, *, table: pa.Table, core_labels: np.ndarray,
                   footprints: Footprints, pending: list[dict], info: dict) -> None:  # fmt: skip
        """Write a tile's part atomically (see the module docstring for what it holds)."""
        self._write(name, {
            "catalog.parquet": table, "labels.bin": _BLOSC.encode(np.ascontiguousarray(core_labels)),
            "footprints.npz": footprints, "pending.json": pending, "info.json": info,
        })  # fmt: skip

    def write_retry(self, key: str, *, table: pa.Table, footprints: Footprints, info: dict) -> None:
        """Write the part of a re-measured object group atomically."""
        files = {"catalog.parquet": table, "footprints.npz": footprints, "info.json": info}
        self._write(retry_part(key), files)

    def _write(self, name: str, files: dict[str, Any]) -> None:
        """All files into a temporary directory, then one rename: a part is whole or absent."""
        final = self.parts / name
        tmp = self.parts / f".{name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        try:
            self._write_files(tmp, files)
        except OSError as err:  # disk full, quota, permissions: name the directory
            shutil.rmtree(tmp, ignore_errors=True)
            msg = f"cannot write part {name} in {self.root}: {err.strerror or err}"
            raise OSError(err.errno, msg) from None
        if final.exists():  # a previous attempt of the same item finished meanwhile
            shutil.rmtree(tmp)
            return
        os.rename(tmp, final)

    @staticmethod
    def _write_files(tmp: Path, files: dict[str, Any]) -> None:
        tmp.mkdir(parents=True)
        for fname, content in files.items():
            path = tmp / fname
            if isinstance(content, pa.Table):
                pq.write_table(content, path, compression="zstd")
            elif isinstance(content, bytes):
                path.write_bytes(content)
            elif isinstance(content, Footprints):
                np.savez(path, ids=content.ids, boxes=content.boxes, pixels=content.pixels)
            else:
                path.write_text(json.dumps(content))

    # -- the manifest (the driver) ----------------------------------------------------------
    def record(self, entries: dict[str, dict]) -> None:
        """Add finished parts to the run's manifest: name → what the driver needs of the part
        (its retry items, the boxes of its footprints that leave its core).

        Each call writes one new file of the ``_manifest`` directory whole (temporary name,
        then rename), so a manifest is never half-written; the driver calls it every few
        hundred results, so the retry and segmentation stages (and a resumed run) read a few
        files instead of two per tile. A part written but not recorded (the driver stopped
        first) is read from its own files.
        """
        if not entries:
            return
        d = self.parts / MANIFEST_DIR
        d.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{os.getpid()}.jsonl"
        tmp = d / f".{name}.tmp"
        tmp.write_text("".join(json.dumps({"part": k, **v}) + "\n" for k, v in entries.items()))
        os.rename(tmp, d / name)

    def entries_of(self, names: Iterable[str]) -> dict[str, dict]:
        """Manifest entries of written tile parts, read from their files."""
        boxes = self.footprint_boxes(names := sorted(names))
        return {n: {"pending": self.pending([n]), "boxes": boxes[n].tolist() if n in boxes else []}
                for n in names}  # fmt: skip

    def manifest(self) -> dict[str, dict] | None:
        """Every part the manifest records (name → entry), or None where the run has none."""
        d = self.parts / MANIFEST_DIR
        if not d.is_dir():
            return None
        out: dict[str, dict] = {}
        for path in sorted(d.glob("*.jsonl")):
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                out[entry.pop("part")] = entry
        return out

    # -- reading parts ---------------------------------------------------------------------
    def finished(self, names: Iterable[str]) -> set[str]:
        """The tiles among ``names`` whose part is written (parts appear whole): one listing of
        ``parts/``, not a request per tile."""
        on_disk = set(os.listdir(self.parts)) if self.parts.is_dir() else set()
        return {n for n in names if n in on_disk}

    def finished_retries(self, keys: Iterable[str]) -> set[str]:
        """The retry keys among ``keys`` whose part is written."""
        return {k for k in keys if (self.parts / retry_part(k)).exists()}

    def written_retry_groups(self) -> dict[str, list[str]]:
        """Every written retry part: its key → the keys of the retry items it measured."""
        out = {}
        for path in sorted(self.parts.glob("retry-*/info.json")):
            info = json.loads(path.read_text())
            out[path.parent.name.removeprefix("retry-")] = info.get("members", [])
        return out

    def pending(self, names: Iterable[str]) -> list[dict]:
        """Every retry item of the tiles ``names`` (in their order), from the manifest where
        it records them."""
        recorded = self.manifest() or {}
        out: list[dict] = []
        for n in names:
            if n in recorded:
                out += recorded[n]["pending"]
                continue
            path = self.parts / n / "pending.json"
            if path.exists():
                out += json.loads(path.read_text())
        return out

    def core_labels(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """The object IDs of tile ``name``'s core pixels (read-only).

        The last two of up to 32 MiB stay decoded in the process (keyed by path and mtime):
        each chunk of the segmentation map overlapping a tile asks for its labels.
        """
        path = self.parts / name / "labels.bin"
        if shape[0] * shape[1] * 8 > 32 * 2**20:
            return _decode_labels(str(path), tuple(shape), 0)
        return _cached_labels(str(path), tuple(shape), path.stat().st_mtime_ns)

    def footprints(self, name: str) -> Footprints:
        """The footprints written with part ``name`` (a tile name or ``retry_part(key)``)."""
        with np.load(self.parts / name / "footprints.npz") as fp:
            return Footprints(fp["ids"], fp["boxes"], fp["pixels"])

    def footprint_boxes(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """The footprint boxes ``(n, 4)`` of each part that has any (from the manifest where it
        records the part)."""
        recorded = self.manifest() or {}
        out = {}
        for n in names:
            if n in recorded:
                if recorded[n]["boxes"]:
                    out[n] = np.asarray(recorded[n]["boxes"], dtype=np.int64).reshape(-1, 4)
                continue
            with np.load(self.parts / n / "footprints.npz") as fp:
                if len(fp["ids"]):
                    out[n] = fp["boxes"]
        return out

    def catalog_tables(self, names: Sequence[str]) -> Iterator[pa.Table]:
        """The catalog rows of parts ``names``, one table each.

        ``ParquetFile.read``, not ``read_table``: the latter imports ``pyarrow.dataset`` (and
        ``pyarrow.compute``), ~0.4 s at the driver's first catalog.
        """
        for n in names:
            with pq.ParquetFile(self.parts / n / "catalog.parquet") as f:
                yield f.read()


def _decode_labels(path: str, shape: tuple[int, int], _stamp: int) -> np.ndarray:
    raw = Path(path).read_bytes()
    return np.frombuffer(_BLOSC.decode(raw), dtype=np.int64).reshape(shape)


_cached_labels = functools.lru_cache(maxsize=2)(_decode_labels)


class SurveyStore:
    """A survey run directory: its description, one :class:`PartStore` per tract, the catalog.

    Parameters
    ----------
    root : path-like
        The survey run's output directory.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.catalog = self.root / "catalog"

    def __repr__(self) -> str:
        return f"SurveyStore({str(self.root)!r})"

    def prepare(self, info: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
        """Make the directory ready for the survey run described by ``info``.

        A missing or empty directory is set up; ``overwrite`` clears one that is not;
        ``resume`` continues one that holds the same survey run (any tracts of it: tracts
        already finished are kept, others run).

        Raises
        ------
        StoreError
            The path is a file or unwritable; it holds something else, another survey run, or a
            survey run and neither flag is given.
        """
        info = json.loads(json.dumps(info))
        if self.root.exists() and not self.root.is_dir():
            msg = f"output directory {self.root} is a file, not a directory: give another OUTDIR"
            raise StoreError(msg)
        path = self.root / SURVEY_FILE
        try:
            if self.root.exists() and any(self.root.iterdir()):
                if overwrite:
                    shutil.rmtree(self.root)
                elif not resume:
                    msg = (
                        f"output directory {self.root} is not empty (it holds an earlier run); "
                        "pass resume=True (--resume) to continue it or add tracts to it, or "
                        "overwrite=True (--overwrite)"
                    )
                    raise StoreError(msg)
                else:
                    _check_same_run(path, info, "survey run", "survey run")
                    return
            self.catalog.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(info, indent=2))
        except OSError as err:
            msg = f"cannot write to output directory {self.root}: {err.strerror or err}"
            raise StoreError(msg) from None

    def tract(self, tract_id: int) -> PartStore:
        """The run directory of one tract."""
        return PartStore(self.root / "tracts" / str(int(tract_id)))

    def tract_catalog(self, tract_id: int) -> Path:
        """The directory of one tract's files in the partitioned catalog (``tract=<id>``).

        It appears whole (written under a hidden name, then renamed), so a tract whose
        directory exists is finished.
        """
        return self.catalog / f"tract={int(tract_id)}"

    def finished_tracts(self) -> set[int]:
        """The tracts whose catalog is written (one listing of the catalog directory)."""
        return {int(p.name.split("=", 1)[1]) for p in self.catalog.glob("tract=*") if p.is_dir()}

    def write_schema(self, schema: pa.Schema) -> None:
        """The dataset's ``_common_metadata``: schema with units and the survey's metadata."""
        pq.write_metadata(schema, self.catalog / "_common_metadata")


def _check_same_run(path: Path, info: dict[str, Any], kind: str, other: str) -> None:
    """Refuse to resume unless ``path`` (a run file) holds exactly ``info``."""
    if not path.is_file():
        msg = f"cannot resume: {path.parent} holds no {path.name} (not a {kind})"
        raise StoreError(msg)
    previous = json.loads(path.read_text())
    if previous != info:
        diff = sorted(k for k in info if previous.get(k) != info[k])
        msg = (
            f"cannot resume: {path.parent} holds a different {other} (differs in "
            f"{', '.join(diff)}); use another output directory or overwrite=True"
        )
        raise StoreError(msg)


def retry_part(key: str) -> str:
    """The part name of a retry item (for :meth:`PartStore.footprints` and ``catalog_tables``)."""
    return f"retry-{key}"
