"""Split BatchNorm: the BatchNorm of G GPUs, each seeing B / G images, simulated in one process.

MoCo's key encoder must not share BatchNorm statistics with the query encoder's positive: with
one BN over the whole batch, the keys of the current batch carry its statistics and the model
can tell them from the queue's keys by that alone ("cheating", MoCo sec. 3.3). The paper breaks
the link with shuffle-BN over 8 GPUs; the MoCo authors' one-GPU CIFAR-10 demo simulates it with
a SplitBatchNorm of 8 splits and a shuffled key batch, and reports that dropping shuffle-BN costs
4 points of kNN accuracy at 800 epochs.

- [0] MoCo, 2019, https://arxiv.org/abs/1911.05722, sec. 3.3 (shuffling BN)
- [1] facebookresearch/moco, colab/moco_cifar10_demo.ipynb (SplitBatchNorm, ``--bn-splits 8``)
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training-mode statistics are taken over each of ``num_splits`` equal,
    consecutive groups of the batch, as G separate GPUs would.

    Input [N, C] or [N, C, *spatial] with N divisible by G. In training mode, group g (rows
    g*N/G .. (g+1)*N/G) is normalised with its own mean and biased variance, then the shared
    affine weight and bias are applied; the running mean and (unbiased) variance move towards the
    average of the G groups' statistics, as averaging G GPUs' running buffers would. In eval mode,
    and for G = 1, it is exactly ``nn.BatchNorm``. Parameter and buffer names are BatchNorm's, so
    a state_dict loads into a plain torchvision model. Statistics are computed in float32
    whatever the input dtype (bf16 under autocast), like cuDNN's BatchNorm.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"SplitBatchNorm num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SplitBatchNorm expects [N, C, ...] input, got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        groups = self.num_splits
        if not self.training or groups == 1:
            return super().forward(x)
        self._check_input_dim(x)
        n, c = x.shape[0], x.shape[1]
        if n % groups:
            raise ValueError(
                f"SplitBatchNorm: a batch of {n} does not split into {groups} equal groups; use a "
                f"per-process batch size divisible by method.bn_splits={groups}"
            )
        xg = x.float().view(groups, n // groups, *x.shape[1:])  # splitting dim 0 is always a view
        count = xg.numel() // (groups * c)  # values per channel in one group
        if count < 2:
            raise ValueError(
                f"SplitBatchNorm: groups of {n // groups} leave 1 value per channel; use a "
                f"per-process batch of at least {2 * groups} or a smaller method.bn_splits"
            )
        dims = (1, *range(3, xg.dim()))  # everything but the group and channel dims
        mean = xg.mean(dims, keepdim=True)
        var = xg.var(dims, keepdim=True, correction=0)
        shape = [1, 1, c] + [1] * (xg.dim() - 3)
        y = (xg - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum
                if momentum is None:  # cumulative moving average, as nn.BatchNorm
                    momentum = 1.0 / float(self.num_batches_tracked)
                batch_mean = mean.reshape(groups, c).mean(0)
                batch_var = var.reshape(groups, c).mean(0) * (count / (count - 1))
                self.running_mean.lerp_(batch_mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(batch_var.to(self.running_var.dtype), momentum)
        return y.view_as(x).to(x.dtype)


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d`` in ``module`` (in place) by a :class:`SplitBatchNorm`
    of ``num_splits`` groups holding the same parameters and buffers; returns ``module``.

    With ``num_splits == 1`` nothing is changed. :func:`plain_batchnorm` undoes it on a copy.
    """
    if num_splits == 1:
        return module
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d | nn.BatchNorm2d) and not isinstance(
            child, SplitBatchNorm
        ):
            split = SplitBatchNorm(
                child.num_features,
                num_splits,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            ).to(device=child.weight.device if child.affine else None)
            split.load_state_dict(child.state_dict())
            split.train(child.training)
            split.was_1d = isinstance(child, nn.BatchNorm1d)  # for plain_batchnorm
            setattr(module, name, split)
        else:
            convert_split_batchnorm(child, num_splits)
    return module


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every :class:`SplitBatchNorm` back as ``nn.BatchNorm2d``
    (same parameters and buffers), for fine-tuning or any use outside MoCo's training, where
    batches need not divide into the groups. ``module`` itself is not changed."""
    module = copy.deepcopy(module)
    if isinstance(module, SplitBatchNorm):
        return _to_plain(module)
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, SplitBatchNorm):
                setattr(parent, name, _to_plain(child))
    return module


def _to_plain(split: SplitBatchNorm) -> nn.BatchNorm2d:
    # BatchNorm2d's forward takes [N, C] too via F.batch_norm; only its input check refuses it,
    # so a head's BatchNorm1d becomes a BatchNorm1d again.
    kind = nn.BatchNorm1d if getattr(split, "was_1d", False) else nn.BatchNorm2d
    plain = kind(
        split.num_features,
        eps=split.eps,
        momentum=split.momentum,
        affine=split.affine,
        track_running_stats=split.track_running_stats,
    )
    plain.load_state_dict(split.state_dict())
    plain.train(split.training)
    return plain.to(device=split.weight.device if split.affine else None)
