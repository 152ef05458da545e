"""BYOL: an online network predicts a slow-moving target network's projection of the other view.

- [0] BYOL, 2020, https://arxiv.org/abs/2006.07733
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import ConfigError
from selfsup.losses import byol_loss
from selfsup.methods.ema import EmaTarget, cosine_tau
from selfsup.methods.inputs import check_method_args, check_progress, check_views
from selfsup.models.heads import PredictionHead, ProjectionHead

BYOL_TARGETS = ("ema", "random_fixed")


class BYOL(nn.Module):
    """BYOL [0]: online f_theta, g_theta, q_theta; target f_xi, g_xi an EMA of the online ones.

    Loss (eq. 2, symmetrised): byol_loss(q(z1), z2') + byol_loss(q(z2), z1'), where z' are target
    projections computed under ``no_grad``. After each optimizer step ``update_target`` sets
    xi <- tau xi + (1 - tau) theta with tau = 1 - (1 - tau_base)(cos(pi progress) + 1) / 2.
    Both views go through each network in one call (``torch.cat``): BN statistics span 2B views.

    Args:
        backbone: online encoder f_theta, [B, 3, S, S] -> [B, feat_dim].
        feat_dim: D.
        proj_hidden, proj_dim: projector D -> 4096 -> 256 (BN on the hidden layer).
        pred_hidden: predictor 256 -> 4096 -> 256.
        tau_base: EMA decay at the start (0.996 on ImageNet; 0.99 for short/small runs).
        predictor: ablation ``False`` drops q_theta (BYOL table 5: collapses).
        target: ``"ema"``, or ablation ``"random_fixed"``: the target stays at its random init.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        proj_hidden: int = 4096,
        proj_dim: int = 256,
        pred_hidden: int = 4096,
        tau_base: float = 0.99,
        predictor: bool = True,
        target: str = "ema",
    ) -> None:
        super().__init__()
        check_method_args(
            "byol", backbone, feat_dim, proj_hidden=proj_hidden, proj_dim=proj_dim,
            pred_hidden=pred_hidden, tau_base=tau_base,
        )  # fmt: skip
        if target not in BYOL_TARGETS:
            raise ConfigError(f"BYOL `target` must be one of {BYOL_TARGETS}, got {target!r}.")
        self.backbone = backbone
        self.projector = ProjectionHead(feat_dim, proj_hidden, proj_dim)
        self.predictor = PredictionHead(proj_dim, pred_hidden, proj_dim) if predictor else None
        self.target_backbone = EmaTarget(backbone)
        self.target_projector = EmaTarget(self.projector)
        self.tau_base, self.target = tau_base, target

    def forward(self, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
        """Views [B, 3, S, S] -> {"loss", "z": z1, "z2": z2 [B, d], "h": [B, D] of view 1,
        "online_target_cos": cos(z1, z1')}."""
        check_views("byol", x1, x2)
        x = torch.cat([x1, x2])
        h = self.backbone(x)
        z = self.projector(h)
        p = self.predictor(z) if self.predictor is not None else z
        z_target = self.target_projector(self.target_backbone(x))  # no_grad inside EmaTarget
        (p1, p2), (zt1, zt2) = p.chunk(2), z_target.chunk(2)
        loss = byol_loss(p1, zt2) + byol_loss(p2, zt1)
        z1, z2 = z.detach().chunk(2)
        online_target_cos = F.cosine_similarity(z1, zt1, dim=1).mean()
        return {
            "loss": loss,
            "z": z1,
            "z2": z2,  # the online projection of view 2, for the monitors' alignment
            "h": h[: x1.shape[0]].detach(),
            "online_target_cos": online_target_cos,
        }

    def target_momentum(self, progress: float) -> float:
        """tau at ``progress`` in [0, 1]: the cosine from ``tau_base`` to 1 (a fixed target: 1)."""
        check_progress("byol", progress)
        return cosine_tau(self.tau_base, progress) if self.target == "ema" else 1.0

    def update_target(self, progress: float) -> None:
        """EMA step of the target backbone and projector (no-op for ``target="random_fixed"``)."""
        if self.target == "ema":
            tau = self.target_momentum(progress)
            self.target_backbone.update_(self.backbone, tau)
            self.target_projector.update_(self.projector, tau)

    def param_groups(self) -> list[dict]:
        """One optimizer group: the online network (backbone, projector, predictor); the EMA
        target takes no gradients."""
        return [{"name": "online", "params": [p for p in self.parameters() if p.requires_grad]}]
