"""Data-parallel PConv U-Net training on Ray Train (V2 API) with the paper's two-phase schedule.

Phase 1 trains every layer with batch normalisation at lr 2e-4; phase 2 freezes the encoder's BN
(running statistics AND affine parameters) and fine-tunes at lr 5e-5 (Liu et al. 2018, Sec. 4.1).
One run performs both phases; a run is identified by ``run_name`` + ``storage`` and resumes from its
latest checkpoint whether a worker died (Ray restarts the group) or the same command is re-run.

The worker loop (:func:`train_loop_per_worker`) is deliberately short; the helpers around it do the
bookkeeping: AMP settings, optimiser per phase, checkpoint save/restore, validation and logging.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from pconv import checkpoint as ckpt
from pconv import data, storage
from pconv.config import ConfigError, TrainConfig
from pconv.losses import InpaintingLoss, VGG16FeatureExtractor
from pconv.model import PConvUNet, build_model

log = logging.getLogger(__name__)

LOSS_TERMS = ("valid", "hole", "perceptual", "style_out", "style_comp", "tv", "total")


# ---------------------------------------------------------------------------------------------
# Small pieces of the loop
# ---------------------------------------------------------------------------------------------
@dataclass
class AmpSettings:
    enabled: bool
    dtype: torch.dtype | None
    use_scaler: bool

    @staticmethod
    def choose(mode: str, device: torch.device) -> "AmpSettings":
        """auto: bf16 where the GPU supports it, fp16 + GradScaler otherwise (V100), fp32 on CPU."""
        if mode == "off" or (mode == "auto" and device.type != "cuda"):
            return AmpSettings(False, None, False)
        if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
            return AmpSettings(True, torch.bfloat16, False)
        return AmpSettings(True, torch.float16, device.type == "cuda")


def phase_of(step: int, cfg: TrainConfig) -> int:
    """Phase (1 or 2) of the step about to run (0-based step count)."""
    return 1 if step < cfg.phase1_steps else 2


def make_optimizer(model: torch.nn.Module, phase: int, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the parameters that train in this phase (phase 2 excludes the frozen encoder BN)."""
    lr = cfg.lr if phase == 1 else cfg.finetune_lr
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)


def checkpoint_meta(cfg: TrainConfig, step: int, phase: int, run_id: str | None) -> dict[str, Any]:
    return {"mlflow_run_id": run_id, "run_name": cfg.run_name, "step": step, "phase": phase,
            "total_steps": cfg.total_steps, "finished": step >= cfg.total_steps}


def _sum_skipped(batch: dict[str, Any]) -> int:
    skipped = batch.get("skipped")
    if skipped is None:
        return 0
    return int(torch.as_tensor(skipped).sum().item())


def _world_mean(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
        values /= world
    return values


def _all_finite(loss: torch.Tensor, world: int) -> bool:
    """True when the loss is finite on every worker (all ranks must agree to skip a step together)."""
    ok = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item() > 0)


