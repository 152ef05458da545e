"""Feature extraction and the weighted kNN classifier (InstDisc Eq. 8) against loop references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from selfsup.errors import DataError
from selfsup.evaluate.features import extract_features
from selfsup.evaluate.knn import knn_accuracy, knn_predict, topk_accuracy


def knn_scores_reference(test, train, train_labels, num_classes, k, temperature):
    """InstDisc Eq. 8, one query at a time: the top-k cosine neighbours vote exp(s / T)."""
    scores = []
    for query in test.tolist():
        sims = []
        for i, key in enumerate(train.tolist()):
            dot = sum(a * b for a, b in zip(query, key, strict=True))
            norm = math.sqrt(sum(a * a for a in query)) * math.sqrt(sum(b * b for b in key))
            sims.append((dot / norm, i))
        sims.sort(reverse=True)
        row = [0.0] * num_classes
        for sim, i in sims[: min(k, len(sims))]:
            row[int(train_labels[i])] += math.exp(sim / temperature)
        scores.append(row)
    return torch.tensor(scores)


def random_problem(n_train=40, n_test=13, dim=6, num_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, dim, generator=g) * 3  # unnormalised on purpose
    test = torch.randn(n_test, dim, generator=g)
    return train, torch.randint(0, num_classes, (n_train,), generator=g), test


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.1), (7, 0.1), (20, 0.5)])
def test_knn_predict_matches_loop_reference(k: int, temperature: float) -> None:
    train, labels, test = random_problem()
    scores = knn_predict(test, train, labels, 4, k=k, temperature=temperature, chunk_size=5)
    expected = knn_scores_reference(test, train, labels, 4, k, temperature)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)


def test_k_larger_than_train_set_is_clamped() -> None:
    train, labels, test = random_problem(n_train=9)
    clamped = knn_predict(test, train, labels, 4, k=200)
    expected = knn_scores_reference(test, train, labels, 4, 9, 0.1)
    torch.testing.assert_close(clamped, expected, rtol=1e-4, atol=1e-4)
    test_labels = torch.zeros(test.shape[0], dtype=torch.long)
    assert knn_accuracy(train, labels, test, test_labels, k=200)["k"] == 9


def test_knn_accuracy_matches_reference_and_chunking() -> None:
    train, labels, test = random_problem(n_train=60, n_test=31, num_classes=7, seed=3)
    test_labels = torch.randint(0, 7, (31,), generator=torch.Generator().manual_seed(4))
    # k=40 of 60 so every class gets votes: no ties at 0 that would make the top-5 ambiguous.
    ref = knn_scores_reference(test, train, labels, 7, 40, 0.1)
    assert (ref > 0).all()
    ranked = ref.argsort(dim=1, descending=True)
    top1 = (ranked[:, 0] == test_labels).float().mean().item()
    top5 = (ranked[:, :5] == test_labels[:, None]).any(dim=1).float().mean().item()
    for chunk in (1, 4, 1024):
        result = knn_accuracy(
            train, labels, test, test_labels, k=40, num_classes=7, chunk_size=chunk
        )
        assert result["top1"] == pytest.approx(top1)
        assert result["top5"] == pytest.approx(top5)


def test_knn_on_separable_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 5
    train_labels = torch.arange(5).repeat(40)
    test_labels = torch.arange(5).repeat(10)
    train = centers[train_labels] + torch.randn(200, 16, generator=g)
    test = centers[test_labels] + torch.randn(50, 16, generator=g)
    result = knn_accuracy(train, train_labels, test, test_labels)  # num_classes inferred
    assert result["top1"] == 1.0 and result["top5"] == 1.0


def test_top5_with_fewer_than_five_classes() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    labels = torch.tensor([2, 0])
    top1, top5 = topk_accuracy(scores, labels, (1, 5))
    assert top1 == 0.5 and top5 == 1.0  # top-5 of 3 classes is top-3


def test_knn_rejects_bad_inputs() -> None:
    with pytest.raises(DataError):
        knn_accuracy(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.ones(2, 4),
                     torch.zeros(2, dtype=torch.long))  # fmt: skip
    with pytest.raises(ValueError, match="dimension"):
        knn_predict(torch.ones(2, 3), torch.ones(4, 5), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(DataError, match="needs labels .* this data has none"):
        knn_accuracy(torch.ones(4, 2), None, torch.ones(2, 2), None)  # an unlabeled folder's


# --- extract_features ---


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0 - 0.5


def test_extract_features_eval_mode_and_state_restored() -> None:
    net = tiny_net()
    net.train()
    net[2].eval()  # a child deliberately in another mode than its parent must stay so
    images = torch.randint(0, 256, (23, 3, 8, 8), dtype=torch.uint8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    feats = extract_features(net, images, to_float, batch_size=5)
    assert feats.shape == (23, 6) and feats.dtype == torch.float32
    assert feats.device.type == "cpu" and not feats.requires_grad
    # Eval-mode forward (BN uses running stats), independent of batching.
    net_eval = tiny_net().eval()
    with torch.no_grad():
        torch.testing.assert_close(feats, net_eval(to_float(images)))
    torch.testing.assert_close(feats, extract_features(net, images, to_float, batch_size=100))
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats untouched
    assert net.training and net[1].training and not net[2].training


def test_extract_features_normalize_and_errors() -> None:
    net = tiny_net()
    images = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8)
    feats = extract_features(net, images, to_float, normalize=True)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(7))
    with pytest.raises(DataError, match="empty"):
        extract_features(net, images[:0], to_float)
    with pytest.raises(DataError, match=r"\[N, 3, H, W\]"):
        extract_features(net, images[:, :1], to_float)
    # a pooled [B, D, 1, 1] map is one vector per image; a spatial map or a tuple is refused
    pooled = extract_features(net[:4], images, to_float)
    torch.testing.assert_close(pooled, extract_features(net, images, to_float))
    with pytest.raises(DataError, match=r"shaped \(7, 6, 8, 8\), not one vector .* pool its"):
        extract_features(net[:3], images, to_float)

    class Pair(nn.Module):
        def forward(self, x):
            return x.mean((2, 3)), x

    with pytest.raises(DataError, match="returned a tuple, not a features tensor"):
        extract_features(Pair(), images, to_float)
