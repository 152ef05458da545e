"""Feature extraction with a frozen backbone.

Every evaluation protocol (kNN, linear probe, embedding export) starts from the same step: run the
encoder over a uint8 image tensor in batches, in eval mode, without gradients, and collect the
pooled features ``[N, D]`` on the CPU.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.errors import DataError
from selfsup.precision import autocast, native_autocast_precision

Transform = Callable[[Tensor], Tensor]


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); CPU for a module with neither."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def resolve_device(module: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device`` if given, else the device the module already lives on."""
    return torch.device(device) if device is not None else module_device(module)


def amp_precision(device: torch.device, enabled: bool = True) -> str:
    """The autocast precision evaluation uses: on CUDA the GPU's native one (bf16, or fp16 on GPUs
    without native bf16: :func:`selfsup.precision.native_autocast_precision`), else fp32."""
    return native_autocast_precision(device) if enabled else "fp32"


def autocast_context(
    device: torch.device, enabled: bool = True
) -> contextlib.AbstractContextManager:
    """Autocast on CUDA to :func:`amp_precision` (halves memory traffic, same accuracy for
    evaluation); a no-op on the CPU."""
    return autocast(amp_precision(device, enabled), device)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` and all its children in eval mode; restore each one's own flag afterwards.

    Restoring per submodule (not just ``module.train(was_training)``) matters for modules whose
    children were deliberately left in a different mode than their parent.
    """
    previous = {name: child.training for name, child in module.named_modules()}
    module.eval()
    try:
        yield module
    finally:
        for name, child in module.named_modules():
            if name in previous:
                child.training = previous[name]


def _move_transform(transform: Transform, device: torch.device) -> None:
    # EvalTransform and friends keep mean/std as buffers: they must live where the batch lives.
    if isinstance(transform, nn.Module):
        transform.to(device)


def extract_features(
    backbone: nn.Module,
    images: Tensor,
    transform: Transform,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    normalize: bool = False,
    amp: bool = True,
) -> Tensor:
    """Encode ``images`` with ``backbone`` in eval mode, without gradients.

    Args:
        backbone: encoder mapping ``[B, 3, S, S]`` float -> ``[B, D]``. It is switched to eval mode
            for the call (BatchNorm uses its running statistics and is never updated) and each
            submodule's previous train/eval flag is restored afterwards. If ``device`` is given the
            backbone is moved there in place, as ``nn.Module.to`` does.
        images: uint8 ``[N, 3, H, W]`` (any device; may be backed by a memmap). Batches are sliced
            and moved to ``device`` one at a time, so the whole set never has to fit there.
        transform: callable mapping a uint8 batch ``[B, 3, H, W]`` on ``device`` to a normalised
            float batch ``[B, 3, S, S]`` (the augment layer's ``EvalTransform``).
        batch_size: images per forward pass.
        device: where to run; defaults to the backbone's device.
        normalize: L2-normalise each feature vector (for cosine-similarity consumers).
        amp: autocast on CUDA (bf16, or fp16 where bf16 is not native); ignored on CPU.

    Returns:
        float32 ``[N, D]`` features on the CPU.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(
            f"extract_features expects images shaped [N, 3, H, W], got {tuple(images.shape)}; "
            "load data with selfsup.data.load_dataset, which stores RGB uint8 [N, 3, H, W]."
        )
    if images.shape[0] == 0:
        raise DataError("extract_features got an empty image tensor: the dataset holds no images.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    run_device = resolve_device(backbone, device)
    backbone.to(run_device)
    _move_transform(transform, run_device)
    chunks: list[Tensor] = []
    with eval_mode(backbone), torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(run_device, non_blocking=True)
            with autocast_context(run_device, amp):
                feats = backbone(transform(batch))
            feats = _pooled(feats, backbone).float().flatten(1)
            if normalize:
                feats = F.normalize(feats, dim=1)
            chunks.append(feats.cpu())
    return torch.cat(chunks)


def _pooled(feats: object, backbone: nn.Module) -> Tensor:
    """``feats`` when a backbone's output is one vector per image (``[B, D]``, or ``[B, D, 1,
    1]`` of a pooled map); a DataError for what the protocols cannot compare (a spatial map,
    a tuple): flattening a map would make kNN compare pixels' places, not images."""
    name = type(backbone).__name__
    if not isinstance(feats, Tensor):
        raise DataError(
            f"the encoder {name} returned a {type(feats).__name__}, not a features tensor "
            "[B, D]; return one tensor (e.g. the pooled features, not a tuple of outputs)"
        )
    if feats.dim() < 2 or any(n != 1 for n in feats.shape[2:]):
        raise DataError(
            f"the encoder {name} returned features shaped {tuple(feats.shape)}, not one vector "
            "per image [B, D]; pool its feature maps first (nn.AdaptiveAvgPool2d(1) and "
            "nn.Flatten() at its end)"
        )
    return feats


def accepts_generator(transform: Transform) -> bool:
    """Whether ``transform`` takes a ``generator`` keyword (the augment layer's seeded modules)."""
    target = transform.forward if isinstance(transform, nn.Module) else transform
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False
    return "generator" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )


def apply_transform(
    transform: Transform, images: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """``transform(images, generator=generator)`` when it accepts a generator, else plain call."""
    if generator is not None and accepts_generator(transform):
        return transform(images, generator=generator)
    return transform(images)
