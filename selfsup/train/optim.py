"""Optimizers and learning-rate schedules.

LARS follows You et al. 2017, "Large Batch Training of Convolutional Networks", as SimCLR's and
BYOL's implementations (and lightly's) compute it: for each parameter w with gradient g and
weight decay beta,

    d = g + beta * w
    local_lr = eta * ||w|| / ||d||                       (1 where either norm is 0)
    v <- m * v + local_lr * d                            w <- w - lr * v

The lr multiplies the momentum buffer, as in PyTorch's SGD, so a schedule's change of lr acts on the
whole buffer at once (TensorFlow's momentum optimizer, which SimCLR used, folds lr into v). Biases
and normalisation parameters are excluded from both the adaptation and the weight decay when
``exclude_bias_norm`` is set; ``optim.exclude_bias_norm`` defaults to that for LARS, as in the BYOL
and SimCLR papers, and to off for SGD.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from selfsup.errors import CheckpointError


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling.

    Param-group keys: ``lr``, ``momentum``, ``weight_decay``, ``trust_coefficient`` and
    ``lars_exclude`` (True: plain SGD momentum for that group, no adaptation).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            lars_exclude=False,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One LARS update of every parameter with a gradient (the module docstring's formula)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"] != 0:
                    grad = grad.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    # no host sync: torch.where keeps the trust ratio on the device
                    ratio = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["trust_coefficient"] * w_norm / g_norm,
                        torch.ones_like(w_norm),
                    )
                    grad = grad.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def is_bias_or_norm(name: str, param: torch.Tensor) -> bool:
    """Biases and the affine parameters of BatchNorm/LayerNorm are the 1-D parameters."""
    return param.ndim <= 1 or name.endswith(".bias")


def split_decay_groups(
    module_groups: list[dict], named: dict[int, str], exclude_bias_norm: bool
) -> list[dict]:
    """Split each param group into weights and bias/norm params (the latter: no decay, no LARS)."""
    groups: list[dict] = []
    for group in module_groups:
        params = [p for p in group["params"] if p.requires_grad]
        extra = {k: v for k, v in group.items() if k != "params"}
        if not exclude_bias_norm:
            groups.append({"params": params, **extra})
            continue
        decay = [p for p in params if not is_bias_or_norm(named.get(id(p), ""), p)]
        no_decay = [p for p in params if is_bias_or_norm(named.get(id(p), ""), p)]
        if decay:
            groups.append({"params": decay, **extra})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True, **extra})
    return groups


def scaled_lr(base_lr: float, batch_size: int, reference: int, rule: str) -> float:
    """The linear (Goyal et al. 2017) or square-root scaling rule for the base learning rate."""
    if rule == "linear":
        return base_lr * batch_size / reference
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size / reference)
    return base_lr


def build_optimizer(
    method: nn.Module,
    name: str,
    lr: float,
    momentum: float,
    weight_decay: float,
    exclude_bias_norm: bool,
    trust_coefficient: float = 0.001,
) -> torch.optim.Optimizer:
    """SGD or LARS over the method's param groups (``method.param_groups()`` if it has one)."""
    groups = _method_groups(method, exclude_bias_norm)
    for g in groups:
        g["base_lr"] = lr
    if name == "lars":
        return LARS(
            groups,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
        )
    for g in groups:
        g.pop("lars_exclude", None)
    kwargs = {"fused": True} if _all_cuda(groups) else {}
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs)


def _method_groups(method: nn.Module, exclude_bias_norm: bool) -> list[dict]:
    module_groups = (
        method.param_groups()
        if hasattr(method, "param_groups")
        else [{"params": list(method.parameters())}]
    )
    named = {id(p): n for n, p in method.named_parameters()}
    return split_decay_groups(module_groups, named, exclude_bias_norm)


