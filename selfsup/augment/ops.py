"""Batched functional image ops with per-sample parameters.

Every op takes a float batch ``[B, C, H, W]`` with values in ``[0, 1]`` and per-sample parameter
tensors of shape ``[B]`` (or ``[B, 4]`` for crop boxes) on the same device, and treats each sample
as the matching ``torchvision.transforms.v2.functional`` kernel treats a single float image with
that sample's parameter: the colour ops, flip, grayscale, blur and solarize to float precision;
:func:`resized_crop` within its own tolerance (its interpolation taps the pixels just outside an
upscaled crop, and its antialiasing differs slightly when it shrinks one; see there). No op loops
over samples in Python and none reads a tensor value on the host, so they run unchanged on CPU
and GPU and under ``torch.compile``.

Crop boxes follow torchvision's ``RandomResizedCrop.get_params`` convention: integer
``(top, left, height, width)`` rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

# ITU-R 601-2 luma weights, the values torchvision's rgb_to_grayscale uses.
GRAY_WEIGHTS: tuple[float, float, float] = (0.2989, 0.587, 0.114)

# Index of each colour-jitter op, as in torchvision's ColorJitter (``fn_idx``).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``[B]`` parameter to ``[B, 1, 1, 1]`` in ``like``'s dtype and device."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, 1, 1, 1)


def _sample_mask(mask: Tensor) -> Tensor:
    """Reshape a boolean ``[B]`` mask to ``[B, 1, 1, 1]`` for ``torch.where``."""
    return mask.to(dtype=torch.bool).reshape(-1, 1, 1, 1)


def to_float_image(images: Tensor) -> Tensor:
    """uint8 ``[B, 3, H, W]`` -> float32 in ``[0, 1]``; float input is returned unchanged."""
    if images.is_floating_point():
        return images
    return images.to(torch.float32).div_(255.0)


def sample_crop_params(
    batch_size: int,
    height: int,
    width: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
    *,
    attempts: int = 10,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Per-sample RandomResizedCrop boxes, distributed as torchvision's ``get_params``.

    torchvision draws up to ``attempts`` candidates (area fraction ``~U(scale)``, log aspect
    ratio ``~U(log ratio)``), keeps the first whose rounded ``w x h`` fits in the image, places
    it uniformly at random, and falls back to the largest central crop with an allowed aspect
    ratio. Here all candidates are drawn at once and the first valid one is picked with
    ``argmax``, which gives the same distribution without a Python loop.

    Args:
        batch_size: B, the number of boxes.
        height, width: size of the source images.
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height).
        attempts: candidates per sample before the central fallback (torchvision: 10).
        generator: source of randomness (on ``device``).
        device: where the boxes are created.

    Returns:
        int64 ``[B, 4]`` rows of ``(top, left, crop_height, crop_width)``.
    """
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    draws = torch.rand(batch_size, attempts, 2, generator=generator, device=device)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[..., 0])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws[..., 1])
    # torch.round rounds half to even like Python's round() in get_params.
    cand_w = torch.round(torch.sqrt(target_area * aspect))
    cand_h = torch.round(torch.sqrt(target_area / aspect))
    valid = (cand_w > 0) & (cand_w <= width) & (cand_h > 0) & (cand_h <= height)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # first True (0 if none)
    crop_w = cand_w.gather(1, first).squeeze(1)
    crop_h = cand_h.gather(1, first).squeeze(1)

    # Central fallback, computed on the host because it depends only on the shape.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fb_w, fb_h = int(round(height * max(ratio))), height
    else:
        fb_w, fb_h = width, height
    any_valid = valid.any(dim=1)
    crop_w = torch.where(any_valid, crop_w, torch.full_like(crop_w, fb_w))
    crop_h = torch.where(any_valid, crop_h, torch.full_like(crop_h, fb_h))

    # Uniform integer offsets in [0, H - h], like torch.randint(0, H - h + 1).
    pos = torch.rand(batch_size, 2, generator=generator, device=device)
    top = torch.floor(pos[:, 0] * (height - crop_h + 1)).clamp_max_(height - crop_h)
    left = torch.floor(pos[:, 1] * (width - crop_w + 1)).clamp_max_(width - crop_w)
    top = torch.where(any_valid, top, torch.div(height - crop_h, 2, rounding_mode="floor"))
    left = torch.where(any_valid, left, torch.div(width - crop_w, 2, rounding_mode="floor"))
    return torch.stack((top, left, crop_h, crop_w), dim=1).to(torch.int64)


