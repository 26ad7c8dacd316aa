"""The production path on a real autoscaling cluster that starts with ZERO worker nodes (issue 14).

Ray's fake multi-node provider (``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config ...``, provider
``fake_multinode``) runs the real autoscaler, which launches real raylets on this machine as "nodes". The head has
no CPU, so nothing of a job's work can run before the autoscaler has launched worker nodes (1-CPU type, min 0,
max 3), and idle nodes are terminated after a short idle timeout. Token authentication is on, as in production.

One module-scoped cluster serves all jobs, submitted with the CLI as a user does (`ray job submit`): training with
``--use-gpu`` fails at submit naming the node types (none has a GPU) and launches nothing; training (2 CPU workers,
``use_gpu`` auto, both phases, checkpoints to S3, MLflow server, registration) and then batch inpainting with the
model it registered each succeed, worker nodes were launched for them, they are released after the idle timeout,
and the job's log says what it waited for. ~1.5 min on 2 cores, fixtures included.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

from conftest import free_port
from mlflow_server import mlflow_server  # noqa: F401  (module-scoped fixture)
from ray_jobs import (BIN, JobsCli, cluster_env, kill_pids, list_nodes, ray_processes_of, submit_job, token_auth,
                      wait_for_job)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

IDLE_TIMEOUT_MIN = 0.2   # 12 s: long enough not to drop a node between a job's tasks, short for the test
WORKER_TYPE = "cpu1"


def autoscaling_config(gcs_address: str) -> dict:
    """A cluster launcher config for the fake provider: head without CPUs, 1-CPU workers from zero."""
    return {
        "cluster_name": "pconv-autoscaling-test", "max_workers": 3, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {}, "docker": {}, "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": 1, "object_store_memory": 400 * 2**20}, "node_config": {},
                          "min_workers": 0, "max_workers": 3},
        },
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                           "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


@pytest.fixture(scope="module")
def autoscaling_cluster(own_ray_cluster, s3_server, mlflow_server, tmp_path_factory):  # noqa: F811
    """The fake autoscaling cluster (`ray start --head --block` in its own process group); stopped by killing
    that group and then every process that names this cluster's GCS address or temp dir (the fake nodes)."""
    tmp = tmp_path_factory.mktemp("autoscaling")
    gcs = f"127.0.0.1:{free_port()}"
    dash = free_port()
    config = tmp / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(autoscaling_config(gcs)))
    temp_dir = tempfile.mkdtemp(prefix="pconv-as-", dir="/tmp")  # short: Ray's socket paths have a length limit
    auth = token_auth()
    with pytest.MonkeyPatch.context() as mp:  # restores os.environ afterwards, also when the head fails to start
        for k, v in auth.items():
            mp.setenv(k, v)
        env = cluster_env(s3_server.env, mlflow_server.url)
        head_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        log = open(tmp / "ray-head.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "0", "--node-ip-address", "127.0.0.1",
             "--port", gcs.rsplit(":", 1)[1], "--autoscaling-config", str(config),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
             "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
             "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
             "--ray-client-server-port", str(free_port()), "--temp-dir", temp_dir, "--disable-usage-stats"],
            env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        address = f"http://127.0.0.1:{dash}"
        client = JobsCli(address, env)
        try:
            deadline = time.monotonic() + 120
            while not (client.ready() and list_nodes(address, env)):  # the job API and the head are up
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray head did not come up: {(tmp / 'ray-head.log').read_text()[-3000:]}")
                time.sleep(1)
            yield {"address": address, "client": client, "env": env, "gcs": gcs}
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            kill_pids(ray_processes_of(gcs, temp_dir))  # fake nodes the autoscaler started, if any are left
            log.close()
            shutil.rmtree(temp_dir, ignore_errors=True)


def workers(nodes: list[dict]) -> dict[str, str]:
    """{node id: state} of the non-head nodes."""
    return {n["node_id"]: n["state"] for n in nodes if not n.get("is_head_node")}


def ray_status(cluster) -> str:
    """`ray status -v` (nodes, their activity, pending demands) and the alive actors, for failure messages."""
    out = subprocess.run([str(BIN / "ray"), "status", "-v", "--address", cluster["gcs"]], capture_output=True,
                         text=True, env=cluster["env"], timeout=120)
    actors = subprocess.run([str(BIN / "ray"), "list", "actors", "--address", cluster["address"], "--filter",
                             "state=ALIVE", "--detail", "--format", "yaml"], capture_output=True, text=True,
                            env=cluster["env"], timeout=120)
    return out.stdout + out.stderr + "\nalive actors:\n" + actors.stdout[-6000:] + actors.stderr[-2000:]


