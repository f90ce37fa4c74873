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

The root may be a local directory or an fsspec URL (``s3://bucket/run``; endpoint and
credentials as described in :mod:`survey_engine.storage`); the layout is the same. What makes
a part whole differs:

* local: its files are written into ``parts/.<name>.tmp-<pid>-<ns>/`` and the directory is
  renamed to ``parts/<name>/`` — one ``rename``, so a part is complete or absent; a resumed run
  removes leftover temporary directories;
* object store (no rename): its files are written under ``parts/<name>/`` (each object is
  atomic: it appears whole or not at all) and ``info.json`` last, as the part's *marker*: a
  part is finished exactly when its ``info.json`` exists. A run stopped mid-part leaves files
  without a marker: they are ignored, removed by a resumed run, and the part is redone.
  Finished parts are found by one listing of ``parts/`` (``fs.find``), not a request per
  tile; the files of many parts are fetched concurrently (``fs.cat``). The catalog and the
  other single files are one object each (one PUT).

Writers (workers), resume (the driver) and the segmentation and catalog stages all go
through :class:`PartStore`; nothing else lists or opens part files, so the format can
change here alone (the catalog can be read as a partitioned dataset straight from the
parts' ``catalog.parquet``: :meth:`PartStore.catalog_tables`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .storage import check_store, filesystem, is_url

__all__ = ["Footprints", "PartStore", "StoreError", "SurveyStore"]

RUN_FILE = "run.json"
MANIFEST_DIR = "_manifest"
SURVEY_FILE = "survey.json"
#: The file of a part written last on an object store: the part is finished when it exists.
MARKER = "info.json"
#: The file written last into a catalog dataset directory on an object store.
SUCCESS = "_SUCCESS"
#: Parts whose files are fetched in one concurrent ``fs.cat`` call.
_CAT_BATCH = 256
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


class _Root:
    """A directory that is a local path or an fsspec URL: the file access both stores share.

    Local roots are :class:`pathlib.Path` (made absolute: workers may run elsewhere); URL roots
    are :class:`upath.UPath` (``root / "catalog.parquet"`` works for both, ``str()`` gives the
    path or URL). Remote files are addressed by their path relative to the root.
    """

    def __init__(self, root: str | os.PathLike, storage_options: Mapping[str, Any] | None = None):
        self.storage_options = dict(storage_options or {})
        self.remote = is_url(root)
        if self.remote:
            self.url = str(root).rstrip("/")
            self.root = _upath(self.url, self.storage_options)
        else:
            self.root = Path(root).absolute()
            self.url = str(self.root)
        self._fs = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}  # the file system is made again where unpickled

    @property
    def fs(self):
        """The fsspec file system of a URL root."""
        if self._fs is None:
            self._fs, self._base = filesystem(self.url, self.storage_options)
            self._base = self._base.rstrip("/")
        return self._fs

    def _key(self, *names: str) -> str:
        """The file system path of ``names`` under the (URL) root."""
        self.fs  # noqa: B018  (sets _base)
        return "/".join([self._base, *names])

    def _read(self, *names: str) -> bytes | None:
        """The bytes of a file under the root; None when it does not exist."""
        if not self.remote:
            path = self.root.joinpath(*names)
            return path.read_bytes() if path.is_file() else None
        try:
            return self.fs.cat_file(self._key(*names))
        except FileNotFoundError:
            return None

    def _put(self, data: bytes, *names: str) -> None:
        """One file under the root, whole (a single object on an object store)."""
        if not self.remote:
            self.root.joinpath(*names).write_bytes(data)
        else:
            self.fs.pipe_file(self._key(*names), data)

    def _cat(self, paths: Sequence[tuple[str, ...]]) -> dict[tuple[str, ...], bytes]:
        """Files under the root fetched concurrently, those that exist (URL roots)."""
        out: dict[tuple[str, ...], bytes] = {}
        for i in range(0, len(paths), _CAT_BATCH):
            batch = {self._key(*p): p for p in paths[i : i + _CAT_BATCH]}
            got = self.fs.cat(list(batch), on_error="omit") if batch else {}
            if len(batch) == 1 and isinstance(got, bytes):  # fsspec returns bytes for one path
                got = dict.fromkeys(batch, got)
            out.update({batch[k]: v for k, v in got.items() if k in batch})
        return out

    def _files(self, *names: str) -> list[tuple[str, ...]]:
        """Every file under ``names`` (one listing), as path components relative to it."""
        prefix = self._key(*names)
        try:
            found = self.fs.find(prefix)
        except FileNotFoundError:
            return []
        return [tuple(f[len(prefix) + 1 :].split("/")) for f in found if f.startswith(prefix + "/")]

    def _is_empty(self) -> bool:
        """Whether the root holds nothing (a missing root is empty)."""
        if not self.remote:
            return not (self.root.exists() and any(self.root.iterdir()))
        try:
            return not self.fs.ls(self._key(), detail=False)
        except FileNotFoundError:
            return True

    def _check_usable(self) -> None:
        """Refuse a root that is a file; on an object store, one that cannot be reached."""
        if self.remote:
            try:
                check_store(self.url, self.storage_options, "output directory")
            except OSError as err:
                raise StoreError(str(err)) from None
            is_file = self.fs.isfile(self._key())
        else:
            is_file = self.root.exists() and not self.root.is_dir()
        if is_file:
            msg = f"output directory {self.url} is a file, not a directory: give another OUTDIR"
            raise StoreError(msg)

    def _remove_all(self) -> None:
        """Delete the root and everything under it."""
        if not self.remote:
            shutil.rmtree(self.root)
        else:
            self.fs.rm(self._key(), recursive=True)

    # -- catalog datasets (written by workers, published by the driver) -------------------
    def path_of(self, *names: str) -> str:
        """The local path or URL of ``names`` under the root (where a worker writes)."""
        return "/".join([self.url, *names]) if self.remote else str(self.root.joinpath(*names))

    def remove(self, *names: str) -> None:
        """Delete the file or directory ``names`` under the root, if it exists."""
        if self.remote:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._key(*names), recursive=True)
            return
        path = self.root.joinpath(*names)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def stage_dataset(self, *names: str) -> str:
        """Where the files of the dataset directory ``names`` are written before
        :meth:`publish_dataset`: a hidden sibling directory (local), the directory itself with
        any earlier content removed (object store)."""
        if self.remote:
            self.remove(*names)
            return self.path_of(*names)
        tmp = self.root.joinpath(*names[:-1], f".{names[-1]}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return str(tmp)

    def publish_dataset(self, staged: str, *names: str, schema: pa.Schema) -> None:
        """Make the dataset written in ``staged`` the directory ``names``, whole, with its
        ``_common_metadata``: one rename replacing an earlier one (local), or the
        ``_SUCCESS`` object written last (object store)."""
        sink = pa.BufferOutputStream()
        pq.write_metadata(schema, sink)
        meta = sink.getvalue().to_pybytes()
        if self.remote:
            self._put(meta, *names, "_common_metadata")
            self._put(b"", *names, SUCCESS)
            return
        Path(staged, "_common_metadata").write_bytes(meta)
        self.remove(*names)
        os.rename(staged, self.root.joinpath(*names))

    def _check_same_run(self, name: str, info: dict[str, Any], kind: str, other: str) -> None:
        """Refuse to resume unless the run file ``name`` holds exactly ``info``."""
        raw = self._read(name)
        if raw is None:
            msg = f"cannot resume: {self.url} holds no {name} (not a {kind})"
            raise StoreError(msg)
        previous = json.loads(raw)
        if previous != info:
            diff = sorted(k for k in info if previous.get(k) != info[k])
            msg = (
                f"cannot resume: {self.url} holds a different {other} (differs in "
                f"{', '.join(diff)}); use another output directory or overwrite=True"
            )
            raise StoreError(msg)


def _upath(url: str, storage_options: Mapping[str, Any]):
    try:
        from upath import UPath
    except ImportError:
        msg = f"{url}: output to a URL needs universal_pathlib (pip install 'survey_engine[s3]')"
        raise StoreError(msg) from None
    return UPath(url, **storage_options)


class PartStore(_Root):
    """A run directory: its run description, background, per-tile and retry parts.

    Parameters
    ----------
    root : path-like or str
        The run's output directory: a local path or an fsspec URL (``s3://bucket/run``).
    storage_options : mapping, optional
        fsspec options of a URL root (default: the environment; :mod:`survey_engine.storage`).
    """

    def __init__(self, root: str | os.PathLike, storage_options: Mapping[str, Any] | None = None):
        super().__init__(root, storage_options)
        self.parts = self.root / "parts"

    def __repr__(self) -> str:
        return f"PartStore({self.url!r})"

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
            The path is a file or unwritable (or its object store unreachable, its bucket
            missing); it holds another run (or no run) without ``overwrite``, or a run and
            neither flag is given.
        """
        run_info = json.loads(json.dumps(run_info))  # compare as stored (tuples become lists)
        self._check_usable()
        self._existed = self.remote or self.root.exists()
        try:
            if not self._is_empty():
                if overwrite:
                    self._remove_all()
                elif resume:
                    self._check_resumable(run_info)
                    self._remove_unfinished()
                    return False
                else:
                    msg = (
                        f"output directory {self.url} is not empty (it holds an earlier run); "
                        "pass resume=True (--resume) to continue it or overwrite=True (--overwrite)"
                    )
                    raise StoreError(msg)
            if not self.remote:
                self.parts.mkdir(parents=True, exist_ok=True)
            self._put(json.dumps(run_info, indent=2).encode(), RUN_FILE)
        except OSError as err:
            msg = f"cannot write to output directory {self.url}: {err.strerror or err}"
            raise StoreError(msg) from None
        return True

    def _check_resumable(self, run_info: dict[str, Any]) -> None:
        self._check_same_run(RUN_FILE, run_info, "survey_engine run", "run")

    def _remove_unfinished(self) -> None:
        """Half-written parts: temporary directories (local), parts without a marker (URL)."""
        if not self.remote:
            for tmp in self.parts.glob(".*.tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)
            return
        files = self._files("parts")
        finished = {f[0] for f in files if f[1:] == (MARKER,)} | {MANIFEST_DIR}
        stale = [self._key("parts", *f) for f in files if f[0] not in finished]
        if stale:
            self.fs.rm(stale)

    def previous_run(self) -> dict[str, Any] | None:
        """The ``run.json`` of the run this directory holds, if any."""
        raw = self._read(RUN_FILE)
        return json.loads(raw) if raw is not None else None

    def discard(self) -> None:
        """Undo :meth:`prepare` of a run that stopped before any part was written."""
        if self.remote:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._key("parts"), recursive=True)
            for name in (RUN_FILE, "background.npz"):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self._key(name))
            return
        shutil.rmtree(self.parts, ignore_errors=True)
        for name in (RUN_FILE, "background.npz"):
            (self.root / name).unlink(missing_ok=True)
        if not getattr(self, "_existed", True):
            with contextlib.suppress(OSError):
                self.root.rmdir()

    def load_background(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The saved mesh statistics ``(level, rms)``, or None."""
        raw = self._read("background.npz")
        if raw is None:
            return None
        with np.load(io.BytesIO(raw)) as f:
            return f["level"], f["rms"]

    def save_background(self, level: np.ndarray, rms: np.ndarray) -> None:
        """Keep the mesh statistics for a resumed run."""
        buf = io.BytesIO()
        np.savez(buf, level=level, rms=rms)
        self._put(buf.getvalue(), "background.npz")

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
        """Write a part whole or not at all (see the module docstring): local, a temporary
        directory renamed; on an object store, its files and then its marker ``info.json``."""
        if self.remote:
            self._write_remote(name, files)
            return
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

    def _write_remote(self, name: str, files: dict[str, Any]) -> None:
        fs, marker = self.fs, self._key("parts", name, MARKER)
        if fs.exists(marker):  # a previous attempt of the same item finished meanwhile
            return
        blobs = {self._key("parts", name, f): _encode(c) for f, c in files.items() if f != MARKER}
        try:
            fs.pipe(blobs)  # concurrent PUTs, each object whole
            fs.pipe_file(marker, _encode(files[MARKER]))  # last: the part is finished
        except OSError as err:
            msg = f"cannot write part {name} in {self.url}: {err.strerror or err}"
            raise OSError(err.errno, msg) from None

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
        name = f"{time.time_ns():020d}-{os.getpid()}.jsonl"
        data = "".join(json.dumps({"part": k, **v}) + "\n" for k, v in entries.items()).encode()
        if self.remote:
            self._put(data, "parts", MANIFEST_DIR, name)  # one object: whole or absent
            return
        d = self.parts / MANIFEST_DIR
        d.mkdir(parents=True, exist_ok=True)
        (d / f".{name}.tmp").write_bytes(data)
        os.rename(d / f".{name}.tmp", d / name)

    def entries_of(self, names: Iterable[str]) -> dict[str, dict]:
        """Manifest entries of written tile parts, read from their files."""
        boxes = self.footprint_boxes(names := sorted(names))
        pending = self._pending_files(names)
        return {n: {"pending": pending.get(n, []), "boxes": boxes[n].tolist() if n in boxes else []}
                for n in names}  # fmt: skip

    def manifest(self) -> dict[str, dict] | None:
        """Every part the manifest records (name → entry), or None where the run has none."""
        if self.remote:
            found = sorted(f for f in self._files("parts", MANIFEST_DIR)
                           if len(f) == 1 and f[0].endswith(".jsonl"))  # fmt: skip
            raw = self._cat([("parts", MANIFEST_DIR, f[0]) for f in found])
            texts = [raw[("parts", MANIFEST_DIR, f[0])].decode() for f in found]
            if not found:
                return None
        else:
            d = self.parts / MANIFEST_DIR
            if not d.is_dir():
                return None
            texts = [p.read_text() for p in sorted(d.glob("*.jsonl"))]
        out: dict[str, dict] = {}
        for text in texts:
            for line in text.splitlines():
                entry = json.loads(line)
                out[entry.pop("part")] = entry
        return out

    # -- reading parts ---------------------------------------------------------------------
    def finished_parts(self) -> set[str]:
        """Every finished part (tile names and ``retry-<key>``), from one listing of ``parts/``."""
        if not self.remote:
            return (
                {p.name for p in self.parts.iterdir() if not p.name.startswith(".")}
                if self.parts.is_dir()
                else set()
            )
        return {f[0] for f in self._files("parts") if f[1:] == (MARKER,)}

    def finished(self, names: Iterable[str]) -> set[str]:
        """The tiles among ``names`` whose part is written (parts appear whole): one listing of
        ``parts/``, not a request per tile."""
        return set(names) & self.finished_parts()

    def finished_retries(self, keys: Iterable[str]) -> set[str]:
        """The retry keys among ``keys`` whose part is written."""
        if self.remote:
            done = self.finished_parts()
            return {k for k in keys if retry_part(k) in done}
        return {k for k in keys if (self.parts / retry_part(k)).exists()}

    def written_retry_groups(self) -> dict[str, list[str]]:
        """Every written retry part: its key → the keys of the retry items it measured."""
        if self.remote:
            names = sorted(n for n in self.finished_parts() if n.startswith("retry-"))
            raw = self._cat([("parts", n, MARKER) for n in names])
            return {n.removeprefix("retry-"): json.loads(raw[("parts", n, MARKER)]).get("members", [])
                    for n in names}  # fmt: skip
        out = {}
        for path in sorted(self.parts.glob("retry-*/info.json")):
            info = json.loads(path.read_text())
            out[path.parent.name.removeprefix("retry-")] = info.get("members", [])
        return out

    def pending(self, names: Iterable[str]) -> list[dict]:
        """Every retry item of the tiles ``names`` (in their order), from the manifest where
        it records them, else from the parts' files."""
        recorded = self.manifest() or {}
        names = list(names)
        files = self._pending_files([n for n in names if n not in recorded])
        out: list[dict] = []
        for n in names:
            out += recorded[n]["pending"] if n in recorded else files.get(n, [])
        return out

    def _pending_files(self, names: Sequence[str]) -> dict[str, list[dict]]:
        """The ``pending.json`` of the parts ``names`` that have one (fetched together on a URL)."""
        if self.remote:
            raw = self._cat([("parts", n, "pending.json") for n in names])
            return {p[1]: json.loads(v) for p, v in raw.items()}
        return {n: json.loads(path.read_text()) for n in names
                if (path := self.parts / n / "pending.json").exists()}  # fmt: skip

    def core_labels(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """The object IDs of tile ``name``'s core pixels (read-only).

        The last two of up to 32 MiB stay decoded in the process (keyed by path and mtime, or
        URL and ETag): each chunk of the segmentation map overlapping a tile asks for its labels.
        """
        big = shape[0] * shape[1] * 8 > 32 * 2**20
        if self.remote:
            key = self._key("parts", name, "labels.bin")
            if big:
                return _labels(self.fs.cat_file(key), tuple(shape))
            info = self.fs.info(key)
            stamp = str(info.get("ETag") or info.get("mtime") or info.get("LastModified"))
            return _cached_remote_labels(self.fs, key, tuple(shape), stamp)
        path = self.parts / name / "labels.bin"
        if big:
            return _decode_labels(str(path), tuple(shape), 0)
        return _cached_labels(str(path), tuple(shape), path.stat().st_mtime_ns)

    def footprints(self, name: str) -> Footprints:
        """The footprints written with part ``name`` (a tile name or ``retry_part(key)``)."""
        src = io.BytesIO(self._read("parts", name, "footprints.npz")) if self.remote else (
            self.parts / name / "footprints.npz")  # fmt: skip
        with np.load(src) as fp:
            return Footprints(fp["ids"], fp["boxes"], fp["pixels"])

    def footprint_boxes(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """The footprint boxes ``(n, 4)`` of each part that has any (from the manifest where it
        records the part, else from the part's files)."""
        recorded = self.manifest() or {}
        names = list(names)
        out = {n: np.asarray(recorded[n]["boxes"], dtype=np.int64).reshape(-1, 4)
               for n in names if n in recorded and recorded[n]["boxes"]}  # fmt: skip
        rest = [n for n in names if n not in recorded]
        raw = self._cat([("parts", n, "footprints.npz") for n in rest]) if self.remote else {}
        for n in rest:
            src = io.BytesIO(raw[("parts", n, "footprints.npz")]) if self.remote else (
                self.parts / n / "footprints.npz")  # fmt: skip
            with np.load(src) as fp:
                if len(fp["ids"]):
                    out[n] = fp["boxes"]
        return out

    def catalog_tables(self, names: Sequence[str]) -> Iterator[pa.Table]:
        """The catalog rows of parts ``names``, one table each.

        ``ParquetFile.read``, not ``read_table``: the latter imports ``pyarrow.dataset`` (and
        ``pyarrow.compute``), ~0.4 s at the driver's first catalog. On an object store the
        files are fetched ``_CAT_BATCH`` at a time, concurrently.
        """
        if not self.remote:
            for n in names:
                with pq.ParquetFile(self.parts / n / "catalog.parquet") as f:
                    yield f.read()
            return
        names = list(names)
        for i in range(0, len(names), _CAT_BATCH):
            batch = [("parts", n, "catalog.parquet") for n in names[i : i + _CAT_BATCH]]
            raw = self._cat(batch)
            for p in batch:
                if p not in raw:
                    msg = f"part {p[1]} in {self.url} has no catalog.parquet"
                    raise FileNotFoundError(msg)
                with pq.ParquetFile(pa.BufferReader(raw[p])) as f:
                    yield f.read()


def _encode(content: Any) -> bytes:
    """A part file's bytes: Parquet (zstd), raw bytes, ``.npz`` footprints or JSON — exactly
    what :meth:`PartStore._write_files` writes to a local file."""
    if isinstance(content, pa.Table):
        sink = pa.BufferOutputStream()
        pq.write_table(content, sink, compression="zstd")
        return sink.getvalue().to_pybytes()
    if isinstance(content, bytes):
        return content
    if isinstance(content, Footprints):
        buf = io.BytesIO()
        np.savez(buf, ids=content.ids, boxes=content.boxes, pixels=content.pixels)
        return buf.getvalue()
    return json.dumps(content).encode()


def _labels(raw: bytes, shape: tuple[int, int]) -> np.ndarray:
    return np.frombuffer(_BLOSC.decode(raw), dtype=np.int64).reshape(shape)


def _decode_labels(path: str, shape: tuple[int, int], _stamp: int) -> np.ndarray:
    return _labels(Path(path).read_bytes(), shape)


_cached_labels = functools.lru_cache(maxsize=2)(_decode_labels)


@functools.lru_cache(maxsize=2)
def _cached_remote_labels(fs, key: str, shape: tuple[int, int], _stamp: str) -> np.ndarray:
    return _labels(fs.cat_file(key), shape)


class SurveyStore(_Root):
    """A survey run directory: its description, one :class:`PartStore` per tract, the catalog.

    Parameters
    ----------
    root : path-like or str
        The survey run's output directory: a local path or an fsspec URL.
    storage_options : mapping, optional
        fsspec options of a URL root (default: the environment; :mod:`survey_engine.storage`).
    """

    def __init__(self, root: str | os.PathLike, storage_options: Mapping[str, Any] | None = None):
        super().__init__(root, storage_options)
        self.catalog = self.root / "catalog"

    def __repr__(self) -> str:
        return f"SurveyStore({self.url!r})"

    def prepare(self, info: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
        """Make the directory ready for the survey run described by ``info``.

        A missing or empty directory is set up; ``overwrite`` clears one that is not;
        ``resume`` continues one that holds the same survey run (any tracts of it: tracts
        already finished are kept, others run).

        Raises
        ------
        StoreError
            The path is a file or unwritable (or its object store unreachable, its bucket
            missing); it holds something else, another survey run, or a survey run and neither
            flag is given.
        """
        info = json.loads(json.dumps(info))
        self._check_usable()
        try:
            if not self._is_empty():
                if overwrite:
                    self._remove_all()
                elif not resume:
                    msg = (
                        f"output directory {self.url} is not empty (it holds an earlier run); "
                        "pass resume=True (--resume) to continue it or add tracts to it, or "
                        "overwrite=True (--overwrite)"
                    )
                    raise StoreError(msg)
                else:
                    self._check_same_run(SURVEY_FILE, info, "survey run", "survey run")
                    return
            if not self.remote:
                self.catalog.mkdir(parents=True, exist_ok=True)
            self._put(json.dumps(info, indent=2).encode(), SURVEY_FILE)
        except OSError as err:
            msg = f"cannot write to output directory {self.url}: {err.strerror or err}"
            raise StoreError(msg) from None

    def tract(self, tract_id: int) -> PartStore:
        """The run directory of one tract."""
        return PartStore(f"{self.url}/tracts/{int(tract_id)}", self.storage_options)

    def tract_catalog(self, tract_id: int) -> tuple[str, str]:
        """The dataset directory of one tract in the partitioned catalog, as path components
        under the root (``catalog``, ``tract=<id>``): see :meth:`publish_dataset`, which makes
        it appear whole, so a tract whose directory is published is finished."""
        return ("catalog", f"tract={int(tract_id)}")

    def finished_tracts(self) -> set[int]:
        """The tracts whose catalog is published (one listing of the catalog directory)."""
        if self.remote:
            return {int(f[0].split("=", 1)[1]) for f in self._files("catalog")
                    if len(f) == 2 and f[0].startswith("tract=") and f[1] == SUCCESS}  # fmt: skip
        return {int(p.name.split("=", 1)[1]) for p in self.catalog.glob("tract=*") if p.is_dir()}

    def write_schema(self, schema: pa.Schema) -> None:
        """The dataset's ``_common_metadata``: schema with units and the survey's metadata."""
        if not self.remote:
            pq.write_metadata(schema, self.catalog / "_common_metadata")
            return
        sink = pa.BufferOutputStream()
        pq.write_metadata(schema, sink)
        self._put(sink.getvalue().to_pybytes(), "catalog", "_common_metadata")


def retry_part(key: str) -> str:
    """The part name of a retry item (for :meth:`PartStore.footprints` and ``catalog_tables``)."""
    return f"retry-{key}"
