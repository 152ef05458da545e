"""``model.init``: pre-training starts from given weights (an earlier run, a weights file, or
torchvision's ImageNet weights) instead of a random initialisation, checked before any data is
decoded."""

from __future__ import annotations

import json
import urllib.error

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from tiny_runs import run

from selfsup.errors import ConfigError
from selfsup.export import export_encoder
from selfsup.models import build_backbone
from selfsup.models.weights import init_state
from selfsup.train.config import config_hash, resolve_config
from selfsup.train.trainer import build_model


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One tiny SimCLR run whose encoder later runs start from."""
    tmp = tmp_path_factory.mktemp("init")
    assert run(tmp, "simclr", "train.epochs=1", "data.limit=256", out="first") == 0
    return tmp / "first"


def _results(path) -> dict:
    return json.loads((path / "results.json").read_text())


def test_a_run_started_from_another_begins_with_its_encoder(
    first_run, tmp_path, capsys, monkeypatch
) -> None:
    import selfsup.models.weights as weights

    reads = []
    real = weights.read_state_dict
    monkeypatch.setattr(weights, "read_state_dict", lambda p: reads.append(p) or real(p))
    assert run(tmp_path, "byol", "train.epochs=1", "data.limit=256", f"model.init={first_run}") == 0
    assert reads == [first_run / "encoder.pt"]  # checked first, then used: read once
    printed = capsys.readouterr()
    assert f"starting from model.init={first_run}" in printed.err
    results = _results(tmp_path / "run")
    summary = json.loads(next(x for x in printed.out.splitlines() if x.startswith("{")))
    assert summary["knn_top1_init"] == results["knn_top1_init"]
    # the kNN before training is the first run's final kNN: the same weights, the same data
    assert results["knn_top1_init"] == _results(first_run)["knn_top1"]
    assert results["init"] == str(first_run)
    assert "knn_top1_random_init" not in results
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.model.init == str(first_run)


@pytest.mark.parametrize("method", ["byol", "moco", "simsiam"])
def test_init_weights_reach_the_backbone_and_its_target(method, first_run) -> None:
    cfg = resolve_config(method, "quickstart", overrides=["model.backbone=resnet_tiny"])
    state = torch.load(first_run / "encoder.pt", weights_only=True)
    model = build_model(cfg, init=state)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    target = {"byol": "target_backbone", "moco": "key_backbone"}.get(method)
    if target is not None:  # the EMA target starts as a copy of the started backbone
        copied = getattr(model, target).module.state_dict()
        assert all(torch.equal(copied[k], v) for k, v in state.items())


def test_init_takes_exports_and_torchvision_checkpoints(first_run, tmp_path) -> None:
    tiny, _ = build_backbone("resnet_tiny", small_stem=True)
    reference = torch.load(first_run / "encoder.pt", weights_only=True)
    for fmt in ("torchvision", "safetensors", "torchscript"):
        path = export_encoder(first_run, fmt, out=tmp_path / fmt)
        state = init_state(str(path), tiny, "resnet_tiny")
        assert all(torch.equal(state[k], v) for k, v in reference.items()), fmt
    # a torchvision ImageNet-style file: its 1000-class fc is dropped, and a file from before
    # BatchNorm counted its steps (torchvision's oldest) gets counters of 0
    full = torchvision.models.resnet18(weights=None).state_dict()
    old = {k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "resnet18-old.pth")
    resnet18, _ = build_backbone("resnet18", small_stem=False)
    state = init_state(str(tmp_path / "resnet18-old.pth"), resnet18, "resnet18")
    assert "fc.weight" not in state and state["bn1.num_batches_tracked"] == 0
    resnet18.load_state_dict(state)  # strict
    assert torch.equal(resnet18.layer4[1].conv2.weight, full["layer4.1.conv2.weight"])


def test_weights_that_do_not_fit_are_refused_with_the_fix(first_run, tmp_path) -> None:
    resnet18, _ = build_backbone("resnet18", small_stem=True)
    with pytest.raises(ConfigError, match="another backbone than model.backbone=resnet18"):
        init_state(str(first_run), resnet18, "resnet18")
    tiny_big_stem, _ = build_backbone("resnet_tiny", small_stem=False)
    with pytest.raises(ConfigError, match="small-image stem .* set model.small_stem=true"):
        init_state(str(first_run), tiny_big_stem, "resnet_tiny")
    imagenet_stem = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(imagenet_stem, tmp_path / "r18.pth")
    with pytest.raises(ConfigError, match="ImageNet stem .* set model.small_stem=false"):
        init_state(str(tmp_path / "r18.pth"), resnet18, "resnet18")
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ConfigError, match="notes.txt is not a PyTorch state_dict"):
        init_state(str(tmp_path / "notes.txt"), resnet18, "resnet18")
    with pytest.raises(ConfigError, match="does not exist"):
        init_state(str(tmp_path / "missing.pt"), resnet18, "resnet18")


def test_bad_init_stops_the_run_before_any_decoding(first_run, tmp_path, capsys) -> None:
    cache = tmp_path / "cache"
    for setting in (
        f"model.init={tmp_path / 'missing.pt'}",
        "model.init=imagenet",  # resnet_tiny: no ImageNet weights
        f"model.init={first_run} model.backbone=resnet18",
    ):
        assert run(tmp_path, "simclr", "train.epochs=1", *setting.split()) == 2
        assert "selfsup: error: model.init=" in capsys.readouterr().err
        assert not cache.exists()  # nothing decoded
    with pytest.raises(ConfigError, match="ImageNet stem.*model.small_stem=false"):
        resolve_config("byol", "cifar10", overrides=["model.init=imagenet"])


def test_imagenet_offline_names_the_file_to_fetch(monkeypatch, tmp_path) -> None:
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    resnet18, _ = build_backbone("resnet18", small_stem=False)
    with pytest.raises(ConfigError) as error:
        init_state("imagenet", resnet18, "resnet18")
    message = str(error.value)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert f"put it in {cached}" in message
    # the file passed by path is normalised as model.init=imagenet would: said how
    assert "data.mean=[0.485,0.456,0.406] data.std=[0.229,0.224,0.225]" in message
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")  # what an interrupted download leaves
    with pytest.raises(ConfigError, match=f"the cached {cached} does not load.*delete it"):
        init_state("imagenet", resnet18, "resnet18")


def test_a_resume_keeps_its_checkpoint_not_the_init(first_run, tmp_path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "encoder.pt").write_bytes((first_run / "encoder.pt").read_bytes())
    args = ("train.epochs=2", "data.limit=256", f"model.init={source / 'encoder.pt'}")
    assert run(tmp_path, "simclr", *args, "train.stop_after_epochs=1") == 3  # stopped, saved
    (source / "encoder.pt").unlink()  # a resume needs its checkpoint only
    assert run(tmp_path, "simclr", *args, "--resume") == 0
    assert _results(tmp_path / "run")["epochs"] == 2


def test_config_hash_of_runs_without_init_is_unchanged() -> None:
    cfg = resolve_config("simclr", "quickstart")
    assert cfg.model.init is None
    plain = OmegaConf.to_container(cfg)
    del plain["model"]["init"]  # a config.yaml written before model.init existed
    before = config_hash(OmegaConf.create(plain))
    assert config_hash(resolve_config("simclr", "quickstart")) == before
    assert config_hash(resolve_config("simclr", "quickstart", overrides=["model.init=x"])) != before


def test_imagenet_init_loads_torchvision_weights_and_their_normalisation(
    monkeypatch, tmp_path
) -> None:
    fake = torchvision.models.resnet18(weights=None).state_dict()  # stands in for the download
    calls = []

    def download(self, *args, **kwargs):
        calls.append(self)
        return fake

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", download)
    args = ("model.backbone=resnet18", "model.small_stem=false", "data.limit=128")
    assert run(tmp_path, "simclr", "train.epochs=1", "model.init=imagenet", *args) == 0
    assert set(calls) == {torchvision.models.ResNet18_Weights.IMAGENET1K_V1}  # (checked, read)
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.data.mean == [0.485, 0.456, 0.406] and saved.data.std == [0.229, 0.224, 0.225]
    results = _results(tmp_path / "run")
    assert results["init"] == "imagenet" and "knn_top1_init" in results


def test_overwrite_with_bad_init_weights_deletes_nothing(first_run, tmp_path, capsys) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(first_run, old)
    for init in (tmp_path / "missing.pt", old / "encoder.pt"):  # absent; deleted by --overwrite
        argv = ("--overwrite", "train.epochs=1", "data.limit=256", f"model.init={init}")
        assert run(tmp_path, "simclr", *argv, out="old") == 2
        assert "model.init=" in capsys.readouterr().err
        assert (old / "encoder.pt").is_file() and (old / "checkpoints" / "last.pt").is_file()


def test_init_reads_wrapped_and_prefixed_checkpoints(first_run, tmp_path) -> None:
    tiny, _ = build_backbone("resnet_tiny", small_stem=True)
    reference = torch.load(first_run / "encoder.pt", weights_only=True)
    head = {"projector.0.weight": torch.zeros(4, 4)}
    layouts = {
        "ddp.pt": {f"module.{k}": v for k, v in reference.items()},
        "ssl_model.pt": {"model": {**{f"backbone.{k}": v for k, v in reference.items()}, **head}},
        "lightning.ckpt": {"state_dict": {f"model.encoder.{k}": v for k, v in reference.items()}},
    }
    for name, content in layouts.items():
        path = tmp_path / name
        torch.save(content, path)
        notes: list[str] = []
        state = init_state(str(path), tiny, "resnet_tiny", notes=notes)
        assert state.keys() == reference.keys(), name
        assert all(torch.equal(state[k], v) for k, v in reference.items()), name
        first_key = next(iter(content.get("model", content.get("state_dict", content))))
        prefix = first_key[: -len("conv1.weight")]  # module. / backbone. / model.encoder.
        assert notes == [f"model.init: the backbone's tensors are those under {prefix!r} in {path}"]
    with pytest.raises(ConfigError, match="training checkpoint, not an encoder"):
        init_state(str(first_run / "checkpoints" / "last.pt"), tiny, "resnet_tiny")


def test_relative_init_is_recorded_as_an_absolute_path(first_run, tmp_path, monkeypatch) -> None:
    from selfsup.run import pretrain_config

    monkeypatch.chdir(first_run.parent)
    overrides = [f"model.init={first_run.name}", "model.backbone=resnet_tiny"]
    cfg, _ = pretrain_config(
        "byol", None, preset=None, out=tmp_path / "r", resume=False, flags={}, overrides=overrides
    )
    assert cfg.model.init == str(first_run)
