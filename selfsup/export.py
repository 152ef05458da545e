"""Load a trained encoder anywhere, and export it as torchvision / safetensors / TorchScript.

``encoder.pt`` is a plain backbone ``state_dict`` (torchvision key names, no ``fc``). Its
architecture is read from the run's ``config.yaml`` when one is beside it, from the metadata of an
exported file (``export.json`` beside it, or the ``.safetensors`` header), else inferred from the
tensors themselves (stem kernel size, block type, widths), so a bare file loads too.

Exports also record what an encoder needs to be *used* correctly besides its weights: the input
normalisation (``mean``/``std``) and the image size of pre-training, in ``export.json`` and, for
safetensors, in the file's own metadata.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from selfsup.checks import check_encode_args, check_not_blocked, check_writable
from selfsup.data.cache import atomic_write, atomic_write_text
from selfsup.data.decode import storage_size_for_crop
from selfsup.errors import CheckpointError, ConfigError, DataError
from selfsup.models import BACKBONES, backbone_to_torchvision
from selfsup.models.backbones import (
    backbone_module,
    classifier_key,
    encoder_shapes,
    input_problem,
    is_factory,
    native_image_size,
    state_image_size,
)
from selfsup.models.weights import EXPORT_INFO, encoder_file, is_torchscript, read_state_dict
from selfsup.train.checkpoint import atomic_torch_save

EXPORT_FORMATS = ("torchvision", "safetensors", "torchscript", "onnx")
ONNX_EXTRA = "pip install 'selfsup[onnx]' (onnx, onnxscript and onnxruntime)"
CLASSIFIER_FORMAT = "selfsup-classifier/1"  # the "format" of a saved classifier's .json
CLASSIFIER_DIR = "classifiers"  # in the run directory: what `selfsup eval --save-classifiers` saves


def infer_architecture(state: dict[str, torch.Tensor]) -> tuple[str, bool]:
    """(backbone name, small_stem) of a torchvision backbone's ``state_dict`` (its classifier
    removed, as selfsup writes it, or kept, as a torchvision export holds it).

    A ResNet: the CIFAR stem has a 3x3 ``conv1`` (7x7 otherwise); the name is the backbone of
    :data:`~selfsup.models.BACKBONES` whose parameter names and shapes are exactly these (depth,
    block type, widths and groups all show in them), built on the meta device (no memory).
    Another torchvision model (ConvNeXt, EfficientNet, MobileNet, RegNet, Swin, ViT, ...): the
    models whose parameter count (torchvision's weights metadata, no building) is the state's,
    less or plus a 1000-class classifier, are built on the meta device and their shapes compared;
    a ViT's by its position embeddings, at the size they were made for.
    """
    if "conv1.weight" not in state:
        name = _other_torchvision_architecture(state)
        if name is None:
            raise CheckpointError(
                "the weights are those of no torchvision backbone selfsup knows (a factory's "
                "own module?); such weights load with the config.yaml (or export.json) their "
                "run wrote beside them"
            )
        return name, False
    small_stem = state["conv1.weight"].shape[-1] == 3
    shapes = _encoder_shapes(state)
    for name in sorted(BACKBONES, key=lambda n: n != "resnet_tiny"):  # the quickstart's first
        if _backbone_shapes(name, small_stem) == shapes:
            return name, small_stem
    raise CheckpointError(
        f"the ResNet state_dict ({len(shapes)} tensors) matches none of {', '.join(BACKBONES)}"
    )


# state_dict entries of torchvision's models that are buffers, not parameters (BatchNorm's,
# Swin's relative position tables): left out of the parameter count
_BUFFERS = (
    "running_mean",
    "running_var",
    "num_batches_tracked",
    "relative_position_index",
    "relative_coords_table",
)


def _other_torchvision_architecture(state: dict[str, torch.Tensor]) -> str | None:
    """The torchvision model (not a ResNet) whose backbone ``state`` is, or None."""
    import torchvision

    from selfsup.models.backbones import is_sized, torchvision_backbones

    count = sum(v.numel() for k, v in state.items() if not k.endswith(_BUFFERS))
    for name in torchvision_backbones():
        if name in BACKBONES:
            continue
        size = state_image_size(name, state)
        if is_sized(name):
            if size is None:
                continue  # a ViT's count depends on its size: its position embeddings tell
        else:
            weights = list(torchvision.models.get_model_weights(name))
            if not weights:
                continue
            extra = int(weights[0].meta["num_params"]) - count  # a 1000-class head: 1000(D+1)
            if not (extra == 0 or (extra > 0 and extra % 1000 == 0)):
                continue
        try:
            expected = _backbone_shapes(name, False, size)
        except AssertionError:  # a ViT of another patch size, which does not divide this size
            continue
        if _encoder_shapes(state, classifier_key(name)) == expected:
            return name
    return None


def _encoder_shapes(
    state: dict[str, torch.Tensor], head: str | None = "fc"
) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of an encoder state_dict, the classifier ``head`` (``fc``
    of a ResNet, :func:`~selfsup.models.classifier_key`) left out."""
    prefix = f"{head}." if head else None
    return {k: tuple(v.shape) for k, v in state.items() if not (prefix and k.startswith(prefix))}


def _head(name: str) -> str | None:
    """The classifier prefix a torchvision export of backbone ``name`` holds (None: a factory's)."""
    return None if is_factory(name) else classifier_key(name)


def _backbone_shapes(
    name: str, small_stem: bool, image_size: int | None = None
) -> dict[str, tuple[int, ...]]:
    """What :func:`_encoder_shapes` gives for backbone ``name``'s encoder (a ViT's for
    ``image_size`` px inputs)."""
    return encoder_shapes(name, small_stem, image_size)


def encoder_metadata(path: str | Path) -> dict[str, Any]:
    """What is known of an encoder file besides its weights.

    Keys (each optional): ``backbone``, ``small_stem`` (bool), ``mean``, ``std`` (3 floats),
    ``image_size`` (int), ``method``, ``pretrain_data``, ``eval_data`` (the run's
    ``data.eval_source``), ``epochs``, ``config_hash``. Read from the
    run's ``config.yaml`` beside the file, else ``export.json`` beside it, else the
    ``.safetensors`` header; ``{}`` when there is none.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = folder / "config.yaml"
    if config.exists():
        from selfsup.train.config import config_hash, load_run_config

        cfg = load_run_config(config)
        meta: dict[str, Any] = {}
        if "model" in cfg and isinstance(cfg.model.get("backbone"), str):
            meta.update(backbone=cfg.model.backbone, small_stem=bool(cfg.model.small_stem))
        if "data" in cfg:
            meta.update(
                pretrain_data=cfg.data.get("source"),
                # the labeled data the run was monitored on (stl10 for stl10-unlabeled)
                eval_data=cfg.data.get("eval_source"),
                image_size=cfg.data.get("image_size"),
                storage_size=cfg.data.get("storage_size"),
                eval_crop=cfg.data.get("eval_crop"),
            )
            if cfg.data.get("mean") is not None and cfg.data.get("std") is not None:
                meta.update(mean=list(cfg.data.mean), std=list(cfg.data.std))
        if "method" in cfg:
            meta["method"] = cfg.method.get("name")
        if "train" in cfg:
            meta["epochs"] = cfg.train.get("epochs")
        if all(k in cfg for k in ("method", "model", "augment")):
            meta["config_hash"] = config_hash(cfg)
        return {k: v for k, v in meta.items() if v is not None}
    info = folder / EXPORT_INFO
    if info.exists():
        try:
            meta = json.loads(info.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{info} is not valid JSON ({exc}); re-export the run") from None
        for key in ("format", "file", "files"):
            meta.pop(key, None)
        return meta
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
        return _decode_header(raw)
    return {}


def _encode_header(meta: dict[str, Any]) -> dict[str, str]:
    # safetensors metadata is str -> str: store every value as JSON
    return {key: json.dumps(value) for key, value in meta.items()}


def _decode_header(raw: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    if isinstance(meta.get("small_stem"), str):  # files written before values were JSON
        meta["small_stem"] = meta["small_stem"] == "true"
    return meta


def _load_state(path: Path) -> tuple[dict[str, torch.Tensor], str, bool]:
    """(state_dict on the CPU, backbone name, small_stem) of a state-dict or safetensors file."""
    state = read_state_dict(path)
    meta = encoder_metadata(path)
    if isinstance(meta.get("backbone"), str) and "small_stem" in meta:
        name, small = meta["backbone"], bool(meta["small_stem"])
        # every tensor of the metadata's backbone, with its shape (extra keys: load's concern);
        # not so for an encoder.pt copied beside another run's config.yaml
        expected = _backbone_shapes(name, small, state_image_size(name, state))
        found_shapes = _encoder_shapes(state, _head(name))
        if not expected.items() <= found_shapes.items():
            if is_factory(name):
                key = next(k for k, v in expected.items() if found_shapes.get(k) != v)
                there = list(found_shapes[key]) if key in found_shapes else "no such tensor"
                raise CheckpointError(
                    f"{path} does not fit what your factory {name} builds now: {key} is "
                    f"{there} in the file, {list(expected[key])} in the module; did the "
                    "factory's code change since the run? Put back the version that trained it"
                )
            try:
                found = "a {} (small_stem={}) encoder".format(*infer_architecture(state))
            except CheckpointError:
                found = "weights of no known backbone"
            raise CheckpointError(
                f"{path} holds {found}, but the metadata beside it says model.backbone={name}, "
                f"model.small_stem={small}; keep each encoder with its own run's config.yaml "
                "(or export.json), or load the bare file from a folder without one"
            )
        return state, name, small
    name, small = infer_architecture(state)
    return state, name, small


def weights_digest(module: nn.Module) -> str:
    """sha256 (12 hex digits) of a module's tensors: names, dtypes, shapes and values.

    The same weights give the same digest whatever file holds them (``encoder.pt``, a
    safetensors, torchvision or TorchScript export), unlike a hash of the file's bytes.
    """
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """A ready backbone ``[B, 3, S, S] -> [B, D]`` in eval mode.

    Args:
        path: a run directory, an ``encoder.pt`` (plain state_dict), a torchvision export (its
            random ``fc`` is dropped), a ``.safetensors`` export or a TorchScript export.
        map_location: device to put the module on.

    Returns:
        the backbone: the torchvision model with its classifier (``fc`` of a ResNet) replaced
        by ``nn.Identity()``, or the module of the run's ``module:function`` factory (imported
        again), or a ``torch.jit.ScriptModule`` for a TorchScript file; in eval mode.
    """
    path = encoder_file(Path(path))
    if is_torchscript(path):
        with warnings.catch_warnings():  # deprecated in torch >= 2.9, still the way to load it
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location=map_location).eval()
    state, name, small = _load_state(path)
    return _encoder_from_state(path, state, name, small).to(map_location).eval()


def _encoder_from_state(
    path: Path, state: dict[str, torch.Tensor], name: str, small: bool
) -> nn.Module:
    """Backbone ``name``'s module holding ``state`` (read from ``path`` by :func:`_load_state`;
    a torchvision export's classifier left out)."""
    model = backbone_module(name, small_stem=small, image_size=state_image_size(name, state))
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = _head(name)
    unexpected = [k for k in unexpected if not (head and k.startswith(f"{head}."))]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match a {name} encoder: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.eval()


