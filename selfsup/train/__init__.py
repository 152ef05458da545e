"""Training: config, optimizers and schedules, checkpoints, logging, run directories, pre-run
checks, the loop."""

from selfsup.train.config import RunConfig, resolve_config
from selfsup.train.optim import (
    LARS,
    build_optimizer,
    optimizer_from_config,
    scaled_lr,
    set_lr,
    split_decay_groups,
    warmup_cosine,
)
from selfsup.train.trainer import Trainer, TrainResult

__all__ = [
    "LARS",
    "RunConfig",
    "Trainer",
    "TrainResult",
    "build_optimizer",
    "optimizer_from_config",
    "resolve_config",
    "scaled_lr",
    "set_lr",
    "split_decay_groups",
    "warmup_cosine",
]
