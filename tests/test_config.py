"""TrainConfig: paper defaults, YAML round trip, validation messages, CLI flag mapping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pconv.config import ConfigError, TrainConfig, default_layer_size, merge

ROOT = Path(__file__).resolve().parents[1]


def valid(**kw) -> TrainConfig:
    base = dict(images="imgs", masks="masks", image_size=64, phase1_steps=2, phase2_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def test_paper_defaults():
    cfg = TrainConfig(images="a", masks="b").validate()
    assert (cfg.image_size, cfg.layer_size, cfg.batch_size) == (512, 8, 6)
    assert (cfg.lr, cfg.finetune_lr) == (2e-4, 5e-5)
    assert TrainConfig(images="a", masks="b", workers=4).validate().batch_size == 24  # 6 per worker


@pytest.mark.parametrize("size,layers", [(512, 8), (256, 7), (128, 6), (64, 5), (1024, 8)])
def test_default_layer_size(size, layers):
    assert default_layer_size(size) == layers


def test_yaml_round_trip_and_dashed_keys(tmp_path):
    cfg = valid(run_name="r1", lr=1e-3, use_gpu=False)
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert TrainConfig.from_yaml(path) == cfg
    path.write_text("images: x\nmasks: y\nphase1-steps: 7\nuse-gpu: true\n")
    loaded = TrainConfig.from_yaml(path)
    assert loaded.phase1_steps == 7 and loaded.use_gpu is True


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("images: x\nmasks: y\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.from_yaml(path)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="phase1_steps"):
        TrainConfig.from_dict({"phase1_steps": "many"})


@pytest.mark.parametrize("kw,match", [
    (dict(image_size=96, layer_size=6), "not divisible by 2\\*\\*layer_size"),
    (dict(workers=4, batch_size=6), "not divisible across 4 workers"),
    (dict(images=""), "images"),
    (dict(phase1_steps=0), "init-from"),
    (dict(amp="fp8"), "amp"),
    (dict(run_name="a/b"), "run_name"),
    (dict(checkpoint_every=0), "checkpoint_every"),
])
def test_validation_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        valid(**kw).validate()


def test_finetune_only_with_init_from_is_valid():
    cfg = valid(phase1_steps=0, init_from="models:/pconv-unet@champion").validate()
    assert cfg.total_steps == 2


def test_merge_overrides_file_values():
    cfg = merge(valid(lr=1e-3), {"lr": 5e-4, "workers": 2})
    assert cfg.lr == 5e-4 and cfg.workers == 2 and cfg.images == "imgs"


def test_cli_rejects_bad_config_before_any_cluster_work(tmp_path):
    """Config errors exit 2 with a clear message, without starting Ray."""
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "train.py"), "--images", "x", "--masks", "y",
                           "--image-size", "64", "--workers", "4", "--batch-size", "6"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "not divisible across 4 workers" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_help_lists_every_config_key():
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "train.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for name in TrainConfig.field_names():
        assert "--" + name.replace("_", "-") in proc.stdout
