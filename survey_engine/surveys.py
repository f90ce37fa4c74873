"""Observing conditions of a survey for the simulated training sets of the two networks.

``survey-engine train`` (U-Net deblender) and ``survey-engine train-classifier`` (stamp
classifier) simulate their training data under one survey's conditions: pixel scale, r-band
PSF FWHM(s) and r-band 5σ point-source depth. :data:`SURVEYS` holds the presets (``lsst``:
the shipped models' conditions; ``sdss``: an SDSS-like survey); :func:`resolve_conditions`
applies explicit overrides. The magnitude ranges of the simulated objects follow the depth
(they keep the preset's offsets from it, the U-Net's no brighter than the simulator's
population, 18 mag), so a shallower survey is trained on brighter objects.
Transfer to another survey: ``docs/unet.md`` and ``docs/classify.md``, sections "Transfer".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

__all__ = ["SURVEYS", "SurveyConditions", "parse_fwhms", "resolve_conditions"]

logger = logging.getLogger(__name__)

#: Brightest r magnitude of the simulator's galaxy and star populations (the U-Net library's
#: objects come from them; ``survey_engine.simulate._scene.BRIGHT_LIMIT``).
BRIGHT_LIMIT = 18.0


@dataclass(frozen=True)
class SurveyConditions:
    """A survey's conditions, as the training-set simulators take them.

    Attributes
    ----------
    name : str
        Preset name, or ``custom`` after overrides.
    pixel_scale : float
        Arcsec per pixel.
    psf_fwhm : tuple of float
        r-band PSF FWHMs (arcsec): the U-Net's conditions; the classifier draws its FWHM
        uniformly in ``[min, max]`` (``classify_fwhm_spread`` widens a single value).
    depth : float
        r-band 5σ point-source depth (AB mag) of the U-Net's set; the classifier's depth is
        uniform in ``depth ± classify_depth_spread``.
    unet_stamp : int
        U-Net training stamp side (pixels, a multiple of 8).
    unet_mag_range, classify_mag_range : (float, float)
        r-band magnitude ranges of the simulated objects.
    classify_fwhm_spread : float
        Half width (arcsec) of the classifier's FWHM range around a single FWHM.
    classify_depth_offsets : (float, float)
        The classifier's depth range relative to ``depth`` (mag).
    classify_psf : (float, float) or None
        The classifier's FWHM range when it is not ``psf_fwhm``'s (``lsst``: the shipped
        model's 0.64–0.76″); reset by a ``psf_fwhm`` override.
    """

    name: str
    pixel_scale: float
    psf_fwhm: tuple[float, ...]
    depth: float
    unet_stamp: int = 64
    unet_mag_range: tuple[float, float] = (19.0, 27.0)
    classify_mag_range: tuple[float, float] = (17.5, 26.0)
    classify_fwhm_spread: float = 0.06
    classify_depth_offsets: tuple[float, float] = (-0.4, 0.6)
    classify_psf: tuple[float, float] | None = None

    @property
    def classify_psf_range(self) -> tuple[float, float]:
        """The classifier's uniform FWHM range (arcsec)."""
        if self.classify_psf is not None:
            return tuple(self.classify_psf)
        lo, hi = min(self.psf_fwhm), max(self.psf_fwhm)
        if lo == hi:
            lo, hi = max(lo - self.classify_fwhm_spread, 0.05), hi + self.classify_fwhm_spread
        return (round(lo, 6), round(hi, 6))

    @property
    def classify_depth_range(self) -> tuple[float, float]:
        """The classifier's uniform depth range (AB mag)."""
        lo, hi = self.classify_depth_offsets
        return (round(self.depth + lo, 6), round(self.depth + hi, 6))

    def unet_options(self) -> dict:
        """Keywords of :func:`survey_engine.unet.data.generate_training_set`."""
        return {"pixel_scale": self.pixel_scale, "psf_fwhm": self.psf_fwhm, "depth": self.depth,
                "stamp": self.unet_stamp, "mag_range": self.unet_mag_range}  # fmt: skip

    def classify_options(self) -> dict:
        """Keywords of :func:`survey_engine.classify.data.make_stamps`."""
        return {"pixel_scale": self.pixel_scale, "psf_fwhm_range": self.classify_psf_range,
                "depth_range": self.classify_depth_range, "mag_range": self.classify_mag_range}  # fmt: skip

    def to_dict(self) -> dict:
        """JSON-serialisable form (recorded in the checkpoints)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


#: Presets. ``lsst``: the conditions of the shipped models (0.2″/px, FWHM 0.6/0.75/0.9″ and
#: depth 26.8 for the U-Net, 0.64–0.76″ and 26.4–27.4 for the classifier). ``sdss``: 0.396″/px, seeing
#: 1.2–1.6″ (median 1.4″), r-band 5σ depth 22.5 (SDSS DR7 quotes 22.2 at 95 %
#: completeness for point sources; 5σ point-source depth ≈ 22.5); the U-Net stamps are 32 px
#: (12.7″, the 64 px of ``lsst``'s 0.2″ pixels), its objects 18–22.7 mag (the simulator's
#: population starts at 18), the classifier's 13.5–21.6 (``lsst``'s offsets from the depth).
SURVEYS: dict[str, SurveyConditions] = {
    "lsst": SurveyConditions("lsst", 0.2, (0.6, 0.75, 0.9), 26.8, classify_psf=(0.64, 0.76)),
    "sdss": SurveyConditions("sdss", 0.396, (1.2, 1.4, 1.6), 22.5, unet_stamp=32,
                             unet_mag_range=(18.0, 22.7), classify_mag_range=(13.5, 21.6),
                             classify_depth_offsets=(-0.3, 0.3)),
}  # fmt: skip


def parse_fwhms(value: str | float | Sequence[float] | None) -> tuple[float, ...] | None:
    """PSF FWHMs from ``"1.2,1.4"``, a number or a sequence (None stays None).

    Raises
    ------
    ValueError
        A value that is not a number in (0, 10) arcsec.
    """
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int | float) else value
    out = []
    for item in items:
        try:
            f = float(item)
        except (TypeError, ValueError):
            f = float("nan")
        if not 0 < f < 10:
            msg = f"psf_fwhm must be comma-separated FWHMs in arcsec, each in (0, 10), got {value!r}"
            raise ValueError(msg)
        out.append(f)
    if not out:
        msg = f"psf_fwhm must give at least one FWHM, got {value!r}"
        raise ValueError(msg)
    return tuple(out)


def resolve_conditions(
    survey: str | None = None, *, pixel_scale: float | None = None,
    psf_fwhm: str | float | Sequence[float] | None = None, depth: float | None = None,
) -> SurveyConditions:  # fmt: skip
    """A preset (default ``lsst``) with the given conditions overriding it.

    Parameters
    ----------
    survey : {"lsst", "sdss"}, optional
        Preset.
    pixel_scale : float, optional
        Arcsec per pixel, in (0, 5].
    psf_fwhm : str, float or sequence of float, optional
        r-band FWHM(s) in arcsec (``"1.2,1.4,1.6"``).
    depth : float, optional
        r-band 5σ point-source depth (AB), in [15, 32]; the magnitude ranges shift with it.

    Returns
    -------
    SurveyConditions

    Raises
    ------
    ValueError
        An unknown preset or a value out of range.
    """
    name = "lsst" if survey is None else str(survey).lower()
    if name not in SURVEYS:
        msg = f"survey must be one of {sorted(SURVEYS)}, got {survey!r}"
        raise ValueError(msg)
    c = SURVEYS[name]
    changes: dict = {}
    if pixel_scale is not None:
        if not (isinstance(pixel_scale, int | float) and 0 < pixel_scale <= 5):
            msg = f"pixel_scale must be in (0, 5] arcsec per pixel, got {pixel_scale!r}"
            raise ValueError(msg)
        changes["pixel_scale"] = float(pixel_scale)
    fwhms = parse_fwhms(psf_fwhm)
    if fwhms is not None:
        changes["psf_fwhm"] = fwhms
        changes["classify_psf"] = None
    if depth is not None:
        if not (isinstance(depth, int | float) and math.isfinite(depth) and 19 <= depth <= 32):
            msg = f"depth must be an r-band 5-sigma depth in [19, 32] AB mag, got {depth!r}"
            raise ValueError(msg)
        shift = float(depth) - c.depth
        changes["depth"] = float(depth)
        m0, m1 = (round(m + shift, 6) for m in c.unet_mag_range)
        changes["unet_mag_range"] = (max(m0, BRIGHT_LIMIT), m1)
        changes["classify_mag_range"] = tuple(round(m + shift, 6) for m in c.classify_mag_range)
    if changes:
        c = replace(c, name="custom" if survey is None and name == "lsst" else f"{name}+custom", **changes)
    logger.debug("survey conditions: %s", c)
    return c
