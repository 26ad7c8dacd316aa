"""End to end, as a user runs it: a real local Ray cluster (`ray start --head`), the S3 server, a real MLflow
server, shards made with `prepare_data.py`, and `ray job submit --working-dir . -- python pipelines/train.py`
with 2 CPU workers through both phases.

The first job has one training worker killed (SIGKILL) after its first checkpoint: Ray Train restarts the group and
the run must finish at the expected step having resumed from a checkpoint, not from step 0. A second submission of
the same command finds the run finished and does nothing.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path


import pytest
import torch

from conftest import free_port
from mlflow_server import mlflow_server  # noqa: F401  (module-scoped fixture)
from ray_jobs import (BIN, JobsApi, alive_actors, cluster_env, registered_checkpoint, submit_job, token_auth,
                      wait_for_job)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
TOTAL_STEPS = 30


@pytest.fixture(scope="module")
def ray_cluster(own_ray_cluster, s3_server, mlflow_server, tmp_path_factory):  # noqa: F811
    """`ray start --head --block` in its own process group; stopped by killing that group (only ours)."""
    tmp = tmp_path_factory.mktemp("ray")
    dash = free_port()
    auth = token_auth()
    with pytest.MonkeyPatch.context() as mp:  # restores os.environ afterwards, also when the head fails to start
        for k, v in auth.items():
            mp.setenv(k, v)
        env = cluster_env(s3_server.env, mlflow_server.url)
        log = open(tmp / "ray-head.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
             "--num-cpus", "3",
             # free ports for every agent (defaults may be taken by another Ray on this machine) and a short temp
             # dir (Ray's unix socket paths must stay under the OS limit).
             "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
             "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
             "--ray-client-server-port", str(free_port()),
             "--temp-dir", tempfile.mkdtemp(prefix="pconv-ray-", dir="/tmp"), "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        address = f"http://127.0.0.1:{dash}"
        client = JobsApi(address, env)
        deadline = time.monotonic() + 120
        while not client.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not come up: {(tmp / 'ray-head.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"address": address, "client": client, "env": env}
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def s3_shards(ray_cluster, s3_server, photo_dir, mask_zip):
    """Shards made ON the cluster from photos and a mask zip in S3: `ray job submit -- python
    pipelines/prepare_data.py` (the Ray Data ingest, issue 17), so the training job trains on what it wrote."""
    import boto3

    from pconv.storage import uris
    bucket = "e2e-train"
    boto3.client("s3").create_bucket(Bucket=bucket)
    uris.upload_dir(str(photo_dir), f"s3://{bucket}/raw/photos")
    uris.write_bytes_atomic(f"s3://{bucket}/raw/masks.zip", mask_zip.read_bytes())
    jobs = {"images": [f"s3://{bucket}/raw/photos", f"s3://{bucket}/images", "--val-fraction", "0.25",
                       "--shard-size-mb", "1"],
            "masks": [f"s3://{bucket}/raw/masks.zip", f"s3://{bucket}/masks", "--hole-color", "white"]}
    for name, args in jobs.items():  # both at once, as two users may: one cluster runs them side by side
        submit_job(ray_cluster["address"], ray_cluster["env"], f"ingest-{name}",
                   ["python", "pipelines/prepare_data.py", "-q", name, *args])
    for name in jobs:
        status = wait_for_job(ray_cluster["client"], f"ingest-{name}", timeout=300)
        assert status == "SUCCEEDED", ray_cluster["client"].get_job_logs(f"ingest-{name}")[-4000:]
    return bucket


def submit(cluster, bucket: str, submission_id: str) -> None:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["address"], "--working-dir", str(REPO),
           "--submission-id", submission_id, "--no-wait", "--",
           "python", "pipelines/train.py", "--images", f"s3://{bucket}/images", "--masks", f"s3://{bucket}/masks",
           "--storage", f"s3://{bucket}/runs", "--run-name", "e2e", "--workers", "2", "--no-use-gpu",
           "--image-size", "32", "--batch-size", "4", "--phase1-steps", str(TOTAL_STEPS // 2),
           "--phase2-steps", str(TOTAL_STEPS // 2), "--checkpoint-every", "5", "--val-every", "15",
           "--sample-every", "15", "--log-every", "5", "--vgg-weights", "random", "--max-failures", "2",
           "--experiment", "e2e"]
    deadline = time.monotonic() + 120
    while True:  # right after start-up the job agent may not be registered yet: Ray says so, and we try again
        proc = subprocess.run(cmd, capture_output=True, text=True, env=cluster["env"], timeout=300)
        if proc.returncode == 0 or "No available agent" not in proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def checkpoint_metas(bucket: str) -> dict[int, str]:
    import boto3

    s3 = boto3.client("s3")
    out = {}
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix="runs/e2e/").get("Contents", []):
        if obj["Key"].endswith("/meta.json"):
            meta = json.loads(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
            out[meta["step"]] = obj["Key"].rsplit("/", 1)[0]
    return out


def kill_one_training_worker(cluster) -> dict:
    """SIGKILL one ALIVE Ray Train worker actor of this cluster, as Ray's state API names it; returns that actor.

    The state API names exactly the live worker actors of this cluster; a process title in /proc could also match a
    fork of one or a worker of another Ray still exiting."""
    workers = alive_actors(cluster["address"], cluster["env"], "RayTrainWorker")
    assert workers, "no ALIVE RayTrainWorker actor in this cluster"
    victim = workers[0]
    os.kill(int(victim["pid"]), signal.SIGKILL)
    return victim


def test_job_submit_survives_a_killed_worker_and_rerun_is_a_noop(ray_cluster, s3_shards, mlflow_server):  # noqa: F811
    client, bucket = ray_cluster["client"], s3_shards
    submit(ray_cluster, bucket, "train-1")
    deadline = time.monotonic() + 400
    # Wait until Ray Train has REGISTERED a checkpoint, not merely until one is in storage: on a fast machine two
    # can be uploaded before either is registered, and a group restarted then rightly starts from step 0.
    while registered_checkpoint(f"s3://{bucket}/runs/e2e") is None:
        status = str(client.get_job_status("train-1"))
        assert not status.endswith(("SUCCEEDED", "FAILED", "STOPPED")), client.get_job_logs("train-1")[-4000:]
        assert time.monotonic() < deadline, client.get_job_logs("train-1")[-4000:]
        time.sleep(0.2)
    killed = kill_one_training_worker(ray_cluster)
    status = wait_for_job(client, "train-1")
    logs = client.get_job_logs("train-1")
    Path(os.environ.get("PCONV_E2E_LOG", "/dev/null")).write_text(f"killed {killed}\n{logs}")
    assert status.endswith("SUCCEEDED"), logs[-4000:]

    # Resumed from a checkpoint after the kill, not from step 0, and finished at the expected step.
    resumed = [int(line.split("resumed from checkpoint at step ")[1].split()[0])
               for line in logs.splitlines() if "resumed from checkpoint at step" in line]
    assert resumed and min(resumed) >= 5, f"killed {killed}\n{logs[-4000:]}"
    metas = checkpoint_metas(bucket)
    assert max(metas) == TOTAL_STEPS
    assert f"finished at step {TOTAL_STEPS}" in logs
    # The ranks' Ray Data streams draw no progress bars into the job log (they did: 30,000 lines for 60 steps).
    assert "row/s" not in logs and len(logs.splitlines()) < 2000, len(logs.splitlines())

    # Phase 2 froze encoder BN: running stats identical between two phase-2 checkpoints in object storage.
    import boto3

    from pconv.core.unet import build_model

    s3 = boto3.client("s3")
    phase2 = sorted(s for s in metas if s > TOTAL_STEPS // 2)[-2:]
    states = [torch.load(io.BytesIO(s3.get_object(Bucket=bucket, Key=f"{metas[s]}/state.pt")["Body"].read()),
                         weights_only=True)["model"] for s in phase2]
    model = build_model(5 - 1)  # 32 px -> layer size 4
    enc_names = {n for n, m in model.named_modules() if any(m is e for e in model.encoder_batch_norms())}
    enc_keys = [k for k in states[0] if k.rsplit(".", 1)[0] in enc_names and "running" in k]
    assert enc_keys and all(torch.equal(states[0][k], states[1][k]) for k in enc_keys)

    # Metrics reached the MLflow server, in one run, and the model was registered as candidate.
    from mlflow.tracking import MlflowClient

    mc = MlflowClient(mlflow_server.url)
    exp = mc.get_experiment_by_name("e2e")
    runs = mc.search_runs([exp.experiment_id])
    assert len(runs) == 1
    steps = [m.step for m in mc.get_metric_history(runs[0].info.run_id, "loss/total")]
    assert max(steps) == TOTAL_STEPS
    assert mc.get_model_version_by_alias("pconv-unet", "candidate").run_id == runs[0].info.run_id

    # Submitting the same command again: the run is finished, nothing to do.
    submit(ray_cluster, bucket, "train-2")
    assert wait_for_job(client, "train-2").endswith("SUCCEEDED")
    assert "already-finished" in client.get_job_logs("train-2")
    assert max(checkpoint_metas(bucket)) == TOTAL_STEPS
