"""Pretraining as one call: what ``selfsup pretrain`` does, for the command line and for Python.

:func:`pretrain_config` resolves the run's settings (a resumed run's own ``config.yaml``, else
preset + flags + overrides), :func:`run_pretrain` trains them into a run directory (the lock,
the refusal to mix two runs, torchrun's process group), and :func:`pretrain` is both for Python::

    import selfsup

    result = selfsup.pretrain("byol", data="path/to/images", epochs=100, out="runs/byol",
                              overrides={"optim.lr": 0.5})
    result.results["knn_top1"], result.run_dir / "encoder.pt"
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfsup.errors import ConfigError, DataError, SelfsupError

if TYPE_CHECKING:  # the trainer imports torch: not for `import selfsup`
    from selfsup.train.trainer import TrainResult

QUICKSTART_OUT = "runs/quickstart"
QUICKSTART_SOURCE = "mnist5k"  # the quickstart preset's data.source

# The settings with a flag of their own: each key is a keyword of :func:`pretrain` and, spelled
# ``--batch-size``, a flag of ``selfsup pretrain`` / ``selfsup config`` (its argparse dest).
RUN_FLAGS = {
    "data": "data.source",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "backbone": "model.backbone",
    "image_size": "data.image_size",
    "limit": "data.limit",
    "device": "train.device",
}


def flag_spellings(*, command_line: bool) -> dict[str, str]:
    """How the user wrote each flag setting, for messages: ``--batch-size `` on the command
    line, ``batch_size=`` in Python (the value follows)."""
    if command_line:
        return {setting: f"--{name.replace('_', '-')} " for name, setting in RUN_FLAGS.items()}
    return {setting: f"{name}=" for name, setting in RUN_FLAGS.items()}


def is_first_rank() -> bool:
    """True outside torchrun, and on its rank 0: the process that prints what every rank sees.

    Read from the environment, so that it holds before the process group is up."""
    return os.environ.get("RANK", "0") == "0"


def default_preset(preset: str | None, data: str | None) -> str | None:
    """The preset a run takes without ``--preset``: the quickstart's for no data or its digits
    (``mnist5k``: not resnet18's 100 epochs at batch 512 of the general defaults), else none."""
    return preset or ("quickstart" if data in (None, QUICKSTART_SOURCE) else None)


def default_out(cfg, method: str, data: str | None) -> Path:
    """runs/quickstart(-<method>) for the quickstart, one directory per method so all four can
    be tried side by side; else runs/<method>."""
    if cfg.data.source == QUICKSTART_SOURCE and data is None:
        return Path(QUICKSTART_OUT if method == "simclr" else f"{QUICKSTART_OUT}-{method}")
    return Path(f"runs/{method}")


def pretrain_config(
    method: str | None,
    data: str | None,
    *,
    preset: str | None,
    out: Path | None,
    resume: bool,
    flags: dict[str, Any],
    overrides: list[str],
    command_line: bool = True,
):
    """The resolved config and output directory of a pretrain; every error before long work.

    ``--resume`` of a run with a ``config.yaml`` starts from that file (flags and overrides
    given now still apply); otherwise the preset (``quickstart`` without ``data`` or with
    ``mnist5k``), ``method`` (else the preset file's ``method.name``, else simclr), flags and
    ``key=value`` overrides. ``command_line`` says how messages name the flags (``--epochs 2``,
    else :func:`pretrain`'s ``epochs=2``).
    """
    from omegaconf import OmegaConf

    from selfsup.train.config import load_run_config, refuse_flag_and_override, resolve_config

    refuse_flag_and_override(flags, overrides, flag_spellings(command_line=command_line))
    saved = out / "config.yaml" if out else None
    if resume and saved is not None and saved.exists():
        base = load_run_config(saved)
        if OmegaConf.select(base, "method.name") is None:
            raise ConfigError(
                f"{saved} names no method (method.name): it is empty or not a selfsup run's "
                "config.yaml; restore the run's own file to resume it"
            )
        if method and method != base.method.name:
            raise ConfigError(
                f"{saved} is a {base.method.name} run; --method {method} cannot resume it"
            )
        cfg = resolve_config(
            method or base.method.name, preset=str(saved), flags=flags, overrides=overrides
        )
        _refuse_changes_to_a_finished_run(out, base, cfg)
        _follow_the_optimizer(base, cfg, overrides)
    else:
        preset = default_preset(preset, data)
        cfg = resolve_config(method, preset=preset, flags=flags, overrides=overrides)
        # a preset for a folder (imagenette) leaves the quickstart's digits as the source
        if data is None and preset != "quickstart" and cfg.data.source == QUICKSTART_SOURCE:
            raise ConfigError(
                f"--preset {preset} needs --data (an image folder or .tar.gz); it names no "
                "data source of its own"
            )
    from selfsup.models.weights import IMAGENET

    if cfg.model.init and cfg.model.init != IMAGENET:  # recorded as a path from anywhere
        cfg.model.init = str(Path(cfg.model.init).expanduser().absolute())
    out = out or default_out(cfg, cfg.method.name, data)
    cfg.out = str(out)
    return cfg, out


def _follow_the_optimizer(base, cfg, overrides: list[str]) -> None:
    """``--resume optim.name=lars`` of an SGD run: ``optim.exclude_bias_norm``, which the run
    had at SGD's default (off), takes LARS's (on), as a new LARS run would. A value given now
    is kept, and so is one unlike the old optimizer's default (the run set it; one it set to
    that default cannot be told from it, and follows the new optimizer too)."""
    from selfsup.train.config import override_keys

    given = "optim.exclude_bias_norm" in override_keys(overrides)
    was_default = base.optim.get("exclude_bias_norm") in (None, base.optim.name == "lars")
    if cfg.optim.name == base.optim.name or given or not was_default:
        return
    cfg.optim.exclude_bias_norm = cfg.optim.name == "lars"
    if is_first_rank():
        print(
            f"selfsup: optim.name {base.optim.name} -> {cfg.optim.name}: "
            f"optim.exclude_bias_norm={str(cfg.optim.exclude_bias_norm).lower()}, "
            f"{cfg.optim.name}'s default (biases and norm parameters "
            + ("left out of" if cfg.optim.exclude_bias_norm else "included in")
            + " weight decay and LARS adaptation); pass optim.exclude_bias_norm to choose",
            file=sys.stderr,
        )


# what a finished run's --resume may change: how to run (train.*, but for what _TRAINED_WITH
# names), where its cache is; the method, model and augmentation are refused by the
# checkpoint's config hash, with the key named
_FREE_ON_RESUME = (
    "train.",
    "method.",
    "model.",
    "augment.",
    "out",
    "data.cache_dir",
    "data.workers",
)
# the train.* settings its weights and results.json were made with
_TRAINED_WITH = (
    "train.batch_size",
    "train.seed",
    "train.precision",
    "train.sync_bn",
    "train.on_nan",
    "train.knn_k",
    "train.knn_temperature",
)


def _refuse_changes_to_a_finished_run(out: Path, base, cfg) -> None:
    """``--resume`` of a finished run (its checkpoint at the end of ``train.epochs``, so it
    trains nothing more) must not rewrite its config.yaml and results.json with other data or
    settings: they would describe a training that never happened (and ``encoder_metadata``
    would hand out another image size). Said before any image is decoded."""
    from omegaconf import OmegaConf

    from selfsup.train.checkpoint import check_not_past_the_end, checkpoint_position, flatten

    epochs = cfg.train.epochs
    position = checkpoint_position(out / "checkpoints")
    if position is not None:  # as the trainer says it, but before the data is decoded
        check_not_past_the_end(out / "checkpoints", *position, epochs)
    if position != (epochs, 0):
        return  # more to train (the new settings are what it trains with), or no checkpoint
    before = flatten(OmegaConf.to_container(base, resolve=True))
    now = flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = [
        f"{key}={now[key]!r} (the run's: {before[key]!r})"
        for key in now
        if key in before
        and now[key] != before[key]
        and (key in _TRAINED_WITH or not key.startswith(_FREE_ON_RESUME))
    ]
    if changed:
        trained = f"all {epochs} epochs" if epochs != 1 else "its 1 epoch"
        raise ConfigError(
            f"{out} is a finished run ({trained} trained): a --resume trains nothing "
            f"more, so {'; '.join(changed)} would only rewrite its records. To train it further "
            f"give --epochs N (more than {epochs}); to train with other data or settings from "
            f"its encoder, start a new run: selfsup pretrain --out NEW model.init={out} ..."
        )


def check_init(cfg, out: Path, *, resume: bool, overwrite: bool):
    """``model.init``'s weights fit the backbone, and ``--overwrite`` would not delete them:
    said before the run directory is touched. Returns what
    :func:`~selfsup.train.trainer.starting_weights` read (the trainer starts from it, without
    reading the file again), or None when the run starts from no weights."""
    from selfsup.models.weights import IMAGENET
    from selfsup.train.run_dir import has_checkpoint, is_selfsup_run
    from selfsup.train.trainer import starting_weights

    if not cfg.model.init or (resume and has_checkpoint(out)):
        return None  # a resume continues from its checkpoint
    init = Path(cfg.model.init)
    if overwrite and cfg.model.init != IMAGENET and is_selfsup_run(out):
        if init.resolve().is_relative_to(out.resolve()):
            raise ConfigError(
                f"model.init={init} is inside --out {out}, which --overwrite empties first; "
                f"copy it elsewhere (cp {init} ...) and start from the copy, or choose another "
                "--out"
            )
    return starting_weights(cfg)


def _run_dir_view(out: Path) -> tuple[str | None, int | None]:
    """What this process sees of the run it resumes: its config.yaml's hash and the size of
    its last checkpoint (each None when absent). Every rank must see the same."""
    import hashlib

    config, last = out / "config.yaml", out / "checkpoints" / "last.pt"
    text = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None
    return text, last.stat().st_size if last.is_file() else None


def _lost_a_process(error: RuntimeError) -> bool:
    """A collective that failed because another process of the job is gone (killed, crashed,
    its machine lost): gloo's closed connections, NCCL's backend errors."""
    import torch.distributed as dist

    backend_error = getattr(dist, "DistBackendError", ())
    if backend_error and isinstance(error, backend_error):
        return True
    text = str(error)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer"))


def run_pretrain(cfg, out: Path, *, resume: bool, overwrite: bool):
    """Train ``cfg`` into ``out`` in this process (one of torchrun's, or alone).

    Returns the :class:`~selfsup.train.trainer.TrainResult` (``finished`` false when a signal
    or a time limit stopped it, its last checkpoint kept), or ``None`` on a rank other than 0
    when rank 0 refused the run directory (rank 0 raises why)."""
    from selfsup.train.distributed import (
        any_rank,
        barrier,
        cleanup,
        init_distributed,
        per_rank_batch_size,
        rank_zero_value,
        resume_command,
        world_size_from_env,
    )
    from selfsup.train.preflight import check_data_sources
    from selfsup.train.run_dir import lock_run_dir, prepare_run_dir
    from selfsup.train.trainer import Trainer

    check_data_sources(cfg, out)  # before --overwrite clears anything
    # under torchrun: the global batch must split over its processes, known before the data is
    # decoded (and before the process group starts)
    per_rank_batch_size(cfg.train.batch_size, world_size_from_env())
    env = init_distributed(cfg.train.device)
    lock = init = None
    try:
        if resume and env.world_size > 1:  # each rank reads the run's config and checkpoint
            seen = _run_dir_view(out)
            if any_rank(seen != rank_zero_value(seen)):
                raise ConfigError(
                    f"--resume: the {env.world_size} processes of this job do not see the same "
                    f"run in {out} (its config.yaml and checkpoints/last.pt differ between "
                    "machines, or are missing on some): --out must be a folder that every "
                    "machine shares (a network file system), as the data must be"
                )
        refused: SelfsupError | None = None
        if env.is_main:
            try:
                # before --overwrite; its weights are the trainer's, not read twice
                init = check_init(cfg, out, resume=resume, overwrite=overwrite)
                lock = lock_run_dir(out)  # before --overwrite could delete a running run's files
                prepare_run_dir(out, resume=resume, overwrite=overwrite)
            except SelfsupError as exc:
                refused = exc
        # every rank learns of rank 0's refusal, instead of waiting for it at a barrier
        if any_rank(refused is not None):
            if refused is not None:
                raise refused
            return None  # rank 0 says why
        barrier()
        try:
            return Trainer(cfg, out, resume=resume, init=init).fit()
        except RuntimeError as exc:
            if env.world_size == 1 or not _lost_a_process(exc):
                raise
            text = str(exc).strip()
            first = text.splitlines()[0].split(". ")[0][:200] if text else type(exc).__name__
            last = out / "checkpoints" / "last.pt"
            kept = (
                f"its last checkpoint, {last}, is intact"
                if last.exists()
                else "it stopped before its first checkpoint (a resume starts at step 0)"
            )
            raise SelfsupError(
                f"another process of this {env.world_size}-process job stopped ({first}); "
                f"{kept}. Continue with: {resume_command(out)}"
            ) from None
    finally:
        if lock is not None:
            lock.close()  # releases the flock
        cleanup()


def _setting_problem(key: str, value: Any) -> ConfigError:
    """A setting that is an object (an nn.Module, a function): settings are names and numbers,
    saved in the run's config.yaml so that eval, export and --resume can rebuild the run."""
    kind = type(value).__name__
    if callable(getattr(value, "forward", None)):  # an nn.Module, without importing torch
        return ConfigError(
            f"{key} is a {kind} module; pretrain takes a backbone by name (a torchvision model "
            "such as resnet18 or convnext_tiny), or the function that builds yours, as "
            "'package.module:function' or 'path/to/file.py:function': the run's config.yaml "
            "keeps that name, so --resume, eval and load_encoder can build it again. A module "
            "alone can be trained in your own loop (selfsup.methods.build_method; the README's "
            "example under 'Command line')"
        )
    return ConfigError(
        f"{key}={value!r} (of type {kind}) is not a setting: give a string, number, bool or list"
    )


def _override_text(key: str, value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        raise _setting_problem(key, value) from None


def _override_strings(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """``{"optim.lr": 0.1}`` or ``["optim.lr=0.1"]`` -> ``["optim.lr=0.1"]``."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise ConfigError(
            f"overrides={overrides!r}: give a dict such as {{'optim.lr': 0.1}} or a list of "
            "'key=value' strings"
        )
    if isinstance(overrides, Mapping):
        # strings as written (OmegaConf parses them as the command line's are); the rest as
        # JSON, which YAML reads back: true, null, [0.2, 1.0]
        return [f"{k}={_override_text(k, v)}" for k, v in overrides.items()]
    return list(overrides)


def pretrain(
    method: str | None = None,
    data: str | os.PathLike | None = None,
    *,
    preset: str | None = None,
    out: str | os.PathLike | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    backbone: str | None = None,
    image_size: int | None = None,
    limit: int | None = None,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> TrainResult:
    """Pretrain an encoder, as ``selfsup pretrain`` does with the same arguments.

    ``selfsup.pretrain()`` is the offline quickstart; ``selfsup.pretrain("byol",
    data="images/", preset="cifar10", epochs=200, out="runs/byol")`` the command line's
    ``--method byol --data images/ --preset cifar10 --epochs 200 --out runs/byol``. ``overrides``
    are its ``key=value`` settings, as a dict (``{"optim.lr": 0.5}``) or a list of strings.
    ``progress=False`` hides the progress bar. The run directory holds what the command writes
    (``config.yaml``, ``metrics.jsonl``, checkpoints, ``encoder.pt``, ``results.json``).

    Returns a :class:`~selfsup.train.trainer.TrainResult`: ``run_dir``, ``results`` (the
    ``results.json`` dict: ``knn_top1``, ``final_loss``, ...) and ``finished`` (false when Ctrl-C
    ``train.time_limit_min`` or ``train.stop_after_epochs`` stopped
    it; ``resume=True`` continues). Raises
    :class:`~selfsup.errors.ConfigError` for bad settings, before any data is decoded.
    """
    for key, value in {"method": method, "preset": preset, "model.backbone": backbone}.items():
        if value is not None and not isinstance(value, str):
            raise _setting_problem(key, value)
    if data is not None:  # as the command line does: a typo first, before any other setting
        from selfsup.data.sources import parse_source

        try:
            parse_source(os.fspath(data))
        except DataError as exc:
            raise DataError(f"data.source: {exc}") from None
        except TypeError:
            raise _setting_problem("data", data) from None
    given = {
        "data": None if data is None else os.fspath(data),
        "epochs": epochs,
        "batch_size": batch_size,
        "backbone": backbone,
        "image_size": image_size,
        "limit": limit,
        "device": device,
    }
    flags = {RUN_FLAGS[name]: value for name, value in given.items()}
    flags["train.progress"] = None if progress else False
    cfg, run_dir = pretrain_config(
        method,
        flags["data.source"],
        preset=preset,
        out=None if out is None else Path(out),
        resume=resume,
        flags=flags,
        overrides=_override_strings(overrides),
        command_line=False,
    )
    result = run_pretrain(cfg, run_dir, resume=resume, overwrite=overwrite)
    if result is None:  # another rank of torchrun, whose rank 0 refused the run directory
        raise ConfigError(f"rank 0 refused the run directory {run_dir}; see its message")
    if not result.finished and is_first_rank():
        print(
            f"selfsup: stopped; pretrain(..., out={str(run_dir)!r}, resume=True) continues",
            file=sys.stderr,
        )
    return result