def run_and_watch(cluster, submission_id: str, entrypoint: list[str], released: bool = True) -> tuple[str, set[str]]:
    """Submit a job on a cluster with no worker node alive; return (its log, the worker nodes launched for it)
    once it succeeded and, with ``released``, the autoscaler released them again (idle timeout)."""
    env, address, client = cluster["env"], cluster["address"], cluster["client"]
    before = workers(list_nodes(address, env))
    assert "ALIVE" not in before.values(), f"worker nodes alive before the job: {before}"
    # In place, not uploaded: the fake nodes share this machine's session directory, and every node that joins
    # unpacks an uploaded working dir again over the one the running driver stands in (its cwd vanishes). Real
    # nodes have disks of their own; the upload path is tests/test_train_e2e.py's.
    submit_job(address, env, submission_id, entrypoint, in_place=True)
    status = wait_for_job(client, submission_id, timeout=300)
    logs = client.get_job_logs(submission_id)
    if os.environ.get("PCONV_AUTOSCALING_LOGS"):  # a folder to keep the jobs' logs in (debugging)
        Path(os.environ["PCONV_AUTOSCALING_LOGS"], f"{submission_id}.log").write_text(logs)
    assert status.endswith("SUCCEEDED"), logs[-4000:]
    launched = set(workers(list_nodes(address, env))) - set(before)
    assert launched, f"no worker node was launched for {submission_id}:\n{logs[-3000:]}"
    if not released:
        return logs, launched
    deadline = time.monotonic() + IDLE_TIMEOUT_MIN * 60 + 60
    while (alive := [n for n, s in workers(list_nodes(address, env)).items() if s == "ALIVE"]):
        assert time.monotonic() < deadline, (f"worker nodes {alive} not released after the idle timeout:\n"
                                             + ray_status(cluster))
        time.sleep(3)
    return logs, launched


def test_train_then_batch_inpaint_on_a_cluster_that_starts_with_zero_workers(
        autoscaling_cluster, prepared_shards, photo_dir, s3_bucket, tmp_path):
    bucket, cluster = s3_bucket, autoscaling_cluster
    train = ["python", "pipelines/train.py", "--images", prepared_shards["images"], "--masks", prepared_shards["masks"],
             "--storage", f"{bucket}/runs", "--run-name", "autoscaling", "--workers", "2",
             "--image-size", "64", "--batch-size", "4", "--phase1-steps", "2", "--phase2-steps", "2",
             "--checkpoint-every", "2", "--val-every", "4", "--sample-every", "4", "--log-every", "1",
             "--val-size", "2", "--vgg-weights", "random", "--experiment", "autoscaling"]

    # A request no node type can ever hold fails at submit, naming the types; nothing is launched for it.
    submit_job(cluster["address"], cluster["env"], "train-gpu", [*train, "--use-gpu"], in_place=True)
    assert wait_for_job(cluster["client"], "train-gpu", timeout=120).endswith("FAILED")
    logs = cluster["client"].get_job_logs("train-gpu")
    assert "no node can ever hold one training worker of {CPU: 1, GPU: 1}" in logs, logs[-3000:]
    assert f"{WORKER_TYPE} {{CPU: 1}} x at most 3" in logs
    assert not workers(list_nodes(cluster["address"], cluster["env"]))

    started = time.monotonic()
    logs, launched = run_and_watch(cluster, "train-as", train)  # GPU: auto (none up, none to launch)
    train_s = time.monotonic() - started
    # The plan: CPU training because no GPU exists or can be launched, and the job said what it waited for.
    assert "training on CPUs (no GPU in the cluster and no GPU node type to launch)" in logs
    assert "waiting for nodes: 2 training worker(s) x {CPU: 0.5} and 1 CPU(s) beside them" in logs
    assert f"{WORKER_TYPE} {{CPU: 1}} x at most 3" in logs
    assert "finished at step 4" in logs and "registered model version" in logs, logs[-3000:]

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for p in sorted((photo_dir / "scenes").glob("*.png"))[:6]:
        (images / p.name).write_bytes(p.read_bytes())
        mask = Image.new("L", Image.open(p).size, 0)
        ImageDraw.Draw(mask).rectangle((40, 40, 140, 120), fill=255)  # white = hole
        mask.save(masks / p.name)
    started = time.monotonic()
    blogs, blaunched = run_and_watch(cluster, "batch-as", [
        "python", "pipelines/batch_inpaint.py", "--model", "models:/pconv-unet@candidate", "--images", str(images),
        "--masks", str(masks), "--hole-color", "white", "--out", f"{bucket}/filled", "--num-actors", "2"],
        released=False)  # the release after the idle timeout is shown once, by the training job's nodes
    batch_s = time.monotonic() - started
    assert "6 of 6 written" in blogs and "up to 2 CPU actors" in blogs, blogs[-3000:]
    assert "waiting for nodes: 1 inpainting actor(s) x {CPU: 1}" in blogs
    assert blaunched.isdisjoint(launched)  # the training's nodes were gone: new ones were launched for this job

    import boto3

    listed = boto3.client("s3").list_objects_v2(Bucket=bucket.removeprefix("s3://"), Prefix="filled/")
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", [])) == sorted(
        p.name for p in images.iterdir())
    print(f"train job + release {train_s:.0f} s ({len(launched)} nodes), "
          f"batch job {batch_s:.0f} s ({len(blaunched)} nodes)")
