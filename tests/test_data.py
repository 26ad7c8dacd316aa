"""pconv.data.stream on real Ray: shards on a real moto S3 server -> decoded, cropped, masked batches; epochs, validation,
corrupt rows, and a 2-worker Ray Train (V2) TorchTrainer consuming the dataset.

Ray is started once for the module with num_cpus=2 (logical), the size of the development machine, and the
training workers take 0.5 CPU each as pconv.train.driver does on CPU: this is the configuration that must not stall
(read/decode tasks request 0.5 CPU or less; Ray Data's file listing needs one free CPU for a moment).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pconv.data import stream

from pconv.data import inputs

from pconv.storage import shards

from pconv.storage import uris
pytestmark = pytest.mark.integration
SIZE = 32


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """Started after the S3 server so Ray's worker processes inherit AWS_ENDPOINT_URL & co."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_shards(prepared_shards, s3_server, tmp_path_factory) -> dict[str, str]:
    """The session's local shards uploaded to a fresh bucket: {"images": s3://..., "masks": s3://...}."""
    s3_server.create_bucket("data-shards")
    out = {}
    for name, local in prepared_shards.items():
        uri = f"s3://data-shards/{name}"
        uris.upload_dir(local, uri)
        out[name] = uri
    return out


def _train_keys(root: str) -> set[int]:
    manifest = shards.read_manifest(root)
    keys = shards.read_table(shards.shard_uris(root, manifest, "train"), ["key"]).column("key").to_pylist()
    return {shards.key_id(k) for k in keys}


def _epoch(ds) -> tuple[list[int], dict[int, torch.Tensor], dict[int, torch.Tensor], int]:
    ids, images, masks, skipped = [], {}, {}, 0
    for batch in inputs.iter_batches(ds, 4, include_masked=True):
        assert batch["image"].dtype == torch.float32 and batch["mask"].dtype == torch.float32
        n = len(batch["id"])
        assert batch["image"].shape == (n, 3, SIZE, SIZE) and batch["mask"].shape == (n, 1, SIZE, SIZE)
        assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
        assert set(torch.unique(batch["mask"]).tolist()) <= {0.0, 1.0}
        torch.testing.assert_close(batch["masked"], batch["image"] * batch["mask"])
        skipped += int(batch["skipped"].sum())
        for i, id_ in enumerate(batch["id"].tolist()):
            ids.append(id_)
            images[id_], masks[id_] = batch["image"][i], batch["mask"][i]
    return ids, images, masks, skipped


def test_train_stream_from_s3_epochs_differ(ray_cluster, s3_shards):
    ds = stream.build_train_dataset(s3_shards["images"], s3_shards["masks"], SIZE, seed=5, num_cpus=0.25)
    expected = _train_keys(s3_shards["images"])
    ids0, img0, mask0, skipped0 = _epoch(ds)
    ids1, img1, mask1, skipped1 = _epoch(ds)  # second pass over the SAME dataset (as Ray Train epochs do)
    assert sorted(ids0) == sorted(ids1) == sorted(expected) and skipped0 == skipped1 == 0
    assert ids0 != ids1, "row order must change between epochs"
    changed = [i for i in ids0 if not torch.equal(img0[i], img1[i]) or not torch.equal(mask0[i], mask1[i])]
    assert len(changed) == len(ids0), "crops/flips/masks must be re-drawn every epoch"
    hole = np.array([1.0 - float(m.mean()) for m in mask0.values()])
    assert (hole > 0.0).all() and hole.mean() < 0.8  # real holes, not all-hole masks



