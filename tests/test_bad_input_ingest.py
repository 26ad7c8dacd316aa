"""Issue 19, ingest side: bad input never loses a dataset and never gives a silently wrong one.

Each test names the issue item it covers; each fails on the code before the fix. The CLI cases run
``pipelines/prepare_data.py`` as a user does (a subprocess), the rest call :mod:`pconv.ingest` directly (the thread
engine: these are about what any run guarantees, Ray-free; tests/test_ingest_ray.py runs the Ray engine).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pconv import ingest
from pconv.core import masks
from pconv.ingest import local, rows
from pconv.storage import shards, sources, uris

SCRIPT = "pipelines/prepare_data.py"


def run_cli(repo_root, *args) -> subprocess.CompletedProcess:
    # the single-process engine: these tests are about the CLI's contract, Ray-free (tests/test_ingest_ray.py: Ray)
    return subprocess.run([sys.executable, SCRIPT, "-q", "--engine", "threads", *map(str, args)], cwd=repo_root,
                          capture_output=True, text=True, timeout=300)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under a dataset root with its bytes: 'left as it was' means this is unchanged."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def png(arr: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr) if mode is None else Image.fromarray(arr, mode)).save(buf, format="PNG", **save)
    return buf.getvalue()


def mask_png(hole_ratio: float, size: int = 64) -> bytes:
    """A WHITE = hole mask file whose first ``hole_ratio`` of rows are holes."""
    grey = np.zeros((size, size), np.uint8)
    grey[: round(hole_ratio * size)] = 255
    return png(grey)


@pytest.fixture
def image_dataset(photo_dir, tmp_path) -> Path:
    dst = tmp_path / "images"
    ingest.ingest_images(str(photo_dir), str(dst), val_fraction=0.25, shard_size_mb=1.0, engine="threads",
                         progress=False)
    return dst


# ------------------------------------------------------------------------------ 1. no data loss on re-ingest


def test_reingest_with_nothing_usable_is_refused_and_keeps_the_dataset(repo_root, image_dataset, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    (junk / "broken.jpg").write_text("not a JPEG either")
    before = snapshot(image_dataset)
    res = run_cli(repo_root, "images", junk, image_dataset)
    assert res.returncode == 2, res.stderr
    assert "nothing usable" in res.stderr and "2 file(s) skipped" in res.stderr and "--allow-empty" in res.stderr
    assert snapshot(image_dataset) == before  # manifest and every shard as they were

    res = run_cli(repo_root, "images", junk, image_dataset, "--allow-empty")
    assert res.returncode == 0, res.stderr
    manifest = shards.read_manifest(str(image_dataset))
    assert manifest["counts"] == {"train": 0, "val": 0} and manifest["skipped_count"] == 2


def test_ingest_over_a_dataset_of_the_other_kind_is_refused(repo_root, image_dataset, mask_zip, tmp_path):
    before = snapshot(image_dataset)
    res = run_cli(repo_root, "masks", mask_zip, image_dataset, "--hole-color", "white")
    assert res.returncode == 2 and "kind 'images'" in res.stderr and "--replace-kind" in res.stderr, res.stderr
    res = run_cli(repo_root, "masks", "--generate", "6", image_dataset, "--size", "32")
    assert res.returncode == 2 and "--replace-kind" in res.stderr, res.stderr
    assert snapshot(image_dataset) == before

    res = run_cli(repo_root, "masks", mask_zip, image_dataset, "--hole-color", "white", "--replace-kind")
    assert res.returncode == 0, res.stderr
    assert shards.read_manifest(str(image_dataset))["kind"] == "masks"
    with pytest.raises(local.IngestError, match="kind 'masks'"):
        ingest.ingest_images(str(tmp_path), str(image_dataset), engine="threads", progress=False)


# ------------------------------------------------------------------ 2. readers keep their shards one re-ingest


def test_a_reader_of_the_replaced_manifest_can_still_read_all_its_shards(photo_dir, image_dataset):
    manifest_a = shards.read_manifest(str(image_dataset))  # a training run read manifest A ...
    uris_a = [uris.join(str(image_dataset), s["path"]) for s in manifest_a["shards"]]
    summary = ingest.ingest_images(str(photo_dir), str(image_dataset), val_fraction=0.25, shard_size_mb=2.0,
                                   engine="threads", progress=False)  # ... and a re-ingest finishes meanwhile
    for uri, entry in zip(uris_a, manifest_a["shards"]):
        for group in range(len(entry["row_groups"])):
            assert shards.read_row_group(uri, group, ["key"]).num_rows == entry["row_groups"][group]
    assert summary.kept_previous == len(uris_a) and not summary.removed_stale
    # the run after that removes A's shards (they belong to neither of the last two manifests)
    ingest.ingest_images(str(photo_dir), str(image_dataset), val_fraction=0.25, shard_size_mb=2.0, engine="threads",
                         progress=False)
    assert not any(uris.exists(u) for u in uris_a)


# -------------------------------------------------------------------------------- 3. polarity and alpha masks


def test_inverted_mask_polarity_is_refused_unless_forced(repo_root, mask_zip, tmp_path):
    dst = tmp_path / "masks"
    res = run_cli(repo_root, "masks", mask_zip, dst, "--hole-color", "black")  # NVIDIA's masks: white = hole
    assert res.returncode == 2
    assert "40 of 60 masks" in res.stderr and "inverted" in res.stderr and "--force" in res.stderr, res.stderr
    assert not list(dst.rglob("*.parquet")) and not (dst / shards.MANIFEST).exists()  # nothing left behind

    res = run_cli(repo_root, "masks", mask_zip, dst, "--hole-color", "black", "--force")
    assert res.returncode == 0, res.stderr
    manifest = shards.read_manifest(str(dst))
    assert manifest["counts"]["train"] == 60 and manifest["out_of_bins"] == 40
    assert "40 mask(s) in no paper bin" in res.stdout


def test_masks_marked_only_by_transparency_are_read_from_alpha(tmp_path):
    src = tmp_path / "alpha"
    src.mkdir()
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:16] = 0  # a quarter transparent = holes
    for colour in (0, 255):  # the colour is constant: alpha is the only signal
        rgba = np.dstack([np.full((64, 64), colour, np.uint8)] * 3 + [alpha])
        (src / f"c{colour}.png").write_bytes(png(rgba, "RGBA"))
    dst = tmp_path / "dst"
    ingest.ingest_masks(str(src), str(dst), hole_color="white", engine="threads", progress=False)
    table = shards.read_table(shards.shard_uris(str(dst)), ["key", "hole_ratio", "bin"])
    assert table.column("hole_ratio").to_pylist() == [0.25, 0.25]  # was 0 (alpha ignored): no holes at all
    assert table.column("bin").to_pylist() == [2, 2]


# ------------------------------------------------------------------------------------ 4. EXIF orientation


def test_mask_exif_orientation_is_applied_at_ingest(tmp_path):
    grey = np.zeros((40, 80), np.uint8)  # stored 80 wide x 40 high; holes in the left 8 columns
    grey[:, :8] = 255
    img = Image.fromarray(grey)
    exif = img.getexif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: 40 wide x 80 high, holes in the top 8 rows
    src = tmp_path / "src"
    src.mkdir()
    img.save(src / "rotated.png", exif=exif)
    dst = tmp_path / "dst"
    ingest.ingest_masks(str(src), str(dst), hole_color="white", engine="threads", progress=False)
    row = shards.read_table(shards.shard_uris(str(dst)), ["mask", "height", "width"]).to_pylist()[0]
    mask = masks.decode_stored_mask(row["mask"])
    assert (row["width"], row["height"]) == (40, 80) and mask.shape == (80, 40)
    assert (mask[:8] == 0).all() and (mask[8:] == 1).all()


# ------------------------------------------------------------------ 5. tiny files, masks outside every bin


def test_tiny_masks_are_skipped_and_masks_in_no_bin_are_counted(repo_root, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, ratio in enumerate((0.05, 0.15, 0.25, 0.35, 0.45, 0.55)):
        (src / f"ok{i}.png").write_bytes(mask_png(ratio))
    (src / "all_valid.png").write_bytes(mask_png(0.0))
    (src / "all_hole.png").write_bytes(mask_png(1.0))
    (src / "tiny.png").write_bytes(png(np.zeros((1, 1), np.uint8)))
    (src / "thin.png").write_bytes(png(np.zeros((31, 500), np.uint8)))
    dst = tmp_path / "dst"
    res = run_cli(repo_root, "masks", src, dst, "--hole-color", "white")
    assert res.returncode == 0, res.stderr
    manifest = shards.read_manifest(str(dst))
    assert manifest["counts"]["train"] == 8 and manifest["out_of_bins"] == 2
    assert manifest["bins"]["-1"] == {"border": 1, "no_border": 1}
    reasons = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert reasons == {"tiny.png": f"mask is 1x1 px, below the minimum of {rows.MIN_SIDE} px on the short side",
                       "thin.png": f"mask is 500x31 px, below the minimum of {rows.MIN_SIDE} px on the short side"}
    assert "2 mask(s) in no paper bin" in res.stdout and "skipped 2" in res.stdout


# --------------------------------------------------------------------------- 9. file modes of a shared dataset


def test_shards_and_manifest_follow_the_umask(photo_dir, tmp_path):
    old = os.umask(0o022)
    try:
        ingest.ingest_images(str(photo_dir), str(tmp_path / "dst"), shard_size_mb=1.0, engine="threads", progress=False)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "dst").rglob("*") if p.is_file()]
    assert len(files) > 3 and {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}


# ------------------------------------------------------------------------------------ 10. huge zip members


def test_oversized_zip_member_is_refused_before_it_is_read(photo_dir, tmp_path, monkeypatch):
    """A member above the limit is skipped with a reason and never read (fast: the limit is lowered)."""
    src = tmp_path / "photos.zip"
    photos = sorted(photo_dir.rglob("*.png"))[:2]
    with zipfile.ZipFile(src, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in photos:
            zf.write(p, p.name)
        zf.writestr("zeros.png", bytes(4 * 2**20))  # 4 MiB of zeros: ~4 KB compressed
    limit = max(p.stat().st_size for p in photos) + 1
    monkeypatch.setattr(sources, "MAX_FILE_BYTES", limit)
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open",
                        lambda self, name, *a, **k: opened.append(getattr(name, "filename", name))
                        or real_open(self, name, *a, **k))
    summary = ingest.ingest_images(str(src), str(tmp_path / "dst"), engine="threads", progress=False)
    assert summary.ingested == 2
    assert summary.skipped == [{"key": "zeros.png", "reason": f"file too large: {4 * 2**20:,} bytes uncompressed, "
                                f"above the limit of {limit:,} bytes (refused unread)"}]
    assert "zeros.png" not in opened


def test_oversized_local_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "big.png").write_bytes(bytes(5000))
    monkeypatch.setattr(sources, "MAX_FILE_BYTES", 4096)
    with sources.Source(str(tmp_path / "src")) as source:
        (item,) = source.items()
        with pytest.raises(ValueError, match="file too large: 5,000 bytes"):
            item.read()


BOMB_CHILD = """
import resource, sys, zipfile
from pconv import ingest
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    print(ingest.ingest_masks(sys.argv[1], sys.argv[2], hole_color="white", engine="threads", progress=False).skipped)
except Exception as exc:  # the only member is skipped: nothing usable
    print(type(exc).__name__, exc)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.slow
def test_a_2_gib_zip_member_is_skipped_without_reading_it(repo_root, tmp_path):
    """The issue's case: a few-MB zip with one 2 GiB member of zeros peaked at 4.3 GB; now it is skipped unread."""
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("bomb.png", "w", force_zip64=True) as fh:
            chunk = bytes(64 * 2**20)
            for _ in range(32):
                fh.write(chunk)
    assert bomb.stat().st_size < 16 * 2**20
    res = subprocess.run([sys.executable, "-c", BOMB_CHILD, str(bomb), str(tmp_path / "dst")], cwd=repo_root,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    message, grew_mb = res.stdout.strip().splitlines()
    assert message.startswith("IngestError nothing usable") and f"file too large: {2 * 2**30:,} bytes" in message
    assert int(grew_mb) < 200, f"peak memory grew by {grew_mb} MB while skipping the member"
