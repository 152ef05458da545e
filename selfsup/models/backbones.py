"""Backbones: torchvision ResNets mapping images [B, 3, S, S] to pooled features [B, D].

Every ResNet of ``torchvision.models`` (ResNet-18/34/50/101/152 [0], the wide ResNets [2] and
ResNeXts [3]) and ``resnet_tiny`` (the quickstart's); any other ``nn.Module`` returning ``[B, D]``
can be passed to :func:`build_backbone` instead of a name.

The classifier ``fc`` is replaced by ``nn.Identity`` so the backbone's ``state_dict`` is a plain
torchvision ResNet ``state_dict`` without ``fc.*``: it loads into ``backbone_to_torchvision(...)``
with ``strict=False`` (only ``fc.weight`` / ``fc.bias`` missing) for export and fine-tuning.

- [0] ResNet, 2015, https://arxiv.org/abs/1512.03385
- [1] SimCLR, 2020, https://arxiv.org/abs/2002.05709, appendix B.9 (CIFAR-10 stem: 3x3 stride-1
  conv1, no max-pool).
- [2] Wide Residual Networks, 2016, https://arxiv.org/abs/1605.07146
- [3] ResNeXt, 2017, https://arxiv.org/abs/1611.05431
"""

from __future__ import annotations

import warnings

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from selfsup.errors import ConfigError

#: torchvision's ResNet constructors (same module names: conv1, bn1, maxpool, layer1-4, fc)
TORCHVISION_RESNETS: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
)
BACKBONES: tuple[str, ...] = (*TORCHVISION_RESNETS, "resnet_tiny")
TINY_WIDTHS: tuple[int, int, int, int] = (16, 32, 64, 128)


class ResNetTiny(ResNet):
    """A torchvision ``ResNet`` of BasicBlocks, layers [1, 1, 1, 1], widths 16/32/64/128.

    About 0.3 M parameters and 128-d features, so the quickstart trains on a 2-core CPU. Being a
    ``torchvision.models.ResNet`` subclass, its module names and ``state_dict`` keys are
    torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``fc``).
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
        # Rebuild the stem and stages at narrow widths with torchvision's own _make_layer.
        self.inplanes = TINY_WIDTHS[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.layer1 = self._make_layer(BasicBlock, TINY_WIDTHS[0], 1)
        self.layer2 = self._make_layer(BasicBlock, TINY_WIDTHS[1], 1, stride=2)
        self.layer3 = self._make_layer(BasicBlock, TINY_WIDTHS[2], 1, stride=2)
        self.layer4 = self._make_layer(BasicBlock, TINY_WIDTHS[3], 1, stride=2)
        self.fc = nn.Linear(TINY_WIDTHS[3], num_classes)
        _torchvision_init_(self)


def _torchvision_init_(model: nn.Module) -> None:
    """The initialisation of ``torchvision.models.ResNet.__init__`` (kaiming fan-out, BN 1/0)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _use_small_stem_(model: ResNet) -> None:
    """CIFAR stem of SimCLR [1] B.9: conv1 3x3 stride 1 padding 1 without bias, no max-pool."""
    out_channels = model.conv1.out_channels
    model.conv1 = nn.Conv2d(3, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()


def backbone_to_torchvision(name: str, small_stem: bool, num_classes: int = 1000) -> ResNet:
    """A fresh torchvision ResNet (with its ``fc`` classifier) of the same architecture as
    ``build_backbone(name, small_stem=small_stem)``.

    A saved encoder ``state_dict`` loads into it with ``strict=False`` and only ``fc.*`` missing.

    Args:
        name: one of ``BACKBONES``.
        small_stem: whether the encoder was built with the small-image stem.
        num_classes: output size of the new ``fc``.
    """
    if name in TORCHVISION_RESNETS:
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    elif name == "resnet_tiny":
        model = ResNetTiny(num_classes=num_classes)
    else:
        raise ConfigError(
            f"Unknown backbone {name!r} (setting `model.backbone`); choose one of "
            f"{', '.join(BACKBONES)}, or pass an nn.Module from Python."
        )
    if small_stem:
        _use_small_stem_(model)
    return model


@torch.no_grad()
def _infer_feature_dim(module: nn.Module, image_size: int = 64) -> int:
    """D of a user backbone, from one dummy forward in eval mode (restoring its mode after)."""
    was_training = module.training
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    module.eval()
    try:
        out = module(torch.zeros(2, 3, image_size, image_size, device=device))
    except Exception as exc:  # a module built for one input size, a wrong channel count, ...
        raise ConfigError(
            f"The custom backbone {type(module).__name__} failed on a dummy [2, 3, {image_size}, "
            f"{image_size}] batch ({type(exc).__name__}: {exc}); pass the image size it takes "
            "as build_backbone(module, image_size=S), or its feature size as feat_dim=D."
        ) from exc
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"The custom backbone {type(module).__name__} returned {shape} for a [2, 3, "
            f"{image_size}, {image_size}] batch; it must return pooled features [B, D] "
            "(replace its classifier with nn.Identity and flatten after pooling)."
        )
    return int(out.shape[1])


