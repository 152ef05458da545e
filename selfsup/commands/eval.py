"""``selfsup eval``: the papers' protocols (kNN, linear probe, fine-tuning on 1% / 10% labels)
on a labeled dataset, the pre-training data or another (transfer), with baselines."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfsup.checks import check_encode_args, check_writable
from selfsup.commands.common import (
    PAPER_CROP_SCALE,
    _architecture,
    _crop_flip_transform,
    _eval_crop,
    _eval_transform,
    _fresh_backbone,
    _load_labeled_splits,
    _normalisation,
    _on_every_process,
    _pretrain_augment,
    _run_info,
    _sizes,
    _slug,
    _torchrun_device,
    add_device_and_cache_args,
)
from selfsup.commands.table import CSV_METRICS, append_results, check_results_csv
from selfsup.errors import ConfigError, DataError
from selfsup.run import is_first_rank

if TYPE_CHECKING:  # imported where used: `selfsup --help` and argument errors stay fast
    import torch


PROTOCOLS = ("knn", "linear", "finetune", "all")
LINEAR_MODES = ("fast", "full", "both")


def add_arguments(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="evaluate an encoder: kNN, linear probe, fine-tuning, transfer",
        description="Evaluate a run directory or an encoder file on a labeled dataset (the "
        "pre-training data, or another one with other classes: transfer). Accuracies are "
        "fractions in [0, 1].",
    )
    p.add_argument("encoder", help="run directory or encoder file")
    p.add_argument(
        "--data",
        default=None,
        help="labeled source with train/ and test/ splits "
        "(default: the run's data.eval_source if it has one, else its pre-training data)",
    )
    p.add_argument(
        "--protocol", choices=PROTOCOLS, default="knn", help="what to run (default: knn)"
    )
    p.add_argument(
        "--label-fraction",
        type=float,
        nargs="+",
        default=[1, 10],
        help="fine-tuning label fractions in percent, e.g. 1 10 100 (default: 1 10)",
    )
    p.add_argument(
        "--linear-mode",
        choices=LINEAR_MODES,
        default="fast",
        help="fast: L-BFGS logistic regression on cached features; full: the papers' "
        "protocol (augmented crops and flips, SGD, cosine); both: the two (default: fast)",
    )
    p.add_argument(
        "--linear-epochs", type=int, default=100, help="full linear probe epochs (default: 100)"
    )
    p.add_argument(
        "--linear-lr", type=float, default=0.1, help="full linear probe SGD lr (default: 0.1)"
    )
    p.add_argument(
        "--linear-weight-decay",
        type=float,
        default=0.0,
        help="full linear probe SGD weight decay (default: 0, as in SimCLR / BYOL's probes)",
    )
    p.add_argument(
        "--lbfgs-iters", type=int, default=100, help="fast linear probe iterations (default: 100)"
    )
    p.add_argument(
        "--lbfgs-weight-decay",
        type=float,
        default=1e-4,
        help="fast linear probe L2 penalty weight_decay / 2 * ||W||^2 (default: 1e-4); raise "
        "it when the fast probe overfits few labels",
    )
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=None,
        help="fine-tuning epochs (default: SimCLR's, 60 for 1%% of the labels, 30 for more)",
    )
    p.add_argument(
        "--finetune-lr",
        type=float,
        default=0.01,
        help="encoder lr when fine-tuning (default: 0.01; the head gets 10x; SimCLR's single "
        "lr is 0.05 x batch / 256)",
    )
    p.add_argument(
        "--supervised-lr",
        type=float,
        default=0.1,
        help="lr of the supervised baseline, encoder and head (default: 0.1)",
    )
    p.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="random-resized-crop area range of the full linear probe and fine-tuning "
        "(default: the run's augment.both.crop_scale if set and --data is the run's data, else "
        "the papers' 0.08 1)",
    )
    p.add_argument(
        "--flip-p",
        type=float,
        default=None,
        help="horizontal flip probability there (default: the run's augment.both.flip_p if set "
        "and --data is the run's data, else 0.5; 0 for data that flipping changes)",
    )
    p.add_argument("--knn-k", type=int, default=200, help="neighbours (default: 200)")
    p.add_argument(
        "--knn-temperature", type=float, default=0.1, help="weight exp(sim / T) (default: 0.1)"
    )
    p.add_argument(
        "--baselines",
        action="store_true",
        help="also evaluate the random-init encoder (kNN, linear) and, per label "
        "fraction, a supervised ResNet trained with the same budget (finetune)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only N evenly spaced files of each split (quick checks)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="default: the pre-training image size (else 32)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="default: 256")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="label subsets, random-init baseline, training (default: 0)",
    )
    add_device_and_cache_args(p)
    p.add_argument(
        "--results-csv",
        default=None,
        help="append one line per number here (default: <run dir>/../results.csv; with "
        "--out-dir, beside that folder)",
    )
    p.add_argument(
        "--out-dir",
        default=None,
        help="where the evaluation's JSON, label-subset lists and saved classifiers go "
        "(default: the run directory, or the encoder file's folder)",
    )
    p.add_argument(
        "--save-classifiers",
        action="store_true",
        help="keep each classifier trained for the encoder (linear fast / full, fine-tuned per "
        "label fraction) in <run>/classifiers/ as a torchvision state_dict + .json, for "
        "`selfsup predict`",
    )
    _OPTION_DEFAULTS.update({dest: p.get_default(dest) for dest, _ in _protocol_options()})


def _protocol_options() -> list[tuple[str, str]]:
    """``(dest, protocol)`` of each option that one protocol alone uses: its PROTOCOL_KNOBS
    (less the batch size they share) and fine-tuning's label fractions. Noted when given to an
    eval that does not run that protocol: `--protocol all --linear-epochs 3` runs the fast probe."""
    knobs = [(k, p) for p, names in PROTOCOL_KNOBS.items() for k in names if k != "batch_size"]
    return [*knobs, ("label_fraction", "finetune")]


_OPTION_DEFAULTS: dict[str, object] = {}  # filled by add_arguments
_PROTOCOL_NAMES = {
    "linear_full": "the full linear probe (--protocol linear or all with --linear-mode full "
    "or both)",
    "linear_fast": "the fast linear probe (--protocol linear or all with --linear-mode fast "
    "or both)",
    "finetune": "fine-tuning (--protocol finetune or all)",
    "knn": "the kNN (--protocol knn or all)",
}


def _note_unused_options(args: argparse.Namespace, plan: EvalPlan) -> None:
    """Say which given options this eval does not use, rather than drop them without a word."""
    unused: dict[str, list[str]] = {}
    for dest, protocol in _protocol_options():
        if dest not in _OPTION_DEFAULTS or getattr(args, dest, None) == _OPTION_DEFAULTS[dest]:
            continue
        if not getattr(plan, protocol):
            unused.setdefault(protocol, []).append("--" + dest.replace("_", "-"))
    if (
        plan.finetune
        and not args.baselines
        and args.supervised_lr != _OPTION_DEFAULTS.get("supervised_lr", args.supervised_lr)
    ):
        unused.setdefault("baselines", []).append("--supervised-lr")
    for protocol, flags in unused.items():
        what = (
            "the supervised baseline (--baselines)"
            if protocol == "baselines"
            else _PROTOCOL_NAMES[protocol]
        )
        if is_first_rank():
            print(
                f"selfsup: note: {' and '.join(flags)} "
                + ("is an option" if len(flags) == 1 else "are options")
                + f" of {what}, which this eval does not run: "
                + ("it has" if len(flags) == 1 else "they have")
                + " no effect",
                file=sys.stderr,
            )


DEFAULT_RULES = {"finetune_epochs": "SimCLR's: 60 at 1% of the labels, 30 above"}  # for the JSON


def finetune_epochs(given: int | None, fraction: int) -> int:
    """``--finetune-epochs``, else SimCLR's (Chen et al. 2020, Appendix B.5): 60 epochs on 1% of
    the labels, 30 on 10% or more."""
    if given is not None:
        return given
    return 60 if fraction <= 1 else 30


def _check_eval_args(args: argparse.Namespace) -> None:
    """Refuse impossible settings before loading data or training anything."""
    if getattr(args, "save_classifiers", False) and args.protocol == "knn":
        raise ConfigError(
            "--save-classifiers keeps the classifiers that --protocol linear, finetune or all "
            "train; --protocol knn trains none"
        )
    check_encode_args(args.image_size, args.batch_size)
    positive = {
        "--linear-epochs": args.linear_epochs,
        "--lbfgs-iters": args.lbfgs_iters,
        "--finetune-epochs": args.finetune_epochs,
        "--knn-k": args.knn_k,
    }
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    for flag, value in (
        ("--knn-temperature", args.knn_temperature),
        ("--linear-lr", args.linear_lr),
        ("--finetune-lr", args.finetune_lr),
        ("--supervised-lr", args.supervised_lr),
    ):
        if not value > 0:
            raise ConfigError(f"{flag} must be > 0, got {value}")
    for flag, value in (
        ("--linear-weight-decay", args.linear_weight_decay),
        ("--lbfgs-weight-decay", args.lbfgs_weight_decay),
    ):
        if not value >= 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")
    if args.flip_p is not None and not 0 <= args.flip_p <= 1:
        raise ConfigError(f"--flip-p must be in [0, 1], got {args.flip_p}")
    if args.crop_scale is not None and not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise ConfigError(f"--crop-scale MIN MAX needs 0 < MIN <= MAX <= 1, got {args.crop_scale}")
    for fraction in args.label_fraction:
        if not 0 < fraction <= 100:
            raise ConfigError(
                f"--label-fraction is in percent, in (0, 100] (e.g. 1 10 100); got {fraction:g}"
            )


@dataclass(frozen=True)
class EvalPlan:
    """Which protocols an ``eval`` runs (``--protocol`` and ``--linear-mode`` spelled out)."""

    knn: bool
    linear_fast: bool
    linear_full: bool
    finetune: bool

    @classmethod
    def of(cls, args: argparse.Namespace) -> EvalPlan:
        protocols = ("knn", "linear", "finetune") if args.protocol == "all" else (args.protocol,)
        modes = ("fast", "full") if args.linear_mode == "both" else (args.linear_mode,)
        linear = "linear" in protocols
        return cls(
            knn="knn" in protocols,
            linear_fast=linear and "fast" in modes,
            linear_full=linear and "full" in modes,
            finetune="finetune" in protocols,
        )

    @property
    def needs_features(self) -> bool:
        """The kNN and the fast probe share one pass of the frozen encoder over the data."""
        return self.knn or self.linear_fast

    def refused_under_torchrun(self) -> str | None:
        """The options that train a network, which eval does not spread over processes."""
        refused = [
            name
            for name, used in (
                ("--linear-mode full", self.linear_full),
                ("--protocol finetune", self.finetune),
            )
            if used
        ]
        return " and ".join(refused) or None


@dataclass
class EvalTarget:
    """The encoder to evaluate and where its results go, all checked before any long work."""

    target: Path  # the run directory or encoder file given
    encoder: torch.nn.Module
    info: dict[str, Any]  # _run_info's
    run_dir: Path
    owner: Path  # the run the encoder belongs to (an export's is the run above it)
    run_label: str  # the CSV's `run`
    out_dir: Path  # the evaluation's own files: JSON, label subsets, classifiers
    csv_path: Path
    # (backbone, small_stem) when classifiers are saved or baselines built
    arch: tuple[str, bool] | None
    save_classifiers: bool


@dataclass
class EvalData:
    """The labeled data an encoder is evaluated on, and how its images are prepared."""

    source: str
    train: Any  # selfsup.data datasets
    test: Any
    load_size: int  # the size the images are decoded (cached) at
    image_size: int  # the size the encoder sees
    mean: list[float]
    std: list[float]
    crop_scale: tuple[float, float]
    flip_p: float
    train_t: Any  # the training protocols' crop-and-flip transform
    eval_t: Any
    eval_crop: float
    num_classes: int
    progress: bool
    device: torch.device


def _locate_target(args: argparse.Namespace) -> EvalTarget:
    """Load the encoder of ``args.encoder`` and find its run, output folder and results CSV;
    refuse a missing encoder, a foreign CSV or folders one may not write to."""
    from selfsup.export import CLASSIFIER_DIR, check_classifier_architecture, load_encoder

    target = Path(args.encoder)
    if not target.exists():
        raise ConfigError(f"{target} does not exist: pass a run directory or an encoder file")
    # first: a folder that is no run, or a file that is no encoder, is what to fix (not --data)
    encoder = load_encoder(target)
    info = _run_info(target, encoder)
    run_dir: Path = info["run_dir"]
    # an exported file (<run>/export/encoder.safetensors) belongs to its run: the run's
    # results.csv, and a row that names the file; the eval JSON stays beside the file
    owner = run_dir
    if (run_dir / "export.json").exists() and (run_dir.parent / "config.yaml").exists():
        owner = run_dir.parent
    # absolute: one run is one row of the table, however its path was typed
    run_label = str(owner.resolve())
    if target.is_file() and target.name != "encoder.pt":
        run_label = f"{run_label} ({target.resolve().relative_to(owner.resolve())})"
    # the evaluation's own files (JSON, label subsets, classifiers): the run's folder, or
    # --out-dir for a run one may not write to (a shared, read-only model folder)
    given_out = getattr(args, "out_dir", None)
    out_dir = Path(given_out) if given_out else run_dir
    default_csv = (out_dir if given_out else owner).parent / "results.csv"
    csv_path = Path(args.results_csv) if args.results_csv else default_csv
    check_results_csv(csv_path)  # before any work
    # on every rank (the same answer everywhere): a refusal on rank 0 alone would leave the
    # others waiting for it under torchrun
    check_writable(csv_path.parent, "the results CSV", fix="pass --results-csv FILE")
    elsewhere = "pass --out-dir DIR, a writable folder for the evaluation's files"
    check_writable(out_dir, "the evaluation's JSON", fix=elsewhere)
    save_classifiers = bool(getattr(args, "save_classifiers", False))
    arch = None
    if save_classifiers or args.baselines:  # a custom encoder is said before any work
        arch = _architecture(info, encoder)
    if save_classifiers:  # as is one that is no torchvision classifier, or a blocked folder
        check_classifier_architecture(encoder, *arch)
        # the folder itself is made when a classifier is saved (none is left by a stopped eval)
        classifier_dir = out_dir / CLASSIFIER_DIR
        check_writable(classifier_dir if classifier_dir.exists() else out_dir,
                       "the classifiers", fix=elsewhere)  # fmt: skip
    return EvalTarget(
        target, encoder, info, run_dir, owner, run_label, out_dir, csv_path, arch, save_classifiers
    )


def _eval_source(args: argparse.Namespace, where: EvalTarget) -> str:
    """The data to evaluate on: ``--data``, else the run's; refused if the run's is not here."""
    from selfsup.data import absolute_source

    info = where.info
    source = absolute_source(args.data) or info.get("eval_data") or info.get("pretrain_data")
    if source is None:
        raise ConfigError(
            f"{where.target}: no config.yaml or export.json beside the encoder says what "
            f"it was trained on; pass --data"
        )
    if args.data is None:
        from selfsup.data import parse_source

        try:
            parse_source(source)
        except DataError as exc:
            raise ConfigError(
                f"{exc}. That is the data recorded with the run ({where.run_dir}); pass --data "
                "with where it is on this machine (or any labeled dataset)"
            ) from None
    return source


def _load_eval_data(
    args: argparse.Namespace, where: EvalTarget, source: str, device: torch.device
) -> EvalData:
    """Load the train and test splits of ``source`` and build the protocols' transforms."""
    from selfsup.export import check_input_size
    from selfsup.train.distributed import is_main, main_process_first

    info = where.info
    load_size, image_size = _sizes(info, args.image_size)
    check_input_size(where.encoder, image_size, where.target, info.get("image_size"))
    progress = not args.no_progress and is_main()
    with main_process_first():  # under torchrun rank 0 builds the cache, the others read it
        train, test = _load_labeled_splits(source, load_size, args.cache_dir, args.limit, progress)
    mean, std = _normalisation(info, train.images)
    # the run's crops and flips (e.g. no flips for digits) belong to its data: a transfer to
    # other data takes the papers' defaults unless given here
    same_data = source in (info.get("pretrain_data"), info.get("eval_data"))
    run_augment = _pretrain_augment(where.run_dir) if same_data else {}
    crop_scale = args.crop_scale or run_augment.get("crop_scale") or PAPER_CROP_SCALE
    crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
    flip_p = next(v for v in (args.flip_p, run_augment.get("flip_p"), 0.5) if v is not None)
    flip_p = float(flip_p)
    train_t = _crop_flip_transform(image_size, mean, std, device, crop_scale, flip_p)
    eval_t = _eval_transform(image_size, mean, std, device, info)
    if train.classes:
        num_classes = len(train.classes)
    else:
        num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    return EvalData(
        source=source,
        train=train,
        test=test,
        load_size=load_size,
        image_size=image_size,
        mean=mean,
        std=std,
        crop_scale=crop_scale,
        flip_p=flip_p,
        train_t=train_t,
        eval_t=eval_t,
        eval_crop=_eval_crop(info),
        num_classes=num_classes,
        progress=progress,
        device=device,
    )


