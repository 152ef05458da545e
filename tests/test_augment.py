"""Tests of the batched augmentations against torchvision's per-image transforms.

Tolerances: colour ops, blur, solarize and upscaling crops reproduce torchvision's float kernels
up to float32 rounding (different summation order), so they are compared at 1e-5. Downscaling
crops use roi_align's area-like average instead of torchvision's antialiased triangle filter:
they are compared exactly against ``F.interpolate(mode="area")`` at integer factors and against
torchvision only loosely (0.03) on smooth images.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import RandomResizedCrop

from selfsup.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TwoViewAugment,
    ViewAugment,
    ViewConfig,
    ViewParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    augment_preset,
    blur_kernel_size,
    color_jitter,
    gaussian_blur,
    normalize,
    random_grayscale,
    resized_crop,
    rgb_to_grayscale,
    sample_crop_params,
    sample_view_params,
    solarize,
)
from selfsup.errors import ConfigError, DataError

ATOL = 1e-5
JITTER_FNS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic max |F_a - F_b| (no scipy needed)."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True).double() / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True).double() / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def _ks_critical(n: int, m: int, alpha_coeff: float = 1.95) -> float:
    """Critical KS distance at alpha = 0.001 (c(alpha) = 1.95)."""
    return alpha_coeff * math.sqrt((n + m) / (n * m))


def _images(batch: int, size: int, seed: int = 0, height: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height or size, size, generator=gen)


# --------------------------------------------------------------------------- parameter sampling


@pytest.mark.parametrize(("height", "width"), [(32, 32), (24, 40)])
def test_crop_params_distribution_matches_torchvision_get_params(height: int, width: int) -> None:
    n = 3000
    ours = sample_crop_params(
        n, height, width, (0.08, 1.0), (3 / 4, 4 / 3), generator=torch.Generator().manual_seed(1)
    )
    torch.manual_seed(2)
    image = torch.zeros(3, height, width)
    theirs = torch.tensor(
        [RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    )
    assert ours.dtype == torch.int64 and ours.shape == (n, 4)
    # Boxes lie inside the image.
    top, left, h, w = ours.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    limit = _ks_critical(n, n)
    columns = {"top": 0, "left": 1, "height": 2, "width": 3}
    for name, col in columns.items():
        stat = _ks_statistic(ours[:, col], theirs[:, col])
        assert stat < limit, f"{name}: KS {stat:.3f} >= {limit:.3f}"
    area_stat = _ks_statistic(ours[:, 2] * ours[:, 3], theirs[:, 2] * theirs[:, 3])
    assert area_stat < limit
    aspect_stat = _ks_statistic(ours[:, 3] / ours[:, 2], theirs[:, 3] / theirs[:, 2])
    assert aspect_stat < limit
    assert ours[:, 2:].float().mean(0).sub(theirs[:, 2:].float().mean(0)).abs().max() < 0.6


def test_crop_params_fall_back_to_torchvision_central_crop() -> None:
    # A 10 x 200 strip admits no candidate with ratio <= 4/3 and area >= 8%: always fallback.
    ours = sample_crop_params(5, 10, 200, generator=torch.Generator().manual_seed(0))
    expected = RandomResizedCrop.get_params(torch.zeros(3, 10, 200), [0.08, 1.0], [3 / 4, 4 / 3])
    assert ours.tolist() == [list(expected)] * 5
    tall = sample_crop_params(3, 300, 12, generator=torch.Generator().manual_seed(0))
    expected = RandomResizedCrop.get_params(torch.zeros(3, 300, 12), [0.08, 1.0], [3 / 4, 4 / 3])
    assert tall.tolist() == [list(expected)] * 3


def test_view_params_rates_and_ranges_match_torchvision_distributions() -> None:
    n = 4000
    cfg = ViewConfig(
        brightness=0.4, contrast=0.3, saturation=1.5, hue=0.1, blur_p=0.4, solarize_p=0.2
    )
    p = sample_view_params(cfg, n, 64, 64, generator=torch.Generator().manual_seed(3))
    for name, mask, rate in [
        ("flip", p.flip, 0.5),
        ("jitter", p.jitter, 0.8),
        ("gray", p.gray, 0.2),
        ("blur", p.blur, 0.4),
        ("solarize", p.solarize, 0.2),
    ]:
        assert mask.dtype == torch.bool and mask.shape == (n,)
        assert abs(mask.float().mean().item() - rate) < 0.035, name
    # ColorJitter draws each factor from U[max(0, 1 - v), 1 + v] and hue from U[-h, h].
    reference = torch.rand(n, generator=torch.Generator().manual_seed(4))
    for name, values, (low, high) in [
        ("brightness", p.brightness, (0.6, 1.4)),
        ("contrast", p.contrast, (0.7, 1.3)),
        ("saturation", p.saturation, (0.0, 2.5)),
        ("hue", p.hue, (-0.1, 0.1)),
        ("sigma", p.sigma, (0.1, 2.0)),
    ]:
        assert values.min() >= low and values.max() <= high, name
        stat = _ks_statistic(values, low + (high - low) * reference)
        assert stat < _ks_critical(n, n), f"{name} is not uniform on [{low}, {high}]"
    # Op order: every row a permutation, all 24 permutations about equally likely (randperm(4)).
    assert (p.order.sort(dim=1).values == torch.arange(4)).all()
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for row in p.order.tolist():
        counts[tuple(row)] += 1
    expected = n / 24
    assert all(abs(c - expected) < 5 * math.sqrt(expected) for c in counts.values())


def test_parameters_differ_between_samples_of_one_batch() -> None:
    p = sample_view_params(ViewConfig(), 64, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.unique(p.crop, dim=0).shape[0] > 32
    assert torch.unique(p.brightness).numel() == 64
    assert 0 < p.flip.sum() < 64
    # Identical images in a batch must come out as different views.
    batch = (torch.rand(1, 3, 32, 32) * 255).to(torch.uint8).expand(8, 3, 32, 32).contiguous()
    views = ViewAugment(ViewConfig(), 32)(batch, torch.Generator().manual_seed(0))
    assert all(not torch.equal(views[0], views[i]) for i in range(1, 8))


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two 1-D samples (as float64)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return (a @ b / (a.norm() * b.norm())).item()


def test_view_params_draws_are_mutually_independent() -> None:
    """Each mask and factor has its own uniform draw: sharing one (gray reusing the jitter coin,
    sigma from the blur coin, the op order overlapping the solarize coin) couples augmentations
    that torchvision draws independently."""
    n = 20000
    cfg = ViewConfig(
        flip_p=0.5, jitter_p=0.5, gray_p=0.5, blur_p=0.5, solarize_p=0.5, blur_sigma=(0.1, 2.0)
    )
    p = sample_view_params(cfg, n, 32, 32, generator=torch.Generator().manual_seed(21))
    masks = {
        "flip": p.flip,
        "jitter": p.jitter,
        "gray": p.gray,
        "blur": p.blur,
        "solarize": p.solarize,
    }
    for (name_a, a), (name_b, b) in itertools.combinations(masks.items(), 2):
        joint = (a & b).float().mean().item()
        product = a.float().mean().item() * b.float().mean().item()
        assert abs(joint - product) < 0.02, f"P({name_a} & {name_b}) {joint:.3f} != {product:.3f}"
    # Position of each jitter op in the sample's order (inverse permutation).
    position = p.order.argsort(dim=1)
    continuous = {
        "sigma": p.sigma,
        "brightness": p.brightness,
        "contrast": p.contrast,
        "saturation": p.saturation,
        "hue": p.hue,
        **{f"position of op {op}": position[:, op] for op in range(4)},
    }
    for (name_m, mask), (name_c, values) in itertools.product(masks.items(), continuous.items()):
        r = _corr(mask, values)
        assert abs(r) < 0.05, f"corr({name_m}, {name_c}) = {r:.3f}"
    # Blurred samples' sigma still spans the whole configured range uniformly.
    sigma = p.sigma[p.blur]
    reference = 0.1 + 1.9 * torch.rand(sigma.numel(), generator=torch.Generator().manual_seed(22))
    stat = _ks_statistic(sigma, reference)
    assert stat < _ks_critical(sigma.numel(), sigma.numel()), f"blurred sigma KS {stat:.3f}"
    assert (sigma > 1.5).float().mean() > 0.2


def test_crop_left_offset_is_drawn_independently_of_top() -> None:
    """The left offset has its own uniform draw: reusing the top's would put every crop on the
    image diagonal."""
    n = 5000
    # A fixed 16 x 16 crop of a 32 x 32 image: top and left are independent U{0..16}.
    fixed = sample_crop_params(
        n, 32, 32, (0.25, 0.25), (1.0, 1.0), generator=torch.Generator().manual_seed(23)
    )
    assert (fixed[:, 2:] == 16).all()
    assert abs(_corr(fixed[:, 0], fixed[:, 1])) < 0.05
    # Random sizes correlate top and left a little (both shrink with the crop): as torchvision.
    ours = sample_crop_params(n, 32, 32, generator=torch.Generator().manual_seed(24))
    torch.manual_seed(25)
    image = torch.zeros(3, 32, 32)
    theirs = torch.tensor(
        [RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    )
    ours_r, theirs_r = _corr(ours[:, 0], ours[:, 1]), _corr(theirs[:, 0], theirs[:, 1])
    assert abs(ours_r - theirs_r) < 0.05, f"corr(top, left) {ours_r:.3f} vs {theirs_r:.3f}"


def test_crop_aspect_ratio_is_width_over_height() -> None:
    """``ratio`` bounds width / height as in torchvision: an asymmetric range (1, 2) must give
    wide crops, not tall ones with width and height swapped."""
    n = 5000
    ours = sample_crop_params(
        n, 64, 64, (0.25, 1.0), (1.0, 2.0), generator=torch.Generator().manual_seed(26)
    )
    aspect = ours[:, 3].double() / ours[:, 2].double()  # fallback (0, 0, 64, 64) has ratio 1
    assert aspect.min() >= 1.0 - 0.05 and aspect.max() <= 2.0 + 0.1
    torch.manual_seed(27)
    image = torch.zeros(3, 64, 64)
    theirs = torch.tensor(
        [RandomResizedCrop.get_params(image, [0.25, 1.0], [1.0, 2.0]) for _ in range(n)]
    )
    their_aspect = theirs[:, 3].double() / theirs[:, 2].double()
    assert abs(aspect.mean().item() - their_aspect.mean().item()) < 0.03


# --------------------------------------------------------------------------- ops vs torchvision


def _interior_mask(box: list[int], size: int) -> torch.Tensor:
    """Output pixels whose bilinear source lies inside the crop (no edge replication needed)."""
    _, _, h, w = box
    ys = (torch.arange(size) + 0.5) * h / size - 0.5
    xs = (torch.arange(size) + 0.5) * w / size - 0.5
    return ((ys >= 0) & (ys <= h - 1))[:, None] & ((xs >= 0) & (xs <= w - 1))[None, :]


def test_resized_crop_upscaling_matches_torchvision_bilinear() -> None:
    images = _images(6, 20, seed=5)
    size = 32
    boxes = torch.tensor(
        [
            [0, 0, 20, 20],
            [3, 2, 12, 17],
            [10, 5, 9, 9],
            [0, 7, 20, 13],
            [4, 0, 16, 20],
            [11, 11, 9, 9],
        ]
    )
    flip = torch.tensor([False, True, False, True, False, True])
    ours = resized_crop(images, boxes, size, flip)
    assert ours.shape == (6, 3, size, size)
    for i, box in enumerate(boxes.tolist()):
        expected = TF.resized_crop(images[i], *box, [size, size], antialias=True)
        if flip[i]:
            expected = TF.horizontal_flip(expected)
        mask = _interior_mask(box, size)
        if flip[i]:
            mask = mask.flip(-1)
        torch.testing.assert_close(ours[i][:, mask], expected[:, mask], atol=ATOL, rtol=0)
        if box == [0, 0, 20, 20]:  # crop edges = image edges: every pixel agrees
            torch.testing.assert_close(ours[i], expected, atol=ATOL, rtol=0)


def test_resized_crop_downscaling_is_antialiased() -> None:
    images = _images(2, 96, seed=6)  # factor 3: bilinear alone would read 1 of 9 pixels
    boxes = torch.tensor([[0, 0, 96, 96], [0, 0, 96, 96]])
    ours = resized_crop(images, boxes, 32, torch.tensor([False, True]))
    area = F.interpolate(images, size=(32, 32), mode="area")
    torch.testing.assert_close(ours[0], area[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours[1], area[1].flip(-1), atol=ATOL, rtol=0)
    # Without antialiasing a factor-3 downscale reads the centre pixel only: far from the mean.
    aliased = resized_crop(images, boxes, 32, antialias=False)
    assert (aliased - area).abs().mean() > 0.05
    # Against torchvision's antialiased bilinear on smooth content: close, not identical.
    smooth = F.interpolate(
        _images(3, 8, seed=7), size=(96, 96), mode="bicubic", align_corners=False
    ).clamp(0, 1)
    boxes = torch.tensor([[0, 0, 96, 96], [10, 20, 70, 60], [5, 5, 50, 80]])
    ours = resized_crop(smooth, boxes, 32)
    for i, box in enumerate(boxes.tolist()):
        expected = TF.resized_crop(smooth[i], *box, [32, 32], antialias=True)
        assert (ours[i] - expected).abs().max() < 0.03


def test_brightness_contrast_saturation_hue_match_torchvision_per_sample() -> None:
    images = _images(8, 16, seed=8)
    images[0] = images[0, :1]  # a grey image: hue and saturation must leave it alone
    factors = torch.tensor([0.0, 0.3, 0.6, 0.95, 1.0, 1.2, 1.4, 2.5])
    hues = torch.tensor([-0.5, -0.3, -0.1, -0.01, 0.0, 0.05, 0.2, 0.5])
    cases = [
        (adjust_brightness, TF.adjust_brightness, factors),
        (adjust_contrast, TF.adjust_contrast, factors),
        (adjust_saturation, TF.adjust_saturation, factors),
        (adjust_hue, TF.adjust_hue, hues),
    ]
    for ours_fn, tv_fn, values in cases:
        ours = ours_fn(images, values)
        expected = torch.stack(
            [tv_fn(img, v.item()) for img, v in zip(images, values, strict=True)]
        )
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0, msg=tv_fn.__name__)


def test_color_jitter_applies_ops_in_each_samples_order_like_torchvision() -> None:
    n = 24
    images = _images(n, 12, seed=9)
    gen = torch.Generator().manual_seed(10)
    brightness = 0.6 + 0.8 * torch.rand(n, generator=gen)
    contrast = 0.6 + 0.8 * torch.rand(n, generator=gen)
    saturation = 0.6 + 0.8 * torch.rand(n, generator=gen)
    hue = 0.2 * torch.rand(n, generator=gen) - 0.1
    order = torch.tensor(list(itertools.permutations(range(4))))  # every order once
    apply = torch.ones(n, dtype=torch.bool)
    apply[::5] = False
    ours = color_jitter(images, brightness, contrast, saturation, hue, order, apply)
    for i in range(n):
        expected = images[i]
        if apply[i]:
            params = (brightness[i], contrast[i], saturation[i], hue[i])
            for op in order[i].tolist():
                expected = JITTER_FNS[op](expected, params[op].item())
        torch.testing.assert_close(ours[i], expected, atol=ATOL, rtol=0)
    # hue=None (ColorJitter(hue=0)) keeps the order of the other three ops.
    no_hue = color_jitter(images, brightness, contrast, saturation, None, order, apply)
    for i in range(n):
        expected = images[i]
        if apply[i]:
            params = (brightness[i], contrast[i], saturation[i])
            for op in [op for op in order[i].tolist() if op != 3]:
                expected = JITTER_FNS[op](expected, params[op].item())
        torch.testing.assert_close(no_hue[i], expected, atol=ATOL, rtol=0)
    # The order matters (clamping, hue vs saturation), so a fixed order would fail above.
    fixed = color_jitter(
        images, brightness, contrast, saturation, hue, order[:1].expand(n, 4), apply
    )
    assert (fixed - ours).abs().max() > 1e-3


def test_grayscale_blur_solarize_normalize_match_torchvision() -> None:
    images = _images(5, 24, seed=11)
    mask = torch.tensor([True, False, True, False, True])
    gray = random_grayscale(images, mask)
    assert rgb_to_grayscale(images).shape == (5, 1, 24, 24)
    for i in range(5):
        expected = TF.rgb_to_grayscale(images[i], 3) if mask[i] else images[i]
        torch.testing.assert_close(gray[i], expected, atol=ATOL, rtol=0)

    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    for k in (3, 7):
        blurred = gaussian_blur(images, sigma, k)
        for i in range(5):
            expected = TF.gaussian_blur(images[i], [k, k], [sigma[i].item()] * 2)
            torch.testing.assert_close(blurred[i], expected, atol=ATOL, rtol=0)

    solar = solarize(images, 0.5, mask)
    for i in range(5):
        expected = TF.solarize(images[i], 0.5) if mask[i] else images[i]
        torch.testing.assert_close(solar[i], expected, atol=0, rtol=0)

    normed = normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    expected = TF.normalize(images, list(IMAGENET_MEAN), list(IMAGENET_STD))
    torch.testing.assert_close(normed, expected, atol=ATOL, rtol=0)


def test_blur_kernel_size_is_odd_and_about_ten_percent() -> None:
    assert blur_kernel_size(224) == 23  # BYOL's 23 px kernel at 224 px
    assert blur_kernel_size(128) == 13
    assert blur_kernel_size(32) == 3
    assert all(blur_kernel_size(s) % 2 == 1 for s in range(8, 300))


# --------------------------------------------------------------------------- pipeline


def _reference_view(
    image: torch.Tensor, p: ViewParams, i: int, cfg: ViewConfig, size: int, mean, std
) -> torch.Tensor:
    """One sample through torchvision's per-image functional ops, in SimCLR/BYOL order."""
    x = TF.to_dtype(image, torch.float32, scale=True)
    x = TF.resized_crop(x, *p.crop[i].tolist(), [size, size], antialias=True)
    if p.flip[i]:
        x = TF.horizontal_flip(x)
    if p.jitter[i]:
        params = (p.brightness[i], p.contrast[i], p.saturation[i], p.hue[i])
        for op in p.order[i].tolist():
            x = JITTER_FNS[op](x, params[op].item())
    if p.gray[i]:
        x = TF.rgb_to_grayscale(x, 3)
    if p.blur[i]:
        k = blur_kernel_size(size, cfg.blur_kernel_frac)
        x = TF.gaussian_blur(x, [k, k], [p.sigma[i].item()] * 2)
    if p.solarize[i]:
        x = TF.solarize(x, cfg.solarize_threshold)
    return TF.normalize(x, list(mean), list(std))


