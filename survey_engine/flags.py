"""Bit values of the mosaic mask planes: the one definition used everywhere.

The ``mask`` array of a mosaic holds, per band and pixel, an OR of these bits.
Their values are also written into the mosaic's attributes (``mask_bits``) so
that other tools can read a mosaic without importing survey_engine.
"""

from __future__ import annotations

import enum

__all__ = ["MASK_BITS", "MaskBit", "describe_mask_bits"]


class MaskBit(enum.IntFlag):
    """Per-pixel mask bits of a mosaic (uint16)."""

    NO_DATA = 1  #: No valid data: NaN/inf pixel, zero weight, outside the survey footprint.
    SAT = 2  #: Saturated pixel (at or above the image's saturation level).
    EDGE = 4  #: Pixel near the edge of an input image (unreliable).
    BAD = 8  #: Known bad pixel: bad column, hot pixel, cosmic ray, satellite trail.


MASK_BITS: dict[str, int] = {bit.name: int(bit.value) for bit in MaskBit}

#: Bits whose pixels carry no usable signal at all.
UNUSABLE = int(MaskBit.NO_DATA | MaskBit.BAD)


def describe_mask_bits() -> dict[str, str]:
    """Return a ``{name: description}`` mapping of the mask bits.

    Returns
    -------
    dict
        Bit name to one-line description.
    """
    return {"NO_DATA": "no valid data (NaN/inf, zero weight, outside footprint)",
            "SAT": "saturated pixel", "EDGE": "near the edge of an input image",
            "BAD": "known bad pixel (bad column, cosmic ray, trail)"}  # fmt: skip
