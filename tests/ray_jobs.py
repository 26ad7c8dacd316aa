"""Ray job and cluster helpers for end-to-end tests that drive a real cluster the way a user does: the `ray` CLI in
subprocesses (the in-process SDK caches the first auth token it ever loaded), with token authentication on.

- :class:`JobsCli`: ``ray job status/logs/list`` against one cluster's job API; :func:`wait_for_job`.
- :func:`submit_job`: ``ray job submit --working-dir <repo> --no-wait``, retried while the job agent registers.
- :func:`list_nodes`: every node the GCS knows (alive and dead), from ``ray list nodes``.
- :func:`alive_actors`: the ALIVE actors of one class (``pid``, ``node_id``, ``job_id``), from ``ray list actors``.
- :func:`ray_processes_of`: PIDs of processes whose command line names this cluster (its GCS port or temp dir),
  so a test stops exactly the Ray processes it started.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def token_auth() -> dict[str, str]:
    """Token authentication on, as in production (Ray 2.60): the cluster, the CLI and the SDK share the token."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def cluster_env(s3_env: dict[str, str], tracking_uri: str) -> dict[str, str]:
    """The environment of a test cluster's head and of its jobs: this process's, the S3 server's, the MLflow
    server, this venv's bin first on PATH, no usage stats."""
    return {**os.environ, **s3_env, "MLFLOW_TRACKING_URI": tracking_uri,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
            # A test cluster is torn down whole (its head's process group): Ray 2.60's head first spends up to 30 s
            # trying to drain itself through a GCS that is already gone. Nothing survives it to hand work to.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
REPO = Path(__file__).resolve().parents[1]


class JobsCli:
    """`ray job status/logs/list` against one cluster's job API."""

    def __init__(self, address: str, env: dict[str, str]) -> None:
        self.address, self.env = address, env

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), "job", *args, "--address", self.address], capture_output=True,
                              text=True, env=self.env, timeout=120)

    def ready(self) -> bool:
        return self._run("list").returncode == 0

    def get_job_status(self, job_id: str) -> str:
        out = self._run("status", job_id)
        text = out.stdout + out.stderr
        for word, status in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("was stopped", "STOPPED")):
            if f"Job '{job_id}' {word}" in text:
                return status
        return "RUNNING" if out.returncode == 0 else f"UNKNOWN: {text[-500:]}"

    def get_job_logs(self, job_id: str) -> str:
        return self._run("logs", job_id).stdout


def wait_for_job(client: JobsCli, submission_id: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(client.get_job_status(submission_id))
        if status.endswith(("SUCCEEDED", "FAILED", "STOPPED")):
            return status
        time.sleep(2)
    raise AssertionError(f"job {submission_id} did not finish in {timeout} s:\n"
                         f"{client.get_job_logs(submission_id)[-4000:]}")


def submit_job(address: str, env: dict[str, str], submission_id: str, entrypoint: list[str],
               in_place: bool = False) -> None:
    """`ray job submit --no-wait` of ``entrypoint`` with the repository as working dir: uploaded (``--working-dir``,
    as the README does) or, ``in_place``, used where it is on every node (a ``local://`` working dir)."""
    where = (["--runtime-env-json", f'{{"working_dir": "local://{REPO}"}}'] if in_place
             else ["--working-dir", str(REPO)])
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, *where,
           "--submission-id", submission_id, "--no-wait", "--", *entrypoint]
    deadline = time.monotonic() + 120
    while True:  # right after start-up the job agent may not be registered yet: Ray says so, and we try again
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        if proc.returncode == 0 or "No available agent" not in proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def list_nodes(address: str, env: dict[str, str]) -> list[dict]:
    """All nodes of the cluster (``state`` ALIVE or DEAD, ``is_head_node``, ``node_id``, ``resources_total``)."""
    proc = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", address, "--format", "json",
                           "--limit", "1000"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [] if proc.stdout.startswith("No resource") else json.loads(proc.stdout)  # not registered yet


def ray_processes_of(*marks: str) -> list[int]:
    """PIDs of the processes whose command line contains one of ``marks`` (a GCS address, a temp dir)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(proc.name) != os.getpid() and any(m in cmdline for m in marks):
            pids.append(int(proc.name))
    return pids


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def alive_actors(address: str, env: dict[str, str], class_name: str) -> list[dict]:
    """The ALIVE actors of ``class_name`` in the cluster, as Ray's state API knows them (``pid``, ``node_id``,
    ``job_id``, ``actor_id``): the processes Ray itself would call that actor, never a fork of one nor one exiting."""
    proc = subprocess.run([str(BIN / "ray"), "list", "actors", "--address", address, "--format", "json",
                           "--filter", f"class_name={class_name}", "--filter", "state=ALIVE", "--limit", "1000"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [] if proc.stdout.startswith("No resource") else json.loads(proc.stdout)