def resized_crop(
    images: Tensor,
    boxes: Tensor,
    size: int,
    flip_mask: Tensor | None = None,
    *,
    antialias: bool = True,
) -> Tensor:
    """Crop one box per sample, resize it to ``size x size`` and optionally mirror it.

    One ``torchvision.ops.roi_align`` call (``aligned=True``: pixel ``k`` covers ``[k, k+1)``)
    does all samples. Each output pixel averages ``n x n`` bilinear samples spread over its
    footprint in the crop, ``n = ceil(crop_size / size)``: when upscaling (``n = 1``) this is
    exactly half-pixel bilinear interpolation (``F.interpolate(align_corners=False)``); when
    downscaling it is an area-like average, i.e. antialiased, like torchvision's
    ``antialias=True``. One difference from crop-then-resize: at the crop's outer ring the
    bilinear taps may read the real pixels just outside the crop instead of repeating the edge.

    Args:
        images: float ``[B, C, H, W]``.
        boxes: ``[B, 4]`` rows of ``(top, left, crop_height, crop_width)`` in pixels.
        size: output side S.
        flip_mask: optional bool ``[B]``; True mirrors that sample horizontally.
        antialias: if False use one bilinear tap per output pixel (no antialiasing).

    Returns:
        ``[B, C, S, S]`` in ``images``' dtype.
    """
    boxes = boxes.to(device=images.device, dtype=images.dtype)
    top, left, crop_h, crop_w = boxes.unbind(dim=1)
    batch_index = torch.arange(images.shape[0], device=images.device, dtype=images.dtype)
    rois = torch.stack((batch_index, left, top, left + crop_w, top + crop_h), dim=1)
    out = roi_align(
        images,
        rois,
        output_size=(size, size),
        spatial_scale=1.0,
        sampling_ratio=0 if antialias else 1,  # 0: adaptive ceil(crop / size) taps per bin
        aligned=True,
    )
    if flip_mask is not None:
        out = torch.where(_sample_mask(flip_mask), out.flip(-1), out)
    return out


def hflip(images: Tensor, flip_mask: Tensor) -> Tensor:
    """Mirror the samples where the bool ``[B]`` ``flip_mask`` is True."""
    return torch.where(_sample_mask(flip_mask), images.flip(-1), images)


