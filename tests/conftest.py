"""Shared pytest fixtures (generic: any test module may use them; add new fixtures below).

- ``repo_root`` / ``datasets_dir``: paths; ``datasets_dir`` skips with a reason when ../shared/datasets is absent.
- ``s3_server`` (session): a REAL moto S3 server process on 127.0.0.1 (:mod:`pconv.apps.local_s3`, the one local S3
  server of the demo, the tests and the benchmarks), reached over HTTP like AWS. While it runs,
  ``os.environ`` carries AWS_ENDPOINT_URL + test credentials + region (restored afterwards), so code under test
  finds it through the standard environment only.
- ``s3_bucket``: a fresh, empty bucket per test, yielded as ``"s3://<name>"``.
- ``load_benchmark(name)`` (a function: ``from conftest import load_benchmark``): a script of benchmarks/ as a module.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pconv.apps import local_s3
from pconv.apps.local_s3 import LocalS3, free_port  # noqa: F401 - tests import free_port from here

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS_DIR = REPO_ROOT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """../shared/datasets from the repo root (real photos and the NVIDIA test masks)."""
    if not DATASETS_DIR.is_dir():
        pytest.skip(f"shared datasets not found at {DATASETS_DIR} (see the project README: tests read real data "
                    "from ../shared/datasets)")
    return DATASETS_DIR


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` (a folder of scripts, not a package) imported as module ``name``. It is
    registered in ``sys.modules`` (dataclasses look their module up there); pop it when done if that matters.
    ``benchmarks/`` is put on ``sys.path``, as when a script runs, so its imports of sibling scripts work."""
    import importlib.util

    if str(REPO_ROOT / "benchmarks") not in sys.path:
        sys.path.append(str(REPO_ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real moto S3 server for the whole session (pconv.apps.local_s3, the one local S3 helper); os.environ
    points at it while it lives. Yields the :class:`~pconv.apps.local_s3.LocalS3` (``endpoint``, ``env``)."""
    with LocalS3(tmp_path_factory.mktemp("moto") / "moto.log") as server, server.environment():
        yield server


def stop_process(process: subprocess.Popen, timeout: float) -> None:
    """TERM a server process, KILL it if it has not exited within ``timeout`` seconds (the local S3 helper's)."""
    local_s3.stop_process(process, timeout)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh empty bucket on the session's S3 server, as ``s3://name``."""
    return s3_server.create_bucket(f"test-{uuid.uuid4().hex[:12]}")


# ---------------------------------------------------------------------------------------------
# Small real datasets (copies of subsets of ../shared/datasets) and shards built from them
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def photo_dir(datasets_dir, tmp_path_factory) -> Path:
    """12 CBSD68 PNGs (481x321 / 321x481) under scenes/ and 4 CelebA-HQ JPEGs (1024x1024) under faces/."""
    root = tmp_path_factory.mktemp("photos")
    (root / "scenes").mkdir()
    (root / "faces").mkdir()
    for p in sorted((datasets_dir / "cbsd68").glob("*.png"))[:12]:
        (root / "scenes" / p.name).write_bytes(p.read_bytes())
    for p in sorted((datasets_dir / "celeba_hq_sample").glob("*.jpg"))[:4]:
        (root / "faces" / p.name).write_bytes(p.read_bytes())
    return root


@pytest.fixture(scope="session")
def mask_zip(datasets_dir, tmp_path_factory) -> Path:
    """60 NVIDIA test masks (WHITE = hole), every 200th file: 5 from each of the 12 bin/border blocks."""
    import zipfile

    out = tmp_path_factory.mktemp("masks") / "nvidia_subset.zip"
    with zipfile.ZipFile(datasets_dir / "nvidia_irregular_mask_test.zip") as src, \
            zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        names = sorted(n for n in src.namelist() if n.endswith(".png"))
        for name in names[::200]:
            dst.writestr(name, src.read(name))
    return out


@pytest.fixture(scope="session")
def prepared_shards(photo_dir, mask_zip, tmp_path_factory) -> dict[str, str]:
    """Local shard roots {"images": ..., "masks": ...} built with pconv.ingest.local from photo_dir / mask_zip
    (val fraction 0.25 for images so both splits exist; small shards so there are several)."""
    from pconv.ingest import local
    root = tmp_path_factory.mktemp("shards")
    images, masks = str(root / "images"), str(root / "masks")
    local.ingest_images(str(photo_dir), images, val_fraction=0.25, shard_size_mb=1.0, progress=False)
    local.ingest_masks(str(mask_zip), masks, hole_color="white", progress=False)
    return {"images": images, "masks": masks}


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray (2 CPUs) for one test module's end-to-end runs; Ray tests run under the Ray lock."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()
