"""pipelines/prepare_data.py as a user runs it: a subprocess, real files, a real moto S3 server."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from pconv.storage import shards

from pconv.storage import uris
SCRIPT = "pipelines/prepare_data.py"


def run_cli(repo_root, *args, env=None) -> subprocess.CompletedProcess:
    # the single-process engine: these tests are about the CLI's contract, Ray-free (tests/test_ingest_ray.py: Ray)
    return subprocess.run([sys.executable, SCRIPT, "-q", "--engine", "threads", *map(str, args)], cwd=repo_root,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def test_help_explains_subcommands(repo_root):
    res = subprocess.run([sys.executable, SCRIPT, "--help"], cwd=repo_root, capture_output=True, text=True)
    assert res.returncode == 0 and "images" in res.stdout and "masks" in res.stdout
    res = subprocess.run([sys.executable, SCRIPT, "masks", "--help"], cwd=repo_root, capture_output=True, text=True)
    assert res.returncode == 0 and "--hole-color" in res.stdout and "--generate" in res.stdout


@pytest.mark.integration
def test_images_and_masks_to_s3(repo_root, photo_dir, mask_zip, tmp_path, s3_bucket):
    src = tmp_path / "photos"
    src.mkdir()
    for p in sorted(photo_dir.rglob("*.*"))[:6]:
        (src / p.name).write_bytes(p.read_bytes())
    (src / "cut.jpg").write_bytes((photo_dir / "faces" / sorted(os.listdir(photo_dir / "faces"))[0])
                                  .read_bytes()[:5000])
    (src / "empty.jpg").write_bytes(b"")
    dst = f"{s3_bucket}/images"
    res = run_cli(repo_root, "images", src, dst, "--val-fraction", "0.2", "--shard-size-mb", "2")
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    assert "ingested 6" in line and "skipped 2" in line and "shards" in line and "seconds" in line
    manifest = shards.read_manifest(dst)
    assert sum(manifest["counts"].values()) == 6
    assert sorted(s["key"] for s in manifest["skipped"]) == ["cut.jpg", "empty.jpg"]
    assert all(uris.exists(uris.join(dst, s["path"])) for s in manifest["shards"])

    res = run_cli(repo_root, "masks", mask_zip, f"{s3_bucket}/masks", "--hole-color", "white", "--threshold", "0.6")
    assert res.returncode == 0, res.stderr
    manifest = shards.read_manifest(f"{s3_bucket}/masks")
    assert manifest["counts"]["train"] == 60 and manifest["options"]["threshold"] == 0.6

    res = run_cli(repo_root, "masks", "--generate", "6", tmp_path / "gen", "--size", "64", "--seed", "3")
    assert res.returncode == 0, res.stderr
    assert shards.read_manifest(str(tmp_path / "gen"))["counts"]["train"] == 6


def test_missing_source_is_an_error_before_work(repo_root, tmp_path):
    dst = tmp_path / "out"
    res = run_cli(repo_root, "images", tmp_path / "nope", dst)
    assert res.returncode == 2
    assert "nope" in res.stderr and "does not exist" in res.stderr
    assert not dst.exists()


def test_bad_hole_color_and_the_white_default(repo_root, mask_zip, tmp_path):
    dst = tmp_path / "out"
    res = run_cli(repo_root, "masks", mask_zip, dst, "--hole-color", "grey")
    assert res.returncode == 2 and "hole-color" in res.stderr and "white" in res.stderr
    default, white = tmp_path / "default", tmp_path / "white"  # no --hole-color: white = hole, as at every edge
    assert run_cli(repo_root, "masks", mask_zip, default).returncode == 0
    assert run_cli(repo_root, "masks", mask_zip, white, "--hole-color", "white").returncode == 0
    by_default, explicit = shards.read_manifest(str(default)), shards.read_manifest(str(white))
    assert by_default["counts"] == explicit["counts"] and by_default["out_of_bins"] == explicit["out_of_bins"] == 0
    res = run_cli(repo_root, "masks", "--generate", "3", dst, "extra")
    assert res.returncode == 2
    assert not dst.exists()


def test_unwritable_destination(repo_root, photo_dir, tmp_path, s3_server):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run_cli(repo_root, "images", photo_dir, blocker / "shards")
    assert res.returncode == 2 and "not writable" in res.stderr
    res = run_cli(repo_root, "images", photo_dir, "s3://bucket-that-does-not-exist-42/x")
    assert res.returncode == 2 and "bucket-that-does-not-exist-42" in res.stderr


def test_rerun_is_consistent(repo_root, mask_zip, tmp_path):
    small = tmp_path / "small.zip"
    with zipfile.ZipFile(mask_zip) as src, zipfile.ZipFile(small, "w") as out:
        for name in sorted(src.namelist())[:8]:
            out.writestr(name, src.read(name))
    dst = tmp_path / "masks"
    manifests = []
    for _ in range(3):
        res = run_cli(repo_root, "masks", small, dst, "--hole-color", "white")
        assert res.returncode == 0, res.stderr
        manifests.append(shards.read_manifest(str(dst)))
    manifest = manifests[-1]
    assert manifest["counts"]["train"] == 8

    def on_disk():
        return sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.parquet"))

    # the last two manifests' shards are on disk (readers of the replaced one keep theirs), the first run's are gone
    assert on_disk() == sorted(s["path"] for m in manifests[-2:] for s in m["shards"])
    res = run_cli(repo_root, "cleanup", dst)
    assert res.returncode == 0 and "removed 1 shard(s)" in res.stdout, (res.stdout, res.stderr)
    assert on_disk() == sorted(s["path"] for s in manifest["shards"])
    res = run_cli(repo_root, "cleanup", tmp_path / "no-dataset")
    assert res.returncode == 2 and "no manifest" in res.stderr and "nothing is deleted" in res.stderr
