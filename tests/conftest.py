"""Shared pytest fixtures (generic: any test module may use them; add new fixtures below), and the test tiers.

Tiers (set here, from fixtures, never by hand): a test whose fixtures (directly or through other fixtures) include
one of SERVER_FIXTURES starts Ray, an MLflow server or an S3 server and is in the **server tier** (marker
``server``, added in :func:`pytest_collection_modifyitems`). Every other test is in the **fast tier**: ``make
test-fast`` (``-m "not server"``) runs only those, and runs each with the guard of ``tests/fast_tier/`` on, so that a
fast-tier test that starts Ray (``ray.init``, ``ray start``), ``mlflow server`` or moto's S3 server anyway, in this
process or in a child process, fails with an error naming it. ``make test`` runs both tiers.

A fixture requested at run time (``request.getfixturevalue``) counts when a parameter of the test names it.

Order: the tests that use no Ray run first, then those on the session's local Ray (``ray_local``), then those that
start their own cluster (``own_ray_cluster``), which stops the session Ray first: one Ray cluster at a time.

- ``repo_root`` / ``datasets_dir``: paths; ``datasets_dir`` skips with a reason when ../shared/datasets is absent.
- ``s3_server`` (session): a REAL moto S3 server process on 127.0.0.1 (:mod:`pconv.apps.local_s3`, the one local S3
  server of the demo, the tests and the benchmarks), reached over HTTP like AWS. While it runs,
  ``os.environ`` carries AWS_ENDPOINT_URL + test credentials + region (restored afterwards), so code under test
  finds it through the standard environment only.
- ``s3_bucket``: a fresh, empty bucket per test, yielded as ``"s3://<name>"``.
- ``mlflow_server`` (module; ``from mlflow_server import mlflow_server``): a real ``mlflow server`` process.
- ``ray_local`` (session): ONE in-process local Ray (2 CPUs) shared by every in-process Ray test of the session.
- ``own_ray_cluster`` (session): for a test that starts its own Ray cluster (``ray start``, ``ray.cluster_utils``,
  the fake autoscaler, a script that starts a local Ray in a subprocess): stops the session Ray first.
- ``own_servers``: for a test that starts its own S3 or MLflow server process (e.g. it tests the script that does).
- ``load_benchmark(name)`` (a function: ``from conftest import load_benchmark``): a script of benchmarks/ as a module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
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
    from pconv import ingest
    root = tmp_path_factory.mktemp("shards")
    images, masks = str(root / "images"), str(root / "masks")
    ingest.ingest_images(str(photo_dir), images, val_fraction=0.25, shard_size_mb=1.0, engine="threads", progress=False)
    ingest.ingest_masks(str(mask_zip), masks, hole_color="white", engine="threads", progress=False)
    return {"images": images, "masks": masks}



# ---------------------------------------------------------------------------------------------
# Ray: one local Ray for the session; tests that start their own cluster run after it is stopped
# ---------------------------------------------------------------------------------------------
class _SessionRay:
    """The session's one in-process local Ray (2 CPUs: the machine's, as the tests' budget assumes)."""

    CPUS = 2

    def __init__(self) -> None:
        self.starts = 0
        self.stopped_for_own_cluster = False

    @staticmethod
    def up() -> bool:
        return "ray" in sys.modules and sys.modules["ray"].is_initialized()

    def start(self) -> None:
        if self.up():
            return
        if self.stopped_for_own_cluster:
            raise RuntimeError("ray_local was requested after a test that starts its own Ray cluster stopped the "
                               "session Ray; tests/conftest.py orders such tests last, so this is a bug there")
        import ray

        # A local Ray of its own (address "local"), never a cluster named by the shell (RAY_ADDRESS) nor the one the
        # last `ray start` on this machine recorded in /tmp/ray/ray_current_cluster, which ray.init() joins by
        # default: a run that broke off before its cluster's teardown left that file naming a dead cluster, and
        # every test on the session Ray of the next run failed to connect to it.
        with pytest.MonkeyPatch.context() as env:
            env.delenv("RAY_ADDRESS", raising=False)
            ray.init(address="local", num_cpus=self.CPUS, include_dashboard=False, log_to_driver=True)
        self.starts += 1

    def stop(self) -> None:
        if self.up():
            sys.modules["ray"].shutdown()


SESSION_RAY = _SessionRay()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """The session's local Ray (2 CPUs), started by the first test that asks for it and shared by all of them.
    Tests on it must not call ``ray.init`` or ``ray.shutdown`` themselves. It starts after the session's S3 server,
    so its workers, actors and replicas inherit that server's AWS_* environment (Ray fixes a worker's environment
    when the cluster starts; a test order in which Ray came first would leave them without the endpoint)."""
    SESSION_RAY.start()
    yield
    SESSION_RAY.stop()


@pytest.fixture(autouse=True)
def _session_ray_is_up(request):
    """A test on the session Ray finds it up, even if an earlier test shut it down (counted: see the summary)."""
    if "ray_local" in request.fixturenames:
        SESSION_RAY.start()


@pytest.fixture(scope="session")
def own_ray_cluster():
    """For tests that start their own Ray cluster (``ray start``, ``ray.cluster_utils.Cluster``, the fake autoscaler,
    a pipeline script that starts a local Ray in a subprocess, ``ray job submit`` to a cluster they start): only one
    Ray cluster may run on this machine at a time, so the session Ray is stopped first. These tests run after all
    the tests on the session Ray (:func:`pytest_collection_modifyitems`), so it is not started again."""
    SESSION_RAY.stop()
    SESSION_RAY.stopped_for_own_cluster = True
    yield


@pytest.fixture
def own_servers():
    """For a test that starts its own S3 or MLflow server process (e.g. it tests the script that starts them): it
    needs no server fixture, and this puts it in the server tier."""
    yield


