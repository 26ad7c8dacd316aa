"""The test tiers of tests/conftest.py, checked on a small suite run by a separate pytest: the server tier comes from
fixtures, the tests that start their own Ray cluster run last, and a fast-tier test that starts Ray, an MLflow
server or an S3 server anyway (in the pytest process or in a child process) fails with an error naming it, having
started nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SUITE = '''
import subprocess
import sys

import pytest


def test_plain():
    pass


def test_on_the_session_ray(ray_local):
    pass


def test_on_its_own_cluster(own_ray_cluster):
    pass


def test_on_s3(s3_bucket):
    pass


def test_after_them():
    pass


@pytest.fixture(params=["tmp_path", "s3_bucket"])
def root(request):
    return request.getfixturevalue(request.param)


def test_on_a_root_named_by_its_parameter(root):
    pass


def test_starts_ray_in_process():
    import ray
    ray.init(address="local", num_cpus=1, include_dashboard=False)


def test_starts_ray_in_a_child():
    proc = subprocess.run([sys.executable, "-c", "import ray; ray.init(address='local', num_cpus=1, include_dashboard=False)"],
                          capture_output=True, text=True, timeout=120)
    sys.stderr.write(proc.stderr)
    assert proc.returncode == 0


def test_spawns_an_mlflow_server():
    subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--port", "1"])


def test_a_shell_child_that_is_an_s3_server():
    proc = subprocess.run(["bash", "-c", f"exec {sys.executable} -m moto.server -p 1"], capture_output=True,
                          text=True, timeout=120)
    sys.stderr.write(proc.stderr)
    assert proc.returncode == 0
'''


def _suite(tmp_path: Path, text: str = SUITE) -> Path:
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    shutil.copytree(TESTS / "fast_tier", tmp_path / "fast_tier", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "test_suite.py").write_text(text)
    return tmp_path


def _pytest(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(root), *args, str(root / "test_suite.py")], cwd=root,
                          capture_output=True, text=True, timeout=300, check=False)


def test_tiers_come_from_fixtures_and_own_clusters_run_last(tmp_path):
    root = _suite(tmp_path)
    every = _pytest(root, "--collect-only", "-q")
    names = [line.split("::")[1] for line in every.stdout.splitlines() if "::" in line]
    # the own-cluster test last; the module's other tests stay together in their order (module fixtures start once)
    assert names[-1] == "test_on_its_own_cluster", every.stdout
    assert names[0] == "test_plain" and names.index("test_on_the_session_ray") < names.index("test_after_them")
    server = _pytest(root, "--collect-only", "-q", "-m", "server")
    assert sorted(line.split("::")[1] for line in server.stdout.splitlines() if "::" in line) == [
        "test_on_a_root_named_by_its_parameter[s3_bucket]", "test_on_its_own_cluster", "test_on_s3",
        "test_on_the_session_ray"], server.stdout


def test_a_test_marked_server_by_hand_is_refused(tmp_path):
    root = _suite(tmp_path, "import pytest\n\n@pytest.mark.server\ndef test_by_hand():\n    pass\n")
    proc = _pytest(root, "--collect-only", "-q")
    assert proc.returncode == pytest_usage_error(), proc.stdout + proc.stderr
    assert "test_by_hand is marked `server` by hand" in proc.stdout + proc.stderr


def pytest_usage_error() -> int:
    import pytest

    return int(pytest.ExitCode.USAGE_ERROR)


def test_a_fast_tier_test_that_starts_a_server_fails_naming_itself(tmp_path):
    root = _suite(tmp_path)
    proc = _pytest(root, "-m", "not server", "-q", "-rf", "-W", "ignore")
    out = proc.stdout + proc.stderr
    assert "4 failed, 3 passed" in out, out
    for name in ("test_starts_ray_in_process", "test_starts_ray_in_a_child", "test_spawns_an_mlflow_server",
                 "test_a_shell_child_that_is_an_s3_server"):
        assert f"test_suite.py::{name} starts " in out, (name, out)
    assert "starts Ray (ray.init" in out and "starts an MLflow server (mlflow server)" in out
    assert "starts moto's S3 server" in out


XDIST_SUITE = '''
import os
from pathlib import Path

import pytest

LOG = Path(__file__).parent / "ran.txt"


@pytest.fixture
def ray_local():  # overrides conftest's: where the Ray tests run is under test here, not Ray
    yield


@pytest.fixture
def own_ray_cluster():
    yield


@pytest.fixture(autouse=True)
def _session_ray_is_up():  # conftest's would start the session Ray for a test that names ray_local
    yield


def _ran(name):
    with LOG.open("a") as f:
        f.write(f"{os.environ['PYTEST_XDIST_WORKER']} {name}\\n")


def test_plain():
    _ran("plain")


def test_on_the_session_ray(ray_local):
    _ran("session")


def test_on_its_own_cluster(own_ray_cluster):
    _ran("own")


def test_after_them():
    _ran("after")


def test_on_the_session_ray_again(ray_local):
    _ran("session2")
'''


def test_under_xdist_one_worker_runs_every_ray_test_in_order_and_the_other_the_rest(tmp_path):
    """`make test` runs two xdist workers: only one Ray cluster may run at a time, so every Ray test is in one
    group, scheduled first, own-cluster tests last; the tests without Ray run beside it on the other worker."""
    root = _suite(tmp_path, XDIST_SUITE)
    proc = _pytest(root, "-n", "2", "-v")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "scheduling tests via RayGroupScheduling" in proc.stdout, proc.stdout
    ran = [line.split() for line in (root / "ran.txt").read_text().splitlines()]
    ray = [(worker, name) for worker, name in ran if name in ("session", "session2", "own")]
    assert [name for _, name in ray] == ["session", "session2", "own"], ran
    assert len({worker for worker, _ in ray}) == 1, ran
    assert {worker for worker, name in ran if name in ("plain", "after")} == {"gw0", "gw1"} - {ray[0][0]}, ran