def test_deterministic_mode_reproduces_and_epoch_argument_changes(ray_cluster, prepared_shards):
    args = (prepared_shards["images"], prepared_shards["masks"], SIZE)
    ids_a, img_a, mask_a, _ = _epoch(stream.build_train_dataset(*args, seed=5, num_cpus=0.25, deterministic=True))
    ids_b, img_b, mask_b, _ = _epoch(stream.build_train_dataset(*args, seed=5, num_cpus=0.25, deterministic=True))
    assert ids_a == ids_b
    assert all(torch.equal(img_a[i], img_b[i]) and torch.equal(mask_a[i], mask_b[i]) for i in ids_a)
    ids_c, img_c, _, _ = _epoch(stream.build_train_dataset(*args, seed=5, epoch=1, num_cpus=0.25, deterministic=True))
    assert sorted(ids_c) == sorted(ids_a) and ids_c != ids_a
    assert any(not torch.equal(img_a[i], img_c[i]) for i in ids_a)


def test_iter_train_batches_crosses_epochs(ray_cluster, prepared_shards):
    n_train = shards.read_manifest(prepared_shards["images"])["counts"]["train"]
    per_epoch = n_train // 4
    seen = []
    for step, (epoch, batch) in enumerate(stream.iter_train_batches(prepared_shards["images"], prepared_shards["masks"],
                                                                  SIZE, 4, seed=1, num_cpus=0.25)):
        assert batch["image"].shape == (4, 3, SIZE, SIZE)
        seen.append(epoch)
        if step + 1 == per_epoch + 2:
            break
    assert seen == [0] * per_epoch + [1, 1]


def _corrupt_root(prepared_shards, tmp_path) -> tuple[str, int, int]:
    """A shard root whose single train shard holds real images plus rows that no longer decode."""
    src = prepared_shards["images"]
    manifest = shards.read_manifest(src)
    table = shards.read_table(shards.shard_uris(src, manifest, "train"), ["key", "image", "height", "width",
                                                                          "format", "split"])
    rows = table.to_pylist()[:6]
    good = len(rows)
    rows.append({**rows[0], "key": "bad/truncated.jpg", "image": rows[0]["image"][:300]})
    rows.append({**rows[1], "key": "bad/garbage.png", "image": b"\x89PNG\r\n\x1a\n" + b"\x00" * 50})
    root = str(tmp_path / "corrupt")
    writer = shards.ShardWriter(root, "train", shards.IMAGE_SCHEMA, 2**40, "test", "image")
    for r in rows:
        writer.add(r)
    writer.flush()
    bad_manifest = {**manifest, "shards": writer.shards, "counts": {"train": len(rows), "val": 0}}
    uris.write_bytes_atomic(uris.join(root, shards.MANIFEST), json.dumps(bad_manifest).encode())
    return root, good, len(rows) - good


def test_corrupt_rows_are_skipped_and_counted(ray_cluster, prepared_shards, tmp_path):
    root, good, bad = _corrupt_root(prepared_shards, tmp_path)
    ds = stream.build_train_dataset(root, prepared_shards["masks"], SIZE, seed=0, num_cpus=0.25)
    ids, _, _, skipped = _epoch(ds)
    assert len(ids) == good and skipped == bad == 2
    assert shards.key_id("bad/truncated.jpg") not in ids


def test_validation_pairs_are_fixed(ray_cluster, prepared_shards):
    images, masks = prepared_shards["images"], prepared_shards["masks"]
    a = stream.load_val_pairs(images, masks, SIZE)
    b = stream.load_val_pairs(images, masks, SIZE)
    n_val = shards.read_manifest(images)["counts"]["val"]
    assert a["image"].shape == (n_val, 3, SIZE, SIZE) and a["mask"].shape == (n_val, 1, SIZE, SIZE)
    assert a["keys"] == sorted(a["keys"]) and a["mask_keys"] == b["mask_keys"]
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert set(np.unique(a["mask"])) <= {0.0, 1.0} and a["image"].min() >= 0 and a["image"].max() <= 1
    assert len(set(a["mask_keys"])) == n_val  # spread over the mask set, not the first few
    assert len(set(a["bin"].tolist())) > 1
    limited = stream.load_val_pairs(images, masks, SIZE, limit=2)
    assert limited["keys"] == a["keys"][:2]

    rows = stream.build_val_dataset(images, masks, SIZE, num_cpus=0.25).take_all()
    rows2 = stream.build_val_dataset(images, masks, SIZE, num_cpus=0.25).take_all()
    by_index = {int(r["index"]): r for r in rows}
    assert sorted(by_index) == list(range(n_val))
    assert {int(r["index"]): int(r["mask_index"]) for r in rows2} == \
        {i: int(r["mask_index"]) for i, r in by_index.items()}
    for i in range(n_val):  # the Ray path and the plain path build identical pairs (compact uint8 rows)
        assert by_index[i]["image"].dtype == np.uint8 and by_index[i]["mask"].dtype == np.uint8
        np.testing.assert_allclose(by_index[i]["image"].astype(np.float32) / 255, a["image"][i], rtol=1e-6)
        np.testing.assert_array_equal(by_index[i]["mask"].astype(np.float32), a["mask"][i])


