"""Throughput of the batched augmentations vs torchvision per-image transforms and kornia.

Prints one JSON object: views/s for one augmented view per image at 32 px (batch 512, SimCLR
CIFAR recipe) and 128 px (batch 256 from 160 px sources, full recipe with blur and solarize),
plus the crop+resize op alone with roi_align (used) and grid_sample (the alternative).

    python bench/augment.py --device cpu --iters 3
    python bench/augment.py --device cuda --iters 50 --compile
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from selfsup.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewAugment,
    ViewConfig,
    augment_preset,
    blur_kernel_size,
    resized_crop,
    sample_crop_params,
)

# (output size, batch, source size, view config, mean, std)
CASES = {
    "32px": (32, 512, 32, augment_preset("simclr", 32).view1.cfg, CIFAR10_MEAN, CIFAR10_STD),
    "128px": (128, 256, 160, ViewConfig(blur_p=0.5, solarize_p=0.2), IMAGENET_MEAN, IMAGENET_STD),
}


def torchvision_per_image(cfg: ViewConfig, size: int, mean, std) -> Callable:
    """The classic per-image v2 pipeline on uint8 tensors, looped over the batch."""
    k = blur_kernel_size(size, cfg.blur_kernel_frac)
    steps = [
        v2.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(cfg.flip_p),
        v2.RandomApply(
            [v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter_p
        ),
        v2.RandomGrayscale(cfg.gray_p),
    ]
    if cfg.blur_p > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(k, cfg.blur_sigma)], p=cfg.blur_p))
    if cfg.solarize_p > 0:
        steps.append(v2.RandomSolarize(round(cfg.solarize_threshold * 255), p=cfg.solarize_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    pipeline = v2.Compose(steps)
    return lambda images: torch.stack([pipeline(img) for img in images])


def kornia_batched(cfg: ViewConfig, size: int, mean, std, device: str) -> Callable | None:
    """kornia.augmentation with the same distributions (jitter order random per batch)."""
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    k = blur_kernel_size(size, cfg.blur_kernel_frac)
    steps = [
        K.RandomResizedCrop((size, size), scale=cfg.crop_scale, ratio=cfg.crop_ratio),
        K.RandomHorizontalFlip(p=cfg.flip_p),
        K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.jitter_p),
        K.RandomGrayscale(p=cfg.gray_p),
    ]
    if cfg.blur_p > 0:
        steps.append(K.RandomGaussianBlur((k, k), cfg.blur_sigma, p=cfg.blur_p))
    if cfg.solarize_p > 0:
        t = cfg.solarize_threshold
        steps.append(K.RandomSolarize(thresholds=(t, t), additions=(0.0, 0.0), p=cfg.solarize_p))
    steps.append(K.Normalize(torch.tensor(mean), torch.tensor(std)))
    pipeline = K.AugmentationSequential(*steps).to(device)
    return lambda images: pipeline(images.float().div_(255.0))


def crop_grid_sample(
    images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor
) -> torch.Tensor:
    """The grid_sample alternative: one affine grid per sample, flip folded into its x scale."""
    batch, _, height, width = images.shape
    top, left, crop_h, crop_w = boxes.to(images.dtype).unbind(1)
    sign = 1.0 - 2.0 * flip.to(images.dtype)
    theta = torch.zeros(batch, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = sign * crop_w / width
    theta[:, 0, 2] = (2 * left + crop_w) / width - 1
    theta[:, 1, 1] = crop_h / height
    theta[:, 1, 2] = (2 * top + crop_h) / height - 1
    grid = F.affine_grid(theta, [batch, 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _crop_only(crop_fn: Callable, boxes, size: int, flip, images: torch.Tensor) -> torch.Tensor:
    return crop_fn(images, boxes, size, flip)


def views_per_second(fn: Callable, images: torch.Tensor, iters: int, device: str) -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    fn(images)  # warm-up (and compilation)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn(images)
    sync()
    return round(iters * images.shape[0] / (time.perf_counter() - start), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    gen = torch.Generator(device=device).manual_seed(0)
    result: dict = {
        "device": device,
        "iters": args.iters,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "unit": "views/s",
    }
    for name, (size, batch, source, cfg, mean, std) in CASES.items():
        images = torch.randint(0, 256, (batch, 3, source, source), dtype=torch.uint8, device=device)
        ours = ViewAugment(cfg, size, mean, std).to(device)
        row = {"batch": batch, "source_px": source, "config": repr(cfg)}
        row["ours"] = views_per_second(
            lambda x, ours=ours: ours(x, gen), images, args.iters, device
        )
        if args.compile:
            compiled = torch.compile(ours)
            row["ours_compiled"] = views_per_second(
                lambda x, c=compiled: c(x, gen), images, args.iters, device
            )
        tv = torchvision_per_image(cfg, size, mean, std)
        row["torchvision_v2_per_image"] = views_per_second(
            tv, images, max(1, args.iters // 2), device
        )
        kornia_fn = kornia_batched(cfg, size, mean, std, device)
        row["kornia"] = (
            views_per_second(kornia_fn, images, args.iters, device)
            if kornia_fn is not None
            else "kornia not installed"
        )
        # Crop+resize alone: roi_align (adaptive taps = antialiased) vs grid_sample (not).
        x = images.float()
        boxes = sample_crop_params(
            batch, source, source, cfg.crop_scale, cfg.crop_ratio, generator=gen, device=device
        )
        flip = torch.rand(batch, generator=gen, device=device) < 0.5
        for label, crop_fn in (("roi_align", resized_crop), ("grid_sample", crop_grid_sample)):
            row[f"crop_{label}"] = views_per_second(
                partial(_crop_only, crop_fn, boxes, size, flip), x, args.iters, device
            )
        result[name] = row
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