def _results_skeleton(
    args: argparse.Namespace, where: EvalTarget, data: EvalData, weights: str
) -> dict[str, Any]:
    """The results dict of an evaluation, before any protocol: what was evaluated, on what,
    and at which settings."""
    from selfsup.train.distributed import distributed_world
    from selfsup.train.logging import environment

    info = where.info
    return {
        "encoder": str(where.target),
        "weights": weights,
        "method": info.get("method"),
        "pretrain_data": info.get("pretrain_data"),
        "pretrain_epochs": info.get("epochs"),
        "config_hash": info.get("config_hash"),
        "eval_data": data.source,
        "image_size": data.image_size,
        "num_classes": data.num_classes,
        "n_train": len(data.train),
        "n_test": len(data.test),
        "limit": args.limit,
        "seed": args.seed,
        "processes": distributed_world()[1],  # torchrun: feature extraction shared among them
        "environment": environment(data.device),  # of this evaluation (earlier entries kept too)
        "mean": data.mean,
        "std": data.std,
        "train_augment": {"crop_scale": list(data.crop_scale), "flip_p": data.flip_p},
        # the knobs of the protocols: an earlier eval is merged into this file only if they agree
        "settings": {
            k: getattr(args, k) if getattr(args, k) is not None else DEFAULT_RULES.get(k)
            for k in (
                "knn_k",
                "knn_temperature",
                "linear_epochs",
                "linear_lr",
                "linear_weight_decay",
                "lbfgs_iters",
                "lbfgs_weight_decay",
                "finetune_epochs",
                "finetune_lr",
                "supervised_lr",
                "batch_size",
            )
        },  # fmt: skip
        "protocols": {},
    }


