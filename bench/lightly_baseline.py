"""The lightly 1.6 side of ``bench/throughput.py``: lightly's standard CIFAR-10 training setting.

What "standard" means here (lightly's ``benchmarks/cifar10_benchmark.py`` and its examples):

- data: ``LightlyDataset`` over an ImageFolder of JPEGs, lightly's per-image PIL transforms
  (``SimCLRTransform`` / ``MoCoV2Transform`` / ``BYOLTransform`` / ``SimSiamTransform`` with
  ``input_size=32`` and no Gaussian blur), a ``torch.utils.data.DataLoader`` with worker
  processes, ``pin_memory``, ``drop_last`` and ``persistent_workers``;
- model: lightly's heads (``lightly.models.modules``) and losses (``lightly.loss``) with the sizes
  of our cifar10 presets, lightly's ``update_momentum`` / ``cosine_schedule`` for the EMA
  targets, each view through the networks separately as in lightly's examples.

Model-side settings are made equal to ours so that the measured gap is the data pipeline's: the
same ResNet-18 with the small-image stem (``selfsup.models.build_backbone``), bf16 autocast on
CUDA, channels-last on CUDA, and the same optimizer (``selfsup.train.optim.build_optimizer``,
same learning-rate schedule). lightly is imported lazily: it is a bench-only extra
(``pip install -e .[bench]``); without it :func:`lightly_version` says why.
"""

from __future__ import annotations

import copy
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfsup.augment import CIFAR10_MEAN, CIFAR10_STD
from selfsup.data.sources import TAR_SUFFIXES
from selfsup.errors import DataError

LIGHTLY_VERSION = "1.6.0"
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


def lightly_version() -> str:
    """The installed lightly version; raises ImportError with an install hint if it is missing."""
    try:
        import lightly
    except ImportError as exc:
        raise ImportError(
            f"lightly is not installed ({exc}); install the bench extra: "
            f"pip install 'lightly=={LIGHTLY_VERSION}' (see bench/README.md)"
        ) from None
    return str(lightly.__version__)


# --------------------------------------------------------------------------- data


def image_folder_root(data: str, scratch: str | os.PathLike[str] | None = None) -> Path:
    """An ImageFolder root (``<class>/<image>``) of the train split of ``data`` for lightly.

    ``data`` is a folder (its ``train/`` subfolder if it has one) or a tar archive of such a
    folder, which is extracted once (train split only) under ``scratch`` (default
    ``$TMPDIR/selfsup-bench``) and reused while its ``.complete`` marker exists.
    """
    path = Path(data).expanduser()
    if path.is_dir():
        return _train_root(path)
    if not (path.is_file() and path.name.lower().endswith(TAR_SUFFIXES)):
        raise DataError(
            f"lightly baseline: --data {data!r} must be an image folder or a tar archive of one "
            "(lightly reads image files; named datasets such as 'cifar10' are not supported)"
        )
    base = Path(scratch) if scratch else Path(tempfile.gettempdir()) / "selfsup-bench"
    stat = path.stat()
    target = base / f"{path.name}-{stat.st_size}-{int(stat.st_mtime)}"
    marker = target / ".complete"
    if not marker.exists():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "r:*") as tar:
            members = [m for m in tar if m.isfile()]
            has_train = any("train" in Path(m.name).parts[:-1] for m in members)
            wanted = [m for m in members if not has_train or "train" in Path(m.name).parts[:-1]]
            tar.extractall(target, members=wanted, filter="data")
        marker.write_text("ok\n")
    return _train_root(target)


def _train_root(folder: Path) -> Path:
    """Descend single wrapper folders; pick ``train/`` when the folder holds split folders."""
    current = folder
    while True:
        children = [c for c in current.iterdir() if c.is_dir() and not c.name.startswith(".")]
        train = [c for c in children if c.name.lower() == "train"]
        if train:
            return train[0]
        files = [c for c in current.iterdir() if c.is_file() and not c.name.startswith(".")]
        if len(children) == 1 and not files and children[0].name.lower() not in SPLIT_NAMES:
            current = children[0]
            continue
        return current


