"""Evaluation and use of a trained encoder, end to end through the CLI: ``selfsup eval`` (kNN,
linear fast/full, fine-tuning on 1%/10% subsets, baselines, transfer), the results CSV and
``selfsup table``, ``selfsup embed`` / ``neighbors``, ``selfsup.load_encoder`` and
``selfsup export`` round trips.

One tiny SimCLR run on the first 1,024 quickstart digits (16 px, ``resnet_tiny``, 3 epochs) is
trained once for the module; evaluations use ``--limit 1000`` (1,000 train / all 1,000 test
digits).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

import selfsup
from selfsup.augment import EvalTransform, ViewAugment, ViewConfig
from selfsup.cli import main
from selfsup.data import load_dataset
from selfsup.errors import SelfsupError
from selfsup.evaluate.features import extract_features
from selfsup.evaluate.linear import linear_probe
from selfsup.evaluate.subsets import balanced_subset, load_subset
from selfsup.export import weights_digest
from selfsup.models import backbone_to_torchvision
from selfsup.train.config import config_hash

LIMIT = 1000
EVAL_ALL = [
    "--protocol",
    "all",
    "--linear-mode",
    "both",
    "--baselines",
    "--label-fraction",
    "1",
    "10",
    "--linear-epochs",
    "5",
    "--finetune-epochs",
    "2",
    "--batch-size",
    "64",
    "--limit",
    str(LIMIT),
    # 16 px digits: keep most of the digit, and do not mirror it (a mirrored 2 is no digit)
    "--crop-scale",
    "0.8",
    "1.0",
    "--flip-p",
    "0",
    "--no-progress",
]
EXPECTED_CELLS = {
    ("knn", "ssl"),
    ("knn", "random_init"),
    ("linear_fast", "ssl"),
    ("linear_fast", "random_init"),
    ("linear_full", "ssl"),
    ("linear_full", "random_init"),
    ("finetune_1pct", "ssl"),
    ("finetune_1pct", "supervised"),
    ("finetune_10pct", "ssl"),
    ("finetune_10pct", "supervised"),
}


def cli(*argv: str) -> tuple[int, str, str]:
    """``selfsup *argv`` in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One tiny trained SimCLR run: its directory, the data cache, and encoder.pt's hash."""
    root = tmp_path_factory.mktemp("use")
    run, cache = root / "runs" / "simclr", root / "cache"
    rc = main(
        [
            "pretrain",
            "--method",
            "simclr",
            "--out",
            str(run),
            "model.backbone=resnet_tiny",
            "data.image_size=16",
            "data.limit=1024",
            "train.batch_size=64",
            "train.epochs=3",
            "train.knn_every=0",
            "train.collapse=off",
            "train.progress=false",
            "optim.lr=0.1",
            "augment.both.crop_scale=[0.5,1.0]",
            f"data.cache_dir={cache}",
        ]
    )
    assert rc == 0
    return {
        "root": root,
        "run": run,
        "cache": str(cache),
        "encoder_sha": sha256(run / "encoder.pt"),
    }


@pytest.fixture(scope="module")
def evaluated(trained) -> dict:
    """``selfsup eval RUN --protocol all --linear-mode both --baselines`` on 1% and 10%."""
    csv_path = trained["root"] / "runs" / "results.csv"
    rc, out, err = cli("eval", str(trained["run"]), *EVAL_ALL, "--cache-dir", trained["cache"])
    assert rc == 0, err
    json_path = trained["run"] / f"eval_mnist5k_limit{LIMIT}_all.json"
    return {"stdout": out, "results": json.loads(json_path.read_text()), "csv": csv_path}


def digits(trained, split: str = "train", n: int = LIMIT):
    """The run's images as its trainer cached them (the storage size, cropped to 16 px later)."""
    data = OmegaConf.load(trained["run"] / "config.yaml").data
    size = data.storage_size or data.image_size
    ds = load_dataset("mnist5k", split, image_size=size, cache_dir=trained["cache"], progress=False)
    return ds.spread(n)


def run_transform(run: Path) -> EvalTransform:
    cfg = OmegaConf.load(run / "config.yaml")
    return EvalTransform(cfg.data.image_size, mean=list(cfg.data.mean), std=list(cfg.data.std))


# ---------------------------------------------------------------------------- eval
def test_eval_all_prints_every_protocol_and_baseline(evaluated) -> None:
    results, stdout = evaluated["results"], evaluated["stdout"]
    cells = {(p, enc) for p, by_enc in results["protocols"].items() for enc in by_enc}
    assert cells == EXPECTED_CELLS
    table_rows = [line for line in stdout.splitlines() if line.startswith("| ")][2:]
    assert {tuple(c.strip() for c in row.split("|")[1:3]) for row in table_rows} == EXPECTED_CELLS
    for protocol, encoder in EXPECTED_CELLS:
        m = results["protocols"][protocol][encoder]
        assert 0.0 <= m["top1"] <= m["top5"] <= 1.0, (protocol, encoder, m)
    # the linear modes say which they are, in the JSON and the printed table
    assert results["protocols"]["linear_fast"]["ssl"]["mode"].startswith("fast (cached features")
    assert results["protocols"]["linear_full"]["ssl"]["mode"].startswith("full (augmented")
    assert "| linear_full | ssl |" in stdout and "full (augmented, frozen encoder)" in stdout
    knn = results["protocols"]["knn"]["ssl"]
    assert (knn["k"], knn["temperature"]) == (200, 0.1)
    assert results["n_train"] == LIMIT and results["num_classes"] == 10
    assert results["train_augment"] == {"crop_scale": [0.8, 1.0], "flip_p": 0.0}
    # what produced the numbers (and the seconds): versions and the device's name
    import torchvision

    env = results["environment"]
    assert (env["torch"], env["torchvision"]) == (torch.__version__, torchvision.__version__)
    assert (env["device"], env["selfsup"]) == ("cpu", selfsup.__version__)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_eval_all_runs_under_the_autocast_a_gpu_uses(trained, tmp_path, monkeypatch, precision):
    """Every protocol with the encoder under bf16 / fp16 autocast (on CUDA the default; on the
    CPU evaluation runs fp32, so without this nothing would exercise those paths here)."""
    import selfsup.evaluate.features as features

    monkeypatch.setattr(features, "native_autocast_precision", lambda device: precision)
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    argv = [*EVAL_ALL, "--cache-dir", trained["cache"]]
    for flag, value in (("--limit", "200"), ("--linear-epochs", "1"), ("--finetune-epochs", "1")):
        argv[argv.index(flag) + 1] = value
    rc, _, err = cli("eval", str(run), *argv)
    assert rc == 0, err
    protocols = json.loads((run / "eval_mnist5k_limit200_all.json").read_text())["protocols"]
    assert {(p, enc) for p, by_enc in protocols.items() for enc in by_enc} == EXPECTED_CELLS
    for by_encoder in protocols.values():
        for m in by_encoder.values():
            assert 0.0 <= m["top1"] <= m["top5"] <= 1.0, m
            assert m.get("final_loss", 0.0) == m.get("final_loss", 0.0)  # not NaN


