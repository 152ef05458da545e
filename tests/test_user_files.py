"""Files a user names that are not what the command reads (a folder, a binary or UTF-16 file, a
byte-order mark, an interpolation to no setting): one clear ``selfsup: error:`` line naming the
file or setting and what to do (exit 2), no traceback, before any data is decoded."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfsup.commands.table import RESULT_FIELDS, append_results, check_results_csv
from selfsup.errors import DataError


# ---------------------------------------------------------------------------- results CSV
def test_table_of_a_folder_names_the_csv_inside_it(tmp_path, cli) -> None:
    runs = tmp_path / "runs"
    append_results(runs / "results.csv", [dict.fromkeys(RESULT_FIELDS, "1") | {"metric": "top1"}])
    rc, _, err = cli("table", runs)  # `selfsup table runs`: the folder, not its CSV
    assert rc == 2 and "Traceback" not in err
    assert f"{runs} is a folder" in err and str(runs / "results.csv") in err
    rc, _, err = cli("table", runs / "results.csv")
    assert rc == 0, err


def test_a_binary_results_csv_is_named_not_a_decode_traceback(tmp_path, cli) -> None:
    sheet = tmp_path / "results.csv"
    sheet.write_bytes(b"PK\x03\x04\xff\xfe\x00binary spreadsheet")  # an .xlsx saved as .csv
    rc, _, err = cli("table", sheet)
    assert rc == 2 and "Traceback" not in err
    assert f"{sheet} is not a results CSV" in err and "not text" in err
    with pytest.raises(DataError, match="pass another --results-csv"):
        check_results_csv(sheet)  # eval's check of --results-csv, before any work


def test_a_results_csv_damaged_after_its_header_is_named_with_the_line(tmp_path, cli):
    csv_path = tmp_path / "results.csv"  # 400 rows: past the first block the header is read from
    append_results(csv_path, [dict.fromkeys(RESULT_FIELDS, "1") | {"metric": "top1"}] * 400)
    csv_path.write_bytes(csv_path.read_bytes() + b"\xff\xfe\xfa\n")  # a disk error, a bad copy
    rc, _, err = cli("table", csv_path)
    assert rc == 2 and "Traceback" not in err
    assert f"{csv_path} is damaged after line " in err and "restore it" in err


def test_a_results_csv_option_that_is_a_folder_says_to_name_a_file(tmp_path) -> None:
    with pytest.raises(DataError, match=r"is a folder, not a results CSV; pass the file, e\.g\."):
        check_results_csv(tmp_path)


# ---------------------------------------------------------------------------- preset, query list
def test_a_preset_saved_by_a_windows_editor_is_read(tmp_path) -> None:
    from selfsup.train.config import resolve_config

    text = "train:\n  epochs: 7\n"
    for name, data in (
        ("utf16.yaml", text.encode("utf-16")),  # Notepad's "Unicode"
        ("bom.yaml", text.encode("utf-8-sig")),  # Notepad's "UTF-8 with BOM"
    ):
        (tmp_path / name).write_bytes(data)
        assert resolve_config("simclr", str(tmp_path / name)).train.epochs == 7


def test_a_preset_that_is_a_folder_or_no_text_is_named(tmp_path, cli) -> None:
    folder = tmp_path / "recipe.yaml"
    folder.mkdir()
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xd8")
    for preset, said in ((folder, "is a folder, not a file"), (binary, "is not UTF-8 text")):
        rc, _, err = cli("config", "--preset", preset)
        assert rc == 2 and "Traceback" not in err
        assert f"preset file {preset} {said}" in err, err
        rc, _, err = cli("pretrain", "--preset", preset, "--out", tmp_path / "run")
        assert rc == 2 and said in err and not (tmp_path / "run").exists()


def test_a_query_list_with_a_byte_order_mark_or_in_utf16_names_its_images(tmp_path) -> None:
    from selfsup.commands.neighbors import _read_query_list

    image = tmp_path / "a b é.png"
    image.write_bytes(b"")
    for encoding in ("utf-8-sig", "utf-16"):
        listing = tmp_path / f"queries-{encoding}.txt"
        listing.write_bytes(f"{image}\n# a comment\n".encode(encoding))
        assert _read_query_list(listing) == [str(image)]  # not "\ufeff/..." that "does not exist"
    binary = tmp_path / "queries.txt"
    binary.write_bytes(b"\x00\x01\xfa\xfb")
    with pytest.raises(DataError, match=r"query list .*queries\.txt is not UTF-8 text"):
        _read_query_list(binary)


# ---------------------------------------------------------------------------- interpolations
@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("${oops}", "setting 'train.epochs': Interpolation key 'oops' not found"),
        ("${data.source}", "setting 'train.epochs': While dereferencing interpolation"),
        ("${", "override 'train.epochs=${'"),
    ],
)
def test_an_interpolation_to_no_setting_is_named_before_any_work(tmp_path, cli, text, said):
    rc, _, err = cli("config", f"train.epochs={text}")
    assert rc == 2 and "Traceback" not in err and said in err, err
    assert "${train.batch_size}" in err  # what an interpolation may name
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"train:\n  epochs: '{text}'\n")
    rc, _, err = cli("pretrain", "--preset", recipe, "--out", tmp_path / "run")
    assert rc == 2 and "Traceback" not in err and "train.epochs" in err, err
    assert not (tmp_path / "run").exists()


def test_an_interpolation_to_a_setting_takes_its_value(capsys) -> None:
    from selfsup.train.config import resolve_config

    cfg = resolve_config("simclr", "quickstart", overrides=["train.epochs=${train.batch_size}"])
    assert cfg.train.epochs == cfg.train.batch_size


# ---------------------------------------------------------------------------- data.eval_source
def _images(folder: Path, count: int = 3) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(folder / f"{i}.png")


@pytest.mark.parametrize(
    ("layout", "said"),
    [
        (("train/a", "train/b"), "has no 'test' split folder (found: train)"),
        (("train", "test"), "has no labels (it needs class folders"),
    ],
)
def test_an_eval_source_folder_the_knn_check_cannot_use_is_said_before_decoding(
    tmp_path, cli, monkeypatch, layout, said
) -> None:
    """Both are in the folder's listing: said before the training data (which may take hours
    to decode) and the eval folder's train split are decoded, and before --overwrite."""
    import selfsup.train.trainer as trainer

    for sub in ("train/a", "train/b", "test/a", "test/b"):
        _images(tmp_path / "data" / sub)
    for sub in layout:
        _images(tmp_path / "pets" / sub)
    monkeypatch.setattr(trainer, "load_dataset", lambda *a, **k: pytest.fail("decoded first"))
    rc, _, err = cli(
        "pretrain", "--data", tmp_path / "data", "--backbone", "resnet_tiny", "--epochs", "1",
        "--batch-size", "4", "--image-size", "16", "--out", tmp_path / "run", "--no-progress",
        f"data.eval_source={tmp_path / 'pets'}", f"data.cache_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    assert rc == 2 and "Traceback" not in err and "data.eval_source=" in err and said in err, err
    assert not (tmp_path / "run" / "config.yaml").exists()


# ---------------------------------------------------------------------------- a run's config.yaml
@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory) -> Path:
    """A finished tiny run (tiny_runs: resnet_tiny, 16 px, 128 digits, 1 epoch)."""
    from tiny_runs import run

    root = tmp_path_factory.mktemp("run_config")
    assert run(root, "simclr", "train.epochs=1", "data.limit=128") == 0
    return root / "run"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (b"model:\n  backbone: [resnet_tiny\n", "config.yaml is not valid YAML: "),  # hand-edited
        (b"- method\n", "config.yaml is YAML but not a mapping of settings"),
        (b"\x00\x9c\xd8\xff", "config.yaml is not UTF-8 text"),  # damaged
    ],
)
def test_a_broken_run_config_is_named_by_every_command_that_reads_it(
    tiny_run_dir, tmp_path, cli, text, said
) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run_dir)
    (run_dir / "config.yaml").write_bytes(text)
    for argv in (
        ("eval", run_dir, "--protocol", "knn", "--no-progress"),
        ("embed", run_dir, "--data", "mnist5k", "--out", tmp_path / "e.npz"),
        ("export", run_dir),
        ("pretrain", "--out", run_dir, "--resume", "--epochs", "2"),
    ):
        rc, _, err = cli(*argv)
        assert rc == 2 and "Traceback" not in err, (argv, err)
        assert f"{run_dir / 'config.yaml'}" in err and said in err, (argv, err)
    assert not (tmp_path / "e.npz").exists() and not (run_dir / "export").exists()


def test_resuming_a_run_whose_config_was_emptied_says_to_restore_it(
    tiny_run_dir, tmp_path, cli
) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run_dir)
    (run_dir / "config.yaml").write_text("")
    rc, _, err = cli("pretrain", "--out", run_dir, "--resume", "--epochs", "2")
    assert rc == 2 and "Traceback" not in err and "names no method (method.name)" in err, err