def check_input_size(
    encoder: nn.Module, size: int, where: Path | str, trained: int | None = None
) -> None:
    """A ConfigError now, before any image is decoded or any file written, when ``encoder``
    refuses ``size`` px inputs (a ViT takes the size it was trained at only; a ConvNeXt none
    below 32 px), naming ``trained``, the size it was trained at, when known."""
    was_training = encoder.training
    problem = input_problem(encoder.eval(), size)
    encoder.train(was_training)
    if problem:
        fix = (
            f"it was trained at {trained} px: drop --image-size (or pass {trained})"
            if trained and int(trained) != size
            else "pass --image-size with a size it takes"
        )
        raise ConfigError(f"{where}: the encoder does not take {size} px images ({problem}); {fix}")


def _traced(model: nn.Module, example: torch.Tensor, src: Path) -> torch.jit.ScriptModule:
    """``model`` traced on ``example``, checked against the module itself on another batch.

    torch.jit.trace's own check compares the graphs of two traces, which differ for
    torchvision's ViTs (a constant of ``torch._assert`` is renamed) although their outputs are
    the same; the outputs are what a user runs, so they are compared instead."""
    with warnings.catch_warnings():
        # torch >= 2.9 marks jit.trace deprecated; TorchScript is still what this format is
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # a ViT's shape asserts
        scripted = torch.jit.trace(model, example, check_trace=False)
    check = torch.Generator().manual_seed(0)
    batch = torch.rand(2, *example.shape[1:], generator=check)
    with torch.no_grad():
        want, got = model(batch), scripted(batch)
    if (
        not isinstance(got, torch.Tensor)
        or got.shape != want.shape
        or not torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    ):
        raise CheckpointError(
            f"{src}: the traced encoder does not compute what the module does (data-dependent "
            "control flow, which tracing cannot record); export it as --format safetensors"
        )
    return scripted


