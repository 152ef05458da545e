"""Mixed precision: the autocast dtype a device computes in natively, and fp16's loss scaler.

bf16 autocast needs no loss scaling (it has fp32's exponent range), but only GPUs of compute
capability 8.0 and later (A100, H100, RTX 30xx/40xx, L4) compute in it; older ones (V100, T4,
RTX 20xx: the GPUs of many clouds and notebooks) only emulate it, far slower than fp16. fp16 has a
narrow range (max 65504, smallest normal 6e-5), so its gradients are computed on a scaled loss
and unscaled before the optimizer step (Micikevicius et al. 2018, "Mixed precision training",
sec. 3.2), with ``torch.amp.GradScaler``: a step whose gradients overflowed is skipped and the
scale halved; after ``growth_interval`` good steps it doubles.

``train.precision``: ``auto`` (bf16 where native, else fp16 on CUDA; fp32 on the CPU, where
autocast is slower than fp32), ``bf16``, ``fp16`` or ``fp32``.
"""

from __future__ import annotations

import contextlib
import sys

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_autocast_precision(device: torch.device) -> str:
    """``"bf16"`` on a CUDA GPU that computes in bf16 natively, ``"fp16"`` on older CUDA GPUs,
    ``"fp32"`` (no autocast) elsewhere."""
    if device.type != "cuda":
        return "fp32"
    if torch.version.hip:  # every ROCm GPU PyTorch supports computes in bf16
        return "bf16"
    # what torch.cuda.is_bf16_supported(including_emulation=False) checks, for this device
    major, _ = torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 else "fp16"


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` -> ``"bf16"``, ``"fp16"`` or ``"fp32"`` for ``device``.

    ``auto`` picks :func:`native_autocast_precision`. An explicit ``bf16`` on a CUDA GPU without
    native bf16 is honoured, with a warning that fp16 is faster there; so is an explicit
    ``bf16`` or ``fp16`` on the CPU, with a warning that fp32 is faster there.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return native_autocast_precision(device)
    if precision == "bf16" and native_autocast_precision(device) == "fp16":
        print(
            f"selfsup: warning: {torch.cuda.get_device_name(device)} only emulates bf16 "
            f"(slowly); train.precision=fp16 (or auto) is faster on it",
            file=sys.stderr,
        )
    if precision != "fp32" and device.type == "cpu":
        # most CPUs have no bf16 / fp16 arithmetic: autocast there converts, and computes slower
        print(
            f"selfsup: warning: train.precision={precision} on the CPU: autocast there is usually "
            f"many times slower than fp32 (CPUs without native {precision} arithmetic); "
            "train.precision=auto (fp32 on the CPU) is faster",
            file=sys.stderr,
        )
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to the dtype of a resolved ``precision``; a no-op for ``"fp32"``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """The loss scaler for a resolved ``precision``: active for fp16, a pass-through otherwise
    (``scale`` returns the loss unchanged, ``step`` calls ``optimizer.step()``, ``update`` and
    ``state_dict`` are empty)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
