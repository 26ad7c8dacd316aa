"""Data-parallel PConv U-Net training on Ray Train (V2 API): the driver side.

Checks that fail fast before Ray takes resources, resource planning, the ``TorchTrainer``, and registration of the
final model (alias ``candidate``). A run is identified by ``run_name`` + ``storage`` and resumes from its latest
checkpoint whether a worker died (Ray restarts the group) or the same command is re-run. The worker loop with the
paper's two phases (Liu et al. 2018, Sec. 4.1) is :mod:`pconv.train.loop`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pconv import cluster
from pconv.core.config import REGISTER_AUTO, SR_TASK, ConfigError, TrainConfig
from pconv.data import stream
from pconv.storage import shards, uris
from pconv.tracking import checkpoints, registry, runs, store
from pconv.train.loop import StepHook, train_loop_per_worker

log = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    run_name: str
    status: str                       # "finished" | "already-finished"
    step: int
    checkpoint: str | None            # URI of the final checkpoint directory
    mlflow_run_id: str | None
    model_version: str | None = None  # registered model version, if registered
    model_name: str | None = None     # the registered model's name (register_as resolved), if registered

    def describe(self) -> str:
        lines = [f"run {self.run_name!r}: {self.status} at step {self.step}",
                 f"  checkpoint: {self.checkpoint}", f"  mlflow run: {self.mlflow_run_id}"]
        if self.model_version:
            lines.append(f"  registered model version: {self.model_version} ({self.model_name})")
        return "\n".join(lines)


@dataclass
class ClusterPlan:
    """The resources the run asks Ray for."""

    use_gpu: bool
    cpus_per_worker: float
    gpu_type: str
    decode_concurrency: int = 1     # the most read/decode tasks of all workers together (Ray Data scales up to it)

    def params(self, workers: str) -> dict[str, Any]:
        return {"cluster/workers": workers, "cluster/use_gpu": self.use_gpu, "cluster/gpu_type": self.gpu_type,
                "cluster/cpus_per_worker": self.cpus_per_worker,
                "cluster/decode_concurrency": self.decode_concurrency}


def registered_name(cfg: TrainConfig) -> str | None:
    """The name the final model is registered under: ``register_as``, with ``auto`` = the inpainting model's
    registered name (:data:`pconv.tracking.registry.INPAINTING_MODEL`), or for ``task: sr`` the SR model's
    (:data:`pconv.tracking.registry.SR_MODEL`); ``None`` when registration is off."""
    default = registry.SR_MODEL if cfg.task == SR_TASK else registry.INPAINTING_MODEL
    return default if cfg.register_as == REGISTER_AUTO else (cfg.register_as or None)


def run_dir(cfg: TrainConfig) -> str:
    return uris.join(_storage_uri(cfg.storage), cfg.run_name)


def latest_checkpoint(cfg: TrainConfig) -> tuple[str, dict[str, Any]] | None:
    """(URI, meta) of the newest COMPLETE checkpoint of this run in storage, or None."""
    return checkpoints.latest(run_dir(cfg))


def check_vgg_weights(weights: str) -> None:
    """Fail fast when the workers could not load the VGG16 weights: a path / URI that does not exist, or
    ``imagenet`` neither in the torch hub cache nor downloadable from here (e.g. no internet)."""
    import urllib.request

    import torch

    from pconv.core.losses import IMAGENET_VGG16_URL

    if weights == "random":
        return
    if weights != "imagenet":
        try:
            found = uris.exists(weights)
        except Exception as exc:  # noqa: BLE001 - credentials, network: the workers would fail the same way
            raise ConfigError(f"--vgg-weights {weights}: cannot be checked ({store.short_error(exc)})") from None
        if not found:
            raise ConfigError(f"--vgg-weights {weights}: no such file; pass imagenet, random, or the path / s3:// "
                              "URI of a torchvision VGG16 state dict")
        return
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(IMAGENET_VGG16_URL)
    if cache.is_file():
        return
    try:
        # A private opener: urlopen() would install a process-wide one that keeps this moment's proxy settings.
        opener = urllib.request.build_opener()
        opener.open(urllib.request.Request(IMAGENET_VGG16_URL, method="HEAD"), timeout=20).close()
    except Exception as exc:  # noqa: BLE001 - URLError, proxy and TLS errors alike: the download would fail
        raise ConfigError(f"--vgg-weights imagenet: not in the torch hub cache ({cache}) and {IMAGENET_VGG16_URL} "
                          f"cannot be reached from here ({store.short_error(exc)}); copy the file there (or set "
                          "TORCH_HOME to a populated cache), or pass --vgg-weights PATH_OR_S3_URI") from None


def check_inputs(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """Fail fast (before Ray takes resources) on unreadable, empty or swapped datasets and unreachable VGG16
    weights."""
    check_vgg_weights(cfg.vgg_weights)
    manifests = {}
    for name in ("images",) if cfg.task == SR_TASK else ("images", "masks"):  # sr: pairs from the crops
        uri = getattr(cfg, name)
        try:
            manifest = shards.read_manifest(uri)
        except FileNotFoundError:
            raise ConfigError(f"--{name} {uri}: no {shards.MANIFEST} there; create shards with "
                              f"`python pipelines/prepare_data.py {name} SRC {uri}`") from None
        except Exception as exc:  # noqa: BLE001 - schema, network or permission errors: say which URI
            raise ConfigError(f"--{name} {uri}: cannot read {uris.join(uri, shards.MANIFEST)}: {exc}") from exc
        if manifest.get("kind") != name:
            raise ConfigError(f"--{name} {uri} holds {manifest.get('kind')} shards, not {name}; were --images and "
                              "--masks swapped?")
        counts = manifest.get("counts", {})
        if int(counts.get("train", 0)) < 1:
            raise ConfigError(f"--{name} {uri}: the manifest lists no training rows (counts={counts})")
        manifests[name] = manifest
    n_train = int(manifests["images"]["counts"]["train"])
    if n_train < cfg.batch_size:
        raise ConfigError(f"--images {cfg.images}: {n_train} training images cannot fill one global batch of "
                          f"{cfg.batch_size}")
    return manifests


def _storage_uri(uri: str) -> str:
    """Absolute local path or the s3:// URI unchanged (Ray needs absolute local storage paths)."""
    return uri if uris.is_remote(uri) else str(Path(uri).expanduser().resolve())


