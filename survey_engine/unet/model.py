"""The U-Net of the ``unet`` deblender: architecture, receptive field, checkpoints (pure torch).

Local operations only, so the output at a pixel depends on the input within
:func:`receptive_radius` of it and on its position modulo ``2^levels``: what makes the tiled
inference of :mod:`survey_engine.unet.infer` window-independent. A checkpoint is a
``torch.save`` of a plain dict (``format``, ``config``, ``state_dict``, ``info``; loadable with
``weights_only=True``). Architecture, receptive field and checkpoint format: ``docs/unet.md``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CHECKPOINT_FORMAT", "DEFAULT_CONFIG", "DEFAULT_WEIGHTS", "UNet", "load_model", "model_pad",
    "normalise_input", "receptive_radius", "save_model",
]  # fmt: skip

logger = logging.getLogger(__name__)

#: Format tag stored in every checkpoint.
CHECKPOINT_FORMAT = "survey_engine.unet/1"
#: The weights shipped with the package (``load_model(None)``).
DEFAULT_WEIGHTS = Path(__file__).with_name("weights") / "default.pt"
#: Names of the output channels, in order.
OUTPUTS = ("foreground", "centre", "offset_y", "offset_x")

#: Default configuration of a new model: architecture, input normalisation, targets.
DEFAULT_CONFIG: dict[str, Any] = {
    "in_channels": 1,
    "levels": 3,
    "base_channels": 16,
    "convs": 2,
    "outputs": list(OUTPUTS),
    "offset_scale": 8.0,
    # Input: significance image (background-subtracted image / sqrt(variance)), masked
    # pixels 0, then softening * asinh(significance / softening).
    "normalisation": {"kind": "asinh_significance", "softening": 5.0},
    # Targets (see survey_engine.unet.data): filled in from the training set.
    "target": {},
    # Inference defaults (tuned on the validation set by train()).
    "inference": {"foreground_threshold": 0.5, "centre_threshold": 0.3},
}


def _block(cin: int, cout: int, convs: int) -> nn.Sequential:
    """``convs`` × (3×3 convolution without bias, BatchNorm, ReLU)."""
    layers: list[nn.Module] = []
    for i in range(convs):
        conv = nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False)
        layers += [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _check_config(config: dict) -> dict:
    """:data:`DEFAULT_CONFIG` updated with ``config`` (dicts merged), validated."""
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    unknown = set(config) - set(cfg)
    if unknown:
        msg = f"unknown U-Net config keys {sorted(unknown)}; known: {sorted(cfg)}"
        raise ValueError(msg)
    for key, value in config.items():
        merge = isinstance(cfg[key], dict) and isinstance(value, dict)
        cfg[key] = {**cfg[key], **copy.deepcopy(value)} if merge else copy.deepcopy(value)
    for key in ("in_channels", "levels", "base_channels", "convs"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            msg = f"U-Net {key} must be a positive integer, got {v!r}"
            raise ValueError(msg)
    if cfg["levels"] > 6:
        msg = f"U-Net levels must be at most 6, got {cfg['levels']!r}"
        raise ValueError(msg)
    if list(cfg["outputs"]) != list(OUTPUTS):
        msg = f"U-Net outputs must be {list(OUTPUTS)}, got {cfg['outputs']!r}"
        raise ValueError(msg)
    norm = cfg["normalisation"]
    if norm.get("kind") != "asinh_significance" or not float(norm.get("softening", 0)) > 0:
        msg = f"unsupported input normalisation {norm!r}"
        raise ValueError(msg)
    return cfg


class UNet(nn.Module):
    """A small U-Net for foreground, centre heatmap and centre offsets.

    Parameters
    ----------
    config : dict, optional
        Overrides of :data:`DEFAULT_CONFIG` (``levels``, ``base_channels``,
        ``convs``, ``in_channels``, ``normalisation``, ``target``, ``inference``, …).

    Attributes
    ----------
    config : dict
        The full configuration (stored in checkpoints).
    """

    def __init__(self, config: dict | None = None):
        super().__init__()
        self.config = _check_config(config or {})
        levels, convs = self.config["levels"], self.config["convs"]
        ch = [self.config["base_channels"] * 2**i for i in range(levels + 1)]
        cin = [self.config["in_channels"], *ch[:-1]]  # input channels of each encoder
        self.encoders = nn.ModuleList(_block(cin[i], ch[i], convs) for i in range(levels))
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _block(ch[-2], ch[-1], convs)
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2) for i in range(levels)
        )
        self.decoders = nn.ModuleList(_block(2 * ch[i], ch[i], convs) for i in range(levels))
        self.head = nn.Conv2d(ch[0], len(OUTPUTS), 1)
        with torch.no_grad():  # priors: ~10 % foreground, ~1 % centres (focal-loss practice)
            self.head.bias.copy_(torch.tensor([-2.2, -4.6, 0.0, 0.0]))

    @property
    def alignment(self) -> int:
        """Input sizes and tile offsets must be multiples of this (``2^levels``)."""
        return 2 ** self.config["levels"]

    @property
    def n_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw outputs ``(B, 4, H, W)``: foreground logit, centre logit, offset / offset_scale.

        Parameters
        ----------
        x : torch.Tensor
            ``(B, in_channels, H, W)`` normalised input (:func:`normalise_input`);
            ``H`` and ``W`` multiples of :attr:`alignment`.
        """
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for i in reversed(range(len(self.ups))):
            x = self.ups[i](x)
            x = self.decoders[i](torch.cat([x, skips[i]], dim=1))
        return self.head(x)


