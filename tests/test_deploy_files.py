"""The KubeRay manifests as a cluster would judge them, without a cluster: the RayService's Serve config IS
infra/serve/serve_config.yaml, every pod fits the instance type it is pinned to (after the kubelet's reservation and
the daemonsets), every Serve replica fits its pod, and the README's edit steps reach every manifest."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "infra" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
PLACEHOLDER_ACCOUNT = "123456789012"


@dataclass(frozen=True)
class Instance:
    vcpus: int
    memory_gib: float
    gpus: int
    max_pods: int  # the VPC CNI's limit (ENIs x IPs), which sizes the kubelet's memory reservation


# EC2 instance sizes (aws ec2 describe-instance-types) and the VPC CNI's max pods (amazon-eks-ami eni-max-pods.txt)
# of the node types the manifests name.
INSTANCES = {
    "g5.xlarge": Instance(4, 16, 1, 58),
    "g5.2xlarge": Instance(8, 32, 1, 58),
    "p3.2xlarge": Instance(8, 61, 1, 58),
    "p3.8xlarge": Instance(32, 244, 4, 234),
    "p3.16xlarge": Instance(64, 488, 8, 234),
}
# What every node runs besides Ray, as requests (an assumption, stated): aws-node 25m, kube-proxy 100m, the NVIDIA
# device plugin and a log/metrics agent ~100m together; ~0.5 GiB of memory for them.
DAEMONSET_CPU, DAEMONSET_MEMORY_GIB = 0.25, 0.5


def allocatable(instance: Instance) -> tuple[float, float]:
    """(CPUs, GiB) a pod can request on an EKS node: the EKS AMI's kube-reserved (CPU: 6 % of the first core, 1 % of
    the second, 0.5 % of the next two, 0.25 % of the rest; memory: 255 MiB + 11 MiB per pod) and the 100 MiB hard
    eviction threshold, less the daemonsets."""
    cores = instance.vcpus
    reserved_cpu = 0.06 + 0.01 * (cores >= 2) + 0.005 * min(max(cores - 2, 0), 2) + 0.0025 * max(cores - 4, 0)
    reserved_gib = (255 + 11 * instance.max_pods + 100) / 1024
    return cores - reserved_cpu - DAEMONSET_CPU, instance.memory_gib - reserved_gib - DAEMONSET_MEMORY_GIB


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number: CPUs ("3", "500m") or GiB ("12Gi", "512Mi")."""
    text = str(value)
    units = {"m": 1e-3, "Gi": 1.0, "Mi": 1 / 1024, "Ti": 1024.0}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def cluster_specs() -> list[tuple[str, dict]]:
    """(manifest name, RayCluster spec) of every RayJob / RayService."""
    out = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "RayJob":
                out.append((path.name, doc["spec"]["rayClusterSpec"]))
            elif doc and doc.get("kind") == "RayService":
                out.append((path.name, doc["spec"]["rayClusterConfig"]))
    return out


def pinned_pods() -> list[tuple[str, str, str, dict]]:
    """(manifest, group, instance type, container resources) of every worker group pinned to an instance type."""
    out = []
    for name, spec in cluster_specs():
        for group in spec.get("workerGroupSpecs", []):
            pod = group["template"]["spec"]
            instance = pod.get("nodeSelector", {}).get("node.kubernetes.io/instance-type")
            (container,) = pod["containers"]
            out.append((name, group["groupName"], instance, container["resources"]))
    return out


def test_both_manifests_are_checked():
    assert {name for name, _ in cluster_specs()} == {"rayjob.yaml", "rayservice.yaml"}
    assert pinned_pods() and all(instance for _, _, instance, _ in pinned_pods()), "every worker group names its node type"


@pytest.mark.parametrize("manifest, group, instance, resources", pinned_pods(),
                         ids=[f"{m}:{g}" for m, g, *_ in pinned_pods()])
