"""pconv.inference.inpaint / pconv.tracking.registry / pconv.inference.batch: exact composites at any size, the registry round trip through a
REAL mlflow server (artifacts in the moto S3 server) loaded back by pconv.tracking.loading, the inpaint CLI and folder
pairing, and Ray Data batch inference writing to S3. Loading from checkpoints and paths: tests/test_loading.py."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from PIL import Image

from mlflow_server import mlflow_server  # noqa: F401 - module-scoped fixture
from pconv.storage import uris
from pconv.inference.inpaint import Job, inpaint, inpaint_job, net_multiple, pair_files
from pconv.tracking.loading import load_model
from pconv.tracking.registry import register_checkpoint
from test_loading import IMAGE_SIZE, LAYER_SIZE, outputs, random_pair, save_checkpoint, tiny_model

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# inpaint(): exact on valid pixels, any size, tiles
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w", [(70, 53), (32, 32), (5, 9)])
def test_inpaint_keeps_valid_pixels_exactly_at_any_size(h, w):
    model = tiny_model()
    image, mask = random_pair(h, w)
    image = torch.where(mask.bool(), image, torch.full_like(image, float("nan")))  # garbage in the holes
    comp = inpaint(model, image, mask)
    assert comp.shape == image.shape and comp.dtype == torch.float32
    valid = mask.bool().expand_as(image)
    assert torch.equal(comp[valid], image[valid])
    assert torch.isfinite(comp).all() and comp.min() >= 0 and comp.max() <= 1  # hole content never leaks


def test_inpaint_at_the_net_multiple_is_the_plain_network_composite():
    model = tiny_model()
    image, mask = random_pair(32, 48, n=2)
    with torch.no_grad():
        out, _ = model(image * mask, mask)
    expected = mask * image + (1 - mask) * out.clamp(0, 1)
    torch.testing.assert_close(inpaint(model, image, mask), expected, rtol=0, atol=1e-6)
    # 3-D image + 2-D mask gives the same as the batched call for that image
    torch.testing.assert_close(inpaint(model, image[1], mask[1, 0]), expected[1], rtol=0, atol=1e-6)


def test_inpaint_tiles_large_images_and_rejects_bad_shapes():
    model = tiny_model()
    image, mask = random_pair(100, 75, seed=3)
    mask[..., :40, :] = 1.0  # the top tiles have no holes and are skipped
    comp = inpaint(model, image, mask, max_side=32, tile_overlap=16)
    valid = mask.bool().expand_as(image)
    assert torch.equal(comp[valid], image[valid]) and torch.isfinite(comp).all()
    assert not torch.equal(comp, inpaint(model, image, mask))  # tiling really ran (different context)
    with pytest.raises(ValueError, match="does not match"):
        inpaint(model, image, mask[..., :50])
    with pytest.raises(ValueError, match="3×H×W"):
        inpaint(model, image[:1], mask)


def test_net_multiple_looks_through_wrappers():
    class Wrapper(torch.nn.Module):  # what DDP does: the net under .module
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.module = inner

    assert net_multiple(Wrapper(Wrapper(tiny_model()))) == 2 ** LAYER_SIZE
    with pytest.raises(ValueError, match="layer_size"):
        net_multiple(torch.nn.Linear(1, 1))


# ---------------------------------------------------------------------------------------------
# Registry round trip through the real server
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    """A checkpoint logged into its training run and registered as pconv-unet (alias candidate)."""
    from pconv.tracking import runs, store

    run_id = store.start_or_resume_run("infer-exp", "tiny")
    runs.Tracker(run_id).set_terminated("FINISHED")
    model = tiny_model(5)
    directory = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_000003", model, step=3,
                                run_id=run_id)
    version = register_checkpoint(str(directory))
    return {"model": model, "version": version, "run_id": run_id, "dir": directory}


def test_register_checkpoint_sets_candidate_and_loads_identically(registered, mlflow_server, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    # registering used MLflow's fluent API but left no process-wide state behind (URIs, env)
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_server.url and "MLFLOW_REGISTRY_URI" not in os.environ
    client = MlflowClient(mlflow_server.url)
    mv = client.get_model_version_by_alias("pconv-unet", "candidate")
    assert mv.version == registered["version"] == "1"
    assert mv.run_id == registered["run_id"]  # logged into the training run recorded in meta.json
    assert client.get_run(registered["run_id"]).info.status == "FINISHED"  # registration did not reopen it
    assert mv.tags["pconv.layer_size"] == str(LAYER_SIZE) and mv.tags["pconv.step"] == "3"
    assert mv.tags["pconv.serialization"] == "pt2"

    model, info = load_model("models:/pconv-unet@candidate")
    assert info.kind == "registry" and info.version == info.label == "1" and info.image_size == IMAGE_SIZE
    assert info.name == "pconv-unet" and info.model_id and info.model_id.startswith("m-")
    assert torch.equal(outputs(model), outputs(registered["model"]))
    assert torch.equal(outputs(load_model("models:/pconv-unet/1")[0]), outputs(registered["model"]))

    # the pt2 (torch.export) flavour loads without pickle and computes the same thing at the trained size
    exported = mlflow.pytorch.load_model("models:/pconv-unet@candidate")
    image, mask = random_pair(IMAGE_SIZE, IMAGE_SIZE, seed=7, n=3)
    with torch.no_grad():
        torch.testing.assert_close(exported(image, mask)[0], registered["model"](image, mask)[0])

    # the LoggedModel's artifacts went through the server's proxy into the S3 bucket, with the model card
    s3 = boto3.client("s3", endpoint_url=mlflow_server.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=mlflow_server.bucket, Prefix="mlflow/")["Contents"]]
    assert any(k.endswith("extra_files/state_dict.pt") for k in keys)
    assert any(k.endswith("data/model.pt2") for k in keys)
    card = client.download_artifacts(registered["run_id"], "model_card.md", str(tmp_path))
    text = Path(card).read_text()
    assert "1 = valid" in text and "Partial Convolutions" in text and f"{IMAGE_SIZE} px" in text


# ---------------------------------------------------------------------------------------------
# The CLI and folders
# ---------------------------------------------------------------------------------------------
def _write_pair(folder_img: Path, folder_mask: Path, stem: str, h: int, w: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB PNG and its mask PNG (white = hole); returns (image uint8, hole map)."""
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    holes = np.zeros((h, w), bool)
    holes[h // 4:h // 2, w // 3:w // 2 + 3] = True
    (folder_img / stem).parent.mkdir(parents=True, exist_ok=True)
    (folder_mask / stem).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(folder_img / f"{stem}.png")
    Image.fromarray((holes * 255).astype(np.uint8)).save(folder_mask / f"{stem}.png")  # white = hole
    return img, holes


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "pipelines" / "inpaint.py"), *args], capture_output=True,
                          text=True, env={**os.environ}, timeout=300)


