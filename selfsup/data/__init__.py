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

# Loaded on first use (PEP 562), so that parse_source, which needs no torch, can check a
# command's --data before torch is imported: a mistyped path is reported in a fraction of a
# second instead of after the seconds torch takes to load.
_WHERE = {
    "BatchStream": "batches",
    "epoch_permutation": "batches",
    "FORMAT_VERSION": "cache",
    "ImageDataset": "cache",
    "default_cache_dir": "cache",
    "load_dataset": "cache",
    "write_skip_report": "cache",
    "DEFAULT_MAX_PIXELS": "decode",
    "BadImageError": "decode",
    "decode_image": "decode",
    "resize_shorter": "decode",
    "IMAGE_EXTENSIONS": "sources",
    "absolute_source": "sources",
    "parse_source": "sources",
    "summarize_skips": "sources",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'selfsup.data' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"selfsup.data.{_WHERE[name]}"), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


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
