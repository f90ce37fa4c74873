"""The mosaic store: one Zarr v3 group per survey mosaic (specified in ``docs/mosaic_format.md``).

Arrays ``image`` and ``variance`` (band, y, x) float32 (calibrated pixels, background included;
inf variance where no data), ``mask`` (band, y, x) uint16 (OR of MaskBit values) and, in simulated
mosaics, ``truth_segmentation`` (y, x) int64; the group attributes hold the WCS cards, band names,
zero points, pixel scale, PSF FWHM, units and mask bits needed to interpret the pixels.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales

from ._warnings import ignored
from .flags import MASK_BITS, MaskBit
from .storage import check_store, default_options, is_url

__all__ = [
    "FORMAT_VERSION", "Mosaic", "MosaicRegion", "UnknownBandError", "create_mosaic",
    "header_to_cards", "open_mosaic",
]  # fmt: skip

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_CHUNK = 1024
PLANES = ("image", "variance", "mask")
_DTYPES = {"image": np.float32, "variance": np.float32, "mask": np.uint16}
_FILL = {"image": 0.0, "variance": float("inf"), "mask": int(MaskBit.NO_DATA)}
#: File names that are FITS images rather than mosaics (pointed to ``survey-engine ingest``).
_FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.fz", ".fz", ".fits.gz", ".fit.gz", ".fits.bz2")


def _raise_if(condition: bool, msg: str) -> None:
    """Raise ``ValueError(msg)`` when ``condition`` holds (the argument checks of the package)."""
    if condition:
        raise ValueError(msg)


class UnknownBandError(KeyError, ValueError):
    """A band name that the mosaic (or the ingested images) does not have.

    Both a :class:`KeyError` (a failed lookup) and a :class:`ValueError` (a bad argument), so
    either ``except`` catches it; ``str()`` is the plain message (a ``KeyError`` quotes it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def header_to_cards(header: fits.Header | WCS | Mapping[str, Any]) -> dict[str, Any]:
    """Turn a FITS header, an astropy WCS or a mapping into JSON-safe WCS cards.

    Parameters
    ----------
    header : astropy.io.fits.Header, astropy.wcs.WCS or mapping
        The WCS description. A full image header is accepted: only the WCS cards are kept
        (TPV ``PV`` and SIP ``A_``/``B_`` distortion terms exactly).

    Returns
    -------
    dict
        ``{keyword: value}`` with the WCS cards in their original order.
    """
    if isinstance(header, WCS):
        header = header.to_header(relax=True)
    elif not isinstance(header, fits.Header):
        header = fits.Header(list(dict(header).items()))
    cards: dict[str, Any] = {}
    for card in header.cards:
        if card.keyword.startswith(_WCS_PREFIXES):  # the *_ORDER keys included
            value = card.value.item() if isinstance(card.value, np.generic) else card.value
            if isinstance(value, bool | int | float | str):
                cards[card.keyword] = value
    if "NAXIS1" not in cards and "NAXIS1" in header:
        cards.update(NAXIS1=int(header["NAXIS1"]), NAXIS2=int(header["NAXIS2"]))
    return cards


_WCS_PREFIXES = (
    "WCSAXES", "CRPIX", "CRVAL", "CTYPE", "CUNIT", "CDELT", "CD1_", "CD2_", "PC1_", "PC2_",
    "PV1_", "PV2_", "PS1_", "PS2_", "CROTA", "LONPOLE", "LATPOLE", "RADESYS", "RADECSYS",
    "EQUINOX", "EPOCH", "MJD-OBS", "DATE-OBS", "A_", "B_", "AP_", "BP_", "WCSNAME", "NAXIS",
)  # fmt: skip


def _cards_to_wcs(cards: Mapping[str, Any]) -> WCS:
    """The astropy WCS of stored cards."""
    header = fits.Header(list(cards.items()))
    with ignored(FITSFixedWarning):  # wcslib's informational fixes (MJD-OBS from DATE-OBS)
        return WCS(header, relax=True)


def _pixel_scale_arcsec(wcs: WCS) -> float:
    """Mean celestial pixel scale of ``wcs`` (arcsec)."""
    return float(np.mean(proj_plane_pixel_scales(wcs.celestial)) * 3600)


@dataclass(frozen=True)
class MosaicRegion:
    """Pixels of a rectangular region, all requested bands.

    Attributes
    ----------
    y0, x0 : int
        Mosaic pixel of the region's first row/column (0-based).
    bands : tuple of str
        Band names, in the order of the first axis.
    image, variance, mask : numpy.ndarray
        ``(band, y, x)``: float32, float32, uint16.
    """

    y0: int
    x0: int
    bands: tuple[str, ...]
    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the region."""
        return self.image.shape[1:]


class Mosaic:
    """A survey mosaic held in a Zarr v3 group: use :func:`open_mosaic` or :func:`create_mosaic`."""

    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = str(path)
        attrs = dict(group.attrs)
        meta = attrs.get("survey_engine")
        _raise_if(not isinstance(meta, Mapping) or "format_version" not in meta,
                  f"{self.path} is not a survey_engine mosaic (no 'survey_engine' group attribute)")  # fmt: skip
        if missing := [plane for plane in PLANES if plane not in group]:
            msg = f"{self.path} is not a complete survey_engine mosaic: no '{missing[0]}' array"
            raise ValueError(msg)
        shapes = {}
        for plane in PLANES:
            arr = group[plane]
            where = f"mosaic {self.path}: array '{plane}'"
            _raise_if(not isinstance(arr, zarr.Array),
                      f"mosaic {self.path}: '{plane}' is a group, not an array")  # fmt: skip
            want = np.dtype(_DTYPES[plane])
            _raise_if(arr.dtype != want, f"{where} has dtype {arr.dtype}, expected {want} "
                      "(see docs/mosaic_format.md; convert the array or re-ingest)")  # fmt: skip
            _raise_if(arr.ndim != 3, f"{where} must be (band, y, x), got {arr.ndim}-D")
            shapes[plane] = tuple(arr.shape)
        _raise_if(len(set(shapes.values())) != 1,
                  f"mosaic {self.path}: image, variance and mask shapes differ: {shapes}")  # fmt: skip
        self.attrs = attrs
        self.image, self.variance, self.mask = (group[plane] for plane in PLANES)
        self.bands: tuple[str, ...] = tuple(attrs["bands"])
        self.shape: tuple[int, int, int] = tuple(int(s) for s in self.image.shape)
        _raise_if(len(self.bands) != self.shape[0],
                  f"mosaic {self.path}: {len(self.bands)} band names for {self.shape[0]} planes")  # fmt: skip
        self.zero_points: dict[str, float | None] = dict(attrs.get("zero_points", {}))
        self.pixel_scale: float | None = attrs.get("pixel_scale_arcsec")
        self._read_psfs()
        self.mask_bits: dict[str, int] = dict(attrs.get("mask_bits", MASK_BITS))
        self.units: dict[str, str] = dict(attrs.get("units", {}))
        self.wcs_cards: dict[str, Any] = dict(attrs.get("wcs", {}))
        self._wcs: WCS | None = None

    def _read_psfs(self) -> None:
        """``psf_fwhm`` (arcsec) and ``psf_fwhm_pix`` from the attributes (again after an ingest).

        ``psf_fwhm_pix``: PSF FWHM in pixels per band, from ``psf_fwhm_arcsec`` and the pixel
        scale, else the ingest's estimate (``psf_fwhm_pix``; a mosaic without a WCS has no
        pixel scale).
        """
        self.psf_fwhm: dict[str, float | None] = dict(self.attrs.get("psf_fwhm_arcsec", {}))
        estimated = dict(self.attrs.get("psf_fwhm_pix") or {})
        scale = self.pixel_scale
        self.psf_fwhm_pix: dict[str, float | None] = {
            b: float(self.psf_fwhm[b]) / float(scale) if self.psf_fwhm.get(b) and scale else estimated.get(b)
            for b in self.bands
        }

    # --- geometry -------------------------------------------------------------------------
    @property
    def ny(self) -> int:
        """Number of rows."""
        return self.shape[1]

    @property
    def nx(self) -> int:
        """Number of columns."""
        return self.shape[2]

    @property
    def chunks(self) -> tuple[int, int, int]:
        """Chunk shape of the pixel arrays (band, y, x)."""
        return tuple(int(c) for c in self.image.chunks)

    @property
    def wcs(self) -> WCS:
        """The mosaic's celestial WCS (astropy); raises if the mosaic has none."""
        if self._wcs is None:
            _raise_if(not self.wcs_cards,
                      f"mosaic {self.path} has no WCS (group attribute 'wcs' is empty)")  # fmt: skip
            self._wcs = _cards_to_wcs(self.wcs_cards)
        return self._wcs

    @property
    def has_wcs(self) -> bool:
        """Whether the mosaic carries WCS cards."""
        return bool(self.wcs_cards)

    @property
    def has_truth_segmentation(self) -> bool:
        """Whether a noiseless truth segmentation is stored (simulated mosaics)."""
        return "truth_segmentation" in self.group

    def band_index(self, band: str | int) -> int:
        """Index of ``band`` along the band axis.

        Parameters
        ----------
        band : str or int
            Band name (e.g. ``"r"``) or index.

        Returns
        -------
        int

        Raises
        ------
        UnknownBandError
            ``band`` is not one of the mosaic's bands.
        IndexError
            An integer ``band`` out of range.
        """
        if isinstance(band, int | np.integer):
            if not 0 <= int(band) < len(self.bands):
                msg = f"band index {band} out of range for mosaic with bands {self.bands}"
                raise IndexError(msg)
            return int(band)
        try:
            return self.bands.index(band)
        except ValueError:
            msg = f"unknown band {band!r}: mosaic {self.path} has bands {', '.join(self.bands)}"
            raise UnknownBandError(msg) from None

    def __repr__(self) -> str:
        return (f"<Mosaic {self.path!r} bands={','.join(self.bands)} "
                f"shape=({self.ny}, {self.nx}) chunks={self.chunks[1:]}>")  # fmt: skip

    # --- I/O ------------------------------------------------------------------------------
    def read(
        self, y: tuple[int, int] | slice, x: tuple[int, int] | slice,
        bands: Sequence[str | int] | None = None,
    ) -> MosaicRegion:  # fmt: skip
        """Read a rectangular region of every plane.

        Parameters
        ----------
        y, x : (start, stop) or slice
            Half-open pixel ranges (0-based), not clipped: they must lie inside the mosaic.
        bands : sequence of str or int, optional
            Bands to read; all by default.

        Returns
        -------
        MosaicRegion
        """
        (y0, y1), (x0, x1) = _bounds(y, self.ny, "y"), _bounds(x, self.nx, "x")
        idx = [self.band_index(b) for b in (bands if bands is not None else self.bands)]
        names = tuple(self.bands[i] for i in idx)
        contiguous = idx == list(range(idx[0], idx[-1] + 1))
        out = {}
        for plane in PLANES:
            arr = getattr(self, plane)  # opened once: on an object store a lookup is 2 requests
            try:
                if contiguous:
                    data = arr[idx[0] : idx[-1] + 1, y0:y1, x0:x1]
                else:
                    data = np.stack([arr[i, y0:y1, x0:x1] for i in idx])
            except Exception as err:
                # A missing shard, a corrupt chunk, a failing object store: say where.
                msg = (f"mosaic {self.path}: reading {plane}[bands {','.join(names)}, y {y0}:{y1}, "
                       f"x {x0}:{x1}] failed (chunks {self.chunks[1:]}): {type(err).__name__}: {err}")  # fmt: skip
                raise OSError(msg) from err
            out[plane] = np.ascontiguousarray(data, dtype=_DTYPES[plane])
        return MosaicRegion(y0=y0, x0=x0, bands=names, **out)

    def write(
        self, band: str | int, y0: int, x0: int, *, image: np.ndarray | None = None,
        variance: np.ndarray | None = None, mask: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        """Write 2-D blocks of one band at mosaic offset ``(y0, x0)``.

        Parameters
        ----------
        band : str or int
            Target band.
        y0, x0 : int
            Mosaic pixel of the block's first row/column.
        image, variance, mask : numpy.ndarray, optional
            Blocks of equal shape; planes left as None are not written.
        """
        b = self.band_index(band)
        for plane, block in (("image", image), ("variance", variance), ("mask", mask)):
            if block is None:
                continue
            block = np.asarray(block, dtype=_DTYPES[plane])
            if block.ndim != 2:
                msg = f"{plane} block for band {self.bands[b]!r} must be 2-D, got {block.ndim}-D"
                raise ValueError(msg)
            h, w = block.shape
            if y0 < 0 or x0 < 0 or y0 + h > self.ny or x0 + w > self.nx:
                msg = (f"{plane} block {block.shape} at (y0={y0}, x0={x0}) does not fit mosaic "
                       f"of shape ({self.ny}, {self.nx})")  # fmt: skip
                raise ValueError(msg)
            self.group[plane][b, y0 : y0 + h, x0 : x0 + w] = block

    def to_xarray(self):
        """Lazy, dask-backed :class:`xarray.Dataset` with dims ``band``, ``y``, ``x``.

        Returns
        -------
        xarray.Dataset
            Variables ``image``, ``variance``, ``mask`` (and ``truth_segmentation`` when
            present); coordinate ``band``; the group attributes as ``Dataset.attrs``.
        """
        import dask.array as da
        import xarray as xr

        dims = dict.fromkeys(PLANES, ("band", "y", "x"))
        if self.has_truth_segmentation:
            dims["truth_segmentation"] = ("y", "x")
        arrays = {name: self.group[name] for name in dims}
        data_vars = {k: (dims[k], da.from_zarr(a), dict(a.attrs)) for k, a in arrays.items()}
        return xr.Dataset(data_vars, coords={"band": list(self.bands)}, attrs=self.attrs)

    def consolidate(self) -> None:
        """Write consolidated metadata (after any change) so ``xarray.open_zarr`` is fast."""
        with ignored():  # zarr notes that consolidation is not in the v3 spec
            zarr.consolidate_metadata(self.group.store)

    def pixel_to_sky(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Convert 0-based mosaic pixel coordinates to (ra, dec) in degrees.

        Parameters
        ----------
        x, y : array_like
            0-based pixel coordinates (x along columns).

        Returns
        -------
        ra, dec : numpy.ndarray
        """
        ra, dec = self.wcs.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
        return np.asarray(ra), np.asarray(dec)

    def sky_to_pixel(self, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Convert (ra, dec) in degrees to 0-based mosaic pixel coordinates.

        Parameters
        ----------
        ra, dec : array_like
            Sky coordinates in degrees.

        Returns
        -------
        x, y : numpy.ndarray
        """
        x, y = self.wcs.all_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0)
        return np.asarray(x), np.asarray(y)


def _bounds(r: tuple[int, int] | slice, n: int, axis: str) -> tuple[int, int]:
    if isinstance(r, slice):
        start, stop, step = r.indices(n)
        _raise_if(step != 1, f"region {axis} slice must have step 1, got {step}")
    else:
        start, stop = (int(v) for v in r)
    _raise_if(not 0 <= start < stop <= n,
              f"region {axis}=[{start}, {stop}) is empty or outside the mosaic (0..{n})")  # fmt: skip
    return start, stop


def _open_group(path: str, mode: str, storage_options: Mapping[str, Any] | None) -> zarr.Group:
    if is_url(path):
        storage_options = default_options(path, storage_options)
    kwargs = {"storage_options": dict(storage_options)} if storage_options else {}
    return zarr.open_group(str(path), mode=mode, zarr_format=3, **kwargs)


def open_mosaic(
    path: str, *, mode: str = "r", storage_options: Mapping[str, Any] | None = None
) -> Mosaic:
    """Open a mosaic store.

    Parameters
    ----------
    path : str or path-like
        Local path or fsspec URL (``s3://…``, ``memory://…``) of the Zarr group.
    mode : {"r", "r+"}
        Read-only (default) or read-write.
    storage_options : dict, optional
        Passed to fsspec for remote URLs.

    Returns
    -------
    Mosaic

    Raises
    ------
    FileNotFoundError
        Nothing exists at ``path`` (or its bucket does not exist).
    survey_engine.storage.StorageError
        The object store of a URL does not answer or refuses the credentials.
    ValueError
        ``path`` exists but is not a survey_engine mosaic; the message says what it is instead
        (a FITS file: ingest it first; a directory without ``zarr.json``; a Zarr v2 store; a
        Zarr array; a group without the ``survey_engine`` attribute or an ``image`` array; …).
    """
    path = str(path)
    if not is_url(path):
        _check_local_store(path)
    else:
        check_store(path, storage_options, "mosaic")
    try:
        group = _open_group(path, mode, storage_options)
    except FileNotFoundError:
        msg = f"mosaic not found: {path}"
        raise FileNotFoundError(msg) from None
    except zarr.errors.ContainsArrayError:
        msg = f"{path} is a Zarr array, not a survey_engine mosaic (a Zarr v3 group)"
        raise ValueError(msg) from None
    except (zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as err:
        msg = f"{path} is not a Zarr v3 group: {err}"
        raise ValueError(msg) from err
    except ValueError as err:  # e.g. an unreadable zarr.json
        msg = f"{path} is not a survey_engine mosaic: its Zarr metadata cannot be read ({err})"
        raise ValueError(msg) from err
    return Mosaic(group, path)


def _check_local_store(path: str) -> None:
    """Refuse a local path that cannot be a mosaic, saying what is there instead."""
    if not os.path.exists(path):
        msg = f"mosaic not found: {path}"
        raise FileNotFoundError(msg)
    if os.path.isfile(path):
        fits_like = path.lower().endswith(_FITS_SUFFIXES)
        if not fits_like:
            with contextlib.suppress(OSError), open(path, "rb") as f:
                fits_like = f.read(9) == b"SIMPLE  ="
        if fits_like:
            msg = (f"{path} is a FITS file, not a mosaic: make a mosaic of it first with "
                   f"`survey-engine ingest {path} OUT.zarr` (survey_engine.ingest_fits)")  # fmt: skip
        else:
            msg = f"{path} is a file, not a survey_engine mosaic (a Zarr v3 directory)"
        raise ValueError(msg)
    if not os.path.isfile(os.path.join(path, "zarr.json")):
        v2 = any(os.path.exists(os.path.join(path, f)) for f in (".zgroup", ".zarray"))
        what = "a Zarr v2 store (survey_engine mosaics are Zarr v3)" if v2 else "no zarr.json"
        msg = f"{path} is not a survey_engine mosaic: {what}"
        raise ValueError(msg)


def create_mosaic(
    path: str, *, shape: tuple[int, int], bands: Sequence[str],
    wcs: fits.Header | WCS | Mapping[str, Any] | None,
    zero_points: Mapping[str, float | None] | Sequence[float | None] | None = None,
    pixel_scale: float | None = None,
    psf_fwhm: Mapping[str, float | None] | Sequence[float | None] | None = None,
    image_unit: str = "count", chunks: int | tuple[int, int] = DEFAULT_CHUNK,
    shards: int | tuple[int, int] | None = None, truth_segmentation: bool = False,
    extra_attrs: Mapping[str, Any] | None = None, overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Mosaic:  # fmt: skip
    """Create an empty mosaic store (all pixels NO_DATA until written).

    Parameters
    ----------
    path : str
        Local path or fsspec URL of the new Zarr group.
    shape : (ny, nx)
        Pixel dimensions.
    bands : sequence of str
        Band names (unique), in the order of the band axis.
    wcs : Header, WCS, mapping or None
        World coordinate system; see :func:`header_to_cards`.
    zero_points, psf_fwhm : mapping or sequence, optional
        Per band: AB magnitude of one image unit; PSF FWHM in arcsec.
    pixel_scale : float, optional
        Arcsec per pixel; derived from the WCS when not given.
    image_unit : str
        Unit of the image plane (``count``, ``nJy``, ``adu`` …).
    chunks, shards : int or (int, int)
        Chunk size in y and x (one band per chunk; default 1024); optional shard size (a
        multiple of ``chunks``) to group chunks in one object.
    truth_segmentation, overwrite : bool
        Also create a ``truth_segmentation`` (y, x) int64 array; replace a store at ``path``.
    extra_attrs : mapping, optional
        More group attributes (e.g. simulation parameters, saturation levels).
    storage_options : dict, optional
        Passed to fsspec for remote URLs.

    Returns
    -------
    Mosaic
        Opened read-write.
    """
    bands = [str(b) for b in bands]
    _raise_if(not bands, "a mosaic needs at least one band")
    _raise_if(len(set(bands)) != len(bands), f"band names must be unique, got {bands}")
    ny, nx = (int(s) for s in shape)
    _raise_if(ny <= 0 or nx <= 0, f"mosaic shape must be positive, got {shape}")
    cy, cx = (chunks, chunks) if isinstance(chunks, int) else chunks
    _raise_if(cy <= 0 or cx <= 0, f"chunks must be positive, got {chunks}")
    cy, cx = min(cy, ny), min(cx, nx)
    shard_shape = None
    if shards is not None:
        sy, sx = (shards, shards) if isinstance(shards, int) else shards
        _raise_if(bool(sy % cy or sx % cx),
                  f"shards {shards} must be a multiple of chunks ({cy}, {cx})")  # fmt: skip
        shard_shape = (1, sy, sx)

    cards = header_to_cards(wcs) if wcs is not None else {}
    if cards:
        cards.update(NAXIS=2, NAXIS1=nx, NAXIS2=ny)
        if pixel_scale is None:
            pixel_scale = _pixel_scale_arcsec(_cards_to_wcs(cards))

    attrs = {
        "survey_engine": {"format_version": FORMAT_VERSION, "kind": "mosaic"},
        "bands": bands,
        "zero_points": _per_band(zero_points, bands, "zero_points"),
        "psf_fwhm_arcsec": _per_band(psf_fwhm, bands, "psf_fwhm"),
        "pixel_scale_arcsec": None if pixel_scale is None else float(pixel_scale),
        "units": {"image": image_unit, "variance": f"({image_unit})^2", "mask": "bitmask"},
        "mask_bits": dict(MASK_BITS),
        "wcs": cards,
    }
    if extra_attrs:
        attrs.update(dict(extra_attrs))

    if is_url(path):
        check_store(str(path), storage_options, "mosaic")
    group = _open_group(path, "w" if overwrite else "w-", storage_options)
    group.attrs.update(attrs)
    for plane in PLANES:
        group.create_array(
            plane, shape=(len(bands), ny, nx), chunks=(1, cy, cx), shards=shard_shape,
            dtype=_DTYPES[plane], fill_value=_FILL[plane], dimension_names=("band", "y", "x"),
            attributes={"units": attrs["units"][plane]},
        )  # fmt: skip
    if truth_segmentation:
        group.create_array(
            "truth_segmentation", shape=(ny, nx), chunks=(cy, cx),
            shards=None if shard_shape is None else shard_shape[1:], dtype=np.int64, fill_value=0,
            dimension_names=("y", "x"),
            attributes={"description": "noiseless truth footprints (truth id, 0 = none)"},
        )  # fmt: skip
    logger.info("created mosaic %s: bands=%s shape=(%d, %d)", path, bands, ny, nx)
    return Mosaic(group, str(path))


def _per_band(
    values, bands: Sequence[str], name: str, *, ingest: bool = False
) -> dict[str, float | None]:
    """``{band: float or None}`` from a mapping or a sequence (``ingest``: ingest's wording)."""
    bands = list(bands)
    if values is None:
        return dict.fromkeys(bands)
    if isinstance(values, Mapping):
        unknown = [b for b in values if b not in bands]
        if unknown:
            listed = unknown if ingest else sorted(unknown)
            known = "the ingested bands" if ingest else "bands"
            msg = f"{name} given for unknown band(s) {listed}; {known} are {bands}"
            raise UnknownBandError(msg)
        return {b: (None if values.get(b) is None else float(values[b])) for b in bands}
    values = list(values)
    of = f"band(s) {bands}" if ingest else "bands"
    _raise_if(len(values) != len(bands), f"{name} has {len(values)} values for {len(bands)} {of}")
    return {b: (None if v is None else float(v)) for b, v in zip(bands, values, strict=True)}
