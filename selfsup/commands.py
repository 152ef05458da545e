"""``selfsup eval / embed / neighbors / predict / export / table``: use and judge a trained
encoder.

``eval`` runs the papers' protocols on a labeled dataset (the pre-training data, or another one
with other classes: transfer) and writes ``eval_<data>_<protocol>.json`` into the run directory
plus one line per number to a results CSV (with ``--save-classifiers``, also the classifiers it
trained, under ``classifiers/``, which ``predict`` applies to new images); ``table`` turns that
CSV into a runs x protocols table. Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfsup.checks import check_encode_args, check_writable
from selfsup.cli import register
from selfsup.errors import ConfigError, DataError
from selfsup.run import is_first_rank

if TYPE_CHECKING:  # imported where used: `selfsup --help` and argument errors stay fast
    import numpy as np
    import torch

PROTOCOLS = ("knn", "linear", "finetune", "all")
LINEAR_MODES = ("fast", "full", "both")
TEST_SPLITS = ("test", "val", "valid", "validation")  # tried in this order for the held-out split
RESULT_FIELDS = (
    "time",
    "run",
    "method",
    "pretrain_data",
    "epochs",
    "eval_data",
    "protocol",
    "encoder",
    "metric",
    "value",
    "config_hash",
    "weights",  # sha256 prefix of the encoder file: a retrained run is another row
    "limit",
    "image_size",
)
TABLE_FIELDS = RESULT_FIELDS[:-3]  # what a results CSV of an earlier selfsup holds
CSV_METRICS = ("top1", "top5", "seconds")  # the numbers of a result that get a CSV line
PAPER_CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop area range of the papers' linear protocol
# selfsup.export.EXPORT_FORMATS, spelled out so that building the parser imports no torch
# (tests/test_cli_startup.py checks that the two agree)
EXPORT_FORMATS = ("torchvision", "safetensors", "torchscript")


# ---------------------------------------------------------------------------- shared helpers
def _run_info(target: Path, encoder: torch.nn.Module | None = None) -> dict[str, Any]:
    """What is known of an encoder: its run directory, and (from config.yaml or export metadata)
    method, pre-training data, epochs, mean/std, image size, architecture, config hash. Without
    metadata, the image size is the one ``encoder`` is built for, if it has one (a ViT's
    ``image_size``, read from its weights)."""
    from selfsup.export import encoder_metadata
    from selfsup.models.backbones import native_image_size

    run_dir = target if target.is_dir() else target.parent
    info = {**encoder_metadata(target), "run_dir": run_dir}
    if not info.get("image_size") and native_image_size(encoder):
        info["image_size"] = native_image_size(encoder)
    return info


def add_device_and_cache_args(p: argparse.ArgumentParser) -> None:
    """--device, --cache-dir and --no-progress, as every command that encodes images takes them."""
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where decoded images are cached (default: $SELFSUP_CACHE, else ~/.cache/selfsup)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar while images are decoded"
    )


def _sizes(info: dict[str, Any], image_size: int | None) -> tuple[int, int]:
    """(cached size, network input size): the pre-training run's storage and crop sizes, so the
    encoder sees its images prepared exactly as during training; ``--image-size`` sets both."""
    from selfsup.data.decode import storage_size_for_crop  # numpy, PIL: not while parsing

    if image_size is not None:  # cached with the run's margin for its centre crop (eval_crop)
        return storage_size_for_crop(image_size, info.get("eval_crop")), int(image_size)
    size = int(info.get("image_size") or 32)
    return int(info.get("storage_size") or size), size


def _pretrain_augment(run_dir: Path) -> dict[str, Any]:
    """``augment.both`` of the run's config (what the user or preset set for this data), or
    ``{}`` without a config."""
    config = run_dir / "config.yaml"
    if not config.exists():
        return {}
    from omegaconf import OmegaConf

    both = OmegaConf.select(OmegaConf.load(config), "augment.both")
    return OmegaConf.to_container(both) if both is not None else {}


def _crop_flip_transform(
    image_size: int,
    mean,
    std,
    device: torch.device,
    crop_scale: tuple[float, float] = PAPER_CROP_SCALE,
    flip_p: float = 0.5,
):
    """The papers' linear / fine-tuning augmentation: random resized crop and flip only."""
    from selfsup.augment import ViewAugment, ViewConfig

    crop_flip = ViewConfig(
        crop_scale=tuple(crop_scale),
        flip_p=flip_p,
        jitter_p=0.0,
        gray_p=0.0,
        blur_p=0.0,
        solarize_p=0.0,
    )
    return ViewAugment(crop_flip, image_size, mean, std).to(device)


def _eval_crop(info: dict[str, Any]) -> float:
    """The run's ``data.eval_crop`` (runs from before it: 1, the whole image)."""
    return float(info.get("eval_crop") or 1.0)


def _eval_transform(image_size: int, mean, std, device: torch.device, info: dict[str, Any]):
    """The run's evaluation view (its :func:`_eval_crop`), the one the trainer's kNN monitor
    takes."""
    from selfsup.augment import EvalTransform

    crop = _eval_crop(info)
    return EvalTransform(image_size, mean=mean, std=std, crop_fraction=crop).to(device)