# the settings each protocol's numbers depend on (batch_size: the training protocols' batch)
PROTOCOL_KNOBS = {
    "knn": ("knn_k", "knn_temperature"),
    "linear_fast": ("lbfgs_iters", "lbfgs_weight_decay"),
    "linear_full": ("linear_epochs", "linear_lr", "linear_weight_decay", "batch_size"),
    "finetune": ("finetune_epochs", "finetune_lr", "supervised_lr", "batch_size"),
}


def _knobs(protocol: str, settings: dict[str, Any]) -> dict[str, Any]:
    names = PROTOCOL_KNOBS["finetune" if protocol.startswith("finetune") else protocol]
    return {k: settings.get(k) for k in names}


def _merge_earlier(path: Path, results: dict[str, Any]) -> tuple[str, list[tuple[str, str]]]:
    """Keep the results of an earlier eval of the same weights, data and sizes in ``results``
    (``--label-fraction 1`` after ``10`` keeps both; ``--linear-mode fast`` after ``full`` keeps
    the full probe's numbers). A protocol measured again at other settings of its own (another
    ``--knn-k``) replaces its earlier entries; another encoder's or data's file is replaced.
    ``results["protocol_settings"]`` records each protocol's settings.

    Returns what differed where earlier results are replaced (``""`` when none), and the
    (protocol, encoder) entries kept from the earlier file."""
    settings = results.get("settings") or {}
    results["protocol_settings"] = {p: _knobs(p, settings) for p in results["protocols"]}
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return "", []
    if not isinstance(earlier, dict):
        return "", []
    same = ("weights", "eval_data", "image_size", "limit", "seed", "train_augment")
    differ = [k for k in same if earlier.get(k) != results.get(k)]
    if differ:
        return ", ".join(differ), []
    # files before protocol_settings: each protocol's knobs from the file's one settings dict
    old_settings = earlier.get("protocol_settings") or {}
    kept: list[tuple[str, str]] = []
    replaced: list[str] = []
    for protocol, by_encoder in (earlier.get("protocols") or {}).items():
        before = old_settings.get(protocol) or _knobs(protocol, earlier.get("settings") or {})
        if protocol not in results["protocols"]:  # not run now: kept with its own settings
            results["protocols"][protocol] = by_encoder
            results["protocol_settings"][protocol] = before
            kept += [(protocol, enc) for enc in by_encoder]
            continue
        now = results["protocol_settings"][protocol]
        if before != now:  # measured again at other settings: the earlier entries go
            changes = [f"{k} {before.get(k)} -> {v}" for k, v in now.items() if before.get(k) != v]
            replaced.append(f"{protocol}: {', '.join(changes)}")
            continue
        new = results["protocols"][protocol]
        kept += [(protocol, enc) for enc in by_encoder if enc not in new]
        results["protocols"][protocol] = {**by_encoder, **new}
    return "; ".join(replaced), kept