def test_torch_trainer_two_workers(ray_cluster, s3_shards, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Defined here so cloudpickle ships it by value (workers cannot import this test module).
    def _loop(config):
        import json as _json

        import ray.train

        rank = ray.train.get_context().get_world_rank()
        shard = ray.train.get_dataset_shard("train")
        out = {"epochs": [], "shapes": None}
        for _ in range(2):
            ids = []
            for batch in shard.iter_torch_batches(batch_size=2, drop_last=True):
                out["shapes"] = {k: list(v.shape) for k, v in batch.items()}
                ids += batch["id"].tolist()
            out["epochs"].append(ids)
        Path(config["out"], f"rank{rank}.json").write_text(_json.dumps(out))
        ray.train.report({"batches": len(out["epochs"][0])})

    ds = stream.build_train_dataset(s3_shards["images"], s3_shards["masks"], SIZE, seed=2, num_cpus=0.25)
    trainer = TorchTrainer(
        _loop, train_loop_config={"out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="data-test", storage_path=str(tmp_path / "ray")),
        datasets={"train": ds},
    )
    trainer.fit()
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    n_train = shards.read_manifest(s3_shards["images"])["counts"]["train"]
    for rep in reports:
        assert rep["shapes"]["image"] == [2, 3, SIZE, SIZE] and rep["shapes"]["mask"] == [2, 1, SIZE, SIZE]
        assert len(rep["epochs"][0]) >= 2 and rep["epochs"][0] != rep["epochs"][1]
    for epoch in (0, 1):
        seen = reports[0]["epochs"][epoch] + reports[1]["epochs"][epoch]
        assert len(seen) == len(set(seen)) and len(seen) >= n_train - 4  # disjoint shards, drop_last only


def test_read_units_cover_every_row_with_or_without_recorded_row_groups(prepared_shards, tmp_path):
    root = prepared_shards["images"]
    manifest = shards.read_manifest(root)
    units = stream.read_units(root, "train", manifest)
    assert sum(u["rows"] for u in units) == manifest["counts"]["train"]
    assert all(e.get("row_groups") for e in manifest["shards"])  # written by ingestion
    # An older manifest without row-group sizes: the same units, from the shards' Parquet footers.
    legacy = {**manifest, "shards": [{k: v for k, v in e.items() if k != "row_groups"} for e in manifest["shards"]]}
    assert stream.read_units(root, "train", legacy) == units
    rows = sum(shards.read_row_group(u["uri"], u["row_group"], ["key"]).num_rows for u in units)
    assert rows == manifest["counts"]["train"]


def test_a_missing_or_mismatched_shard_is_a_clear_error(prepared_shards, tmp_path):
    root = prepared_shards["images"]
    unit = stream.read_units(root, "train")[0]
    with pytest.raises(ValueError, match="no row group 999"):
        shards.read_row_group(unit["uri"], 999, ["key"])
    with pytest.raises(FileNotFoundError, match="missing"):
        shards.read_row_group(str(tmp_path / "gone.parquet"), 0, ["key"])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="junk.parquet: not a readable Parquet shard"):
        shards.read_row_group(str(tmp_path / "junk.parquet"), 0, ["key"])


def test_rows_are_compact_uint8_and_float_batches_follow_the_contract(ray_cluster, prepared_shards):
    def build():
        return stream.build_train_dataset(prepared_shards["images"], prepared_shards["masks"], SIZE, seed=3,
                                        num_cpus=0.25, deterministic=True)

    raw = next(iter(build().iter_torch_batches(batch_size=4)))
    assert raw["image"].dtype == torch.uint8 and raw["mask"].dtype == torch.uint8
    assert set(torch.unique(raw["mask"]).tolist()) <= {0, 1}
    batch = inputs.to_float_batch(raw, include_masked=True)
    torch.testing.assert_close(batch["image"] * 255, raw["image"].float(), rtol=0, atol=1e-4)
    torch.testing.assert_close(batch["masked"], batch["image"] * raw["mask"].float())
    same = next(inputs.iter_batches(build(), 4))  # the collate path gives the same floats
    torch.testing.assert_close(same["image"], batch["image"])
    assert torch.equal(same["id"], raw["id"])


def test_the_next_read_unit_is_fetched_while_one_is_decoded(prepared_shards, monkeypatch):
    """Object-storage latency hides behind decoding: while unit j is decoded, unit j + 1 is already being read.
    (Decoding unit j waits until the read of unit j + 1 has started; a read-then-decode loop fails here.)"""
    import threading

    from pconv.data import transforms
    units = stream.read_units(prepared_shards["images"], "train")[:3]
    assert len(units) == 3
    unit_of = {k: j for j, u in enumerate(units)
               for k in shards.read_row_group(u["uri"], u["row_group"], ["key"]).column("key").to_pylist()}
    bank = transforms.load_mask_bank(prepared_shards["masks"])
    monkeypatch.setattr(stream, "_resolve_bank", lambda holder: bank)
    reads, cond = [], threading.Condition()
    real_rows, real_transform = stream._unit_rows, transforms.train_transform

    def rows(uri, group, *args):
        with cond:
            reads.append((uri, group))
            cond.notify_all()
        return real_rows(uri, group, *args)

    def transform(batch, **kwargs):
        j = unit_of[str(batch["key"][0])]
        with cond:
            assert cond.wait_for(lambda: len(reads) >= min(j + 2, len(units)), timeout=10), \
                f"unit {j + 1} was not being read while unit {j} was decoded"
        return real_transform(batch, **kwargs)

    monkeypatch.setattr(stream, "_unit_rows", rows)
    monkeypatch.setattr(transforms, "train_transform", transform)
    block = {"uri": np.array([u["uri"] for u in units]), "row_group": np.array([u["row_group"] for u in units]),
             "_rand": np.array([0.1, 0.2, 0.3])}  # units are taken in _rand order
    out = list(stream._train_units_udf(block, bank=[None], image_size=SIZE, base_seed=0))
    assert reads == [(u["uri"], u["row_group"]) for u in units]
    assert sum(len(o["id"]) for o in out) == sum(u["rows"] for u in units)


_FAULTS_SCRIPT = """
import ctypes, resource, sys
import numpy as np
from pconv.data import allocator
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KB pages only, so fault counts do not depend
                                         # on whether the kernel found free 2 MB huge pages this time
applied = allocator.reuse_freed_memory() if sys.argv[1] == "tune" else False
def churn():  # allocate, touch and free a 48 MB buffer (above glibc's largest adaptive mmap threshold)
    a = np.empty(48 * 2**20, np.uint8)
    a.fill(1)
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    churn()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="malloc tuning is glibc-only")
def test_reuse_freed_memory_stops_page_faults_on_reallocation():
    """After reuse_freed_memory() a freed large buffer is reused: allocating it again costs no page faults
    (each fresh mmap page-faults on first touch). PCONV_MALLOC_TUNING=0 opts out."""
    import os
    import subprocess
    import sys

    def run(mode: str, **env: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[1],
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **env})
        applied, faults = out.stdout.split()
        return applied, int(faults)

    plain, tuned, opted_out = run("plain"), run("tune"), run("tune", PCONV_MALLOC_TUNING="0")
    assert plain[0] == "False" and tuned[0] == "True" and opted_out[0] == "False"
    assert plain[1] >= 100, plain  # 10 x 48 MB fresh mappings: ~120,000 faults of 4 KB pages
    assert tuned[1] * 20 < plain[1], (tuned, plain)
    assert opted_out[1] * 2 > plain[1], (opted_out, plain)


def test_decode_tasks_and_training_workers_tune_malloc(prepared_shards, monkeypatch):
    """The processes that allocate per image (read/decode tasks) and per batch (training workers) call it."""
    import inspect

    from pconv.train import loop
    from pconv.data import transforms
    calls = []
    monkeypatch.setattr(stream, "reuse_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(stream, "_resolve_bank", lambda holder: transforms.load_mask_bank(prepared_shards["masks"]))
    unit = stream.read_units(prepared_shards["images"], "train")[0]
    block = {"uri": np.array([unit["uri"]]), "row_group": np.array([unit["row_group"]]), "_rand": np.array([0.5])}
    next(stream._train_units_udf(block, bank=[None], image_size=SIZE, base_seed=0))
    assert calls == [1]
    next(stream._val_units_udf({"uri": block["uri"], "row_group": block["row_group"]}, bank=[None],
                             image_size=SIZE, pairing={}))
    assert calls == [1, 1]
    assert "reuse_freed_memory()" in inspect.getsource(loop.train_loop_per_worker)


def test_read_ahead_reads_the_next_unit_while_the_caller_decodes_this_one(monkeypatch):
    """Train and val decode tasks read unit j + 1 in a background thread while decoding unit j: units come back
    in order, each read once, with its own shuffle flag, and unit 1's read starts before unit 0 is released."""
    import threading

    started = {i: threading.Event() for i in range(3)}
    reads = []

    def fake_rows(uri, group, unit_rand, base_seed, shuffle):
        reads.append((uri, group, base_seed, shuffle, threading.current_thread().name))
        started[group].set()
        return (np.array([f"{uri}/{group}"], dtype=object),) * 3

    monkeypatch.setattr(stream, "_unit_rows", fake_rows)
    todo = [("s3://b/a.parquet", g, 0.1 * g) for g in range(3)]
    units = stream._read_ahead(todo, 7, shuffle=False)
    uri, group, (keys, _, _) = next(units)
    assert (uri, group, keys[0]) == ("s3://b/a.parquet", 0, "s3://b/a.parquet/0")
    assert started[1].wait(timeout=10), "unit 1 was not read while unit 0 was being decoded"
    assert [g for _, g, _ in units] == [1, 2]
    assert [(r[1], r[2], r[3]) for r in reads] == [(0, 7, False), (1, 7, False), (2, 7, False)]
    assert all(r[4].startswith("pconv-read") for r in reads)
    assert list(stream._read_ahead([], 0, shuffle=True)) == []


def test_scheduling_settings_exist_in_this_ray_and_stay_on_our_dataset(ray_cluster, prepared_shards):
    """_tune_context sets two DataContext fields by name; a renamed field would be a silent no-op (dataclass
    instances accept any attribute), so check they are real fields and that other datasets keep the defaults."""
    import dataclasses

    from ray.data import DataContext

    fields = {f.name for f in dataclasses.fields(DataContext)}
    assert {"op_resource_reservation_enabled", "downstream_capacity_backpressure_ratio",
            "target_max_block_size"} <= fields
    ds = stream.build_train_dataset(prepared_shards["images"], prepared_shards["masks"], SIZE, num_cpus=0.25)
    assert ds.context.op_resource_reservation_enabled is False
    assert ds.context.downstream_capacity_backpressure_ratio is None
    assert DataContext.get_current().op_resource_reservation_enabled is True  # the process default is untouched
