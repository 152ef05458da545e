"""selfsup: self-supervised visual representation learning (SimCLR, MoCo v2, BYOL, SimSiam)."""

__version__ = "0.1.0"

__all__ = ["__version__", "load_encoder"]


def load_encoder(path, map_location="cpu"):
    """A ready ``torch.nn.Module`` from a run directory, an ``encoder.pt`` or an exported file."""
    from selfsup.export import load_encoder as _load

    return _load(path, map_location=map_location)