class EvalRecorder:
    """An evaluation's numbers as they are measured: the results dict, their CSV rows and the
    ssl encoder's classifiers; written (JSON and CSV) by ``save``."""

    def __init__(self, results: dict[str, Any], where: EvalTarget, out_json: Path) -> None:
        self.results = results  # _results_skeleton's: its data, weights, limit name each row
        self.where = where
        self.out_json = out_json
        self.rows: list[dict[str, Any]] = []
        # protocol -> (state_dict of the torchvision classifier, its metrics): the ssl encoder's
        self.classifiers: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}

    @property
    def probe_kwargs(self) -> dict[str, Any]:
        """The linear probes' options: their trained head back only when asked (callers that
        patch them in tests return the metrics alone)."""
        return {"return_head": True} if self.where.save_classifiers else {}

    def keep(
        self, enc: str, protocol: str, trunk: torch.nn.Module, returned: Any
    ) -> dict[str, Any]:
        """The metrics of a protocol's ``returned`` value (with ``probe_kwargs``: metrics and head);
        the ssl encoder's classifier is kept."""
        from selfsup.export import classifier_state

        if not self.where.save_classifiers:
            return returned
        metrics, head = returned
        if enc == "ssl":
            self.classifiers[protocol] = (classifier_state(trunk, head, *self.where.arch), {})
        return metrics

    def record(self, enc: str, protocol: str, metrics: dict[str, Any]) -> None:
        """``metrics`` of encoder ``enc`` under ``protocol``: into the results, one CSV row per
        number of ``CSV_METRICS``, and beside the kept classifier."""
        self.results["protocols"].setdefault(protocol, {})[enc] = metrics
        if enc == "ssl" and protocol in self.classifiers:
            self.classifiers[protocol] = (self.classifiers[protocol][0], metrics)
        info = self.where.info
        for key in CSV_METRICS:
            if key in metrics:
                self.rows.append(
                    {
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "run": self.where.run_label,
                        "method": info.get("method", ""),
                        "pretrain_data": info.get("pretrain_data", ""),
                        "epochs": info.get("epochs", ""),
                        "eval_data": self.results["eval_data"],
                        "protocol": protocol,
                        "encoder": enc,
                        "metric": key,
                        "value": metrics[key],
                        "config_hash": info.get("config_hash", ""),
                        "weights": self.results["weights"],
                        "limit": self.results["limit"] or "",
                        "image_size": self.results["image_size"],
                    }
                )

    def save(self) -> list[tuple[str, str]]:
        """The results into the eval JSON (with what an earlier eval of it holds) and their rows
        into the CSV; rank 0 only. Returns the entries kept from the earlier file."""
        from selfsup.train.trainer import write_json

        out_json, csv_path = self.out_json, self.where.csv_path
        replaced, earlier = _merge_earlier(out_json, self.results)
        if replaced:
            print(
                f"selfsup: note: {out_json} held results at other settings ({replaced}); "
                f"this evaluation replaces them ({csv_path} keeps their rows)",
                file=sys.stderr,
            )
        write_json(out_json, self.results)
        append_results(csv_path, self.rows)
        return earlier

    def save_stopped(self) -> None:
        """After a stop (Ctrl-C, SIGTERM): save and name the numbers finished so far."""
        from selfsup.train.distributed import is_main

        protocols = self.results["protocols"]
        if protocols and is_main():
            # this eval's own numbers (the merge adds an earlier eval's)
            done = ", ".join(f"{p} ({', '.join(e)})" for p, e in protocols.items())
            self.save()
            print(f"selfsup: stopped; finished before the stop and saved in {self.out_json}: "
                  f"{done}", file=sys.stderr)  # fmt: skip


