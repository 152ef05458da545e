"""``selfsup eval --save-classifiers``, ``selfsup.load_classifier`` and ``selfsup predict``: the
classifiers an evaluation trains are kept, reproduce its accuracy, and classify new images.

One tiny SimCLR run (``resnet_tiny``, 16 px, 300 digits, 1 epoch) is trained and evaluated once
for the module (all protocols, 2 epochs each, 10% of the labels, baselines, ``--limit 300``).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import run as tiny_run

import selfsup
import selfsup.commands.common as common
import selfsup.commands.eval as eval_command
from selfsup.augment import EvalTransform
from selfsup.cli import main
from selfsup.data import load_dataset
from selfsup.errors import CheckpointError
from selfsup.models import backbone_to_torchvision

LIMIT = 300
PROTOCOLS = ("linear_fast", "linear_full", "finetune_10pct")
EVAL = [
    "--protocol",
    "all",
    "--linear-mode",
    "both",
    "--label-fraction",
    "10",
    "--linear-epochs",
    "2",
    "--finetune-epochs",
    "2",
    "--baselines",
    "--limit",
    str(LIMIT),
    "--batch-size",
    "64",
    "--no-progress",
    "--save-classifiers",
]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> dict:
    """The run, its cache, the eval JSON and the eval's stdout."""
    root = tmp_path_factory.mktemp("classifier")
    assert tiny_run(root, "simclr", "train.epochs=1", f"data.limit={LIMIT}") == 0
    run, cache = root / "run", str(root / "cache")
    rc = main(["eval", str(run), *EVAL, "--cache-dir", cache])
    assert rc == 0
    results = json.loads((run / f"eval_mnist5k_limit{LIMIT}_all.json").read_text())
    return {"run": run, "cache": cache, "results": results}


def classifier_file(evaluated, protocol: str) -> Path:
    return evaluated["run"] / "classifiers" / f"mnist5k_limit{LIMIT}_{protocol}.pt"


def test_only_the_ssl_encoders_classifiers_are_saved(evaluated) -> None:
    names = sorted(p.name for p in (evaluated["run"] / "classifiers").iterdir())
    expected = sorted(
        f"mnist5k_limit{LIMIT}_{p}{ext}" for p in PROTOCOLS for ext in (".pt", ".json")
    )
    assert names == expected  # no random_init / supervised ones, no temporary files left


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_saved_classifier_reproduces_the_reported_accuracy(evaluated, protocol) -> None:
    """The plain torchvision model with the saved state_dict (strict) scores the test split as
    the evaluation did: the fast mode's standardisation and the full mode's BatchNorm are folded
    into ``fc``, and fine-tuning saves its fine-tuned encoder."""
    path = classifier_file(evaluated, protocol)
    meta = json.loads(path.with_suffix(".json").read_text())
    reported = evaluated["results"]["protocols"][protocol]["ssl"]
    assert meta["protocol"] == protocol and meta["top1"] == reported["top1"]
    assert meta["classes"] == [str(d) for d in range(10)] and meta["eval_data"] == "mnist5k"
    assert (meta["backbone"], meta["small_stem"]) == ("resnet_tiny", True)
    assert meta["mean"] == evaluated["results"]["mean"] and meta["image_size"] == 16
    assert ("label_fraction" in meta) == protocol.startswith("finetune")

    model = backbone_to_torchvision(meta["backbone"], meta["small_stem"], num_classes=10)
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    test = load_dataset(
        "mnist5k", "test", image_size=meta["storage_size"], cache_dir=evaluated["cache"]
    ).spread(LIMIT)
    prepare = EvalTransform(
        meta["image_size"], mean=meta["mean"], std=meta["std"], crop_fraction=meta["eval_crop"]
    )
    with torch.no_grad():
        predicted = model.eval()(prepare(test.images)).argmax(dim=1)
    correct = int((predicted == test.labels).sum())
    assert len(test) == reported["n_test"] == LIMIT
    assert abs(correct - round(reported["top1"] * LIMIT)) <= 1, (correct, reported["top1"])