def regroup_optimizer_state(
    saved: dict, method: nn.Module, saved_exclude_bias_norm: bool, optimizer: torch.optim.Optimizer
) -> dict:
    """A saved optimizer ``state_dict`` re-indexed for ``optimizer``'s param groups.

    ``state_dict`` numbers the parameters group by group, so a resume that turns
    ``optim.exclude_bias_norm`` on or off (one group per module group, or a decay and a no-decay
    group) numbers them anew: each momentum buffer is moved to its own parameter, found by the
    grouping the checkpoint was written with. Other layouts are a :class:`CheckpointError`.
    """
    saved_groups = _method_groups(method, saved_exclude_bias_norm)
    saved_sizes = [len(g["params"]) for g in saved["param_groups"]]
    if saved_sizes != [len(g["params"]) for g in saved_groups]:
        now = [len(g["params"]) for g in optimizer.param_groups]
        raise CheckpointError(
            f"the checkpoint's optimizer holds parameter groups of {saved_sizes} parameters, "
            f"this run's {now}: its trainable parameters changed (method.* or model.* "
            "settings); resume with the run's own settings, or start over with --overwrite"
        )
    saved_order = [p for g in saved_groups for p in g["params"]]
    saved_index = {id(p): i for i, p in enumerate(saved_order)}
    current = optimizer.state_dict()
    order = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for index, param in enumerate(order):
        old = saved_index.get(id(param))
        if old is not None and old in saved["state"]:
            state[index] = saved["state"][old]
    return {"state": state, "param_groups": current["param_groups"]}


def same_group_layout(saved: dict, optimizer: torch.optim.Optimizer) -> bool:
    """Whether a saved ``state_dict`` has ``optimizer``'s number of groups and group sizes."""
    return [len(g["params"]) for g in saved["param_groups"]] == [
        len(g["params"]) for g in optimizer.param_groups
    ]


def optimizer_from_config(method: nn.Module, optim_cfg, batch_size: int) -> torch.optim.Optimizer:
    """The optimizer a run's ``optim`` settings describe, with the base lr scaled to the batch."""
    lr = scaled_lr(optim_cfg.lr, batch_size, optim_cfg.lr_reference_batch, optim_cfg.lr_scaling)
    return build_optimizer(
        method,
        optim_cfg.name,
        lr,
        optim_cfg.momentum,
        optim_cfg.weight_decay,
        excludes_bias_norm(optim_cfg),
        optim_cfg.trust_coefficient,
    )


def excludes_bias_norm(optim_cfg) -> bool:
    """``optim.exclude_bias_norm``; unset: on for LARS, off for SGD (as resolve_config decides)."""
    if optim_cfg.exclude_bias_norm is None:
        return optim_cfg.name == "lars"
    return bool(optim_cfg.exclude_bias_norm)


def _all_cuda(groups: list[dict]) -> bool:
    return all(p.is_cuda for g in groups for p in g["params"]) and any(g["params"] for g in groups)


def match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give every optimizer state tensor its parameter's memory layout, after ``load_state_dict``.

    ``load_state_dict`` keeps the saved strides: momentum buffers of a channels-last run resumed
    with ``train.channels_last=false`` (or the reverse) no longer match their parameters, which
    CUDA's fused SGD refuses and the CPU's fused kernel silently mis-updates.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.shape == p.shape
                    and value.stride() != p.stride()
                ):
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base lr: linear warm-up from ~0, then half-cosine decay to ``min_ratio``.

    SimCLR/BYOL: "linear warm-up for the first 10 epochs, then decay with the cosine schedule
    without restarts" (Loshchilov & Hutter 2017). Step ``s < W`` takes ``(s + 1) / W``, then the
    cosine starts from its peak at step ``W``: the peak is held for two steps (the common
    ``(epoch + 1) / W`` warm-up form; no preset warms up).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set each group's lr to base_lr * factor, except groups marked ``fixed_lr``; return the lr.

    ``base_lr`` is set by :func:`build_optimizer`; a group without it (an optimizer built by hand)
    takes its lr at the first call as its base.
    """
    lr = 0.0
    for g in optimizer.param_groups:
        g.setdefault("base_lr", g["lr"])
        if g.get("fixed_lr"):  # SimSiam's predictor: its lr is not on the schedule
            g["lr"] = g["base_lr"]
        else:
            g["lr"] = g["base_lr"] * factor
            lr = max(lr, g["lr"])
    return lr
