"""Resource planning on a cluster that its autoscaler grows (pconv.cluster), decided from node-type descriptions
without Ray: the GPU decision (flag, GPUs now, launchable GPU types), the fail-fast cases (no node type fits one
worker, more workers than max_workers allow, no CPU left for the data pipeline) and the "waiting for nodes" line.
The end-to-end path on a real autoscaling cluster is tests/test_autoscaling.py."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import random
from pathlib import Path

import pytest
import yaml

from pconv import cluster
from pconv.cluster import ClusterView, Infeasible, NodeType

REPO = Path(__file__).resolve().parents[1]
HEAD_ONLY = ({"CPU": 2.0, cluster.HEAD_RESOURCE: 1.0},)  # ray_cluster.yaml right after `ray up`
CPU1 = NodeType("cpu1", {"CPU": 1.0}, 3)
GPU = NodeType("gpu.p3.2xlarge", {"CPU": 8.0, "GPU": 1.0}, 8)


def production() -> ClusterView:
    """The repository's ray_cluster.yaml as the autoscaler reads it, with only its head node up."""
    types, cap = cluster.node_types_from_config(yaml.safe_load((REPO / "ray_cluster.yaml").read_text()))
    return ClusterView(HEAD_ONLY, types, cap, "ray_cluster.yaml")


def test_ray_cluster_yaml_is_read_as_its_autoscaler_reads_it():
    view = production()
    names = {t.name: t for t in view.node_types}
    assert "head.cpu" not in names  # the head is a node, not something to launch
    assert names["gpu.p3.16xlarge"].resources == {"CPU": 64.0, "GPU": 8.0} and names["gpu.p3.16xlarge"].max_workers == 8
    assert view.max_workers == 8
    # A type without its own max_workers gets the cluster's, as Ray fills it in.
    types, cap = cluster.node_types_from_config({"max_workers": 5, "head_node_type": "h", "available_node_types": {
        "h": {"resources": {"CPU": 0}}, "w": {"resources": {"CPU": 4}}}})
    assert types == (NodeType("w", {"CPU": 4.0}, 5),) and cap == 5


def test_the_flag_decides_first():
    view = ClusterView(({"CPU": 8.0, "GPU": 4.0},), ())
    assert cluster.decide_gpu(False, view) == (False, "--no-use-gpu")
    assert cluster.decide_gpu(True, production())[0] is True  # no GPU up yet: the autoscaler will launch one


def test_gpus_now_then_launchable_gpu_types_then_cpu():
    assert cluster.decide_gpu(None, ClusterView(({"CPU": 8.0, "GPU": 2.0},), ())) == (
        True, "the cluster has 2 GPU(s)")
    use, why = cluster.decide_gpu(None, production())  # zero GPU nodes up: still a GPU cluster
    assert use and "gpu.p3.2xlarge" in why and "gpu.p3dn.24xlarge" in why and "cpu.m5.8xlarge" not in why
    assert cluster.decide_gpu(None, ClusterView(HEAD_ONLY, (CPU1,), 4)) == (
        False, "no GPU in the cluster and no GPU node type to launch")
    # A GPU type with max_workers 0 (switched off) or a cluster cap of 0 launches nothing.
    assert not cluster.decide_gpu(None, ClusterView(HEAD_ONLY, (NodeType("g", {"GPU": 1.0}, 0),)))[0]
    assert not cluster.decide_gpu(None, ClusterView(HEAD_ONLY, (GPU,), 0))[0]
    use, why = cluster.decide_gpu(None, ClusterView(HEAD_ONLY, None))  # node types not visible (KubeRay sidecar)
    assert not use and "pass --use-gpu" in why


def test_nodes_not_up_yet_mean_waiting_not_failing():
    waiting = cluster.check_workers(production(), 16, {"CPU": 1.0, "GPU": 1.0}, 1.0, what="training worker")
    assert waiting.startswith("waiting for nodes: 16 training worker(s) x {CPU: 1, GPU: 1}")
    assert "gpu.p3.16xlarge {CPU: 64, GPU: 8} x at most 8" in waiting and "at most 8 worker nodes" in waiting
    # A cluster that holds everything now: nothing to wait for.
    assert cluster.check_workers(ClusterView(({"CPU": 3.0},), ()), 2, {"CPU": 0.5}, 1.0) is None
    # Unknown node types: never fails, only says what it waits for.
    assert cluster.check_workers(ClusterView(HEAD_ONLY, None), 64, {"CPU": 1.0, "GPU": 1.0}, 1.0).startswith(
        "waiting for nodes")