# ---------------------------------------------------------------------------------------------
# Tiers: marked from fixtures, ordered by Ray use, the fast tier guarded
# ---------------------------------------------------------------------------------------------
# A test that uses any of these (directly or through another fixture) is in the server tier.
SERVER_FIXTURES = frozenset({"s3_server", "s3_bucket", "mlflow_server", "ray_local", "own_ray_cluster",
                             "own_servers"})
FAST_TIER_GUARD = Path(__file__).resolve().parent / "fast_tier"


def _load_fast_tier_guard():
    spec = importlib.util.spec_from_file_location("fast_tier_guard", FAST_TIER_GUARD / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_guard = _load_fast_tier_guard()
_guard_on = False
_guard.install(lambda: _guard_on)


def server_tier(item) -> bool:
    """The test's fixtures (their closure) include a server fixture, or a parameter names one: a fixture that takes
    ``request.getfixturevalue(request.param)`` with ``params=["tmp_path", "s3_bucket"]`` is seen through its
    parameter (pytest cannot see a fixture requested at run time)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    named = {v for v in params.values() if isinstance(v, str)}
    return bool(SERVER_FIXTURES & (set(getattr(item, "fixturenames", ())) | named))


def _ray_order(item) -> int:
    names = set(getattr(item, "fixturenames", ()))
    return 2 if "own_ray_cluster" in names else 1 if "ray_local" in names else 0


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("server") is not None:
            raise pytest.UsageError(f"{item.nodeid} is marked `server` by hand; the tiers come from fixtures "
                                    f"(tests/conftest.py): request the fixture that starts the server instead")
        if server_tier(item):
            item.add_marker(pytest.mark.server)
    # No Ray first, then the session Ray's tests, then the tests that start their own cluster. A module stays in one
    # piece (its module-scoped fixtures, e.g. an MLflow server, start once): its tests without Ray run with its
    # session-Ray tests; only its own-cluster tests, which must come after every session-Ray test, are split off.
    group: dict[str, int] = {}
    for item in items:
        if _ray_order(item) < 2:
            group[item.module.__name__] = max(group.get(item.module.__name__, 0), _ray_order(item))
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item.module.__name__, i)
    order = {id(item): (2 if _ray_order(item) == 2 else group[item.module.__name__], first[item.module.__name__], i)
             for i, item in enumerate(items)}
    # An xdist worker puts the Ray tests first, so that the worker given them starts at once (they are the critical
    # path), and tells the controller which they are (RayGroupScheduling, below).
    worker = hasattr(config, "workerinput")  # this process is an xdist worker (not a pytest it started)
    items.sort(key=lambda item: (worker and not _ray_order(item), order[id(item)]))
    if worker:
        _write_ray_tests([item.nodeid for item in items if _ray_order(item)])


# ---------------------------------------------------------------------------------------------
# Two xdist workers (`make test`: -n 2): every Ray test on one of them, the rest on the other
# ---------------------------------------------------------------------------------------------
# Only one Ray cluster may run on this machine at a time, so the Ray tests (session Ray, then own clusters) are one
# unit of work, in order, on one worker; the other worker runs the tests without Ray meanwhile, a module at a time (so
# a module's fixtures, e.g. its MLflow server, start once). xdist's own `--dist loadgroup` cannot say this: its
# xdist_group mark is lost under pytest 9 (it renames `item._nodeid`, which pytest 9 no longer reads), so the workers
# name the Ray tests in a file of this run and the controller's scheduler groups them.
RAY_TESTS_ENV = "PCONV_XDIST_RAY_TESTS"


def pytest_configure(config):
    if not hasattr(config, "workerinput") and config.pluginmanager.hasplugin("xdist") and \
            config.getoption("numprocesses", None):
        fd, path = tempfile.mkstemp(prefix="pconv-xdist-ray-tests-", suffix=".json")
        os.close(fd)
        os.unlink(path)
        os.environ[RAY_TESTS_ENV] = path  # the workers start after this and inherit it
        config.add_cleanup(lambda: Path(path).unlink(missing_ok=True))


def _write_ray_tests(nodeids: list[str]) -> None:
    path = os.environ.get(RAY_TESTS_ENV)
    if path:  # both workers write the same list (their collections are equal): atomically, the last one wins
        tmp = f"{path}.{os.getpid()}"
        Path(tmp).write_text(json.dumps(nodeids))
        os.replace(tmp, path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class RayGroupScheduling(LoadScopeScheduling):
        """xdist's module-at-a-time scheduling, with every Ray test in one unit ("ray")."""

        ray_tests: frozenset[str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.ray_tests is None:  # first called once every worker has sent its collection
                path = Path(os.environ[RAY_TESTS_ENV])
                if not path.is_file():
                    raise RuntimeError(f"no worker wrote the Ray tests of this run to {path} (tests/conftest.py)")
                self.ray_tests = frozenset(json.loads(path.read_text()))
            return "ray" if nodeid in self.ray_tests else nodeid.split("::", 1)[0]

    return RayGroupScheduling(config, log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Fast-tier tests run guarded (setup, call and teardown), and so do the Python processes they start."""
    global _guard_on
    fast = item.get_closest_marker("server") is None
    saved = os.environ.get("PYTHONPATH")
    if fast:
        _guard_on = True
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(FAST_TIER_GUARD), saved) if p)
    try:
        yield
    finally:
        _guard_on = False
        if fast:
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved


def pytest_terminal_summary(terminalreporter):
    if SESSION_RAY.starts > 1:
        terminalreporter.write_line(f"ray_local: the session's local Ray was started {SESSION_RAY.starts} times "
                                    "(a test shut it down; tests on it must not call ray.shutdown)", yellow=True)
