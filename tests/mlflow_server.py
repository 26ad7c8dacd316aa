"""A REAL ``mlflow server`` process for integration tests: SQLite backend in a temp dir, artifacts proxied
(``--artifacts-destination s3://<bucket>/mlflow``) to the moto S3 server from ``conftest.s3_server``.

Use in a test module::

    from mlflow_server import mlflow_server  # noqa: F401  (module-scoped fixture)

While the fixture lives, ``MLFLOW_TRACKING_URI`` points at the server (restored afterwards) and MLflow's HTTP
retries are short, so failures show up quickly. ``server.stop()`` and ``server.start()`` stop it and start it
again on the same port with the same backend store (an outage: tests/test_mlflow_outage.py); a test that stops it
starts it again before it ends, since later tests of the module share it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import free_port

MLFLOW_BIN = Path(sys.executable).with_name("mlflow")
START_TIMEOUT_S = 180  # the server imports a lot; two busy cores can take a while


@dataclass
class MlflowServer:
    """One ``mlflow server`` on a fixed 127.0.0.1 ``port`` and backend store: :meth:`stop` and :meth:`start` again
    give an outage of the same server (same URL, same runs), as a crash and a restart of a tracking server do."""

    url: str
    bucket: str              # bucket name on the S3 server
    artifacts_destination: str
    backend_uri: str
    s3_endpoint: str
    port: int
    workdir: Path
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self) -> None:
        """Start the server (again) and wait until ``/health`` answers. Its own session: :meth:`stop` ends the
        uvicorn process ``mlflow server`` starts as well, so the port is really closed while it is stopped."""
        exe = [str(MLFLOW_BIN)] if MLFLOW_BIN.exists() else [sys.executable, "-m", "mlflow"]
        with open(self.log_path, "ab") as log_fh:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [*exe, "server", "--backend-store-uri", self.backend_uri, "--artifacts-destination",
                 self.artifacts_destination, "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                cwd=self.workdir, env=self.env, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not answer within {START_TIMEOUT_S} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def stop(self) -> None:
        """TERM the server's process group (the CLI and its uvicorn), KILL it after 15 s."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass
        try:  # a child that outlived the CLI
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_mlflow_server(workdir: Path, s3_endpoint: str, s3_env: dict[str, str]) -> MlflowServer:
    """Create a bucket, start ``mlflow server`` on a free 127.0.0.1 port and wait for ``/health``."""
    import boto3

    bucket = f"mlflow-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, **s3_env, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background huey workers on 2 cores
    env.pop("MLFLOW_TRACKING_URI", None)
    server = MlflowServer(f"http://127.0.0.1:{port}", bucket, f"s3://{bucket}/mlflow",
                          f"sqlite:///{workdir / 'mlflow-server.db'}", s3_endpoint, port, workdir, env,
                          workdir / "mlflow-server.log")
    server.start()
    return server


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
