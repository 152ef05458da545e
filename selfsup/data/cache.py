"""Decode a source once into a uint8 ``[N, 3, S, S]`` array cached on disk, keyed by content.

Cache layout (``cache_dir``: argument, else ``$SELFSUP_CACHE``, else ``~/.cache/selfsup``)::

    <name>-<where>-<split>-<size>-<key>.npy    uint8 [N, 3, H, W], memory-mapped when loaded
    <name>-<where>-<split>-<size>-<key>.json   labels, classes, paths, skipped, shape

``key`` hashes the source's content listing (folder: every file's relative path, size and
mtime; archive: its path, size and mtime; named sources: the name), the split, the storage
size, the decompression-bomb limit and :data:`FORMAT_VERSION`, so a changed file rebuilds the
cache and an unchanged source reuses it. Both files are written to a temporary name and moved
into place with ``os.replace`` (the ``.json`` last, and it is what marks a cache complete), so
an interrupted build never leaves a cache that loads. Older caches of the same source, split and
size are removed once a new one is in place.

A folder or archive decode that is interrupted (Ctrl-C, SIGTERM, ``kill -9``, a pre-empted job)
is not lost: its rows stay in ``.<cache>.npy.partial[.<token>]`` with its progress in the
``.json`` beside it (saved every :data:`PARTIAL_SAVE_EVERY_S` seconds and when stopped), and the
next build of the same key continues after the last image saved (:class:`_PartialBuild`). A
partial build of files that have changed since is deleted.

The cache is loaded with ``np.load(mmap_mode="c")``: pages are read from disk lazily and a
write to the tensor stays private to the process (copy-on-write), so a stray in-place op can
neither corrupt the cache nor crash on read-only memory.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import glob
import hashlib
import json
import os
import re
import socket
import struct
import sys
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from selfsup.data.decode import DEFAULT_MAX_PIXELS, BadImageError, decode_image, resize_shorter
from selfsup.data.sources import (
    UNREADABLE,
    ArraySource,
    ListedSource,
    SourceSpec,
    list_folder,
    list_tar,
    load_array_source,
    parse_source,
    spread_index,
    summarize_skips,
)
from selfsup.errors import ConfigError, DataError, sigterm_as_interrupt
from selfsup.progress import bar_options

#: Bumped whenever decoding, resizing or the file layout changes, so old caches are rebuilt.
# 2: the storage resize samples the central square only (decode.resize_shorter), and images
# nested below a class folder are that class's (sources._layout)
FORMAT_VERSION = 2
_HEADER_BYTES = 128  # fixed .npy header size, so the header can be written after the data


@dataclass
class ImageDataset:
    """A decoded image dataset held as one uint8 tensor.

    Attributes:
        images: uint8 ``[N, 3, H, W]`` RGB on CPU (may be backed by a memory-mapped cache).
        labels: int64 ``[N]``, or ``None`` for unlabeled data.
        classes: class names indexed by label, or ``None``.
        paths: one per image (a file, ``"<archive>/<member>"``, or ``"mnist5k/train/17"``).
        name: the source's short name.
        skipped: ``(path, reason)`` for every file that could not be used.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str] | None
    paths: list[str] | None
    name: str
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        images = self.images
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape)
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {shape}")
        count = self.images.shape[0]
        if self.labels is not None and tuple(self.labels.shape) != (count,):
            raise ValueError(f"labels must be [{count}], got {tuple(self.labels.shape)}")
        if self.paths is not None and len(self.paths) != count:
            raise ValueError(f"paths must have {count} entries, got {len(self.paths)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or ``None`` for an unlabeled dataset."""
        return None if self.classes is None else len(self.classes)

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> ImageDataset:
        """A new dataset with the images at ``indices`` (in that order), copied into memory.

        ``classes`` and ``skipped`` are kept, so label values stay comparable with the parent.
        """
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
        if index.numel() and (int(index.min()) < -len(self) or int(index.max()) >= len(self)):
            raise IndexError(f"subset indices out of range for a dataset of {len(self)} images")
        index = torch.where(index < 0, index + len(self), index)
        return replace(
            self,
            images=self.images[index],
            labels=None if self.labels is None else self.labels[index],
            paths=None if self.paths is None else [self.paths[i] for i in index.tolist()],
            skipped=list(self.skipped),
        )

    def skip_summary(self) -> str:
        """``"skipped 5 of 1,205 files: 2 corrupt, ..."`` for ``skipped`` (see summarize_skips)."""
        return summarize_skips(self.skipped, len(self) + len(self.skipped))

    def with_classes_of(self, reference: ImageDataset) -> tuple[ImageDataset, list[str]]:
        """This (test) split relabelled by class *name* onto ``reference``'s (train) labels.

        Each split of a folder numbers its own class folders: with a class missing from one of
        them, label 1 of the test split would be another class than label 1 of train, and a kNN
        or a classifier would be scored against the wrong names. Images of classes that
        ``reference`` lacks cannot be scored and are dropped; returns ``(dataset, dropped class
        names)``. Unlabeled data, or the same classes, come back unchanged.
        """
        if self.labels is None or reference.labels is None or not self.classes:
            return self, []
        if not reference.classes or list(self.classes) == list(reference.classes):
            return self, []
        index = {name: i for i, name in enumerate(reference.classes)}
        mapping = torch.tensor([index.get(name, -1) for name in self.classes], dtype=torch.int64)
        new = mapping[self.labels]
        keep = torch.nonzero(new >= 0).flatten()
        dropped = [name for name in self.classes if name not in index]
        kept = self.subset(keep) if len(keep) < len(self) else replace(self)
        return replace(kept, labels=new[keep], classes=list(reference.classes)), dropped

    def spread(self, limit: int | None, by_path: bool = False) -> ImageDataset:
        """At most ``limit`` images, evenly spaced: positions ``floor(i * N / limit)``
        (``by_path``: in path order, for an archive stored in member order; see
        ``sources.spread_index``).

        For ``data.limit`` and ``--limit``: a folder is read class by class, so its first
        ``limit`` images would be one or two classes; evenly spaced ones keep every class in
        proportion, and are the same images on every run. ``None`` (or ``limit >= N``): all.
        """
        if limit is None or limit >= len(self):
            return self
        paths = self.paths if by_path else None
        return self.subset(np.asarray(spread_index(len(self), limit, paths), dtype=np.int64))


def default_cache_dir() -> Path:
    """``$SELFSUP_CACHE`` if set, else ``~/.cache/selfsup``."""
    configured = os.environ.get("SELFSUP_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "selfsup"


def load_dataset(
    source: str | os.PathLike[str],
    split: str = "train",
    *,
    image_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    limit: int | None = None,
    listed: ListedSource | None = None,
) -> ImageDataset:
    """Load a data source as a uint8 ``[N, 3, S, S]`` dataset, decoding it once and caching it.

    Args:
        source: a folder, a tar archive, ``"cifar10"``, ``"cifar100"``, ``"stl10"``,
            ``"stl10-unlabeled"`` or ``"mnist5k"``
            (see :mod:`selfsup.data.sources` for the layout rules).
        split: which split to load (``"train"``, ``"test"``, ...).
        image_size: the storage size ``S``: each image's shorter side is resized to ``S``
            (small images are upscaled) and center-cropped to ``S x S``; training crops are
            taken from this. ``None`` keeps the native size, which must then be the same for
            every image.
        cache_dir: where caches live (default ``$SELFSUP_CACHE`` or ``~/.cache/selfsup``).
        workers: decoding threads (default ``min(8, cpu_count)``; PIL releases the GIL).
        progress: show a tqdm bar while decoding.
        max_pixels: decompression-bomb limit per image (see :func:`decode_image`).
        limit: at most this many images, evenly spaced (``data.limit`` / ``--limit``). A folder
            or archive then decodes only those, into a cache of their own; arrays (torchvision,
            mnist5k) are loaded whole and spread.
        listed: a folder source's ``list_folder(spec, split)``, when the caller has made it
            already (the listing is the cache key: not walking the folder twice).

    Returns:
        An :class:`ImageDataset` whose ``images`` may be backed by the memory-mapped cache.

    Raises:
        DataError: the source is unknown, unreadable, holds nothing usable, or its images
            differ in size while ``image_size`` is ``None``.
    """
    valid_size = isinstance(image_size, int) and not isinstance(image_size, bool)
    if image_size is not None and not (valid_size and image_size > 0):
        raise ConfigError(f"image_size must be a positive integer or None, got {image_size!r}")
    if limit is not None and not (isinstance(limit, int) and limit >= 1):
        raise ConfigError(f"limit must be a positive number of images or None, got {limit!r}")
    storage_size = image_size
    spec = parse_source(source)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    size_tag = "native" if storage_size is None else str(storage_size)
    identity = [FORMAT_VERSION, spec.kind, spec.name, split, size_tag, max_pixels]

    if spec.kind != "folder":
        listed = None  # only a folder's is taken; an archive is listed below, if no cache has it
    # an archive is stored in member order: its --limit spreads in path order, as its folder's
    by_path = spec.kind == "tar"
    if spec.kind == "folder":
        # the listing *is* the key for folders
        listed = listed if listed is not None else list_folder(spec, split)
        identity.append(listed.fingerprint)
    elif spec.kind == "tar":
        assert spec.location is not None
        stat = spec.location.stat()
        identity += [str(spec.location), stat.st_size, stat.st_mtime_ns]

    def paths_of(tag: str) -> tuple[str, Path, Path]:
        ident = identity if tag == size_tag else [*identity, tag]
        key = hashlib.sha256(json.dumps(ident, default=str).encode()).hexdigest()[:20]
        stem = _cache_stem(spec, split, tag)
        return stem, root / f"{stem}-{key}.npy", root / f"{stem}-{key}.json"

    stem, npy_path, meta_path = paths_of(size_tag)
    cached = _load_cache(npy_path, meta_path)
    if cached is not None:  # the whole source is cached: a limit is a spread of it
        _remove_partials(root, stem)  # of builds that it makes pointless
        return cached.spread(limit, by_path=by_path)
    if limit is not None and spec.kind in ("folder", "tar"):
        # its own, smaller cache (the whole source's is kept for full runs): looked up before
        # listing an archive, which reads (and decompresses) all of it
        # (an archive's: "-bypath"; the limit caches of earlier selfsup spread in member order)
        limited = paths_of(f"{size_tag}-limit{limit}" + ("-bypath" if by_path else ""))
        cached = _load_cache(limited[1], limited[2])
        if cached is not None:
            return cached.spread(limit)
        if listed is None:
            listed = list_tar(spec, split)
        if limit < len(listed.paths):
            listed = listed.spread(limit)
            stem, npy_path, meta_path = limited
    if root.is_dir():
        _remove_orphans(root, stem)
        _remove_partials(root, stem, keep=npy_path)

    _check_cache_root(root)
    _build_cache(
        spec,
        source,
        split,
        listed,
        npy_path,
        meta_path,
        root,
        storage_size=storage_size,
        workers=workers,
        progress=progress,
        max_pixels=max_pixels,
    )
    _remove_stale(root, stem, keep=npy_path.stem.rsplit("-", 1)[1])
    _remove_partials(root, stem)
    loaded = _load_cache(npy_path, meta_path)
    if loaded is None:  # pragma: no cover - only if the disk changed under us
        raise DataError(f"the cache {npy_path} just written cannot be read back; check the disk")
    return loaded.spread(limit, by_path=by_path)


def _build_cache(
    spec: SourceSpec,
    source: str | os.PathLike[str],
    split: str,
    listed: ListedSource | None,
    npy_path: Path,
    meta_path: Path,
    root: Path,
    *,
    storage_size: int | None,
    workers: int | None,
    progress: bool,
    max_pixels: int | None,
) -> None:
    """Decode ``split`` of the source (``listed``'s files for a folder or archive, else its
    arrays) into ``npy_path`` and write ``meta_path`` beside it (paths, labels, classes,
    skipped files, shape). A full disk is a DataError that says where to make room."""
    try:
        worker_count = workers if workers is not None else min(8, os.cpu_count() or 1)
        if spec.kind in ("folder", "tar"):
            if listed is None:
                listed = list_tar(spec, split)
            shape, meta = _decode_listed(
                spec,
                listed,
                split,
                npy_path,
                storage_size=storage_size,
                workers=max(1, worker_count),
                progress=progress,
                max_pixels=max_pixels,
            )
        else:
            arrays = load_array_source(spec, split, download_root=root / "torchvision")
            shape = _write_arrays(arrays, npy_path, storage_size, progress)
            meta = {
                "paths": arrays.paths,
                "labels": None if arrays.labels is None else arrays.labels.tolist(),
                "classes": arrays.classes,
                "skipped": [],
            }
        meta.update(
            format=FORMAT_VERSION, name=spec.name, source=os.fspath(source), split=split,
            storage_size=storage_size, shape=list(shape),
        )  # fmt: skip
        atomic_write_text(meta_path, json.dumps(meta))
    except OSError as error:
        # _decode_listed / _write_arrays removed their partial file: the disk has its room back
        if error.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        raise DataError(
            f"cannot write the data cache {npy_path} ({error.strerror}); free space there, or "
            "set data.cache_dir (eval/embed: --cache-dir) or $SELFSUP_CACHE to a disk with room"
        ) from None


def _check_cache_root(root: Path) -> None:
    """A DataError naming the settings to change unless the cache folder ``root`` is (or can
    be made) a writable folder: said before any decoding."""
    if root.exists() and not root.is_dir():
        raise DataError(
            f"the data cache folder {root} is a file, not a folder; pass another cache_dir "
            "(data.cache_dir; eval/embed: --cache-dir) or set $SELFSUP_CACHE"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise DataError(
            f"cannot write the data cache to {root} ({error.strerror or error}); set "
            "data.cache_dir (eval, embed, neighbors: --cache-dir) or $SELFSUP_CACHE to a "
            "writable folder"
        ) from error


def _decode_listed(
    spec: SourceSpec,
    listed: ListedSource,
    split: str,
    npy_path: Path,
    *,
    storage_size: int | None,
    workers: int,
    progress: bool,
    max_pixels: int | None,
) -> tuple[tuple[int, ...], dict[str, object]]:
    """Decode a folder's or archive's ``listed`` images into the cache file ``npy_path``; an
    interrupted build of the same file goes on where it stopped, and a stop (Ctrl-C, SIGTERM)
    keeps what was decoded for the next one. Returns the array's shape and the cache's
    paths, labels, classes and skipped files."""
    # an interrupted build of this very cache (same key: the same files) goes on
    partial = _PartialBuild(npy_path, len(listed.paths)).open()
    writer = _NpyWriter(npy_path, partial)
    kept, skipped = partial.kept, partial.skipped
    if kept or skipped:
        print(
            f"selfsup: continuing an interrupted decoding of {spec.name} ({split}): "
            f"{len(kept) + len(skipped):,} of {len(listed.paths):,} images done",
            file=sys.stderr,
        )
    try:
        with sigterm_as_interrupt():  # a scheduler's stop keeps the decoded rows too
            _decode_into(
                listed, writer, storage_size, workers, progress, max_pixels, split,
                kept=kept, skipped=skipped, checkpoint=partial.saver(writer),
            )  # fmt: skip
        if not kept:
            every_skip = sorted(listed.skipped + skipped)
            total = len(listed.paths) + len(listed.skipped)
            examples = "; ".join(f"{path}: {reason}" for path, reason in every_skip[:5])
            raise DataError(
                f"data source {spec.location} (split '{split}') holds no usable images: "
                f"{summarize_skips(every_skip, total)} (e.g. {examples}); point it at a "
                "folder or archive of readable .jpg/.png images"
            )
        shape = writer.commit()
    except Exception:  # failed for good: nothing to continue from
        writer.abort()
        partial.discard()
        raise
    except BaseException:  # Ctrl-C, SIGTERM: the next build continues from here
        partial.release(writer, kept, skipped)
        raise
    partial.finish()
    meta = {
        "paths": [listed.paths[i] for i in kept],
        "labels": None if listed.labels is None else [listed.labels[i] for i in kept],
        "classes": listed.classes,
        "skipped": sorted(listed.skipped + skipped),
    }
    return shape, meta


def write_skip_report(dataset: ImageDataset, path: str | os.PathLike[str]) -> str:
    """Write ``dataset.skipped`` as a CSV (``path,reason``) and return the one-line summary.

    Returns:
        e.g. ``"skipped 5 of 1,205 files: 2 corrupt, 1 zero-byte, 2 not an image"``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        # backslashreplace: file names that are not valid UTF-8 still produce a readable CSV.
        with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "reason"])
            writer.writerows(dataset.skipped)

    atomic_write(target, write)  # a stop mid-write leaves the last report whole
    return dataset.skip_summary()


# --------------------------------------------------------------------------- decoding


def _decode_one(
    read: Callable[[], bytes], path: str, storage_size: int | None, max_pixels: int | None
) -> np.ndarray:
    """Read, decode and resize one item to uint8 ``[3, H, W]``."""
    try:
        data = read()
    except OSError as error:
        raise BadImageError(f"{UNREADABLE}: {error.strerror or error}", name=path) from None
    image = decode_image(data, name=path, max_pixels=max_pixels)
    if storage_size is not None:
        image = resize_shorter(image, storage_size)
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def _decode_into(
    listed: ListedSource,
    writer: _NpyWriter,
    storage_size: int | None,
    workers: int,
    progress: bool,
    max_pixels: int | None,
    split: str = "",
    *,
    kept: list[int] | None = None,
    skipped: list[tuple[str, str]] | None = None,
    checkpoint: Callable[[list[int], list[tuple[str, str]]], None] | None = None,
) -> tuple[list[int], list[tuple[str, str]]]:
    """Decode every item in parallel, appending results to ``writer`` in item order.

    ``kept`` / ``skipped``: the outcome of the items an interrupted build decoded already (their
    rows in ``writer``); decoding goes on after them. ``checkpoint(kept, skipped)`` is called
    every :data:`PARTIAL_SAVE_EVERY_S` seconds, with ``writer`` holding the rows of ``kept``.

    Returns:
        ``(indices of the items kept, (path, reason) of the items that failed)``.
    """
    kept = [] if kept is None else kept
    skipped = [] if skipped is None else skipped
    start = len(kept) + len(skipped)  # every item is kept or skipped, in order
    window: deque[tuple[int, str, Future[np.ndarray]]] = deque()
    max_in_flight = 4 * workers  # bounds memory while keeping every worker busy
    saved_at, every = time.monotonic(), PARTIAL_SAVE_EVERY_S

    def consume(bar: tqdm) -> None:
        nonlocal saved_at, every
        index, path, future = window.popleft()
        try:
            chw = future.result()
        except BadImageError as error:
            skipped.append((path, error.reason))
        else:
            writer.append(chw, path=path)
            kept.append(index)
        bar.update(1)
        if checkpoint is not None and time.monotonic() - saved_at > every:
            began = time.monotonic()
            checkpoint(kept, skipped)
            saved_at = time.monotonic()
            # at most ~5% of the time on saves (the progress of a million images takes a while)
            every = max(PARTIAL_SAVE_EVERY_S, 20 * (saved_at - began))

    description = f"decoding {listed.spec.name} {split}".rstrip()
    with (
        _quiet_pil_warnings(),
        tqdm(
            total=len(listed.paths),
            initial=start,
            desc=description,
            unit="img",
            disable=not progress,
            **bar_options(),
        ) as bar,
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="selfsup-decode") as pool,
    ):
        try:
            for index, (path, read) in enumerate(listed.payloads(start), start=start):
                future = pool.submit(_decode_one, read, path, storage_size, max_pixels)
                window.append((index, path, future))
                while len(window) >= max_in_flight:
                    consume(bar)
            while window:
                consume(bar)
        except BaseException:
            for _, _, future in window:
                future.cancel()
            raise
    return kept, skipped


@contextlib.contextmanager
def _quiet_pil_warnings() -> Iterator[None]:
    """Silence PIL's per-file warnings (damaged EXIF, oversized tags) during a bulk decode.

    Entered only by the calling thread, around the worker pool, because
    ``warnings.catch_warnings`` is not safe to enter from several threads at once. Our own
    pixel limit replaces PIL's ``DecompressionBombWarning``.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        yield


def _write_arrays(
    arrays: ArraySource, npy_path: Path, storage_size: int | None, progress: bool
) -> tuple[int, ...]:
    writer = _NpyWriter(npy_path)
    try:
        images: Iterable[np.ndarray] = arrays.images
        if storage_size is not None:
            images = tqdm(
                images,
                desc=f"resizing {arrays.spec.name}",
                disable=not progress,
                **bar_options(),
            )
        for image, path in zip(images, arrays.paths, strict=True):
            if storage_size is not None:
                image = resize_shorter(image, storage_size)
            writer.append(image.transpose(2, 0, 1), path=path)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


class _NpyWriter:
    """Append equally-shaped uint8 arrays to a ``.npy`` file, then atomically move it in place.

    A fixed-size header is reserved up front and filled in by :meth:`commit`, once the number
    of rows is known, so rows stream to disk without holding the dataset in memory.
    """

    def __init__(self, final_path: Path, partial: _PartialBuild | None = None) -> None:
        """A new private temporary file, or ``partial``'s file (claimed, holding its rows)."""
        self.final_path = final_path
        self.row_shape: tuple[int, ...] | None = None
        self.first_path = ""
        self.rows = 0
        if partial is not None:
            self.tmp_path, self.handle = partial.data_path, partial.handle
            self.rows, self.row_shape = partial.rows, partial.row_shape
            self.first_path = partial.first_path
            return
        self.tmp_path = final_path.with_name(
            f".{final_path.name}.{_writer_tag()}.{uuid.uuid4().hex[:8]}.tmp"
        )
        self.handle = open(self.tmp_path, "wb")
        self.handle.write(b"\0" * _HEADER_BYTES)

    def append(self, row: np.ndarray, *, path: str) -> None:
        if self.row_shape is None:
            self.row_shape, self.first_path = tuple(row.shape), path
        elif tuple(row.shape) != self.row_shape:
            raise DataError(
                f"images differ in size ({self.first_path} is {_hw(self.row_shape)}, {path} is "
                f"{_hw(row.shape)}); set image_size (the storage size, e.g. 64) to resize every "
                "image to one size"
            )
        self.handle.write(np.ascontiguousarray(row, dtype=np.uint8).tobytes())
        self.rows += 1

    def commit(self) -> tuple[int, ...]:
        if self.row_shape is None:
            raise DataError(f"no images to write to {self.final_path}")
        shape = (self.rows, *self.row_shape)
        self.handle.seek(0)
        self.handle.write(_npy_header(shape))
        self.handle.flush()
        os.fsync(self.handle.fileno())
        # renamed while still open: the header and every row are on disk under the old name,
        # and no build can claim a partial file once it is the cache
        os.replace(self.tmp_path, self.final_path)
        self.handle.close()
        return shape

    def flush(self) -> None:
        """Every row appended so far on disk (before a progress file says they are there)."""
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def abort(self) -> None:
        try:
            if not self.handle.closed:
                self.handle.close()  # flushes, which fails again on a full disk
        except OSError:
            pass
        finally:
            self.tmp_path.unlink(missing_ok=True)


#: seconds between saves of a decode's progress (a kill loses about this much; more when a save
#: itself takes long, as for a million images)
PARTIAL_SAVE_EVERY_S = 5.0


_PARTIAL_MAGIC = b"SELFSUP-PARTIAL "  # in the reserved .npy header while a build writes


class _PartialBuild:
    """A folder or archive decode that an interruption (Ctrl-C, SIGTERM, ``kill -9``, a lost
    job) does not throw away, and that the next build of the same cache (same key: the same
    files) continues after its last saved image.

    Each build writes its own file, ``.<cache>.npy.partial.<token>`` (token: host, pid and a
    random tag, also written into the file's reserved header), and saves its progress to the
    ``.json`` beside it every few seconds. A stopped build (Ctrl-C, SIGTERM) *releases* both by
    renaming them to ``.<cache>.npy.partial`` and ``.<cache>.npy.partial.json``; a killed one
    leaves them under its token, with its pid. A new build claims a released partial, or one of a
    dead process of this machine, by renaming it to its own token: a rename has one winner, so no
    two builds ever write one file (with no file locks, which some shared filesystems lack). The
    progress file counts only if it names the token in the data file's header and the rows it
    counts are there; otherwise the claimed file is started over."""

    def __init__(self, npy_path: Path, items: int) -> None:
        self.npy_path = npy_path
        self.items = items  # listed items: the progress of another listing is not ours
        self.token = f"{_writer_tag()}-{uuid.uuid4().hex[:8]}"
        self.data_path = self._data(self.token)
        self.progress_path = self._progress(self.data_path)
        self.handle = None
        self.rows, self.row_shape, self.first_path = 0, None, ""
        self.kept: list[int] = []
        self.skipped: list[tuple[str, str]] = []

    def _data(self, token: str | None) -> Path:
        suffix = f".partial.{token}" if token else ".partial"
        return self.npy_path.with_name(f".{self.npy_path.name}{suffix}")

    @staticmethod
    def _progress(data: Path) -> Path:
        return data.with_name(data.name + ".json")

    def open(self) -> _PartialBuild:
        """Claim a released or dead build of this cache (else start a new file), read how far it
        got, and open the file for appending after its saved rows."""
        claimed = self._claim()
        fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, default_file_mode())
        handle = os.fdopen(fd, "r+b")
        self.handle = handle
        if claimed:
            head = handle.read(_HEADER_BYTES)
            self._read_progress(head, os.fstat(handle.fileno()).st_size)
        row_bytes = int(np.prod(self.row_shape)) if self.row_shape else 0
        handle.truncate(_HEADER_BYTES + self.rows * row_bytes)  # rows after the last save go
        handle.seek(0)
        handle.write((_PARTIAL_MAGIC + self.token.encode()).ljust(_HEADER_BYTES, b"\0"))
        handle.seek(0, os.SEEK_END)
        return self

    def _claim(self) -> bool:
        released = self._data(None)
        candidates = [(released, self._progress(released))]
        for data in _dead_builds(self.npy_path):
            candidates.append((data, self._progress(data)))
        for data, progress in candidates:
            try:
                os.rename(data, self.data_path)  # one winner, even among several machines
            except OSError:
                continue  # gone (another build took it), or not ours to take
            with contextlib.suppress(OSError):
                os.rename(progress, self.progress_path)
            return True
        return False

    def _read_progress(self, head: bytes, size: int) -> None:
        try:
            state = json.loads(self.progress_path.read_text(encoding="utf-8"))
            token = head[len(_PARTIAL_MAGIC) :].rstrip(b"\0").decode()
            kept = [int(i) for i in state["kept"]]
            skipped = [(str(p), str(r)) for p, r in state["skipped"]]
            shape = tuple(int(v) for v in state["row_shape"]) if state["row_shape"] else None
            row_bytes = int(np.prod(shape)) if shape else 0
            ok = (
                head.startswith(_PARTIAL_MAGIC)
                and state["token"] == token  # the progress of this very file
                and state["format"] == FORMAT_VERSION
                and state["items"] == self.items
                and (shape is not None or not kept)
                and size >= _HEADER_BYTES + len(kept) * row_bytes  # the rows are there
                and kept == sorted(kept)
                and len(kept) + len(skipped) <= self.items
            )
            first_path = str(state.get("first_path", ""))
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
            ok = False
        if ok:
            self.kept, self.skipped, self.row_shape, self.rows = kept, skipped, shape, len(kept)
            self.first_path = first_path

    def save(self, writer: _NpyWriter, kept: list[int], skipped: list[tuple[str, str]]) -> None:
        """Record ``kept`` / ``skipped`` as done, their rows flushed to disk first. (``writer``
        may hold one row more, appended as the stop came: it is cut off and decoded again.)"""
        writer.flush()
        state = {
            "format": FORMAT_VERSION,
            "token": self.token,
            "items": self.items,
            "kept": kept,
            "skipped": skipped,
            "row_shape": list(writer.row_shape) if writer.row_shape else None,
            "first_path": writer.first_path,
        }
        atomic_write_text(self.progress_path, json.dumps(state))

    def saver(self, writer: _NpyWriter) -> Callable[[list[int], list[tuple[str, str]]], None]:
        """The periodic ``checkpoint`` of :func:`_decode_into`."""
        return lambda kept, skipped: self.save(writer, kept, skipped)

    def release(self, writer: _NpyWriter, kept: list[int], skipped: list[tuple[str, str]]) -> None:
        """Stopped: save how far it got, close, and hand both files over to the next build (the
        progress first: a claimer takes the data file last renamed)."""
        try:
            self.save(writer, kept, skipped)
            if self.handle is not None:
                self.handle.close()
            released = self._data(None)
            os.replace(self.progress_path, self._progress(released))
            os.replace(self.data_path, released)
        except OSError:  # a full disk: the next build starts over
            self.discard()

    def discard(self) -> None:
        """Failed for good (no usable images, sizes that differ, a full disk): nothing kept."""
        if self.handle is not None and not self.handle.closed:
            with contextlib.suppress(OSError):
                self.handle.close()
        self.progress_path.unlink(missing_ok=True)
        self.data_path.unlink(missing_ok=True)

    def finish(self) -> None:
        """The file is in place as the cache (renamed by the writer): its progress is no more."""
        self.progress_path.unlink(missing_ok=True)


_PARTIAL_NAME = re.compile(
    r"\.(?P<cache>.+-[0-9a-f]{20}\.npy)\.partial"
    r"(?:\.(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[0-9a-f]{8})?(?P<json>\.json)?"
)


def _writer_gone(host: str, pid: str, path: Path, here: str) -> bool:
    """Whether the process ``host``-``pid`` that writes ``path`` is gone: judged by pid on this
    machine (``here``); another machine's file is left a day (no build idles that long)."""
    try:
        if host != here:
            return time.time() - path.stat().st_mtime > 86400
        os.kill(int(pid), 0)  # raises if no such process
    except ProcessLookupError:
        return True
    except OSError:  # gone already, or a process of another user: not ours to judge
        return False
    return False


def _is_dead_build(match: re.Match[str], path: Path, here: str) -> bool:
    """A partial build under a token whose process is gone (:func:`_writer_gone`)."""
    return _writer_gone(match.group("host"), match.group("pid"), path, here)


def _dead_builds(npy_path: Path) -> list[Path]:
    """The data files of killed builds of the cache ``npy_path``, on this machine."""
    here = _writer_tag().rsplit("-", 1)[0]
    found = []
    for path in npy_path.parent.glob(f".{glob.escape(npy_path.name)}.partial.*"):
        match = _PARTIAL_NAME.fullmatch(path.name)
        if match and match.group("pid") and not match.group("json"):
            if match.group("host") == here and _is_dead_build(match, path, here):
                found.append(path)
    return found


def _hw(shape: Sequence[int]) -> str:
    return f"{shape[-2]}x{shape[-1]}"


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """A version-1.0 ``.npy`` header for a C-order uint8 array, padded to ``_HEADER_BYTES``."""
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape!r}, }}"
    body_len = _HEADER_BYTES - 10  # magic (6) + version (2) + header length (2)
    if len(text) + 1 > body_len:
        raise ValueError(f"shape {shape} does not fit the reserved .npy header")
    body = text.ljust(body_len - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", body_len) + body.encode("latin1")


# --------------------------------------------------------------------------- cache files


def _cache_stem(spec: SourceSpec, split: str, size_tag: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.name)[:40] or "data"
    where = hashlib.sha256(str(spec.location or spec.name).encode()).hexdigest()[:8]
    split_slug = re.sub(r"[^A-Za-z0-9._-]+", "_", split)[:20]
    return f"{slug}-{where}-{split_slug}-{size_tag}"


def _load_cache(npy_path: Path, meta_path: Path) -> ImageDataset | None:
    """The cached dataset, or ``None`` when it is missing, from another version or broken."""
    if not (npy_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_VERSION:
            return None
        array = np.load(npy_path, mmap_mode="c", allow_pickle=False)
        if list(array.shape) != meta["shape"] or array.dtype != np.uint8:
            return None
        labels = meta["labels"]
        if labels is not None and len(labels) != array.shape[0]:
            return None
        return ImageDataset(
            images=torch.from_numpy(array),
            labels=None if labels is None else torch.tensor(labels, dtype=torch.int64),
            classes=meta["classes"],
            paths=meta["paths"],
            name=meta["name"],
            skipped=[(str(p), str(r)) for p, r in meta["skipped"]],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or inconsistent: rebuild


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name, fsync, rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.{_writer_tag()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def os_error_behind(exc: BaseException) -> OSError | None:
    """The OSError (full disk, file-size limit, ...) a writer's RuntimeError hides, if any:
    ``torch.save`` turns a failed write into ``RuntimeError: [enforce fail ...] unexpected
    pos``, with the OSError only as its context."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, fsync, rename onto ``path``: readers,
    and a run killed mid-write, see the old file or the new one, never a torn one. ``tmp`` ends
    in ``path``'s suffix (numpy and others append their own otherwise)."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        try:
            write(tmp)
        except RuntimeError as exc:
            if (cause := os_error_behind(exc)) is not None:
                raise cause from None
            raise
        os.chmod(tmp, default_file_mode())  # some writers (safetensors) create files as 0600
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (``mkstemp`` gives
    0600, which would leave checkpoints unreadable to the group that reads the rest of a run)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _writer_tag() -> str:
    """``<host>-<pid>`` for temporary names: which process on which machine is writing (a cache
    folder may be shared by several machines)."""
    host = re.sub(r"[^A-Za-z0-9]+", "", socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}"


def _remove_orphans(root: Path, stem: str) -> None:
    """Delete the temporary files of builds of this cache whose process is gone (``kill -9``,
    a pre-empted job): each is as large as the dataset. Judged by pid only for this machine's
    writers; another machine's file is left a day (no build idles that long). A file touched in
    the last minute is always left."""
    # the temporary names of _NpyWriter and atomic_write_text
    name = r"-[0-9a-f]{20}\.(npy|json)\.([A-Za-z0-9]+)-(\d+)\.[0-9a-f]{8}\.tmp"
    pattern = re.compile(r"\." + re.escape(stem) + name)
    here, now = _writer_tag().rsplit("-", 1)[0], time.time()
    for path in root.iterdir():
        match = pattern.fullmatch(path.name)
        if not match:
            continue
        try:
            if now - path.stat().st_mtime < 60:
                continue
        except OSError:  # gone already
            continue
        if _writer_gone(match.group(2), match.group(3), path, here):
            path.unlink(missing_ok=True)


def _remove_partials(root: Path, stem: str, *, keep: Path | None = None) -> None:
    """Delete the partial builds (:class:`_PartialBuild`) of this source, split and size, and
    of its ``--limit`` caches, that can never be continued: released or dead ones of another key
    (their files have changed since) and, once a cache is complete, those of its own key (each
    is as large as the rows it holds). ``keep``: the cache about to be built, whose released or
    dead partial is continued. A build still writing (a live token) is left alone."""
    here = _writer_tag().rsplit("-", 1)[0]
    prefix = re.compile(re.escape(stem) + r"(?:-limit\d+)?-[0-9a-f]{20}\.npy")
    for path in root.glob(f".{glob.escape(stem)}*.npy.partial*"):
        match = _PARTIAL_NAME.fullmatch(path.name)
        if not match or not prefix.fullmatch(match.group("cache")):
            continue
        if keep is not None and match.group("cache") == keep.name:
            continue  # ours to continue
        if match.group("pid") and not _is_dead_build(match, path, here):
            continue
        path.unlink(missing_ok=True)


def _remove_stale(root: Path, stem: str, *, keep: str) -> None:
    """Delete caches of the same source, split and size with another key (outdated builds)."""
    pattern = re.compile(re.escape(stem) + r"-([0-9a-f]{20})\.(npy|json)")
    for path in root.iterdir():
        match = pattern.fullmatch(path.name)
        if match and match.group(1) != keep:
            path.unlink(missing_ok=True)
