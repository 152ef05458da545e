"""Robustness end to end through the CLI: messy data, bad settings, interruptions, NaN losses.

Every training run here is tiny (resnet_tiny at 16 px with the ImageNet stem, batch 16, 2 epochs
of 4 steps) so the file runs in about a minute on 2 CPU cores. Runs are in-process
(``selfsup.cli.main``) except where a signal must reach a separate process. The reference for
"nothing lost" is one uninterrupted run (``baseline``): every interrupted-and-resumed run must end
with exactly its weights (``torch.equal``), which holds on CPU because the batch order, the
augmentation generator, the torch RNG, the optimizer state and the step counter are all in the
checkpoint.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

import selfsup.data.sources as sources
import selfsup.train.trainer as trainer
from selfsup.cli import main
from selfsup.data import load_dataset
from selfsup.data.sources import skip_category
from selfsup.errors import CheckpointError, ConfigError
from selfsup.train.checkpoint import load_checkpoint, save_checkpoint

IMAGE_SIZE = 16
BATCH = 16
EPOCHS = 2
GOOD_PER_CLASS = 32  # 64 images: 4 steps per epoch, 8 in all
TOTAL_STEPS = EPOCHS * (2 * GOOD_PER_CLASS // BATCH)
TINY = [
    "model.backbone=resnet_tiny",
    "model.small_stem=false",  # stride-4 stem: 16 px images become 4x4 maps, fast on CPU
    f"data.image_size={IMAGE_SIZE}",
    f"train.batch_size={BATCH}",
    f"train.epochs={EPOCHS}",
    "train.knn_every=0",
    "train.collapse=off",
    "train.log_every=1",  # one metrics line per step: the subprocess tests watch them
]
RESUME_HINT = "Resume with: selfsup pretrain --out"


# --------------------------------------------------------------------------- helpers


def _shape_image(rng: np.random.Generator, shape: str, size: tuple[int, int] = (16, 16)):
    background = tuple(int(v) for v in rng.integers(0, 256, 3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in rng.integers(0, max(1, min(size) // 2), 2))
    box = [x, y, x + min(size) // 2, y + min(size) // 2]
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    (draw.ellipse if shape == "circles" else draw.rectangle)(box, fill=fill)
    return image


def _write_good_folder(root: Path, per_class: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    written = []
    for shape in ("circles", "squares"):
        (root / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / shape / f"{i:03d}.png"
            _shape_image(rng, shape).save(path)
            written.append(path)
    return written


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` pixels, with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def pretrain(
    out: Path, *overrides: str, data: Path, cache: Path, flags: tuple[str, ...] = ()
) -> int:
    """``selfsup pretrain`` in-process on the tiny settings; ``overrides`` win over them."""
    argv = ["pretrain", "--no-progress", "--out", str(out), "--data", str(data), *flags]
    return main([*argv, *TINY, f"data.cache_dir={cache}", *overrides])


def resume(out: Path, *args: str) -> int:
    return main(["pretrain", "--out", str(out), "--resume", *args])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def train_steps_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill
            continue
        if "train/loss" in record:
            steps.append(record["step"])
    return steps


def assert_no_training(run: Path) -> None:
    """Nothing of a training step happened: no step logged, no checkpoint written."""
    assert train_steps_logged(run) == []
    assert not (run / "checkpoints").exists()
    assert not (run / "encoder.pt").exists()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    _write_good_folder(root, GOOD_PER_CLASS)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, good_folder, cache) -> Path:
    """One uninterrupted run: the result every interrupted run must reproduce exactly."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    assert pretrain(out, data=good_folder, cache=cache) == 0
    assert train_steps_logged(out) == list(range(1, TOTAL_STEPS + 1))
    return out


