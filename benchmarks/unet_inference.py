"""U-Net deblender inference speed on CPU or CUDA, on a synthetic field (no GalSim needed).

Usage::

    python benchmarks/unet_inference.py [--device cpu|cuda] [--size 2048] [--model PATH]

Prints, for the device asked: the network alone (batches of 512² patches, bf16 autocast on
CUDA, host→device copies included) and the whole ``unet_detect`` on one window (patching,
network, instance extraction), in Mpx/s of image area, plus the device name.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from survey_engine.unet.infer import UNetConfig, unet_detect
from survey_engine.unet.model import load_model, normalise_input


def synthetic_field(size: int, seed: int = 0) -> np.ndarray:
    """A field of Gaussian blobs (sizes 1–4 px, S/N 5–500) on unit-variance noise."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
    n = int(size * size / 400)
    ys, xs = rng.uniform(0, size, n), rng.uniform(0, size, n)
    sig = rng.uniform(1.0, 4.0, n)
    amp = 10 ** rng.uniform(0.5, 2.5, n)
    for y, x, s, a in zip(ys, xs, sig, amp, strict=True):
        r = int(4 * s) + 1
        y0, y1, x0, x1 = (
            max(0, int(y) - r),
            min(size, int(y) + r),
            max(0, int(x) - r),
            min(size, int(x) + r),
        )
        yy, xx = np.mgrid[y0:y1, x0:x1]
        img[y0:y1, x0:x1] += a * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s))
    return img


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    """Run the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=2048, help="window side for unet_detect")
    ap.add_argument("--model", default=None, help="checkpoint (default: shipped)")
    ap.add_argument("--batch", type=int, default=None, help="patches per forward pass")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    dev = args.device
    name = (
        torch.cuda.get_device_name(0) if dev.startswith("cuda") else platform.processor() or "cpu"
    )
    print(f"device: {dev} ({name}); torch {torch.__version__}; threads {torch.get_num_threads()}")
    model = load_model(args.model, device=dev)
    batch = args.batch or (32 if dev.startswith("cuda") else 1)
    amp = dev.startswith("cuda")

    # Network alone.
    patch = 512
    x = torch.from_numpy(synthetic_field(patch * 2)).reshape(2, patch, 2, patch).permute(0, 2, 1, 3)
    x = x.reshape(4, 1, patch, patch)
    x = normalise_input(x, model.config).repeat(max(1, batch // 4), 1, 1, 1)[:batch].contiguous()
    if dev.startswith("cuda"):
        x = x.pin_memory()
    with torch.inference_mode():
        for _ in range(2):  # warm-up (cuDNN autotuning, allocator)
            xd = x.to(dev, non_blocking=True)
            with torch.autocast(device_type=dev.split(":")[0], dtype=torch.bfloat16, enabled=amp):
                model(xd)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            xd = x.to(dev, non_blocking=True)
            with torch.autocast(device_type=dev.split(":")[0], dtype=torch.bfloat16, enabled=amp):
                out = model(xd)
            out.float().cpu()
        _sync(dev)
        t_net = (time.perf_counter() - t0) / args.repeat
    mpx = batch * patch * patch / 1e6
    print(
        f"network: batch {batch}×{patch}² ({'bf16' if amp else 'fp32'}): {t_net * 1e3:.1f} ms, {mpx / t_net:.1f} Mpx/s"
    )
    if dev.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

    # Whole deblender on one window.
    img = synthetic_field(args.size, seed=1)
    var = np.ones_like(img)
    bad = np.zeros(img.shape, dtype=bool)
    cfg = UNetConfig(device=dev, batch_size=batch)
    unet_detect(img, var, bad, model=model, cfg=cfg)  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    res = unet_detect(img, var, bad, model=model, cfg=cfg)
    _sync(dev)
    t_det = time.perf_counter() - t0
    print(
        f"unet_detect on {args.size}²: {t_det:.2f} s, {args.size**2 / 1e6 / t_det:.1f} Mpx/s, "
        f"{res.n_objects} objects"
    )


if __name__ == "__main__":
    main()