def _draw_subsets(
    args: argparse.Namespace, data: EvalData, out_dir: Path
) -> dict[float, tuple[torch.Tensor, Path]]:
    """The fine-tuning's labeled subsets, one per ``--label-fraction`` and shared by all
    encoders, each saved as a CSV: fraction -> (indices into the train split, the file)."""
    from selfsup.evaluate.subsets import balanced_subset, save_subset

    subsets = {}
    for fraction in args.label_fraction:
        idx = balanced_subset(data.train.labels, fraction, seed=args.seed)
        # the name says what drew it (a --limit changes the pool, hence the subset)
        pool = f"_limit{args.limit}" if args.limit else ""
        name = f"subset_{_slug(data.source)}{pool}_{fraction:g}pct_seed{args.seed}.csv"
        subset_file = out_dir / name
        save_subset(idx, data.train.paths, data.train.labels, subset_file)
        subsets[fraction] = (idx, subset_file)
    return subsets


def _frozen_features(
    args: argparse.Namespace, enc: torch.nn.Module, data: EvalData
) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """(train, test) features of the frozen encoder, and the seconds they took."""
    from selfsup.train.distributed import distributed_extract_features

    t0 = time.monotonic()
    feats = tuple(  # each process encodes its share (all of it in one process)
        distributed_extract_features(
            enc, ds.images, data.eval_t, batch_size=args.batch_size, device=data.device
        )
        for ds in (data.train, data.test)
    )
    return feats, time.monotonic() - t0


