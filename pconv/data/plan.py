"""The epoch plan and each rank's data position: what makes resume exact (pure: no Ray, no I/O).

Epoch plan (:func:`epoch_plan`). The train split's read units (Parquet row groups, :func:`pconv.data.stream.read_units`)
are put in a seeded order per ``(seed, epoch)``, and each unit gets a seeded number that fixes its row order and
every row's crop, flip and pairing (:func:`pconv.data.stream.decode_train_units`,
:func:`pconv.data.transforms.train_transform`). The units are dealt to the ranks in plan order, each to the rank with
the fewest rows so far (ties: the lowest rank). Every worker computes the whole plan by itself: which worker reads
what never depends on task timing (Ray Data's ``streaming_split`` hands blocks to whichever consumer asks first, so
it cannot be replayed).

A worker's epoch is its units in plan order, each unit's rows in their seeded order; a row's index in that sequence
is its ``pos``. :func:`remaining_units` is that sequence from a row on: what a worker's dataset of the epoch reads
(:class:`pconv.data.stream.WorkerDatasets`).

Data position (:class:`DataPosition`): the epoch and, per rank, how many rows of its sequence it consumed. Resuming
at ``p`` rows does not read the units wholly before ``p`` and does not decode the rows of the unit holding ``p``
that come before it: a resume late in an epoch costs what one at its start costs.

Steps per epoch. Workers may run out at different steps (units differ in size; corrupt rows are dropped), so
:class:`WorkerStream` asks all ranks (``agree``: an all-reduce in the training loop) before each step; an epoch ends
for everyone when one worker has no full batch left, keeping DDP's steps in lockstep.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from pconv.data.transforms import derive_seed

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

log = logging.getLogger(__name__)


@dataclass
class DataPosition:
    """Where training is in the data: ``epoch``, and ``rows[r]`` = rows of rank r's epoch sequence consumed (the
    plan of ``world`` ranks). Stored in ``state.pt`` and ``meta.json`` (:mod:`pconv.tracking.checkpoints`)."""

    epoch: int = 0
    rows: list[int] = field(default_factory=list)
    world: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": int(self.epoch), "rows": [int(r) for r in self.rows], "world": int(self.world)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "DataPosition | None":
        return None if not d else cls(int(d["epoch"]), [int(r) for r in d["rows"]], int(d["world"]))

    def start_for(self, rank: int, world: int) -> tuple[int, int]:
        """(epoch, rows to skip) for ``rank`` of a group of ``world``. A different group size has a different
        plan, so the rest of the recorded epoch cannot be mapped onto it: the next epoch starts (logged)."""
        if world == self.world and len(self.rows) == world:
            return self.epoch, self.rows[rank]
        log.warning("data position recorded for %d worker(s), resuming with %d: the rest of epoch %d is not "
                    "seen; starting epoch %d", self.world, world, self.epoch, self.epoch + 1)
        return self.epoch + 1, 0


def epoch_plan(units: list[dict[str, Any]], seed: int, epoch: int, world: int) -> list[list[dict[str, Any]]]:
    """Per rank, its read units of this epoch in order, each with its seeded ``_rand`` (see the module docstring)."""
    order = np.random.default_rng(derive_seed("train-units", seed, epoch) % 2**63).permutation(len(units))
    # A unit larger than half a rank's share is dealt in slices of its seeded row order, so a small dataset (fewer
    # or bigger units than ranks) still gives every rank rows; at production size (units << share) nothing splits.
    cap = max(1, -(-sum(int(u["rows"]) for u in units) // (2 * world)))
    loads, plan = [0] * world, [[] for _ in range(world)]
    for i in order:
        n, rand = int(units[i]["rows"]), derive_seed("unit", seed, epoch, int(i)) / 2.0**63
        for lo in range(0, n, cap):
            hi = min(n, lo + cap)
            r = min(range(world), key=lambda k: (loads[k], k))
            plan[r].append({"uri": units[i]["uri"], "row_group": int(units[i]["row_group"]), "rows": hi - lo,
                            "lo": lo, "hi": hi, "_rand": rand})
            loads[r] += hi - lo
    return plan


def remaining_units(units: list[dict[str, Any]], start: int) -> list[dict[str, Any]]:
    """The units of one rank's epoch from row ``start`` on: whole units before it dropped, the unit holding it
    with ``skip`` rows (not decoded); ``pos0`` = the position of each unit's first row."""
    out, pos0 = [], 0
    for u in units:
        if pos0 + u["rows"] > start:
            out.append({"uri": u["uri"], "row_group": u["row_group"], "_rand": u["_rand"], "pos0": pos0,
                        "skip": max(0, start - pos0), "lo": u.get("lo", 0), "hi": u.get("hi", u["rows"])})
        pos0 += u["rows"]
    return out


class WorkerStream:
    """Endless ``(epoch, batch)`` stream of one rank, starting at a :class:`DataPosition`; ``rows`` is this rank's
    position after the last batch returned. ``build(epoch, start)`` gives the rank's dataset of ``epoch`` from row
    ``start`` on (None: nothing left; :meth:`pconv.data.stream.WorkerDatasets.dataset`), whose batches carry
    ``pos``. ``agree(has_batch)`` returns True only when every rank has one (an all-reduce; alone: ``has_batch``)."""

    def __init__(self, build: Callable[[int, int], "ray.data.Dataset | None"], batch_size: int,
                 position: DataPosition | None, rank: int, world: int,
                 agree: Callable[[bool], bool] = lambda ok: ok) -> None:
        self.build, self.batch_size, self.agree = build, batch_size, agree
        self.epoch, self.rows = position.start_for(rank, world) if position else (0, 0)
        self._it: Iterator[dict[str, Any]] | None = None
        self._steps = 0  # steps taken in this epoch by this stream

    def _open(self) -> None:
        ds = self.build(self.epoch, self.rows)
        self._it = iter(ds.iter_torch_batches(batch_size=self.batch_size, drop_last=True)) if ds else iter(())

    def next(self) -> tuple[int, dict[str, Any]]:
        for _ in range(2):
            if self._it is None:
                self._open()
            batch = next(self._it, None)
            if self.agree(batch is not None):
                self.rows = int(batch["pos"][-1]) + 1
                self._steps += 1
                return self.epoch, batch
            self.close()
            fresh = self.rows == 0 and self._steps == 0
            if fresh:
                raise RuntimeError(f"epoch {self.epoch} produced no batch of {self.batch_size} images on every "
                                   "worker: the training set is smaller than one global batch")
            log.info("epoch %d ends after %d steps here", self.epoch, self._steps)
            self.epoch, self.rows, self._steps = self.epoch + 1, 0, 0
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Stop this epoch's Ray Data execution (its generator) early."""
        close = getattr(self._it, "close", None)
        if close:
            close()
        self._it = None


__all__ = ["DataPosition", "WorkerStream", "epoch_plan", "remaining_units"]
