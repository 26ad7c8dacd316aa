"""Checkpoint directories are complete or ignored: a half-written one never becomes "latest"; a checkpoint URI
(local, s3://, a folder of checkpoints) resolves to one complete checkpoint and reads back locally."""

from __future__ import annotations

import pytest
import torch

from pconv.tracking import checkpoints as ckpt
from pconv.storage import uris
from pconv.core.config import TrainConfig
from pconv.train.driver import latest_checkpoint


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


def test_resolve_and_local_copy(tmp_path, s3_bucket):
    cfg = TrainConfig(images="i", masks="m")
    older = write(tmp_path / "run" / "checkpoint_a", 2, cfg)
    newer = write(tmp_path / "run" / "checkpoint_b", 5, cfg)
    assert ckpt.resolve(str(older)) == str(older)
    assert ckpt.resolve(str(older / ckpt.STATE_FILE)) == str(older)  # a file stands for its folder
    assert ckpt.resolve(str(tmp_path / "run")) == str(newer)  # a folder of checkpoints: the latest complete one
    assert ckpt.resolve(str(tmp_path / "missing")) is None
    with ckpt.local_copy(str(older)) as local:
        assert local == older

    uris.upload_dir(str(tmp_path / "run"), f"{s3_bucket}/ck")
    assert ckpt.resolve(f"{s3_bucket}/ck/checkpoint_a/") == f"{s3_bucket}/ck/checkpoint_a"
    assert ckpt.resolve(f"{s3_bucket}/ck") == f"{s3_bucket}/ck/checkpoint_b"
    assert ckpt.resolve(f"{s3_bucket}/nothing") is None
    with ckpt.local_copy(f"{s3_bucket}/ck/checkpoint_b") as local:
        assert ckpt.is_complete(local) and ckpt.load_meta(local)["step"] == 5
        assert TrainConfig.from_dict(ckpt.load_config_dict(local)) == cfg
    assert not local.exists()  # the download is temporary


def test_model_state_strips_the_ddp_prefix_and_names_a_missing_entry():
    state = {"model": {"module.w": torch.ones(1), "b": torch.zeros(1)}}
    assert sorted(ckpt.model_state(state, "src")) == ["b", "w"]
    with pytest.raises(ValueError, match="src: state.pt has no 'model' entry"):
        ckpt.model_state({}, "src")
