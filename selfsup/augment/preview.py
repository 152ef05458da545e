"""Pictures of what the network sees: images beside their two augmented views.

A run writes one (``views.png``, and the TensorBoard image ``augment/views``) so that a user can
check the augmentation before trusting the training: a crop range that hides the object, a
colour jitter too strong for the data, a flip that turns a glyph into another one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import make_grid

from selfsup.augment.pipeline import TwoViewAugment
from selfsup.data.cache import atomic_write

GRID_TILE = 96  # px per picture: a 20 or 32 px image is upscaled to stay visible


def image_grid(rows: Sequence[Sequence[Tensor]], tile: int = GRID_TILE) -> Tensor:
    """One uint8 ``[3, H, W]`` picture of uint8 ``[3, h, w]`` images, one row per sequence;
    each image centre-cropped to a square and resized to ``tile`` px, short rows padded white."""
    width = max(len(row) for row in rows)
    tiles = []
    for row in rows:
        for image in row:
            side = min(image.shape[-2:])
            square = TF.center_crop(image, [side, side])
            tiles.append(TF.resize(square, [tile, tile], antialias=True))
        tiles += [torch.full((3, tile, tile), 255, dtype=torch.uint8)] * (width - len(row))
    return make_grid(torch.stack(tiles), nrow=width, padding=4, pad_value=255)


def _to_uint8(views: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Normalised float ``[B, 3, S, S]`` back to uint8 pixels (the inverse of ``normalize``)."""
    pixels = views.float() * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    return pixels.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


@torch.no_grad()
def views_grid(
    augment: TwoViewAugment, images: Tensor, seed: int = 0, tile: int = GRID_TILE
) -> Tensor:
    """uint8 ``[3, H, W]``, three rows of ``B`` pictures: uint8 ``images`` ``[B, 3, h, w]``, then
    their view 1, then their view 2 as ``augment`` draws them (un-normalised: the colours the
    network sees before normalisation), so each column is one image and its two views.

    The views come from a generator of their own, seeded with ``seed``: drawing them leaves
    every other random stream (the training's) untouched.
    """
    device = augment.view1.mean.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    batch = images.to(device)
    view1, view2 = augment(batch, generator=generator)
    mean, std = augment.view1.mean, augment.view1.std
    view1 = _to_uint8(view1, mean, std).cpu()
    view2 = _to_uint8(view2, mean, std).cpu()
    originals = images.cpu()
    return image_grid([list(originals), list(view1), list(view2)], tile)


def write_png(path: Path, picture: Tensor) -> None:
    """uint8 ``[3, H, W]`` to a PNG at ``path``, atomically (a reader never sees half of it)."""
    array = np.ascontiguousarray(picture.permute(1, 2, 0).cpu().numpy())
    atomic_write(Path(path), lambda tmp: Image.fromarray(array).save(tmp))