def _absolute(cfg: TrainConfig) -> TrainConfig:
    """Workers run in other directories (and on other nodes): make local paths absolute once, on the driver."""
    init_from = _storage_uri(cfg.init_from) if cfg.init_from and Path(cfg.init_from).exists() else cfg.init_from
    vgg = cfg.vgg_weights
    if vgg not in ("imagenet", "random") and not uris.is_remote(vgg) and Path(vgg).expanduser().is_file():
        vgg = _storage_uri(vgg)
    return dataclasses.replace(cfg, images=_storage_uri(cfg.images), masks=cfg.masks and _storage_uri(cfg.masks),
                               storage=_storage_uri(cfg.storage), init_from=init_from, vgg_weights=vgg)


def _run_config(cfg: TrainConfig):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    uri = _storage_uri(cfg.storage)
    kwargs: dict[str, Any] = {}
    if uris.is_remote(uri):
        # Ray trap: with storage_filesystem given, storage_path carries no scheme.
        kwargs["storage_filesystem"], kwargs["storage_path"] = uris.get_filesystem(uri)
    else:
        Path(uri).mkdir(parents=True, exist_ok=True)
        kwargs["storage_path"] = uri
    # The workers (and the read tasks they start, which inherit their runtime env) reach object storage the way this
    # driver does: Ray fixed a worker's environment when its node started, which may have been with another S3
    # endpoint or none (a cluster started before the endpoint was set, a proxy in front of it).
    s3_env = {k: os.environ[k] for k in uris.AWS_ENV_VARS if os.environ.get(k)}
    if s3_env:
        kwargs["worker_runtime_env"] = {"env_vars": s3_env}
    return RunConfig(name=cfg.run_name, failure_config=FailureConfig(max_failures=cfg.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep), **kwargs)


