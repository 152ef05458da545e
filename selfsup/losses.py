"""The self-supervised objectives, as pure functions of embeddings.

Every function normalises its inputs itself (so callers pass raw projector / predictor outputs),
computes in at least float32 with autocast disabled (bf16 logits are too coarse for a softmax at
T = 0.1) and returns a scalar mean over the batch.

- [0] SimCLR, 2020, https://arxiv.org/abs/2002.05709
- [1] MoCo, 2019, https://arxiv.org/abs/1911.05722 and MoCo v2, 2020, https://arxiv.org/abs/2003.04297
- [2] BYOL, 2020, https://arxiv.org/abs/2006.07733
- [3] SimSiam, 2020, https://arxiv.org/abs/2011.10566
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "byol_loss",
    "concat_all_gather",
    "distributed_world",
    "gather_with_grad",
    "info_nce_loss",
    "negative_cosine_similarity",
    "nt_xent_loss",
]


def _full_precision(loss_fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Run ``loss_fn`` outside autocast, with fp16/bf16 tensor arguments cast to float32."""

    def full(a: object) -> object:
        low = isinstance(a, Tensor) and a.dtype in (torch.float16, torch.bfloat16)
        return a.float() if low else a

    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs) -> Tensor:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        if not tensors:
            raise TypeError(f"{loss_fn.__name__} takes tensors; got none")
        args = tuple(full(a) for a in args)
        kwargs = {key: full(a) for key, a in kwargs.items()}
        with torch.autocast(tensors[0].device.type, enabled=False):
            return loss_fn(*args, **kwargs)

    return wrapper


def _check_pair(fn: str, a: str, x: Tensor, b: str, y: Tensor, min_rows: int = 1) -> None:
    """Both ``[N, d]`` with the same shape and ``N >= min_rows``: broadcasting a [1, d] or [d]
    against [N, d], or taking the cosine over the batch axis of a 3-D input, would be silently
    wrong."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        kinds = f"{type(x).__name__} and {type(y).__name__}"
        raise TypeError(f"{fn}: {a} and {b} must be torch tensors [N, d]; got {kinds}")
    if not x.is_floating_point() or not y.is_floating_point():
        raise TypeError(f"{fn}: {a} and {b} must be float embeddings; got {x.dtype} and {y.dtype}")
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(
            f"{fn}: {a} and {b} must both be [N, d]; got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] < min_rows:
        need = "N >= 2 (a batch of one image has no negatives)" if min_rows == 2 else "N >= 1"
        raise ValueError(f"{fn}: {a} and {b} hold {x.shape[0]} rows; the loss needs {need}")


def _check_temperature(fn: str, temperature: float) -> None:
    if not temperature > 0:  # also refuses NaN
        raise ValueError(f"{fn}: the temperature must be > 0; got {temperature}")


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """SimCLR's / lightly's ``GatherLayer``: all-gather forward; backward all-reduces (sums) the
    gradient of the gathered tensor over ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # noqa: ANN001
        t = t.contiguous()
        out = t.new_empty((dist.get_world_size() * t.shape[0], *t.shape[1:]))
        # torch >= 2.14 renames all_gather_into_tensor (deprecated) to all_gather_single.
        gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather_into(out, t)
        ctx.rows = t.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(t: Tensor) -> Tensor:
    """All-gather ``t`` [B, ...] from every rank into [world * B, ...] (rank-major), differentiable.

    Rank r's rows get, in the backward, the gradient summed over all ranks, i.e. each rank holds
    the gradient of ``sum_r loss_r`` with respect to its own inputs. Every rank must hold the same
    B. Identity when not distributed.
    """
    if distributed_world()[1] == 1:
        return t
    return _GatherWithGrad.apply(t)


@torch.no_grad()
def concat_all_gather(t: Tensor) -> Tensor:
    """All-gather ``t`` [B, ...] into [world * B, ...] (rank 0's rows first), without gradient.

    MoCo's ``concat_all_gather`` (keys before the enqueue). Identity when not distributed.
    """
    world = distributed_world()[1]
    if world == 1:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return torch.cat(parts)


