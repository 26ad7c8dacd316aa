"""Issue 17: ingestion as a Ray Data job (``engine="ray"``, :mod:`pconv.ingest.job`) on a local cluster of two nodes.

Real photos (../shared/datasets) plus broken files, to a local folder and to the local S3 server; the NVIDIA test
masks compared with the single-process engine; the CLI killed half-way (SIGKILL) and re-run. Starts Ray: run under
the Ray lock (``flock /tmp/pconv-ray.lock``). The fail-fast tests at the end start no Ray.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pconv import ingest
from pconv.data import stream, transforms
from pconv.ingest import job, local
from pconv.storage import shards, uris
from pconv.storage.shards import key_hash01

SCRIPT = "pipelines/prepare_data.py"


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster(own_ray_cluster, s3_server):
    """Two Ray nodes of 1 CPU each on this machine (ray.cluster_utils.Cluster); this process is its driver."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def add_broken_files(root: Path, photo: Path) -> dict[str, str]:
    """Broken inputs next to the photos; returns key -> a word its skip reason must contain."""
    (root / "broken").mkdir(exist_ok=True)
    (root / "broken" / "cut.jpg").write_bytes(photo.read_bytes()[:5000])
    (root / "broken" / "empty.png").write_bytes(b"")
    (root / "broken" / "fake.jpg").write_bytes(b"this is not an image")
    (root / "broken" / "notes.txt").write_text("not a photo")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    (root / "broken" / "tiny.png").write_bytes(buf.getvalue())
    return {"broken/cut.jpg": "truncated", "broken/empty.png": "empty", "broken/fake.jpg": "not a readable image",
            "broken/notes.txt": "unsupported", "broken/tiny.png": "minimum"}


