"""The Ray Train worker loop of PConv U-Net training, with the paper's two phases (runs on every worker).

Phase 1 trains every layer with batch normalisation at lr 2e-4; phase 2 freezes the encoder's BN (running
statistics AND affine parameters) and fine-tunes at lr 5e-5 (Liu et al. 2018, Sec. 4.1). What a checkpoint restores
travels in one :class:`~pconv.train.state.TrainState`, what a worker knows for the whole run in one
:class:`~pconv.train.state.WorkerContext` (both :mod:`pconv.train.state`, with the checkpoint record).
:func:`train_loop_per_worker` reads in one screen; the helpers below it do the bookkeeping: optimiser per phase, DDP
and gradient compression, restore, validation, the metric window.

The step hook: ``run(cfg, step_hook=...)`` (:func:`pconv.train.driver.run`) gives every worker a callable that the
loop calls with a :class:`StepEvent` for each batch drawn and after each checkpoint. It only observes; tests use it
for crash injection and sample tracing (tests/fault_hooks.py), so no test code lives in the library.
The driver side (checks, TorchTrainer, registration) is :mod:`pconv.train.driver`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from pconv.core import metrics
from pconv.core.config import SR_TASK, TrainConfig
from pconv.core.losses import LOSS_TERMS, InpaintingLoss, VGG16FeatureExtractor
from pconv.core.unet import PConvUNet, build_model
from pconv.data import stream, transforms
from pconv.data.allocator import reuse_freed_memory
from pconv.data.inputs import to_float_batch
from pconv.storage import uris
from pconv.tracking import checkpoints, runs
from pconv.tracking.lineage import LineageRecorder
from pconv.tracking.loading import load_model
from pconv.train.spot import start_watcher
from pconv.train.state import TrainState, WorkerContext, report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepEvent:
    """What the step hook (``run(cfg, step_hook=...)``) is shown on every rank: ``kind`` "batch" when a batch was
    drawn (``step`` = steps done before it, ``batch`` = its uint8 rows with ``id`` and ``skipped``), "checkpoint"
    right after the checkpoint of step ``step`` was reported. The hook returns nothing; what it raises ends the
    worker like any error of the loop."""

    kind: str
    rank: int
    step: int
    epoch: int
    batch: dict[str, Any] | None = None


StepHook = Callable[[StepEvent], None]  # observes the loop (tests: crash injection, sample tracing); returns nothing


def _no_hook(event: StepEvent) -> None:
    """The default step hook: nothing."""


def phase_of(step: int, cfg: TrainConfig) -> int:
    """Phase (1 or 2) of the step about to run (0-based step count)."""
    return 1 if step < cfg.phase1_steps else 2


def make_optimizer(model: torch.nn.Module, phase: int, cfg: TrainConfig, world: int | None = None) -> torch.optim.Optimizer:
    """Adam over the parameters that train in this phase (phase 2 excludes the frozen encoder BN), at the phase's
    effective lr for ``world`` workers (``lr_scaling`` applied to the global batch: :meth:`TrainConfig.effective_lr`;
    the logged ``lr`` metric is this one)."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.effective_lr(phase, world))


