"""Ingest FITS images (one per band) into a Zarr v3 mosaic store.

:func:`ingest_fits` copies registered single-band FITS images of one sky area
into the ``image``/``variance``/``mask`` planes of a new mosaic (see
:mod:`survey_engine.mosaic`), strip by strip so that images larger than memory
can be ingested.

Conventions
-----------
* **Files and HDUs.** Plain, tile-compressed (``.fz``, astropy's
  ``CompImageHDU``), gzip (``.gz``) and bzip2 (``.bz2``) FITS files are read.
  A file with one image HDU is read there. A file with several image HDUs
  (DECam, HSC) needs its HDU named: ``hdu=`` (index or EXTNAME, one per image
  or one for all; ``survey-engine ingest --hdu``) or a ``FILE[EXT]`` suffix on
  the path; without one it is refused with a list of its image HDUs (index,
  EXTNAME, shape). A weight, variance or mask file is read at its ``[EXT]``
  suffix, else at its only image HDU, else at the HDU named for its image.
  Keywords missing from an extension's header (band, zero point, gain,
  saturation, unit) are looked up in the file's primary header.
* **Geometry.** Every image must have the same pixel shape. A 3-D image whose
  leading axis has length 1 (FITS ``NAXIS3 = 1``) is accepted as 2-D; other
  shapes are an error. The celestial WCS of every image must agree with the
  first one to within ``0.05`` pixel at a 3x3 grid of points spanning the
  image, otherwise :func:`ingest_fits` raises (the bands would not be
  registered). An image with no celestial WCS is ingested with a warning; the
  mosaic then has no WCS if the first image has none.
* **WCS.** The first image's WCS header cards (including TPV ``PV`` and SIP
  ``A_``/``B_``/``AP_``/``BP_`` distortion terms) are stored verbatim, so the
  mosaic's pixel-to-sky transform equals astropy's on the source header.
* **Variance.** From a weight map (``variance = 1 / weight``), a variance map,
  or, when neither is given, estimated from the image: the square of the sky
  noise, the MAD standard deviation of the 3-sigma-clipped pixels
  (:func:`astropy.stats.sigma_clipped_stats` on a sample of at most 1 million
  pixels). If the header then also has ``GAIN`` (e-/ADU, image in ADU) a
  source Poisson term ``max(image - sky, 0) / GAIN`` is added per pixel. An
  estimate is logged as a warning naming the file. How each band's variance
  was obtained is recorded in the group attribute ``ingest["variance_source"]``
  (``"weight"``, ``"variance"`` or ``"estimated"``), with the estimated sky
  level and noise.
* **Mask.** NaN/inf image pixels, weight ``<= 0`` or non-finite, and variance
  ``<= 0`` or non-finite become ``NO_DATA`` (image 0, variance inf). Pixels
  ``>=`` the ``SATURATE`` (or ``SATLEVEL``) header value get ``SAT``. Every
  nonzero pixel of a mask FITS file (any dtype, NaN included) gets ``BAD``.
* **Header.** Invalid or non-standard header cards are dropped with one
  :class:`IngestWarning` per file. Band names come from ``bands``, else the
  ``BAND`` or ``FILTER`` keyword (first word), else ``b0``, ``b1`` …; the image
  unit from ``BUNIT`` (``count`` when absent).
* **Zero points** (AB magnitude of one image unit) from ``zero_points``, else
  the first header keyword found among ``MAGZERO``, ``MAGZPT``, ``MAGZP``,
  ``ZP`` (magnitudes) and ``FLUXMAG0`` (flux of a zero-magnitude source:
  ``zp = 2.5 log10 FLUXMAG0``), else 22.5 for images in nanomaggies (``BUNIT``
  ``nanomaggy``/``nanomaggies``/``nmgy``, SDSS frames). The keyword used is
  logged and recorded in ``ingest["zero_point_source"]``; a band without a
  zero point is logged as a warning (its magnitudes will be NaN).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from astropy.wcs import WCS
from tqdm import tqdm

from .flags import MaskBit
from .mosaic import Mosaic, UnknownBandError, create_mosaic

__all__ = ["IngestWarning", "ingest_fits"]

logger = logging.getLogger(__name__)

#: Maximum misregistration (pixels) tolerated between the WCS of two bands.
WCS_TOLERANCE_PIX = 0.05
_SKY_SAMPLE = 1_000_000
#: Header keywords holding a zero point in magnitudes, in order of preference.
_ZP_KEYS = ("MAGZERO", "MAGZPT", "MAGZP", "ZP")
#: Header keyword holding the flux of a zero-magnitude source (zp = 2.5 log10 FLUXMAG0).
_FLUXMAG0_KEY = "FLUXMAG0"
#: AB zero point of an image in nanomaggies (SDSS): 1 nanomaggy is magnitude 22.5.
NANOMAGGY_ZERO_POINT = 22.5
_NANOMAGGY_RE = re.compile(r"^\s*(?:nano-?magg(?:y|ies)|nmgy)\b", re.IGNORECASE)
_SAT_KEYS = ("SATURATE", "SATLEVEL")
#: ``FILE[EXT]``: an HDU index or EXTNAME named on the path.
_EXT_RE = re.compile(r"^(?P<file>.+)\[(?P<ext>[^\[\]]+)\]$")
#: Image HDUs listed by name in the refusal of a file with several of them.
_LIST_HDUS = 12
#: Keywords of a cube's third axis, dropped when a ``(1, ny, nx)`` cube is ingested as 2-D.
_AXIS3_RE = re.compile(
    r"^(?:(?:CTYPE|CRPIX|CRVAL|CDELT|CUNIT|CROTA|NAXIS)3|(?:PC|CD)(?:3_\d+|\d+_3)|P[VS]3_\d+)$"
)


class IngestWarning(UserWarning):
    """Non-fatal trouble with an input file (non-standard header, no WCS, noise estimate)."""


@dataclass(frozen=True)
class _Input:
    """One inspected FITS input: where its 2-D pixels are and its cleaned header.

    ``primary`` is the cleaned primary header when the pixels are in an
    extension: keywords the extension lacks are looked up there.
    """

    path: str
    hdu: int
    extname: str
    shape: tuple[int, int]
    cube: bool
    header: fits.Header
    primary: fits.Header | None
    memmap: bool

    def headers(self) -> list[tuple[str, fits.Header]]:
        """``("header", header)`` then ``("primary header", primary)`` when there is one."""
        out = [("header", self.header)]
        if self.primary is not None:
            out.append(("primary header", self.primary))
        return out

    def keyword(self, key: str) -> Any:
        """Value of ``key`` in the HDU's header, else in the primary header (None if absent)."""
        for _, header in self.headers():
            if key in header:
                return header[key]
        return None


