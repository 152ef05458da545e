"""End to end through the CLI: each method trains, its loss falls, kNN beats the random init; resume
reproduces an uninterrupted run exactly."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from tiny_runs import TINY, run

from selfsup.cli import main
from selfsup.methods import method_defaults
from selfsup.train.logging import read_metrics

# MoCo's loss is not monotone over a few dozen steps: it rises while the queue's random initial
# keys are replaced by real (harder) ones, and the slowly moving key encoder keeps it near
# log(K + 1) for a while (measured on these digits). For MoCo the test checks the kNN gain and a
# loss below chance, log(K + 1); the loss must fall for the other three.
EXTRA = {"moco": ("method.queue_size=256",)}


@pytest.mark.parametrize("method", ["simclr", "moco", "byol", "simsiam"])
def test_method_learns_on_real_digits(tmp_path, method):
    assert run(tmp_path, method, "train.epochs=4", *EXTRA.get(method, ())) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0.0 <= results["knn_top1_random_init"] <= 1.0
    assert results["knn_top1"] > results["knn_top1_random_init"], results
    losses = [
        r["train/loss"]
        for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
        if "train/loss" in r
    ]
    assert len(losses) >= 4
    if method == "moco":
        assert max(losses[-2:]) < math.log(256 + 1), losses
    else:
        assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    state = torch.load(tmp_path / "run" / "encoder.pt", weights_only=True)
    assert "conv1.weight" in state and not any(k.startswith("fc.") for k in state)
    # config.yaml records every value the run used: the method's defaults it left unset and
    # the two views' augmentation, as comments that leave the config itself as it was
    text = (tmp_path / "run" / "config.yaml").read_text()
    saved = OmegaConf.create(text)
    unset = {k: v for k, v in method_defaults(method).items() if k not in saved.method}
    assert unset, "the tiny run sets no method option: nothing to check"
    for key, value in unset.items():
        assert f"#   method.{key}: {json.dumps(value)}\n" in text, key
    assert text.count("#   view1: {crop_scale: [0.5, 1.0]") == 1 and "#   view2: {" in text


@pytest.mark.parametrize("method", ["byol", "moco"])  # MoCo: queue and shuffle-BN's draws too
def test_resume_after_epoch_matches_uninterrupted_run(tmp_path, method):
    # 2 steps an epoch: the resume must reproduce them as it would 4 (or 40)
    common = ("train.epochs=3", "data.limit=128", *EXTRA.get(method, ()))
    assert run(tmp_path, method, *common, out="full") == 0
    assert run(tmp_path, method, *common, "train.stop_after_epochs=1", out="split") == 3
    assert not (tmp_path / "split" / "encoder.pt").exists()
    assert main(["pretrain", "--out", str(tmp_path / "split"), "--resume"]) == 0
    config = (tmp_path / "split" / "config.yaml").read_text()
    assert config.count("# method.* not set above") == 1  # rewritten at the resume, not appended
    full = torch.load(tmp_path / "full" / "encoder.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "encoder.pt", weights_only=True)
    assert full.keys() == split.keys()
    for key in full:
        assert torch.equal(full[key], split[key]), key
    # the records too: the random-init kNN is the first run's (not re-measured on trained
    # weights at the resume), and the final kNN is the one logged, top-1 under top-5
    results = {
        d: json.loads((tmp_path / d / "results.json").read_text()) for d in ("full", "split")
    }
    for key in ("knn_top1_random_init", "knn_top5_random_init", "knn_top1", "knn_top5"):
        assert results["full"][key] == results["split"][key], key
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").open()]
    logged = [r for r in records if "eval/knn_top1" in r]
    assert results["split"]["knn_top1"] == logged[-1]["eval/knn_top1"]
    assert results["split"]["knn_top1"] <= results["split"]["knn_top5"]
    assert results["split"]["knn_top1_random_init"] == logged[0]["eval/knn_top1"]


def test_existing_run_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    assert run(tmp_path, "simclr", "train.epochs=1", "data.limit=128") == 0
    assert run(tmp_path, "simclr", "train.epochs=1", "data.limit=128") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert run(tmp_path, "simclr", "train.epochs=1", "data.limit=128", "--overwrite") == 0


def test_quickstart_runs_of_each_method_get_their_own_directory(tmp_path, monkeypatch):
    """The README's quickstart commands, one per method, run one after another without --out."""
    monkeypatch.chdir(tmp_path)
    tiny = [*TINY, "train.epochs=1", "data.limit=128", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(["pretrain", *tiny]) == 0
    assert main(["pretrain", "--method", "simsiam", *tiny]) == 0
    assert json.loads((tmp_path / "runs/quickstart/results.json").read_text())["method"] == "simclr"
    simsiam = json.loads((tmp_path / "runs/quickstart-simsiam/results.json").read_text())
    assert simsiam["method"] == "simsiam"
