"""CPU smoke tests of the benchmarks: ``bench/throughput.py``'s ours + compute-limit parts at tiny
size, its step against the real ``Trainer``, and ``bench/time_to_accuracy.py``'s clock."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.train.config import resolve_config
from selfsup.train.trainer import Trainer

BENCH = Path(__file__).resolve().parents[1] / "bench"
N_IMAGES, BATCH = 24, 8
# Tiny model and heads: the machinery is under test here, not the network.
TINY = [
    "model.backbone=resnet_tiny",
    "method.proj_hidden=32",
    "method.pred_hidden=32",
    "method.bn_splits=2",  # MoCo: batch 8 in groups of 4
    "train.progress=false",
]


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


throughput = load_bench("throughput")
time_to_accuracy = load_bench("time_to_accuracy")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """``root/<class>/<i>.png``: 24 random 32x32 RGB images in two classes (no test split)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        folder = root / ("cat" if i % 2 else "dog")
        folder.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_throughput_ours_and_compute_limit_report(image_folder, tmp_path):
    out = tmp_path / "throughput.json"
    argv = [
        "--device",
        "cpu",
        "--data",
        str(image_folder),
        "--methods",
        "moco,byol",
        "--batch-size",
        str(BATCH),
        "--steps",
        "2",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--no-lightly",
        "--no-compile",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--json-out",
        str(out),
        *[f"--set={item}" for item in TINY],
    ]
    result = throughput.main(argv)
    assert json.loads(out.read_text()) == result
    assert result["data"]["train_images"] == N_IMAGES
    assert result["device"] == "cpu" and result["torch"] == torch.__version__
    assert "--no-lightly" in result["command"]
    for method in ("moco", "byol"):
        row = result["methods"][method]
        for mode in ("ours", "compute_limit"):
            stats = row[mode]
            assert stats["images_per_s"] > 0
            # images/s and step time describe the same window (up to images/s's 0.1 rounding,
            # which is a large share of a slow window's rate on a busy machine)
            rounding = 0.05 / stats["images_per_s"] + 1e-3
            assert stats["images_per_s"] * stats["step_ms"] / 1000 == pytest.approx(BATCH, rounding)
            assert math.isfinite(stats["last_loss"])
        # two windows of (1 warm-up + 2 timed) steps, all through the same optimizer
        assert row["ours"]["optimizer_steps_total"] == 6
        expected = round(row["ours"]["images_per_s"] / row["compute_limit"]["images_per_s"], 3)
        assert row["ours_over_compute_limit"] == expected
        assert row["ours_over_lightly"] is None and "lightly" not in row
    criteria = result["done_criteria_byol"]
    assert criteria["required_over_lightly"] == 4.0
    assert criteria["required_over_compute_limit"] == 0.9
    assert criteria["met"] is False  # lightly was not measured


