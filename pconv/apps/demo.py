"""The newcomer demo: the whole pipeline on real photos, locally, in a few minutes (``make demo``).

Stages (each with a progress bar):

1. ingest the CelebA-HQ sample + CBSD68 photos into image shards (a held-back ``val`` split), a subset of the
   NVIDIA irregular test masks (every ``mask_stride``-th file, all bins and both border flags) into test-mask
   shards, and generated irregular masks into training-mask shards (the test masks are never trained on);
2. train the PConv U-Net through both of the paper's phases on a local Ray cluster (2 workers), logging to MLflow
   (embedded SQLite store) and registering the final model with alias ``candidate``;
3. evaluate the registered model per hole-ratio bin against the non-learned baseline (paper protocol);
4. inpaint a few held-back images with test masks and save a grid (masked input | result | ground truth).

An application composed of library calls (ingest, train, evaluation, loading, inference, tracking): inputs and
shard reuse are :mod:`pconv.apps.demo_inputs`, the training progress bar :mod:`pconv.apps.demo_progress`. Shards
are reused when their inputs did not change, so re-running is fast; every run gets a new, timestamped run name.
With ``s3=True`` a local S3 server (:mod:`pconv.apps.local_s3`) runs for the duration of the demo and shards +
checkpoints live in ``s3://pconv-demo/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pconv import cluster
from pconv.tracking import registry

from pconv.storage import uris

from pconv.tracking import runs as tracking
from pconv.tracking.store import resolve_tracking_uri
from pconv.apps.demo_inputs import (DEFAULT_DATASETS, MASK_ZIP, DemoError, check_datasets, fingerprint,
                                    ingest_once, reusable, stage_images, stage_test_masks)
from pconv.apps.demo_progress import TrainProgress
from pconv.apps.local_s3 import LocalS3
from pconv.core.config import TrainConfig, merge
from pconv.tracking.loading import REGISTRY_SCHEME, parse_registry_uri
from pconv.core.masks import NVIDIA_HOLE_COLOR

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
S3_BUCKET = "pconv-demo"
RANDOM_VGG_WARNING = ("vgg_weights=random: the perceptual/style losses use a RANDOMLY initialised VGG16 because "
                      "ImageNet weights cannot be downloaded here. The demo model is NOT a useful inpainter. "
                      "Production runs use --vgg-weights imagenet or a path / s3:// URI of a VGG16 state dict.")


@dataclass
class DemoSettings:
    """What the demo does besides the training config (``configs/demo.yaml``)."""

    out: str = "demo_out"                 # local outputs: staging, shards, checkpoints, MLflow db, grid
    datasets: str = str(DEFAULT_DATASETS)
    config: str = str(DEFAULT_CONFIG)
    tiny: bool = False                    # CI / fresh-clone setting
    s3: bool = False                      # shards + checkpoints in a local S3 server
    images_per_folder: int | None = None  # None: all photos of each folder
    max_side: int = 256                   # ingestion downscale (longest side)
    val_fraction: float = 0.15            # held-back images for evaluation / the grid
    mask_stride: int = 20                 # every Nth NVIDIA test mask: 600 of 12,000, all bins, both border flags
    train_masks: int = 600                # generated training masks
    eval_limit: int | None = 12           # held-back images in the evaluation (x 12 bin/border groups)
    grid_rows: int = 4
    grid_scale: int = 3                   # display upscale of the grid cells
    run_name: str | None = None           # None: demo-<UTC timestamp>
    overrides: dict[str, Any] = field(default_factory=dict)  # extra TrainConfig keys

    @classmethod
    def tiny_settings(cls, **kwargs: Any) -> "DemoSettings":
        """Few images, few masks, 32 px, 2 + 2 steps: the whole path in ~2 minutes after setup."""
        base = dict(tiny=True, images_per_folder=8, mask_stride=200, train_masks=60, eval_limit=4, grid_rows=3,
                    overrides={"image_size": 32, "layer_size": 4, "phase1_steps": 2, "phase2_steps": 2,
                               "checkpoint_every": 2, "val_every": 2, "sample_every": 4, "log_every": 1,
                               "val_size": 4})
        base.update(kwargs)
        return cls(**base)


@dataclass
class DemoResult:
    run_name: str
    seconds: dict[str, float]
    images_uri: str
    test_masks_uri: str
    train_masks_uri: str
    checkpoint: str | None
    mlflow_run_id: str | None
    tracking_uri: str
    model_uri: str
    model_version: str
    evaluation_markdown: str
    evaluation: dict[str, Any]
    grid_png: str
    random_vgg: bool
    s3: bool = False

    def summary(self) -> str:
        """The closing text the CLI prints: where everything is."""
        db = self.tracking_uri
        name = parse_registry_uri(self.model_uri)[0]
        lines = ["", "=" * 100, f"PConv demo finished: run {self.run_name!r} in {sum(self.seconds.values()):.0f} s "
                 f"({', '.join(f'{k} {v:.0f} s' for k, v in self.seconds.items())})", "=" * 100, "",
                 f"Inpainting grid (masked input | result | ground truth): {self.grid_png}", "",
                 "Evaluation on held-back images x NVIDIA test masks (per hole-ratio bin; model vs baseline):", "",
                 self.evaluation_markdown.rstrip(), "",
                 f"Registered model: {REGISTRY_SCHEME}{name}@{registry.CANDIDATE} (version {self.model_version}); "
                 f"exact: {self.model_uri}",
                 f"Checkpoint:       {self.checkpoint}",
                 f"MLflow run:       {self.mlflow_run_id}",
                 f"Browse the runs:  mlflow ui --backend-store-uri {db}"
                 + ("  (or .venv/bin/mlflow ui ...)" if not shutil.which("mlflow") else ""),
                 f"Shards:           images {self.images_uri}, test masks {self.test_masks_uri}, "
                 f"training masks {self.train_masks_uri}"]
        if self.s3:
            lines += ["", "Note: the local S3 server was stopped at the end of the demo, so the s3:// shards and "
                      "checkpoints above are gone; the registered model (artifacts beside the MLflow db) remains."]
        if self.random_vgg:
            lines += ["", "WARNING: " + RANDOM_VGG_WARNING]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------
def inpaint_grid(model_uri: str, images_uri: str, masks_uri: str, image_size: int, rows: int, out_png: Path,
                 scale: int, tracking_uri: str) -> Path:
    """Inpaint the first ``rows`` held-back images with test masks from different hole-ratio bins; save the grid
    (:func:`pconv.tracking.runs.grid_image`: one row per image, masked input (holes white) | result | ground truth),
    upscaled ``scale`` times (nearest, to show the real pixels)."""
    import torch
    from PIL import Image
    from tqdm import tqdm

    from pconv.evaluation import inpainting
    from pconv.inference.inpaint import inpaint
    from pconv.tracking.loading import load_model

    model, _ = load_model(model_uri, device="cpu", tracking_uri=tracking_uri)
    _, images = inpainting.load_images(images_uri, image_size, limit=rows)
    records = sorted(inpainting.load_masks(masks_uri), key=lambda r: r.key)
    by_bin: dict[int, list] = {}
    for rec in records:
        if rec.bin >= 0:
            by_bin.setdefault(rec.bin, []).append(rec)
    if not by_bin:
        raise DemoError(f"no test mask under {masks_uri} falls into the paper's hole-ratio bins")
    bins = sorted(by_bin)
    es = inpainting.EvalSet(image_size, [], [], [])
    masked, results, truths = [], [], []
    for i, img in enumerate(tqdm(images, desc="inpaint held-back images", unit="image", dynamic_ncols=True)):
        b = bins[min(len(bins) - 1, 1 + 2 * i) % len(bins)]   # bins 1, 3, 5, ...: moderate to large holes
        rec = by_bin[b][i % len(by_bin[b])]
        m = torch.from_numpy(es.mask(rec).astype(np.float32))[None]           # 1×H×W, 1 = valid
        x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)  # 3×H×W
        truths.append(x)
        results.append(inpaint(model, x, m, device="cpu"))
        masked.append(torch.where(m >= 0.5, x, torch.ones_like(x)))
    grid = tracking.grid_image([torch.stack(masked), torch.stack(results), torch.stack(truths)])
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out_png)
    return out_png


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------
def _run_name() -> str:
    return "demo-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def load_config(settings: DemoSettings) -> TrainConfig:
    cfg = TrainConfig.from_yaml(settings.config)
    return merge(cfg, settings.overrides) if settings.overrides else cfg


def run_demo(settings: DemoSettings) -> DemoResult:
    """Run every stage (see the module docstring); returns where everything is. DemoError on missing inputs."""
    out = Path(settings.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    datasets = check_datasets(settings.datasets)
    cfg = load_config(settings)
    run_name = settings.run_name or _run_name()
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        # The embedded store lives with the demo's outputs (and so does its artifact folder).
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out / 'mlflow.db'}"
    tracking_uri = resolve_tracking_uri()
    random_vgg = cfg.vgg_weights == "random"
    if random_vgg:
        log.warning("*" * 100)
        log.warning(RANDOM_VGG_WARNING)
        log.warning("*" * 100)

    with contextlib.ExitStack() as stack:
        if settings.s3:
            s3 = stack.enter_context(LocalS3(out / "logs" / "s3.log"))
            stack.enter_context(s3.environment())
            s3.create_bucket(S3_BUCKET)
            log.info("local S3 server at %s, bucket s3://%s (log %s)", s3.endpoint, S3_BUCKET, s3.log_path)
        return _stages(settings, cfg, out, datasets, run_name, tracking_uri, random_vgg)


def _stages(settings: DemoSettings, cfg: TrainConfig, out: Path, datasets: Path, run_name: str,
            tracking_uri: str, random_vgg: bool) -> DemoResult:
    from pconv import ingest
    seconds: dict[str, float] = {}
    base = f"s3://{S3_BUCKET}" if settings.s3 else str(out)
    images_uri = uris.join(base, "shards", "images")
    test_masks_uri = uris.join(base, "shards", "test_masks")
    train_masks_uri = uris.join(base, "shards", "train_masks")
    state_dir = out / "state"

    # 1. ingestion ---------------------------------------------------------------------------
    t0 = time.monotonic()
    staged_images = out / "staging" / "images"
    keys = stage_images(datasets, staged_images, settings.images_per_folder)
    ingest_once("images", images_uri, state_dir,
                {"keys": keys, "max_side": settings.max_side, "val_fraction": settings.val_fraction},
                lambda: ingest.ingest_images(str(staged_images), images_uri, val_fraction=settings.val_fraction,
                                             shard_size_mb=64, max_side=settings.max_side, engine="threads",
                                             progress=True))
    staged_masks = out / "staging" / "test_masks"
    test_fp = {"zip": str(datasets / MASK_ZIP), "size": (datasets / MASK_ZIP).stat().st_size,
               "stride": settings.mask_stride}
    if not reusable(state_dir / "test_masks.json", test_masks_uri, fingerprint(test_fp)):
        stage_test_masks(datasets / MASK_ZIP, staged_masks, settings.mask_stride)
    ingest_once("test_masks", test_masks_uri, state_dir, test_fp,
                lambda: ingest.ingest_masks(str(staged_masks), test_masks_uri, hole_color=NVIDIA_HOLE_COLOR,
                                            shard_size_mb=64, engine="threads", progress=True))
    ingest_once("train_masks", train_masks_uri, state_dir, {"n": settings.train_masks, "size": 256, "seed": 0},
                lambda: ingest.generate_masks(settings.train_masks, train_masks_uri, size=256, seed=0,
                                              shard_size_mb=64, engine="threads", progress=True))
    seconds["ingest"] = time.monotonic() - t0

    # 2. training ----------------------------------------------------------------------------
    t0 = time.monotonic()
    storage_uri = uris.join(base, "runs")
    cfg = dataclasses.replace(cfg, images=images_uri, masks=train_masks_uri, storage=storage_uri,
                              run_name=run_name).validate()
    summary = _train(cfg, tracking_uri)
    seconds["train"] = time.monotonic() - t0
    log.info("%s", summary.describe())
    if not summary.model_version:
        raise DemoError(f"training finished but the model was not registered (see the log above); the checkpoint "
                        f"is {summary.checkpoint}")
    model_uri = f"{REGISTRY_SCHEME}{cfg.register_as}/{summary.model_version}"

    # 3. evaluation --------------------------------------------------------------------------
    t0 = time.monotonic()
    from tqdm import tqdm

    from pconv.evaluation.inpainting import run_evaluation

    with tqdm(total=1, desc="evaluate (model + baseline, per bin)", unit="stage", dynamic_ncols=True) as bar:
        evaluation = run_evaluation(model_uri, images_uri, test_masks_uri, image_size=cfg.image_size,
                                    limit=settings.eval_limit, batch_size=8, device="cpu",
                                    tracking_uri=tracking_uri)
        bar.update(1)
    seconds["evaluate"] = time.monotonic() - t0

    # 4. inpainting grid ---------------------------------------------------------------------
    t0 = time.monotonic()
    grid = inpaint_grid(f"{REGISTRY_SCHEME}{cfg.register_as}@{registry.CANDIDATE}", images_uri, test_masks_uri,
                        cfg.image_size, settings.grid_rows, out / "inpainting_grid.png", settings.grid_scale,
                        tracking_uri)
    seconds["inpaint"] = time.monotonic() - t0

    result = DemoResult(run_name=run_name, seconds=seconds, images_uri=images_uri, test_masks_uri=test_masks_uri,
                        train_masks_uri=train_masks_uri, checkpoint=summary.checkpoint,
                        mlflow_run_id=summary.mlflow_run_id, tracking_uri=tracking_uri, model_uri=model_uri,
                        model_version=str(summary.model_version), evaluation_markdown=evaluation["markdown"],
                        evaluation={k: evaluation[k] for k in ("model", "baseline", "baseline_name", "pairs")},
                        grid_png=str(grid), random_vgg=random_vgg, s3=settings.s3)
    (out / "inpainting.md").write_text(evaluation["markdown"])
    (out / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=1, default=str))
    return result


def _train(cfg: TrainConfig, tracking_uri: str):
    """A local 2-CPU Ray cluster just for this demo (never an existing cluster), then ``pconv.train.driver.run``."""
    import ray

    from pconv.train import driver
    started = cluster.connect(forward_env=(*uris.AWS_ENV_VARS, "MLFLOW_TRACKING_URI"), local_cpus=2, quiet=True)
    progress = TrainProgress(tracking_uri, cfg.experiment, cfg.run_name, cfg.total_steps)
    progress.start()
    ok = False
    try:
        summary = driver.run(cfg)
        ok = True
        return summary
    finally:
        progress.finish(ok)
        if started:
            ray.shutdown()
