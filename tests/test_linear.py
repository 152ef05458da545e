"""Linear probes (fast and full), fine-tuning, and class-balanced label subsets."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

from selfsup.errors import ConfigError, DataError
from selfsup.evaluate.features import extract_features
from selfsup.evaluate.finetune import SUPERVISED_MODE, finetune, supervised_baseline
from selfsup.evaluate.linear import (
    FAST_MODE,
    FULL_MODE,
    linear_probe,
    linear_probe_features,
)
from selfsup.evaluate.subsets import balanced_subset, load_subset, save_subset

# the module itself (``selfsup.evaluate.finetune`` is also the name of the function it exports)
finetune_module = importlib.import_module("selfsup.evaluate.finetune")

# --- synthetic data ---


def blobs(n_per_class: int, num_classes: int = 5, dim: int = 32, seed: int = 0):
    """Gaussian clusters: linearly separable features with a large offset and scale."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * 4
    labels = torch.arange(num_classes).repeat(n_per_class)
    feats = centers[labels] + torch.randn(labels.numel(), dim, generator=g)
    return feats * 50 + 1000, labels  # far from standardised on purpose


def colour_images(n_per_class: int, seed: int = 0, size: int = 12):
    """3 classes of uint8 images: noise with the class's colour channel brightened."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat(n_per_class)
    images = torch.randint(0, 110, (labels.numel(), 3, size, size), generator=g)
    images[torch.arange(labels.numel()), labels] += 120
    return images.to(torch.uint8), labels


def eval_transform(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0 - 0.5


def train_transform(images: torch.Tensor, generator: torch.Generator | None = None):
    """Random horizontal flip + random 10x10 crop resized back by padding (a tiny crop/flip)."""
    x = eval_transform(images)
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    off = torch.randint(0, 3, (2,), generator=generator, device=x.device).tolist()
    crop = x[..., off[0] : off[0] + 10, off[1] : off[1] + 10]
    return nn.functional.interpolate(crop, size=x.shape[-2:], mode="bilinear")


def conv_bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def warmed_net() -> nn.Module:
    """A conv+BN net whose BN buffers hold non-trivial running statistics."""
    net = conv_bn_net()
    net.train()
    images, _ = colour_images(10, seed=7)
    with torch.no_grad():
        for _ in range(3):
            net(eval_transform(images))
    return net


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bit_identical(before: dict[str, torch.Tensor], module: nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for key in before:  # params, running_mean/var and num_batches_tracked
        assert torch.equal(before[key], after[key]), f"{key} changed"


# --- fast mode ---


def test_fast_linear_probe_separable_features() -> None:
    train_x, train_y = blobs(40)
    test_x, test_y = blobs(20, seed=1)
    result = linear_probe_features(train_x, train_y, test_x, test_y, max_iter=30)
    assert result["mode"] == FAST_MODE
    assert result["top1"] >= 0.98 and result["top5"] == 1.0
    assert result["train_top1"] >= 0.98
    chunked = linear_probe_features(train_x, train_y, test_x, test_y, max_iter=30, batch_size=7)
    assert chunked["top1"] == result["top1"]
    assert chunked["final_loss"] == pytest.approx(result["final_loss"], rel=1e-3, abs=1e-6)


def test_fast_linear_probe_does_not_depend_on_the_features_scale() -> None:
    # a random-init MobileNet's eval-mode features are ~1e-10: a fixed std floor of 1e-6 made
    # them all "constant", and the probe scored chance
    train_x, train_y = blobs(40)
    test_x, test_y = blobs(20, seed=1)
    unit = linear_probe_features(train_x, train_y, test_x, test_y, max_iter=30)
    tiny = linear_probe_features(1e-10 * train_x, train_y, 1e-10 * test_x, test_y, max_iter=30)
    assert tiny["top1"] == unit["top1"] >= 0.98
    assert tiny["final_loss"] == pytest.approx(unit["final_loss"], rel=1e-2)


def test_fast_linear_probe_reaches_the_regularised_optimum() -> None:
    """The L-BFGS fit must reach the minimiser of mean CE + wd/2 ||W||^2 on standardised features,
    here found independently by plain full-batch gradient descent written out step by step."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g) * torch.tensor([1.0, 2, 3, 4, 5, 6]) + 7
    y = torch.randint(0, 3, (120,), generator=g)  # random labels: no separable shortcut
    wd = 0.05
    result = linear_probe_features(x, y, x, y, num_classes=3, weight_decay=wd)
    # converged before the cap of 100 iterations, and says how many it took
    assert 0 < result["lbfgs_iters_run"] < result["lbfgs_iters"] == 100
    assert result["lbfgs_evals"] >= result["lbfgs_iters_run"]
    capped = linear_probe_features(x, y, x, y, num_classes=3, weight_decay=wd, max_iter=2)
    assert capped["lbfgs_iters_run"] <= 2
    with pytest.raises(ValueError, match="max_iter=0: L-BFGS needs at least 1 iteration"):
        linear_probe_features(x, y, x, y, num_classes=3, max_iter=0)  # would run 1, report 0
    xs = (x - x.mean(0)) / x.std(0, correction=0)
    weight = torch.zeros(3, 6, requires_grad=True)
    bias = torch.zeros(3, requires_grad=True)
    for _ in range(3000):
        loss = 0.0
        for i in range(xs.shape[0]):  # the objective exactly as written, one sample at a time
            logits = weight @ xs[i] + bias
            loss = loss - torch.log_softmax(logits, dim=0)[y[i]] / xs.shape[0]
        loss = loss + 0.5 * wd * weight.pow(2).sum()
        gw, gb = torch.autograd.grad(loss, (weight, bias))
        with torch.no_grad():
            weight -= 1.0 * gw
            bias -= 1.0 * gb
        if gw.norm() < 1e-6:
            break
    with torch.no_grad():
        reference_ce = nn.functional.cross_entropy(xs @ weight.T + bias, y).item()
    assert result["final_loss"] == pytest.approx(reference_ce, abs=1e-4)