def test_view_augment_equals_torchvision_composition_with_same_params() -> None:
    cfg = ViewConfig(blur_p=0.5, solarize_p=0.5, gray_p=0.3)
    size, n = 32, 16
    images = (_images(n, 16, seed=12) * 255).to(torch.uint8)
    aug = ViewAugment(cfg, size, CIFAR10_MEAN, CIFAR10_STD)
    params = aug.sample_params(images, torch.Generator().manual_seed(13))
    # Whole-image boxes (upscaled 16 -> 32) so the crop has no edge-ring difference.
    params.crop = torch.tensor([[0, 0, 16, 16]]).expand(n, 4)
    out = aug.apply(images, params)
    for i in range(n):
        expected = _reference_view(images[i], params, i, cfg, size, CIFAR10_MEAN, CIFAR10_STD)
        torch.testing.assert_close(out[i], expected, atol=1e-4, rtol=0)  # /std scales errors 4x
    assert params.blur.any() and params.solarize.any() and params.gray.any()


def test_seeded_generator_reproduces_and_outputs_have_contract_shape() -> None:
    aug = augment_preset("byol", 48, CIFAR10_MEAN, CIFAR10_STD)
    images = (_images(10, 40, seed=14, height=36) * 255).to(torch.uint8)
    v1, v2 = aug(images, torch.Generator().manual_seed(7))
    w1, w2 = aug(images, torch.Generator().manual_seed(7))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    other, _ = aug(images, torch.Generator().manual_seed(8))
    assert not torch.equal(v1, other)
    assert not torch.equal(v1, v2)
    for view in (v1, v2):
        assert view.shape == (10, 3, 48, 48) and view.dtype == torch.float32
        assert view.device == images.device and torch.isfinite(view).all()
    # Float input in [0, 1] gives the same views as the uint8 batch.
    f1, _ = aug(images.float() / 255, torch.Generator().manual_seed(7))
    torch.testing.assert_close(f1, v1, atol=1e-4, rtol=0)


