"""The four methods, one module each, and ``build_method`` to construct one by name.

Every method is an ``nn.Module`` with ``backbone`` (the encoder to keep), ``forward(x1, x2) ->
{"loss": scalar, "z": [B, d] detached projector output of view 1, ...detached diagnostics}``,
``update_target(progress)`` (call after every optimizer step) and ``param_groups()``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from selfsup.errors import ConfigError
from selfsup.methods.byol import BYOL
from selfsup.methods.ema import EmaTarget, cosine_tau, ema_update_
from selfsup.methods.inputs import option_problem
from selfsup.methods.moco import MoCo
from selfsup.methods.simclr import SimCLR
from selfsup.methods.simsiam import SimSiam

METHOD_CLASSES: dict[str, type[nn.Module]] = {
    "simclr": SimCLR,
    "moco": MoCo,
    "byol": BYOL,
    "simsiam": SimSiam,
}
METHODS: tuple[str, ...] = tuple(METHOD_CLASSES)


def method_options(name: str) -> tuple[str, ...]:
    """The keyword options of method ``name`` (its constructor arguments after backbone, D)."""
    params = list(inspect.signature(METHOD_CLASSES[name].__init__).parameters)
    return tuple(params[3:])  # drop self, backbone, feat_dim


def method_defaults(name: str) -> dict[str, Any]:
    """Each keyword option of method ``name`` with its default value."""
    params = inspect.signature(METHOD_CLASSES[name].__init__).parameters
    return {key: params[key].default for key in method_options(name)}


def _as_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(f"Method config must be a mapping or dataclass, got {type(cfg).__name__}.")


def build_method(
    name: str, backbone: nn.Module, feat_dim: int, cfg: Any = None, **kwargs: Any
) -> nn.Module:
    """Build method ``name`` around ``backbone`` (feature dim ``feat_dim``).

    Options come from ``cfg`` (a mapping or dataclass such as the method section of the config)
    and ``kwargs`` (which win). ``cfg`` may hold options of other methods and a ``name`` key:
    those are ignored, as are ``None`` values (the method's default); a key no method knows
    raises ``ConfigError``, as does any ``kwargs`` key this method does not take.
    """
    name = name.lower() if isinstance(name, str) else name  # "SimCLR" names simclr too
    if name not in METHOD_CLASSES:
        raise ConfigError(
            f"Unknown method {name!r} (setting `method.name`); valid methods: {', '.join(METHODS)}."
        )
    own = set(method_options(name))
    known = {opt for method in METHODS for opt in method_options(method)} | {"name"}
    options = _as_dict(cfg)
    unknown = sorted(set(options) - known) + sorted(set(kwargs) - own)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(own), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"Unknown option(s) {', '.join(unknown)} for method {name!r} (settings `method.*`)"
            f"{hint}; valid options: {', '.join(sorted(own))}."
        )
    # None in cfg means "the method's default".
    options = {k: v for k, v in options.items() if k in own and v is not None} | kwargs
    return METHOD_CLASSES[name](backbone, feat_dim, **options)


__all__ = [
    "BYOL",
    "METHODS",
    "METHOD_CLASSES",
    "EmaTarget",
    "MoCo",
    "SimCLR",
    "SimSiam",
    "build_method",
    "cosine_tau",
    "ema_update_",
    "method_defaults",
    "method_options",
    "option_problem",
]
