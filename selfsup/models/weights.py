"""Encoder weights from files, and the starting weights of a run (``model.init``).

A weights file is a backbone ``state_dict`` in torchvision's key names: a run's ``encoder.pt``
(no ``fc``), a ``selfsup export`` (torchvision with a random ``fc``, safetensors or TorchScript),
or any torchvision ResNet checkpoint such as the ImageNet weights torchvision downloads.
``model.init`` starts pre-training from one of them instead of a random initialisation: domain
adaptation of ImageNet weights, or more pre-training of an earlier run on new images.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from selfsup.errors import CheckpointError, ConfigError

EXPORT_INFO = "export.json"  # written beside exported files: backbone, small_stem, mean, std, size
IMAGENET = "imagenet"  # model.init: torchvision's ImageNet weights of model.backbone
# the normalisation of torchvision's ImageNet weights (their transforms()): a run started from
# them normalises with it unless data.mean / data.std say otherwise
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding ``constants.pkl`` and code)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _training_pid(run: Path) -> str | None:
    """The pid that run directory ``run``'s lock file names (``.selfsup.lock``, written by
    ``train.run_dir.lock_run_dir``) while its ``flock`` is held: a pretrain still training it.
    A killed run's file stays, unlocked, naming a pid that may be another process's by now."""
    import fcntl

    try:
        with open(run / ".selfsup.lock") as handle:
            try:  # shared and at once: a test, released on close
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                found = re.fullmatch(r"pid (\d+)\s*", handle.read())
                return found.group(1) if found else "unknown"
    except (OSError, UnicodeDecodeError):  # no file; a filesystem without locks
        return None
    return None


def encoder_file(path: Path) -> Path:
    """The weights file of a run directory (its encoder.pt) or the file itself; a clear error if
    there is none."""
    if path.is_dir():
        candidate = path / "encoder.pt"
        if not candidate.exists() and (path / EXPORT_INFO).exists():
            exported = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".safetensors"))
            raise CheckpointError(
                f"{path} is a folder of `selfsup export` files; pass one of them: "
                f"{', '.join(str(path / name) for name in exported) or '(none left)'}"
            )
        if not candidate.exists() and not (
            (path / "config.yaml").exists() or (path / "checkpoints").is_dir()
        ):  # resuming is advice for a started run only, not for any other folder
            raise CheckpointError(
                f"{path} is not a run directory (no config.yaml, checkpoints/ or encoder.pt); "
                "pass the --out folder of a `selfsup pretrain` run, an encoder.pt, or a file "
                "written by `selfsup export`"
            )
        if not candidate.exists():
            training = _training_pid(path)
            raise CheckpointError(
                f"{path} has no encoder.pt yet: a selfsup pretrain (pid {training}) is still "
                "training it; use it once that run ends"
                if training is not None
                else f"{path} has no encoder.pt: the run has not finished; "
                f"resume it with `selfsup pretrain --out {path} --resume`"
            )
        return candidate
    if not path.exists():
        raise CheckpointError(
            f"encoder file {path} does not exist; pass a run directory, an "
            f"encoder.pt, or a file written by `selfsup export`"
        )
    if path.suffix == ".onnx":  # a graph for ONNX Runtime: no module for torch to rebuild
        raise CheckpointError(
            f"{path} is an ONNX export, for ONNX Runtime; pass its run directory, its "
            "encoder.pt or another export (safetensors, torchscript, torchvision)"
        )
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict (``torch.save``), safetensors or TorchScript file, on the CPU.

    Never unpickles Python objects (``weights_only=True``); a file that is none of these is a
    :class:`CheckpointError` saying what to pass instead.
    """
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    try:
        if is_torchscript(path):
            with warnings.catch_warnings():  # deprecated in torch >= 2.9, still the way to load
                warnings.simplefilter("ignore", FutureWarning)
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:  # the file is there (encoder_file) but cannot be read
        raise CheckpointError(f"cannot read {path} ({exc.strerror or exc})") from None
    except Exception as exc:
        # torch's own text advises weights_only=False: unsafe for a file of unknown origin,
        # and meaningless for a JPEG or YAML; so say what the file is not, and what to pass
        raise CheckpointError(_not_a_checkpoint(path, exc)) from None
    if isinstance(loaded, dict) and "selfsup_version" in loaded:  # checkpoints/last.pt
        raise CheckpointError(
            f"{path} is a selfsup training checkpoint, not an encoder; pass the run's "
            "encoder.pt (or the run directory)"
        )
    state = loaded
    for wrapper in ("state_dict", "model"):  # {"state_dict": ...}, {"model": ...}: common layouts
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path} does not hold an encoder state_dict; pass encoder.pt "
            f"(a training checkpoint is in checkpoints/, not an encoder)"
        )
    return state


