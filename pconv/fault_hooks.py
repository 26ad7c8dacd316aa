"""Test-only fault injection and sample tracing for the training loop (off unless ``PCONV_TEST_HOOKS`` is set).

The resume tests (tests/test_resume.py) kill a worker process right after a checkpoint and compare the sample ids
every step saw with an uninterrupted run; Ray Train workers inherit the environment of the cluster, so the hooks
read a JSON file named by ``PCONV_TEST_HOOKS`` when the loop starts (a test rewrites it between runs).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)


class FaultHooks:
    """Test-only hooks, off unless ``PCONV_TEST_HOOKS`` names a JSON file: ``trace_dir`` (append ``{step, epoch,
    ids, skipped}`` per step to ``rank<r>.jsonl``) and ``crash`` = ``{rank, step, marker}`` (``os._exit`` once,
    right after the checkpoint of that step, unless the marker file exists; it is created first)."""

    def __init__(self, rank: int, spec: dict[str, Any]) -> None:
        self.rank, self.spec = rank, spec

    @classmethod
    def load(cls, rank: int) -> "FaultHooks":
        path = os.environ.get("PCONV_TEST_HOOKS")
        return cls(rank, json.loads(open(path).read()) if path and os.path.isfile(path) else {})

    def trace(self, step: int, epoch: int, batch: dict[str, Any]) -> None:
        if self.spec.get("trace_dir"):
            skipped = int(batch["skipped"].sum()) if "skipped" in batch else 0  # corrupt rows this batch carried
            line = json.dumps({"step": step + 1, "epoch": epoch, "ids": batch["id"].tolist(), "skipped": skipped})
            with open(os.path.join(self.spec["trace_dir"], f"rank{self.rank}.jsonl"), "a") as f:
                f.write(line + "\n")

    def maybe_crash(self, step: int) -> None:
        crash = self.spec.get("crash")
        if crash and crash["rank"] == self.rank and crash["step"] == step:
            if not os.path.exists(crash["marker"]):
                open(crash["marker"], "w").close()
                log.warning("test hook: rank %d exits at step %d", self.rank, step)
                os._exit(1)


__all__ = ["FaultHooks"]
