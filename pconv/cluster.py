"""The Ray cluster as its autoscaler can make it: what training, batch inpainting and serving plan resources on.

A production cluster starts with the head only (every worker node type at ``min_workers: 0``) and the autoscaler
launches nodes for pending requests, so ``ray.cluster_resources()`` at submit time says little about it. Plans
are made from a :class:`ClusterView`: the nodes alive now AND the node types the autoscaler can launch, with their
``max_workers``. The node types come from, in order:

1. the cluster config a platform reports to the GCS (``ray._private.state.state.get_cluster_config()``, what
   Ray Train's own resource check reads; open-source Ray's autoscalers do not report it);
2. the config file the cluster's autoscaler runs with: the ``--autoscaling-config`` of the head's ``monitor.py``
   (``~/ray_bootstrap_config.yaml`` under ``ray up``, the file of ``ray start --head --autoscaling-config``),
   found in this machine's process table: ``ray job submit`` runs the job's driver on the head. A monitor without
   that flag means a fixed-size cluster: the nodes alive now are all there is (a local ``ray.init()`` too);
3. neither (KubeRay runs its autoscaler in a sidecar container; a driver off the head): node types unknown. The
   plan then never fails for lack of nodes; it says what it waits for.

Decisions (pure functions of a view, unit-tested without Ray): :func:`decide_gpu` (the flag; GPUs in the cluster
now; GPU node types to launch), :func:`check_workers` (fail fast only when no node can ever hold a worker, when
more workers are asked for than ``max_workers`` allow, or when no CPU would be left for the data pipeline; else
the line saying what the job waits for while nodes launch), :func:`reachable` (the most of a resource the cluster
can hold: the bound of Ray Data's autoscaling task and actor pools).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

log = logging.getLogger(__name__)

HEAD_RESOURCE = "node:__internal_head__"  # the resource Ray gives the head node only
MONITOR_SCRIPTS = ("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")  # v1 and v2 autoscaler


class Infeasible(ValueError):
    """The cluster can never satisfy the request, whatever the autoscaler launches."""


@dataclass(frozen=True)
class NodeType:
    """A worker node type the autoscaler can launch; ``resources`` None: not declared (the provider fills them
    in at launch), ``max_workers`` None: only the cluster-wide cap applies."""

    name: str
    resources: Mapping[str, float] | None
    max_workers: int | None = None

    def describe(self) -> str:
        res = fmt(self.resources) if self.resources is not None else "(resources not declared)"
        return f"{self.name} {res}" + ("" if self.max_workers is None else f" x at most {self.max_workers}")


@dataclass(frozen=True)
class ClusterView:
    """``nodes``: total resources of every alive node; ``node_types``: what the autoscaler can launch (``()``: a
    fixed-size cluster, None: unknown); ``max_workers``: the cluster-wide cap on worker nodes (None: none)."""

    nodes: tuple[Mapping[str, float], ...] = ()
    node_types: tuple[NodeType, ...] | None = None
    max_workers: int | None = None
    source: str = "unknown"

    def now(self, key: str) -> float:
        return sum(float(n.get(key, 0)) for n in self.nodes)

    def launchable(self) -> list[NodeType]:
        if not self.node_types or self.max_workers == 0:
            return []
        return [t for t in self.node_types if t.max_workers is None or t.max_workers > 0]

    def describe(self) -> str:
        now = f"the cluster has {fmt({'CPU': self.now('CPU'), 'GPU': self.now('GPU')})} in {len(self.nodes)} node(s)"
        if self.node_types is None:
            return now + "; the node types its autoscaler can launch are not visible from here"
        if not self.launchable():
            return now + f" and no autoscaler that can add nodes ({self.source})"
        cap = "" if self.max_workers is None else f", at most {self.max_workers} worker nodes in all"
        return (now + f"; node types the autoscaler can launch ({self.source}): "
                + "; ".join(t.describe() for t in self.launchable()) + cap)


def fmt(resources: Mapping[str, float] | None) -> str:
    """``{CPU: 0.5, GPU: 1}`` (the resources a request or a node is about; labels like ``node:*`` left out)."""
    keys = [k for k in ("CPU", "GPU") if k in (resources or {})]
    keys += sorted(k for k in (resources or {}) if k not in keys and not k.startswith(("node:", "accelerator_type"))
                   and k not in ("memory", "object_store_memory"))
    return "{" + ", ".join(f"{k}: {float(resources[k]):g}" for k in keys) + "}"


def fits(resources: Mapping[str, float], request: Mapping[str, float]) -> float:
    """How many copies of ``request`` one node with ``resources`` holds (inf for an empty request)."""
    counts = [math.floor(float(resources.get(k, 0)) / v + 1e-9) for k, v in request.items() if v > 0]
    return float(min(counts)) if counts else math.inf


def _full_scale(view: ClusterView, value: Callable[[Mapping[str, float]], float]) -> float | None:
    """The most of ``value(node resources)`` the cluster can hold: the head plus the best worker nodes under the
    per-type and cluster-wide ``max_workers`` (greedy: every node counts 1 against the same cap), or what is
    alive now if that is more (nodes added by hand). None when unknown (node types not visible or undeclared)."""
    now = sum(value(n) for n in view.nodes)
    if view.node_types is None:
        return None
    types = view.launchable()
    if any(t.resources is None for t in types):
        return None
    total = sum(value(n) for n in view.nodes if HEAD_RESOURCE in n)
    left = math.inf if view.max_workers is None else float(view.max_workers)
    for per_node, count in sorted(((value(t.resources), math.inf if t.max_workers is None else float(t.max_workers))
                                   for t in types), key=lambda vc: vc[0], reverse=True):
        take = min(count, left)
        if per_node > 0 and take > 0:
            total += per_node * take
            left -= take
    return max(total, now)


def reachable(view: ClusterView, key: str) -> float | None:
    """The most of resource ``key`` the cluster can have (now, or at full scale); None when unknown."""
    return _full_scale(view, lambda r: float(r.get(key, 0)))


def most(view: ClusterView, key: str) -> float:
    """The most of resource ``key`` to plan pools for: :func:`reachable`, or what is alive now when the node types
    are not visible (then the cluster is taken as it is)."""
    at_full_scale = reachable(view, key)
    return view.now(key) if at_full_scale is None else at_full_scale


def worker_capacity(view: ClusterView, request: Mapping[str, float]) -> float | None:
    """The most copies of ``request`` the cluster can hold at once; None when unknown."""
    return _full_scale(view, lambda r: fits(r, request))


def decide_gpu(flag: bool | None, view: ClusterView) -> tuple[bool, str]:
    """(use GPUs, why): the flag when given; else GPUs if the cluster has some now or can launch a GPU node type."""
    if flag is not None:
        return flag, "--use-gpu" if flag else "--no-use-gpu"
    gpus = view.now("GPU")
    if gpus >= 1:
        return True, f"the cluster has {gpus:g} GPU(s)"
    gpu_types = [t.name for t in view.launchable() if t.resources and float(t.resources.get("GPU", 0)) >= 1]
    if gpu_types:
        return True, f"the autoscaler can launch GPU node types ({', '.join(gpu_types)})"
    if view.node_types is None:
        return False, ("no GPU in the cluster now and the node types its autoscaler can launch are not visible "
                       "from here: pass --use-gpu to wait for GPU nodes")
    return False, "no GPU in the cluster and no GPU node type to launch"


def check_workers(view: ClusterView, workers: int, request: Mapping[str, float], data_cpus: float = 0.0,
                  what: str = "worker") -> str | None:
    """Raise :class:`Infeasible` when the cluster can never hold ``workers`` x ``request`` plus ``data_cpus`` CPUs
    beside them (for Ray Data's tasks: without them the data pipeline stalls). Return None when the nodes alive now
    hold it all, else the line saying what the job waits for while the autoscaler launches nodes."""
    need_cpus = workers * float(request.get("CPU", 0)) + data_cpus
    data = f" and {data_cpus:g} CPU(s) beside them for the data pipeline" if data_cpus else ""
    asked = f"{workers} {what}(s) x {fmt(request)}{data}"
    if workers:
        capacity = worker_capacity(view, request)
        if capacity is not None and capacity < 1:
            raise Infeasible(f"no node can ever hold one {what} of {fmt(request)}: {view.describe()}. Ask for "
                             "less per worker (--cpus-per-worker, --no-use-gpu) or add a node type that fits")
        if capacity is not None and capacity < workers:
            raise Infeasible(f"{asked} asked for, but at most {capacity:g} fit: {view.describe()}. Use fewer "
                             "workers or raise max_workers in the cluster config")
    cpus = reachable(view, "CPU")
    if cpus is not None and cpus < need_cpus:
        raise Infeasible(f"{asked} need {need_cpus:g} CPUs but the cluster can have at most {cpus:g}, so no free "
                         f"CPU is left for the data pipeline's read/decode tasks and it stalls: {view.describe()}. "
                         "Lower the CPUs per worker (e.g. 0.5 on CPU-only machines), use fewer workers, or add CPUs")
    held_now = sum(fits(n, request) for n in view.nodes) if workers else math.inf
    if held_now >= workers and view.now("CPU") >= need_cpus:
        return None
    return (f"waiting for nodes: {asked}; {view.describe()}. The autoscaler launches nodes for the pending "
            f"request (`ray status`: pending nodes and demands); the {what}s start as they join")


# ---------------------------------------------------------------------------------------------
# Reading the view from Ray
# ---------------------------------------------------------------------------------------------
def node_types_from_config(config: Mapping[str, Any]) -> tuple[tuple[NodeType, ...], int | None]:
    """(worker node types, cluster-wide max_workers) of a cluster launcher / autoscaling config (the YAML's
    dict). A type's ``max_workers`` defaults to the cluster's, as Ray fills it in; the head type is left out."""
    cap = config.get("max_workers")
    head = config.get("head_node_type")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        resources = spec.get("resources")
        types.append(NodeType(str(name), None if resources is None else {k: float(v) for k, v in resources.items()},
                              spec.get("max_workers", cap)))
    return tuple(types), None if cap is None else int(cap)


def node_types_from_gcs(cluster_config: Any) -> tuple[NodeType, ...]:
    """Node types of a GCS ``autoscaler_pb2.ClusterConfig`` (``max_count`` -1 = unbounded)."""
    return tuple(NodeType(g.name, {k: float(v) for k, v in g.resources.items()},
                          None if g.max_count < 0 else int(g.max_count)) for g in cluster_config.node_group_configs)


def monitor_config(cmdlines: Iterable[list[str]], gcs_port: str) -> tuple[bool, str | None]:
    """(found, ``--autoscaling-config`` path or None) of the autoscaler monitor of the cluster whose GCS listens
    on ``gcs_port``, from process command lines."""
    for argv in cmdlines:
        if not any(a.endswith(MONITOR_SCRIPTS) for a in argv):
            continue
        opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        if opts.get("gcs-address", "").rsplit(":", 1)[-1] != gcs_port:
            continue
        return True, opts.get("autoscaling-config") or None
    return False, None


def _cmdlines() -> Iterable[list[str]]:
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            raw = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            yield raw.rstrip(b"\0").decode(errors="replace").split("\0")


def _node_types(gcs_address: str) -> tuple[tuple[NodeType, ...] | None, int | None, str]:
    try:
        from ray._private import state

        reported = state.state.get_cluster_config()
    except Exception as exc:  # noqa: BLE001 - a private API that may move; fall through to the config file
        log.debug("no GCS cluster config (%s)", exc)
        reported = None
    if reported is not None and reported.node_group_configs:
        return node_types_from_gcs(reported), None, "the cluster config in the GCS"
    found, path = monitor_config(_cmdlines(), gcs_address.rsplit(":", 1)[-1])
    if not found:
        return None, None, "unknown"
    if not path:
        return (), None, "no autoscaling config"
    import yaml

    try:
        config = yaml.safe_load(Path(path).expanduser().read_text())
    except Exception as exc:  # noqa: BLE001 - unreadable here: plan as if unknown rather than fail
        log.warning("cannot read the autoscaler's config %s (%s); node types unknown", path, exc)
        return None, None, "unknown"
    types, cap = node_types_from_config(config or {})
    return types, cap, Path(path).name


def read_view() -> ClusterView:
    """The connected cluster's view (``ray.init`` must have run): alive nodes + launchable node types."""
    import ray

    nodes = tuple(dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive"))
    try:
        gcs_address = ray.get_runtime_context().gcs_address
    except Exception as exc:  # noqa: BLE001 - e.g. Ray Client: plan as if the node types were unknown
        log.debug("no GCS address (%s): node types unknown", exc)
        return ClusterView(nodes)
    types, cap, source = _node_types(gcs_address)
    view = ClusterView(nodes, types, cap, source)
    log.debug("cluster view: %s", view.describe())
    return view


def host_data_singletons_here() -> None:
    """Make Ray Data create its cluster-wide detached actors (its stats actor, its autoscaling coordinator) on
    THIS node. Ray Data pins them, for the cluster's lifetime, to the node of the first process that executes a
    dataset; a node hosting one is never idle, so the autoscaler never releases it (ray-project/ray#42253,
    #51559: still so in Ray 2.60). Training builds its datasets inside the workers, on GPU nodes: call this on
    the driver (the head, under ``ray job submit``) first. One empty map task that needs no CPU."""
    import ray.data

    try:
        ray.data.from_items([{"x": 0}]).map_batches(lambda batch: batch, num_cpus=0).materialize()
    except Exception as exc:  # noqa: BLE001 - a node kept up costs money but does not break the job
        log.warning("could not start Ray Data's cluster actors on this node (%s): a worker node that runs the first "
                    "dataset may not be released by the autoscaler after the job", exc)


__all__ = ["ClusterView", "Infeasible", "NodeType", "check_workers", "decide_gpu", "fits", "fmt",
           "host_data_singletons_here", "monitor_config", "node_types_from_config", "node_types_from_gcs",
           "most", "reachable", "read_view", "worker_capacity"]
