"""infra/local/stack.sh: the local S3 + MLflow + Ray stack starts, answers, and stops only what it started.

The cheap tests exercise argument handling and the fail-fast paths (nothing is started). The slow integration test
runs the real ``up``/``status``/``down`` cycle in a temp DIR with free ports and talks to each real service.
Also here: pconv.apps.local_s3, the in-process local S3 server of the demo, the tests and the benchmarks.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
STACK = REPO_ROOT / "infra" / "local" / "stack.sh"
RAY_BIN = Path(sys.executable).with_name("ray")
SERVICES = ("s3", "mlflow", "ray")


def run_stack(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "STACK_"))}
    for k in ("S3_PORT", "MLFLOW_PORT"):
        base.pop(k, None)
    base["PYTHON"] = sys.executable
    return subprocess.run(["bash", str(STACK), *args], env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


def parse_env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            out[key] = value
    return out


def http_status(url: str, token: str | None = None, method: str = "GET", data: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, data=data)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None and method == "POST":
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def processes_mentioning(text: str) -> list[int]:
    """PIDs (other than ours) whose command line contains ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        if int(entry.name) == os.getpid():
            continue
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


# ---------------------------------------------------------------- cheap: argument handling, fail-fast paths
def test_unknown_command_prints_usage():
    res = run_stack("start")
    assert res.returncode == 2
    assert "usage:" in res.stderr


def test_down_and_status_on_an_empty_dir(tmp_path):
    down = run_stack("down", "--dir", str(tmp_path / "stack"))
    assert down.returncode == 0, down.stderr
    assert "nothing to stop" in down.stdout
    status = run_stack("status", "--dir", str(tmp_path / "stack"))
    assert status.returncode != 0
    assert [line for line in status.stdout.splitlines()] == [f"{name}: down" for name in SERVICES]
    assert not (tmp_path / "stack").exists(), "status/down must not create the stack directory"


