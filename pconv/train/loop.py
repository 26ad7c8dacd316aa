"""The Ray Train worker loop of PConv U-Net training, with the paper's two phases (runs on every worker).

Phase 1 trains every layer with batch normalisation at lr 2e-4; phase 2 freezes the encoder's BN (running
statistics AND affine parameters) and fine-tunes at lr 5e-5 (Liu et al. 2018, Sec. 4.1). Everything a checkpoint
restores travels in one :class:`TrainState` (model, optimiser, grad scaler, step, phase, data position: epoch and
rows consumed per worker, :mod:`pconv.data.plan`, so a resume continues the data exactly); what a worker
knows for the whole run, in one :class:`WorkerContext`. :func:`train_loop_per_worker` reads in one screen; the
helpers below it do the bookkeeping: AMP settings, optimiser per phase, restore, checkpoints, validation, logging.
The driver side (checks, TorchTrainer, registration) is :mod:`pconv.train.driver`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pconv.tracking import checkpoints as ckpt
from pconv.data import stream as data
from pconv.core import metrics
from pconv.tracking import runs
from pconv.storage import uris
from pconv.train import state as train_checkpoint
from pconv.data import plan
from pconv.data.allocator import reuse_freed_memory
from pconv.core.config import SR_TASK, TrainConfig
from pconv.tracking.loading import load_model
from pconv.core.losses import LOSS_TERMS, InpaintingLoss, VGG16FeatureExtractor
from pconv.core.unet import PConvUNet, build_model
from pconv.data.inputs import net_input, to_float_batch
from pconv.data.plan import DataPosition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepEvent:
    """What a step hook (``run(cfg, step_hook=...)``) is shown on every rank: ``kind`` "batch" when a batch was
    drawn (``step`` = steps done before it, ``batch`` = its uint8 rows with ``id`` and ``skipped``), "checkpoint"
    right after the checkpoint of step ``step`` was reported."""

    kind: str
    rank: int
    step: int
    epoch: int
    batch: dict[str, Any] | None = None


StepHook = Callable[[StepEvent], None]  # observes the loop (tests: crash injection, sample tracing); returns nothing


def _no_hook(event: StepEvent) -> None:
    """The default step hook: nothing."""


# Below compute capability 8.0 (V100 sm70, T4 sm75) cuDNN has no native bf16 convolutions; torch still reports
# bf16 as "supported" there (emulated, slow), so the rule reads the capability, not torch.cuda.is_bf16_supported().
BF16_MIN_CAPABILITY = (8, 0)


@dataclass
class AmpSettings:
    enabled: bool
    dtype: torch.dtype | None
    use_scaler: bool

    @staticmethod
    def choose(mode: str, device: torch.device) -> "AmpSettings":
        """The one precision rule (training and benchmarks). ``auto``: off on CPU; on CUDA fp16 + GradScaler below
        compute capability 8.0 (V100, T4), bf16 at 8.0 and above (A100, H100). ``fp16``/``bf16``/``off``: as
        asked (the scaler goes with fp16 on CUDA)."""
        device = torch.device(device)
        if mode == "off" or (mode == "auto" and device.type != "cuda"):
            return AmpSettings(False, None, False)
        if mode == "auto":
            mode = "bf16" if torch.cuda.get_device_capability(device) >= BF16_MIN_CAPABILITY else "fp16"
        if mode == "bf16":
            return AmpSettings(True, torch.bfloat16, False)
        return AmpSettings(True, torch.float16, device.type == "cuda")


@dataclass
class WorkerContext:
    """What a worker knows for the whole run: the config, its place in the group, device, precision, MLflow run."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    amp: AmpSettings
    run_id: str | None

    @classmethod
    def current(cls, cfg: TrainConfig, run_id: str | None) -> "WorkerContext":
        import ray.train
        import ray.train.torch

        ctx, device = ray.train.get_context(), ray.train.torch.get_device()
        return cls(cfg, ctx.get_world_rank(), ctx.get_world_size(), device, AmpSettings.choose(cfg.amp, device), run_id)


@dataclass
class TrainState:
    """What a checkpoint restores: the (DDP-wrapped) model, optimiser, grad scaler, and the position in training."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0
    phase: int = 1
    epoch: int = 0
    position: DataPosition | None = None  # where the data stream resumes (None: epoch 0, row 0)
    counters: dict[str, int] | None = None  # the run's counters at the checkpoint resumed from (_Meter.totals)

    def checkpoint_state(self, seed: int, position: DataPosition | None = None,
                         counters: dict[str, int] | None = None) -> dict[str, Any]:
        """The ``state.pt`` contents (pconv.tracking.checkpoints), with the unwrapped model's state dict, the data
        position of all ranks (``position``, gathered by the caller) and the run's counters (summed over ranks)."""
        return {"model": ckpt.unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "phase": self.phase, "epoch": self.epoch,
                "data_seed": seed, "data_position": position.to_dict() if position else None,
                "counters": counters or {}}