@pytest.fixture(scope="module")
def photos(photo_dir, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The session's 16 real photos (scenes/ and faces/) plus broken files, in a folder of this module."""
    root = tmp_path_factory.mktemp("ray_photos")
    for p in sorted(photo_dir.rglob("*.*")):
        (root / p.parent.name).mkdir(exist_ok=True)
        (root / p.parent.name / p.name).write_bytes(p.read_bytes())
    return root, add_broken_files(root, next(iter(sorted((photo_dir / "faces").iterdir()))))


@pytest.fixture(scope="module")
def masks300(datasets_dir, tmp_path_factory) -> Path:
    """The first 300 NVIDIA test masks (bin 0 without border constraint: files 0-299), plus a non-mask file."""
    out = tmp_path_factory.mktemp("masks300") / "nvidia_first300.zip"
    with zipfile.ZipFile(datasets_dir / "nvidia_irregular_mask_test.zip") as src, \
            zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        names = sorted(n for n in src.namelist() if n.endswith(".png"))[:300]
        for name in names:
            dst.writestr(name, src.read(name))
        dst.writestr("mask/README.txt", b"not a mask")
    return out


def skipped_keys(manifest: dict) -> dict[str, str]:
    return {s["key"]: s["reason"] for s in manifest["skipped"]}


def rows_by_key(root: str, columns: list[str]) -> dict[str, dict]:
    manifest = shards.read_manifest(root)
    shard_uris = [u for split in shards.SPLITS for u in shards.shard_uris(root, manifest, split)]
    return {r["key"]: r for r in shards.read_table(shard_uris, ["key", *columns]).to_pylist()}


def assert_same_dataset(ray_root: str, threads_root: str, payload: str, columns: list[str]) -> None:
    """Same manifest (but the shard layout) and the same rows as the single-process engine's."""
    a, b = shards.read_manifest(ray_root), shards.read_manifest(threads_root)
    for field in ("schema_version", "kind", "counts", "columns", "skipped_count", "skipped", "options"):
        assert a[field] == b[field], field
    assert a.get("bins") == b.get("bins") and a.get("out_of_bins") == b.get("out_of_bins")
    assert rows_by_key(ray_root, [payload, *columns]) == rows_by_key(threads_root, [payload, *columns])


def assert_shards_consistent(root: str) -> None:
    """Every listed shard exists, its rows and row groups match the manifest, and rows are in key-hash order."""
    manifest = shards.read_manifest(root)
    for split in shards.SPLITS:
        previous_max = -1.0
        for entry in (s for s in manifest["shards"] if s["split"] == split):
            uri = uris.join(root, entry["path"])
            assert entry["row_groups"] == shards.row_groups(uri) and sum(entry["row_groups"]) == entry["rows"]
            keys = shards.read_table([uri], ["key", "split"]).to_pydict()
            assert set(keys["split"]) == {split}
            hashes = [key_hash01(k) for k in keys["key"]]
            assert hashes == sorted(hashes) and hashes[0] > previous_max  # the chunks cut the hash order
            previous_max = hashes[-1]
        assert sum(s["rows"] for s in manifest["shards"] if s["split"] == split) == manifest["counts"][split]


# ---------------------------------------------------------------------------------------------- local
@pytest.mark.integration
def test_images_and_masks_to_a_local_folder_on_two_nodes_and_training_reads_them(cluster, photos, masks300,
                                                                                     tmp_path):
    src, expected = photos
    out = tmp_path / "ray"
    summary = ingest.ingest_images(str(src), str(out / "images"), val_fraction=0.25, shard_size_mb=0.5,
                                   engine="ray", progress=False)
    assert summary.nodes == 2, "both nodes' CPUs decoded and wrote shards"
    assert summary.ingested == 16 and len(summary.skipped) == len(expected)
    assert summary.shards >= 4 and "files/s on 2 node(s)" in summary.line()
    manifest = shards.read_manifest(str(out / "images"))
    for key, word in expected.items():
        assert word in skipped_keys(manifest)[key].lower(), (key, skipped_keys(manifest)[key])
    assert_shards_consistent(str(out / "images"))
    folders = {k.split("/")[0] for s in manifest["shards"] if s["split"] == "train"
               for k in shards.read_table([uris.join(str(out / "images"), s["path"])], ["key"])["key"].to_pylist()}
    assert folders == {"scenes", "faces"}

    ingest.ingest_images(str(src), str(tmp_path / "threads"), val_fraction=0.25, shard_size_mb=0.5, engine="threads",
                         progress=False)
    assert_same_dataset(str(out / "images"), str(tmp_path / "threads"), "image", ["height", "width", "format"])

    ingest.ingest_masks(str(masks300), str(out / "masks"), hole_color="white", engine="ray", progress=False)
    # what training reads: the train split's read units (one per row group) and the mask bank
    units = stream.read_units(str(out / "images"), "train")
    ids = [shards.key_id(k) for u in units
           for k in shards.read_row_group(u["uri"], u["row_group"], ["key"]).column("key").to_pylist()]
    assert len(ids) == sum(u["rows"] for u in units)
    train_keys = rows_by_key(str(out / "images"), [])
    assert sorted(ids) == sorted(shards.key_id(k) for k in train_keys if shards.split_of(k, 0.25) == "train")
    bank = transforms.load_mask_bank(str(out / "masks"), "train")
    assert len(bank) == 300 and bank.mask(0).shape == (512, 512)


@pytest.mark.integration
def test_nvidia_masks_and_generated_masks_match_the_single_process_engine(cluster, masks300, tmp_path):
    summary = ingest.ingest_masks(str(masks300), str(tmp_path / "ray"), hole_color="white", engine="ray",
                                  progress=False)
    ingest.ingest_masks(str(masks300), str(tmp_path / "threads"), hole_color="white", engine="threads", progress=False)
    assert summary.ingested == 300 and [s["key"] for s in summary.skipped] == ["mask/README.txt"]
    assert_same_dataset(str(tmp_path / "ray"), str(tmp_path / "threads"), "mask",
                        ["hole_ratio", "bin", "border", "height", "width", "source", "split"])
    manifest = shards.read_manifest(str(tmp_path / "ray"))
    assert manifest["bins"] == {"0": {"border": 0, "no_border": 300}}, "files 0-299: bin 0, no border (README)"
    assert_shards_consistent(str(tmp_path / "ray"))

    ingest.generate_masks(24, str(tmp_path / "gen-ray"), size=64, seed=3, engine="ray", progress=False)
    ingest.generate_masks(24, str(tmp_path / "gen-threads"), size=64, seed=3, engine="threads", progress=False)
    assert_same_dataset(str(tmp_path / "gen-ray"), str(tmp_path / "gen-threads"), "mask",
                        ["hole_ratio", "bin", "border"])


@pytest.mark.integration
def test_inverted_polarity_and_nothing_usable_are_refused_and_keep_the_dataset(cluster, masks300, tmp_path):
    dst = tmp_path / "masks"
    ingest.ingest_masks(str(masks300), str(dst), hole_color="white", engine="ray", progress=False)
    before = {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    with pytest.raises(local.IngestError, match="--force"):
        ingest.ingest_masks(str(masks300), str(dst), hole_color="black", engine="ray", progress=False)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"broken")
    with pytest.raises(local.IngestError, match="nothing usable"):
        ingest.ingest_masks(str(junk), str(dst), hole_color="white", engine="ray", progress=False)
    assert {p: p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------------------------------------- S3
def _requests_since(log_path: Path, mark: int) -> list[str]:
    time.sleep(0.3)  # the server's log lines are flushed as they are written; let the last ones land
    with open(log_path, "rb") as fh:
        fh.seek(mark)
        return [line for line in fh.read().decode(errors="replace").splitlines() if "HTTP/1.1" in line]


@pytest.mark.integration
def test_s3_prefix_and_s3_zip_to_s3_one_get_per_object(cluster, photos, masks300, s3_server, s3_bucket, tmp_path):
    src, expected = photos
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for p in files:
        uris.write_bytes_atomic(f"{s3_bucket}/raw/{p.relative_to(src).as_posix()}", p.read_bytes())
    uris.write_bytes_atomic(f"{s3_bucket}/zips/masks.zip", masks300.read_bytes())
    bucket = s3_bucket.split("://", 1)[1]
    mark = s3_server.log_path.stat().st_size

    summary = ingest.ingest_images(f"{s3_bucket}/raw", f"{s3_bucket}/images", val_fraction=0.25,
                                   shard_size_mb=0.5, engine="ray", progress=False)
    assert summary.ingested == 16 and sorted(s["key"] for s in summary.skipped) == sorted(expected)
    assert_shards_consistent(f"{s3_bucket}/images")
    ingest.ingest_images(str(src), str(tmp_path / "threads"), val_fraction=0.25, shard_size_mb=0.5, engine="threads",
                         progress=False)
    a, b = shards.read_manifest(f"{s3_bucket}/images"), shards.read_manifest(str(tmp_path / "threads"))
    assert a["counts"] == b["counts"] and a["skipped"] == b["skipped"]
    # the listing streams LIST pages; every object is read by exactly one GET, and no object gets a HEAD
    lines = [ln for ln in _requests_since(s3_server.log_path, mark) if f"/{bucket}/raw/" in ln]
    assert not [ln for ln in lines if "HEAD /" in ln], lines[:5]
    gets = sorted(ln.split("GET /", 1)[1].split(" ")[0] for ln in lines if "GET /" in ln)
    assert gets == sorted(f"{bucket}/raw/{p.relative_to(src).as_posix()}" for p in files if p.suffix != ".txt")

    summary = ingest.ingest_masks(f"{s3_bucket}/zips/masks.zip", f"{s3_bucket}/masks", hole_color="white",
                                  engine="ray", progress=False)
    ingest.ingest_masks(str(masks300), str(tmp_path / "masks-threads"), hole_color="white", engine="threads",
                        progress=False)
    assert_same_dataset(f"{s3_bucket}/masks", str(tmp_path / "masks-threads"), "mask", ["hole_ratio", "bin", "border"])


# ---------------------------------------------------------------------------------------------- CLI, killed
def run_cli(repo_root, *args, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, SCRIPT, "-q", *map(str, args)], cwd=repo_root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kw)


def parquet_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.parquet")}


@pytest.mark.slow
@pytest.mark.integration
def test_cli_killed_half_way_keeps_the_previous_dataset_and_the_rerun_cleans_up(cluster, photos, datasets_dir,
                                                                               repo_root, tmp_path):
    dst = tmp_path / "images"
    ingest.ingest_images(str(photos[0]), str(dst), val_fraction=0.25, shard_size_mb=0.5, engine="ray", progress=False)
    manifest_bytes = (dst / shards.MANIFEST).read_bytes()
    previous = shards.read_manifest(str(dst))
    src = tmp_path / "all"  # every shared photo: one file per task below, so the run lasts a while
    for folder in ("cbsd68", "celeba_hq_sample"):
        (src / folder).mkdir(parents=True)
        for p in sorted((datasets_dir / folder).iterdir()):
            (src / folder / p.name).write_bytes(p.read_bytes())
    n_photos = sum(1 for p in src.rglob("*.*") if p.suffix in (".png", ".jpg"))  # and a LICENSE.txt
    env = {"RAY_ADDRESS": cluster.address}
    args = ("images", src, dst, "--val-fraction", "0.1", "--shard-size-mb", "0.01", "--max-side", "256")

    proc = run_cli(repo_root, *args, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while not parquet_files(dst) - {s["path"] for s in previous["shards"]}:  # the first shard of this run
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no shard written in 120 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    stable, last = time.monotonic(), parquet_files(dst)
    while time.monotonic() - stable < 1.5 and time.monotonic() < deadline:  # the dead job's tasks are gone
        time.sleep(0.2)
        if (now := parquet_files(dst)) != last:
            stable, last = time.monotonic(), now

    assert (dst / shards.MANIFEST).read_bytes() == manifest_bytes, "the previous dataset is intact"
    orphans = last - {s["path"] for s in previous["shards"]}
    assert 0 < len(orphans) < n_photos, "killed half-way"
    table = shards.read_table(shards.shard_uris(str(dst), previous, "train"), ["key", "image"])
    assert table.num_rows == previous["counts"]["train"]
    assert len(stream.read_units(str(dst), "train")) == sum(len(s["row_groups"]) for s in previous["shards"]
                                                          if s["split"] == "train")

    proc = run_cli(repo_root, *args, env=env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"ingested {n_photos}" in out and "on 2 node(s)" in out, out
    manifest = shards.read_manifest(str(dst))
    assert manifest["run_id"] != previous["run_id"]
    assert [s["key"].rsplit("/", 1)[1] for s in manifest["skipped"]] == ["LICENSE.txt"]
    assert_shards_consistent(str(dst))
    # the dead run's orphans are gone; the replaced manifest's shards stay for its readers until the next run
    assert parquet_files(dst) == {s["path"] for m in (manifest, previous) for s in m["shards"]}
    assert not list(dst.rglob(".part-*.tmp"))
    sizes = shards.read_table(shards.shard_uris(str(dst), manifest, "train"), ["height", "width"]).to_pydict()
    assert max(max(h, w) for h, w in zip(sizes["height"], sizes["width"])) == 256  # --max-side, in the tasks


@pytest.mark.integration
def test_a_source_that_a_node_does_not_see_fails_the_run_with_a_clear_error(cluster, tmp_path):
    import pyarrow as pa

    from pconv.ingest.rows import RowRecipe
    from pconv.storage.sources import EntryReader

    # what a task on a machine without this folder meets: the listing was made elsewhere, the folder is not here
    recipe = RowRecipe(shards.IMAGES_KIND, 0.0, EntryReader(str(tmp_path / "only-on-the-driver"), "dir"))
    listing = pa.table({"key": ["a.jpg", "b.jpg"], "size": [10, 10], "h": [0.1, 0.2], "split": ["train"] * 2})
    with pytest.raises(local.IngestError, match="not visible on node .*s3://"):
        job.write_shards(recipe, listing, str(tmp_path / "out"), local.new_run_id(), shard_size_mb=1.0, max_files=10,
                         progress=False, forward_s3_env=False)
    assert not (tmp_path / "out" / shards.MANIFEST).exists()


# ---------------------------------------------------------------------------------------------- fail fast
@pytest.mark.parametrize("case", ["missing source", "unwritable destination", "bad option", "bad threshold"])
def test_ray_engine_fails_fast_without_starting_ray(case, repo_root, photo_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = {"missing source": ("images", tmp_path / "nope", tmp_path / "out"),
            "unwritable destination": ("images", photo_dir, blocker / "shards"),
            "bad option": ("images", photo_dir, tmp_path / "out", "--val-fraction", "1.5"),
            "bad threshold": ("masks", photo_dir, tmp_path / "out", "--hole-color", "white", "--threshold", "0")}[case]
    word = {"missing source": "does not exist", "unwritable destination": "not writable",
            "bad option": "--val-fraction", "bad threshold": "--threshold"}[case]
    t0 = time.monotonic()
    proc = run_cli(repo_root, "--engine", "ray", *args, env={"RAY_ADDRESS": "127.0.0.1:1"})  # no cluster there
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and word in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("prepare_data: error: "), err  # no Ray output
    assert time.monotonic() - t0 < 60 and not (tmp_path / "out").exists()


def test_entry_reader_says_when_a_local_source_is_not_visible(tmp_path):
    from pconv.storage.sources import EntryReader, SourceError

    with pytest.raises(SourceError, match="not visible on node"):
        EntryReader(str(tmp_path / "elsewhere"), "dir").read("a.jpg")
    (tmp_path / "here").mkdir()
    with pytest.raises(FileNotFoundError):  # the source is there, the file is not: one file's problem
        EntryReader(str(tmp_path / "here"), "dir").read("a.jpg")


def test_chunks_follow_the_byte_target_and_the_file_cap():
    assert job.chunk_bounds(np.array([3, 3, 3, 3, 3]), 6, 100) == [(0, 2), (2, 4), (4, 5)]
    assert job.chunk_bounds(np.array([1] * 5), 100, 2) == [(0, 2), (2, 4), (4, 5)]
    assert job.chunk_bounds(np.array([10, 1]), 5, 100) == [(0, 1), (1, 2)]
    assert job.chunk_bounds(np.array([], dtype=np.int64), 5, 100) == []