def _check_onnx_installed() -> None:
    """A ConfigError naming the extra to install, before any file is read, when torch's ONNX
    exporter cannot run here (it needs onnx and onnxscript)."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"--format onnx needs {' and '.join(missing)}: {ONNX_EXTRA}")


def _onnx_program(
    model: nn.Module, size: int, meta: dict[str, Any], src: Path, output: str = "features"
):
    """``model`` (eval mode) as a ``torch.onnx.ONNXProgram``: ``images [B, 3, size, size] ->
    <output> [B, D]`` (``features``; a classifier's ``logits``) with ``B`` dynamic, ``meta``
    (mean, std, image size...) as the model's ``metadata_props``."""
    example = torch.zeros(2, 3, size, size)  # 2, not 1: torch.export specialises a size of 1
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's progress notes and deprecations
        try:
            program = torch.onnx.export(
                model.eval(),
                (example,),
                input_names=["images"],
                output_names=[output],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                dynamo=True,
            )
        except Exception as exc:  # torch.export's errors have many types; all mean the same
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{src}: torch's ONNX exporter cannot export this model ({first[:300]}); "
                "export it as --format torchscript or safetensors"
            ) from None
    program.model.metadata_props.update(_encode_header(meta))
    return program


def _check_onnx_file(
    target: Path, model: nn.Module, size: int, src: Path, output: str = "features"
) -> None:
    """The written graph, run by ONNX Runtime on two batch sizes, computes what ``model`` does
    (when onnxruntime is installed; else onnx's own checker reads it). A wrong file is removed."""
    import onnx

    try:
        onnx.checker.check_model(str(target))
        import onnxruntime
    except ImportError:
        return
    except Exception as exc:  # onnx.checker.ValidationError and friends
        target.unlink(missing_ok=True)
        raise CheckpointError(f"{src}: the ONNX export is not a valid graph ({exc})") from None
    check = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        images = torch.rand(batch, 3, size, size, generator=check)
        with torch.no_grad():
            want = model(images).float().numpy()
        try:
            session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
            (got,) = session.run([output], {"images": images.numpy()})
            problem = None if np.allclose(got, want, rtol=1e-3, atol=1e-4) else f"other {output}"
        except Exception as exc:  # onnxruntime's errors (a fixed batch size, an unknown op)
            problem = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
        if problem:
            target.unlink(missing_ok=True)
            raise CheckpointError(
                f"{src}: ONNX Runtime does not compute the model's {output} from the export "
                f"for a batch of {batch} ({problem}); export it as --format torchscript or "
                "safetensors"
            )


