"""Settings: presets resolve, and every bad setting is a ConfigError naming it, before any work."""

import pytest

from selfsup.errors import ConfigError
from selfsup.train.config import available_presets, config_hash, resolve_config


def test_quickstart_and_cifar10_presets_resolve_for_every_method():
    assert {"quickstart", "cifar10", "imagenette"} <= set(available_presets())
    for method in ("simclr", "moco", "byol", "simsiam"):
        cfg = resolve_config(method, "quickstart")
        assert cfg.data.source == "mnist5k" and cfg.method.name == method
        cfg = resolve_config(method, "cifar10")
        assert cfg.data.source == "cifar10" and cfg.train.batch_size == 512
        assert cfg.model.backbone == "resnet18" and cfg.model.small_stem


def test_flags_and_overrides_win_in_order():
    cfg = resolve_config("byol", "cifar10", flags={"train.epochs": 50}, overrides=["optim.lr=0.1"])
    assert cfg.train.epochs == 50 and cfg.optim.lr == 0.1
    assert cfg.method.tau_base == 0.99


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=0.1", "did you mean 'optim.lr'"),
        ("trian.epochs=3", "did you mean 'train'"),
        ("train.epochs=many", "train.epochs"),
        ("optim.lr=0", "optim.lr must be > 0"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("optim.name=adamw", "optim.name must be one of"),
        ("train.batch_size=1", "train.batch_size must be >= 2"),
        ("train.collapse=stopp", "did you mean 'stop'"),
        ("data.storage_size=16", "data.storage_size"),
        ("train.epochs", "key=value"),
    ],
)
def test_bad_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resolve_config("simclr", "quickstart", overrides=[override])


def test_unknown_preset_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean 'cifar10'"):
        resolve_config("simclr", "cifar01")


def test_config_hash_tracks_what_defines_the_weights():
    a = resolve_config("byol", "quickstart")
    b = resolve_config("byol", "quickstart", overrides=["train.epochs=99", "optim.lr=0.5"])
    c = resolve_config("byol", "quickstart", overrides=["model.backbone=resnet18"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_every_preset_file_is_packaged():
    """pyproject's package-data must ship every preset: a wheel without presets/cifar10/*.yaml
    or presets/quickstart/<method>.yaml would silently train another recipe."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["selfsup"]
    package = root / "selfsup"
    packaged = {p for g in globs for p in package.glob(g)}
    presets = set((package / "presets").rglob("*.yaml"))
    assert presets and presets <= packaged, sorted(str(p) for p in presets - packaged)


def test_a_gpu_index_the_machine_lacks_is_a_config_error(monkeypatch):
    """`train.device=cuda:5` on a one-GPU machine: a ConfigError naming the GPUs there are, not
    torch's "Invalid device id" from deep inside the first CUDA call."""
    import torch

    from selfsup.train.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"cuda:5.*shows 1 GPU \(cuda:0..cuda:0\)"):
        resolve_device("cuda:5")


def test_a_preset_that_is_not_yaml_is_a_one_line_config_error(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [\n")
    with pytest.raises(
        ConfigError, match="broken.yaml' is not valid YAML: while parsing"
    ) as caught:
        resolve_config("simclr", preset=str(broken))
    assert "\n" not in str(caught.value)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="not a mapping of settings"):
        resolve_config("simclr", preset=str(listing))


def test_augmentation_settings_are_checked_when_the_config_is_resolved():
    with pytest.raises(
        ConfigError, match=r"'augment.both.jitter_pp' \(did you mean 'augment.both.jitter_p'"
    ):
        resolve_config("byol", overrides=["augment.both.jitter_pp=0"])
    with pytest.raises(ConfigError, match=r"augment.view1.blur_p='abc': give a number"):
        resolve_config("byol", overrides=["augment.view1.blur_p=abc"])
    with pytest.raises(ConfigError, match=r"^augment.both.solarize_p=2: a probability"):
        resolve_config("byol", overrides=["augment.both.solarize_p=2"])
    with pytest.raises(ConfigError, match=r"augment.view2.crop_scale=\[0.5\]: give a pair"):
        resolve_config("byol", overrides=["augment.view2.crop_scale=[0.5]"])
    with pytest.raises(ConfigError, match=r"unknown setting 'augment.view3'"):
        resolve_config("byol", overrides=["augment.view3.blur_p=1"])
    resolve_config(
        "byol", overrides=["augment.both.crop_scale=[0.2,1.0]", "augment.view2.blur_p=0"]
    )


def test_selfsup_config_shows_the_method_defaults_and_resolved_views(capsys):
    from selfsup.cli import main

    assert main(["config", "--method", "moco", "augment.view2.blur_p=0.25"]) == 0
    out = capsys.readouterr().out
    assert "#   method.queue_size: 4096" in out and "#   method.bn_splits: 8" in out
    view2 = next(line for line in out.splitlines() if line.startswith("#   view2:"))
    assert "blur_p: 0.25" in view2 and "crop_scale: [0.3, 1.0]" in view2


def test_a_presets_eval_source_follows_its_own_source():
    """--preset stl10 monitors on stl10 while it pretrains on its own stl10-unlabeled; other
    data brings its own test split; an eval_source given by the user always stays."""
    assert resolve_config("byol", preset="stl10").data.eval_source == "stl10"
    same = ["data.source=stl10-unlabeled"]
    assert resolve_config("byol", preset="stl10", overrides=same).data.eval_source == "stl10"
    other = ["data.source=cifar10"]
    assert resolve_config("byol", preset="stl10", overrides=other).data.eval_source is None
    flag = {"data.source": "cifar10"}
    assert resolve_config("byol", preset="stl10", flags=flag).data.eval_source is None
    given = ["data.source=cifar10", "data.eval_source=stl10"]
    assert resolve_config("byol", preset="stl10", overrides=given).data.eval_source == "stl10"


def test_an_augment_section_that_is_not_a_mapping_is_a_config_error():
    with pytest.raises(ConfigError, match=r"augment.both=5: give settings by key"):
        resolve_config("byol", overrides=["augment.both=5"])
    with pytest.raises(ConfigError, match=r"augment.both: Interpolation key"):
        resolve_config("byol", overrides=["augment.both.crop_scale=${augment.both.foo}"])
