"""What a training worker records at a checkpoint: every rank's data position, gathered, in ``state.pt`` and
``meta.json`` (:mod:`pconv.tracking.checkpoints`), reported to Ray Train; and sums of per-worker counters over the ranks.

The data position (:class:`pconv.data.plan.DataPosition`) is what makes a resume exact: the epoch and how many
rows of its epoch sequence each rank consumed. ``state``/``ctx`` are the loop's ``TrainState`` / ``WorkerContext``
(:mod:`pconv.train.loop`).
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from pconv.tracking import checkpoints
from pconv.data.plan import DataPosition, WorkerStream


def world_sum(values: torch.Tensor, ctx: Any) -> torch.Tensor:
    """The element-wise sum over all ranks (on CPU), e.g. per-worker counters."""
    values = values.to(ctx.device)
    if ctx.world > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    return values.cpu()


def report(state: Any, ctx: Any, stream: WorkerStream, counters: dict[str, int] | None = None) -> None:
    """Every rank reports (a barrier); rank 0 attaches a complete checkpoint directory with every rank's data
    position (gathered here) and the run's ``counters`` (already summed over the ranks), which a resume continues."""
    import ray.train

    rows = torch.tensor([stream.rows if r == ctx.rank else 0 for r in range(ctx.world)], dtype=torch.int64)
    position = DataPosition(stream.epoch, world_sum(rows, ctx).tolist(), ctx.world)
    progress = {"step": state.step, "phase": state.phase}
    if ctx.rank != 0:
        ray.train.report(progress, checkpoint=None)
        return
    cfg = ctx.cfg
    meta = {"mlflow_run_id": ctx.run_id, "run_name": cfg.run_name, "step": state.step, "phase": state.phase,
            "total_steps": cfg.total_steps, "finished": state.step >= cfg.total_steps,
            "data_position": position.to_dict()}
    with tempfile.TemporaryDirectory(prefix="pconv-ckpt-") as tmp:
        checkpoints.save(tmp, state.checkpoint_state(cfg.seed, position, counters), cfg.to_yaml(), meta)
        ray.train.report(progress, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_step_{state.step:08d}")


__all__ = ["report", "world_sum"]
