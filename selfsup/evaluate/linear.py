"""Linear evaluation: a linear classifier trained on top of a frozen encoder.

The standard protocol of the self-supervised papers (SimCLR Sec. B.6, MoCo Sec. 4.1, BYOL Sec. 4.1
and Appendix C.1, SimSiam Sec. A): freeze the pre-trained encoder, train a linear layer on its
pooled features with cross-entropy, report top-1 / top-5 on the test split.

Two modes:

* ``linear_probe_features`` ("fast"): features are extracted once, without augmentation, and an
  L2-regularised logistic regression is fitted on the cached ``[N, D]`` tensor with L-BFGS.
  Seconds on a CPU. It sees each training image once, uncropped, where the full protocol sees
  random crops every epoch, so the two can differ by several points in either direction (on a few
  thousand images the fast mode often scores higher: it overfits nothing it is not shown).
* ``linear_probe`` ("full"): the papers' protocol. Each epoch re-augments the training images
  (random resized crop + flip from ``train_transform``), passes them through the frozen encoder
  (eval mode, so BatchNorm running statistics never change; no gradients) and trains the
  classifier with SGD momentum 0.9 and a cosine schedule.

Both standardise the features before the linear layer (fast: train mean/std; full: a
``BatchNorm1d(affine=False)`` in the head, as in MAE Sec. A.2 / MoCo v3), so that one learning rate
(full) or one L2 strength (fast) works across backbones whose feature scales differ by orders of
magnitude. A normalisation without affine parameters followed by a linear layer is still a linear
classifier.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import DataError
from selfsup.evaluate.features import (
    Transform,
    amp_precision,
    apply_transform,
    autocast_context,
    eval_mode,
    extract_features,
    resolve_device,
)
from selfsup.evaluate.knn import topk_accuracy
from selfsup.precision import grad_scaler
from selfsup.progress import bar_options

FAST_MODE = "fast (cached features, no augmentation)"
FULL_MODE = "full (augmented, frozen encoder)"


def infer_num_classes(*label_sets: Tensor | None) -> int:
    """``max label + 1`` over the given label tensors."""
    present = [labels for labels in label_sets if labels is not None and labels.numel() > 0]
    if not present:
        raise DataError("evaluation needs labels; the dataset has none (labels is None or empty).")
    return int(max(labels.max().item() for labels in present)) + 1


def check_labels(labels: Tensor | None, n: int, num_classes: int, split: str) -> Tensor:
    """Validate an int64 ``[n]`` label tensor with values in ``[0, num_classes)``."""
    if labels is None:
        raise DataError(
            f"the {split} split has no labels; linear evaluation and fine-tuning need a labelled "
            "dataset (a class-per-folder layout or a torchvision dataset)."
        )
    if labels.shape != (n,):
        raise DataError(f"{split} labels must be shaped [{n}], got {tuple(labels.shape)}")
    if n == 0:
        raise DataError(f"the {split} split is empty; evaluation needs at least one image.")
    low, high = int(labels.min().item()), int(labels.max().item())
    if low < 0 or high >= num_classes:
        raise DataError(
            f"{split} labels span [{low}, {high}] but num_classes is {num_classes}; pass the "
            "number of classes of the dataset."
        )
    return labels.long()


def make_linear_head(
    in_dim: int, num_classes: int, *, generator: torch.Generator | None = None
) -> nn.Linear:
    """``nn.Linear`` initialised as in MoCo / SimSiam linear evaluation: N(0, 0.01) weights,
    zero bias."""
    head = nn.Linear(in_dim, num_classes)
    nn.init.normal_(head.weight, std=0.01, generator=generator)
    nn.init.zeros_(head.bias)
    return head


@torch.no_grad()
def fold_standardisation(linear: nn.Linear, mean: Tensor | float, std: Tensor | float) -> nn.Linear:
    """The ``nn.Linear`` that maps raw features ``x`` to ``linear((x - mean) / std)``.

    ``W' = W / std`` (per input dimension) and ``b' = b - W' mean``, computed in float64: one
    linear layer that needs no standardisation in front of it. ``mean`` / ``std``: ``[D]`` or
    scalars. The result is a new float32 module on ``linear``'s device.
    """
    weight = linear.weight.detach().double()
    bias = (
        linear.bias.detach().double()
        if linear.bias is not None
        else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    )
    mean = torch.as_tensor(mean, dtype=torch.float64, device=weight.device).expand(weight.shape[1])
    std = torch.as_tensor(std, dtype=torch.float64, device=weight.device).expand(weight.shape[1])
    folded = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.device)
    new_weight = weight / std
    folded.weight.copy_(new_weight.float())
    folded.bias.copy_((bias - new_weight @ mean).float())
    return folded


def fold_batchnorm_head(head: nn.Sequential) -> nn.Linear:
    """The full probe's ``BatchNorm1d(affine=False) -> Linear`` head as one ``nn.Linear``: the
    eval-mode normalisation ``(x - running_mean) / sqrt(running_var + eps)`` folded into the
    weights (:func:`fold_standardisation`), so it gives the head's eval-mode logits."""
    norm, linear = head
    if not isinstance(norm, nn.BatchNorm1d) or norm.affine or not isinstance(linear, nn.Linear):
        raise TypeError(f"expected BatchNorm1d(affine=False) -> Linear, got {head}")
    std = (norm.running_var.detach().double() + norm.eps).sqrt()
    return fold_standardisation(linear, norm.running_mean.detach(), std)