def test_a_request_no_node_type_can_hold_fails_naming_the_types():
    with pytest.raises(Infeasible, match="no node can ever hold one worker of {CPU: 1, GPU: 1}") as err:
        cluster.check_workers(ClusterView(HEAD_ONLY, (CPU1,), 4, "cluster.yaml"), 2, {"CPU": 1.0, "GPU": 1.0})
    assert "cpu1 {CPU: 1} x at most 3" in str(err.value)  # what the types offer
    with pytest.raises(Infeasible, match="CPU: 16"):  # more CPUs per worker than a p3.2xlarge has
        cluster.check_workers(ClusterView(HEAD_ONLY, (GPU,), 8), 1, {"CPU": 16.0, "GPU": 1.0})


def test_more_workers_than_max_workers_allow_fails():
    with pytest.raises(Infeasible, match=r"80 training worker\(s\) x {CPU: 1, GPU: 1}.* at most 64 fit") as err:
        cluster.check_workers(production(), 80, {"CPU": 1.0, "GPU": 1.0}, 1.0, what="training worker")
    assert "raise max_workers" in str(err.value)
    assert cluster.check_workers(production(), 64, {"CPU": 1.0, "GPU": 1.0}, 1.0).startswith("waiting")
    # Per-type caps: 3 one-CPU nodes hold 6 half-CPU workers, not 7 (the head has no CPU).
    view = ClusterView(({cluster.HEAD_RESOURCE: 1.0},), (CPU1,), 10)
    assert cluster.worker_capacity(view, {"CPU": 0.5}) == 6
    with pytest.raises(Infeasible, match="at most 6 fit"):
        cluster.check_workers(view, 7, {"CPU": 0.5})
    # A fixed-size cluster (a monitor without an autoscaling config): what is up is all there is.
    with pytest.raises(Infeasible, match="no autoscaler that can add nodes"):
        cluster.check_workers(ClusterView(({"CPU": 2.0},), (), source="no autoscaling config"), 3, {"CPU": 1.0})


def test_no_cpu_left_for_the_data_pipeline_fails():
    fixed = ClusterView(({"CPU": 2.0},), ())
    assert cluster.check_workers(fixed, 2, {"CPU": 0.5}, 1.0) is None  # 2 workers x 0.5 CPU + 1 for Ray Data
    with pytest.raises(Infeasible, match="need 3 CPUs but the cluster can have at most 2"):
        cluster.check_workers(fixed, 2, {"CPU": 1.0}, 1.0)  # would hang: no CPU left to decode
    # With an autoscaler, more nodes bring the data pipeline's CPUs: wait for them instead.
    view = ClusterView(({"CPU": 2.0, cluster.HEAD_RESOURCE: 1.0},), (CPU1,), 3)
    assert cluster.check_workers(view, 2, {"CPU": 1.0}, 1.0).startswith("waiting for nodes")


def test_reachable_resources_bound_the_autoscaling_pools():
    view = production()
    assert cluster.reachable(view, "GPU") == 64  # 8 worker nodes x 8 GPUs (global cap 8)
    assert cluster.reachable(view, "CPU") == 2 + 8 * 96  # the head + 8 of the biggest type
    assert cluster.reachable(ClusterView(({"CPU": 4.0},), ()), "CPU") == 4  # fixed: what is up
    assert cluster.reachable(ClusterView(HEAD_ONLY, None), "CPU") is None  # unknown
    assert cluster.reachable(ClusterView(HEAD_ONLY, (NodeType("x", None, 2),)), "CPU") is None  # undeclared
    unbounded = ClusterView(HEAD_ONLY, (NodeType("w", {"CPU": 4.0}, None),))  # GCS config: max_count -1
    assert cluster.reachable(unbounded, "CPU") == math.inf
    # what pools are planned on: the reachable amount, or (node types unknown) what is up now
    assert cluster.reachable_or_now(view, "GPU") == 64
    assert cluster.reachable_or_now(ClusterView(HEAD_ONLY, None), "CPU") == 2