def compress_hook(ctx: WorkerContext) -> Callable | None:
    """DDP's communication hook for ``--grad-compression``: None (fp32 all-reduce) for ``none``; for ``fp16``, the
    gradients travel at 16 bits. fp16 flushes values below 6e-8 to zero and loses precision below 6.1e-5, which only
    a GradScaler's loss scale keeps gradients away from: so ``fp16_compress_hook`` when the scaler is in use (amp
    fp16 on CUDA), else ``bf16_compress_hook`` (bf16 has fp32's exponent range: amp bf16, amp off, CPU)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if ctx.cfg.grad_compression != "fp16":
        return None
    return default_hooks.fp16_compress_hook if ctx.amp.use_scaler else default_hooks.bf16_compress_hook


def ddp_options(cfg: TrainConfig) -> dict[str, Any]:
    """DistributedDataParallel's arguments: ``--ddp-bucket-mb``, and one fixed bucket layout for every step.

    DDP (torch 2.14) reduces the first step's gradients in one bucket, then regroups them into buckets in the order
    they became ready, unless it looks for unused parameters (its Reducer rebuilds buckets only with
    ``static_graph`` or without ``find_unused_parameters``). A resumed worker group builds a new DDP, so its first
    step reduced in the first-step layout where the uninterrupted run used the rebuilt one; with 3 or more workers a
    ring all-reduce adds an element's values in an order set by its offset in the bucket, so that step's gradients
    differed in the last bit and the resumed run drifted off the uninterrupted one (issue 25). With
    ``find_unused_parameters`` the layout of DDP's constructor (buckets of ``bucket_cap_mb``, parameters in reverse
    definition order: for this U-Net nearly the order backward makes their gradients) stays for every step of every
    DDP, and resume is bit-exact. Its cost: one walk of the autograd graph per forward (~150 nodes for the U-Net),
    and DDP warns once per process that it found no unused parameter (expected)."""
    options: dict[str, Any] = {"find_unused_parameters": True}
    if cfg.ddp_bucket_mb:
        options["bucket_cap_mb"] = cfg.ddp_bucket_mb
    return options


def prepare_for_training(model: torch.nn.Module, ctx: WorkerContext) -> torch.nn.Module:
    """``--compile`` (in place: state-dict keys unchanged), then Ray Train's DDP wrapper with :func:`ddp_options`
    and the gradient compression hook of :func:`compress_hook`."""
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    cfg = ctx.cfg
    if cfg.compile and getattr(model, "_compiled_call_impl", None) is None:
        model.compile()
    wrapped = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_options(cfg))
    hook = compress_hook(ctx)
    if hook is not None:
        if isinstance(wrapped, DistributedDataParallel):
            wrapped.register_comm_hook(None, hook)
        else:
            log.info("grad_compression=%s has no effect with a single worker (no DDP)", cfg.grad_compression)
    return wrapped


# ---------------------------------------------------------------------------------------------
# The worker loop
# ---------------------------------------------------------------------------------------------
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One worker's run. ``loop_config`` (:func:`pconv.train.driver.run`): ``config`` (the TrainConfig as a dict),
    ``mlflow_run_id``, ``tracking_uri``, ``train_units``, ``decode_concurrency`` and ``step_hook``."""
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
    val = _load_val(cfg) if ctx.rank == 0 else None
    batches = stream.worker_stream(cfg.images, _pair_source(cfg, "train"), cfg.image_size,
                                   loop_config.get("train_units"), seed=cfg.seed, batch_size=cfg.per_worker_batch,
                                   position=state.position, rank=ctx.rank, world=ctx.world, agree=ctx.every_rank,
                                   decode_concurrency=loop_config.get("decode_concurrency"))
    hook: StepHook = loop_config.get("step_hook") or _no_hook
    spot = start_watcher(cfg.spot_notice_url, cfg.spot_notice_poll_s)  # None on every rank, or a watcher on each
    spot_checkpointed = False
    lineage = LineageRecorder(tracker, ctx.world) if cfg.lineage else None
    if lineage is not None and state.step > 0:
        lineage.truncate_after(state.step)  # the steps after the checkpoint are redone: their old rows go
    window = MetricWindow(ctx.device)
    log.info("rank %d/%d on %s: starting at step %d (phase %d) of %d, amp=%s", ctx.rank, ctx.world, ctx.device,
             state.step, state.phase, cfg.total_steps, ctx.amp)
    if ctx.rank == 0 and (cfg.elastic or ctx.world != cfg.workers):
        log.warning("elastic run: %d of %d worker(s) up; global batch %d (%d per worker), lr %g (lr_scaling %s)",
                    ctx.world, cfg.workers, cfg.global_batch(ctx.world), cfg.per_worker_batch,
                    cfg.effective_lr(state.phase, ctx.world), cfg.lr_scaling)

    while state.step < cfg.total_steps:
        if phase_of(state.step, cfg) != state.phase:
            _enter_phase_2(state, ctx)
        t0 = time.perf_counter()
        state.epoch, batch = batches.next()
        t_data = time.perf_counter()
        hook(StepEvent("batch", ctx.rank, state.step, state.epoch, batch))
        if lineage is not None:
            lineage.add(state.epoch, state.step + 1, batch["id"])
        state.counters.skipped += skipped_rows(batch)
        terms, images = _train_step(state, ctx, loss_fn, batch)
        window.add(terms, t_data - t0, time.perf_counter() - t0, images * ctx.world)
        if tracker:  # every step: an elastic run's group size changes between restarts
            tracker.log_metrics({runs.WORLD_SIZE: ctx.world}, step=state.step)
        while batches.ended:  # this step's batch began an epoch: the last one's unused rows, summed over the ranks
            _, unused = batches.ended.pop(0)
            total = int(ctx.all_reduce(torch.tensor([unused], dtype=torch.int64)).item())
            if tracker:
                tracker.log_metrics({runs.EPOCH_UNUSED: total}, step=state.step)

        last = state.step == cfg.total_steps
        if state.step % cfg.log_every == 0 or last:
            _log_progress(state, ctx, window, tracker)
        if val is not None and (state.step % cfg.val_every == 0 or state.step % cfg.sample_every == 0 or last):
            _validate(state, ctx, loss_fn, val, tracker, grid=state.step % cfg.sample_every == 0 or last)
        reason = "final" if last else "periodic" if state.step % cfg.checkpoint_every == 0 else None
        # A spot notice on any rank's node (one all-reduce, every rank): checkpoint now, once, on every rank.
        if spot is not None and not spot_checkpointed and not ctx.every_rank(not spot.seen):
            spot_checkpointed = True
            reason = reason or "spot notice"
            if ctx.rank == 0:
                log.warning("step %d: a spot interruption notice reached the group: checkpointing now", state.step)
        if reason:
            if lineage is not None:
                lineage.flush(ctx.gather)  # before the report: a checkpoint Ray can resume from has its rows written
            if tracker:  # its metrics too (at once when MLflow is down: they stay queued, no stall)
                tracker.flush()
            report(state, ctx, batches, reason)  # every rank (a barrier); rank 0 writes the checkpoint
            hook(StepEvent("checkpoint", ctx.rank, state.step, state.epoch))
    batches.close()
    if spot is not None:
        spot.stop()
    if lineage is not None:
        lineage.close()
    if tracker:  # queued metrics reach MLflow, or what did not is counted in the run's tags
        tracker.close()