# ---------------------------------------------------------------------------------------------
# The worker loop
# ---------------------------------------------------------------------------------------------
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(loop_config["config"]).validate()
    data.reuse_freed_memory()  # this process consumes the batches (see the function)
    run_id: str | None = loop_config.get("mlflow_run_id")
    tracking_uri: str | None = loop_config.get("tracking_uri")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    amp = AmpSettings.choose(cfg.amp, device)
    torch.manual_seed(cfg.seed + rank)

    # ---- model and state (restored from the run's latest checkpoint, or --init-from) ----------
    model: torch.nn.Module = build_model(cfg.layer_size)
    state, step, epoch = _restore(model, cfg)
    phase = phase_of(step, cfg)
    if phase == 2:
        model.freeze_encoder_bn()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(model, phase, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp.use_scaler)
    if state is not None and state.get("phase") == phase and state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    loss_fn = InpaintingLoss(VGG16FeatureExtractor(weights=cfg.vgg_weights)).to(device)

    tracker = _make_tracker(run_id, tracking_uri) if rank == 0 else None
    val = _load_val(cfg, device) if rank == 0 else None
    batches = _iterate_batches(cfg, epoch)
    stats = _Window()
    nan_steps = consecutive_nan = skipped = 0
    log.info("rank %d/%d on %s: starting at step %d (phase %d) of %d, amp=%s", rank, world, device, step,
             phase, cfg.total_steps, amp)

    while step < cfg.total_steps:
        if phase_of(step, cfg) != phase:  # phase 1 -> 2: freeze encoder BN, rebuild DDP and optimiser
            phase = 2
            bare = ckpt.unwrap(model)
            bare.freeze_encoder_bn()
            model = ray.train.torch.prepare_model(bare)
            optimizer = make_optimizer(model, phase, cfg)
            log.info("step %d: phase 2 (encoder BN frozen, lr %g)", step, cfg.finetune_lr)

        t0 = time.perf_counter()
        epoch, batch = next(batches)
        t_data = time.perf_counter()
        skipped += _sum_skipped(batch)
        inputs = data.to_float_batch(batch, device)  # uint8 rows -> float on the device (4x less to copy)
        image, mask = inputs["image"], inputs["mask"]
        if device.type == "cuda":
            image = image.contiguous(memory_format=torch.channels_last)
        model.train()
        with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.enabled):
            output, _ = model(image, mask)
            terms = loss_fn(mask, output.float(), image)
        optimizer.zero_grad(set_to_none=True)
        if _all_finite(terms["total"], world):
            consecutive_nan = 0
            scaler.scale(terms["total"]).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            nan_steps += 1
            consecutive_nan += 1
            log.warning("step %d: non-finite loss (%d in a row); step skipped", step, consecutive_nan)
            if consecutive_nan >= cfg.max_nan_steps:
                raise FloatingPointError(f"{consecutive_nan} consecutive non-finite losses at step {step} "
                                         f"(max_nan_steps={cfg.max_nan_steps}); stopping without checkpointing")
        step += 1
        stats.add(terms, t_data - t0, time.perf_counter() - t0, image.shape[0] * world)

        if step % cfg.log_every == 0 or step == cfg.total_steps:
            metrics = stats.flush(world, device)
            metrics.update({"lr": optimizer.param_groups[0]["lr"], "phase": phase,
                            "data/skipped": skipped, "train/nan_steps": nan_steps, "epoch": epoch})
            if tracker:
                tracker.log_metrics(metrics, step=step)
            if rank == 0:
                log.info("step %d/%d phase %d loss %.4f (%.1f img/s, data wait %.0f%%)", step, cfg.total_steps, phase,
                         metrics["loss/total"], metrics["throughput/images_per_s"],
                         100 * metrics["data/wait_fraction"])
        if val is not None and (step % cfg.val_every == 0 or step % cfg.sample_every == 0 or step == cfg.total_steps):
            _validate(ckpt.unwrap(model), loss_fn, val, tracker, step, cfg, amp,
                      grid=step % cfg.sample_every == 0 or step == cfg.total_steps)
        if step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
            _report_checkpoint(model, optimizer, scaler, cfg, step, phase, epoch, run_id, rank)


# ---------------------------------------------------------------------------------------------
# Bookkeeping used by the loop
# ---------------------------------------------------------------------------------------------
class _Window:
    """Averages loss terms and timings between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(LOSS_TERMS), dtype=torch.float64)
        self.n = 0
        self.wait = self.total = 0.0
        self.images = 0

    def add(self, terms: dict[str, torch.Tensor], wait: float, total: float, images: int) -> None:
        values = torch.stack([terms[k].detach().float().cpu() for k in LOSS_TERMS]).double()
        if torch.isfinite(values).all():
            self.sums += values
            self.n += 1
        self.wait += wait
        self.total += total
        self.images += images

    def flush(self, world: int, device: torch.device) -> dict[str, float]:
        means = _world_mean((self.sums / max(1, self.n)).to(device, torch.float32), world).cpu()
        out = {f"loss/{k}": float(v) for k, v in zip(LOSS_TERMS, means)}
        out["throughput/images_per_s"] = self.images / self.total if self.total > 0 else 0.0
        out["data/wait_fraction"] = self.wait / self.total if self.total > 0 else 0.0
        self.reset()
        return out


def _restore(model: PConvUNet, cfg: TrainConfig) -> tuple[dict[str, Any] | None, int, int]:
    """Load the run's latest checkpoint (Ray passes it on restart/re-run), else --init-from weights."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = ckpt.load_state(d)
        model.load_state_dict(state["model"])
        if state.get("phase") == 2:
            model.freeze_encoder_bn()
        log.info("resumed from checkpoint at step %d (phase %d)", state["step"], state["phase"])
        return state, int(state["step"]), int(state.get("epoch", 0))
    if cfg.init_from:
        from pconv.inference import load_model  # registry / checkpoint / path resolution lives there

        source, _info = load_model(cfg.init_from)
        model.load_state_dict(ckpt.unwrap(source).state_dict())
        log.info("initialised weights from %s", cfg.init_from)
    return None, 0, 0


def _report_checkpoint(model, optimizer, scaler, cfg: TrainConfig, step: int, phase: int, epoch: int,
                       run_id: str | None, rank: int) -> None:
    """Every rank reports (a barrier); rank 0 attaches a complete checkpoint directory."""
    import ray.train

    metrics = {"step": step, "phase": phase}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    state = {"model": ckpt.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "step": step, "phase": phase, "epoch": epoch, "data_seed": cfg.seed}
    with tempfile.TemporaryDirectory(prefix="pconv-ckpt-") as tmp:
        ckpt.save(tmp, state, cfg.to_yaml(), checkpoint_meta(cfg, step, phase, run_id))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_step_{step:08d}")


