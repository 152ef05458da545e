"""Backbones: torchvision ResNets mapping images [B, 3, S, S] to pooled features [B, D].

Every ResNet of ``torchvision.models`` (ResNet-18/34/50/101/152 [0], the wide ResNets [2] and
ResNeXts [3]) and ``resnet_tiny`` (the quickstart's); every other torchvision classification model
by name (ConvNeXt, EfficientNet, RegNet, MobileNet, ViT, Swin, ...: its last ``nn.Linear``, the
ImageNet classifier, becomes ``nn.Identity``); a factory of your own as ``"module:function"`` or
``"path/to/file.py:function"`` (called with no arguments, it returns the module), which a config
can name, so a run of it resumes and its encoder loads again; and, from Python, any ``nn.Module``
returning ``[B, D]``.

The classifier ``fc`` is replaced by ``nn.Identity`` so the backbone's ``state_dict`` is a plain
torchvision ResNet ``state_dict`` without ``fc.*``: it loads into ``backbone_to_torchvision(...)``
with ``strict=False`` (only ``fc.weight`` / ``fc.bias`` missing) for export and fine-tuning.

- [0] ResNet, 2015, https://arxiv.org/abs/1512.03385
- [1] SimCLR, 2020, https://arxiv.org/abs/2002.05709, appendix B.9 (CIFAR-10 stem: 3x3 stride-1
  conv1, no max-pool).
- [2] Wide Residual Networks, 2016, https://arxiv.org/abs/1605.07146
- [3] ResNeXt, 2017, https://arxiv.org/abs/1611.05431
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from selfsup.errors import ConfigError

#: torchvision's ResNet constructors (same module names: conv1, bn1, maxpool, layer1-4, fc)
TORCHVISION_RESNETS: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
)
BACKBONES: tuple[str, ...] = (*TORCHVISION_RESNETS, "resnet_tiny")
# torchvision classification models that are no backbone by name: auxiliary classifiers
# (googlenet; inception_v3, which also takes 299 px only) or a convolutional classifier
# (squeezenet) leave no single Linear to remove
_NOT_BACKBONES = ("googlenet", "inception", "squeezenet")
TINY_WIDTHS: tuple[int, int, int, int] = (16, 32, 64, 128)


class ResNetTiny(ResNet):
    """A torchvision ``ResNet`` of BasicBlocks, layers [1, 1, 1, 1], widths 16/32/64/128.

    About 0.3 M parameters and 128-d features, so the quickstart trains on a 2-core CPU. Being a
    ``torchvision.models.ResNet`` subclass, its module names and ``state_dict`` keys are
    torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``fc``).
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
        # Rebuild the stem and stages at narrow widths with torchvision's own _make_layer.
        self.inplanes = TINY_WIDTHS[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.layer1 = self._make_layer(BasicBlock, TINY_WIDTHS[0], 1)
        self.layer2 = self._make_layer(BasicBlock, TINY_WIDTHS[1], 1, stride=2)
        self.layer3 = self._make_layer(BasicBlock, TINY_WIDTHS[2], 1, stride=2)
        self.layer4 = self._make_layer(BasicBlock, TINY_WIDTHS[3], 1, stride=2)
        self.fc = nn.Linear(TINY_WIDTHS[3], num_classes)
        _torchvision_init_(self)


def _torchvision_init_(model: nn.Module) -> None:
    """The initialisation of ``torchvision.models.ResNet.__init__`` (kaiming fan-out, BN 1/0)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _use_small_stem_(model: ResNet) -> None:
    """CIFAR stem of SimCLR [1] B.9: conv1 3x3 stride 1 padding 1 without bias, no max-pool."""
    out_channels = model.conv1.out_channels
    model.conv1 = nn.Conv2d(3, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()


def torchvision_backbones() -> tuple[str, ...]:
    """Every torchvision classification model :func:`build_backbone` takes by name besides
    ``resnet_tiny`` (``torchvision.models.list_models``, less googlenet, inception_v3 and the
    squeezenets, whose classifiers are no single ``nn.Linear``)."""
    names = torchvision.models.list_models(module=torchvision.models)
    return tuple(n for n in names if not n.startswith(_NOT_BACKBONES))


def is_resnet(name: str) -> bool:
    """Whether backbone ``name`` is a ResNet: the small-image stem and a bare file's
    architecture inference apply to these only."""
    return name in BACKBONES


def is_sized(name: str) -> bool:
    """Whether backbone ``name`` is built for one input size: torchvision's ViTs, whose
    position embeddings hold one per patch of an ``image_size`` image (torchvision's
    ``image_size`` argument, 224 by default; any multiple of the patch size)."""
    return isinstance(name, str) and name.startswith("vit_") and not is_factory(name)


def sized_kwargs(name: str, image_size: int | None) -> dict[str, int]:
    """The keyword arguments that build torchvision's ``name`` for ``image_size`` px inputs:
    ``{"image_size": S}`` for a ViT (none at its default 224, or for any other model)."""
    if is_sized(name) and image_size is not None and int(image_size) != 224:
        return {"image_size": int(image_size)}
    return {}


def state_image_size(name: str, state: dict[str, torch.Tensor]) -> int | None:
    """The input size a ViT ``state`` was built for, read from its tensors: ``encoder.
    pos_embedding`` [1, (S/p)^2 + 1, D] and ``conv_proj.weight`` [D, 3, p, p]. None for any
    other backbone (its weights take any size) or a state without those tensors."""
    if not is_sized(name):
        return None
    pos, proj = state.get("encoder.pos_embedding"), state.get("conv_proj.weight")
    if pos is None or proj is None or pos.dim() != 3:
        return None
    side = round((pos.shape[1] - 1) ** 0.5)
    return side * int(proj.shape[-1]) if side * side == pos.shape[1] - 1 else None


def native_image_size(module: object) -> int | None:
    """The one input size ``module`` is built for, if it has one: a torchvision ViT's
    ``image_size`` (which :func:`state_image_size` reads from its weights); None otherwise."""
    size = getattr(module, "image_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def check_has_parameters(module: nn.Module, what: str) -> None:
    """A ConfigError for a backbone without parameters (pooling alone): it cannot learn."""
    if next(module.parameters(), None) is None:
        raise ConfigError(
            f"{what} has no parameters: it cannot learn, and its features would be the same "
            "before and after training; give it layers with weights (convolutions, linear layers)"
        )


def is_factory(name: str) -> bool:
    """Whether ``model.backbone`` names a factory of the user's (``module:function``)."""
    return isinstance(name, str) and ":" in name


def backbone_names_hint() -> str:
    """What ``model.backbone`` takes, for error messages."""
    return (
        f"one of {', '.join(BACKBONES)}, another torchvision classification model (e.g. "
        "convnext_tiny, efficientnet_b0, regnet_y_400mf, vit_b_16), or a factory of your own "
        "as module:function or path/to/file.py:function"
    )


def check_backbone_name(name: str) -> None:
    """A :class:`ConfigError` for a ``model.backbone`` that names nothing buildable (a factory
    is imported and checked to be callable, not called)."""
    if is_factory(name):
        load_factory(name)
        return
    if name in BACKBONES or name in torchvision_backbones():
        return
    import difflib

    if isinstance(name, str) and name.startswith(_NOT_BACKBONES):
        raise ConfigError(
            f"model.backbone={name}: torchvision's {name} has no single Linear classifier to "
            "remove (auxiliary heads, or a convolutional one); build it without its head in a "
            "factory of your own (model.backbone=path/to/file.py:function)"
        )
    close = difflib.get_close_matches(str(name), [*BACKBONES, *torchvision_backbones()], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"Unknown backbone {name!r} (setting `model.backbone`){hint}; choose "
        f"{backbone_names_hint()}."
    )


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """The function of ``"package.module:function"`` or ``"path/to/file.py:function"``.

    A module not importable as it is, is looked for in the current folder too (the console
    script ``selfsup`` does not put it on ``sys.path`` as ``python -m selfsup`` does).
    """
    where, _, attr = spec.rpartition(":")
    advice = "model.backbone=package.module:function or path/to/file.py:function"
    if not where or not attr.isidentifier():
        raise ConfigError(f"model.backbone={spec!r} is no factory; write {advice}")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.backbone={spec}: there is no file {path}")
        module_name = f"selfsup_backbone_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(module_name)
        if module is None:
            file_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[module_name] = module  # dataclasses, pickling look it up there
            try:
                file_spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[module_name]
                raise ConfigError(
                    f"model.backbone={spec}: importing {path} failed ({type(exc).__name__}: {exc})"
                ) from exc
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            top = where.split(".")[0]
            if exc.name != top or os.getcwd() in sys.path:
                raise ConfigError(
                    f"model.backbone={spec}: cannot import {where} ({exc}); install it, or "
                    f"give the file's path ({advice})"
                ) from exc
            sys.path.insert(0, os.getcwd())  # where `python -m selfsup` would have found it
            return load_factory(spec)
        except Exception as exc:
            raise ConfigError(
                f"model.backbone={spec}: importing {where} failed ({type(exc).__name__}: {exc})"
            ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(
            f"model.backbone={spec}: {where} has no function {attr!r} "
            f"(its functions: {_functions(module)})"
        )
    return factory


def _functions(module) -> list[str]:
    import types

    own = [
        (isinstance(v, type), k)  # functions first, then classes
        for k, v in vars(module).items()
        if callable(v)
        and not k.startswith("_")
        and not isinstance(v, types.ModuleType)
        and getattr(v, "__module__", None) == module.__name__
    ]
    return [k for _, k in sorted(own)][:12]


def _build_from_factory(spec: str) -> nn.Module:
    factory = load_factory(spec)
    try:
        module = factory()
    except Exception as exc:
        import inspect

        try:
            required = [
                p.name
                for p in inspect.signature(factory).parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        except (TypeError, ValueError):
            required = []
        why = (
            f"it is called with no arguments, and needs {', '.join(required)}: wrap it in a "
            "function of none that passes them"
            if required
            else f"{type(exc).__name__}: {exc}"
        )
        raise ConfigError(f"model.backbone={spec}: calling it failed ({why})") from exc
    if not isinstance(module, nn.Module):
        raise ConfigError(
            f"model.backbone={spec} returned a {type(module).__name__}, not an nn.Module "
            "mapping images [B, 3, S, S] to features [B, D]"
        )
    return _without_imagenet_fc(module)


def _without_imagenet_fc(module: nn.Module) -> nn.Module:
    """A torchvision ``ResNet`` with its 1000-class ImageNet ``fc``: that replaced by
    ``nn.Identity`` (in place); its logits are no features. Any other module as it is."""
    fc = getattr(module, "fc", None)
    if isinstance(module, ResNet) and isinstance(fc, nn.Linear) and fc.out_features == 1000:
        module.fc = nn.Identity()
    return module


def backbone_module(
    name: str, small_stem: bool = False, image_size: int | None = None
) -> nn.Module:
    """The module :func:`build_backbone` builds for ``name`` (a name or a factory), without the
    dummy batch that finds D: for loading saved weights into, whatever image size it takes.
    ``image_size`` matters to a ViT only (:func:`is_sized`; :func:`state_image_size` reads it
    from saved weights)."""
    if is_factory(name):
        if small_stem:
            _refuse_small_stem(name)
        return _build_from_factory(name)
    return build_backbone(name, small_stem=small_stem, image_size=image_size)[0]


@functools.cache
def classifier_key(name: str) -> str:
    """The ``state_dict`` prefix of torchvision model ``name``'s ImageNet classifier: ``fc``
    for the ResNets, ``classifier.2`` for ConvNeXt, ``heads.head`` for ViT, ...: its last
    ``nn.Linear``, which a backbone replaces by ``nn.Identity``."""
    if name in BACKBONES:
        return "fc"
    model = on_meta(lambda: torchvision.models.get_model(name, weights=None))
    linears = [key for key, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:  # not in torchvision_backbones(): check_backbone_name refuses it first
        raise ConfigError(f"torchvision's {name} has no Linear classifier to remove")
    return linears[-1]


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device (shapes, no memory), or on the CPU for the models whose
    constructors read tensors' values (RegNet's block widths)."""
    try:
        with torch.device("meta"):
            return build()
    except NotImplementedError:
        return build()


def _refuse_small_stem(name: str) -> None:
    raise ConfigError(
        f"model.small_stem=true (the 3x3, no-max-pool stem) applies to the ResNets; "
        f"{name} keeps its own stem: set model.small_stem=false (and give it images large "
        "enough for its downsampling, e.g. --image-size 96 or more)"
    )


def encoder_shapes(
    name: str, small_stem: bool, image_size: int | None = None
) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of ``build_backbone(name, small_stem=..., image_size=...)``'s
    module (its classifier removed), built on the meta device where the constructor allows it."""

    module = on_meta(lambda: backbone_module(name, small_stem, image_size))
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_backbone(
    name: str, *, small_stem: bool, image_size: int, storage_size: int | None = None
) -> int:
    """D of backbone ``name`` (see :func:`build_backbone`), built on the meta device and run on
    one dummy ``[2, 3, S, S]`` batch, ``S = image_size``: a :class:`ConfigError` naming what does
    not fit (an unknown name, the small stem on a non-ResNet, an input size the model refuses,
    such as a ViT's fixed 224 px) before any data is read."""
    check_backbone_name(name)
    if small_stem and not is_resnet(name):
        _refuse_small_stem(name)
    if is_sized(name):
        patch = int(on_meta(lambda: torchvision.models.get_model(name)).patch_size)
        if image_size % patch:
            fits = [s for s in (32, 64, 96, 128, 160, 224) if s % patch == 0 and s >= patch]
            raise ConfigError(
                f"model.backbone={name} cuts images into {patch} px patches: set "
                f"data.image_size (--image-size) to a multiple of {patch}, not {image_size}"
                f" (e.g. {', '.join(map(str, fits))}){_storage_hint(fits, storage_size)}"
            )
    with warnings.catch_warnings():  # the 1000-logits warning is for the real build
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                model, dim = build_backbone(name, small_stem=small_stem, image_size=image_size)
        except NotImplementedError:  # a constructor that reads tensors' values (RegNet)
            model, dim = build_backbone(name, small_stem=small_stem, image_size=image_size)
    check_has_parameters(model, f"model.backbone={name}")
    if is_factory(name):
        return dim  # build_backbone ran its dummy batch already
    problem = input_problem(model.eval(), image_size)
    if problem:
        takes = [s for s in (32, 64, 96, 128, 160, 224) if not input_problem(model, s)]
        hint = f", e.g. --image-size {takes[0]}" if takes else ""
        hint += _storage_hint(takes[:1], storage_size)
        raise ConfigError(
            f"model.backbone={name} does not take {image_size} px images ({problem}); set "
            f"data.image_size (--image-size) to a size it takes{hint}"
        )
    return dim


def _storage_hint(sizes: list[int], storage_size: int | None) -> str:
    """The data.storage_size the suggested image sizes need, when the configured one is less."""
    if storage_size and sizes and min(sizes) > storage_size:
        return f" with data.storage_size=null (the cache stores {storage_size} px images now)"
    return ""


def input_problem(model: nn.Module, image_size: int) -> str | None:
    """Why ``model`` fails on a ``[2, 3, S, S]`` batch, or None (also for an op the meta
    device cannot run: the first real step tells)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with torch.no_grad():
            model(torch.zeros(2, 3, image_size, image_size, device=device))
    except NotImplementedError:
        return None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {first[:160]}"
    return None


def backbone_to_torchvision(
    name: str, small_stem: bool, num_classes: int = 1000, image_size: int | None = None
) -> nn.Module:
    """A fresh torchvision model (with its classifier) of the same architecture as
    ``build_backbone(name, small_stem=small_stem, image_size=image_size)``.

    A saved encoder ``state_dict`` loads into it with ``strict=False`` and only the classifier
    (``classifier_key(name)``: ``fc.*`` for a ResNet) missing.

    Args:
        name: one of ``BACKBONES`` or :func:`torchvision_backbones`.
        small_stem: whether the encoder was built with the small-image stem (ResNets only).
        num_classes: output size of the new classifier.
        image_size: the input size of a ViT (:func:`is_sized`; 224 when None), passed as
            torchvision's ``image_size``; other models take any size and ignore it.
    """
    if name in TORCHVISION_RESNETS:
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    elif name == "resnet_tiny":
        model = ResNetTiny(num_classes=num_classes)
    elif is_factory(name):
        raise ConfigError(
            f"backbone {name} is a factory of your own, not a torchvision model: save its "
            "state_dict (safetensors) or a TorchScript export instead"
        )
    else:
        check_backbone_name(name)
        if small_stem:
            _refuse_small_stem(name)
        return torchvision.models.get_model(
            name, weights=None, num_classes=num_classes, **sized_kwargs(name, image_size)
        )
    if small_stem:
        _use_small_stem_(model)
    return model


@torch.no_grad()
def _infer_feature_dim(module: nn.Module, image_size: int = 64) -> int:
    """D of a user backbone, from one dummy forward in eval mode (restoring its mode after)."""
    was_training = module.training
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    module.eval()
    try:
        out = module(torch.zeros(2, 3, image_size, image_size, device=device))
    except NotImplementedError as exc:
        if type(module).forward is not nn.Module.forward:
            raise  # an op without a meta kernel: check_backbone runs it again on the CPU
        raise ConfigError(  # nn.Module's own forward: the class defines none
            f"The custom backbone {type(module).__name__} has no forward() ({exc}); define one "
            "mapping images [B, 3, S, S] to features [B, D]"
        ) from exc
    except Exception as exc:  # a module built for one input size, a wrong channel count, ...
        raise ConfigError(
            f"The custom backbone {type(module).__name__} failed on a dummy [2, 3, {image_size}, "
            f"{image_size}] batch ({type(exc).__name__}: {exc}); give the image size it takes "
            "(data.image_size / --image-size for a run; from Python, "
            "build_backbone(module, image_size=S), or feat_dim=D to skip the dummy batch)."
        ) from exc
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"The custom backbone {type(module).__name__} returned {shape} for a [2, 3, "
            f"{image_size}, {image_size}] batch; it must return pooled features [B, D] "
            "(replace its classifier with nn.Identity and flatten after pooling)."
        )
    return int(out.shape[1])


# where torchvision's classification models keep their ImageNet head (ResNet, RegNet: fc;
# MobileNet, EfficientNet, ConvNeXt, DenseNet, VGG: classifier; ViT: heads; Swin: head)
_CLASSIFIER_HEADS = ("fc", "classifier", "heads", "head")


def build_backbone(
    name: str | nn.Module,
    *,
    small_stem: bool = False,
    image_size: int | None = None,
    feat_dim: int | None = None,
) -> tuple[nn.Module, int]:
    """Build the encoder f: [B, 3, S, S] -> [B, D] and return ``(module, D)``.

    Args:
        name: ``"resnet18"`` (D=512), ``"resnet50"`` (D=2048), ``"resnet_tiny"`` (D=128), another
            torchvision classification model (``"convnext_tiny"``: D=768, its classifier's
            input), a factory ``"module:function"`` / ``"file.py:function"`` returning a module,
            or any ``nn.Module`` returning [B, D] features. A torchvision ``ResNet`` module with
            its 1000-class ImageNet ``fc`` gets that replaced by ``nn.Identity`` (in place), as
            the named ones do; otherwise a module's D is found by a dummy forward at
            ``image_size`` unless ``feat_dim`` is given.
        small_stem: use the CIFAR stem (3x3 stride-1 conv1, no max-pool) for images of ~32 px.
            ResNets by name only: for any other backbone it is an error (change its stem).
        image_size: the input size S: a ViT by name is built for it (torchvision's
            ``image_size``, 224 when None; other models by name take any S), and it is the S
            of the dummy batch that finds D of a user module (64 when None; a module that only
            takes its own input size needs its S).
        feat_dim: D of a user module, skipping the dummy forward.
    """
    if isinstance(name, nn.Module):
        if small_stem:
            raise ConfigError(
                f"build_backbone: small_stem=True applies to the named ResNets; a module of your "
                f"own ({type(name).__name__}) keeps its stem: change it yourself (for a "
                "torchvision ResNet, conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) and maxpool = "
                "nn.Identity()), or pass its name, e.g. build_backbone('resnet18', small_stem=True)"
            )
        if feat_dim is not None:
            return name, int(feat_dim)
        fc = getattr(name, "fc", None)
        if getattr(_without_imagenet_fc(name), "fc", None) is not fc:
            # torchvision's ImageNet classifier: its logits are no features; keep the pooled ones,
            # as for a backbone by name (a head of the user's own, or feat_dim=, is kept)
            return name, fc.in_features
        dim = _infer_feature_dim(name, 64 if image_size is None else image_size)
        head = next((h for h in _CLASSIFIER_HEADS if hasattr(name, h)), None)
        if dim == 1000 and head is not None:
            warnings.warn(
                f"build_backbone: {type(name).__name__} returns 1000 values and has a `{head}`: "
                "ImageNet class logits, it seems, not features. To train its features, replace "
                f"the head first (model.{head} = nn.Identity(), or the head's last Linear "
                "alone); to keep it, pass feat_dim=1000",
                stacklevel=2,
            )
        return name, dim
    if is_factory(name):
        if small_stem:
            _refuse_small_stem(name)
        module = _build_from_factory(name)
        try:
            return build_backbone(module, image_size=image_size, feat_dim=feat_dim)
        except ConfigError as exc:  # the dummy batch's: name the setting
            raise ConfigError(f"model.backbone={name}: {exc}") from exc.__cause__
    model = backbone_to_torchvision(name, small_stem, image_size=image_size)
    key = classifier_key(name)
    head = model.get_submodule(key)
    model.set_submodule(key, nn.Identity())
    parent = key.rpartition(".")[0]
    if parent:  # the classifier's dropout (MobileNet, EfficientNet, VGG) regularises the head,
        # which is gone: the projector gets the features whole (no parameters: same state_dict)
        for child, module in model.get_submodule(parent).named_children():
            if isinstance(module, nn.Dropout):
                model.set_submodule(f"{parent}.{child}", nn.Identity())
    return model, head.in_features
