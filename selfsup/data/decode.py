"""Safe image decoding: bytes -> uint8 ``[H, W, 3]`` RGB, or a :class:`BadImageError`.

Every PIL mode is reduced to 8-bit RGB:

- ``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's own conversion.
- Modes with alpha (``LA``, ``PA``, ``RGBA``, ``RGBa``, ``La``, ``P`` with a transparency
  key): **composited on white**, so transparent regions look like the page a user saw them
  on, rather than turning into whatever colour happened to hide behind the alpha.
- High bit-depth modes: ``I;16*`` is divided by 257 (65535 -> 255); ``I`` (32-bit int) is
  kept if it already lies in 0..255, divided by 257 if in 0..65535, else min-max scaled;
  ``F`` (float) is multiplied by 255 if it lies in [0, 1], kept if in [0, 255], else
  min-max scaled. NaN/Inf become 0.

EXIF orientation is applied (``PIL.ImageOps.exif_transpose``); a broken EXIF block is ignored
rather than failing an otherwise good image. Multi-frame files (GIF, TIFF) use the first frame.
PIL's warnings about damaged metadata pass through to the caller (``load_dataset`` silences
them while it decodes a whole source; skipped files are reported in the skip list instead).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from selfsup.errors import DataError

#: Default decompression-bomb limit: images declaring more pixels are refused before decoding.
DEFAULT_MAX_PIXELS = 100_000_000

# Short categories used in skip reports ("skipped 5 of 1,205 files: 2 corrupt, ...").
ZERO_BYTE = "zero-byte"
NOT_AN_IMAGE = "not an image"
CORRUPT = "corrupt"
DECOMPRESSION_BOMB = "decompression bomb"


class BadImageError(DataError):
    """A file could not be decoded into an image.

    Attributes:
        reason: a short category (``"zero-byte"``, ``"not an image"``, ``"corrupt"``,
            ``"decompression bomb"``) followed by ``": detail"`` where useful; the part before
            the first ``":"`` is what skip summaries count.
        name: the file (or archive member) the bytes came from.
    """

    def __init__(self, reason: str, *, name: str = "") -> None:
        self.reason = reason
        self.name = name
        where = f"{name}: " if name else ""
        super().__init__(f"{where}{reason}")


def decode_image(
    data: bytes, *, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode encoded image bytes into an RGB uint8 array ``[H, W, 3]``.

    Args:
        data: the file's bytes (any format PIL reads).
        name: the file name, used in error messages.
        max_pixels: refuse images whose header declares more than this many pixels (checked
            before any pixel is decoded); ``None`` disables the check (PIL's own bomb check
            still applies).

    Returns:
        uint8 array of shape ``[H, W, 3]`` (RGB), EXIF orientation applied.

    Raises:
        BadImageError: for zero-byte, non-image, truncated, corrupt or oversized input.
            Never raises anything else for any input bytes.
    """
    if len(data) == 0:
        raise BadImageError(ZERO_BYTE, name=name)
    try:
        return _decode(data, name=name, max_pixels=max_pixels)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(NOT_AN_IMAGE, name=name) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImageError(f"{DECOMPRESSION_BOMB}: {error}", name=name) from None
    except Exception as error:  # PIL raises many exception types on corrupt input
        detail = str(error) or type(error).__name__
        raise BadImageError(f"{CORRUPT}: {detail}", name=name) from None