def _normalisation(info: dict[str, Any], images: torch.Tensor) -> tuple[list[float], list[float]]:
    """The pre-training mean/std (the encoder expects them), else the data's own statistics."""
    from selfsup.train.trainer import dataset_stats

    if info.get("mean") and info.get("std"):
        return [float(v) for v in info["mean"]], [float(v) for v in info["std"]]
    return dataset_stats(images)


def _device(name: str | None) -> torch.device:
    from selfsup.train.distributed import resolve_device

    return resolve_device(name or "auto")


def _torchrun_device(name: str | None, command: str, refused: str | None = None) -> torch.device:
    """This process's device; under torchrun it joins the process group (GPU
    ``cuda:<LOCAL_RANK>``), unless ``refused`` names work that needs one process."""
    from selfsup.train.distributed import init_distributed

    env = init_distributed(name or "auto")
    if env.distributed and refused:
        raise ConfigError(
            f"under torchrun (WORLD_SIZE={env.world_size}) `selfsup {command}` shares the feature "
            f"extraction of --protocol knn and --linear-mode fast among the processes; {refused} "
            f"trains a network, in one process: run it without torchrun"
        )
    return env.device


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be a positive number of images, got {limit}")


def _limit(ds, limit: int | None):
    """``limit`` images spread evenly over a dataset (all of them for ``None``)."""
    _check_limit(limit)
    return ds.spread(limit)


def _load(
    source: str,
    split: str,
    image_size: int,
    cache_dir: str | None,
    limit: int | None,
    progress: bool = False,
    listed=None,
):
    """``split`` of ``source``, decoded (once) into the cache; ``listed``: its folder listing,
    when already made."""
    from selfsup.data import load_dataset

    _check_limit(limit)
    ds = load_dataset(
        source,
        split,
        image_size=image_size,
        cache_dir=cache_dir,
        progress=progress,
        limit=limit,
        listed=listed,
    )
    if ds.skipped and is_first_rank():  # as pretrain's skipped.csv line
        print(f"selfsup: {source} ({split}): {ds.skip_summary()}", file=sys.stderr)
    return _limit(ds, limit)


def _pick_labeled_splits(source: str, load_split):
    """(train, test) of ``load_split(split)`` (loaded datasets, or a folder's listings), test
    being test/, else val/; a DataError, with the layout to use, when a split or labels lack."""
    train = load_split("train")
    test, first_error = None, None
    for split in TEST_SPLITS:
        try:
            test = load_split(split)
            break
        except DataError as exc:
            first_error = first_error or exc
    if test is None:
        advice = (
            ""
            if "arrange it as" in str(first_error)
            else ("; arrange it as DIR/train/<class>/* and DIR/test/<class>/*")
        )
        raise DataError(f"{source!r} has no held-out split to evaluate on: {first_error}{advice}")
    for split, ds in (("train", train), ("test", test)):
        if ds.labels is None:
            raise DataError(
                f"{source!r} ({split} split) has no labels; evaluation needs an "
                f"ImageFolder layout (<split>/<class>/<image>) with train/ and test/"
            )
    return train, test


def _load_labeled_splits(
    source: str, image_size: int, cache_dir: str | None, limit: int | None, progress: bool
):
    """(train, test) of a labeled source; the held-out split is test/, else val/ (a folder)."""
    from selfsup.data import parse_source
    from selfsup.data.sources import list_folder

    spec = parse_source(source)
    listings = {}  # a folder's: its listing shows a missing split or labels, before decoding

    def listing(split: str):
        listings[split] = list_folder(spec, split)  # kept: load_dataset's cache key
        return listings[split]

    if spec.kind == "folder":
        _pick_labeled_splits(source, listing)

    def load(split: str):
        return _load(source, split, image_size, cache_dir, limit, progress, listings.get(split))

    train, test = _pick_labeled_splits(source, load)
    test, dropped = test.with_classes_of(train)
    if dropped:
        print(
            f"selfsup: note: {source!r}: test classes {dropped} have no training images; their "
            f"test images are left out (scored: {len(test)})",
            file=sys.stderr,
        )
    if len(test) == 0:
        raise DataError(f"{source!r}: no test image belongs to a class of the train split")
    return train, test


def check_results_csv(csv_path: Path) -> None:
    """A DataError unless ``csv_path`` is absent or a results CSV of selfsup (this or the earlier
    format): results are appended to no one else's CSV."""
    if not csv_path.exists():
        return
    with open(csv_path, newline="") as fh:
        header = csv.DictReader(fh).fieldnames or []
    if header not in (list(RESULT_FIELDS), list(TABLE_FIELDS)):
        raise DataError(
            f"{csv_path} is not a results CSV written by `selfsup eval` (its header is "
            f"{','.join(header) or 'empty'}); pass another --results-csv, or move it aside"
        )