def plan_cluster(cfg: TrainConfig) -> ClusterPlan:
    """GPUs or not, CPUs per worker, and the CPUs Ray Data needs beside them, planned on the cluster as its
    autoscaler can make it (:mod:`pconv.cluster`), not on the nodes that happen to be up at submit time. Fails
    fast only when the cluster can never run the job; logs what it waits for while nodes launch."""
    cluster.connect()
    view = cluster.read_view()
    use_gpu, why = cluster.decide_gpu(cfg.use_gpu, view)
    cpus_per_worker = cfg.cpus_per_worker or (1.0 if use_gpu else 0.5)
    request = {"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    # Ray Data needs CPUs beyond the training workers' or the read tasks never schedule (a hang, not an error).
    data_cpus = max(stream.MIN_FREE_CPUS, stream.DEFAULT_NUM_CPUS)
    fewest = cfg.min_workers if cfg.elastic else cfg.workers
    try:  # an elastic run needs its MIN to fit; MAX that can never fit is only worth a warning
        waiting = cluster.check_workers(view, fewest, request, data_cpus, what="training worker")
    except cluster.Infeasible as exc:
        raise ConfigError(str(exc)) from None
    if cfg.elastic:
        try:
            cluster.check_workers(view, cfg.workers, request, data_cpus, what="training worker")
        except cluster.Infeasible as exc:
            log.warning("elastic run %d-%d: it will never grow to %d workers: %s", fewest, cfg.workers, cfg.workers,
                        exc)
    log.info("training on %s (%s): %s worker(s) x %s", "GPUs" if use_gpu else "CPUs", why, _workers_text(cfg),
             cluster.format_resources(request))
    if waiting:
        log.warning("%s", waiting)
    if view.node_types != ():  # nodes come and go: keep Ray Data's detached actors off them
        cluster.host_data_singletons_here()
    return ClusterPlan(use_gpu, cpus_per_worker, _gpu_type(use_gpu, view),
                       stream.default_concurrency(stream.DEFAULT_NUM_CPUS, cluster.reachable_or_now(view, "CPU")))


def run(cfg: TrainConfig, *, step_hook: StepHook | None = None) -> TrainSummary:
    """Train (or resume) the run described by ``cfg`` on the current Ray cluster; register the final model.

    ``step_hook``, the loop's one test hook: every worker calls it with a :class:`~pconv.train.loop.StepEvent` for
    each batch it draws (the batch's rows, ids and skipped count) and right after each checkpoint it reports. It
    travels to the workers pickled (a module the workers cannot import must be registered with cloudpickle's
    ``register_pickle_by_value``); what it raises fails the worker like any error of the loop. Tests use it for
    crash injection, failures and sample tracing (tests/fault_hooks.py); production runs pass none.
    """
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = _absolute(cfg.validate())
    cfg = dataclasses.replace(cfg, register_as=registered_name(cfg))  # what params and checkpoints record
    check_inputs(cfg)
    latest = latest_checkpoint(cfg)
    if latest and latest[1].get("step", 0) >= cfg.total_steps:
        log.info("run %r already finished at step %d (%s); nothing to do", cfg.run_name, latest[1]["step"], latest[0])
        return TrainSummary(cfg.run_name, "already-finished", int(latest[1]["step"]), latest[0],
                            latest[1].get("mlflow_run_id"))
    if latest:
        log.info("run %r resumes from %s (step %d)", cfg.run_name, latest[0], latest[1]["step"])
    plan = plan_cluster(cfg)

    tracking_uri = store.resolve_tracking_uri()
    run_id = store.start_or_resume_run(cfg.experiment, cfg.run_name,
                                       run_id=latest[1].get("mlflow_run_id") if latest else None)
    tracker = runs.Tracker(run_id, tracking_uri)
    tracker.log_params(runs.run_params(cfg, plan.params(_workers_text(cfg)), versions=checkpoints.versions()))

    try:  # from here on, any failure (dataset build, workers, Ctrl-C) ends the MLflow run FAILED / KILLED
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": cfg.to_dict(), "mlflow_run_id": run_id, "tracking_uri": tracking_uri,
                               # the read units, listed once here; each worker streams its own by rank (exact
                               # resume, pconv.data.plan) instead of Ray Train splitting one dataset
                               "train_units": stream.read_units(cfg.images, "train"),
                               "decode_concurrency": plan.decode_concurrency, "step_hook": step_hook},
            scaling_config=ScalingConfig(
                num_workers=(cfg.min_workers, cfg.workers) if cfg.elastic else cfg.workers, use_gpu=plan.use_gpu,
                resources_per_worker={"CPU": plan.cpus_per_worker, **({"GPU": 1} if plan.use_gpu else {})},
                elastic_resize_monitor_interval_s=cfg.elastic_resize_s),
            run_config=_run_config(cfg),
        )
        result = trainer.fit()
    except BaseException as exc:
        tracker.set_terminated("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    final = latest_checkpoint(cfg)
    summary = TrainSummary(cfg.run_name, "finished", int(final[1]["step"]) if final else cfg.total_steps,
                           final[0] if final else (result.checkpoint.path if result.checkpoint else None), run_id)
    if cfg.register_as and run_id and final:
        summary.model_version = _register(final[0], cfg, run_id, tracking_uri)
        summary.model_name = cfg.register_as if summary.model_version else None
    tracker.set_terminated("FINISHED")
    return summary


def _register(checkpoint_uri: str, cfg: TrainConfig, run_id: str, tracking_uri: str) -> str | None:
    """Register the final checkpoint as a new version with alias ``candidate``; a failure is logged, not raised."""
    try:
        return registry.register_checkpoint(checkpoint_uri, name=cfg.register_as, alias=registry.CANDIDATE,
                                            experiment=cfg.experiment, run_id=run_id, tracking_uri=tracking_uri)
    except Exception as exc:  # noqa: BLE001 - the trained checkpoint is safe; registration can be redone
        log.error("registration failed (%s); the checkpoint is intact, register it later with "
                  "`python pipelines/register.py --checkpoint %s`", exc, checkpoint_uri)
        return None


def _workers_text(cfg: TrainConfig) -> str:
    """``N`` or, elastic, ``MIN-MAX`` (as ``--workers`` takes them)."""
    return f"{cfg.min_workers}-{cfg.workers}" if cfg.elastic else str(cfg.workers)


def _gpu_type(use_gpu: bool, view: cluster.ClusterView) -> str:
    """The accelerator types of the GPU nodes alive now, or of the launchable GPU node types (``accelerator_type:*``
    resources Ray sets / the config declares)."""
    if not use_gpu:
        return "none"
    resources = list(view.nodes) + [t.resources for t in view.launchable() if t.resources]
    types = {k.split(":", 1)[1] for r in resources for k in r if k.startswith("accelerator_type:")}
    return ",".join(sorted(types)) or "unknown"


__all__ = ["ClusterPlan", "TrainSummary", "check_inputs", "check_vgg_weights", "latest_checkpoint", "plan_cluster",
           "registered_name", "run", "run_dir"]
