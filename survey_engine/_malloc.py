"""Keep glibc's allocator from thrashing while a task runs on a Dask worker.

Under Dask's nanny (``MALLOC_TRIM_THRESHOLD_`` set) glibc mmaps and unmaps every buffer of
128 KiB or more; :func:`task_allocator` raises the mmap and trim thresholds for the duration of
a task. Why, and what it was measured to save: ``docs/architecture.md`` ("Worker allocator").
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import platform
from collections.abc import Iterator

__all__ = ["drawing_allocator", "task_allocator"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_DEFAULT_THRESHOLD = 128 * 1024  # glibc's initial value of both thresholds
_DRAW_MMAP_THRESHOLD = 32 * 1024 * 1024
_DRAW_TRIM_THRESHOLD = 64 * 1024 * 1024
_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


@functools.cache
def _libc():
    """glibc, loaded once per process (``find_library`` runs ``ldconfig``: ~ms per call)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _env_threshold(name: str) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return _DEFAULT_THRESHOLD


@contextlib.contextmanager
def task_allocator() -> Iterator[None]:
    """Context in which large allocations are recycled instead of mmap-ed each time."""
    libc = _libc() if any(name in os.environ for name in _ENV) else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _DRAW_MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, _DRAW_TRIM_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(_M_TRIM_THRESHOLD, _env_threshold("MALLOC_TRIM_THRESHOLD_"))
        libc.mallopt(_M_MMAP_THRESHOLD, _env_threshold("MALLOC_MMAP_THRESHOLD_"))
        libc.malloc_trim(0)


#: Former name, kept for the simulator.
drawing_allocator = task_allocator