def test_gcs_cluster_config_is_read():
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 1}, max_count=4),
        autoscaler_pb2.NodeGroupConfig(name="cpu", resources={"CPU": 16}, max_count=-1)])
    assert cluster.node_types_from_gcs(config) == (NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, 4),
                                                   NodeType("cpu", {"CPU": 16.0}, None))


def test_the_autoscaler_config_is_found_from_the_head_monitor_of_this_cluster():
    monitor = ["/usr/bin/python", "/x/ray/autoscaler/_private/monitor.py", "--logs-dir=/tmp/l",
               "--gcs-address=10.0.0.1:6379", "--autoscaling-config=/home/ray/ray_bootstrap_config.yaml"]
    other = ["python", "/x/ray/autoscaler/v2/monitor.py", "--gcs-address=10.0.0.1:7000", "--autoscaling-config=/o"]
    assert cluster.monitor_config([["bash"], other, monitor], "6379") == (
        True, "/home/ray/ray_bootstrap_config.yaml")
    assert cluster.monitor_config([monitor[:4]], "6379") == (True, None)  # `ray start --head`: fixed size
    assert cluster.monitor_config([other], "6379") == (False, None)  # another cluster's monitor
    assert cluster.monitor_config([], "6379") == (False, None)  # KubeRay sidecar / driver off the head


def test_decode_concurrency_follows_the_reachable_cpus_not_the_cpus_up_now():
    from pconv.data import stream
    assert stream.default_concurrency(0.5, cpus=0.0) == 1  # head only, nothing up yet: still one task
    assert stream.default_concurrency(0.5, cpus=4.0) == 4  # one task per CPU at most
    assert stream.default_concurrency(0.5, cpus=math.inf) == 1024  # unbounded types: the input-block limit


def test_the_batch_actor_pool_grows_to_what_the_cluster_can_reach():
    from pconv.inference.batch import _actor_pool

    assert _actor_pool(production(), None, None, 100) == (64, True)  # GPU actors, up to the 64 GPUs launchable
    assert _actor_pool(production(), None, None, 10) == (10, True)  # never more actors than images
    cpu_only = ClusterView(({cluster.HEAD_RESOURCE: 1.0},), (NodeType("c", {"CPU": 8.0}, 2),), 2)
    assert _actor_pool(cpu_only, None, None, 100) == (8, False)  # half the 16 CPUs it can reach
    assert _actor_pool(cpu_only, 3, None, 100) == (3, False)
    with pytest.raises(RuntimeError, match="no node can ever hold one inpainting actor of {CPU: 1, GPU: 1}"):
        _actor_pool(cpu_only, None, True, 100)


# ---------------------------------------------------------------------------------------------- the autoscaler's
# own rules (issue 25, items 7-10): Ray 2.60's ray/autoscaler/_private/resource_demand_scheduler.py and util.py
HEAD = {"CPU": 2.0, cluster.HEAD_RESOURCE: 1.0}
WORKER = {"CPU": 1.0, "GPU": 1.0}


def test_nodes_kept_up_by_min_workers_take_slots_under_the_global_cap():
    """Cap 2, one CPU node up because its type has min_workers 1, 2 GPU workers asked for: only one slot is left
    for a GPU node, so the job can never start (it used to say "waiting" forever)."""
    cpu = NodeType("cpu", {"CPU": 8.0}, 2, min_workers=1)
    gpu = NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, 2)
    view = ClusterView((HEAD, {"CPU": 8.0}), (cpu, gpu), 2)
    assert cluster.worker_capacity(view, WORKER) == 1 and cluster.reachable(view, "GPU") == 1
    assert cluster.reachable(view, "CPU") == 2 + 8 + 8  # the head, the CPU node kept up, one GPU node
    with pytest.raises(Infeasible, match=r"2 worker\(s\) x {CPU: 1, GPU: 1}.* at most 1 fit") as err:
        cluster.check_workers(view, 2, WORKER, 1.0)
    assert "cpu {CPU: 8} x at most 2, 1 always up" in str(err.value)
    assert cluster.check_workers(view, 1, WORKER, 1.0).startswith("waiting for nodes")
    # the same type without min_workers: the CPU node idles out and frees its slot, so 2 GPU nodes can come
    free = ClusterView(view.nodes, (NodeType("cpu", {"CPU": 8.0}, 2), gpu), 2)
    assert cluster.check_workers(free, 2, WORKER, 1.0).startswith("waiting for nodes")
    # read from a cluster config (min_workers) and from the GCS (min_count)
    types, cap = cluster.node_types_from_config({"max_workers": 2, "head_node_type": "h", "available_node_types": {
        "h": {"resources": {"CPU": 2}}, "cpu": {"resources": {"CPU": 8}, "min_workers": 1, "max_workers": 2}}})
    assert types == (cpu,) and cap == 2
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="cpu", resources={"CPU": 8}, min_count=1, max_count=2)])
    assert cluster.node_types_from_gcs(config) == (cpu,)