def _train_step(state: TrainState, ctx: WorkerContext, loss_fn: InpaintingLoss,
                batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], int]:
    """One optimiser step on this worker's batch (skipped on every rank when any rank's loss is not finite)."""
    inputs = to_float_batch(batch, ctx.device)  # uint8 rows -> float on the device (4x less to copy)
    image, mask, x = inputs["image"], inputs["mask"], inputs["input"]  # x: the net's image (sr: the LR canvas)
    if ctx.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    state.model.train()
    with torch.autocast(ctx.device.type, dtype=ctx.amp.dtype, enabled=ctx.amp.enabled):
        output, _ = state.model(x, mask)
        terms = loss_fn(mask, output.float(), image, known=x)  # I_comp keeps the input's known pixels (sr: LR canvas)
    state.optimizer.zero_grad(set_to_none=True)
    counters = state.counters
    # One all-reduce + host read per step, between forward and backward (the device idles while the host queues the
    # backward): its cost is the "finiteness check per step" row of benchmarks/gpu_check.py.
    if ctx.every_rank(torch.isfinite(terms["total"].detach())):
        counters.consecutive_nan = 0
        state.scaler.scale(terms["total"]).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        counters.nan_steps += 1
        counters.consecutive_nan += 1
        log.warning("step %d: non-finite loss (%d in a row); step skipped", state.step, counters.consecutive_nan)
        if counters.consecutive_nan >= ctx.cfg.max_nan_steps:
            raise FloatingPointError(f"{counters.consecutive_nan} consecutive non-finite losses at step {state.step} "
                                     f"(max_nan_steps={ctx.cfg.max_nan_steps}); stopping without checkpointing")
    state.step += 1
    return terms, image.shape[0]