def cosine_sgd(
    params,
    *,
    lr: float,
    total_steps: int,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD with a per-step cosine decay from ``lr`` to 0 over ``total_steps`` (SGDR without
    restarts, Loshchilov & Hutter 2017), as in the papers' linear and fine-tuning protocols.

    ``params`` may be a list of param-group dicts, each with its own ``lr``.
    """
    optimizer = torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )
    total = max(1, total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    )
    return optimizer, schedule


def batch_indices(
    n: int, batch_size: int, generator: torch.Generator, *, min_batch: int = 1
) -> list[Tensor]:
    """One epoch of shuffled index batches; a trailing batch smaller than ``min_batch`` is dropped
    (BatchNorm in training mode cannot normalise a single sample)."""
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and batches[-1].numel() < min_batch:
        batches.pop()
    return batches


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar when ``enabled`` (and tqdm is importable), else ``None``."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a declared dependency, but progress output is never essential
        return None
    return tqdm(total=total, desc=desc, leave=False, **bar_options())


def prepare_run(
    encoder: nn.Module,
    transforms: tuple[Transform, ...],
    train_images: Tensor,
    train_labels: Tensor | None,
    test_images: Tensor,
    test_labels: Tensor | None,
    *,
    num_classes: int,
    device: torch.device | str | None,
    seed: int,
) -> tuple[Tensor, Tensor, torch.device, torch.Generator, torch.Generator]:
    """Common set-up of the augmented protocols (full linear probe, fine-tuning).

    Checks both label tensors (:func:`check_labels`), moves ``encoder`` and the module transforms
    to the run device (``device``, else the encoder's) and seeds two generators: a CPU one from
    ``seed`` (head initialisation, shuffling) and one on the device from ``seed + 1``
    (augmentation).

    Returns:
        ``(train_labels, test_labels, run_device, cpu_generator, aug_generator)``.
    """
    train_labels = check_labels(train_labels, train_images.shape[0], num_classes, "train")
    test_labels = check_labels(test_labels, test_images.shape[0], num_classes, "test")
    run_device = resolve_device(encoder, device)
    encoder.to(run_device)
    for transform in transforms:
        if isinstance(transform, nn.Module):
            transform.to(run_device)
    cpu_generator = torch.Generator().manual_seed(seed)
    aug_generator = torch.Generator(device=run_device).manual_seed(seed + 1)
    return train_labels, test_labels, run_device, cpu_generator, aug_generator


def _steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of :func:`batch_indices` (``min_batch=2``).

    Counted on a throwaway generator: the count does not depend on the order, and the run's
    shuffling generator must not advance.
    """
    return len(batch_indices(n_train, batch_size, torch.Generator(), min_batch=2))


def _head_optimizer(
    encoder: nn.Module,
    head: nn.Module,
    *,
    lr: float,
    head_lr: float | None,
    weight_decay: float,
    nesterov: bool,
    total_steps: int,
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """Cosine SGD over the head alone (``head_lr`` None: linear evaluation) or over the encoder
    at ``lr`` and the head at ``head_lr`` (fine-tuning)."""
    if head_lr is None:
        params = head.parameters()
    else:
        params = [
            {"params": list(encoder.parameters()), "lr": lr},
            {"params": list(head.parameters()), "lr": head_lr},
        ]
    return cosine_sgd(
        params, lr=lr, total_steps=total_steps, weight_decay=weight_decay, nesterov=nesterov
    )


def _sgd_step(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> None:
    """One optimizer step on ``loss`` through the loss scaler, then one step of the schedule."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    schedule.step()


def _train_epochs(
    encode: Callable[[Tensor], Tensor],
    head: nn.Module,
    train_images: Tensor,
    train_labels: Tensor,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    *,
    epochs: int,
    steps_per_epoch: int,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator,
    progress_desc: str,
    progress: bool,
) -> float:
    """``epochs`` shuffled passes of cross-entropy on ``head(encode(batch))``, the head in train
    mode, with a progress bar over the steps; returns the last step's loss (NaN if none ran)."""
    bar = progress_bar(epochs * steps_per_epoch, progress_desc, progress)
    final_loss = float("nan")
    head.train()
    try:
        for _ in range(epochs):
            for idx in batch_indices(train_images.shape[0], batch_size, generator, min_batch=2):
                images = train_images[idx].to(device, non_blocking=True)
                loss = F.cross_entropy(head(encode(images)), train_labels[idx].to(device))
                _sgd_step(loss, optimizer, schedule, scaler)
                final_loss = loss.item()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{final_loss:.3f}")
    finally:
        if bar is not None:
            bar.close()
    return final_loss


def _test_accuracy(
    encoder: nn.Module,
    head: nn.Module,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    eval_transform: Transform,
    batch_size: int,
    device: torch.device,
    amp: bool,
) -> tuple[float, float]:
    """Top-1 and top-5 of ``head`` (eval mode) on the test features ``encoder`` gives with
    ``eval_transform`` (:func:`extract_features`, eval mode)."""
    test_feats = extract_features(
        encoder, test_images, eval_transform, batch_size=batch_size, device=device, amp=amp
    )
    head.eval()
    with torch.no_grad():
        top1, top5 = topk_accuracy(head(test_feats.to(device)), test_labels, (1, 5))
    return top1, top5


def train_and_test_head(
    encode: Callable[[Tensor], Tensor],
    encoder: nn.Module,
    head: nn.Module,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    eval_transform: Transform,
    num_classes: int,
    epochs: int,
    lr: float,
    head_lr: float | None,
    weight_decay: float,
    nesterov: bool,
    batch_size: int,
    device: torch.device,
    amp: bool,
    generator: torch.Generator,
    mode: str,
    progress_desc: str,
    progress: bool,
) -> dict[str, float | int | str]:
    """Train ``head`` on ``encode``-d training batches, then classify the test split.

    The loop shared by the full linear probe and fine-tuning (SimCLR Sec. B.5 / B.6): ``epochs``
    passes over the training images in shuffled batches (a trailing batch of 1 is dropped, for
    BatchNorm), cross-entropy on ``head(encode(batch))``, SGD momentum 0.9 with a per-step cosine
    schedule (:func:`cosine_sgd`). The test images are then encoded by ``encoder`` with
    ``eval_transform`` (:func:`extract_features`, eval mode) and scored by ``head`` in eval mode.

    Args:
        encode: uint8 ``[B, 3, H, W]`` batch on ``device`` -> float32 ``[B, D]`` training features
            (augmentation included; the caller decides whether gradients reach the encoder).
        encoder: the module ``encode`` runs, used again for the test features.
        head: ``[B, D] -> [B, C]`` logits, already on ``device``; put in train mode here (the
            caller sets the encoder's mode).
        train_images / test_images: uint8 ``[N, 3, H, W]``; train_labels / test_labels: int64
            ``[N]``, already checked.
        eval_transform: deterministic uint8 batch -> normalised float batch.
        num_classes, epochs, weight_decay, batch_size: the run's settings.
        lr: the head's learning rate when ``head_lr`` is None (linear evaluation, only the head's
            parameters are optimised); otherwise the encoder's, with the head at ``head_lr``
            (fine-tuning, reported as ``head_lr`` in the result).
        nesterov: Nesterov momentum.
        device: where to train; amp: autocast on CUDA (:func:`amp_precision`).
        generator: CPU generator for the shuffling.
        mode: the result's ``mode``; progress_desc / progress: the tqdm bar's label / switch.

    Returns:
        ``{"top1", "top5", "final_loss", "mode", "epochs", "lr", ["head_lr",] "weight_decay",
        "batch_size", "num_classes", "n_train", "n_test"}``; accuracies as fractions.
    """
    n_train = train_images.shape[0]
    steps_per_epoch = _steps_per_epoch(n_train, batch_size)
    optimizer, schedule = _head_optimizer(
        encoder,
        head,
        lr=lr,
        head_lr=head_lr,
        weight_decay=weight_decay,
        nesterov=nesterov,
        total_steps=epochs * steps_per_epoch,
    )
    # fine-tuning backpropagates through the encoder under autocast: fp16 needs a loss scale
    scaler = grad_scaler(amp_precision(device, amp) if head_lr is not None else "fp32", device)
    final_loss = _train_epochs(
        encode,
        head,
        train_images,
        train_labels,
        optimizer,
        schedule,
        scaler,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        device=device,
        generator=generator,
        progress_desc=progress_desc,
        progress=progress,
    )
    top1, top5 = _test_accuracy(
        encoder,
        head,
        test_images,
        test_labels,
        eval_transform=eval_transform,
        batch_size=batch_size,
        device=device,
        amp=amp,
    )
    learning_rates = {"lr": lr} if head_lr is None else {"lr": lr, "head_lr": head_lr}
    return {
        "top1": top1,
        "top5": top5,
        "final_loss": final_loss,
        "mode": mode,
        "epochs": epochs,
        **learning_rates,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "num_classes": num_classes,
        "n_train": int(n_train),
        "n_test": int(test_images.shape[0]),
    }


def _check_feature_shapes(train_feats: Tensor, test_feats: Tensor) -> None:
    """Refuse features that are not ``[N, D]`` with the same ``D`` for both splits."""
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"features must be [N, D] with equal D; got {tuple(train_feats.shape)} and "
            f"{tuple(test_feats.shape)}"
        )


def _train_mean_std(x_train: Tensor) -> tuple[Tensor, Tensor | float]:
    """Per-dimension mean and floored std of the training features ``[N, D]`` (std 1.0 for a
    single row, which has no spread to measure)."""
    mean = x_train.mean(dim=0)
    # A dimension that is constant over the training set carries no information: the floor
    # keeps it ~0. The floor scales with features far below unit size (a random-init MobileNet's
    # are ~1e-10 in eval mode), which a fixed 1e-6 would shrink to nothing.
    if x_train.shape[0] > 1:
        std = x_train.std(dim=0, correction=0)
        floor = 1e-6 * min(1.0, float(std.max()))
        std = std.clamp_min(floor) if floor > 0 else torch.ones_like(std)
    else:
        std = 1.0
    return mean, std


def _standardised(
    train_feats: Tensor, test_feats: Tensor, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor | float]:
    """Both splits as float32 on ``device``, standardised with the *training* mean and std.

    Returns:
        ``(x_train, x_test, mean, std)``; ``mean`` / ``std`` are kept to fold into the head.
    """
    x_train = train_feats.to(device, torch.float32)
    mean, std = _train_mean_std(x_train)
    x_train = (x_train - mean) / std
    x_test = (test_feats.to(device, torch.float32) - mean) / std
    return x_train, x_test, mean, std


def _lbfgs(head: nn.Linear, *, lr: float, max_iter: int) -> torch.optim.LBFGS:
    """The fast probe's solver: L-BFGS with a strong-Wolfe line search (as scikit-learn's
    ``LogisticRegression``), a 20-step history and tolerances near float32 resolution."""
    return torch.optim.LBFGS(
        head.parameters(),
        lr=lr,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )


def _regularised_loss_closure(
    optimizer: torch.optim.Optimizer,
    head: nn.Linear,
    x_train: Tensor,
    y_train: Tensor,
    *,
    weight_decay: float,
    chunk: int,
    device: torch.device,
) -> Callable[[], Tensor]:
    """L-BFGS's closure: backpropagates and returns ``mean_i CE(head(x_i), y_i) + weight_decay
    / 2 * ||W||^2`` over the whole training set, ``chunk`` rows per forward (to bound memory)."""
    n_train = x_train.shape[0]

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for start in range(0, n_train, chunk):  # sum of chunk losses = full-batch mean loss
            logits = head(x_train[start : start + chunk])
            part = F.cross_entropy(logits, y_train[start : start + chunk], reduction="sum")
            (part / n_train).backward()
            total += part.detach() / n_train
        penalty = 0.5 * weight_decay * head.weight.pow(2).sum()
        penalty.backward()
        return total + penalty.detach()

    return closure


def _lbfgs_counts(optimizer: torch.optim.LBFGS, head: nn.Linear) -> tuple[int, int]:
    """``(iterations, loss evaluations)`` that L-BFGS ran on ``head``.

    Fewer iterations than ``max_iter`` when it converged (the tolerances of :func:`_lbfgs`) or
    used up its loss evaluations (torch's ``max_eval``: 1.25 x ``max_iter``) first.
    """
    solver_state = optimizer.state[next(iter(head.parameters()))]
    return int(solver_state["n_iter"]), int(solver_state["func_evals"])


def _fit_logistic_regression(
    x_train: Tensor,
    y_train: Tensor,
    num_classes: int,
    *,
    lr: float,
    max_iter: int,
    weight_decay: float,
    chunk: int,
    device: torch.device,
    generator: torch.Generator,
) -> tuple[nn.Linear, int, int]:
    """A fresh ``nn.Linear(D, C)`` (:func:`make_linear_head`, seeded by ``generator``) fitted to
    the standardised ``x_train`` by L-BFGS; returns ``(head, iterations, loss evaluations)``."""
    head = make_linear_head(x_train.shape[1], num_classes, generator=generator).to(device)
    optimizer = _lbfgs(head, lr=lr, max_iter=max_iter)
    closure = _regularised_loss_closure(
        optimizer, head, x_train, y_train, weight_decay=weight_decay, chunk=chunk, device=device
    )
    optimizer.step(closure)
    return head, *_lbfgs_counts(optimizer, head)


def _fast_scores(
    head: nn.Linear,
    x_train: Tensor,
    y_train: Tensor,
    train_labels: Tensor,
    x_test: Tensor,
    test_labels: Tensor,
) -> tuple[float, float, float, float]:
    """``(final_loss, top1, top5, train_top1)`` of the fitted ``head``: the training
    cross-entropy (without the L2 term), test top-1 / top-5 and training top-1."""
    with torch.no_grad():
        final_loss = F.cross_entropy(head(x_train), y_train).item()
        top1, top5 = topk_accuracy(head(x_test), test_labels, (1, 5))
        (train_top1,) = topk_accuracy(head(x_train), train_labels, (1,))
    return final_loss, top1, top5, train_top1


def linear_probe_features(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int | None = None,
    max_iter: int = 100,
    lr: float = 1.0,
    weight_decay: float = 1e-4,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    return_head: bool = False,
) -> dict[str, float | int | str] | tuple[dict[str, float | int | str], nn.Linear]:
    """Fast linear evaluation: L2-regularised multinomial logistic regression on cached features.

    Features are standardised with the training mean and std (per dimension), then an
    ``nn.Linear(D, C)`` minimises the full-batch objective
    ``mean_i CE(W x_i + b, y_i) + weight_decay / 2 * ||W||^2`` with L-BFGS (strong-Wolfe line
    search), the solver of scikit-learn's ``LogisticRegression``. The problem is convex, so this
    converges in tens of iterations without a learning-rate schedule to tune, and the result is
    deterministic: seconds for 50k x 2048 features on a CPU, where mini-batch SGD for 100 epochs
    takes minutes.

    Args:
        train_feats: float ``[N_train, D]``; train_labels: int64 ``[N_train]``.
        test_feats: float ``[N_test, D]``; test_labels: int64 ``[N_test]``.
        num_classes: ``C``; defaults to ``max label + 1``.
        max_iter: L-BFGS iterations (each is one or a few full passes over the features).
        lr: L-BFGS step scale (1.0 with the line search).
        weight_decay: L2 coefficient on ``W`` (the same gradient ``weight_decay * W`` as SGD's);
            the default 1e-4 is a light ridge that keeps the optimum finite when the classes are
            separable, where the papers' SGD probes use 0 and stop after 100 epochs instead.
        batch_size: rows per forward chunk inside one full-batch evaluation, to bound memory for
            very large feature sets; ``None`` = all at once. Does not change the result.
        device: defaults to ``train_feats.device``.
        seed: seeds the initialisation.
        return_head: also return the trained classifier.

    Returns:
        ``{"top1", "top5", "train_top1" (fractions in [0, 1]), "final_loss": ...,
        "mode": FAST_MODE, ...}``; with ``return_head``, ``(that dict, head)`` where ``head`` is
        an ``nn.Linear(D, C)`` on the *raw* features, the standardisation folded into it
        (:func:`fold_standardisation`).
    """
    _check_feature_shapes(train_feats, test_feats)
    if max_iter < 1:  # torch's L-BFGS would still run one iteration, and the result say 0
        raise ValueError(f"max_iter={max_iter}: L-BFGS needs at least 1 iteration")
    if num_classes is None:
        num_classes = infer_num_classes(train_labels, test_labels)
    train_labels = check_labels(train_labels, train_feats.shape[0], num_classes, "train")
    test_labels = check_labels(test_labels, test_feats.shape[0], num_classes, "test")
    run_device = torch.device(device) if device is not None else train_feats.device
    generator = torch.Generator().manual_seed(seed)

    x_train, x_test, mean, std = _standardised(train_feats, test_feats, run_device)
    y_train = train_labels.to(run_device)
    n_train = x_train.shape[0]
    head, iterations, evaluations = _fit_logistic_regression(
        x_train,
        y_train,
        num_classes,
        lr=lr,
        max_iter=max_iter,
        weight_decay=weight_decay,
        chunk=n_train if batch_size is None else max(1, batch_size),
        device=run_device,
        generator=generator,
    )
    final_loss, top1, top5, train_top1 = _fast_scores(
        head, x_train, y_train, train_labels, x_test, test_labels
    )
    metrics = {
        "top1": top1,
        "top5": top5,
        "train_top1": train_top1,
        "final_loss": final_loss,
        "mode": FAST_MODE,
        "solver": "lbfgs",
        "lbfgs_iters": max_iter,  # the setting; lbfgs_iters_run: what it took
        "lbfgs_iters_run": iterations,
        "lbfgs_evals": evaluations,
        "weight_decay": weight_decay,
        "num_classes": num_classes,
        "n_train": int(n_train),
        "n_test": int(test_feats.shape[0]),
    }
    if return_head:
        return metrics, fold_standardisation(head, mean, std)
    return metrics


class FrozenEncoder:
    """Context manager that freezes a backbone for linear evaluation and undoes it afterwards.

    Inside the context every parameter has ``requires_grad=False`` and every submodule is in eval
    mode (BatchNorm normalises with its running statistics and never updates them). On exit, each
    parameter's ``requires_grad`` and each submodule's train/eval flag are restored, so the
    caller's module is left exactly as it was (its weights and buffers are never written).
    """

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone
        self._requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._eval = eval_mode(backbone)

    def __enter__(self) -> nn.Module:
        self._requires_grad = [(p, p.requires_grad) for p in self.backbone.parameters()]
        for param, _ in self._requires_grad:
            param.requires_grad_(False)
        self._eval.__enter__()
        return self.backbone

    def __exit__(self, *exc_info) -> None:
        self._eval.__exit__(*exc_info)
        for param, flag in self._requires_grad:
            param.requires_grad_(flag)


def _frozen_encode(
    backbone: nn.Module,
    train_transform: Transform,
    aug_generator: torch.Generator,
    device: torch.device,
    amp: bool,
) -> Callable[[Tensor], Tensor]:
    """The full probe's training features: a uint8 batch augmented by ``train_transform`` and
    encoded by the frozen ``backbone`` under ``no_grad``, as float32 ``[B, D]``."""

    def encode(images: Tensor) -> Tensor:
        with torch.no_grad(), autocast_context(device, amp):
            return backbone(apply_transform(train_transform, images, aug_generator)).float()

    return encode


def _probe_features(
    backbone: nn.Module,
    eval_transform: Transform,
    train_images: Tensor,
    device: torch.device,
    amp: bool,
) -> tuple[Tensor, int]:
    """The frozen ``backbone``'s float32 features of the first 64 training images (with
    ``eval_transform``) and how many images that is: they size and initialise the head."""
    with torch.no_grad(), autocast_context(device, amp):
        probe = apply_transform(eval_transform, train_images[:64].to(device))
        probe_feats = backbone(probe).float()
    return probe_feats, len(probe)


def _standardising_head(
    probe_feats: Tensor,
    n_probe: int,
    num_classes: int,
    *,
    device: torch.device,
    generator: torch.Generator,
) -> nn.Sequential:
    """The full probe's head ``BatchNorm1d(D, affine=False) -> Linear(D, C)`` on ``device``, its
    BatchNorm's eps and running statistics set from the ``n_probe`` probe features ``[n, D]``."""
    feat_dim = probe_feats.shape[1]
    # BatchNorm's eps (1e-5) in proportion to features far below unit variance: it would
    # swamp a random-init MobileNet's (variance ~1e-20 in eval mode), and the probe score
    # chance; features of unit variance or more keep 1e-5
    variance = float(probe_feats.var(dim=0, correction=0).mean()) if n_probe > 1 else 1.0
    eps = 1e-5 * min(1.0, variance) if variance > 0 else 1e-5
    head = nn.Sequential(
        nn.BatchNorm1d(feat_dim, eps=eps, affine=False),
        make_linear_head(feat_dim, num_classes, generator=generator),
    ).to(device)
    if n_probe > 1:  # running statistics from the features, not 0 / 1: a short probe's
        # would keep (1 - 0.1)^steps of those, which outweigh features far from unit scale
        head[0].running_mean.copy_(probe_feats.mean(dim=0))
        head[0].running_var.copy_(probe_feats.var(dim=0))
    return head


def linear_probe(
    backbone: nn.Module,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    train_transform: Transform,
    eval_transform: Transform,
    num_classes: int | None = None,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    seed: int = 0,
    amp: bool = True,
    progress: bool = True,
    return_head: bool = False,
) -> dict[str, float | int | str] | tuple[dict[str, float | int | str], nn.Linear]:
    """Full linear evaluation with augmentation on a frozen encoder (the papers' protocol).

    Each epoch the training images are shuffled, augmented by ``train_transform`` (random resized
    crop + horizontal flip in the papers), encoded by the frozen ``backbone`` under ``no_grad`` and
    eval mode, and a head ``BatchNorm1d(D, affine=False) -> Linear(D, C)`` is trained with
    cross-entropy, SGD momentum 0.9 and a per-step cosine schedule. The test split is then encoded
    with ``eval_transform`` and classified.

    The backbone's parameters and buffers are never modified (it is moved to ``device`` in place
    if one is given); ``requires_grad`` and train/eval flags are restored on return.

    Args:
        backbone: encoder ``[B, 3, S, S] -> [B, D]``.
        train_images / test_images: uint8 ``[N, 3, H, W]`` (CPU, possibly memmap-backed).
        train_labels / test_labels: int64 ``[N]``.
        train_transform: uint8 batch on ``device`` -> augmented normalised float ``[B, 3, S, S]``;
            if it accepts a ``generator`` keyword, a generator on ``device`` seeded from ``seed``
            is passed, making the run reproducible.
        eval_transform: deterministic uint8 batch -> normalised float batch (``EvalTransform``).
        num_classes: ``C``; defaults to ``max label + 1``.
        epochs, lr, weight_decay, batch_size: the classifier's schedule.
        device: defaults to the backbone's device.
        seed: seeds head initialisation, shuffling and (when supported) augmentation.
        amp: autocast for the encoder on CUDA (bf16, or fp16 where bf16 is not native).
        progress: show a tqdm bar over steps.
        return_head: also return the trained classifier.

    Returns:
        ``{"top1", "top5" (fractions in [0, 1]), "mode": FULL_MODE, "final_loss": ...,
        ...settings}``; with ``return_head``, ``(that dict, head)`` where ``head`` is one
        ``nn.Linear(D, C)`` on the encoder's features, the head's BatchNorm (eval mode) folded
        into it (:func:`fold_batchnorm_head`).
    """
    if num_classes is None:
        num_classes = infer_num_classes(train_labels, test_labels)
    train_labels, test_labels, run_device, cpu_generator, aug_generator = prepare_run(
        backbone,
        (train_transform, eval_transform),
        train_images,
        train_labels,
        test_images,
        test_labels,
        num_classes=num_classes,
        device=device,
        seed=seed,
    )

    with FrozenEncoder(backbone):
        encode = _frozen_encode(backbone, train_transform, aug_generator, run_device, amp)
        probe_feats, n_probe = _probe_features(
            backbone, eval_transform, train_images, run_device, amp
        )
        head = _standardising_head(
            probe_feats, n_probe, num_classes, device=run_device, generator=cpu_generator
        )
        # extract the test features while the encoder is still frozen
        metrics = train_and_test_head(
            encode,
            backbone,
            head,
            train_images,
            train_labels,
            test_images,
            test_labels,
            eval_transform=eval_transform,
            num_classes=num_classes,
            epochs=epochs,
            lr=lr,
            head_lr=None,
            weight_decay=weight_decay,
            nesterov=False,
            batch_size=batch_size,
            device=run_device,
            amp=amp,
            generator=cpu_generator,
            mode=FULL_MODE,
            progress_desc="linear probe",
            progress=progress,
        )
    if return_head:
        return metrics, fold_batchnorm_head(head)
    return metrics
