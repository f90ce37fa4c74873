"""Ingest FITS images (one per band) into a Zarr v3 mosaic store.

:func:`ingest_fits` copies registered single-band FITS images of one sky area into the
``image``/``variance``/``mask`` planes of a new mosaic (see :mod:`survey_engine.mosaic`), strip by
strip so that images larger than memory can be ingested. Its conventions (files and HDUs,
geometry, WCS, variance, mask, header, zero points) are in ``docs/mosaic_format.md``, section
"Ingest of FITS images".
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
from .mosaic import Mosaic, _per_band, _pixel_scale_arcsec, _raise_if, create_mosaic
from .storage import check_store, filesystem, is_url

__all__ = ["IngestWarning", "ingest_fits"]

logger = logging.getLogger(__name__)

#: Maximum misregistration (pixels) tolerated between the WCS of two bands.
WCS_TOLERANCE_PIX = 0.05
_SKY_SAMPLE = 1_000_000  # pixels sampled for the sky noise
_ZP_KEYS = ("MAGZERO", "MAGZPT", "MAGZP", "ZP")  # zero point (mag) keywords, in preference order
_FLUXMAG0_KEY = "FLUXMAG0"  # flux of a zero-magnitude source: zp = 2.5 log10 FLUXMAG0
#: AB zero point of an image in nanomaggies (SDSS): 1 nanomaggy is magnitude 22.5.
NANOMAGGY_ZERO_POINT = 22.5
_NANOMAGGY_RE = re.compile(r"^\s*(?:nano-?magg(?:y|ies)|nmgy)\b", re.IGNORECASE)
_SAT_KEYS = ("SATURATE", "SATLEVEL")
_EXT_RE = re.compile(r"^(?P<file>.+)\[(?P<ext>[^\[\]]+)\]$")  # FILE[EXT]: HDU index or EXTNAME
_LIST_HDUS = 12  # image HDUs named in the refusal of a file with several of them
#: Keywords of a cube's third axis, dropped when a ``(1, ny, nx)`` cube is ingested as 2-D.
_AXIS3_RE = re.compile(
    r"^(?:(?:CTYPE|CRPIX|CRVAL|CDELT|CUNIT|CROTA|NAXIS)3|(?:PC|CD)(?:3_\d+|\d+_3)|P[VS]3_\d+)$"
)


class IngestWarning(UserWarning):
    """Non-fatal trouble with an input file (non-standard header, no WCS, noise estimate)."""


@dataclass(frozen=True)
class _Input:
    """One inspected FITS input: where its 2-D pixels are, its cleaned header (and primary's)."""

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
        primary = [] if self.primary is None else [("primary header", self.primary)]
        return [("header", self.header), *primary]

    def keyword(self, key: str) -> Any:
        """Value of ``key`` in the HDU's header, else in the primary header (None if absent)."""
        return next((header[key] for _, header in self.headers() if key in header), None)


def ingest_fits(
    images: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, *,
    bands: Sequence[str] | None = None,
    weights: Sequence[str | os.PathLike | None] | None = None,
    variances: Sequence[str | os.PathLike | None] | None = None,
    masks: Sequence[str | os.PathLike | None] | None = None,
    hdu: int | str | Sequence[int | str | None] | None = None,
    zero_points: Mapping[str, float | None] | Sequence[float | None] | None = None,
    psf_fwhm: Mapping[str, float | None] | Sequence[float | None] | None = None,
    chunks: int | tuple[int, int] = 1024, overwrite: bool = False, progress: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> Mosaic:  # fmt: skip
    """Ingest registered FITS images, one per band, into a new mosaic store.

    The conventions (HDU choice, WCS check, variance, mask, header keywords, zero points,
    what is logged) are in ``docs/mosaic_format.md``, section "Ingest of FITS images".

    Parameters
    ----------
    images : path or sequence of paths
        One FITS image per band, all of the same shape and WCS. A path may end in ``[EXT]``
        (an HDU index or EXTNAME): ``"c4d_ooi.fits.fz[S29]"``.
    out : str or path-like
        Path (or fsspec URL) of the Zarr v3 mosaic to create.
    bands : sequence of str, optional
        Unique band names, one per image. Default: the ``BAND`` or ``FILTER`` header keyword
        (first word), else ``"b0"``, ``"b1"`` …
    weights, variances, masks : sequence of path or None, optional
        Per image (``[EXT]`` suffix allowed): an inverse-variance or a variance map, not both
        (``None``: estimated from the image), and a mask file whose nonzero pixels are ``BAD``.
    hdu : int, str or sequence, optional
        HDU index or EXTNAME: one for every file, or one per image (``None``: the file's only
        image HDU); needed for a file with several image HDUs unless its path ends in ``[EXT]``.
    zero_points, psf_fwhm : mapping or sequence, optional
        Per band: AB magnitude of one image unit (default: from the header); PSF FWHM (arcsec).
    chunks : int or (int, int)
        Zarr chunk size in y and x; pixels are copied in strips one chunk high.
    overwrite, progress : bool
        Replace an existing store at ``out``; show a tqdm progress bar over strips.
    storage_options : dict, optional
        fsspec options of an ``out`` URL (``endpoint_url``, ``key``, ``secret`` …; default:
        the environment, see :mod:`survey_engine.storage`).

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
        Non-2-D data, mismatched shapes or WCS, duplicate band names, list lengths that do not
        match ``images``, both weight and variance for a band, an unknown or unchosen HDU.
    survey_engine.mosaic.UnknownBandError
        ``zero_points`` or ``psf_fwhm`` name a band that is not ingested.

    Warns
    -----
    IngestWarning
        Invalid header cards dropped, an image without celestial WCS, an unestimable sky noise.
    """
    single = isinstance(images, str | os.PathLike)
    try:
        paths = [os.fspath(v) for v in ([images] if single else images)]
    except TypeError:
        msg = f"images must be a path or a sequence of paths, got {images!r}"
        raise TypeError(msg) from None
    _raise_if(not paths, "images is empty: give at least one FITS image")
    n = len(paths)
    aux = {
        kind: _per_image(value, f"{kind}s", n)
        for kind, value in (("weight", weights), ("variance", variances), ("mask", masks))
    }
    names = None if bands is None else _per_image(bands, "bands", n)
    hdus = _per_image_hdu(hdu, n)
    for path, w, v in zip(paths, aux["weight"], aux["variance"], strict=True):
        _raise_if(w is not None and v is not None,
                  f"image {path} has both a weight ({w}) and a variance ({v}) map; give one")  # fmt: skip
    for path in [*paths, *(p for files in aux.values() for p in files if p is not None)]:
        if not os.path.isfile(_split_ext(path)[0]):
            msg = f"input FITS file not found: {path}"
            raise FileNotFoundError(msg)
    out = os.fspath(out)
    if is_url(out):
        check_store(out, storage_options, "output mosaic")
        fs, fs_path = filesystem(out, storage_options)
        exists = fs.exists(fs_path)
    else:
        exists = os.path.exists(out)
    if exists and not overwrite:
        msg = f"output {out} already exists; pass overwrite=True to replace it"
        raise FileExistsError(msg)
    if isinstance(chunks, int | np.integer):
        chunks = (int(chunks), int(chunks))
    _raise_if(len(chunks) != 2 or min(chunks) <= 0,
              f"chunks must be a positive int or (int, int), got {chunks!r}")  # fmt: skip

    # inspect every input (headers and shapes only) before writing anything; [EXT] wins over hdu=
    files = [_split_ext(path) for path in paths]
    asked = [h if ext is None else ext for (_, ext), h in zip(files, hdus, strict=True)]
    inputs = [_inspect(file, h, "image") for (file, _), h in zip(files, asked, strict=True)]
    ref = inputs[0]
    for inp in inputs[1:]:
        _raise_if(inp.shape != ref.shape, f"image shapes differ: {ref.path} is {ref.shape} but "
                  f"{inp.path} is {inp.shape}; all bands must share one pixel grid")  # fmt: skip
    aux_inputs = {
        kind: [_inspect_aux(f, img, kind, h) for img, f, h in zip(inputs, fs, asked, strict=True)]
        for kind, fs in aux.items()
    }
    names = _band_names(inputs, names)
    wcses = [_celestial_wcs(inp) for inp in inputs]
    _check_wcs(inputs, wcses)
    zps = _per_band(zero_points, names, "zero_points", ingest=True)
    fwhm = _per_band(psf_fwhm, names, "psf_fwhm", ingest=True)
    strip = min(chunks[0], ref.shape[0])
    plan = []
    for i, (name, inp) in enumerate(zip(names, inputs, strict=True)):
        zp, zp_source = (
            (zps[name], "argument") if zps[name] is not None else _header_zero_point(inp, name)
        )
        band = _Band(
            name=name, image=inp, **{kind: inps[i] for kind, inps in aux_inputs.items()},
            zero_point=zp, zero_point_source=zp_source, saturation=_keyword_float(inp, _SAT_KEYS),
        )  # fmt: skip
        plan.append(band.with_model(strip))

    mosaic = create_mosaic(
        out, shape=ref.shape, bands=names, wcs=_wcs_header(ref) if wcses[0] is not None else None,
        zero_points=[b.zero_point for b in plan], psf_fwhm=fwhm,
        pixel_scale=None if wcses[0] is None else _pixel_scale_arcsec(wcses[0]),
        image_unit=str(ref.keyword("BUNIT") or "").strip() or "count", chunks=chunks,
        extra_attrs=_attrs(plan), overwrite=overwrite, storage_options=storage_options,
    )  # fmt: skip
    n_strips = -(-ref.shape[0] // strip)  # strip == mosaic.chunks[1] (both clip to the height)
    desc = f"ingest {os.path.basename(out.rstrip('/'))}"
    with tqdm(total=n * n_strips, disable=not progress, desc=desc, unit="strip") as bar:
        for band in plan:
            _copy_band(mosaic, band, strip, bar)
    _record_psfs(mosaic, plan, fwhm)
    mosaic.consolidate()
    return mosaic


#: Side of the central block of a band searched for point sources to estimate its PSF.
PSF_SAMPLE = 2048


def _record_psfs(mosaic: Mosaic, plan: list[_Band], given: Mapping[str, float | None]) -> None:
    """Estimate the PSF FWHM of each band whose FWHM was not given, from its point sources.

    Written to the group attributes ``psf_fwhm_pix`` (pixels, the estimates) and
    ``psf_fwhm_source`` (``"argument"``, ``"estimated from N point sources"`` or None); an
    estimate also fills ``psf_fwhm_arcsec`` when the pixel scale is known.
    """
    from .kernels.psf import estimate_psf_fwhm

    scale = mosaic.pixel_scale
    arcsec, pix, source = dict(mosaic.psf_fwhm), {}, {}
    ny, nx = mosaic.ny, mosaic.nx
    y0, x0 = max(0, (ny - PSF_SAMPLE) // 2), max(0, (nx - PSF_SAMPLE) // 2)
    box = (slice(y0, y0 + PSF_SAMPLE), slice(x0, x0 + PSF_SAMPLE))
    for i, band in enumerate(plan):
        if given.get(band.name) is not None:
            source[band.name] = "argument"
            continue
        image = np.asarray(mosaic.image[(i, *box)])
        var = np.asarray(mosaic.variance[(i, *box)])
        bad = np.asarray(mosaic.mask[(i, *box)]) & int(MaskBit.NO_DATA | MaskBit.BAD) != 0
        good = ~bad & np.isfinite(var) & (var > 0)
        sigma = float(np.sqrt(np.median(var[good]))) if good.any() else None
        est = estimate_psf_fwhm(image, sigma=sigma, bad=~good, saturation=band.saturation)
        if np.isfinite(est.fwhm):
            pix[band.name] = round(est.fwhm, 4)
            source[band.name] = f"estimated from {est.n_stars} point sources"
            if scale:
                arcsec[band.name] = round(est.fwhm * scale, 4)
            logger.info("%s: band %r PSF FWHM %.3f px, estimated from %d point sources (%d fitted)",
                        band.image.path, band.name, est.fwhm, est.n_stars, est.n_fitted)  # fmt: skip
        else:
            pix[band.name], source[band.name] = None, None
            logger.warning("%s: band %r: too few point sources (%d on the stellar locus) to estimate "
                           "the PSF; give it (psf_fwhm / --psf-fwhm): model fluxes need it",
                           band.image.path, band.name, est.n_stars)  # fmt: skip
    psfs = {"psf_fwhm_arcsec": arcsec, "psf_fwhm_pix": pix, "psf_fwhm_source": source}
    mosaic.group.attrs.update(psfs)
    mosaic.attrs.update(psfs)
    mosaic._read_psfs()


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
    variance_source: str | None = None  # "weight" or "variance" (maps), or "estimated" (sky, gain):
    sky_level: float | None = None
    sky_sigma: float | None = None
    gain: float | None = None

    def with_model(self, strip: int) -> _Band:
        """This band with its variance model (estimating the sky noise if needed)."""
        if self.weight is not None:
            return replace(self, variance_source="weight")
        if self.variance is not None:
            return replace(self, variance_source="variance")
        level, sigma = _estimate_sky(self.image, self.mask, self.saturation, strip)
        if not (np.isfinite(sigma) and sigma > 0):
            msg = (f"{self.image.path}: could not estimate the sky noise of band {self.name!r} "
                   f"(clipped MAD std = {sigma}); variance set to 1")  # fmt: skip
            warnings.warn(msg, IngestWarning, stacklevel=3)
            level, sigma = (level if np.isfinite(level) else 0.0), 1.0
        gain = _keyword_float(self.image, ("GAIN",))
        gain = gain if gain is not None and gain > 0 else None
        logger.warning(
            "%s: no weight or variance map for band %r: variance estimated from the image, "
            "sky noise %.6g (3-sigma-clipped MAD std, sky level %.6g)%s",
            self.image.path, self.name, sigma, level,
            f" + (image - sky) / GAIN, GAIN = {gain:g}" if gain is not None
            else "; no GAIN in the header, so no source Poisson term",
        )  # fmt: skip
        model = {"sky_level": float(level), "sky_sigma": float(sigma), "gain": gain}
        return replace(self, variance_source="estimated", **model)


def _attrs(plan: list[_Band]) -> dict[str, Any]:
    """The ``saturation`` and ``ingest`` group attributes ({band: value} per key)."""
    image = {"images": "path", "hdu": "hdu", "extname": "extname"}  # key: attribute of the image
    maps = ("weight", "variance", "mask")  # "weights" etc.: their paths
    model = ("variance_source", "sky_level", "sky_sigma", "gain", "zero_point_source")
    return {
        "saturation": {b.name: b.saturation for b in plan},
        "ingest": {
            "tool": "survey_engine.ingest.ingest_fits",
            **{key: {b.name: getattr(b.image, a) for b in plan} for key, a in image.items()},
            **{f"{k}s": {b.name: getattr(getattr(b, k), "path", None) for b in plan} for k in maps},
            **{key: {b.name: getattr(b, key) for b in plan} for key in model},
            "mask_file_convention": "nonzero -> BAD",
        },
    }


def _copy_band(mosaic: Mosaic, band: _Band, strip: int, bar: tqdm) -> None:
    """Copy one band into the mosaic in row strips of ``strip`` rows."""
    ny, nx = band.image.shape
    with contextlib.ExitStack() as stack:
        hdus = {
            kind: (stack.enter_context(_open_hdu(inp)), inp)
            for kind in ("image", "weight", "variance", "mask")
            if (inp := getattr(band, kind)) is not None
        }
        for y0 in range(0, ny, strip):
            y1 = min(y0 + strip, ny)
            data = {k: _read_strip(*v, y0, y1, as_float=k != "mask") for k, v in hdus.items()}
            image, var, mask = _fill_strip(**data, band=band)
            mosaic.write(band.name, y0, 0, image=image, variance=var, mask=mask)
            bar.update(1)
    logger.info("ingested %s as band %r (%d x %d)", band.image.path, band.name, ny, nx)


# --- inputs ----------------------------------------------------------------------------------
def _per_image(value, name: str, n: int) -> list:
    if value is None:
        return [None] * n
    value = [value] if isinstance(value, str | os.PathLike) else list(value)
    _raise_if(len(value) != n,
              f"{name} has {len(value)} entries but {n} image(s) were given; give one per image")  # fmt: skip
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
    _raise_if(len(value) != n, f"hdu has {len(value)} entries but {n} image(s) were given; "
              "give one per image or one for all")  # fmt: skip
    return value


def _split_ext(path: str) -> tuple[str, int | str | None]:
    """``FILE[EXT]`` → ``(FILE, EXT)`` (EXT an int when all digits); a plain existing path → (path, None)."""
    m = None if os.path.isfile(path) else _EXT_RE.match(path)
    if m and os.path.isfile(m["file"]):
        ext = m["ext"].strip()
        return m["file"], int(ext) if ext.isdigit() else ext
    return path, None


def _describe_hdus(images: list[tuple[int, str, tuple[int, ...]]]) -> str:
    """``1 'CCD1' 60×80, 2 'CCD2' 60×80`` (at most ``_LIST_HDUS`` named)."""
    parts = [
        f"{i}{f' {name!r}' if name else ''} {'×'.join(str(v) for v in shape)}"
        for i, name, shape in images[:_LIST_HDUS]
    ]
    more = [f"… {len(images) - _LIST_HDUS} more"] if len(images) > _LIST_HDUS else []
    return ", ".join(parts + more) or "none"


def _select_hdu(
    hdul: fits.HDUList, hdu: int | str | None, path: str, *, fallback: int | str | None = None
) -> int:
    """Index of the HDU to read: ``hdu``, else the only image HDU, else ``fallback``, else refuse."""
    images = []  # (index, EXTNAME, shape) of every HDU that holds image data
    for i, h in enumerate(hdul):
        if getattr(h, "is_image", False) and h.header.get("NAXIS", 0) > 0:
            shape = tuple(int(v) for v in h.shape)
            if shape and math.prod(shape) > 0:
                images.append((i, str(h.name or ""), shape))
    if hdu is None and len(images) > 1 and fallback is not None:
        hdu = fallback
    if hdu is not None:
        try:
            index = hdul.index(hdul[hdu])
        except (KeyError, IndexError):
            msg = f"{path} has no HDU {hdu!r} ({len(hdul)} HDUs; image HDUs: {_describe_hdus(images)})"
            raise ValueError(msg) from None
        _raise_if(index not in {i for i, _, _ in images}, f"HDU {hdu!r} of {path} holds no image "
                  f"data ({type(hdul[index]).__name__}); its image HDUs: {_describe_hdus(images)}")  # fmt: skip
        return index
    _raise_if(not images, f"{path} has no HDU with image data")
    _raise_if(len(images) > 1, f"{path} has {len(images)} image HDUs ({_describe_hdus(images)}): "
              "choose one with --hdu INDEX|EXTNAME (hdu= in Python) or FILE[EXTNAME]")  # fmt: skip
    return images[0][0]


def _inspect(
    path: str, hdu: int | str | None, kind: str, *, fallback: int | str | None = None
) -> _Input:
    """Read the header and shape of the image HDU of ``path``; warn once on bad cards."""
    notes: list[str] = []
    try:
        with (
            _quiet_fits(path, notes),
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
    cube = len(shape) == 3 and shape[0] == 1
    _raise_if(not cube and len(shape) != 2, f"{path} (HDU {index}) has {len(shape)}-D data of "
              f"shape {shape}; expected a 2-D image (or a 3-D cube with a leading axis of length 1)")  # fmt: skip
    shape = shape[1:] if cube else shape
    if dropped:
        what = f"dropped {len(dropped)} invalid or non-standard FITS header card(s), first: "
        warnings.warn(f"{path}: {what}{dropped[0]!r}", IngestWarning, stacklevel=3)
    elif notes:
        what = f"non-standard FITS file tolerated ({len(notes)} note(s)), first: "
        warnings.warn(f"{path}: {what}{notes[0]}", IngestWarning, stacklevel=3)
    scaled = header.get("BSCALE", 1) != 1 or header.get("BZERO", 0) != 0
    scaled = scaled or (bitpix > 0 and "BLANK" in header)  # astropy scales: no memory map
    logger.debug("%s: %s read from HDU %d %r, shape %s", path, kind, index, extname, shape)
    return _Input(path, index, extname, shape, cube, header, primary, memmap=not scaled)


def _inspect_aux(
    spec: str | None, image: _Input, kind: str, image_hdu: int | str | None
) -> _Input | None:
    """Inspect a weight/variance/mask file at its ``[EXT]``, its only image HDU, or its image's."""
    if spec is None:
        return None
    path, ext = _split_ext(spec)
    inp = _inspect(path, ext, f"{kind} map", fallback=image_hdu)
    _raise_if(os.path.abspath(inp.path) == os.path.abspath(image.path) and inp.hdu == image.hdu,
              f"{kind} map {spec} is HDU {inp.hdu} of {path}, the image itself; name its HDU as "
              f"{path}[EXTNAME]")  # fmt: skip
    _raise_if(inp.shape != image.shape, f"{kind} map {inp.path} has shape {inp.shape} but its "
              f"image {image.path} has shape {image.shape}")  # fmt: skip
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
    """The input's HDU, open (astropy's warnings while parsing it logged, not raised)."""
    with contextlib.ExitStack() as stack:
        with _quiet_fits(inp.path, []):
            opened = fits.open(inp.path, memmap=inp.memmap, ignore_missing_end=True)
            h = stack.enter_context(opened)[inp.hdu]
            _ = h.header
        yield h


def _read_strip(h, inp: _Input, y0: int, y1: int, *, as_float: bool = True) -> np.ndarray:
    """Rows ``y0:y1`` of an HDU: native float32 (one copy of big-endian data), or raw (masks)."""
    data = h.section[0, y0:y1] if inp.cube else h.section[y0:y1]
    return np.array(data, dtype=np.float32) if as_float else np.asarray(data)


def _band_names(inputs: list[_Input], bands: list[str] | None) -> list[str]:
    """``bands``, else each BAND or FILTER keyword (first word), else ``b<i>``; checked unique."""
    if bands is not None:
        origin, names = "bands", list(bands)
    else:
        origin, names = "the BAND/FILTER header keywords", []
        for i, inp in enumerate(inputs):
            found = [v for v in map(inp.keyword, ("BAND", "FILTER")) if isinstance(v, str)]
            found = [v.split()[0] for v in found if v.strip()]
            names.append(found[0] if found else f"b{i}")
    for i, name in enumerate(names):
        _raise_if(not name.strip(), f"empty band name for {inputs[i].path}")
        _raise_if(name in names[:i], f"duplicate band {name!r} (from {origin}) for "
                  f"{inputs[names.index(name)].path} and {inputs[i].path}; pass distinct names "
                  "with bands=[...]")  # fmt: skip
    return names


def _as_float(value: Any) -> float | None:
    """A header value as a finite float, else None (booleans included)."""
    if not isinstance(value, bool) and value is not None:
        with contextlib.suppress(TypeError, ValueError):
            value = float(value)
            return value if math.isfinite(value) else None
    return None


def _keyword_float(inp: _Input, keys: Sequence[str]) -> float | None:
    """The first of ``keys`` with a finite number in the HDU's header, else in the primary's."""
    values = (_as_float(header.get(key)) for _, header in inp.headers() for key in keys)
    return next((v for v in values if v is not None), None)


def _header_zero_point(inp: _Input, band: str) -> tuple[float | None, str | None]:
    """Zero point of ``inp`` from its headers, and where it came from (``"header:MAGZERO"``)."""
    for where, header in inp.headers():
        for key in _ZP_KEYS:
            value = _as_float(header.get(key))
            if value is not None:
                log = "%s: band %r zero point %.4f from %s %s"
                logger.info(log, inp.path, band, value, where, key)
                return value, f"{where}:{key}"
        flux0 = _as_float(header.get(_FLUXMAG0_KEY))
        if flux0 is not None and flux0 > 0:
            value = 2.5 * math.log10(flux0)
            log = "%s: band %r zero point %.4f = 2.5 log10(%s %s = %.6g)"
            logger.info(log, inp.path, band, value, where, _FLUXMAG0_KEY, flux0)
            return value, f"{where}:{_FLUXMAG0_KEY}"
        unit = header.get("BUNIT")
        if isinstance(unit, str) and _NANOMAGGY_RE.match(unit):
            log = "%s: band %r zero point %.1f from %s BUNIT = %r (nanomaggies)"
            logger.info(log, inp.path, band, NANOMAGGY_ZERO_POINT, where, unit)
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
        if not _AXIS3_RE.match(card.keyword):
            header.append(card, useblanks=False, end=True)
    if "WCSAXES" in header:
        header["WCSAXES"] = 2
    header["NAXIS"] = 2
    return header


def _celestial_wcs(inp: _Input) -> WCS | None:
    """The input's 2-D celestial WCS, else None with a warning."""
    try:
        with _quiet_fits(inp.path, []):
            wcs = WCS(_wcs_header(inp), relax=True)
    except Exception as err:  # any WCS failure means "no usable WCS"
        msg = f"{inp.path}: unusable WCS ({err}); ingested without WCS"
        warnings.warn(msg, IngestWarning, stacklevel=3)
        return None
    if wcs.naxis != 2 or not wcs.has_celestial:
        ctype = [inp.header.get(f"CTYPE{k}") for k in (1, 2)]
        msg = f"{inp.path}: no 2-D celestial WCS in the header (CTYPE = {ctype}); pixel coordinates only"
        warnings.warn(msg, IngestWarning, stacklevel=3)
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
        _raise_if(not offset <= WCS_TOLERANCE_PIX, f"WCS of {inp.path} differs from that of "
                  f"{ref.path} by {offset:.3g} pixel (> {WCS_TOLERANCE_PIX}); images of shape "
                  f"{ref.shape} must be registered")  # fmt: skip


# --- pixels ----------------------------------------------------------------------------------
def _estimate_sky(
    inp: _Input, mask_inp: _Input | None, saturation: float | None, strip: int
) -> tuple[float, float]:
    """3-sigma-clipped median and MAD std of (a row sample of) the image (NaN when empty)."""
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
    values = np.concatenate(sample).astype(np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    _, median, std = sigma_clipped_stats(
        values, sigma=3.0, maxiters=10, cenfunc="median", stdfunc="mad_std"
    )
    return float(median), float(std)


def _fill_strip(
    image: np.ndarray, *, band: _Band, weight: np.ndarray | None = None,
    variance: np.ndarray | None = None, mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Turn input strips of ``band`` into the mosaic's float32 image and variance, uint16 mask."""
    image = np.asarray(image, dtype=np.float32)
    flags = np.zeros(image.shape, dtype=np.uint16)
    finite = np.isfinite(image)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if weight is not None:  # 1 / weight where the weight is finite and > 0, else inf
            weight = np.asarray(weight, dtype=np.float32)
            var = np.full(image.shape, np.inf, dtype=np.float32)
            np.divide(np.float32(1), weight, out=var, where=np.isfinite(weight) & (weight > 0))
        elif variance is not None:
            var = np.array(variance, dtype=np.float32)
        else:
            var = np.full(image.shape, np.float32(band.sky_sigma**2), dtype=np.float32)
            if band.gain is not None:
                source = np.maximum(image - np.float32(band.sky_level), np.float32(0))
                var += np.where(finite, source / np.float32(band.gain), np.float32(0))
        good_var = np.isfinite(var) & (var > 0)
        if band.saturation is not None:
            flags[finite & (image >= band.saturation)] |= np.uint16(MaskBit.SAT)
    if mask is not None:
        flags[mask != 0] |= np.uint16(MaskBit.BAD)
    nodata = ~(finite & good_var)
    flags[nodata] |= np.uint16(MaskBit.NO_DATA)
    image[nodata] = 0
    var[nodata] = np.inf
    return image, var, flags