@_full_precision
def nt_xent_loss(
    z1: Tensor, z2: Tensor, temperature: float = 0.5, gather_distributed: bool = False
) -> Tensor:
    """NT-Xent, the normalized temperature-scaled cross entropy of SimCLR [0], eq. 1.

    The 2N views are stacked as ``z = [z1; z2]``. For anchor ``i`` the positive is the other view
    of the same image and the negatives are the 2(N-1) views of the other images; the anchor's
    similarity with itself is excluded from the denominator (the ``1[k != i]`` of eq. 1):

        l(i, j) = -log( exp(sim(z_i, z_j) / T) / sum_{k != i} exp(sim(z_i, z_k) / T) )

    and the loss is the mean of l over all 2N anchors (both orderings of every pair).
    Computed as one [2N, 2N] matmul and a cross entropy with the diagonal masked out.

    With ``gather_distributed`` and W > 1 processes each holding N pairs, the candidates are the
    2WN views of the global batch, gathered with gradient (:func:`gather_with_grad`), so each
    anchor sees 2(WN - 1) negatives; this rank's 2N anchors sit at columns ``rank * N + i`` (view 1)
    and ``WN + rank * N + i`` (view 2). The mean over ranks of the returned per-rank losses equals
    the single-process loss on the WN-pair batch, and after DDP averages the gradients across
    ranks they equal the single-process gradients (the gather's backward sums over ranks, so each
    rank holds W times its share and DDP's 1/W undoes it). Call it on every rank, every step.

    Args:
        z1: [N, d] projections of the first views.
        z2: [N, d] projections of the second views (row i is the positive of ``z1[i]``).
        temperature: T > 0.
        gather_distributed: contrast against the views of all ranks (no-op in one process).

    Returns:
        Scalar loss, the mean over this rank's 2N anchors.
    """
    rank, world = distributed_world() if gather_distributed else (0, 1)
    # one pair per rank still has negatives on the other ranks
    _check_pair("nt_xent_loss", "z1", z1, "z2", z2, min_rows=2 if world == 1 else 1)
    _check_temperature("nt_xent_loss", temperature)
    n = z1.shape[0]
    anchors = F.normalize(torch.cat([z1, z2]), dim=1)  # [2N, d] this rank's views
    if world == 1:
        candidates = anchors
    else:  # [2WN, d]: all view-1 rows (rank-major), then all view-2 rows
        candidates = F.normalize(torch.cat([gather_with_grad(z1), gather_with_grad(z2)]), dim=1)
    logits = anchors @ candidates.T / temperature  # [2N, 2WN] cosine similarities / T
    own = torch.arange(n, device=z1.device) + rank * n  # this rank's rows among the WN pairs
    self_cols = torch.cat([own, own + world * n])
    logits = logits.scatter(1, self_cols[:, None], float("-inf"))  # k != i
    # The positive of a view-1 anchor is its view 2 and vice versa.
    targets = torch.cat([own + world * n, own])
    return F.cross_entropy(logits, targets)


@_full_precision
def info_nce_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """InfoNCE with a queue of negatives, MoCo [1] eq. 1.

        L_q = -log( exp(q.k+ / T) / (exp(q.k+ / T) + sum_{k- in queue} exp(q.k- / T)) )

    Implemented as logits ``[q.k+, q.queue^T] / T`` of shape [N, 1 + K] and a cross entropy with
    label 0. Keys and queue carry no gradient: the key encoder is a momentum copy.

    Args:
        q: [N, d] queries (normalised here).
        k: [N, d] keys, row i the positive of ``q[i]`` (normalised here, detached).
        queue: [K, d] negative keys (normalised here too, detached; MoCo's queue holds normalised
            keys already, and normalising them again costs one pass over K x d).
        temperature: T > 0 (0.2 in MoCo v2).

    Returns:
        Scalar loss, mean over the N queries.
    """
    _check_pair("info_nce_loss", "q", q, "k", k)
    if queue.dim() != 2 or queue.shape[1] != q.shape[1] or queue.shape[0] < 1:
        raise ValueError(
            f"info_nce_loss: queue must be [K, d] with K >= 1 negatives and the d of q "
            f"({q.shape[1]}); got {tuple(queue.shape)} (no negatives: the loss would be 0)"
        )
    _check_temperature("info_nce_loss", temperature)
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)  # [N, 1]
    negatives = q @ F.normalize(queue.detach().to(q.dtype), dim=1).T  # [N, K]
    logits = torch.cat([positive, negatives], dim=1) / temperature
    targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, targets)


@_full_precision
def negative_cosine_similarity(p: Tensor, z: Tensor, stop_gradient: bool = True) -> Tensor:
    """SimSiam's D(p, z) = -(p / ||p||) . (z / ||z||), eq. 1, with the stop-gradient of eq. 3.

    Args:
        p: [N, d] predictor outputs of one view.
        z: [N, d] projector outputs of the other view; detached unless ``stop_gradient=False``
            (the SimSiam ablation that collapses).
        stop_gradient: treat ``z`` as a constant.

    Returns:
        Scalar, mean of -cos(p_i, z_i) over the batch, in [-1, 1].
    """
    _check_pair("negative_cosine_similarity", "p", p, "z", z)
    if stop_gradient:
        z = z.detach()
    return -F.cosine_similarity(p, z, dim=1).mean()


@_full_precision
def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's regression loss, eq. 2: ||p/||p|| - z/||z||||^2 = 2 - 2 cos(p, z).

    Args:
        p: [N, d] online predictions q_theta(z_theta) of one view.
        z: [N, d] target projections z'_xi of the other view (detached: the target network
            receives no gradient).

    Returns:
        Scalar, mean over the batch, in [0, 4].
    """
    _check_pair("byol_loss", "p", p, "z", z)
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()
