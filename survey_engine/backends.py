"""Array backends of the per-window stages: numpy (sep/scipy, window by window) and torch (batched).

The stage sequence (:mod:`survey_engine.stages`) is written once; a backend supplies only
what the array library decides: the windows of a batch as ``(B, band, H, W)`` arrays
(``stack``, ``to_device``: pinned memory and asynchronous copies on CUDA), the background
under them (``background``), the mesh statistics of a block, the measurement kernel (sep's
:func:`~survey_engine.kernels.measure.measure_sources` or torch's
:func:`~survey_engine.kernels.torch_measure.measure_batch`, both turned into
:class:`~survey_engine.kernels.measure.Measurements` by the one ``measurements_from``), batch
sizes, stage timing and device memory. :func:`make_backend` picks one by name.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import time
from collections.abc import Sequence

import numpy as np

from .config import ExecutionConfig, ScienceConfig
from .flags import UNUSABLE, MaskBit
from .kernels.background import BackgroundMesh, interpolate_background, mesh_statistics
from .kernels.detect import matched_filter
from .kernels.measure import Measurements, matched_filter_at, measure_sources, measurements_from
from .mosaic import MosaicRegion
from .tiling import Box

__all__ = ["NumpyBackend", "StageTimes", "TorchBackend", "make_backend"]

#: Device bytes per window pixel (3 bands) budgeted for a torch batch. The arrays a batch
#: allocates add up to ~46 B × bands + 80 B per pixel (inputs, background, float64 working
#: copies, network maps, labels), ~220 B for 3 bands, plus the ragged aperture gathers (a
#: few % of that in a normal field, more around bright stars); the U-Net's activations
#: depend on its batch of patches, not on the tiles. 800 leaves a margin of ~3. (An estimate
#: from the allocations, not a measured peak: no GPU was available to measure.)
BYTES_PER_PIXEL = 800
#: Torch windows per batch on CPU (the worker's memory is not sized here).
CPU_BATCH = 2


class StageTimes(dict):
    """Seconds per stage, accumulated (``read``, ``background``, ``network`` …).

    With ``sync`` (CUDA's ``synchronize``) the device is synchronised at each stage
    boundary, so that the time of asynchronous kernels lands in the stage that launched them.
    """

    def __init__(self, sync=None):
        super().__init__()
        self._sync = sync

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time the enclosed block as ``name``."""
        if self._sync:
            self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to stage ``name``."""
        self[name] = self.get(name, 0.0) + seconds


def windows_fitting(shape: tuple[int, int], n_bands: int, free_bytes: int) -> int:
    """How many windows of ``shape`` fit in 60 % of ``free_bytes`` of device memory (1–32)."""
    per_window = BYTES_PER_PIXEL * (n_bands + 2) / 5 * shape[0] * shape[1]
    return int(min(32, max(1, (0.6 * free_bytes) // per_window)))


class _Backend:
    """What both backends share; device methods are no-ops for the host."""

    name = ""

    def __init__(self, execution: ExecutionConfig):
        self.execution = execution

    def stage_times(self) -> StageTimes:
        """A fresh stage timer."""
        return StageTimes()

    def check_device(self) -> None:
        """Raise unless the device can be used by this process."""

    def reset_peak_memory(self) -> None:
        """Start counting the device's peak memory."""

    def peak_memory(self) -> int | None:
        """Peak device memory (bytes) since :meth:`reset_peak_memory`; None on the host."""
        return None

    def release_memory(self) -> None:
        """Hand cached device memory back (after a failed batch)."""


class NumpyBackend(_Backend):
    """numpy arrays, sep and scipy; the stages run window by window (batches of one)."""

    name = "numpy"

    def capacity(self, shape: tuple[int, int], n_bands: int) -> int:
        """Windows analysed together: one."""
        return 1

    @staticmethod
    def tiles_per_task(client, shape, n_bands: int, execution: ExecutionConfig) -> int:
        """Tiles per task of the tile stage (``tile_batch``, default 1)."""
        return int(execution.tile_batch or 1)

    def stack(self, regions: Sequence[MosaicRegion]):
        """``(B, band, H, W)`` image, variance and mask of equally-sized windows (host)."""
        _check_shapes(regions)
        if len(regions) == 1:  # views, no copy
            r = regions[0]
            return r.image[None], r.variance[None], r.mask[None]
        return tuple(np.stack([getattr(r, p) for r in regions]) for p in ("image", "variance", "mask"))

    def to_device(self, host):
        """The stacked planes where the stages run (numpy: as they are)."""
        return host

    def background(self, meshes: Sequence[BackgroundMesh], windows: Sequence[Box]) -> np.ndarray:
        """``(B, band, H, W)`` float32 background under each window (scipy spline)."""
        return np.stack([
            np.stack([interpolate_background(me, w.y0, w.y1, w.x0, w.x1) for me in meshes])
            for w in windows
        ])  # fmt: skip

    def mesh_statistics(self, image: np.ndarray, bad: np.ndarray, box: int):
        """Per band: (level, rms) of every mesh cell of a background block."""
        return [mesh_statistics(image[b], bad[b], box) for b in range(len(image))]

    def measure(self, px, det, found, results, science: ScienceConfig, bands, windows) -> list[Measurements]:
        """Measurements of every window (sep's apertures; see ``measure_sources``)."""
        out = []
        for b, (res, w) in enumerate(zip(results, windows, strict=True)):
            out.append(measure_sources(
                det.det[b], det.var[b], det.bad[b], px.images[b], px.variances[b], px.masks[b],
                res.labels, bands, science.measure, usable_bits=UNUSABLE,
                sat_bit=int(MaskBit.SAT), origin=(w.y0, w.x0),
                filtered=functools.partial(matched_filter_at, det.det[b], det.var[b], science.detection.kernel),
            ))  # fmt: skip
        return out


def _check_shapes(regions: Sequence[MosaicRegion]) -> None:
    shapes = {r.image.shape for r in regions}
    if len(shapes) != 1:
        msg = f"windows of one batch must have the same shape, got {sorted(shapes)}"
        raise ValueError(msg)


#: Device-evaluable background splines, fitted once per process and mesh.
_SPLINES: dict[tuple, object] = {}


def _splines(meshes: Sequence[BackgroundMesh]) -> list:
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


class TorchBackend(_Backend):
    """torch tensors on ``execution.device``; the stages run batched over windows.

    On CPU every stage gives the numpy backend's bits up to the measurement (whose circular
    apertures and half-light radius differ: ``docs/kernels.md``); on CUDA the sums use
    atomics, so numbers match the CPU ones to rounding.
    """

    name = "torch"

    def __init__(self, execution: ExecutionConfig):
        import torch

        super().__init__(execution)
        self.torch = torch
        self.device = torch.device(execution.device)

    def check_device(self) -> None:
        if self._cuda and not self.torch.cuda.is_available():
            msg = f"device {self.execution.device!r} requested but no CUDA GPU is visible to this process"
            raise RuntimeError(msg)

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def capacity(self, shape: tuple[int, int], n_bands: int) -> int:
        """Windows analysed together: from the free device memory on CUDA, else ``tile_batch`` or 2."""
        if not self._cuda:
            return max(1, int(self.execution.tile_batch or CPU_BATCH))
        return windows_fitting(shape, n_bands, self.torch.cuda.mem_get_info(self.device)[0])

    @staticmethod
    def tiles_per_task(client, shape, n_bands: int, execution: ExecutionConfig) -> int:
        """Tiles per task: ``tile_batch``; on CUDA what fills the workers' free GPU memory once."""
        if execution.tile_batch is not None:
            return int(execution.tile_batch)
        if not execution.on_cuda:
            return CPU_BATCH
        free = [v for v in client.run(_free_gpu_memory).values() if v]
        if not free:  # no worker reported a GPU (yet): tasks re-size their batches themselves
            return 2 * CPU_BATCH
        return windows_fitting(shape, n_bands, min(free))

    def stage_times(self) -> StageTimes:
        """A fresh stage timer (synchronising the device on CUDA)."""
        return StageTimes(self.torch.cuda.synchronize if self._cuda else None)

    def stack(self, regions: Sequence[MosaicRegion]):
        """Host tensors ``(B, band, H, W)``: image, variance (float32), mask (int32); pinned on CUDA."""
        torch = self.torch
        _check_shapes(regions)
        img = torch.from_numpy(np.stack([np.asarray(r.image, np.float32) for r in regions]))
        var = torch.from_numpy(np.stack([np.asarray(r.variance, np.float32) for r in regions]))
        msk = torch.from_numpy(np.stack([r.mask.astype(np.int32) for r in regions]))
        if self._cuda:
            img, var, msk = img.pin_memory(), var.pin_memory(), msk.pin_memory()
        return img, var, msk

    def to_device(self, host):
        """The stacked planes on the device (asynchronous copies from pinned memory)."""
        return tuple(t.to(self.device, non_blocking=self._cuda) for t in host)

    def background(self, meshes: Sequence[BackgroundMesh], windows: Sequence[Box]):
        """``(B, band, H, W)`` float32 background: the meshes' splines evaluated on the device."""
        from .kernels.torch_background import background_windows

        boxes = [(w.y0, w.y1, w.x0, w.x1) for w in windows]
        return background_windows(_splines(meshes), boxes, device=self.device)

    def mesh_statistics(self, image: np.ndarray, bad: np.ndarray, box: int):
        """Per band: (level, rms) of every mesh cell of a block, all bands at once on the device."""
        from .kernels.torch_background import mesh_statistics_torch

        torch = self.torch
        dev = self.device if (not self._cuda or torch.cuda.is_available()) else torch.device("cpu")
        level, rms = mesh_statistics_torch(
            torch.from_numpy(np.ascontiguousarray(image)).to(dev), torch.from_numpy(bad).to(dev), box
        )
        level, rms = level.cpu().numpy(), rms.cpu().numpy()
        return [(level[b], rms[b]) for b in range(len(level))]

    def measure(self, px, det, found, results, science: ScienceConfig, bands, windows) -> list[Measurements]:
        """Measurements of every window: one batched ``measure_batch`` on the device."""
        from .kernels.torch_measure import measure_batch

        torch = self.torch
        counts = [r.n_objects for r in results]
        raw = None
        if sum(counts):
            labels = torch.as_tensor(found.labels, device=self.device)
            origin = torch.tensor([(w.y0, w.x0) for w in windows], dtype=torch.int64, device=self.device)
            res = measure_batch(
                det.det, det.var, matched_filter(det.det, det.var, science.detection.kernel),
                px.images, px.variances, labels, science.measure, origin=origin, masks=px.masks,
                usable_bits=int(UNUSABLE), sat_bit=int(MaskBit.SAT),
                dtype=getattr(torch, self.execution.measure_dtype),
            )  # fmt: skip
            raw = {k: v.cpu().numpy() for k, v in res.items()}
            raw = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in raw.items()}
        out, start = [], 0
        for n, res, w in zip(counts, results, windows, strict=True):
            part = {"area": np.zeros(0)} if raw is None else {k: v[start : start + n] for k, v in raw.items()}
            if len(part["area"]) != n:
                msg = f"internal error: {len(part['area'])} measured objects for {n} labels"
                raise RuntimeError(msg)
            out.append(measurements_from(part, res.labels, bands, science.measure, (w.y0, w.x0)))
            start += n
        return out

    def reset_peak_memory(self) -> None:
        if self._cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> int | None:
        return int(self.torch.cuda.max_memory_allocated(self.device)) if self._cuda else None

    def release_memory(self) -> None:
        if self._cuda:
            self.torch.cuda.empty_cache()


def _free_gpu_memory() -> int:
    """Free memory of this worker's GPU (0 without one); run on every worker."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0])
    except Exception:  # a worker without a usable GPU
        pass
    return 0


BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend}


def make_backend(execution: ExecutionConfig):
    """The backend object of ``execution.backend``."""
    return BACKENDS[execution.backend](execution)