def _iterate_batches(cfg: TrainConfig, start_epoch: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """Endless (epoch, batch) stream over this worker's shard; a new seeded order every epoch."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    epoch = start_epoch
    while True:
        n = 0
        for batch in shard.iter_torch_batches(batch_size=cfg.per_worker_batch, drop_last=True):
            n += 1
            yield epoch, batch
        if n == 0:
            raise RuntimeError(f"epoch {epoch} produced no batch of {cfg.per_worker_batch} images per worker: "
                               "the training set is smaller than one global batch")
        epoch += 1


def _load_val(cfg: TrainConfig, device: torch.device) -> dict[str, torch.Tensor] | None:
    from pconv.data import load_val_pairs

    pairs = load_val_pairs(cfg.images, cfg.masks, cfg.image_size, cfg.val_size)
    if pairs is None or len(pairs["image"]) == 0:
        log.warning("no validation pairs available; validation and sample grids are off")
        return None
    return {k: torch.as_tensor(v).to(device) for k, v in pairs.items() if k in ("image", "mask")}


@torch.no_grad()
def _validate(model: torch.nn.Module, loss_fn: InpaintingLoss, val: dict[str, torch.Tensor], tracker, step: int,
              cfg: TrainConfig, amp: AmpSettings, grid: bool) -> dict[str, float]:
    """Loss terms + PSNR/SSIM of the composite on the fixed validation pairs (rank 0 only)."""
    from pconv import metrics as M

    was_training = model.training
    model.eval()
    image, mask = val["image"], val["mask"]
    with torch.autocast(image.device.type, dtype=amp.dtype, enabled=amp.enabled):
        output, _ = model(image, mask)
    output = output.float()
    terms = loss_fn(mask, output, image)
    comp = (mask * image + (1 - mask) * output).clamp(0, 1)
    out = {f"val/{k}": float(v) for k, v in terms.items()}
    out["val/psnr"] = float(torch.as_tensor(M.psnr(comp, image)).float().mean())
    out["val/ssim"] = float(torch.as_tensor(M.ssim(comp, image)).float().mean())
    if tracker:
        tracker.log_metrics(out, step=step)
        if grid:
            tracker.log_sample_grid(image * mask, mask, output.clamp(0, 1), comp, image, step=step)
    log.info("step %d validation: loss %.4f psnr %.2f ssim %.4f", step, out["val/total"], out["val/psnr"],
             out["val/ssim"])
    model.train(was_training)
    return out


def _make_tracker(run_id: str | None, tracking_uri: str | None):
    from pconv import tracking

    if run_id is None:
        return tracking.Tracker.disabled()
    return tracking.Tracker(run_id, tracking_uri)


# ---------------------------------------------------------------------------------------------
# Driver side: checks, TorchTrainer setup, registration
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainSummary:
    run_name: str
    status: str                       # "finished" | "already-finished"
    step: int
    checkpoint: str | None            # URI of the final checkpoint directory
    mlflow_run_id: str | None
    model_version: str | None = None  # registered model version, if registered

    def describe(self) -> str:
        lines = [f"run {self.run_name!r}: {self.status} at step {self.step}",
                 f"  checkpoint: {self.checkpoint}", f"  mlflow run: {self.mlflow_run_id}"]
        if self.model_version:
            lines.append(f"  registered model version: {self.model_version}")
        return "\n".join(lines)


def run_dir(cfg: TrainConfig) -> str:
    return storage.join(_storage_uri(cfg.storage), cfg.run_name)


def latest_checkpoint(cfg: TrainConfig) -> tuple[str, dict[str, Any]] | None:
    """(URI, meta) of the newest COMPLETE checkpoint of this run in storage, or None."""
    return ckpt.latest(run_dir(cfg))


def check_inputs(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """Fail fast (before Ray takes resources) on unreachable or empty datasets."""
    manifests = {}
    for name in ("images", "masks"):
        uri = getattr(cfg, name)
        manifest_uri = storage.join(uri, "manifest.json")
        try:
            manifest = json.loads(storage.read_bytes(manifest_uri))
        except FileNotFoundError:
            raise ConfigError(f"--{name} {uri}: no manifest.json there; create shards with "
                              f"`python pipelines/prepare_data.py {name} SRC {uri}`") from None
        except Exception as exc:  # noqa: BLE001 - network / permission errors: say which URI
            raise ConfigError(f"--{name} {uri}: cannot read {manifest_uri}: {exc}") from exc
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
    return uri if storage.is_remote(uri) else str(Path(uri).expanduser().resolve())


def _run_config(cfg: TrainConfig):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    uri = _storage_uri(cfg.storage)
    kwargs: dict[str, Any] = {}
    if storage.is_remote(uri):
        # Ray trap: with storage_filesystem given, storage_path carries no scheme.
        kwargs["storage_filesystem"], kwargs["storage_path"] = storage.get_filesystem(uri)
    else:
        Path(uri).mkdir(parents=True, exist_ok=True)
        kwargs["storage_path"] = uri
    return RunConfig(name=cfg.run_name, failure_config=FailureConfig(max_failures=cfg.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep), **kwargs)


def run(cfg: TrainConfig, *, local_mode: bool = False) -> TrainSummary:
    """Train (or resume) the run described by ``cfg`` on the current Ray cluster; register the final model.

    ``local_mode`` runs the worker loop in this process (Ray Train's ``num_workers=0``): for fast tests.
    """
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from pconv import tracking

    cfg = cfg.validate()
    # Workers run in other directories (and on other nodes): make local paths absolute once, here.
    cfg = dataclasses.replace(cfg, images=_storage_uri(cfg.images), masks=_storage_uri(cfg.masks),
                              storage=_storage_uri(cfg.storage),
                              init_from=_storage_uri(cfg.init_from) if cfg.init_from and Path(cfg.init_from).exists()
                              else cfg.init_from)
    check_inputs(cfg)
    latest = latest_checkpoint(cfg)
    if latest and latest[1].get("step", 0) >= cfg.total_steps:
        log.info("run %r already finished at step %d (%s); nothing to do", cfg.run_name, latest[1]["step"], latest[0])
        return TrainSummary(cfg.run_name, "already-finished", int(latest[1]["step"]), latest[0],
                            latest[1].get("mlflow_run_id"))
    if latest:
        log.info("run %r resumes from %s (step %d)", cfg.run_name, latest[0], latest[1]["step"])

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = bool(gpus >= 1) if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu and gpus < 1:
        raise ConfigError("--use-gpu was given but the Ray cluster has no GPUs")
    cpus_per_worker = cfg.cpus_per_worker or (1.0 if use_gpu else 0.5)
    # Ray Data needs CPUs beyond the training workers' or the read tasks never schedule (a hang, not an error).
    try:
        data.check_headroom(ray.cluster_resources().get("CPU", 0), 0 if local_mode else cfg.workers * cpus_per_worker)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    tracking_uri = tracking.resolve_tracking_uri()
    run_id = tracking.start_or_resume_run(cfg.experiment, cfg.run_name,
                                          run_id=latest[1].get("mlflow_run_id") if latest else None)
    tracker = tracking.Tracker(run_id, tracking_uri) if run_id else tracking.Tracker.disabled()
    tracker.log_params(tracking.run_params(cfg, {"cluster/workers": cfg.workers, "cluster/use_gpu": use_gpu,
                                                 "cluster/gpu_type": _gpu_type(use_gpu),
                                                 "cluster/cpus_per_worker": cpus_per_worker}))

    datasets = {"train": data.build_train_dataset(cfg.images, cfg.masks, cfg.image_size, seed=cfg.seed)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "mlflow_run_id": run_id, "tracking_uri": tracking_uri},
        scaling_config=ScalingConfig(num_workers=0) if local_mode else ScalingConfig(
            num_workers=cfg.workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=_run_config(cfg),
        datasets=datasets,
    )
    try:
        result = trainer.fit()
    except Exception:
        tracker.set_terminated("FAILED")
        raise
    final = latest_checkpoint(cfg)
    summary = TrainSummary(cfg.run_name, "finished", int(final[1]["step"]) if final else cfg.total_steps,
                           final[0] if final else (result.checkpoint.path if result.checkpoint else None), run_id)
    if cfg.register_as and run_id and final:
        from pconv.inference import register_checkpoint

        try:
            summary.model_version = register_checkpoint(final[0], cfg.register_as, "candidate", cfg.experiment,
                                                        run_id, tracking_uri)
        except Exception as exc:  # noqa: BLE001 - the trained checkpoint is safe; registration can be redone
            log.error("registration failed (%s); the checkpoint is intact, register it later with "
                      "`python pipelines/register.py --checkpoint %s`", exc, final[0])
    tracker.set_terminated("FINISHED")
    return summary


def _gpu_type(use_gpu: bool) -> str:
    if not use_gpu:
        return "none"
    try:
        import ray

        types = {k for k in ray.cluster_resources() if k.startswith("accelerator_type:")}
        return ",".join(sorted(t.split(":", 1)[1] for t in types)) or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"