def build_transform(method: str, image_size: int) -> Any:
    """lightly's two-view transform of ``method`` with its CIFAR settings (no blur at 32 px).

    Jitter strengths follow our cifar10 presets (SimCLR ``cj_strength=0.5`` as lightly
    recommends for CIFAR; MoCo v2 / SimSiam (0.4, 0.4, 0.4, 0.1) and crop scale 0.08 at small
    sizes; BYOL's asymmetric views with solarisation 0.2 on view 2).
    """
    from lightly.transforms import (
        BYOLTransform,
        BYOLView1Transform,
        BYOLView2Transform,
        MoCoV2Transform,
        SimCLRTransform,
        SimSiamTransform,
    )

    normalize = {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
    common = dict(input_size=image_size, gaussian_blur=0.0, normalize=normalize)
    if method == "simclr":
        return SimCLRTransform(cj_strength=0.5, **common)
    if method == "moco":
        return MoCoV2Transform(cj_hue=0.1, min_scale=0.08, **common)
    if method == "byol":
        return BYOLTransform(
            view_1_transform=BYOLView1Transform(**common),
            view_2_transform=BYOLView2Transform(**common),
        )
    if method == "simsiam":
        return SimSiamTransform(min_scale=0.08, **common)
    raise ValueError(f"no lightly transform for method {method!r}")


def build_loader(
    root: Path, transform: Any, batch_size: int, workers: int, pin_memory: bool
) -> torch.utils.data.DataLoader:
    """``LightlyDataset`` + ``DataLoader`` as lightly's CIFAR-10 benchmark sets them up."""
    from lightly.data import LightlyDataset

    dataset = LightlyDataset(input_dir=str(root), transform=transform)
    if len(dataset) < batch_size:
        raise DataError(
            f"lightly baseline: {root} holds {len(dataset)} images, fewer than one batch of "
            f"{batch_size}; lower --batch-size"
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )


def endless(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    """Batches of ``loader`` epoch after epoch (each epoch reshuffles, as in training)."""
    while True:
        yield from loader


# --------------------------------------------------------------------------- model


class LightlyMethod(nn.Module):
    """One of SimCLR / MoCo v2 / BYOL / SimSiam built from lightly's heads and losses.

    ``forward(x0, x1)`` takes two views ``[B, 3, S, S]`` and returns the scalar loss, computed as
    in lightly's examples and CIFAR-10 benchmark (views through the networks one at a time):

    - simclr: ``NTXentLoss(z0, z1)`` (SimCLR eq. 1), ``SimCLRProjectionHead``;
    - moco: symmetric ``NTXentLoss`` with a memory bank of ``queue_size`` keys (MoCo eq. 1),
      ``MoCoProjectionHead``, momentum encoder updated with ``update_momentum`` (eq. 2);
    - byol: ``0.5 * (NegCos(p0, z1') + NegCos(p1, z0'))`` (BYOL eq. 2), ``BYOLProjectionHead``
      and ``BYOLPredictionHead``, EMA target with ``cosine_schedule(tau_base -> 1)``;
    - simsiam: ``0.5 * (NegCos(p0, sg(z1)) + NegCos(p1, sg(z0)))`` (SimSiam eq. 2),
      ``SimSiamProjectionHead`` / ``SimSiamPredictionHead``.

    Args:
        name: method name.
        backbone: ``[B, 3, S, S] -> [B, feat_dim]``.
        feat_dim: backbone feature dim D.
        options: the ``method`` section of the resolved config (sizes, temperature, tau).
    """

    def __init__(self, name: str, backbone: nn.Module, feat_dim: int, options: dict) -> None:
        super().__init__()
        from lightly.loss import NegativeCosineSimilarity, NTXentLoss
        from lightly.models import modules as heads
        from lightly.models.utils import deactivate_requires_grad

        self.name = name
        self.backbone = backbone
        hidden, out = options.get("proj_hidden") or feat_dim, options.get("proj_dim") or 128
        self.prediction_head: nn.Module | None = None
        if name == "simclr":
            self.projection_head = heads.SimCLRProjectionHead(feat_dim, hidden, out)
            self.criterion = NTXentLoss(temperature=options.get("temperature") or 0.5)
        elif name == "moco":
            self.projection_head = heads.MoCoProjectionHead(feat_dim, hidden, out)
            queue = options.get("queue_size") or 4096
            self.criterion = NTXentLoss(
                temperature=options.get("temperature") or 0.2, memory_bank_size=(queue, out)
            )
        elif name == "byol":
            self.projection_head = heads.BYOLProjectionHead(feat_dim, hidden, out)
            pred = options.get("pred_hidden") or 4096
            self.prediction_head = heads.BYOLPredictionHead(out, pred, out)
            self.criterion = NegativeCosineSimilarity()
        elif name == "simsiam":
            self.projection_head = heads.SimSiamProjectionHead(feat_dim, hidden, out)
            pred = options.get("pred_hidden") or 512
            self.prediction_head = heads.SimSiamPredictionHead(out, pred, out)
            self.criterion = NegativeCosineSimilarity()
        else:
            raise ValueError(f"no lightly model for method {name!r}")
        self.momentum = float(options.get("momentum") or 0.99)
        self.tau_base = float(options.get("tau_base") or 0.99)
        self.backbone_momentum: nn.Module | None = None
        self.projection_head_momentum: nn.Module | None = None
        if name in ("moco", "byol"):
            self.backbone_momentum = copy.deepcopy(backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

    def _project(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    @torch.no_grad()
    def _project_momentum(self, x: Tensor) -> Tensor:
        assert self.backbone_momentum is not None and self.projection_head_momentum is not None
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1))

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        """Two views ``[B, 3, S, S]`` -> scalar loss."""
        if self.name == "simclr":
            return self.criterion(self._project(x0), self._project(x1))
        if self.name == "moco":
            q0, q1 = self._project(x0), self._project(x1)
            k0, k1 = self._project_momentum(x0), self._project_momentum(x1)
            return 0.5 * (self.criterion(q0, k1) + self.criterion(q1, k0))
        assert self.prediction_head is not None
        z0, z1 = self._project(x0), self._project(x1)
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
        if self.name == "byol":
            t0, t1 = self._project_momentum(x0), self._project_momentum(x1)
            return 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0))
        return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))

    def update_target(self, step: int, total_steps: int) -> None:
        """lightly's momentum update after the optimizer step (MoCo: fixed m; BYOL: cosine)."""
        if self.backbone_momentum is None or self.projection_head_momentum is None:
            return
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        if self.name == "byol":
            m = cosine_schedule(step, max(1, total_steps), self.tau_base, 1.0)
        else:
            m = self.momentum
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)
