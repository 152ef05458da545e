"""Exponential-moving-average targets: BYOL's target network and MoCo's key encoder.

- [0] MoCo, 2019, https://arxiv.org/abs/1911.05722, eq. 2: theta_k <- m theta_k + (1 - m) theta_q
- [1] BYOL, 2020, https://arxiv.org/abs/2006.07733, sec. 3.1: xi <- tau xi + (1 - tau) theta,
  with tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, tau: float) -> None:
    """In place: xi <- tau * xi + (1 - tau) * theta for every parameter; buffers copied.

    ``target`` and ``online`` must have the same architecture (``target`` is a deep copy).
    Buffers (BatchNorm running statistics) are copied rather than averaged, as the target is only
    run in train mode where they are unused. Uses fused ``torch._foreach`` kernels: one launch per
    op for all parameters instead of one per tensor.
    """
    if isinstance(tau, int | float) and not 0.0 <= tau <= 1.0:
        raise ValueError(f"EMA decay tau must lie in [0, 1]; got {tau}")
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError(
            f"EMA target has {len(target_params)} parameters, online {len(online_params)}"
        )
    for t, o in zip(target_params, online_params, strict=True):
        if t.shape != o.shape:
            raise ValueError(
                f"EMA target and online networks differ: a parameter of shape {tuple(t.shape)} "
                f"meets one of {tuple(o.shape)} (the target must be a copy of the online network)"
            )
    if target_params:  # a parameter-free network (a pooling backbone) has nothing to average
        torch._foreach_mul_(target_params, tau)
        torch._foreach_add_(target_params, online_params, alpha=1.0 - tau)
    target_buffers = list(target.buffers())
    if target_buffers:
        torch._foreach_copy_(target_buffers, list(online.buffers()))


def cosine_tau(base: float, progress: float) -> float:
    """BYOL's decay schedule tau = 1 - (1 - base) * (cos(pi * progress) + 1) / 2.

    ``base`` at progress 0, rising to 1.0 at progress 1 (progress = step / total steps, clamped).
    """
    if not 0.0 <= base <= 1.0:
        raise ValueError(f"cosine_tau: base must lie in [0, 1]; got {base}")
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class EmaTarget(nn.Module):
    """A frozen copy xi of an online network theta, moved towards it by ``update_``.

    Initialised equal to the online module, with ``requires_grad=False`` on all parameters; its
    forward runs under ``torch.no_grad()`` so no graph is built and no gradient reaches it.
    """

    def __init__(self, online: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(online).requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """The frozen copy's output for ``x``, without a graph (no gradient reaches xi)."""
        with torch.no_grad():
            return self.module(x)

    def update_(self, online: nn.Module, tau: float) -> None:
        """xi <- tau * xi + (1 - tau) * theta (see ``ema_update_``)."""
        ema_update_(self.module, online, tau)
