"""MLP heads on top of the backbone: projectors g and predictors q.

Recipes from the papers (D = backbone feature dim, 2048 for ResNet-50):

- SimCLR [0]: 2-layer projector D -> D -> 128 with ReLU (BN on the hidden layer, as in the
  official code): ``ProjectionHead(D, D, 128)``.
- MoCo v2 [1]: 2-layer projector 2048 -> 2048 -> 128, ReLU, no BN:
  ``ProjectionHead(D, D, 128, batch_norm=False)``.
- BYOL [2]: projector and predictor are both Linear 4096 -> BN -> ReLU -> Linear 256:
  ``ProjectionHead(D, 4096, 256)`` and ``PredictionHead(256, 4096, 256)``.
- SimSiam [3]: 3-layer projector with BN on every layer including the output (no ReLU after it):
  ``ProjectionHead(D, 2048, 2048, num_layers=3, last_bn=True)``; bottleneck predictor
  2048 -> 512 -> 2048 with BN only on the hidden layer: ``PredictionHead(2048, 512, 2048)``.

- [0] SimCLR, 2020, https://arxiv.org/abs/2002.05709
- [1] MoCo v2, 2020, https://arxiv.org/abs/2003.04297
- [2] BYOL, 2020, https://arxiv.org/abs/2006.07733
- [3] SimSiam, 2020, https://arxiv.org/abs/2011.10566
"""

from __future__ import annotations

from torch import Tensor, nn

from selfsup.errors import ConfigError


def _hidden_block(in_dim: int, out_dim: int, batch_norm: bool) -> list[nn.Module]:
    # A Linear followed by BN needs no bias: BN's shift replaces it.
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(out_dim))
    layers.append(nn.ReLU(inplace=True))
    return layers


class ProjectionHead(nn.Sequential):
    """Projector g: [B, in_dim] -> [B, out_dim], an MLP of ``num_layers`` Linear layers.

    Hidden layers are Linear -> (BN) -> ReLU; the last layer is a Linear, followed by a
    BatchNorm1d without affine parameters when ``last_bn`` (SimSiam's output BN) and never by a
    ReLU.

    Args:
        in_dim: backbone feature dim D.
        hidden_dim: width of the hidden layers.
        out_dim: projection dim d.
        num_layers: number of Linear layers, >= 1 (2 for SimCLR/MoCo v2/BYOL, 3 for SimSiam).
        batch_norm: BN on the hidden layers.
        last_bn: BN (affine=False) on the output.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        batch_norm: bool = True,
        last_bn: bool = False,
    ) -> None:
        if num_layers < 1:
            raise ConfigError(f"Projection head `num_layers` must be >= 1, got {num_layers}.")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += _hidden_block(dim, hidden_dim, batch_norm)
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_dim] -> [B, out_dim]."""
        return super().forward(x)


class PredictionHead(nn.Sequential):
    """Predictor q (BYOL) / h (SimSiam): [B, in_dim] -> [B, out_dim], Linear-BN-ReLU-Linear.

    BN only on the hidden layer; the output is a plain Linear. BYOL uses 256 -> 4096 -> 256,
    SimSiam the bottleneck 2048 -> 512 -> 2048.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(*_hidden_block(in_dim, hidden_dim, True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_dim] -> [B, out_dim]."""
        return super().forward(x)