def test_fast_linear_probe_beats_chance_only_with_signal() -> None:
    g = torch.Generator().manual_seed(0)
    noise_train, noise_test = torch.randn(200, 8, generator=g), torch.randn(400, 8, generator=g)
    labels_train = torch.randint(0, 4, (200,), generator=g)
    labels_test = torch.randint(0, 4, (400,), generator=g)
    result = linear_probe_features(noise_train, labels_train, noise_test, labels_test)
    assert result["top1"] < 0.40  # chance is 0.25: no leak of test labels


def test_fast_linear_probe_rejects_bad_labels() -> None:
    train_x, train_y = blobs(4)
    with pytest.raises(DataError, match="no labels"):
        linear_probe_features(train_x, None, train_x, train_y)
    with pytest.raises(DataError, match="num_classes"):
        linear_probe_features(train_x, train_y, train_x, train_y, num_classes=3)


def test_fast_linear_probe_standardises_test_features_with_train_statistics() -> None:
    """Test features are standardised with the *train* mean/std, so an image's prediction does
    not depend on the other test images: scoring each class on its own (whose own mean would
    erase the class) gives the accuracy of the full test set."""
    train_x, train_y = blobs(20)
    test_x, test_y = blobs(10, seed=1)
    full = linear_probe_features(train_x, train_y, test_x, test_y, max_iter=30)
    per_class = [
        linear_probe_features(
            train_x, train_y, test_x[test_y == c], test_y[test_y == c], num_classes=5, max_iter=30
        )["top1"]
        for c in range(5)
    ]
    assert full["top1"] >= 0.9
    assert sum(per_class) / 5 == pytest.approx(full["top1"])  # 10 test images per class


# --- full mode ---


def test_full_linear_probe_keeps_encoder_bit_identical_and_learns() -> None:
    net = warmed_net()
    net.train()  # the probe must switch BN to eval itself, and switch the flag back
    net[0].weight.requires_grad_(True)
    net[3].weight.requires_grad_(False)
    before = snapshot(net)
    train_images, train_labels = colour_images(30)
    test_images, test_labels = colour_images(20, seed=1)
    result = linear_probe(
        net,
        train_images,
        train_labels,
        test_images,
        test_labels,
        train_transform=train_transform,
        eval_transform=eval_transform,
        epochs=15,
        batch_size=16,
        progress=False,
    )
    assert_bit_identical(before, net)
    assert net.training and all(m.training for m in net.modules())
    assert net[0].weight.requires_grad and not net[3].weight.requires_grad
    assert result["mode"] == FULL_MODE
    assert result["top1"] > 0.80  # chance is 0.33


