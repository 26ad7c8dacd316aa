"""`pconv export`: a registered model as ONNX and TorchScript, run by ONNX Runtime and LibTorch on real photos
(CBSD68) with NVIDIA's test masks, equal to PyTorch's raw prediction; the file is logged to the version's run.
The registry is a SQLite MLflow store (no server)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from pconv.commands import export as export_command
from pconv.core.config import TrainConfig
from pconv.core.unet import build_model
from pconv.inference.export import ARTIFACT_DIR, RawPrediction, export
from pconv.tracking import registry

LAYER_SIZE = 4          # stride 16
H, W = 320, 480         # a CBSD68 photo (321×481) cropped to multiples of the stride
TOLERANCE = 1e-4
CHECKPOINT_URI = "s3://bucket/runs/export/checkpoint_000001"  # recorded as the version's source tag


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny net (non-trivial weights and BN statistics) registered as version 1 in a SQLite store."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    torch.manual_seed(5)
    net = build_model(LAYER_SIZE).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    cfg = TrainConfig(images="x", masks="y", image_size=32, layer_size=LAYER_SIZE, run_name="export",
                      experiment="export-exp", phase1_steps=1, phase2_steps=0)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        version = registry.log_and_register_model(net, cfg, None, tracking_uri=uri, checkpoint_uri=CHECKPOINT_URI)
    return {"net": net, "uri": uri, "model": f"models:/{registry.INPAINTING_MODEL}/{version}", "version": version}


@pytest.fixture(scope="module")
def photos_and_masks(datasets_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """Two CBSD68 photos (H×W crops) and two NVIDIA test masks (white = hole) resized nearest, as the net's
    inputs: image with holes zeroed, mask 1 = valid."""
    photos = sorted((datasets_dir / "cbsd68").glob("*.png"))[:2]
    images = [np.asarray(Image.open(p).convert("RGB"))[:H, :W] if Image.open(p).width >= W
              else np.asarray(Image.open(p).convert("RGB").rotate(90, expand=True))[:H, :W] for p in photos]
    with zipfile.ZipFile(datasets_dir / "nvidia_irregular_mask_test.zip") as masks_zip:
        names = sorted(n for n in masks_zip.namelist() if n.endswith(".png"))
        masks = [np.asarray(Image.open(io.BytesIO(masks_zip.read(n))).convert("L").resize((W, H), Image.NEAREST))
                 for n in (names[3000], names[9000])]  # a small and a large hole-ratio bin
    image = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    mask = torch.from_numpy((np.stack(masks) < 128).astype(np.float32))[:, None]  # white = hole -> 0
    assert 0.01 < 1 - mask.mean() < 0.9, "the masks have holes"
    return image * mask, mask


@pytest.mark.slow  # two exports of the net (~30 s of CPU on 2 cores)
def test_onnx_and_torchscript_equal_pytorch_on_real_photos(registered, photos_and_masks, tmp_path, monkeypatch):
    import onnxruntime

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    image, mask = photos_and_masks
    with torch.no_grad():
        expected = RawPrediction(registered["net"])(image, mask).numpy()
    onnx_file, ts_file = tmp_path / "pconv.onnx", tmp_path / "pconv.pt"
    for fmt, path in (("onnx", onnx_file), ("torchscript", ts_file)):
        assert export_command.main(["--model", registered["model"], "--format", fmt, "--out", str(path)]) == 0

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "mask"]
    assert [o.name for o in session.get_outputs()] == ["output"]
    by_onnx = session.run(None, {"image": image.numpy(), "mask": mask.numpy()})[0]
    by_torchscript = torch.jit.load(str(ts_file))(image, mask).detach().numpy()
    assert np.abs(by_onnx - expected).max() <= TOLERANCE
    assert np.abs(by_torchscript - expected).max() <= TOLERANCE
    # dynamic sizes: another multiple of the stride, and batch 1
    small = (image[:1, :, :160, :224], mask[:1, :, :160, :224])
    with torch.no_grad():
        expected_small = RawPrediction(registered["net"])(*small).numpy()
    assert np.abs(session.run(None, {"image": small[0].numpy(), "mask": small[1].numpy()})[0]
                  - expected_small).max() <= TOLERANCE


def test_the_export_is_logged_to_the_versions_run(registered, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    result = export(registered["model"], "torchscript", tmp_path / "logged.pt")
    client = MlflowClient(registered["uri"])
    run_id = client.get_model_version(registry.INPAINTING_MODEL, registered["version"]).run_id
    assert f"{ARTIFACT_DIR}/logged.pt" in [a.path for a in client.list_artifacts(run_id, ARTIFACT_DIR)]
    assert result.artifact_uri and result.artifact_uri.endswith(f"{ARTIFACT_DIR}/logged.pt")
    assert result.stride == 2 ** LAYER_SIZE and result.model.version == registered["version"]


def test_a_checkpoint_exports_without_mlflow_and_bad_requests_are_refused(tmp_path, capsys):
    from pconv.tracking import checkpoints

    net = build_model(LAYER_SIZE).eval()
    cfg = TrainConfig(images="x", masks="y", image_size=32, layer_size=LAYER_SIZE)
    ckpt = checkpoints.save(tmp_path / "ckpt", {"model": net.state_dict(), "optimizer": {}, "scaler": {}, "step": 3,
                                                "phase": 1, "epoch": 0, "data_seed": 0}, cfg.to_yaml(), {"step": 3})
    result = export(str(ckpt), "torchscript", tmp_path / "ckpt.pt")
    assert result.artifact_uri is None and (tmp_path / "ckpt.pt").is_file()
    with pytest.raises(ValueError, match="should end in .onnx"):
        export(str(ckpt), "onnx", tmp_path / "wrong.pt")
    assert export_command.main(["--model", str(tmp_path / "missing"), "--format", "onnx",
                                "--out", str(tmp_path / "x.onnx")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists() and not list(tmp_path.glob(".*.partial"))


@pytest.mark.slow  # one ONNX export of a small net
def test_the_export_latency_benchmark_times_the_three_runtimes(capsys):
    from conftest import load_benchmark

    p50 = load_benchmark("export_latency").main(["--size", "64", "--layer-size", "4", "--repeats", "2",
                                                  "--warmup", "0"])
    assert set(p50) == {"eager", "torchscript", "onnxruntime"} and all(v > 0 for v in p50.values())
    out = capsys.readouterr().out
    assert "ratio onnxruntime/eager (cpu, 64px): " in out and "ratio torchscript/eager (cpu, 64px): " in out
    differences = [float(line.split()[-1]) for line in out.splitlines() if "max |difference|" in line]
    assert len(differences) == 3 and max(differences) <= TOLERANCE


def test_version_tags_keep_their_names_across_the_package_move(registered):
    """Tag keys are data, not module paths: `pconv.checkpoint` stays `pconv.checkpoint` (readers filter on it)."""
    from mlflow import MlflowClient

    tags = MlflowClient(registered["uri"]).get_model_version(registry.INPAINTING_MODEL, registered["version"]).tags
    assert tags["pconv.checkpoint"] == CHECKPOINT_URI
    assert not [key for key in tags if key.startswith(("pconv.tracking", "pconv.core", "pconv.train"))]
