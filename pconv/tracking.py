"""MLflow tracking for training runs: one run per training run, retrying logging, sample grids.

Design points (issue 5):

- The tracking URI comes from ``MLFLOW_TRACKING_URI``; unset, an embedded SQLite store ``./mlflow.db`` is
  used with an ABSOLUTE path (Ray jobs run in temporary copies of the working dir) and the experiment gets an
  explicit absolute ``artifact_location`` next to the database. Without it, a SQLite store puts artifacts
  relative to the process's working dir, i.e. into Ray's temporary session folder, where they are lost.
- Exactly one MLflow run per training run: :func:`start_or_resume_run` reuses a run id stored in a checkpoint,
  else finds the run by name in the experiment, else creates it.
- Logging never stops training: every :class:`Tracker` call retries with bounded exponential backoff and, on
  final failure, warns and returns. After a failure the tracker "cools down" (drops calls without touching the
  network, counting them) so a dead server costs one bounded stall, not one per step.
- No global active-run state: every call goes through ``MlflowClient`` with an explicit run id, because the
  training workers are long-lived and may log from several threads.

Model logging and the registry live in :mod:`pconv.registry`.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "pconv-inpainting"
DEFAULT_DB_FILE = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"
RUN_NAME_TAG = "pconv.run_name"
SAMPLE_GRID_MAX_ROWS = 8

# MLflow's own limits (mlflow.utils.validation); kept here so we truncate instead of failing the batch.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# MLflow error codes that will not go away on a retry (bad input, missing entity): warn once, no cooldown.
_PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                     "BAD_REQUEST", "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED"}

T = TypeVar("T")


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

    Only fills values the user did not set; our own retry loop in :class:`Tracker` does the backoff.
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


def _is_permanent(exc: BaseException) -> bool:
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
            if _is_permanent(exc) or attempt == policy.attempts:
                raise
            remaining = policy.max_total_s - (time.monotonic() - start)
            if remaining <= 0:
                raise
            sleep = min(delay, policy.max_s, remaining)
            log.info("MLflow %s failed (attempt %d/%d: %s); retrying in %.1fs", what, attempt, policy.attempts,
                     _short(exc), sleep)
            time.sleep(sleep)
            delay *= 2
    raise AssertionError("unreachable")


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
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
                if not _is_permanent(exc):
                    raise
                log.warning("MLflow run %s from the checkpoint does not exist on %s; looking it up by name %r",
                            run_id, uri, run_name)
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
        log.warning("MLflow tracking at %s is unavailable (%s); training continues WITHOUT tracking", uri,
                    _short(exc))
        return None


def _mark_running(client, run) -> None:
    if run.info.status != "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")


# ---------------------------------------------------------------------------------------------
# Params
# ---------------------------------------------------------------------------------------------
def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys (``{"versions": {"torch": ..}}`` -> ``versions.torch``)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{full}."))
        else:
            out[full] = value
    return out


def git_commit(path: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the source tree (``+dirty`` when it has local changes); None without git."""
    cwd = str(path or Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_params(config: Any, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything a run's params should hold: the full resolved config, package versions, the git commit,
    and what the caller knows about the cluster (``extra``, e.g. ``{"cluster.workers": 4, "cluster.gpu": "H100"}``).
    """
    from pconv.checkpoint import versions

    if hasattr(config, "resolved"):
        config = config.resolved()
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    params: dict[str, Any] = dict(cfg)
    params.update({f"versions.{k}": v for k, v in versions().items()})
    params["git_commit"] = git_commit() or "unknown"
    params.update(flatten(dict(extra or {})))
    return params


def _param_value(value: Any) -> str:
    text = "None" if value is None else str(value)
    return text if len(text) <= MAX_PARAM_VALUE_LENGTH else text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Sample grids
# ---------------------------------------------------------------------------------------------
def _to_hwc(x: Any) -> np.ndarray:
    """N×C×H×W tensor/array in [0, 1] -> float32 numpy N×H×W×3."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"sample grid inputs must be N×C×H×W, got shape {arr.shape}")
    if arr.shape[1] == 1:
        arr = np.repeat(arr, 3, axis=1)
    if arr.shape[1] != 3:
        raise ValueError(f"sample grid inputs must have 1 or 3 channels, got shape {arr.shape}")
    return np.clip(arr.transpose(0, 2, 3, 1), 0.0, 1.0)


def make_sample_grid(masked: Any, mask: Any, output: Any, comp: Any, gt: Any, border: int = 2,
                     max_rows: int = SAMPLE_GRID_MAX_ROWS) -> np.ndarray:
    """uint8 H×W×3 grid, one row per pair, columns: masked input | mask | output | composite | ground truth.

    The mask column is shown in the internal polarity: white = valid, black = hole.
    """
    cols = [_to_hwc(t) for t in (masked, mask, output, comp, gt)]
    n, h, w, _ = cols[0].shape
    if any(c.shape != (n, h, w, 3) for c in cols):
        raise ValueError(f"sample grid inputs disagree in shape: {[c.shape for c in cols]}")
    n = min(n, max_rows)
    grid = np.ones((n * h + (n + 1) * border, 5 * w + 6 * border, 3), dtype=np.float32)
    for r in range(n):
        for c, col in enumerate(cols):
            y, x = border + r * (h + border), border + c * (w + border)
            grid[y:y + h, x:x + w] = col[r]
    return (grid * 255.0 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The tracker
# ---------------------------------------------------------------------------------------------
class Tracker:
    """Logging into ONE MLflow run by id. Every method retries, then warns and returns: it never raises.

    ``Tracker.disabled()`` (or ``run_id=None``) gives a no-op tracker that is falsy, so ``if tracker:`` guards
    optional work such as building sample grids.
    """

    def __init__(self, run_id: str | None, tracking_uri: str | None = None, policy: RetryPolicy | None = None):
        self.run_id = run_id
        self.tracking_uri = resolve_tracking_uri(tracking_uri) if run_id else None
        self.policy = policy or RetryPolicy.from_env()
        self.failures = 0     # calls that gave up after retries
        self.dropped = 0      # calls skipped during a cooldown
        self._down_until = 0.0
        self._client = None
        self._lock = threading.Lock()
        self._logged_params: dict[str, str] | None = None

    @classmethod
    def disabled(cls) -> "Tracker":
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def __bool__(self) -> bool:
        return self.enabled

    def __repr__(self) -> str:
        return f"Tracker(run_id={self.run_id!r}, tracking_uri={self.tracking_uri!r})"

    # -- plumbing ---------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.tracking_uri)
        return self._client

    def _call(self, what: str, fn: Callable[[], T]) -> T | None:
        if not self.enabled:
            return None
        now = time.monotonic()
        if now < self._down_until:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("MLflow unavailable: dropped %s (%d calls dropped so far; retrying in %.0fs)", what,
                            self.dropped, self._down_until - now)
            return None
        try:
            with self._lock:
                return call_with_retry(fn, what, self.policy)
        except Exception as exc:  # noqa: BLE001 - logging must never stop training
            self.failures += 1
            if not _is_permanent(exc):
                self._down_until = time.monotonic() + self.policy.cooldown_s
            log.warning("MLflow %s failed for run %s after retries; continuing without it: %s", what, self.run_id,
                        _short(exc))
            return None

    # -- API ----------------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flattened params, values truncated to MLflow's limit. On resume, keys already logged with the same
        value are skipped; keys logged with a DIFFERENT value (params are immutable) are recorded as tags
        ``param_changed.<key>`` instead, with a warning."""
        if not self.enabled:
            return
        from mlflow.entities import Param, RunTag

        flat = {k[:MAX_KEY_LENGTH]: _param_value(v) for k, v in flatten(dict(params)).items()}

        def do() -> None:
            existing = self.client.get_run(self.run_id).data.params
            new = {k: v for k, v in flat.items() if k not in existing}
            changed = {k: v for k, v in flat.items() if k in existing and existing[k] != v}
            if changed:
                log.warning("params changed since this MLflow run started (kept as param_changed.* tags): %s",
                            ", ".join(sorted(changed)))
            items = list(new.items())
            for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + MAX_PARAMS_PER_BATCH]])
            tags = [RunTag(f"param_changed.{k}"[:MAX_KEY_LENGTH], v) for k, v in changed.items()]
            for i in range(0, len(tags), MAX_PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, tags=tags[i:i + MAX_PARAMS_PER_BATCH])

        self._call("log_params", do)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Numeric metrics at ``step``; non-numeric values are skipped with a warning (never the whole batch)."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            try:
                number = float(value.item() if hasattr(value, "item") else value)
            except (TypeError, ValueError):
                log.warning("metric %r has non-numeric value %r; not logged", key, value)
                continue
            if not math.isfinite(number):
                log.warning("metric %r is %s at step %s", key, number, step)
            batch.append(Metric(key[:MAX_KEY_LENGTH], number, ts, int(step or 0)))
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            chunk = batch[i:i + MAX_METRICS_PER_BATCH]
            self._call("log_metrics", lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        items = [RunTag(str(k)[:MAX_KEY_LENGTH], str(v)) for k, v in tags.items()]
        self._call("set_tags", lambda: self.client.log_batch(self.run_id, tags=items))

    def log_image(self, image: Any, artifact_file: str) -> None:
        """An H×W×3 array (uint8, or float in [0, 1]) as an image artifact (PNG by the file's suffix)."""
        if not self.enabled:
            return
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
        self._call(f"log_image {artifact_file}", lambda: self.client.log_image(self.run_id, arr, artifact_file))

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        if self.enabled:
            self._call(f"log_figure {artifact_file}",
                       lambda: self.client.log_figure(self.run_id, figure, artifact_file))

    def log_sample_grid(self, masked: Any, mask: Any, output: Any, comp: Any, gt: Any, step: int) -> None:
        """The fixed validation pairs as ``samples/step_000123.png``: masked | mask | output | composite | gt."""
        if not self.enabled:
            return
        try:
            grid = make_sample_grid(masked, mask, output, comp, gt)
        except ValueError as exc:
            log.warning("sample grid at step %d not logged: %s", step, exc)
            return
        self.log_image(grid, f"samples/step_{int(step):06d}.png")

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._call(f"log_text {artifact_file}", lambda: self.client.log_text(self.run_id, text, artifact_file))

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        if self.enabled:
            self._call(f"log_dict {artifact_file}",
                       lambda: self.client.log_dict(self.run_id, dict(data), artifact_file))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._call(f"log_artifact {local_path}",
                       lambda: self.client.log_artifact(self.run_id, str(local_path), artifact_path))

    def set_terminated(self, status: str = "FINISHED") -> None:
        """End the run (``FINISHED``, ``FAILED`` or ``KILLED``); a resumed run is set RUNNING again."""
        if self.enabled:
            self._call("set_terminated", lambda: self.client.set_terminated(self.run_id, status=status))


def log_and_register_model(model: Any, config: Any, run_id: str | None, name: str | None = "pconv-unet",
                           alias: str | None = "candidate", checkpoint_dir: str | Path | None = None,
                           **kwargs: Any) -> str | None:
    """Log the model with MLflow's PyTorch flavour and register it; see :func:`pconv.registry.log_and_register_model`."""
    from pconv.registry import log_and_register_model as _impl

    return _impl(model, config, run_id, name=name, alias=alias, checkpoint_dir=checkpoint_dir, **kwargs)


__all__ = ["DEFAULT_EXPERIMENT", "log_and_register_model", "RUN_NAME_TAG", "RetryPolicy", "Tracker", "call_with_retry", "client_for",
           "default_artifact_location", "flatten", "get_or_create_experiment", "git_commit", "make_sample_grid",
           "resolve_tracking_uri", "run_params", "start_or_resume_run"]
