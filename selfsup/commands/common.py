"""What the commands share: a run's recorded settings, the data and its transforms, the
device, same-architecture baselines. The ``_`` names are internal to ``selfsup.commands`` (its
modules import them), not public API; the public names are re-exported by its ``__init__``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from selfsup.errors import ConfigError, DataError
from selfsup.run import is_first_rank

if TYPE_CHECKING:  # imported where used: `selfsup --help` and argument errors stay fast
    import torch


T = TypeVar("T")

TEST_SPLITS = ("test", "val", "valid", "validation")  # tried in this order for the held-out split


PAPER_CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop area range of the papers' linear protocol


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

    from selfsup.train.config import load_run_config

    both = OmegaConf.select(load_run_config(config), "augment.both")
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
    ``cuda:<LOCAL_RANK>``), unless ``refused`` names work that needs one process. ``refused``
    is eval's (the message names its protocols); embed and predict pass none."""
    from selfsup.train.distributed import init_distributed

    env = init_distributed(name or "auto")
    if env.distributed and refused:
        raise ConfigError(
            f"under torchrun (WORLD_SIZE={env.world_size}) `selfsup {command}` shares the feature "
            f"extraction of --protocol knn and --linear-mode fast among the processes; {refused} "
            f"trains a network, in one process: run it without torchrun"
        )
    return env.device


def _on_every_process(work: Callable[[], T]) -> tuple[T, bool]:
    """Run ``work`` here, then leave torchrun's process group (also when ``work`` fails, so no
    process is left waiting on the others). Returns ``work``'s result and whether this process
    writes the outputs: under torchrun every process holds the same results, and rank 0 writes
    them; a plain run is its own rank 0."""
    from selfsup.train.distributed import cleanup, is_main

    try:
        result = work()
        main = is_main()
    finally:
        cleanup()
    return result, main


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


def _atomic_output(out: Path, write) -> None:
    """``write(tmp)`` then rename onto ``out``: an interrupted write leaves no partial file."""
    from selfsup.data.cache import atomic_write

    atomic_write(out, write)
