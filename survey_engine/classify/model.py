"""The stamp classifier: one small CNN with two heads (star logit; bulge + disk morphology).

:func:`classify_stamps` is the pure kernel (no Dask, no I/O): ``(N, 2, S, S)`` stamps of
background-subtracted image and variance in, per-object arrays out. The network always runs
on fixed-size chunks of :data:`CHUNK` stamps (the last one padded with empty stamps), so an
object's values depend only on its own stamp, never on how many or which other objects
were classified with it (tiling invariance; numpy and torch backends give the same bits).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["CHECKPOINT_FORMAT", "CHUNK", "DEFAULT_WEIGHTS", "MORPHOLOGY", "OUTPUT_COLUMNS",
           "StampNet", "cached_model", "check_model", "classify_stamps", "default_model", "load_model",
           "normalise_stamps", "save_model"]  # fmt: skip

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "survey_engine.classify/1"
DEFAULT_WEIGHTS = Path(__file__).with_name("weights") / "default.pt"
#: Stamps per network call (the last chunk of a call is padded to this size).
CHUNK = 64
#: Regression outputs, in head order.
MORPHOLOGY = ("bulge_fraction", "r_bulge_arcsec", "r_disk_arcsec", "ellipticity")
#: Keys of :func:`classify_stamps`' result.
OUTPUT_COLUMNS = ("p_star", *MORPHOLOGY)
#: Largest |e| the ellipticity head can give (the simulator's ``MAX_ELLIPTICITY``).
MAX_E = 0.7
#: Input clipping of the peak-normalised image channel.
CLIP = (-3.0, 30.0)

_DEFAULT_CONFIG = {"stamp": 25, "width": 16, "hidden": 64, "pixel_scale": 0.2, "psf_fwhm": 0.7}


class StampNet(nn.Module):
    """Conv net on ``(N, 2, S, S)`` normalised stamps → ``(N, 5)``: star logit, morphology.

    Parameters
    ----------
    config : dict
        ``stamp`` (side, px), ``width`` (channels of the first layer), ``hidden`` (dense
        units), and the ``pixel_scale`` / ``psf_fwhm`` (arcsec) it was trained for.
    """

    def __init__(self, config: dict | None = None):
        super().__init__()
        self.config = {**_DEFAULT_CONFIG, **(config or {})}
        w, s = int(self.config["width"]), int(self.config["stamp"])
        self.features = nn.Sequential(
            nn.Conv2d(2, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        side = s // 8
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * side * side, int(self.config["hidden"])),
                                  nn.ReLU(), nn.Linear(int(self.config["hidden"]), 5))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw outputs: star logit, then the morphology pre-activations."""
        return self.head(self.features(x))