def saved_classifier_metadata(path: Path) -> dict[str, Any] | None:
    """The ``.json`` of ``path`` when it is a ``classifiers/*.pt`` of ``selfsup eval
    --save-classifiers`` (:func:`classifier_metadata`), else None."""
    if path.suffix != ".pt" or not path.is_file() or not path.with_suffix(".json").is_file():
        return None
    try:
        return classifier_metadata(path)
    except CheckpointError:
        return None


def is_saved_classifier(path: Path) -> bool:
    """Whether ``path`` is a ``classifiers/*.pt`` of ``selfsup eval --save-classifiers`` (its
    ``.json`` beside it says so)."""
    return saved_classifier_metadata(path) is not None


def _export_classifier_onnx(src: Path, out: str | Path | None) -> Path:
    """A saved classifier, encoder and head, as ``<name>.onnx``: ``images [B, 3, S, S] ->
    logits [B, C]``, the class names (in logit order) and the normalisation in its
    ``metadata_props``; checked by ONNX Runtime as the encoder's export is."""
    clf = load_classifier(src)
    base = Path(out) if out else src.parent / "export"
    check_not_blocked(base, "the export")
    with _export_folder(base):
        target = base / f"{src.stem}.onnx"
        program = _onnx_program(clf.model, clf.image_size, clf.metadata, src, output="logits")
        atomic_write(target, lambda tmp: program.save(str(tmp)))
        _check_onnx_file(target, clf.model, clf.image_size, src, output="logits")
    return target


