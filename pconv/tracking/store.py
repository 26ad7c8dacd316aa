"""Where MLflow lives and the one run of a training run: the tracking URI, a client, bounded retries.

- The tracking URI comes from ``MLFLOW_TRACKING_URI``; unset, an embedded SQLite store ``./mlflow.db`` is
  used with an ABSOLUTE path (Ray jobs run in temporary copies of the working dir) and the experiment gets an
  explicit absolute ``artifact_location`` next to the database. Without it, a SQLite store puts artifacts
  relative to the process's working dir, i.e. into Ray's temporary session folder, where they are lost.
- Exactly one MLflow run per training run: :func:`start_or_resume_run` reuses a run id stored in a checkpoint,
  else finds the run by name in the experiment, else creates it.
- :func:`call_with_retry` is the bounded exponential backoff every MLflow call of :mod:`pconv.tracking.runs` goes
  through. No global active-run state: every call uses an ``MlflowClient`` with an explicit run id.

Callers import these names from here; :mod:`pconv.tracking.runs` (metric names, params, the :class:`Tracker`) builds on
them.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, TypeVar

log = logging.getLogger(__name__)

DEFAULT_DB_FILE = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"
RUN_NAME_TAG = "pconv.run_name"

# MLflow error codes that will not go away on a retry (bad input, missing entity): warn once, no cooldown.
_PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                     "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED"}

T = TypeVar("T")
# ``scheme://user:password@`` or ``scheme://token@`` in a URI or in an error message that quotes one.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@\s:]*)(?P<pw>:[^/@\s]*)?@")


def redact_uri(text: str) -> str:
    """``text`` with every URI's credentials hidden: ``http://user:pw@host`` -> ``http://user:***@host``, a bare
    token (``http://token@host``) -> ``http://***@host``. Every URI this package logs or raises goes through it."""
    return _USERINFO.sub(lambda m: m["scheme"] + (f"{m['user']}:***@" if m["pw"] is not None else "***@"), str(text))


# ---------------------------------------------------------------------------------------------
# Where to log
# ---------------------------------------------------------------------------------------------
def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: ``uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<abs>/mlflow.db``.

    Relative SQLite paths are made absolute against the current working dir, so that a URI resolved on the
    driver still points at the same database from a Ray worker whose working dir is a temporary copy.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        return f"sqlite:///{Path(DEFAULT_DB_FILE).resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///"):]
        if rel and rel != ":memory:":
            return f"sqlite:///{Path(rel).resolve()}"
    return uri


def default_artifact_location(tracking_uri: str) -> str | None:
    """An explicit artifact root for database-backed stores (an absolute folder next to the db).

    For a tracking server (``http(s)://``) this returns ``None``: the server's default (``mlflow-artifacts:``,
    proxied to its artifact destination) is the right place.
    """
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / DEFAULT_ARTIFACT_DIR).resolve().as_uri()
    return None


def _configure_http_defaults() -> None:
    """Bound MLflow's own HTTP retries (default: 7 retries, factor 2 = minutes per call when a server is down).

    Only fills values the user did not set; our own retry loop in :class:`pconv.tracking.runs.Tracker` does the backoff.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


def client_for(tracking_uri: str | None = None):
    """An ``MlflowClient`` bound to the resolved URI (registry on the same store)."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("http"):
        _configure_http_defaults()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# ---------------------------------------------------------------------------------------------
# Retry policy
# ---------------------------------------------------------------------------------------------
@dataclass
class RetryPolicy:
    """Bounded exponential backoff: ``attempts`` tries, sleeping ``initial_s * 2**i`` (capped at ``max_s``)
    between them, never longer than ``max_total_s`` overall; after a final failure, calls are dropped for
    ``cooldown_s`` seconds. ``PCONV_MLFLOW_RETRY="attempts,initial_s,max_total_s,cooldown_s"`` overrides."""

    attempts: int = 4
    initial_s: float = 1.0
    max_s: float = 8.0
    max_total_s: float = 30.0
    cooldown_s: float = 60.0

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        raw = os.environ.get("PCONV_MLFLOW_RETRY", "").strip()
        if not raw:
            return cls()
        try:
            attempts, initial_s, max_total_s, cooldown_s = (float(x) for x in raw.split(","))
        except ValueError:
            raise ValueError(f"PCONV_MLFLOW_RETRY must be 'attempts,initial_s,max_total_s,cooldown_s', got {raw!r}")
        return cls(attempts=max(1, int(attempts)), initial_s=initial_s, max_s=max(initial_s, 8.0),
                   max_total_s=max_total_s, cooldown_s=cooldown_s)


