"""SimCLR: contrast each view against the other views of the batch.

- [0] SimCLR, 2020, https://arxiv.org/abs/2002.05709
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.losses import nt_xent_loss
from selfsup.methods.inputs import check_method_args, check_progress, check_views
from selfsup.models.heads import ProjectionHead


class SimCLR(nn.Module):
    """SimCLR [0]: encoder f, 2-layer projector g, NT-Xent loss (eq. 1) on z = g(f(x)).

    Both views go through the encoder in one call (``torch.cat``), so BatchNorm statistics are
    taken over all 2N views, as with SimCLR's global BN.

    Args:
        backbone: encoder f, [B, 3, S, S] -> [B, feat_dim].
        feat_dim: D.
        proj_hidden: projector hidden width (default D, as in the paper).
        proj_dim: projection dim d (128).
        temperature: T of NT-Xent (0.5 for CIFAR-10 in the paper; 0.1 - 0.2 on ImageNet).
        gather_distributed: under DDP, contrast against the views of all ranks (the global
            batch, 2(NB - 1) negatives per view) rather than this rank's 2(B - 1).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        proj_hidden: int | None = None,
        proj_dim: int = 128,
        temperature: float = 0.5,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        check_method_args(
            "simclr", backbone, feat_dim, proj_hidden=proj_hidden, proj_dim=proj_dim,
            temperature=temperature,
        )  # fmt: skip
        self.backbone = backbone
        self.projector = ProjectionHead(feat_dim, proj_hidden or feat_dim, proj_dim)
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
        """Views x1, x2: [B, 3, S, S] -> {"loss": scalar, "z", "z2": [B, d], "h": [B, D],
        "pos_cos": scalar} (all but the loss detached, for the monitors)."""
        check_views("simclr", x1, x2)
        h = self.backbone(torch.cat([x1, x2]))
        z1, z2 = self.projector(h).chunk(2)
        loss = nt_xent_loss(z1, z2, self.temperature, self.gather_distributed)
        pos_cos = F.cosine_similarity(z1.detach(), z2.detach(), dim=1).mean()
        return {
            "loss": loss,
            "z": z1.detach(),
            "z2": z2.detach(),
            "h": h[: x1.shape[0]].detach(),
            "pos_cos": pos_cos,
        }

    def update_target(self, progress: float) -> None:
        """SimCLR has no target network (``progress`` is checked all the same)."""
        check_progress("simclr", progress)

    def param_groups(self) -> list[dict]:
        """One optimizer group: the backbone and projector."""
        return [{"name": "online", "params": [p for p in self.parameters() if p.requires_grad]}]
