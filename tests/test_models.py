"""Backbones (torchvision ResNets, small stem, resnet_tiny, user modules) and MLP heads."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torchvision
from torch import nn

import selfsup
from selfsup.errors import CheckpointError, ConfigError
from selfsup.export import infer_architecture
from selfsup.models import (
    BACKBONES,
    PredictionHead,
    ProjectionHead,
    ResNetTiny,
    backbone_to_torchvision,
    build_backbone,
)


@pytest.mark.parametrize(
    "name,dim,small_stem",
    [("resnet18", 512, True), ("resnet18", 512, False), ("resnet_tiny", 128, True)],
)
def test_backbone_maps_images_to_pooled_features(name: str, dim: int, small_stem: bool) -> None:
    backbone, feat_dim = build_backbone(name, small_stem=small_stem)
    assert feat_dim == dim
    assert isinstance(backbone.fc, nn.Identity)
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, dim)


def test_resnet50_dim_and_torchvision_keys() -> None:
    with torch.device("meta"):  # compared by shape only: no memory, no initialisation cost
        backbone, feat_dim = build_backbone("resnet50", small_stem=False)
        reference = torchvision.models.resnet50(weights=None).state_dict()
    assert feat_dim == 2048
    expected = {k: v.shape for k, v in reference.items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in backbone.state_dict().items()} == expected


def test_small_stem_is_3x3_stride_1_without_maxpool() -> None:
    backbone, _ = build_backbone("resnet18", small_stem=True)
    conv1 = backbone.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1) and conv1.padding == (1, 1)
    assert conv1.bias is None
    assert isinstance(backbone.maxpool, nn.Identity)
    # The stem keeps resolution: layer1 sees 16x16 for a 16x16 input (4x4 with the ImageNet stem).
    seen = {}

    def record_size(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen["hw"] = output.shape[-2:]

    backbone.layer1.register_forward_hook(record_size)
    backbone(torch.randn(1, 3, 16, 16))
    assert tuple(seen["hw"]) == (16, 16)
    standard, _ = build_backbone("resnet18", small_stem=False)
    assert standard.conv1.kernel_size == (7, 7) and isinstance(standard.maxpool, nn.MaxPool2d)


def test_small_stem_conv1_gets_torchvision_kaiming_fan_out_init() -> None:
    """The replaced stem is initialised like the rest of a torchvision ResNet (kaiming fan-out,
    std sqrt(2 / (64 * 3 * 3))), not with nn.Conv2d's default uniform init."""
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", small_stem=True)
    expected = (2.0 / (64 * 3 * 3)) ** 0.5
    assert backbone.conv1.weight.std().item() == pytest.approx(expected, rel=0.1)


def test_resnet_tiny_is_a_narrow_torchvision_resnet() -> None:
    backbone, feat_dim = build_backbone("resnet_tiny", small_stem=False)
    assert isinstance(backbone, torchvision.models.ResNet)
    assert [len(getattr(backbone, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    widths = [getattr(backbone, f"layer{i}")[0].conv2.out_channels for i in range(1, 5)]
    assert widths == [16, 32, 64, 128] and feat_dim == 128
    assert sum(p.numel() for p in backbone.parameters()) < 1_000_000
    # Keys have torchvision's names: a resnet18 has the same first block key set.
    with torch.device("meta"):  # its key names only
        resnet18_keys = torchvision.models.resnet18(weights=None).state_dict()
    tv_keys = {k for k in resnet18_keys if not re.match(r"layer\d\.1\.", k)}
    assert set(backbone.state_dict()) == tv_keys - {"fc.weight", "fc.bias"}


@pytest.mark.parametrize(
    "name,small_stem", [("resnet18", True), ("resnet_tiny", False), ("resnet_tiny", True)]
)
def test_encoder_state_dict_round_trips_into_torchvision_model(name: str, small_stem: bool) -> None:
    backbone, _ = build_backbone(name, small_stem=small_stem)
    backbone.eval()
    exported = backbone_to_torchvision(name, small_stem, num_classes=10).eval()
    result = exported.load_state_dict(backbone.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    exported.fc = nn.Identity()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), backbone(x))


def test_resnet_tiny_classifier_has_right_input() -> None:
    model = ResNetTiny(num_classes=7)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)


def test_custom_module_dim_is_inferred_and_mode_restored() -> None:
    module = nn.Sequential(
        nn.Conv2d(3, 5, 3),
        nn.BatchNorm2d(5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 9),
    )
    module.train()
    returned, dim = build_backbone(module)
    assert returned is module and dim == 9 and module.training


def test_custom_module_without_pooling_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="pooled features"):
        build_backbone(nn.Conv2d(3, 4, 3))