def test_identity_config_only_normalises() -> None:
    cfg = ViewConfig(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0
    )
    images = (_images(4, 20, seed=15) * 255).to(torch.uint8)
    out = ViewAugment(cfg, 20, CIFAR10_MEAN, CIFAR10_STD)(images)
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(out, (images.float() / 255 - mean) / std, atol=1e-5, rtol=0)


def test_two_view_augment_applies_each_views_own_config() -> None:
    """View 1 follows ``view1``'s config and view 2 ``view2``'s (BYOL's asymmetric recipe): an
    identity view 1 only normalises, a solarize-always view 2 comes out solarised."""
    identity = ViewConfig(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0
    )
    solarizing = ViewConfig(
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        flip_p=0.0,
        jitter_p=0.0,
        gray_p=0.0,
        solarize_p=1.0,
    )
    images = (_images(4, 20, seed=28) * 255).to(torch.uint8)
    v1, v2 = TwoViewAugment(identity, solarizing, 20, CIFAR10_MEAN, CIFAR10_STD)(
        images, torch.Generator().manual_seed(29)
    )
    x = images.float() / 255
    torch.testing.assert_close(v1, normalize(x, CIFAR10_MEAN, CIFAR10_STD), atol=1e-5, rtol=0)
    expected = normalize(TF.solarize(x, 0.5), CIFAR10_MEAN, CIFAR10_STD)
    torch.testing.assert_close(v2, expected, atol=1e-5, rtol=0)