def test_workers_and_the_data_pipeline_cpus_must_fit_one_mix_of_nodes():
    """Cap 1: the one worker node is either the GPU node (holds the worker, no CPU left beside it) or the CPU node
    (16 CPUs, no GPU). Each need alone fits some mix, both never do: the job would hang without decode tasks."""
    view = ClusterView(({"CPU": 0.0, cluster.HEAD_RESOURCE: 1.0},),
                       (NodeType("gpu", WORKER, 1), NodeType("cpu", {"CPU": 16.0}, 1)), 1)
    assert cluster.worker_capacity(view, WORKER) == 1 and cluster.reachable(view, "CPU") == 16
    with pytest.raises(Infeasible, match=r"not at once: .* hold 1 worker\(s\) have 1 CPU\(s\), 0 beside them"):
        cluster.check_workers(view, 1, WORKER, 1.0)
    assert cluster.check_workers(dataclasses.replace(view, max_workers=2), 1, WORKER, 1.0).startswith("waiting")
    assert cluster.check_workers(view, 1, WORKER, 0.0).startswith("waiting")  # no data pipeline to feed


def brute_force_most_cpus(view: ClusterView, workers: int, request: dict) -> float:
    """Every mix of worker nodes under the caps, tried one by one: the most CPUs of a mix that holds the workers."""
    head = [n for n in view.nodes if cluster.HEAD_RESOURCE in n]
    types = view.launchable()
    best = -math.inf
    for counts in itertools.product(*(range(t.min_workers, t.max_workers + 1) for t in types)):
        if sum(counts) > view.max_workers:
            continue
        nodes = head + [t.resources for t, k in zip(types, counts) for _ in range(k)]
        if sum(cluster.fits(n, request) for n in nodes) >= workers:
            best = max(best, sum(n.get("CPU", 0.0) for n in nodes))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_the_one_mix_check_agrees_with_trying_every_mix(seed):
    rng = random.Random(seed)
    types = tuple(NodeType(f"t{i}", {"CPU": float(rng.choice([1, 2, 4, 8, 16])),
                                     **({"GPU": float(rng.choice([1, 2, 4]))} if rng.random() < 0.6 else {})},
                           (top := rng.randint(0, 4)), min_workers=rng.randint(0, min(top, 1)))
                  for i in range(rng.randint(1, 4)))
    view = ClusterView(({"CPU": float(rng.choice([0, 2])), cluster.HEAD_RESOURCE: 1.0},), types,
                       max(sum(t.min_workers for t in types), rng.randint(0, 6)))
    request = {"CPU": rng.choice([0.5, 1.0, 2.0]), "GPU": 1.0}
    workers = rng.randint(1, 6)
    assert cluster.most_cpus_holding(view, workers, request) == brute_force_most_cpus(view, workers, request)


