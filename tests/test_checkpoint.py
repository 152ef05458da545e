"""Checkpoints: atomic replacement, fallback to the previous one, refusal of foreign checkpoints."""

import os

import pytest
import torch

from selfsup.errors import CheckpointError
from selfsup.train import checkpoint as ckpt
from selfsup.train.checkpoint import load_checkpoint, save_checkpoint


def state(value, method="byol", chash="abc"):
    return {"model": {"w": torch.tensor([value])}, "method": method, "config_hash": chash}


def test_save_keeps_previous_and_loads_latest(tmp_path):
    save_checkpoint(state(1.0), tmp_path)
    save_checkpoint(state(2.0), tmp_path)
    loaded, path = load_checkpoint(tmp_path, method="byol", config_hash="abc")
    assert path.name == "last.pt" and loaded["model"]["w"].item() == 2.0
    assert (tmp_path / "prev.pt").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_torn_latest_falls_back_to_previous(tmp_path):
    save_checkpoint(state(1.0), tmp_path)
    save_checkpoint(state(2.0), tmp_path)
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])  # a crash mid-write of a naive saver
    loaded, path = load_checkpoint(tmp_path, method="byol", config_hash="abc")
    assert path.name == "prev.pt" and loaded["model"]["w"].item() == 1.0


def test_crash_during_write_leaves_latest_intact(tmp_path, monkeypatch):
    save_checkpoint(state(1.0), tmp_path)

    def exploding_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", exploding_save)
    with pytest.raises(OSError):
        save_checkpoint(state(2.0), tmp_path)
    monkeypatch.undo()
    loaded, path = load_checkpoint(tmp_path, method="byol", config_hash="abc")
    assert path.name == "last.pt" and loaded["model"]["w"].item() == 1.0
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_refuses_other_method_and_config(tmp_path):
    save_checkpoint(state(1.0, method="simclr"), tmp_path)
    with pytest.raises(CheckpointError, match="method 'simclr'"):
        load_checkpoint(tmp_path, method="byol", config_hash="abc")
    with pytest.raises(CheckpointError, match="another method/model/augmentation config"):
        load_checkpoint(tmp_path, method="simclr", config_hash="zzz")


def test_refuses_other_format_version(tmp_path):
    save_checkpoint(state(1.0), tmp_path)
    raw = torch.load(tmp_path / "last.pt", weights_only=False)
    raw["format_version"] = 999
    torch.save(raw, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="format 999"):
        load_checkpoint(tmp_path, method="byol", config_hash="abc")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path, method="byol", config_hash="abc")


def test_refuses_a_checkpoint_of_another_selfsup_release(tmp_path):
    save_checkpoint({**state(1.0), "selfsup_version": "0.9.0"}, tmp_path)
    with pytest.raises(CheckpointError, match="written by selfsup 0.9.0"):
        load_checkpoint(tmp_path, method="byol", config_hash="abc", version="0.1.0")
    loaded, _ = load_checkpoint(tmp_path, method="byol", config_hash="abc", version="0.9.3")
    assert loaded["model"]["w"].item() == 1.0


def test_a_write_that_dies_midway_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    """encoder.pt, config.yaml and results.json are replaced whole or not at all: a save that
    fails after writing part of its bytes (a kill, a full disk) leaves the previous file."""
    from selfsup.data import cache

    encoder, results = tmp_path / "encoder.pt", tmp_path / "results.json"
    ckpt.atomic_torch_save({"w": torch.ones(3)}, encoder)
    cache.atomic_write_text(results, '{"knn_top1": 0.5}')

    def torn_save(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="No space left"):
        ckpt.atomic_torch_save({"w": torch.zeros(3)}, encoder)
    monkeypatch.undo()
    assert torch.equal(torch.load(encoder, weights_only=True)["w"], torch.ones(3))

    real_open = open

    def torn_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            write = handle.write

            def write_half(text):
                write(text[: len(text) // 2])
                raise OSError(28, "No space left on device")

            handle.write = write_half
        return handle

    monkeypatch.setattr("builtins.open", torn_open)
    with pytest.raises(OSError, match="No space left"):
        cache.atomic_write_text(results, '{"knn_top1": 0.9, "knn_top5": 1.0}')
    monkeypatch.undo()
    assert results.read_text() == '{"knn_top1": 0.5}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.pt", "results.json"]