def append_results(csv_path: Path, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` (keys ``RESULT_FIELDS``) to ``csv_path``, writing the header if new (a CSV
    with fewer columns, from an earlier selfsup, is first rewritten with the new ones empty)."""
    new = not csv_path.exists()
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    if not new:
        check_results_csv(csv_path)
        with open(csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            old_rows = list(reader) if reader.fieldnames == list(TABLE_FIELDS) else None
        if old_rows is not None:  # the format of an earlier selfsup: add the new columns

            def migrate(tmp: Path) -> None:
                with open(tmp, "w", newline="") as fh:
                    writer = csv.DictWriter(fh, fieldnames=RESULT_FIELDS, extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(old_rows)

            _atomic_output(csv_path, migrate)
    with open(csv_path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _architecture(info: dict[str, Any], encoder: torch.nn.Module) -> tuple[str, bool]:
    """(backbone name, small_stem) of the encoder, for building same-architecture baselines."""
    from selfsup.export import infer_architecture

    if isinstance(info.get("backbone"), str) and "small_stem" in info:
        return info["backbone"], bool(info["small_stem"])
    return infer_architecture(encoder.state_dict())


def _fresh_backbone(
    name: str, small_stem: bool, seed: int, like: torch.nn.Module
) -> torch.nn.Module:
    """A seeded random-init backbone of the architecture (for the input size of ``like``, the
    trained encoder, where that matters: a ViT's), leaving the global RNG as it was."""
    import torch

    from selfsup.models.backbones import backbone_module, state_image_size

    size = state_image_size(name, like.state_dict())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return backbone_module(name, small_stem=small_stem, image_size=size)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(text).name or text)[:40]


# ---------------------------------------------------------------------------- eval
def _add_eval(sub, name: str) -> None:
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
    arch: tuple[str, bool] | None  # (backbone, small_stem) when classifiers are saved
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
    if save_classifiers:  # a custom encoder or a blocked folder is said before any work
        arch = _architecture(info, encoder)
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
    def wanted(self) -> dict[str, Any]:
        """The linear probes' options: their trained head back only when asked (callers that
        patch them in tests return the metrics alone)."""
        return {"return_head": True} if self.where.save_classifiers else {}

    def keep(
        self, enc: str, protocol: str, trunk: torch.nn.Module, returned: Any
    ) -> dict[str, Any]:
        """The metrics of a protocol's ``returned`` value (with ``wanted``: metrics and head);
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
        **recorder.wanted,
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
        **recorder.wanted,
    )
    m = recorder.keep(name, "linear_full", enc, m)
    return {**m, "seconds": round(time.monotonic() - t0, 2)}


def _eval_finetune(
    args: argparse.Namespace,
    enc: torch.nn.Module,
    data: EvalData,
    recorder: EvalRecorder,
    subsets: dict[float, tuple[torch.Tensor, Path]],
    arch: tuple[str, bool] | None,
) -> None:
    """Fine-tune the ssl encoder on each labeled subset (and, with ``--baselines``, train a
    seeded random-init one of architecture ``arch`` on it: the supervised baseline); record."""
    from selfsup.evaluate.finetune import finetune, supervised_baseline

    save_classifiers = recorder.where.save_classifiers
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
    arch: tuple[str, bool] | None,
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
        _eval_finetune(args, enc, data, recorder, subsets, arch)


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

    # every refusal first: arguments, torchrun, encoder, output paths, data
    _check_eval_args(args)
    plan = EvalPlan.of(args)
    device = _torchrun_device(args.device, "eval", plan.refused_under_torchrun())
    where = _locate_target(args)
    source = _eval_source(args, where)
    data = _load_eval_data(args, where, source, device)

    encoders: dict[str, torch.nn.Module] = {"ssl": where.encoder}
    arch = where.arch
    if args.baselines:
        arch = arch or _architecture(where.info, where.encoder)
        encoders["random_init"] = _fresh_backbone(*arch, seed=args.seed, like=where.encoder)
    weights = weights_digest(where.encoder)  # of the tensors: an export of a run shares it
    results = _results_skeleton(args, where, data, weights)
    subsets = _draw_subsets(args, data, where.out_dir) if plan.finetune else {}
    out_json = where.out_dir / f"eval_{_eval_name(source, args, where.target, args.protocol)}.json"
    recorder = EvalRecorder(results, where, out_json)

    try:  # a stop (Ctrl-C, SIGTERM) keeps the numbers finished so far
        for name, enc in encoders.items():
            _evaluate_one_encoder(args, plan, name, enc, data, recorder, subsets, arch)
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


def _eval_name(source: str, args: argparse.Namespace, target: Path, protocol: str) -> str:
    """``<data>[_limitN]_<protocol>[_<file>]``, the name of an eval JSON (``eval_<name>.json``)
    and of a saved classifier: several files in one folder (the exports) each keep their own."""
    pool = f"_limit{args.limit}" if args.limit else ""
    of_file = f"_{_slug(target.name)}" if target.is_file() and target.name != "encoder.pt" else ""
    return f"{_slug(source)}{pool}_{protocol}{of_file}"


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


def _eval(args: argparse.Namespace) -> int:
    from selfsup.train.distributed import cleanup, is_main

    try:
        results = evaluate_encoder(args)
        main = is_main()
    finally:
        cleanup()  # leave torchrun's process group, if joined
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


# ---------------------------------------------------------------------------- embed / neighbors
def _add_embed(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="write embeddings (+ paths and labels) of a dataset",
        description="Write the encoder's features of every image of a dataset. "
        ".npz holds arrays embeddings [N, D] float32, paths [N], and labels [N] "
        "and classes when the data has labels; .parquet holds one row per image with columns "
        "path, label and class (when labeled) and embedding (a fixed-size list of D float32; "
        "needs pyarrow); .npy holds the embeddings only, "
        "with paths and labels in a CSV of the same name beside it.",
    )
    p.add_argument("encoder", help="run directory or encoder file")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train", help="split to embed (default: train)")
    p.add_argument(
        "--out",
        required=True,
        help="output .npz (embeddings, paths, labels), .parquet, or .npy (embeddings; paths "
        "and labels in a .csv of the same name beside it)",
    )
    p.add_argument("--limit", type=int, default=None, help="only N images, evenly spaced")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    add_device_and_cache_args(p)


def embed_dataset(
    encoder_path: str | Path,
    source: str,
    split: str = "train",
    image_size: int | None = None,
    batch_size: int = 256,
    device: str | None = None,
    cache_dir: str | None = None,
    limit: int | None = None,
    encoder: torch.nn.Module | None = None,
    progress: bool = False,
):
    """(features float32 ``[N, D]`` on the CPU, the ``ImageDataset``) of ``source``/``split``.

    Images are resized to the encoder's pre-training size and normalised with its pre-training
    mean/std (from the run or export metadata; the data's own statistics for a bare file).
    ``encoder``, when given, is used instead of loading ``encoder_path`` again. Under torchrun
    (after ``_torchrun_device``), each process encodes its share and all get every row.
    """
    from selfsup.export import load_encoder

    check_encode_args(image_size, batch_size)
    # loaded before the data: a folder that is no run, or a file that is no encoder, fails fast
    model = encoder if encoder is not None else load_encoder(encoder_path)
    info = _run_info(Path(encoder_path), model)
    return _encode_source(
        model, info, source, split, image_size, batch_size, device, cache_dir, limit, progress
    )


def _encode_source(
    model: torch.nn.Module,
    info: dict[str, Any],
    source: str,
    split: str,
    image_size: int | None,
    batch_size: int,
    device: str | None,
    cache_dir: str | None,
    limit: int | None,
    progress: bool = False,
):
    """(``model``'s outputs float32 ``[N, K]`` on the CPU, the ``ImageDataset``): ``source`` /
    ``split`` decoded at the sizes of ``info`` (a run's or a classifier's metadata: storage and
    image size, eval_crop, mean/std) and prepared by the evaluation's transform, as ``eval`` does.
    The images of ``embed`` (K = the feature size) and ``predict`` (K = the classes). Under
    torchrun each process encodes its share and all get every row."""
    from selfsup.export import check_input_size
    from selfsup.train.distributed import distributed_extract_features, main_process_first

    load_size, size = _sizes(info, image_size)
    check_input_size(model, size, info.get("run_dir") or "the encoder", info.get("image_size"))
    with main_process_first():
        ds = _load(source, split, load_size, cache_dir, limit, progress and is_first_rank())
    mean, std = _normalisation(info, ds.images)
    dev = _device(device)
    eval_t = _eval_transform(size, mean, std, dev, info)
    out = distributed_extract_features(model, ds.images, eval_t, batch_size=batch_size, device=dev)
    return out, ds


EMBED_FORMATS = (".npz", ".parquet", ".npy")
INDEX_FIELDS = ("index", "path", "label")  # the header of the CSV beside an embed's .npy


def _text_path(path: str) -> str:
    """``path`` as valid UTF-8 text, for the CSV and parquet files (which must hold UTF-8).

    A file name that is not valid UTF-8 (Linux allows any bytes) arrives from ``os.listdir`` with
    its bad bytes as lone surrogates; those are written back-slash escaped, ``bad\\xff.png``, as
    ``write_skip_report`` does: readable, and the rest of the name exact. (.npz keeps the names
    as they are: numpy's strings hold surrogates, and ``os.fsencode`` gives the bytes back.)
    """
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a surrogate that no file name decodes to: escape it as such
        return path.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def check_index_csv(out: Path) -> None:
    """A ConfigError unless the ``.csv`` beside an ``.npy`` --out is absent or an index an earlier
    ``selfsup embed`` wrote (its header row is :data:`INDEX_FIELDS`): no one else's file is
    replaced."""
    index = out.with_suffix(".csv")
    if not index.exists() and not index.is_symlink():
        return
    header = None
    with contextlib.suppress(OSError, csv.Error):  # a folder, or unreadable: not ours either
        with open(index, newline="", encoding="utf-8", errors="replace") as fh:
            header = next(csv.reader(fh), None)
    if header != list(INDEX_FIELDS):
        raise ConfigError(
            f"--out {out}: the paths and labels of a .npy go to {index}, which exists and is "
            f"not an index written by `selfsup embed` (header {','.join(INDEX_FIELDS)}); pass "
            "another --out, or move that file aside"
        )


def _write_index_csv(path: Path, ds) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(INDEX_FIELDS)
        for i in range(len(ds)):
            label = "" if ds.labels is None else int(ds.labels[i])
            writer.writerow((i, _text_path(ds.paths[i]) if ds.paths else "", label))


def _require_pyarrow(out: Path):
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"--out {out}: writing .parquet needs pyarrow: pip install pyarrow (or "
            "pip install 'selfsup[parquet]'); or write a .npz instead"
        ) from None
    return pyarrow


def _write_parquet(path: Path, feats: np.ndarray, ds) -> None:
    """One row per image: ``path``, ``label`` and ``class`` (labeled data only), ``embedding``
    (``fixed_size_list<float32>[D]``, which pandas reads as one array per row)."""
    import numpy as np

    pa = _require_pyarrow(path)
    import pyarrow.parquet as pq

    n, dim = feats.shape
    # pa.string() is UTF-8: names that are not are escaped (_text_path), as in the .npy's CSV
    columns = {"path": pa.array([_text_path(p) for p in ds.paths or [""] * n], pa.string())}
    if ds.labels is not None:
        labels = np.asarray(ds.labels, dtype=np.int64)
        columns["label"] = pa.array(labels)
        if ds.classes:  # folder names, as undecodable as file names
            classes = [_text_path(c) for c in ds.classes]
            columns["class"] = pa.array([classes[i] for i in labels], pa.string())
    flat = pa.array(np.ascontiguousarray(feats, dtype=np.float32).reshape(-1))
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, dim)
    pq.write_table(pa.table(columns), path)


def _atomic_output(out: Path, write) -> None:
    """``write(tmp)`` then rename onto ``out``: an interrupted write leaves no partial file."""
    from selfsup.data.cache import atomic_write

    atomic_write(out, write)


def _embed(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix not in EMBED_FORMATS:
        raise ConfigError(
            f"--out {out}: use a .npz (embeddings, paths, labels), .parquet (one row per image) "
            "or .npy (embeddings only) file name"
        )
    check_encode_args(args.image_size, args.batch_size)
    if out.suffix == ".parquet":
        _require_pyarrow(out)  # before any encoding
    check_writable(out.parent, "the embeddings")
    if out.suffix == ".npy":
        check_index_csv(out)
    import numpy as np

    from selfsup.train.distributed import cleanup, is_main

    try:
        device = _torchrun_device(args.device, "embed")
        feats, ds = embed_dataset(
            args.encoder,
            args.data,
            args.split,
            args.image_size,
            args.batch_size,
            str(device),
            args.cache_dir,
            args.limit,
            progress=not args.no_progress,
        )
        main = is_main()
    finally:
        cleanup()
    if not main:  # every process holds all the rows; one writes them
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        _atomic_output(out.with_suffix(".csv"), lambda tmp: _write_index_csv(tmp, ds))
        _atomic_output(out, lambda tmp: np.save(tmp, feats.numpy()))
    elif out.suffix == ".parquet":
        _atomic_output(out, lambda tmp: _write_parquet(tmp, feats.numpy(), ds))
    else:
        arrays = {"embeddings": feats.numpy(), "paths": np.array(ds.paths or [], dtype=str)}
        if ds.labels is not None:
            arrays["labels"] = ds.labels.numpy()
            arrays["classes"] = np.array(ds.classes or [], dtype=str)
        _atomic_output(out, lambda tmp: np.savez(tmp, **arrays))
    index = f" (paths and labels: {out.with_suffix('.csv')})" if out.suffix == ".npy" else ""
    print(f"selfsup: {feats.shape[0]} embeddings of dim {feats.shape[1]} written to {out}{index}")
    return 0


def _add_neighbors(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="the most similar images of a dataset to query images",
        description="Embed --data with the encoder and print, for each query image, the -k "
        "images of the dataset with the highest cosine similarity.",
    )
    p.add_argument("encoder")
    p.add_argument("--data", required=True, help="the images to search")
    p.add_argument("--split", default="train", help="split to search (default: train)")
    p.add_argument(
        "--query",
        required=True,
        nargs="+",
        help="query image files, or one .txt file listing image paths (one a line; '#' lines "
        "are comments; relative paths may be relative to the list's folder)",
    )
    p.add_argument("-k", type=int, default=5, help="neighbours per query (default: 5)")
    p.add_argument("--limit", type=int, default=None, help="search only N images, evenly spaced")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256, help="images encoded at once")
    add_device_and_cache_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument(
        "--grid",
        default=None,
        help="also write an image grid (.png or .jpg): one row per query, the query first, "
        "then its neighbours, best first",
    )


def nearest_neighbors(
    encoder_path: str | Path,
    source: str,
    queries: list[str],
    k: int = 5,
    image_size: int | None = None,
    device: str | None = None,
    cache_dir: str | None = None,
    split: str = "train",
    limit: int | None = None,
    batch_size: int = 256,
    grid: str | Path | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The ``k`` images of ``source`` most cosine-similar to each query image.

    Returns one ``{"query": path, "neighbors": [{"path", "similarity", "label"}, ...]}`` per
    query, neighbors best first. ``grid``: also write those images as one picture (see
    :func:`write_neighbor_grid`).
    """
    import numpy as np
    import torch

    from selfsup.data.decode import decode_image, resize_shorter
    from selfsup.evaluate.features import extract_features
    from selfsup.export import load_encoder

    if k < 1:
        raise ConfigError(f"-k must be >= 1, got {k}")
    check_encode_args(image_size, batch_size)
    if grid is not None:
        grid = Path(grid)
        if grid.suffix.lower() not in GRID_SUFFIXES:
            raise ConfigError(f"--grid {grid}: give a .png or .jpg file name")
        if grid.is_dir():
            raise ConfigError(
                f"--grid {grid} is a folder; give a file name such as {grid / 'nn.png'}"
            )
        check_writable(grid.parent, "the neighbour grid")
    listing = None
    if len(queries) == 1 and queries[0].endswith(".txt"):
        listing = Path(queries[0])
        if not listing.is_file():
            raise DataError(f"query list {listing} does not exist")
        lines = [q.strip() for q in listing.read_text().splitlines()]
        queries = [q for q in lines if q and not q.startswith("#")]  # "# comment" lines
        # a relative path not found from here is read from the list's own folder
        queries = [
            str(listing.parent / q)
            if not Path(q).is_absolute() and not Path(q).exists()
            and (listing.parent / q).exists()
            else q
            for q in queries
        ]  # fmt: skip
        if not queries:
            raise DataError(f"query list {listing} names no images; write one path a line")
    encoder = load_encoder(encoder_path)
    info = _run_info(Path(encoder_path), encoder)
    load_size, size = _sizes(info, image_size)
    arrays = []
    for q in queries:  # decode the queries first: a bad query fails before any encoding
        path = Path(q)
        if path.is_dir():
            raise DataError(
                f"query {q} is a folder; pass image files (a shell glob: {q}/*.jpg) or one .txt "
                "file listing image paths"
            )
        if not path.is_file():
            named = f" (a line of the query list {listing})" if listing else ""
            raise DataError(f"query image {q} does not exist{named}")
        img = resize_shorter(decode_image(path.read_bytes(), name=q), load_size)
        arrays.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))  # a writable copy
    feats, ds = embed_dataset(
        encoder_path, source, split, image_size, batch_size, device, cache_dir, limit,
        encoder=encoder, progress=progress,
    )  # fmt: skip
    mean, std = _normalisation(info, ds.images)
    dev = _device(device)
    eval_t = _eval_transform(size, mean, std, dev, info)
    qf = extract_features(encoder, torch.stack(arrays), eval_t, batch_size=batch_size, device=dev)
    sims = torch.nn.functional.normalize(qf, dim=1) @ torch.nn.functional.normalize(feats, dim=1).T
    if k > feats.shape[0] and is_first_rank():
        print(
            f"selfsup: note: -k {k} is more than the {feats.shape[0]} images of {source}; "
            f"listing all {feats.shape[0]}",
            file=sys.stderr,
        )
    top = sims.topk(min(k, feats.shape[0]), dim=1)
    out = []
    for qi, q in enumerate(queries):
        hits = []
        for score, idx in zip(top.values[qi].tolist(), top.indices[qi].tolist(), strict=True):
            label = None
            if ds.labels is not None:
                value = int(ds.labels[idx])
                label = ds.classes[value] if ds.classes else str(value)
            hits.append(
                {
                    "path": ds.paths[idx] if ds.paths else str(idx),
                    "similarity": round(score, 4),
                    "label": label,
                }
            )
        out.append({"query": q, "neighbors": hits})
    if grid is not None and is_first_rank():
        rows = [
            [arrays[qi], *(ds.images[i] for i in top.indices[qi].tolist())]
            for qi in range(len(queries))
        ]
        write_neighbor_grid(grid, rows)
    return out


GRID_SUFFIXES = (".png", ".jpg", ".jpeg")


def write_neighbor_grid(path: Path, rows: list[list[torch.Tensor]]) -> None:
    """One picture of uint8 ``[3, H, W]`` images, one row per list (the query, then its
    neighbours), each centre-cropped to a square and resized to ``GRID_TILE`` px, written
    atomically."""
    from selfsup.augment.preview import image_grid, write_png

    write_png(path, image_grid(rows))


def _neighbors(args: argparse.Namespace) -> int:
    out = nearest_neighbors(
        args.encoder,
        args.data,
        args.query,
        args.k,
        args.image_size,
        args.device,
        args.cache_dir,
        args.split,
        args.limit,
        args.batch_size,
        args.grid,
        progress=not args.no_progress,
    )
    if args.grid and is_first_rank():
        print(f"selfsup: neighbour grid written to {args.grid}", file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for item in out:
            print(item["query"])
            for h in item["neighbors"]:
                label = f"  [{h['label']}]" if h["label"] is not None else ""
                print(f"  {h['similarity']:.4f}  {h['path']}{label}")
    return 0


# ---------------------------------------------------------------------------- predict
PREDICT_FIELDS = ("path", "class", "confidence")  # + "label" when the data has labels


def _add_predict(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="classify images with a classifier saved by `selfsup eval --save-classifiers`",
        description="Classify every image of --data with a classifier that `selfsup eval "
        "--save-classifiers` saved (<run>/classifiers/*.pt), its images prepared as that "
        "evaluation prepared them. Writes a CSV with path, class, confidence (the softmax "
        "probability of that class) and, when the data has labels, label; prints the "
        "accuracy when the labels' class names are the classifier's.",
    )
    p.add_argument("classifier", help="a <run>/classifiers/*.pt (or the .json beside it)")
    p.add_argument("--data", required=True, help="the images to classify (as `selfsup embed`)")
    p.add_argument("--split", default="train", help="split to classify (default: train)")
    p.add_argument("--out", default="predictions.csv", help="output CSV (default: predictions.csv)")
    p.add_argument("--limit", type=int, default=None, help="only N images, evenly spaced")
    p.add_argument("--batch-size", type=int, default=256, help="images classified at once")
    add_device_and_cache_args(p)