def _decode(data: bytes, *, name: str, max_pixels: int | None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise BadImageError(f"{CORRUPT}: image declares size {width}x{height}", name=name)
        if max_pixels is not None and width * height > max_pixels:
            raise BadImageError(
                f"{DECOMPRESSION_BOMB}: {width}x{height} = {width * height:,} pixels "
                f"exceeds the limit of {max_pixels:,}",
                name=name,
            )
        image.load()  # decodes now, so truncated data fails here and not later
        image = _apply_exif_orientation(image)
        return _to_rgb_array(image)


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        transposed = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not lose an otherwise good image
        return image
    return transposed if transposed is not None else image


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        array = np.asarray(image, dtype=np.uint8)
    elif mode.startswith("I;16") or mode in ("I", "F"):
        array = _high_depth_to_uint8(image)
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif image.has_transparency_data:  # alpha band or a palette/colour transparency key
        array = _composite_on_white(image.convert("RGBA"))
    else:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise BadImageError(f"{CORRUPT}: decoded to unexpected array {array.shape}")
    return np.ascontiguousarray(array)


def _composite_on_white(rgba: Image.Image) -> np.ndarray:
    pixels = np.asarray(rgba, dtype=np.float32)
    alpha = pixels[:, :, 3:4] / 255.0
    rgb = pixels[:, :, :3] * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _high_depth_to_uint8(image: Image.Image) -> np.ndarray:
    """Scale a single-channel 16/32-bit int or float image to 0..255 (rules in the module doc)."""
    with np.errstate(all="ignore"):  # NaN/Inf in damaged float images are zeroed below
        return _scale_high_depth(image)


def _scale_high_depth(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I;16"):
        # np.asarray understands I;16 / I;16B / I;16L directly as uint16.
        values = np.asarray(image).astype(np.float64) / 257.0
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    values = np.asarray(image).astype(np.float64)
    values[~np.isfinite(values)] = 0.0
    if values.size == 0:
        return values.astype(np.uint8)
    low, high = float(values.min()), float(values.max())
    if mode == "F" and low >= 0.0 and high <= 1.0:
        values = values * 255.0
    elif low >= 0.0 and high <= 255.0:
        pass
    elif mode == "I" and low >= 0.0 and high <= 65535.0:
        values = values / 257.0
    elif high > low:
        values = (values - low) / (high - low) * 255.0
    else:
        values = np.zeros_like(values)
    values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def storage_size_for_crop(crop: int, eval_crop: float | None = 1.0) -> int:
    """The stored side length whose centre crop of fraction ``eval_crop`` is ``crop`` pixels:
    ``round(crop / eval_crop)`` (146 px for 128 px crops at 0.875; ``crop`` itself at 1 or
    ``None``). What the trainer's kNN monitor, ``selfsup eval`` and ``prepare_images`` store
    images at, so each sees them as the others do."""
    return round(int(crop) / float(eval_crop or 1.0))


def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side equals ``size``, then center-crop to ``[size, size, 3]``.

    This produces the *storage* image the cache keeps: every cached image shares one
    ``H = W = size`` so the dataset stacks into one uint8 tensor, and training crops are then
    taken from it. Large images are shrunk (antialiased bicubic); images smaller than ``size``
    are upscaled (bicubic), so a 4x4 icon becomes a blurry ``size x size`` image rather than
    breaking the stack. An image already ``size x size`` is returned unchanged.

    Args:
        image: uint8 ``[H, W, 3]``.
        size: the storage side length in pixels.

    Returns:
        uint8 ``[size, size, 3]``.
    """
    if size <= 0:
        raise ValueError(f"storage size must be positive, got {size}")
    height, width = image.shape[:2]
    if height == size and width == size:
        return image
    # Resample only the central square of the source (PIL's box, in source pixels), not the
    # whole image: a 1 x 20,000 strip scaled whole to 32 px would be 640,000 x 32 (0.7 GB).
    side = min(height, width)
    left, top = (width - side) / 2, (height - side) / 2
    pil = Image.fromarray(image)
    pil = pil.resize(
        (size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side),
        reducing_gap=3.0,
    )  # fmt: skip
    return np.asarray(pil, dtype=np.uint8)


def storage_image(image, size: int, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One image prepared exactly as the cache stores it: uint8 ``[size, size, 3]``.

    ``image``: an image file's path, its bytes, a PIL image, or an RGB uint8 ``[H, W, 3]``
    array. Files and bytes are decoded by :func:`decode_image` (modes, EXIF rotation), a PIL
    image converted as it would be, and then :func:`resize_shorter` takes the centre square
    (PIL's bicubic resize). This is what ``selfsup embed``, ``predict`` and ``neighbors`` do to
    every image before the encoder's evaluation transform.
    """
    import os

    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as handle:
            array = decode_image(handle.read(), name=os.fspath(image), max_pixels=max_pixels)
    elif isinstance(image, (bytes, bytearray)):
        array = decode_image(bytes(image), name="image bytes", max_pixels=max_pixels)
    elif isinstance(image, Image.Image):
        image.load()
        array = _to_rgb_array(_apply_exif_orientation(image))
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise DataError(
                f"an image array must be RGB uint8 [H, W, 3], got {array.dtype} "
                f"{list(array.shape)}; pass a file path or a PIL image instead"
            )
    return resize_shorter(np.ascontiguousarray(array), size)
