"""User-facing errors. Each message names the file or setting at fault and what to do about it."""


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
