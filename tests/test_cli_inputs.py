"""Bad input to ``selfsup export / embed / neighbors / eval`` and ``selfsup.load_encoder``: one
clear line naming the file or flag (exit 2), before any data is loaded or work is done.

One tiny SimCLR run (``resnet_tiny``, 16 px, 200 digits, 1 epoch) is trained once for the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from tiny_runs import run as tiny_run

import selfsup
import selfsup.commands.common as common
import selfsup.export as export
from selfsup.errors import CheckpointError

RUN_SIZE = 16  # data.image_size of tiny_runs.TINY


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """The run directory and its data cache."""
    root = tmp_path_factory.mktemp("inputs")
    assert tiny_run(root, "simclr", "train.epochs=1", "data.limit=200") == 0
    return {"run": root / "run", "cache": str(root / "cache")}


@pytest.fixture
def no_data_loading(monkeypatch) -> None:
    """Fail the test if a command gets as far as loading its data."""
    monkeypatch.setattr(common, "_load", lambda *a, **k: pytest.fail("loaded the data first"))


# ---------------------------------------------------------------------------- 1: export size
def test_export_image_size_is_the_trace_input_not_the_runs_size(trained, tmp_path, cli) -> None:
    out = tmp_path / "export"
    rc, _, err = cli("export", trained["run"], "--format", "torchscript", "--image-size", "24",
                     "--out", out)  # fmt: skip
    assert rc == 0, err
    # eval / embed of the export prepare images at the size the encoder was trained at
    assert json.loads((out / "export.json").read_text())["image_size"] == RUN_SIZE
    assert export.encoder_metadata(out / "encoder.torchscript.pt")["image_size"] == RUN_SIZE
    scripted = selfsup.load_encoder(out / "encoder.torchscript.pt")
    assert scripted(torch.zeros(2, 3, RUN_SIZE, RUN_SIZE)).shape[0] == 2


@pytest.mark.parametrize("size", ["0", "2", "7", "-4"])
def test_export_refuses_an_image_size_below_8_up_front(trained, tmp_path, cli, size) -> None:
    out = tmp_path / "export"
    rc, _, err = cli("export", trained["run"], "--format", "torchscript", "--image-size", size,
                     "--out", out)  # fmt: skip
    assert rc == 2, err
    assert err.strip() == f"selfsup: error: --image-size must be >= 8 pixels, got {size}"
    assert not out.exists()


# ---------------------------------------------------------------------------- 2: export --out
@pytest.mark.parametrize("below", [False, True], ids=["out-is-a-file", "out-under-a-file"])
def test_export_out_blocked_by_a_file_is_said_before_any_work(
    trained, tmp_path, cli, monkeypatch, below
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(export, "_load_state", lambda *a: pytest.fail("loaded the encoder first"))
    out = blocker / "sub" if below else blocker
    rc, _, err = cli("export", trained["run"], "--format", "torchscript", "--out", out)
    assert rc == 2, err
    assert err.strip() == (
        f"selfsup: error: cannot write the export to {out}: {blocker} is a file, not a folder"
    )
    assert blocker.read_text() == "not a folder"


# ---------------------------------------------------------------------------- 3: embed flags
@pytest.mark.parametrize("command", ["embed", "neighbors"])
@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
        ("--image-size", "0", "--image-size must be >= 8 pixels, got 0"),
        ("--image-size", "3", "--image-size must be >= 8 pixels, got 3"),
        ("--image-size", "-1", "--image-size must be >= 8 pixels, got -1"),
    ],
)
def test_embed_and_neighbors_check_sizes_as_eval_does(
    trained, tmp_path, cli, no_data_loading, command, flag, value, message
) -> None:
    query = tmp_path / "q.png"
    Image.new("RGB", (20, 20), (90, 0, 0)).save(query)
    where = ["--out", tmp_path / "e.npz"] if command == "embed" else ["--query", query]
    rc, _, err = cli(command, trained["run"], "--data", "mnist5k", *where, flag, value,
                     "--cache-dir", trained["cache"])  # fmt: skip
    assert rc == 2, err
    assert err.strip() == f"selfsup: error: {message}"
    # eval says the same words (the checks are one function)
    rc, _, err = cli("eval", trained["run"], flag, value)
    assert rc == 2 and err.strip() == f"selfsup: error: {message}"


# ---------------------------------------------------------------------------- 4: .npy's CSV
def test_embed_npy_refuses_to_replace_a_csv_selfsup_did_not_write(trained, tmp_path, cli) -> None:
    out, index = tmp_path / "x.npy", tmp_path / "x.csv"
    index.write_text("my,own,data\n1,2,3\n")
    argv = ["embed", trained["run"], "--data", "mnist5k", "--out", out, "--limit", "20",
            "--cache-dir", trained["cache"]]  # fmt: skip
    rc, _, err = cli(*argv)
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1
    assert str(index) in err and "pass another --out, or move that file aside" in err
    assert index.read_text() == "my,own,data\n1,2,3\n" and not out.exists()
    # selfsup's own index, from an earlier embed to the same --out, is replaced
    index.unlink()
    for _ in range(2):
        rc, _, err = cli(*argv)
        assert rc == 0, err
    assert index.read_text().splitlines()[0] == "index,path,label,class"
    assert len(index.read_text().splitlines()) == 21 and np.load(out).shape[0] == 20
    # an index of an earlier selfsup (no class column) is selfsup's too: replaced
    index.write_text("index,path,label\n0,a.png,1\n")
    rc, _, err = cli(*argv)
    assert rc == 0 and index.read_text().startswith("index,path,label,class\n"), err


# ---------------------------------------------------------------------------- 5: file names
@pytest.mark.skipif(sys.platform != "linux", reason="file names of any bytes: Linux")
def test_embed_writes_file_names_that_are_not_utf8(trained, tmp_path, cli) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(folder / f"{i}.png")
    bad = os.fsdecode(os.fsencode(folder) + b"/bad\xff\xfename.png")
    try:
        Image.new("RGB", (20, 20), (0, 90, 0)).save(bad, format="PNG")
    except OSError:  # a file system that takes only UTF-8 names
        pytest.skip("this file system refuses names that are not UTF-8")
    escaped = "bad\\xff\\xfename.png"  # what the CSV and parquet files hold
    for name in ("e.parquet", "e.npy", "e.npz"):
        rc, _, err = cli("embed", trained["run"], "--data", folder, "--out", tmp_path / name,
                         "--cache-dir", trained["cache"])  # fmt: skip
        assert rc == 0, err
    paths = pq.read_table(tmp_path / "e.parquet")["path"].to_pylist()
    assert len(paths) == 4 and sum(p.endswith(escaped) for p in paths) == 1
    index = (tmp_path / "e.csv").read_text(encoding="utf-8").splitlines()
    assert len(index) == 5 and sum(line.endswith(f"{escaped},,") for line in index) == 1
    # .npz keeps the name itself: os.fsencode gives back its bytes
    names = np.load(tmp_path / "e.npz")["paths"].tolist()
    assert bad in names and os.fsencode(bad).endswith(b"/bad\xff\xfename.png")


# ---------------------------------------------------------------------------- 6: not a run
@pytest.mark.parametrize("command", ["eval", "eval-with-data", "embed", "export"])
def test_a_folder_that_is_no_run_is_named_so(tmp_path, cli, no_data_loading, command) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (20, 20)).save(folder / "cat.png")
    argv = {
        "eval": ["eval", folder],
        "eval-with-data": ["eval", folder, "--data", "mnist5k"],
        "embed": ["embed", folder, "--data", "mnist5k", "--out", tmp_path / "e.npz"],
        "export": ["export", folder],
    }[command]
    rc, _, err = cli(*argv)
    assert rc == 2, err
    assert f"{folder} is not a run directory (no config.yaml, checkpoints/ or encoder.pt)" in err
    assert "--resume" not in err and len(err.strip().splitlines()) == 1
    assert not (folder / "export").exists()
    with pytest.raises(CheckpointError, match="is not a run directory"):
        selfsup.load_encoder(folder)


@pytest.mark.parametrize("started", ["config.yaml", "checkpoints"])
def test_an_unfinished_run_is_still_told_to_resume(trained, tmp_path, cli, started) -> None:
    run = tmp_path / "run"
    run.mkdir()
    if started == "config.yaml":
        (run / "config.yaml").write_text((trained["run"] / "config.yaml").read_text())
    else:
        (run / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="the run has not finished; resume it with"):
        selfsup.load_encoder(run)
    rc, _, err = cli("export", run)
    assert rc == 2 and f"`selfsup pretrain --out {run} --resume`" in err


def test_a_run_still_training_is_not_told_to_resume(trained, tmp_path, cli) -> None:
    """`eval` while the run's pretrain is going: the resume advice would be refused (the run is
    locked); it says the run is training. A stale lock file (a killed run), even one naming a
    live process (a pid used again), changes nothing: only a held lock counts."""
    from selfsup.train.run_dir import lock_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((trained["run"] / "config.yaml").read_text())
    held = lock_run_dir(run)  # the pretrain going on: this process
    try:
        rc, _, err = cli("eval", run)
        assert rc == 2 and f"a selfsup pretrain (pid {os.getpid()}) is still training" in err
    finally:
        held.close()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    for pid in (dead, os.getpid()):
        (run / ".selfsup.lock").write_text(f"pid {pid}\n")
        rc, _, err = cli("eval", run)
        assert rc == 2 and "the run has not finished; resume it with" in err, pid


# ---------------------------------------------------------------------------- 7: not a checkpoint
def _jpeg(path: Path) -> None:
    Image.new("RGB", (20, 20), (10, 20, 30)).save(path, format="JPEG")


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())


def _yaml(path: Path) -> None:
    path.write_text("model:\n  backbone: resnet_tiny\n")


@pytest.mark.parametrize(
    ("name", "write"),
    [("photo.jpg", _jpeg), ("encoder.pt", _random_bytes), ("config.yml", _yaml)],
    ids=["jpeg", "random-bytes", "yaml"],
)
def test_a_file_that_is_no_checkpoint_is_named_without_torchs_advice(
    tmp_path, cli, no_data_loading, name, write
) -> None:
    path = tmp_path / name
    write(path)
    expected = f"{path} is not a PyTorch state_dict, safetensors or TorchScript file"
    rc, _, err = cli("eval", path, "--data", "mnist5k", "--protocol", "knn")
    assert rc == 2, err
    assert expected in err and len(err.strip().splitlines()) == 1
    assert "weights_only" not in err and "Unpickling" not in err
    with pytest.raises(CheckpointError) as caught:
        selfsup.load_encoder(path)
    assert expected in str(caught.value) and "weights_only" not in str(caught.value)


def test_a_whole_pickled_model_is_told_to_save_its_state_dict(tmp_path) -> None:
    from selfsup.models import build_backbone

    model, _ = build_backbone("resnet_tiny", small_stem=True)
    torch.save(model, tmp_path / "model.pt")  # the module object, not its state_dict
    with pytest.raises(CheckpointError, match=r"save its model\.state_dict\(\)") as caught:
        selfsup.load_encoder(tmp_path / "model.pt")
    assert "weights_only" not in str(caught.value)


# ---------------------------------------------------------------------------- audit of 2026-12-02
def test_resume_with_overwrite_is_refused_as_a_contradiction(trained, cli) -> None:
    rc, _, err = cli("pretrain", "--out", trained["run"], "--resume", "--overwrite")
    assert rc == 2 and "--resume continues the run" in err and "pass one of them" in err
    assert (trained["run"] / "encoder.pt").exists()  # nothing replaced


def test_an_out_or_cache_dir_that_is_a_file_is_named_so(trained, tmp_path, cli) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    rc, _, err = cli("pretrain", "--out", blocker, "--limit", "256")
    assert rc == 2 and f"--out {blocker} is a file, not a folder" in err
    rc, _, err = cli(
        "embed", trained["run"], "--data", "mnist5k", "--out", tmp_path / "e.npz",
        "--cache-dir", blocker,
    )  # fmt: skip
    assert rc == 2 and f"the data cache folder {blocker} is a file, not a folder" in err
    assert blocker.read_text() == "mine"


def test_a_missing_test_split_says_what_to_add_not_a_split_option(trained, tmp_path, cli) -> None:
    folder = tmp_path / "trainonly"
    for c in ("a", "b"):
        (folder / "train" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(folder / "train" / c / f"{i}.png")
    rc, _, err = cli(
        "embed", trained["run"], "--data", folder, "--split", "val", "--out", tmp_path / "e.npz",
        "--cache-dir", trained["cache"],
    )  # fmt: skip
    assert rc == 2 and "has no 'val' split folder (found: train); add a val/ folder" in err
    assert "choose one of those with --split" in err


def test_eval_on_a_folder_it_cannot_score_is_refused_before_decoding(
    trained, tmp_path, cli, no_data_loading
) -> None:
    """No held-out split, or no labels: both are in the folder's listing, so eval says so
    without decoding (and caching) the whole folder first."""

    def images(folder: Path) -> None:
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(folder / f"{i}.png")

    for c in ("a", "b"):
        images(tmp_path / "trainonly" / "train" / c)
    images(tmp_path / "flat" / "train")
    images(tmp_path / "flat" / "test")
    for folder, said in (
        ("trainonly", "has no held-out split to evaluate on"),
        ("flat", "(train split) has no labels"),
    ):
        rc, _, err = cli(
            "eval", trained["run"], "--data", tmp_path / folder, "--protocol", "knn",
            "--cache-dir", tmp_path / "cache", "--no-progress",
        )  # fmt: skip
        assert rc == 2 and said in err, err
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_eval_on_a_folder_lists_each_split_once(trained, tmp_path, cli, monkeypatch) -> None:
    """The listing that checks the layout before decoding is the one the cache is keyed by:
    the folder is walked once per split, not twice."""
    import selfsup.data.cache as cache_module
    import selfsup.data.sources as sources_module

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "labeled" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (16, 16), (60 * i, 90 if c == "a" else 0, 0)).save(
                    tmp_path / "labeled" / split / c / f"{i}.png"
                )
    listed = []
    real = sources_module.list_folder

    def counted(spec, split):
        listed.append(split)
        return real(spec, split)

    monkeypatch.setattr(sources_module, "list_folder", counted)
    monkeypatch.setattr(cache_module, "list_folder", counted)
    rc, _, err = cli(
        "eval", trained["run"], "--data", tmp_path / "labeled", "--protocol", "knn",
        "--cache-dir", tmp_path / "cache", "--no-progress", "--results-csv", tmp_path / "r.csv",
    )  # fmt: skip
    assert rc == 0, err
    assert sorted(listed) == ["test", "train"]


def test_embed_shows_decoding_progress_unless_told_not_to(trained, tmp_path, cli) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(folder / f"{i}.png")
    out = tmp_path / "e.npy"
    common = ("embed", trained["run"], "--data", folder, "--out", out)
    rc, stdout, err = cli(*common, "--cache-dir", tmp_path / "c1")
    assert rc == 0 and "decoding imgs" in err
    assert f"written to {out} (paths and labels: {out.with_suffix('.csv')})" in stdout
    rc, _, err = cli(*common, "--cache-dir", tmp_path / "c2", "--no-progress")
    assert rc == 0 and "decoding" not in err


@pytest.mark.parametrize(("size", "stem", "noted"), [(32, "false", True), (96, "false", False),
                                                     (32, "true", False)])  # fmt: skip
def test_small_images_on_the_imagenet_stem_get_a_note(size, stem, noted, tmp_path, cli) -> None:
    junk = tmp_path / "junk"  # refused once decoded: the note comes before the decoding
    junk.mkdir()
    (junk / "a.jpg").write_text("not a jpeg")
    rc, _, err = cli(
        "pretrain", "--data", junk, "--image-size", size, "--out", tmp_path / "r",
        f"model.small_stem={stem}", f"data.storage_size={size}", f"data.cache_dir={tmp_path / 'c'}",
    )  # fmt: skip
    assert rc == 2 and "holds no usable images" in err
    assert ("model.small_stem=true (3x3 conv, no max-pool) is the stem" in err) == noted, err
    assert err.count("the ImageNet stem") == (1 if noted else 0)


def test_a_data_source_override_wins_over_the_early_data_check(tmp_path, cli) -> None:
    """``--data typo data.source=mnist5k``: the early check of --data does not name the typo as
    missing data; the two settings disagree, and that is what the error says."""
    rc, _, err = cli("pretrain", "--data", tmp_path / "typo", "--out", tmp_path / "none",
                     "--resume", "data.source=mnist5k")  # fmt: skip
    assert rc == 2 and "data.source is given twice" in err and "does not exist" not in err


def test_eval_says_which_given_options_it_does_not_use(trained, tmp_path, cli) -> None:
    """`--protocol all` runs the fast linear probe unless told: --linear-epochs would be
    dropped without a word."""
    argv = ["eval", trained["run"], "--data", "mnist5k", "--limit", "40", "--cache-dir",
            trained["cache"], "--results-csv", tmp_path / "r.csv", "--no-progress",
            "--protocol", "linear", "--linear-epochs", "3", "--linear-lr", "0.2",
            "--lbfgs-iters", "20", "--knn-k", "5"]  # fmt: skip
    rc, _, err = cli(*argv)
    assert rc == 0, err
    assert "--linear-epochs and --linear-lr are options of the full linear probe" in err
    assert "--knn-k is an option of the kNN" in err
    assert "--lbfgs-iters" not in err  # the fast probe ran: it used it
    rc, _, err = cli(*argv[:-2], "--linear-mode", "both")  # used: no note
    assert rc == 0 and "no effect" not in err, err
