"""The newcomer demo: the whole pipeline on real photos, locally, in a few minutes (``make demo``).

Stages (each with a progress bar):

1. ingest the CelebA-HQ sample + CBSD68 photos into image shards (a held-back ``val`` split), a subset of the
   NVIDIA irregular test masks (every ``mask_stride``-th file, all bins and both border flags) into test-mask
   shards, and generated irregular masks into training-mask shards (the test masks are never trained on);
2. train the PConv U-Net through both of the paper's phases on a local Ray cluster (2 workers), logging to MLflow
   (embedded SQLite store) and registering the final model with alias ``candidate``;
3. evaluate the registered model per hole-ratio bin against the non-learned baseline (paper protocol);
4. inpaint a few held-back images with test masks and save a grid (masked input | result | ground truth).

Shards are reused when their inputs did not change (a small ``<out>/state/*.json`` fingerprint), so re-running
is fast; every run gets a new, timestamped run name. With ``s3=True`` a local S3 server (moto) is started as a
subprocess for the duration of the demo and shards + checkpoints live in ``s3://pconv-demo/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pconv import storage
from pconv.config import TrainConfig

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
DEFAULT_DATASETS = REPO_ROOT.parent / "shared" / "datasets"
IMAGE_FOLDERS = ("celeba_hq_sample", "cbsd68")
MASK_ZIP = "nvidia_irregular_mask_test.zip"
S3_BUCKET = "pconv-demo"
MODEL_ALIAS = "candidate"
RANDOM_VGG_WARNING = ("vgg_weights=random: the perceptual/style losses use a RANDOMLY initialised VGG16 because "
                      "ImageNet weights cannot be downloaded here. The demo model is NOT a useful inpainter. "
                      "Production runs use --vgg-weights imagenet or a path / s3:// URI of a VGG16 state dict.")


class DemoError(RuntimeError):
    """A demo prerequisite is missing (datasets, config) or a stage failed; the message says which."""


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
        lines = ["", "=" * 100, f"PConv demo finished: run {self.run_name!r} in {sum(self.seconds.values()):.0f} s "
                 f"({', '.join(f'{k} {v:.0f} s' for k, v in self.seconds.items())})", "=" * 100, "",
                 f"Inpainting grid (masked input | result | ground truth): {self.grid_png}", "",
                 "Evaluation on held-back images x NVIDIA test masks (per hole-ratio bin; model vs baseline):", "",
                 self.evaluation_markdown.rstrip(), "",
                 f"Registered model: models:/pconv-unet@{MODEL_ALIAS} (version {self.model_version}); "
                 f"exact: {self.model_uri}",
                 f"Checkpoint:       {self.checkpoint}",
                 f"MLflow run:       {self.mlflow_run_id}",
                 f"Browse the runs:  mlflow ui --backend-store-uri {db}"
                 + (f"  (or .venv/bin/mlflow ui ...)" if not shutil.which("mlflow") else ""),
                 f"Shards:           images {self.images_uri}, test masks {self.test_masks_uri}, "
                 f"training masks {self.train_masks_uri}"]
        if self.s3:
            lines += ["", "Note: the local S3 server was stopped at the end of the demo, so the s3:// shards and "
                      "checkpoints above are gone; the registered model (artifacts beside the MLflow db) remains."]
        if self.random_vgg:
            lines += ["", "WARNING: " + RANDOM_VGG_WARNING]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def check_datasets(datasets: str) -> Path:
    """The shared datasets folder, or DemoError saying what is missing and where it was looked for."""
    root = Path(datasets).expanduser().resolve()
    missing = [name for name in (*IMAGE_FOLDERS, MASK_ZIP) if not (root / name).exists()]
    if missing:
        raise DemoError(f"the demo needs {', '.join(missing)} under {root} (the shared datasets, expected beside "
                        "the repository as ../shared/datasets); pass --datasets DIR to point elsewhere")
    return root


def stage_images(datasets: Path, dst: Path, per_folder: int | None) -> list[str]:
    """Symlink the demo photos into ``dst/<folder>/`` (one ingestion source); returns the staged keys."""
    if dst.exists():
        shutil.rmtree(dst)
    keys = []
    for folder in IMAGE_FOLDERS:
        files = sorted(p for p in (datasets / folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            raise DemoError(f"no JPEG/PNG photos in {datasets / folder}")
        (dst / folder).mkdir(parents=True)
        for p in files[:per_folder]:
            (dst / folder / p.name).symlink_to(p.resolve())
            keys.append(f"{folder}/{p.name}")
    return keys


def stage_test_masks(zip_path: Path, dst: Path, stride: int) -> list[str]:
    """Extract every ``stride``-th NVIDIA test mask (sorted names) into ``dst``; returns the member names.

    The archive is ordered by (bin, border) block of 1,000 files, so a stride that divides 1,000 samples every
    block evenly: all six hole-ratio bins with and without border holes.
    """
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(".png"))[::stride]
        for name in names:
            (dst / Path(name).name).write_bytes(zf.read(name))
    if not names:
        raise DemoError(f"{zip_path} holds no PNG masks")
    return names


def _fingerprint(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _reusable(state_file: Path, dst: str, fingerprint: str) -> bool:
    """True when ``dst`` holds the manifest that an earlier run with the same inputs wrote."""
    if not state_file.is_file():
        return False
    try:
        state = json.loads(state_file.read_text())
        manifest = json.loads(storage.read_bytes(storage.join(dst, "manifest.json")))
    except (FileNotFoundError, ValueError, OSError):
        return False
    except Exception as exc:  # noqa: BLE001 - e.g. a bucket that is gone: ingest again
        log.info("shards at %s not reusable: %s", dst, exc)
        return False
    return state.get("fingerprint") == fingerprint and state.get("run_id") == manifest.get("run_id") \
        and sum(manifest.get("counts", {}).values()) > 0


def _ingest_once(name: str, dst: str, state_dir: Path, fingerprint_data: Any, ingest: Callable[[], Any]) -> bool:
    """Run ``ingest`` unless ``dst`` already holds the shards of the same inputs; returns True if reused."""
    state_file = state_dir / f"{name}.json"
    fp = _fingerprint(fingerprint_data)
    if _reusable(state_file, dst, fp):
        log.info("%s: reusing shards at %s (same inputs as the last run)", name, dst)
        return True
    summary = ingest()
    log.info("%s", summary.line())
    if summary.skipped:
        log.warning("%s: %d file(s) skipped: %s", name, len(summary.skipped), summary.skipped[:3])
    manifest = json.loads(storage.read_bytes(summary.manifest_uri))
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"fingerprint": fp, "run_id": manifest.get("run_id"), "dst": dst}))
    return False


# ---------------------------------------------------------------------------------------------
# Local S3 server (DEMO_S3=1)
# ---------------------------------------------------------------------------------------------
class LocalS3:
    """A moto S3 server subprocess on 127.0.0.1 with the demo bucket; sets the standard AWS_* env while it runs."""

    ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._saved: dict[str, str | None] = {}

    def __enter__(self) -> "LocalS3":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        logf.close()
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise DemoError(f"the local S3 server (moto) exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise DemoError(f"the local S3 server did not answer on {endpoint} within 60 s") from None
                time.sleep(0.3)
        values = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo",
                  "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
        for k in self.ENV:
            self._saved[k] = os.environ.get(k)
            os.environ[k] = values[k]
        storage.s3_client().create_bucket(Bucket=S3_BUCKET)
        log.info("local S3 server at %s, bucket s3://%s (log %s)", endpoint, S3_BUCKET, self.log_path)
        self.endpoint = endpoint
        return self

    def __exit__(self, *exc: Any) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# ---------------------------------------------------------------------------------------------
# Training progress (the trainer runs in Ray workers: follow its MLflow metrics)
# ---------------------------------------------------------------------------------------------
class _TrainProgress(threading.Thread):
    """Polls MLflow for the run's latest logged step and moves a tqdm bar; never raises."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, total: int, interval: float = 3.0):
        super().__init__(daemon=True, name="demo-train-progress")
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.total, self.interval = total, interval
        self._halt = threading.Event()

    def run(self) -> None:
        from tqdm import tqdm

        from pconv.tracking import client_for

        bar = tqdm(total=self.total, desc="train (both phases)", unit="step", dynamic_ncols=True)
        run_id = None
        try:
            client = client_for(self.tracking_uri)
            while not self._halt.wait(self.interval):
                try:
                    if run_id is None:
                        exp = client.get_experiment_by_name(self.experiment)
                        if exp is None:
                            continue
                        runs = client.search_runs([exp.experiment_id],
                                                  filter_string=f"attributes.run_name = '{self.run_name}'")
                        if not runs:
                            continue
                        run_id = runs[0].info.run_id
                    hist = client.get_metric_history(run_id, "lr")
                    if hist:
                        step = max(m.step for m in hist)
                        if step > bar.n:
                            phase = client.get_run(run_id).data.metrics.get("phase")
                            bar.set_postfix(phase=int(phase) if phase is not None else "?", refresh=False)
                            bar.update(step - bar.n)
                except Exception as exc:  # noqa: BLE001 - a progress bar must never break training
                    log.debug("progress poll failed: %s", exc)
            bar.update(max(0, self.total - bar.n) if self._finished else 0)
        finally:
            bar.close()

    _finished = False

    def finish(self, ok: bool) -> None:
        self._finished = ok
        self._halt.set()
        self.join(timeout=10)


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------
def make_grid(masked: np.ndarray, result: np.ndarray, truth: np.ndarray, scale: int = 3, border: int = 4):
    """PIL image: one row per example, columns masked input (holes white) | result | ground truth, with labels.

    Inputs are float N×H×W×3 in [0, 1]; cells are upscaled ``scale`` times (nearest, to show the real pixels).
    """
    from PIL import Image, ImageDraw

    n, h, w, _ = masked.shape
    ch, cw = h * scale, w * scale
    header = 16
    grid = Image.new("RGB", (3 * cw + 4 * border, header + n * ch + (n + 1) * border), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(("masked input", "PConv result", "ground truth")):
        draw.text((border + c * (cw + border) + 2, 2), title, fill="black")
    for r in range(n):
        for c, col in enumerate((masked, result, truth)):
            cell = Image.fromarray((np.clip(col[r], 0, 1) * 255 + 0.5).astype(np.uint8))
            cell = cell.resize((cw, ch), Image.Resampling.NEAREST)
            grid.paste(cell, (border + c * (cw + border), header + border + r * (ch + border)))
    return grid


def inpaint_grid(model_uri: str, images_uri: str, masks_uri: str, image_size: int, rows: int, out_png: Path,
                 scale: int, tracking_uri: str) -> Path:
    """Inpaint the first ``rows`` held-back images with test masks from different hole-ratio bins; save the grid."""
    import torch
    from tqdm import tqdm

    from pconv import evaluation
    from pconv.inference import inpaint, load_model

    model, _ = load_model(model_uri, device="cpu", tracking_uri=tracking_uri)
    _, images = evaluation.load_images(images_uri, image_size, limit=rows)
    records = sorted(evaluation.load_masks(masks_uri), key=lambda r: r.key)
    by_bin: dict[int, list] = {}
    for rec in records:
        if rec.bin >= 0:
            by_bin.setdefault(rec.bin, []).append(rec)
    if not by_bin:
        raise DemoError(f"no test mask under {masks_uri} falls into the paper's hole-ratio bins")
    bins = sorted(by_bin)
    es = evaluation.EvalSet(image_size, [], [], [])
    masked, results, truths = [], [], []
    for i, img in enumerate(tqdm(images, desc="inpaint held-back images", unit="image", dynamic_ncols=True)):
        b = bins[min(len(bins) - 1, 1 + 2 * i) % len(bins)]   # bins 1, 3, 5, ...: moderate to large holes
        rec = by_bin[b][i % len(by_bin[b])]
        m = torch.from_numpy(es.mask(rec).astype(np.float32))[None]           # 1×H×W, 1 = valid
        x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)  # 3×H×W
        comp = inpaint(model, x, m, device="cpu")
        truths.append(x.permute(1, 2, 0).numpy())
        results.append(comp.permute(1, 2, 0).numpy())
        masked.append(torch.where(m >= 0.5, x, torch.ones_like(x)).permute(1, 2, 0).numpy())
    grid = make_grid(np.stack(masked), np.stack(results), np.stack(truths), scale=scale)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_png)
    return out_png


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------
def _run_name() -> str:
    return "demo-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def load_config(settings: DemoSettings) -> TrainConfig:
    from pconv.config import merge

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
    from pconv.tracking import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri()
    random_vgg = cfg.vgg_weights == "random"
    if random_vgg:
        log.warning("*" * 100)
        log.warning(RANDOM_VGG_WARNING)
        log.warning("*" * 100)

    s3 = LocalS3(out / "logs" / "s3.log") if settings.s3 else None
    if s3 is not None:
        s3.__enter__()
    try:
        return _stages(settings, cfg, out, datasets, run_name, tracking_uri, random_vgg)
    finally:
        if s3 is not None:
            s3.__exit__()


