"""Fuzzing decode_image: for any bytes it returns uint8 [H, W, 3] or raises BadImageError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from selfsup.data.decode import BadImageError, decode_image

# A lower pixel limit only keeps mutated headers that declare big images fast to reject; the
# property (nothing but BadImageError escapes) does not depend on it.
FUZZ_MAX_PIXELS = 1_000_000
FUZZ_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _seed_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    rgb = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    encoded = []
    for image, fmt, kwargs in [
        (rgb, "PNG", {}),
        (rgb, "JPEG", {"quality": 90, "exif": exif.tobytes()}),
        (rgb.convert("RGBA"), "PNG", {}),
        (rgb.convert("P"), "GIF", {}),
        (rgb.convert("L"), "BMP", {}),
        (Image.new("I;16", (9, 7), 4000), "PNG", {}),
        (Image.new("F", (9, 7), 0.3), "TIFF", {}),
        (rgb, "WEBP", {}),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kwargs)
        encoded.append(buffer.getvalue())
    return encoded


SEEDS = _seed_images()


def _check(data: bytes) -> None:
    try:
        decoded = decode_image(data, name="fuzz.bin", max_pixels=FUZZ_MAX_PIXELS)
    except BadImageError as error:
        assert error.reason  # a reason is always given for the skip report
        return
    assert isinstance(decoded, np.ndarray) and decoded.dtype == np.uint8
    assert decoded.ndim == 3 and decoded.shape[2] == 3 and decoded.shape[0] * decoded.shape[1] > 0


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on damaged metadata
@FUZZ_SETTINGS
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_raise_anything_but_bad_image_error(data):
    _check(data)


@st.composite
def mutated_images(draw) -> bytes:
    """A valid encoded image with some bytes overwritten, cut short, or a span deleted."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    flips = draw(
        st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=8)
    )
    for position, value in flips:
        data[position] = value
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(data)))
        data = data[:cut]
    if data and draw(st.booleans()):
        start = draw(st.integers(0, len(data) - 1))
        length = draw(st.integers(1, 16))
        del data[start : start + length]
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")
@FUZZ_SETTINGS
@given(mutated_images())
def test_mutated_images_never_raise_anything_but_bad_image_error(data):
    _check(data)


def test_unmutated_seeds_decode():
    for data in SEEDS:
        assert decode_image(data, name="seed").shape[2] == 3