def test_knn_settings_are_configurable(trained) -> None:
    rc, _, err = cli(
        "eval",
        str(trained["run"]),
        "--protocol",
        "knn",
        "--knn-k",
        "7",
        "--knn-temperature",
        "0.5",
        "--limit",
        "300",
        "--cache-dir",
        trained["cache"],
        "--results-csv",
        str(trained["root"] / "knn_only.csv"),
    )
    assert rc == 0, err
    results = json.loads((trained["run"] / "eval_mnist5k_limit300_knn.json").read_text())
    knn = results["protocols"]["knn"]
    assert (knn["ssl"]["k"], knn["ssl"]["temperature"]) == (7, 0.5)
    # no --crop-scale / --flip-p: the augmented protocols take the run's own (digits: no flips)
    assert results["train_augment"] == {"crop_scale": [0.5, 1.0], "flip_p": 0.0}


def test_linear_probe_weight_decay_flags_reach_both_probes(trained, tmp_path) -> None:
    """--lbfgs-weight-decay and --linear-weight-decay are the probes' L2: recorded, and strong
    enough a penalty costs accuracy (measured on 300 digits)."""

    def probe(*flags: str) -> dict:
        rc, _, err = cli(
            "eval", str(trained["run"]), "--protocol", "linear", "--linear-mode", "both",
            "--linear-epochs", "2", "--limit", "300", "--no-progress", "--crop-scale", "0.8",
            "1.0", "--flip-p", "0", "--cache-dir", trained["cache"], "--results-csv",
            str(tmp_path / "wd.csv"), *flags,
        )  # fmt: skip
        assert rc == 0, err
        path = trained["run"] / "eval_mnist5k_limit300_linear.json"
        return json.loads(path.read_text())

    plain = probe()
    assert plain["settings"]["lbfgs_weight_decay"] == 1e-4
    assert plain["protocols"]["linear_full"]["ssl"]["weight_decay"] == 0.0
    heavy = probe("--lbfgs-weight-decay", "30", "--linear-weight-decay", "0.05")
    fast, full = heavy["protocols"]["linear_fast"]["ssl"], heavy["protocols"]["linear_full"]["ssl"]
    assert fast["weight_decay"] == 30 and full["weight_decay"] == 0.05
    assert fast["top1"] < plain["protocols"]["linear_fast"]["ssl"]["top1"] - 0.05
    rc, _, err = cli(
        "eval", str(trained["run"]), "--protocol", "linear", "--lbfgs-weight-decay", "-1"
    )
    assert rc == 2 and "--lbfgs-weight-decay must be >= 0" in err


def test_trained_encoder_beats_random_init(evaluated) -> None:
    protocols = evaluated["results"]["protocols"]
    for protocol in ("knn", "linear_fast", "linear_full"):
        ssl, random_init = protocols[protocol]["ssl"]["top1"], protocols[protocol]["random_init"]
        assert ssl > random_init["top1"], (protocol, ssl, random_init)


def test_fast_and_full_linear_modes_agree(evaluated) -> None:
    protocols = evaluated["results"]["protocols"]
    fast, full = protocols["linear_fast"]["ssl"]["top1"], protocols["linear_full"]["ssl"]["top1"]
    assert abs(fast - full) < 0.05, (fast, full)


def test_finetune_subsets_are_balanced_seeded_and_saved(trained, evaluated) -> None:
    train = digits(trained)
    protocols = evaluated["results"]["protocols"]
    for fraction, per_class in ((1, 1), (10, 10)):
        m = protocols[f"finetune_{fraction}pct"]["ssl"]
        subset_file = trained["run"] / m["subset_file"]
        assert subset_file.name == f"subset_mnist5k_limit{LIMIT}_{fraction}pct_seed0.csv"
        indices, paths, labels = load_subset(subset_file)
        assert Counter(labels.tolist()) == {c: per_class for c in range(10)}
        assert torch.equal(indices, balanced_subset(train.labels, fraction, seed=0))
        assert not torch.equal(indices, balanced_subset(train.labels, fraction, seed=1))
        assert paths == [train.paths[i] for i in indices.tolist()]
        assert torch.equal(labels, train.labels[indices])
        assert m["labeled_images"] == indices.numel() == 10 * per_class
        # evaluated on the full test split; the supervised baseline used the same subset
        assert m["n_test"] == 1000 and m["n_train"] == indices.numel()
        baseline = protocols[f"finetune_{fraction}pct"]["supervised"]
        assert baseline["subset_file"] == m["subset_file"]
        assert baseline["mode"].startswith("supervised baseline")
        # same subset, budget and augmentation: the pre-trained start is what makes the difference
        assert m["top1"] > baseline["top1"], (fraction, m["top1"], baseline["top1"])


