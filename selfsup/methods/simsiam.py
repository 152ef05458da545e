"""SimSiam: a shared encoder, a predictor and a stop-gradient, no negatives and no target network.

- [0] SimSiam, 2020, https://arxiv.org/abs/2011.10566
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import ConfigError
from selfsup.losses import negative_cosine_similarity
from selfsup.methods.inputs import check_method_args, check_progress, check_views
from selfsup.models.heads import PredictionHead, ProjectionHead

SIMSIAM_PREDICTORS = ("mlp", "none", "random_fixed")


class SimSiam(nn.Module):
    """SimSiam [0]: encoder f (backbone + 3-layer projector with output BN), predictor h.

    Loss (eq. 4): D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2 with D the negative cosine
    similarity. Both views go through f in one call (``torch.cat``): BN statistics span 2B views.
    Ablations of the paper (sec. 4): ``stop_gradient=False`` and ``predictor="none"`` collapse,
    ``predictor="random_fixed"`` (h frozen at init) does not train. ``fixed_predictor_lr`` marks
    the predictor's parameter group ``"fixed_lr": True``: the trainer then keeps its learning rate
    constant instead of cosine-decayed, which the paper finds slightly better (table 1c).

    Args:
        backbone: [B, 3, S, S] -> [B, feat_dim].
        feat_dim: D.
        proj_hidden, proj_dim, proj_layers: projector D -> 2048 -> 2048 -> 2048 (3 layers).
        pred_hidden: predictor bottleneck 2048 -> 512 -> 2048.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        proj_hidden: int = 2048,
        proj_dim: int = 2048,
        proj_layers: int = 3,
        pred_hidden: int = 512,
        stop_gradient: bool = True,
        predictor: str = "mlp",
        fixed_predictor_lr: bool = True,
    ) -> None:
        super().__init__()
        check_method_args(
            "simsiam", backbone, feat_dim, proj_hidden=proj_hidden, proj_dim=proj_dim,
            proj_layers=proj_layers, pred_hidden=pred_hidden,
        )  # fmt: skip
        if predictor not in SIMSIAM_PREDICTORS:
            raise ConfigError(
                f"SimSiam `predictor` must be one of {SIMSIAM_PREDICTORS}, got {predictor!r}."
            )
        self.backbone = backbone
        self.projector = ProjectionHead(
            feat_dim, proj_hidden, proj_dim, num_layers=proj_layers, last_bn=True
        )
        self.predictor = PredictionHead(proj_dim, pred_hidden, proj_dim)
        if predictor == "none":
            self.predictor = nn.Identity()
        elif predictor == "random_fixed":
            self.predictor.requires_grad_(False)
        self.stop_gradient, self.fixed_predictor_lr = stop_gradient, fixed_predictor_lr

    def forward(self, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
        """Views [B, 3, S, S] -> {"loss", "z": z1, "z2": z2 [B, d], "h": [B, D] of view 1,
        "pos_cos": mean cos(z1, z2)}."""
        check_views("simsiam", x1, x2)
        h = self.backbone(torch.cat([x1, x2]))
        z = self.projector(h)
        (z1, z2), (p1, p2) = z.chunk(2), self.predictor(z).chunk(2)
        loss = 0.5 * negative_cosine_similarity(p1, z2, self.stop_gradient)
        loss = loss + 0.5 * negative_cosine_similarity(p2, z1, self.stop_gradient)
        pos_cos = F.cosine_similarity(z1.detach(), z2.detach(), dim=1).mean()
        return {
            "loss": loss,
            "z": z1.detach(),
            "z2": z2.detach(),  # view 2, for the monitors' alignment
            "h": h[: x1.shape[0]].detach(),  # backbone features of view 1
            "pos_cos": pos_cos,
        }

    def update_target(self, progress: float) -> None:
        """SimSiam has no target network: the stop-gradient replaces it (``progress`` is checked
        all the same)."""
        check_progress("simsiam", progress)

    def param_groups(self) -> list[dict]:
        """Encoder group, plus the predictor group flagged ``fixed_lr`` (if it has parameters)."""
        predictor_ids = {id(p) for p in self.predictor.parameters()}
        encoder = [p for p in self.parameters() if p.requires_grad and id(p) not in predictor_ids]
        groups = [{"name": "encoder", "params": encoder}]
        predictor = [p for p in self.predictor.parameters() if p.requires_grad]
        if predictor:
            groups.append(
                {"name": "predictor", "params": predictor, "fixed_lr": self.fixed_predictor_lr}
            )
        return groups
