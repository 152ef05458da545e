"""The run configuration: OmegaConf structured dataclasses, YAML presets, ``key=value`` overrides.

Resolution order, later wins: dataclass defaults -> preset YAML -> CLI flags -> overrides.
Unknown keys and wrong types are :class:`~selfsup.errors.ConfigError` with a "did you mean" hint,
raised before any data is read.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from selfsup.checks import read_text_file
from selfsup.data.decode import storage_size_for_crop
from selfsup.data.sources import parse_source
from selfsup.errors import ConfigError
from selfsup.precision import PRECISIONS


@dataclass
class DataConfig:
    source: str = "mnist5k"  # folder, .tar/.tar.gz, cifar10/100, stl10(-unlabeled), mnist5k
    image_size: int = 32  # side of the square crops the network sees
    storage_size: int | None = None  # side of the cached uint8 images; None: image_size
    eval_crop: float = 1.0  # evaluation: centre crop of this fraction of the side (0.875: 224/256)
    cache_dir: str | None = None  # None: $SELFSUP_CACHE or ~/.cache/selfsup
    eval_source: str | None = None  # labeled data for kNN monitoring; None: source's test split
    mean: list[float] | None = None  # None: the dataset's own statistics
    std: list[float] | None = None
    workers: int | None = None  # decode workers while building the cache
    limit: int | None = None  # use only N images of each split, evenly spaced (quick trials)


@dataclass
class ModelConfig:
    # a torchvision ResNet (resnet18/34/50/101/152, wide_resnet*, resnext*) or resnet_tiny
    backbone: str = "resnet18"
    small_stem: bool = True  # 3x3 conv, no max-pool: for 32-64 px images
    # starting weights: None (random), imagenet (torchvision's), a run directory or weights file
    init: str | None = None
    # the backbone's BatchNorm momentum (running statistics); None: the model's own (0.1, but
    # 0.01 in torchvision's MobileNetV3, whose statistics then lag in short runs)
    bn_momentum: float | None = None


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd or lars
    lr: float = 0.06  # base learning rate, scaled by batch_size / lr_reference_batch
    lr_scaling: str = "linear"  # linear, sqrt or none
    lr_reference_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # cosine ends at lr * min_lr_ratio
    # bias and norm params: no weight decay (and no LARS adaptation); None: on for LARS, off for SGD
    exclude_bias_norm: bool | None = None
    trust_coefficient: float = 0.001  # LARS eta


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 512
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    # auto: bf16 on GPUs that compute in it natively, fp16 (loss-scaled) on older GPUs, fp32 on
    # the CPU; or bf16, fp16, fp32 (selfsup/precision.py)
    precision: str = "auto"
    compile: str = "auto"  # torch.compile the method's forward: auto (on CUDA), true or false
    channels_last: bool = True  # on CUDA only
    log_every: int = 50  # steps between host syncs for loss/lr/throughput logging
    knn_every: int = 10  # epochs between kNN checks (0: only at the end)
    knn_k: int = 200
    knn_temperature: float = 0.1
    checkpoint_every: int = 1  # epochs
    collapse: str = "warn"  # off, warn or stop
    collapse_every: int = 200  # steps between collapse checks
    collapse_patience: int = 3
    on_nan: str = "stop"  # stop or skip
    sync_bn: bool = False  # under torchrun on CUDA: SyncBatchNorm (BN over the global batch)
    progress: bool = True
    time_limit_min: float | None = (
        None  # checkpoint and stop after this many minutes (resume later)
    )
    stop_after_epochs: int | None = (
        None  # checkpoint and stop after this many epochs of this invocation (resume later)
    )


@dataclass
class RunConfig:
    method: dict[str, Any] = field(default_factory=lambda: {"name": "simclr"})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: dict[str, Any] = field(default_factory=lambda: {"view1": {}, "view2": {}})
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs/quickstart"


PRESET_DIR = "presets"
DEFAULT_METHOD = "simclr"  # with no --method and no method.name in a preset file


def available_presets() -> list[str]:
    """Preset names shipped with the package: ``quickstart`` and one per dataset folder."""
    root = resources.files("selfsup") / PRESET_DIR
    names = []
    for entry in root.iterdir():
        if entry.name.endswith(".yaml"):
            names.append(entry.name[: -len(".yaml")])
        elif entry.is_dir() and not entry.name.startswith("_"):
            names.append(entry.name)
    return sorted(set(names))


def preset_texts(preset: str, method: str) -> list[str]:
    """YAML texts of a preset, merged in order: a path; or ``presets/<preset>.yaml`` (shared by
    every method) then ``presets/<preset>/<method>.yaml`` (the method's recipe), either optional."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ConfigError(f"preset file {preset!r} does not exist")
        return [read_text_file(path, "preset file")]
    root = resources.files("selfsup") / PRESET_DIR
    texts = [
        f.read_text()
        for f in (root / f"{preset}.yaml", root / preset / f"{method}.yaml")
        if f.is_file()
    ]
    if texts:
        return texts
    if (root / preset).is_dir():
        have = sorted(p.name[:-5] for p in (root / preset).iterdir() if p.name.endswith(".yaml"))
        raise ConfigError(f"preset {preset!r} has no recipe for method {method!r}; it has: {have}")
    raise ConfigError(
        f"unknown preset {preset!r}{_did_you_mean(preset, available_presets())}; "
        f"available: {available_presets()} or a path to a .yaml file"
    )


def eval_storage_size(data: Any) -> int:
    """The stored size evaluation's centre crop needs: ``data.image_size / data.eval_crop``
    (the crop size itself at ``eval_crop`` 1; 146 px for 128 px crops at 0.875)."""
    return storage_size_for_crop(data.image_size, data.eval_crop)


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(node: Any, schema: Any, prefix: str) -> None:
    """ConfigError for keys of ``node`` absent from ``schema`` (free-form dicts are skipped)."""
    if not isinstance(node, dict) or not isinstance(schema, DictConfig):
        return
    for key, value in node.items():
        if prefix in ("method.", "augment.") or prefix.startswith("augment."):
            continue  # validated against the method / augmentation signatures when built
        if key not in schema:
            where = f"{prefix}{key}"
            choices = [f"{prefix}{k}" for k in schema.keys()]
            hint = _did_you_mean(where, choices)
            if not prefix:  # `epochs=1`: the key of a section (train.epochs)?
                sections = [s for s in schema.keys() if isinstance(schema[s], DictConfig)]
                owners = [f"{s}.{key}" for s in sections if key in schema[s]]
                hint = f" (did you mean {' or '.join(map(repr, owners))}?)" if owners else hint
            raise ConfigError(f"unknown setting {where!r}{hint}")
        if isinstance(schema[key], DictConfig) and not isinstance(value, dict):
            # `train=5`: OmegaConf would say "Merge error: int is not a subclass of TrainConfig"
            keys = list(schema[key].keys())
            example = f"{prefix}{key}.{keys[0]}" if keys else f"{prefix}{key}.<key>"
            listed = f" ({', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''})" if keys else ""
            raise ConfigError(
                f"{prefix}{key} is a section of settings{listed}, not a value; set one of its "
                f"keys, e.g. {example}=..."
            )
        _check_keys(value, schema[key], f"{prefix}{key}.")


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    try:
        _check_keys(
            OmegaConf.to_container(update) if isinstance(update, DictConfig) else update, base, ""
        )
        return OmegaConf.merge(base, update)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        msg = str(exc).splitlines()[0]
        if msg.startswith("Incompatible value 'None'"):  # `train.epochs=`: YAML reads null
            kind = msg.split("of type ")[-1].strip("'")
            msg = f"it needs a value of type {kind}; an empty one is read as null"
        raise ConfigError(f"{source}: setting {key!r}: {msg}") from None


def load_run_config(path: Path) -> DictConfig:
    """A run's ``config.yaml`` as written (empty: no settings); one edited into invalid YAML, or
    damaged into no text or no mapping, is a ConfigError naming the file, not a yaml traceback
    from whichever command read it (eval, embed, export, --resume)."""
    text = read_text_file(path, "run config", fix="restore the run's own config.yaml")
    try:
        cfg = OmegaConf.create(text)
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        where = " ".join(str(exc).split())  # PyYAML's message spans several lines
        raise ConfigError(
            f"{path} is not valid YAML: {where}; the run's settings are read from it: undo the "
            "edit that broke it (or restore the file)"
        ) from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(
            f"{path} is YAML but not a mapping of settings (a run's config.yaml starts "
            "'method:'); undo the edit that broke it (or restore the file)"
        )
    return cfg


INTERPOLATION_HINT = (
    "an interpolation ${...} names another setting (e.g. ${train.batch_size}) or an "
    "environment variable (${oc.env:NAME}); or write the value itself"
)


def _resolve_interpolations(cfg: DictConfig) -> None:
    """Replace each ``${...}`` of a preset or override by its value, in place: one that names
    no setting (or an unset environment variable), or gives a value of the wrong type, is a
    ConfigError naming the setting, not an omegaconf traceback when the setting is first read."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        msg = " ".join(str(exc).splitlines()[0].split())
        raise ConfigError(f"setting {key!r}: {msg}; {INTERPOLATION_HINT}") from None


def resolve_config(
    method: str | None,
    preset: str | None = "quickstart",
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    *,
    shared_overrides: bool = False,
) -> DictConfig:
    """Build the fully resolved run config; every error here happens before any long work.

    ``method`` ``None`` takes the ``method.name`` a preset file sets, else ``simclr``; a method
    given and a preset that names another is an error (the recipe is that method's). An
    override of an option only other methods take is an error too (it would change nothing),
    unless ``shared_overrides``: the same overrides for runs of several methods (ablate, bench).
    """
    if isinstance(method, str):
        method = method.lower()  # "SimCLR", as build_method takes it
    cfg = OmegaConf.structured(RunConfig)
    cfg.method = {"name": method or DEFAULT_METHOD}
    if preset:
        named = None  # the method.name the preset's own text sets
        for text in preset_texts(preset, method or DEFAULT_METHOD):
            try:
                loaded = OmegaConf.create(text)
            except (OmegaConfBaseException, yaml.YAMLError) as exc:
                where = " ".join(str(exc).split())  # PyYAML's message spans several lines
                raise ConfigError(f"preset {preset!r} is not valid YAML: {where}") from None
            if not isinstance(loaded, DictConfig):
                raise ConfigError(
                    f"preset {preset!r} is YAML but not a mapping of settings (e.g. "
                    "'optim: {lr: 0.1}')"
                )
            named = OmegaConf.select(loaded, "method.name", default=None) or named
            cfg = _merge(cfg, loaded, f"preset {preset!r}")
        if method is not None and named is not None and named != method:
            raise ConfigError(
                f"preset {preset!r} is a recipe for method.name={named}, not --method {method}; "
                f"drop --method (or pass --method {named}), or change method.name in the file"
            )
        cfg.method.name = method or named or DEFAULT_METHOD
    preset_source, preset_eval_source = cfg.data.source, cfg.data.eval_source
    if flags:
        for key, value in flags.items():  # `--data ""`: YAML would read the empty text as null
            if isinstance(value, str) and not value.strip():
                if key == "data.source":
                    parse_source(value)  # its message lists the accepted forms
                raise ConfigError(f"{key} is empty (an empty command-line flag); give it a value")
        # as given, not read as YAML: `--backbone nets.py:` is text, not a mapping
        given = OmegaConf.create()
        for key, value in flags.items():
            if value is not None:
                OmegaConf.update(given, key, _flag_value(key, value), force_add=True)
        cfg = _merge(cfg, given, "command-line flag")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.1)")
        try:
            update = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as exc:  # `train.epochs=${`: a broken interpolation
            raise ConfigError(
                f"override {item!r}: {str(exc).splitlines()[0]}; {INTERPOLATION_HINT}"
            ) from None
        cfg = _merge(cfg, update, f"override {item!r}")
    _resolve_interpolations(cfg)
    keys = override_keys(overrides)
    if not shared_overrides:
        _refuse_other_methods_options(cfg.method.name, keys)
    eval_source_given = any(k == "data.eval_source" or k == "data" for k in keys)
    if (
        preset_eval_source is not None
        and not eval_source_given
        and cfg.data.eval_source == preset_eval_source
        and cfg.data.source != preset_source
    ):
        # a preset's eval_source belongs to its own source (stl10-unlabeled -> stl10): other
        # data is monitored on its own test split, not on a dataset downloaded for the purpose
        cfg.data.eval_source = None
    if cfg.train.collapse in ("False", "false"):  # YAML 1.1 reads a bare `off` as false
        cfg.train.collapse = "off"
    from selfsup.data.sources import absolute_source

    for key in ("source", "eval_source"):  # a relative path would only work from this folder
        cfg.data[key] = absolute_source(cfg.data[key])
    _fit_backbone_settings(
        cfg, given=[*keys, *(k for k, v in (flags or {}).items() if v is not None)]
    )
    validate_config(cfg)
    if cfg.optim.exclude_bias_norm is None:  # the papers skip biases and norms in LARS only
        cfg.optim.exclude_bias_norm = cfg.optim.name == "lars"
    return cfg


def refuse_flag_and_override(
    flags: dict[str, Any], overrides: list[str] | None, spellings: dict[str, str] | None = None
) -> None:
    """A setting given both by its flag (``--epochs 2``; ``epochs=2`` in Python) and by a
    ``key=value`` override with another value (``train.epochs=3``) is an error: the override
    would win without a word, and the run would not be the one the flag asked for.
    ``spellings`` names each flag as the user wrote it (``{"train.epochs": "--epochs "}``)."""
    for item in overrides or []:
        key, _, text = item.partition("=")
        key = key.strip()
        flag = flags.get(key)
        if flag is None or "=" not in item:
            continue
        try:  # the value as the override sets it (YAML: `2` is a number)
            value = OmegaConf.select(OmegaConf.from_dotlist([item]), key)
        except (OmegaConfBaseException, yaml.YAMLError):
            value = text
        if value != _flag_value(key, flag) and str(value) != str(flag):
            name = (spellings or {}).get(key, f"{key}=")
            raise ConfigError(
                f"{key} is given twice: {name}{flag} and the override {item}; give one of them"
            )


def override_keys(overrides: list[str] | None) -> list[str]:
    """The keys of ``key=value`` overrides (``optim.lr`` of ``optim.lr=0.1``)."""
    return [item.split("=", 1)[0].strip() for item in overrides or []]


def _flag_value(key: str, value: Any) -> Any:
    """A flag's value as the config holds it: text, numbers and booleans as they are; a path
    or ``torch.device`` as text, a numpy scalar as its Python number."""
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return value.item()
    if type(value).__name__ == "device":  # torch.device, without importing torch here
        return str(value)
    raise ConfigError(
        f"{key}={value!r}: give text, a number or a boolean, not a {type(value).__name__}"
    )


def _fit_backbone_settings(cfg: DictConfig, given: list[str]) -> None:
    """A backbone other than a ResNet drops the small-image stem that the defaults and presets
    set for ResNets (``model.small_stem=true`` given by the user stays, and is refused); a
    factory's file path is made absolute, as data paths are, so a resume or ``load_encoder``
    from another folder finds it."""
    from selfsup.models.backbones import is_factory, is_resnet

    backbone = cfg.model.backbone
    if not isinstance(backbone, str):
        return
    if not is_resnet(backbone) and cfg.model.small_stem and "model.small_stem" not in given:
        cfg.model.small_stem = False
    if is_factory(backbone):
        where, _, function = backbone.rpartition(":")
        if where.endswith(".py"):
            cfg.model.backbone = f"{Path(where).expanduser().resolve()}:{function}"
        elif (
            "model.backbone" in given
            and where.isidentifier()
            and (Path.cwd() / f"{where}.py").is_file()
        ):
            # a one-file module of this folder (`--backbone nets:small_cnn`): its path, so a
            # resume from another folder imports the same file
            cfg.model.backbone = f"{(Path.cwd() / f'{where}.py').resolve()}:{function}"


def _methods_taking(option: str) -> list[str]:
    """The methods whose constructor takes ``option`` (``method.<option>``)."""
    from selfsup.methods import METHOD_CLASSES, method_options

    return [m for m in METHOD_CLASSES if option in method_options(m)]


def _refuse_other_methods_options(name: Any, keys: list[str]) -> None:
    """A ``method.X`` the user set that only other methods take would be ignored in silence (a
    preset's are: one file serves every method), as if it had an effect: an error instead."""
    if not any(key.startswith("method.") for key in keys):
        return
    from selfsup.methods import METHOD_CLASSES, method_options

    if name not in METHOD_CLASSES:
        return  # validate_method_and_model names the method
    own = set(method_options(name))
    for key in keys:
        option = key.removeprefix("method.")
        if not key.startswith("method.") or option in own or option == "name":
            continue
        owners = _methods_taking(option)
        if owners:
            raise ConfigError(
                f"{key} is an option of {' and '.join(owners)}; {name} does not take it, so it "
                f"would change nothing: drop it (or choose --method {owners[0]}). {name} takes "
                f"{[f'method.{k}' for k in sorted(own)]}"
            )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _require_choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    """Refuse a value outside ``allowed``, suggesting the nearest choice."""
    _require(
        value in allowed,
        f"{key} must be one of {list(allowed)}, got {value!r}"
        f"{_did_you_mean(str(value), list(allowed))}",
    )


def _validate_train(t: DictConfig) -> None:
    """The ``train`` section: length, batch, logging, checks, kNN, device."""
    _require(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    _require(
        t.batch_size >= 2,
        f"train.batch_size must be >= 2 (two views need pairs), got {t.batch_size}",
    )
    _require(
        t.collapse_every >= 1,
        f"train.collapse_every must be >= 1 (steps between collapse checks; train.collapse=off "
        f"turns them off), got {t.collapse_every}",
    )
    _require(
        t.collapse_patience >= 1,
        f"train.collapse_patience must be >= 1 (checks in a row), got {t.collapse_patience}",
    )
    for key in ("time_limit_min", "stop_after_epochs"):
        value = t[key]
        _require(value is None or value > 0, f"train.{key} must be > 0 (or null), got {value}")
    for key, allowed in (
        ("precision", PRECISIONS),
        ("compile", ("auto", "true", "false")),
        ("collapse", ("off", "warn", "stop")),
        ("on_nan", ("stop", "skip")),
    ):
        value = str(t[key]).lower() if key == "compile" else t[key]
        _require_choice(f"train.{key}", value, allowed)
    _require(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    _require(t.knn_every >= 0, f"train.knn_every must be >= 0, got {t.knn_every}")
    _require(
        t.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {t.checkpoint_every}"
    )
    _require(
        t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
        f"train.device must be auto, cpu or cuda[:N], got {t.device!r}",
    )
    _require(t.knn_k >= 1, f"train.knn_k must be >= 1, got {t.knn_k}")
    _require(t.knn_temperature > 0, f"train.knn_temperature must be > 0, got {t.knn_temperature}")


def _validate_optim(o: DictConfig, t: DictConfig) -> None:
    """The ``optim`` section (its warm-up against ``train.epochs``)."""
    _require(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _require(0 <= o.momentum < 1, f"optim.momentum must be in [0, 1), got {o.momentum}")
    _require(o.warmup_epochs >= 0, f"optim.warmup_epochs must be >= 0, got {o.warmup_epochs}")
    _require(
        o.warmup_epochs < t.epochs or o.warmup_epochs == 0,
        f"optim.warmup_epochs ({o.warmup_epochs}) must be below train.epochs ({t.epochs})",
    )
    _require_choice("optim.name", o.name, ("sgd", "lars"))
    _require_choice("optim.lr_scaling", o.lr_scaling, ("linear", "sqrt", "none"))
    _require(
        o.lr_reference_batch >= 1,
        f"optim.lr_reference_batch must be >= 1 (the batch the base lr is given for), got "
        f"{o.lr_reference_batch}",
    )
    _require(
        0 <= o.min_lr_ratio <= 1,
        f"optim.min_lr_ratio must be in [0, 1] (the cosine's final lr as a fraction of the "
        f"base), got {o.min_lr_ratio}",
    )
    _require(
        o.trust_coefficient > 0,
        f"optim.trust_coefficient (LARS eta) must be > 0, got {o.trust_coefficient}",
    )


def _validate_data(d: DictConfig, t: DictConfig) -> None:
    """The ``data`` section: sizes, crops, limit (against ``train.batch_size``), mean/std."""
    _require(d.image_size >= 8, f"data.image_size must be >= 8, got {d.image_size}")
    _require(
        d.storage_size is None or d.storage_size >= d.image_size,
        f"data.storage_size ({d.storage_size}) must be >= data.image_size ({d.image_size}); "
        f"set data.storage_size="
        f"{eval_storage_size(d) if d.eval_crop < 1 else round(d.image_size * 1.14)}"
        " too (the imagenette preset's margin of 1 / 0.875)"
        + (" or data.storage_size=null (cache at the crop size)" if d.eval_crop == 1 else ""),
    )
    _require(
        0 < d.eval_crop <= 1,
        f"data.eval_crop={d.eval_crop} must lie in (0, 1] (the fraction of the image that "
        "evaluation's centre crop keeps; 1: all of it, 0.875: ImageNet's 224/256)",
    )
    if 0 < d.eval_crop < 1:  # the centre crop needs a margin in the cache, or it upsamples
        needed = eval_storage_size(d)
        _require(
            (d.storage_size or d.image_size) >= needed,
            f"data.eval_crop={d.eval_crop} takes the central {d.image_size} px of "
            f"{needed} px images: set data.storage_size={needed} (it is "
            f"{d.storage_size or d.image_size}), or data.eval_crop=1",
        )
    _require(d.limit is None or d.limit >= 2, f"data.limit must be >= 2, got {d.limit}")
    _require(
        d.limit is None or d.limit >= t.batch_size,
        f"data.limit={d.limit} keeps at most {d.limit} images, fewer than one batch "
        f"(train.batch_size={t.batch_size}); lower --batch-size, or raise data.limit if the "
        "data holds more images",
    )
    for key in ("mean", "std"):
        value = d[key]
        _require(value is None or len(value) == 3, f"data.{key} needs 3 values (RGB), got {value}")
    _require(
        (d.mean is None) == (d.std is None),
        f"data.mean and data.std are given together (or neither: the data's own statistics); "
        f"got mean={d.mean}, std={d.std}",
    )
    _require(
        d.std is None or all(v > 0 for v in d.std), f"data.std must be > 0 per channel, got {d.std}"
    )


def validate_config(cfg: DictConfig) -> None:
    """Impossible values, named with the setting and a fix."""
    _validate_train(cfg.train)
    _validate_optim(cfg.optim, cfg.train)
    _validate_data(cfg.data, cfg.train)
    validate_method_and_model(cfg)
    resolve_views(cfg)  # augmentation keys and values, before any data is read


AUGMENT_SECTIONS = ("both", "view1", "view2")


def resolve_views(cfg: DictConfig):
    """The method's preset ``(view1, view2)`` :class:`ViewConfig` with ``augment.both.*`` then
    ``augment.view1.*`` / ``augment.view2.*`` applied; a :class:`ConfigError` names the setting as
    written (``augment.both.blur_p``) for an unknown key, a non-number or an impossible value."""
    from dataclasses import fields

    from selfsup.augment import ViewConfig, augment_preset  # torch: only once a config is built

    for key in cfg.augment:
        _require(
            key in AUGMENT_SECTIONS,
            f"unknown setting 'augment.{key}'; use augment.view1.*, augment.view2.* or "
            "augment.both.*",
        )
    names = sorted(f.name for f in fields(ViewConfig))

    def plain(section: str) -> dict:
        node = cfg.augment.get(section)
        if node is None:
            return {}
        _require(
            isinstance(node, DictConfig),
            f"augment.{section}={node!r}: give settings by key, e.g. augment.{section}.blur_p=0.5",
        )
        try:
            return OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"augment.{section}: {' '.join(str(exc).split())}") from None

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    preset = augment_preset(cfg.method.name, cfg.data.image_size)
    views = []
    for view_name, preset_view in (("view1", preset.view1.cfg), ("view2", preset.view2.cfg)):
        values = {name: getattr(preset_view, name) for name in names}
        written: dict[str, str] = {}
        for section in ("both", view_name):
            for key, value in plain(section).items():
                setting = f"augment.{section}.{key}"
                _require(
                    key in values,
                    f"unknown setting {setting!r}"
                    f"{_did_you_mean(setting, [f'augment.{section}.{n}' for n in names])}; "
                    f"valid: {names}",
                )
                if isinstance(values[key], tuple):
                    ok = isinstance(value, list | tuple) and len(value) == 2
                    ok = ok and all(number(v) for v in value)
                    _require(ok, f"{setting}={value!r}: give a pair of numbers, e.g. [0.2, 1.0]")
                    value = tuple(value)
                else:
                    _require(number(value), f"{setting}={value!r}: give a number")
                values[key], written[key] = value, setting
        try:
            views.append(ViewConfig(**values))
        except ConfigError as exc:
            message = str(exc)
            for key, setting in written.items():  # "ViewConfig.blur_p=5" -> "augment.both.blur_p=5"
                message = message.replace(f"augmentation setting ViewConfig.{key}=", f"{setting}=")
            raise ConfigError(message) from None
    return views[0], views[1]


def validate_method_and_model(cfg: DictConfig) -> None:
    """Method name, method options (against the method's constructor) and backbone, before any
    data is read: ``build_method`` would only find these after the dataset is decoded."""
    import inspect

    from selfsup.methods import METHOD_CLASSES, method_defaults, method_options, option_problem
    from selfsup.models.backbones import check_backbone, is_factory

    name = cfg.method.get("name")
    _require(
        name in METHOD_CLASSES,
        f"method.name must be one of {list(METHOD_CLASSES)}, got "
        f"{name!r}{_did_you_mean(str(name), list(METHOD_CLASSES))}",
    )
    backbone = cfg.model.backbone
    _require(
        isinstance(backbone, str),
        f"model.backbone must be a name or module:function, got {backbone!r}",
    )
    check_backbone(
        backbone,
        small_stem=bool(cfg.model.small_stem),
        image_size=cfg.data.image_size,
        storage_size=cfg.data.storage_size,
    )
    bn_momentum = cfg.model.get("bn_momentum")
    _require(
        bn_momentum is None
        or (isinstance(bn_momentum, int | float) and not isinstance(bn_momentum, bool)
            and 0 < bn_momentum <= 1),
        f"model.bn_momentum must be null (the model's own) or in (0, 1], got {bn_momentum!r}",
    )  # fmt: skip
    init = cfg.model.get("init")
    _require(
        init is None or (isinstance(init, str) and init.strip() != ""),
        f"model.init must be imagenet, a run directory or a weights file, got {init!r}",
    )
    if init == "imagenet":  # torchvision's weights have the ImageNet stem: say so before a download
        _require(
            backbone != "resnet_tiny" and not is_factory(backbone),
            "model.init=imagenet: torchvision has no ImageNet weights for "
            f"model.backbone={backbone}; choose a torchvision model (resnet18, resnet50, "
            "convnext_tiny, ...) or pass model.init=PATH (a run directory or a weights file)",
        )
        _require(
            not cfg.model.small_stem,
            "model.init=imagenet: torchvision's ImageNet weights have the ImageNet stem (7x7 "
            "conv1 and max-pool); set model.small_stem=false (and --image-size 96 or more, so "
            "the last stage still sees a few pixels)",
        )
    own = method_options(name)
    # options of other methods are allowed (and ignored), so one preset serves every method
    known = sorted({k for m in METHOD_CLASSES for k in method_options(m)})
    defaults = method_defaults(name)
    for key, value in cfg.method.items():
        if key == "name":
            continue
        where = f"method.{key}"
        if key not in known:
            hint = _did_you_mean(where, [f"method.{k}" for k in own])
            close = difflib.get_close_matches(str(key), [k for k in known if k not in own], n=1)
            if not hint and close:  # another method's option: say that this one does not take it
                owners = _methods_taking(close[0])
                hint = (
                    f" (did you mean {'method.' + close[0]!r}? an option of "
                    f"{' and '.join(owners)}, which {name} does not take)"
                )
            raise ConfigError(
                f"unknown setting {where!r} for method {name!r}{hint}; {name} takes "
                f"{[f'method.{k}' for k in own]}"
            )
        if key not in own:
            continue
        default = defaults[key]
        if value is None or default is None or default is inspect.Parameter.empty:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        ok = (
            isinstance(value, bool)
            if isinstance(default, bool)
            else (
                number and (isinstance(value, int) or isinstance(default, float))
                if isinstance(default, int | float)
                else isinstance(value, type(default))
            )
        )
        _require(
            ok,
            f"{where} must be of type {type(default).__name__} (default {default!r}), "
            f"got {value!r}",
        )
        problem = option_problem(key, value)
        _require(problem is None, str(problem))
    if name == "moco":

        def option(key: str):  # None means the method's default; 0 is a value to check
            value = cfg.method.get(key)
            return defaults[key] if value is None else value

        queue = option("queue_size")
        batch = cfg.train.batch_size
        multiple = max(batch, round(queue / batch) * batch)
        _require(
            queue >= 1 and queue % batch == 0,
            f"method.queue_size={queue} is not a positive multiple of "
            f"train.batch_size={batch} (MoCo enqueues whole batches); use "
            f"method.queue_size={multiple} or a batch size that divides {queue}",
        )
        splits = option("bn_splits")
        _require(
            splits >= 1 and batch % splits == 0 and batch // splits >= 2,
            f"method.bn_splits={splits} must be >= 1 and divide train.batch_size={batch} into "
            f"groups of at least 2 images (MoCo normalises the batch in {splits} equal groups); "
            f"use method.bn_splits=1 for plain BatchNorm or a batch size that is a multiple of "
            f"{2 * max(splits, 1)}",
        )


def config_hash(cfg: DictConfig, keys: tuple[str, ...] = ("method", "model", "augment")) -> str:
    """Short hash of the parts of a config that define what a checkpoint's weights mean."""
    part = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in keys}
    if isinstance(part.get("model"), dict) and part["model"].get("init") is None:
        part["model"].pop("init", None)  # runs from before model.init keep their hash
    if isinstance(part.get("model"), dict) and part["model"].get("bn_momentum") is None:
        part["model"].pop("bn_momentum", None)  # and from before model.bn_momentum
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:12]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def defaults_comment(cfg: DictConfig) -> str:
    """YAML comment lines with what the settings ``cfg`` leaves unset resolve to: the method's
    defaults for each ``method.*`` key it does not set, and both views' augmentation. Printed
    by ``selfsup config`` and appended to a run's config.yaml, so every value a run used can be
    read there (and overridden) even though the config itself names only what was set."""
    import dataclasses

    from selfsup.methods import method_defaults

    lines = [f"# method.* not set above take {cfg.method.name}'s defaults:"]
    for key, default in method_defaults(cfg.method.name).items():
        if key not in cfg.method:
            lines.append(f"#   method.{key}: {json.dumps(default)}")
    lines.append("# the two views: the method's recipe with the augment.* settings above applied")
    lines.append(
        "# (override any key as augment.view1.<key>, augment.view2.<key> or augment.both.<key>):"
    )
    for name, view in zip(("view1", "view2"), resolve_views(cfg), strict=True):
        values = ", ".join(f"{k}: {json.dumps(v)}" for k, v in dataclasses.asdict(view).items())
        lines.append(f"#   {name}: {{{values}}}")
    return "\n".join(lines) + "\n"