@contextlib.contextmanager
def _export_folder(base: Path) -> Iterator[None]:
    """Writing an export into ``base``: an unwritable place is said first (the folder is created
    to find out), and a failed export leaves no empty folders of its own."""
    created = [p for p in (base, *base.parents) if not p.exists()]  # deepest first
    try:
        check_writable(base, "the export")
        yield
    except BaseException:
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def export_encoder(
    source: str | Path, fmt: str, out: str | Path | None = None, image_size: int | None = None
) -> Path:
    """Write the encoder of a run (or an encoder file) in ``fmt``; returns the written path.

    * ``torchvision``: ``<backbone>_torchvision.pt``, the ``state_dict`` of
      ``backbone_to_torchvision(backbone, small_stem)`` (without the small stem, plain
      ``torchvision.models.get_model(backbone)``). Its classifier (``fc`` of a ResNet) is the
      fresh, untrained one of that model, so the file loads with ``strict=True``; replace it
      for a new task. Not for a backbone of a ``module:function`` factory.
    * ``safetensors``: ``encoder.safetensors``, the backbone ``state_dict`` (no ``fc``) with
      backbone, small_stem, mean, std and image size in the header.
    * ``torchscript``: ``encoder.torchscript.pt``, the traced backbone in eval mode
      (``torch.jit.load`` it; no selfsup needed). Traced on a ``[1, 3, S, S]`` example; a
      backbone with adaptive pooling takes other sizes too (a ViT only its own).
    * ``onnx``: ``encoder.onnx``, the backbone in eval mode as an ONNX graph (torch's
      ``torch.export``-based exporter) for ONNX Runtime, TensorRT and other runtimes: input
      ``images`` float32 ``[B, 3, S, S]`` (normalised as the metadata says), output
      ``features`` ``[B, D]``, the batch size ``B`` free and ``S`` fixed; mean, std, image size
      and backbone are in the graph's ``metadata_props`` too. Needs the ``onnx`` extra.

    ``export.json`` beside the file records the same metadata. ``image_size`` (>= 8) is only the
    TorchScript or ONNX example's size: the metadata keeps the size the encoder was trained at.

    A classifier of ``selfsup eval --save-classifiers`` (``classifiers/<name>.pt``) exports whole
    as ``onnx`` (``<name>.onnx``: ``images`` -> ``logits [B, C]``, its ``classes`` and the rest
    of its ``.json`` in ``metadata_props``, at its own image size: another ``image_size`` is a
    ConfigError); the other formats export its
    encoder alone (the ``.pt`` itself is already a torchvision ``state_dict``), with a note.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {list(EXPORT_FORMATS)}, got {fmt!r}")
    if fmt == "onnx":
        _check_onnx_installed()
    check_encode_args(image_size, None)  # as eval's --image-size
    classifier = saved_classifier_metadata(Path(source))
    if classifier is not None:
        if fmt == "onnx":
            size = classifier["image_size"]
            if image_size is not None and image_size != size:  # its prepare() makes `size` px
                raise ConfigError(
                    f"{source} is a classifier of {size} px images, and exports at that size; "
                    f"drop --image-size {image_size}"
                )
            return _export_classifier_onnx(Path(source), out)
        print(
            f"selfsup: note: {source} is a classifier; --format {fmt} exports its encoder "
            "without the trained head (the .pt is already a torchvision state_dict; "
            "--format onnx exports the whole classifier)",
            file=sys.stderr,
        )
    src = encoder_file(Path(source))
    if is_torchscript(src):
        raise ConfigError(
            f"{src} is TorchScript, which holds no architecture to re-export; "
            f"export from the run directory or its encoder.pt"
        )
    base = Path(out) if out else src.parent / "export"
    check_not_blocked(base, "the export")  # a file in the way is said first, not after the load
    state, name, small = _load_state(src)
    if fmt == "torchvision" and is_factory(name):
        raise ConfigError(
            f"{src}: its backbone comes from your factory {name}, not torchvision: export it "
            "as --format safetensors (the state_dict, for the same factory), torchscript or onnx"
        )
    model = _encoder_from_state(src, state, name, small)  # the file is read once
    source_meta = encoder_metadata(src)
    # --image-size is only the trace's example input: the metadata keeps the size the encoder
    # was trained at (eval / embed of the export prepare images at it), none when unknown
    native = native_image_size(model)  # a ViT's, read from its weights
    size = int(
        image_size if image_size is not None else source_meta.get("image_size") or native or 32
    )
    if fmt in ("torchscript", "onnx"):
        check_input_size(model, size, src, source_meta.get("image_size"))
    with _export_folder(base):
        meta = {k: v for k, v in source_meta.items() if k not in ("backbone", "small_stem")}
        meta.update(backbone=name, small_stem=small)
        if native and not meta.get("image_size"):
            meta["image_size"] = native  # a bare ViT's: eval of the export prepares it
        target = _write_export(fmt, model, state, name, small, meta, base, size, src)
    return target


def _write_export(
    fmt: str,
    model: nn.Module,
    state: dict[str, torch.Tensor],
    name: str,
    small: bool,
    meta: dict[str, Any],
    base: Path,
    size: int,
    src: Path,
) -> Path:
    """:func:`export_encoder`'s file of ``fmt`` in ``base`` and the folder's export.json."""
    if fmt == "torchvision":
        # the fresh classifier drawn from a fixed seed, so that exporting a run twice writes
        # the same file (and the caller's random stream is left as it was)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            tv = backbone_to_torchvision(name, small, image_size=state_image_size(name, state))
        missing, unexpected = tv.load_state_dict(model.state_dict(), strict=False)
        head = classifier_key(name)
        if sorted(missing) != [f"{head}.bias", f"{head}.weight"] or unexpected:
            raise CheckpointError(
                f"{src} does not map onto torchvision {name}: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}"
            )
        target = base / f"{name}_torchvision.pt"
        atomic_torch_save(tv.state_dict(), target)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        target = base / "encoder.safetensors"
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        header = _encode_header(meta)
        atomic_write(target, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    elif fmt == "onnx":
        target = base / "encoder.onnx"
        program = _onnx_program(model, size, meta, src)
        atomic_write(target, lambda tmp: program.save(str(tmp)))
        _check_onnx_file(target, model, size, src)
    else:
        target = base / "encoder.torchscript.pt"
        example = torch.zeros(1, 3, size, size)
        scripted = _traced(model, example, src)
        atomic_write(target, lambda tmp: scripted.save(str(tmp)))
    # one export.json for the folder: the shared metadata, and each format's file
    info_path = base / EXPORT_INFO
    files: dict[str, str] = {}
    if info_path.exists():
        with contextlib.suppress(ValueError, OSError, AttributeError, KeyError, TypeError):
            earlier = json.loads(info_path.read_text())
            files = dict(earlier.get("files") or {earlier["format"]: earlier["file"]})
    files[fmt] = target.name
    info = {**meta, "files": files}
    atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
    return target


# ---------------------------------------------------------------------------- classifiers
def storage_batch(images: Any, storage_size: int) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` of ``images`` prepared as the cache stores them (``S``: the
    run's storage size; :func:`selfsup.data.decode.storage_image`).

    ``images``: one image or a sequence of them, each a file path, a PIL image, an RGB uint8
    ``[H, W, 3]`` array or a ``[3, H, W]`` tensor; or a ``[B, 3, H, W]`` tensor (uint8, or
    float in ``[0, 1]``). Images of any size: each one's centre square is resized (PIL bicubic),
    as ``selfsup embed`` / ``predict`` resize it, so the results agree with theirs. A tensor
    already ``S x S`` (images from the cache) is returned as it is, in its own dtype."""
    import os

    import numpy as np
    from PIL import Image

    from selfsup.data.decode import storage_image

    single = (str, os.PathLike, bytes, Image.Image, np.ndarray)
    size = int(storage_size)
    if isinstance(images, torch.Tensor) and images.ndim in (3, 4):
        if tuple(images.shape[-3:]) == (3, size, size):  # as the cache holds them: unchanged
            return images if images.ndim == 4 else images.unsqueeze(0)
    if isinstance(images, torch.Tensor):
        items = list(images) if images.ndim == 4 else [images]
    elif isinstance(images, single):
        items = [images]
    else:
        items = list(images)
    if not items:
        raise ConfigError("no images given")
    arrays = []
    for item in items:
        if isinstance(item, torch.Tensor):
            if item.ndim != 3 or item.shape[0] != 3:
                raise ConfigError(
                    f"an image tensor must be [3, H, W] (or a batch [B, 3, H, W]), got "
                    f"{list(item.shape)}"
                )
            if item.dtype != torch.uint8:  # float in [0, 1], as torchvision's to_tensor gives
                low, high = float(item.min()), float(item.max())
                if not item.is_floating_point() or low < -1e-3 or high > 1 + 1e-3:
                    # 0-255 floats would be clipped to a white image, and classified all the same
                    raise DataError(
                        f"an image tensor must be uint8, or float in [0, 1]; this one is "
                        f"{item.dtype} in [{low:g}, {high:g}] (divide 0-255 pixels by 255, or "
                        "pass them as uint8)"
                    )
                item = item.float().mul(255).round().clamp(0, 255).to(torch.uint8)
            item = item.permute(1, 2, 0).cpu().numpy()
        try:
            arrays.append(storage_image(item, size))
        except OSError as error:  # a path that is not there, or not readable
            raise DataError(f"cannot read image {item}: {error.strerror or error}") from None
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def prepare_images(images: Any, encoder: str | Path) -> torch.Tensor:
    """``images`` (see :func:`storage_batch`) as the encoder of run ``encoder`` (a run
    directory, its encoder.pt or an export) sees them in ``selfsup embed`` and the run's kNN
    check: the cache's bicubic resize to ``data.storage_size``, then the evaluation view
    (shorter side to ``image_size / eval_crop``, antialiased bilinear; centre crop
    ``image_size``), normalised with the run's mean / std. Returns float ``[B, 3, S, S]``."""
    from selfsup.augment import EvalTransform

    if isinstance(encoder, nn.Module):
        raise ConfigError(
            "prepare_images(images, encoder): encoder is the run directory or encoder file (its "
            "config says how the run prepared images), not the loaded module"
        )
    meta = encoder_metadata(encoder)
    missing = [k for k in ("image_size", "mean", "std") if k not in meta]
    if missing:
        raise ConfigError(
            f"{encoder}: no config.yaml or export.json beside it says its {', '.join(missing)}; "
            "prepare the images yourself (see the README's 'Without selfsup')"
        )
    size = int(meta["image_size"])
    crop = float(meta.get("eval_crop") or 1.0)
    batch = storage_batch(images, int(meta.get("storage_size") or size))
    return EvalTransform(size, mean=meta["mean"], std=meta["std"], crop_fraction=crop)(batch)


