"""Resource planning on a cluster that its autoscaler grows (pconv.cluster), decided from node-type descriptions
without Ray: the GPU decision (flag, GPUs now, launchable GPU types), the fail-fast cases (no node type fits one
worker, more workers than max_workers allow, no CPU left for the data pipeline) and the "waiting for nodes" line.
The end-to-end path on a real autoscaling cluster is tests/test_autoscaling.py."""

from __future__ import annotations

import math
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
    assert cluster.most(view, "GPU") == 64 and cluster.most(ClusterView(HEAD_ONLY, None), "CPU") == 2


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
