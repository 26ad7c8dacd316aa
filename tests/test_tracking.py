"""pconv.tracking.runs against a REAL mlflow server (artifacts proxied to the moto S3 server) and a dead port."""

from __future__ import annotations

import io
import logging
import time

import boto3
import numpy as np
import pytest
from PIL import Image

from conftest import free_port
from mlflow_server import mlflow_server  # noqa: F401 - module-scoped fixture
from pconv.tracking import checkpoints
from pconv.tracking import runs as tracking
from pconv.tracking import store
from pconv.core.config import TrainConfig

pytestmark = pytest.mark.integration

FAST = store.RetryPolicy(attempts=3, initial_s=0.05, max_s=0.1, max_total_s=2.0, cooldown_s=30.0)


# ---------------------------------------------------------------------------------------------
# URIs and grids (no server)
# ---------------------------------------------------------------------------------------------
def test_resolve_tracking_uri_defaults_to_absolute_sqlite(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = store.resolve_tracking_uri()
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert store.default_artifact_location(uri) == (tmp_path.resolve() / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///sub/x.db")
    assert store.resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'sub' / 'x.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert store.resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert store.default_artifact_location("http://127.0.0.1:5000") is None


def test_sample_grid_layout():
    n, h, w = 3, 8, 10
    rng = np.random.default_rng(0)
    gt = rng.random((n, 3, h, w)).astype(np.float32)
    mask = np.ones((n, 1, h, w), np.float32)
    mask[:, :, 2:5, 3:7] = 0
    out = np.zeros_like(gt)
    comp = gt * mask + out * (1 - mask)
    grid = tracking.grid_image([gt * mask, mask, out, comp, gt], border=2)
    assert grid.shape == (n * h + (n + 1) * 2, 5 * w + 6 * 2, 3) and grid.dtype == np.uint8
    # row 1, column 4 (ground truth) holds gt[1]; column 1 (mask) is white where valid, black in the hole
    y, x_gt, x_mask = 2 + (h + 2), 2 + 4 * (w + 2), 2 + (w + 2)
    np.testing.assert_array_equal(grid[y:y + h, x_gt:x_gt + w], (gt[1].transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8))
    assert grid[y + 3, x_mask + 4].tolist() == [0, 0, 0] and grid[y, x_mask].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match="disagree"):
        tracking.grid_image([gt, mask[:, :, :4], out, comp, gt])


def test_grid_image_orientation_tensors_and_a_single_tile():
    import torch

    a, b = torch.zeros(2, 3, 4, 6), torch.ones(2, 3, 4, 6)
    by_sample = tracking.grid_image([a, b.numpy()], border=1)  # rows = samples, columns = inputs
    assert by_sample.shape == (2 * 4 + 3, 2 * 6 + 3, 3)
    assert by_sample[1, 1].tolist() == [0, 0, 0] and by_sample[1, 1 + 6 + 1].tolist() == [255, 255, 255]
    by_input = tracking.grid_image([a, b], nrow_is_batch=False, border=1)  # rows = inputs
    assert by_input.shape == (2 * 4 + 3, 2 * 6 + 3, 3)
    assert by_input[1, 1 + 6 + 1].tolist() == [0, 0, 0] and by_input[1 + 4 + 1, 1].tolist() == [255, 255, 255]
    single = tracking.grid_image([torch.zeros(1, 3, 4, 4)], border=2)
    assert single.shape == (8, 8, 3) and single[0, 0].tolist() == [255, 255, 255] and single[2, 2].tolist() == [0, 0, 0]


def sample_grid_steps(client, run_id: str) -> dict[int, str]:
    """step -> artifact path of the PNG logged under the sample-grid key (mlflow.log_image(key=, step=) layout)."""
    prefix = f"{tracking.SAMPLES_KEY}+step+"
    found = {}
    for a in client.list_artifacts(run_id, "images"):
        name = a.path.rsplit("/", 1)[-1]
        if name.startswith(prefix) and name.endswith(".png"):
            found[int(name[len(prefix):].split("+", 1)[0])] = a.path
    return found


def test_embedded_sqlite_puts_artifacts_next_to_the_db(monkeypatch, tmp_path):
    """The Ray trap: with sqlite, artifacts must not land relative to the (temporary) working dir."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = store.resolve_tracking_uri()
    elsewhere = tmp_path / "ray-session-copy"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a worker in another working dir, given the driver's resolved URI
    run_id = store.start_or_resume_run("exp", "local-run", tracking_uri=uri, policy=FAST)
    assert run_id
    tracking.Tracker(run_id, uri, FAST).log_text("hello", "notes/hello.txt")
    hits = list((tmp_path / "mlartifacts").rglob("hello.txt"))
    assert len(hits) == 1 and hits[0].read_text() == "hello"
    assert not list(elsewhere.rglob("hello.txt"))


# ---------------------------------------------------------------------------------------------
# Real server
# ---------------------------------------------------------------------------------------------
def test_start_or_resume_run_never_creates_a_second_run(mlflow_server):
    from mlflow import MlflowClient

    first = store.start_or_resume_run("resume-exp", "run-a", tags={"purpose": "test"}, policy=FAST)
    assert first
    assert store.start_or_resume_run("resume-exp", "run-a", policy=FAST) == first
    assert store.start_or_resume_run("resume-exp", "run-a", run_id=first, policy=FAST) == first
    # a stale run id (e.g. a checkpoint from another server) falls back to the name, not to a new run
    assert store.start_or_resume_run("resume-exp", "run-a", run_id="0" * 32, policy=FAST) == first
    other = store.start_or_resume_run("resume-exp", "run-b", policy=FAST)
    assert other and other != first

    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("resume-exp")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run-a", "run-b"]
    assert client.get_run(first).data.tags["purpose"] == "test"

    # a finished run that is resumed (worker restart / re-run) is RUNNING again
    tracking.Tracker(first, policy=FAST).set_terminated("FINISHED")
    assert client.get_run(first).info.status == "FINISHED"
    assert store.start_or_resume_run("resume-exp", "run-a", run_id=first, policy=FAST) == first
    assert client.get_run(first).info.status == "RUNNING"


def test_tracker_logs_params_metrics_and_sample_grids(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    run_id = store.start_or_resume_run("track-exp", "short-run", policy=FAST)
    tracker = tracking.Tracker(run_id, policy=FAST)
    cfg = TrainConfig(images="s3://b/img", masks="s3://b/masks", image_size=64, phase1_steps=3, phase2_steps=1)
    tracker.log_params(tracking.run_params(cfg, {"cluster": {"workers": 2, "gpu": "none"}},
                                           versions=checkpoints.versions()))
    for step in range(3):
        tracker.log_metrics({"loss/total": 1.0 / (step + 1), "lr": 2e-4, "phase": 1}, step=step)
    n, h, w = 2, 16, 16
    rng = np.random.default_rng(1)
    gt = rng.random((n, 3, h, w)).astype(np.float32)
    mask = np.ones((n, 1, h, w), np.float32)
    mask[:, :, 4:12, 4:12] = 0
    tracker.log_sample_grid([gt * mask, mask, gt * 0.5, gt, gt], step=2)
    tracker.log_params({"image_size": 128, "new_key": "x"})  # a resumed run with a changed value
    tracker.close()  # the metrics were queued: close sends them and records what was lost (nothing)
    assert tracker.failures == 0 and tracker.metrics_sent == 3 * 3 and tracker.metrics_lost == 0

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(run_id)
    params = run.data.params
    assert params["image_size"] == "64" and params["layer_size"] == "5" and params["new_key"] == "x"
    assert params["versions.torch"] and params["versions.mlflow"] and params["git_commit"]
    assert params["cluster.workers"] == "2" and params["cluster.gpu"] == "none"
    assert run.data.tags["param_changed.image_size"] == "128"
    assert [run.data.tags[t] for t in (tracking.METRICS_LOST_TAG, tracking.METRICS_LATE_TAG,
                                       tracking.ARTIFACTS_LOST_TAG)] == ["0", "0", "0"]
    history = client.get_metric_history(run_id, "loss/total")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 1.0), (1, 0.5), (2, round(1 / 3, 6))]

    files = sample_grid_steps(client, run_id)
    assert list(files) == [2]
    local = client.download_artifacts(run_id, files[2], str(tmp_path))
    grid = np.asarray(Image.open(local))
    assert grid.shape == (n * h + (n + 1) * 2, 5 * w + 6 * 2, 3)
    # the artifact really went through the proxy into the S3 bucket
    s3 = boto3.client("s3", endpoint_url=mlflow_server.s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=mlflow_server.bucket, Prefix="mlflow/")["Contents"]]
    assert any(k.endswith(f"{run_id}/artifacts/{files[2]}") for k in keys), keys
    png = s3.get_object(Bucket=mlflow_server.bucket, Key=next(k for k in keys if k.endswith(files[2])))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png["Body"].read()))), grid)


def test_unreachable_server_never_raises(caplog, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    caplog.set_level(logging.WARNING, logger="pconv.tracking.runs")
    assert store.start_or_resume_run("exp", "run", tracking_uri=dead, policy=FAST) is None
    assert "WITHOUT tracking" in caplog.text

    tracker = tracking.Tracker("0" * 32, dead, FAST)
    tracker.log_params({"a": 1})
    assert tracker.failures == 1 and "log_params failed" in caplog.text
    # during the cooldown, calls are dropped without touching the network (and still never raise)
    tracker.log_params({"a": 1})
    tracker.log_sample_grid([np.zeros((1, 3, 4, 4)), np.ones((1, 1, 4, 4)), np.zeros((1, 3, 4, 4)),
                             np.zeros((1, 3, 4, 4)), np.zeros((1, 3, 4, 4))], step=1)
    assert tracker.failures == 1 and tracker.dropped == 2 and tracker.artifacts_lost == 1  # the grid: an image
    assert "dropped" in caplog.text

    off = tracking.Tracker.disabled()
    assert not off and off.log_metrics({"x": 1}, step=0) is None and off.failures == 0 and off.flush(0)


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_metrics_never_wait_on_a_down_server_and_what_is_not_sent_is_counted(caplog, monkeypatch):
    """Metrics go to the sender thread's queue: logging returns at once while the server is down, flush() does not
    stall either, other calls are dropped at once during the known outage, and close() counts every point that did
    not arrive (the tag itself cannot be written here, which an error says)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    caplog.set_level(logging.WARNING, logger="pconv.tracking.runs")
    tracker = tracking.Tracker("0" * 32, f"http://127.0.0.1:{free_port()}", FAST)
    started = time.monotonic()
    for step in range(50):
        tracker.log_metrics({"loss/total": 1.0 / (step + 1), "lr": 2e-4, "bad": "text"}, step=step)
    assert time.monotonic() - started < 0.5  # 50 steps' metrics: none waited on the dead server
    wait_until(lambda: tracker.server_down)
    assert "MLflow is unreachable" in caplog.text and tracker.queued_metrics == 100
    started = time.monotonic()
    assert tracker.flush(timeout_s=30) is False  # known down: at once, the points stay queued
    tracker.log_image(np.zeros((4, 4, 3), np.uint8), "samples", step=1)  # no retries during the known outage
    tracker.log_params({"a": 1})
    assert time.monotonic() - started < 0.5 and tracker.failures == 0 and tracker.dropped == 2
    tracker.close(timeout_s=0.3)
    assert (tracker.metrics_lost, tracker.metrics_sent, tracker.artifacts_lost) == (100, 0, 1)
    assert tracker.queued_metrics == 0
    assert "100 metric point(s) and 1 artifact(s) never reached it" in caplog.text
    assert "its loss tags could not be written" in caplog.text


def test_a_full_metric_queue_drops_the_oldest_points_and_counts_them(caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    caplog.set_level(logging.WARNING, logger="pconv.tracking.runs")
    tracker = tracking.Tracker("0" * 32, f"http://127.0.0.1:{free_port()}", FAST, max_queued_points=10)
    tracker.log_metrics({"a": 0.0, "b": 0.0}, step=0)
    wait_until(lambda: tracker.server_down)  # the sender holds these 2 points and retries them
    for step in range(1, 13):
        tracker.log_metrics({"a": step, "b": step}, step=step)
    assert tracker.metrics_lost == 2 * 12 - 10 and tracker.queued_metrics == 2 + 10
    assert "metric queue full (10 points): dropped the" in caplog.text
    tracker.close(timeout_s=0.2)
    assert tracker.metrics_lost == 2 * 13 and tracker.metrics_sent == 0


def test_metric_names_are_the_contract():
    """ARCHITECTURE.md "Contracts": loss/<term>, val/<term>, lr, phase, throughput, data wait / skipped, nan steps."""
    from pconv.core.losses import LOSS_TERMS

    assert [tracking.loss_metric(t) for t in LOSS_TERMS][-1] == "loss/total"
    assert tracking.val_metric("hole") == "val/hole" and (tracking.VAL_PSNR, tracking.VAL_SSIM) == ("val/psnr", "val/ssim")
    assert (tracking.LR, tracking.PHASE, tracking.THROUGHPUT, tracking.DATA_WAIT, tracking.DATA_SKIPPED,
            tracking.NAN_STEPS) == ("lr", "phase", "throughput/images_per_s", "data/wait_fraction", "data/skipped",
                                    "train/nan_steps")