def test_each_pinned_pod_fits_the_allocatable_share_of_its_instance(manifest, group, instance, resources):
    assert instance in INSTANCES, f"{manifest} {group}: add {instance} to INSTANCES (its vCPUs, memory, GPUs)"
    spec = INSTANCES[instance]
    cpus, gib = allocatable(spec)
    requests = resources["requests"]
    assert resources["limits"] == requests, f"{manifest} {group}: limits = requests (Ray sizes itself by the limits)"
    assert quantity(requests["cpu"]) <= cpus, \
        f"{manifest} {group}: asks {requests['cpu']} CPUs, {instance} can give a pod {cpus:.2f}: it stays Pending"
    assert quantity(requests["memory"]) <= gib, \
        f"{manifest} {group}: asks {requests['memory']}, {instance} can give a pod {gib:.1f} GiB"
    assert int(requests.get("nvidia.com/gpu", 0)) <= spec.gpus, f"{manifest} {group}: more GPUs than {instance} has"


def test_the_allocatable_model_refuses_a_whole_instance():
    """The old GPU pod (cpu "4" on a 4-vCPU g5.xlarge) is what this check exists for."""
    cpus, gib = allocatable(INSTANCES["g5.xlarge"])
    assert 3.0 <= cpus < 4.0 and 12.0 <= gib < 16.0
    with pytest.raises(AssertionError, match="stays Pending"):
        test_each_pinned_pod_fits_the_allocatable_share_of_its_instance(
            "rayservice.yaml", "gpu", "g5.xlarge", {"requests": {"cpu": "4", "memory": "12Gi"},
                                                   "limits": {"cpu": "4", "memory": "12Gi"}})


def serve_config() -> dict:
    return yaml.safe_load((REPO / "infra" / "serve" / "serve_config.yaml").read_text())


def test_the_rayservice_embeds_serve_config_yaml_verbatim():
    spec = importlib.util.spec_from_file_location("sync_serve_config", K8S / "sync_serve_config.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    assert sync.main(["--check"]) == 0, "python infra/k8s/sync_serve_config.py"
    (service,) = [doc for doc in yaml.safe_load_all((K8S / "rayservice.yaml").read_text()) if doc]
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == serve_config()
    # the check notices a difference
    stale = sync.rendered((K8S / "rayservice.yaml").read_text(), "applications: []\n")
    assert yaml.safe_load(yaml.safe_load(stale)["spec"]["serveConfigV2"]) == {"applications": []}


def test_each_serve_replica_fits_a_gpu_pod_and_asks_for_its_gpu_explicitly():
    (app,) = serve_config()["applications"]
    args = app["args"]
    assert "num_gpus" in args, "num_gpus is explicit (left out, the app guesses from the cluster it sees)"
    (service_spec,) = [spec for name, spec in cluster_specs() if name == "rayservice.yaml"]
    (group,) = service_spec["workerGroupSpecs"]
    requests = group["template"]["spec"]["containers"][0]["resources"]["requests"]
    pod_cpus, pod_gpus = quantity(requests["cpu"]), int(requests.get("nvidia.com/gpu", 0))
    per_pod = min(pod_cpus // float(args["num_cpus"]), pod_gpus // float(args["num_gpus"]))
    assert per_pod >= 1, f"a replica ({args['num_cpus']} CPU, {args['num_gpus']} GPU) does not fit a pod {requests}"
    assert group["maxReplicas"] * per_pod >= args["max_replicas"], "max_replicas cannot all be placed"
    assert app["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == str(int(args["num_cpus"]))


def test_the_readme_edit_steps_reach_every_manifest_with_the_placeholder_account():
    readme = (K8S / "README.md").read_text()
    edited = {Path(f).name for line in re.findall(rf"^sed -i \"s/{PLACEHOLDER_ACCOUNT}/.*$", readme, re.M)
              for f in re.findall(r"infra/k8s/[\w.-]+\.yaml", line)}
    needing = {p.name for p in MANIFESTS if PLACEHOLDER_ACCOUNT in p.read_text()}
    assert needing and needing <= edited, f"README's sed misses {sorted(needing - edited)}"
