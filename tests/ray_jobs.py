"""Ray job and cluster helpers for end-to-end tests that drive a real cluster the way a user does, with token
authentication on: jobs are submitted with the `ray` CLI in subprocesses (the in-process SDK caches the first auth
token it ever loaded); their status, logs, nodes and actors are read over the dashboard's HTTP APIs with the token.

- :class:`JobsApi`: one cluster's job status and logs over the Jobs REST API; :func:`wait_for_job`.
- :func:`submit_job`: ``ray job submit --working-dir <repo> --no-wait``, retried while the job agent registers.
- :func:`list_nodes`: every node the GCS knows (alive and dead), from the state API (``ray list nodes``).
- :func:`alive_actors`: the ALIVE actors of one class (``pid``, ``node_id``, ``job_id``), from the state API.
- :func:`registered_checkpoint`: the checkpoint Ray Train has registered for a run (what a restart resumes from).
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
import urllib.parse
import urllib.request
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


class JobsApi:
    """One cluster's job status and logs from Ray's Jobs REST API (``GET /api/jobs/<id>`` and ``.../logs``, what
    ``ray job status/logs`` call), with the cluster's token. Submitting stays the user's ``ray job submit``
    (:func:`submit_job`); the polls are HTTP because a ``ray`` CLI call costs ~1.6 CPU-s (it imports Ray), and a
    test polling it every 0.2-2 s took up to one of the two cores the cluster under test runs on."""

    def __init__(self, address: str, env: dict[str, str]) -> None:
        self.address, self.env = address, env

    def ready(self) -> bool:
        try:
            _get_json(self.address, self.env, "/api/jobs/")
        except OSError:
            return False
        return True

    def get_job_status(self, job_id: str) -> str:
        """``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED`` or ``STOPPED``; ``UNKNOWN: <why>`` when not answered."""
        try:
            return str(_get_json(self.address, self.env, f"/api/jobs/{job_id}")["status"])
        except OSError as exc:
            return f"UNKNOWN: {exc}"

    def get_job_logs(self, job_id: str) -> str:
        return str(_get_json(self.address, self.env, f"/api/jobs/{job_id}/logs")["logs"])


def _get_json(address: str, env: dict[str, str], path: str, params: list[tuple[str, str]] | None = None):
    """GET ``address + path`` (a Ray dashboard API) with the cluster's token (``Authorization: Bearer``)."""
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    request = urllib.request.Request(f"{address}{path}{query}")
    if env.get("RAY_AUTH_TOKEN"):
        request.add_header("Authorization", f"Bearer {env['RAY_AUTH_TOKEN']}")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _list_state(address: str, env: dict[str, str], resource: str,
                filters: tuple[tuple[str, str], ...] = ()) -> list[dict]:
    """Ray's state API (``GET /api/v0/<resource>``, what ``ray list <resource>`` calls), ``key=value`` filters."""
    params = [("limit", "1000"), ("detail", "false")]
    for key, value in filters:
        params += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
    answer = _get_json(address, env, f"/api/v0/{resource}", params)
    assert answer["result"], answer.get("msg")
    return answer["data"]["result"]["result"]


def wait_for_job(client: JobsApi, submission_id: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(client.get_job_status(submission_id))
        if status.endswith(("SUCCEEDED", "FAILED", "STOPPED")):
            return status
        time.sleep(0.5)
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
    return _list_state(address, env, "nodes")


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


def registered_checkpoint(run_uri: str) -> dict | None:
    """The latest checkpoint Ray Train's controller has REGISTERED for the run stored at ``run_uri`` (``--storage``
    / ``--run-name``): what a restarted group resumes from (``checkpoint_dir_name``, and ``metrics``: what the
    workers reported with it, ``step`` included); None before the first. Read from the checkpoint manager snapshot
    the controller writes into the run's storage on each registration. A checkpoint merely uploaded may not be
    registered yet: the controller collects one report per worker every 2 s (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``)
    and a worker's next report waits for the last one to be collected, so two can be uploaded before either is."""
    from pconv.storage import uris

    try:
        snapshot = json.loads(uris.read_bytes(f"{run_uri.rstrip('/')}/checkpoint_manager_snapshot.json"))
    except FileNotFoundError:
        return None
    return snapshot.get("latest_checkpoint_result")


def alive_actors(address: str, env: dict[str, str], class_name: str) -> list[dict]:
    """The ALIVE actors of ``class_name`` in the cluster, as Ray's state API knows them (``pid``, ``node_id``,
    ``job_id``, ``actor_id``): the processes Ray itself would call that actor, never a fork of one nor one exiting."""
    return _list_state(address, env, "actors", (("class_name", class_name), ("state", "ALIVE")))
