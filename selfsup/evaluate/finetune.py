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

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.evaluate.features import (
    Transform,
    apply_transform,
    autocast_context,
    extract_features,
    resolve_device,
)
from selfsup.evaluate.knn import topk_accuracy
from selfsup.evaluate.linear import (
    batch_indices,
    check_labels,
    cosine_sgd,
    make_linear_head,
    progress_bar,
)

FINETUNE_MODE = "finetune (encoder + linear head, augmented)"
SUPERVISED_MODE = "supervised baseline (random init encoder + linear head, augmented)"


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
) -> dict[str, float | int | str]:
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
        lr: encoder learning rate (SimCLR: 0.05 x batch / 256 with batch 4096).
        head_lr: head learning rate; defaults to ``10 * lr``.
        weight_decay: applied to both groups (SimCLR fine-tunes without it).
        batch_size: images per step; a trailing batch of 1 is dropped (BatchNorm).
        device: defaults to the backbone's device.
        seed: seeds head initialisation, shuffling and (when supported) augmentation.
        amp: bf16 autocast on CUDA.
        progress: show a tqdm bar over steps.

    Returns:
        ``{"top1": %, "top5": %, "final_loss": ..., "mode": FINETUNE_MODE, ...settings}``.
    """
    return _train_end_to_end(
        copy.deepcopy(backbone),
        train_images,
        train_labels,
        test_images,
        test_labels,
        num_classes=num_classes,
        train_transform=train_transform,
        eval_transform=eval_transform,
        epochs=epochs,
        lr=lr,
        head_lr=10 * lr if head_lr is None else head_lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        device=device,
        seed=seed,
        amp=amp,
        progress=progress,
        mode=FINETUNE_MODE,
    )


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
    return _train_end_to_end(
        copy.deepcopy(fresh_backbone),
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


def _train_end_to_end(
    model: nn.Module,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    train_transform: Transform,
    eval_transform: Transform,
    epochs: int,
    lr: float,
    head_lr: float,
    weight_decay: float,
    batch_size: int,
    device: torch.device | str | None,
    seed: int,
    amp: bool,
    progress: bool,
    mode: str,
) -> dict[str, float | int | str]:
    """The loop shared by :func:`finetune` and :func:`supervised_baseline`; trains ``model``."""
    train_labels = check_labels(train_labels, train_images.shape[0], num_classes, "train")
    test_labels = check_labels(test_labels, test_images.shape[0], num_classes, "test")
    run_device = resolve_device(model, device)
    model.to(run_device)
    for transform in (train_transform, eval_transform):
        if isinstance(transform, nn.Module):
            transform.to(run_device)
    for param in model.parameters():
        param.requires_grad_(True)
    cpu_generator = torch.Generator().manual_seed(seed)
    aug_generator = torch.Generator(device=run_device).manual_seed(seed + 1)

    model.eval()  # probing the feature size must not touch BatchNorm statistics
    with torch.no_grad(), autocast_context(run_device, amp):
        probe = train_images[:2].to(run_device)
        feat_dim = model(apply_transform(eval_transform, probe)).shape[1]
    head = make_linear_head(feat_dim, num_classes, generator=cpu_generator).to(run_device)

    n_train = train_images.shape[0]
    steps_per_epoch = len(batch_indices(n_train, batch_size, torch.Generator(), min_batch=2))
    optimizer, schedule = cosine_sgd(
        [
            {"params": list(model.parameters()), "lr": lr},
            {"params": list(head.parameters()), "lr": head_lr},
        ],
        lr=lr,
        total_steps=epochs * steps_per_epoch,
        weight_decay=weight_decay,
        nesterov=True,
    )
    bar = progress_bar(epochs * steps_per_epoch, mode.split(" (")[0], progress)
    final_loss = float("nan")
    model.train()
    head.train()
    try:
        for _ in range(epochs):
            for idx in batch_indices(n_train, batch_size, cpu_generator, min_batch=2):
                images = train_images[idx].to(run_device, non_blocking=True)
                with autocast_context(run_device, amp):
                    feats = model(apply_transform(train_transform, images, aug_generator))
                logits = head(feats.float())
                loss = F.cross_entropy(logits, train_labels[idx].to(run_device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                final_loss = loss.item()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{final_loss:.3f}")
    finally:
        if bar is not None:
            bar.close()

    test_feats = extract_features(
        model, test_images, eval_transform, batch_size=batch_size, device=run_device, amp=amp
    )
    head.eval()
    with torch.no_grad():
        top1, top5 = topk_accuracy(head(test_feats.to(run_device)), test_labels, (1, 5))
    return {
        "top1": top1,
        "top5": top5,
        "final_loss": final_loss,
        "mode": mode,
        "epochs": epochs,
        "lr": lr,
        "head_lr": head_lr,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "num_classes": num_classes,
        "n_train": int(n_train),
        "n_test": int(test_images.shape[0]),
    }
