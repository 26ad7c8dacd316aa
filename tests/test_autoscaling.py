"""The production path on a real autoscaling cluster that starts with ZERO worker nodes (issue 14).

Ray's fake multi-node provider (``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config ...``, provider
``fake_multinode``) runs the real autoscaler, which launches real raylets on this machine as "nodes". The head has
no CPU, so nothing of a job's work can run before the autoscaler has launched worker nodes (1-CPU type, min 0,
max 3), and idle nodes are terminated after a short idle timeout. Token authentication is on, as in production.

One module-scoped cluster serves all jobs, submitted with the CLI as a user does (`ray job submit`): training with
``--use-gpu`` fails at submit naming the node types (none has a GPU) and launches nothing; training (2 CPU workers,
``use_gpu`` auto, both phases, checkpoints to S3, MLflow server, registration) and then batch inpainting with the
model it registered each succeed, worker nodes were launched for them, they are released after the idle timeout,
and the job's log says what it waited for (~1.5 min on 2 cores, fixtures included). Then a spot-style node loss
(issue 26): an elastic `--workers 1-2` run loses every process of a worker's node, goes on with one worker, grows
back to two when a node returns, and its lineage shows exact coverage (~3-5 min: its epochs are two steps each,
so Ray Data's per-epoch start dominates).
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
from ray_jobs import (BIN, JobsApi, alive_actors, cluster_env, kill_pids, list_nodes, ray_processes_of,
                      registered_checkpoint, submit_job, token_auth, wait_for_job)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

IDLE_TIMEOUT_MIN = 0.2   # 12 s: long enough not to drop a node between a job's tasks, short for the test
WORKER_TYPE = "cpu1"
ELASTIC_TYPE = "cpu2"


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
            # The elastic test's nodes: one 1.5-CPU worker each, and 0.5 CPU beside it for the data pipeline, so
            # one node lost leaves room for exactly one worker until the autoscaler relaunches it.
            ELASTIC_TYPE: {"resources": {"CPU": 2, "object_store_memory": 400 * 2**20}, "node_config": {},
                           "min_workers": 0, "max_workers": 2},
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
        # Quick failover after a lost node, as docs/operations.md "Elastic groups" sets it for spot clusters: Ray
        # declares a node dead after 3 missed 1-s health checks (default 5 x 3 s), the autoscaler replaces a node
        # silent for 10 s (default 30 s), and a worker group that cannot start within 20 s (e.g. sized on a
        # node that just died) is given up for the size the cluster has now (default 60 s). The nodes and the
        # jobs inherit the head's environment.
        head_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                    "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
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
        client = JobsApi(address, env)
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


def training_worker_nodes(cluster) -> dict[str, str]:
    """{node id: actor id} of the nodes running a Ray Train worker actor now (Ray's state API)."""
    return {a["node_id"]: a["actor_id"]
            for a in alive_actors(cluster["address"], cluster["env"], "RayTrainWorker")}


def node_processes(node_id: str) -> list[int]:
    """PIDs of every process of a fake node: the provider starts each node with its id in the environment
    (``RAY_OVERRIDE_NODE_ID_FOR_TESTING``), which its raylet, agents and workers inherit."""
    mark = f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode()
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if mark in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def checkpoint_of_two(client, run_id: str, run_uri: str) -> int | None:
    """The step of the checkpoint Ray Train has registered for the run if two workers took it, else None."""
    registered = registered_checkpoint(run_uri)
    if registered is None:
        return None
    step = int(registered["metrics"]["step"])
    return step if {s: w for s, w, _ in world_sizes(client, run_id)}.get(step) == 2 else None


def world_sizes(client, run_id: str) -> list[tuple[int, int, int]]:
    """(step, world size, timestamp ms) of every step the run logged ``train/world_size`` for, by time."""
    return sorted(((m.step, int(m.value), m.timestamp) for m in client.get_metric_history(run_id, "train/world_size")),
                  key=lambda t: t[2])


def test_a_lost_node_shrinks_an_elastic_run_which_grows_back(autoscaling_cluster, prepared_shards, mlflow_server,
                                                             s3_bucket):
    """Spot-style node loss (issue 26): a `--workers 1-2` run of 1.5-CPU workers (one per 2-CPU node) loses every
    process of a training worker's node mid-run. It goes on with one worker without waiting for a replacement
    (the rows of the epoch no rank had consumed are re-dealt to it) and ends with one MLflow run, a registered
    version and lineage showing every completed epoch used each train row at most once, the rows it left unused
    being exactly the count the run logged (``data/epoch_unused``), an epoch that changed size included."""
    from mlflow import MlflowClient

    from pconv.tracking import lineage

    cluster, client = autoscaling_cluster, MlflowClient(mlflow_server.url)
    train = ["python", "pipelines/train.py", "--images", prepared_shards["images"], "--masks", prepared_shards["masks"],
             "--storage", f"{s3_bucket}/runs", "--run-name", "elastic", "--workers", "1-2", "--cpus-per-worker", "1.5",
             "--elastic-resize-s", "2", "--image-size", "64", "--batch-size", "4", "--phase1-steps", "16",
             "--phase2-steps", "8", "--checkpoint-every", "4", "--num-to-keep", "2", "--val-every", "1000",
             "--sample-every", "1000", "--log-every", "10", "--val-size", "2", "--vgg-weights", "random",
             "--experiment", "elastic", "--lineage", "--max-failures", "5", "--seed", "3"]
    submit_job(cluster["address"], cluster["env"], "train-elastic", train, in_place=True)
    started = time.monotonic()

    def the_run():
        runs = client.search_runs([client.get_experiment_by_name("elastic").experiment_id]) \
            if client.get_experiment_by_name("elastic") else []
        return runs[0] if runs else None

    # 1. Two workers train. Kill a worker's node once Ray Train has REGISTERED a checkpoint the two took: a restart
    #    resumes from that one (before it, from step 0, and nothing would be re-dealt). Every such checkpoint leaves
    #    rows of its epoch unconsumed (the 11 train rows deal 6 + 5; two steps of 2 per rank end an epoch), which
    #    the one worker left is dealt and trains on: that epoch changes size.
    deadline = time.monotonic() + 180
    run_uri = f"{s3_bucket}/runs/elastic"
    while not ((run := the_run()) and checkpoint_of_two(client, run.info.run_id, run_uri)):
        status = cluster["client"].get_job_status("train-elastic")
        assert not status.endswith(("FAILED", "SUCCEEDED", "STOPPED")) and time.monotonic() < deadline, (
            status, _runs_of(world_sizes(client, run.info.run_id)) if run else None,
            cluster["client"].get_job_logs("train-elastic")[-4000:])
        time.sleep(0.2)
    run_id = run.info.run_id
    victim = sorted(training_worker_nodes(cluster))[0]
    processes = node_processes(victim)  # its raylet, agents and workers: the whole node vanishes, as on a reclaim
    assert processes, f"no process of node {victim}"
    killed_at_ms = int(time.time() * 1000)
    kill_pids(processes)

    # 2. The job goes on with one worker: no replacement can come, as the fake provider still counts the killed
    #    node among the type's max_workers: 2 (a real provider reports it terminated and the autoscaler relaunches
    #    it). Then a node returns: a 2-CPU raylet joins the cluster, and the group grows back to two.
    deadline = time.monotonic() + 180
    while not [w for _, w, t in world_sizes(client, run_id) if w == 1 and t > killed_at_ms]:
        status = cluster["client"].get_job_status("train-elastic")
        assert not status.endswith(("FAILED", "SUCCEEDED", "STOPPED")) and time.monotonic() < deadline, (
            status, _runs_of(world_sizes(client, run_id)), cluster["client"].get_job_logs("train-elastic")[-4000:])
        time.sleep(1)
    returned_at_ms = int(time.time() * 1000)
    joined = subprocess.run([str(BIN / "ray"), "start", "--address", cluster["gcs"], "--num-cpus", "2",
                             "--object-store-memory", str(400 * 2**20), "--node-ip-address", "127.0.0.1",
                             "--disable-usage-stats"], capture_output=True, text=True, env=cluster["env"],
                            timeout=120)
    assert joined.returncode == 0, joined.stdout + joined.stderr
    deadline = time.monotonic() + 400
    while not (status := cluster["client"].get_job_status("train-elastic")).endswith(("FAILED", "SUCCEEDED",
                                                                                      "STOPPED")):
        assert time.monotonic() < deadline, (_runs_of(world_sizes(client, run_id)),
                                              cluster["client"].get_job_logs("train-elastic")[-4000:])
        time.sleep(1)
    logs = cluster["client"].get_job_logs("train-elastic")
    if os.environ.get("PCONV_AUTOSCALING_LOGS"):  # a folder to keep the jobs' logs in (debugging)
        Path(os.environ["PCONV_AUTOSCALING_LOGS"], "train-elastic.log").write_text(logs)
    assert status.endswith("SUCCEEDED"), logs[-4000:]
    assert "finished at step 24" in logs and "registered model version" in logs, logs[-3000:]
    total_s = time.monotonic() - started

    timeline = world_sizes(client, run_id)
    after_kill = [(step, w, t) for step, w, t in timeline if t > killed_at_ms]
    one = [t for _, w, t in after_kill if w == 1]
    assert one, f"no step ran with one worker after the kill: {timeline[-20:]}"
    # Steps with one worker before any node came back: the group did not wait for a replacement.
    assert min(one) < returned_at_ms
    final = {step: w for step, w, _ in timeline}  # the last attempt's world size for every step
    assert sorted(final) == list(range(1, 25)) and set(final.values()) == {1, 2}
    regrown = [step for step, w, t in after_kill if w == 2 and t > min(one)]
    assert regrown and final[24] == 2, f"the run did not grow back to two workers: {_runs_of(timeline)}"
    grown_at_ms = min(t for step, w, t in after_kill if w == 2 and t > returned_at_ms)

    # One MLflow run, one registered version from it.
    assert len(client.search_runs([client.get_experiment_by_name("elastic").experiment_id])) == 1
    versions = [v for v in client.search_model_versions("name='pconv-unet'") if v.run_id == run_id]
    assert len(versions) == 1, versions

    # Lineage: no train row twice in an epoch, and every completed epoch's unused rows are the logged count.
    rows = lineage.read(run_id, tracking_uri=mlflow_server.url).to_pylist()
    assert sorted({r["step"] for r in rows}) == list(range(1, 25))
    train_ids = _train_ids(prepared_shards["images"])
    by_epoch: dict[int, list[int]] = {}
    first_step: dict[int, int] = {}
    for r in rows:
        by_epoch.setdefault(r["epoch"], []).append(r["id"])
        first_step[r["epoch"]] = min(first_step.get(r["epoch"], r["step"]), r["step"])
    unused = {m.step: int(m.value) for m in sorted(client.get_metric_history(run_id, "data/epoch_unused"),
                                                   key=lambda m: m.timestamp)}
    completed = sorted(by_epoch)[:-1]
    assert completed, by_epoch.keys()
    changed = {e for e in completed if len({r["world_size"] for r in rows if r["epoch"] == e}) > 1}
    assert changed, "no completed epoch saw the world size change"
    for e in completed:
        ids = by_epoch[e]
        assert len(ids) == len(set(ids)), f"epoch {e}: a row trained twice"
        assert set(ids) <= train_ids
        assert len(train_ids) - len(ids) == unused[first_step[e + 1]], (e, len(ids), unused)
    print(f"elastic job {total_s:.0f} s; world sizes (size, first step, last step): {_runs_of(timeline)}; kill at "
          f"{killed_at_ms}, first one-worker step {min(one) - killed_at_ms} ms later, a node returned "
          f"{returned_at_ms - killed_at_ms} ms after the kill, first two-worker step {grown_at_ms - returned_at_ms} "
          f"ms after that; epochs {len(by_epoch)}, completed "
          f"{len(completed)}, epochs that changed size {sorted(changed)}")


def _train_ids(images_uri: str) -> set[int]:
    """The ids of the train split's rows (:func:`pconv.storage.shards.key_id` of their keys)."""
    from pconv.data import stream
    from pconv.storage import shards

    return {shards.key_id(k) for u in stream.read_units(images_uri, "train")
            for k in shards.read_row_group(u["uri"], u["row_group"], ["key"]).column("key").to_pylist()}


def _runs_of(timeline: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(world size, first step, last step) of each stretch of the timeline (in logging order) at one size."""
    out: list[list[int]] = []
    for step, w, _ in timeline:
        if out and out[-1][0] == w:
            out[-1][2] = step
        else:
            out.append([w, step, step])
    return [tuple(r) for r in out]