def _eval_knn(
    args: argparse.Namespace, data: EvalData, feats: tuple, feat_seconds: float
) -> dict[str, Any]:
    """The weighted kNN classifier's metrics on the frozen features."""
    from selfsup.evaluate.knn import knn_accuracy

    t0 = time.monotonic()
    m = knn_accuracy(
        feats[0],
        data.train.labels,
        feats[1],
        data.test.labels,
        k=args.knn_k,
        temperature=args.knn_temperature,
        num_classes=data.num_classes,
        device=data.device,
    )
    return {
        **m,
        "mode": f"weighted kNN (k={m['k']}, T={m['temperature']:g})",
        "seconds": round(time.monotonic() - t0 + feat_seconds, 2),
    }


def _eval_linear_fast(
    args: argparse.Namespace,
    name: str,
    enc: torch.nn.Module,
    data: EvalData,
    recorder: EvalRecorder,
    feats: tuple,
    feat_seconds: float,
) -> dict[str, Any]:
    """The L-BFGS linear probe's metrics on the frozen features (its head kept if asked)."""
    from selfsup.evaluate.linear import linear_probe_features

    t0 = time.monotonic()
    m = linear_probe_features(
        feats[0],
        data.train.labels,
        feats[1],
        data.test.labels,
        num_classes=data.num_classes,
        max_iter=args.lbfgs_iters,
        weight_decay=args.lbfgs_weight_decay,
        device=data.device,
        seed=args.seed,
        **recorder.probe_kwargs,
    )
    m = recorder.keep(name, "linear_fast", enc, m)
    return {**m, "seconds": round(time.monotonic() - t0 + feat_seconds, 2)}


def _eval_linear_full(
    args: argparse.Namespace,
    name: str,
    enc: torch.nn.Module,
    data: EvalData,
    recorder: EvalRecorder,
) -> dict[str, Any]:
    """The papers' linear probe (SGD on augmented images, frozen encoder)'s metrics."""
    from selfsup.evaluate.linear import linear_probe

    t0 = time.monotonic()
    m = linear_probe(
        enc,
        data.train.images,
        data.train.labels,
        data.test.images,
        data.test.labels,
        train_transform=data.train_t,
        eval_transform=data.eval_t,
        num_classes=data.num_classes,
        epochs=args.linear_epochs,
        lr=args.linear_lr,
        weight_decay=args.linear_weight_decay,
        batch_size=args.batch_size,
        device=data.device,
        seed=args.seed,
        progress=data.progress,
        **recorder.probe_kwargs,
    )
    m = recorder.keep(name, "linear_full", enc, m)
    return {**m, "seconds": round(time.monotonic() - t0, 2)}