def phase_of(step: int, cfg: TrainConfig) -> int:
    """Phase (1 or 2) of the step about to run (0-based step count)."""
    return 1 if step < cfg.phase1_steps else 2


def make_optimizer(model: torch.nn.Module, phase: int, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the parameters that train in this phase (phase 2 excludes the frozen encoder BN), at the phase's
    effective lr (``lr_scaling`` applied: :meth:`TrainConfig.effective_lr`; the logged ``lr`` metric is this one)."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.effective_lr(phase))


def prepare_for_training(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """``--compile`` (in place: state-dict keys unchanged), then Ray Train's DDP wrapper with ``--ddp-bucket-mb``
    and, for ``--grad-compression fp16``, DDP's ``fp16_compress_hook`` (gradients all-reduced in fp16)."""
    import ray.train.torch
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook
    from torch.nn.parallel import DistributedDataParallel

    if cfg.compile and getattr(model, "_compiled_call_impl", None) is None:
        model.compile()
    ddp_kwargs = {"bucket_cap_mb": cfg.ddp_bucket_mb} if cfg.ddp_bucket_mb else None
    wrapped = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs)
    if cfg.grad_compression == "fp16":
        if isinstance(wrapped, DistributedDataParallel):
            wrapped.register_comm_hook(None, fp16_compress_hook)
        else:
            log.info("grad_compression=fp16 has no effect with a single worker (no DDP)")
    return wrapped


# ---------------------------------------------------------------------------------------------
# The worker loop
# ---------------------------------------------------------------------------------------------
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = TrainConfig.from_dict(loop_config["config"]).validate()
    reuse_freed_memory()  # this process consumes the batches (see the function)
    ctx = WorkerContext.current(cfg, loop_config.get("mlflow_run_id"))
    if cfg.deterministic:
        _use_deterministic_algorithms()
    torch.manual_seed(cfg.seed + ctx.rank)  # model init: rank 0's weights are broadcast by DDP
    state = _initial_state(ctx)
    loss_fn = InpaintingLoss(VGG16FeatureExtractor(weights=cfg.vgg_weights, read_bytes=uris.read_bytes)).to(ctx.device)
    if cfg.compile:
        loss_fn.compile()  # VGG features, Gram matrices, masked L1 and TV terms: element-wise work a compiler fuses
    tracker = runs.Tracker(ctx.run_id, loop_config.get("tracking_uri")) if ctx.rank == 0 else None
    val = _load_val(cfg, ctx.device) if ctx.rank == 0 else None
    stream = plan.worker_stream(cfg.images, _mask_source(cfg), cfg.image_size, loop_config.get("train_units"),
                                        seed=cfg.seed, batch_size=cfg.per_worker_batch, position=state.position,
                                        rank=ctx.rank, world=ctx.world, device=ctx.device,
                                        decode_concurrency=loop_config.get("decode_concurrency"))
    hook: StepHook = loop_config.get("step_hook") or _no_hook
    meter = _Meter(state.counters, ctx.rank)
    log.info("rank %d/%d on %s: starting at step %d (phase %d) of %d, amp=%s", ctx.rank, ctx.world, ctx.device,
             state.step, state.phase, cfg.total_steps, ctx.amp)

    while state.step < cfg.total_steps:
        if phase_of(state.step, cfg) != state.phase:
            _enter_phase_2(state, cfg)
        t0 = time.perf_counter()
        state.epoch, batch = stream.next()
        t_data = time.perf_counter()
        hook(StepEvent("batch", ctx.rank, state.step, state.epoch, batch))
        meter.skipped += _sum_skipped(batch)
        terms, images = _train_step(state, ctx, loss_fn, batch, meter)
        meter.add(terms, t_data - t0, time.perf_counter() - t0, images * ctx.world)

        last = state.step == cfg.total_steps
        if state.step % cfg.log_every == 0 or last:
            _log_progress(state, ctx, meter, tracker)
        if val is not None and (state.step % cfg.val_every == 0 or state.step % cfg.sample_every == 0 or last):
            _validate(state, ctx, loss_fn, val, tracker, grid=state.step % cfg.sample_every == 0 or last)
        if state.step % cfg.checkpoint_every == 0 or last:
            train_checkpoint.report(state, ctx, stream, meter.totals(ctx))
            hook(StepEvent("checkpoint", ctx.rank, state.step, state.epoch))
    stream.close()


def _train_step(state: TrainState, ctx: WorkerContext, loss_fn: InpaintingLoss, batch: dict[str, Any],
                meter: "_Meter") -> tuple[dict[str, torch.Tensor], int]:
    """One optimiser step on this worker's batch (skipped on every rank when any rank's loss is not finite)."""
    inputs = to_float_batch(batch, ctx.device)  # uint8 rows -> float on the device (4x less to copy)
    image, mask, x = inputs["image"], inputs["mask"], inputs["input"]  # x: the net's image (sr: the LR canvas)
    if ctx.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    state.model.train()
    with torch.autocast(ctx.device.type, dtype=ctx.amp.dtype, enabled=ctx.amp.enabled):
        output, _ = state.model(x, mask)
        terms = loss_fn(mask, output.float(), image)
    state.optimizer.zero_grad(set_to_none=True)
    if _all_finite(terms["total"], ctx.world):
        meter.consecutive_nan = 0
        state.scaler.scale(terms["total"]).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        meter.nan_steps += 1
        meter.consecutive_nan += 1
        log.warning("step %d: non-finite loss (%d in a row); step skipped", state.step, meter.consecutive_nan)
        if meter.consecutive_nan >= ctx.cfg.max_nan_steps:
            raise FloatingPointError(f"{meter.consecutive_nan} consecutive non-finite losses at step {state.step} "
                                     f"(max_nan_steps={ctx.cfg.max_nan_steps}); stopping without checkpointing")
    state.step += 1
    return terms, image.shape[0]


# ---------------------------------------------------------------------------------------------
# Bookkeeping used by the loop
# ---------------------------------------------------------------------------------------------
class _Meter:
    """Loss terms and timings averaged between two log lines; skipped rows (this rank's: the logged metric is the
    sum over ranks) and non-finite steps (the same on every rank) of this run, continued from ``counters`` (the
    run's totals at the checkpoint resumed from: rank 0 carries the summed skipped rows)."""

    def __init__(self, counters: dict[str, int] | None = None, rank: int = 0) -> None:
        counters = counters or {}
        self.skipped = int(counters.get(runs.DATA_SKIPPED, 0)) if rank == 0 else 0
        self.nan_steps, self.consecutive_nan = int(counters.get(runs.NAN_STEPS, 0)), 0
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

    def flush(self, state: TrainState, ctx: WorkerContext) -> dict[str, float]:
        """The training metrics of the window (loss terms averaged over all workers), then a new window."""
        means = _world_mean((self.sums / max(1, self.n)).to(ctx.device, torch.float32), ctx.world).cpu()
        out = {runs.loss_metric(k): float(v) for k, v in zip(LOSS_TERMS, means)}
        out[runs.THROUGHPUT] = self.images / self.total if self.total > 0 else 0.0
        out[runs.DATA_WAIT] = self.wait / self.total if self.total > 0 else 0.0
        out.update({runs.LR: state.optimizer.param_groups[0]["lr"], runs.PHASE: state.phase,
                    **self.totals(ctx), runs.EPOCH: state.epoch})
        self.reset()
        return out

    def totals(self, ctx: WorkerContext) -> dict[str, int]:
        """The run's counters so far, skipped rows summed over the ranks (a collective: every rank calls it)."""
        return {runs.DATA_SKIPPED: int(train_checkpoint.world_sum(torch.tensor([self.skipped]), ctx).item()),
                runs.NAN_STEPS: self.nan_steps}


def _log_progress(state: TrainState, ctx: WorkerContext, meter: _Meter, tracker: runs.Tracker | None) -> None:
    values = meter.flush(state, ctx)  # every rank: the loss means are an all-reduce
    if tracker:
        tracker.log_metrics(values, step=state.step)
    if ctx.rank == 0:
        log.info("step %d/%d phase %d loss %.4f (%.1f img/s, data wait %.0f%%)", state.step, ctx.cfg.total_steps,
                 state.phase, values[runs.loss_metric("total")], values[runs.THROUGHPUT],
                 100 * values[runs.DATA_WAIT])


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


def _initial_state(ctx: WorkerContext) -> TrainState:
    """The model, optimiser and scaler at the run's latest checkpoint (or --init-from weights, or fresh)."""
    cfg = ctx.cfg
    model: torch.nn.Module = build_model(cfg.layer_size, conv=cfg.conv)
    saved, step, epoch = _restore(model, cfg)
    phase = phase_of(step, cfg)
    if phase == 2:
        model.freeze_encoder_bn()
    if ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = prepare_for_training(model, cfg)
    state = TrainState(model, make_optimizer(model, phase, cfg),
                       torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp.use_scaler), step, phase, epoch)
    if saved is not None:
        if saved.get("phase") == phase and saved.get("optimizer"):  # at the phase switch: a new optimiser
            state.optimizer.load_state_dict(saved["optimizer"])
        if saved.get("scaler") and ctx.amp.use_scaler:  # the loss scale carries over phases, as uninterrupted
            state.scaler.load_state_dict(saved["scaler"])
        state.position = DataPosition.from_dict(saved.get("data_position"))
        state.counters = saved.get("counters")
        if state.position is None:
            log.warning("checkpoint has no data position (older format): epoch %d restarts from its first row",
                        epoch)
            state.position = DataPosition(epoch, [0] * ctx.world, ctx.world)
    return state


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
        source, _info = load_model(cfg.init_from)
        model.load_state_dict(ckpt.unwrap(source).state_dict())
        log.info("initialised weights from %s", cfg.init_from)
    return None, 0, 0


