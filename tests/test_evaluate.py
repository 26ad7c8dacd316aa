"""pconv.evaluation.inpainting: the paper's Table-1 protocol on real CBSD68 photos with NVIDIA test masks, the non-learned
baseline's table, MLflow logging through a REAL server, and promotion of `champion` only when a model is better.
(The baseline's fill itself: tests/test_baseline.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mlflow_server import mlflow_server  # noqa: F401 - module-scoped fixture
from pconv.evaluation import inpainting
from pconv.core.masks import HOLE_RATIO_BINS
from pconv.core.config import TrainConfig
from pconv.core.unet import build_model
from pconv.tracking.registry import CANDIDATE, CHAMPION, INPAINTING_MODEL

REPO = Path(__file__).resolve().parents[1]
LAYER_SIZE, IMAGE_SIZE, N_IMAGES = 4, 64, 3
MASK_ZIP_DIR = "mask/testing_mask_dataset"


@pytest.fixture(scope="module")
def eval_data(datasets_dir, tmp_path_factory):
    """Two NVIDIA test masks per (bin, border) block as raw PNGs and as mask shards; the CBSD68 folder."""
    from pconv.ingest import ingest_masks

    root = tmp_path_factory.mktemp("evaldata")
    raw = root / "raw_masks"
    raw.mkdir()
    with zipfile.ZipFile(datasets_dir / "nvidia_irregular_mask_test.zip") as zf:
        for block in range(12):  # block b: bin b // 2, border constraint on odd blocks (datasets README)
            for i in range(2):
                name = f"{block * 1000 + i:05d}.png"
                (raw / name).write_bytes(zf.read(f"{MASK_ZIP_DIR}/{name}"))
    ingest_masks(str(raw), str(root / "mask_shards"), hole_color="white", engine="threads", progress=False)
    return {"images": str(datasets_dir / "cbsd68"), "raw": str(raw), "shards": str(root / "mask_shards")}


@pytest.fixture(scope="module")
def eval_set(eval_data):
    return inpainting.build_eval_set(eval_data["images"], eval_data["shards"], IMAGE_SIZE, limit=N_IMAGES)


# ---------------------------------------------------------------------------------------------
# Protocol pieces
# ---------------------------------------------------------------------------------------------
def test_fixed_pairing_covers_every_bin_and_border_group(eval_data, eval_set):
    es = eval_set
    assert len(es.image_keys) == N_IMAGES and es.image_keys == sorted(os.listdir(eval_data["images"]))[:N_IMAGES]
    first = next(es.image_batches())
    assert [j for j, _ in first] == list(range(N_IMAGES)) and first[0][1].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert es.groups == {(b, f): 2 for b in range(6) for f in (False, True)}
    assert len(es.pairs) == 12 * N_IMAGES
    # the NVIDIA blocks are the paper's bins: block 2k (no border) and 2k+1 (border) hold bin k
    for _, rec in es.pairs:
        block = int(rec.key[:5]) // 1000
        assert (rec.bin, rec.border) == (block // 2, block % 2 == 1), rec.key
    # deterministic: same inputs, same pairs; raw files (with explicit polarity) pair exactly like shards
    again = inpainting.build_eval_set(eval_data["images"], eval_data["raw"], IMAGE_SIZE, limit=N_IMAGES, hole_color="white")
    assert [(j, r.key, r.bin, r.border) for j, r in again.pairs] == [(j, r.key, r.bin, r.border) for j, r in es.pairs]
    for (_, a), (_, b) in zip(es.pairs[:6], again.pairs[:6]):
        np.testing.assert_array_equal(es.mask(a), again.mask(b))
    m = es.mask(es.pairs[0][1])
    assert m.shape == (IMAGE_SIZE, IMAGE_SIZE) and set(np.unique(m)) <= {0, 1}
    with pytest.raises(ValueError, match="--hole-color"):
        inpainting.build_eval_set(eval_data["images"], eval_data["raw"], IMAGE_SIZE, limit=1)


def test_shard_roots_are_told_apart_from_file_sets(eval_data, datasets_dir):
    from pconv.storage.shards import is_dataset_root

    assert is_dataset_root(eval_data["shards"])
    assert not is_dataset_root(eval_data["raw"]) and not is_dataset_root(eval_data["images"])
    assert not is_dataset_root(str(datasets_dir / "nvidia_irregular_mask_test.zip"))


def test_image_shards_are_evaluated_on_their_val_split(eval_data, tmp_path, s3_bucket):
    import shutil

    from pconv.ingest import ingest_images
    from pconv.storage.shards import key_hash01

    src = tmp_path / "photos"
    src.mkdir()
    names = sorted(os.listdir(eval_data["images"]))[:8]
    for name in names:
        shutil.copy(Path(eval_data["images"]) / name, src / name)
    ingest_images(str(src), f"{s3_bucket}/img", val_fraction=0.5, max_side=96, engine="threads", progress=False)
    keys, images = inpainting.load_images(f"{s3_bucket}/img", IMAGE_SIZE)
    expected = sorted(n for n in names if key_hash01(n) < 0.5)
    assert 0 < len(expected) < len(names) and keys == expected
    assert all(im.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) for im in images)


# ---------------------------------------------------------------------------------------------
# Models in the registry: a "good" one (fills holes with mid-grey) and a "bad" one (fills them with black)
# ---------------------------------------------------------------------------------------------
def constant_fill_model(value: float, seed: int = 0) -> torch.nn.Module:
    """A net whose output is a constant colour: last decoder conv zeroed, its bias set to ``value``."""
    torch.manual_seed(seed)
    model = build_model(LAYER_SIZE).eval()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(value)
    image = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    out, _ = model(image, torch.ones(1, 1, IMAGE_SIZE, IMAGE_SIZE))
    assert torch.allclose(out, torch.full_like(out, value), atol=1e-5), "model no longer ends in a biased conv"
    return model


def register(model: torch.nn.Module, run_name: str) -> str:
    from pconv.tracking import store
    from pconv.tracking.registry import log_and_register_model

    cfg = TrainConfig(images="x", masks="y", image_size=IMAGE_SIZE, layer_size=LAYER_SIZE, run_name=run_name,
                      experiment="eval-exp", phase1_steps=1, phase2_steps=0)
    run_id = store.start_or_resume_run("eval-exp", run_name)
    return log_and_register_model(model, cfg, run_id, name=INPAINTING_MODEL, alias=CANDIDATE)


@pytest.fixture(scope="module")
def versions(mlflow_server) -> dict[str, str]:
    """Two registered versions: "black" (fills holes with 0) and "grey" (fills them with 0.45)."""
    return {"black": register(constant_fill_model(0.0), "black"),
            "grey": register(constant_fill_model(0.45, seed=1), "grey")}


def champion(server) -> str | None:
    from mlflow import MlflowClient

    try:
        return MlflowClient(server.url).get_model_version_by_alias(INPAINTING_MODEL, CHAMPION).version
    except Exception:  # noqa: BLE001
        return None


def test_evaluate_cli_prints_per_bin_tables_and_logs_to_mlflow(mlflow_server, versions, eval_data, tmp_path):
    import json

    from mlflow import MlflowClient

    version = versions["grey"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "evaluate.py"), "--model", f"models:/{INPAINTING_MODEL}/{version}",
         "--images", eval_data["images"], "--masks", eval_data["shards"], "--limit", str(N_IMAGES),
         "--image-size", str(IMAGE_SIZE), "--device", "cpu", "--experiment", "eval-runs",
         "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, env={**os.environ}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"### Model: models:/{INPAINTING_MODEL}/" in out and "### Baseline: push-pull diffusion fill" in out
    for lo, hi in HOLE_RATIO_BINS:
        label = f"| ({lo:g}, {hi:g}] |"
        assert out.count(f"{label} no | {N_IMAGES} |") == 2 and out.count(f"{label} yes | {N_IMAGES} |") == 2
    result = json.loads((tmp_path / "r.json").read_text())
    assert len(result["model"]["rows"]) == 12 and len(result["baseline"]["rows"]) == 12
    assert result["pairs"] == 12 * N_IMAGES and result["promotion"] is None
    # a grey fill loses to a diffusion fill on natural photos: the margin is visible and measured
    assert result["baseline"]["overall"]["psnr"] > result["model"]["overall"]["psnr"]

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["pairs"] == str(12 * N_IMAGES)
    assert abs(run.data.metrics["eval/psnr"] - result["model"]["overall"]["psnr"]) < 1e-9
    assert "baseline/bin5_border/ssim" in run.data.metrics
    files = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert files == {"evaluation/table.md", "evaluation/results.json", "evaluation/metrics_by_bin.png"}
    assert champion(mlflow_server) is None  # evaluation without --promote never touches the alias
    # the registry shows the score of the version itself: the metrics are on its LoggedModel (MLflow 3 model_id)
    model_id = result["model_info"]["model_id"]
    assert model_id and client.get_model_version(INPAINTING_MODEL, version).source.endswith(model_id)
    scored = {m.key: m.value for m in client.get_logged_model(model_id).metrics}
    assert abs(scored["eval/psnr"] - result["model"]["overall"]["psnr"]) < 1e-9 and "eval/bin0_noborder/l1" in scored


def test_promote_moves_champion_only_when_better(mlflow_server, versions, eval_data):
    from mlflow import MlflowClient

    def evaluate(version: str) -> dict:
        return inpainting.run_evaluation(f"models:/{INPAINTING_MODEL}/{version}", eval_data["images"], eval_data["shards"],
                                IMAGE_SIZE, limit=N_IMAGES, device="cpu", baseline=False, experiment=None,
                                promote_alias=CHAMPION)["promotion"]

    black, grey = versions["black"], versions["grey"]
    first = evaluate(black)  # nobody holds champion yet: the first candidate takes it
    assert first["promoted"] and "no version had alias" in first["reason"]
    assert champion(mlflow_server) == black

    better = evaluate(grey)
    assert better["promoted"] and better["candidate_psnr"] > better["champion_psnr"]
    assert champion(mlflow_server) == grey

    # the same weights as another version (a re-registration): a tie, the alias stays
    client = MlflowClient(mlflow_server.url)
    same = client.copy_model_version(f"models:/{INPAINTING_MODEL}/{grey}", INPAINTING_MODEL).version
    assert same not in (black, grey)
    tie = evaluate(same)
    assert not tie["promoted"] and "ties with" in tie["reason"] and champion(mlflow_server) == grey

    worse = evaluate(black)  # the old black model again: a regression
    assert not worse["promoted"] and "is worse than" in worse["reason"] and champion(mlflow_server) == grey

    again = evaluate(grey)
    assert not again["promoted"] and "already has alias" in again["reason"]

    with pytest.raises(ValueError, match="registered model"):
        inpainting.run_evaluation("/some/checkpoint", eval_data["images"], eval_data["shards"], IMAGE_SIZE, limit=1,
                         experiment=None, promote_alias=CHAMPION)
