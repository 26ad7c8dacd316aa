"""pconv.ingest (the thread engine) + pconv.storage.shards: ingestion of real photos / NVIDIA masks (broken files
mixed in) into Parquet shards + manifest, locally and on a real moto S3 server."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pconv import ingest
from pconv.core import images, masks
from pconv.ingest import local
from pconv.storage import shards, uris
BROKEN = {  # file name -> substring expected in its skip reason
    "broken/truncated.jpg": "truncated",
    "broken/notanimage.jpg": "not a readable image",
    "broken/empty.png": "empty",
    "broken/garbage.png": "not a readable image",
    "broken/README.txt": "unsupported file type",
    "broken/tiny.png": "1x1 px, below the minimum of 32 px",  # issue 19.5: too small to train on
    "broken/thin.jpg": "200x31 px, below the minimum of 32 px",
}


def _make_source(photo_dir: Path, dest: Path) -> Path:
    """Real photos + broken files + odd-but-valid images (EXIF-rotated, CMYK, 16-bit grey)."""
    shutil.copytree(photo_dir, dest)
    (dest / "broken").mkdir()
    face = sorted((photo_dir / "faces").glob("*.jpg"))[0].read_bytes()
    (dest / "broken" / "truncated.jpg").write_bytes(face[: len(face) // 2])
    (dest / "broken" / "notanimage.jpg").write_text("this is a text file, not a JPEG\n")
    (dest / "broken" / "empty.png").write_bytes(b"")
    (dest / "broken" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (dest / "broken" / "README.txt").write_text("notes")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(dest / "broken" / "tiny.png")
    Image.new("RGB", (200, 31), (9, 9, 9)).save(dest / "broken" / "thin.jpg")
    odd = dest / "odd"
    odd.mkdir()
    img = Image.new("RGB", (80, 40), (200, 10, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    img.save(odd / "rotated.jpg", exif=exif)
    Image.new("CMYK", (48, 32), (0, 255, 255, 0)).save(odd / "cmyk.jpg")
    Image.fromarray(np.full((32, 36), 40000, dtype=np.uint16)).save(odd / "grey16.png")
    return dest


def _read_rows(root: str, manifest: dict, split: str | None = None) -> list[dict]:
    rows = []
    for s in manifest["shards"]:
        if split is None or s["split"] == split:
            fs, path = uris.get_filesystem(uris.join(root, s["path"]))
            table = pq.read_table(path, filesystem=fs)
            assert table.num_rows == s["rows"]
            rows += table.to_pylist()
    return rows


def test_ingest_images_with_broken_files_local(photo_dir, tmp_path):
    src = _make_source(photo_dir, tmp_path / "src")
    check_ingest_images_with_broken_files(src, str(src), str(tmp_path / "dst"))


def test_ingest_images_with_broken_files_s3(photo_dir, tmp_path, s3_bucket):
    src = _make_source(photo_dir, tmp_path / "src")
    uris.upload_dir(str(src), f"{s3_bucket}/raw/photos")
    check_ingest_images_with_broken_files(src, f"{s3_bucket}/raw/photos", f"{s3_bucket}/shards/images")


def check_ingest_images_with_broken_files(src: Path, src_uri: str, dst: str) -> None:
    """``src``: the local folder whose copy is at ``src_uri``."""
    good = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()
                  and p.relative_to(src).as_posix() not in BROKEN)
    summary = ingest.ingest_images(src_uri, dst, val_fraction=0.3, shard_size_mb=1.0, engine="threads", progress=False)

    manifest = shards.read_manifest(dst)
    assert manifest["schema_version"] == shards.SCHEMA_VERSION and manifest["kind"] == "images"
    assert manifest["source"] == src_uri
    assert {s["key"]: s["reason"] for s in manifest["skipped"]}.keys() == BROKEN.keys()
    for entry in manifest["skipped"]:
        assert BROKEN[entry["key"]] in entry["reason"], entry
    assert manifest["skipped_count"] == len(BROKEN) == len(summary.skipped)
    assert sum(manifest["counts"].values()) == len(good) == summary.ingested
    assert manifest["counts"]["val"] > 0 and manifest["counts"]["train"] > 0
    assert len(manifest["shards"]) == summary.shards > 2  # 1 MB shards: the photos need several
    assert manifest["total_bytes"] == sum(s["bytes"] for s in manifest["shards"]) == summary.bytes

    rows = _read_rows(dst, manifest)
    assert sorted(r["key"] for r in rows) == good
    for row in rows:
        assert row["split"] == shards.split_of(row["key"], 0.3)
        assert any(s["path"].startswith(row["split"] + "/") for s in manifest["shards"])
        if not row["key"].startswith("odd/"):  # stored bytes are the ORIGINAL file
            assert row["image"] == (src / row["key"]).read_bytes()
        img = images.open_image(row["image"])
        assert img.mode == "RGB" and (img.width, img.height) == (row["width"], row["height"])
    by_key = {r["key"]: r for r in rows}
    assert (by_key["odd/rotated.jpg"]["width"], by_key["odd/rotated.jpg"]["height"]) == (40, 80)  # EXIF applied
    assert by_key["faces/" + sorted(os.listdir(src / "faces"))[0]]["format"] == "jpeg"
    assert by_key["odd/grey16.png"]["format"] == "png"
    grey = np.asarray(images.open_image(by_key["odd/grey16.png"]["image"]))
    assert grey.shape == (32, 36, 3) and int(grey[0, 0, 0]) == 40000 >> 8  # scaled, not clipped to 255
    assert {r["width"] for r in rows if r["key"].startswith("scenes/")} <= {481, 321}


def test_max_side_reencodes_only_large_images(photo_dir, tmp_path):
    dst = str(tmp_path / "dst")
    ingest.ingest_images(str(photo_dir), dst, val_fraction=0.0, max_side=300, engine="threads", progress=False)
    manifest = shards.read_manifest(dst)
    assert manifest["counts"] == {"train": 16, "val": 0} and manifest["options"]["max_side"] == 300
    for row in _read_rows(dst, manifest):
        assert max(row["width"], row["height"]) == 300
        img = images.open_image(row["image"])
        assert (img.width, img.height) == (row["width"], row["height"])
        assert row["format"] == ("jpeg" if row["key"].startswith("faces/") else "png")
        assert row["image"] != (photo_dir / row["key"]).read_bytes()


def test_rerun_replaces_shards_and_removes_stale_ones(photo_dir, tmp_path):
    dst = tmp_path / "dst"
    ingest.ingest_images(str(photo_dir), str(dst), val_fraction=0.25, shard_size_mb=1.0, engine="threads",
                         progress=False)
    first = shards.read_manifest(str(dst))
    # An orphan from a run that died before writing its manifest:
    orphan = dst / "train" / shards.shard_name(0, "19990101T000000-dead00")
    orphan.write_bytes(b"partial")
    unrelated = dst / "notes.txt"
    unrelated.write_text("user file")

    summary = ingest.ingest_images(str(photo_dir), str(dst), val_fraction=0.25, shard_size_mb=4.0, engine="threads",
                                   progress=False)
    second = shards.read_manifest(str(dst))
    assert second["run_id"] != first["run_id"]
    assert second["counts"] == first["counts"]
    on_disk = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.parquet"))
    # the replaced manifest's shards stay for its readers (issue 19.2); the orphan of the dead run goes
    assert on_disk == sorted(s["path"] for s in second["shards"] + first["shards"])
    assert orphan.as_posix().split("/dst/")[1] in summary.removed_stale
    assert unrelated.exists()  # only part-*.parquet under train/ and val/ is ours to delete
    assert not [p for p in dst.rglob("*.tmp")]
    keys_first = sorted(r["key"] for r in _read_rows(str(dst), second))
    assert keys_first == sorted(p.relative_to(photo_dir).as_posix() for p in photo_dir.rglob("*.*"))


def _mask_zip_with_broken(mask_zip: Path, dest: Path) -> Path:
    shutil.copy(mask_zip, dest)
    with zipfile.ZipFile(dest, "a") as zf:
        zf.writestr("mask/broken/empty.png", b"")
        zf.writestr("mask/broken/garbage.png", b"\x89PNG\r\n\x1a\n" + b"\x01" * 64)
        zf.writestr("mask/broken/notes.txt", b"hello")
    return dest


def test_ingest_nvidia_masks_bins_border_polarity(mask_zip, tmp_path):
    src = _mask_zip_with_broken(mask_zip, tmp_path / "masks.zip")
    dst = str(tmp_path / "dst")
    summary = ingest.ingest_masks(str(src), dst, hole_color="white", engine="threads", progress=False)
    manifest = shards.read_manifest(dst)
    assert manifest["kind"] == "masks" and manifest["counts"] == {"train": 60, "val": 0} == summary.counts
    reasons = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"mask/broken/empty.png", "mask/broken/garbage.png", "mask/broken/notes.txt"}
    assert "empty" in reasons["mask/broken/empty.png"] and "unsupported" in reasons["mask/broken/notes.txt"]
    assert "garbage.png" in reasons["mask/broken/garbage.png"]

    rows = _read_rows(dst, manifest)
    with zipfile.ZipFile(mask_zip) as zf:
        for row in rows:
            number = int(Path(row["key"]).stem)
            # README facts: block b = files b*1000..; bin k = blocks 2k, 2k+1; odd blocks touch the border band
            assert row["bin"] == number // 2000, row["key"]
            assert row["border"] == bool((number // 1000) % 2), row["key"]
            stored = masks.decode_stored_mask(row["mask"])
            original = np.asarray(Image.open(io.BytesIO(zf.read(row["key"]))).convert("L"))
            np.testing.assert_array_equal(stored, (original < 128).astype(np.uint8))  # white = hole -> 0
            assert stored.shape == (row["height"], row["width"]) == (512, 512)
            assert abs(row["hole_ratio"] - float((original >= 128).mean())) < 1e-6
            assert len(row["mask"]) < len(zf.read(row["key"])) * 2  # compact 1-bit PNG
    assert manifest["bins"] == {str(b): {"border": 5, "no_border": 5} for b in range(6)}


def test_black_hole_color_inverts_polarity(mask_zip, tmp_path):
    white, black = str(tmp_path / "w"), str(tmp_path / "b")
    ingest.ingest_masks(str(mask_zip), white, hole_color="white", engine="threads", progress=False)
    ingest.ingest_masks(str(mask_zip), black, hole_color="black", val_fraction=0.5, engine="threads", progress=False,
                        force=True)  # inverted NVIDIA masks are refused without force (tests/test_bad_input_ingest.py)
    w = {r["key"]: r for r in _read_rows(white, shards.read_manifest(white))}
    b = {r["key"]: r for r in _read_rows(black, shards.read_manifest(black))}
    assert w.keys() == b.keys()
    assert {r["split"] for r in b.values()} == {"train", "val"}
    for key in list(w)[:10]:
        np.testing.assert_array_equal(masks.decode_stored_mask(w[key]["mask"]),
                                      1 - masks.decode_stored_mask(b[key]["mask"]))
        assert abs(w[key]["hole_ratio"] + b[key]["hole_ratio"] - 1.0) < 1e-6


def test_generate_masks_is_balanced_and_reproducible(tmp_path, s3_bucket):
    a, b, c = f"{s3_bucket}/gen-a", str(tmp_path / "gen-b"), str(tmp_path / "gen-c")
    ingest.generate_masks(12, a, size=96, seed=7, engine="threads", progress=False)
    ingest.generate_masks(12, b, size=96, seed=7, engine="threads", progress=False)
    ingest.generate_masks(12, c, size=96, seed=8, engine="threads", progress=False)
    ra = sorted(_read_rows(a, shards.read_manifest(a)), key=lambda r: r["key"])
    rb = sorted(_read_rows(b, shards.read_manifest(b)), key=lambda r: r["key"])
    rc = sorted(_read_rows(c, shards.read_manifest(c)), key=lambda r: r["key"])
    assert len(ra) == 12 and [r["mask"] for r in ra] == [r["mask"] for r in rb]
    assert [r["mask"] for r in ra] != [r["mask"] for r in rc]
    for i, row in enumerate(ra):
        mask = masks.decode_stored_mask(row["mask"])
        assert mask.shape == (96, 96) and set(np.unique(mask)) <= {0, 1}
        assert row["bin"] == i % 6 == masks.ratio_bin(masks.hole_ratio(mask))
        assert row["border"] == bool((i // 6) % 2)


def test_read_manifest_checks_the_kind_and_is_dataset_root_finds_manifests(tmp_path, mask_zip):
    root = str(tmp_path / "gen")
    ingest.generate_masks(3, root, size=64, engine="threads", progress=False)
    assert shards.read_manifest(root, kind=shards.MASKS_KIND)["kind"] == shards.MASKS_KIND
    with pytest.raises(ValueError, match="manifest kind is 'masks', expected 'images'"):
        shards.read_manifest(root, kind=shards.IMAGES_KIND)
    assert shards.is_dataset_root(root)
    assert not shards.is_dataset_root(str(tmp_path)) and not shards.is_dataset_root(str(mask_zip))


def test_split_is_stable_across_processes():
    keys = [f"dir{i % 7}/img_{i:05d}.jpg" for i in range(4000)]
    code = ("import sys, json; from pconv.storage.shards import split_of; "
            "print(json.dumps([split_of(k, 0.1) for k in json.load(sys.stdin)]))")
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run([sys.executable, "-c", code], input=json.dumps(keys), capture_output=True, text=True,
                             env=env, check=True)
        outs.append(json.loads(res.stdout))
    assert outs[0] == outs[1] == [shards.split_of(k, 0.1) for k in keys]
    assert 0.07 < outs[0].count("val") / len(keys) < 0.13


def test_errors_before_any_work(photo_dir, tmp_path, s3_server):
    dst = tmp_path / "dst"
    with pytest.raises(local.IngestError, match="does not exist"):
        ingest.ingest_images(str(tmp_path / "missing"), str(dst), engine="threads", progress=False)
    with pytest.raises(local.IngestError, match="does not exist"):
        ingest.ingest_masks(str(tmp_path / "missing.zip"), str(dst), hole_color="white", engine="threads",
                            progress=False)
    with pytest.raises(local.IngestError, match="does not exist"):
        ingest.ingest_images("s3://no-such-bucket-abc/photos", str(dst), engine="threads", progress=False)
    assert not dst.exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(local.IngestError, match="not writable|not a directory"):
        ingest.ingest_images(str(photo_dir), str(blocker / "sub"), engine="threads", progress=False)
    with pytest.raises(local.IngestError, match="not writable"):
        ingest.ingest_images(str(photo_dir), "s3://no-such-bucket-abc/out", engine="threads", progress=False)
    with pytest.raises(local.IngestError, match="hole-color"):
        ingest.ingest_masks(str(photo_dir), str(dst), hole_color="grey", engine="threads", progress=False)
    with pytest.raises(local.IngestError, match="val-fraction"):
        ingest.ingest_images(str(photo_dir), str(dst), val_fraction=1.5, engine="threads", progress=False)
    not_zip = tmp_path / "fake.zip"
    not_zip.write_text("not a zip")
    with pytest.raises(local.IngestError, match="not a readable zip"):
        ingest.ingest_masks(str(not_zip), str(dst), hole_color="white", engine="threads", progress=False)
    assert not dst.exists()


def test_row_group_reads_fetch_each_footer_once_per_shard_version(photo_dir, tmp_path, monkeypatch):
    """A read unit costs one ranged read of its row group: the footer is read the first time a process meets a
    shard, and again only if the file at that URI changed (re-ingested under the same name: another size)."""
    root = str(tmp_path / "images")
    monkeypatch.setattr(shards, "ROW_GROUP_BYTES", 400_000)  # a few rows per group at this test's sizes
    ingest.ingest_images(str(photo_dir), root, val_fraction=0.0, engine="threads", progress=False)
    manifest = shards.read_manifest(root)
    entry = max(manifest["shards"], key=lambda e: len(e["row_groups"]))
    assert len(entry["row_groups"]) >= 2
    uri = uris.join(root, entry["path"])
    footer_reads = []
    real = pq.read_metadata
    monkeypatch.setattr(pq, "read_metadata", lambda *a, **k: footer_reads.append(a) or real(*a, **k))
    shards.forget_footers()  # as a fresh process
    for group, rows in enumerate(entry["row_groups"]):
        assert shards.read_row_group(uri, group, ["key"]).num_rows == rows
    assert len(footer_reads) == 1
    # The same URI now holds other content (one row group of the first two): its footer is read again.
    table = pq.read_table(uri)
    pq.write_table(table.slice(0, 2), uri, row_group_size=1)
    assert shards.read_row_group(uri, 1, ["key"]).column("key").to_pylist() == table.column("key").to_pylist()[1:2]
    assert len(footer_reads) == 2
