"""The demo's inputs: the shared datasets it needs, staged as ingestion sources, and shards reused when their
inputs did not change (a small ``<out>/state/<name>.json`` fingerprint next to the shards' manifest run id)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable

from pconv.storage import shards
from pconv.core.images import IMAGE_SUFFIXES
from pconv.core.masks import MASK_SUFFIXES

log = logging.getLogger(__name__)

DEFAULT_DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
IMAGE_FOLDERS = ("celeba_hq_sample", "cbsd68")
MASK_ZIP = "nvidia_irregular_mask_test.zip"


class DemoError(RuntimeError):
    """A demo prerequisite is missing (datasets, config) or a stage failed; the message says which."""


def check_datasets(datasets: str) -> Path:
    """The shared datasets folder, or DemoError saying what is missing and where it was looked for."""
    root = Path(datasets).expanduser().resolve()
    missing = [name for name in (*IMAGE_FOLDERS, MASK_ZIP) if not (root / name).exists()]
    if missing:
        raise DemoError(f"the demo needs {', '.join(missing)} under {root} (the shared datasets, expected beside "
                        "the repository as ../shared/datasets); pass --datasets DIR to point elsewhere")
    return root


def stage_images(datasets: Path, dst: Path, per_folder: int | None) -> list[str]:
    """Symlink the demo photos into ``dst/<folder>/`` (one ingestion source); returns the staged keys."""
    if dst.exists():
        shutil.rmtree(dst)
    keys = []
    for folder in IMAGE_FOLDERS:
        files = sorted(p for p in (datasets / folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DemoError(f"no photos ({', '.join(IMAGE_SUFFIXES)}) in {datasets / folder}")
        (dst / folder).mkdir(parents=True)
        for p in files[:per_folder]:
            (dst / folder / p.name).symlink_to(p.resolve())
            keys.append(f"{folder}/{p.name}")
    return keys


def stage_test_masks(zip_path: Path, dst: Path, stride: int) -> list[str]:
    """Extract every ``stride``-th NVIDIA test mask (sorted names) into ``dst``; returns the member names.

    The archive is ordered by (bin, border) block of 1,000 files, so a stride that divides 1,000 samples every
    block evenly: all six hole-ratio bins with and without border holes.
    """
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(MASK_SUFFIXES))[::stride]
        for name in names:
            (dst / Path(name).name).write_bytes(zf.read(name))
    if not names:
        raise DemoError(f"{zip_path} holds no mask images ({', '.join(MASK_SUFFIXES)})")
    return names


def fingerprint(data: Any) -> str:
    """A short, stable hash of the inputs of one ingestion."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reusable(state_file: Path, dst: str, fp: str) -> bool:
    """True when ``dst`` holds the manifest that an earlier run with the same inputs (fingerprint ``fp``) wrote."""
    if not state_file.is_file():
        return False
    try:
        state = json.loads(state_file.read_text())
        manifest = shards.read_manifest(dst)
    except (FileNotFoundError, ValueError, OSError):
        return False
    except Exception as exc:  # noqa: BLE001 - e.g. a bucket that is gone: ingest again
        log.info("shards at %s not reusable: %s", dst, exc)
        return False
    return state.get("fingerprint") == fp and state.get("run_id") == manifest.get("run_id") \
        and sum(manifest.get("counts", {}).values()) > 0


def ingest_once(name: str, dst: str, state_dir: Path, fingerprint_data: Any, ingest: Callable[[], Any]) -> bool:
    """Run ``ingest`` unless ``dst`` already holds the shards of the same inputs; returns True if reused."""
    state_file = state_dir / f"{name}.json"
    fp = fingerprint(fingerprint_data)
    if reusable(state_file, dst, fp):
        log.info("%s: reusing shards at %s (same inputs as the last run)", name, dst)
        return True
    summary = ingest()
    log.info("%s", summary.line())
    if summary.skipped:
        log.warning("%s: %d file(s) skipped: %s", name, len(summary.skipped), summary.skipped[:3])
    manifest = shards.read_manifest(dst)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"fingerprint": fp, "run_id": manifest.get("run_id"), "dst": dst}))
    return False
