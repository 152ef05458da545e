"""Checks of user input that need no torch, made before any long work starts."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from selfsup.errors import ConfigError, SelfsupError


def check_encode_args(image_size: int | None, batch_size: int | None) -> None:
    """Refuse an impossible ``--image-size`` or ``--batch-size`` of eval, embed and neighbors
    before any data is loaded."""
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if image_size is not None and image_size < 8:  # as pretrain's data.image_size
        raise ConfigError(f"--image-size must be >= 8 pixels, got {image_size}")


def check_not_blocked(folder: Path, what: str) -> None:
    """A ConfigError when a file stands where ``folder`` (or a folder above it) would be;
    nothing is created."""
    try:
        blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    except OSError:  # a parent that cannot be looked into: the write says why
        blocker = None
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"cannot write {what} to {folder}: {blocker} is a file, not a folder")


def check_writable(folder: Path, what: str, fix: str = "choose a writable place") -> None:
    """A ConfigError now, not after the whole evaluation, when ``folder`` takes no files (it is
    created if missing); ``fix`` says how to write elsewhere."""
    probe = folder / f".selfsup-write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    check_not_blocked(folder, what)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write {what} to {folder} ({exc.strerror or exc}); {fix}"
        ) from None


def read_text_file(
    path: Path,
    what: str,
    error: type[SelfsupError] = ConfigError,
    fix: str = "save it as UTF-8 text",
) -> str:
    """The text of a file the user named (``what``: "preset file", "query list"): UTF-8, its
    byte-order mark dropped, or UTF-16 with one (as Windows editors save them). A folder, an
    unreadable file or one of no such text (a binary file) is one ``error`` line; ``fix`` says
    what to do about the last."""
    if path.is_dir():
        raise error(f"{what} {path} is a folder, not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text (a binary file?); {fix}") from None
