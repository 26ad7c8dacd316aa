"""pconv.tracking.loading: a PConv U-Net from every kind of model URI (checkpoint folder, folder of checkpoints, s3://
prefix, logged model folder; registry URIs are round-tripped in tests/test_inference.py), device resolution, and
registration refusing what is not a checkpoint. The helpers here (tiny model, checkpoint writer) serve
tests/test_inference.py too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pconv.tracking import checkpoints as ckpt
from pconv.tracking import registry
from pconv.storage import uris
from pconv.core.config import TrainConfig
from pconv.tracking.loading import from_state_dict, load_model, parse_registry_uri, resolve_device
from pconv.core.unet import build_model
from pconv.tracking.registry import register_checkpoint

LAYER_SIZE, IMAGE_SIZE = 4, 32  # tiny net: multiple of 16, trained size 32


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(LAYER_SIZE).eval()


def save_checkpoint(directory: Path, model: torch.nn.Module, step: int, run_id: str | None = None,
                    run_name: str = "tiny") -> Path:
    cfg = TrainConfig(images="x", masks="y", image_size=IMAGE_SIZE, layer_size=LAYER_SIZE, run_name=run_name,
                      experiment="infer-exp", phase1_steps=step, phase2_steps=0)
    state = {"model": model.state_dict(), "optimizer": {}, "scaler": {}, "step": step, "phase": 1, "epoch": 0,
             "data_seed": 0}
    return ckpt.save(directory, state, cfg.to_yaml(), {"mlflow_run_id": run_id, "step": step})


def random_pair(h: int, w: int, seed: int = 0, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if n else ()
    image = torch.rand(*shape, 3, h, w, generator=g)
    mask = (torch.rand(*shape, 1, h, w, generator=g) > 0.3).float()
    return image, mask


def outputs(model: torch.nn.Module) -> torch.Tensor:
    image, mask = random_pair(IMAGE_SIZE, IMAGE_SIZE, seed=7, n=2)
    with torch.no_grad():
        return model(image, mask)[0]


def test_load_model_from_checkpoints(tmp_path, s3_bucket):
    old, new = tiny_model(0), tiny_model(1)
    save_checkpoint(tmp_path / "run" / "checkpoint_000001", old, step=10)
    save_checkpoint(tmp_path / "run" / "checkpoint_000002", new, step=20)
    model, info = load_model(str(tmp_path / "run" / "checkpoint_000001"))
    assert info.kind == "checkpoint" and info.layer_size == LAYER_SIZE and info.image_size == IMAGE_SIZE
    assert (info.task, info.sr_scale, info.conv) == ("inpainting", None, "partial")
    assert info.step == 10 and info.label == "step-10" and info.version is None and not model.training
    assert torch.equal(outputs(model), outputs(old))
    latest, info = load_model(str(tmp_path / "run"))  # a folder of checkpoints -> the highest step
    assert info.step == 20 and torch.equal(outputs(latest), outputs(new))
    assert info.uri == str(tmp_path / "run") and info.source == str(tmp_path / "run" / "checkpoint_000002")

    uris.upload_dir(str(tmp_path / "run"), f"{s3_bucket}/runs/tiny")
    remote, info = load_model(f"{s3_bucket}/runs/tiny/checkpoint_000001")
    assert info.source == f"{s3_bucket}/runs/tiny/checkpoint_000001"
    assert torch.equal(outputs(remote), outputs(old))
    assert load_model(f"{s3_bucket}/runs/tiny")[1].step == 20

    (tmp_path / "run" / "checkpoint_000002" / "meta.json").unlink()  # incomplete: ignored
    assert load_model(str(tmp_path / "run"))[1].step == 10
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_model(f"{s3_bucket}/empty")


def test_load_model_from_a_logged_model_folder(tmp_path):
    """The layout pconv.tracking.registry logs (MLmodel + extra_files/state_dict.pt + config.yaml), read back pickle-free."""
    model = tiny_model(2)
    extra = tmp_path / "model" / registry.EXTRA_FILES_DIR
    extra.mkdir(parents=True)
    (tmp_path / "model" / registry.MLMODEL_FILE).write_text("flavors: {}\n")
    torch.save(model.state_dict(), extra / registry.STATE_DICT_FILE)
    (extra / ckpt.CONFIG_FILE).write_text(f"image_size: {IMAGE_SIZE}\n")  # layer_size from the one rule
    loaded, info = load_model(str(tmp_path / "model"))
    assert info.kind == "mlflow-model" and info.layer_size == LAYER_SIZE and info.label == "local"
    assert torch.equal(outputs(loaded), outputs(model))
    (extra / registry.STATE_DICT_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="log_and_register_model"):
        load_model(str(tmp_path / "model"))


def test_weights_that_do_not_fit_are_a_clear_error():
    with pytest.raises(ValueError, match="do not fit a layer_size=5"):
        from_state_dict(tiny_model().state_dict(), 5, "x")


def test_parse_registry_uri_and_resolve_device():
    assert parse_registry_uri("models:/pconv-unet@champion") == ("pconv-unet", None, "champion")
    assert parse_registry_uri("models:/pconv-sr/3") == ("pconv-sr", "3", None)
    for bad in ("pconv-unet@champion", "models:/pconv-unet"):
        with pytest.raises(ValueError):
            parse_registry_uri(bad)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_register_rejects_non_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError):
        register_checkpoint(str(tmp_path / "missing"))
