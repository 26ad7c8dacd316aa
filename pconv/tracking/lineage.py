"""Data lineage: which samples every rank consumed at every optimizer step, as Parquet files in the MLflow run.

``--lineage`` (TrainConfig ``lineage``) makes every worker keep the ids of the batches it draws; at each checkpoint
the group gathers them on rank 0, which writes the rows of the steps since the previous checkpoint as
``lineage/steps_<first>-<last>.parquet`` in the run's artifacts, BEFORE the checkpoint is reported, so every
checkpoint Ray Train can resume from has its steps' rows written. Columns (:data:`SCHEMA`): ``epoch``, ``step`` (the
optimizer step the sample trained, 1-based), ``rank``, ``id`` (:func:`pconv.storage.shards.key_id` of the image's
shard key), ``world_size``.

A resumed run appends. A run that resumes from step ``s`` first rewrites the files of the lost attempt that reach
past ``s`` to their steps up to ``s`` (an empty file when none), so the steps redone replace the lost attempt's rows
and each step's rows are written exactly once. A file MLflow does not take (server down) is kept and sent again at
the next checkpoint; one still unsent at the end is logged as lost and counted in the run's tag
:data:`pconv.tracking.runs.ARTIFACTS_LOST_TAG` (when the tracker closes).

"Was this image trained on, and when?" (README, "Data lineage")::

    from pconv.tracking.lineage import when_trained
    when_trained(RUN_ID, "places2/a/abbey/00000001.jpg")   # [{"epoch": 0, "step": 1234, "rank": 3, ...}, ...]
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pconv.storage import shards
from pconv.tracking.runs import Tracker
from pconv.tracking.store import client_for

log = logging.getLogger(__name__)

LINEAGE_DIR = "lineage"
SCHEMA = pa.schema([("epoch", pa.int32()), ("step", pa.int64()), ("rank", pa.int32()), ("id", pa.int64()),
                    ("world_size", pa.int32())])
_NAME = re.compile(r"steps_(\d+)-(\d+)\.parquet$")


def file_name(first: int, last: int) -> str:
    return f"steps_{first:09d}-{last:09d}.parquet"


def steps_of(name: str) -> tuple[int, int] | None:
    match = _NAME.search(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


class LineageRecorder:
    """One rank's lineage: :meth:`add` per batch drawn; :meth:`flush` at each checkpoint on EVERY rank (``gather``
    is the group's gather to rank 0: a collective); rank 0 (``tracker`` set) writes the file. ``world``: the group's
    size."""

    def __init__(self, tracker: Tracker | None, world: int) -> None:
        if tracker is not None and not tracker.enabled:
            log.warning("lineage: this run has no MLflow run, so no lineage is recorded")
            tracker = None
        self.tracker, self.world = tracker, world
        self._rows: list[tuple[int, int, np.ndarray]] = []  # (epoch, step, ids)
        self._pending: list[Path] = []  # written, not yet accepted by MLflow (rank 0)
        self._tmp = tempfile.TemporaryDirectory(prefix="pconv-lineage-") if tracker is not None else None

    def add(self, epoch: int, step: int, ids: Any) -> None:
        self._rows.append((epoch, step, np.asarray(ids, dtype=np.int64).reshape(-1)))

    def flush(self, gather: Callable[[Any], Sequence[Any] | None]) -> None:
        """Every rank: hand this rank's rows since the last flush to rank 0, which writes them as one file."""
        gathered = gather(self._rows)  # on rank 0: every rank's rows, by rank
        self._rows = []
        if self.tracker is None or gathered is None:
            return
        table = _table(gathered, self.world)
        if table.num_rows:
            steps = table.column("step").to_numpy()
            path = Path(self._tmp.name) / file_name(int(steps.min()), int(steps.max()))
            pq.write_table(table, path)
            self._pending.append(path)
        self._send()

    def truncate_after(self, step: int) -> None:
        """Rank 0, before a resumed run's first step: the lost attempt's files reach at most ``step``."""
        if self.tracker is None:
            return
        names = self.tracker.list_files(LINEAGE_DIR)
        if names is None:
            log.warning("lineage: MLflow is down; the rows a lost attempt wrote after step %d are not removed", step)
            return
        for name in names:
            span = steps_of(name)
            if span is None or span[1] <= step:
                continue
            local = self.tracker.download(name, self._tmp.name)
            if local is None:
                log.warning("lineage: %s not rewritten (MLflow is down): it keeps rows after step %d", name, step)
                continue
            table = pq.read_table(local, schema=SCHEMA)
            kept = table.filter(pc.less_equal(table.column("step"), step))
            pq.write_table(kept, local)
            self._pending.append(Path(local))
            log.info("lineage: %s keeps %d of its %d rows (steps after %d are redone)", name, kept.num_rows,
                     table.num_rows, step)
        self._send()

    def close(self) -> None:
        """Rank 0 at the end: a last try for files MLflow did not take; what is still unsent is logged as lost."""
        if self.tracker is None:
            return
        self._send()
        if self._pending:
            log.error("lineage: %d file(s) never reached MLflow: %s", len(self._pending),
                      ", ".join(p.name for p in self._pending))
            self.tracker.count_lost_artifacts(len(self._pending), "lineage files")  # in the run's tags at close
        self._tmp.cleanup()

    def _send(self) -> None:
        self._pending = [p for p in self._pending if not self.tracker.log_file(p, LINEAGE_DIR)]


def _table(per_rank: Sequence[list[tuple[int, int, np.ndarray]]], world: int) -> pa.Table:
    """The rows of every rank (``per_rank[r]``: rank r's (epoch, step, ids)) as one table in :data:`SCHEMA`."""
    cols: dict[str, list[np.ndarray]] = {name: [] for name in SCHEMA.names}
    for rank, rows in enumerate(per_rank):
        for epoch, step, ids in rows:
            n = len(ids)
            cols["epoch"].append(np.full(n, epoch, np.int32))
            cols["step"].append(np.full(n, step, np.int64))
            cols["rank"].append(np.full(n, rank, np.int32))
            cols["id"].append(ids)
            cols["world_size"].append(np.full(n, world, np.int32))
    arrays = [pa.array(np.concatenate(cols[f.name]) if cols[f.name] else np.empty(0, f.type.to_pandas_dtype()),
                       type=f.type) for f in SCHEMA]
    return pa.Table.from_arrays(arrays, schema=SCHEMA).sort_by([("step", "ascending"), ("rank", "ascending")])


def read(run_id: str, tracking_uri: str | None = None) -> pa.Table:
    """Every lineage row of a run (all its files; empty when the run has none)."""
    client = client_for(tracking_uri)
    names = [f.path for f in client.list_artifacts(run_id, LINEAGE_DIR) if steps_of(f.path)]
    with tempfile.TemporaryDirectory() as tmp:
        return pa.concat_tables([SCHEMA.empty_table()] + [
            pq.read_table(client.download_artifacts(run_id, name, tmp), schema=SCHEMA) for name in sorted(names)])


def when_trained(run_id: str, key: str, tracking_uri: str | None = None) -> list[dict[str, int]]:
    """The (epoch, step, rank, world_size) at which the image with shard key ``key`` was trained on, by step."""
    table = read(run_id, tracking_uri)
    hits = table.filter(pc.equal(table.column("id"), shards.key_id(key)))
    return [{k: int(v) for k, v in row.items() if k != "id"} for row in hits.sort_by("step").to_pylist()]


__all__ = ["LINEAGE_DIR", "SCHEMA", "LineageRecorder", "file_name", "read", "steps_of", "when_trained"]
