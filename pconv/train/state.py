"""The state of one training worker (Ray Train) and the record a checkpoint keeps of it.

- :class:`WorkerContext`: what a worker knows for the whole run (the config, its rank in a group of ``world``, its
  device, its precision :class:`AmpSettings`, the MLflow run), and :meth:`WorkerContext.all_reduce`, the one way
  the worker combines values over the ranks (a no-op for one worker).
- :class:`TrainState`: what a checkpoint restores: the (DDP-wrapped) model, optimiser, grad scaler, step, phase,
  epoch, the data position (:class:`pconv.data.plan.DataPosition`: the epoch and how many rows of it each rank
  consumed, which makes a resume exact) and the run's :class:`Counters`.
- The checkpoint record: :meth:`TrainState.record` is ``state.pt`` (:mod:`pconv.tracking.checkpoints`),
  :meth:`TrainState.resume_from` reads it back, :func:`report` writes the directory with ``meta.json`` on rank 0
  and reports it to Ray Train from every rank.

The worker loop (:mod:`pconv.train.loop`) imports this module; this module imports nothing of the loop.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from pconv.core.config import TrainConfig
from pconv.data.plan import DataPosition, WorkerStream
from pconv.tracking import checkpoints, runs

log = logging.getLogger(__name__)

# Below compute capability 8.0 (V100 sm70, T4 sm75) cuDNN has no native bf16 convolutions; torch still reports
# bf16 as "supported" there (emulated, slow), so the rule reads the capability, not torch.cuda.is_bf16_supported().
BF16_MIN_CAPABILITY = (8, 0)

Reduction = Literal["sum", "mean", "min"]


@dataclass
class AmpSettings:
    enabled: bool
    dtype: torch.dtype | None
    use_scaler: bool

    @staticmethod
    def choose(mode: str, device: torch.device) -> AmpSettings:
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
    def current(cls, cfg: TrainConfig, run_id: str | None) -> WorkerContext:
        import ray.train
        import ray.train.torch

        ctx, device = ray.train.get_context(), ray.train.torch.get_device()
        return cls(cfg, ctx.get_world_rank(), ctx.get_world_size(), device, AmpSettings.choose(cfg.amp, device), run_id)

    def all_reduce(self, values: torch.Tensor, op: Reduction = "sum") -> torch.Tensor:
        """``values`` combined element-wise over the ranks (``op``: sum, mean of floats, or min), as a copy on this
        worker's device (NCCL reduces CUDA tensors). One worker, or no process group: the values unchanged. A
        collective: every rank calls it, in the same order. The one all-reduce of the loop and its checkpoints."""
        values = values.to(self.device, copy=True)
        if self.world > 1 and torch.distributed.is_initialized():
            reduce_op = torch.distributed.ReduceOp.MIN if op == "min" else torch.distributed.ReduceOp.SUM
            torch.distributed.all_reduce(values, op=reduce_op)
            if op == "mean":
                values = values / self.world
        return values

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (picklable) on rank 0, as a list by rank; None on the other ranks. A collective.
        Alone: ``[obj]``."""
        if self.world > 1 and torch.distributed.is_initialized():
            out: list[Any] | None = [None] * self.world if self.rank == 0 else None
            torch.distributed.gather_object(obj, out, dst=0)
            return out
        return [obj]

    def every_rank(self, flag: bool | torch.Tensor) -> bool:
        """True when ``flag`` holds on every rank (a collective; read on the host): the ranks skip a step together,
        and end an epoch together (the data stream's ``agree``)."""
        ok = torch.as_tensor(flag).to(self.device, torch.float32).reshape(1)
        return bool(self.all_reduce(ok, "min").item() > 0)