def test_presets_follow_the_published_recipes() -> None:
    byol = augment_preset("byol", 224)
    assert isinstance(byol, TwoViewAugment)
    v1, v2 = byol.view1.cfg, byol.view2.cfg
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert (v1.brightness, v1.contrast, v1.saturation, v1.hue) == (0.4, 0.4, 0.2, 0.1)
    assert v1.crop_scale == (0.08, 1.0) and byol.view1.kernel_size == 23
    small = augment_preset("byol", 32)
    assert small.view1.cfg.blur_p == 0.0 and small.view2.cfg.solarize_p == 0.2
    simclr = augment_preset("SimCLR", 224).view1.cfg
    assert (simclr.brightness, simclr.saturation, simclr.hue, simclr.blur_p) == (0.8, 0.8, 0.2, 0.5)
    simclr32 = augment_preset("simclr", 32).view1.cfg
    assert (simclr32.brightness, simclr32.hue, simclr32.blur_p) == (0.4, 0.1, 0.0)
    for method in ("moco", "simsiam"):
        cfg = augment_preset(method, 224).view2.cfg
        assert cfg.crop_scale == (0.2, 1.0) and cfg.blur_p == 0.5 and cfg.saturation == 0.4
        cfg32 = augment_preset(method, 32).view1.cfg
        assert cfg32.crop_scale == (0.08, 1.0) and cfg32.blur_p == 0.0
    with pytest.raises(ConfigError, match="unknown method"):
        augment_preset("dino", 224)


