"""Checkpoints written so that a crash at any moment leaves a loadable latest checkpoint.

``save_checkpoint`` writes to a temporary file in the same directory, fsyncs it, moves the old
``last.pt`` to ``prev.pt`` and renames the new file into place (``os.replace`` is atomic on POSIX),
then fsyncs the directory. ``load_checkpoint`` falls back to ``prev.pt`` when ``last.pt`` is broken.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from selfsup.data.cache import atomic_write, default_file_mode, os_error_behind
from selfsup.errors import CheckpointError, ConfigError

FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save(obj: Any, fh: Any) -> None:
    """torch.save, with a full disk reported as the OSError it is (torch wraps it)."""
    try:
        torch.save(obj, fh)
    except RuntimeError as exc:
        if (cause := os_error_behind(exc)) is not None:
            raise cause from None
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save via temp file + fsync + rename (:func:`atomic_write`): readers see the old or
    the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        # into an open file: given a path, torch.save names the archive's records after the
        # (random) temporary name, and the same weights would give other bytes each time
        with open(tmp, "wb") as fh:
            _save(obj, fh)  # a full disk: the OSError, as a checkpoint's

    atomic_write(path, write)
    _fsync_dir(path.parent)


def save_checkpoint(state: dict[str, Any], directory: Path) -> Path:
    """Write ``directory/last.pt`` atomically, keeping the previous one as ``prev.pt``."""
    directory.mkdir(parents=True, exist_ok=True)
    last = directory / "last.pt"
    state = {**state, "format_version": FORMAT_VERSION}
    fd, tmp = tempfile.mkstemp(prefix=".last.pt.", suffix=".tmp", dir=directory)
    os.fchmod(fd, default_file_mode())
    try:
        with os.fdopen(fd, "wb") as fh:
            _save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if last.exists():
            os.replace(last, directory / "prev.pt")
        os.replace(tmp, last)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    return last


def _read(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a torn or foreign file: let the caller fall back
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a selfsup checkpoint")
    return state


def checkpoint_position(directory: Path) -> tuple[int, int] | None:
    """``(epoch, step_in_epoch)`` of the checkpoint a resume would start from (``last.pt``,
    else ``prev.pt``), read with its tensors memory-mapped, not loaded; None when neither reads."""
    for name in ("last.pt", "prev.pt"):
        try:
            state = torch.load(directory / name, map_location="cpu", weights_only=False, mmap=True)
            return int(state["epoch"]), int(state["step_in_epoch"])
        except Exception:  # missing, torn or foreign: the resume itself will say so
            continue
    return None


def check_not_past_the_end(where: Path, epoch: int, step: int, epochs: int) -> None:
    """ConfigError when a checkpoint at ``epoch`` (+ ``step`` into the next) has trained more
    than ``train.epochs``: a resume can only go on."""
    if epoch > epochs or (epoch == epochs and step):
        done = f"{epoch} epochs" + (f" and {step} steps" if step else "")
        raise ConfigError(
            f"{where} has trained {done}, more than train.epochs={epochs}; a resume can only "
            f"go on: pass --epochs {epoch + (1 if step else 0)} (or more), or start over with "
            "--overwrite"
        )


def _minor(version: str) -> tuple[str, ...]:
    """Major and minor of a version string: patch releases read each other's checkpoints."""
    return tuple(version.split(".")[:2])


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (a config as plain dicts, dotted keys)."""
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}{key}."))
    return flat


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], sections: tuple[str, ...]
) -> list[str]:
    """``"model.backbone: 'resnet_tiny' in the checkpoint, 'resnet18' now"`` per differing key."""
    old = flatten({k: saved.get(k, {}) for k in sections})
    new = flatten({k: current.get(k, {}) for k in sections})
    unset = "(unset)"
    return [
        f"{key}: {old.get(key, unset)!r} in the checkpoint, {new.get(key, unset)!r} now"
        for key in sorted(old.keys() | new.keys())
        if old.get(key, unset) != new.get(key, unset)
        # a setting added since (null by default) is no difference: config_hash leaves it out
        and {old.get(key, unset), new.get(key, unset)} != {None, unset}
    ]


def load_checkpoint(
    directory: Path,
    *,
    method: str,
    config_hash: str,
    version: str | None = None,
    config: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Load the newest readable checkpoint and refuse one from another method, config or format.

    ``config``, this run's resolved config as a dict, lets a refusal name the settings that
    differ from the checkpoint's."""
    candidates = [directory / "last.pt", directory / "prev.pt"]
    errors = []
    for path in candidates:
        if not path.exists():
            continue
        try:
            state = _read(path)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        if state["format_version"] != FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has checkpoint format {state['format_version']}, this selfsup reads "
                f"{FORMAT_VERSION}; resume with the selfsup version that wrote it"
            )
        written_by = state.get("selfsup_version")
        if version is not None and written_by is not None and _minor(written_by) != _minor(version):
            raise CheckpointError(
                f"{path} was written by selfsup {written_by}, this is selfsup {version}; "
                f"resume with `pip install selfsup=={written_by}`, or start a new run"
            )
        if state.get("method") != method:
            raise CheckpointError(
                f"{path} was written by method {state.get('method')!r}, not {method!r}: the "
                f"run directory mixes two runs' files (if its config.yaml is gone, pass --method "
                f"{state.get('method')}); choose another --out, or --overwrite"
            )
        if state.get("config_hash") != config_hash:
            differ = (
                config_differences(state["config"], config, ("method", "model", "augment"))
                if config is not None and isinstance(state.get("config"), dict)
                else []
            )
            which = f": {'; '.join(differ)}" if differ else ""
            raise CheckpointError(
                f"{path} was written with another method/model/augmentation config "
                f"(hash {state.get('config_hash')} != {config_hash}){which}; resume with the "
                f"run's own settings (drop those overrides), or start a new run with --out "
                f"elsewhere or --overwrite"
            )
        if errors:  # last.pt was torn: say so, as the run goes back one checkpoint
            print(
                f"selfsup: warning: {'; '.join(errors)}; resuming from {path} instead",
                file=sys.stderr,
            )
        return state, path
    if errors:
        raise CheckpointError(
            "no readable checkpoint: " + "; ".join(errors) + "; start the run over with "
            "--overwrite (or restore the checkpoint files from a backup)"
        )
    raise CheckpointError(f"no checkpoint in {directory}; start without --resume")