def test_load_classifier_and_predict_give_the_classifiers_accuracy(evaluated, cli, tmp_path):
    path = classifier_file(evaluated, "linear_full")
    clf = selfsup.load_classifier(path.with_suffix(".json"))  # the .json names it too
    assert not clf.model.training and clf.classes == [str(d) for d in range(10)]
    assert (clf.image_size, clf.eval_crop, clf.metadata["protocol"]) == (16, 1.0, "linear_full")
    with torch.no_grad():
        assert clf.model(torch.zeros(2, 3, 16, 16)).shape == (2, 10)

    out = tmp_path / "sub" / "pred.csv"
    rc, stdout, err = cli(
        "predict", path, "--data", "mnist5k", "--split", "test", "--limit", LIMIT,
        "--out", out, "--cache-dir", evaluated["cache"], "--batch-size", "64",
    )  # fmt: skip
    assert rc == 0, err
    assert len(stdout.strip().splitlines()) == 1
    found = re.search(r"accuracy ([\d.]+) \((\d+)/(\d+)\)", stdout)
    assert found and int(found.group(3)) == LIMIT, stdout
    correct = int(found.group(2))
    assert abs(correct - round(clf.metadata["top1"] * LIMIT)) <= 1, (stdout, clf.metadata["top1"])

    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "class", "confidence", "label"] and len(rows) == LIMIT
    assert sum(r["class"] == r["label"] for r in rows) == correct
    assert all(0.1 <= float(r["confidence"]) <= 1 for r in rows)  # the top of 10 probabilities
    test = load_dataset("mnist5k", "test", image_size=16, cache_dir=evaluated["cache"]).spread(
        LIMIT
    )
    assert [r["path"] for r in rows] == test.paths
    index, _ = clf.predict(test.images[:8])  # the same answer from Python
    assert [clf.classes[i] for i in index.tolist()] == [r["class"] for r in rows[:8]]


def test_a_classifier_exports_whole_to_onnx_and_onnx_runtime_gives_its_classes(
    evaluated, cli, tmp_path
):
    """``selfsup export classifiers/<name>.pt --format onnx``: encoder and trained head in one
    graph, images -> logits, for any batch size, with the class names in its metadata; the
    other formats export the encoder alone and say so."""
    import onnx
    import onnxruntime

    path = classifier_file(evaluated, "linear_fast")
    rc, out, err = cli("export", path, "--format", "onnx", "--out", tmp_path)
    assert rc == 0, err
    written = tmp_path / f"{path.stem}.onnx"
    assert out.strip() == f"selfsup: exported onnx classifier to {written}"
    clf = selfsup.load_classifier(path)
    props = {p.key: json.loads(p.value) for p in onnx.load(str(written)).metadata_props}
    assert props["classes"] == clf.classes and props["protocol"] == "linear_fast"
    assert (props["mean"], props["image_size"]) == (clf.mean, clf.image_size)
    test = load_dataset(
        "mnist5k", "test", image_size=clf.metadata["storage_size"], cache_dir=evaluated["cache"]
    ).spread(LIMIT)
    images = clf.transform()(test.images)
    with torch.no_grad():
        want = clf.model(images).numpy()
    session = onnxruntime.InferenceSession(str(written), providers=["CPUExecutionProvider"])
    for batch in (1, 5, LIMIT):
        (logits,) = session.run(["logits"], {"images": images[:batch].numpy()})
        np.testing.assert_allclose(logits, want[:batch], rtol=1e-4, atol=1e-4)
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    assert (logits.argmax(1) == want.argmax(1)).all()  # the classifier's answers

    rc, _, err = cli("export", path, "--format", "onnx", "--image-size", "32", "--out", tmp_path)
    assert rc == 2 and f"classifier of {clf.image_size} px images" in err  # its prepare()'s size
    rc, out, err = cli("export", path, "--format", "safetensors", "--out", tmp_path / "enc")
    assert rc == 0 and "exports its encoder without the trained head" in err
    assert out.strip().endswith("encoder.safetensors")


def test_saving_classifiers_adds_no_baseline(evaluated, cli, tmp_path, monkeypatch) -> None:
    """Without --baselines nothing but the encoder is trained, saved or not."""
    ft = sys.modules["selfsup.evaluate.finetune"]  # the package re-exports a function of this name
    monkeypatch.setattr(ft, "supervised_baseline", lambda *a, **k: pytest.fail("a baseline"))
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "encoder.pt"):
        shutil.copy(evaluated["run"] / name, run / name)
    rc, out, err = cli(
        "eval", run, "--protocol", "finetune", "--label-fraction", "10", "--finetune-epochs", "1",
        "--limit", LIMIT, "--batch-size", "64", "--cache-dir", evaluated["cache"], "--no-progress",
        "--results-csv", tmp_path / "r.csv", "--save-classifiers",
    )  # fmt: skip
    assert rc == 0, err
    assert "classifiers saved in" in out and f"mnist5k_limit{LIMIT}_finetune_10pct.pt" in out
    results = json.loads((run / f"eval_mnist5k_limit{LIMIT}_finetune.json").read_text())
    assert list(results["protocols"]["finetune_10pct"]) == ["ssl"]
    meta = json.loads(
        (run / "classifiers" / f"mnist5k_limit{LIMIT}_finetune_10pct.json").read_text()
    )
    assert meta["label_fraction"] == 10 and meta["labeled_images"] == LIMIT // 10