def test_inpaint_cli_pulls_candidate_and_keeps_valid_pixels(registered, tmp_path):
    expected = {stem: _write_pair(tmp_path / "in", tmp_path / "masks", stem, h, w, i)
                for i, (stem, h, w) in enumerate([("odd", 70, 53), ("square", 48, 48)])}
    proc = _cli("--model", "models:/pconv-unet@candidate", "--image", str(tmp_path / "in"), "--mask",
                str(tmp_path / "masks"), "--out", str(tmp_path / "out"), "--hole-color", "white", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    for stem, (img, holes) in expected.items():
        out = np.asarray(Image.open(tmp_path / "out" / f"{stem}.png"))
        assert out.shape == img.shape
        np.testing.assert_array_equal(out[~holes], img[~holes])  # valid pixels bit-exact after the PNG round trip
        assert not np.array_equal(out[holes], img[holes])

    # a single file works too, and the wrong polarity is a different (still exact) result
    proc = _cli("--model", "models:/pconv-unet@candidate", "--image", str(tmp_path / "in" / "odd.png"), "--mask",
                str(tmp_path / "masks" / "odd.png"), "--out", str(tmp_path / "single.png"), "--hole-color", "black")
    assert proc.returncode == 0, proc.stderr
    img, holes = expected["odd"]
    out = np.asarray(Image.open(tmp_path / "single.png"))
    np.testing.assert_array_equal(out[holes], img[holes])  # "black = hole": the white region is now valid


def test_inpaint_cli_errors_are_clear(registered, tmp_path):
    _write_pair(tmp_path / "in", tmp_path / "masks", "a", 20, 20, 0)
    _write_pair(tmp_path / "in", tmp_path / "other", "b", 20, 20, 1)
    proc = _cli("--model", "models:/pconv-unet@candidate", "--image", str(tmp_path / "in"), "--mask",
                str(tmp_path / "masks"), "--out", str(tmp_path / "out"), "--hole-color", "white")
    assert proc.returncode == 2 and "1 image(s) without a mask: b" in proc.stderr
    proc = _cli("--model", "models:/pconv-unet@candidate", "--image", str(tmp_path / "in"), "--mask",
                str(tmp_path / "masks"), "--out", str(tmp_path / "out"))
    # no --hole-color: white = hole (every edge's default), so the run gets as far as the pairing error
    assert proc.returncode == 2 and "1 image(s) without a mask: b" in proc.stderr
    Image.new("L", (10, 20)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="must match their image"):
        inpaint_job(registered["model"], Job(str(tmp_path / "in" / "a.png"), str(tmp_path / "small.png"),
                                             str(tmp_path / "x.png")), "white")


def test_pair_files_by_relative_stem(tmp_path):
    for sub in ("x/a", "x/b", "y/a"):
        _write_pair(tmp_path / "img", tmp_path / "msk", sub, 8, 8, 0)
    jobs = pair_files(str(tmp_path / "img"), str(tmp_path / "msk"), str(tmp_path / "o"))
    assert [Path(j.out).relative_to(tmp_path / "o").as_posix() for j in jobs] == ["x/a.png", "x/b.png", "y/a.png"]
    with pytest.raises(ValueError, match="both as folders"):
        pair_files(str(tmp_path / "img" / "x" / "a.png"), str(tmp_path / "msk"), str(tmp_path / "o"))


# ---------------------------------------------------------------------------------------------
# Ray Data batch inference into S3
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_batch_inpaint_with_ray_writes_to_s3(registered, s3_bucket, ray_local, tmp_path):
    from pconv.inference.batch import batch_inpaint

    pairs = {stem: _write_pair(tmp_path / "in", tmp_path / "masks", stem, 40 + 3 * i, 37, i)
             for i, stem in enumerate(["p0", "p1", "p2"])}
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    Image.new("L", (8, 8)).save(tmp_path / "masks" / "broken.png")
    uris.upload_dir(str(tmp_path / "in"), f"{s3_bucket}/in")
    uris.upload_dir(str(tmp_path / "masks"), f"{s3_bucket}/masks")
    summary = batch_inpaint("models:/pconv-unet@candidate", f"{s3_bucket}/in", f"{s3_bucket}/masks",
                            f"{s3_bucket}/out", hole_color="white", batch_size=2, num_actors=1)
    assert summary["total"] == 4 and summary["written"] == 3 and summary["skipped"] == 1
    assert summary["polarity_warning"] is None  # the masks are ~ 9 % holes: nothing to warn about
    assert summary["errors"][0][0].endswith("broken.png") and "ValueError" in summary["errors"][0][1]
    assert uris.list_files(f"{s3_bucket}/out") == [f"{s3_bucket}/out/{s}.png" for s in ("p0", "p1", "p2")]
    for stem, (img, holes) in pairs.items():
        out = np.asarray(Image.open(io.BytesIO(uris.read_bytes(f"{s3_bucket}/out/{stem}.png"))))
        np.testing.assert_array_equal(out[~holes], img[~holes])
