"""``selfsup.pretrain``: the Python call trains what ``selfsup pretrain`` trains, with the same
arguments, and refuses bad settings before any data is decoded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tiny_runs import TINY, run

import selfsup
from selfsup.errors import ConfigError, DataError, SelfsupError
from selfsup.run import _override_strings, pretrain_config

_NO_FLAGS = {"preset": None, "resume": False, "flags": {}, "overrides": []}


def _tiny_overrides(tmp_path) -> dict:
    """TINY as the dict a Python user would write."""
    pairs = dict(item.split("=", 1) for item in TINY)
    return pairs | {"data.cache_dir": str(tmp_path / "cache"), "train.epochs": 1}


def test_pretrain_from_python_equals_the_command_line(tmp_path) -> None:
    assert run(tmp_path, "byol", "train.epochs=1", out="cli") == 0
    overrides = _tiny_overrides(tmp_path)
    overrides["augment.both.crop_scale"] = [0.5, 1.0]  # a list, not its text
    overrides["train.progress"] = False  # a bool
    result = selfsup.pretrain("byol", out=tmp_path / "api", overrides=overrides)
    assert result.finished and result.run_dir == tmp_path / "api"
    cli_cfg = OmegaConf.load(tmp_path / "cli" / "config.yaml")
    api_cfg = OmegaConf.load(tmp_path / "api" / "config.yaml")
    cli_cfg.out = api_cfg.out = None
    assert OmegaConf.to_container(api_cfg) == OmegaConf.to_container(cli_cfg)
    saved = json.loads((tmp_path / "api" / "results.json").read_text())
    assert result.results == saved
    cli_saved = json.loads((tmp_path / "cli" / "results.json").read_text())
    # the same seeded run: the same final loss and kNN accuracy, on the CPU exactly
    assert saved["final_loss"] == pytest.approx(cli_saved["final_loss"], rel=1e-6)
    assert saved["knn_top1"] == cli_saved["knn_top1"]
    assert (tmp_path / "api" / "encoder.pt").is_file()


def test_pretrain_from_python_resumes_to_more_epochs(tmp_path) -> None:
    overrides = _tiny_overrides(tmp_path) | {"data.limit": 256}
    first = selfsup.pretrain("simsiam", out=tmp_path / "r", overrides=overrides)
    assert first.results["epochs"] == 1
    del overrides["train.epochs"]  # key=value settings win over the flags, as on the command line
    again = selfsup.pretrain(out=tmp_path / "r", epochs=2, resume=True, overrides=overrides)
    assert again.finished and again.results["epochs"] == 2
    assert again.results["method"] == "simsiam"  # the run's own method, none given
    assert OmegaConf.load(tmp_path / "r" / "config.yaml").train.epochs == 2


def test_pretrain_from_python_refuses_bad_settings_before_decoding(tmp_path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match="optim.lrr"):
        selfsup.pretrain(out=tmp_path / "a", overrides={"optim.lrr": 0.1, "data.cache_dir": cache})
    with pytest.raises(SelfsupError, match="no-such-folder"):
        selfsup.pretrain(data=tmp_path / "no-such-folder", out=tmp_path / "b")
    with pytest.raises(ConfigError, match="key=value"):
        selfsup.pretrain(out=tmp_path / "c", overrides="optim.lr=0.1")
    assert not cache.exists()  # nothing decoded
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_pretrain_names_a_module_given_as_a_setting_and_a_missing_folder_first(tmp_path) -> None:
    """A backbone module (in the argument or an override) is a ConfigError that points to the
    own-loop recipe, not a YAML or JSON error; a missing folder is named before a limit that
    only the folder's recipe would make too small."""
    from torchvision.models import resnet18

    for call in (
        {"backbone": resnet18()},
        {"overrides": {"model.backbone": resnet18()}},
    ):
        with pytest.raises(ConfigError, match=r"model.backbone is a ResNet module.*build_method"):
            selfsup.pretrain("simclr", out=tmp_path / "m", **call)
    with pytest.raises(ConfigError, match=r"x=<object .*\(of type object\) is not a setting"):
        selfsup.pretrain(out=tmp_path / "o", overrides={"x": object()})
    with pytest.raises(DataError, match=r"^data.source: .*nope.* is not an existing folder"):
        selfsup.pretrain("simclr", data=tmp_path / "nope", limit=256, out=tmp_path / "n")
    assert not any((tmp_path / name).exists() for name in "mon")


def test_the_embedded_digits_named_as_data_train_with_the_quickstart_recipe(tmp_path) -> None:
    """--data mnist5k is the quickstart's data; without --preset it gets the quickstart's recipe
    (the general defaults are resnet18 for 100 epochs at batch 512), and a preset still wins."""
    quickstart, _ = pretrain_config(None, None, **_NO_FLAGS, out=tmp_path / "q")
    named, _ = pretrain_config(None, "mnist5k", **_NO_FLAGS, out=tmp_path / "n")
    settings = [OmegaConf.to_container(c) for c in (quickstart, named)]
    for c in settings:
        c.pop("out", None)  # the two run directories
    assert settings[0] == settings[1] and named.model.backbone == "resnet_tiny"
    other, _ = pretrain_config("simclr", "mnist5k", **{**_NO_FLAGS, "preset": "cifar10"}, out=None)
    assert other.model.backbone == "resnet18"


def test_override_dict_values_read_back_as_written() -> None:
    got = _override_strings(
        {"a.b": [0.2, 1.0], "c": True, "d": None, "e": "x y", "f": 3, "g": Path("/x")}
    )
    assert got == ["a.b=[0.2, 1.0]", "c=true", "d=null", "e=x y", "f=3", "g=/x"]
    parsed = OmegaConf.from_dotlist(got)
    assert parsed.a.b == [0.2, 1.0] and parsed.c is True and parsed.d is None
    assert parsed.e == "x y" and parsed.f == 3


def test_the_top_level_pretrain_shows_its_arguments() -> None:
    """help(selfsup.pretrain) and IDEs see the real keyword arguments, not (*args, **kwargs),
    and importing selfsup still imports no torch."""
    import inspect
    import subprocess
    import sys

    parameters = inspect.signature(selfsup.pretrain).parameters
    assert {"method", "data", "preset", "out", "epochs", "resume", "overrides"} <= set(parameters)
    code = "import sys, selfsup; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == (
        "False\n"
    )