def ingest_fits(
    images: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    bands: Sequence[str] | None = None,
    weights: Sequence[str | os.PathLike | None] | None = None,
    variances: Sequence[str | os.PathLike | None] | None = None,
    masks: Sequence[str | os.PathLike | None] | None = None,
    hdu: int | str | Sequence[int | str | None] | None = None,
    zero_points: Mapping[str, float | None] | Sequence[float | None] | None = None,
    psf_fwhm: Mapping[str, float | None] | Sequence[float | None] | None = None,
    chunks: int | tuple[int, int] = 1024,
    overwrite: bool = False,
    progress: bool = True,
) -> Mosaic:
    """Ingest registered FITS images, one per band, into a new mosaic store.

    Parameters
    ----------
    images : path or sequence of paths
        One FITS image per band, all of the same shape and WCS. A path may end
        in ``[EXT]`` (an HDU index or EXTNAME): ``"c4d_ooi.fits.fz[S29]"``.
    out : str or path-like
        Path (or fsspec URL) of the Zarr v3 mosaic to create.
    bands : sequence of str, optional
        Band names, one per image. Default: the ``BAND`` or ``FILTER`` header
        keyword (first word), else ``"b0"``, ``"b1"`` … Names must be unique.
    weights, variances : sequence of path or None, optional
        Per image: an inverse-variance map or a variance map (same shape;
        ``[EXT]`` suffix allowed). ``None`` entries (or lists) mean: estimate
        the variance from the image (sky noise, plus ``image / GAIN`` when the
        header has ``GAIN``). A band may not have both.
    masks : sequence of path or None, optional
        Per image: a mask FITS file whose nonzero pixels are flagged ``BAD``.
    hdu : int, str or sequence, optional
        HDU index or EXTNAME of each image: one value for every file, or one
        per image (``None`` entries: the file's only image HDU). Required for
        a file with several image HDUs unless its path ends in ``[EXT]``.
    zero_points : mapping or sequence, optional
        Per band AB magnitude of one image unit; bands without a value fall
        back to the header (``MAGZERO``, ``MAGZPT``, ``MAGZP``, ``ZP``,
        ``FLUXMAG0``, or 22.5 for ``BUNIT = 'nanomaggy'``).
    psf_fwhm : mapping or sequence, optional
        Per band PSF FWHM in arcsec.
    chunks : int or (int, int)
        Zarr chunk size in y and x. Pixels are copied in row strips one chunk
        high, so memory use is a few strips.
    overwrite : bool
        Replace an existing store at ``out``.
    progress : bool
        Show a tqdm progress bar over strips.

    Returns
    -------
    Mosaic
        The new mosaic, opened read-write, with consolidated metadata.

    Raises
    ------
    FileNotFoundError
        An input file does not exist.
    FileExistsError
        ``out`` exists and ``overwrite`` is False.
    ValueError
        Non-2-D data, mismatched shapes or WCS, duplicate band names, list
        lengths that do not match ``images``, both weight and variance for a
        band, a file with several image HDUs and none chosen, an unknown HDU.
    survey_engine.mosaic.UnknownBandError
        ``zero_points`` or ``psf_fwhm`` name a band that is not ingested (a
        ``KeyError`` and a ``ValueError``).

    Warns
    -----
    IngestWarning
        Invalid header cards dropped, an image without celestial WCS, or a sky
        noise that could not be estimated.

    Notes
    -----
    Logged (``logging``, logger ``survey_engine.ingest``): the header keyword
    each zero point came from (info), a band without zero point (warning), and
    every variance estimated from an image (warning, naming the file).
    """
    paths = _as_list(images, "images")
    if not paths:
        msg = "images is empty: give at least one FITS image"
        raise ValueError(msg)
    n = len(paths)
    aux = {
        kind: _per_image(value, f"{kind}s", n)
        for kind, value in (("weight", weights), ("variance", variances), ("mask", masks))
    }
    names = None if bands is None else _per_image(bands, "bands", n)
    hdus = _per_image_hdu(hdu, n)
    for i, (w, v) in enumerate(zip(aux["weight"], aux["variance"], strict=True)):
        if w is not None and v is not None:
            msg = f"image {paths[i]} has both a weight ({w}) and a variance ({v}) map; give one"
            raise ValueError(msg)
    for path in [*paths, *(p for files in aux.values() for p in files if p is not None)]:
        if not os.path.isfile(_split_ext(path)[0]):
            msg = f"input FITS file not found: {path}"
            raise FileNotFoundError(msg)
    out = os.fspath(out)
    if "://" not in out and os.path.exists(out) and not overwrite:
        msg = f"output {out} already exists; pass overwrite=True to replace it"
        raise FileExistsError(msg)
    if isinstance(chunks, int | np.integer):
        chunks = (int(chunks), int(chunks))
    if len(chunks) != 2 or min(chunks) <= 0:
        msg = f"chunks must be a positive int or (int, int), got {chunks!r}"
        raise ValueError(msg)

    # inspect every input (headers and shapes only) before writing anything
    specs = []  # (file, HDU asked for) per image: a [EXT] suffix wins over hdu=
    for path, h in zip(paths, hdus, strict=True):
        file, ext = _split_ext(path)
        specs.append((file, h if ext is None else ext))
    inputs = [_inspect(file, h, "image") for file, h in specs]
    ref = inputs[0]
    for inp in inputs[1:]:
        if inp.shape != ref.shape:
            msg = (
                f"image shapes differ: {ref.path} is {ref.shape} but {inp.path} is {inp.shape}; "
                "all bands must share one pixel grid"
            )
            raise ValueError(msg)
    aux_inputs = {
        kind: [
            _inspect_aux(f, img, kind, spec[1])
            for img, f, spec in zip(inputs, files, specs, strict=True)
        ]
        for kind, files in aux.items()
    }
    names = _band_names(inputs, names)
    wcses = [_celestial_wcs(inp) for inp in inputs]
    _check_wcs(inputs, wcses)
    zps = _per_band_arg(zero_points, names, "zero_points")
    fwhm = _per_band_arg(psf_fwhm, names, "psf_fwhm")
    strip = min(chunks[0], ref.shape[0])
    plan = []
    for i, (name, inp) in enumerate(zip(names, inputs, strict=True)):
        zp, zp_source = (
            (zps[name], "argument") if zps[name] is not None else _header_zero_point(inp, name)
        )
        band = _Band(
            name=name,
            image=inp,
            weight=aux_inputs["weight"][i],
            variance=aux_inputs["variance"][i],
            mask=aux_inputs["mask"][i],
            zero_point=zp,
            zero_point_source=zp_source,
            saturation=_keyword_float(inp, _SAT_KEYS)[1],
        )
        plan.append(band.with_model(strip))

    mosaic = create_mosaic(
        out,
        shape=ref.shape,
        bands=names,
        wcs=_wcs_header(ref) if wcses[0] is not None else None,
        zero_points=[b.zero_point for b in plan],
        pixel_scale=_pixel_scale(wcses[0]),
        psf_fwhm=fwhm,
        image_unit=str(ref.keyword("BUNIT") or "").strip() or "count",
        chunks=chunks,
        extra_attrs=_attrs(plan),
        overwrite=overwrite,
    )
    strip = mosaic.chunks[1]
    n_strips = -(-ref.shape[0] // strip)
    with tqdm(
        total=n * n_strips,
        disable=not progress,
        desc=f"ingest {os.path.basename(out.rstrip('/'))}",
        unit="strip",
    ) as bar:
        for band in plan:
            _copy_band(mosaic, band, strip, bar)
    mosaic.consolidate()
    return mosaic


@dataclass(frozen=True)
class _VarianceModel:
    """How a band's variance is made: from a weight or variance map, or estimated."""

    source: str
    sky_level: float | None = None
    sky_sigma: float | None = None
    gain: float | None = None


@dataclass(frozen=True)
class _Band:
    """Everything needed to copy one band: its inputs, calibration and variance model."""

    name: str
    image: _Input
    weight: _Input | None
    variance: _Input | None
    mask: _Input | None
    zero_point: float | None
    zero_point_source: str | None
    saturation: float | None
    model: _VarianceModel | None = None

    def with_model(self, strip: int) -> _Band:
        """This band with its variance model (estimating the sky noise if needed)."""
        if self.weight is not None:
            return replace(self, model=_VarianceModel("weight"))
        if self.variance is not None:
            return replace(self, model=_VarianceModel("variance"))
        level, sigma = _estimate_sky(self.image, self.mask, self.saturation, strip)
        if not (np.isfinite(sigma) and sigma > 0):
            warnings.warn(
                f"{self.image.path}: could not estimate the sky noise of band {self.name!r} "
                f"(clipped MAD std = {sigma}); variance set to 1",
                IngestWarning,
                stacklevel=3,
            )
            level = level if np.isfinite(level) else 0.0
            sigma = 1.0
        gain = _keyword_float(self.image, ("GAIN",))[1]
        if gain is not None and not gain > 0:
            gain = None
        logger.warning(
            "%s: no weight or variance map for band %r: variance estimated from the image, "
            "sky noise %.6g (3-sigma-clipped MAD std, sky level %.6g)%s",
            self.image.path, self.name, sigma, level,
            f" + (image - sky) / GAIN, GAIN = {gain:g}" if gain is not None
            else "; no GAIN in the header, so no source Poisson term",
        )  # fmt: skip
        return replace(self, model=_VarianceModel("estimated", float(level), float(sigma), gain))


def _attrs(plan: list[_Band]) -> dict[str, Any]:
    """The ``saturation`` and ``ingest`` group attributes."""

    def path(inp: _Input | None) -> str | None:
        return None if inp is None else inp.path

    return {
        "saturation": {b.name: b.saturation for b in plan},
        "ingest": {
            "tool": "survey_engine.ingest.ingest_fits",
            "images": {b.name: b.image.path for b in plan},
            "hdu": {b.name: b.image.hdu for b in plan},
            "extname": {b.name: b.image.extname for b in plan},
            "weights": {b.name: path(b.weight) for b in plan},
            "variances": {b.name: path(b.variance) for b in plan},
            "masks": {b.name: path(b.mask) for b in plan},
            "variance_source": {b.name: b.model.source for b in plan},
            "sky_level": {b.name: b.model.sky_level for b in plan},
            "sky_sigma": {b.name: b.model.sky_sigma for b in plan},
            "gain": {b.name: b.model.gain for b in plan},
            "zero_point_source": {b.name: b.zero_point_source for b in plan},
            "mask_file_convention": "nonzero -> BAD",
        },
    }


def _copy_band(mosaic: Mosaic, band: _Band, strip: int, bar: tqdm) -> None:
    """Copy one band into the mosaic in row strips of ``strip`` rows."""
    ny, nx = band.image.shape
    with contextlib.ExitStack() as stack:
        hdus = {
            kind: None if inp is None else (stack.enter_context(_open_hdu(inp)), inp)
            for kind, inp in (
                ("image", band.image),
                ("weight", band.weight),
                ("variance", band.variance),
                ("mask", band.mask),
            )
        }
        for y0 in range(0, ny, strip):
            y1 = min(y0 + strip, ny)
            data = {
                kind: None if v is None else _read_strip(*v, y0, y1, as_float=kind != "mask")
                for kind, v in hdus.items()
            }
            image, variance, mask = _fill_strip(
                data["image"],
                weight=data["weight"],
                variance=data["variance"],
                mask=data["mask"],
                model=band.model,
                saturation=band.saturation,
            )
            mosaic.write(band.name, y0, 0, image=image, variance=variance, mask=mask)
            bar.update(1)
    logger.info("ingested %s as band %r (%d x %d)", band.image.path, band.name, ny, nx)


def _pixel_scale(wcs: WCS | None) -> float | None:
    if wcs is None:
        return None
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(proj_plane_pixel_scales(wcs.celestial)) * 3600)