def normalise_input(significance: torch.Tensor, config: dict) -> torch.Tensor:
    """The network input from a significance image: ``s · asinh(significance / s)``.

    Parameters
    ----------
    significance : torch.Tensor
        Background-subtracted image divided by the square root of its variance,
        0 where the pixel is masked.
    config : dict
        Model configuration (its ``normalisation`` entry).

    Returns
    -------
    torch.Tensor
        Same shape, float32.
    """
    s = float(config["normalisation"]["softening"])
    return s * torch.asinh(significance.float() / s)


def receptive_radius(config: dict) -> int:
    """Largest distance (pixels, Chebyshev) from an output pixel to an input pixel it depends on.

    Computed exactly from the architecture by propagating, for every alignment of
    the output pixel on the pooling grid, the interval of indices each layer needs
    (3×3 convolutions widen it by one cell of their level, 2×2 pooling maps cell
    ``j`` to ``2j, 2j+1``, the stride-2 transposed convolution maps ``i`` to ``i // 2``,
    skip connections take the union).

    Parameters
    ----------
    config : dict
        Model configuration.

    Returns
    -------
    int
    """
    cfg = _check_config(config)
    levels, r = cfg["levels"], cfg["convs"]  # each 3x3 conv widens by one cell
    worst = 0
    for p in range(2**levels):
        lo = hi = p
        skip = []
        for _ in range(levels):  # decoder blocks, level 0 upwards
            lo, hi = lo - r, hi + r
            skip.append((lo, hi))
            lo, hi = lo // 2, hi // 2  # transposed conv k=2, s=2
        lo, hi = lo - r, hi + r  # bottleneck
        need = (2 * lo, 2 * hi + 1)  # its input = pool(encoder output one level down)
        for level in reversed(range(levels)):
            lo = min(need[0], skip[level][0]) - r
            hi = max(need[1], skip[level][1]) + r
            need = (2 * lo, 2 * hi + 1)
        worst = max(worst, p - lo, hi - p)
    return int(worst)


def model_pad(model: UNet | dict) -> int:
    """Pixels beyond an object that influence its detection by the ``unet`` deblender.

    The receptive radius of the network plus one pixel for the 3×3 peak search on
    the centre map. A footprint whose bounding box lies at least ``model_pad + 1``
    pixels inside the read window (so its 8-neighbours are covered too) is found
    identically in every window.

    Parameters
    ----------
    model : UNet or dict
        The model or its configuration.

    Returns
    -------
    int
    """
    config = model.config if isinstance(model, UNet) else model
    return receptive_radius(config) + 1


def save_model(model: UNet, path: str | os.PathLike, *, info: dict | None = None) -> Path:
    """Write a checkpoint (config + weights + training record).

    Parameters
    ----------
    model : UNet
    path : str or path-like
        Output ``.pt`` file (parent directories are created).
    info : dict, optional
        JSON-like training record (samples, epochs, metrics, dataset attributes…);
        values JSON cannot hold are stored as strings.

    Returns
    -------
    pathlib.Path
    """
    if not isinstance(model, UNet):
        msg = f"model must be a survey_engine.unet.UNet, got {type(model).__name__}"
        raise TypeError(msg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": state,
        # Plain JSON types only, so that the checkpoint loads with weights_only=True.
        "info": json.loads(json.dumps(info or {}, default=str)),
        "config": json.loads(json.dumps(model.config)),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    logger.info("saved U-Net (%d parameters) to %s", model.n_parameters, path)
    return path


def load_model(
    path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu"
) -> UNet:
    """Load a checkpoint written by :func:`save_model` (eval mode).

    Parameters
    ----------
    path : str or path-like, optional
        Checkpoint file; None loads the model shipped with the package
        (:data:`DEFAULT_WEIGHTS`).
    device : str or torch.device
        Where to put the weights.

    Returns
    -------
    UNet
        With ``model.info`` holding the checkpoint's training record.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file is not a survey_engine U-Net checkpoint (unreadable by
        ``torch.load(weights_only=True)``, no format tag, incomplete, or weights
        that do not fit its configuration).
    """
    path = DEFAULT_WEIGHTS if path is None else Path(path)
    if not path.is_file():
        msg = f"U-Net checkpoint not found: {str(path)!r}"
        raise FileNotFoundError(msg)
    hint = "give a file written by `survey-engine train` (survey_engine.unet.save_model)"
    try:
        with warnings.catch_warnings(record=True) as caught:  # e.g. "Detected pickle protocol 4"
            warnings.simplefilter("always")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        for w in caught:
            logger.debug("torch.load(%s): %s", path, w.message)
    except Exception as err:
        # torch's own message advises weights_only=False, i.e. running arbitrary pickled code:
        # not advice to pass on for a file that is not one of ours anyway.
        logger.debug("torch.load(%s, weights_only=True) failed: %s", path, err)
        msg = (
            f"{str(path)!r} is not a survey_engine U-Net checkpoint: torch cannot read it as "
            f"plain tensors and settings ({type(err).__name__}); {hint}"
        )
        raise ValueError(msg) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        msg = (
            f"{str(path)!r} is not a survey_engine U-Net checkpoint (no format tag "
            f"{CHECKPOINT_FORMAT!r}); {hint}"
        )
        raise ValueError(msg)
    if not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("state_dict"), dict):
        msg = f"{str(path)!r} is an incomplete U-Net checkpoint (no 'config' or 'state_dict')"
        raise ValueError(msg)
    model = UNet(ckpt["config"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        msg = f"weights in {str(path)!r} do not match its config: {err}"
        raise ValueError(msg) from err
    model.info = ckpt.get("info", {})
    model.source = str(path)
    return model.to(device).eval()