@dataclass
class Classifier:
    """A classifier saved by ``selfsup eval --save-classifiers`` (:func:`load_classifier`).

    ``model``: the torchvision ResNet of the run's architecture with its trained ``fc``, in eval
    mode: normalised images ``[B, 3, S, S]`` -> logits ``[B, C]``, ``C = len(classes)``.
    ``classes``: the class names, in logit order. :meth:`prepare` turns images of any size
    (paths, PIL images, uint8 tensors) into the model's input exactly as ``selfsup predict``
    does: the cache's bicubic resize of the centre square to ``storage_size``, then
    :meth:`transform` (shorter side to ``round(image_size / eval_crop)``, centre crop
    ``image_size``, normalised with ``mean`` / ``std``); :meth:`predict` classifies them.
    ``metadata``: the whole ``.json`` beside the weights (protocol, top1, eval data, ...).
    """

    model: nn.Module
    classes: list[str]
    image_size: int
    eval_crop: float
    mean: list[float]
    std: list[float]
    metadata: dict[str, Any] = field(default_factory=dict)

    def transform(self) -> nn.Module:
        """The evaluation's ``EvalTransform``: uint8 ``[B, 3, H, W]`` -> the model's input."""
        from selfsup.augment import EvalTransform

        return EvalTransform(
            self.image_size, mean=self.mean, std=self.std, crop_fraction=self.eval_crop
        )

    @property
    def storage_size(self) -> int:
        """The side the evaluation cached its images at (before :meth:`transform`)."""
        stored = self.metadata.get("storage_size")
        return int(stored or storage_size_for_crop(self.image_size, self.eval_crop))

    def prepare(self, images: Any) -> torch.Tensor:
        """The model's input float ``[B, 3, S, S]`` for ``images`` (one or a sequence of file
        paths, PIL images, uint8 ``[H, W, 3]`` arrays or ``[3, H, W]`` tensors, or a
        ``[B, 3, H, W]`` tensor), prepared as ``selfsup predict`` prepares them."""
        return self.transform()(storage_batch(images, self.storage_size))

    @torch.no_grad()
    def predict(self, images: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(class index int64 ``[B]``, softmax probability of that class ``[B]``) of ``images``
        (as :meth:`prepare` takes them), on the model's device: the classes and confidences
        ``selfsup predict`` writes for the same images."""
        device = next(self.model.parameters()).device
        logits = self.model(self.prepare(images).to(device))
        confidence, index = logits.float().softmax(dim=1).max(dim=1)
        return index, confidence


def check_classifier_architecture(encoder: nn.Module, name: str, small_stem: bool) -> None:
    """A CheckpointError now, before any training, when ``encoder``'s tensors are not those of
    torchvision's ``name`` (a custom module): its classifiers could not be saved as one."""
    if is_factory(name):
        raise CheckpointError(
            f"the encoder's backbone comes from your factory {name}: --save-classifiers saves "
            "torchvision models only: drop it (the accuracies are written without it)"
        )
    state = encoder.state_dict()
    if _encoder_shapes(state, None) != _backbone_shapes(
        name, small_stem, state_image_size(name, state)
    ):
        raise CheckpointError(
            f"the encoder's tensors are not those of a {name} (small_stem={small_stem}); "
            "--save-classifiers saves torchvision models only"
        )


def classifier_state(
    encoder: nn.Module, head: nn.Linear, name: str, small_stem: bool
) -> dict[str, torch.Tensor]:
    """The ``state_dict`` (CPU) of ``backbone_to_torchvision(name, small_stem, num_classes=C)``
    holding ``encoder``'s tensors and ``head`` as its classifier (``fc`` of a ResNet,
    :func:`~selfsup.models.classifier_key`): it loads with ``strict=True``."""
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    model = backbone_to_torchvision(
        name, small_stem, num_classes=head.out_features, image_size=state_image_size(name, state)
    )
    key = classifier_key(name)
    state[f"{key}.weight"] = head.weight.detach().cpu().float()
    state[f"{key}.bias"] = head.bias.detach().cpu().float()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"the trained classifier does not map onto torchvision {name}: {str(exc)[:300]}"
        ) from None
    return {k: v.clone() for k, v in model.state_dict().items()}


