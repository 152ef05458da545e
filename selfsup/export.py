"""Load a trained encoder anywhere, and export it as torchvision / safetensors / TorchScript.

``encoder.pt`` is a plain backbone ``state_dict`` (torchvision key names, no ``fc``). Its
architecture is read from the run's ``config.yaml`` when one is beside it, else inferred from the
tensors themselves (stem kernel size, block type, widths), so a bare file loads too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from selfsup.errors import CheckpointError, ConfigError
from selfsup.models import backbone_to_torchvision, build_backbone

EXPORT_FORMATS = ("torchvision", "safetensors", "torchscript")


def infer_architecture(state: dict[str, torch.Tensor]) -> tuple[str, bool]:
    """(backbone name, small_stem) of a ResNet ``state_dict`` written by selfsup."""
    if "conv1.weight" not in state:
        raise CheckpointError("not a ResNet encoder state_dict (no conv1.weight)")
    conv1 = state["conv1.weight"]
    small_stem = conv1.shape[-1] == 3
    if conv1.shape[0] == 16:
        return "resnet_tiny", small_stem
    return ("resnet50" if "layer1.0.conv3.weight" in state else "resnet18"), small_stem


def architecture_of(path: Path, state: dict[str, torch.Tensor]) -> tuple[str, bool]:
    config = path.parent / "config.yaml"
    if config.exists():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(config)
        if "model" in cfg and isinstance(cfg.model.get("backbone"), str):
            return cfg.model.backbone, bool(cfg.model.small_stem)
    return infer_architecture(state)


def _encoder_path(path: Path) -> Path:
    if path.is_dir():
        candidate = path / "encoder.pt"
        if not candidate.exists():
            raise CheckpointError(f"{path} has no encoder.pt: the run has not finished; "
                                  f"resume it with `selfsup pretrain --out {path} --resume`")
        return candidate
    if not path.exists():
        raise CheckpointError(f"encoder file {path} does not exist")
    return path


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """A ready backbone ``[B, 3, S, S] -> [B, D]`` in eval mode, from a run directory, an
    ``encoder.pt``, an exported ``.safetensors`` or a TorchScript file."""
    path = _encoder_path(Path(path))
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(path), device=str(map_location))
        name = meta.get("backbone") or infer_architecture(state)[0]
        small = meta["small_stem"] == "true" if "small_stem" in meta else infer_architecture(state)[1]
    else:
        try:
            loaded = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            try:  # a TorchScript archive
                return torch.jit.load(str(path), map_location=map_location).eval()
            except Exception:
                raise CheckpointError(f"{path} is neither an encoder state_dict nor TorchScript "
                                      f"({type(exc).__name__}: {exc})") from None
        state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} does not hold a state_dict")
        name, small = architecture_of(path, state)
    model, _ = build_backbone(name, small_stem=small)
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith("fc.")]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match a {name} encoder: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.to(map_location).eval()


def export_encoder(source: str | Path, fmt: str, out: str | Path | None = None,
                   image_size: int = 32) -> Path:
    """Write the encoder of a run (or an encoder file) in ``fmt``; returns the written path."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {list(EXPORT_FORMATS)}, got {fmt!r}")
    src = _encoder_path(Path(source))
    state = torch.load(src, map_location="cpu", weights_only=True)
    name, small = architecture_of(src, state)
    model = load_encoder(src)
    base = Path(out) if out else src.parent / "export"
    base.mkdir(parents=True, exist_ok=True)
    meta = {"backbone": name, "small_stem": "true" if small else "false"}
    if fmt == "torchvision":
        # a full torchvision model state_dict: fc is a fresh (random) classifier, documented
        tv = backbone_to_torchvision(name, small)
        tv.load_state_dict(model.state_dict(), strict=False)
        target = base / f"{name}_torchvision.pt"
        torch.save(tv.state_dict(), target)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        target = base / "encoder.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(target), metadata=meta)
    else:
        target = base / "encoder.torchscript.pt"
        example = torch.zeros(1, 3, image_size, image_size)
        scripted = torch.jit.trace(model, example)
        scripted.save(str(target))
    (base / "export.json").write_text(json.dumps({**meta, "format": fmt, "file": target.name}, indent=2))
    return target