def test_full_linear_probe_decays_its_lr_to_zero_step_by_step(monkeypatch) -> None:
    """The cosine schedule of the papers' protocol steps once per SGD step and reaches 0 at the
    last one (a probe that never steps it trains at the peak lr throughout)."""
    linear_module = importlib.import_module("selfsup.evaluate.linear")
    real_cosine_sgd, made = linear_module.cosine_sgd, []

    def recording_cosine_sgd(*args, **kwargs):
        optimizer, schedule = real_cosine_sgd(*args, **kwargs)
        made.append((kwargs["total_steps"], optimizer, schedule))
        return optimizer, schedule

    monkeypatch.setattr(linear_module, "cosine_sgd", recording_cosine_sgd)
    train_images, train_labels = colour_images(10)  # 30 images, batch 8: 4 steps per epoch
    test_images, test_labels = colour_images(4, seed=1)
    linear_probe(
        warmed_net(), train_images, train_labels, test_images, test_labels,
        train_transform=train_transform, eval_transform=eval_transform,
        epochs=3, batch_size=8, lr=0.5, progress=False,
    )  # fmt: skip
    ((total_steps, optimizer, schedule),) = made
    assert total_steps == 3 * 4
    assert schedule.last_epoch == total_steps
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_full_linear_probe_is_seeded() -> None:
    train_images, train_labels = colour_images(12)
    test_images, test_labels = colour_images(8, seed=1)
    kwargs = dict(
        train_transform=train_transform,
        eval_transform=eval_transform,
        epochs=3,
        batch_size=8,
        progress=False,
    )
    net = warmed_net()
    a = linear_probe(net, train_images, train_labels, test_images, test_labels, **kwargs)
    b = linear_probe(net, train_images, train_labels, test_images, test_labels, **kwargs)
    assert a["final_loss"] == b["final_loss"]
    c = linear_probe(net, train_images, train_labels, test_images, test_labels, seed=1, **kwargs)
    assert c["final_loss"] != a["final_loss"]


def test_full_linear_probe_scores_each_test_image_independently_of_the_others() -> None:
    """The head's BatchNorm1d scores in eval mode (its running statistics from training): in
    train mode it would normalise by the test batch itself, and a one-class test set would lose
    the very offset that marks its class. Scoring each class alone must add up to the full set."""
    net = warmed_net()
    train_images, train_labels = colour_images(10)
    test_images, test_labels = colour_images(6, seed=1)
    kwargs = dict(
        num_classes=3,
        train_transform=train_transform,
        eval_transform=eval_transform,
        epochs=8,
        batch_size=16,
        progress=False,
    )

    def top1(keep: torch.Tensor) -> float:
        data = (train_images, train_labels, test_images[keep], test_labels[keep])
        return linear_probe(net, *data, **kwargs)["top1"]

    full = top1(torch.ones_like(test_labels, dtype=torch.bool))
    per_class = [top1(test_labels == c) for c in range(3)]
    assert full > 0.6  # chance is 0.33
    assert sum(per_class) / 3 == pytest.approx(full)  # 6 test images per class


def test_full_linear_probe_does_not_depend_on_the_features_scale() -> None:
    # a random-init MobileNet's eval-mode features are ~1e-10 (variance ~1e-20): BatchNorm's
    # eps of 1e-5 and running statistics starting at 0 / 1 both outweighed them (chance)
    class Scaled(nn.Module):
        def __init__(self, net: nn.Module, scale: float) -> None:
            super().__init__()
            self.net, self.scale = net, scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) * self.scale

    train_images, train_labels = colour_images(40)
    test_images, test_labels = colour_images(30, seed=1)

    def top1(scale: float) -> float:
        return linear_probe(
            Scaled(warmed_net(), scale), train_images, train_labels, test_images, test_labels,
            train_transform=train_transform, eval_transform=eval_transform, epochs=20,
            batch_size=32, progress=False,
        )["top1"]  # fmt: skip

    unit = top1(1.0)
    assert unit > 0.6 and top1(1e-10) == pytest.approx(unit, abs=0.05)