@pytest.fixture
def no_data_loading(monkeypatch) -> None:
    monkeypatch.setattr(common, "_load", lambda *a, **k: pytest.fail("loaded the data first"))


def test_knn_has_no_classifier_to_save(evaluated, cli, tmp_path, no_data_loading) -> None:
    cache = tmp_path / "cache"
    rc, _, err = cli(
        "eval", evaluated["run"], "--protocol", "knn", "--save-classifiers", "--cache-dir", cache
    )
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "--save-classifiers" in err and "--protocol knn trains none" in err
    assert not cache.exists()


def test_predict_refuses_bad_input_before_decoding(evaluated, cli, tmp_path, no_data_loading):
    cache = tmp_path / "cache"
    common = ["--data", "mnist5k", "--cache-dir", cache]
    missing = tmp_path / "nope.pt"
    rc, _, err = cli("predict", missing, *common)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"classifier file {missing} does not exist" in err
    # an encoder is no classifier: no .json beside it
    rc, _, err = cli("predict", evaluated["run"] / "encoder.pt", *common)
    assert rc == 2 and "has no encoder.json beside it" in err, err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    good = classifier_file(evaluated, "linear_fast")
    rc, _, err = cli("predict", good, *common, "--out", blocker / "pred.csv")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{blocker} is a file, not a folder" in err
    assert not cache.exists()

    with pytest.raises(CheckpointError, match="does not exist"):
        selfsup.load_classifier(missing)
    foreign = tmp_path / "other.json"
    foreign.write_text('{"classes": ["a"]}')
    (tmp_path / "other.pt").write_bytes(good.read_bytes())
    with pytest.raises(CheckpointError, match="is not the metadata of a selfsup classifier"):
        selfsup.load_classifier(foreign)


def test_overwrite_removes_the_replaced_runs_classifiers(evaluated, tmp_path) -> None:
    from selfsup.train.run_dir import remove_run_outputs

    run_dir = tmp_path / "old"
    shutil.copytree(evaluated["run"], run_dir)
    assert len(list((run_dir / "classifiers").glob("*.pt"))) == len(PROTOCOLS)
    remove_run_outputs(run_dir)  # what --overwrite does first
    assert not (run_dir / "classifiers").exists()  # emptied by selfsup: gone
    shutil.copytree(evaluated["run"] / "classifiers", run_dir / "classifiers")
    (run_dir / "classifiers" / "notes.txt").write_text("mine")  # not selfsup's: kept
    remove_run_outputs(run_dir)
    assert [p.name for p in (run_dir / "classifiers").iterdir()] == ["notes.txt"]


def test_damaged_classifiers_and_eval_results_are_named_as_such(evaluated, tmp_path) -> None:
    good = classifier_file(evaluated, "linear_fast")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(good.read_bytes()[:1000])  # an interrupted copy
    shutil.copy(good.with_suffix(".json"), damaged.with_suffix(".json"))
    with pytest.raises(CheckpointError, match="damaged or holds no classifier weights"):
        selfsup.load_classifier(damaged)
    eval_json = evaluated["run"] / f"eval_mnist5k_limit{LIMIT}_all.json"
    with pytest.raises(CheckpointError, match=r"not a classifier's metadata .*an eval result"):
        selfsup.load_classifier(eval_json)


def test_a_classifier_of_other_data_is_replaced_with_a_note(evaluated, capsys) -> None:
    path = classifier_file(evaluated, "linear_fast")
    meta = json.loads(path.with_suffix(".json").read_text())
    eval_command._note_replaced_classifier(path, meta)  # the same data and weights: quiet
    assert capsys.readouterr().err == ""
    eval_command._note_replaced_classifier(path, {**meta, "eval_data": "/elsewhere/mnist5k"})
    err = capsys.readouterr().err
    assert f"{path} held a classifier of other eval_data" in err and "replaces it" in err


