"""Backbones (torchvision models, factories of your own) and MLP heads."""

from selfsup.models.backbones import (
    BACKBONES,
    ResNetTiny,
    backbone_to_torchvision,
    build_backbone,
    classifier_key,
    torchvision_backbones,
)
from selfsup.models.heads import PredictionHead, ProjectionHead
from selfsup.models.split_bn import SplitBatchNorm, convert_split_batchnorm, plain_batchnorm

__all__ = [
    "BACKBONES",
    "PredictionHead",
    "ProjectionHead",
    "ResNetTiny",
    "SplitBatchNorm",
    "backbone_to_torchvision",
    "build_backbone",
    "classifier_key",
    "convert_split_batchnorm",
    "plain_batchnorm",
    "torchvision_backbones",
]
