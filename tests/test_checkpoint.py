"""Checkpoint directories are complete or ignored: a half-written one never becomes "latest"."""

from __future__ import annotations

import pytest
import torch

from pconv import checkpoint as ckpt
from pconv.config import TrainConfig
from pconv.train import latest_checkpoint


def write(directory, step, cfg):
    state = {"model": {"w": torch.ones(2)}, "optimizer": {}, "scaler": {}, "step": step, "phase": 1, "epoch": 0,
             "data_seed": 0}
    return ckpt.save(directory, state, cfg.to_yaml(), {"mlflow_run_id": "r", "step": step})


def test_round_trip_is_weights_only_and_records_versions(tmp_path):
    cfg = TrainConfig(images="i", masks="m")
    d = write(tmp_path / "c", 3, cfg)
    assert ckpt.is_complete(d)
    assert torch.equal(ckpt.load_state(d)["model"]["w"], torch.ones(2))
    assert ckpt.load_meta(d)["versions"]["torch"] == str(torch.__version__)
    assert TrainConfig.from_dict(ckpt.load_config_dict(d)) == cfg
    assert not list(d.glob(".*.tmp"))  # no temporary files left behind


def test_incomplete_checkpoint_is_rejected_and_never_latest(tmp_path):
    cfg = TrainConfig(images="i", masks="m", storage=str(tmp_path), run_name="r")
    write(tmp_path / "r" / "checkpoint_step_00000002", 2, cfg)
    newer = write(tmp_path / "r" / "checkpoint_step_00000004", 4, cfg)
    (newer / ckpt.STATE_FILE).unlink()  # a writer died before the state landed
    half = tmp_path / "r" / "checkpoint_step_00000006"
    half.mkdir()
    (half / ckpt.STATE_FILE).write_bytes(b"partial")  # died before meta.json (written last)
    uri, meta = latest_checkpoint(cfg)
    assert meta["step"] == 2 and uri.endswith("checkpoint_step_00000002")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.load_state(half)


def test_no_checkpoint_yet(tmp_path):
    assert latest_checkpoint(TrainConfig(images="i", masks="m", storage=str(tmp_path), run_name="none")) is None