def _enter_phase_2(state: TrainState, cfg: TrainConfig) -> None:
    """Phase 1 -> 2: freeze encoder BN, then rebuild DDP and the optimiser over the parameters that still train."""
    bare = ckpt.unwrap(state.model)
    bare.freeze_encoder_bn()
    state.phase = 2
    state.model = prepare_for_training(bare, cfg)
    state.optimizer = make_optimizer(state.model, state.phase, cfg)
    log.info("step %d: phase 2 (encoder BN frozen, lr %g)", state.step, cfg.effective_lr(2))


def _use_deterministic_algorithms() -> None:
    """``--deterministic``: deterministic torch kernels where they exist (warn where not), no cuDNN autotuning."""
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS determinism (read at CUDA init)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _load_val(cfg: TrainConfig, device: torch.device) -> dict[str, torch.Tensor] | None:
    pairs = data.load_val_pairs(cfg.images, _mask_source(cfg), cfg.image_size, cfg.val_size)
    if pairs is None or len(pairs["image"]) == 0:
        log.warning("no validation pairs available; validation and sample grids are off")
        return None
    val = {k: torch.as_tensor(v).to(device) for k, v in pairs.items() if k in ("image", "mask", "lr")}
    return {**val, "input": net_input(val)}


def _mask_source(cfg: TrainConfig) -> "str | data.SRPairs":
    """Where the masks come from: the mask shards, or (task sr) the grid of the crops' LR pixels (pconv.data.transforms)."""
    return data.SRPairs(cfg.sr_scale) if cfg.task == SR_TASK else cfg.masks