def rgb_to_grayscale(images: Tensor, num_output_channels: int = 1) -> Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B``: ``[B, 3, H, W]`` -> ``[B, n, H, W]``, n in {1, 3}."""
    batch, _, height, width = images.shape
    if images.device.type == "cpu":
        # One batched matrix-vector product is ~10x faster than three strided mul-adds on CPU.
        # (Not used on GPU, where matmul may run in TF32 when the user enables it.)
        weights = torch.tensor(GRAY_WEIGHTS, dtype=images.dtype)
        gray = torch.matmul(weights, images.reshape(batch, 3, -1)).view(batch, 1, height, width)
    else:
        r, g, b = images.unbind(dim=-3)
        gray = (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(-3)
    if num_output_channels == 3:
        return gray.expand_as(images)
    return gray


def random_grayscale(images: Tensor, mask: Tensor) -> Tensor:
    """Replace the samples where the bool ``[B]`` mask is True by their 3-channel grayscale."""
    return torch.where(_sample_mask(mask), rgb_to_grayscale(images, 3), images)


def _blend(images: Tensor, reference: Tensor, factor: Tensor) -> Tensor:
    """``clamp(f * x + (1 - f) * reference, 0, 1)`` per sample, as torchvision's ``_blend``."""
    f = _per_sample(factor, images)
    return (images * f + reference * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """``clamp(f_b * x, 0, 1)`` with one factor per sample (``[B]``)."""
    return (images * _per_sample(factor, images)).clamp_(0.0, 1.0)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Blend each sample with the mean of its grayscale image by its factor (``[B]``)."""
    mean = rgb_to_grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Blend each sample with its grayscale image by its factor (``[B]``)."""
    return _blend(images, rgb_to_grayscale(images), factor)


def adjust_hue(images: Tensor, factor: Tensor) -> Tensor:
    """Rotate the HSV hue of each sample by its factor in ``[-0.5, 0.5]`` turns (``[B]``).

    A hue rotation keeps V = max(r, g, b) and the chroma C = max - min, so instead of a full
    RGB -> HSV -> RGB round trip (torchvision's ``adjust_hue``) this computes the hue in sixths,
    ``h6`` (Pillow's formulas, grey pixels get 0), shifts it and maps back with the closed form
    ``c_n = V - C clamp(min(k, 4 - k), 0, 1)``, ``k = (n + h6) mod 6``, n = 5, 3, 1 for R, G, B.
    Equal to torchvision's six-sector table up to float rounding.
    """
    r, g, b = images.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    max_is_r = maxc == r
    max_is_g = (maxc == g) & ~max_is_r
    hue6 = torch.where(
        max_is_r, g - b, torch.where(max_is_g, 2.0 * chroma + b - r, 4.0 * chroma + r - g)
    )
    # Grey pixels (chroma 0) have a zero numerator too; dividing by 1 keeps them finite.
    hue6 = hue6 / torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue6 = hue6 + 6.0 * factor.to(hue6).reshape(-1, 1, 1)
    # [5, 3, 1] built on the device: torch.tensor(list, device=cuda) is a host-to-device copy
    n = torch.arange(5.0, 0.0, -2.0, device=images.device, dtype=images.dtype).view(3, 1, 1)
    k = (n + hue6.unsqueeze(-3)).remainder(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return (maxc.unsqueeze(-3) - chroma.unsqueeze(-3) * ramp).clamp_(0.0, 1.0)


def _jitter_schedule(order: Tensor, with_hue: bool) -> Tensor:
    """Lay each sample's op order onto shared steps, ``-1`` marking "identity" (int64).

    With hue: 7 steps ``[blend, blend, blend, hue, blend, blend, blend]``; op ``i`` of a sample
    whose hue is at position ``p`` goes to step ``i + 3 - p``, so the ops before its hue end at
    step 2 and those after it start at step 4. The expensive hue rotation then runs once per
    batch instead of once per order position. Without hue: the 3 blend ops in their order.
    """
    batch = order.shape[0]
    if not with_hue:
        # Stable sort pushing hue (3) last keeps the relative order of the other three ops.
        key = torch.where(order == HUE, 4, torch.arange(4, device=order.device))
        return order.gather(1, key.argsort(dim=1))[:, :3]
    hue_position = (order == HUE).to(torch.int64).argmax(dim=1, keepdim=True)
    steps = torch.arange(4, device=order.device) + 3 - hue_position  # [B, 4] in 0..6
    schedule = torch.full((batch, 7), -1, dtype=torch.int64, device=order.device)
    return schedule.scatter_(1, steps, order)


def color_jitter(
    images: Tensor,
    brightness: Tensor,
    contrast: Tensor,
    saturation: Tensor,
    hue: Tensor | None,
    order: Tensor,
    apply_mask: Tensor | None = None,
) -> Tensor:
    """torchvision ``ColorJitter`` with per-sample factors and a per-sample op order.

    Sample b applies op ``order[b, 0]``, then ``order[b, 1]``, ... (0 brightness, 1 contrast,
    2 saturation, 3 hue), as torchvision does with ``fn_idx = randperm(4)`` per image. Brightness,
    contrast and saturation are all ``clamp(lerp(ref, x, f))`` with ``ref`` = 0, the grayscale
    mean or the grayscale image, so each step is one fused blend whose ``f`` and ``ref`` are
    picked per sample (``f = 1`` is the identity); see :func:`_jitter_schedule` for the steps.

    Args:
        images: float ``[B, 3, H, W]`` in ``[0, 1]``.
        brightness, contrast, saturation: factors ``[B]`` (1 = unchanged).
        hue: shifts ``[B]`` in turns, or None to skip hue entirely (saves its cost).
        order: int64 ``[B, 4]``, each row a permutation of ``0..3``.
        apply_mask: optional bool ``[B]``; samples where it is False are returned unchanged.

    Returns:
        ``[B, 3, H, W]``.
    """
    batch = images.shape[0]
    order = order.to(images.device)
    schedule = _jitter_schedule(order, with_hue=hue is not None)
    if apply_mask is not None:
        off = ~apply_mask.to(device=images.device, dtype=torch.bool)
        schedule = torch.where(off.unsqueeze(1), -1, schedule)
    # factors[:, 3] = 1 makes steps marked -1 (or hue) an identity blend.
    ones = torch.ones(batch, device=images.device, dtype=images.dtype)
    factors = torch.stack((brightness.to(ones), contrast.to(ones), saturation.to(ones), ones), 1)
    for step in range(schedule.shape[1]):
        op = schedule[:, step]
        if hue is not None and step == 3:
            # Step 3 is every sample's hue; samples with jitter off keep their pixels exactly.
            hue_on = op == HUE
            images = torch.where(hue_on.view(-1, 1, 1, 1), adjust_hue(images, hue), images)
            continue
        op = torch.where(op < 0, 3, op)
        factor = factors.gather(1, op.unsqueeze(1)).view(-1, 1, 1, 1)
        gray = rgb_to_grayscale(images)
        mean = gray.mean(dim=(-2, -1), keepdim=True)
        op4 = op.view(-1, 1, 1, 1)
        reference = torch.where(op4 == SATURATION, gray, mean * (op4 == CONTRAST))
        images = torch.lerp(reference, images, factor).clamp_(0.0, 1.0)
    return images


def gaussian_kernels1d(sigma: Tensor, kernel_size: int) -> Tensor:
    """Normalised 1-D Gaussian taps ``[B, k]``, one row per sigma in ``[B]``.

    ``w_t ∝ exp(-(t - (k-1)/2)^2 / (2 sigma^2))``, as torchvision's ``_get_gaussian_kernel1d``.
    """
    offsets = torch.arange(kernel_size, device=sigma.device, dtype=sigma.dtype)
    offsets = offsets - (kernel_size - 1) / 2.0
    return torch.softmax(-0.5 * (offsets / sigma.unsqueeze(1)).pow(2), dim=1)


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with one sigma per sample and reflect padding.

    The ``[B, k]`` kernels become depthwise weights of a grouped convolution over the batch
    folded into channels (``[1, B*C, H, W]``): a horizontal pass then a vertical pass, equal to
    torchvision's 2-D ``gaussian_blur`` with ``sigma = (s, s)``.

    Args:
        images: float ``[B, C, H, W]``.
        sigma: ``[B]`` standard deviations in pixels (> 0).
        kernel_size: odd k, smaller than ``2 * min(H, W)`` (reflect padding needs k // 2 < H, W).

    Returns:
        ``[B, C, H, W]``.
    """
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"gaussian_blur kernel_size must be odd and positive, got {kernel_size}")
    batch, channels, height, width = images.shape
    taps = gaussian_kernels1d(sigma.to(images), kernel_size)  # [B, k]
    taps = taps.repeat_interleave(channels, dim=0)  # [B*C, k], one row per depthwise group
    pad = kernel_size // 2
    folded = images.reshape(1, batch * channels, height, width)
    folded = F.pad(folded, (pad, pad, pad, pad), mode="reflect")
    folded = F.conv2d(folded, taps.view(-1, 1, 1, kernel_size), groups=batch * channels)
    folded = F.conv2d(folded, taps.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return folded.reshape(batch, channels, height, width)


def solarize(images: Tensor, threshold: float = 0.5, mask: Tensor | None = None) -> Tensor:
    """Invert pixels ``>= threshold`` (``x -> 1 - x``); only in samples where ``mask`` ([B])."""
    solarized = torch.where(images >= threshold, 1.0 - images, images)
    if mask is None:
        return solarized
    return torch.where(_sample_mask(mask), solarized, images)


def normalize(
    images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor
) -> Tensor:
    """``(x - mean) / std`` per channel; mean and std have 3 entries."""
    mean_t = torch.as_tensor(mean, device=images.device, dtype=images.dtype).view(-1, 1, 1)
    std_t = torch.as_tensor(std, device=images.device, dtype=images.dtype).view(-1, 1, 1)
    return (images - mean_t) / std_t


def blur_kernel_size(image_size: int, fraction: float = 0.1) -> int:
    """Odd kernel of about ``fraction * image_size`` px (SimCLR: 10%; 224 px -> 23 as in BYOL)."""
    return max(3, int(round(fraction * image_size)) | 1)