@dataclass
class Counters:
    """The run's counters, continued across resumes: corrupt rows dropped (``skipped``, this rank's count; after a
    resume rank 0 also carries the checkpoint's total, so the sum over the ranks is the run's) and optimiser steps
    skipped for a non-finite loss (``nan_steps``, the same on every rank). ``consecutive_nan`` is not recorded."""

    skipped: int = 0
    nan_steps: int = 0
    consecutive_nan: int = 0

    @classmethod
    def from_record(cls, record: dict[str, int] | None, rank: int) -> Counters:
        """The counters of ``state.pt``'s ``counters`` (the totals a checkpoint recorded) on ``rank``."""
        record = record or {}
        return cls(int(record.get(runs.DATA_SKIPPED, 0)) if rank == 0 else 0, int(record.get(runs.NAN_STEPS, 0)))

    def totals(self, ctx: WorkerContext) -> dict[str, int]:
        """The run's counters so far by MLflow metric name, skipped rows summed over the ranks (a collective)."""
        skipped = ctx.all_reduce(torch.tensor([self.skipped], dtype=torch.int64))
        return {runs.DATA_SKIPPED: int(skipped.item()), runs.NAN_STEPS: self.nan_steps}


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
    counters: Counters = field(default_factory=Counters)

    def record(self, seed: int, position: DataPosition, totals: dict[str, int]) -> dict[str, Any]:
        """The ``state.pt`` contents: the unwrapped model's state dict, optimiser, scaler, step, phase, epoch, the
        data seed, the data position of all ranks (gathered by :func:`report`) and the run's counter ``totals``."""
        return {"model": checkpoints.unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "phase": self.phase, "epoch": self.epoch,
                "data_seed": seed, "data_position": position.to_dict(), "counters": totals}

    def resume_from(self, saved: dict[str, Any], ctx: WorkerContext) -> None:
        """Continue from a checkpoint's ``state.pt`` (the caller loaded the weights and set step and phase).

        The optimiser's moments carry over within a phase (the phase switch starts a new optimiser), but at the
        CONFIGURED learning rate: ``load_state_dict`` restores the checkpoint's rate, which a resume with another
        ``--lr``/``--finetune-lr``, ``--workers`` or ``--lr-scaling`` must not keep. The effective rate is logged.
        The loss scale carries over phases (as in an uninterrupted run); so do the data position and counters."""
        lr = ctx.cfg.effective_lr(self.phase, ctx.world)
        saved_lr = None
        if saved.get("phase") == self.phase and saved.get("optimizer"):
            self.optimizer.load_state_dict(saved["optimizer"])
            saved_lr = self.optimizer.param_groups[0]["lr"]
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        if saved_lr is not None and saved_lr != lr:
            log.warning("resumed at step %d (phase %d) with lr %g; the checkpoint trained at lr %g (the "
                        "configured lr applies: lr/finetune_lr, the workers up, lr_scaling)", self.step, self.phase, lr,
                        saved_lr)
        else:
            log.info("resumed at step %d (phase %d) with lr %g", self.step, self.phase, lr)
        if saved.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(saved["scaler"])
        self.epoch = int(saved.get("epoch", 0))
        self.position = DataPosition.from_dict(saved.get("data_position"))
        if self.position is None:
            log.warning("checkpoint has no data position (older format): epoch %d restarts from its first row",
                        self.epoch)
            self.position = DataPosition(self.epoch, [0] * ctx.world, ctx.world)
        self.counters = Counters.from_record(saved.get("counters"), ctx.rank)


def report(state: TrainState, ctx: WorkerContext, stream: WorkerStream, reason: str = "periodic") -> None:
    """Every rank reports to Ray Train (a barrier); rank 0 attaches a complete checkpoint directory: ``state.pt``
    (:meth:`TrainState.record`, with every rank's data position and the counters summed over the ranks, both
    gathered here), ``config.yaml`` and ``meta.json`` (with ``reason``: periodic, final or spot notice), which a
    resume continues."""
    import ray.train

    rows = torch.tensor([stream.rows if r == ctx.rank else 0 for r in range(ctx.world)], dtype=torch.int64)
    position = DataPosition(stream.epoch, ctx.all_reduce(rows).tolist(), ctx.world, stream.earlier)
    totals = state.counters.totals(ctx)
    progress = {"step": state.step, "phase": state.phase}
    if ctx.rank != 0:
        ray.train.report(progress, checkpoint=None)
        return
    cfg = ctx.cfg
    meta = {"mlflow_run_id": ctx.run_id, "run_name": cfg.run_name, "step": state.step, "phase": state.phase,
            "total_steps": cfg.total_steps, "finished": state.step >= cfg.total_steps,
            "data_position": position.to_dict(), "reason": reason}
    with tempfile.TemporaryDirectory(prefix="pconv-ckpt-") as tmp:
        checkpoints.save(tmp, state.record(cfg.seed, position, totals), cfg.to_yaml(), meta)
        ray.train.report(progress, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_step_{state.step:08d}")


__all__ = ["BF16_MIN_CAPABILITY", "AmpSettings", "Counters", "TrainState", "WorkerContext", "report"]