def _not_a_checkpoint(path: Path, exc: Exception) -> str:
    """The message for a file ``torch.load(weights_only=True)`` refused with ``exc``."""
    accepted = (
        "pass a run directory, its encoder.pt, or a file written by `selfsup export` "
        "(torchvision, safetensors or TorchScript)"
    )
    pickled = zipfile.is_zipfile(path) and isinstance(exc, pickle.UnpicklingError)
    if pickled and str(exc).startswith("Weights only load failed"):
        # torch's own zip format holding more than tensors: a whole pickled model, say
        return (
            f"{path} is a PyTorch file holding Python objects besides tensors (a whole pickled "
            "model?), which selfsup does not unpickle; save its model.state_dict() instead, or "
            + accepted
        )
    return f"{path} is not a PyTorch state_dict, safetensors or TorchScript file; " + accepted


def _imagenet_state(backbone: str) -> dict[str, torch.Tensor]:
    """torchvision's default ImageNet weights of ``backbone``, downloaded once into torch's hub
    cache (``$TORCH_HOME/hub/checkpoints``); offline, a clear error naming the file to fetch."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(backbone).DEFAULT
    except ValueError:  # resnet_tiny: selfsup's own, no published weights
        raise ConfigError(
            f"model.init=imagenet: torchvision has no ImageNet weights for "
            f"model.backbone={backbone}; choose a torchvision ResNet (resnet18, resnet50, ...) "
            "or pass model.init=PATH (a run directory or a weights file)"
        ) from None
    name = weights.url.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    was_cached = cached.is_file()
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError offline, a proxy's error page, a truncated file
        if was_cached:
            raise ConfigError(
                f"model.init=imagenet: the cached {cached} does not load "
                f"({type(exc).__name__}: {exc}); it is damaged or incomplete: delete it and "
                "run again (it is downloaded anew)"
            ) from None
        raise ConfigError(
            f"model.init=imagenet: could not download torchvision's {weights} weights for "
            f"{backbone} from {weights.url} ({type(exc).__name__}: {exc}); with no network, "
            f"fetch that file elsewhere and put it in {cached} (model.init=imagenet then reads "
            f"it), or pass model.init=PATH/{name} data.mean=[{','.join(map(str, IMAGENET_MEAN))}] "
            f"data.std=[{','.join(map(str, IMAGENET_STD))}]"
        ) from None


def _strip_prefix(
    state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]
) -> tuple[dict[str, torch.Tensor], str]:
    """``state``'s tensors under the prefix that holds every expected key (``module.`` of a
    DistributedDataParallel, ``backbone.`` or ``encoder.`` of a whole SSL model), and that
    prefix; ``state`` itself and "" when its keys are the backbone's already."""
    needed = [k for k in expected if not k.endswith("num_batches_tracked")]
    if not needed or all(k in state for k in needed):
        return state, ""
    first = needed[0]  # conv1.weight: a prefix is whatever stands before it
    prefixes = sorted({k[: -len(first)] for k in state if k.endswith("." + first)}, key=len)
    for prefix in prefixes:
        inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if all(k in inner for k in needed):
            return inner, prefix
    return state, ""


