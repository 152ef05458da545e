"""Backbones (torchvision ResNets) and MLP heads."""

from selfsup.models.backbones import (
    BACKBONES,
    ResNetTiny,
    backbone_to_torchvision,
    build_backbone,
)
from selfsup.models.heads import PredictionHead, ProjectionHead

__all__ = [
    "BACKBONES",
    "PredictionHead",
    "ProjectionHead",
    "ResNetTiny",
    "backbone_to_torchvision",
    "build_backbone",
]
