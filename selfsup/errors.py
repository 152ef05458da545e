"""User-facing errors. Each message names the file or setting at fault and what to do about it.

Also :class:`Terminated` and :func:`sigterm_as_interrupt`: SIGTERM raised as a Ctrl-C is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class SelfsupError(Exception):
    """Base class: the CLI prints these as one clear message and exits non-zero, no traceback."""


class ConfigError(SelfsupError):
    """A setting is unknown, of the wrong type or impossible."""


class DataError(SelfsupError):
    """A data source is missing, empty, unreadable or holds nothing usable."""


class CheckpointError(SelfsupError):
    """A checkpoint is missing, broken, or belongs to another config, method or version."""


class CollapseError(SelfsupError):
    """The collapse monitors saw a collapsed representation for several checks in a row."""


class NumericalError(SelfsupError):
    """A loss became NaN or Inf."""


class DeviceMemoryError(SelfsupError):
    """The device (GPU) ran out of memory."""


class OtherRankError(SelfsupError):
    """Under torchrun, another rank failed and says why itself: this one stops without a word."""


def memory_report(device) -> str:
    """``"NVIDIA ... (15.6 GiB; peak use 14.9 GiB)"`` for a CUDA device, ``"the CPU"`` else."""
    import torch

    device = torch.device(device)  # "cuda:1" as a string names that GPU too
    if device.type != "cuda" or not torch.cuda.is_available():
        return "the CPU"
    gib = 2**30
    total = torch.cuda.get_device_properties(device).total_memory / gib
    peak = torch.cuda.max_memory_allocated(device) / gib
    return f"{torch.cuda.get_device_name(device)} ({total:.1f} GiB; peak use {peak:.1f} GiB)"


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler), raised as a Ctrl-C is: the same clean-up (the run's
    lock, partial files, a decode's progress) and message, where SIGTERM would otherwise end the
    process at once. The command line exits with 143 for it (130 for a Ctrl-C)."""


@contextlib.contextmanager
def sigterm_as_interrupt(*, torchrun_workers: bool = True) -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` while the block runs. Only in the main thread, and
    only where SIGTERM has its default action: a handler of the caller's own (the trainer's, the
    launcher's, an outer block of this) is left in place, and the default is put back after.

    ``torchrun_workers=False``: not in a torchrun worker, where torchrun sends SIGTERM to tear a
    failed job down, and a worker blocked in a collective would only notice it when torchrun's
    SIGKILL comes, 30 s later (the command line; a decode saves its progress there too).
    """
    import signal
    import threading

    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        or (not torchrun_workers and "TORCHELASTIC_RUN_ID" in os.environ)
    ):
        yield
        return

    def terminate(signum, frame):  # noqa: ARG001
        raise Terminated(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