# ---------------------------------------------------------------------------------------------
# Bookkeeping used by the loop
# ---------------------------------------------------------------------------------------------
class MetricWindow:
    """The training metrics between two log lines. The loss terms of the finite steps are summed ON THE DEVICE, so
    :meth:`add` makes the host wait for nothing; :meth:`flush` reads them once per log line, averaged over the
    workers, with timings, throughput and the run's counters."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(LOSS_TERMS), dtype=torch.float64, device=self.device)
        self.steps = torch.zeros((), dtype=torch.int64, device=self.device)  # steps whose terms were all finite
        self.wait = self.total = 0.0
        self.images = 0

    def add(self, terms: dict[str, torch.Tensor], wait: float, total: float, images: int) -> None:
        values = torch.stack([terms[k].detach().float() for k in LOSS_TERMS]).to(self.device, torch.float64)
        finite = torch.isfinite(values).all()
        self.sums += torch.where(finite, values, 0.0)  # a non-finite step adds nothing
        self.steps += finite
        self.wait += wait
        self.total += total
        self.images += images

    def flush(self, state: TrainState, ctx: WorkerContext) -> dict[str, float]:
        """The training metrics of the window (loss terms averaged over all workers), then a new window."""
        means = ctx.all_reduce((self.sums / self.steps.clamp(min=1)).float(), "mean").cpu()
        out = {runs.loss_metric(k): float(v) for k, v in zip(LOSS_TERMS, means)}
        out[runs.THROUGHPUT] = self.images / self.total if self.total > 0 else 0.0
        out[runs.DATA_WAIT] = self.wait / self.total if self.total > 0 else 0.0
        out.update({runs.LR: state.optimizer.param_groups[0]["lr"], runs.PHASE: state.phase,
                    **state.counters.totals(ctx), runs.EPOCH: state.epoch})
        self.reset()
        return out


def _log_progress(state: TrainState, ctx: WorkerContext, window: MetricWindow, tracker: runs.Tracker | None) -> None:
    values = window.flush(state, ctx)  # every rank: the loss means and counters are all-reduces
    if tracker:
        tracker.log_metrics(values, step=state.step)
    if ctx.rank == 0:
        log.info("step %d/%d phase %d loss %.4f (%.1f img/s, data wait %.0f%%)", state.step, ctx.cfg.total_steps,
                 state.phase, values[runs.loss_metric("total")], values[runs.THROUGHPUT],
                 100 * values[runs.DATA_WAIT])


def skipped_rows(batch: dict[str, Any]) -> int:
    """The corrupt rows a batch's ``skipped`` column counts (dropped before its rows; a CPU tensor: no device wait)."""
    skipped = batch.get("skipped")
    if skipped is None:
        return 0
    return int(torch.as_tensor(skipped).sum().item())


def _initial_state(ctx: WorkerContext) -> TrainState:
    """The model, optimiser and scaler at the run's latest checkpoint (or --init-from weights, or fresh)."""
    cfg = ctx.cfg
    model: torch.nn.Module = build_model(cfg.layer_size, conv=cfg.conv)
    saved = _restore(model, cfg)
    step = int(saved["step"]) if saved is not None else 0
    phase = phase_of(step, cfg)
    if phase == 2:
        model.freeze_encoder_bn()
    if ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = prepare_for_training(model, ctx)
    state = TrainState(model, make_optimizer(model, phase, cfg, ctx.world),
                       torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp.use_scaler), step, phase)
    if saved is not None:
        state.resume_from(saved, ctx)
    return state