class _FixedSizeNet(nn.Module):
    """Takes only 16 px images, as a ViT with fixed positional embeddings does."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, 3, 16, 16))
        self.head = nn.Linear(3 * 16 * 16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x + self.pos).flatten(1))


def test_a_module_of_one_input_size_takes_its_size_or_dim_and_fails_clearly_otherwise() -> None:
    with pytest.raises(
        ConfigError, match=r"_FixedSizeNet failed on a dummy \[2, 3, 64, 64\].*image_size"
    ):
        build_backbone(_FixedSizeNet())
    assert build_backbone(_FixedSizeNet(), image_size=16)[1] == 6
    assert build_backbone(_FixedSizeNet(), feat_dim=6)[1] == 6


def test_a_torchvision_resnet_instance_gives_pooled_features_not_logits() -> None:
    module, dim = build_backbone(torchvision.models.resnet18(weights=None))
    assert dim == 512 and isinstance(module.fc, nn.Identity)
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_unknown_backbone_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="resnet18, resnet34, resnet50, .*, resnet_tiny"):
        build_backbone("vit_giant", small_stem=False)


@pytest.mark.parametrize(
    "name,dim", [("resnet34", 512), ("wide_resnet50_2", 2048), ("resnext50_32x4d", 2048)]
)
def test_every_torchvision_resnet_family_is_a_backbone(name: str, dim: int, tmp_path) -> None:
    backbone, feat_dim = build_backbone(name, small_stem=True)
    with torch.device("meta"):  # compared by shape only: no memory, no initialisation cost
        reference = getattr(torchvision.models, name)(weights=None).state_dict()
    shapes = {k: v.shape for k, v in backbone.state_dict().items()}
    expected = {k: v.shape for k, v in reference.items() if not k.startswith("fc.")}
    expected["conv1.weight"] = torch.Size([64, 3, 3, 3])  # the small stem
    assert feat_dim == dim and shapes == expected
    backbone.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        feats = backbone(x)
    assert feats.shape == (2, dim)
    # a bare encoder.pt (no config beside it) loads back as the same architecture
    torch.save(backbone.state_dict(), tmp_path / "encoder.pt")
    loaded = selfsup.load_encoder(tmp_path / "encoder.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), feats)


@pytest.mark.parametrize("small_stem", [True, False])
def test_architecture_of_every_backbone_is_inferred_from_its_weights(small_stem: bool) -> None:
    for name in BACKBONES:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            backbone, _ = build_backbone(name, small_stem=small_stem)
        assert infer_architecture(backbone.state_dict()) == (name, small_stem)
    with pytest.raises(CheckpointError, match="matches none"):
        state = build_backbone("resnet18", small_stem=small_stem)[0].state_dict()
        infer_architecture({k: v for k, v in state.items() if not k.startswith("layer4.1.")})


@pytest.mark.parametrize(
    "name,size",
    [("mobilenet_v3_small", None), ("efficientnet_b0", None), ("swin_t", None), ("vit_b_32", 64)],
)
def test_bare_weights_of_other_torchvision_models_are_identified(name, size, tmp_path) -> None:
    torch.manual_seed(0)
    backbone, _ = build_backbone(name, image_size=size)
    state = backbone.state_dict()
    assert infer_architecture(state) == (name, False)
    full = torchvision.models.get_model(name, **({"image_size": size} if size else {}))
    assert infer_architecture(full.state_dict()) == (name, False)  # a torchvision export's
    torch.save(state, tmp_path / "encoder.pt")  # no config.yaml beside it
    x = torch.randn(2, 3, size or 32, size or 32)
    with torch.no_grad():
        torch.testing.assert_close(
            selfsup.load_encoder(tmp_path / "encoder.pt")(x), backbone.eval()(x)
        )
    cut = dict(list(state.items())[:-3])  # a tensor short: no model's
    with pytest.raises(CheckpointError, match="no torchvision backbone selfsup knows"):
        infer_architecture(cut)


def test_projection_head_layouts() -> None:
    simclr = ProjectionHead(32, 32, 8)
    assert [type(m) for m in simclr] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    moco = ProjectionHead(32, 32, 8, batch_norm=False)
    assert [type(m) for m in moco] == [nn.Linear, nn.ReLU, nn.Linear]
    assert moco[0].bias is not None  # no BN to absorb the bias
    simsiam = ProjectionHead(32, 16, 8, num_layers=3, last_bn=True)
    kinds = [type(m) for m in simsiam]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    assert not simsiam[-1].affine
    out = simsiam(torch.randn(6, 32))
    assert out.shape == (6, 8)
    # Output BN in train mode: each output unit is standardised over the batch.
    torch.testing.assert_close(out.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="num_layers"):
        ProjectionHead(4, 4, 4, num_layers=0)


def test_prediction_head_is_bottleneck_with_hidden_bn_only() -> None:
    head = PredictionHead(64, 16, 64)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head[0].out_features == 16 and head[3].out_features == 64
    assert head(torch.randn(4, 64)).shape == (4, 64)


def test_a_resnet_with_its_own_head_or_a_given_dim_is_kept_as_it_is() -> None:
    own = torchvision.models.resnet18(weights=None)
    own.fc = nn.Linear(512, 128)  # the user's feature layer
    module, dim = build_backbone(own)
    assert dim == 128 and module.fc is own.fc
    stock = torchvision.models.resnet18(weights=None)
    assert build_backbone(stock, feat_dim=1000) == (stock, 1000) and isinstance(stock.fc, nn.Linear)


def test_a_module_with_imagenet_logits_is_warned_of_and_small_stem_is_refused_for_it() -> None:
    """build_backbone(mobilenet_v3_small()) would train on 1000 class logits: warned, with the
    fix; small_stem=True cannot change a module's own stem: an error, not ignored in silence."""
    logits = torchvision.models.mobilenet_v3_small(weights=None)
    with pytest.warns(UserWarning, match=r"MobileNetV3 returns 1000 values and has a `classifier`"):
        assert build_backbone(logits)[1] == 1000
    logits.classifier = nn.Identity()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its pooled features: no warning
        assert build_backbone(logits)[1] == 576
    with pytest.raises(ConfigError, match="small_stem=True applies to the named ResNets"):
        build_backbone(torchvision.models.resnet18(weights=None), small_stem=True)
