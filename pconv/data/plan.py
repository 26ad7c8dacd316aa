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

World-size changes (elastic training, a lost spot node). A position recorded by ``W`` ranks resumed by ``W'`` ranks
re-deals the rows of the epoch that no rank consumed (:func:`redeal`): each old rank's sequence from its position on,
as slices of the units' seeded row orders, put in an order seeded by ``(seed, epoch, positions, W')`` and dealt to
the ``W'`` ranks as the epoch plan deals units. The position then records the earlier group sizes of the epoch and
where each stopped (:attr:`DataPosition.earlier`), so every rank rebuilds the same plan from the checkpoint alone,
however often the size changed. Within an epoch no row is dealt twice; the rows an epoch leaves unused are those
left when its first rank ran out (see "Steps per epoch"), counted by :meth:`WorkerStream.next` as it ends the epoch.

Steps per epoch. Workers may run out at different steps (units differ in size; corrupt rows are dropped), so
:class:`WorkerStream` asks all ranks (``agree``: an all-reduce in the training loop) before each step; an epoch ends
for everyone when one worker has no full batch left, keeping DDP's steps in lockstep.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

import numpy as np

from pconv.data.transforms import derive_seed

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    """A group size an epoch was dealt to earlier, and the rows of its sequence each of its ranks consumed before
    the group changed (:func:`redeal`)."""

    world: int
    rows: tuple[int, ...]


@dataclass
class DataPosition:
    """Where training is in the data: ``epoch``, and ``rows[r]`` = rows of rank r's epoch sequence consumed (the
    plan of ``world`` ranks); ``earlier``: the group sizes the epoch had before this one, in order, with their
    positions (empty while the epoch ran on one group size). Stored in ``state.pt`` and ``meta.json``
    (:mod:`pconv.tracking.checkpoints`)."""

    epoch: int = 0
    rows: list[int] = field(default_factory=list)
    world: int = 1
    earlier: tuple[Segment, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"epoch": int(self.epoch), "rows": [int(r) for r in self.rows], "world": int(self.world)}
        if self.earlier:
            out["earlier"] = [{"world": s.world, "rows": list(s.rows)} for s in self.earlier]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "DataPosition | None":
        if not d:
            return None
        earlier = tuple(Segment(int(s["world"]), tuple(int(r) for r in s["rows"])) for s in d.get("earlier", ()))
        return cls(int(d["epoch"]), [int(r) for r in d["rows"]], int(d["world"]), earlier)

    def start_for(self, rank: int, world: int) -> tuple[int, tuple[Segment, ...], int]:
        """(epoch, earlier segments of the epoch's plan, rows to skip) for ``rank`` of a group of ``world``. Another
        group size re-deals the rows of the epoch no rank consumed (:func:`redeal`): this position becomes an earlier
        segment and the new ranks start their sequences at row 0 (logged)."""
        if world == self.world and len(self.rows) == world:
            return self.epoch, self.earlier, self.rows[rank]
        if len(self.rows) != self.world:
            raise ValueError(f"data position {self.to_dict()}: {len(self.rows)} rank positions for a group of "
                             f"{self.world}")
        if not any(self.rows) and not self.earlier:  # nothing of the epoch consumed yet: its plan for the new size
            return self.epoch, (), 0
        if rank == 0:
            log.warning("data position recorded for %d worker(s), resuming with %d: the rows of epoch %d that no "
                        "rank consumed are re-dealt to the %d worker(s)", self.world, world, self.epoch, world)
        return self.epoch, self.earlier + (Segment(self.world, tuple(self.rows)),), 0


def epoch_plan(units: list[dict[str, Any]], seed: int, epoch: int, world: int) -> list[list[dict[str, Any]]]:
    """Per rank, its read units of this epoch in order, each with its seeded ``_rand`` (see the module docstring)."""
    order = np.random.default_rng(derive_seed("train-units", seed, epoch) % 2**63).permutation(len(units))
    slices = [{"uri": units[i]["uri"], "row_group": int(units[i]["row_group"]), "lo": 0, "hi": int(units[i]["rows"]),
               "_rand": derive_seed("unit", seed, epoch, int(i)) / 2.0**63} for i in order]
    return _deal(slices, world)