def _eval_finetune(
    args: argparse.Namespace,
    enc: torch.nn.Module,
    data: EvalData,
    recorder: EvalRecorder,
    subsets: dict[float, tuple[torch.Tensor, Path]],
) -> None:
    """Fine-tune the ssl encoder on each labeled subset (and, with ``--baselines``, train a
    seeded random-init one of its architecture on it: the supervised baseline); record."""
    from selfsup.evaluate.finetune import finetune, supervised_baseline

    save_classifiers, arch = recorder.where.save_classifiers, recorder.where.arch
    for fraction, (idx, subset_file) in subsets.items():
        protocol = f"finetune_{fraction:g}pct"
        common = dict(
            num_classes=data.num_classes,
            train_transform=data.train_t,
            eval_transform=data.eval_t,
            epochs=finetune_epochs(args.finetune_epochs, fraction),
            batch_size=args.batch_size,
            device=data.device,
            seed=args.seed,
            progress=data.progress,
        )
        extra = {
            "subset_file": subset_file.name,
            "labeled_images": int(idx.numel()),
            "label_fraction": fraction,
        }
        trainers = {"ssl": (finetune, args.finetune_lr)}
        if args.baselines:
            trainers["supervised"] = (supervised_baseline, args.supervised_lr)
        for label, (train_fn, lr) in trainers.items():
            t0 = time.monotonic()
            # the baseline's seeded random-init encoder is built inside its timing
            start = enc if label == "ssl" else _fresh_backbone(*arch, seed=args.seed, like=enc)
            # the ssl encoder's fine-tuned copy comes back too, for --save-classifiers
            returned = {"return_model": True} if save_classifiers and label == "ssl" else {}
            m = train_fn(
                start,
                data.train.images[idx],
                data.train.labels[idx],
                data.test.images,
                data.test.labels,
                lr=lr,
                **common,
                **returned,
            )
            if returned:
                m, tuned, head = m
                recorder.keep(label, protocol, tuned, (m, head))
                del tuned, head  # its state_dict is kept (CPU), not the network
            m = {**m, **extra, "seconds": round(time.monotonic() - t0, 2)}
            recorder.record(label, protocol, m)


def _evaluate_one_encoder(
    args: argparse.Namespace,
    plan: EvalPlan,
    name: str,
    enc: torch.nn.Module,
    data: EvalData,
    recorder: EvalRecorder,
    subsets: dict[float, tuple[torch.Tensor, Path]],
) -> None:
    """Run the protocols of ``plan`` on encoder ``enc`` (``ssl`` or a baseline); record each."""
    feats, feat_seconds = None, 0.0
    if plan.needs_features:
        feats, feat_seconds = _frozen_features(args, enc, data)
    if plan.knn:
        recorder.record(name, "knn", _eval_knn(args, data, feats, feat_seconds))
    if plan.linear_fast:
        m = _eval_linear_fast(args, name, enc, data, recorder, feats, feat_seconds)
        recorder.record(name, "linear_fast", m)
    if plan.linear_full:
        recorder.record(name, "linear_full", _eval_linear_full(args, name, enc, data, recorder))
    if plan.finetune and name == "ssl":
        # the random-init encoder trained end to end is the supervised baseline
        _eval_finetune(args, enc, data, recorder, subsets)


def _eval_name(source: str, args: argparse.Namespace, target: Path, protocol: str) -> str:
    """``<data>[_limitN]_<protocol>[_<file>]``, the name of an eval JSON (``eval_<name>.json``)
    and of a saved classifier: several files in one folder (the exports) each keep their own."""
    pool = f"_limit{args.limit}" if args.limit else ""
    of_file = f"_{_slug(target.name)}" if target.is_file() and target.name != "encoder.pt" else ""
    return f"{_slug(source)}{pool}_{protocol}{of_file}"


def _note_replaced_classifier(path: Path, meta: dict[str, Any]) -> None:
    """Say so when ``path`` holds a classifier of other data or weights (another folder of the
    same name, a retrained run): the new one replaces it."""
    try:
        old = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # none there (or not readable: it is replaced all the same)
    if not isinstance(old, dict):
        return
    changed = [k for k in ("eval_data", "weights", "classes") if old.get(k) != meta.get(k)]
    if changed:
        was = "; ".join(f"{k} {old.get(k)!r}" for k in changed)[:300]
        print(
            f"selfsup: note: {path} held a classifier of other {', '.join(changed)} ({was}); "
            "the new one replaces it",
            file=sys.stderr,
        )


def _save_classifiers(
    args: argparse.Namespace, where: EvalTarget, data: EvalData, recorder: EvalRecorder
) -> list[str]:
    """Save each kept classifier (a torchvision state_dict and its .json) under the output
    folder's ``classifiers/``; returns their paths."""
    from selfsup.export import CLASSIFIER_DIR, save_classifier

    num_classes = data.num_classes
    classes = list(data.train.classes or [str(i) for i in range(num_classes)])
    preparation = {
        "backbone": where.arch[0],
        "small_stem": where.arch[1],
        "image_size": data.image_size,
        "storage_size": data.load_size,  # the size the eval decoded (cached) the images at
        "eval_crop": data.eval_crop,
        "mean": data.mean,
        "std": data.std,
    }
    saved = []
    for protocol, (state, m) in recorder.classifiers.items():
        # named like the eval JSON: the data, its --limit and the evaluated file
        file_name = f"{_eval_name(data.source, args, where.target, protocol)}.pt"
        path = where.out_dir / CLASSIFIER_DIR / file_name
        meta = {
            "protocol": protocol,
            "mode": m.get("mode"),
            **{k: m[k] for k in ("label_fraction", "labeled_images", "subset_file") if k in m},
            "classes": classes,
            "num_classes": num_classes,
            **preparation,
            "top1": m.get("top1"),
            "top5": m.get("top5"),
            "n_train": m.get("n_train"),
            "n_test": m.get("n_test"),
            "eval_data": data.source,
            "limit": args.limit,
            "seed": args.seed,
            "eval_json": recorder.out_json.name,
            "encoder": str(where.target.resolve()),
            "weights": recorder.results["weights"],
            "method": where.info.get("method"),
            "pretrain_data": where.info.get("pretrain_data"),
        }
        _note_replaced_classifier(path, meta)
        saved.append(str(save_classifier(path, state, meta)))
    return saved


