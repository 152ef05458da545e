"""A pretrain's run directory: what selfsup writes there (``RUN_OUTPUTS``, what --overwrite
removes), its lock (``.selfsup.lock``: one pretrain per run directory), and the checks and
preparation of ``--resume`` / ``--overwrite`` before any long work."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from selfsup.errors import ConfigError

VIEWS_FILE = "views.png"  # training images beside their two augmented views
# What selfsup writes into a run directory (pretrain, eval, export), by name: --overwrite removes
# these and nothing else, so other files, also inside checkpoints/, tb/ or export/, survive.
TEMPORARY_OUTPUTS = (  # what a write killed between its temp file and its rename leaves
    # .encoder.*.tmp.pt: atomic_write's name; .encoder.pt.*.tmp: that of selfsup before it
    "checkpoints/.last.pt.*.tmp", ".encoder.*.tmp.pt", ".encoder.pt.*.tmp", ".config.yaml.*.tmp",
    ".results.json.*.tmp", ".collapse.json.*.tmp", ".views.*.tmp.png", "export/.*.tmp*",
    "classifiers/.*.tmp*",
)  # fmt: skip
RUN_OUTPUTS = (
    "config.yaml", "metrics.jsonl", "results.json", "encoder.pt", "skipped.csv", "collapse.json",
    VIEWS_FILE, "eval_*.json", "subset_*.csv", "export/eval_*.json", "export/subset_*.csv",
    "checkpoints/last.pt", "checkpoints/prev.pt",
    "tb/events.out.tfevents.*",
    "export/export.json", "export/*_torchvision.pt", "export/encoder.safetensors",
    "export/encoder.torchscript.pt",
    "classifiers/*_*.pt", "classifiers/*_*.json",  # eval --save-classifiers: <data>_<protocol>
    *TEMPORARY_OUTPUTS,
)  # fmt: skip
LOCK_FILE = ".selfsup.lock"


class RunDirLock:
    """The held ``out/.selfsup.lock`` of :func:`lock_run_dir`. ``close()`` removes the lock file
    (while still holding it, so a process that opened it meanwhile sees it gone and retries on a
    new one) and, when this run made ``out`` and wrote nothing there, ``out`` itself: a finished
    run keeps only its outputs, and a run refused by its data leaves no empty directory."""

    def __init__(self, out: Path, handle, *, held: bool, created: bool):
        self.out, self.handle, self.held, self.created = out, handle, held, created

    def close(self) -> None:
        if self.handle.closed:
            return
        if self.held:
            (self.out / LOCK_FILE).unlink(missing_ok=True)
        self.handle.close()
        if self.created:
            try:
                self.out.rmdir()  # only when empty: anything written stays
            except OSError:
                pass


def lock_run_dir(out: Path) -> RunDirLock:
    """Hold ``out/.selfsup.lock`` (an exclusive ``flock``) until the returned lock is closed:
    a second pretrain on the same run, which would interleave its checkpoints, metrics and
    TensorBoard events with this one's, is refused. The lock ends with the process, however it
    ends, so a killed run leaves none held (a stale file is reused). Then removes the temporary
    files of writes that an earlier, killed process left here."""
    import fcntl

    created = not out.exists()
    _check_out_is_a_folder(out)
    path = out / LOCK_FILE
    for _ in range(100):  # retried only while other processes remove the file under us
        try:
            out.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")  # noqa: SIM115 - held open until the run ends
        except OSError as exc:  # a file in the way, a path that cannot be made
            raise ConfigError(
                f"cannot write to output directory {out}: {exc.strerror or exc}; choose a "
                "--out in a folder you can write to"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"{out} is in use by another selfsup pretrain ({holder}); wait for it to end, "
                "or choose another --out"
            ) from None
        except OSError:  # a filesystem without locks (some network mounts): run unguarded
            return RunDirLock(out, handle, held=False, created=created)
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # its holder removed the file as we locked it: lock the new one
    else:
        raise ConfigError(f"cannot lock {path}: it is removed and made again by other processes")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    for pattern in TEMPORARY_OUTPUTS:
        for leftover in out.glob(pattern):
            leftover.unlink(missing_ok=True)
    return RunDirLock(out, handle, held=True, created=created)


def has_checkpoint(out: Path) -> bool:
    """Whether run directory ``out`` holds a checkpoint to resume from (last.pt or prev.pt)."""
    return any((out / "checkpoints" / name).exists() for name in ("last.pt", "prev.pt"))


def is_selfsup_run(out: Path) -> bool:
    """Whether ``out`` holds a selfsup run: a checkpoint, or a config.yaml with its sections."""
    if has_checkpoint(out):
        return True
    try:
        config = OmegaConf.load(out / "config.yaml")
    except Exception:  # absent, unreadable or not YAML: not ours
        return False
    return isinstance(config, DictConfig) and {"method", "data", "train"} <= set(config.keys())


def remove_run_outputs(out: Path) -> None:
    """Delete a replaced run's files: its results, evaluations, exports and TensorBoard events
    would otherwise sit beside the new run's (TensorBoard would plot both as one)."""
    for pattern in RUN_OUTPUTS:
        for path in out.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink(missing_ok=True)
    for folder in ("checkpoints", "tb", "export", "classifiers"):
        if (out / folder).is_dir() and not any((out / folder).iterdir()):
            (out / folder).rmdir()


def _check_out_is_a_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out")


def check_run_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """The checks of :func:`prepare_run_dir` that change nothing: a run there without --resume
    or --overwrite, or --resume with no run there."""
    if resume and overwrite:
        raise ConfigError(
            f"--resume continues the run in {out} and --overwrite replaces it: pass one of them"
        )
    _check_out_is_a_folder(out)
    marker = out / "config.yaml"
    if marker.exists() and not (resume or overwrite):
        raise ConfigError(
            f"{out} already holds a run (config.yaml); pass --resume to continue it, --overwrite "
            f"to replace it, or choose another --out"
        )
    if resume and not marker.exists() and not has_checkpoint(out):
        # with config.yaml but no checkpoint yet (killed early), --resume restarts from step 0
        raise ConfigError(
            f"--resume: {out} holds no run (no config.yaml, no checkpoints/last.pt); "
            f"start without --resume"
        )


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory; check it is writable before any long work."""
    check_run_dir(out, resume=resume, overwrite=overwrite)
    marker = out / "config.yaml"
    if overwrite and not resume and out.exists():
        if is_selfsup_run(out):
            remove_run_outputs(out)
        elif marker.exists():  # someone else's config.yaml: the new run would replace it
            raise ConfigError(
                f"--overwrite: {marker} is not a selfsup run's config; --overwrite replaces "
                "selfsup runs only. Choose another --out"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write to output directory {out}: {exc.strerror or exc}; choose a --out in "
            "a folder you can write to"
        ) from None
