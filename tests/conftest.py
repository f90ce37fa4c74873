"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed import Client, LocalCluster

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Directory of the real test images (``../shared/data/real``); skip the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def client():
    """A Dask client whose one worker runs in this process (threads), for fast engine tests.

    In-process workers also let a test make one tile's kernel raise. Test modules that need
    separate worker processes define their own ``client``.
    """
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as c,
        Client(c) as cl,
    ):
        yield cl


@pytest.fixture(scope="module")
def process_client():
    """A Dask client of two single-threaded worker processes, as a LocalCluster run has."""
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as c,
        Client(c) as cl,
    ):
        yield cl
