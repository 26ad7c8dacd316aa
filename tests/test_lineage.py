"""Data lineage (issue 26 item 3): the rows every rank consumed at every step, as Parquet files in the MLflow run.

In process against a SQLite MLflow store (no server): two ranks' recorders (rank 1 hands its rows to rank 0 as the
group's gather does) write one file per checkpoint with the five columns; a resume from an earlier checkpoint
rewrites the lost attempt's file to the steps it keeps, so the redone steps' rows appear once; ``when_trained``
answers for a shard key; MLflow being down keeps the file for the next checkpoint and reports what never arrived.
The gather across real workers and a lost worker's redo are checked in tests/test_resume.py's lost-worker run."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import free_port

from pconv.storage import shards
from pconv.tracking import lineage, store
from pconv.tracking.runs import Tracker

KEYS = [f"scenes/{i:04d}.png" for i in range(12)]
IDS = [shards.key_id(k) for k in KEYS]


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"  # one store: its tables take seconds


@pytest.fixture
def tracking(store_uri, request):
    run_id = store.start_or_resume_run("lineage-test", request.node.name, tracking_uri=store_uri)
    assert run_id
    return store_uri, run_id


def two_ranks(tracker):
    """Rank 0 (writes) and rank 1, and a flush of both through a gather like the group's."""
    r0, r1 = lineage.LineageRecorder(tracker, 2), lineage.LineageRecorder(None, 2)

    def flush():
        sent = []
        r1.flush(lambda obj: sent.append(obj))  # rank 1's gather returns None
        r0.flush(lambda obj: [obj, sent[0]])

    return r0, r1, flush


def train(r0, r1, steps, epoch=0):
    for step in steps:  # rank r draws keys (2 step + r) % 12 and the next one
        r0.add(epoch, step, [IDS[(4 * step) % 12], IDS[(4 * step + 1) % 12]])
        r1.add(epoch, step, [IDS[(4 * step + 2) % 12], IDS[(4 * step + 3) % 12]])


def test_two_ranks_write_one_file_per_checkpoint_and_a_resume_replaces_the_redone_steps(tracking, tmp_path):
    uri, run_id = tracking
    r0, r1, flush = two_ranks(Tracker(run_id, uri))
    train(r0, r1, [1, 2])
    flush()
    train(r0, r1, [3, 4, 5])  # the lost attempt: its checkpoint at 5 was written, Ray resumes from 2
    flush()
    table = lineage.read(run_id, uri)
    assert table.schema == lineage.SCHEMA and table.num_rows == 5 * 2 * 2
    assert sorted(set(table.column("step").to_pylist())) == [1, 2, 3, 4, 5]
    assert set(table.column("world_size").to_pylist()) == {2}
    names = sorted(f.path for f in store.client_for(uri).list_artifacts(run_id, "lineage"))
    assert names == ["lineage/steps_000000001-000000002.parquet", "lineage/steps_000000003-000000005.parquet"]

    # the resumed group (new recorders) from step 2 redoes 3..5 with other samples (another world size: 1)
    resumed = lineage.LineageRecorder(Tracker(run_id, uri), 1)
    resumed.truncate_after(2)
    for step in (3, 4, 5, 6):
        resumed.add(1, step, [IDS[step]])
    resumed.flush(lambda obj: [obj])
    resumed.close()
    table = lineage.read(run_id, uri)
    rows = table.to_pylist()
    assert sorted((r["step"], r["rank"]) for r in rows if r["step"] > 2) == [(3, 0), (4, 0), (5, 0), (6, 0)]
    assert {r["world_size"] for r in rows if r["step"] > 2} == {1} and len(rows) == 2 * 2 * 2 + 4
    # the query: when was this image trained on?
    assert lineage.when_trained(run_id, KEYS[4], uri) == [
        {"epoch": 0, "step": 1, "rank": 0, "world_size": 2}, {"epoch": 1, "step": 4, "rank": 0, "world_size": 1}]
    assert lineage.when_trained(run_id, "never/seen.png", uri) == []


def test_mlflow_down_keeps_the_file_for_the_next_checkpoint_and_reports_what_never_arrived(monkeypatch, caplog):
    monkeypatch.setenv("PCONV_MLFLOW_RETRY", "1,0.01,0.1,0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries would take ~12 s
    down = Tracker("0" * 32, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    r0, r1, flush = two_ranks(down)
    train(r0, r1, [1, 2])
    flush()
    train(r0, r1, [3])
    flush()
    assert [p.name for p in r0._pending] == ["steps_000000001-000000002.parquet", "steps_000000003-000000003.parquet"]
    assert pq.read_table(r0._pending[0]).num_rows == 2 * 2 * 2  # both ranks' rows of steps 1 and 2, kept
    with caplog.at_level(logging.ERROR, logger="pconv.tracking.lineage"):
        r0.close()
    assert "2 file(s) never reached MLflow" in caplog.text


def test_a_run_without_lineage_reads_as_empty(tracking):
    uri, run_id = tracking
    assert lineage.read(run_id, uri).num_rows == 0


def test_file_names_carry_their_steps():
    assert lineage.steps_of(lineage.file_name(7, 1200)) == (7, 1200)
    assert lineage.steps_of("lineage/other.txt") is None
    assert np.array_equal(sorted(IDS), sorted(set(IDS)))  # the keys' ids are distinct
