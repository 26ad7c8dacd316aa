"""Offline inpainting at scale with Ray Data: ``map_batches`` over (image, mask, output) URIs with an actor pool.

Pairs come from :func:`pconv.inference.inpaint.pair_files` (the one pairing rule for files). The model is resolved ONCE on
the driver (registry / checkpoint / path, see :func:`pconv.tracking.loading.load_model`);
its plain state dict goes into Ray's object store and every actor rebuilds the net from it once, so actors
need neither MLflow access nor pickled modules. Actors take one GPU each when the cluster has GPUs or its
autoscaler can launch GPU nodes (CPU otherwise); the pool starts with one actor and grows as nodes join (Ray
Data's autoscaling actor pool, bounded by what the cluster can reach: :mod:`pconv.cluster`). Actors read images
and masks from local paths or object storage, and write PNG composites to the output URI. A pair that cannot be
processed (unreadable file, size mismatch) is skipped, counted and reported with its reason; it never stops the
job. When the masks' hole ratios say their polarity is probably inverted
(:func:`pconv.core.masks.polarity_warning`), the summary carries the warning with the ratio.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np

from pconv import cluster

from pconv.storage import uris
from pconv.inference.inpaint import DEFAULT_MAX_SIDE, Job, inpaint_job, pair_files
from pconv.tracking.loading import from_state_dict, load_model
from pconv.core.masks import polarity_warning

log = logging.getLogger(__name__)

# Environment that actors need to reach object storage the way the driver does (local clusters inherit it).
_FORWARD_ENV = uris.AWS_ENV_VARS


class InpaintActor:
    """Ray Data callable class: loads the model once, then inpaints batches of URI triples."""

    def __init__(self, state: Any, layer_size: int, hole_color: str, threshold: float, use_gpu: bool,
                 max_side: int) -> None:
        import ray
        import torch

        if isinstance(state, ray.ObjectRef):
            state = ray.get(state)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = from_state_dict(state, layer_size).to(self.device).eval()
        self.hole_color, self.threshold, self.max_side = hole_color, threshold, max_side

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        status, error, ratio = [], [], []
        for image, mask, out in zip(batch["image"], batch["mask"], batch["out"]):
            try:
                row = inpaint_job(self.model, Job(str(image), str(mask), str(out)), self.hole_color, self.threshold,
                                  device=self.device, max_side=self.max_side)
                status.append("ok")
                error.append("")
                ratio.append(row["hole_ratio"])
            except Exception as exc:  # noqa: BLE001 - one bad pair must not stop the job; it is reported
                status.append("skipped")
                error.append(f"{type(exc).__name__}: {exc}")
                ratio.append(float("nan"))
        return {"image": batch["image"], "out": batch["out"], "status": np.array(status, dtype=object),
                "error": np.array(error, dtype=object), "hole_ratio": np.array(ratio, dtype=np.float64)}


def batch_inpaint(model_uri: str, images: str, masks: str, out: str, hole_color: str, threshold: float = 0.5,
                  batch_size: int = 4, num_actors: int | None = None, use_gpu: bool | None = None,
                  max_side: int = DEFAULT_MAX_SIDE, tracking_uri: str | None = None) -> dict[str, Any]:
    """Inpaint every image under ``images`` with the same-named mask under ``masks``; PNGs go to ``out``.

    GPU actors when ``use_gpu`` says so, or (None) when the cluster has GPUs or its autoscaler can launch GPU nodes
    (:func:`pconv.cluster.decide_gpu`). The actor pool is Ray Data's autoscaling pool: it starts with one actor and
    grows, as nodes join, to ``num_actors`` (default: the GPUs the cluster can reach, or half its CPUs; never more
    than there are images). Returns ``{"total", "written", "skipped", "errors": [(image, reason), ...], "use_gpu",
    "num_actors" (the pool's maximum), "polarity_warning"}`` (None, or the warning text with the hole ratio).
    Uses the running Ray cluster if there is one (:func:`pconv.cluster.connect` otherwise, honouring ``RAY_ADDRESS``).
    """
    import ray

    jobs = pair_files(images, masks, out)
    model, info = load_model(model_uri, device="cpu", tracking_uri=tracking_uri)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    cluster.connect(forward_env=_FORWARD_ENV)
    num_actors, use_gpu = _actor_pool(cluster.read_view(), num_actors, use_gpu, len(jobs))
    log.info("batch inpainting %d images with up to %d %s actor(s), model %s (layer_size %d)", len(jobs), num_actors,
             "GPU" if use_gpu else "CPU", model_uri, info.layer_size)

    ds = ray.data.from_items([{"image": j.image, "mask": j.mask, "out": j.out} for j in jobs])
    results = ds.map_batches(
        InpaintActor,
        fn_constructor_kwargs={"state": ray.put(state), "layer_size": info.layer_size, "hole_color": hole_color,
                               "threshold": threshold, "use_gpu": use_gpu, "max_side": max_side},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
        **_forwarded_env(),
    ).take_all()
    errors = [(r["image"], r["error"]) for r in results if r["status"] != "ok"]
    for image, reason in errors[:20]:
        log.warning("skipped %s: %s", image, reason)
    ratios = [float(r["hole_ratio"]) for r in results if r["status"] == "ok"]
    warning = polarity_warning(ratios) if ratios else None
    if warning:
        log.warning("masks under %s (--hole-color %s): %s", masks, hole_color, warning)
    summary = {"total": len(jobs), "written": len(results) - len(errors), "skipped": len(errors),
               "errors": errors, "use_gpu": use_gpu, "num_actors": num_actors, "out": out,
               "polarity_warning": warning}
    log.info("batch inpainting done: %d written, %d skipped", summary["written"], summary["skipped"])
    return summary


def _forwarded_env() -> dict[str, Any]:
    """The actors' runtime env: this process's S3 endpoint and credentials (:data:`_FORWARD_ENV`), so they reach
    storage as the driver does also on a cluster that was already running (``cluster.connect`` forwards them only
    when it starts or joins one; Ray fixed the environment of an existing cluster's workers when it started)."""
    env = {k: os.environ[k] for k in _FORWARD_ENV if os.environ.get(k)}
    return {"runtime_env": {"env_vars": env}} if env else {}


def _actor_pool(view: cluster.ClusterView, num_actors: int | None, use_gpu: bool | None,
                n_jobs: int) -> tuple[int, bool]:
    """(the most actors, GPU actors?) planned on the cluster as its autoscaler can make it. RuntimeError when no
    node can ever hold one actor; logs what the job waits for when no node holds one yet."""
    use_gpu, why = cluster.decide_gpu(use_gpu, view)
    request = {"CPU": 1.0, **({"GPU": 1.0} if use_gpu else {})}
    try:
        waiting = cluster.check_workers(view, 1, request, what="inpainting actor")
    except cluster.Infeasible as exc:
        raise RuntimeError(str(exc)) from None
    log.info("%s actors (%s)", "GPU" if use_gpu else "CPU", why)
    if waiting:
        log.warning("%s", waiting)
    if num_actors is None:  # floats until clamped: unbounded node types reach math.inf
        key = "GPU" if use_gpu else "CPU"
        most = cluster.reachable_or_now(view, key)
        capacity = cluster.worker_capacity(view, request)
        num_actors = min(most if use_gpu else most // 2, math.inf if capacity is None else capacity, n_jobs)
    return int(max(1, min(num_actors, n_jobs))), use_gpu


__all__ = ["InpaintActor", "batch_inpaint"]