def _resized_position_embeddings(
    state: dict[str, torch.Tensor],
    own: dict[str, torch.Tensor],
    arch: str,
    origin: str,
    where: str,
    notes: list[str] | None,
) -> dict[str, torch.Tensor]:
    """A ViT ``state`` whose position embeddings are for another input size than the backbone's
    (``own``, its state_dict): those resized to the backbone's patch grid with torchvision's
    ``interpolate_embeddings`` (bicubic, the class token kept), as for fine-tuning a ViT at
    another resolution; ``state`` itself when the sizes agree or the tensors are not a ViT's."""
    from selfsup.models.backbones import state_image_size

    size, theirs = state_image_size(arch, own), state_image_size(arch, state)
    if size is None or theirs is None or size == theirs:
        return state
    key = "encoder.pos_embedding"
    if state[key].shape[0] != 1 or state[key].shape[2] != own[key].shape[2]:
        return state  # another width: init_state names the mismatch
    from torchvision.models.vision_transformer import interpolate_embeddings

    patch = int(own["conv_proj.weight"].shape[-1])
    resized = interpolate_embeddings(size, patch, dict(state))
    if notes is not None:
        old, new = theirs // int(state["conv_proj.weight"].shape[-1]), size // patch
        notes.append(
            f"{where}: the position embeddings of {origin} ({old}x{old} patches, {theirs} px) "
            f"resized to {new}x{new} ({size} px images) with torchvision's "
            "interpolate_embeddings (bicubic)"
        )
    return resized


def init_state(
    source: str,
    backbone: nn.Module,
    arch: str,
    *,
    where: str = "model.init",
    notes: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The state_dict to start ``backbone`` (built as ``arch``, its ``model.backbone``) from.

    ``source``: ``imagenet`` (torchvision's weights of ``arch``), a run directory (its
    ``encoder.pt``) or a weights file (see :func:`read_state_dict`). Keys under one prefix
    (``module.``, ``backbone.``, ...) are taken from under it (said in ``notes``); the
    classifier of a torchvision checkpoint (``fc.*`` of a ResNet) is dropped (the backbone's
    is ``nn.Identity``); BatchNorm's step counters, absent from torchvision's oldest files, count
    from 0. Any other key missing, extra or of another shape is a :class:`ConfigError` naming
    it, so a caller can check the weights before any data is read.
    """
    if source == IMAGENET:
        state, origin = _imagenet_state(arch), f"torchvision's ImageNet {arch} weights"
    else:
        try:
            path = encoder_file(Path(source).expanduser())
        except CheckpointError as exc:
            raise ConfigError(f"{where}={source}: {exc}") from None
        try:
            state = read_state_dict(path)
        except CheckpointError as exc:
            raise ConfigError(f"{where}={source}: {exc}") from None
        origin = str(path)
    own = backbone.state_dict()
    state, prefix = _strip_prefix(state, {k: tuple(v.shape) for k, v in own.items()})
    if prefix and notes is not None:
        notes.append(f"{where}: the backbone's tensors are those under {prefix!r} in {origin}")
    from selfsup.models.backbones import classifier_key, is_factory, is_sized

    head = None if is_factory(arch) else f"{classifier_key(arch)}."
    state = {k: v for k, v in state.items() if not (head and k.startswith(head))}
    if is_sized(arch):
        state = _resized_position_embeddings(state, own, arch, origin, where, notes)
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros(value.shape, dtype=value.dtype)  # value may be on meta
    expected = {k: tuple(v.shape) for k, v in own.items()}
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if wrong:
        key = wrong[0]
        theirs, ours = list(state[key].shape), list(expected[key])
        hint = f"; are they weights of another backbone than model.backbone={arch}?"
        if wrong == ["conv1.weight"] and theirs[-1] != ours[-1]:  # only the stem differs
            hint = (
                "; the weights have the ImageNet stem (7x7 conv1): set model.small_stem=false"
                if ours[-1] == 3
                else "; the weights have the small-image stem (3x3 conv1): set "
                "model.small_stem=true"
            )
        raise ConfigError(
            f"{where}={source}: {origin} does not fit the backbone: {key} has shape {theirs} "
            f"there, {ours} in the model"
            f"{f' ({len(wrong)} tensors differ)' if len(wrong) > 1 else ''}{hint}"
        )
    if missing or extra:
        raise ConfigError(
            f"{where}={source}: {origin} does not fit the backbone (another architecture?): "
            f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
            f"unexpected {extra[:4]}{' ...' if len(extra) > 4 else ''}; pass weights of "
            f"model.backbone={arch}, the backbone this run trains"
        )
    return state
