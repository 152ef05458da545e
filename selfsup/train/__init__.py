"""Training: config, optimizers and schedules, checkpoints, logging, the loop."""

from selfsup.train.config import RunConfig, resolve_config
from selfsup.train.trainer import Trainer, TrainResult

__all__ = ["RunConfig", "Trainer", "TrainResult", "resolve_config"]
