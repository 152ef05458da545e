"""The checks every method makes of what it is given: its options when built, its two views on
each forward, the training progress on each target update. A wrong input is a clear error here,
not a silently wrong objective (views of two sizes would be paired with the wrong images once
``torch.cat`` and ``chunk(2)`` mix them) or a frozen target (a step count passed as progress)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from selfsup.errors import ConfigError
from selfsup.models.backbones import check_has_parameters

# The numeric options' valid ranges: (integer only, check, what it must be). Used by the methods'
# constructors and, before any data is read, by the CLI's config check, so both name the same
# problem. MoCo's queue_size and bn_splits have their own checks, which also depend on the
# batch size.
_OPTION_RANGES: dict[str, tuple[bool, Any, str]] = {
    "temperature": (False, lambda v: v > 0, "> 0"),
    "momentum": (False, lambda v: 0 <= v <= 1, "in [0, 1] (the key encoder's EMA decay m)"),
    "tau_base": (False, lambda v: 0 <= v <= 1, "in [0, 1] (the target's EMA decay at step 0)"),
    "proj_hidden": (True, lambda v: v >= 1, ">= 1"),
    "proj_dim": (True, lambda v: v >= 1, ">= 1"),
    "pred_hidden": (True, lambda v: v >= 1, ">= 1"),
    "proj_layers": (True, lambda v: v >= 1, ">= 1"),
}


def option_problem(key: str, value: Any) -> str | None:
    """Why ``method.<key>=value`` is not a valid value, or None (``None`` itself: the default)."""
    if key not in _OPTION_RANGES or value is None:
        return None
    integer, ok, must = _OPTION_RANGES[key]
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        return f"method.{key}={value!r} must be {kind} {must}, not a {type(value).__name__}"
    return None if ok(value) else f"method.{key}={value!r} must be {must}"


def check_method_args(method: str, backbone: Any, feat_dim: Any, **options: Any) -> None:
    """ConfigError for a backbone that is not an ``nn.Module``, a ``feat_dim`` that is not a
    positive integer, or an option out of its range (:func:`option_problem`)."""
    if isinstance(backbone, tuple) and backbone and isinstance(backbone[0], nn.Module):
        raise ConfigError(
            f"{method}: backbone is a tuple; build_backbone returns (module, feat_dim): unpack "
            "it, `backbone, feat_dim = build_backbone(...)`"
        )
    if not isinstance(backbone, nn.Module):
        raise ConfigError(
            f"{method}: backbone must be an nn.Module mapping [B, 3, S, S] images to [B, D] "
            f"features, got {type(backbone).__name__} (a name such as 'resnet18' goes through "
            "selfsup.models.build_backbone first)"
        )
    check_has_parameters(backbone, f"{method}: the backbone {type(backbone).__name__}")
    if isinstance(feat_dim, bool) or not isinstance(feat_dim, int) or feat_dim < 1:
        raise ConfigError(
            f"{method}: feat_dim must be a positive integer (the backbone's output width D), "
            f"got {feat_dim!r}"
        )
    for key, value in options.items():
        if problem := option_problem(key, value):
            raise ConfigError(f"{method}: {problem}")


def check_views(method: str, x1: Tensor, x2: Tensor) -> None:
    """ValueError unless the two views are image batches of one shape ``[B, 3, S, S]``."""
    if x1.ndim != 4 or x1.shape != x2.shape:
        raise ValueError(
            f"{method}: the two views must be image batches of one shape [B, C, S, S], got "
            f"{tuple(x1.shape)} and {tuple(x2.shape)}; view i of x1 and of x2 must be the same "
            "image"
        )


def check_progress(method: str, progress: float) -> None:
    """ValueError unless ``progress`` (step / total steps) lies in [0, 1]."""
    if isinstance(progress, bool) or not isinstance(progress, int | float):
        raise ValueError(f"{method}.update_target: progress must be a number, got {progress!r}")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(
            f"{method}.update_target: progress must lie in [0, 1] (step / total steps), got "
            f"{progress!r}; a step count would leave the target schedule at its end"
        )
