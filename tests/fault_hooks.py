"""Crash injection, failures, spot notices and sample tracing for the training loop, as a step hook
(``run(cfg, step_hook=...)``, the loop's documented hook :class:`pconv.train.loop.StepEvent`).

The resume tests (tests/test_resume.py) kill a worker process right after a checkpoint and compare the sample ids
every step saw with an uninterrupted run; tests/test_bad_input_use.py makes a worker raise. The hook travels to the
Ray Train workers pickled BY VALUE (this module is not importable there), which :func:`fault_hooks` arranges.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass

from pconv.train.loop import StepEvent

log = logging.getLogger(__name__)


@dataclass
class FaultHooks:
    """``trace_dir``: append ``{step, epoch, ids, skipped}`` per step to ``rank<r>.jsonl``. ``crash`` = ``{rank,
    step, marker}``: ``os._exit`` once, right after the checkpoint of that step, unless the marker file exists (it is
    created first, so the restarted worker goes on). ``fail`` = ``{rank, step, message}``: raise ``RuntimeError``
    with that message when that rank draws the batch of that step (0: the first), every time. ``notice`` = ``{step,
    marker}``: rank 0 creates the marker file when it draws the batch of that step (a spot notice server in the test
    answers with a notice from then on)."""

    trace_dir: str | None = None
    crash: dict | None = None
    fail: dict | None = None
    notice: dict | None = None

    def __call__(self, event: StepEvent) -> None:
        if event.kind == "batch" and self.notice and event.rank == 0 and event.step == self.notice["step"]:
            open(self.notice["marker"], "w").close()
        fail = self.fail
        if event.kind == "batch" and fail and fail["rank"] == event.rank and fail["step"] == event.step:
            raise RuntimeError(fail["message"])
        if event.kind == "batch" and self.trace_dir:
            batch = event.batch
            skipped = int(batch["skipped"].sum()) if "skipped" in batch else 0  # corrupt rows this batch carried
            line = json.dumps({"step": event.step + 1, "epoch": event.epoch, "ids": batch["id"].tolist(),
                               "skipped": skipped})
            with open(os.path.join(self.trace_dir, f"rank{event.rank}.jsonl"), "a") as f:
                f.write(line + "\n")
        crash = self.crash
        if event.kind == "checkpoint" and crash and crash["rank"] == event.rank and crash["step"] == event.step:
            if not os.path.exists(crash["marker"]):
                open(crash["marker"], "w").close()
                log.warning("test hook: rank %d exits at step %d", event.rank, event.step)
                os._exit(1)


def fault_hooks(trace_dir: str | None = None, crash: dict | None = None, fail: dict | None = None,
                notice: dict | None = None) -> FaultHooks:
    """A :class:`FaultHooks` that pickles by value, so Ray workers need not import this test module."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return FaultHooks(trace_dir, crash, fail, notice)