def evaluate_encoder(args: argparse.Namespace) -> dict[str, Any]:
    """Run the protocols of ``args`` (the ``selfsup eval`` options); write JSON and CSV.

    Returns the results dict: ``protocols[protocol][encoder] -> metrics`` with protocols
    ``knn``, ``linear_fast``, ``linear_full``, ``finetune_<f>pct`` and encoders ``ssl``,
    ``random_init``, ``supervised``; plus ``_json`` / ``_csv``, the written paths.
    """
    from selfsup.export import weights_digest
    from selfsup.train.distributed import is_main

    # every refusal first: arguments, torchrun, encoder (and its architecture), output paths,
    # data
    _check_eval_args(args)
    plan = EvalPlan.of(args)
    _note_unused_options(args, plan)
    device = _torchrun_device(args.device, "eval", plan.refused_under_torchrun())
    where = _locate_target(args)
    source = _eval_source(args, where)
    data = _load_eval_data(args, where, source, device)

    encoders: dict[str, torch.nn.Module] = {"ssl": where.encoder}
    if args.baselines:
        encoders["random_init"] = _fresh_backbone(*where.arch, seed=args.seed, like=where.encoder)
    weights = weights_digest(where.encoder)  # of the tensors: an export of a run shares it
    results = _results_skeleton(args, where, data, weights)
    subsets = _draw_subsets(args, data, where.out_dir) if plan.finetune else {}
    out_json = where.out_dir / f"eval_{_eval_name(source, args, where.target, args.protocol)}.json"
    recorder = EvalRecorder(results, where, out_json)

    try:  # a stop (Ctrl-C, SIGTERM) keeps the numbers finished so far
        for name, enc in encoders.items():
            _evaluate_one_encoder(args, plan, name, enc, data, recorder, subsets)
    except KeyboardInterrupt:
        recorder.save_stopped()
        raise

    earlier: list[tuple[str, str]] = []
    saved: list[str] = []
    if is_main():  # every process computed the same numbers; one writes them
        earlier = recorder.save()
        if recorder.classifiers:
            saved = _save_classifiers(args, where, data, recorder)
    results["_json"], results["_csv"] = str(out_json), str(where.csv_path)
    results["_classifiers"] = saved
    results["_earlier"] = earlier  # rows the table marks as not measured by this command
    return results


def handle(args: argparse.Namespace) -> int:
    results, main = _on_every_process(lambda: evaluate_encoder(args))
    if main:
        print(format_eval_table(results))
        print(
            f"selfsup: results in {results['_json']}; one line per number appended to "
            f"{results['_csv']}"
        )
        if results.get("_classifiers"):
            names = ", ".join(Path(p).name for p in results["_classifiers"])
            folder = Path(results["_classifiers"][0]).parent
            print(f"selfsup: classifiers saved in {folder}: {names} (each with its .json)")
    return 0


def format_eval_table(results: dict[str, Any]) -> str:
    """A markdown table of one evaluation: one row per (protocol, encoder), mode in the note."""
    head = (
        f"eval data: {results['eval_data']} ({results['n_train']} train / "
        f"{results['n_test']} test images, {results['num_classes']} classes)"
    )
    augmented = [p for p in results["protocols"] if p == "linear_full" or p.startswith("finetune")]
    if augmented:  # kNN and the fast probe see no augmentation
        head += (
            f"; augmented protocols crop {results['train_augment']['crop_scale']}, flip "
            f"{results['train_augment']['flip_p']:g}"
        )
    lines = [
        head,
        "| protocol | encoder | top-1 | top-5 | note |",
        "| --- | --- | --- | --- | --- |",
    ]
    earlier = {tuple(entry) for entry in results.get("_earlier", ())}
    for protocol, by_encoder in results["protocols"].items():
        for enc, m in by_encoder.items():
            notes = [m["mode"]] if m.get("mode") else []
            if "labeled_images" in m:
                notes.append(f"{m['labeled_images']} labeled images ({m['subset_file']})")
            if (protocol, enc) in earlier:  # not measured by this command: kept from the file
                notes.append("from an earlier eval")
            note = "; ".join(notes)
            lines.append(f"| {protocol} | {enc} | {m['top1']:.4f} | {m['top5']:.4f} | {note} |")
    return "\n".join(lines)