def test_classifier_predict_on_files_of_any_size_gives_selfsup_predicts_answers(
    evaluated, cli, tmp_path
) -> None:
    """``Classifier.predict`` on files (or PIL images, or uint8 tensors) of any size, shape and
    mode: the classes and confidences ``selfsup predict`` writes for them."""
    from PIL import Image

    folder = tmp_path / "odd"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    paths = []
    for i, (w, h) in enumerate([(50, 37), (23, 64), (16, 16), (90, 90)]):
        pixels = torch.randint(0, 255, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        paths.append(folder / f"{i}.png")
        Image.fromarray(pixels).convert("L" if i == 1 else "RGB").save(paths[-1])
    path = classifier_file(evaluated, "linear_fast")
    out = tmp_path / "pred.csv"
    rc, _, err = cli("predict", path, "--data", folder, "--out", out, "--cache-dir", tmp_path / "c")
    assert rc == 0, err
    with open(out, newline="") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    clf = selfsup.load_classifier(path)
    for given in (paths, [Image.open(p) for p in paths]):
        index, confidence = clf.predict(given)
        for p, k, c in zip(paths, index.tolist(), confidence.tolist(), strict=True):
            assert clf.classes[k] == rows[p.name]["class"]
            assert c == pytest.approx(float(rows[p.name]["confidence"]), abs=1e-5)
    rgb = torch.from_numpy(np.array(Image.open(paths[0]))).permute(2, 0, 1)
    (k,), (c,) = clf.predict(rgb)
    assert c == pytest.approx(float(rows["0.png"]["confidence"]), abs=1e-5)


def test_eval_out_dir_writes_the_evaluations_files_there_not_in_the_run(evaluated, tmp_path, cli):
    """A run in a folder one may not write to (a shared model folder): --out-dir takes the eval
    JSON, the label subset and the classifiers, and the results CSV goes beside it; the run's
    folder is left as it was."""
    run = evaluated["run"]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    out = tmp_path / "evals" / "run"
    argv = ("--protocol", "finetune", "--label-fraction", "10", "--finetune-epochs", "1")
    rc, _, _ = cli(
        "eval", run, *argv, "--limit", LIMIT, "--batch-size", 64, "--no-progress",
        "--save-classifiers", "--cache-dir", evaluated["cache"], "--out-dir", out,
    )  # fmt: skip
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "classifiers",
        f"eval_mnist5k_limit{LIMIT}_finetune.json",
        f"subset_mnist5k_limit{LIMIT}_10pct_seed0.csv",
    ]
    assert sorted(p.suffix for p in (out / "classifiers").iterdir()) == [".json", ".pt"]
    assert (tmp_path / "evals" / "results.csv").exists()
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_a_stopped_eval_keeps_the_numbers_it_finished(evaluated, tmp_path, cli, monkeypatch):
    """Ctrl-C (or SIGTERM) during the full linear probe: the kNN and fast-probe numbers already
    measured are written (JSON and CSV rows) and named, not thrown away."""
    import selfsup.evaluate.linear as linear

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(linear, "linear_probe", stopped)
    out = tmp_path / "evals" / "run"
    rc, _, err = cli(
        "eval", evaluated["run"], "--protocol", "all", "--linear-mode", "both", "--limit", LIMIT,
        "--batch-size", 64, "--no-progress", "--cache-dir", evaluated["cache"], "--out-dir", out,
        "--label-fraction", "10",
    )  # fmt: skip
    assert rc == 130
    saved = out / f"eval_mnist5k_limit{LIMIT}_all.json"
    assert f"finished before the stop and saved in {saved}: knn (ssl), linear_fast (ssl)" in err
    results = json.loads(saved.read_text())
    assert sorted(results["protocols"]) == ["knn", "linear_fast"]
    assert (
        results["protocols"]["knn"]["ssl"]["top1"]
        == (evaluated["results"]["protocols"]["knn"]["ssl"]["top1"])
    )
    with open(tmp_path / "evals" / "results.csv") as fh:
        protocols = {row["protocol"] for row in csv.DictReader(fh)}
    assert protocols == {"knn", "linear_fast"}
    # stopped earlier again: the message names this eval's numbers, not those kept from the file
    monkeypatch.setattr(linear, "linear_probe_features", stopped)
    rc, _, err = cli(
        "eval", evaluated["run"], "--protocol", "all", "--linear-mode", "both", "--limit", LIMIT,
        "--batch-size", 64, "--no-progress", "--cache-dir", evaluated["cache"], "--out-dir", out,
        "--label-fraction", "10",
    )  # fmt: skip
    assert rc == 130 and f"saved in {saved}: knn (ssl)\n" in err
    assert sorted(json.loads(saved.read_text())["protocols"]) == ["knn", "linear_fast"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_baselines_of_an_encoder_of_no_known_architecture_are_refused_before_the_data(
    cli, tmp_path, no_data_loading
) -> None:
    """--baselines builds a random-init encoder of the same architecture: an encoder whose
    architecture is unknown (a TorchScript module of one's own) is refused before any decoding."""
    from torch import nn

    custom = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    torch.jit.script(custom).save(str(tmp_path / "custom.pt"))
    cache = tmp_path / "cache"
    rc, _, err = cli(
        "eval", tmp_path / "custom.pt", "--data", "mnist5k", "--protocol", "knn", "--baselines",
        "--cache-dir", cache, "--out-dir", tmp_path / "eval",
    )  # fmt: skip
    assert rc == 2 and "no torchvision backbone selfsup knows" in err, err
    assert not cache.exists()