def test_up_refuses_a_port_in_use_and_starts_nothing(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        res = run_stack("up", "--dir", str(tmp_path / "stack"), env={"MLFLOW_PORT": str(port)}, timeout=60)
    assert res.returncode == 1
    assert f"port {port} (MLFLOW_PORT) is already in use" in res.stderr
    assert not list((tmp_path / "stack").glob("*.pid")), "nothing may be started when a port is taken"


def test_up_rejects_an_unknown_auth_mode(tmp_path):
    res = run_stack("up", "--dir", str(tmp_path / "stack"), env={"STACK_RAY_AUTH": "password"}, timeout=60)
    assert res.returncode == 1
    assert "STACK_RAY_AUTH must be 'token' or 'disabled'" in res.stderr
    assert not list((tmp_path / "stack").glob("*.pid"))


# ---------------------------------------------------------------- pconv.apps.local_s3
@pytest.mark.integration
def test_local_s3_points_the_aws_environment_at_itself_only_while_entered(tmp_path, monkeypatch, own_servers):
    from pconv.storage import uris
    from pconv.apps.local_s3 import LocalS3

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://elsewhere.invalid")  # would win over AWS_ENDPOINT_URL
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with LocalS3(tmp_path / "s3.log") as s3:
        with s3.environment():
            assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint and "AWS_ENDPOINT_URL_S3" not in os.environ
            bucket = s3.create_bucket("local-s3-test")
            uris.write_bytes_atomic(f"{bucket}/a/b.txt", b"hello")
            assert uris.read_bytes(f"{bucket}/a/b.txt") == b"hello"
        assert os.environ["AWS_ENDPOINT_URL_S3"] == "http://elsewhere.invalid"
        assert "AWS_ENDPOINT_URL" not in os.environ
        process = s3.process
        assert process.poll() is None
    assert process.poll() is not None and s3.process is None  # stopped on exit


# ---------------------------------------------------------------- slow: the real stack
@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(420)
def test_stack_up_answers_and_down_stops_only_what_it_started(tmp_path, own_ray_cluster, own_servers):
    import boto3

    stack_dir = tmp_path / "stack"
    ports = {name: free_port() for name in ("S3_PORT", "MLFLOW_PORT", "RAY_PORT", "RAY_DASHBOARD_PORT")}
    env = {k: str(v) for k, v in ports.items()}
    up = run_stack("up", "--dir", str(stack_dir), env=env)
    try:
        assert up.returncode == 0, f"stdout:\n{up.stdout}\nstderr:\n{up.stderr}"
        env_file = stack_dir / "env.sh"
        assert f". {env_file}" in up.stdout  # it tells the user how to use it
        exported = parse_env_file(env_file)
        s3_url = f"http://127.0.0.1:{ports['S3_PORT']}"
        mlflow_url = f"http://127.0.0.1:{ports['MLFLOW_PORT']}"
        dashboard_url = f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}"
        assert exported["AWS_ENDPOINT_URL"] == s3_url
        assert exported["AWS_ACCESS_KEY_ID"] == "testing"
        assert exported["MLFLOW_TRACKING_URI"] == mlflow_url
        assert exported["RAY_ADDRESS"] == dashboard_url
        assert exported["RAY_AUTH_MODE"] == "token"
        token_file = Path(exported["RAY_AUTH_TOKEN_PATH"])
        token = token_file.read_text().strip()
        assert len(token) == 64
        assert stat.S_IMODE(token_file.stat().st_mode) & 0o077 == 0, "the token must not be readable by others"

        pids = {name: int((stack_dir / f"{name}.pid").read_text().split()[0]) for name in SERVICES}
        ray_temp_dir = (stack_dir / "ray_temp_dir").read_text().strip()
        assert all(pid_alive(pid) for pid in pids.values())

        # S3: the bucket exists on the local server.
        s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
        assert "pconv-local" in {b["Name"] for b in s3.list_buckets()["Buckets"]}

        # MLflow: health, the REST API, and artifacts proxied into the local bucket.
        assert http_status(f"{mlflow_url}/health")[0] == 200
        code, body = http_status(f"{mlflow_url}/api/2.0/mlflow/experiments/search", method="POST",
                                 data=json.dumps({"max_results": 10}).encode())
        assert code == 200 and "experiments" in json.loads(body)
        code, _ = http_status(f"{mlflow_url}/api/2.0/mlflow-artifacts/artifacts/stack-test/hello.txt", method="PUT",
                              data=b"proxied")
        assert code == 200
        assert s3.get_object(Bucket="pconv-local", Key="mlflow/stack-test/hello.txt")["Body"].read() == b"proxied"

        # Ray: the dashboard/job API demands the token; the CLI works with RAY_AUTH_MODE=token.
        assert http_status(f"{dashboard_url}/api/version")[0] == 401
        code, body = http_status(f"{dashboard_url}/api/version", token=token)
        assert code == 200 and "ray_version" in json.loads(body)
        assert http_status(f"{dashboard_url}/api/version", token="0" * 64)[0] == 403
        cli_env = {**os.environ, **exported}
        cli_env.pop("RAY_AUTH_TOKEN", None)
        status = subprocess.run([str(RAY_BIN), "status", "--address", f"127.0.0.1:{ports['RAY_PORT']}"], env=cli_env,
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr[-2000:]
        assert "CPU" in status.stdout
        # A job sees the stack through the environment the head was started with.
        job = subprocess.run(
            [str(RAY_BIN), "job", "submit", "--", "python", "-c",
             "import os; print('SEEN', os.environ['AWS_ENDPOINT_URL'], os.environ['MLFLOW_TRACKING_URI'])"],
            env=cli_env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
        assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
        assert f"SEEN {s3_url} {mlflow_url}" in job.stdout

        status = run_stack("status", "--dir", str(stack_dir))
        assert status.returncode == 0, status.stdout
        assert [line.split(":")[0] for line in status.stdout.splitlines() if ": up (" in line] == list(SERVICES)

        again = run_stack("up", "--dir", str(stack_dir))  # idempotent while everything runs
        assert again.returncode == 0 and "already up" in again.stdout
        assert {name: int((stack_dir / f"{name}.pid").read_text().split()[0]) for name in SERVICES} == pids
    finally:
        down = run_stack("down", "--dir", str(stack_dir))
    assert down.returncode == 0, down.stderr
    for name, pid in pids.items():
        assert f"{name}: stopped (pid {pid})" in down.stdout
        assert not pid_alive(pid), f"{name} (pid {pid}) still running"
        assert not group_alive(pid), f"processes of {name}'s group {pid} still running"
    assert processes_mentioning(ray_temp_dir) == [], "Ray processes of this stack outlived `down`"
    assert not Path(ray_temp_dir).exists()
    assert not list(stack_dir.glob("*.pid"))
    after = run_stack("status", "--dir", str(stack_dir))
    assert after.returncode != 0 and after.stdout.count(": down") == 3