# --- inputs ----------------------------------------------------------------------------------
def _as_list(value, name: str) -> list[str]:
    if isinstance(value, str | os.PathLike):
        return [os.fspath(value)]
    try:
        return [os.fspath(v) for v in value]
    except TypeError:
        msg = f"{name} must be a path or a sequence of paths, got {value!r}"
        raise TypeError(msg) from None


def _per_image(value, name: str, n: int) -> list:
    if value is None:
        return [None] * n
    if isinstance(value, str | os.PathLike):
        value = [value]
    value = list(value)
    if len(value) != n:
        msg = f"{name} has {len(value)} entries but {n} image(s) were given; give one per image"
        raise ValueError(msg)
    if name == "bands":
        return [str(v) for v in value]
    return [None if v is None else os.fspath(v) for v in value]


@contextlib.contextmanager
def _quiet_fits(path: str, messages: list[str]) -> Iterator[None]:
    """Collect the warnings astropy emits while parsing ``path`` into ``messages``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        messages.append(str(w.message).splitlines()[0])
        logger.debug("%s: %s", path, w.message)


def _per_image_hdu(value, n: int) -> list[int | str | None]:
    """``hdu=`` as one entry per image (a single value is used for every image)."""
    if value is None or isinstance(value, str | int | np.integer) or not np.iterable(value):
        value = [value]
    value = [int(v) if isinstance(v, np.integer) else v for v in value]
    for v in value:
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | str)):
            msg = f"hdu must be an HDU index (int) or EXTNAME (str), got {v!r}"
            raise TypeError(msg)
    if len(value) == 1:
        return value * n
    if len(value) != n:
        msg = f"hdu has {len(value)} entries but {n} image(s) were given; give one per image or one for all"
        raise ValueError(msg)
    return value


def _split_ext(path: str) -> tuple[str, int | str | None]:
    """``FILE[EXT]`` → ``(FILE, EXT)`` (EXT an int when all digits); a plain existing path → (path, None)."""
    if os.path.isfile(path):
        return path, None
    m = _EXT_RE.match(path)
    if m and os.path.isfile(m["file"]):
        ext = m["ext"].strip()
        return m["file"], int(ext) if ext.isdigit() else ext
    return path, None


def _image_hdus(hdul: fits.HDUList) -> list[tuple[int, str, tuple[int, ...]]]:
    """(index, EXTNAME, shape) of every HDU that holds image data."""
    out = []
    for i, h in enumerate(hdul):
        if getattr(h, "is_image", False) and h.header.get("NAXIS", 0) > 0:
            shape = tuple(int(v) for v in h.shape)
            if shape and math.prod(shape) > 0:
                out.append((i, str(h.name or ""), shape))
    return out


def _describe_hdus(images: list[tuple[int, str, tuple[int, ...]]]) -> str:
    """``1 'CCD1' 60×80, 2 'CCD2' 60×80`` (at most ``_LIST_HDUS`` named)."""
    parts = [
        f"{i}{f' {name!r}' if name else ''} {'×'.join(str(v) for v in shape)}"
        for i, name, shape in images[:_LIST_HDUS]
    ]
    if len(images) > _LIST_HDUS:
        parts.append(f"… {len(images) - _LIST_HDUS} more")
    return ", ".join(parts) or "none"


def _select_hdu(
    hdul: fits.HDUList, hdu: int | str | None, path: str, *, fallback: int | str | None = None
) -> int:
    """Index of the HDU to read: ``hdu``, else the only image HDU, else ``fallback``, else refuse."""
    images = _image_hdus(hdul)
    if hdu is None and len(images) > 1 and fallback is not None:
        hdu = fallback
    if hdu is not None:
        try:
            index = hdul.index(hdul[hdu])
        except (KeyError, IndexError):
            msg = f"{path} has no HDU {hdu!r} ({len(hdul)} HDUs; image HDUs: {_describe_hdus(images)})"
            raise ValueError(msg) from None
        if index not in {i for i, _, _ in images}:
            h = hdul[index]
            msg = (
                f"HDU {hdu!r} of {path} holds no image data ({type(h).__name__}); its image "
                f"HDUs: {_describe_hdus(images)}"
            )
            raise ValueError(msg)
        return index
    if not images:
        msg = f"{path} has no HDU with image data"
        raise ValueError(msg)
    if len(images) > 1:
        msg = (
            f"{path} has {len(images)} image HDUs ({_describe_hdus(images)}): choose one with "
            "--hdu INDEX|EXTNAME (hdu= in Python) or FILE[EXTNAME]"
        )
        raise ValueError(msg)
    return images[0][0]


def _inspect(
    path: str, hdu: int | str | None, kind: str, *, fallback: int | str | None = None
) -> _Input:
    """Read the header and shape of the image HDU of ``path``; warn once on bad cards."""
    messages: list[str] = []
    try:
        with (
            _quiet_fits(path, messages),
            fits.open(path, memmap=True, ignore_missing_end=True) as hdul,
        ):
            index = _select_hdu(hdul, hdu, path, fallback=fallback)
            h = hdul[index]
            shape = tuple(int(s) for s in h.shape)
            header, dropped = _clean_header(h.header)
            bitpix = int(h.header.get("BITPIX", -32))
            primary = _clean_header(hdul[0].header)[0] if index > 0 else None
            extname = str(h.name or "")
    except OSError as err:  # astropy: not FITS, truncated, bad compression …
        first = str(err).split(". ")[0].rstrip(".")  # not astropy's advice on open() options
        msg = f"{path} is not a readable FITS file: {first}"
        raise OSError(msg) from err
    if len(shape) == 3 and shape[0] == 1:
        cube = True
        shape = shape[1:]
    elif len(shape) == 2:
        cube = False
    else:
        msg = (
            f"{path} (HDU {index}) has {len(shape)}-D data of shape {shape}; expected a 2-D image "
            "(or a 3-D cube with a leading axis of length 1)"
        )
        raise ValueError(msg)
    if dropped:
        warnings.warn(
            f"{path}: dropped {len(dropped)} invalid or non-standard FITS header card(s), "
            f"first: {dropped[0]!r}",
            IngestWarning,
            stacklevel=3,
        )
    elif messages:
        warnings.warn(
            f"{path}: non-standard FITS file tolerated ({len(messages)} note(s)), "
            f"first: {messages[0]}",
            IngestWarning,
            stacklevel=3,
        )
    scaled = (
        header.get("BSCALE", 1) != 1
        or header.get("BZERO", 0) != 0
        or (bitpix > 0 and "BLANK" in header)
    )
    logger.debug("%s: %s read from HDU %d %r, shape %s", path, kind, index, extname, shape)
    return _Input(path, index, extname, shape, cube, header, primary, memmap=not scaled)


def _inspect_aux(
    spec: str | None, image: _Input, kind: str, image_hdu: int | str | None
) -> _Input | None:
    """Inspect a weight/variance/mask file and check it matches its image's shape.

    Its HDU: a ``[EXT]`` suffix, else its only image HDU, else the HDU named for its image.
    """
    if spec is None:
        return None
    path, ext = _split_ext(spec)
    inp = _inspect(path, ext, f"{kind} map", fallback=image_hdu)
    if os.path.abspath(inp.path) == os.path.abspath(image.path) and inp.hdu == image.hdu:
        msg = (
            f"{kind} map {spec} is HDU {inp.hdu} of {path}, the image itself; name its HDU "
            f"as {path}[EXTNAME]"
        )
        raise ValueError(msg)
    if inp.shape != image.shape:
        msg = (
            f"{kind} map {inp.path} has shape {inp.shape} but its image {image.path} "
            f"has shape {image.shape}"
        )
        raise ValueError(msg)
    return inp


def _clean_header(header: fits.Header) -> tuple[fits.Header, list[str]]:
    """Copy ``header`` without the cards astropy cannot parse (exact card images kept)."""
    clean = fits.Header()
    dropped: list[str] = []
    for card in header.cards:
        image = card.image
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                probe = fits.Card.fromstring(image)
                _ = probe.keyword, probe.value
            except Exception:  # any unparsable card is dropped
                caught.append(None)
        if caught:
            dropped.append(image[:80].rstrip())
            continue
        clean.append(probe, useblanks=False, end=True)
    return clean, dropped


@contextlib.contextmanager
def _open_hdu(inp: _Input) -> Iterator[Any]:
    messages: list[str] = []
    with _quiet_fits(inp.path, messages):
        hdul = fits.open(inp.path, memmap=inp.memmap, ignore_missing_end=True)
        try:
            h = hdul[inp.hdu]
            _ = h.header
        except BaseException:
            hdul.close()
            raise
    try:
        yield h
    finally:
        hdul.close()


def _read_strip(h, inp: _Input, y0: int, y1: int, *, as_float: bool = True) -> np.ndarray:
    """Rows ``y0:y1`` of an image HDU: native float32 (a copy), or the raw values for masks."""
    data = h.section[0, y0:y1] if inp.cube else h.section[y0:y1]
    if as_float:
        return np.array(data, dtype=np.float32)  # one copy: big-endian -> native float32
    return np.asarray(data)


def _band_names(inputs: list[_Input], bands: list[str] | None) -> list[str]:
    if bands is not None:
        names = list(bands)
        origin = "bands"
    else:
        names = []
        for i, inp in enumerate(inputs):
            value = ""
            for key in ("BAND", "FILTER"):
                raw = inp.keyword(key)
                if isinstance(raw, str) and raw.strip():
                    value = raw.split()[0]
                    break
            names.append(value or f"b{i}")
        origin = "the BAND/FILTER header keywords"
    for i, name in enumerate(names):
        if not name.strip():
            msg = f"empty band name for {inputs[i].path}"
            raise ValueError(msg)
        for j in range(i):
            if names[j] == name:
                msg = (
                    f"duplicate band {name!r} (from {origin}) for {inputs[j].path} and "
                    f"{inputs[i].path}; pass distinct names with bands=[...]"
                )
                raise ValueError(msg)
    return names


def _per_band_arg(values, bands: list[str], name: str) -> dict[str, float | None]:
    if values is None:
        return dict.fromkeys(bands)
    if isinstance(values, Mapping):
        unknown = [b for b in values if b not in bands]
        if unknown:
            msg = f"{name} given for unknown band(s) {unknown}; the ingested bands are {bands}"
            raise UnknownBandError(msg)
        return {b: (None if values.get(b) is None else float(values[b])) for b in bands}
    values = list(values)
    if len(values) != len(bands):
        msg = f"{name} has {len(values)} values for {len(bands)} band(s) {bands}"
        raise ValueError(msg)
    return {b: (None if v is None else float(v)) for b, v in zip(bands, values, strict=True)}


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _keyword_float(inp: _Input, keys: Sequence[str]) -> tuple[str | None, float | None]:
    """First of ``keys`` with a finite number in the HDU's header, else in the primary header."""
    for _, header in inp.headers():
        for key in keys:
            value = _as_float(header.get(key))
            if value is not None:
                return key, value
    return None, None