@pytest.fixture
def copy_of_baseline(baseline, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    return out


# --------------------------------------------------------------------------- messy data


def _write_messy_folder(root: Path) -> tuple[set[str], dict[str, str]]:
    """Good images in every PIL mode and size next to every kind of bad file.

    Returns:
        (paths of the usable files relative to ``root``, {bad file or folder name: expected
        skip category}).
    """
    good = {p.relative_to(root).as_posix() for p in _write_good_folder(root, 8, seed=1)}
    rng = np.random.default_rng(2)
    a = root / "circles"
    rgb = _shape_image(rng, "circles", (20, 12))
    variants = {
        "mode_L.png": _encode(rgb.convert("L"), "PNG"),
        "mode_LA.png": _encode(rgb.convert("LA"), "PNG"),
        "mode_P.gif": _encode(rgb.convert("P"), "GIF"),
        "mode_RGBA.png": _encode(rgb.convert("RGBA"), "PNG"),
        "mode_CMYK.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "mode_I16.png": _encode(Image.new("I;16", (14, 9), 40000), "PNG"),
        "mode_F.tiff": _encode(Image.new("F", (14, 9), 0.5), "TIFF"),
        "mode_1.bmp": _encode(rgb.convert("1"), "BMP"),
        "tiny_3x5.png": _encode(_shape_image(rng, "circles", (3, 5)), "PNG"),
        "large_640x480.jpg": _encode(_shape_image(rng, "circles", (640, 480)), "JPEG"),
    }
    # EXIF orientation 6 (display rotated 90 degrees clockwise): a red-left / blue-right
    # 20x10 photo shows red on top once rotated.
    halves = Image.new("RGB", (20, 10), (0, 0, 255))
    halves.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    variants["exif_rotated.jpg"] = _encode(halves, "JPEG", quality=95, exif=exif.tobytes())
    for name, data in variants.items():
        (a / name).write_bytes(data)
    good |= {f"circles/{name}" for name in variants}

    png = _encode(rgb, "PNG")
    jpeg = _encode(_shape_image(rng, "squares", (64, 64)), "JPEG")
    b = root / "squares"
    bad = {
        "zero_bytes.png": "zero-byte",
        "notes.txt": "not an image extension",
        "text_named.jpg": "not an image",
        "truncated.png": "corrupt",
        "truncated.jpg": "corrupt",
        "bomb.png": "decompression bomb",
        "unreadable.png": "unreadable",
    }
    (b / "zero_bytes.png").write_bytes(b"")
    (b / "notes.txt").write_text("not a picture\n")
    (b / "text_named.jpg").write_text("<html>a web page saved as .jpg</html>\n")
    (b / "truncated.png").write_bytes(png[: len(png) // 2])
    (b / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (b / "bomb.png").write_bytes(_png_declaring(40_000, 40_000))
    (b / "unreadable.png").write_bytes(png)  # reading it fails: see the test's monkeypatch
    os.symlink("..", b / "loop")  # a folder link back to the root
    os.symlink("self_link.png", b / "self_link.png")  # a file link to itself
    os.symlink("missing.png", b / "broken_link.png")
    (root / "empty_class").mkdir()
    (root / "empty_class" / "readme.md").write_text("no images here\n")
    bad.update(
        {
            "loop": "folder symlink loop",
            "self_link.png": "symlink loop",  # a file, not a folder
            "broken_link.png": "broken symlink",
            "empty_class": "empty class folder",
            "readme.md": "not an image extension",
        }
    )
    return good, bad


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="symlinks")
def test_messy_folder_trains_on_the_usable_images_and_lists_each_bad_file(
    tmp_path, monkeypatch, capsys
):
    data = tmp_path / "messy"
    good, bad = _write_messy_folder(data)
    real_read = sources.read_file_bytes

    def read(path: str) -> bytes:  # root ignores chmod 000, so deny the read here instead
        if path.endswith("unreadable.png"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_read(path)

    monkeypatch.setattr(sources, "read_file_bytes", read)
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert pretrain(out, data=data, cache=cache) == 0
    assert (out / "encoder.pt").exists()

    with open(out / "skipped.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    listed = {Path(row["path"]).name: skip_category(row["reason"]) for row in rows}
    assert listed == bad
    assert all(Path(row["path"]).is_absolute() for row in rows)

    summaries = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert len(summaries) == 1, summaries
    folders = sum(
        reason in ("folder symlink loop", "empty class folder") for reason in bad.values()
    )
    files, total = len(bad) - folders, len(bad) + len(good) - folders
    assert f"skipped {files} of {total} files and {folders} folders" in summaries[0]
    assert "2 not an image extension" in summaries[0] and "2 corrupt" in summaries[0]
    assert str(out / "skipped.csv") in summaries[0]

    # the run used exactly the usable files (the same cache key: this is a cache hit)
    used = load_dataset(data, image_size=IMAGE_SIZE, cache_dir=cache, progress=False)
    relative = [Path(p).relative_to(data).as_posix() for p in used.paths]
    assert set(relative) == good and len(relative) == len(good)
    assert used.classes == ["circles", "squares"]
    steps_per_epoch = len(good) // BATCH
    assert train_steps_logged(out) == list(range(1, EPOCHS * steps_per_epoch + 1))
    # EXIF orientation applied: red (the photo's left half) ends up on top
    exif = used.images[relative.index("circles/exif_rotated.jpg")]
    top, bottom = exif[:, 1].float(), exif[:, -2].float()
    assert top[0].mean() > 200 and top[2].mean() < 60
    assert bottom[2].mean() > 200 and bottom[0].mean() < 60


def test_folder_preset_without_data_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--preset", "imagenette"]) == 2
    err = capsys.readouterr().err
    assert "--preset imagenette needs --data" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_empty_source_is_a_clear_error_before_training(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    assert pretrain(out, data=empty, cache=tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert "selfsup: error:" in err and str(empty) in err and "no usable image" in err
    assert "Traceback" not in err
    assert_no_training(out)


def test_source_with_nothing_usable_is_a_clear_error_before_training(tmp_path, capsys):
    data = tmp_path / "bad"
    (data / "cats").mkdir(parents=True)
    (data / "cats" / "a.png").write_bytes(b"")
    (data / "cats" / "b.jpg").write_text("not a jpeg")
    (data / "cats" / "c.txt").write_text("notes")
    out = tmp_path / "run"
    assert pretrain(out, data=data, cache=tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert "holds no usable images" in err
    assert "1 zero-byte" in err and "1 not an image" in err  # what was wrong, counted
    assert_no_training(out)
    assert not (out / "config.yaml").exists()


def test_missing_source_names_the_accepted_forms(tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(out, data=tmp_path / "nowhere", cache=tmp_path / "cache") == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "accepted forms" in err
    assert_no_training(out)


# --------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "cifar01"], "did you mean 'cifar10'"),
        (
            ["--method", "moco", "method.queue_size=100"],
            "not a positive multiple of train.batch_size=16",
        ),
        (["--method", "moco", "method.queue_size=0"], "method.queue_size=0 is not a positive"),
        (
            ["--method", "moco", "method.bn_splits=12"],
            "method.bn_splits=12 must be >= 1 and divide",
        ),
        (["--method", "moco", "method.bn_splits=16"], "groups of at least 2 images"),
        (["--method", "moco", "method.bn_splits=0"], "method.bn_splits=0 must be >= 1"),
        (["optim.lrr=0.1"], "did you mean 'optim.lr'"),
        (["trian.epochs=3"], "did you mean 'train'"),
        (["train.epochs=many"], "train.epochs"),
        (["train.batch_size=3.5"], "train.batch_size"),
        (["optim.lr=0"], "optim.lr must be > 0"),
        (["optim.lr=-0.1"], "optim.lr must be > 0"),
        (["train.epochs=0"], "train.epochs must be >= 1"),
        (["train.batch_size=1000"], "larger than the 64 usable images"),
        (["method.name=simclrr"], "did you mean 'simclr'"),
        (["model.backbone=resnet19"], "did you mean 'resnet18'"),
        (["method.temprature=0.2"], "did you mean 'method.temperature'"),
        (["method.temperature=hot"], "method.temperature must be of type float"),
        (["augment.view1.blurr_p=0.5"], "did you mean 'augment.view1.blur_p'"),
        (["train.on_nan=ignore"], "train.on_nan must be one of"),
        (
            ["train.device=cuda:7"] if not torch.cuda.is_available() else ["train.device=tpu"],
            "train.device",
        ),
    ],
)
def test_bad_setting_is_named_and_exits_before_any_training_step(
    args, message, tmp_path, good_folder, cache, capsys
):
    out = tmp_path / "run"
    flags = tuple(args[:2]) if args[0].startswith("--") else ()
    overrides = args[len(flags) :]
    assert pretrain(out, *overrides, flags=flags, data=good_folder, cache=cache) == 2
    err = capsys.readouterr().err
    assert "selfsup: error:" in err and message in err, err
    assert "Traceback" not in err
    assert_no_training(out)
    # nothing of good_folder is skipped: no skipped.csv, so the refused run leaves no directory
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_unknown_method_flag_is_refused_by_the_parser(tmp_path, good_folder, cache, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain(tmp_path / "run", flags=("--method", "simclr2"), data=good_folder, cache=cache)
    assert exit_info.value.code == 2
    assert "invalid choice: 'simclr2'" in capsys.readouterr().err
    assert_no_training(tmp_path / "run")


def test_output_directory_holding_a_run_is_refused_unless_resume_or_overwrite(
    copy_of_baseline, good_folder, cache, capsys
):
    out = copy_of_baseline
    before = (out / "encoder.pt").read_bytes()
    steps_before = train_steps_logged(out)
    assert pretrain(out, data=good_folder, cache=cache) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "encoder.pt").read_bytes() == before
    assert train_steps_logged(out) == steps_before

    # what eval and export leave in a run, and a file of the user's own
    (out / "eval_pets_knn.json").write_text("{}")
    (out / "subset_pets_1pct_seed0.csv").write_text("index,path,label\n")
    (out / "export").mkdir()
    (out / "export" / "encoder.safetensors").write_bytes(b"old weights")
    old_events = sorted(p.name for p in (out / "tb").iterdir())
    (out / "notes.txt").write_text("mine")
    for name in ("checkpoints/supervised_epoch90.pth", "tb/events.out.other", "export/model.onnx"):
        (out / name).write_text("mine")
    assert pretrain(out, flags=("--overwrite",), data=good_folder, cache=cache) == 0
    for name in ("checkpoints/supervised_epoch90.pth", "tb/events.out.other", "export/model.onnx"):
        assert (out / name).read_text() == "mine", name
    assert train_steps_logged(out) == list(range(1, TOTAL_STEPS + 1))  # a fresh log, not appended
    assert not list(out.glob("eval_*")) and not list(out.glob("subset_*"))
    assert sorted(p.name for p in (out / "export").iterdir()) == ["model.onnx"]
    assert (out / "notes.txt").read_text() == "mine"
    new_events = sorted(p.name for p in (out / "tb").glob("events.out.tfevents.*"))
    assert len(new_events) == 1 and not set(new_events) & set(old_events)


def test_overwrite_keeps_the_run_when_the_new_data_is_a_typo(
    copy_of_baseline, tmp_path, cache, capsys
):
    out = copy_of_baseline
    before = sorted(p.name for p in out.iterdir())
    typo = tmp_path / "no-such-folder"
    assert pretrain(out, flags=("--overwrite",), data=typo, cache=cache) == 2
    assert "no-such-folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before and (out / "encoder.pt").exists()


def test_overwrite_refuses_a_folder_whose_config_is_not_a_run(tmp_path, good_folder, cache, capsys):
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.yaml").write_text("model: my-own-detector\nlr: 3\n")
    assert pretrain(out, flags=("--overwrite",), data=good_folder, cache=cache) == 2
    assert "not a selfsup run's config" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == "model: my-own-detector\nlr: 3\n"


def test_run_directory_cannot_be_the_data_source(tmp_path, good_folder, cache, capsys):
    assert pretrain(good_folder, data=good_folder, cache=cache) == 2
    assert "is the data source" in capsys.readouterr().err


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_unwritable_output_directory_is_refused_before_any_work(
    code, tmp_path, good_folder, cache, monkeypatch, capsys
):
    real_write = pathlib.Path.write_bytes

    def write_bytes(self, data):  # a read-only or full disk, seen by the writability probe
        if self.name == ".write_test":
            raise OSError(code, os.strerror(code), str(self))
        return real_write(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    out = tmp_path / "run"
    assert pretrain(out, data=good_folder, cache=cache) == 2
    err = capsys.readouterr().err
    assert f"cannot write to output directory {out}" in err and os.strerror(code) in err
    assert "choose a --out in a folder you can write to" in err
    assert_no_training(out)
    assert not (out / "skipped.csv").exists()  # refused before the data was even read


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint_and_resumes(
    tmp_path, good_folder, cache, baseline, monkeypatch, capsys
):
    real_save = torch.save
    saved = []

    def save_on_a_filling_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj:  # a training checkpoint
            saved.append(obj["epoch"])
            if len(saved) > 1:  # the disk fills while the second one is written
                f.write(b"\x80partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_filling_disk)
    out = tmp_path / "run"
    assert pretrain(out, data=good_folder, cache=cache) == 2
    err = capsys.readouterr().err
    assert "cannot write a checkpoint" in err and "No space left on device" in err
    assert f"selfsup pretrain --out {out} --resume" in err and "is intact" in err
    assert "Traceback" not in err
    ckpt = out / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.pt"]  # no torn temp file left
    assert torch.load(ckpt / "last.pt", weights_only=False)["epoch"] == 1

    monkeypatch.setattr(torch, "save", real_save)  # space freed
    assert resume(out) == 0
    assert_same_weights(out / "encoder.pt", baseline / "encoder.pt")


# --------------------------------------------------------------------------- interruptions


def _start(out: Path, data: Path, cache: Path) -> subprocess.Popen:
    cli = [sys.executable, "-m", "selfsup", "pretrain", "--no-progress"]
    command = [*cli, "--data", str(data), "--out", str(out), *TINY, f"data.cache_dir={cache}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _signal_after(process: subprocess.Popen, out: Path, steps: int, delay: float, sig: int):
    """Send ``sig`` once ``steps`` training steps are logged, plus ``delay`` seconds."""
    deadline = time.monotonic() + 120
    while len(train_steps_logged(out)) < steps:
        if process.poll() is not None:
            pytest.fail(f"run ended before step {steps}: {process.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("no training progress within 120 s")
        time.sleep(0.01)
    time.sleep(delay)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


@pytest.mark.parametrize(
    ("sig", "seed"),
    [(signal.SIGTERM, 0), (signal.SIGTERM, 1), (signal.SIGINT, 4)],
)
def test_sigterm_checkpoints_and_resume_is_bit_identical(
    sig, seed, tmp_path, good_folder, cache, baseline
):
    rng = np.random.default_rng(seed)
    steps = int(rng.integers(1, TOTAL_STEPS - 3))  # leaves the run time to be stopped in
    out = tmp_path / "run"
    rc, err = _signal_after(_start(out, good_folder, cache), out, steps, rng.uniform(0, 0.03), sig)
    assert rc == 3, err[-2000:]
    assert f"{RESUME_HINT} {out} --resume" in err and signal.Signals(sig).name in err
    assert not (out / "encoder.pt").exists()
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert steps <= state["global_step"] < TOTAL_STEPS  # the step in progress was finished

    assert resume(out) == 0
    assert_same_weights(out / "encoder.pt", baseline / "encoder.pt")
    final = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["model"]
    expected = torch.load(baseline / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(final[k], expected[k]) for k in expected)  # heads too
    # every step after the stop was trained exactly once more
    assert train_steps_logged(out)[-(TOTAL_STEPS - state["global_step"]) :] == list(
        range(state["global_step"] + 1, TOTAL_STEPS + 1)
    )


def test_sigterm_before_training_is_a_clean_stop_with_its_message(tmp_path):
    """`kill` during the random-init kNN check (before the trainer's own handler, which stops
    after a step): SIGTERM used to end the process at once, silently, leaving its run lock.
    Now it is handled as a Ctrl-C: the message and the command to continue, status 143."""
    out = tmp_path / "run"
    code = f"""
import os, signal, sys
import selfsup.train.trainer as trainer
from selfsup.cli import main
def killed(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(self, *args, **kwargs)
real, trainer.Trainer._knn = trainer.Trainer._knn, killed
sys.exit(main(["pretrain", "--no-progress", "--epochs", "1", "--out", {str(out)!r},
               "data.limit=256", "train.batch_size=64", "data.cache_dir={tmp_path / "cache"}"]))
"""
    checkout = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": checkout}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "selfsup: interrupted; run the same command with --resume" in proc.stderr
    assert not (out / ".selfsup.lock").exists()
    assert main(["pretrain", "--no-progress", "--out", str(out), "--resume"]) == 0


@pytest.mark.parametrize(("epoch", "seed"), [(1, 0), (2, 1)])
def test_sigkill_at_any_point_resumes_to_the_same_result(
    epoch, seed, tmp_path, good_folder, cache, baseline
):
    # A kill gives no chance to checkpoint: resume goes back to the last epoch checkpoint (or
    # prev.pt if last.pt was being replaced, or step 0 when killed before the first one, as in
    # epoch 1) and replays the lost steps. The replay is deterministic on CPU (batch order,
    # augmentation generator and RNG state are in the checkpoint), so the result is bit-identical.
    rng = np.random.default_rng(100 + seed)
    per_epoch = TOTAL_STEPS // EPOCHS
    steps = min(int(rng.integers((epoch - 1) * per_epoch + 1, epoch * per_epoch)), TOTAL_STEPS - 2)
    out = tmp_path / "run"
    rc, _ = _signal_after(
        _start(out, good_folder, cache), out, steps, rng.uniform(0, 0.05), signal.SIGKILL
    )
    assert rc == -signal.SIGKILL
    assert resume(out) == 0
    assert_same_weights(out / "encoder.pt", baseline / "encoder.pt")


def test_torn_last_checkpoint_falls_back_to_prev(copy_of_baseline, baseline, capsys):
    out = copy_of_baseline
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # e.g. copied back from a failing disk
    for name in ("encoder.pt", "results.json"):
        (out / name).unlink()
    assert resume(out) == 0
    err = capsys.readouterr().err
    assert "prev.pt" in err  # resumed from epoch 1, trained epoch 2 again
    assert f"warning: checkpoint {last} cannot be read" in err  # and it says why
    assert_same_weights(out / "encoder.pt", baseline / "encoder.pt")


def test_crash_while_writing_a_checkpoint_leaves_last_and_prev_intact(
    copy_of_baseline, monkeypatch
):
    ckpt = copy_of_baseline / "checkpoints"
    before = {name: (ckpt / name).read_bytes() for name in ("last.pt", "prev.pt")}

    def crash(obj, f, *args, **kwargs):
        f.write(b"\x80half a checkpoint")
        raise KeyboardInterrupt  # the process dies in the middle of the write

    monkeypatch.setattr(torch, "save", crash)
    state = torch.load(ckpt / "last.pt", weights_only=False)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(state, ckpt)
    assert {p.name for p in ckpt.iterdir()} == set(before)
    assert {name: (ckpt / name).read_bytes() for name in before} == before
    loaded, path = load_checkpoint(ckpt, method="simclr", config_hash=state["config_hash"])
    assert path.name == "last.pt" and loaded["epoch"] == EPOCHS


def _rewrite(path: Path, **changes) -> None:
    state = torch.load(path, weights_only=False)
    state.update(changes)
    torch.save(state, path)


@pytest.mark.parametrize(
    ("args", "tamper", "message"),
    [
        (["--method", "byol"], {}, "is a simclr run; --method byol cannot resume it"),
        (["method.temperature=0.3"], {}, "another method/model/augmentation config"),
        (["model.backbone=resnet18"], {}, "another method/model/augmentation config"),
        ([], {"format_version": 99}, "checkpoint format 99"),
        ([], {"method": "byol"}, "written by method 'byol'"),
    ],
)
def test_checkpoint_of_another_config_method_or_version_is_refused(
    args, tamper, message, copy_of_baseline, capsys
):
    out = copy_of_baseline
    for name in ("last.pt", "prev.pt"):
        if tamper:
            _rewrite(out / "checkpoints" / name, **tamper)
    encoder = (out / "encoder.pt").read_bytes()
    assert resume(out, *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert (out / "encoder.pt").read_bytes() == encoder


def test_unreadable_checkpoints_are_refused_with_both_reasons(copy_of_baseline, capsys):
    for name in ("last.pt", "prev.pt"):
        (copy_of_baseline / "checkpoints" / name).write_bytes(b"garbage")
    assert resume(copy_of_baseline) == 2
    err = capsys.readouterr().err
    assert "no readable checkpoint" in err and "last.pt" in err and "prev.pt" in err


def test_resume_without_a_run_says_to_start_without_resume(tmp_path, capsys):
    assert resume(tmp_path / "never") == 2
    assert "start without --resume" in capsys.readouterr().err


def test_checkpoint_loader_reports_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="start without --resume"):
        load_checkpoint(tmp_path, method="simclr", config_hash="x")


# --------------------------------------------------------------------------- numerical faults


def _nan_loss_at(monkeypatch, bad_calls: set[int]):
    """Make the method's loss NaN on the given (1-based) forward calls; returns the real builder."""
    real_build = trainer.build_model

    def build(cfg, init=None):
        method = real_build(cfg, init)
        forward, calls = method.forward, [0]

        def nan_forward(x1, x2):
            calls[0] += 1
            out = forward(x1, x2)
            if calls[0] in bad_calls:
                out = {**out, "loss": out["loss"] * float("nan")}
            return out

        method.forward = nan_forward
        return method

    monkeypatch.setattr(trainer, "build_model", build)
    return real_build


def test_exploding_lr_stops_with_step_and_likely_causes(tmp_path, good_folder, cache, capsys):
    out = tmp_path / "run"
    assert pretrain(out, "optim.lr=1e30", data=good_folder, cache=cache) == 2
    err = capsys.readouterr().err
    assert "loss became NaN/Inf at or before step" in err
    assert "optim.lr=1e+30" in err and "train.precision=fp32" in err
    assert "train.on_nan=skip" in err
    assert "no checkpoint was written yet" in err  # it blew up within the first epoch
    assert not (out / "checkpoints").exists() and not (out / "encoder.pt").exists()


def test_nan_stops_naming_the_last_good_checkpoint_which_resumes(
    tmp_path, good_folder, cache, baseline, monkeypatch, capsys
):
    bad_step = TOTAL_STEPS // 2 + 2  # in epoch 2, after the epoch-1 checkpoint
    real_build = _nan_loss_at(monkeypatch, {bad_step})
    out = tmp_path / "run"
    assert pretrain(out, data=good_folder, cache=cache) == 2
    err = capsys.readouterr().err
    last = out / "checkpoints" / "last.pt"
    assert f"at or before step {bad_step} (epoch 2)" in err
    assert f"the last good checkpoint is {last}" in err
    state = torch.load(last, weights_only=False)
    assert state["epoch"] == 1 and all(v.isfinite().all() for v in state["model"].values())

    monkeypatch.setattr(trainer, "build_model", real_build)
    assert resume(out) == 0  # the transient fault is gone: the run ends as if it never happened
    assert_same_weights(out / "encoder.pt", baseline / "encoder.pt")


def test_on_nan_skip_skips_the_bad_steps_and_finishes(tmp_path, good_folder, cache, monkeypatch):
    _nan_loss_at(monkeypatch, {2, 5})
    out = tmp_path / "run"
    assert pretrain(out, "train.on_nan=skip", data=good_folder, cache=cache) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if "train/loss" in r}
    assert sorted(logged) == list(range(1, TOTAL_STEPS + 1))
    for step, record in logged.items():  # one step per logging window (log_every=1)
        assert record["train/skipped_steps"] == float(step in (2, 5))
        assert (record["train/loss"] is None) == (step in (2, 5))  # JSON null, not bare NaN
    assert json.loads((out / "results.json").read_text())["skipped_steps"] == 2
    # a NaN step that reached the optimizer would have made every weight NaN
    assert all(v.float().isfinite().all() for v in weights(out / "encoder.pt").values())


def test_images_per_s_times_training_steps_not_the_epoch_end(
    tmp_path, good_folder, cache, monkeypatch
):
    """The first window of epoch 2 starts after epoch 1's checkpoint: a checkpoint that takes a
    second (a slow disk) would otherwise read as a step of 16 images in over a second."""
    real_save = trainer.save_checkpoint

    def slow_save(*args, **kwargs):
        time.sleep(1.0)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(trainer, "save_checkpoint", slow_save)
    out = tmp_path / "run"
    assert pretrain(out, data=good_folder, cache=cache) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rate = {r["step"]: r["train/images_per_s"] for r in records if "train/loss" in r}
    first_of_epoch_2 = TOTAL_STEPS // 2 + 1
    assert rate[first_of_epoch_2] > 2 * BATCH  # a window of under half a second: no checkpoint


def _refuse_nan(name: str):
    raise ValueError(f"bare {name} in JSON")


def test_a_skipped_last_step_is_null_in_results_json_and_the_printed_line(
    tmp_path, good_folder, cache, monkeypatch, capsys
):
    """The last logging window skipped: no final loss. results.json and the line printed on
    stdout say null, which strict readers (jq, JavaScript) take, not Python's bare NaN."""
    _nan_loss_at(monkeypatch, {TOTAL_STEPS})
    out = tmp_path / "run"
    capsys.readouterr()
    assert pretrain(out, "train.on_nan=skip", data=good_folder, cache=cache) == 0
    results = json.loads((out / "results.json").read_text(), parse_constant=_refuse_nan)
    assert results["final_loss"] is None and results["skipped_steps"] == 1
    printed = json.loads(capsys.readouterr().out.splitlines()[0], parse_constant=_refuse_nan)
    assert printed["final_loss"] is None


# --------------------------------------------------------------------------- out of memory
def _oom_at_step(monkeypatch, bad_call: int) -> None:
    """Make the given (1-based) training step raise CUDA's out-of-memory error."""
    real_step, calls = trainer.optimizer_step, [0]

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == bad_call:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "optimizer_step", step)


def test_out_of_memory_names_the_settings_to_lower(
    tmp_path, good_folder, cache, monkeypatch, capsys
):
    bad_step = TOTAL_STEPS // 2 + 1  # the first step of epoch 2, after the epoch-1 checkpoint
    _oom_at_step(monkeypatch, bad_step)
    out = tmp_path / "run"
    assert pretrain(out, data=good_folder, cache=cache) == 2
    message = capsys.readouterr().err
    assert "Traceback" not in message
    assert "ran out of memory during epoch 2 of training" in message
    assert f"train.batch_size={BATCH}" in message and f"train.batch_size={BATCH // 2}" in message
    assert f"{out / 'checkpoints' / 'last.pt'} is intact" in message
    resume_command = f"selfsup pretrain --out {out} --resume train.batch_size={BATCH // 2}"
    assert resume_command in message
    monkeypatch.undo()  # memory to spare now: the advice works
    assert main(resume_command.split()[1:]) == 0


def test_out_of_memory_in_eval_names_its_batch_size(baseline, cache, monkeypatch, capsys):
    import selfsup.train.distributed as distributed

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    # eval's kNN features come through distributed_extract_features in any process count
    monkeypatch.setattr(distributed, "extract_features", oom)
    argv = ["eval", str(baseline), "--data", "mnist5k", "--limit", "50", "--cache-dir", str(cache)]
    assert main([*argv, "--protocol", "knn", "--batch-size", "128", "--no-progress"]) == 2
    message = capsys.readouterr().err
    assert "Traceback" not in message
    assert "ran out of memory in `selfsup eval`" in message and "(it is 128)" in message


# --------------------------------------------------------------------------- resume with changes
def _logged_lrs(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/lr"] for r in records if "train/lr" in r}


def test_resume_with_a_new_lr_uses_it(tmp_path, good_folder, cache, baseline):
    """`--resume optim.lr=...` (the advice after a NaN) changes the rate: the optimizer's state
    comes from the checkpoint, its settings from the resumed run's config."""
    out = tmp_path / "run"
    assert pretrain(out, "train.stop_after_epochs=1", data=good_folder, cache=cache) == 3
    base_lr = OmegaConf.load(out / "config.yaml").optim.lr
    assert resume(out, f"optim.lr={base_lr / 10}") == 0
    full, resumed = _logged_lrs(baseline), _logged_lrs(out)
    assert sorted(resumed) == sorted(full)
    half = TOTAL_STEPS // 2
    for step in full:  # the same schedule, a tenth of the rate after the resume
        expected = full[step] / 10 if step > half else full[step]
        assert resumed[step] == pytest.approx(expected, rel=1e-6), step
    assert OmegaConf.load(out / "config.yaml").optim.lr == pytest.approx(base_lr / 10)


def test_resume_with_a_new_batch_size_continues_the_schedule(tmp_path, good_folder, cache):
    """After an epoch-end checkpoint the steps are counted anew: the rest of the run follows the
    schedule of a run with the new batch size from the start (lr scaled to it, ending at 0). The
    logs go on counting the steps taken: 4 of batch 16, then 8 of batch 8."""
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    assert pretrain(out, "train.stop_after_epochs=1", data=good_folder, cache=cache) == 3
    assert resume(out, f"train.batch_size={BATCH // 2}") == 0
    assert pretrain(fresh, f"train.batch_size={BATCH // 2}", data=good_folder, cache=cache) == 0
    resumed, reference = _logged_lrs(out), _logged_lrs(fresh)
    first_epoch = TOTAL_STEPS // 2  # steps of batch 16
    steps_per_epoch = 2 * GOOD_PER_CLASS // (BATCH // 2)
    assert sorted(resumed) == list(range(1, first_epoch + steps_per_epoch + 1))
    for k in range(1, steps_per_epoch + 1):  # logged step 4 + k is the schedule's step 8 + k
        expected = reference[steps_per_epoch + k]
        assert resumed[first_epoch + k] == pytest.approx(expected, rel=1e-6), k


def test_resume_with_a_larger_batch_keeps_the_metrics_of_the_run_so_far(
    tmp_path, good_folder, cache
):
    """A larger batch renumbers the schedule's steps below the checkpoint's (4 of batch 16 are
    step 2 of batch 32): the records of those steps are history, not steps to replay, and are
    kept; the logged steps go on increasing, through a second resume too."""
    out = tmp_path / "run"
    argv = ("train.epochs=3", "train.stop_after_epochs=1")
    assert pretrain(out, *argv, data=good_folder, cache=cache) == 3
    before = (out / "metrics.jsonl").read_text().splitlines()
    assert resume(out, f"train.batch_size={2 * BATCH}", "train.stop_after_epochs=1") == 3
    assert resume(out) == 0
    after = (out / "metrics.jsonl").read_text().splitlines()
    assert after[: len(before)] == before
    records = [json.loads(line) for line in after if "train/loss" in line]
    assert [r["step"] for r in records] == list(range(1, 9))  # 4 + 2 + 2 steps taken
    assert [r["train/epoch"] for r in records] == [1] * 4 + [2] * 2 + [3] * 2
    # from epoch 2 on, the schedule is that of a run of batch 32 from the start (its steps 3-6)
    fresh = tmp_path / "fresh"
    assert pretrain(fresh, "train.epochs=3", f"train.batch_size={2 * BATCH}", data=good_folder,
                    cache=cache) == 0  # fmt: skip
    reference = _logged_lrs(fresh)
    for k in range(4):
        assert records[4 + k]["train/lr"] == pytest.approx(reference[3 + k], rel=1e-6), k


def test_resume_with_another_optimizer_takes_its_grouping(tmp_path, good_folder, cache, capsys):
    """`--resume optim.name=lars` of an SGD run: LARS's default (biases and norms out of weight
    decay and adaptation) as in a new LARS run, said once; the momentum buffers are regrouped.
    Turning exclude_bias_norm back off on a further resume regroups them again."""
    out = tmp_path / "run"
    argv = ("train.epochs=3", "train.stop_after_epochs=1")
    assert pretrain(out, *argv, data=good_folder, cache=cache) == 3
    last = out / "checkpoints" / "last.pt"
    sgd_groups = len(torch.load(last, weights_only=False)["optimizer"]["param_groups"])
    capsys.readouterr()
    assert resume(out, "optim.name=lars", "train.stop_after_epochs=1") == 3
    assert "optim.name sgd -> lars: optim.exclude_bias_norm=true" in capsys.readouterr().err
    saved = OmegaConf.load(out / "config.yaml").optim
    assert saved.name == "lars" and saved.exclude_bias_norm is True
    # a decay and a no-decay group for each of the method's groups
    lars_groups = len(torch.load(last, weights_only=False)["optimizer"]["param_groups"])
    assert lars_groups == 2 * sgd_groups
    assert resume(out, "optim.exclude_bias_norm=false") == 0
    assert OmegaConf.load(out / "config.yaml").optim.exclude_bias_norm is False


def test_resume_extends_a_run_and_refuses_to_shorten_it(tmp_path, good_folder, cache, capsys):
    """More epochs: results.json and config.yaml say the new length and the schedule is
    re-planned, said once. Fewer epochs than the checkpoint has trained: refused, the run's
    records untouched (they must describe the weights)."""
    out = tmp_path / "run"
    assert pretrain(out, data=good_folder, cache=cache) == 0
    capsys.readouterr()
    assert resume(out, f"train.epochs={EPOCHS + 1}") == 0
    assert f"train.epochs {EPOCHS} -> {EPOCHS + 1}: the warm-up + cosine" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["epochs"] == EPOCHS + 1
    assert OmegaConf.load(out / "config.yaml").train.epochs == EPOCHS + 1
    before = {name: (out / name).read_bytes() for name in ("config.yaml", "results.json")}
    assert resume(out, f"train.epochs={EPOCHS}") == 2
    err = capsys.readouterr().err
    assert f"has trained {EPOCHS + 1} epochs, more than train.epochs={EPOCHS}" in err
    assert f"--epochs {EPOCHS + 1}" in err
    assert {name: (out / name).read_bytes() for name in before} == before


def test_moco_queue_longer_than_an_epoch_of_keys_is_warned_with_the_right_count(
    tmp_path, good_folder, cache, capsys
):
    # 64 images at batch 24: 2 steps (the short batch is dropped), 48 keys an epoch
    argv = ("method.queue_size=96", "train.batch_size=24", "train.epochs=1")
    assert (
        pretrain(tmp_path / "run", *argv, data=good_folder, cache=cache, flags=("--method", "moco"))
        == 0
    )
    err = capsys.readouterr().err
    assert "queue_size=96 is more than the 48 keys an epoch enqueues (2 steps of 24 images)" in err
    assert "a queue of at most 48 holds each key once" in err
    assert "data.eval_source=DIR" in err  # the folder has no test split: how to get the kNN check


def test_resume_mid_epoch_with_a_new_batch_size_is_refused(tmp_path, good_folder, cache, capsys):
    out = tmp_path / "run"
    # a time limit this small stops after the first step, mid-epoch, with a checkpoint
    assert pretrain(out, "train.time_limit_min=1e-9", data=good_folder, cache=cache) == 3
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["step_in_epoch"] == 1
    capsys.readouterr()
    assert resume(out, f"train.batch_size={BATCH // 2}") == 2
    err = capsys.readouterr().err
    assert "a new batch size can only start at an epoch's end" in err
    assert f"train.batch_size={BATCH}" in err and "train.stop_after_epochs=1" in err
    # the refusal left the run as it was: its advice works
    assert OmegaConf.load(out / "config.yaml").train.batch_size == BATCH
    assert resume(out, "train.stop_after_epochs=1") == 3


def test_refused_resume_leaves_the_run_resumable_and_names_what_differs(
    tmp_path, good_folder, cache, capsys
):
    out = tmp_path / "run"
    assert pretrain(out, "train.stop_after_epochs=1", data=good_folder, cache=cache) == 3
    config_before = (out / "config.yaml").read_bytes()
    capsys.readouterr()
    assert resume(out, "model.backbone=resnet18", "augment.both.flip_p=0.1") == 2
    err = capsys.readouterr().err
    assert "model.backbone: 'resnet_tiny' in the checkpoint, 'resnet18' now" in err
    assert "augment.both.flip_p: '(unset)' in the checkpoint, 0.1 now" in err
    assert (out / "config.yaml").read_bytes() == config_before
    assert resume(out) == 0


def test_augmentation_typo_is_refused_before_the_run_directory_exists(
    tmp_path, good_folder, cache, capsys
):
    out = tmp_path / "run"
    assert pretrain(out, "augment.both.jitter_pp=0", data=good_folder, cache=cache) == 2
    err = capsys.readouterr().err
    assert "unknown setting 'augment.both.jitter_pp' (did you mean 'augment.both.jitter_p'?)" in err
    assert not out.exists()
    assert pretrain(out, "augment.view2.gray_p=high", data=good_folder, cache=cache) == 2
    assert "augment.view2.gray_p='high': give a number" in capsys.readouterr().err
    assert pretrain(out, data=good_folder, cache=cache) == 0  # the corrected command just runs


def test_resume_on_another_kind_of_device_reseeds_the_augmentation_stream(
    tmp_path, good_folder, cache
):
    """A GPU run's checkpoint resumed on the CPU (or the reverse): a CUDA generator's 16-byte
    state cannot seed a CPU generator (`set_state` raised), so the stream is reseeded."""
    out = tmp_path / "run"
    assert pretrain(out, "train.stop_after_epochs=1", data=good_folder, cache=cache) == 3
    last = out / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=False)
    assert state["device_type"] == "cpu" and state["cuda_rng"] is None
    cuda_like = torch.zeros(16, dtype=torch.uint8)  # what torch.Generator("cuda").get_state() is
    with pytest.raises(RuntimeError):
        torch.Generator().set_state(cuda_like)
    state.update(generator=cuda_like, device_type="cuda", cuda_rng=cuda_like)
    save_checkpoint(state, last.parent)
    assert resume(out) == 0
    assert (out / "encoder.pt").exists()


def test_resume_of_a_gpu_checkpoint_from_before_device_type_was_saved(tmp_path, good_folder, cache):
    out = tmp_path / "run"
    assert pretrain(out, "train.stop_after_epochs=1", data=good_folder, cache=cache) == 3
    last = out / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=False)
    for key in ("device_type", "cuda_rng"):
        del state[key]
    state["generator"] = torch.zeros(16, dtype=torch.uint8)  # an older GPU run's CUDA state
    save_checkpoint(state, last.parent)
    assert resume(out) == 0


def test_optimizer_state_takes_its_parameter_layout_after_loading():
    """Momentum buffers saved by a channels-last run, loaded for a contiguous one: after
    `match_parameter_layouts` the fused SGD step equals the foreach step (without it the CPU's
    fused kernel silently mis-updates, and CUDA's refuses to run)."""
    from selfsup.train.optim import match_parameter_layouts

    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3, 3)
    grad, buf = torch.randn_like(weight), torch.randn_like(weight)
    saved_buf = buf.contiguous(memory_format=torch.channels_last)
    steps = {}
    for fused in (False, True):
        p = torch.nn.Parameter(weight.clone())
        opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=fused)
        state = opt.state_dict()
        state["state"] = {
            0: {"momentum_buffer": saved_buf.clone(memory_format=torch.preserve_format)}
        }
        opt.load_state_dict(state)
        match_parameter_layouts(opt)
        assert opt.state[p]["momentum_buffer"].stride() == p.stride()
        assert torch.equal(opt.state[p]["momentum_buffer"], buf)
        p.grad = grad.clone()
        opt.step()
        steps[fused] = p.detach().clone()
    assert torch.allclose(steps[True], steps[False], atol=1e-6)


def test_relative_data_path_is_recorded_absolute(tmp_path, good_folder, cache, monkeypatch, capsys):
    """A run trained with `--data ./folder` resumes and evaluates from any directory; when the
    recorded data has gone, eval says where the path came from and to pass --data."""
    out = tmp_path / "run"
    monkeypatch.chdir(good_folder.parent)
    assert pretrain(out, "train.stop_after_epochs=1", data=Path(good_folder.name), cache=cache) == 3
    assert OmegaConf.load(out / "config.yaml").data.source == str(good_folder.resolve())
    monkeypatch.chdir(tmp_path)
    assert resume(out) == 0
    config = OmegaConf.load(out / "config.yaml")
    config.data.source = str(tmp_path / "moved-away")
    (out / "config.yaml").write_text(OmegaConf.to_yaml(config))
    capsys.readouterr()
    assert main(["eval", str(out), "--protocol", "knn"]) == 2
    err = capsys.readouterr().err
    assert "moved-away" in err and "recorded with the run" in err and "pass --data" in err
    assert main(["eval", str(tmp_path / "nope"), "--protocol", "knn"]) == 2
    assert "nope does not exist" in capsys.readouterr().err


def test_an_explicit_eval_source_that_cannot_serve_the_knn_check_is_an_error(
    tmp_path, good_folder, cache, capsys
):
    out = tmp_path / "run"
    typo = tmp_path / "pets-typo"
    assert pretrain(out, f"data.eval_source={typo}", data=good_folder, cache=cache) == 2
    err = capsys.readouterr().err
    assert "data.eval_source" in err and "pets-typo" in err and "Traceback" not in err
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(flat / f"{i}.png")
    assert pretrain(out, f"data.eval_source={flat}", data=good_folder, cache=cache) == 2
    assert "data.eval_source" in capsys.readouterr().err
    assert not (out / "config.yaml").exists()  # refused before the run began


def test_resuming_a_finished_run_says_it_is_done(copy_of_baseline, capsys):
    out = copy_of_baseline
    before = (out / "encoder.pt").read_bytes()
    measured = json.loads((out / "results.json").read_text())
    assert measured["train_time_s"] > 0 and measured["images_per_s_last"] > 0
    assert measured["environment"]["device"] == "cpu"  # what the speed was measured on
    assert measured["environment"]["torch"] == torch.__version__
    assert resume(out) == 0
    err = capsys.readouterr().err
    assert "epochs are done, nothing is left to train" in err and "resumed from" not in err
    assert (out / "encoder.pt").read_bytes() == before
    again = json.loads((out / "results.json").read_text())  # not this invocation's zeros
    for key in ("train_time_s", "images_per_s_last", "final_loss", "environment"):
        assert again[key] == measured[key], key


def test_small_user_errors_say_what_was_meant(copy_of_baseline, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # were the check gone, the quickstart would start here
    assert main(["pretrain", "epochs=1"]) == 2
    assert "did you mean 'train.epochs'?" in capsys.readouterr().err
    assert main(["eval", str(copy_of_baseline), "--image-size", "4"]) == 2
    assert "--image-size must be >= 8" in capsys.readouterr().err


@pytest.mark.parametrize("method_name", ["simclr", "moco"])
def test_a_skipped_step_leaves_batchnorm_statistics_and_queue_as_they_were(method_name):
    """A NaN pixel reaches the BatchNorm running statistics (and MoCo's queue) in the forward
    pass, before the loss can say it is NaN: a skipped step must put those buffers back."""
    import contextlib

    from selfsup.methods import build_method
    from selfsup.models import build_backbone
    from selfsup.precision import grad_scaler
    from selfsup.train.trainer import optimizer_step

    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet_tiny")
    options = {"queue_size": 64, "bn_splits": 1} if method_name == "moco" else {}
    method = build_method(method_name, backbone, dim, **options).train()
    optimizer = torch.optim.SGD(method.param_groups(), lr=0.1, momentum=0.9)
    v1, v2 = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)
    v1[0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in method.state_dict().items()}
    _, finite, applied = optimizer_step(
        method, method, optimizer, v1, v2, autocast=contextlib.nullcontext, progress=0.5,
        skip_nonfinite=True, scaler=grad_scaler("fp32", torch.device("cpu")),
    )  # fmt: skip
    assert not applied and not bool(finite)
    after = method.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed
    v1[0, 0, 0, 0] = 0.5  # the next step's keys go into the queue, the skipped one's do not
    out, finite, applied = optimizer_step(
        method, method, optimizer, v1, v2, autocast=contextlib.nullcontext, progress=0.5,
        skip_nonfinite=True, scaler=grad_scaler("fp32", torch.device("cpu")),
    )  # fmt: skip
    assert applied and bool(finite)
    if method_name == "moco":
        assert int(method.queue_ptr) == 8 and torch.isfinite(method.queue).all()
        torch.testing.assert_close(method.queue[:8], out["z2"])


def test_stop_after_epochs_counts_the_epochs_of_this_invocation(tmp_path, good_folder, cache):
    """A job script that always resumes with train.stop_after_epochs=2 trains 2 epochs a job."""
    out = tmp_path / "run"
    assert (
        pretrain(out, "train.epochs=4", "train.stop_after_epochs=2", data=good_folder, cache=cache)
        == 3
    )
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["epoch"] == 2
    assert resume(out, "train.stop_after_epochs=2") == 0  # epochs 3 and 4: the run is done
    assert (out / "encoder.pt").exists() and train_steps_logged(out)[-1] == 2 * TOTAL_STEPS


def test_collapse_and_stop_settings_are_checked_with_the_config():
    from selfsup.train.config import resolve_config

    for bad, message in (
        ("train.collapse_every=0", "train.collapse_every must be >= 1"),
        ("train.collapse_patience=0", "train.collapse_patience must be >= 1"),
        ("train.time_limit_min=-1", "train.time_limit_min must be > 0"),
        ("train.stop_after_epochs=0", "train.stop_after_epochs must be > 0"),
        # each of these trained on before it was checked (checkpoint_every=0: a whole epoch,
        # then ZeroDivisionError and no checkpoint; optim.momentum=1.5: a run that "finished")
        ("train.checkpoint_every=0", "train.checkpoint_every must be >= 1"),
        ("train.log_every=0", "train.log_every must be >= 1"),
        ("optim.momentum=1.5", r"optim.momentum must be in \[0, 1\)"),
        ("optim.weight_decay=-1e-4", "optim.weight_decay must be >= 0"),
        ("optim.warmup_epochs=200", r"optim.warmup_epochs \(200.0\) must be below train.epochs"),
        ("data.image_size=4", "data.image_size must be >= 8"),
        ("data.limit=1", "data.limit must be >= 2"),
        ("data.limit=8", "data.limit=8 keeps at most 8 images, fewer than one batch"),
        ("data.eval_crop=1.5", r"data.eval_crop=1.5 must lie in \(0, 1\]"),
    ):
        with pytest.raises(ConfigError, match=message):
            resolve_config("simclr", overrides=[bad])
    with pytest.raises(ConfigError, match="data.std must be > 0 per channel"):
        resolve_config("simclr", overrides=["data.mean=[0.5,0.5,0.5]", "data.std=[0.2,0,0.2]"])


def test_resume_drops_the_replayed_steps_from_the_logs(tmp_path, good_folder, cache):
    """A run killed after its checkpoint logged steps the resume replays: each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert pretrain(out, "train.stop_after_epochs=1", data=good_folder, cache=cache) == 3
    half = TOTAL_STEPS // 2
    with open(out / "metrics.jsonl", "a") as fh:  # what the killed run logged after the save
        for step in (half + 1, half + 2):
            fh.write(json.dumps({"time": 0.0, "step": step, "train/loss": 99.0}) + "\n")
    assert resume(out) == 0
    assert train_steps_logged(out) == list(range(1, TOTAL_STEPS + 1))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 99.0 not in [r.get("train/loss") for r in records]
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == TOTAL_STEPS


def test_byol_logs_its_tau_schedule_and_tensorboard_holds_the_config_and_views(
    tmp_path, good_folder, cache
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from selfsup.methods.ema import cosine_tau

    out = tmp_path / "run"
    assert pretrain(out, data=good_folder, cache=cache, flags=("--method", "byol")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    taus = {r["step"]: r["train/target_momentum"] for r in records if "train/loss" in r}
    assert sorted(taus) == list(range(1, TOTAL_STEPS + 1))
    for step, tau in taus.items():  # the tau of the EMA update that step made
        assert tau == pytest.approx(cosine_tau(0.99, step / TOTAL_STEPS)), step
    events = EventAccumulator(str(out / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    assert "train/target_momentum" in events.Tags()["scalars"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "name: byol" in text and f"epochs: {EPOCHS}" in text
    # views.png: 3 rows (images, view 1, view 2) of 8 tiles of 96 px with make_grid's 4 px
    from PIL import Image

    from selfsup.augment.preview import GRID_TILE

    with Image.open(out / "views.png") as picture:
        assert picture.size == (8 * (GRID_TILE + 4) + 4, 3 * (GRID_TILE + 4) + 4)
    assert "augment/views" in events.Tags()["images"]


def _start_with_file_size_limit(args: list[str], limit_bytes: int) -> subprocess.Popen:
    """`python -m selfsup *args` where no file may grow past ``limit_bytes`` (``ulimit -f``):
    a real write failure (EFBIG), as a full disk gives (ENOSPC), not a mocked one."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    checkout = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": checkout}
    return subprocess.Popen(
        [sys.executable, "-m", "selfsup", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, preexec_fn=limit,
    )  # fmt: skip


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics")
def test_a_real_write_failure_is_one_line_and_leaves_no_partial_files(tmp_path):
    """torch.save hides the OSError of a full disk inside a RuntimeError, and a cache build that
    fails used to leave the partial file that filled the disk."""
    common = ["pretrain", "--no-progress", "--epochs", "1", "model.backbone=resnet_tiny"]
    common += ["data.image_size=16", "train.batch_size=32", "data.limit=64", "train.knn_every=0"]
    # the cache (9 MB of digits) does not fit under 600 kB; this run starts first, and runs
    # while this process builds the other run's cache (the two share no file)
    fresh = tmp_path / "fresh_cache"
    first = _start_with_file_size_limit(
        [*common, "--out", str(tmp_path / "a"), f"data.cache_dir={fresh}"], 600_000
    )
    try:
        # with the cache built, the first checkpoint (over 1 MB) does not fit
        cache = tmp_path / "cache"
        for split in ("train", "test"):  # the quickstart preset stores 28 px digits
            load_dataset("mnist5k", split, image_size=28, cache_dir=cache, progress=False)
        out = tmp_path / "b"
        second = _start_with_file_size_limit(
            [*common, "--out", str(out), f"data.cache_dir={cache}"], 600_000
        )
    finally:
        done = _finish(first)
    assert done.returncode == 2, done.stderr
    assert "cannot write the data cache" in done.stderr and "Traceback" not in done.stderr
    assert not [p.name for p in fresh.iterdir() if p.name.endswith(".tmp")]
    done = _finish(second)
    assert done.returncode == 2, done.stderr
    assert "cannot write a checkpoint" in done.stderr and "File too large" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_resume_after_the_data_changed_continues_at_an_epoch_end_and_refuses_mid_epoch(
    tmp_path, good_folder, cache, capsys
):
    data = tmp_path / "data"
    shutil.copytree(good_folder, data)
    out = tmp_path / "run"
    assert pretrain(out, "train.stop_after_epochs=1", data=data, cache=cache) == 3
    removed = sorted(p for p in data.rglob("*.png"))[:BATCH]  # one step's worth fewer
    for p in removed:
        p.unlink()
    capsys.readouterr()
    last = out / "checkpoints" / "last.pt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    mid = {**state, "step_in_epoch": 1, "global_step": state["global_step"] + 1}
    save_checkpoint(mid, out / "checkpoints")  # as if stopped one step into epoch 2
    assert resume(out) == 2
    err = capsys.readouterr().err
    assert "training images" in err and "--overwrite" in err and "Traceback" not in err
    save_checkpoint(state, out / "checkpoints")  # the epoch-end checkpoint again
    assert resume(out) == 0
    err = capsys.readouterr().err
    assert "training images" in err and "the schedule continues at epoch 2" in err
    results = json.loads((out / "results.json").read_text())
    assert results["train_images"] == state["results"]["train_images"] - BATCH


def test_a_run_in_use_is_refused_and_a_killed_runs_temporary_files_are_removed(
    copy_of_baseline, capsys
):
    from selfsup.train.run_dir import lock_run_dir

    out = copy_of_baseline
    held = lock_run_dir(out)  # another pretrain on this run, still going
    try:
        assert resume(out) == 2
        assert "is in use by another selfsup pretrain (pid" in capsys.readouterr().err
    finally:
        held.close()
    leftovers = [out / "checkpoints" / ".last.pt.k3j2.tmp", out / ".encoder.pt.x81a.tmp"]
    for path in leftovers:
        path.write_bytes(b"\x80 torn")  # what kill -9 between a write and its rename leaves
    assert resume(out) == 0  # the finished run: nothing left to train, outputs rewritten
    assert not any(path.exists() for path in leftovers)
    assert not (out / ".selfsup.lock").exists()  # released and removed with the run's end


def test_a_finished_run_resumed_with_other_data_or_settings_is_refused_unchanged(
    copy_of_baseline, tmp_path, capsys
):
    """Nothing is left to train, so other data or settings would only rewrite config.yaml and
    results.json into the record of a training that never happened: refused, files untouched."""
    out = copy_of_baseline
    before = {name: (out / name).read_bytes() for name in ("config.yaml", "results.json")}
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (8, 8)).save(other / "x.png")
    assert resume(out, "--data", str(other)) == 2
    err = capsys.readouterr().err
    assert f"{out} is a finished run" in err and f"data.source={str(other)!r}" in err
    assert "--epochs N" in err and f"model.init={out}" in err
    assert resume(out, "data.eval_crop=0.5") == 2
    assert "data.eval_crop=0.5" in capsys.readouterr().err
    # the batch, seed and kNN settings made its weights and results: refused too
    for setting in ("train.batch_size=8", "train.seed=5", "train.knn_k=20"):
        assert resume(out, setting) == 2
        assert f"{setting} (the run's: " in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert resume(out, "train.log_every=7") == 0  # how to run, not what was trained: as before


def test_a_run_refused_by_its_data_leaves_no_directory_behind(tmp_path, cache, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"{i}.jpg").write_text("not a jpeg")
    out = tmp_path / "runs" / "x"
    assert pretrain(out, data=junk, cache=cache) == 2
    assert "holds no usable images" in capsys.readouterr().err
    assert not out.exists()  # made for the run, and empty: removed with the lock
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert pretrain(out, data=junk, cache=cache) == 2
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # a directory it did not make stays


def test_a_killed_cache_builds_temporary_file_is_removed_by_the_next_build(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(folder / f"{i}.png")
    cache = tmp_path / "cache"
    load_dataset(str(folder), image_size=8, cache_dir=cache, progress=False)
    (npy,) = cache.glob("*.npy")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    from selfsup.data.cache import _writer_tag

    host = _writer_tag().rsplit("-", 1)[0]
    orphan = cache / f".{npy.name}.{host}-{dead}.0123abcd.tmp"
    alive = cache / f".{npy.name}.{host}-{os.getpid()}.4567abcd.tmp"  # a build still running
    elsewhere = cache / f".{npy.name}.otherhost-{dead}.89abcdef.tmp"  # its pid means nothing here
    for path in (orphan, alive, elsewhere):
        path.write_bytes(b"\0" * 1000)
        os.utime(path, (time.time() - 600, time.time() - 600))
    (folder / "4.png").write_bytes((folder / "0.png").read_bytes())  # the source changed
    assert len(load_dataset(str(folder), image_size=8, cache_dir=cache, progress=False)) == 5
    assert not orphan.exists() and alive.exists() and elsewhere.exists()


def test_a_stop_between_log_steps_leaves_the_loss_curve_of_an_uninterrupted_run(
    tmp_path, good_folder, cache, monkeypatch
):
    """Logging every 3 steps, stopped (SIGINT) after step 4: the resumed run's metrics.jsonl
    holds the same train/loss lines as a run that was never stopped."""

    def curve(run: Path) -> dict[int, float]:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in lines if "train/loss" in r}

    every = "train.log_every=3"
    whole = tmp_path / "whole"
    assert pretrain(whole, every, data=good_folder, cache=cache) == 0
    real_set_lr, calls = trainer.set_lr, []

    def set_lr_then_interrupt(optimizer, factor):  # called once per step, before the update
        calls.append(1)
        if len(calls) == 5:  # during step 5: it finishes, checkpoints and stops
            signal.raise_signal(signal.SIGINT)
        return real_set_lr(optimizer, factor)

    monkeypatch.setattr(trainer, "set_lr", set_lr_then_interrupt)
    stopped = tmp_path / "stopped"
    assert pretrain(stopped, every, data=good_folder, cache=cache) == 3
    state = torch.load(stopped / "checkpoints" / "last.pt", weights_only=False)
    assert state["global_step"] == 5 and state["log_window"]["steps"] >= 1  # mid-window
    monkeypatch.setattr(trainer, "set_lr", real_set_lr)
    assert resume(stopped) == 0
    assert curve(stopped) == curve(whole)


def test_an_out_path_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    assert main(["pretrain", "--out", str(blocker), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--out {blocker} is a file, not a folder" in err and "Traceback" not in err


def test_a_stop_at_an_epochs_last_step_runs_that_epochs_knn_and_resumes_at_the_next(
    tmp_path, cache, monkeypatch, capsys
):
    """Saved as (epoch + 1, 0) after the epoch's end, kNN included: the resumed run has a kNN
    line for every epoch, as an uninterrupted one, and may change the batch size."""
    out = tmp_path / "run"
    argv = ["pretrain", "--no-progress", "--out", str(out), "--epochs", "3", "data.limit=256"]
    argv += ["train.batch_size=64", "train.knn_every=1", "model.backbone=resnet_tiny"]
    # checkpoint_every=5 (the cifar10 presets'): a stop saves whatever the period says
    argv += ["train.collapse=off", "train.checkpoint_every=5", f"data.cache_dir={cache}"]
    real_set_lr, calls = trainer.set_lr, []

    def set_lr_then_interrupt(optimizer, factor):
        calls.append(1)
        if len(calls) == 4:  # the last of epoch 1's 4 steps
            signal.raise_signal(signal.SIGINT)
        return real_set_lr(optimizer, factor)

    monkeypatch.setattr(trainer, "set_lr", set_lr_then_interrupt)
    assert main(argv) == 3
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0)
    monkeypatch.setattr(trainer, "set_lr", real_set_lr)
    assert resume(out, "train.batch_size=32") == 0  # a new batch size at an epoch's start
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["eval/epoch"] for r in lines if "eval/epoch" in r) == [1, 2, 3]


def test_files_skipped_from_the_knn_checks_data_are_reported(tmp_path, cache, capsys):
    root = tmp_path / "data"
    for split, n in (("train", 16), ("test", 8)):
        for c in "ab":
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (16, 16), (i * 15, ord(c), 0)).save(root / split / c / f"{i}.png")
    (root / "test" / "a" / "zero.png").write_bytes(b"")
    assert pretrain(tmp_path / "run", "train.knn_every=1", data=root, cache=cache) == 0
    assert "kNN check data (test): skipped 1 of 17 files: 1 zero-byte" in capsys.readouterr().err


def test_ctrl_c_while_decoding_says_what_the_rerun_decodes(
    tmp_path, good_folder, monkeypatch, capsys
):
    """Ctrl-C while the first split decodes: exit 130, the hint says that split continues
    where it stopped (it is not cached half-done), and no run was begun."""
    import selfsup.data.cache as cache_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "resize_shorter", interrupted)
    cache = tmp_path / "cache"
    assert pretrain(tmp_path / "run", data=good_folder, cache=cache) == 130
    err = capsys.readouterr().err
    assert "selfsup: interrupted; nothing was trained yet" in err
    assert "the one interrupted continues where it stopped" in err and "Traceback" not in err
    assert not list(cache.rglob("*.npy"))  # nothing half-decoded is kept as a cache
    assert list(cache.rglob("*.npy.partial"))  # but kept to continue from


def test_resume_mid_epoch_on_other_data_names_both_sources(copy_of_baseline, tmp_path, capsys):
    """A mid-epoch checkpoint resumed with another --data: the message says the run trained on
    its own source and --data names another, not that the run's data changed."""
    out = copy_of_baseline
    other = tmp_path / "other"
    _write_good_folder(other, GOOD_PER_CLASS // 2)
    for name in ("last.pt", "prev.pt"):
        _rewrite(out / "checkpoints" / name, epoch=0, step_in_epoch=1, global_step=1)
    assert resume(out, "--data", str(other), f"data.cache_dir={tmp_path / 'cache'}") == 2
    err = capsys.readouterr().err
    assert "it trained on data.source=" in err and f"--data '{other}' holds 32" in err, err
    assert "Resume without --data" in err
    # the run's own data with another --limit: the setting is named, not "restore the data"
    assert resume(out, "data.limit=32", f"data.cache_dir={tmp_path / 'cache'}") == 2
    err = capsys.readouterr().err
    assert "data.limit=32 takes 32 of them" in err and "Resume without data.limit" in err


def test_split_folders_without_class_folders_say_why_knn_is_off(tmp_path, capsys):
    """train/ and test/ whose images lie loose: unlabeled, and the run says so (it was silent)."""
    root = tmp_path / "loose"
    for split in ("train", "test"):
        _write_good_folder(root / split, GOOD_PER_CLASS)
        Image.new("RGB", (16, 16), (9, 9, 9)).save(root / split / "loose.png")
    out = tmp_path / "run"
    assert pretrain(out, "train.epochs=1", data=root, cache=tmp_path / "cache") == 0
    err = capsys.readouterr().err
    assert "kNN monitoring off: the train split of" in err and "no class folders" in err, err


@pytest.mark.parametrize(
    ("code", "advice"), [("ENOSPC", True), ("EROFS", False), ("EACCES", False)]
)
def test_write_errors_advise_freeing_space_only_when_the_disk_is_full(
    monkeypatch, capsys, code, advice
):
    import errno
    import os

    import selfsup.cli as cli

    def failing(args):
        number = getattr(errno, code)
        raise OSError(number, os.strerror(number), "/runs/x/encoder.pt")

    monkeypatch.setitem(cli._HANDLERS, "config", failing)
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert "/runs/x/encoder.pt" in err and "choose a writable --out" in err
    assert ("free disk space" in err) == advice, err
