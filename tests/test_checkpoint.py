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
