"""selfsup: self-supervised visual representation learning (SimCLR, MoCo v2, BYOL, SimSiam)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

# the real function, not a wrapper, so that help() and IDEs show its arguments; selfsup.run
# imports no torch (a few ms)
from selfsup.run import pretrain

if TYPE_CHECKING:
    import torch

    from selfsup.export import Classifier

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "encoder_metadata",
    "load_classifier",
    "load_encoder",
    "prepare_images",
    "pretrain",
]


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """A ready encoder ``[B, 3, S, S] -> [B, D]`` in eval mode.

    ``path``: a run directory, an ``encoder.pt``, or a torchvision / safetensors / TorchScript
    export (:func:`selfsup.export.load_encoder`). Feed it images prepared as the run prepared
    them: :func:`prepare_images` does that (its settings: :func:`encoder_metadata`).
    """
    from selfsup.export import load_encoder as _load

    return _load(path, map_location=map_location)


def prepare_images(images: Any, encoder: str | Path) -> torch.Tensor:
    """``images`` (file paths, PIL images, uint8 arrays or tensors, of any size) as the encoder
    of run ``encoder`` sees them in ``selfsup embed``: float ``[B, 3, S, S]`` for
    ``load_encoder(encoder)`` (selfsup.export.prepare_images)."""
    from selfsup.export import prepare_images as _prepare

    return _prepare(images, encoder)


def encoder_metadata(path: str | Path) -> dict[str, Any]:
    """What is known of an encoder besides its weights: ``backbone``, ``small_stem``, ``mean``,
    ``std``, ``image_size``, ``method``, ... (each optional; selfsup.export.encoder_metadata)."""
    from selfsup.export import encoder_metadata as _metadata

    return _metadata(path)


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> Classifier:
    """A classifier saved by ``selfsup eval --save-classifiers`` (``path``: a
    ``classifiers/*.pt`` or the ``.json`` beside it), as a ``selfsup.export.Classifier``:
    ``model`` (eval mode, normalised ``[B, 3, S, S]`` -> logits ``[B, C]``), ``classes`` (in
    logit order), the preprocessing (``prepare(images)``: paths, PIL images or uint8 tensors of
    any size, as ``selfsup predict`` prepares them), ``predict(images)`` and ``metadata``."""
    from selfsup.export import load_classifier as _load

    return _load(path, map_location=map_location)