# where torchvision's classification models keep their ImageNet head (ResNet, RegNet: fc;
# MobileNet, EfficientNet, ConvNeXt, DenseNet, VGG: classifier; ViT: heads; Swin: head)
_CLASSIFIER_HEADS = ("fc", "classifier", "heads", "head")


def build_backbone(
    name: str | nn.Module,
    *,
    small_stem: bool = False,
    image_size: int = 64,
    feat_dim: int | None = None,
) -> tuple[nn.Module, int]:
    """Build the encoder f: [B, 3, S, S] -> [B, D] and return ``(module, D)``.

    Args:
        name: ``"resnet18"`` (D=512), ``"resnet50"`` (D=2048), ``"resnet_tiny"`` (D=128), or any
            ``nn.Module`` returning [B, D] features. A torchvision ``ResNet`` with its 1000-class
            ImageNet ``fc`` gets that replaced by ``nn.Identity`` (in place), as the named ones
            do; otherwise D is found by a dummy forward at ``image_size`` unless ``feat_dim``
            is given.
        small_stem: use the CIFAR stem (3x3 stride-1 conv1, no max-pool) for images of ~32 px.
            Named ResNets only: with a module of your own it is an error (change its stem).
        image_size: S of the dummy batch that finds D of a user module (one that only takes its
            own input size, such as a ViT with fixed positional embeddings, needs its S).
        feat_dim: D of a user module, skipping the dummy forward.
    """
    if isinstance(name, nn.Module):
        if small_stem:
            raise ConfigError(
                f"build_backbone: small_stem=True applies to the named ResNets; a module of your "
                f"own ({type(name).__name__}) keeps its stem: change it yourself (for a "
                "torchvision ResNet, conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) and maxpool = "
                "nn.Identity()), or pass its name, e.g. build_backbone('resnet18', small_stem=True)"
            )
        if feat_dim is not None:
            return name, int(feat_dim)
        fc = getattr(name, "fc", None)
        if isinstance(name, ResNet) and isinstance(fc, nn.Linear) and fc.out_features == 1000:
            # torchvision's ImageNet classifier: its logits are no features; keep the pooled ones,
            # as for a backbone by name (a head of the user's own, or feat_dim=, is kept)
            name.fc = nn.Identity()
            return name, fc.in_features
        dim = _infer_feature_dim(name, image_size)
        head = next((h for h in _CLASSIFIER_HEADS if hasattr(name, h)), None)
        if dim == 1000 and head is not None:
            warnings.warn(
                f"build_backbone: {type(name).__name__} returns 1000 values and has a `{head}`: "
                "ImageNet class logits, it seems, not features. To train its features, replace "
                f"the head first (model.{head} = nn.Identity(), or the head's last Linear "
                "alone); to keep it, pass feat_dim=1000",
                stacklevel=2,
            )
        return name, dim
    model = backbone_to_torchvision(name, small_stem)
    feat_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, feat_dim