def predict_dataset(
    classifier_path: str | Path,
    source: str,
    split: str = "train",
    batch_size: int = 256,
    device: str | None = None,
    cache_dir: str | None = None,
    limit: int | None = None,
    classifier=None,
    progress: bool = False,
) -> dict[str, Any]:
    """Classify ``source`` / ``split`` with a saved classifier (``classifier``, when given, is the
    loaded one). Returns ``{"dataset", "index" int64 [N], "confidence" [N], "classes",
    "correct", "scored"}``: ``scored`` counts the labeled images whose class name is one of the
    classifier's (0 for unlabeled data), ``correct`` those predicted right."""
    import torch

    from selfsup.export import load_classifier

    check_encode_args(None, batch_size)
    # loaded before the data: a missing or foreign classifier fails fast
    clf = classifier if classifier is not None else load_classifier(classifier_path)
    logits, ds = _encode_source(
        clf.model, clf.metadata, source, split, None, batch_size, device, cache_dir, limit,
        progress,
    )  # fmt: skip
    confidence, index = logits.softmax(dim=1).max(dim=1)
    correct = scored = 0
    if ds.labels is not None:
        names = ds.classes or [str(i) for i in range(int(ds.labels.max()) + 1)]
        position = {c: i for i, c in enumerate(clf.classes)}
        # the data's label numbers as the classifier's (-1: a class it does not know)
        as_clf = torch.tensor([position.get(str(c), -1) for c in names], dtype=torch.long)
        truth = as_clf[ds.labels.long()]
        known = truth >= 0
        scored = int(known.sum())
        correct = int((index[known] == truth[known]).sum())
    return {
        "dataset": ds,
        "index": index,
        "confidence": confidence,
        "classes": clf.classes,
        "correct": correct,
        "scored": scored,
    }


