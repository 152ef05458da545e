"""SplitBatchNorm (MoCo's one-process shuffle-BN) against G separate nn.BatchNorm layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from selfsup.models import build_backbone
from selfsup.models.split_bn import SplitBatchNorm, convert_split_batchnorm


def _reference(bn: nn.Module, x: torch.Tensor, groups: int):
    """G copies of a plain BatchNorm, one per group (as G GPUs): outputs and averaged buffers."""
    copies = [copy.deepcopy(bn) for _ in range(groups)]
    outs = [m(chunk) for m, chunk in zip(copies, x.chunk(groups), strict=True)]
    mean = torch.stack([m.running_mean for m in copies]).mean(0)
    var = torch.stack([m.running_var for m in copies]).mean(0)
    return torch.cat(outs), mean, var


@pytest.mark.parametrize(
    "bn_cls,shape", [(nn.BatchNorm2d, (12, 5, 4, 3)), (nn.BatchNorm1d, (12, 5))]
)
@pytest.mark.parametrize("groups", [1, 3, 4])
def test_split_bn_equals_one_batchnorm_per_group(bn_cls, shape, groups):
    torch.manual_seed(0)
    bn = bn_cls(shape[1])
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.5, 0.5)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(shape) * 3 + 1
    x_ref = x.clone().requires_grad_(True)
    out_ref, mean_ref, var_ref = _reference(bn, x_ref, groups)

    split = convert_split_batchnorm(nn.Sequential(copy.deepcopy(bn)), groups)[0]
    assert isinstance(split, SplitBatchNorm) == (groups > 1)
    x_split = x.clone().requires_grad_(True)
    out = split(x_split)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split.running_mean, mean_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(split.running_var, var_ref, atol=1e-6, rtol=1e-5)

    weights = torch.randn(shape)
    (out * weights).sum().backward()
    (out_ref * weights).sum().backward()
    torch.testing.assert_close(x_split.grad, x_ref.grad, atol=1e-5, rtol=1e-4)

    split.eval()  # eval mode: the running statistics, exactly as plain BatchNorm
    plain = copy.deepcopy(bn)
    plain.load_state_dict(split.state_dict())
    plain.eval()
    torch.testing.assert_close(split(x), plain(x))


def test_split_bn_channels_last_and_bf16_input():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    x = torch.randn(8, 6, 5, 5)
    ref, _, _ = _reference(bn, x, 4)
    split = convert_split_batchnorm(nn.Sequential(copy.deepcopy(bn)), 4)[0]
    out = split(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out16 = split(x.bfloat16())
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), ref, atol=0.05, rtol=0.05)


def test_split_bn_refuses_a_batch_that_does_not_split():
    split = convert_split_batchnorm(nn.Sequential(nn.BatchNorm1d(3)), 4)[0]
    with pytest.raises(ValueError, match="method.bn_splits=4"):
        split(torch.randn(10, 3))
    with pytest.raises(ValueError, match="1 value per channel"):
        split(torch.randn(4, 3))


def test_converted_backbone_keeps_torchvision_state_dict_names():
    backbone, _ = build_backbone("resnet_tiny", small_stem=True)
    keys = list(backbone.state_dict())
    convert_split_batchnorm(backbone, 8)
    assert list(backbone.state_dict()) == keys
    assert any(isinstance(m, SplitBatchNorm) for m in backbone.modules())
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in backbone.modules())


def test_plain_batchnorm_undoes_the_conversion_on_a_copy():
    """A MoCo backbone (SplitBatchNorm) back to plain BatchNorm: same weights, same eval output,
    any batch size in training mode, and the MoCo model itself untouched."""
    from selfsup.methods import build_method
    from selfsup.models import plain_batchnorm

    backbone, dim = build_backbone("resnet_tiny", small_stem=True)
    head = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    moco = build_method("moco", backbone, dim, bn_splits=4)
    convert_split_batchnorm(head, 4)
    x = torch.randn(6, 3, 16, 16)  # 6 does not split into 4 groups
    with pytest.raises(ValueError, match="does not split"):
        moco.backbone.train()(x)
    plain = plain_batchnorm(moco.backbone)
    assert not any(isinstance(m, SplitBatchNorm) for m in plain.modules())
    assert any(isinstance(m, SplitBatchNorm) for m in moco.backbone.modules())
    moco.backbone.eval(), plain.eval()
    sample = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(plain(sample), moco.backbone(sample))
    assert plain.train()(x).shape == (6, dim)
    assert type(plain_batchnorm(head)[1]) is nn.BatchNorm1d


def test_finetune_takes_a_moco_backbone_whatever_the_batch_size():
    from selfsup.evaluate.finetune import finetune
    from selfsup.methods import build_method

    backbone, dim = build_backbone("resnet_tiny", small_stem=True)
    moco = build_method("moco", backbone, dim, bn_splits=8)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (30, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.arange(30) % 3
    to_float = lambda x: x.float() / 255  # noqa: E731
    result = finetune(
        moco.backbone, images, labels, images, labels, num_classes=3, train_transform=to_float,
        eval_transform=to_float, epochs=1, lr=0.01, batch_size=20, progress=False,
    )  # fmt: skip
    assert 0 <= result["top1"] <= 1
