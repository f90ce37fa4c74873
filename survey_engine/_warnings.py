"""Warnings silenced for a block, safely across threads.

``warnings.catch_warnings`` saves and restores the process-wide filter list: two threads in
such blocks at once restore each other's filters (seen: a survey's tracts, each in a driver
thread, consolidating their segmentation maps — one thread's block ended while the other's
consolidation warned, and the warning became an error). The blocks here take one lock, so they
never interleave.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator

_LOCK = threading.RLock()


@contextlib.contextmanager
def ignored(category: type[Warning] = Warning) -> Iterator[None]:
    """Ignore warnings of ``category`` in the block (one such block at a time per process)."""
    with _LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", category)
        yield