def test_bad_settings_and_inputs_raise_user_errors() -> None:
    with pytest.raises(ConfigError, match="ViewConfig.flip_p"):
        ViewConfig(flip_p=1.5)
    with pytest.raises(ConfigError, match="ViewConfig.hue"):
        ViewConfig(hue=0.7)
    with pytest.raises(ConfigError, match="ViewConfig.crop_scale"):
        ViewConfig(crop_scale=(0.5, 0.2))
    aug = ViewAugment(ViewConfig(), 16)
    with pytest.raises(DataError, match=r"\[B, 3, H, W\]"):
        aug(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(DataError, match="dtype"):
        aug(torch.zeros(2, 3, 16, 16, dtype=torch.int32))


def test_eval_transform_matches_torchvision_resize_center_crop() -> None:
    images = (_images(3, 50, seed=16, height=40) * 255).to(torch.uint8)
    transform = EvalTransform(32, IMAGENET_MEAN, IMAGENET_STD)
    out = transform(images)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    for i in range(3):
        x = TF.to_dtype(images[i], torch.float32, scale=True)
        x = TF.center_crop(TF.resize(x, [32], antialias=True), [32, 32])
        expected = TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    assert torch.equal(out, transform(images))  # deterministic
    same_size = (_images(2, 32, seed=17) * 255).to(torch.uint8)
    torch.testing.assert_close(
        EvalTransform(32, IMAGENET_MEAN, IMAGENET_STD)(same_size),
        normalize(same_size.float() / 255, IMAGENET_MEAN, IMAGENET_STD),
    )


def test_eval_crop_takes_the_imagenet_protocols_centre_crop() -> None:
    """data.eval_crop=0.875 on 146 px cached images for 128 px crops: evaluation sees the central
    128 x 128 pixels (ImageNet's resize 256, crop 224), not the whole image squeezed to 128."""
    images = (_images(2, 146, seed=18) * 255).to(torch.uint8)
    out = EvalTransform(128, IMAGENET_MEAN, IMAGENET_STD, crop_fraction=0.875)(images)
    centre = TF.center_crop(images.float() / 255, [128, 128])
    torch.testing.assert_close(out, normalize(centre, IMAGENET_MEAN, IMAGENET_STD))
    whole = EvalTransform(128, IMAGENET_MEAN, IMAGENET_STD)(images)
    assert not torch.allclose(whole, out)
    with pytest.raises(ConfigError, match="data.eval_crop=1.5"):
        EvalTransform(128, crop_fraction=1.5)


def test_the_imagenette_preset_and_eval_use_the_runs_eval_crop() -> None:
    from selfsup.commands.common import _eval_transform
    from selfsup.train.config import resolve_config

    assert resolve_config("byol", "imagenette").data.eval_crop == 0.875
    assert resolve_config("byol", "quickstart").data.eval_crop == 1.0  # digits: the whole image
    cpu = torch.device("cpu")
    eval_t = _eval_transform(128, IMAGENET_MEAN, IMAGENET_STD, cpu, {"eval_crop": 0.875})
    assert (eval_t.size, eval_t.resize) == (128, 146)
    # a run from before data.eval_crop (its metadata says None): the whole image
    eval_t = _eval_transform(128, IMAGENET_MEAN, IMAGENET_STD, cpu, {"eval_crop": None})
    assert (eval_t.size, eval_t.resize) == (128, 128)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_views_match_cpu_views_with_same_params() -> None:
    aug = ViewAugment(ViewConfig(blur_p=0.5, solarize_p=0.5), 32, CIFAR10_MEAN, CIFAR10_STD)
    images = (_images(16, 40, seed=18) * 255).to(torch.uint8)
    params = aug.sample_params(images, torch.Generator().manual_seed(19))
    on_cpu = aug.apply(images, params)
    moved = ViewParams(**{k: v.cuda() for k, v in vars(params).items()})
    on_gpu = aug.cuda().apply(images.cuda(), moved)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    v1, v2 = augment_preset("byol", 32)(images.cuda(), gen)
    assert v1.device.type == "cuda" and v2.shape == (16, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["simclr", "moco", "byol", "simsiam"])
def test_cuda_views_never_wait_for_the_host(method) -> None:
    """Making a batch's views queues GPU work only: no host<->device synchronisation (a
    ``torch.tensor(list, device=cuda)``, an ``.item()``, a boolean-mask index would each stall
    the training step)."""
    images = (_images(64, 40, seed=20) * 255).to(torch.uint8).cuda()
    augment = augment_preset(method, 32).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    augment(images, gen)  # first call: lazy CUDA initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        v1, v2 = augment(images, gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert v1.shape == v2.shape == (64, 3, 32, 32)


def test_float_images_outside_0_1_are_refused_not_clipped() -> None:
    from selfsup.augment import augment_preset
    from selfsup.errors import DataError

    aug = augment_preset("simclr", 16, mean=(0.5,) * 3, std=(0.5,) * 3)
    pixels = torch.randint(0, 256, (4, 3, 16, 16)).float()
    with pytest.raises(DataError, match=r"\[0, 1\].*divide"):
        aug(pixels)
    v1, v2 = aug(pixels / 255)
    assert v1.shape == (4, 3, 16, 16)


# --------------------------------------------------------------------------- views.png


def _tiles(picture: torch.Tensor, rows: int, cols: int, tile: int) -> list[list[torch.Tensor]]:
    step = tile + 4  # make_grid's padding before each tile
    return [
        [picture[:, 4 + r * step : 4 + r * step + tile, 4 + c * step : 4 + c * step + tile]
         for c in range(cols)]
        for r in range(rows)
    ]  # fmt: skip


def test_views_grid_undoes_the_normalisation_and_leaves_other_random_streams_alone():
    """An augmentation that changes nothing (whole-image crop, no flip, no colour op) shows each
    view as its image, up to rounding: the grid un-normalises with the augmentation's own mean
    and std. A real one draws from its own seeded generator: the same picture every time, and
    the global torch RNG is not advanced."""
    from selfsup.augment.preview import views_grid

    images = torch.randint(0, 256, (5, 3, 24, 24), dtype=torch.uint8)
    identity = ViewConfig(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0
    )
    mean, std = (0.3, 0.5, 0.7), (0.2, 0.25, 0.3)
    grid = views_grid(TwoViewAugment(identity, identity, 24, mean, std), images, tile=24)
    assert grid.dtype == torch.uint8 and grid.shape == (3, 3 * 28 + 4, 5 * 28 + 4)
    tiles = _tiles(grid, 3, 5, 24)
    for c in range(5):
        assert torch.equal(tiles[0][c], images[c])
        for view in (1, 2):
            assert (tiles[view][c].int() - images[c].int()).abs().max() <= 1

    real = augment_preset("byol", 24, mean, std)
    state = torch.get_rng_state()
    first = views_grid(real, images, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, views_grid(real, images, seed=3))
    assert not torch.equal(first, views_grid(real, images, seed=4))
    shown = _tiles(first, 3, 5, 96)
    assert not torch.equal(shown[1][0], shown[2][0])  # two different views of one image


def test_eval_transform_and_view_config_refuse_malformed_settings() -> None:
    """std 0 gave non-finite inputs and one mean was broadcast in silence (EvalTransform now
    checks them as ViewAugment does); a bare crop_scale=0.5 was a TypeError."""
    from selfsup.augment import EvalTransform

    for bad in ({"std": [0.0, 0.0, 0.0]}, {"mean": [0.5]}):
        with pytest.raises(ConfigError, match="give 3 values each, std positive"):
            EvalTransform(32, **bad)
    with pytest.raises(ConfigError, match=r"ViewConfig.crop_scale=0.5: give two positive"):
        ViewConfig(crop_scale=0.5)