def test_evaluation_leaves_the_encoder_file_untouched(trained, evaluated) -> None:
    assert sha256(trained["run"] / "encoder.pt") == trained["encoder_sha"]


def test_frozen_resnet_bit_identical_after_full_linear_probe(trained) -> None:
    encoder = selfsup.load_encoder(trained["run"])
    encoder.train()  # the probe must switch it to eval itself, and switch it back
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert any("running_mean" in k for k in before)
    train = digits(trained, n=128)
    cfg = OmegaConf.load(trained["run"] / "config.yaml")
    augment = ViewAugment(
        ViewConfig(crop_scale=(0.5, 1.0), jitter_p=0.0, gray_p=0.0),
        16,
        list(cfg.data.mean),
        list(cfg.data.std),
    )
    linear_probe(
        encoder,
        train.images,
        train.labels,
        train.images[:64],
        train.labels[:64],
        train_transform=augment,
        eval_transform=run_transform(trained["run"]),
        num_classes=10,
        epochs=1,
        batch_size=32,
        progress=False,
    )
    after = encoder.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert all(p.requires_grad for p in encoder.parameters())
    assert all(m.training for m in encoder.modules())


# ---------------------------------------------------------------------------- results CSV, table
def test_results_csv_has_one_line_per_number(trained, evaluated) -> None:
    with open(evaluated["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    ours = [
        r
        for r in rows
        if r["run"] == str(trained["run"])
        and r["eval_data"] == "mnist5k"
        and (r["protocol"], r["encoder"]) in EXPECTED_CELLS
    ]
    assert Counter((r["protocol"], r["encoder"], r["metric"]) for r in ours) == {
        (p, e, metric): 1 for p, e in EXPECTED_CELLS for metric in ("top1", "top5", "seconds")
    }
    expected_hash = config_hash(OmegaConf.load(trained["run"] / "config.yaml"))
    results = evaluated["results"]["protocols"]
    for r in ours:
        assert (r["method"], r["pretrain_data"], r["epochs"]) == ("simclr", "mnist5k", "3")
        assert r["config_hash"] == expected_hash
        if r["metric"] == "top1":
            assert float(r["value"]) == pytest.approx(results[r["protocol"]][r["encoder"]]["top1"])


def test_table_prints_a_row_per_run(trained, evaluated) -> None:
    # a second run: the same weights under another name, evaluated with kNN only
    second = trained["root"] / "runs" / "simclr_copy"
    second.mkdir(exist_ok=True)
    for name in ("config.yaml", "encoder.pt"):
        shutil.copy(trained["run"] / name, second / name)
    rc, _, err = cli(
        "eval", str(second), "--protocol", "knn", "--limit", "200", "--cache-dir", trained["cache"]
    )
    assert rc == 0, err
    rc, out, err = cli("table", str(evaluated["csv"]))
    assert rc == 0, err
    lines = out.strip().splitlines()
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    assert header[:6] == ["run", "method", "epochs", "weights", "encoder", "eval data"]
    assert set(header[6:]) == {p for p, _ in EXPECTED_CELLS}
    rows = {
        (cells[0], cells[4]): cells
        for cells in ([c.strip() for c in line.split("|")[1:-1]] for line in lines[2:])
    }
    assert set(rows) == {
        (str(trained["run"]), "ssl"),
        (str(trained["run"]), "random_init"),
        (str(trained["run"]), "supervised"),
        (str(second), "ssl"),
    }
    knn_col = header.index("knn")
    ssl_knn = evaluated["results"]["protocols"]["knn"]["ssl"]["top1"]
    assert rows[(str(trained["run"]), "ssl")][knn_col] == f"{ssl_knn:.4f}"
    assert rows[(str(second), "ssl")][header.index("linear_fast")] == ""  # not evaluated
    sha = weights_digest(selfsup.load_encoder(trained["run"]))[:8]
    assert rows[(str(second), "ssl")][3] == rows[(str(trained["run"]), "ssl")][3] == sha
    assert "(limit 200)" in rows[(str(second), "ssl")][5]
    assert f"(limit {LIMIT})" in rows[(str(trained["run"]), "ssl")][5]

    # the copy retrained (other weights in the same directory): a new row, the old one kept
    state = torch.load(second / "encoder.pt", weights_only=True)
    torch.save(
        {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, second / "encoder.pt"
    )
    rc, _, err = cli(
        "eval", str(second), "--protocol", "knn", "--limit", "200", "--cache-dir", trained["cache"]
    )
    assert rc == 0, err
    _, out, _ = cli("table", str(evaluated["csv"]))
    second_rows = [line for line in out.splitlines() if line.startswith(f"| {second} |")]
    assert len({line.split("|")[4].strip() for line in second_rows}) == 2


def test_results_csv_of_an_earlier_release_gains_the_new_columns(tmp_path) -> None:
    from selfsup.commands.table import RESULT_FIELDS, TABLE_FIELDS, append_results, results_table

    old = tmp_path / "results.csv"
    with open(old, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=TABLE_FIELDS)
        writer.writeheader()
        writer.writerow({**{k: "" for k in TABLE_FIELDS}, "run": "r", "encoder": "ssl",
                         "eval_data": "d", "protocol": "knn", "metric": "top1", "value": "0.5",
                         "time": "t0"})  # fmt: skip
    assert "| r |" in results_table(old)
    new_row = {k: "" for k in RESULT_FIELDS}
    new_row.update(run="r", encoder="ssl", eval_data="d", protocol="knn", metric="top1")
    new_row.update(value="0.7", weights="abc", time="t1")
    append_results(old, [new_row])
    with open(old, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == list(RESULT_FIELDS) and [r["value"] for r in rows] == ["0.5", "0.7"]
    assert "0.5000" in results_table(old) and "0.7000" in results_table(old)


# ---------------------------------------------------------------------------- transfer
def colour_folder(root: Path) -> Path:
    """train/ and val/ splits of 3 classes (red, green, blue squares on noise): other classes
    and other images than the digits the encoder was trained on."""
    g = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 6)):
        for channel, name in enumerate(("red", "green", "blue")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = g.integers(0, 60, (20, 20, 3), dtype=np.uint8)
                img[4:16, 4:16, channel] = 230
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


def test_transfer_to_another_labeled_dataset(trained, tmp_path) -> None:
    folder = colour_folder(tmp_path / "colours")
    csv_path = tmp_path / "transfer.csv"
    rc, out, err = cli(
        "eval",
        str(trained["run"]),
        "--data",
        str(folder),
        "--protocol",
        "linear",
        "--knn-k",
        "5",
        "--cache-dir",
        trained["cache"],
        "--results-csv",
        str(csv_path),
    )
    assert rc == 0, err
    results = json.loads((trained["run"] / "eval_colours_linear.json").read_text())
    assert results["num_classes"] == 3 and (results["n_train"], results["n_test"]) == (36, 18)
    assert results["eval_data"] == str(folder) and results["pretrain_data"] == "mnist5k"
    assert results["protocols"]["linear_fast"]["ssl"]["top1"] >= 0.9
    # the run's no-flip, 0.5-1 crops were chosen for digits: other data gets the papers' own
    assert results["train_augment"] == {"crop_scale": [0.08, 1.0], "flip_p": 0.5}
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["eval_data"] for r in rows} == {str(folder)}
    assert {r["pretrain_data"] for r in rows} == {"mnist5k"}
    assert "| linear_fast | ssl |" in out


# ---------------------------------------------------------------------------- embed / neighbors
def test_embed_then_load_then_embed_gives_the_same_vectors(trained, tmp_path) -> None:
    npz, npy, parquet = tmp_path / "emb.npz", tmp_path / "emb.npy", tmp_path / "emb.parquet"
    for out in (npz, npy, parquet):
        rc, stdout, err = cli(
            "embed",
            str(trained["run"]),
            "--data",
            "mnist5k",
            "--out",
            str(out),
            "--limit",
            "200",
            "--cache-dir",
            trained["cache"],
        )
        assert rc == 0, err
        assert "200 embeddings of dim 128" in stdout
    saved = np.load(npz)
    train = digits(trained, n=200)
    assert saved["embeddings"].shape == (200, 128) and saved["embeddings"].dtype == np.float32
    assert saved["paths"].tolist() == train.paths
    assert saved["labels"].tolist() == train.labels.tolist()
    assert saved["classes"].tolist() == [str(c) for c in range(10)]
    assert np.array_equal(np.load(npy), saved["embeddings"])
    with open(npy.with_suffix(".csv"), newline="") as fh:
        index = list(csv.DictReader(fh))
    assert [r["path"] for r in index] == train.paths
    assert [r["label"] for r in index] == [str(v) for v in train.labels.tolist()]
    assert [r["class"] for r in index] == [train.classes[v] for v in train.labels.tolist()]
    table = pq.read_table(parquet)
    assert table.column_names == ["path", "label", "class", "embedding"]
    assert table["path"].to_pylist() == train.paths
    assert table["label"].to_pylist() == train.labels.tolist()
    assert table["class"].to_pylist() == [str(c) for c in train.labels.tolist()]
    rows = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    assert rows.dtype == np.float32 and np.array_equal(rows, saved["embeddings"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # the Python API gives a ready module that reproduces the saved vectors
    encoder = selfsup.load_encoder(trained["run"] / "encoder.pt")
    assert isinstance(encoder, nn.Module) and not encoder.training
    again = extract_features(encoder, train.images, run_transform(trained["run"]), batch_size=64)
    assert torch.equal(again, torch.from_numpy(saved["embeddings"]))


def test_neighbors_of_a_dataset_image_start_with_itself(trained, tmp_path) -> None:
    train = digits(trained, n=200)
    queries = []
    for i in (5, 17):
        path = tmp_path / f"query{i}.png"
        Image.fromarray(train.images[i].permute(1, 2, 0).numpy()).save(path)
        queries.append(path)
    listing = tmp_path / "queries.txt"
    listing.write_text("\n".join(str(q) for q in queries) + "\n")
    for query_args in ([str(queries[0]), str(queries[1])], [str(listing)]):
        rc, out, err = cli(
            "neighbors",
            str(trained["run"]),
            "--data",
            "mnist5k",
            "--query",
            *query_args,
            "-k",
            "3",
            "--limit",
            "200",
            "--cache-dir",
            trained["cache"],
            "--json",
        )
        assert rc == 0, err
        found = json.loads(out)
        assert [item["query"] for item in found] == [str(q) for q in queries]
        for item, i in zip(found, (5, 17), strict=True):
            hits = item["neighbors"]
            assert len(hits) == 3
            assert hits[0]["path"] == train.paths[i]
            assert hits[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
            assert hits[0]["label"] == str(int(train.labels[i]))
            sims = [h["similarity"] for h in hits]
            assert sims == sorted(sims, reverse=True)
    rc, out, err = cli(
        "neighbors", str(trained["run"]), "--data", "mnist5k", "--query", str(queries[0]),
        "-k", "500", "--limit", "200", "--cache-dir", trained["cache"], "--json",
    )  # fmt: skip
    assert rc == 0 and len(json.loads(out)[0]["neighbors"]) == 200
    assert "-k 500 is more than the 200 images" in err  # capped, and said so
    # a list with a comment and a path relative to the list's folder, read from elsewhere
    (tmp_path / "lists").mkdir()
    relative = tmp_path / "lists" / "relative.txt"
    relative.write_text(f"# the first query\n../{queries[0].name}\n")
    rc, out, err = cli(
        "neighbors", str(trained["run"]), "--data", "mnist5k", "--query", str(relative),
        "-k", "1", "--limit", "200", "--cache-dir", trained["cache"], "--json",
    )  # fmt: skip
    assert rc == 0, err
    assert json.loads(out)[0]["neighbors"][0]["path"] == train.paths[5]


def test_neighbors_grid_shows_each_query_then_its_neighbours(trained, tmp_path) -> None:
    from torchvision.transforms.v2 import functional as tvf

    from selfsup.augment.preview import GRID_TILE

    train = digits(trained, n=200)
    queries = []
    for i in (5, 17):
        queries.append(tmp_path / f"query{i}.png")
        Image.fromarray(train.images[i].permute(1, 2, 0).numpy()).save(queries[-1])
    common = ("--data", "mnist5k", "--limit", "200", "--cache-dir", trained["cache"], "--json")
    grid = tmp_path / "grid.png"
    rc, out, err = cli(
        "neighbors", str(trained["run"]), "--query", *map(str, queries), "-k", "3",
        "--grid", str(grid), *common,
    )  # fmt: skip
    assert rc == 0, err
    assert f"grid written to {grid}" in err
    found = json.loads(out)
    picture = torch.from_numpy(np.array(Image.open(grid))).permute(2, 0, 1)
    step = GRID_TILE + 4  # make_grid's padding of 4 px before each tile
    assert picture.shape == (3, 2 * step + 4, 4 * step + 4)  # 2 rows: query + 3 neighbours
    by_path = {p: i for i, p in enumerate(train.paths)}
    for row, item in enumerate(found):
        shown = [train.images[5 if row == 0 else 17]]
        shown += [train.images[by_path[h["path"]]] for h in item["neighbors"]]
        for col, image in enumerate(shown):
            y, x = 4 + row * step, 4 + col * step
            tile = picture[:, y : y + GRID_TILE, x : x + GRID_TILE]
            assert torch.equal(tile, tvf.resize(image, [GRID_TILE, GRID_TILE], antialias=True))
    rc, out, err = cli(
        "neighbors", str(trained["run"]), "--query", str(queries[0]), "--grid",
        str(tmp_path / "grid.gif"), *common,
    )  # fmt: skip
    assert rc == 2 and "give a .png or .jpg" in err
    (tmp_path / "shots.png").mkdir()
    rc, out, err = cli(
        "neighbors", str(trained["run"]), "--query", str(queries[0]), "--grid",
        str(tmp_path / "shots.png"), *common,
    )  # fmt: skip
    assert rc == 2 and "is a folder; give a file name" in err


# ---------------------------------------------------------------------------- export
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_round_trips(trained, tmp_path) -> None:
    run = trained["run"]
    images = digits(trained, "test", n=64).images
    transform = run_transform(run)
    reference = extract_features(selfsup.load_encoder(run), images, transform)
    written = {}
    for fmt in ("torchvision", "safetensors", "torchscript"):
        rc, out, err = cli("export", str(run), "--format", fmt, "--out", str(tmp_path / "export"))
        assert rc == 0, err
        written[fmt] = Path(out.strip().rsplit(" ", 1)[-1])
        assert written[fmt].is_file()

    # torchvision: a plain torchvision ResNet state_dict (strict load, fc included)
    tv = backbone_to_torchvision("resnet_tiny", small_stem=True)
    tv.load_state_dict(torch.load(written["torchvision"], weights_only=True))
    tv.fc = nn.Identity()
    assert torch.equal(extract_features(tv, images, transform), reference)
    # the same file again: its fresh classifier is drawn from a fixed seed
    first = torch.load(written["torchvision"], weights_only=True)
    assert main(["export", str(run), "--out", str(tmp_path / "again")]) == 0
    again = torch.load(tmp_path / "again" / "resnet_tiny_torchvision.pt", weights_only=True)
    assert all(torch.equal(first[k], again[k]) for k in first) and first.keys() == again.keys()

    # safetensors: loads alone (architecture and normalisation in its header)
    lone = tmp_path / "lone" / "encoder.safetensors"
    lone.parent.mkdir()
    shutil.copy(written["safetensors"], lone)
    assert torch.equal(extract_features(selfsup.load_encoder(lone), images, transform), reference)
    emb = tmp_path / "lone.npz"
    rc, _, err = cli(
        "embed",
        str(lone),
        "--data",
        "mnist5k",
        "--split",
        "test",
        "--out",
        str(emb),
        "--limit",
        "64",
        "--cache-dir",
        trained["cache"],
    )
    assert rc == 0, err
    assert torch.equal(torch.from_numpy(np.load(emb)["embeddings"]), reference)

    # torchscript: torch.jit.load without selfsup, and through selfsup.load_encoder
    scripted = torch.jit.load(str(written["torchscript"]))
    assert torch.allclose(extract_features(scripted, images, transform), reference, atol=1e-5)
    loaded = selfsup.load_encoder(written["torchscript"])
    assert torch.allclose(extract_features(loaded, images, transform), reference, atol=1e-5)


def test_onnx_export_runs_in_onnx_runtime_at_any_batch_size(trained, tmp_path, monkeypatch):
    """``--format onnx``: ONNX Runtime, without torch or selfsup, computes the encoder's
    features for any batch size; the graph carries the normalisation; selfsup refuses to read
    it back as weights (there are none to rebuild a module from), and without the exporter's
    packages the command names the extra to install before reading any file."""
    import onnx
    import onnxruntime

    from selfsup.errors import CheckpointError

    run = trained["run"]
    images = digits(trained, "test", n=64).images
    transform = run_transform(run)
    reference = extract_features(selfsup.load_encoder(run), images, transform)
    rc, out, err = cli("export", str(run), "--format", "onnx", "--out", str(tmp_path / "x"))
    assert rc == 0, err
    written = Path(out.strip().rsplit(" ", 1)[-1])
    assert written == tmp_path / "x" / "encoder.onnx"
    session = onnxruntime.InferenceSession(str(written), providers=["CPUExecutionProvider"])
    prepared = transform(images).numpy()
    for batch in (1, 7, 64):
        (got,) = session.run(["features"], {"images": prepared[:batch]})
        np.testing.assert_allclose(got, reference[:batch].numpy(), rtol=1e-4, atol=1e-5)
    props = {p.key: json.loads(p.value) for p in onnx.load(str(written)).metadata_props}
    cfg = OmegaConf.load(run / "config.yaml")
    assert props["mean"] == list(cfg.data.mean) and props["std"] == list(cfg.data.std)
    assert (props["image_size"], props["backbone"]) == (cfg.data.image_size, "resnet_tiny")
    info = json.loads((tmp_path / "x" / "export.json").read_text())
    assert info["files"] == {"onnx": "encoder.onnx"}
    with pytest.raises(CheckpointError, match="is an ONNX export, for ONNX Runtime"):
        selfsup.load_encoder(written)

    # a graph that ONNX Runtime cannot run at every batch size is refused, and no file is left
    real_export = torch.onnx.export

    def fixed_batch(*args, dynamic_shapes=None, **kwargs):
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", fixed_batch)
    rc, _, err = cli("export", str(run), "--format", "onnx", "--out", str(tmp_path / "bad"))
    assert rc == 2 and "ONNX Runtime does not compute the model's features" in err
    assert "for a batch of 1" in err and not (tmp_path / "bad").exists()
    monkeypatch.undo()

    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(  # as if the extra were not installed
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("onnx", "onnxscript") else real_find_spec(name, *a),
    )
    rc, _, err = cli("export", str(tmp_path / "nowhere"), "--format", "onnx")
    assert rc == 2 and "--format onnx needs onnx and onnxscript: pip install 'selfsup[onnx]'" in err


# ---------------------------------------------------------------------------- errors
def test_user_errors_name_the_file_or_setting(trained, tmp_path, monkeypatch) -> None:
    rc, _, err = cli("eval", str(tmp_path / "missing_run"))
    assert rc == 2 and "missing_run" in err
    bare = tmp_path / "bare" / "encoder.pt"
    bare.parent.mkdir()
    shutil.copy(trained["run"] / "encoder.pt", bare)
    rc, _, err = cli("eval", str(bare))
    assert rc == 2 and "pass --data" in err
    rc, _, err = cli(
        "eval", str(trained["run"]), "--protocol", "finetune", "--label-fraction", "150"
    )
    assert rc == 2 and "--label-fraction" in err
    unlabeled = tmp_path / "flat"
    unlabeled.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(unlabeled / f"{i}.png")
    rc, _, err = cli(
        "eval", str(trained["run"]), "--data", str(unlabeled), "--cache-dir", trained["cache"]
    )
    assert rc == 2 and str(unlabeled) in err
    rc, _, err = cli(
        "embed", str(trained["run"]), "--data", "mnist5k", "--out", str(tmp_path / "emb.txt")
    )
    assert rc == 2 and "--out" in err
    import selfsup.commands.embed as embed

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as on a machine without pyarrow
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setattr(embed, "embed_dataset", lambda *a, **k: pytest.fail("encoded first"))
    rc, _, err = cli(
        "embed", str(trained["run"]), "--data", "mnist5k", "--out", str(tmp_path / "e.parquet")
    )
    assert rc == 2 and "pip install pyarrow" in err and "e.parquet" in err


def test_encoder_beside_another_runs_config_is_named_not_a_size_mismatch(trained, tmp_path):
    from selfsup.errors import CheckpointError
    from selfsup.models import build_backbone

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(trained["run"] / "config.yaml", mixed / "config.yaml")  # a resnet_tiny run
    other, _ = build_backbone("resnet18", small_stem=True)
    torch.save(other.state_dict(), mixed / "encoder.pt")
    with pytest.raises(CheckpointError, match=r"holds a resnet18 \(small_stem=True\) encoder, but"):
        selfsup.load_encoder(mixed)
    rc, _, err = cli("eval", str(mixed), "--protocol", "knn", "--cache-dir", trained["cache"])
    assert rc == 2 and "model.backbone=resnet_tiny" in err and "size mismatch" not in err
    # a file that is no encoder at all: one line, not torch's page on weights_only
    rc, _, err = cli("eval", str(trained["run"] / "config.yaml"), "--protocol", "knn")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err


def test_eval_results_merge_only_the_same_weights_data_and_settings(trained, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "encoder.pt"):
        shutil.copy(trained["run"] / name, run / name)
    common = ["--protocol", "knn", "--limit", "200", "--cache-dir", trained["cache"]]
    path = run / "eval_mnist5k_limit200_knn.json"
    assert cli("eval", str(run), *common, "--baselines", "--knn-k", "7")[0] == 0
    assert set(json.loads(path.read_text())["protocols"]["knn"]) == {"ssl", "random_init"}
    rc, out, _ = cli("eval", str(run), *common, "--knn-k", "7")  # same settings: kept
    assert rc == 0
    assert set(json.loads(path.read_text())["protocols"]["knn"]) == {"ssl", "random_init"}
    knn_rows = [line for line in out.splitlines() if line.startswith("| knn")]
    rows = {line.split("|")[2].strip(): line for line in knn_rows}
    assert "from an earlier eval" in rows["random_init"]  # the table says it was not re-run
    assert "earlier" not in rows["ssl"]
    rc, _, err = cli("eval", str(run), *common)  # another k: the baseline is not comparable
    assert rc == 0 and set(json.loads(path.read_text())["protocols"]["knn"]) == {"ssl"}
    assert f"{path} held results at other settings (knn: knn_k 7 -> 200)" in err  # and said

    # a protocol not run now keeps its numbers and its own settings: the full probe's 2 epochs
    linear = ["--protocol", "linear", "--limit", "200", "--cache-dir", trained["cache"]]
    full = ["--linear-mode", "full", "--linear-epochs", "2", "--no-progress"]
    assert cli("eval", str(run), *linear, *full)[0] == 0
    rc, out, err = cli("eval", str(run), *linear, "--linear-mode", "fast")
    assert rc == 0 and "other settings" not in err
    saved = json.loads((run / "eval_mnist5k_limit200_linear.json").read_text())
    assert set(saved["protocols"]) == {"linear_fast", "linear_full"}
    assert saved["protocol_settings"]["linear_full"]["linear_epochs"] == 2
    assert saved["protocol_settings"]["linear_fast"]["lbfgs_iters"] == 100
    (full_row,) = [line for line in out.splitlines() if line.startswith("| linear_full")]
    assert "from an earlier eval" in full_row

    # a relative --data is recorded absolute: the same words from another folder are other data
    folder = tmp_path / "colours"
    for split, n in (("train", 6), ("test", 3)):
        for c, rgb in enumerate(((200, 0, 0), (0, 200, 0))):
            (folder / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (16, 16), tuple(v + i for v in rgb)).save(
                    folder / split / f"c{c}" / f"{i}.png"
                )
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli("eval", str(run), "--data", "colours", "--cache-dir", trained["cache"])
    assert rc == 0, err
    assert json.loads((run / "eval_colours_knn.json").read_text())["eval_data"] == str(folder)

    # someone else's CSV is not appended to (or rewritten), and that is said before any work
    theirs = tmp_path / "mine.csv"
    theirs.write_text("date,experiment,notes\n2026-01-01,a,keep me\n")
    rc, _, err = cli("eval", str(run), *common, "--results-csv", str(theirs))
    assert rc == 2 and "is not a results CSV written by `selfsup eval`" in err
    assert theirs.read_text() == "date,experiment,notes\n2026-01-01,a,keep me\n"


def test_finetune_epochs_default_to_simclrs_60_for_1pct_and_30_for_10pct(
    trained, tmp_path, monkeypatch
) -> None:
    """Without --finetune-epochs, eval fine-tunes as SimCLR's Appendix B.5 does."""
    ft = sys.modules["selfsup.evaluate.finetune"]  # the package re-exports a function of this name
    seen: dict[int, int] = {}

    def recording(*args, epochs, **kwargs):
        seen[int(args[1].shape[0])] = epochs
        return {"top1": 0.0, "top5": 0.0, "final_loss": 0.0, "mode": "finetune", "epochs": epochs}

    monkeypatch.setattr(ft, "finetune", recording)
    rc, _, err = cli(
        "eval", str(trained["run"]), "--protocol", "finetune", "--label-fraction", "1", "10",
        "--limit", str(LIMIT), "--cache-dir", trained["cache"], "--no-progress",
        "--results-csv", str(tmp_path / "r.csv"),
    )  # fmt: skip
    assert rc == 0, err
    assert seen == {LIMIT // 100: 60, LIMIT // 10: 30}


def test_eval_seed_draws_the_subset_it_names(trained, tmp_path, monkeypatch) -> None:
    """--seed 1 fine-tunes on balanced_subset(..., seed=1), saved under that seed's name."""
    ft = sys.modules["selfsup.evaluate.finetune"]
    seen: list[torch.Tensor] = []

    def recording(*args, epochs, **kwargs):
        seen.append(args[2].clone())  # the subset's labels
        return {"top1": 0.0, "top5": 0.0, "final_loss": 0.0, "mode": "finetune", "epochs": epochs}

    monkeypatch.setattr(ft, "finetune", recording)
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "encoder.pt"):
        shutil.copy(trained["run"] / name, run / name)
    rc, _, err = cli(
        "eval", str(run), "--protocol", "finetune", "--label-fraction", "10", "--seed", "1",
        "--limit", str(LIMIT), "--cache-dir", trained["cache"], "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    indices, _, labels = load_subset(run / f"subset_mnist5k_limit{LIMIT}_10pct_seed1.csv")
    train = digits(trained)
    assert torch.equal(indices, balanced_subset(train.labels, 10, seed=1))
    assert not torch.equal(indices, balanced_subset(train.labels, 10, seed=0))
    assert torch.equal(seen[0], train.labels[indices])


def _odd_images(folder: Path) -> list[Path]:
    """Files of other sizes, shapes and modes than the run's 16 px digits."""
    folder.mkdir()
    g = np.random.default_rng(0)
    made = []
    for i, (size, mode) in enumerate([((50, 37), "RGB"), ((23, 64), "L"), ((16, 16), "RGBA")]):
        pixels = g.integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
        image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
        made.append(folder / f"{i}.png")
        image.save(made[-1])
    return made


def test_prepare_images_gives_the_encoder_what_embed_gives_it(trained, tmp_path) -> None:
    """``selfsup.prepare_images`` on paths, PIL images or tensors of any size: the vectors of
    ``selfsup embed`` (the cache's bicubic resize, then the evaluation view), not those of a
    plain bilinear resize."""
    paths = _odd_images(tmp_path / "odd")
    out = tmp_path / "e.npz"
    rc, _, err = cli(
        "embed", str(trained["run"]), "--data", str(tmp_path / "odd"), "--out", str(out),
        "--cache-dir", trained["cache"],
    )  # fmt: skip
    assert rc == 0, err
    saved = np.load(out)
    by_name = {Path(p).name: v for p, v in zip(saved["paths"], saved["embeddings"], strict=True)}
    embedded = np.stack([by_name[p.name] for p in paths])
    encoder = selfsup.load_encoder(trained["run"])
    with torch.no_grad():
        from_paths = encoder(selfsup.prepare_images(paths, trained["run"])).numpy()
        pil = [Image.open(p) for p in paths]
        from_pil = encoder(selfsup.prepare_images(pil, trained["run"])).numpy()
        rgb = torch.from_numpy(np.array(Image.open(paths[0]).convert("RGB"))).permute(2, 0, 1)
        from_tensor = encoder(selfsup.prepare_images(rgb, trained["run"])).numpy()
    np.testing.assert_allclose(from_paths, embedded, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(from_pil, embedded, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(from_tensor[0], embedded[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(SelfsupError, match=r"\[3, H, W\]"):
        selfsup.prepare_images(torch.zeros(5, 5), trained["run"])
    # 0-255 floats of another size were clipped to white, and a classifier was sure of them
    with pytest.raises(SelfsupError, match=r"float in \[0, 1\]; this one is torch.float32 in"):
        selfsup.prepare_images(torch.full((2, 3, 50, 40), 200.0), trained["run"])
    with pytest.raises(SelfsupError, match=r"cannot read image .*nope.png: No such file"):
        selfsup.prepare_images([tmp_path / "nope.png"], trained["run"])
    with pytest.raises(SelfsupError, match="not the loaded module"):
        selfsup.prepare_images(paths, encoder)


def test_embed_reports_the_files_it_skipped(trained, tmp_path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rc, _, err = cli(
        "embed", str(trained["run"]), "--data", str(folder), "--out", str(tmp_path / "e.npz"),
        "--cache-dir", trained["cache"],
    )  # fmt: skip
    assert rc == 0, err
    assert f"{folder} (train): skipped 1 of 4 files: 1 " in err


def test_exports_share_one_export_json_and_files_keep_the_usual_mode(trained, tmp_path) -> None:
    from selfsup.data.cache import default_file_mode
    from selfsup.errors import CheckpointError

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    for fmt in ("safetensors", "torchscript"):
        assert cli("export", str(run), "--format", fmt)[0] == 0
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["files"] == {
        "safetensors": "encoder.safetensors",
        "torchscript": "encoder.torchscript.pt",
    }
    # what an export must carry for eval / embed to prepare images as the run did
    cfg = OmegaConf.load(run / "config.yaml")
    assert (info["mean"], info["std"]) == (list(cfg.data.mean), list(cfg.data.std))
    assert info["image_size"] == cfg.data.image_size
    modes = {p.name: p.stat().st_mode & 0o777 for p in (run / "export").iterdir()}
    assert set(modes.values()) == {default_file_mode()}, modes
    assert (trained["run"] / "encoder.pt").stat().st_mode & 0o777 == default_file_mode()
    with pytest.raises(CheckpointError, match="folder of `selfsup export` files; pass one"):
        selfsup.load_encoder(run / "export")


def test_an_exported_file_is_evaluated_into_its_runs_results_csv(trained, tmp_path) -> None:
    runs = tmp_path / "runs"
    run = runs / "simclr"
    shutil.copytree(trained["run"], run)
    assert cli("export", str(run), "--format", "safetensors")[0] == 0
    exported = run / "export" / "encoder.safetensors"
    rc, _, err = cli(
        "eval", str(exported), "--protocol", "knn", "--limit", "200",
        "--cache-dir", trained["cache"], "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    with open(runs / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {r["run"] for r in rows} == {f"{run} (export/encoder.safetensors)"}
    assert (run / "export" / "eval_mnist5k_limit200_knn_encoder_safetensors.json").exists()
    # the digest is of the tensors: the run's own encoder.pt has the same, typed any way
    rc, _, err = cli(
        "eval", os.path.relpath(run, Path.cwd()), "--protocol", "knn", "--limit", "200",
        "--cache-dir", trained["cache"], "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    with open(runs / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["run"] for r in rows} == {str(run), f"{run} (export/encoder.safetensors)"}
    assert len({r["weights"] for r in rows}) == 1
    assert not (run / "results.csv").exists()  # where the export's rows went before


def test_embed_and_eval_refuse_an_unwritable_destination_before_any_work(trained, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # (root ignores permissions: a file in the way instead)
    rc, _, err = cli(
        "embed", str(trained["run"]), "--data", "mnist5k", "--out", str(blocker / "e.npz")
    )
    assert rc == 2 and "cannot write the embeddings" in err
    rc, _, err = cli(
        "eval", str(trained["run"]), "--protocol", "knn", "--results-csv", str(blocker / "r.csv")
    )
    assert rc == 2 and "cannot write the results CSV" in err


def test_table_columns_order_fine_tuning_by_label_fraction() -> None:
    from selfsup.commands.table import _protocol_order

    names = ["finetune_10pct", "knn", "finetune_1pct", "linear_fast", "finetune_100pct"]
    assert sorted(names, key=_protocol_order) == [
        "knn", "linear_fast", "finetune_1pct", "finetune_10pct", "finetune_100pct",
    ]  # fmt: skip


def test_export_over_an_export_json_of_another_shape(trained, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    (run / "export").mkdir(exist_ok=True)
    (run / "export" / "export.json").write_text('{"note": "mine"}')
    assert cli("export", str(run), "--format", "safetensors")[0] == 0
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["files"] == {"safetensors": "encoder.safetensors"}
