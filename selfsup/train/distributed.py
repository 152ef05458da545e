"""Data-parallel pre-training on many GPUs / machines, launched with ``torchrun``.

``torchrun --nproc_per_node=N [--nnodes=M --rdzv-endpoint=HOST:PORT] -m selfsup pretrain ...``
starts one process per GPU; each reads torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` /
``MASTER_ADDR`` / ``MASTER_PORT`` in :func:`init_distributed` (NCCL on CUDA, gloo on CPU). Without
``WORLD_SIZE`` (a plain ``selfsup pretrain``) every helper here is a no-op, so the trainer has one
code path.

Semantics, chosen so that a run is the same run whatever the number of processes W:

- ``train.batch_size`` is the **global** batch. Each rank takes ``batch_size / W`` images per step
  (:func:`per_rank_batch_size`), a contiguous block of the single-process batch
  (:func:`shard_indices`), so global batch ``s`` of epoch ``e`` holds the same images in the same
  order for every W. Steps per epoch, the learning-rate schedule and the lr scaling therefore do
  not depend on W, and a checkpoint resumes on any W that divides the batch (only BatchNorm's
  per-GPU statistics and the augmentation random streams differ).
- Losses are per-rank means over the rank's samples; DDP averages gradients over ranks, which is
  the gradient of the global-batch mean. SimCLR gathers the views of all ranks with gradient
  (``losses.gather_with_grad``): the per-rank losses average to the single-process loss and DDP's
  averaged gradients equal the single-process gradients. MoCo gathers keys before the enqueue
  (``losses.concat_all_gather``), so every rank's queue is identical, and shuffles BN across ranks
  (``method.shuffle_bn``) unless SyncBN is used (:func:`convert_sync_batchnorm`).
- EMA targets (BYOL, MoCo) are updated from the DDP-synchronised online weights with the same
  tau on every rank, so they stay identical without communication; DDP registers only
  parameters with ``requires_grad`` (frozen targets are skipped): ``find_unused_parameters=False``.
- Rank 0 alone writes the run directory (:func:`save_on_main`, :func:`main_process_first`).

- [0] MoCo, 2019, https://arxiv.org/abs/1911.05722 (shuffling BN, sec. 3.3)
- [1] SimCLR, 2020, https://arxiv.org/abs/2002.05709 (global BN and all-gathered negatives, B.1)
- [2] Goyal et al., 2017, https://arxiv.org/abs/1706.02677 (data-parallel SGD equivalence)
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from selfsup.data.batches import BatchStream
from selfsup.errors import ConfigError, OtherRankError
from selfsup.evaluate.features import Transform, extract_features
from selfsup.evaluate.knn import knn_accuracy
from selfsup.losses import concat_all_gather, distributed_world, gather_with_grad

__all__ = [
    "DistEnv",
    "DistributedBatchStream",
    "all_ranks_true",
    "all_reduce_mean",
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_buffers",
    "cleanup",
    "concat_all_gather",
    "convert_sync_batchnorm",
    "distributed_extract_features",
    "distributed_knn",
    "gather_rows",
    "gather_with_grad",
    "gather_objects",
    "init_distributed",
    "is_main",
    "launch_local",
    "main_process_first",
    "per_rank_batch_size",
    "process_counts_dividing",
    "rank_seed",
    "rank_zero_value",
    "resume_command",
    "save_on_main",
    "shard_indices",
    "shard_range",
    "unwrap",
    "world_size_from_env",
    "wrap_ddp",
]

T = TypeVar("T")

# Rank 0 may build the data cache or run kNN while the others wait in a collective.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: global ``rank`` of ``world_size``, ``local_rank`` on
    its machine, and the ``device`` it computes on (``cuda:<local_rank>`` under NCCL)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device_pref: str) -> torch.device:
    """``train.device`` in one process: ``auto`` (a GPU if one is visible), ``cpu``, ``cuda:N``."""
    if device_pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_pref)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device={device_pref!r} but no CUDA GPU is visible; use train.device=cpu"
        )
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ConfigError(
                f"train.device={device_pref!r} but this machine shows {count} GPU"
                f"{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1}); pick one of those "
                "(CUDA_VISIBLE_DEVICES renumbers them from 0)"
            )
    return device


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ConfigError(f"WORLD_SIZE is set but {name} is not; launch with torchrun")
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device_pref: str = "auto") -> DistEnv:
    """Join torchrun's process group (idempotent) and pick this rank's device.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` (and, inside ``init_process_group``,
    ``MASTER_ADDR`` / ``MASTER_PORT``). ``device_pref`` is ``train.device``: ``auto`` or ``cuda``
    give rank r the GPU ``cuda:<LOCAL_RANK>`` and NCCL; ``cpu`` gives gloo. Without
    ``WORLD_SIZE`` (or with 1) nothing is initialised and the single-process env is returned.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistEnv(device=resolve_device(device_pref))
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", 0)
    use_cuda = device_pref != "cpu" and (device_pref != "auto" or torch.cuda.is_available())
    if use_cuda:
        if device_pref not in ("auto", "cuda"):
            raise ConfigError(
                f"train.device={device_pref!r} under torchrun: each process takes GPU "
                f"cuda:<LOCAL_RANK>; use train.device=cuda (or auto)"
            )
        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigError(
                f"train.device={device_pref} but no CUDA GPU is visible; use train.device=cpu "
                "(processes on the CPU talk over gloo)"
            )
        if local_rank >= count:
            error = ConfigError(
                f"LOCAL_RANK={local_rank} but only {count} CUDA GPU(s) are visible; lower "
                f"--nproc_per_node / --devices to at most {count}, or use train.device=cpu"
            )
            error.per_rank = True  # raised by some ranks only: each prints its own
            raise error
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # a torchrun worker: SIGTERM (checkpoint, stop) when torchrun's agent dies, rather than
        # training on, orphaned, with the run's lock held
        _die_with_parent()
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if use_cuda else {}
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT, **kwargs
        )
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def is_main() -> bool:
    """Whether this is rank 0 (always true in one process)."""
    return distributed_world()[0] == 0


def barrier() -> None:
    """Wait for all ranks; no-op in one process."""
    if distributed_world()[1] > 1:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (end of ``pretrain``); no-op in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device(t: Tensor) -> torch.device:
    """Where a collective on ``t`` must run: NCCL only takes CUDA tensors."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over ranks (a new float tensor on ``t``'s device), for logged metrics."""
    world = distributed_world()[1]
    if world == 1:
        return t
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    out = t.detach().to(_comm_device(t), dtype).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.div_(world).to(t.device)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over ranks (a new tensor on ``t``'s device), e.g. skipped-step counts."""
    if distributed_world()[1] == 1:
        return t
    out = t.detach().to(_comm_device(t)).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def all_ranks_true(flag: Tensor) -> Tensor:
    """Logical AND of a bool tensor over ranks, so a skip/stop decision is the same everywhere
    (e.g. ``train.on_nan=skip``: one rank skipping backward while another runs it hangs DDP)."""
    if distributed_world()[1] == 1:
        return flag
    value = flag.detach().to(_comm_device(flag), torch.int32).clone()
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value.to(flag.device).bool()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (host sync): agree on stopping (time limit, signal)."""
    if distributed_world()[1] == 1:
        return flag
    device = _comm_device(torch.empty(0))
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable: CPU tensors, numbers, dicts), in rank order; ``[obj]``
    in one process. For what differs per rank and a checkpoint must hold, such as each rank's
    random streams."""
    world = distributed_world()[1]
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def rank_zero_value(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable); ``value`` itself in one process."""
    if distributed_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Run ``fn`` (a checkpoint or file write) on rank 0 only, then wait for all ranks.

    Returns ``fn``'s result on rank 0 and ``None`` elsewhere. The barrier keeps other ranks from
    reading the file (resume, export) before it is complete; atomicity comes from ``fn`` itself
    (``checkpoint.save_checkpoint`` writes a temp file and renames it).
    """
    result, failure = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # a full disk: the other ranks must not wait for it forever
            failure = exc
    # the all-reduce is the barrier, and tells every rank whether rank 0's write failed
    if any_rank(failure is not None):
        if failure is not None:
            raise failure
        raise OtherRankError("rank 0 could not write its file; it says why")
    return result


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds the on-disk data cache), the others after it."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank, in place.

    DDP broadcasts buffers at the start of each forward, so after the last step the ranks' BN
    statistics differ by one local update; call this before evaluating on several ranks.
    """
    if distributed_world()[1] == 1:
        return
    for buffer in module.buffers():
        on_comm = buffer.data.to(_comm_device(buffer))
        dist.broadcast(on_comm, src=src)
        buffer.data.copy_(on_comm)


def convert_sync_batchnorm(model: nn.Module, enabled: bool, env: DistEnv) -> nn.Module:
    """Replace every BatchNorm by ``nn.SyncBatchNorm`` (statistics over the global batch).

    SimCLR's global BN [1], and the alternative to MoCo's shuffle-BN; BYOL/SimSiam option. EMA
    targets are converted too, so ``ema_update_`` still pairs their parameters and buffers. Call
    before building the optimizer and before :func:`wrap_ddp`. No-op when ``enabled`` is false
    or in one process. PyTorch's SyncBatchNorm runs on CUDA only.
    """
    if not enabled or not env.distributed:
        return model
    if env.device.type != "cuda":
        raise ConfigError(
            "train.sync_bn=true needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU kernel); "
            "set train.sync_bn=false (MoCo: method.shuffle_bn=true)"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap_ddp(method: nn.Module, env: DistEnv, *, sync_buffers: bool = True) -> nn.Module:
    """``DistributedDataParallel(method)`` for the training forward (``method`` in one process).

    Only parameters with ``requires_grad`` are registered with DDP's reducer, so the frozen EMA
    targets are neither all-reduced nor reported unused, and ``find_unused_parameters=False``
    (no extra graph traversal) is valid for all four methods. ``sync_buffers`` copies rank 0's
    buffers (BN statistics; MoCo's queue, already identical) at each forward so the checkpointed
    state is the state of every rank. Keep a reference to the returned module until after the
    backward (its reducer does the gradient all-reduce), and use the unwrapped ``method`` for
    ``update_target``, ``state_dict`` and evaluation.
    """
    if not env.distributed:
        return method
    if not any(p.requires_grad for p in method.parameters()):
        raise ValueError("wrap_ddp: the method has no trainable parameters")
    device_ids = [env.local_rank] if env.device.type == "cuda" else None
    # torch >= 2.14 renames broadcast_buffers (deprecated) to forward_sync_buffers.
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    buffers_kwarg = "forward_sync_buffers" if renamed else "broadcast_buffers"
    return DistributedDataParallel(
        method,
        device_ids=device_ids,
        find_unused_parameters=False,
        **{buffers_kwarg: sync_buffers},
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` (or the module itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def per_rank_batch_size(global_batch: int, world_size: int) -> int:
    """``train.batch_size`` (the global batch) split over ``world_size`` ranks."""
    if global_batch % world_size:
        # the process counts that fit too: a mid-epoch resume cannot change its batch size
        raise ConfigError(
            f"train.batch_size={global_batch} is the global batch and must divide evenly over "
            f"{world_size} processes; use a multiple of {world_size} "
            f"(e.g. {math.ceil(global_batch / world_size) * world_size}), or a number of "
            f"processes that divides {global_batch} "
            f"({process_counts_dividing(global_batch, world_size)})"
        )
    return global_batch // world_size


def process_counts_dividing(global_batch: int, world_size: int) -> str:
    """``"1, 2, 4, 8"``: the process counts up to ``4 * world_size`` that split
    ``global_batch`` evenly, for a message about a batch that ``world_size`` does not split."""
    most = min(global_batch, 4 * world_size)
    return ", ".join(str(n) for n in range(1, most + 1) if global_batch % n == 0)


def world_size_from_env() -> int:
    """torchrun's ``WORLD_SIZE`` (1 outside torchrun), readable before the process group is
    up; a ConfigError when it is not an integer."""
    return max(1, _env_int("WORLD_SIZE", 1))


#: set by ``--devices N``'s launcher in its workers, so that a hint to resume names it
DEVICES_ENV = "SELFSUP_DEVICES"


def resume_command(run_dir: Path | str) -> str:
    """The command that continues ``run_dir``, launched as this process was: ``--devices N``
    when selfsup's launcher started it, torchrun's own when torchrun did (pasting the plain
    command there would go on in one process)."""
    devices = os.environ.get(DEVICES_ENV)
    if devices:
        return f"selfsup pretrain --devices {devices} --out {run_dir} --resume"
    if world_size_from_env() > 1:
        return (
            f"torchrun <as before> -m selfsup pretrain --out {run_dir} --resume (the same "
            "torchrun options: the same number of processes continues it exactly)"
        )
    return f"selfsup pretrain --out {run_dir} --resume"


def rank_seed(seed: int, rank: int) -> int:
    """A seed for rank ``rank``'s augmentation generator, distinct per rank (rank 0: ``seed``)."""
    if rank == 0:
        return seed
    mixed = np.random.SeedSequence([seed % 2**64, rank]).generate_state(1, np.uint64)
    return int(mixed[0] % 2**63)


def shard_indices(order: Tensor, rank: int, world_size: int, batch_size: int) -> Tensor:
    """This rank's share of an epoch order: its ``batch_size`` block of every global batch.

    ``order`` [N] is the epoch's global permutation; global step s covers
    ``order[s * W * B : (s + 1) * W * B]`` (the single-process batch of size W*B) and rank r
    takes ``order[s * W * B + r * B : s * W * B + (r + 1) * B]``. The ranks' shares are
    disjoint, and gathering rank-major restores the global batch in order. The final
    ``N mod (W * B)`` items are dropped (drop_last), so every rank runs the same number of steps.

    Returns:
        int64 [steps * B] with steps = N // (W * B).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    steps = order.shape[0] // (world_size * batch_size)
    blocks = order[: steps * world_size * batch_size].view(steps, world_size, batch_size)
    return blocks[:, rank].reshape(-1)


class DistributedBatchStream(BatchStream):
    """:class:`BatchStream` that yields this rank's ``batch_size`` block of each global batch.

    ``batch_size`` is the per-rank batch B; the global batch is ``world_size * B``. The epoch
    permutation is the single-process one (same seed), split by :func:`shard_indices`, so all
    ranks agree on the order and on ``steps_per_epoch = N // (W * B)`` without communicating.
    ``set_epoch(epoch, start_step)`` resumes as in one process.
    """

    def __init__(
        self,
        images: Tensor,
        batch_size: int,
        *,
        rank: int,
        world_size: int,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("drop_last", True) is not True:
            raise ValueError("DistributedBatchStream always drops the last partial global batch")
        num_items = int(images.shape[0])
        if num_items < world_size * batch_size:
            raise ConfigError(
                f"the global batch ({world_size} processes x {batch_size} = "
                f"{world_size * batch_size}) is larger than the dataset ({num_items} images); "
                f"lower train.batch_size"
            )
        super().__init__(images, batch_size, drop_last=True, **kwargs)
        self.rank, self.world_size = rank, world_size

    @property
    def steps_per_epoch(self) -> int:
        return int(self.images.shape[0]) // (self.world_size * self.batch_size)

    def order(self) -> Tensor:
        return shard_indices(super().order(), self.rank, self.world_size, self.batch_size)


def shard_range(num_items: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous slice of ``num_items`` rows (sizes differ by at most 1)."""
    per_rank, extra = divmod(num_items, world_size)
    start = rank * per_rank + min(rank, extra)
    return slice(start, start + per_rank + (1 if rank < extra else 0))


def gather_rows(local: Tensor, num_items: int) -> Tensor:
    """Concatenate every rank's :func:`shard_range` rows of a ``num_items``-row tensor.

    ``local`` holds this rank's rows [n_r, ...]; shards of unequal size are padded for the
    all-gather and trimmed after. Returns [num_items, ...] on ``local``'s device, on every rank.
    """
    rank, world = distributed_world()
    if world == 1:
        return local
    sizes = [
        shard_range(num_items, r, world).stop - shard_range(num_items, r, world).start
        for r in range(world)
    ]
    if local.shape[0] != sizes[rank]:
        raise ValueError(f"rank {rank} holds {local.shape[0]} rows, its shard has {sizes[rank]}")
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = concat_all_gather(padded.to(_comm_device(padded)))
    gathered = gathered.view(world, max(sizes), *local.shape[1:])
    return torch.cat([gathered[r, : sizes[r]] for r in range(world)]).to(local.device)


def distributed_extract_features(
    backbone: nn.Module,
    images: Tensor,
    transform: Transform,
    *,
    batch_size: int,
    device: torch.device | str | None = None,
) -> Tensor:
    """``extract_features`` with each rank encoding its :func:`shard_range` of ``images``.

    Rank 0's BN statistics are broadcast first so every shard is encoded by the same network.
    Returns float32 [N, D] on the CPU, identical on every rank, rows in ``images``' order: the
    input of the kNN monitor and of the fast linear probe on cached features.
    """
    rank, world = distributed_world()
    if world == 1:
        return extract_features(backbone, images, transform, batch_size=batch_size, device=device)
    broadcast_buffers(backbone)
    num_items = int(images.shape[0])
    own = images[shard_range(num_items, rank, world)]
    if own.shape[0] > 0:
        feats = extract_features(backbone, own, transform, batch_size=batch_size, device=device)
    else:  # fewer images than ranks: learn D from one image, contribute no rows
        probe = extract_features(backbone, images[:1], transform, batch_size=1, device=device)
        feats = probe[:0]
    return gather_rows(feats, num_items).cpu()


def distributed_knn(
    backbone: nn.Module,
    bank_images: Tensor,
    bank_labels: Tensor,
    query_images: Tensor,
    query_labels: Tensor,
    transform: Transform,
    *,
    batch_size: int,
    device: torch.device | str | None = None,
    k: int = 200,
    temperature: float = 0.1,
) -> dict:
    """Weighted kNN accuracy with feature extraction split over ranks.

    Each rank encodes 1/W of the bank and of the queries, the features are all-gathered, and every
    rank computes the same ``knn_accuracy`` (labels need no gather: every rank holds the dataset).
    Returns ``{"top1", "top5"}``, identical on all ranks. Call it on every rank.
    """
    bank = distributed_extract_features(
        backbone, bank_images, transform, batch_size=batch_size, device=device
    )
    query = distributed_extract_features(
        backbone, query_images, transform, batch_size=batch_size, device=device
    )
    return knn_accuracy(
        bank, bank_labels, query, query_labels, k=k, temperature=temperature, device=device
    )


def strip_devices_flag(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--devices N`` / ``--devices=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--devices":
            skip = True
        elif not arg.startswith("--devices="):
            out.append(arg)
    return out


EXIT_STATUS_ENV = "SELFSUP_EXIT_STATUS_FILE"  # where rank 0 writes its exit status (launcher)


def _die_with_parent() -> None:
    """In the torchrun child: SIGTERM when the launcher dies (Linux ``PR_SET_PDEATHSIG``)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl: the signals above still reach it
        pass


def _torchrun_main() -> None:
    """``torchrun`` for :func:`launch_local`. When rank 0 reported its exit status it has said
    why the run ended (an error, a stop): torchrun's own log lines and its ``ChildFailedError``
    or ``SignalException`` traceback, which repeat that a worker exited non-zero, are held back.
    Without a status (a worker crashed) they are shown, as plain torchrun shows them."""
    import io
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    held = io.StringIO()
    handler = logging.StreamHandler(held)
    handler.setFormatter(logging.Formatter("%(levelname).1s %(name)s] %(message)s"))
    for name, log in list(logging.Logger.manager.loggerDict.items()):
        # torch.distributed and those of its loggers that have their own stderr handler
        if name.split(".")[:2] == ["torch", "distributed"] and isinstance(log, logging.Logger):
            if name == "torch.distributed" or log.handlers:
                log.handlers, log.propagate = [handler], False
    status = Path(os.environ[EXIT_STATUS_ENV])
    try:
        main()
    except (ChildFailedError, SignalException):
        if not status.exists():
            sys.stderr.write(held.getvalue())
            raise
        sys.exit(1)  # launch_local returns rank 0's status


def launch_local(nproc: int, argv: Sequence[str]) -> int:
    """``selfsup ... --devices N``: rerun this command under ``torchrun --standalone`` with N
    processes on this machine; returns rank 0's exit status (0 done, 2 error, 3 stopped with a
    checkpoint), or torchrun's when rank 0 did not report one (a crash).

    ``argv`` is the selfsup command line after the program name (``--devices`` is removed).
    SIGINT and SIGTERM sent to this launcher are passed on to torchrun, which passes them to the
    workers: they checkpoint and stop, as a single-process run does, instead of being orphaned;
    a SIGHUP (the terminal closed) is passed on as SIGTERM, and on Linux torchrun gets SIGTERM
    when the launcher dies of anything else (SIGKILL included).
    """
    import signal
    import tempfile

    if nproc < 1:
        raise ConfigError(f"--devices must be >= 1, got {nproc}")
    cmd = [
        sys.executable,
        "-c",
        "from selfsup.train.distributed import _torchrun_main; _torchrun_main()",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "selfsup",
        *strip_devices_flag(argv),
    ]
    with tempfile.TemporaryDirectory(prefix="selfsup-launch-") as tmp:
        status_file = Path(tmp) / "rank0_status"
        env = {**os.environ, EXIT_STATUS_ENV: str(status_file), DEVICES_ENV: str(nproc)}
        # its own session: a terminal's Ctrl-C reaches the workers once, through this launcher
        # (twice, the second would abort them before their checkpoint)
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)

        def forward(signum, frame):  # noqa: ARG001
            if proc.poll() is None:  # a hang-up (terminal closed) stops the job as Ctrl-C does
                proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

        forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.signal(sig, forward) for sig in forwarded}
        try:
            returncode = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        try:
            return int(status_file.read_text())
        except (OSError, ValueError):
            return returncode
