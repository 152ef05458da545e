"""Backbones beyond the ResNets: torchvision classification models by name, and factories of
the user's own (``module:function``, ``path/to/file.py:function``), through the whole tool."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from tiny_runs import run
from torch import nn

import selfsup
from selfsup.cli import main
from selfsup.errors import ConfigError
from selfsup.export import weights_digest
from selfsup.methods import build_method
from selfsup.models import build_backbone, classifier_key, torchvision_backbones
from selfsup.models.backbones import check_backbone, state_image_size
from selfsup.models.weights import init_state
from selfsup.train.config import resolve_config

NETS = """
import torch
from torch import nn


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


def not_a_module():
    return "resnet18"


def raises():
    raise RuntimeError("boom in the factory")


def needs_width(width):
    return nn.Linear(width, 2)


def pooling_only():
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def feature_maps():
    return nn.Conv2d(3, 4, 3)


class NoForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)


class Unique(nn.Module):  # torch.unique has no meta kernel: the check runs it on the CPU
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return h + 0 * torch.unique(h).sum()


def with_unique():
    return Unique()
"""


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def nets(tmp_path) -> Path:
    path = tmp_path / "nets.py"
    path.write_text(NETS)
    return path


# ---------------------------------------------------------------------------- by name
@pytest.mark.parametrize(
    "name,key,dim",
    [
        ("mobilenet_v3_small", "classifier.3", 1024),  # the hidden Linear classifier.0 stays
        ("efficientnet_b0", "classifier.1", 1280),
        ("regnet_y_400mf", "fc", 440),  # its constructor cannot run on the meta device
    ],
)
def test_a_torchvision_model_by_name_gives_its_classifiers_input(name, key, dim) -> None:
    backbone, feat_dim = build_backbone(name)
    assert classifier_key(name) == key and feat_dim == dim
    assert isinstance(backbone.get_submodule(key), nn.Identity)
    # the classifier's dropout goes with it (mobilenet's, efficientnet's; regnet has none)
    assert not any(isinstance(m, nn.Dropout) for m in backbone.modules())
    reference = torchvision.models.get_model(name, weights=None)
    expected = {k for k in reference.state_dict() if not k.startswith(f"{key}.")}
    assert set(backbone.state_dict()) == expected
    with torch.no_grad():
        assert backbone.eval()(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_the_classifier_of_each_family_is_found() -> None:
    keys = {n: classifier_key(n) for n in ("convnext_tiny", "vit_b_16", "swin_t", "densenet121")}
    assert keys == {
        "convnext_tiny": "classifier.2",
        "vit_b_16": "heads.head",
        "swin_t": "head",
        "densenet121": "classifier",
    }
    names = torchvision_backbones()
    assert "convnext_tiny" in names and "resnet50" in names
    assert not any(n.startswith(("googlenet", "inception", "squeezenet")) for n in names)


def test_backbones_that_cannot_work_are_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"maxvit_t does not take 32 px .*--image-size 224"):
        check_backbone("maxvit_t", small_stem=False, image_size=32)
    with pytest.raises(ConfigError, match=r"vit_b_16 cuts images into 16 px .* not 40 \(e.g. 32"):
        check_backbone("vit_b_16", small_stem=False, image_size=40)
    with pytest.raises(ConfigError, match=r"convnext_tiny does not take 20 px .*--image-size 32"):
        check_backbone("convnext_tiny", small_stem=False, image_size=20)
    with pytest.raises(ConfigError, match="applies to the ResNets; convnext_tiny keeps its own"):
        check_backbone("convnext_tiny", small_stem=True, image_size=64)
    with pytest.raises(ConfigError, match="googlenet has no single Linear classifier"):
        check_backbone("googlenet", small_stem=False, image_size=64)
    with pytest.raises(ConfigError, match="did you mean 'convnext_tiny'"):
        check_backbone("convnxt_tiny", small_stem=False, image_size=64)


def test_a_non_resnet_drops_the_presets_small_stem_but_not_one_the_user_set() -> None:
    sizes = ["data.image_size=32", "data.storage_size=32"]
    cfg = resolve_config(
        "byol", "quickstart", overrides=["model.backbone=mobilenet_v3_small", *sizes]
    )
    assert cfg.model.small_stem is False
    assert resolve_config("byol", "quickstart").model.small_stem is True  # a ResNet keeps it
    with pytest.raises(ConfigError, match="model.small_stem=true .* applies to the ResNets"):
        resolve_config(
            "byol",
            "quickstart",
            overrides=["model.backbone=mobilenet_v3_small", "model.small_stem=true", *sizes],
        )


# ---------------------------------------------------------------------------- factories
def test_a_factory_in_a_file_builds_the_backbone_and_bad_ones_say_why(
    nets, tmp_path, monkeypatch
) -> None:
    backbone, dim = build_backbone(f"{nets}:small_cnn", image_size=16)
    assert dim == 16 and isinstance(backbone, nn.Sequential)
    with pytest.raises(ConfigError, match=r"has no function 'small_cn' \(its functions: \["):
        build_backbone(f"{nets}:small_cn")
    with pytest.raises(ConfigError, match="returned a str, not an nn.Module"):
        build_backbone(f"{nets}:not_a_module")
    with pytest.raises(ConfigError, match="there is no file"):
        build_backbone(f"{tmp_path / 'gone.py'}:small_cnn")
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_package_anywhere\n")
    with pytest.raises(ConfigError, match=r"importing .*broken.py failed \(ModuleNotFoundError"):
        build_backbone(f"{broken}:small_cnn")
    with pytest.raises(ConfigError, match="small_stem=true .* applies to the ResNets"):
        build_backbone(f"{nets}:small_cnn", small_stem=True)
    # a factory that fails, and modules that cannot be trained, are named with the setting
    size = {"small_stem": False, "image_size": 16}
    for factory, message in (
        ("raises", r"nets.py:raises: calling it failed \(RuntimeError: boom in the factory"),
        ("needs_width", "called with no arguments, and needs width: wrap it"),
        ("pooling_only", "nets.py:pooling_only has no parameters: it cannot learn"),
        ("feature_maps", r"nets.py:feature_maps: .* returned \(2, 4, 14, 14\) .* pooled"),
        ("NoForward", "nets.py:NoForward: The custom backbone NoForward has no forward()"),
    ):
        with pytest.raises(ConfigError, match=message):
            check_backbone(f"{nets}:{factory}", **size)
    assert check_backbone(f"{nets}:with_unique", **size) == 4  # has a forward(), runs on the CPU
    (tmp_path / "vit_selfsup_test_nets.py").write_text(NETS)  # a module, not torchvision's ViT
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert check_backbone("vit_selfsup_test_nets:small_cnn", **size) == 16
    with pytest.raises(ConfigError, match=r"its functions: \['feature_maps', .*'NoForward'"):
        build_backbone(f"{nets}:nope")  # functions first, then classes
    with pytest.raises(ConfigError, match="the backbone Sequential has no parameters"):
        build_method("byol", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), 3)


def test_a_factory_spec_on_the_command_line_is_text_not_yaml(nets) -> None:
    # `--backbone nets.py:` was read as the YAML mapping {nets.py: null}
    with pytest.raises(ConfigError, match="is no factory; write model.backbone=package.module"):
        resolve_config("byol", "quickstart", flags={"model.backbone": f"{nets}:"})
    import numpy as np  # the Python API's flags: a device, a numpy integer, a path

    flags = {"train.device": torch.device("cpu"), "train.epochs": np.int64(3), "data.source": nets}
    cfg = resolve_config("byol", "quickstart", flags=flags)
    assert cfg.train.device == "cpu" and cfg.train.epochs == 3 and cfg.data.source == str(nets)
    with pytest.raises(ConfigError, match=r"train.epochs=\[3\]: give text, a number"):
        resolve_config("byol", "quickstart", flags={"train.epochs": [3]})


def test_a_size_suggestion_says_the_storage_size_it_needs() -> None:
    with pytest.raises(ConfigError, match=r"e.g. --image-size 32 with data.storage_size=null"):
        resolve_config(
            "byol", "quickstart", overrides=["model.backbone=convnext_tiny", "data.image_size=20"]
        )  # the quickstart stores 28 px digits


def test_a_factory_module_is_found_in_the_current_folder(tmp_path, monkeypatch) -> None:
    # the console script `selfsup` does not put the current folder on sys.path
    (tmp_path / "selfsup_test_factory_nets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    monkeypatch.delitem(sys.modules, "selfsup_test_factory_nets", raising=False)
    _, dim = build_backbone("selfsup_test_factory_nets:small_cnn", image_size=16)
    assert dim == 16
    with pytest.raises(ConfigError, match="cannot import not_a_module_anywhere"):
        build_backbone("not_a_module_anywhere:small_cnn")
    # the run keeps the file's path, so that a resume from another folder imports it again
    flags = {"model.backbone": "selfsup_test_factory_nets:small_cnn", "data.image_size": 16}
    cfg = resolve_config("byol", "quickstart", flags=flags)
    assert cfg.model.backbone == f"{tmp_path.resolve() / 'selfsup_test_factory_nets.py'}:small_cnn"
    # a run's config.yaml of an earlier selfsup keeps its module form: its hash is its own
    saved = tmp_path / "config.yaml"
    cfg.model.backbone = "selfsup_test_factory_nets:small_cnn"
    saved.write_text(OmegaConf.to_yaml(cfg))
    assert resolve_config("byol", str(saved)).model.backbone == cfg.model.backbone


def test_a_factory_run_resumes_loads_and_exports_from_another_folder(
    nets, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run(tmp_path, "byol", "model.backbone=nets.py:small_cnn", "train.epochs=1") == 0
    config = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert config.model.backbone == f"{nets}:small_cnn"  # absolute: usable from anywhere
    assert config.model.small_stem is False
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # from another folder the relative path names no file (said at once); the saved one works
    rc = run(tmp_path, "byol", "--resume", "train.epochs=2", "model.backbone=nets.py:small_cnn")
    assert rc == 2
    rc = main(["pretrain", "--out", str(tmp_path / "run"), "--resume", "--epochs", "2"])
    assert rc == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["epochs"] == 2

    encoder = selfsup.load_encoder(tmp_path / "run")
    state = torch.load(tmp_path / "run" / "encoder.pt", weights_only=True)
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in state.items())
    x = torch.randn(4, 3, 16, 16)
    for fmt in ("safetensors", "torchscript"):
        rc, out, err = cli("export", str(tmp_path / "run"), "--format", fmt)
        assert rc == 0, err
        loaded = selfsup.load_encoder(out.strip().rsplit(" ", 1)[-1])
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), encoder(x))
    rc, out, err = cli("export", str(tmp_path / "run"), "--format", "onnx")  # ORT-checked
    assert rc == 0 and out.strip().endswith("encoder.onnx"), err
    rc, _, err = cli("export", str(tmp_path / "run"), "--format", "torchvision")
    assert rc == 2 and "comes from your factory" in err and "torchscript or onnx" in err
    rc, _, err = cli("eval", str(tmp_path / "run"), "--protocol", "linear", "--save-classifiers")
    assert rc == 2 and "--save-classifiers saves torchvision models only" in err


def test_a_run_whose_factory_changed_says_so_on_resume_load_and_export(nets, tmp_path) -> None:
    assert run(tmp_path, "simclr", f"model.backbone={nets}:small_cnn", "train.epochs=1") == 0
    nets.write_text(
        NETS.replace("nn.Conv2d(8, 16, 3", "nn.Conv2d(8, 24, 3").replace(
            "nn.BatchNorm2d(16)", "nn.BatchNorm2d(24)"
        )
    )
    for name in [m for m in sys.modules if m.startswith("selfsup_backbone_")]:
        del sys.modules[name]  # as a new process would, import the file as it is now
    rc, _, err = cli("pretrain", "--out", str(tmp_path / "run"), "--resume", "--epochs", "2")
    assert rc == 2 and "did the code of your factory" in err and "size mismatch" in err
    with pytest.raises(selfsup.errors.CheckpointError, match=r"builds now: 3.weight is \[16, 8"):
        selfsup.load_encoder(tmp_path / "run")
    rc, _, err = cli("export", str(tmp_path / "run"), "--format", "torchvision", "--out",
                     str(tmp_path / "a" / "b"))  # fmt: skip
    assert rc == 2 and "did the factory's code change" in err and not (tmp_path / "a").exists()


def test_a_failed_export_leaves_no_folder_and_a_size_the_encoder_refuses_is_said(tmp_path):
    (tmp_path / "branchy.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Branchy(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.linear = nn.Linear(3, 4)\n\n    def forward(self, x):\n"
        "        h = self.linear(x.mean((2, 3)))\n"
        "        return h if bool(x.mean() > 0.25) else -h  # tracing keeps one branch\n"
        "\n\ndef branchy():\n    return Branchy()\n"
    )
    spec = f"{tmp_path / 'branchy.py'}:branchy"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(build_backbone(spec)[0].state_dict(), run_dir / "encoder.pt")
    (run_dir / "config.yaml").write_text(
        OmegaConf.to_yaml({"model": {"backbone": spec, "small_stem": False}})
    )
    rc, _, err = cli("export", str(run_dir), "--format", "torchscript", "--out",
                     str(tmp_path / "out" / "ts"))  # fmt: skip
    assert rc == 2 and "the traced encoder does not compute what the module does" in err
    assert not (tmp_path / "out").exists()
    mobile = tmp_path / "mobile"
    mobile.mkdir()
    torch.save(build_backbone("convnext_tiny")[0].state_dict(), mobile / "encoder.pt")
    rc, _, err = cli("export", str(mobile / "encoder.pt"), "--format", "torchscript",
                     "--image-size", "20")  # fmt: skip
    assert rc == 2 and "the encoder does not take 20 px images" in err
    assert not (mobile / "export").exists()


def test_a_size_the_encoder_refuses_names_the_encoder_file_given(tmp_path, monkeypatch):
    """`selfsup embed` / `neighbors` of a bare encoder file at a size it cannot take name that
    file (they named its folder: `.: the encoder does not take ...` for a file in this folder)."""
    from PIL import Image

    torch.save(build_backbone("convnext_tiny")[0].state_dict(), tmp_path / "encoder.pt")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "0.png")
    monkeypatch.chdir(tmp_path)
    cache = str(tmp_path / "cache")
    rc, _, err = cli("embed", "encoder.pt", "--data", "images", "--image-size", "20",
                     "--out", "emb.npz", "--cache-dir", cache)  # fmt: skip
    assert rc == 2 and "error: encoder.pt: the encoder does not take 20 px images" in err, err
    rc, _, err = cli("neighbors", "encoder.pt", "--data", "images", "--query", "images/0.png",
                     "--image-size", "20", "--cache-dir", cache)  # fmt: skip
    assert rc == 2 and "error: encoder.pt: the encoder does not take 20 px images" in err, err
    assert not (tmp_path / "cache").exists()  # refused before any image was decoded


# ---------------------------------------------------------------------------- end to end
def test_a_torchvision_model_run_exports_to_torchvision_and_its_classifier_loads(tmp_path):
    extra = ["model.backbone=mobilenet_v3_small", "train.epochs=1"]
    assert run(tmp_path, "simclr", *extra) == 0
    encoder = selfsup.load_encoder(tmp_path / "run")
    assert isinstance(encoder.classifier[3], nn.Identity)
    rc, out, err = cli("export", str(tmp_path / "run"), "--format", "torchvision")
    assert rc == 0, err
    exported = Path(out.strip().rsplit(" ", 1)[-1])
    assert exported.name == "mobilenet_v3_small_torchvision.pt"
    plain = torchvision.models.mobilenet_v3_small()
    plain.load_state_dict(torch.load(exported, weights_only=True))  # strict: classifier too
    plain.classifier[3] = nn.Identity()
    assert weights_digest(plain) == weights_digest(encoder)
    # the export starts a new run (model.init): its random classifier is dropped
    start = init_state(str(exported), build_backbone("mobilenet_v3_small")[0], "mobilenet_v3_small")
    assert start.keys() == encoder.state_dict().keys()

    rc, _, err = cli(
        "eval", str(tmp_path / "run"), "--protocol", "linear", "--save-classifiers",
        "--cache-dir", str(tmp_path / "cache"),
    )  # fmt: skip
    assert rc == 0, err
    saved = next((tmp_path / "run" / "classifiers").glob("*.pt"))
    classifier = selfsup.load_classifier(saved)
    assert isinstance(classifier.model, torchvision.models.MobileNetV3)
    assert classifier.model.classifier[3].out_features == len(classifier.classes) == 10
    index, confidence = classifier.predict(torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8))
    assert index.shape == confidence.shape == (3,)


def test_a_factorys_encoder_loads_whatever_image_size_its_module_takes(tmp_path) -> None:
    # a module of one input size (a ViT's fixed positional embeddings): loading its weights
    # runs no dummy batch, which at another size would fail
    (tmp_path / "vit.py").write_text(
        "import torchvision\n\n\ndef tiny_vit():\n"
        "    model = torchvision.models.VisionTransformer(\n"
        "        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8,\n"
        "        mlp_dim=16,\n    )\n    model.heads = torchvision.ops.MLP(8, [8])\n"
        "    return model\n"
        "\n\ndef imagenet_resnet():\n    return torchvision.models.resnet18()\n"
    )
    spec = f"{tmp_path / 'vit.py'}:tiny_vit"
    backbone, dim = build_backbone(spec, image_size=16)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(backbone.state_dict(), run_dir / "encoder.pt")
    (run_dir / "config.yaml").write_text(
        OmegaConf.to_yaml({"model": {"backbone": spec, "small_stem": False}})
    )
    loaded = selfsup.load_encoder(run_dir)
    assert weights_digest(loaded) == weights_digest(backbone) and dim == 8
    # a factory returning torchvision's ImageNet resnet18 trains its pooled features, and
    # its encoder (no fc) loads back the same way
    resnet, dim = build_backbone(f"{tmp_path / 'vit.py'}:imagenet_resnet")
    assert dim == 512 and isinstance(resnet.fc, nn.Identity)
    torch.save(resnet.state_dict(), run_dir / "encoder.pt")
    (run_dir / "config.yaml").write_text(
        OmegaConf.to_yaml(
            {"model": {"backbone": f"{tmp_path / 'vit.py'}:imagenet_resnet", "small_stem": False}}
        )
    )
    assert weights_digest(selfsup.load_encoder(run_dir)) == weights_digest(resnet)


# ---------------------------------------------------------------------------- ViT sizes
def test_a_vit_trains_at_any_multiple_of_its_patch_and_loads_exports_at_it(tmp_path) -> None:
    assert check_backbone("vit_b_32", small_stem=False, image_size=64) == 768
    torch.manual_seed(0)
    backbone, dim = build_backbone("vit_b_32", image_size=64)
    assert state_image_size("vit_b_32", backbone.state_dict()) == 64
    with torch.device("meta"):  # shapes only
        assert state_image_size("vit_b_32", build_backbone("vit_b_32")[0].state_dict()) == 224
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = backbone.eval()(x)
    assert features.shape == (2, dim)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(backbone.state_dict(), run_dir / "encoder.pt")
    (run_dir / "config.yaml").write_text(
        OmegaConf.to_yaml(
            {
                "model": {"backbone": "vit_b_32", "small_stem": False},
                "data": {"source": str(tmp_path / "gone"), "image_size": 64},
            }
        )
    )
    loaded = selfsup.load_encoder(run_dir)  # built for 64 px, as the weights say
    assert weights_digest(loaded) == weights_digest(backbone)
    for fmt in ("torchvision", "safetensors", "torchscript"):
        rc, out, err = cli("export", str(run_dir), "--format", fmt)
        assert rc == 0, err
        exported = Path(out.strip().rsplit(" ", 1)[-1])
        if fmt == "torchvision":  # strict, with the image_size torchvision takes
            plain = torchvision.models.vit_b_32(image_size=64)
            plain.load_state_dict(torch.load(exported, weights_only=True))
            plain.heads.head = nn.Identity()
            assert weights_digest(plain) == weights_digest(backbone)
        else:
            with torch.no_grad():
                torch.testing.assert_close(selfsup.load_encoder(exported)(x), features)
    # a bare file (no config.yaml beside it) is known as a 64 px vit_b_32 by its tensors alone
    bare = tmp_path / "bare"
    bare.mkdir()
    torch.save(backbone.state_dict(), bare / "encoder.pt")
    rc, out, err = cli("export", str(bare / "encoder.pt"), "--format", "torchscript")
    assert rc == 0, err
    assert json.loads((bare / "export" / "export.json").read_text())["image_size"] == 64
    # another size is refused before any image is read (no cache is written)
    from PIL import Image

    for split, label in (("train", "a"), ("train", "b"), ("test", "a"), ("test", "b")):
        (tmp_path / "data" / split / label).mkdir(parents=True)
        Image.new("RGB", (64, 64)).save(tmp_path / "data" / split / label / "0.png")
    rc, _, err = cli(
        "eval", str(run_dir), "--data", str(tmp_path / "data"), "--image-size", "32",
        "--cache-dir", str(tmp_path / "cache"),
    )  # fmt: skip
    assert rc == 2 and not (tmp_path / "cache").exists()
    assert "does not take 32 px images" in err and "trained at 64 px: drop --image-size" in err


def test_vit_weights_of_another_size_start_a_run_with_resized_position_embeddings() -> None:
    torch.manual_seed(0)
    big = build_backbone("vit_b_32")[0].state_dict()  # 224 px: 7x7 patches + class token
    small = build_backbone("vit_b_32", image_size=96)[0]  # 3x3 patches + class token
    notes: list[str] = []
    state = init_state_from(big, small, notes)
    pos = state["encoder.pos_embedding"]
    assert pos.shape == (1, 10, 768)
    torch.testing.assert_close(pos[:, 0], big["encoder.pos_embedding"][:, 0])  # class token
    # the grid is resized bicubically, corners aligned: the corner patches keep their vectors
    grid = big["encoder.pos_embedding"][0, 1:].reshape(7, 7, 768)
    torch.testing.assert_close(pos[0, 1:].reshape(3, 3, 768)[0, 0], grid[0, 0])
    torch.testing.assert_close(pos[0, 1:].reshape(3, 3, 768)[2, 2], grid[6, 6])
    assert all(torch.equal(state[k], v) for k, v in big.items() if k != "encoder.pos_embedding")
    assert notes and "7x7 patches, 224 px) resized to 3x3 (96 px images)" in notes[0]
    small.load_state_dict(state)
    same: list[str] = []
    init_state_from(big, build_backbone("vit_b_32")[0], same)
    assert same == []  # the same size: nothing resized, nothing said


def init_state_from(state, backbone, notes, tmp=None):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vit.pt"
        torch.save(state, path)
        return init_state(str(path), backbone, "vit_b_32", notes=notes)


def test_batchnorm_momentum_is_a_setting_and_a_short_run_is_told_its_statistics_lag(capsys):
    from selfsup.train.config import config_hash
    from selfsup.train.preflight import batchnorm_lag_note
    from selfsup.train.trainer import build_model

    sizes = ["model.backbone=mobilenet_v3_small", "data.image_size=32", "data.storage_size=32"]
    cfg = resolve_config("simclr", "quickstart", overrides=sizes)
    momenta = {
        m.momentum for m in build_model(cfg).backbone.modules() if isinstance(m, nn.BatchNorm2d)
    }
    assert momenta == {0.01}  # torchvision's MobileNetV3
    batchnorm_lag_note(cfg, build_model(cfg).backbone, total_steps=4)
    assert "momentum 0.01: after this run's 4 steps they still hold 96%" in capsys.readouterr().err
    set_cfg = resolve_config("simclr", "quickstart", overrides=[*sizes, "model.bn_momentum=0.1"])
    backbone = build_model(set_cfg).backbone
    assert {m.momentum for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}
    batchnorm_lag_note(set_cfg, backbone, total_steps=100)  # 0.9^100: nothing left to say
    assert capsys.readouterr().err == ""
    batchnorm_lag_note(set_cfg, backbone, total_steps=4)  # 0.1 already: only "train longer"
    assert capsys.readouterr().err.rstrip().endswith("not yet the trained network's; train longer")
    with pytest.raises(ConfigError, match=r"model.bn_momentum must be null .* in \(0, 1\]"):
        resolve_config("simclr", "quickstart", overrides=["model.bn_momentum=0"])
    # runs from before the setting keep their hash (checkpoints resume), and a refusal for
    # another reason does not name it
    from selfsup.train.checkpoint import config_differences

    old = OmegaConf.create(OmegaConf.to_container(cfg))
    del old.model["bn_momentum"]
    assert config_hash(old) == config_hash(cfg) != config_hash(set_cfg)
    plain = {k: OmegaConf.to_container(c[k]) for c in (old,) for k in ("model",)}
    now = {"model": OmegaConf.to_container(cfg.model)}
    assert config_differences(plain, now, ("model",)) == []