def decode(raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """Physical values of the raw outputs (sigmoids; radii as exp of log-arcsec)."""
    return {
        "p_star": torch.sigmoid(raw[:, 0]),
        "bulge_fraction": torch.sigmoid(raw[:, 1]),
        "r_bulge_arcsec": torch.exp(raw[:, 2].clamp(-6.0, 3.0)),
        "r_disk_arcsec": torch.exp(raw[:, 3].clamp(-6.0, 3.0)),
        "ellipticity": MAX_E * torch.sigmoid(raw[:, 4]),
    }


def normalise_stamps(stamps: torch.Tensor) -> torch.Tensor:
    """Network input of ``(N, 2, S, S)`` image/variance stamps (float32 torch).

    Channel 0 is the image divided by ``max(centre pixel, its σ)`` and clipped to
    :data:`CLIP`, 0 where the variance is not finite and positive (no data, outside the
    window or mosaic); channel 1 is the constant ``log10(max(S/N of the centre pixel, 1)) / 2``.
    """
    img, var = stamps[:, 0], stamps[:, 1]
    good = torch.isfinite(var) & (var > 0) & torch.isfinite(img)
    img = torch.where(good, img, torch.zeros_like(img))
    c = img.shape[-1] // 2
    v0 = img[:, c, c]
    s0 = torch.sqrt(torch.where(good[:, c, c], var[:, c, c], torch.ones_like(v0)))
    norm = torch.maximum(v0, s0)
    x0 = (img / norm[:, None, None]).clamp(*CLIP)
    snr = torch.log10(torch.clamp(v0 / s0, min=1.0)) / 2.0
    x1 = snr[:, None, None].expand_as(x0)
    return torch.stack([x0, x1], dim=1).to(torch.float32)


def _check_stamps(stamps, size: int) -> None:
    shape = tuple(stamps.shape)
    if len(shape) != 4 or shape[1] != 2 or shape[2] != size or shape[3] != size:
        msg = (f"stamps must have shape (N, 2, {size}, {size}) (image and variance planes), "
               f"got {shape}")  # fmt: skip
        raise ValueError(msg)


def classify_stamps(stamps: torch.Tensor | np.ndarray, model: StampNet,
                    pixel_scale: float | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Star probability and bulge + disk morphology of every stamp (batched, float32).

    Parameters
    ----------
    stamps : torch.Tensor or numpy.ndarray
        ``(N, 2, S, S)``: background-subtracted image and variance, centred on each object's
        peak pixel (variance inf where there is no data); ``S`` = ``model.config["stamp"]``.
        A tensor is classified on its device.
    model : StampNet
        The network (:func:`default_model`).
    pixel_scale : float, optional
        Arcsec per pixel of the stamps. The network gives radii in arcsec at the pixel scale
        it was trained for (``model.config["pixel_scale"]``); with a different
        ``pixel_scale`` they are rescaled by ``pixel_scale / config["pixel_scale"]`` (the same
        radius in pixels). None: the stamps have the model's pixel scale.

    Returns
    -------
    dict of numpy.ndarray
        float32 arrays of length N: ``p_star`` (0–1), ``bulge_fraction``,
        ``r_bulge_arcsec``, ``r_disk_arcsec``, ``ellipticity`` (|e| = (a²−b²)/(a²+b²)).

    Raises
    ------
    ValueError
        ``stamps`` is not ``(N, 2, S, S)``.
    """
    size = int(model.config["stamp"])
    _check_stamps(stamps, size)
    t = torch.as_tensor(stamps)
    n = int(t.shape[0])
    if n == 0:
        return {k: np.zeros(0, np.float32) for k in OUTPUT_COLUMNS}
    dev = next(model.parameters()).device
    t = t.to(device=dev, dtype=torch.float32)
    x = normalise_stamps(t)
    pad = (-n) % CHUNK
    if pad:
        x = torch.cat([x, torch.zeros((pad, *x.shape[1:]), dtype=x.dtype, device=x.device)])
    outs = []
    with torch.inference_mode(), _no_tf32(dev):
        for i in range(0, len(x), CHUNK):
            outs.append(model(x[i : i + CHUNK]))
    vals = decode(torch.cat(outs)[:n])
    res = {k: vals[k].float().cpu().numpy() for k in OUTPUT_COLUMNS}
    trained = float(model.config.get("pixel_scale", 0.2))
    if pixel_scale is not None and float(pixel_scale) != trained:
        if not float(pixel_scale) > 0:
            msg = f"pixel_scale must be positive arcsec per pixel, got {pixel_scale!r}"
            raise ValueError(msg)
        f = np.float32(float(pixel_scale) / trained)
        for k in ("r_bulge_arcsec", "r_disk_arcsec"):
            res[k] = res[k] * f
    return res


@contextlib.contextmanager
def _no_tf32(device: torch.device):
    """Float32 convolutions and matmuls on CUDA (TF32 off), so the GPU values stay close to CPU's."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def save_model(model: StampNet, path: str | os.PathLike, *, info: dict | None = None) -> Path:
    """Write the network's weights (float32), configuration and ``info`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().float() for k, v in model.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "config": model.config, "state": state,
                "info": info or {}}, path)  # fmt: skip
    return path


def load_model(path: str | os.PathLike | None = None, device: str = "cpu") -> StampNet:
    """Load a checkpoint written by :func:`save_model` (None: the shipped weights)."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.exists():
        msg = f"classifier weights not found: {path}"
        raise FileNotFoundError(msg)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        msg = f"{path} is not a survey_engine classifier checkpoint ({CHECKPOINT_FORMAT})"
        raise ValueError(msg)
    model = StampNet(ck["config"])
    model.load_state_dict(ck["state"])
    model.info = ck.get("info", {})
    return model.to(device).eval()


@functools.cache
def default_model(device: str = "cpu") -> StampNet:
    """The shipped classifier on ``device``, loaded once per process."""
    return load_model(None, device)


@functools.lru_cache(maxsize=4)
def cached_model(path: str | None, device: str = "cpu") -> StampNet:
    """The checkpoint ``path`` (None: the shipped model) on ``device``, loaded once per process."""
    return default_model(device) if path is None else load_model(path, device)


def check_model(path: str | os.PathLike | None, name: str = "classifier_model (--classifier-model)") -> None:
    """ValueError naming the parameter ``name`` unless ``path`` is None or a loadable checkpoint."""
    if path is None:
        return
    try:
        model = cached_model(str(path), "cpu")
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        msg = f"{name}: {err}"
        raise ValueError(msg) from None
    from .stamps import STAMP_SIZE

    if int(model.config["stamp"]) != STAMP_SIZE:
        msg = f"{name}: the engine cuts {STAMP_SIZE}-pixel stamps, the checkpoint takes {model.config['stamp']!r}"
        raise ValueError(msg)


def parameter_count(model: StampNet) -> int:
    """Number of trainable parameters."""
    return sum(int(math.prod(p.shape)) for p in model.parameters())