def _stages(settings: DemoSettings, cfg: TrainConfig, out: Path, datasets: Path, run_name: str,
            tracking_uri: str, random_vgg: bool) -> DemoResult:
    from pconv import ingest

    seconds: dict[str, float] = {}
    base = f"s3://{S3_BUCKET}" if settings.s3 else str(out)
    images_uri = storage.join(base, "shards", "images")
    test_masks_uri = storage.join(base, "shards", "test_masks")
    train_masks_uri = storage.join(base, "shards", "train_masks")
    state_dir = out / "state"

    # 1. ingestion ---------------------------------------------------------------------------
    t0 = time.monotonic()
    staged_images = out / "staging" / "images"
    keys = stage_images(datasets, staged_images, settings.images_per_folder)
    _ingest_once("images", images_uri, state_dir,
                 {"keys": keys, "max_side": settings.max_side, "val_fraction": settings.val_fraction},
                 lambda: ingest.ingest_images(str(staged_images), images_uri, val_fraction=settings.val_fraction,
                                              shard_size_mb=64, max_side=settings.max_side, progress=True))
    staged_masks = out / "staging" / "test_masks"
    test_fp = {"zip": str(datasets / MASK_ZIP), "size": (datasets / MASK_ZIP).stat().st_size,
               "stride": settings.mask_stride}
    if not _reusable(state_dir / "test_masks.json", test_masks_uri, _fingerprint(test_fp)):
        stage_test_masks(datasets / MASK_ZIP, staged_masks, settings.mask_stride)
    _ingest_once("test_masks", test_masks_uri, state_dir, test_fp,
                 lambda: ingest.ingest_masks(str(staged_masks), test_masks_uri, hole_color="white",
                                             shard_size_mb=64, progress=True))
    _ingest_once("train_masks", train_masks_uri, state_dir, {"n": settings.train_masks, "size": 256, "seed": 0},
                 lambda: ingest.generate_masks(settings.train_masks, train_masks_uri, size=256, seed=0,
                                               shard_size_mb=64, progress=True))
    seconds["ingest"] = time.monotonic() - t0

    # 2. training ----------------------------------------------------------------------------
    t0 = time.monotonic()
    storage_uri = storage.join(base, "runs")
    cfg = dataclasses.replace(cfg, images=images_uri, masks=train_masks_uri, storage=storage_uri,
                              run_name=run_name).validate()
    summary = _train(cfg, tracking_uri)
    seconds["train"] = time.monotonic() - t0
    log.info("%s", summary.describe())
    if not summary.model_version:
        raise DemoError(f"training finished but the model was not registered (see the log above); the checkpoint "
                        f"is {summary.checkpoint}")
    model_uri = f"models:/{cfg.register_as}/{summary.model_version}"

    # 3. evaluation --------------------------------------------------------------------------
    t0 = time.monotonic()
    from tqdm import tqdm

    from pconv.evaluation import run_evaluation

    with tqdm(total=1, desc="evaluate (model + baseline, per bin)", unit="stage", dynamic_ncols=True) as bar:
        evaluation = run_evaluation(model_uri, images_uri, test_masks_uri, image_size=cfg.image_size,
                                    limit=settings.eval_limit, batch_size=8, device="cpu",
                                    experiment="pconv-evaluation", tracking_uri=tracking_uri)
        bar.update(1)
    seconds["evaluate"] = time.monotonic() - t0

    # 4. inpainting grid ---------------------------------------------------------------------
    t0 = time.monotonic()
    grid = inpaint_grid(f"models:/{cfg.register_as}@{MODEL_ALIAS}", images_uri, test_masks_uri, cfg.image_size,
                        settings.grid_rows, out / "inpainting_grid.png", settings.grid_scale, tracking_uri)
    seconds["inpaint"] = time.monotonic() - t0

    result = DemoResult(run_name=run_name, seconds=seconds, images_uri=images_uri, test_masks_uri=test_masks_uri,
                        train_masks_uri=train_masks_uri, checkpoint=summary.checkpoint,
                        mlflow_run_id=summary.mlflow_run_id, tracking_uri=tracking_uri, model_uri=model_uri,
                        model_version=str(summary.model_version), evaluation_markdown=evaluation["markdown"],
                        evaluation={k: evaluation[k] for k in ("model", "baseline", "baseline_name", "pairs")},
                        grid_png=str(grid), random_vgg=random_vgg, s3=settings.s3)
    (out / "evaluation.md").write_text(evaluation["markdown"])
    (out / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=1, default=str))
    return result


def _train(cfg: TrainConfig, tracking_uri: str):
    """A local 2-CPU Ray cluster just for this demo (never an existing cluster), then ``pconv.train.run``."""
    import ray

    from pconv import train

    started = False
    if not ray.is_initialized():
        env = {k: os.environ[k] for k in (*LocalS3.ENV, "MLFLOW_TRACKING_URI") if os.environ.get(k)}
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level=logging.WARNING, runtime_env={"env_vars": env})
        started = True
    progress = _TrainProgress(tracking_uri, cfg.experiment, cfg.run_name, cfg.total_steps)
    progress.start()
    ok = False
    try:
        summary = train.run(cfg)
        ok = True
        return summary
    finally:
        progress.finish(ok)
        if started:
            ray.shutdown()


__all__ = ["DemoError", "DemoResult", "DemoSettings", "LocalS3", "check_datasets", "inpaint_grid", "load_config",
           "make_grid", "run_demo", "stage_images", "stage_test_masks"]
