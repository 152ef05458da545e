"""Weighted k-nearest-neighbour classifier on frozen features.

Wu et al., 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"
(InstDisc), Sec. 3.4 / Eq. 8, as implemented in lightly's ``knn_predict`` and used as the monitor
metric in SimSiam/MoCo CIFAR reproductions: for a test feature ``f``, take its ``k`` most
cosine-similar training features ``f_i`` with labels ``c_i``; each neighbour votes for its class
with weight ``exp(s_i / T)``, ``s_i = cos(f, f_i)``; the class score is
``w_c = sum_{i: c_i = c} exp(s_i / T)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.errors import DataError


def _check_inputs(
    train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor | None
) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise ValueError(
            f"features must be [N, D]; got train {tuple(train_feats.shape)}, "
            f"test {tuple(test_feats.shape)}"
        )
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"train and test features differ in dimension: {train_feats.shape[1]} vs "
            f"{test_feats.shape[1]}; extract both with the same backbone."
        )
    if train_feats.shape[0] == 0:
        raise DataError("kNN evaluation needs at least one labelled training image; got none.")
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(
            f"train_labels must be [{train_feats.shape[0]}], got {tuple(train_labels.shape)}"
        )
    if test_labels is not None and test_labels.shape != (test_feats.shape[0],):
        raise ValueError(
            f"test_labels must be [{test_feats.shape[0]}], got {tuple(test_labels.shape)}"
        )


def knn_predict(
    test_feats: Tensor,
    train_feats: Tensor,
    train_labels: Tensor,
    num_classes: int,
    *,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
) -> Tensor:
    """Class scores of the weighted kNN classifier (InstDisc Eq. 8).

    Features are L2-normalised here, so raw backbone features can be passed. ``k`` larger than
    the number of training features is clamped to ``N_train`` (every training point votes).
    The similarity matrix is built ``chunk_size`` test rows at a time, so memory stays
    ``O(chunk_size * N_train)`` rather than ``O(N_test * N_train)``.

    Args:
        test_feats: ``[N_test, D]`` query features.
        train_feats: ``[N_train, D]`` memory-bank features.
        train_labels: int64 ``[N_train]`` in ``[0, num_classes)``.
        num_classes: ``C``.
        k: neighbours per query (200 in InstDisc / lightly).
        temperature: ``T`` in ``exp(s / T)`` (0.1 in lightly and the MoCo CIFAR-10 demo;
            InstDisc used 0.07).
        chunk_size: test rows per similarity block.
        device: where to compute; defaults to ``train_feats.device``.

    Returns:
        float32 ``[N_test, C]`` class scores on ``test_feats.device`` (higher is more likely).
    """
    _check_inputs(train_feats, train_labels, test_feats, None)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    run_device = torch.device(device) if device is not None else train_feats.device
    out_device = test_feats.device
    bank = F.normalize(train_feats.to(run_device, torch.float32), dim=1)
    bank_labels = train_labels.to(run_device, torch.long)
    k_eff = min(k, bank.shape[0])
    scores = []
    # float32 even when called under autocast (a training loop's): a bf16 matmul would round the
    # cosines to 3 digits, reorder the neighbours and hand scatter_add_ a bf16 source
    with torch.autocast(run_device.type, enabled=False):
        for start in range(0, test_feats.shape[0], chunk_size):
            query = test_feats[start : start + chunk_size].to(run_device, torch.float32)
            query = F.normalize(query, dim=1)
            sim = query @ bank.T  # [n, N_train] cosine similarities
            sim_top, idx_top = sim.topk(k_eff, dim=1)
            weights = (sim_top / temperature).exp()
            chunk_scores = torch.zeros(query.shape[0], num_classes, device=run_device)
            chunk_scores.scatter_add_(1, bank_labels[idx_top], weights)
            scores.append(chunk_scores.to(out_device))
    if not scores:
        return torch.zeros(0, num_classes, device=out_device)
    return torch.cat(scores)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Fraction of rows whose true label is among the ``k`` highest scores, for each ``k``.

    ``k`` is clamped to the number of classes (top-5 of a 3-class problem is top-3 = 1.0).

    Args:
        scores: ``[N, C]`` logits or scores.
        labels: int64 ``[N]``.

    Returns:
        one accuracy as a fraction in [0, 1] per entry of ``ks``.
    """
    if scores.shape[0] == 0:
        raise DataError("accuracy needs at least one labelled test image; got none.")
    labels = labels.to(scores.device)
    max_k = min(max(ks), scores.shape[1])
    pred = scores.topk(max_k, dim=1).indices  # [N, max_k], best first
    hit = pred.eq(labels[:, None])
    return [hit[:, : min(k, max_k)].any(dim=1).float().mean().item() for k in ks]


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
) -> dict[str, float | int]:
    """Top-1 / top-5 accuracy (fractions in [0, 1]) of the weighted kNN classifier (InstDisc Eq. 8).

    Args:
        train_feats: ``[N_train, D]``; train_labels: int64 ``[N_train]``.
        test_feats: ``[N_test, D]``; test_labels: int64 ``[N_test]``.
        k, temperature: see :func:`knn_predict`; ``k`` is clamped to ``N_train``.
        num_classes: ``C``; defaults to ``max label + 1`` over train and test labels.

    Returns:
        ``{"top1", "top5" (fractions in [0, 1]), "k": effective k, "temperature": T}``;
        top-5 is top-``min(5, C)``.
    """
    if train_labels is None or test_labels is None:  # an unlabeled dataset's .labels
        raise DataError(
            "kNN accuracy needs labels for the training and the test features; this data has "
            "none (a flat folder): use an ImageFolder layout (train/<class>/*, test/<class>/*)"
        )
    _check_inputs(train_feats, train_labels, test_feats, test_labels)
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    scores = knn_predict(
        test_feats,
        train_feats,
        train_labels,
        num_classes,
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
        device=device,
    )
    top1, top5 = topk_accuracy(scores, test_labels, (1, 5))
    return {
        "top1": top1,
        "top5": top5,
        "k": min(k, train_feats.shape[0]),
        "temperature": float(temperature),
    }