def _header_zero_point(inp: _Input, band: str) -> tuple[float | None, str | None]:
    """Zero point of ``inp`` from its headers, and where it came from (``"header:MAGZERO"``)."""
    for where, header in inp.headers():
        for key in _ZP_KEYS:
            value = _as_float(header.get(key))
            if value is not None:
                logger.info("%s: band %r zero point %.4f from %s %s", inp.path, band, value, where, key)  # fmt: skip
                return value, f"{where}:{key}"
        flux0 = _as_float(header.get(_FLUXMAG0_KEY))
        if flux0 is not None and flux0 > 0:
            value = 2.5 * math.log10(flux0)
            logger.info(
                "%s: band %r zero point %.4f = 2.5 log10(%s %s = %.6g)",
                inp.path, band, value, where, _FLUXMAG0_KEY, flux0,
            )  # fmt: skip
            return value, f"{where}:{_FLUXMAG0_KEY}"
        unit = header.get("BUNIT")
        if isinstance(unit, str) and _NANOMAGGY_RE.match(unit):
            logger.info(
                "%s: band %r zero point %.1f from %s BUNIT = %r (nanomaggies)",
                inp.path, band, NANOMAGGY_ZERO_POINT, where, unit,
            )  # fmt: skip
            return NANOMAGGY_ZERO_POINT, f"{where}:BUNIT"
    logger.warning(
        "%s: band %r has no zero point (none given, no %s or %s keyword, BUNIT not nanomaggy): "
        "its magnitudes and nJy fluxes will be NaN",
        inp.path, band, "/".join(_ZP_KEYS), _FLUXMAG0_KEY,
    )  # fmt: skip
    return None, None