def _deal(slices: list[dict[str, Any]], world: int) -> list[list[dict[str, Any]]]:
    """Slices of units' seeded row orders (``lo``..``hi``), in order, dealt to ``world`` ranks: each to the rank
    with the fewest rows so far (ties: the lowest rank). A slice larger than half a rank's share is dealt in pieces,
    so a small dataset (fewer or bigger units than ranks) still gives every rank rows; at production size (units
    << share) nothing splits."""
    cap = max(1, -(-sum(s["hi"] - s["lo"] for s in slices) // (2 * world)))
    loads, plan = [0] * world, [[] for _ in range(world)]
    for s in slices:
        for lo in range(s["lo"], s["hi"], cap):
            hi = min(s["hi"], lo + cap)
            r = min(range(world), key=lambda k: (loads[k], k))
            plan[r].append({"uri": s["uri"], "row_group": s["row_group"], "rows": hi - lo, "lo": lo, "hi": hi,
                            "_rand": s["_rand"]})
            loads[r] += hi - lo
    return plan


def redeal(plan: list[list[dict[str, Any]]], rows: tuple[int, ...] | list[int], seed: int, epoch: int,
           world: int) -> list[list[dict[str, Any]]]:
    """The rows of ``plan`` (one epoch's plan of ``len(plan)`` ranks) that its ranks had not consumed (rank r:
    ``rows[r]``), dealt to ``world`` ranks: each old rank's rest as slices of the units' seeded row orders, in an
    order seeded by ``(seed, epoch, rows, world)``. No row of the rest is lost or dealt twice, and no consumed row
    comes back."""
    if len(rows) != len(plan):
        raise ValueError(f"{len(rows)} positions for a plan of {len(plan)} ranks")
    rest = [{"uri": u["uri"], "row_group": u["row_group"], "lo": u["lo"] + u["skip"], "hi": u["hi"],
             "_rand": u["_rand"]}
            for r, units in enumerate(plan) for u in remaining_units(units, int(rows[r]))]
    order = np.random.default_rng(derive_seed("redeal", seed, epoch, tuple(int(r) for r in rows), world) % 2**63
                                  ).permutation(len(rest))
    return _deal([rest[i] for i in order], world)


def rank_plan(units: list[dict[str, Any]], seed: int, epoch: int, earlier: tuple[Segment, ...],
              world: int) -> list[list[dict[str, Any]]]:
    """The plan of ``epoch`` for a group of ``world`` ranks after the ``earlier`` group sizes of the epoch (a
    :class:`DataPosition`'s): the epoch plan of the first size, re-dealt at each change (:func:`redeal`)."""
    worlds = [s.world for s in earlier] + [world]
    plan = epoch_plan(units, seed, epoch, worlds[0])
    for segment, next_world in zip(earlier, worlds[1:]):
        if len(segment.rows) != segment.world:
            raise ValueError(f"epoch {epoch}: an earlier segment of {segment.world} ranks records "
                             f"{len(segment.rows)} positions")
        plan = redeal(plan, segment.rows, seed, epoch, next_world)
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


class EpochSource(Protocol):
    """What a :class:`WorkerStream` reads from: one rank's rows of an epoch (:class:`pconv.data.stream.WorkerDatasets`)."""

    def dataset(self, epoch: int, earlier: tuple[Segment, ...], start: int) -> "ray.data.Dataset | None":
        """This rank's rows of ``epoch`` (its plan after the ``earlier`` group sizes) from row ``start`` on, in
        order, with ``pos``; None when nothing is left."""

    def sequence_rows(self, epoch: int, earlier: tuple[Segment, ...]) -> int:
        """The length of this rank's sequence of ``epoch`` (its plan after the ``earlier`` group sizes)."""


class WorkerStream:
    """Endless ``(epoch, batch)`` stream of one rank, starting at a :class:`DataPosition`; ``rows`` is this rank's
    position after the last batch returned and ``earlier`` the epoch's earlier group sizes (both go into the next
    checkpoint's position); ``ended`` lists ``(epoch, rows unused)`` as epochs end (every rank's stream ends an epoch
    at the same call: the consumer may pop it and combine the ranks' counts). ``source`` gives the rank's dataset of an epoch from a row on (:class:`EpochSource`),
    whose batches carry ``pos``. ``agree(has_batch)`` returns True only when every rank has one (an all-reduce;
    alone: ``has_batch``)."""

    def __init__(self, source: EpochSource, batch_size: int, position: DataPosition | None, rank: int, world: int,
                 agree: Callable[[bool], bool] = lambda ok: ok) -> None:
        self.source, self.batch_size, self.agree = source, batch_size, agree
        self.epoch, self.earlier, self.rows = position.start_for(rank, world) if position else (0, (), 0)
        self._it: Iterator[dict[str, Any]] | None = None
        self._steps = 0  # steps taken in this epoch by this stream
        self.ended: list[tuple[int, int]] = []  # (epoch, rows of this rank's sequence unused) per epoch ended

    def _open(self) -> None:
        ds = self.source.dataset(self.epoch, self.earlier, self.rows)
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
            # A whole epoch with no batch: the training set is too small. A re-dealt rest (``earlier``: the group
            # size changed mid-epoch) may rightly be shorter than a batch near the epoch's end: that epoch ends.
            whole_epoch = self.rows == 0 and self._steps == 0 and not self.earlier
            if whole_epoch:
                raise RuntimeError(f"epoch {self.epoch} produced no batch of {self.batch_size} images on every "
                                   "worker: the training set is smaller than one global batch")
            unused = self.source.sequence_rows(self.epoch, self.earlier) - self.rows
            log.info("epoch %d ends after %d steps here; %d row(s) of this rank's sequence unused (the first rank "
                     "to run out of full batches ends the epoch for all)", self.epoch, self._steps, unused)
            self.ended.append((self.epoch, unused))
            self.epoch, self.earlier, self.rows, self._steps = self.epoch + 1, (), 0, 0
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Stop this epoch's Ray Data execution (its generator) early."""
        close = getattr(self._it, "close", None)
        if close:
            close()
        self._it = None


__all__ = ["DataPosition", "EpochSource", "Segment", "WorkerStream", "epoch_plan", "rank_plan", "redeal",
           "remaining_units"]
