"""Exact resume (issue 15): the data position a checkpoint records, the stream continuing from it (with its corrupt
row count, issue 25), the grad scaler across the phase switch and resume, DDP's gradient buckets across resume with
3 workers (issue 25), and whole training runs interrupted (a worker process of 3 killed; the job killed and
re-submitted) that end with the uninterrupted run's weights and ``data/skipped`` and saw the same sample ids at
every step.

The unit tests run without Ray (the read/decode function of the Ray Data tasks is called in-process; DDP on a gloo
group of 3 processes); the runs use a local Ray (under `flock /tmp/pconv-ray.lock` in CI).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pconv.tracking import checkpoints, lineage
from pconv.data import stream
from pconv.core import images
from pconv.train import loop
from pconv.train.state import AmpSettings, WorkerContext
from pconv.data import plan as train_stream
from pconv.data import transforms
from pconv.data.plan import DataPosition, Segment
from conftest import free_port
from fault_hooks import fault_hooks

SIZE = 32


def _units(n: int = 7) -> list[dict]:
    return [{"uri": f"s{i // 3}.parquet", "row_group": i % 3, "rows": 5 + i} for i in range(n)]


def test_epoch_plan_deals_every_unit_once_by_rank_and_is_seeded():
    units = _units()
    for world in (1, 2, 3):
        plan = train_stream.epoch_plan(units, seed=4, epoch=2, world=world)
        dealt = sorted((u["uri"], u["row_group"], r) for rank in plan for u in rank for r in range(u["lo"], u["hi"]))
        assert dealt == sorted((u["uri"], u["row_group"], r) for u in units for r in range(u["rows"]))  # each row once
        loads = [sum(u["rows"] for u in rank) for rank in plan]
        assert max(loads) - min(loads) <= max(u["rows"] for u in units)  # balanced by rows
        assert plan == train_stream.epoch_plan(units, seed=4, epoch=2, world=world)  # no timing, no state
    a, b = (train_stream.epoch_plan(units, seed=4, epoch=e, world=1)[0] for e in (0, 1))
    assert [u["uri"] + str(u["row_group"]) for u in a] != [u["uri"] + str(u["row_group"]) for u in b]
    assert {u["_rand"] for u in a}.isdisjoint({u["_rand"] for u in b})  # new row orders/crops every epoch


def test_a_dataset_smaller_than_the_ranks_units_still_feeds_every_rank():
    """One row group of 12 rows (a tiny dataset) and 2 ranks: it is dealt as slices of its seeded row order, so both
    ranks get 6 rows and every row is seen once (the whole-unit deal left rank 1 with nothing)."""
    plan = train_stream.epoch_plan([{"uri": "only.parquet", "row_group": 0, "rows": 12}], seed=0, epoch=0, world=2)
    assert [sum(u["rows"] for u in rank) for rank in plan] == [6, 6]
    assert sorted(r for rank in plan for u in rank for r in range(u["lo"], u["hi"])) == list(range(12))
    assert len({u["_rand"] for rank in plan for u in rank}) == 1  # one seeded row order, sliced
    tail = train_stream.remaining_units(plan[1], 2)
    assert [(u["lo"], u["hi"], u["skip"], u["pos0"]) for u in tail][0][2] == 2 - tail[0]["pos0"]


def test_remaining_units_skip_whole_units_and_rows_of_the_first():
    plan = [{"uri": "a", "row_group": 0, "rows": 4, "_rand": 0.1}, {"uri": "b", "row_group": 0, "rows": 3,
                                                                   "_rand": 0.2}]
    assert [(u["uri"], u["pos0"], u["skip"]) for u in train_stream.remaining_units(plan, 0)] == [("a", 0, 0),
                                                                                               ("b", 4, 0)]
    assert [(u["uri"], u["pos0"], u["skip"]) for u in train_stream.remaining_units(plan, 5)] == [("b", 4, 1)]
    assert train_stream.remaining_units(plan, 7) == []


def test_position_for_another_group_size_redeals_the_rest_of_its_epoch(caplog):
    pos = DataPosition(3, [10, 12], 2)
    assert pos.start_for(1, 2) == (3, (), 12)
    assert pos.start_for(0, 3) == (3, (Segment(2, (10, 12)),), 0) and "re-dealt to the 3 worker(s)" in caplog.text
    later = DataPosition(3, [4, 0, 9], 3, (Segment(2, (10, 12)),))
    assert later.start_for(2, 3) == (3, (Segment(2, (10, 12)),), 9)
    assert later.start_for(0, 1) == (3, (Segment(2, (10, 12)), Segment(3, (4, 0, 9))), 0)
    assert DataPosition(5, [0, 0], 2).start_for(0, 1) == (5, (), 0)  # nothing consumed: the epoch's own plan
    for p in (pos, later):
        assert DataPosition.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert DataPosition.from_dict(None) is None and "earlier" not in pos.to_dict()  # older checkpoints read alike


def _row_ids(units: list[dict], start: int = 0, stop: int | None = None) -> list[tuple]:
    """(uri, row group, index in the unit's seeded order) of a rank sequence's rows ``start``..``stop``."""
    rows = [(u["uri"], u["row_group"], k) for u in units for k in range(u["lo"], u["hi"])]
    return rows[start:stop]


@pytest.mark.parametrize("seed", range(8))
def test_every_row_of_an_epoch_is_dealt_once_however_often_the_group_size_changes(seed):
    """Random units, a random run of group sizes with random positions at each change (checkpoints anywhere): the
    rows each group consumed plus the last group's whole sequences are the epoch's rows, each exactly once; the
    plan is the same whenever it is rebuilt from the position, and a re-deal keeps the ranks' loads balanced."""
    rng = np.random.default_rng(seed)
    units = [{"uri": f"s{i}.parquet", "row_group": int(g), "rows": int(rng.integers(1, 40))}
             for i in range(int(rng.integers(1, 9))) for g in range(int(rng.integers(1, 4)))]
    everything = sorted((u["uri"], u["row_group"], k) for u in units for k in range(u["rows"]))
    earlier: tuple = ()
    used: list[tuple] = []
    for _ in range(int(rng.integers(1, 5))):
        world = int(rng.integers(1, 6))
        plan = train_stream.rank_plan(units, seed, 2, earlier, world)
        assert plan == train_stream.rank_plan(units, seed, 2, earlier, world)  # from the position alone
        position = tuple(int(rng.integers(0, sum(u["rows"] for u in rank) + 1)) for rank in plan)
        used += [row for rank, p in zip(plan, position) for row in _row_ids(rank, 0, p)]
        earlier += (Segment(world, position),)
        new_world = int(rng.integers(1, 6))
        after = train_stream.rank_plan(units, seed, 2, earlier, new_world)
        loads = [sum(u["rows"] for u in rank) for rank in after]
        rest = sum(loads)
        assert rest == len(everything) - len(used)
        assert max(loads) - min(loads) <= max(1, -(-rest // (2 * new_world))), loads  # at most one piece apart
    final = train_stream.rank_plan(units, seed, 2, earlier, int(rng.integers(1, 6)))
    used += [row for rank in final for row in _row_ids(rank)]
    assert sorted(used) == everything


def test_a_redeal_is_seeded_by_the_positions_and_the_new_group_size():
    units = _units()
    plan = train_stream.epoch_plan(units, seed=1, epoch=0, world=2)
    a = train_stream.redeal(plan, (3, 4), seed=1, epoch=0, world=3)
    assert a == train_stream.redeal(plan, (3, 4), seed=1, epoch=0, world=3)
    assert a != train_stream.redeal(plan, (3, 5), seed=1, epoch=0, world=3)
    assert a != train_stream.redeal(plan, (3, 4), seed=2, epoch=0, world=3)
    with pytest.raises(ValueError, match="3 positions for a plan of 2 ranks"):
        train_stream.redeal(plan, (1, 2, 3), seed=1, epoch=0, world=1)


def _rank_rows(prepared_shards, monkeypatch, start: int, epoch: int = 1, rank: int = 0, world: int = 1):
    """Rank ``rank``'s rows of ``epoch`` from ``start`` on, through the Ray Data task function in-process."""
    units = stream.read_units(prepared_shards["images"], "train")
    bank = transforms.load_mask_bank(prepared_shards["masks"])
    todo = train_stream.remaining_units(train_stream.epoch_plan(units, 9, epoch, world)[rank], start)
    block = {k: np.array([u[k] for u in todo]) for k in ("uri", "row_group", "_rand", "pos0", "skip", "lo", "hi")}
    out = list(stream.decode_train_units(block, pairs=bank, image_size=SIZE,
                                         base_seed=transforms.derive_seed("train", 9, epoch)))
    return {k: np.concatenate([o[k] for o in out]) for k in ("image", "mask", "id", "pos")}


def test_the_resumed_stream_equals_the_uninterrupted_tail_without_decoding_the_head(prepared_shards, monkeypatch):
    full = _rank_rows(prepared_shards, monkeypatch, 0)
    n = len(full["id"])
    assert list(full["pos"]) == list(range(n)) and len(set(full["id"].tolist())) == n
    units = stream.read_units(prepared_shards["images"], "train")
    assert len(units) >= 3 and n == sum(u["rows"] for u in units)
    decoded = []
    real_open = images.open_image
    monkeypatch.setattr(images, "open_image", lambda blob, **kw: decoded.append(1) or real_open(blob, **kw))
    for p in (1, units[0]["rows"], n // 2 + 1, n - 2):  # inside the first unit, on a unit boundary, late
        decoded.clear()
        tail = _rank_rows(prepared_shards, monkeypatch, p)
        assert len(decoded) == n - p, "rows before the position must not be decoded"
        for k in ("id", "pos", "image", "mask"):  # same row order, crops, flips and mask pairings
            np.testing.assert_array_equal(tail[k], full[k][p:], err_msg=f"{k} after position {p}")


def test_two_ranks_read_disjoint_rows_covering_the_epoch(prepared_shards, monkeypatch):
    r0, r1 = (_rank_rows(prepared_shards, monkeypatch, 0, rank=r, world=2) for r in (0, 1))
    ids = r0["id"].tolist() + r1["id"].tolist()
    assert len(ids) == len(set(ids)) == sum(u["rows"] for u in stream.read_units(prepared_shards["images"], "train"))


# ---------------------------------------------------------------------------------------------
# data/skipped across resume (issue 25 item 5)
# ---------------------------------------------------------------------------------------------
def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _train_root(root: Path, blobs: dict[str, bytes], monkeypatch) -> str:
    """An image shard root whose train split is one shard of ``blobs`` (key -> bytes) in row groups of 10 rows."""
    from pconv.storage import shards, uris

    monkeypatch.setattr(shards, "ROW_GROUP_MAX_ROWS", 10)
    writer = shards.ShardWriter(str(root), "train", shards.IMAGE_SCHEMA, 2**40, "test", "image")
    for key, blob in blobs.items():
        writer.add({"key": key, "image": blob, "height": 40, "width": 48, "format": "png", "split": "train"})
    writer.flush()
    manifest = {"schema_version": shards.SCHEMA_VERSION, "kind": shards.IMAGES_KIND, "source": "test",
                "run_id": "test", "counts": {"train": len(blobs), "val": 0}, "shards": writer.shards}
    uris.write_bytes_atomic(uris.join(str(root), shards.MANIFEST), json.dumps(manifest).encode())
    return str(root)


def _rows_from(images_uri: str, bank, size: int, start: int) -> dict[str, np.ndarray]:
    """One rank's rows of epoch 0 from ``start`` on, through the Ray Data task function in-process."""
    units = stream.read_units(images_uri, "train")
    todo = train_stream.remaining_units(train_stream.epoch_plan(units, 9, 0, 1)[0], start)
    block = {k: np.array([u[k] for u in todo]) for k in ("uri", "row_group", "_rand", "pos0", "skip", "lo", "hi")}
    out = list(stream.decode_train_units(block, pairs=bank, image_size=size,
                                         base_seed=transforms.derive_seed("train", 9, 0)))
    return {k: np.concatenate([o[k] for o in out] or [np.zeros(0, np.int64)]) for k in ("id", "pos", "skipped")}


def test_skipped_rows_are_counted_once_whatever_row_a_checkpoint_falls_after(prepared_shards, tmp_path, monkeypatch):
    """Corrupt rows placed in the seeded order so that checkpoints fall between a decode piece's first surviving row
    and a corrupt row of the same piece, and after a unit's last surviving row with corrupt rows still to come. For
    every position a checkpoint can record (after any row the worker consumed), the corrupt rows counted before it
    plus those the resumed stream counts equal the uninterrupted stream's count, which is every corrupt row."""
    from pconv.storage import shards

    size = 512  # stream.rows_per_block(512) == 8: a unit of 10 rows is decoded as pieces of 8 and 2 rows
    assert stream.rows_per_block(size) == 8
    bank = transforms.load_mask_bank(prepared_shards["masks"])
    keys = [f"img{i:02d}.png" for i in range(20)]
    good = {k: _png(i) for i, k in enumerate(keys)}
    order = _rows_from(_train_root(tmp_path / "good", good, monkeypatch), bank, size, 0)["id"]
    by_id = {shards.key_id(k): k for k in keys}
    seq = [by_id[int(i)] for i in order]  # the keys in the worker's epoch sequence (position -> key)
    assert len(seq) == 20
    # unit 1 = positions 0..9 (pieces 0..7, 8..9), unit 2 = 10..19 (pieces 10..17, 18..19): corrupt rows in the
    # middle of a piece, at a unit's start, and after a unit's last good row (a piece of corrupt rows only)
    corrupt = {3, 8, 9, 10, 15, 16, 19}
    blobs = {k: (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40 if seq.index(k) in corrupt else b) for k, b in good.items()}
    root = _train_root(tmp_path / "corrupt", blobs, monkeypatch)

    full = _rows_from(root, bank, size, 0)
    assert sorted(full["pos"].tolist()) == sorted(set(range(20)) - corrupt)
    uninterrupted = int(full["skipped"].sum())
    resumed = {}  # checkpoint position -> the resumed run's count
    for p in [int(q) + 1 for q in full["pos"]]:  # every position a checkpoint can record
        before = int(full["skipped"][full["pos"] < p].sum())  # what the checkpointed run had counted
        tail = _rows_from(root, bank, size, p)
        resumed[p] = before + int(tail["skipped"].sum())
    assert resumed == {p: uninterrupted for p in resumed}
    assert uninterrupted == len(corrupt)  # every corrupt row once (none after a unit's last good row is lost)


class _FakeStream:
    """WorkerStream's input: datasets are lists of batches per (epoch, start); an epoch re-dealt after a group-size
    change (``earlier``) leaves this rank ``rest`` rows (default: a whole epoch's)."""

    def __init__(self, rows_per_epoch: int, batch: int, rest: int | None = None) -> None:
        self.rows, self.batch, self.built = rows_per_epoch, batch, []
        self.rest = rows_per_epoch if rest is None else rest

    def sequence_rows(self, epoch, earlier):
        return self.rest if earlier else self.rows

    def dataset(self, epoch, earlier, start):
        self.built.append((epoch, start))
        rows = list(range(start, self.sequence_rows(epoch, earlier)))

        class DS:
            def iter_torch_batches(_self, batch_size, drop_last):
                for i in range(0, len(rows) - batch_size + 1, batch_size):
                    yield {"pos": torch.tensor(rows[i:i + batch_size]), "id": torch.tensor(rows[i:i + batch_size])}
        return DS() if rows else None


def test_worker_stream_positions_epochs_and_agreement():
    fake = _FakeStream(7, 2)
    s = train_stream.WorkerStream(fake, 2, DataPosition(0, [3], 1), 0, 1)
    got = [s.next() for _ in range(4)]
    assert [(e, b["id"].tolist()) for e, b in got] == [(0, [3, 4]), (0, [5, 6]), (1, [0, 1]), (1, [2, 3])]
    assert (s.epoch, s.rows) == (1, 4) and fake.built == [(0, 3), (1, 0)]
    # Another rank ran out: this one drops its batch and every rank moves to the next epoch together.
    votes = iter([True, False, True])
    s = train_stream.WorkerStream(_FakeStream(7, 2), 2, None, 0, 1, agree=lambda ok: next(votes))
    assert [s.next()[0] for _ in range(2)] == [0, 1] and s.rows == 2
    with pytest.raises(RuntimeError, match="smaller than one global batch"):
        train_stream.WorkerStream(_FakeStream(1, 2), 2, None, 0, 1).next()


def test_a_redealt_rest_shorter_than_a_batch_ends_its_epoch_not_the_run():
    """Resumed at another group size near an epoch's end, a rank's re-dealt rest of the epoch can be shorter than a
    batch: that epoch ends (its rows counted unused) and the next starts. It used to raise "the training set is
    smaller than one global batch" on every restart until the job failed (the node-loss test, once)."""
    fake = _FakeStream(7, 2, rest=1)
    s = train_stream.WorkerStream(fake, 2, DataPosition(0, [3, 3], 2), 0, 1)  # 2 ranks -> 1: epoch 0 re-dealt
    epoch, batch = s.next()
    assert (epoch, batch["id"].tolist()) == (1, [0, 1]) and s.ended == [(0, 1)]
    assert fake.built == [(0, 0), (1, 0)]


# ---------------------------------------------------------------------------------------------
# The grad scaler across the phase switch and resume (issue 14); the learning rate at resume (issue 25)
# ---------------------------------------------------------------------------------------------
def _ctx(cfg):
    amp = AmpSettings(True, torch.float16, True)
    return WorkerContext(cfg, 0, cfg.workers, torch.device("cpu"), amp, None)  # rank 0 of a full group (no DDP)


def _cfg(**kw):
    from pconv.core.config import TrainConfig

    base = dict(images="i", masks="m", image_size=32, batch_size=2, phase1_steps=2, phase2_steps=2,
                vgg_weights="random", layer_size=4)
    base.update(kw)
    return TrainConfig(**base).validate()


@pytest.fixture
def no_ddp(monkeypatch):
    """The worker's state is built without Ray Train's DDP wrapper (one process, no group)."""
    monkeypatch.setattr(loop, "prepare_for_training", lambda model, ctx: model)


def test_grad_scaler_state_survives_the_phase_switch_and_resume_from_the_switch_checkpoint(monkeypatch, no_ddp):
    cfg = _cfg()
    monkeypatch.setattr(loop, "_restore", lambda model, cfg: None)
    state = loop._initial_state(_ctx(cfg))
    state.scaler.scale(torch.ones(()))  # the scaler's state exists once it has scaled something
    state.scaler.update(new_scale=512.0)
    scaler = state.scaler
    loop._enter_phase_2(state, _ctx(cfg))  # uninterrupted: the same scaler, same scale
    assert state.scaler is scaler and state.scaler.get_scale() == 512.0

    # The checkpoint at the switch (step == phase1_steps) says phase 1; the resumed run is in phase 2.
    saved = {**state.record(0, DataPosition(0, [4], 1), {}), "phase": 1, "step": 2}
    saved["scaler"] = scaler.state_dict()
    saved["optimizer"] = {"state": {}, "param_groups": []}  # phase 1's: must not be loaded into phase 2's Adam
    monkeypatch.setattr(loop, "_restore", lambda model, cfg: saved)
    resumed = loop._initial_state(_ctx(cfg))
    assert resumed.phase == 2 and resumed.scaler.get_scale() == 512.0
    assert resumed.scaler.state_dict()["_growth_tracker"] == scaler.state_dict()["_growth_tracker"]
    assert resumed.position == DataPosition(0, [4], 1)
    assert resumed.optimizer.param_groups[0]["lr"] == cfg.effective_lr(2)


@pytest.mark.parametrize("change", [{"lr": 1e-3}, {"workers": 2, "batch_size": 12, "lr_scaling": "linear"}],
                         ids=["new-lr", "more-workers-linear-scaling"])
def test_resume_applies_the_configured_lr_keeps_adams_moments_and_logs_the_lr(monkeypatch, no_ddp, caplog, change):
    """A resume with another --lr (or --workers with --lr-scaling) runs at the configured rate, not the checkpoint's
    (Adam's ``load_state_dict`` restores the saved one); the moments carry over, and the log says both rates."""
    import logging

    before, after = _cfg(phase1_steps=4), _cfg(phase1_steps=4, **change)
    assert after.effective_lr(1) != before.effective_lr(1)
    monkeypatch.setattr(loop, "_restore", lambda model, cfg: None)
    state = loop._initial_state(_ctx(before))
    for p in state.model.parameters():  # one optimiser step: Adam has moments to carry over
        p.grad = torch.full_like(p, 0.5)
    state.optimizer.step()
    state.step = 2
    saved = state.record(0, DataPosition(0, [4], 1), {})
    assert saved["optimizer"]["param_groups"][0]["lr"] == before.effective_lr(1)

    caplog.set_level(logging.INFO, logger="pconv.train.state")
    monkeypatch.setattr(loop, "_restore", lambda model, cfg: saved)
    resumed = loop._initial_state(_ctx(after))
    assert resumed.phase == 1 and resumed.step == 2
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [after.effective_lr(1)]
    moments = resumed.optimizer.state_dict()["state"]
    assert moments and all(torch.equal(moments[i]["exp_avg"], saved["optimizer"]["state"][i]["exp_avg"])
                           for i in moments)
    assert f"with lr {after.effective_lr(1):g}; the checkpoint trained at lr {before.effective_lr(1):g}" in caplog.text

    caplog.clear()  # the same config: the same rate, and the log still says it
    same = loop._initial_state(_ctx(before))
    assert same.optimizer.param_groups[0]["lr"] == before.effective_lr(1)
    assert f"resumed at step 2 (phase 1) with lr {before.effective_lr(1):g}" in caplog.text


def test_checkpoint_records_the_data_position_in_state_and_meta(tmp_path):
    state = {"model": {}, "step": 3, "data_position": DataPosition(1, [5, 7], 2).to_dict()}
    checkpoints.save(tmp_path, state, "a: 1\n", {"step": 3, "data_position": state["data_position"]})
    assert checkpoints.load_state(tmp_path)["data_position"] == {"epoch": 1, "rows": [5, 7], "world": 2}
    assert checkpoints.load_meta(tmp_path)["data_position"]["rows"] == [5, 7]

# ---------------------------------------------------------------------------------------------
# DDP's bucket layout across resume (issue 25 item 6)
# ---------------------------------------------------------------------------------------------
DDP_WORKER = textwrap.dedent("""
    import json, sys

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pconv.core.config import TrainConfig
    from pconv.core.unet import build_model
    from pconv.train.loop import ddp_options

    rank, port = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    gen = torch.Generator().manual_seed(rank)
    batches = [(torch.rand(2, 3, 32, 32, generator=gen), (torch.rand(2, 1, 32, 32, generator=gen) > 0.3).float())
               for _ in range(2)]

    def grads(model, steps):
        for image, mask in steps:  # forward + backward (DDP all-reduces the gradients); no optimiser step
            model.zero_grad(set_to_none=True)
            output, _ = model(image * mask, mask)
            (output - image).abs().mean().backward()
        return [p.grad for p in model.parameters()]

    out = {}
    for name, options in (("pconv", ddp_options(TrainConfig(images="i", masks="m"))), ("ddp defaults", {})):
        torch.manual_seed(0)
        weights = build_model(4).state_dict()
        running, resumed = build_model(4), build_model(4)
        running.load_state_dict(weights)
        resumed.load_state_dict(weights)
        later = grads(DistributedDataParallel(running, **options), batches)  # batch 2 = a DDP's second step
        first = grads(DistributedDataParallel(resumed, **options), batches[1:])  # batch 2 = a new DDP's first
        out[name] = all(torch.equal(a, b) for a, b in zip(later, first))
    dist.destroy_process_group()
    print(json.dumps(out))
""")


def test_a_new_ddp_reduces_its_first_step_like_a_running_one_with_three_workers(tmp_path):
    """A resumed worker group builds a new DDP. Its first step must all-reduce the gradients bit for bit as the
    uninterrupted run's DDP does at that step: three gloo processes compute the gradients of one batch as the second
    step of a DDP and as the first step of a new one, from the same weights. With :func:`pconv.train.loop.ddp_options`
    they are equal; with DDP's defaults (the control: what the test sees) they are not, because DDP regroups its
    buckets after its first step and a ring all-reduce over 3 ranks adds each element in an order set by its offset
    in the bucket (with 2 ranks, a + b is b + a)."""
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_WORKER)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(3)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs == [{"pconv": True, "ddp defaults": False}] * 3



# ---------------------------------------------------------------------------------------------
# Whole runs: interrupted + resumed == uninterrupted (local Ray, real workers, CPU)
# ---------------------------------------------------------------------------------------------
def _run(prepared_shards, tmp_path, name: str, workers: int, crash: dict | None = None, **kw):
    """Train ``name`` (8 steps over ~1.5 epochs, both phases, --deterministic; ``kw`` overrides) with sample ids
    traced."""
    from pconv.core.config import TrainConfig
    from pconv.train.driver import run

    trace = tmp_path / f"trace-{name}"
    trace.mkdir(exist_ok=True)
    settings = {"image_size": SIZE, "batch_size": 2 * workers, "workers": workers, "phase1_steps": 4,
                "phase2_steps": 4, "checkpoint_every": 2, "val_every": 100, "sample_every": 100, "log_every": 4,
                "val_size": 2, "vgg_weights": "random", "storage": str(tmp_path / "runs"), "run_name": name,
                "register_as": "", "deterministic": True}
    cfg = TrainConfig(images=prepared_shards["images"], masks=prepared_shards["masks"], **{**settings, **kw})
    return run(cfg, step_hook=fault_hooks(str(trace), crash)), trace


def _resumed_at(trace: Path, crashed_after: int) -> int:
    """The step a worker group restarted after a crash right after the checkpoint of ``crashed_after`` resumed from:
    Ray resumes from the newest checkpoint whose report reached its controller from every rank, which may be an
    earlier one; the steps after it are traced again."""
    steps = [json.loads(line)["step"] for line in (trace / "rank0.jsonl").read_text().splitlines()]
    again = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)
    return steps[again] - 1 if again is not None else crashed_after


def _steps(trace: Path, workers: int) -> dict[int, list]:
    """step -> (epoch, ids of every rank); a step traced twice (before and after a crash) keeps its last record."""
    out: dict[int, list] = {}
    for rank in range(workers):
        for line in (trace / f"rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], [None] * workers)[rank] = (rec["epoch"], rec["ids"])
    return dict(sorted(out.items()))


def _final_model(tmp_path, name: str) -> dict[str, torch.Tensor]:
    found = checkpoints.latest(str(tmp_path / "runs" / name))
    assert found and found[1]["step"] == 8
    return checkpoints.load_state(found[0])["model"]


def _assert_same_run(tmp_path, a: str, b: str, trace_a: Path, trace_b: Path, workers: int) -> None:
    steps_a, steps_b = _steps(trace_a, workers), _steps(trace_b, workers)
    assert list(steps_a) == list(range(1, 9)) and steps_a == steps_b  # the same samples at every step
    assert len({e for s in steps_a.values() for e, _ in s}) >= 2  # the runs crossed an epoch boundary
    model_a, model_b = _final_model(tmp_path, a), _final_model(tmp_path, b)
    for k in model_a:  # bit-identical on CPU (README: exact resume)
        assert torch.equal(model_a[k], model_b[k]), k


@pytest.mark.slow
def test_a_killed_job_resubmitted_ends_like_an_uninterrupted_run(prepared_shards, tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, trace_a = _run(prepared_shards, tmp_path, "whole", 1)
    crash = {"rank": 0, "step": 4, "marker": str(tmp_path / "crashed-job")}
    with pytest.raises(Exception):  # noqa: B017 - the job dies (no restarts allowed): whatever Ray raises
        _run(prepared_shards, tmp_path, "killed", 1, crash=crash, max_failures=0)
    assert Path(crash["marker"]).exists() and checkpoints.latest(str(tmp_path / "runs" / "killed"))[1]["step"] == 4
    resumed, trace_b = _run(prepared_shards, tmp_path, "killed", 1, crash=crash, max_failures=0)
    assert resumed.status == "finished" and resumed.step == 8
    _assert_same_run(tmp_path, "whole", "killed", trace_a, trace_b, 1)


@pytest.fixture(scope="module")
def corrupt_images(prepared_shards, tmp_path_factory) -> str:
    """prepared_shards' images with each train row twice (the copy under another key: enough rows for 3 workers)
    and a corrupt row after them (the val split as is): every rank drops rows, so ``data/skipped`` must be their
    sum over the ranks; and in the seeded row orders corrupt rows sit between good rows of a unit, where a checkpoint
    can fall (issue 25 item 5)."""
    from pconv.storage import shards, uris

    src = prepared_shards["images"]
    manifest = shards.read_manifest(src)
    root, entries = str(tmp_path_factory.mktemp("corrupt") / "images"), []
    for i, entry in enumerate(manifest["shards"]):
        rows = shards.read_table([uris.join(src, entry["path"])], shards.IMAGE_SCHEMA.names).to_pylist()
        if entry["split"] == "train":
            bad = [{**row, "key": f"bad/{i}-{j}-truncated", "image": row["image"][:200]} if j % 2 else
                   {**row, "key": f"bad/{i}-{j}-garbage.png", "image": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40}
                   for j, row in enumerate(rows)]
            rows = [r for j, row in enumerate(rows) for r in (row, {**row, "key": f"copy/{row['key']}"}, bad[j])]
        writer = shards.ShardWriter(root, entry["split"], shards.IMAGE_SCHEMA, 2**40, f"c{i}", "image")
        for row in rows:
            writer.add(row)
        writer.flush()
        entries += writer.shards
    counts = {s: sum(e["rows"] for e in entries if e["split"] == s) for s in shards.SPLITS}
    manifest = {**manifest, "shards": entries, "counts": counts}
    uris.write_bytes_atomic(uris.join(root, shards.MANIFEST), json.dumps(manifest).encode())
    return root


def _rows_counting_after_the_position(images_uri: str, masks_uri: str, position: dict, seed: int) -> list[set]:
    """Per rank: the ids of the rows of the unit ``position`` falls inside (none on a unit boundary), from the
    position on, that count corrupt rows: corrupt rows after the position and before the unit's end, which the
    uninterrupted run had counted on the unit's (decode piece's) first row, before the position, when a decode piece
    counted its corrupt rows on its first row (issue 25 item 5)."""
    units = stream.read_units(images_uri, "train")
    bank = transforms.load_mask_bank(masks_uri)
    out = []
    for rank, start in enumerate(position["rows"]):
        plan = train_stream.epoch_plan(units, seed, position["epoch"], position["world"])[rank]
        pos0 = np.cumsum([0] + [u["rows"] for u in plan])
        if not any(pos0[k] < start < pos0[k + 1] for k in range(len(plan))):
            out.append(set())  # on a unit boundary
            continue
        todo = train_stream.remaining_units(plan, start)[:1]  # the unit holding the position, from it on
        block = {k: np.array([u[k] for u in todo]) for k in ("uri", "row_group", "_rand", "pos0", "skip", "lo", "hi")}
        rows = list(stream.decode_train_units(block, pairs=bank, image_size=SIZE,
                                              base_seed=transforms.derive_seed("train", seed, position["epoch"])))
        out.append({int(i) for r in rows for i, n in zip(r["id"], r["skipped"]) if n > 0})
    return out


@pytest.mark.slow
def test_a_lost_worker_of_three_restarted_by_ray_ends_like_an_uninterrupted_run(prepared_shards, corrupt_images,
                                                                                tmp_path, ray_local, monkeypatch):
    """3 workers (issue 25 item 6: with 2, a ring all-reduce adds a + b either way; with 3 the order depends on an
    element's offset in DDP's bucket, which DDP regroups after a new group's first step) on the session Ray's 2
    CPUs, and a worker lost after the checkpoint of step 6. The phase switch (a new DDP in both runs) is at step 3,
    between checkpoints, so whichever checkpoint the group resumes from, its first step is a new DDP's first step
    where the uninterrupted run's DDP had regrouped; the data position there falls inside a unit with corrupt rows
    still to come (item 5). The restarted group ends with the uninterrupted run's weights, bit for bit, and the same
    ``data/skipped``."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    inputs = {**prepared_shards, "images": corrupt_images}  # corrupt rows on every rank (data/skipped below)
    # 3 x 0.3 CPU + the 1 CPU the driver keeps for Ray Data's decode tasks; every checkpoint kept (the resume
    # point); seed 1: the data positions of the checkpoints at steps 2, 4 and 6 all fall inside a unit with corrupt
    # rows still to come that the run goes on to consume (item 5)
    three = {"cpus_per_worker": 0.3, "phase1_steps": 3, "phase2_steps": 5, "num_to_keep": 4, "seed": 1,
             "lineage": True}
    whole, trace_a = _run(inputs, tmp_path, "whole3", 3, **three)
    crash = {"rank": 1, "step": 6, "marker": str(tmp_path / "crashed-worker")}
    summary, trace_b = _run(inputs, tmp_path, "lost3", 3, crash=crash, max_failures=1, **three)
    assert Path(crash["marker"]).exists() and summary.status == "finished" and summary.step == 8
    resumed_at = _resumed_at(trace_b, crash["step"])
    assert resumed_at in (2, 4, 6), resumed_at  # from a checkpoint inside a phase, not from scratch
    meta = checkpoints.load_meta(tmp_path / "runs" / "lost3" / f"checkpoint_step_{resumed_at:08d}")
    position = meta["data_position"]
    assert position["world"] == 3 and len(position["rows"]) == 3
    counting = _rows_counting_after_the_position(corrupt_images, prepared_shards["masks"], position, three["seed"])
    steps = _steps(trace_b, 3)
    consumed = [{i for step in steps if step > resumed_at and steps[step][r][0] == position["epoch"]
                 for i in steps[step][r][1]} for r in range(3)]
    assert any(ids & seen for ids, seen in zip(counting, consumed)), (position, counting, consumed)
    _assert_same_run(tmp_path, "whole3", "lost3", trace_a, trace_b, 3)
    # data/skipped (logged by rank 0) is the corrupt rows the batches of ALL ranks carried, summed over the run
    per_rank = [sum(json.loads(line)["skipped"] for line in (trace_a / f"rank{r}.jsonl").read_text().splitlines())
                for r in range(3)]
    assert min(per_rank) > 0, per_rank
    for run in (whole, summary):  # the restarted group continues the count from its checkpoint
        logged = {m.step: m.value for m in MlflowClient().get_metric_history(run.mlflow_run_id, "data/skipped")}
        assert logged[8] == sum(per_rank), (run.mlflow_run_id, logged, per_rank)
    # Lineage (issue 26 item 3): each run's lineage/ files give, for every step and rank, the epoch and ids the
    # trace saw (for the restarted run: the redone steps' rows replaced the lost attempt's), and no train row twice
    # in an epoch.
    for run, trace in ((whole, trace_a), (summary, trace_b)):
        rows = lineage.read(run.mlflow_run_id).to_pylist()
        seen: dict[int, list] = {}
        for r in rows:
            seen.setdefault(r["step"], [(None, [])] * 3)
            epoch, ids = seen[r["step"]][r["rank"]]
            seen[r["step"]][r["rank"]] = (r["epoch"], ids + [r["id"]])
            assert r["world_size"] == 3
        traced = _steps(trace, 3)
        assert len(rows) == sum(len(ids) for per_rank_ids in traced.values() for _, ids in per_rank_ids)
        assert {s: [(e, sorted(i)) for e, i in v] for s, v in seen.items()} == {
            s: [(e, sorted(i)) for e, i in v] for s, v in traced.items()}
        by_epoch: dict[int, list] = {}
        for r in rows:
            by_epoch.setdefault(r["epoch"], []).append(r["id"])
        assert all(len(ids) == len(set(ids)) for ids in by_epoch.values()), "a row trained twice in an epoch"


def test_val_pairs_read_and_decode_only_the_rows_they_use(prepared_shards, monkeypatch):
    from pconv.storage import shards
    images_uri, bank = prepared_shards["images"], transforms.load_mask_bank(prepared_shards["masks"], "val")
    everything = stream.load_val_pairs(images_uri, bank, SIZE)
    assert len(everything.keys) >= 3
    decoded, image_rows = [], []
    real_open, real_read = images.open_image, shards.read_row_group
    monkeypatch.setattr(images, "open_image", lambda blob, **kw: decoded.append(1) or real_open(blob, **kw))

    def read(uri, group, columns):
        table = real_read(uri, group, columns)
        if "image" in columns:
            image_rows.append(table.num_rows)
        return table

    monkeypatch.setattr(shards, "read_row_group", read)
    first = stream.load_val_pairs(images_uri, bank, SIZE, limit=1)
    assert first.keys == everything.keys[:1] and len(decoded) == 1
    np.testing.assert_array_equal(first.rows["image"][0], everything.rows["image"][0])
    units = stream.read_units(images_uri, "val")
    holding = [u for u in units
               if everything.keys[0] in real_read(u["uri"], u["row_group"], ["key"]).column("key").to_pylist()]
    assert len(image_rows) == 1 and image_rows[0] <= holding[0]["rows"]  # one row group's bytes, not the split's