def save_classifier(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """``path`` (.pt, the state_dict) and the ``.json`` beside it, each written atomically; the
    .json last, so a classifier with metadata always has its weights."""
    path = Path(path)
    meta = {"format": CLASSIFIER_FORMAT, **meta, "file": path.name}
    atomic_torch_save(state, path)
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return path


def _classifier_files(path: Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix == ".json":
        return path.with_suffix(".pt"), path
    return path, path.with_suffix(".json")


def classifier_metadata(path: str | Path) -> dict[str, Any]:
    """The ``.json`` of a saved classifier (``path``: its ``.pt`` or the ``.json``); a
    CheckpointError when either file is missing or the .json is not one selfsup wrote."""
    weights, info = _classifier_files(Path(path))
    advice = "pass a classifiers/*.pt written by `selfsup eval --save-classifiers`"
    if Path(path).is_dir():
        raise CheckpointError(f"classifier {path} is a folder; {advice}")
    if Path(path).suffix == ".json" and not weights.is_file() and info.is_file():
        raise CheckpointError(
            f"{info} is not a classifier's metadata (no {weights.name} beside it; an eval "
            f"result?); {advice}"
        )
    if not weights.is_file():
        raise CheckpointError(f"classifier file {weights} does not exist; {advice}")
    if not info.is_file():
        raise CheckpointError(
            f"{weights} has no {info.name} beside it (classes, image size, normalisation); {advice}"
        )
    try:
        meta = json.loads(info.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{info} is not readable JSON ({exc}); {advice}") from None
    if not isinstance(meta, dict) or meta.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{info} is not the metadata of a selfsup classifier; {advice}")
    missing = [
        k
        for k in ("classes", "backbone", "small_stem", "image_size", "mean", "std")
        if k not in meta
    ]
    if missing:
        raise CheckpointError(f"{info} lacks {', '.join(missing)}; {advice}")
    return meta


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> Classifier:
    """A classifier saved by ``selfsup eval --save-classifiers``: ``path`` is its ``.pt`` or the
    ``.json`` beside it. Returns a :class:`Classifier` (model in eval mode, classes,
    preprocessing); a CheckpointError for a missing or foreign file."""
    weights, _ = _classifier_files(Path(path))
    meta = classifier_metadata(path)
    classes = [str(c) for c in meta["classes"]]
    try:
        state = read_state_dict(weights)
    except CheckpointError:
        raise CheckpointError(
            f"{weights} is damaged or holds no classifier weights (its .json is fine); run "
            "`selfsup eval --save-classifiers` again to rewrite it"
        ) from None
    model = backbone_to_torchvision(
        meta["backbone"],
        bool(meta["small_stem"]),
        len(classes),
        image_size=state_image_size(meta["backbone"], state),
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{weights} does not hold the {meta['backbone']} classifier of {len(classes)} classes "
            f"its .json describes: {' '.join(str(exc).split())[:300]}"
        ) from None
    return Classifier(
        model=model.to(map_location).eval(),
        classes=classes,
        image_size=int(meta["image_size"]),
        eval_crop=float(meta.get("eval_crop") or 1.0),
        mean=[float(v) for v in meta["mean"]],
        std=[float(v) for v in meta["std"]],
        metadata=meta,
    )