def test_a_head_node_type_with_max_workers_launches_worker_nodes_of_its_type():
    """Ray launches worker nodes of the head's type when that type says max_workers > 0 (its default is 0)."""
    config = {"max_workers": 4, "head_node_type": "gpu", "available_node_types": {
        "gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 3}}}
    types, cap = cluster.node_types_from_config(config)
    assert types == (NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, 3),) and cap == 4
    view = ClusterView(({"CPU": 8.0, "GPU": 1.0, cluster.HEAD_RESOURCE: 1.0},), types, cap)
    assert cluster.check_workers(view, 4, WORKER, 1.0).startswith("waiting for nodes")  # the head + 3 launched
    with pytest.raises(Infeasible, match="at most 4 fit"):
        cluster.check_workers(view, 5, WORKER, 1.0)
    assert cluster.decide_gpu(None, ClusterView((HEAD,), types, cap))[0]  # a GPU type to launch
    # without its own max_workers the head's type launches nothing: the nodes up now are all there is
    del config["available_node_types"]["gpu"]["max_workers"]
    assert cluster.node_types_from_config(config) == ((), 4)


def test_a_config_without_a_global_max_workers_gets_its_providers_default():
    """Ray merges the provider's defaults.yaml under the config (util.fillout_defaults): AWS's says max_workers: 2,
    which then also becomes each worker type's default. Read as unbounded, 3 GPU workers would wait forever."""
    config = {"provider": {"type": "aws", "region": "us-east-1"}, "head_node_type": "h", "available_node_types": {
        "h": {"resources": {"CPU": 2}}, "gpu": {"resources": {"CPU": 8, "GPU": 1}}}}
    types, cap = cluster.node_types_from_config(config)
    assert cap == 2 and types == (NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, 2),)
    view = ClusterView((HEAD,), types, cap, "cluster.yaml")
    with pytest.raises(Infeasible, match="at most 2 fit"):
        cluster.check_workers(view, 3, WORKER, 1.0)
    # an on-premise cluster (provider local): as many worker nodes as worker_ips (local/config.py)
    local = {"provider": {"type": "local", "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.2", "10.0.0.3"]},
             "head_node_type": "h", "available_node_types": {"h": {"resources": {}}, "w": {"resources": {"CPU": 4}}}}
    assert cluster.node_types_from_config(local)[1] == 2
    # a provider whose default is not known here: the node types are taken as unknown (never fails, waits)
    other = {**config, "provider": {"type": "external", "module": "my.Provider"}}
    assert cluster.node_types_from_config(other) == (None, None)


def test_the_provider_defaults_are_those_of_the_installed_ray():
    from ray.autoscaler._private.providers import _DEFAULT_CONFIGS, _get_default_config

    for provider, value in cluster.PROVIDER_DEFAULT_MAX_WORKERS.items():
        assert _get_default_config({"type": provider}).get("max_workers") == value, provider
    for provider in _DEFAULT_CONFIGS:  # every default file that sets one is in the table
        try:
            default = _get_default_config({"type": provider}).get("max_workers")
        except (FileNotFoundError, ImportError):  # a provider whose files this wheel does not ship
            continue
        assert default is None or cluster.PROVIDER_DEFAULT_MAX_WORKERS.get(provider) == default, provider


# ---------------------------------------------------------------------------------------------- connect
def test_connect_options_start_join_and_forward_what_the_tasks_need():
    assert cluster.init_options(environ={}) == {"address": None}  # RAY_ADDRESS, `ray start`'s cluster, or a new one
    environ = {"AWS_ACCESS_KEY_ID": "key", "MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_REGION": ""}
    assert cluster.init_options(("AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_URI", "AWS_REGION"), local_cpus=2, quiet=True,
                                environ=environ) == {
        "address": "local", "num_cpus": 2,  # the demo's own Ray, never someone else's cluster
        "runtime_env": {"env_vars": {"AWS_ACCESS_KEY_ID": "key", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}},
        "include_dashboard": False, "log_to_driver": False, "configure_logging": True, "logging_level": logging.WARNING}


def test_connect_leaves_a_submitted_jobs_own_env_vars_to_the_job():
    """Under `ray job submit --runtime-env-json '{"env_vars": {...}}'` the driver already has those variables, and Ray
    refuses a ray.init runtime env that names one of them again (what batch inpainting used to pass)."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    job_env = {"env_vars": {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"}}
    environ = {**job_env["env_vars"], "AWS_REGION": "eu-west-1",
               "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": job_env, "metadata": {}})}
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")
    options = cluster.init_options(names, environ=environ)
    assert options["runtime_env"] == {"env_vars": {"AWS_REGION": "eu-west-1"}}
    assert _merge_runtime_env(job_env, options["runtime_env"]) is not None
    assert _merge_runtime_env(job_env, {"env_vars": {k: environ[k] for k in names}}) is None  # refused by Ray
