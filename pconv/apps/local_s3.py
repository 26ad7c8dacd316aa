"""A local S3 server for the demo, the tests and the benchmarks: moto's server in a subprocess on 127.0.0.1.

Code under test reaches it like any S3 endpoint, through the standard AWS environment only (:mod:`pconv.storage.uris`):
:meth:`LocalS3.environment` sets ``AWS_ENDPOINT_URL``, credentials and region in ``os.environ`` (and removes the
variables that would send clients elsewhere) while it is entered, and restores them afterwards. ``LocalS3.env`` holds
the same values for other processes (subprocesses, Ray workers). moto comes with the project's ``[test]`` extra.

    with LocalS3(log_path) as s3, s3.environment():
        s3.create_bucket("demo")
        ...  # s3://demo/... works through pconv.storage.uris, pyarrow, boto3
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from pconv.storage import uris
log = logging.getLogger(__name__)
# The server is on loopback: never ask a proxy from the environment for it.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))

HOST = "127.0.0.1"
REGION = "us-east-1"
CREDENTIAL = "testing"   # moto accepts any access key / secret; one value for every local use
START_TIMEOUT_S = 60.0


def stop_process(process: subprocess.Popen, timeout_s: float) -> None:
    """TERM a server process, KILL it if it has not exited within ``timeout_s`` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class LocalS3Error(RuntimeError):
    """The local S3 server could not be started (moto missing or exiting, no answer in time)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class LocalS3:
    """``python -m moto.server`` on a free 127.0.0.1 port; :meth:`start` waits until it answers HTTP.

    ``log_path``: the server's stdout/stderr (None: discarded). Usable as a context manager (start / stop).
    """

    def __init__(self, log_path: str | Path | None = None, timeout_s: float = START_TIMEOUT_S):
        self.log_path = Path(log_path) if log_path is not None else None
        self.timeout_s = timeout_s
        self.process: subprocess.Popen | None = None
        self.endpoint = ""
        self.env: dict[str, str] = {}

    def start(self) -> "LocalS3":
        port = free_port()
        endpoint = f"http://{HOST}:{port}"
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out: Any = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps its own descriptor
        else:
            out = subprocess.DEVNULL
        try:
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        where = f"; see {self.log_path}" if self.log_path is not None else ""
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise LocalS3Error(f"the local S3 server (moto) exited with {code}{where} (moto is installed "
                                   "with the project's [test] extra)")
            try:
                with _DIRECT.open(f"{endpoint}/moto-api/", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise LocalS3Error(f"the local S3 server did not answer on {endpoint} within "
                                       f"{self.timeout_s:g} s{where}") from None
                time.sleep(0.2)
        self.endpoint = endpoint
        self.env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": CREDENTIAL,
                    "AWS_SECRET_ACCESS_KEY": CREDENTIAL, "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION}
        log.info("local S3 server at %s (pid %d)", endpoint, self.process.pid)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """TERM the server, KILL it if it has not exited within ``timeout_s``."""
        proc, self.process = self.process, None
        if proc is not None:
            stop_process(proc, timeout_s)

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @contextlib.contextmanager
    def environment(self) -> Iterator[dict[str, str]]:
        """``os.environ`` points S3 clients at this server while entered: :attr:`env` set, every other standard
        AWS variable (:data:`pconv.storage.uris.AWS_ENV_VARS`, the profile) removed; all restored on exit."""
        names = (*uris.AWS_ENV_VARS, uris.AWS_PROFILE_VAR)
        saved = {k: os.environ.get(k) for k in names}
        try:
            for k in names:
                if k in self.env:
                    os.environ[k] = self.env[k]
                else:
                    os.environ.pop(k, None)
            yield self.env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def client(self):
        """A boto3 S3 client of this server (explicit endpoint and credentials: works outside :meth:`environment`)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=CREDENTIAL,
                            aws_secret_access_key=CREDENTIAL)

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name``; returns ``s3://name``."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"
