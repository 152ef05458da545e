"""What is checked and said about a run's config before its training starts: the data sources it
names (a typo is an error before any data is decoded or --overwrite clears anything), and notes
on settings that work against the run (an ImageNet stem on small images, BatchNorm statistics
that cannot follow a short run, a cache larger than the crops need)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from selfsup.data import parse_source
from selfsup.errors import ConfigError, DataError
from selfsup.models.backbones import is_resnet
from selfsup.train.config import eval_storage_size


def check_data_sources(cfg: DictConfig, out: Path | None = None) -> None:
    """``data.source`` and ``data.eval_source`` name existing data (a typo must not cost an
    --overwrite'n run, nor a decode of the training data) and are not the run directory ``out``
    itself (``--out mnist5k`` would make a folder that shadows the dataset's name)."""
    for key in ("source", "eval_source"):
        value = cfg.data[key]
        if not value:
            continue
        if out is not None and Path(value).expanduser().resolve() == out.expanduser().resolve():
            raise ConfigError(
                f"--out {out} is the data source data.{key}={value!r} itself; choose another "
                "--out (a run directory there would take the place of the data)"
            )
        try:
            spec = parse_source(value)
        except DataError as exc:
            raise DataError(f"data.{key}: {exc}") from None
        if key == "eval_source" and spec.kind == "folder":
            _check_knn_folder(spec, value)


def _check_knn_folder(spec, source: str) -> None:
    """A ``data.eval_source`` folder the kNN check cannot use (no train/ or test/ split folder,
    no class folders) is said from its listing, as the check would say it: not after the
    training data and the folder's train split are decoded."""
    from selfsup.data.sources import list_folder

    for split in ("train", "test"):
        try:
            listed = list_folder(spec, split)
        except DataError as exc:
            raise DataError(
                f"data.eval_source={source!r} cannot serve the kNN check: {exc}"
            ) from None
        if listed.labels is None:
            raise DataError(
                f"data.eval_source={source!r} has no labels (it needs class folders, "
                "train/<class>/* and test/<class>/*) to serve the kNN check"
            )


def small_image_stem_note(cfg: DictConfig) -> None:
    """A note when images of 64 px or less meet the ImageNet stem (``--preset imagenette
    --image-size 32``): it shrinks them 4x before the first block."""
    if not is_resnet(cfg.model.backbone):
        return  # the small stem is a ResNet's; other backbones keep their own
    if not cfg.model.small_stem and cfg.data.image_size <= 64:
        print(
            f"selfsup: note: data.image_size={cfg.data.image_size} with the ImageNet stem "
            "(model.small_stem=false): its stride-2 7x7 conv and max-pool shrink the image 4x "
            "before the first block; model.small_stem=true (3x3 conv, no max-pool) is the stem "
            "for 32-64 px images",
            file=sys.stderr,
        )


def batchnorm_lag_note(cfg: DictConfig, backbone: torch.nn.Module, total_steps: int) -> None:
    """A note when the backbone's BatchNorm running statistics cannot follow the training in
    ``total_steps`` steps: with momentum m they keep (1 - m)^steps of their initial values
    (torchvision's MobileNetV3 has m = 0.01: 37% after 100 steps), and every eval-mode feature
    (kNN, ``selfsup eval``, ``embed``) uses them."""
    momenta = [
        m.momentum
        for m in backbone.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.momentum is not None
    ]
    if not momenta:
        return
    slowest = min(momenta)
    kept = (1 - slowest) ** total_steps
    if kept > 0.05:
        fix = "train longer" + (", or set model.bn_momentum=0.1" if slowest < 0.1 else "")
        print(
            f"selfsup: note: the BatchNorm layers of {cfg.model.backbone} update their running "
            f"statistics with momentum {slowest:g}: after this run's {total_steps} steps they "
            f"still hold {kept:.0%} of their initial values, so eval-mode features (kNN, eval, "
            f"embed) are not yet the trained network's; {fix}",
            file=sys.stderr,
        )


def storage_size_note(cfg: DictConfig) -> None:
    """A note when the cache stores images much larger than the crops need (``--preset
    imagenette --image-size 64`` keeps the preset's 146 px storage): a cache, and a decode,
    several times larger than needed."""
    d = cfg.data
    needed = eval_storage_size(d)
    if d.storage_size and d.storage_size > 1.5 * needed:
        factor = (d.storage_size / needed) ** 2
        print(
            f"selfsup: note: data.storage_size={d.storage_size} stores {d.storage_size} px "
            f"images for {d.image_size} px crops, a cache {factor:.1f}x that of "
            f"data.storage_size={needed} (what a whole-image crop and the eval centre crop "
            "use): set it lower to save disk and decoding time, or keep it for more detail in "
            "small random crops",
            file=sys.stderr,
        )
