"""TrainConfig: paper defaults, YAML round trip, validation messages, CLI flag mapping, the generated key table."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from pconv.core.config import REGISTER_AUTO, ConfigError, TrainConfig, default_text, markdown_table, merge
from pconv.core.unet import build_model, default_layer_size

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


@pytest.mark.parametrize("size", [384, 96, 512, 64])
def test_config_accepts_what_the_model_accepts(size):
    """One rule (pconv.core.unet.default_layer_size): 384 px was refused by the config's former copy of it."""
    cfg = valid(image_size=size).validate()
    assert cfg.layer_size == default_layer_size(size)
    out, _ = build_model(cfg.layer_size)(torch.rand(1, 3, size, size), torch.ones(1, 1, size, size))
    assert out.shape[-1] == size


def test_config_refuses_what_the_model_refuses():
    with pytest.raises(ValueError, match="not divisible"):
        default_layer_size(100)
    with pytest.raises(ConfigError, match="not divisible"):
        valid(image_size=100).validate()


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
    for name in (f.name for f in fields(TrainConfig)):
        assert "--" + name.replace("_", "-") in proc.stdout
    assert "(default: 2e-4)" in proc.stdout and "(default: auto)" in proc.stdout


def test_every_key_has_one_description_and_a_readable_default():
    by_name = {f.name: f for f in fields(TrainConfig)}
    assert all(f.metadata.get("help") for f in by_name.values())
    shown = {name: default_text(f) for name, f in by_name.items()}
    assert shown["lr"] == "2e-4" and shown["finetune_lr"] == "5e-5" and shown["phase1_steps"] == "10000"
    assert shown["run_name"] == "`pconv`" and shown["images"] == "—" and shown["batch_size"] == "6 × workers"
    assert TrainConfig().register_as == REGISTER_AUTO == "auto"


README_START, README_END = "<!-- config-table:start -->", "<!-- config-table:end -->"


def test_readme_configuration_table_is_the_generated_one():
    """README.md's configuration reference is markdown_table() verbatim (regenerate it after changing a key)."""
    text = (ROOT / "README.md").read_text()
    assert README_START in text and README_END in text, (
        f"README.md needs the markers {README_START} and {README_END} around the configuration table")
    table = text.split(README_START, 1)[1].split(README_END, 1)[0]
    assert table.strip() == markdown_table().strip(), (
        "README.md's configuration table differs from pconv.core.config.markdown_table(); paste the output of "
        "`python -c \"from pconv.core.config import markdown_table; print(markdown_table())\"` between the markers")
