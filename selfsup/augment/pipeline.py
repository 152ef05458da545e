"""Batched two-view augmentation pipelines for SimCLR, MoCo v2, BYOL and SimSiam.

A :class:`ViewAugment` turns a whole uint8 (or float in ``[0, 1]``) batch ``[B, 3, H, W]`` into
one normalised view ``[B, 3, S, S]`` on the batch's device. Each sample draws its own parameters
from the distributions of the torchvision per-image transforms it replaces::

    RandomResizedCrop(S, scale, ratio) -> RandomHorizontalFlip(p)
    -> RandomApply([ColorJitter(b, c, s, h)], p) -> RandomGrayscale(p)
    -> RandomApply([GaussianBlur(k, sigma)], p) -> RandomSolarize(threshold, p) -> Normalize

Colour jitter uses a random op order per sample, as torchvision's ``ColorJitter`` does per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from selfsup.augment import ops
from selfsup.data.decode import storage_size_for_crop
from selfsup.errors import ConfigError, DataError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)

# Images at most this many pixels wide get the CIFAR-style recipes (no blur), see augment_preset.
SMALL_IMAGE_MAX = 64


@dataclass
class ViewConfig:
    """Distributions of one view's augmentations (defaults: BYOL / MoCo-v2-like jitter).

    Attributes:
        crop_scale: RandomResizedCrop area fraction range.
        crop_ratio: RandomResizedCrop aspect-ratio (w / h) range.
        flip_p: probability of a horizontal flip.
        jitter_p: probability that colour jitter is applied.
        brightness, contrast, saturation: factor drawn from ``U[max(0, 1 - v), 1 + v]``.
        hue: shift drawn from ``U[-v, v]`` turns, ``v <= 0.5``.
        gray_p: probability of grayscale conversion.
        blur_p: probability of Gaussian blur.
        blur_sigma: blur sigma range in pixels, drawn uniformly.
        blur_kernel_frac: kernel size as a fraction of the output size (made odd).
        solarize_p: probability of solarisation.
        solarize_threshold: pixels ``>= threshold`` (in ``[0, 1]``) are inverted.
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            value = getattr(self, name)
            return ConfigError(f"augmentation setting ViewConfig.{name}={value!r}: {rule}")

        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            pair = getattr(self, name)
            if not isinstance(pair, tuple | list) or len(pair) != 2 or not 0 < pair[0] <= pair[1]:
                raise bad(name, "give two positive numbers (low, high) with low <= high")
            setattr(self, name, (float(pair[0]), float(pair[1])))
        if self.crop_scale[1] > 1.0:
            raise bad("crop_scale", "the area fraction cannot exceed 1.0")
        for f in fields(self):
            if f.name.endswith("_p") and not 0.0 <= getattr(self, f.name) <= 1.0:
                raise bad(f.name, "a probability must lie in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise bad(name, "use a non-negative jitter strength (0 disables it)")
        if not 0.0 <= self.hue <= 0.5:
            raise bad("hue", "the hue jitter must lie in [0, 0.5]")
        if not 0.0 < self.blur_kernel_frac <= 1.0:
            raise bad("blur_kernel_frac", "use a fraction of the image size in (0, 1]")
        if not 0.0 <= self.solarize_threshold <= 1.0:
            raise bad("solarize_threshold", "images are in [0, 1]; use a threshold in [0, 1]")


@dataclass
class ViewParams:
    """Per-sample parameters of one view, every tensor with leading dimension B.

    Attributes:
        crop: int64 ``[B, 4]`` ``(top, left, height, width)`` in source pixels.
        flip: bool ``[B]``.
        jitter: bool ``[B]``, whether colour jitter is applied.
        brightness, contrast, saturation: float ``[B]`` factors.
        hue: float ``[B]`` shifts in turns.
        order: int64 ``[B, 4]`` jitter op order (0 brightness, 1 contrast, 2 saturation, 3 hue).
        gray, blur, solarize: bool ``[B]``.
        sigma: float ``[B]`` blur sigma in output pixels.
    """

    crop: Tensor
    flip: Tensor
    jitter: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    order: Tensor
    gray: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor


def _uniform(u: Tensor, low: float, high: float) -> Tensor:
    return low + (high - low) * u


# Dynamo cannot trace torch.rand(generator=...): keep sampling eager (a few tiny kernels) so
# torch.compile(view_augment) compiles `apply`, which compiles with fullgraph=True.
@torch.compiler.disable
def sample_view_params(
    cfg: ViewConfig,
    batch_size: int,
    height: int,
    width: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> ViewParams:
    """Draw independent per-sample parameters with torchvision's per-image distributions.

    Three ``torch.rand`` calls in all (crop candidates, crop offsets, everything else), so a
    batch costs a handful of kernel launches on GPU whatever B is.
    """
    crop = ops.sample_crop_params(
        batch_size,
        height,
        width,
        cfg.crop_scale,
        cfg.crop_ratio,
        generator=generator,
        device=device,
    )
    u = torch.rand(batch_size, 14, generator=generator, device=device)
    return ViewParams(
        crop=crop,
        flip=u[:, 0] < cfg.flip_p,
        jitter=u[:, 1] < cfg.jitter_p,
        brightness=_uniform(u[:, 2], max(0.0, 1.0 - cfg.brightness), 1.0 + cfg.brightness),
        contrast=_uniform(u[:, 3], max(0.0, 1.0 - cfg.contrast), 1.0 + cfg.contrast),
        saturation=_uniform(u[:, 4], max(0.0, 1.0 - cfg.saturation), 1.0 + cfg.saturation),
        hue=_uniform(u[:, 5], -cfg.hue, cfg.hue),
        # argsort of 4 iid uniforms is a uniformly random permutation, like randperm(4).
        order=u[:, 10:14].argsort(dim=1),
        gray=u[:, 6] < cfg.gray_p,
        blur=u[:, 7] < cfg.blur_p,
        sigma=_uniform(u[:, 8], cfg.blur_sigma[0], cfg.blur_sigma[1]),
        solarize=u[:, 9] < cfg.solarize_p,
    )


def _check_normalisation(mean: Sequence[float], std: Sequence[float]) -> None:
    """3 means and 3 positive stds (a zero std would divide by zero; one value would be
    broadcast over the channels in silence)."""
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(
            f"normalisation mean={mean} / std={std}: give 3 values each, std positive"
        )


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(
            f"augmentation input has shape {tuple(images.shape)}; expected an image batch "
            "[B, 3, H, W] (repeat grayscale images to 3 channels when loading the data)"
        )
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise DataError(
            f"augmentation input has dtype {images.dtype}; pass uint8 or float images in [0, 1]"
        )
    # Float pixels of 0-255 would be clipped to white by the jitter, silently. Checked on the CPU
    # only: on a GPU the check would cost a host synchronisation per batch.
    if images.is_floating_point() and images.device.type == "cpu" and images.numel():
        low, high = float(images.min()), float(images.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise DataError(
                f"float images must lie in [0, 1]; these span [{low:g}, {high:g}] (divide "
                "0-255 pixels by 255, or pass them as uint8)"
            )


class ViewAugment(nn.Module):
    """One random view of a batch: crop+resize, flip, jitter, gray, blur, solarize, normalise.

    Input: uint8 ``[B, 3, H, W]`` (or float in ``[0, 1]``) on any device. Output: normalised
    ``[B, 3, S, S]`` on the same device, float32 for uint8 input (else the input's float dtype).
    """

    def __init__(
        self,
        cfg: ViewConfig,
        size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if size < 1:
            raise ConfigError(f"augmentation image size {size} must be a positive number of pixels")
        _check_normalisation(mean, std)
        self.cfg = cfg
        self.size = int(size)
        self.kernel_size = ops.blur_kernel_size(self.size, cfg.blur_kernel_frac)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)

    def sample_params(self, images: Tensor, generator: torch.Generator | None = None) -> ViewParams:
        """Per-sample parameters for ``images`` ``[B, 3, H, W]``, drawn on its device."""
        batch, _, height, width = images.shape
        return sample_view_params(
            self.cfg, batch, height, width, generator=generator, device=images.device
        )

    @torch.no_grad()
    def apply(self, images: Tensor, params: ViewParams) -> Tensor:
        """Apply given per-sample parameters: ``[B, 3, H, W]`` -> ``[B, 3, S, S]``."""
        _check_images(images)
        cfg = self.cfg
        is_uint8 = images.dtype == torch.uint8
        # Crop first and scale to [0, 1] after: the /255 then touches S*S pixels, not H*W.
        x = images.to(torch.float32) if is_uint8 else images
        x = ops.resized_crop(x, params.crop, self.size, params.flip)
        if is_uint8:
            x = x.div_(255.0)
        jitter_on = cfg.brightness > 0 or cfg.contrast > 0 or cfg.saturation > 0 or cfg.hue > 0
        if cfg.jitter_p > 0 and jitter_on:
            x = ops.color_jitter(
                x,
                params.brightness,
                params.contrast,
                params.saturation,
                params.hue if cfg.hue > 0 else None,
                params.order,
                params.jitter,
            )
        if cfg.gray_p > 0:
            x = ops.random_grayscale(x, params.gray)
        if cfg.blur_p > 0:
            blurred = ops.gaussian_blur(x, params.sigma, self.kernel_size)
            x = torch.where(params.blur.view(-1, 1, 1, 1), blurred, x)
        if cfg.solarize_p > 0:
            x = ops.solarize(x, cfg.solarize_threshold, params.solarize)
        return ops.normalize(x, self.mean, self.std)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[B, 3, H, W]`` uint8/float -> normalised ``[B, 3, S, S]``, random via ``generator``."""
        _check_images(images)
        return self.apply(images, self.sample_params(images, generator))


class TwoViewAugment(nn.Module):
    """Two independently augmented views of the same batch (view 1 drawn first)."""

    def __init__(
        self,
        view1: ViewConfig,
        view2: ViewConfig,
        size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.view1 = ViewAugment(view1, size, mean, std)
        self.view2 = ViewAugment(view2, size, mean, std)

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``[B, 3, H, W]`` -> ``(v1, v2)``, each normalised ``[B, 3, S, S]``."""
        return self.view1(images, generator), self.view2(images, generator)


PRESET_METHODS = ("simclr", "moco", "byol", "simsiam")


def augment_preset(
    method: str,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> TwoViewAugment:
    """The published two-view recipe of ``method`` at output size ``image_size``.

    Sources:
        * simclr: Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
          Representations", Appendix A: crop scale (0.08, 1), flip, colour jitter of strength
          s = 1 i.e. ColorJitter(0.8, 0.8, 0.8, 0.2) with p = 0.8, grayscale p = 0.2, blur
          p = 0.5 (kernel 10% of the image, sigma U(0.1, 2)). For CIFAR (Appendix B.9) s = 0.5,
          i.e. (0.4, 0.4, 0.4, 0.1), and no blur (as solo-learn's and lightly's CIFAR recipes).
        * moco (v2): Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning",
          ``aug_plus`` in facebookresearch/moco: crop scale (0.2, 1), ColorJitter(0.4, 0.4, 0.4,
          0.1) p = 0.8, grayscale p = 0.2, blur p = 0.5, flip.
        * simsiam: Chen & He 2021, "Exploring Simple Siamese Representation Learning", same
          augmentation as MoCo v2 (facebookresearch/simsiam ``main_simsiam.py``).
        * byol: Grill et al. 2020, "Bootstrap Your Own Latent", Table 6: crop scale (0.08, 1),
          flip, ColorJitter(0.4, 0.4, 0.2, 0.1) p = 0.8, grayscale p = 0.2, blur p = 1.0 / 0.1,
          solarize p = 0.0 / 0.2 for view 1 / view 2.

    For ``image_size <= 64`` (CIFAR-like) every recipe uses crop scale (0.08, 1) and no blur,
    following solo-learn's CIFAR recipes (a 3-px blur destroys 32-px images); BYOL keeps its
    asymmetric solarisation.
    """
    name = method.lower()
    small = image_size <= SMALL_IMAGE_MAX
    if name == "simclr":
        strength = 0.5 if small else 1.0
        view = ViewConfig(
            crop_scale=(0.08, 1.0),
            brightness=0.8 * strength,
            contrast=0.8 * strength,
            saturation=0.8 * strength,
            hue=0.2 * strength,
            blur_p=0.0 if small else 0.5,
        )
        return TwoViewAugment(view, view, image_size, mean, std)
    if name in ("moco", "mocov2", "moco_v2", "simsiam"):
        view = ViewConfig(
            crop_scale=(0.08, 1.0) if small else (0.2, 1.0),
            brightness=0.4,
            contrast=0.4,
            saturation=0.4,
            hue=0.1,
            blur_p=0.0 if small else 0.5,
        )
        return TwoViewAugment(view, view, image_size, mean, std)
    if name == "byol":
        view1 = ViewConfig(
            crop_scale=(0.08, 1.0),
            brightness=0.4,
            contrast=0.4,
            saturation=0.2,
            hue=0.1,
            blur_p=0.0 if small else 1.0,
            solarize_p=0.0,
        )
        view2 = replace(view1, blur_p=0.0 if small else 0.1, solarize_p=0.2)
        return TwoViewAugment(view1, view2, image_size, mean, std)
    raise ConfigError(
        f"unknown method {method!r} for the augmentation preset; use one of {PRESET_METHODS}"
    )


class EvalTransform(nn.Module):
    """Deterministic evaluation view: resize the shorter side to ``round(S / crop_fraction)``
    (antialiased bilinear), centre-crop ``S x S``, normalise.

    ``crop_fraction`` 1 (the default) keeps the whole image; 0.875 is the ImageNet protocol's
    resize 256, centre crop 224 (``data.eval_crop``; the imagenette preset uses it).

    Input: uint8 ``[B, 3, H, W]`` (or float in ``[0, 1]``). Output: ``[B, 3, S, S]`` float32 (or
    the input's float dtype) on the input's device.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crop_fraction: float = 1.0,
    ) -> None:
        super().__init__()
        if size < 1:
            raise ConfigError(f"evaluation image size {size} must be a positive number of pixels")
        if not 0 < crop_fraction <= 1:
            raise ConfigError(
                f"data.eval_crop={crop_fraction} must lie in (0, 1]: the fraction of the shorter "
                "side that the evaluation's centre crop keeps (0.875 as ImageNet's 224/256)"
            )
        _check_normalisation(mean, std)
        self.size = int(size)
        self.resize = storage_size_for_crop(size, crop_fraction)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> normalised ``[B, 3, S, S]``."""
        _check_images(images)
        x = ops.to_float_image(images)
        height, width = x.shape[-2:]
        if min(height, width) != self.resize:
            x = TF.resize(x, [self.resize], antialias=True)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = TF.center_crop(x, [self.size, self.size])
        return ops.normalize(x, self.mean, self.std)