def test_fast_and_full_modes_agree_on_easy_task() -> None:
    net = warmed_net()
    train_images, train_labels = colour_images(40)
    test_images, test_labels = colour_images(30, seed=1)
    full = linear_probe(
        net,
        train_images,
        train_labels,
        test_images,
        test_labels,
        train_transform=train_transform,
        eval_transform=eval_transform,
        epochs=20,
        batch_size=32,
        progress=False,
    )
    train_feats = extract_features(net, train_images, eval_transform)
    test_feats = extract_features(net, test_images, eval_transform)
    fast = linear_probe_features(train_feats, train_labels, test_feats, test_labels)
    assert fast["top1"] > 0.80 and full["top1"] > 0.80
    assert abs(fast["top1"] - full["top1"]) <= 0.05


# --- fine-tuning ---


def test_finetune_leaves_callers_backbone_untouched_and_learns() -> None:
    net = warmed_net()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    before = snapshot(net)
    train_images, train_labels = colour_images(20)
    test_images, test_labels = colour_images(20, seed=1)
    result = finetune(
        net,
        train_images,
        train_labels,
        test_images,
        test_labels,
        num_classes=3,
        train_transform=train_transform,
        eval_transform=eval_transform,
        epochs=10,
        lr=0.05,
        batch_size=16,
        progress=False,
    )
    assert_bit_identical(before, net)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert result["top1"] > 0.80
    assert result["head_lr"] == pytest.approx(0.5)  # 10x the encoder lr by default


def test_finetune_trains_the_encoder_copy() -> None:
    # With the head's lr at 0 only encoder updates can reduce the loss: fine-tuning must train it.
    net = warmed_net()
    train_images, train_labels = colour_images(10)
    kwargs = dict(
        num_classes=3,
        train_transform=train_transform,
        eval_transform=eval_transform,
        epochs=6,
        head_lr=0.0,
        batch_size=10,
        progress=False,
    )
    data = (train_images, train_labels, train_images, train_labels)
    frozen = finetune(net, *data, lr=0.0, **kwargs)
    trained = finetune(net, *data, lr=0.1, **kwargs)
    assert trained["final_loss"] < frozen["final_loss"]


def test_finetune_trains_batchnorm_in_training_mode(monkeypatch) -> None:
    """Fine-tuning trains the whole encoder as the papers do, BatchNorm included: its running
    statistics move with the fine-tuning batches. They move in the deep copy that is trained
    (recorded here), never in the caller's backbone."""
    copies: list[nn.Module] = []
    real = finetune_module.plain_batchnorm

    def recording(module: nn.Module) -> nn.Module:
        copies.append(real(module))
        return copies[-1]

    monkeypatch.setattr(finetune_module, "plain_batchnorm", recording)
    net = warmed_net()
    before = snapshot(net)
    train_images, train_labels = colour_images(6)
    finetune(
        net,
        train_images,
        train_labels,
        train_images,
        train_labels,
        num_classes=3,
        train_transform=train_transform,
        eval_transform=eval_transform,
        epochs=1,
        batch_size=9,
        progress=False,
    )
    (trained,) = copies
    for index in (1, 4):  # the two BatchNorm2d layers of conv_bn_net
        bn = trained[index]
        assert bn.num_batches_tracked > before[f"{index}.num_batches_tracked"]
        assert not torch.equal(bn.running_mean, before[f"{index}.running_mean"])
    assert_bit_identical(before, net)


def test_supervised_baseline_uses_fresh_copy() -> None:
    fresh = conv_bn_net(seed=3)
    before = snapshot(fresh)
    train_images, train_labels = colour_images(20)
    test_images, test_labels = colour_images(10, seed=1)
    result = supervised_baseline(
        fresh,
        train_images,
        train_labels,
        test_images,
        test_labels,
        num_classes=3,
        train_transform=train_transform,
        eval_transform=eval_transform,
        epochs=8,
        batch_size=16,
        progress=False,
    )
    assert_bit_identical(before, fresh)
    assert result["mode"] == SUPERVISED_MODE and result["head_lr"] == result["lr"]
    assert result["top1"] > 0.50