def test_every_timed_window_holds_one_collapse_check(image_folder, tmp_path, monkeypatch):
    """The trainer's collapse monitor runs in the step: "ours" and the compute limit must pay
    for it alike, one check per window, or their ratio is biased."""
    checks: list[int] = []
    per_window: list[int] = []
    metrics, window = throughput.collapse_metrics, throughput.time_window
    monkeypatch.setattr(
        throughput, "collapse_metrics", lambda *a, **k: checks.append(1) or metrics(*a, **k)
    )

    def counted(*a, **k):
        before = len(checks)
        out = window(*a, **k)
        per_window.append(len(checks) - before)
        return out

    monkeypatch.setattr(throughput, "time_window", counted)
    argv = ["--device", "cpu", "--data", str(image_folder), "--methods", "byol"]
    argv += ["--batch-size", str(BATCH), "--steps", "2", "--warmup", "1", "--repeats", "2"]
    argv += ["--no-lightly", "--no-compile", "--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "t.json"
    throughput.main([*argv, "--json-out", str(out), *[f"--set={item}" for item in TINY]])
    assert per_window == [1, 1, 1, 1]  # compute limit, ours, compute limit, ours
    assert "partial" not in json.loads(out.read_text())  # the final write replaced the partial


def bench_cfg(method: str, image_folder: Path, tmp_path: Path):
    return resolve_config(
        method,
        "cifar10",
        shared_overrides=True,  # TINY's heads for all four methods
        overrides=[
            f"data.source={image_folder}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"train.batch_size={BATCH}",
            "train.epochs=1",
            "train.device=cpu",
            "train.collapse_every=2",  # the step's collapse-monitor branch runs too
            *TINY,
        ],
    )


@pytest.mark.parametrize("method", ["byol", "simsiam"])
def test_train_step_reproduces_the_trainer_exactly(image_folder, tmp_path, method):
    """An epoch of bench ``train_step`` gives the weights (and EMA target / fixed-lr predictor)
    of ``Trainer.fit`` for the same config and seed: the benchmark times the real step."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert Trainer(bench_cfg(method, image_folder, tmp_path), run_dir).fit().finished
    trained = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]

    cfg = bench_cfg(method, image_folder, tmp_path)
    train, _ = throughput.load_train(cfg)
    state = throughput.build_step_state(cfg, train)
    batches = throughput.epoch_batches(state.stream)
    initial = {k: v.clone() for k, v in state.method.state_dict().items()}
    for _ in range(state.stream.steps_per_epoch):
        throughput.train_step(state, batch=next(batches))
    ours = state.method.state_dict()
    assert ours.keys() == trained.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], trained[key], rtol=0, atol=0, msg=key)
    moved = [
        k for k in ours if ours[k].is_floating_point() and not torch.equal(ours[k], initial[k])
    ]
    assert any("target" in k for k in moved) or method == "simsiam"
    assert any(k.startswith("backbone.") for k in moved)


def test_compute_limit_step_skips_augmentation(image_folder, tmp_path):
    cfg = bench_cfg("simclr", image_folder, tmp_path)
    train, _ = throughput.load_train(cfg)
    state = throughput.build_step_state(cfg, train)
    calls = []
    augment = state.augment
    state.augment = lambda *a, **k: calls.append(1) or augment(*a, **k)
    views = throughput.synthetic_views(state)
    assert views[0].shape == (BATCH, 3, 32, 32) and views[0].dtype == torch.float32
    before = state.method.backbone.conv1.weight.detach().clone()
    throughput.train_step(state, views=views)
    assert calls == [] and state.global_step == 1
    assert not torch.equal(before, state.method.backbone.conv1.weight)
    throughput.train_step(state, batch=next(throughput.epoch_batches(state.stream)))
    assert calls == [1]


def test_time_to_accuracy_excludes_gaps_between_parts(tmp_path):
    """Two parts, 100 s gap between them: a kNN check 5 s into part 2 is at 60 + 5 s."""
    parts = [{"start": 1000.0, "end": 1060.0}, {"start": 1160.0, "end": 1200.0}]
    (tmp_path / time_to_accuracy.PARTS_FILE).write_text(
        json.dumps({"method": "byol", "data": "x", "knn_every": 5, "parts": parts})
    )
    records = [
        {"time": 1020.0, "step": 0, "eval/knn_top1": 31.0},  # random init, in percent
        {"time": 1030.0, "step": 50, "train/loss": 1.0},
        {"time": 1050.0, "step": 97, "eval/knn_top1": 79.9, "eval/epoch": 5.0},
        {"time": 1165.0, "step": 194, "eval/knn_top1": 82.0, "eval/epoch": 10.0},
        {"time": 1190.0, "step": 291, "eval/knn_top1": 86.5, "eval/epoch": 15.0},
        {"time": 1100.0, "step": 5, "eval/knn_top1": 99.0},  # in the gap: no part, ignored
    ]
    lines = [json.dumps(r) for r in records] + ['{"torn']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    result = time_to_accuracy.report(tmp_path, (0.80, 0.85, 0.90))
    assert result["note"].startswith("eval/knn_top1 was logged in percent")
    assert result["thresholds"]["0.80"] == {
        "wall_clock_s": 65.0,
        "epoch": 10,
        "step": 194,
        "knn_top1": 0.82,
    }
    assert result["thresholds"]["0.85"]["wall_clock_s"] == 90.0
    assert result["thresholds"]["0.90"] is None
    assert result["run_time_s"] == 100.0
    assert result["first_part_startup_s"] == 20.0
    assert [c["wall_clock_s"] for c in result["knn_curve"]] == [20.0, 50.0, 65.0, 90.0]


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory) -> Path:
    """``root/{train,test}/<class>/<i>.png``: 128 + 32 random 32x32 RGB images in two classes,
    a data set for a smoke run of the device check with its kNN checks (2 steps an epoch at
    the smoke batch of 64, instead of mnist5k's 16)."""
    root = tmp_path_factory.mktemp("split_images")
    rng = np.random.default_rng(1)
    for split, n in (("train", 128), ("test", 32)):
        for i in range(n):
            folder = root / split / ("cat" if i % 2 else "dog")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def run_device_check(tmp_path: Path, *phases: str, budget_s: int, data: str = "mnist5k"):
    import os
    import subprocess

    out = tmp_path / "out"
    env = {
        **os.environ,
        "SMOKE": "1",
        "OUT": str(out),
        "BUDGET_S": str(budget_s),
        "DATA": data,
        "PYTHON": sys.executable,
        "RUNS": str(tmp_path / "runs"),
        "CACHE": str(tmp_path / "cache"),
    }
    proc = subprocess.run(
        ["bash", str(BENCH / "device_check.sh"), *phases],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = (
        (out / "phases.jsonl").read_text().splitlines() if (out / "phases.jsonl").exists() else []
    )
    return proc, out, [json.loads(line) for line in lines]


def test_device_check_runs_a_phase_and_brings_its_results_back(tmp_path, split_folder):
    proc, out, phases = run_device_check(
        tmp_path, "pretrain-simclr", budget_s=280, data=str(split_folder)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert phases == [{"phase": "pretrain-simclr", "rc": 0, "wall_s": phases[0]["wall_s"]}]
    results = json.loads((out / "pretrain-simclr-results.json").read_text())
    assert results["method"] == "simclr" and results["epochs"] == 2
    assert (out / "pretrain-simclr-metrics.jsonl").stat().st_size > 0
    assert json.loads((out / "environment.json").read_text())["device"] == "cpu"


def test_device_check_skips_phases_the_budget_cannot_hold(tmp_path):
    proc, _, phases = run_device_check(tmp_path, "throughput-byol", "tta-byol", budget_s=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(p["phase"], p["status"]) for p in phases] == [
        ("throughput-byol", "skipped"),
        ("tta-byol", "skipped"),
    ]
    refused = tmp_path / "refused"  # before any import or check: nothing written, no time spent
    proc, _, _ = run_device_check(refused, "pretrain-byol", "pretrain-bylo", budget_s=100)
    assert proc.returncode == 2 and "unknown phase pretrain-bylo" in proc.stderr
    assert not (refused / "out").exists()
