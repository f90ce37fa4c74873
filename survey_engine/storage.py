"""Where mosaics and run directories live: local paths or fsspec URLs (``s3://``, ``gs://`` …).

A path with ``://`` (other than ``file://``) is an fsspec URL. Endpoint and credentials come
from what fsspec and the object store's client read anyway — for S3 (s3fs, botocore):
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``; for any protocol the fsspec
configuration (``FSSPEC_S3='{"endpoint_url": …}'``, ``FSSPEC_S3_ANON=true``, or a file in
``~/.config/fsspec/``) — and ``storage_options`` where the API takes them. Dask workers are
separate processes: they read the same environment (a LocalCluster's workers inherit the
driver's; on a remote cluster set it where the workers start).

:func:`check_store` turns the usual failures — an endpoint that does not answer, a bucket that
does not exist, refused credentials, a missing fsspec implementation — into one line naming
the URL (:class:`StorageError`, a :class:`FileNotFoundError` for a missing bucket).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["StorageError", "check_store", "default_options", "filesystem", "is_url"]

logger = logging.getLogger(__name__)

#: Protocols whose first path component is a bucket (container) that must exist.
_BUCKETED = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"})
#: The package implementing each protocol, for the message when it is missing.
_IMPLEMENTATIONS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
                    "abfs": "adlfs", "abfss": "adlfs"}  # fmt: skip


class StorageError(OSError):
    """An object store that cannot be used: unreachable, credentials refused, no client library."""


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://…``, ``memory://…``) rather than a local path."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def default_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` with the engine's defaults for ``url``'s protocol (given ones win).

    S3: ``max_concurrency=1``. s3fs (≥ 2024.12) otherwise asks every object's size (a HEAD)
    before reading it whole, to split objects larger than its block size (50 MB) into
    concurrent ranged GETs; Zarr chunks and part files are far smaller, so the HEAD doubled
    the requests of every window read. Give ``max_concurrency`` to get it back (large shards).
    """
    opts = dict(storage_options or {})
    if str(url).split("://", 1)[0] in ("s3", "s3a") and "max_concurrency" not in opts:
        with contextlib.suppress(ImportError):
            import s3fs

            if "max_concurrency" in inspect.signature(s3fs.S3FileSystem.__init__).parameters:
                opts["max_concurrency"] = 1
    return opts


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None):
    """The fsspec file system of ``url`` and the path in it.

    Listings are not cached (``use_listings_cache=False`` unless given): workers write parts
    that the driver must see at its next listing. The defaults of :func:`default_options` apply.

    Parameters
    ----------
    url : str
        An fsspec URL.
    storage_options : mapping, optional
        Passed to the file system (e.g. ``endpoint_url``, ``key``, ``secret``, ``anon``).

    Returns
    -------
    (fsspec.AbstractFileSystem, str)
    """
    import fsspec

    opts = {"use_listings_cache": False, **default_options(url, storage_options)}
    try:
        return fsspec.core.url_to_fs(str(url), **opts)
    except ImportError as err:
        protocol = str(url).split("://", 1)[0]
        lib = _IMPLEMENTATIONS.get(protocol, f"an fsspec implementation of {protocol}://")
        extra = " (pip install 'survey_engine[s3]')" if lib == "s3fs" else ""
        msg = f"{url}: reading {protocol}:// URLs needs {lib}{extra}: {err}"
        raise StorageError(msg) from None
    except ValueError as err:  # unknown protocol
        msg = f"{url}: {err}"
        raise StorageError(msg) from None


def _endpoint(fs, storage_options: Mapping[str, Any] | None) -> str | None:
    """The endpoint an S3 file system talks to, for messages (None: not an S3 store)."""
    if "s3" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return None
    opts = dict(storage_options or {})
    return (opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
            or getattr(fs, "endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or "AWS's default endpoint")  # fmt: skip


def check_store(url: str, storage_options: Mapping[str, Any] | None = None, what: str = "") -> None:
    """Fail in one line unless the store holding ``url`` answers and its bucket exists.

    One request (the bucket's metadata), made with one attempt and a short connect timeout, so
    an unreachable endpoint is reported in about a second instead of after the client's
    retries.

    Parameters
    ----------
    url : str
        An fsspec URL.
    storage_options : mapping, optional
        As for :func:`filesystem`.
    what : str
        What ``url`` is, for the message (``"mosaic"``, ``"output directory"``).

    Raises
    ------
    FileNotFoundError
        The bucket does not exist.
    StorageError
        The endpoint does not answer, the credentials are refused, no client library.
    """
    fs, path = filesystem(url, storage_options)
    protocol = str(url).split("://", 1)[0]
    if protocol not in _BUCKETED:
        return
    label = f"{what} {url}" if what else str(url)
    bucket = path.strip("/").split("/", 1)[0]
    endpoint = _endpoint(fs, storage_options)
    at = f" at {endpoint}" if endpoint else ""
    probe = fs
    if endpoint is not None:  # one attempt, so a dead endpoint fails fast
        opts = dict(storage_options or {})
        config = {
            "connect_timeout": 5,
            "retries": {"max_attempts": 1},
            **opts.get("config_kwargs", {}),
        }
        probe, _ = filesystem(url, {**opts, "config_kwargs": config, "skip_instance_cache": True})
    try:
        probe.info(bucket)
    except FileNotFoundError:
        msg = (f"{label}: bucket {bucket!r} does not exist{at}; create it first "
               f"(e.g. `aws s3 mb {protocol}://{bucket}`) or give another URL")  # fmt: skip
        raise FileNotFoundError(msg) from None
    except PermissionError as err:
        if getattr(fs, "anon", False):  # public buckets may allow object reads, not this
            logger.debug("%s: bucket %r not inspectable anonymously (%s)", url, bucket, err)
            return
        msg = (f"{label}: access to bucket {bucket!r}{at} refused ({err}); check the credentials "
               "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE, or storage_options)")  # fmt: skip
        raise StorageError(msg) from None
    except Exception as err:  # botocore's EndpointConnectionError, aiohttp's errors, timeouts …
        name = type(err).__name__
        if "Credentials" in name:  # botocore's NoCredentialsError, PartialCredentialsError
            msg = (f"{label}: no usable credentials for {at.removeprefix(' at ') or protocol} "
                   f"({err}); set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or "
                   "storage_options key/secret (anon=True for a public bucket)")  # fmt: skip
            raise StorageError(msg) from None
        if not _is_connection_error(err):
            raise
        hint = ("; check AWS_ENDPOINT_URL (or storage_options endpoint_url) and that the service "
                "is running") if endpoint else ""  # fmt: skip
        msg = f"cannot reach the object store{at} for {label}: {name}: {err}{hint}"
        raise StorageError(msg) from None


def _is_connection_error(err: BaseException) -> bool:
    """Whether ``err`` (or its cause) says the endpoint could not be reached."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        name = type(err).__name__
        if isinstance(err, ConnectionError | TimeoutError) or any(
            word in name for word in ("Connect", "Timeout")
        ):
            return True
        err = err.__cause__ or err.__context__
    return False
