"""A REAL ``mlflow server`` process for integration tests: SQLite backend in a temp dir, artifacts proxied
(``--artifacts-destination s3://<bucket>/mlflow``) to the moto S3 server from ``conftest.s3_server``.

Use in a test module::

    from mlflow_server import mlflow_server  # noqa: F401  (module-scoped fixture)

While the fixture lives, ``MLFLOW_TRACKING_URI`` points at the server (restored afterwards) and MLflow's HTTP
retries are short, so failures show up quickly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import free_port, stop_process

MLFLOW_BIN = Path(sys.executable).with_name("mlflow")
START_TIMEOUT_S = 180  # the server imports a lot; two busy cores can take a while


@dataclass
class MlflowServer:
    url: str
    bucket: str              # bucket name on the S3 server
    artifacts_destination: str
    backend_uri: str
    s3_endpoint: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process(self.process, timeout=15)


def start_mlflow_server(workdir: Path, s3_endpoint: str, s3_env: dict[str, str]) -> MlflowServer:
    """Create a bucket, start ``mlflow server`` on a free 127.0.0.1 port and wait for ``/health``."""
    import boto3

    bucket = f"mlflow-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    backend = f"sqlite:///{workdir / 'mlflow-server.db'}"
    destination = f"s3://{bucket}/mlflow"
    env = {**os.environ, **s3_env, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background huey workers on 2 cores
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = workdir / "mlflow-server.log"
    log_fh = open(log_path, "wb")  # noqa: SIM115 - owned by the process
    exe = [str(MLFLOW_BIN)] if MLFLOW_BIN.exists() else [sys.executable, "-m", "mlflow"]
    proc = subprocess.Popen(
        [*exe, "server", "--backend-store-uri", backend, "--artifacts-destination", destination,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=workdir, env=env, stdout=log_fh, stderr=subprocess.STDOUT)
    server = MlflowServer(f"http://127.0.0.1:{port}", bucket, destination, backend, s3_endpoint, proc, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            log_fh.close()
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return server
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"mlflow server did not answer within {START_TIMEOUT_S} s:\n{server.log_tail()}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):
    """A real MLflow tracking server for this test module; MLFLOW_TRACKING_URI points at it meanwhile."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), s3_server.endpoint, s3_server.env)
    try:
        with pytest.MonkeyPatch.context() as env:  # restores os.environ when the module ends
            env.setenv("MLFLOW_TRACKING_URI", server.url)
            env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            env.setenv("PCONV_MLFLOW_RETRY", "3,0.05,2,1")
            yield server
    finally:
        server.stop()
