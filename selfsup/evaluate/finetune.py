"""Semi-supervised evaluation: fine-tune the whole encoder plus a linear head on a label fraction.

SimCLR Sec. 6 and Appendix B.5, BYOL Sec. 4.2 and Appendix C.2: starting from the pre-trained
encoder, train encoder + linear classifier end to end on 1% or 10% of the labels (a class-balanced
subset, see ``selfsup.evaluate.subsets``) with SGD Nesterov momentum 0.9, cross-entropy and only
random crops + flips, then evaluate on the full test split. As in BYOL / solo-learn, the encoder
and the freshly initialised head get separate learning rates (the head's higher, so it catches up
without wrecking the pre-trained features). A cosine schedule decays both to 0.

``supervised_baseline`` trains a randomly initialised encoder the same way on the same subset: the
"Supervised" row of the papers' semi-supervised tables, which shows what the pre-training bought.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from selfsup.evaluate.features import (
    Transform,
    apply_transform,
    autocast_context,
)
from selfsup.evaluate.linear import make_linear_head, prepare_run, train_and_test_head
from selfsup.models.split_bn import plain_batchnorm

FINETUNE_MODE = "finetune (encoder + linear head, augmented)"
SUPERVISED_MODE = "supervised baseline (random init encoder + linear head, augmented)"


def _fresh_head(
    model: nn.Module,
    eval_transform: Transform,
    train_images: Tensor,
    num_classes: int,
    *,
    device: torch.device,
    amp: bool,
    generator: torch.Generator,
) -> nn.Linear:
    """A new ``nn.Linear(D, C)`` on ``device`` (:func:`make_linear_head`), ``D`` read off
    ``model``'s features of two training images (``model`` in eval mode: the caller's job)."""
    with torch.no_grad(), autocast_context(device, amp):
        probe = train_images[:2].to(device)
        feat_dim = model(apply_transform(eval_transform, probe)).shape[1]
    return make_linear_head(feat_dim, num_classes, generator=generator).to(device)


def _training_encode(
    model: nn.Module,
    train_transform: Transform,
    aug_generator: torch.Generator,
    device: torch.device,
    amp: bool,
) -> Callable[[Tensor], Tensor]:
    """Fine-tuning's training features: a uint8 batch augmented by ``train_transform`` and
    encoded by ``model`` with gradients (autocast on CUDA), as float32 ``[B, D]``."""

    def encode(images: Tensor) -> Tensor:
        with autocast_context(device, amp):
            feats = model(apply_transform(train_transform, images, aug_generator))
        return feats.float()

    return encode


def finetune(
    backbone: nn.Module,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    train_transform: Transform,
    eval_transform: Transform,
    epochs: int = 30,
    lr: float = 0.01,
    head_lr: float | None = None,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    seed: int = 0,
    amp: bool = True,
    progress: bool = True,
    mode: str = FINETUNE_MODE,
    return_model: bool = False,
) -> dict[str, float | int | str] | tuple[dict[str, float | int | str], nn.Module, nn.Linear]:
    """Fine-tune a deep copy of ``backbone`` plus a linear head; evaluate on the full test split.

    The caller's ``backbone`` is never modified: a deep copy is trained (all its parameters get
    ``requires_grad=True`` and BatchNorm runs in training mode, as in the papers).

    Args:
        backbone: pre-trained encoder ``[B, 3, S, S] -> [B, D]``.
        train_images: uint8 ``[M, 3, H, W]``, the labelled subset; train_labels: int64 ``[M]``.
        test_images: uint8 ``[N, 3, H, W]``; test_labels: int64 ``[N]``.
        num_classes: ``C``.
        train_transform: uint8 batch -> augmented normalised float batch (crop + flip); given a
            ``generator`` keyword if it accepts one, seeded from ``seed``.
        eval_transform: deterministic uint8 batch -> normalised float batch.
        epochs: passes over the subset (SimCLR: 60 for 1%, 30 for 10% of ImageNet).
        lr: encoder learning rate. The default 0.01 with a 10x head is the split-lr recipe of
            solo-learn's fine-tuning, not SimCLR's single lr of 0.05 x batch / 256 (batch 4096,
            LARS); pass ``lr=0.05 * batch_size / 256, head_lr=lr`` for SimCLR's.
        head_lr: head learning rate; defaults to ``10 * lr``.
        weight_decay: applied to both groups (SimCLR fine-tunes without it).
        batch_size: images per step; a trailing batch of 1 is dropped (BatchNorm).
        device: defaults to the backbone's device.
        seed: seeds head initialisation, shuffling and (when supported) augmentation.
        amp: autocast on CUDA (bf16, or fp16 with a loss scale where bf16 is not native).
        progress: show a tqdm bar over steps.
        mode: the result's ``mode`` label; its part before `` (`` names the progress bar
            (:func:`supervised_baseline` passes ``SUPERVISED_MODE``).
        return_model: also return the fine-tuned encoder and its head.

    Returns:
        ``{"top1", "top5" (fractions in [0, 1]), "final_loss": ..., "mode": mode, ...settings}``;
        with ``return_model``, ``(that dict, encoder, head)``: the fine-tuned copy of
        ``backbone`` (plain BatchNorm, on the run device) and its ``nn.Linear(D, C)``, which
        together gave the test accuracy (``head(encoder(x))``, encoder in eval mode).
    """
    # a MoCo backbone's SplitBatchNorm needs batches divisible by its groups: plain BN here
    model = plain_batchnorm(backbone)
    head_lr = 10 * lr if head_lr is None else head_lr
    train_labels, test_labels, run_device, cpu_generator, aug_generator = prepare_run(
        model,
        (train_transform, eval_transform),
        train_images,
        train_labels,
        test_images,
        test_labels,
        num_classes=num_classes,
        device=device,
        seed=seed,
    )
    for param in model.parameters():
        param.requires_grad_(True)

    model.eval()  # probing the feature size must not touch BatchNorm statistics
    head = _fresh_head(
        model,
        eval_transform,
        train_images,
        num_classes,
        device=run_device,
        amp=amp,
        generator=cpu_generator,
    )
    encode = _training_encode(model, train_transform, aug_generator, run_device, amp)
    model.train()
    metrics = train_and_test_head(
        encode,
        model,
        head,
        train_images,
        train_labels,
        test_images,
        test_labels,
        eval_transform=eval_transform,
        num_classes=num_classes,
        epochs=epochs,
        lr=lr,
        head_lr=head_lr,
        weight_decay=weight_decay,
        nesterov=True,
        batch_size=batch_size,
        device=run_device,
        amp=amp,
        generator=cpu_generator,
        mode=mode,
        progress_desc=mode.split(" (")[0],
        progress=progress,
    )
    if return_model:
        return metrics, model.eval(), head.eval()
    return metrics


def supervised_baseline(
    fresh_backbone: nn.Module,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    train_transform: Transform,
    eval_transform: Transform,
    epochs: int = 30,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    seed: int = 0,
    amp: bool = True,
    progress: bool = True,
) -> dict[str, float | int | str]:
    """Train a randomly initialised encoder + linear head on the same labelled subset.

    The caller builds the fresh encoder (``build_backbone(name, small_stem=...)`` again, so it gets
    the architecture's own initialisation) and passes it in; it is deep-copied like in
    :func:`finetune`. Schedule, augmentation, batch size and epochs are those of :func:`finetune`;
    the one difference is a single learning rate ``lr`` for encoder and head, since there are no
    pre-trained weights to protect.

    Returns:
        same keys as :func:`finetune`, with ``mode`` = ``SUPERVISED_MODE``.
    """
    return finetune(
        fresh_backbone,
        train_images,
        train_labels,
        test_images,
        test_labels,
        num_classes=num_classes,
        train_transform=train_transform,
        eval_transform=eval_transform,
        epochs=epochs,
        lr=lr,
        head_lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        device=device,
        seed=seed,
        amp=amp,
        progress=progress,
        mode=SUPERVISED_MODE,
    )