# --- label subsets ---


def imbalanced_labels() -> torch.Tensor:
    counts = [120, 200, 300, 250, 130]  # N = 1000, 5 classes
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize(("percent", "per_class"), [(1, 2), (10, 20), (0.1, 1)])
def test_balanced_subset_is_balanced(percent: float, per_class: int) -> None:
    labels = imbalanced_labels()
    idx = balanced_subset(labels, percent, seed=0)
    assert idx.dtype == torch.long
    assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == idx.numel()
    assert torch.bincount(labels[idx], minlength=5).tolist() == [per_class] * 5


def test_balanced_subset_seeding_and_full_set() -> None:
    labels = imbalanced_labels()
    assert torch.equal(balanced_subset(labels, 10, seed=5), balanced_subset(labels, 10, seed=5))
    assert not torch.equal(balanced_subset(labels, 10, seed=5), balanced_subset(labels, 10, seed=6))
    assert torch.equal(balanced_subset(labels, 100), torch.arange(1000))
    tiny = torch.tensor([0, 0, 0, 1])  # a class smaller than the quota gives all it has
    assert torch.bincount(tiny[balanced_subset(tiny, 90)]).tolist() == [2, 1]


def test_balanced_subset_rejects_bad_fraction() -> None:
    for bad in (0, -1, 150):
        with pytest.raises(ConfigError, match="label fraction"):
            balanced_subset(imbalanced_labels(), bad)
    with pytest.raises(DataError):
        balanced_subset(None, 10)


def test_saved_subset_round_trips(tmp_path) -> None:
    labels = imbalanced_labels()
    paths = [f"train/{i:04d},with comma.png" for i in range(labels.numel())]
    idx = balanced_subset(labels, 1, seed=2)
    written = save_subset(idx, paths, labels, tmp_path / "run" / "subset_1pct.csv")
    assert written.read_text().splitlines()[0] == "index,path,label"
    loaded_idx, loaded_paths, loaded_labels = load_subset(written)
    assert torch.equal(loaded_idx, idx)
    assert loaded_paths == [paths[i] for i in idx.tolist()]
    assert torch.equal(loaded_labels, labels[idx])
    aligned = save_subset(idx, [paths[i] for i in idx.tolist()], labels[idx], tmp_path / "a.csv")
    assert aligned.read_text() == written.read_text()  # subset-aligned inputs, same file
    with pytest.raises(DataError, match="entries"):
        save_subset(idx, paths[:5], labels, tmp_path / "bad.csv")
    no_paths = save_subset(idx, None, labels, tmp_path / "nopaths.csv")
    assert load_subset(no_paths)[1] == [""] * idx.numel()
    with pytest.raises(DataError, match="does not exist"):
        load_subset(tmp_path / "missing.csv")


class _StopWhenWritten:
    """A path whose ``str()`` raises, as a Ctrl-C in the middle of writing a CSV would."""

    def __str__(self) -> str:
        raise KeyboardInterrupt


def test_a_stop_while_saving_a_subset_leaves_the_previous_file_whole(tmp_path) -> None:
    labels = torch.tensor([0, 1, 0, 1])
    target = tmp_path / "subset_10pct.csv"
    save_subset(torch.arange(4), ["a", "b", "c", "d"], labels, target)
    before = target.read_text()
    with pytest.raises(KeyboardInterrupt):
        save_subset(torch.arange(4), ["w", "x", _StopWhenWritten(), "z"], labels, target)
    assert target.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary file left


def test_finetune_on_subset_end_to_end() -> None:
    images, labels = colour_images(30)
    idx = balanced_subset(labels, 20, seed=0)
    net = warmed_net()
    result = finetune(
        copy.deepcopy(net),
        images[idx],
        labels[idx],
        images,
        labels,
        num_classes=3,
        train_transform=train_transform,
        eval_transform=eval_transform,
        epochs=10,
        lr=0.05,
        batch_size=9,
        progress=False,
    )
    assert result["n_train"] == 18 and result["n_test"] == 90
    assert result["top1"] > 0.70