# --- WCS -------------------------------------------------------------------------------------
def _wcs_header(inp: _Input) -> fits.Header:
    """The cleaned header with the degenerate third axis of a cube removed."""
    if not inp.cube:
        return inp.header
    header = fits.Header()
    for card in inp.header.cards:
        if _AXIS3_RE.match(card.keyword):
            continue
        header.append(card, useblanks=False, end=True)
    if "WCSAXES" in header:
        header["WCSAXES"] = 2
    header["NAXIS"] = 2
    return header


def _celestial_wcs(inp: _Input) -> WCS | None:
    messages: list[str] = []
    try:
        with _quiet_fits(inp.path, messages):
            wcs = WCS(_wcs_header(inp), relax=True)
    except Exception as err:  # any WCS failure means "no usable WCS"
        warnings.warn(
            f"{inp.path}: unusable WCS ({err}); ingested without WCS", IngestWarning, stacklevel=3
        )
        return None
    if wcs.naxis != 2 or not wcs.has_celestial:
        warnings.warn(
            f"{inp.path}: no 2-D celestial WCS in the header (CTYPE = "
            f"{[inp.header.get(f'CTYPE{k}') for k in (1, 2)]}); pixel coordinates only",
            IngestWarning,
            stacklevel=3,
        )
        return None
    return wcs