@torch.no_grad()
def _validate(state: TrainState, ctx: WorkerContext, loss_fn: InpaintingLoss, val: dict[str, torch.Tensor],
              tracker: runs.Tracker | None, grid: bool) -> dict[str, float]:
    """Loss terms + PSNR/SSIM of the composite on the fixed validation pairs (rank 0 only)."""
    model = ckpt.unwrap(state.model)
    was_training = model.training
    model.eval()
    image, mask, x = val["image"], val["mask"], val["input"]
    with torch.autocast(image.device.type, dtype=ctx.amp.dtype, enabled=ctx.amp.enabled):
        output, _ = model(x, mask)
    output = output.float()
    terms = loss_fn(mask, output, image)
    comp = (mask * x + (1 - mask) * output).clamp(0, 1)  # sr: the LR pixels kept, as super-resolution returns
    out = {runs.val_metric(k): float(v) for k, v in terms.items()}
    out[runs.VAL_PSNR] = float(torch.as_tensor(metrics.psnr(comp, image)).float().mean())
    out[runs.VAL_SSIM] = float(torch.as_tensor(metrics.ssim(comp, image)).float().mean())
    if tracker:
        tracker.log_metrics(out, step=state.step)
        if grid:  # masked input | mask | output | composite | ground truth, one row per pair (sr: no mask column)
            cols = [x * mask, mask, output.clamp(0, 1), comp, image]
            tracker.log_sample_grid(cols[:1] + cols[2:] if "lr" in val else cols, step=state.step)
    log.info("step %d validation: loss %.4f psnr %.2f ssim %.4f", state.step, out[runs.val_metric("total")],
             out[runs.VAL_PSNR], out[runs.VAL_SSIM])
    model.train(was_training)
    return out


__all__ = ["AmpSettings", "TrainState", "WorkerContext", "make_optimizer", "phase_of", "prepare_for_training",
           "train_loop_per_worker"]
