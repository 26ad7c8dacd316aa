"""The newcomer demo (issue 7): helpers of pconv/apps/demo*.py, and the tiny demo end to end as `make demo` runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pconv.tracking import registry

from pconv.storage import shards
from pconv.apps import demo, demo_inputs
from pconv.core.config import TrainConfig
from pconv.tracking.loading import REGISTRY_SCHEME

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_is_a_valid_train_config():
    cfg = TrainConfig.from_yaml(REPO_ROOT / "configs" / "demo.yaml").validate()
    assert cfg.workers == 2 and cfg.cpus_per_worker == 0.5     # 2 workers + 1 free CPU on a 2-CPU local Ray
    assert cfg.phase1_steps > 0 and cfg.phase2_steps > 0          # both of the paper's phases run
    assert cfg.vgg_weights == "random" and cfg.register_as == registry.INPAINTING_MODEL
    tiny = demo.load_config(demo.DemoSettings.tiny_settings()).validate()
    assert (tiny.image_size, tiny.total_steps) == (32, 4)


def test_check_datasets_names_what_is_missing(tmp_path):
    (tmp_path / "cbsd68").mkdir()
    with pytest.raises(demo_inputs.DemoError, match="celeba_hq_sample.*nvidia_irregular_mask_test.zip"):
        demo_inputs.check_datasets(str(tmp_path))


def test_stage_test_masks_takes_every_nth_sorted_member(tmp_path):
    zpath = tmp_path / "m.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for i in range(25):
            zf.writestr(f"mask/testing_mask_dataset/{i:05d}.png", b"x")
        zf.writestr("mask/readme.txt", b"not a mask")
    names = demo_inputs.stage_test_masks(zpath, tmp_path / "out", stride=10)
    assert names == [f"mask/testing_mask_dataset/{i:05d}.png" for i in (0, 10, 20)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000.png", "00010.png", "00020.png"]


def test_ingestion_is_reused_only_for_the_same_inputs(tmp_path):
    from pconv.ingest import generate_masks

    dst, state = str(tmp_path / "shards"), tmp_path / "state"
    calls = []

    def ingest(n):
        calls.append(n)
        return generate_masks(n, dst, size=64, engine="threads", progress=False)

    assert demo_inputs.ingest_once("m", dst, state, {"n": 6}, lambda: ingest(6)) is False
    assert demo_inputs.ingest_once("m", dst, state, {"n": 6}, lambda: ingest(6)) is True     # same inputs: reused
    assert demo_inputs.ingest_once("m", dst, state, {"n": 12}, lambda: ingest(12)) is False  # changed: again
    (tmp_path / "shards" / shards.MANIFEST).unlink()                                         # shards gone: again
    assert demo_inputs.ingest_once("m", dst, state, {"n": 12}, lambda: ingest(12)) is False
    assert calls == [6, 12, 12]


def test_inpaint_grid_layout(prepared_shards, tmp_path, monkeypatch):
    """The grid (pconv.tracking.runs.grid_image, upscaled): one row per held-back image, columns masked input | result |
    ground truth, 2-px borders; the ground-truth cell of row 0 holds the (upscaled) centre-cropped image exactly."""
    import torch

    from pconv.evaluation import inpainting

    from pconv.tracking import loading
    from pconv.core.unet import build_model

    torch.manual_seed(0)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (build_model(4).eval(), {}))
    size, rows, scale, border = 32, 2, 2, 2
    png = demo.inpaint_grid("unused", prepared_shards["images"], prepared_shards["masks"], size, rows,
                            tmp_path / "grid.png", scale, tracking_uri="unused")
    with Image.open(png) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape == (scale * (rows * size + (rows + 1) * border), scale * (3 * size + 4 * border), 3)
    _, images = inpainting.load_images(prepared_shards["images"], size, limit=rows)
    y0, x0 = scale * border, scale * (border + 2 * (size + border))
    want = images[0].repeat(scale, axis=0).repeat(scale, axis=1)
    assert np.array_equal(arr[y0:y0 + scale * size, x0:x0 + scale * size], want)


def test_cli_exits_2_with_a_clear_error_without_datasets(tmp_path):
    proc = subprocess.run([sys.executable, "pipelines/demo.py", "--tiny", "--out", str(tmp_path / "out"),
                           "--datasets", str(tmp_path / "nowhere")], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "cbsd68" in proc.stderr and "--datasets" in proc.stderr


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_tiny_demo_end_to_end(tmp_path, datasets_dir, own_ray_cluster):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "AWS_", "RAY_ADDRESS", "DEMO_"))}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "pipelines/demo.py", "--tiny", "--out", str(out), "--datasets",
                           str(datasets_dir)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=540)
    (tmp_path / "demo.stdout").write_text(proc.stdout)
    (tmp_path / "demo.stderr").write_text(proc.stderr)
    assert proc.returncode == 0, (f"demo exited {proc.returncode} (full output in {tmp_path}):\n"
                                  f"STDERR tail:\n{proc.stderr[-6000:]}\nSTDOUT tail:\n{proc.stdout[-2000:]}")
    stdout = proc.stdout

    grid = Path(stdout.split("Inpainting grid (masked input | result | ground truth): ")[1].split("\n")[0])
    assert grid == out / "inpainting_grid.png" and grid.is_file()
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.width > 3 * 32 * 3   # three upscaled 32-px columns

    assert f"### Model: {REGISTRY_SCHEME}{registry.INPAINTING_MODEL}/" in stdout and "### Baseline:" in stdout
    result = json.loads((out / "result.json").read_text())
    for table in ("model", "baseline"):
        rows = result["evaluation"][table]["rows"]
        assert {(r["bin"], r["border"]) for r in rows} == {(b, f) for b in range(6) for f in (False, True)}, table
        assert all(r["count"] > 0 and 0 < r["psnr"] < 100 for r in rows), table
    assert stdout.count("| all |") == 2                         # an overall row for the model and the baseline
    version = result["model_version"]
    assert f"{REGISTRY_SCHEME}{registry.INPAINTING_MODEL}@{registry.CANDIDATE} (version {version})" in stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in stdout and str(out / "mlflow.db") in stdout
    assert "RANDOMLY initialised VGG16" in stdout
    assert (out / "shards" / "images" / shards.MANIFEST).is_file()
