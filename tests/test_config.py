"""Settings: presets resolve, and every bad setting is a ConfigError naming it, before any work."""

import pytest
import torch

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
        ("optim.lr_reference_batch=0", "optim.lr_reference_batch must be >= 1"),
        ("optim.min_lr_ratio=-5", "optim.min_lr_ratio must be in"),
        ("optim.trust_coefficient=-1", "optim.trust_coefficient"),
        ("train.knn_k=0", "train.knn_k must be >= 1"),
        ("train.knn_temperature=0", "train.knn_temperature must be > 0"),
        ("data.mean=[0.1,0.1,0.1]", "data.mean and data.std are given together"),
    ],
)
def test_bad_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resolve_config("simclr", "quickstart", overrides=[override])


@pytest.mark.parametrize(
    ("method", "override", "message"),
    [
        ("simclr", "method.temperature=-0.5", "method.temperature=-0.5 must be > 0"),
        ("moco", "method.temperature=0", "method.temperature=0 must be > 0"),
        ("moco", "method.momentum=1.5", "method.momentum=1.5 must be in [0, 1]"),
        ("byol", "method.tau_base=2.0", "method.tau_base=2.0 must be in [0, 1]"),
        ("simsiam", "method.proj_dim=0", "method.proj_dim=0 must be >= 1"),
    ],
)
def test_out_of_range_method_options_are_named_before_any_work(method, override, message):
    """Found both when the config is resolved and by build_method (for Python users)."""
    from selfsup.methods import build_method
    from selfsup.models import build_backbone

    pattern = message.replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ConfigError, match=pattern):
        resolve_config(method, "quickstart", overrides=[override])
    key, value = override.removeprefix("method.").split("=")
    backbone, dim = build_backbone("resnet_tiny")
    with pytest.raises(ConfigError, match=pattern):
        build_method(
            method.upper(), backbone, dim, **{key: type(1.0 if "." in value else 1)(value)}
        )


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
    or presets/quickstart/<method>.yaml would silently train another recipe. And the PEP 561
    marker, without which a type checker treats ``import selfsup`` as untyped."""
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
    assert package / "py.typed" in packaged


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


def test_a_recipe_file_names_its_method(tmp_path):
    """A user's recipe with method.name (as solo-learn's do) trains that method without
    --method; a --method that contradicts it is refused, not silently preferred."""
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("method:\n  name: byol\n  pred_hidden: 256\n")
    cfg = resolve_config(None, preset=str(recipe))
    assert (cfg.method.name, cfg.method.pred_hidden) == ("byol", 256)
    assert resolve_config("byol", preset=str(recipe)).method.name == "byol"
    with pytest.raises(ConfigError, match="recipe for method.name=byol, not --method moco"):
        resolve_config("moco", preset=str(recipe))
    assert resolve_config(None, preset="quickstart").method.name == "simclr"  # the default


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
    assert "#   method.momentum: 0.99" in out and "#   method.bn_splits: 8" in out
    view2 = next(line for line in out.splitlines() if line.startswith("#   view2:"))
    assert "blur_p: 0.25" in view2 and "crop_scale: [0.3, 1.0]" in view2


def test_selfsup_config_takes_the_flags_pretrain_takes(capsys, tmp_path):
    from omegaconf import OmegaConf

    from selfsup.cli import main

    argv = ["config", "--method", "byol", "--data", str(tmp_path), "--epochs", "7"]
    assert main([*argv, "--backbone", "resnet50", "--batch-size", "64", "--image-size", "48"]) == 0
    cfg = OmegaConf.create(capsys.readouterr().out.split("\n# ")[0])
    assert cfg.data.source == str(tmp_path) and cfg.train.epochs == 7
    assert (cfg.model.backbone, cfg.train.batch_size, cfg.data.image_size) == ("resnet50", 64, 48)
    assert (
        cfg.optim.lr == resolve_config("byol", None).optim.lr
    )  # --data alone: no quickstart preset


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
    # named when the config is resolved, as any setting's interpolation (test_user_files.py)
    with pytest.raises(ConfigError, match=r"augment\.both\.crop_scale': Interpolation key"):
        resolve_config("byol", overrides=["augment.both.crop_scale=${augment.both.foo}"])


def _one_sgd_step(method: torch.nn.Module, loss_of, lr: float, wd: float) -> list[torch.Tensor]:
    """Two SGD steps (the second uses the momentum buffer) on ``loss_of(method)``."""
    opt = torch.optim.SGD(
        [p for p in method.parameters() if p.requires_grad], lr=lr, momentum=0.9, weight_decay=wd
    )
    for _ in range(2):
        opt.zero_grad()
        loss_of(method).backward()
        opt.step()
    return [p.detach().clone() for p in method.parameters()]


@pytest.mark.parametrize("preset", ["cifar10", "imagenette", "stl10"])
def test_byol_and_moco_presets_take_the_step_of_the_lightly_recipe_they_cite(preset):
    """Lightly trains BYOL on 0.5 * (-cos(p1, z2') - cos(p2, z1')) and symmetric MoCo on the mean of
    the two InfoNCE terms, at SGD lr 0.06 * batch/128 and wd 5e-4. Our losses are the papers' (BYOL:
    2 - 2 cos summed; MoCo: summed), so the presets rescale lr and wd: the updates must be equal."""
    import copy

    import torch.nn.functional as F

    from selfsup.losses import info_nce_loss
    from selfsup.methods import build_method

    torch.manual_seed(0)
    x1, x2 = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 16))

    def lightly_byol(m):
        x = torch.cat([x1, x2])
        p = m.predictor(m.projector(m.backbone(x)))
        with torch.no_grad():
            zt = m.target_projector(m.target_backbone(x))
        (p1, p2), (zt1, zt2) = p.chunk(2), zt.chunk(2)
        return 0.5 * (-F.cosine_similarity(p1, zt2).mean() - F.cosine_similarity(p2, zt1).mean())

    def lightly_moco(m):  # no BatchNorm anywhere: the key shuffle is the identity
        q1, q2 = m.projector(m.backbone(x1)), m.projector(m.backbone(x2))
        k1, k2 = m._keys(x1), m._keys(x2)
        return 0.5 * (
            info_nce_loss(q1, k2, m.queue, m.temperature)
            + info_nce_loss(q2, k1, m.queue, m.temperature)
        )

    cases = [
        ("byol", lightly_byol, {}),
        ("moco", lightly_moco, {"proj_batch_norm": False, "bn_splits": 1}),
    ]
    for name, lightly_loss, kwargs in cases:
        cfg = resolve_config(name, preset)
        if name == "moco" and not cfg.method.get("symmetric", False):
            continue  # one direction: the same scale as lightly's mean of two
        ours = build_method(
            name,
            copy.deepcopy(backbone),
            16,
            cfg.method,
            proj_hidden=32,
            proj_dim=8,
            **({"pred_hidden": 32} if name == "byol" else kwargs),
        )
        theirs = copy.deepcopy(ours)
        assert cfg.optim.name == "sgd" and cfg.optim.lr_reference_batch == 128
        got = _one_sgd_step(ours, lambda m: m(x1, x2)["loss"], cfg.optim.lr, cfg.optim.weight_decay)
        want = _one_sgd_step(theirs, lightly_loss, 0.06, 5e-4)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("preset", "base_lr"), [("cifar10", 0.03), ("imagenette", 0.05), ("stl10", 0.05)]
)
def test_simsiam_presets_follow_the_papers_lr_rule(preset, base_lr):
    """SimSiam (Chen & He 2021): lr = base_lr * batch / 256 (CIFAR-10: 0.03, ImageNet: 0.05)."""
    from selfsup.train.optim import scaled_lr

    o = resolve_config("simsiam", preset).optim
    assert scaled_lr(o.lr, 512, o.lr_reference_batch, o.lr_scaling) == pytest.approx(base_lr * 2)


def test_eval_crop_needs_its_margin_in_the_cache():
    with pytest.raises(ConfigError, match="data.storage_size=146"):
        resolve_config("simclr", "imagenette", overrides=["data.storage_size=128"])
    with pytest.raises(ConfigError, match="data.storage_size=293"):
        resolve_config("simclr", "imagenette", overrides=["data.image_size=256"])
    from selfsup.commands.common import _sizes

    assert _sizes({"image_size": 128, "storage_size": 146, "eval_crop": 0.875}, 256) == (293, 256)
    assert _sizes({"image_size": 32}, 64) == (64, 64)


def test_under_torchrun_a_shared_config_error_prints_on_rank_0_only_and_a_ranks_own_always(
    monkeypatch, capsys
):
    import selfsup.cli as cli

    def shared(args):
        raise ConfigError("optim.lr must be > 0")

    def own(args):
        error = ConfigError("LOCAL_RANK=1 but only 1 CUDA GPU(s) are visible")
        error.per_rank = True
        raise error

    monkeypatch.setenv("RANK", "1")
    for handler, printed in ((shared, False), (own, True)):
        monkeypatch.setitem(cli._HANDLERS, "config", handler)
        assert cli.main(["config"]) == 2
        assert ("selfsup: error:" in capsys.readouterr().err) is printed


def test_limit_flag_sets_data_limit(capsys):
    from selfsup.cli import main

    assert main(["config", "--limit", "300"]) == 0
    assert "  limit: 300\n" in capsys.readouterr().out


def test_an_empty_flag_is_named_not_a_type_error(capsys) -> None:
    """`--data ""` (an unset shell variable): the accepted data forms, not OmegaConf's
    "Incompatible value 'None'"; another empty flag is named."""
    from selfsup.cli import main

    assert main(["config", "--data", ""]) == 2
    err = capsys.readouterr().err
    assert "data source is empty; accepted forms" in err and "Incompatible" not in err
    assert main(["config", "--backbone", " "]) == 2
    assert "model.backbone is empty" in capsys.readouterr().err


def test_a_misspelt_method_option_suggests_this_methods_own_or_says_whose_it_is() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'method.temperature'\?\); simclr takes"):
        resolve_config("simclr", overrides=["method.temperatur=0.1"])
    # queue_size is MoCo's, which the hint says
    with pytest.raises(
        ConfigError, match=r"'method.queue_size'\? an option of moco, which simclr does not"
    ):
        resolve_config("simclr", overrides=["method.queue_sze=10"])


def test_an_option_only_other_methods_take_is_refused_unless_the_overrides_are_shared() -> None:
    """method.queue_size=64 on SimCLR would be ignored, yet written to config.yaml as if it
    counted; ablate and the benches give one set of overrides to runs of several methods."""
    with pytest.raises(ConfigError, match=r"method.queue_size is an option of moco; simclr does"):
        resolve_config("simclr", overrides=["method.queue_size=64"])
    with pytest.raises(ConfigError, match=r"method.pred_hidden is an option of byol and simsiam"):
        resolve_config("moco", overrides=["method.pred_hidden=64"])
    shared = resolve_config("simclr", overrides=["method.queue_size=64"], shared_overrides=True)
    assert shared.method.name == "simclr"
    # the quickstart preset sets options of every method: those are not the user's
    assert resolve_config("simclr").method.name == "simclr"


def test_a_method_name_in_capitals_is_the_method() -> None:
    assert resolve_config("SimCLR").method.name == "simclr"  # as build_method("SimCLR") is


def test_a_storage_size_far_above_the_crops_need_gets_a_note(capsys):
    """--image-size 64 on the imagenette preset keeps its 146 px storage: said, with the size
    that would do; the preset at its own 128 px says nothing."""
    from selfsup.train.preflight import storage_size_note

    small = resolve_config("byol", preset="imagenette", flags={"data.image_size": 64})
    storage_size_note(small)
    err = capsys.readouterr().err
    assert "data.storage_size=146 stores 146 px images for 64 px crops" in err
    assert "data.storage_size=73 " in err and "4.0x" in err
    storage_size_note(resolve_config("byol", preset="imagenette"))
    assert capsys.readouterr().err == ""


def test_config_of_a_folder_preset_without_data_says_pretrain_needs_data(capsys):
    """`selfsup config --preset imagenette` shows the recipe, and says that its data.source is
    the quickstart's stand-in, which `pretrain` would refuse without --data."""
    import yaml

    from selfsup.cli import main

    assert main(["config", "--method", "byol", "--preset", "imagenette"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# --preset imagenette names no data source of its own")
    assert yaml.safe_load(out)["data"]["image_size"] == 128
    assert main(["config", "--method", "byol"]) == 0  # the quickstart: nothing to say
    assert "names no data source" not in capsys.readouterr().out


def test_config_with_the_embedded_digits_shows_what_pretrain_trains(capsys, tmp_path):
    """`selfsup config --data mnist5k` takes the quickstart recipe, as `pretrain --data mnist5k`
    does (it showed the general defaults: resnet18 for 100 epochs)."""
    import yaml

    from selfsup.cli import main
    from selfsup.run import pretrain_config

    assert main(["config", "--data", "mnist5k"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    trained, _ = pretrain_config(
        None, "mnist5k", preset=None, out=tmp_path, resume=False, flags={}, overrides=[]
    )
    assert shown["model"]["backbone"] == trained.model.backbone == "resnet_tiny"
    assert shown["train"]["epochs"] == trained.train.epochs


def test_a_flag_and_an_override_of_the_same_setting_must_agree(capsys, tmp_path):
    """`--epochs 2 train.epochs=3` used to train 3 epochs without a word: the override won."""
    from selfsup.cli import main

    assert main(["config", "--epochs", "2", "train.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs is given twice: --epochs 2 and the override train.epochs=3" in err
    out = tmp_path / "run"
    argv = ["pretrain", "--out", str(out), "--batch-size", "8", "train.batch_size=1000"]
    assert main(argv) == 2
    assert "--batch-size 8 and the override train.batch_size=1000" in capsys.readouterr().err
    assert not out.exists()  # refused before the run directory is made
    assert main(["config", "--epochs", "2", "train.epochs=2", "--limit", "500"]) == 0  # agree
    assert main(["config", "--data", str(tmp_path), f"data.source={tmp_path}"]) == 0


def test_python_api_names_its_keyword_when_it_and_an_override_disagree(tmp_path):
    """selfsup.pretrain(batch_size=8, ...) has no --batch-size flag: its message names the
    keyword the caller wrote."""
    import selfsup

    out = tmp_path / "run"
    with pytest.raises(ConfigError) as caught:
        selfsup.pretrain(out=out, batch_size=8, overrides={"train.batch_size": 1000})
    assert "train.batch_size is given twice: batch_size=8 and the override" in str(caught.value)
    assert not out.exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train=5", "train is a section of settings (epochs, batch_size, "),
        ("model=resnet18", "set one of its keys, e.g. model.backbone=..."),
        ("train.epochs=", "setting 'train.epochs': it needs a value of type int"),
    ],
)
def test_an_override_of_a_section_or_with_no_value_says_what_to_write(override, expected):
    """Not OmegaConf's "Merge error: int is not a subclass of TrainConfig"."""
    with pytest.raises(ConfigError) as caught:
        resolve_config("simclr", overrides=[override])
    assert expected in str(caught.value) and "subclass" not in str(caught.value)
