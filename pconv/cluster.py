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

The view follows the autoscaler's own rules (Ray 2.60, ``ray/autoscaler/_private/resource_demand_scheduler.py``
and ``util.py``): the global ``max_workers`` caps worker nodes (the head is not one); each type's ``min_workers``
nodes are always up and take their slots under that cap; a type's ``max_workers`` defaults to the global one,
except the head's type, whose default is 0 (with ``max_workers > 0`` it launches worker nodes too); a config
without a global ``max_workers`` gets its provider's default (:data:`PROVIDER_DEFAULT_MAX_WORKERS`).

Decisions (pure functions of a view, unit-tested without Ray): :func:`decide_gpu` (the flag; GPUs in the cluster
now; GPU node types to launch), :func:`check_workers` (fail fast only when no node can ever hold a worker, when
more workers are asked for than ``max_workers`` allow, or when no mix of nodes holds the workers AND leaves CPUs
for the data pipeline; else the line saying what the job waits for while nodes launch), :func:`reachable` (the
most of a resource the cluster can hold: the bound of Ray Data's autoscaling task and actor pools).

Joining the cluster: :func:`connect`, the one way pconv's drivers, commands and apps start or join Ray.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

log = logging.getLogger(__name__)

HEAD_RESOURCE = "node:__internal_head__"  # the resource Ray gives the head node only
MONITOR_SCRIPTS = ("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")  # v1 and v2 autoscaler
#: The global ``max_workers`` a cluster config gets when it sets none: Ray merges the provider's defaults file under
#: the config (``ray/autoscaler/_private/util.py``: ``prepare_config`` -> ``fillout_defaults``). Ray 2.60's files:
#: ``ray/autoscaler/aws/defaults.yaml``, ``gcp/defaults.yaml`` and ``azure/defaults.yaml`` say 2,
#: ``vsphere/defaults.yaml`` 5, ``spark/defaults.yaml`` 8, ``_private/readonly/defaults.yaml`` 0 (tests check this
#: table against the installed Ray). Provider ``local`` defaults to its number of ``worker_ips``
#: (``_private/local/config.py``); any other provider: unknown.
PROVIDER_DEFAULT_MAX_WORKERS = {"aws": 2, "gcp": 2, "azure": 2, "vsphere": 5, "spark": 8, "readonly": 0}
#: Largest (workers x worker-node slots) table :func:`most_cpus_holding` fills (8 bytes a cell); beyond it (e.g.
#: thousands of workers under a cap of thousands of nodes) the one-mix check is skipped and each need is checked
#: alone.
_MIX_TABLE_CELLS = 4_000_000
#: What :func:`connect` reads to leave the env vars of a submitted job's runtime env to that job (Ray refuses a
#: ``ray.init`` runtime env that names the same variables: ``ray/_private/worker.py``, ``_merge_runtime_env``).
_JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class Infeasible(ValueError):
    """The cluster can never satisfy the request, whatever the autoscaler launches."""


@dataclass(frozen=True)
class NodeType:
    """A worker node type the autoscaler can launch; ``resources`` None: not declared (the provider fills them
    in at launch), ``max_workers`` None: only the cluster-wide cap applies; ``min_workers``: nodes of this type
    the autoscaler keeps up whatever the load (they count against the cluster-wide cap)."""

    name: str
    resources: Mapping[str, float] | None
    max_workers: int | None = None
    min_workers: int = 0

    def describe(self) -> str:
        res = format_resources(self.resources) if self.resources is not None else "(resources not declared)"
        return (f"{self.name} {res}" + ("" if self.max_workers is None else f" x at most {self.max_workers}")
                + (f", {self.min_workers} always up" if self.min_workers else ""))


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
        now = (f"the cluster has {format_resources({'CPU': self.now('CPU'), 'GPU': self.now('GPU')})} in "
               f"{len(self.nodes)} node(s)")
        if self.node_types is None:
            return now + "; the node types its autoscaler can launch are not visible from here"
        if not self.launchable():
            return now + f" and no autoscaler that can add nodes ({self.source})"
        cap = "" if self.max_workers is None else f", at most {self.max_workers} worker nodes in all"
        return (now + f"; node types the autoscaler can launch ({self.source}): "
                + "; ".join(t.describe() for t in self.launchable()) + cap)


def format_resources(resources: Mapping[str, float] | None) -> str:
    """``{CPU: 0.5, GPU: 1}`` (the resources a request or a node is about; labels like ``node:*`` left out)."""
    keys = [k for k in ("CPU", "GPU") if k in (resources or {})]
    keys += sorted(k for k in (resources or {}) if k not in keys and not k.startswith(("node:", "accelerator_type"))
                   and k not in ("memory", "object_store_memory"))
    return "{" + ", ".join(f"{k}: {float(resources[k]):g}" for k in keys) + "}"


def fits(resources: Mapping[str, float], request: Mapping[str, float]) -> float:
    """How many copies of ``request`` one node with ``resources`` holds (inf for an empty request)."""
    counts = [math.floor(float(resources.get(k, 0)) / v + 1e-9) for k, v in request.items() if v > 0]
    return float(min(counts)) if counts else math.inf


@dataclass(frozen=True)
class _FullScale:
    """The cluster at full scale, as the autoscaler can make it: ``fixed`` the nodes that are always there (the
    head, each type's ``min_workers``), ``more`` (resources, how many more nodes of that type may launch) per
    launchable type, ``slots`` the worker nodes the cluster-wide cap leaves for them."""

    fixed: tuple[Mapping[str, float], ...]
    more: tuple[tuple[Mapping[str, float], float], ...]
    slots: float


def _full_scale(view: ClusterView) -> _FullScale | None:
    """None when unknown (node types not visible, or a launchable type with undeclared resources)."""
    if view.node_types is None:
        return None
    types = view.launchable()
    if any(t.resources is None for t in types):
        return None
    fixed = [n for n in view.nodes if HEAD_RESOURCE in n]
    slots = math.inf if view.max_workers is None else float(view.max_workers)
    more = []
    for t in types:
        top = math.inf if t.max_workers is None else float(t.max_workers)
        kept = min(float(t.min_workers), top)  # the autoscaler keeps min(min_workers, max_workers) up
        fixed += [t.resources] * int(kept)
        more.append((t.resources, top - kept))
        slots -= kept
    return _FullScale(tuple(fixed), tuple(more), max(0.0, slots))


def _most_of(view: ClusterView, value: Callable[[Mapping[str, float]], float]) -> float | None:
    """The most of ``value(node resources)`` the cluster can hold: the nodes always there plus the best worker
    nodes in the slots left (exact: every node takes one slot of the same cap, so the best nodes first), or what is
    alive now if that is more (nodes added by hand). None when unknown."""
    full = _full_scale(view)
    if full is None:
        return None
    total, slots = sum(value(n) for n in full.fixed), full.slots
    for per_node, count in sorted(((value(r), count) for r, count in full.more), key=lambda vc: vc[0], reverse=True):
        take = min(count, slots)
        if per_node > 0 and take > 0:
            total += per_node * take
            slots -= take
    return max(total, sum(value(n) for n in view.nodes))


def reachable(view: ClusterView, key: str) -> float | None:
    """The most of resource ``key`` the cluster can have (now, or at full scale); None when unknown."""
    return _most_of(view, lambda r: float(r.get(key, 0)))


def reachable_or_now(view: ClusterView, key: str) -> float:
    """The most of resource ``key`` to plan pools for: :func:`reachable`, or what is alive now when the node types
    are not visible (then the cluster is taken as it is)."""
    at_full_scale = reachable(view, key)
    return view.now(key) if at_full_scale is None else at_full_scale


def worker_capacity(view: ClusterView, request: Mapping[str, float]) -> float | None:
    """The most copies of ``request`` the cluster can hold at once; None when unknown."""
    return _most_of(view, lambda r: fits(r, request))


def most_cpus_holding(view: ClusterView, workers: int, request: Mapping[str, float]) -> float | None:
    """The most CPUs of ONE mix of nodes that holds ``workers`` x ``request`` (the nodes up now, or any mix the
    autoscaler can make under the caps); -inf when none holds them; None when unknown, or when the mixes are too
    many to weigh (see :data:`_MIX_TABLE_CELLS`).

    The most workers and the most CPUs may need different mixes (a slot taken by a GPU node is not one of many
    CPUs): CPUs beside the workers exist only if one mix has both. Under a cluster-wide cap this is a knapsack
    over node slots, solved exactly by a table of (workers held, slots used) -> most CPUs; without one, every
    type at its own cap maximises both at once."""
    held_now = sum(fits(n, request) for n in view.nodes)
    best_now = view.now("CPU") if held_now >= workers else -math.inf
    full = _full_scale(view)
    if full is None:
        return None
    workers = int(workers)

    def cpus(resources: Mapping[str, float]) -> float:
        return float(resources.get("CPU", 0))

    def held(resources: Mapping[str, float]) -> float:  # more than the workers counts as the workers
        return min(fits(resources, request), float(workers))

    held0, cpus0 = min(sum(held(n) for n in full.fixed), workers), sum(cpus(n) for n in full.fixed)
    if math.isinf(full.slots):  # no cluster-wide cap: each type at its own cap is best for both
        held_all = held0 + sum(held(r) * count for r, count in full.more if held(r) > 0)
        cpus_all = cpus0 + sum(cpus(r) * count for r, count in full.more if cpus(r) > 0)
        return max(best_now, cpus_all if held_all >= workers else -math.inf)
    import numpy as np

    slots = int(min(full.slots, sum(min(count, full.slots) for _, count in full.more)))
    if (workers + 1) * (slots + 1) > _MIX_TABLE_CELLS:
        log.debug("%d workers under %d node slots: too many mixes to weigh; each need is checked alone", workers,
                  slots)
        return None
    table = np.full((workers + 1, slots + 1), -np.inf)  # [workers held, slots used] -> most CPUs
    table[int(held0), 0] = cpus0
    for resources, count in full.more:
        per_node_held, per_node_cpus = held(resources), cpus(resources)
        left, size = int(min(count, slots)), 1
        while left > 0 and (per_node_held > 0 or per_node_cpus > 0):  # bounded knapsack: 1, 2, 4, ... nodes at a time
            nodes = min(size, left)
            left, size = left - nodes, size * 2
            step = int(min(nodes * per_node_held, workers))
            gained = table[:, :slots + 1 - nodes] + nodes * per_node_cpus
            moved = np.full_like(table, -np.inf)
            moved[step:, nodes:] = gained[:workers + 1 - step]
            overflow = gained[workers + 1 - step:].max(axis=0, initial=-np.inf)  # more than enough: `workers`
            moved[workers, nodes:] = np.maximum(moved[workers, nodes:], overflow)
            table = np.maximum(table, moved)
    return max(best_now, float(table[workers].max()))


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
    beside them (for Ray Data's tasks: without them the data pipeline stalls), in one mix of nodes. Return None
    when the nodes alive now hold it all, else the line saying what the job waits for while the autoscaler
    launches nodes."""
    per_worker_cpus = float(request.get("CPU", 0))
    need_cpus = workers * per_worker_cpus + data_cpus
    data = f" and {data_cpus:g} CPU(s) beside them for the data pipeline" if data_cpus else ""
    asked = f"{workers} {what}(s) x {format_resources(request)}{data}"
    capacity = worker_capacity(view, request) if workers else None
    if capacity is not None and capacity < 1:
        raise Infeasible(f"no node can ever hold one {what} of {format_resources(request)}: {view.describe()}. "
                         "Ask for less per worker (--cpus-per-worker, --no-use-gpu) or add a node type that fits")
    if capacity is not None and capacity < workers:
        raise Infeasible(f"{asked} asked for, but at most {capacity:g} fit: {view.describe()}. Use fewer "
                         "workers or raise max_workers in the cluster config")
    cpus = reachable(view, "CPU")
    if cpus is not None and cpus < need_cpus:
        raise Infeasible(f"{asked} need {need_cpus:g} CPUs but the cluster can have at most {cpus:g}, so no free "
                         f"CPU is left for the data pipeline's read/decode tasks and it stalls: {view.describe()}. "
                         "Lower the CPUs per worker (e.g. 0.5 on CPU-only machines), use fewer workers, or add CPUs")
    if workers and data_cpus:
        with_workers = most_cpus_holding(view, workers, request)
        if with_workers is not None and with_workers < need_cpus:
            raise Infeasible(
                f"{asked}: {capacity:g} {what}(s) fit and the cluster can have {cpus:g} CPUs, but not at once: the "
                f"nodes that hold {workers} {what}(s) have {with_workers:g} CPU(s), "
                f"{max(0.0, with_workers - workers * per_worker_cpus):g} beside them, so the data pipeline's "
                f"read/decode tasks never run and the job hangs: {view.describe()}. Lower the CPUs per worker, use "
                "fewer workers, or raise max_workers in the cluster config")
    held_now = sum(fits(n, request) for n in view.nodes) if workers else math.inf
    if held_now >= workers and view.now("CPU") >= need_cpus:
        return None
    return (f"waiting for nodes: {asked}; {view.describe()}. The autoscaler launches nodes for the pending "
            f"request (`ray status`: pending nodes and demands); the {what}s start as they join")


# ---------------------------------------------------------------------------------------------
# Reading the view from Ray
# ---------------------------------------------------------------------------------------------
def node_types_from_config(config: Mapping[str, Any]) -> tuple[tuple[NodeType, ...] | None, int | None]:
    """(node types the autoscaler can launch, cluster-wide max_workers) of a cluster launcher / autoscaling config
    (the YAML's dict), filled in as Ray fills it in (``util.py``: ``fillout_defaults``,
    ``fill_node_type_min_max_workers``): no global ``max_workers`` means its provider's
    (:func:`default_max_workers`; when that is not known, the node types are returned as unknown, None); a type
    without its own ``max_workers`` gets the global one, except the head's type, which gets 0. With
    ``max_workers > 0`` the head's type launches worker nodes like any other type (the head itself is a node of
    the view, not one of these)."""
    cap = config.get("max_workers")
    if cap is None:
        cap = default_max_workers(config.get("provider") or {})
        if cap is None:
            log.warning("the cluster config sets no max_workers and its provider's default is not known here "
                        "(provider %r): node types taken as unknown", (config.get("provider") or {}).get("type"))
            return None, None
    head = config.get("head_node_type")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        top = int(spec.get("max_workers", 0 if name == head else cap))
        if name == head and top <= 0:
            continue  # the head node itself: a node of the view, nothing to launch
        resources = spec.get("resources")
        types.append(NodeType(str(name), None if resources is None else {k: float(v) for k, v in resources.items()},
                              top, int(spec.get("min_workers", 0))))
    return tuple(types), int(cap)


def default_max_workers(provider: Mapping[str, Any]) -> int | None:
    """The global ``max_workers`` Ray gives a config of this ``provider`` section that sets none (None: unknown):
    :data:`PROVIDER_DEFAULT_MAX_WORKERS`, or for provider ``local`` its number of ``worker_ips``."""
    if provider.get("type") == "local" and provider.get("worker_ips") is not None:
        return len(provider["worker_ips"])
    return PROVIDER_DEFAULT_MAX_WORKERS.get(provider.get("type"))


def node_types_from_gcs(cluster_config: Any) -> tuple[NodeType, ...]:
    """Node types of a GCS ``autoscaler_pb2.ClusterConfig`` (``max_count`` -1 = unbounded; ``min_count``: nodes
    kept up)."""
    return tuple(NodeType(g.name, {k: float(v) for k, v in g.resources.items()},
                          None if g.max_count < 0 else int(g.max_count), max(0, int(g.min_count)))
                 for g in cluster_config.node_group_configs)


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
    return types, cap, Path(path).name if types is not None else "unknown"


def read_view() -> ClusterView:
    """The connected cluster's view (after :func:`connect`): alive nodes + launchable node types."""
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


# ---------------------------------------------------------------------------------------------
# Joining the cluster
# ---------------------------------------------------------------------------------------------
def connect(*, forward_env: Iterable[str] = (), local_cpus: int | None = None, quiet: bool = False) -> bool:
    """Join Ray, once per process: the one way pconv's drivers, commands and apps start or join a cluster.

    Already connected (an earlier call, the caller's own ``ray.init``, a Ray worker): nothing is done. Otherwise
    ``ray.init`` with :func:`init_options`: the cluster of ``RAY_ADDRESS`` (``ray job submit`` sets it), else the
    one ``ray start`` left on this machine, else a new local Ray of this machine's CPUs; or, with ``local_cpus``, a
    new local Ray of that many CPUs for this process alone, whatever runs elsewhere (the demo). ``forward_env``:
    names of this process's environment variables that the job's tasks and actors must see on every node (S3
    endpoint and credentials, the MLflow store). ``quiet``: no dashboard, no worker output on this terminal, Ray's
    own log at WARNING. Returns True when this call connected (the caller may then ``ray.shutdown()``)."""
    import ray

    if ray.is_initialized():
        return False
    options = init_options(forward_env, local_cpus, quiet)
    ray.init(**options)
    log.info("connected to Ray (%s)", "a new local Ray" if options["address"] == "local" else
             os.environ.get("RAY_ADDRESS") or "this machine's cluster, or a new local one")
    return True


def init_options(forward_env: Iterable[str] = (), local_cpus: int | None = None, quiet: bool = False,
                 environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``ray.init`` keyword arguments of :func:`connect` (``environ``: the process environment by default).

    The forwarded variables are set in the job's runtime env, less those a submitted job's own runtime env sets:
    the driver already runs with them, and Ray refuses a ``ray.init`` runtime env naming the same variable."""
    environ = os.environ if environ is None else environ
    options: dict[str, Any] = {"address": "local" if local_cpus else None}
    if local_cpus:
        options["num_cpus"] = int(local_cpus)
    job_config = json.loads(environ.get(_JOB_CONFIG_VAR) or "{}")
    set_by_job = set(((job_config.get("runtime_env") or {}).get("env_vars") or {}))
    env_vars = {k: environ[k] for k in forward_env if environ.get(k) and k not in set_by_job}
    if env_vars:
        options["runtime_env"] = {"env_vars": env_vars}
    if quiet:
        options.update(include_dashboard=False, log_to_driver=False, configure_logging=True,
                       logging_level=logging.WARNING)
    return options


__all__ = ["ClusterView", "Infeasible", "NodeType", "check_workers", "connect", "decide_gpu", "default_max_workers",
           "fits", "format_resources", "host_data_singletons_here", "init_options", "monitor_config",
           "most_cpus_holding", "node_types_from_config", "node_types_from_gcs", "reachable", "reachable_or_now",
           "read_view", "worker_capacity"]
