"""Stream shuffled uint8 image batches to a device, one epoch at a time.

Two strategies, picked automatically:

- **resident**: the whole uint8 ``[N, 3, H, W]`` array is moved to the device once (always on
  CPU; on CUDA when it fits in ``memory_fraction`` of the free device memory) and every batch is
  an ``index_select`` there: no host-device traffic per step.
- **streamed**: a background thread gathers each batch on the CPU into pinned memory and copies
  it with ``non_blocking=True``, staying ``prefetch`` batches ahead of the training loop. The
  gather overlaps the step; the copy is queued on the current stream, behind the step's kernels
  (a side stream would overlap it too; not done: CIFAR-sized caches are resident).

The order of epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)``, so
a resumed run reproduces it exactly; ``start_step`` skips the batches already done.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from selfsup.errors import ConfigError


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The int64 ``[num_items]`` permutation of epoch ``epoch`` for run seed ``seed``.

    The two numbers are mixed with ``numpy.random.SeedSequence`` (not added), so run seed 1 at
    epoch 0 and run seed 0 at epoch 1 do not share an order.
    """
    mixed = np.random.SeedSequence([seed % 2**64, epoch % 2**64]).generate_state(1, np.uint64)
    generator = torch.Generator().manual_seed(int(mixed[0]))
    return torch.randperm(num_items, generator=generator)


class BatchStream:
    """Yield ``(indices, batch)`` pairs for one epoch of a uint8 image tensor.

    Args:
        images: uint8 ``[N, 3, H, W]`` on CPU (may be memory-mapped).
        batch_size: images per batch ``B``.
        device: where batches are delivered.
        shuffle: draw a new permutation per epoch (``False``: ``0..N-1`` in order).
        seed: the run seed; epoch ``e`` uses :func:`epoch_permutation` ``(N, seed, e)``.
        drop_last: drop the final short batch (so every step sees ``B`` images).
        resident: force (``True``) or forbid (``False``) keeping the whole array on the device;
            ``None`` decides from free device memory.
        memory_fraction: the share of free CUDA memory the resident array may take.
        prefetch: batches the streaming thread prepares ahead.

    Iterating yields, per step, ``indices`` (int64 ``[B]`` on CPU, positions in ``images``) and
    ``batch`` (uint8 ``[B, 3, H, W]`` on ``device``).
    """

    def __init__(
        self,
        images: torch.Tensor,
        batch_size: int,
        *,
        device: str | torch.device = "cpu",
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        resident: bool | None = None,
        memory_fraction: float = 0.5,
        prefetch: int = 2,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            shape = tuple(images.shape)
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {shape}")
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        num_items = int(images.shape[0])
        if drop_last and num_items < batch_size:
            raise ConfigError(
                f"batch_size {batch_size} is larger than the dataset ({num_items} images) and "
                "drop_last is on, so an epoch would have no steps; lower batch_size"
            )
        self.images = images
        self.batch_size = batch_size
        self.device = _resolve_device(device)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.prefetch = max(1, prefetch)
        self.epoch = 0
        self.start_step = 0
        if resident is None:
            resident = _fits_on_device(images, self.device, memory_fraction)
        self.resident = resident
        self._on_device = images.to(self.device) if resident else None

    @property
    def steps_per_epoch(self) -> int:
        """Number of batches in a full epoch."""
        num_items = int(self.images.shape[0])
        if self.drop_last:
            return num_items // self.batch_size
        return math.ceil(num_items / self.batch_size)

    def __len__(self) -> int:
        """Batches the next iteration yields (``steps_per_epoch - start_step``)."""
        return max(0, self.steps_per_epoch - self.start_step)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch (hence the permutation) and the first step the next iteration yields.

        ``start_step`` lets a run resumed mid-epoch skip the steps it has already done.
        """
        if epoch < 0 or not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(
                f"need epoch >= 0 and 0 <= start_step <= {self.steps_per_epoch}, "
                f"got epoch={epoch}, start_step={start_step}"
            )
        self.epoch = epoch
        self.start_step = start_step

    def order(self) -> torch.Tensor:
        """int64 ``[N]``: the order of the current epoch."""
        num_items = int(self.images.shape[0])
        if not self.shuffle:
            return torch.arange(num_items)
        return epoch_permutation(num_items, self.seed, self.epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.order()
        steps = range(self.start_step, self.steps_per_epoch)
        batches = [order[s * self.batch_size : (s + 1) * self.batch_size] for s in steps]
        if self._on_device is not None:
            return self._resident_batches(order, batches)
        return self._streamed_batches(batches)

    def _resident_batches(
        self, order: torch.Tensor, batches: list[torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        assert self._on_device is not None
        if self.device.type == "cuda":  # from pinned memory the copy does not wait for the GPU
            order_on_device = order.pin_memory().to(self.device, non_blocking=True)
        else:
            order_on_device = order.to(self.device)
        for step, indices in enumerate(batches, start=self.start_step):
            start = step * self.batch_size
            device_indices = order_on_device[start : start + len(indices)]
            yield indices, self._on_device.index_select(0, device_indices)

    def _gather(self, indices: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return self.images.index_select(0, indices).to(self.device)
        shape = (len(indices), *self.images.shape[1:])
        host = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        torch.index_select(self.images, 0, indices, out=host)
        # The pinned block is not reused until this copy finishes: PyTorch's caching host
        # allocator records the copy's stream when ``host`` is freed.
        return host.to(self.device, non_blocking=True)

    def _streamed_batches(
        self, batches: list[torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ready: queue.Queue[object] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)
                for indices in batches:
                    if not put((indices, self._gather(indices))):
                        return
                put(_DONE)
            except BaseException as error:  # handed to the consumer, re-raised there
                put(_Failure(error))

        worker = threading.Thread(target=produce, name="selfsup-batch-prefetch", daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item  # type: ignore[misc]
        finally:
            stop.set()  # the consumer stopped early (break, exception) or finished
            worker.join()


def _resolve_device(device: str | torch.device) -> torch.device:
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        # Pin the index now: a worker thread's "current device" is not the caller's.
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def _fits_on_device(images: torch.Tensor, device: torch.device, memory_fraction: float) -> bool:
    if device.type != "cuda":
        return True  # CPU (and other backends without a free-memory query): index in place
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return images.numel() * images.element_size() <= memory_fraction * free_bytes
