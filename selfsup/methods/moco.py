"""MoCo v2: contrast queries against a momentum key encoder's keys and a queue of past keys.

- [0] MoCo, 2019, https://arxiv.org/abs/1911.05722
- [1] MoCo v2, 2020, https://arxiv.org/abs/2003.04297
- [2] MoCo v3, 2021, https://arxiv.org/abs/2104.02057 (symmetrised loss)
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import ConfigError
from selfsup.losses import concat_all_gather, distributed_world, info_nce_loss
from selfsup.methods.ema import EmaTarget, cosine_tau
from selfsup.methods.inputs import check_method_args, check_progress, check_views
from selfsup.models.heads import ProjectionHead
from selfsup.models.split_bn import convert_split_batchnorm


@torch.no_grad()
def batch_shuffle_ddp(x: Tensor) -> tuple[Tensor, Tensor]:
    """MoCo's shuffle-BN, step 1: a random permutation of the global batch, sharded over ranks.

    Gathers x [B, ...] from all W ranks, permutes the W*B rows with a permutation drawn on rank 0
    and broadcast, and returns this rank's B rows of the shuffled batch plus ``idx_unshuffle``
    [W*B] for :func:`batch_unshuffle_ddp`. The key encoder's BatchNorm then sees a different
    sub-batch than the query encoder's, so it cannot leak which key matches which query ([0] 3.3).
    Every rank must hold the same B.
    """
    rank, world = distributed_world()
    x_all = concat_all_gather(x)
    idx_shuffle = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(idx_shuffle, src=0)  # one permutation for all ranks
    idx_unshuffle = torch.argsort(idx_shuffle)
    own = idx_shuffle.view(world, -1)[rank]
    return x_all[own], idx_unshuffle


@torch.no_grad()
def batch_unshuffle_ddp(x: Tensor, idx_unshuffle: Tensor) -> Tensor:
    """MoCo's shuffle-BN, step 2: undo :func:`batch_shuffle_ddp`; x [B, ...] -> this rank's rows."""
    rank, world = distributed_world()
    x_all = concat_all_gather(x)
    return x_all[idx_unshuffle.view(world, -1)[rank]]


class MoCo(nn.Module):
    """MoCo v2 [1]: query encoder f_q + MLP projector, momentum key encoder f_k, queue of K keys.

    Loss: InfoNCE (MoCo eq. 1, T=0.2) of q = g_q(f_q(x1)) against its key k = g_k(f_k(x2)) and the
    queue. ``symmetric`` adds the loss of (q2, k1) and enqueues both key batches [2]. After the
    optimizer step, ``update_target`` moves the key encoder by theta_k <- m theta_k + (1 - m)
    theta_q (eq. 2), which equals the paper's update before computing the next keys, and pushes
    the training forward's keys onto the queue (FIFO ring buffer), as the paper's enqueue at the
    end of the step. Views go through each encoder separately. Under DDP the keys of all ranks
    are gathered (rank 0's first) before the enqueue, so every rank holds the same queue, and
    ``shuffle_bn`` runs the key encoder on a randomly permuted global batch ([0] sec. 3.3); in
    one process, ``bn_splits`` > 1 does the same with BatchNorm groups of the batch.

    With ``bn_splits`` > 1 (the default) the BatchNorm layers of ``backbone`` are replaced, in
    place, by :class:`~selfsup.models.SplitBatchNorm` layers (same parameters and names, so its
    ``state_dict`` loads into a plain model); in training mode they need batches divisible by the
    groups. ``selfsup.models.plain_batchnorm(moco.backbone)`` gives a copy with plain BatchNorm.

    Args:
        backbone: query encoder f_q, [B, 3, S, S] -> [B, feat_dim].
        feat_dim: D.
        proj_hidden: projector hidden width (default D: 2048 -> 2048 -> 128 for ResNet-50).
        proj_dim: key/query dim d (128).
        queue_size: K negatives (65536 on ImageNet; 4096 suits CIFAR-sized datasets).
        temperature: T (0.2).
        momentum: m (0.999 in the paper; 0.99 for short runs on small datasets).
        momentum_cosine: raise m to 1 with BYOL's cosine schedule over training.
        symmetric: loss(q1, k2) + loss(q2, k1).
        proj_batch_norm: BatchNorm in the projector's hidden layer (MoCo v3's head). MoCo v2's
            head has none; on small networks and short runs BN keeps the keys centred, which
            measured on the quickstart digits stops the slide of all keys onto one direction.
        shuffle_bn: shuffle the key encoder's batch so that its BatchNorm groups differ from the
            query encoder's ([0] sec. 3.3): across ranks under DDP, within the process when
            ``bn_splits`` gives it several groups. Not needed with SyncBatchNorm, and off (the
            attribute false) for a key encoder without BatchNorm, whose keys share no
            batch statistics.
        bn_splits: G, the number of groups the global batch is split into for BatchNorm, as G
            GPUs would each normalise their own B / G images (8 in the MoCo authors' one-GPU
            CIFAR-10 demo, matching the paper's 8 GPUs). Each of W processes uses G / W groups
            (at least 1), so the statistics do not depend on how many GPUs run the job. 1 is
            plain BatchNorm over the batch, where the current keys share batch statistics.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        proj_hidden: int | None = None,
        proj_dim: int = 128,
        queue_size: int = 4096,
        temperature: float = 0.2,
        momentum: float = 0.99,
        momentum_cosine: bool = False,
        symmetric: bool = False,
        shuffle_bn: bool = True,
        proj_batch_norm: bool = False,
        bn_splits: int = 8,
    ) -> None:
        super().__init__()
        check_method_args(
            "moco", backbone, feat_dim, proj_hidden=proj_hidden, proj_dim=proj_dim,
            temperature=temperature, momentum=momentum,
        )  # fmt: skip
        if queue_size < 1:
            raise ConfigError(f"MoCo `method.queue_size` must be >= 1, got {queue_size}.")
        if bn_splits < 1:
            raise ConfigError(f"MoCo `method.bn_splits` must be >= 1, got {bn_splits}.")
        # Before the key encoder is copied from it, so both normalise in the same groups.
        rank, world = distributed_world()
        self.local_bn_splits = max(1, bn_splits // world)
        if bn_splits % world and rank == 0:
            warnings.warn(
                f"MoCo method.bn_splits={bn_splits} does not split over {world} processes: "
                f"{self.local_bn_splits} BatchNorm group(s) per process, "
                f"{self.local_bn_splits * world} in all",
                stacklevel=2,
            )
        self.backbone = convert_split_batchnorm(backbone, self.local_bn_splits)
        self.projector = convert_split_batchnorm(
            ProjectionHead(feat_dim, proj_hidden or feat_dim, proj_dim, batch_norm=proj_batch_norm),
            self.local_bn_splits,
        )
        self.key_backbone = EmaTarget(backbone)
        self.key_projector = EmaTarget(self.projector)
        self.temperature, self.symmetric = temperature, symmetric
        # without BatchNorm (ConvNeXt, ViT, Swin; GroupNorm, LayerNorm) no key sees another's
        # statistics: nothing to shuffle, and under DDP no images to gather for it
        self.shuffle_bn = shuffle_bn and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            for m in (*self.backbone.modules(), *self.projector.modules())
        )
        self.momentum, self.momentum_cosine = momentum, momentum_cosine
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending_keys: Tensor | None = None  # this step's keys, enqueued by update_target
        self._forwards_pending = 1  # training forwards whose keys wait for update_target
        self._warned_no_update = False

    def _keys(self, x: Tensor) -> Tensor:
        world = distributed_world()[1]
        if self.shuffle_bn and self.training and world > 1:
            x, idx_unshuffle = batch_shuffle_ddp(x)
            return batch_unshuffle_ddp(self._encode_keys(x), idx_unshuffle)
        if self.shuffle_bn and self.training and self.local_bn_splits > 1:
            # one process: a random permutation puts each key in another BN group than its query
            idx_shuffle = torch.randperm(x.shape[0], device=x.device)
            return self._encode_keys(x[idx_shuffle])[torch.argsort(idx_shuffle)]
        return self._encode_keys(x)

    def _encode_keys(self, x: Tensor) -> Tensor:
        return F.normalize(self.key_projector(self.key_backbone(x)), dim=1)

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        """FIFO ring buffer: write keys [B, d] at the pointer, wrapping past the end.

        One ``index_copy_`` at slots (ptr + i) % K does the two-part write of a wrap-around
        without reading the pointer on the host.
        """
        size, n = self.queue.shape[0], min(keys.shape[0], self.queue.shape[0])
        # Only the newest K keys survive a batch larger than the queue.
        start = self.queue_ptr + (keys.shape[0] - n)
        slots = (start + torch.arange(n, device=keys.device)) % size
        self.queue.index_copy_(0, slots, keys[-n:].to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def forward(self, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
        """Views x1, x2: [B, 3, S, S] -> {"loss", "z": q1, "z2": q2 or k2 [B, d], "h": [B, D] of
        view 1, "pos_cos": mean q1.k2, and when symmetric "online_target_cos": mean q1.k1}."""
        check_views("moco", x1, x2)
        queue = self.queue
        h1 = self.backbone(x1)
        q1 = self.projector(h1)
        k2 = self._keys(x2)
        loss = info_nce_loss(q1, k2, queue, self.temperature)
        keys = [k2]
        if self.symmetric:
            q2 = self.projector(self.backbone(x2))
            k1 = self._keys(x1)
            loss = loss + info_nce_loss(q2, k1, queue, self.temperature)
            keys.append(k1)
        if self.training:  # evaluation must not change the queue
            # All ranks' keys, per view, so every rank's queue equals the single-process one.
            # They are enqueued by update_target, after the backward, which needs the queue as it
            # was: an in-place write here, inside a torch.compile'd forward, gave wrong gradients
            # (tests/test_methods.py::test_compiled_moco_split_bn_step_matches_eager).
            new_keys = torch.cat([concat_all_gather(k) for k in keys])
            if not torch.compiler.is_compiling() and self._pending_keys is not None:
                new_keys = self._keys_since_update(new_keys)
            self._pending_keys = new_keys
        q1n = F.normalize(q1.detach(), dim=1)
        pos_cos = (q1n * k2).sum(dim=1).mean()
        # The monitors' alignment compares z with view 2's embedding: the query encoder's when
        # the loss computed it (symmetric), else the key encoder's, its momentum copy.
        z2 = q2.detach() if self.symmetric else k2
        out = {"loss": loss, "z": q1.detach(), "z2": z2, "h": h1.detach(), "pos_cos": pos_cos}
        if self.symmetric:  # the key of view 1 exists: query vs key encoder on the same view
            out["online_target_cos"] = (q1n * k1).sum(dim=1).mean()
        return out

    def _keys_since_update(self, new_keys: Tensor) -> Tensor:
        """The keys of every training forward since the last ``update_target`` (gradient
        accumulation: all micro-batches' keys are enqueued), the newest K; a warning, once, when
        over 8 forwards' keys fill the queue: ``update_target`` is not being called."""
        pending = self._pending_keys
        size = self.queue.shape[0]
        self._forwards_pending += 1
        # more keys than the queue holds, over 8 forwards: no accumulation of micro-batches
        if pending.shape[0] >= size and self._forwards_pending > 8 and not self._warned_no_update:
            self._warned_no_update = True
            warnings.warn(
                f"MoCo: {self._forwards_pending} training forwards since the last "
                f"update_target, their keys more than the queue holds ({size}): the queue and "
                "the key encoder are not being updated. Call method.update_target(progress) "
                "after each optimizer step.",
                stacklevel=3,
            )
        return torch.cat([pending, new_keys])[-size:]

    def discard_last_forward(self) -> None:
        """Forget the keys that wait for ``update_target``: a step skipped (a non-finite loss)
        must not enqueue its keys with the next one's."""
        self._pending_keys = None
        self._forwards_pending = 1

    def target_momentum(self, progress: float) -> float:
        """The key encoder's momentum m at ``progress`` in [0, 1] (cosine to 1 if configured)."""
        check_progress("moco", progress)
        return cosine_tau(self.momentum, progress) if self.momentum_cosine else self.momentum

    def update_target(self, progress: float) -> None:
        """After the optimizer step: momentum update of the key encoder and key projector (MoCo
        eq. 2), and the last training forward's keys pushed onto the queue."""
        m = self.target_momentum(progress)
        self.key_backbone.update_(self.backbone, m)
        self.key_projector.update_(self.projector, m)
        keys, self._pending_keys = self._pending_keys, None
        self._forwards_pending = 1
        if keys is not None:
            self._enqueue(keys)

    def param_groups(self) -> list[dict]:
        """One optimizer group: the query encoder and projector; the key encoder is a momentum
        copy without gradients."""
        return [{"name": "online", "params": [p for p in self.parameters() if p.requires_grad]}]
