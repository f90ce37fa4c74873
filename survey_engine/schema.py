"""The catalog schema: every column's name, dtype, unit and description, and the flag bits.

This module is the single source of truth for the catalog. The engine builds
its output with :func:`catalog_columns`; :mod:`survey_engine.catalog` writes
the units and descriptions into the Parquet metadata and reads them back.

Band-independent columns come from the detection image. Per-band columns are
named ``<band>_<quantity>`` and are measured on the detection footprints and
apertures (forced photometry). ``<band>_flux`` is the best total flux: the flux of a
PSF-convolved exponential + de Vaucouleurs model (:mod:`survey_engine.model_photometry`),
or the Kron flux, flagged ``MODEL_FAILED``, where no model could be fitted; the Kron,
isophotal, aperture, PSF and deblended fluxes keep their own names. ``flux``/``flux_err``
without a prefix are those of the *reference band*: the detection band when one band is
used for detection, the reddest band (last in the mosaic's band order) when bands are
combined.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BAND_INHERITED_FLAGS",
    "FLAG_DESCRIPTIONS",
    "ID_SCHEME",
    "ColumnSpec",
    "Flag",
    "aper_tag",
    "catalog_columns",
    "flag_descriptions",
    "object_ids",
]


class Flag(enum.IntFlag):
    """Per-object bit flags (column ``flags``; per band ``<band>_flags``).

    Each member's description is :data:`FLAG_DESCRIPTIONS` ``[name]`` (stored in every
    catalog's metadata by :func:`flag_descriptions`).
    """

    EDGE = 1
    MASKED = 2
    SATURATED = 4
    BLENDED = 8
    DEBLEND_OVERFLOW = 16
    TRUNCATED = 32
    APERTURE_TRUNCATED = 64
    WINDOW_FAILED = 128
    MODEL_FAILED = 256


#: One line per flag: what it means for the object.
FLAG_DESCRIPTIONS: dict[str, str] = {
    "EDGE": "footprint touches the mosaic edge",
    "MASKED": "footprint (or, per band, the Kron aperture) contains masked / no-data pixels",
    "SATURATED": "footprint contains saturated pixels",
    "BLENDED": "the object's parent was split into several children",
    "DEBLEND_OVERFLOW": "sep's deblending limits were hit: deblending was reduced or skipped",
    "TRUNCATED": "the object could not be measured whole (larger than the largest window tried)",
    "APERTURE_TRUNCATED": "the Kron aperture extends beyond the mosaic",
    "WINDOW_FAILED": "the windowed centroid did not converge; x, y are the isophotal barycentre",
    "MODEL_FAILED": "no model fit (no PSF recorded for the band, too few usable pixels, a "
    "non-finite fit, or a model component as large as its stamp): flux is the Kron flux",
}

#: Catalog-level flags that every band's ``<band>_flags`` inherits.
BAND_INHERITED_FLAGS = int(Flag.EDGE | Flag.SATURATED | Flag.BLENDED)

#: How ``id`` is formed (stored in the catalog metadata).
ID_SCHEME = "y_peak * mosaic_width + x_peak"


def object_ids(y_peak, x_peak, width: int):
    """Object IDs from integer peak pixels (mosaic coordinates): :data:`ID_SCHEME`."""
    return y_peak * width + x_peak


def flag_descriptions() -> dict[str, tuple[int, str]]:
    """``{name: (bit value, description)}`` for every flag."""
    return {f.name: (int(f.value), FLAG_DESCRIPTIONS[f.name]) for f in Flag}


@dataclass(frozen=True)
class ColumnSpec:
    """One catalog column."""

    name: str
    dtype: str
    unit: str | None
    description: str


def aper_tag(r: float) -> str:
    """Column suffix of a circular aperture of radius ``r`` pixels (``3`` → ``3``, ``2.5`` → ``2p5``)."""
    return f"{r:g}".replace(".", "p")


def catalog_columns(
    bands: tuple[str, ...] | list[str],
    apertures: tuple[float, ...],
    *,
    image_unit: str = "count",
    reference_band: str,
) -> list[ColumnSpec]:
    """Ordered column specifications of a catalog.

    Parameters
    ----------
    bands : sequence of str
        Bands measured.
    apertures : tuple of float
        Circular aperture radii (pixels).
    image_unit : str
        Unit of the image plane (fluxes are in this unit).
    reference_band : str
        Band behind the unprefixed ``flux``/``flux_err``.

    Returns
    -------
    list of ColumnSpec
    """
    u = image_unit
    cols = [ColumnSpec(name, dtype, u if unit == "IMG" else unit, desc)
            for name, dtype, unit, desc in _OBJECT_COLUMNS]  # fmt: skip
    i = [c.name for c in cols].index("flux")
    cols[i : i + 2] = [
        ColumnSpec("flux", "float64", u, f"total (model) flux in the reference band ({reference_band}): "
                   f"{reference_band}_flux"),
        ColumnSpec("flux_err", "float64", u, f"1-sigma error of flux ({reference_band})"),
    ]
    for b in bands:
        rows = list(_BAND_COLUMNS[:_N_BEFORE_APERTURES])
        for r in apertures:
            t = aper_tag(r)
            rows += [(f"aper_flux_{t}", "IMG", f"flux in a circle of radius {r:g} pix"),
                     (f"aper_flux_{t}_err", "IMG", f"1-sigma error of aper_flux_{t}")]  # fmt: skip
        rows += _BAND_COLUMNS[_N_BEFORE_APERTURES:]
        cols += [ColumnSpec(f"{b}_{name}", "int64" if name == "flags" else "float64",
                            u if unit == "IMG" else unit, f"{b}: {desc}")
                 for name, unit, desc in rows]  # fmt: skip
    return cols


#: Band-independent columns: name, dtype, unit ("IMG": the image unit), description.
_OBJECT_COLUMNS = [
    ("id", "int64", None, "object ID: y_peak * mosaic_width + x_peak (independent of tiling)"),
    ("parent_id", "int64", None, "ID of the brightest child of the object's parent (= id if isolated)"),
    ("n_children", "int32", None, "number of children of the object's parent (1 = isolated)"),
    ("x", "float64", "pix", "windowed centroid (Gaussian window, SExtractor XWIN), 0-based mosaic "
     "column; pixel centres are integers"),
    ("y", "float64", "pix", "windowed centroid, 0-based mosaic row"),
    ("x_err", "float64", "pix", "1-sigma error of x from the variance plane"),
    ("y_err", "float64", "pix", "1-sigma error of y from the variance plane"),
    ("x_iso", "float64", "pix", "isophotal barycentre, 0-based mosaic column; centre of the Kron "
     "and circular apertures"),
    ("y_iso", "float64", "pix", "isophotal barycentre, 0-based mosaic row"),
    ("x_peak", "int64", "pix", "column of the brightest footprint pixel in the detection image"),
    ("y_peak", "int64", "pix", "row of the brightest footprint pixel in the detection image"),
    ("ra", "float64", "deg", "right ascension of (x, y) from the mosaic WCS"),
    ("dec", "float64", "deg", "declination of (x, y) from the mosaic WCS"),
    ("a", "float64", "pix", "semi-major axis rms of the isophotal light distribution"),
    ("b", "float64", "pix", "semi-minor axis rms"),
    ("theta", "float64", "rad", "position angle of the major axis, from +x towards +y"),
    ("e1", "float64", None, "distortion (Ixx - Iyy) / (Ixx + Iyy) of isophotal moments (PSF-convolved)"),
    ("e2", "float64", None, "distortion 2 Ixy / (Ixx + Iyy)"),
    ("half_light_radius", "float64", "pix", "radius enclosing half the detection-image Kron flux"),
    ("kron_radius", "float64", None, "Kron radius r1 in units of a and b (first moment of the "
     "elliptical radius within 6 a, as sep.kron_radius), without the Kron factor: the Kron "
     "aperture has semi-axes max(2.5 kron_radius, 3.5) × (a, b). SExtractor's KRON_RADIUS "
     "includes the factor (PHOT_AUTOPARAMS 2.5, Rmin: max(2.5 r1, Rmin)), so it is 2.5 × kron_radius"),
    ("area", "int64", "pix2", "number of footprint pixels"),
    ("peak", "float64", "IMG", "background-subtracted detection-image value at the peak pixel"),
    ("flux", "float64", "IMG", "(reference band)"),
    ("flux_err", "float64", "IMG", "(reference band)"),
    ("flags", "int64", None, "OR of Flag bits (see flag descriptions in the metadata)"),
    # -- issue 17: the stamp classifier (survey_engine.classify), on the detection image's
    # 25×25 px stamp around (x_peak, y_peak); morphology of the PSF-deconvolved galaxy model.
    ("p_star", "float32", None, "probability that the object is a star (point source), 0-1, from "
     "the stamp CNN (survey_engine.classify)"),
    ("bulge_fraction", "float32", None, "bulge (de Vaucouleurs) flux fraction of a bulge + "
     "exponential disk galaxy model, from the stamp CNN (meaningless for stars)"),
    ("r_bulge_arcsec", "float32", "arcsec", "bulge half-light radius of the galaxy model, before "
     "the PSF (stamp CNN)"),
    ("r_disk_arcsec", "float32", "arcsec", "disk half-light radius of the galaxy model, before "
     "the PSF (stamp CNN)"),
    ("ellipticity", "float32", None, "|e| = (a² − b²) / (a² + b²) of the galaxy model before the "
     "PSF (stamp CNN)"),
    # -- issue 16: the model fit of the total fluxes (survey_engine.model_photometry), in the
    # reference band; NaN where it failed (flag MODEL_FAILED).
    ("frac_dev", "float32", None, "de Vaucouleurs (bulge) fraction of the fitted exponential + de "
     "Vaucouleurs model (reference band), the weight of the bulge in every band's total flux"),
    ("model_r_exp", "float32", "pix", "half-light radius (√(ab)) of the fitted exponential disk, "
     "before the PSF"),
    ("model_r_dev", "float32", "pix", "half-light radius (√(ab)) of the fitted de Vaucouleurs bulge, "
     "before the PSF"),
    ("model_e1", "float32", None, "distortion e1 = (a² − b²)/(a² + b²) cos 2θ of the fitted model, "
     "before the PSF"),
    ("model_e2", "float32", None, "distortion e2 = (a² − b²)/(a² + b²) sin 2θ of the fitted model"),
]  # fmt: skip

#: Per-band columns (name without the band prefix, unit, description); the apertures' columns
#: are inserted after the first :data:`_N_BEFORE_APERTURES`.
#: ``deblended_flux``, ``deblended_flux_err`` and ``parent_flux`` come from
#: :func:`survey_engine.deblend.rules.deblended_fluxes`.
_BAND_COLUMNS = [
    ("flux", "IMG", "total flux: the amplitude of the PSF-convolved exponential + de Vaucouleurs "
     "model fitted to the object's deblended light (shape and frac_dev from the reference band); "
     "the Kron flux where the fit failed (flag MODEL_FAILED)"),
    ("flux_err", "IMG", "1-sigma error of flux from the variance plane"),
    ("kron_flux", "IMG", "Kron flux (max(2.5 kron_radius, 3.5) × (a, b) ellipse)"),
    ("kron_flux_err", "IMG", "1-sigma error of the Kron flux from the variance plane"),
    ("iso_flux", "IMG", "sum over the footprint pixels"),
    ("iso_flux_err", "IMG", "1-sigma error of the isophotal flux"),
    (
        "deblended_flux",
        "IMG",
        "flux of the object's share of its parent's footprint pixels: each pixel split among "
        "the parent's children by their symmetric templates (weights summing to 1), so the "
        "children's deblended fluxes add up to parent_flux; the parent's flux if isolated",
    ),
    ("deblended_flux_err", "IMG", "1-sigma error of deblended_flux, sqrt(sum of w^2 variance)"),
    ("parent_flux", "IMG", "sum over the footprint pixels of the object's parent"),
    ("psf_flux", "IMG", "PSF flux: amplitude of the band's PSF at the model's centre fitted to the "
     "object's deblended light (the total flux of a point source); NaN without a PSF"),
    ("psf_flux_err", "IMG", "1-sigma error of psf_flux"),
    ("exp_flux", "IMG", "exponential-disk flux of the best non-negative combination of the fitted "
     "disk and bulge templates in this band"),
    ("dev_flux", "IMG", "de Vaucouleurs-bulge flux of that combination (exp_flux + dev_flux ≈ flux)"),
    ("flux_njy", "nJy", "total flux in nJy (NaN when no zero point)"),
    ("flux_njy_err", "nJy", "1-sigma error of the flux in nJy"),
    ("mag", "mag(AB)", "AB magnitude of the total flux (NaN if flux ≤ 0)"),
    ("mag_err", "mag(AB)", "1-sigma magnitude error"),
    ("flags", None, "Flag bits of this band's measurement"),
]


_N_BEFORE_APERTURES = 6


def empty_columns(specs: list[ColumnSpec]) -> dict[str, np.ndarray]:
    """Zero-length arrays for every column (for tiles without objects)."""
    return {c.name: np.zeros(0, dtype=c.dtype) for c in specs}