def _write_predictions(path: Path, result: dict[str, Any]) -> None:
    ds, classes = result["dataset"], result["classes"]
    labeled = ds.labels is not None
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow((*PREDICT_FIELDS, "label") if labeled else PREDICT_FIELDS)
        for i, (k, p) in enumerate(
            zip(result["index"].tolist(), result["confidence"].tolist(), strict=True)
        ):
            row = [_text_path(ds.paths[i]) if ds.paths else str(i), _text_path(classes[k])]
            row.append(f"{p:.6f}")
            if labeled:
                value = int(ds.labels[i])
                row.append(_text_path(ds.classes[value]) if ds.classes else str(value))
            writer.writerow(row)


def _predict(args: argparse.Namespace) -> int:
    from selfsup.export import load_classifier
    from selfsup.train.distributed import cleanup, is_main

    out = Path(args.out)
    check_encode_args(None, args.batch_size)
    _check_limit(args.limit)
    clf = load_classifier(args.classifier)  # a missing or foreign file: before any decoding
    if out.is_dir():
        raise ConfigError(
            f"--out {out} is a folder; pass a file name such as {out}/predictions.csv"
        )
    check_writable(out.parent, "the predictions")
    try:
        device = _torchrun_device(args.device, "predict")
        result = predict_dataset(
            args.classifier,
            args.data,
            args.split,
            args.batch_size,
            str(device),
            args.cache_dir,
            args.limit,
            classifier=clf,
            progress=not args.no_progress,
        )
        main = is_main()
    finally:
        cleanup()
    if not main:  # every process holds all the rows; one writes them
        return 0
    _atomic_output(out, lambda tmp: _write_predictions(tmp, result))
    n, scored, ds = len(result["index"]), result["scored"], result["dataset"]
    line = f"selfsup: {n} images of {args.data} ({args.split}) classified into {out}"
    if scored:
        line += f"; accuracy {result['correct'] / scored:.4f} ({result['correct']}/{scored})"
        if scored < n:
            line += f", {n - scored} images of classes the classifier does not know left out"
    elif ds.labels is not None:
        line += "; no accuracy: none of the data's class names is one of the classifier's"
    print(line)
    return 0


