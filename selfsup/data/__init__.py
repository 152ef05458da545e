"""Data layer: sources (folder, tar, cifar10/100, embedded mnist5k), safe decoding, a uint8
cache on disk keyed by content, and batch streaming to a device.

Typical use::

    dataset = load_dataset("mnist5k", "train", image_size=32)   # uint8 [4000, 3, 32, 32]
    stream = BatchStream(dataset.images, 256, device="cuda", seed=0)
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        for indices, batch in stream:
            ...
"""

from selfsup.data.batches import BatchStream, epoch_permutation
from selfsup.data.cache import (
    FORMAT_VERSION,
    ImageDataset,
    default_cache_dir,
    load_dataset,
    write_skip_report,
)
from selfsup.data.decode import DEFAULT_MAX_PIXELS, BadImageError, decode_image, resize_shorter
from selfsup.data.sources import (
    IMAGE_EXTENSIONS,
    absolute_source,
    parse_source,
    summarize_skips,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "FORMAT_VERSION",
    "IMAGE_EXTENSIONS",
    "absolute_source",
    "BadImageError",
    "BatchStream",
    "ImageDataset",
    "decode_image",
    "default_cache_dir",
    "epoch_permutation",
    "load_dataset",
    "parse_source",
    "resize_shorter",
    "summarize_skips",
    "write_skip_report",
]