def _check_wcs(inputs: list[_Input], wcses: list[WCS | None]) -> None:
    ref, w0 = inputs[0], wcses[0]
    if w0 is None:
        return
    ny, nx = ref.shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 3), np.linspace(0, ny - 1, 3))
    ra, dec = w0.all_pix2world(gx.ravel(), gy.ravel(), 0)
    for inp, w in zip(inputs[1:], wcses[1:], strict=True):
        if w is None:
            continue
        try:
            x, y = w.all_world2pix(ra, dec, 0)
            offset = float(np.max(np.hypot(x - gx.ravel(), y - gy.ravel())))
        except Exception:  # a WCS that cannot invert is a mismatch
            offset = float("inf")
        if not offset <= WCS_TOLERANCE_PIX:
            msg = (
                f"WCS of {inp.path} differs from that of {ref.path} by {offset:.3g} pixel "
                f"(> {WCS_TOLERANCE_PIX}); images of shape {ref.shape} must be registered"
            )
            raise ValueError(msg)


# --- pixels ----------------------------------------------------------------------------------
def _estimate_sky(
    inp: _Input, mask_inp: _Input | None, saturation: float | None, strip: int
) -> tuple[float, float]:
    """Sigma-clipped median and MAD std of (a row sample of) the image."""
    ny, nx = inp.shape
    if ny * nx <= _SKY_SAMPLE:
        blocks = [(y0, min(y0 + strip, ny)) for y0 in range(0, ny, strip)]
    else:
        rows = np.unique(np.linspace(0, ny - 1, max(1, _SKY_SAMPLE // nx)).astype(int))
        blocks = [(int(r), int(r) + 1) for r in rows]
    sample = []
    with contextlib.ExitStack() as stack:
        h = stack.enter_context(_open_hdu(inp))
        hm = None if mask_inp is None else stack.enter_context(_open_hdu(mask_inp))
        for y0, y1 in blocks:
            data = _read_strip(h, inp, y0, y1)
            good = np.isfinite(data)
            if saturation is not None:
                good &= data < saturation
            if hm is not None:
                good &= _read_strip(hm, mask_inp, y0, y1, as_float=False) == 0
            sample.append(data[good])
    return _clipped_stats(np.concatenate(sample).astype(np.float64))


def _clipped_stats(values: np.ndarray, nsigma: float = 3.0) -> tuple[float, float]:
    """Median and MAD standard deviation of the ``nsigma``-clipped values (NaN when empty)."""
    if values.size == 0:
        return float("nan"), float("nan")
    _, median, std = sigma_clipped_stats(
        values, sigma=nsigma, maxiters=10, cenfunc="median", stdfunc="mad_std"
    )
    return float(median), float(std)


def _fill_strip(
    image: np.ndarray,
    *,
    weight: np.ndarray | None,
    variance: np.ndarray | None,
    mask: np.ndarray | None,
    model: _VarianceModel,
    saturation: float | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn input strips into the mosaic's float32 image, float32 variance and uint16 mask."""
    image = np.asarray(image, dtype=np.float32)
    flags = np.zeros(image.shape, dtype=np.uint16)
    finite = np.isfinite(image)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if weight is not None:
            weight = np.asarray(weight, dtype=np.float32)
            good_var = np.isfinite(weight) & (weight > 0)
            var = np.full(image.shape, np.inf, dtype=np.float32)
            np.divide(np.float32(1), weight, out=var, where=good_var)
            good_var &= np.isfinite(var)
        elif variance is not None:
            var = np.array(variance, dtype=np.float32)
            good_var = np.isfinite(var) & (var > 0)
        else:
            var = np.full(image.shape, np.float32(model.sky_sigma**2), dtype=np.float32)
            if model.gain is not None:
                source = np.maximum(image - np.float32(model.sky_level), np.float32(0))
                var += np.where(finite, source / np.float32(model.gain), np.float32(0))
            good_var = np.isfinite(var) & (var > 0)
        if saturation is not None:
            flags[finite & (image >= saturation)] |= np.uint16(MaskBit.SAT)
    if mask is not None:
        flags[mask != 0] |= np.uint16(MaskBit.BAD)
    nodata = ~(finite & good_var)
    flags[nodata] |= np.uint16(MaskBit.NO_DATA)
    image[nodata] = 0
    var[nodata] = np.inf
    return image, var, flags