# ---------------------------------------------------------------------------- export / table
def _add_export(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="export the encoder of a run",
        description="torchvision: the torchvision model's state_dict, with a fresh "
        "classifier (fc, classifier or head); "
        "safetensors: the encoder state_dict with its metadata; torchscript: a "
        "traced module that loads without selfsup.",
    )
    p.add_argument("run", help="run directory or encoder file")
    p.add_argument(
        "--format", choices=EXPORT_FORMATS, default="torchvision", help="default: torchvision"
    )
    p.add_argument("--out", default=None, help="output folder (default <run>/export)")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="example input size for TorchScript, >= 8 (default: the pre-training size, which "
        "the export's metadata records either way)",
    )


def _export(args: argparse.Namespace) -> int:
    from selfsup.export import export_encoder

    path = export_encoder(args.run, args.format, args.out, image_size=args.image_size)
    print(f"selfsup: exported {args.format} encoder to {path}")
    return 0


def _add_table(sub, name: str) -> None:
    p = sub.add_parser(name, help="a markdown table of a results CSV (runs x protocols)")
    p.add_argument("csv", nargs="?", default="runs/results.csv")
    p.add_argument("--metric", default="top1", choices=CSV_METRICS)


def results_table(csv_path: Path, metric: str = "top1") -> str:
    """Markdown table of a results CSV: one row per (run, encoder, eval data), one column per
    protocol; the newest line of each cell wins."""
    if not csv_path.exists():
        raise DataError(f"{csv_path} does not exist; run `selfsup eval` first (or pass the CSV)")
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not set(TABLE_FIELDS) <= set(reader.fieldnames):
            raise DataError(
                f"{csv_path} is not a results CSV written by `selfsup eval` (its "
                f"header must hold {', '.join(TABLE_FIELDS)})"
            )
        rows = [r for r in reader if r["metric"] == metric]
    # one table row per evaluated thing: the run's weights (a retrained run is a new row), the
    # encoder (ssl / baselines), the eval data and how much of it (--limit) at which size
    latest: dict[tuple, dict] = {}
    for r in rows:  # the newest line of each (row, protocol) wins
        key = (r["run"], r.get("weights", ""), r["encoder"], r["eval_data"], r.get("limit", ""))
        latest[(*key, r.get("image_size", ""), r["protocol"])] = r
    protocols = sorted({k[-1] for k in latest}, key=_protocol_order)
    first: dict[tuple, dict] = {}
    for key, row in latest.items():
        first.setdefault(key[:-1], row)
    lines = [
        "| run | method | epochs | weights | encoder | eval data | " + " | ".join(protocols) + " |",
        "| " + " | ".join(["---"] * (6 + len(protocols))) + " |",
    ]
    for group in sorted(first, key=lambda g: (g[0], first[g]["time"], g[2:])):
        row = first[group]
        run, weights, enc, data, limit, size = group
        cells = [
            f"{float(latest[(*group, p)]['value']):.4f}" if (*group, p) in latest else ""
            for p in protocols
        ]
        where = data + (f" (limit {limit})" if limit else "") + (f", {size} px" if size else "")
        lines.append(
            f"| {_shown_run(run)} | {row['method']} | {row['epochs']} | {weights[:8]} | {enc} | "
            f"{where} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def _shown_run(run: str) -> str:
    """A run's recorded (absolute) path, relative to this directory when it lies below it."""
    path, sep, rest = run.partition(" (")  # "<run> (export/encoder.safetensors)"
    with contextlib.suppress(ValueError):
        path = str(Path(path).relative_to(Path.cwd()))
    return path + sep + rest


def _protocol_order(protocol: str) -> tuple:
    """knn, linear_fast, linear_full, then fine-tuning by label fraction (1% before 10%)."""
    import re

    match = re.fullmatch(r"finetune_([\d.]+)pct", protocol)
    return (1, float(match.group(1)), "") if match else (0, 0.0, protocol)


def _table(args: argparse.Namespace) -> int:
    print(results_table(Path(args.csv), args.metric))
    return 0


for _name, _adder, _handler in (
    ("eval", _add_eval, _eval),
    ("embed", _add_embed, _embed),
    ("neighbors", _add_neighbors, _neighbors),
    ("predict", _add_predict, _predict),
    ("export", _add_export, _export),
    ("table", _add_table, _table),
):
    register(_name, _adder, _handler)

__all__ = [
    "append_results",
    "embed_dataset",
    "evaluate_encoder",
    "format_eval_table",
    "nearest_neighbors",
    "predict_dataset",
    "results_table",
]