def _restore(model: PConvUNet, cfg: TrainConfig) -> dict[str, Any] | None:
    """Load the weights of the run's latest checkpoint (Ray passes it on restart/re-run) and return its ``state.pt``
    record; else load the --init-from weights (no record)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            saved = checkpoints.load_state(directory)
        model.load_state_dict(saved["model"])
        if saved.get("phase") == 2:
            model.freeze_encoder_bn()
        log.info("resumed from checkpoint at step %d (phase %d)", saved["step"], saved["phase"])
        return saved
    if cfg.init_from:
        source, _info = load_model(cfg.init_from)
        model.load_state_dict(checkpoints.unwrap(source).state_dict())
        log.info("initialised weights from %s", cfg.init_from)
    return None


def _enter_phase_2(state: TrainState, ctx: WorkerContext) -> None:
    """Phase 1 -> 2: freeze encoder BN, then rebuild DDP and the optimiser over the parameters that still train."""
    bare = checkpoints.unwrap(state.model)
    bare.freeze_encoder_bn()
    state.phase = 2
    state.model = prepare_for_training(bare, ctx)
    state.optimizer = make_optimizer(state.model, state.phase, ctx.cfg, ctx.world)
    log.info("step %d: phase 2 (encoder BN frozen, lr %g)", state.step, ctx.cfg.effective_lr(2, ctx.world))


def _use_deterministic_algorithms() -> None:
    """``--deterministic``: deterministic torch kernels where they exist (warn where not), no cuDNN autotuning."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS determinism (read at CUDA init)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _pair_source(cfg: TrainConfig, split: str) -> transforms.PairSource:
    """The pair source of ``cfg.task`` for ``split``: the SR grid of ``cfg.sr_scale``, or the mask bank of
    ``cfg.masks`` (:func:`pconv.data.transforms.load_mask_bank`)."""
    return transforms.SRPairs(cfg.sr_scale) if cfg.task == SR_TASK else transforms.load_mask_bank(cfg.masks, split)


def _load_val(cfg: TrainConfig) -> stream.ValPairs | None:
    """The fixed validation pairs (rank 0), or None (logged): validation and sample grids are then off."""
    pairs = stream.load_val_pairs(cfg.images, _pair_source(cfg, "val"), cfg.image_size, cfg.val_size)
    if pairs is None or len(pairs) == 0:
        log.warning("no validation pairs available; validation and sample grids are off")
        return None
    return pairs


@torch.no_grad()
def _validate(state: TrainState, ctx: WorkerContext, loss_fn: InpaintingLoss, val: stream.ValPairs,
              tracker: runs.Tracker | None, grid: bool) -> dict[str, float]:
    """Loss terms + PSNR/SSIM of the composite on the fixed validation pairs (rank 0 only)."""
    model = checkpoints.unwrap(state.model)
    was_training = model.training
    model.eval()
    inputs = val.batch(ctx.device)
    image, mask, x = inputs["image"], inputs["mask"], inputs["input"]  # x: the net's image (sr: the LR canvas)
    with torch.autocast(image.device.type, dtype=ctx.amp.dtype, enabled=ctx.amp.enabled):
        output, _ = model(x, mask)
    output = output.float()
    terms = loss_fn(mask, output, image, known=x)  # I_comp as in training: the known pixels of the net's input
    comp = (mask * x + (1 - mask) * output).clamp(0, 1)  # sr: the LR pixels kept, as super-resolution returns
    out = {runs.val_metric(k): float(v) for k, v in terms.items()}
    out[runs.VAL_PSNR] = float(torch.as_tensor(metrics.psnr(comp, image)).float().mean())
    out[runs.VAL_SSIM] = float(torch.as_tensor(metrics.ssim(comp, image)).float().mean())
    if tracker:
        tracker.log_metrics(out, step=state.step)
        if grid:  # masked input | mask | output | composite | ground truth, one row per pair (sr: no mask column)
            cols = [x * mask, mask, output.clamp(0, 1), comp, image]
            tracker.log_sample_grid(cols if val.mask_varies else cols[:1] + cols[2:], step=state.step)
    log.info("step %d validation: loss %.4f psnr %.2f ssim %.4f", state.step, out[runs.val_metric("total")],
             out[runs.VAL_PSNR], out[runs.VAL_SSIM])
    model.train(was_training)
    return out


__all__ = ["MetricWindow", "StepEvent", "StepHook", "compress_hook", "ddp_options", "make_optimizer", "phase_of",
           "prepare_for_training", "skipped_rows", "train_loop_per_worker"]