def is_permanent(exc: BaseException) -> bool:
    """True for MLflow errors a retry will not fix (bad input, missing entity): no retry, no cooldown."""
    code = getattr(exc, "error_code", None)
    return code in _PERMANENT_ERRORS


def call_with_retry(fn: Callable[[], T], what: str, policy: RetryPolicy) -> T:
    """Run ``fn`` with the policy's backoff; re-raise the last error (callers decide whether to swallow it)."""
    start = time.monotonic()
    delay = policy.initial_s
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types (MlflowException, requests, OSError)
            if is_permanent(exc) or attempt == policy.attempts:
                raise
            remaining = policy.max_total_s - (time.monotonic() - start)
            if remaining <= 0:
                raise
            sleep = min(delay, policy.max_s, remaining)
            log.info("MLflow %s failed (attempt %d/%d: %s); retrying in %.1fs", what, attempt, policy.attempts,
                     short_error(exc), sleep)
            time.sleep(sleep)
            delay *= 2
    raise AssertionError("unreachable")


def short_error(exc: BaseException, limit: int = 300) -> str:
    """``Type: message``, cut to ``limit`` characters, for one-line warnings."""
    text = redact_uri(f"{type(exc).__name__}: {exc}")
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
def get_or_create_experiment(client, name: str, tracking_uri: str) -> str:
    """Experiment id by name; created with an explicit artifact location for database-backed stores."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri))
    except Exception as exc:  # a concurrent creator won the race
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise exc
        return exp.experiment_id


def _find_run_by_name(client, experiment_id: str, run_name: str):
    from mlflow.entities import ViewType

    if "'" in run_name or "`" in run_name:  # cannot be quoted safely in a filter: filter on the client side
        runs = client.search_runs([experiment_id], run_view_type=ViewType.ACTIVE_ONLY, order_by=["start_time ASC"])
        runs = [r for r in runs if r.data.tags.get(RUN_NAME_TAG, r.info.run_name) == run_name]
        return runs[0] if runs else None
    for flt in (f"tags.`{RUN_NAME_TAG}` = '{run_name}'", f"attributes.run_name = '{run_name}'"):
        runs = client.search_runs([experiment_id], filter_string=flt, run_view_type=ViewType.ACTIVE_ONLY,
                                  order_by=["start_time ASC"], max_results=1)
        if runs:
            return runs[0]
    return None


def start_or_resume_run(experiment: str, run_name: str, run_id: str | None = None,
                        tags: Mapping[str, str] | None = None, tracking_uri: str | None = None,
                        policy: RetryPolicy | None = None, mark_running: bool = True) -> str | None:
    """The one MLflow run of a training run: ``run_id`` if it exists, else the run named ``run_name`` in
    ``experiment``, else a new one. The run is (re)marked RUNNING unless ``mark_running=False`` (e.g. when
    registering a model from a finished run). Returns ``None`` with a warning when the tracking server cannot be
    reached after retries, so training can go on untracked."""
    uri = resolve_tracking_uri(tracking_uri)
    policy = policy or RetryPolicy.from_env()

    def attempt() -> str:
        client = client_for(uri)
        if run_id:
            try:
                run = client.get_run(run_id)
            except Exception as exc:
                if not is_permanent(exc):
                    raise
                log.warning("MLflow run %s from the checkpoint does not exist on %s; looking it up by name %r",
                            run_id, redact_uri(uri), run_name)
            else:
                if run.info.lifecycle_stage == "deleted":
                    client.restore_run(run_id)
                if mark_running:
                    _mark_running(client, run)
                return run_id
        exp_id = get_or_create_experiment(client, experiment, uri)
        run = _find_run_by_name(client, exp_id, run_name)
        if run is not None:
            if mark_running:
                _mark_running(client, run)
            log.info("resuming MLflow run %s (%s) in experiment %r", run.info.run_id, run_name, experiment)
            return run.info.run_id
        all_tags = {RUN_NAME_TAG: run_name, **{k: str(v) for k, v in (tags or {}).items()}}
        run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
        log.info("created MLflow run %s (%s) in experiment %r", run.info.run_id, run_name, experiment)
        return run.info.run_id

    try:
        return call_with_retry(attempt, "start_or_resume_run", policy)
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow tracking at %s is unavailable (%s); training continues WITHOUT tracking",
                    redact_uri(uri), short_error(exc))
        return None


def _mark_running(client, run) -> None:
    if run.info.status != "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")


__all__ = ["RUN_NAME_TAG", "RetryPolicy", "call_with_retry", "client_for", "default_artifact_location",
           "get_or_create_experiment", "is_permanent", "redact_uri", "resolve_tracking_uri", "short_error",
           "start_or_resume_run"]
