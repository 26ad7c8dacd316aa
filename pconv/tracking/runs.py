"""MLflow tracking of training runs: the metric names (the one list), run params, sample grids, and the
:class:`Tracker` that logs into one run.

- Logging never stops training, and a tracking outage is never silent. Metrics go through a bounded queue that one
  background thread per :class:`Tracker` sends, so a training step never waits on MLflow; while the server is down
  the queue keeps them and they reach the run with their original steps and timestamps when it returns. What could
  not be sent is counted in the run's tags :data:`METRICS_LOST_TAG` and :data:`ARTIFACTS_LOST_TAG` (and
  :data:`METRICS_LATE_TAG` counts what arrived late). Every other call retries with bounded exponential backoff
  and, on final failure, warns and returns; after a failure the tracker "cools down" (drops calls without touching
  the network, counting them) so a dead server costs one bounded stall, not one per step.
- Metric names are defined here only (``loss/<term>``, ``val/<term>``, ``lr``, ``phase``, ...; the loss terms
  themselves are :data:`pconv.core.losses.LOSS_TERMS`). Sample grids are drawn by :func:`grid_image`
  (``torchvision.utils.make_grid``) and logged with a key and a step, so MLflow's image slider shows the fills
  improving over training.
- Where MLflow lives, the retry policy and the one run per training run are :mod:`pconv.tracking.store`
  (:func:`~pconv.tracking.store.resolve_tracking_uri`, :func:`~pconv.tracking.store.client_for`,
  :func:`~pconv.tracking.store.start_or_resume_run`, ...): import them from there.

Model logging and the registry live in :mod:`pconv.tracking.registry`.
"""

from __future__ import annotations

import logging
import math
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from pconv.tracking.store import (RetryPolicy, call_with_retry, client_for, is_permanent, redact_uri,
                                  resolve_tracking_uri, short_error)

log = logging.getLogger(__name__)

# MLflow metric names: the one list (../shared/ARCHITECTURE.md, "Contracts").
LR = "lr"
PHASE = "phase"
EPOCH = "epoch"
THROUGHPUT = "throughput/images_per_s"
DATA_WAIT = "data/wait_fraction"
DATA_SKIPPED = "data/skipped"
EPOCH_UNUSED = "data/epoch_unused"  # train rows an epoch left unused (its ranks' tails past the last full step)
NAN_STEPS = "train/nan_steps"
WORLD_SIZE = "train/world_size"  # workers in the group at a step (elastic runs: it changes)
SAMPLES_KEY = "samples"  # image key of the validation sample grids (one image per logged step)


def loss_metric(term: str) -> str:
    """Training metric of a loss term (a name in :data:`pconv.core.losses.LOSS_TERMS`): ``loss/<term>``."""
    return f"loss/{term}"


def val_metric(term: str) -> str:
    """Validation metric: ``val/<term>`` for a loss term, :data:`VAL_PSNR` and :data:`VAL_SSIM`."""
    return f"val/{term}"


VAL_PSNR = val_metric("psnr")
VAL_SSIM = val_metric("ssim")

SAMPLE_GRID_MAX_ROWS = 8

# MLflow's own limits (mlflow.utils.validation); kept here so we truncate instead of failing the batch.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

# Run tags that say what a tracking outage cost the run (added up over every Tracker that closes on the run).
METRICS_LOST_TAG = "pconv.metrics_lost"            # metric points that never reached the run
METRICS_LATE_TAG = "pconv.metrics_sent_late"       # metric points that waited out an outage in the queue, then arrived
ARTIFACTS_LOST_TAG = "pconv.artifacts_lost"        # images, figures, text and files that never reached the run
# Metric points a Tracker holds while MLflow is down: ~160 bytes each, so ~30 MB at most; at log_every=1 and ~15
# metrics per step that is ~13,000 steps of outage. Beyond it the oldest points are dropped and counted lost.
METRIC_QUEUE_POINTS = 200_000
CLOSE_TIMEOUT_S = 60.0  # how long close() waits for MLflow to take the queued metrics before counting them lost
_DOWN_WARN_EVERY_S = 60.0

T = TypeVar("T")


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


def run_params(config: Any, extra: Mapping[str, Any] | None = None,
               versions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything a run's params should hold: the full resolved config, the package ``versions`` the caller
    records (``versions.<package>``), the git commit, and what the caller knows about the cluster (``extra``,
    e.g. ``{"cluster.workers": 4, "cluster.gpu": "H100"}``).
    """
    if hasattr(config, "resolved"):
        config = config.resolved()
    params: dict[str, Any] = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    params.update({f"versions.{k}": v for k, v in (versions or {}).items()})
    params["git_commit"] = git_commit() or "unknown"
    params.update(flatten(dict(extra or {})))
    return params


def _param_value(value: Any) -> str:
    text = "None" if value is None else str(value)
    return text if len(text) <= MAX_PARAM_VALUE_LENGTH else text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Sample grids
# ---------------------------------------------------------------------------------------------
def grid_image(columns: Sequence[Any], nrow_is_batch: bool = True, border: int = 2) -> np.ndarray:
    """One picture of several image batches: uint8 H×W×3, white ``border`` px between the tiles.

    ``columns``: N×C×H×W tensors or arrays in [0, 1] (C = 3, or 1 for masks, shown white = valid), all the same
    size, e.g. ``[masked, output, composite, truth]``. With ``nrow_is_batch`` each row of the grid is one sample
    and each column one of the inputs; otherwise each row is one input.
    """
    import torch
    from torchvision.utils import make_grid

    tiles = [c.detach().float().cpu() if hasattr(c, "detach") else torch.as_tensor(np.asarray(c, np.float32))
             for c in columns]
    tiles = [t.expand(-1, 3, -1, -1) if t.dim() == 4 and t.shape[1] == 1 else t for t in tiles]
    if not tiles or any(t.dim() != 4 or t.shape[1] != 3 or t.shape != tiles[0].shape for t in tiles):
        raise ValueError(f"grid inputs must be N×3×H×W (or N×1×H×W masks) of one size; they disagree: "
                         f"{[tuple(t.shape) for t in tiles]}")
    stacked = torch.stack(tiles, dim=1 if nrow_is_batch else 0)  # rows × columns × 3 × H × W
    grid = make_grid(stacked.flatten(0, 1), nrow=stacked.shape[1], padding=border, pad_value=1.0)
    if stacked.shape[0] * stacked.shape[1] == 1:  # make_grid returns a single tile as it is, without a border
        grid = torch.nn.functional.pad(grid, [border] * 4, value=1.0)
    return (grid.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------------------------
# The tracker
# ---------------------------------------------------------------------------------------------
class Tracker:
    """Logging into ONE MLflow run by id. No method raises; no method makes a training step wait on a down server.

    ``Tracker.disabled()`` (or ``run_id=None``) gives a no-op tracker that is falsy, so ``if tracker:`` guards
    optional work such as building sample grids.

    Guarantees (a tracking server that goes away mid-training must neither stop training nor lose data silently):

    - **Metrics** (:meth:`log_metrics`) are put on an in-memory queue and return at once; one background thread per
      tracker sends them in batches, in order, each point with the step and the wall-clock timestamp it was logged
      with. When MLflow is unreachable the thread keeps the batch and tries again with the retry policy's backoff
      (``initial_s`` doubling up to ``max_s``) for as long as it takes, so points logged during an outage reach the
      run when the server returns, with their original steps and timestamps. The queue holds at most
      ``max_queued_points`` (:data:`METRIC_QUEUE_POINTS`); beyond that the OLDEST points are dropped, with a
      warning, and counted lost. A batch MLflow rejects as invalid (a permanent error) is counted lost too.
    - :meth:`flush` waits (bounded) until the queue is sent, but returns at once while the server is known to be
      down: the training loop calls it before reporting a checkpoint, so a checkpoint's metrics are in the run
      before a restarted worker could lose them, yet an outage costs no stall.
    - :meth:`close` (the training loop at its end; :meth:`set_terminated` does it first) waits up to ``timeout_s``
      for the queue to be sent, then counts what is still unsent as lost, and adds this tracker's counts to the
      run's tags :data:`METRICS_LOST_TAG`, :data:`METRICS_LATE_TAG` and :data:`ARTIFACTS_LOST_TAG` (read, added,
      written: several trackers on one run add up), with a warning when anything was lost. Where even that tag
      cannot be written, an error log says what was lost. The tracker stays usable after it (a new sender starts).
    - **Other calls** (params, images, figures, text, files, listings, the final status) are synchronous: each is
      retried with the :class:`~pconv.tracking.store.RetryPolicy`, then warns and returns; after a final failure,
      calls are dropped (counted in ``dropped``) for ``cooldown_s``. While the metric sender knows the server is
      down, they are dropped at once instead of being retried, so an image logged mid-outage costs no stall. An
      image, figure, text or dict that is not logged is counted in :data:`ARTIFACTS_LOST_TAG`; a file
      (:meth:`log_file`) is not, since its caller keeps it to send again and reports it with
      :meth:`count_lost_artifacts` if it never arrives.
    - Every method may be called from any thread. A worker that dies without :meth:`close` (killed, crashed) loses
      what is still queued without a tag: the loop's :meth:`flush` at each checkpoint bounds that to the steps
      since the last checkpoint, as for the checkpoint itself.

    Counters: ``failures`` (calls that gave up after retries), ``dropped`` (calls skipped without trying),
    ``metrics_sent``, ``metrics_late`` (sent after waiting out an outage), ``metrics_lost`` and ``artifacts_lost``
    (totals over the tracker's life; the tags get what each :meth:`close` adds).
    """

    def __init__(self, run_id: str | None, tracking_uri: str | None = None, policy: RetryPolicy | None = None,
                 max_queued_points: int = METRIC_QUEUE_POINTS):
        self.run_id = run_id
        self.tracking_uri = resolve_tracking_uri(tracking_uri) if run_id else None
        self.policy = policy or RetryPolicy.from_env()
        self.max_queued_points = max(1, int(max_queued_points))
        self.failures = 0     # calls that gave up after retries
        self.dropped = 0      # calls skipped during a cooldown or a known outage
        self.metrics_sent = 0
        self.metrics_late = 0
        self.metrics_lost = 0
        self.artifacts_lost = 0
        self._down_until = 0.0
        self._client = None
        self._lock = threading.Lock()  # one synchronous call at a time
        # The metric queue and everything the sender shares with the callers, under one condition.
        self._cond = threading.Condition()
        self._queue: deque[tuple[str, float, int, int, str | None]] = deque()  # key, value, timestamp ms, step, model
        self._in_flight = 0          # points the sender has taken and not yet sent or given up
        self._sender: threading.Thread | None = None
        self._give_up = False        # close(): stop retrying, count the rest lost
        self._down_since: float | None = None  # monotonic time of the first failed send of the current outage
        self._last_down_warning = 0.0
        self._recovered_ms = 0       # wall-clock ms of the last end of an outage: points logged before it were late
        self._metrics_logged = 0     # points enqueued since the last close()
        self._reported = (0, 0, 0)   # (lost, late, artifacts lost) already added to the run's tags

    @classmethod
    def disabled(cls) -> "Tracker":
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def __bool__(self) -> bool:
        return self.enabled

    def __repr__(self) -> str:
        return f"Tracker(run_id={self.run_id!r}, tracking_uri={redact_uri(self.tracking_uri or '')!r})"

    # -- plumbing ---------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.tracking_uri)
        return self._client

    @property
    def queued_metrics(self) -> int:
        """Metric points logged and not yet sent (queued or in flight)."""
        with self._cond:
            return len(self._queue) + self._in_flight

    @property
    def server_down(self) -> bool:
        """True while the metric sender's last try failed (it keeps retrying)."""
        with self._cond:
            return self._down_since is not None

    def _call(self, what: str, fn: Callable[[], T], artifact: bool = False, final: bool = False) -> T | None:
        """A synchronous call with the retry policy; ``artifact``: count it in ``artifacts_lost`` when it is not
        made; ``final``: a call of :meth:`close` / :meth:`set_terminated`, tried even during a known outage."""
        if not self.enabled:
            return None
        now = time.monotonic()
        known_down = self.server_down and not final
        if now < self._down_until or known_down:
            with self._cond:
                self.dropped += 1
                self.artifacts_lost += int(artifact)
                dropped = self.dropped
            if dropped == 1 or dropped % 100 == 0:
                log.warning("MLflow unavailable: dropped %s (%d calls dropped so far; %s)", what, dropped,
                            "the metric sender is retrying" if known_down else
                            f"retrying in {self._down_until - now:.0f}s")
            return None
        try:
            with self._lock:
                return call_with_retry(fn, what, self.policy)
        except Exception as exc:  # noqa: BLE001 - logging must never stop training
            with self._cond:
                self.failures += 1
                self.artifacts_lost += int(artifact)
            if not is_permanent(exc):
                self._down_until = time.monotonic() + self.policy.cooldown_s
            log.warning("MLflow %s failed for run %s after retries; continuing without it: %s", what, self.run_id,
                        short_error(exc))
            return None

    def _enqueue(self, points: list[tuple[str, float, int, int, str | None]]) -> None:
        with self._cond:
            self._queue.extend(points)
            self._metrics_logged += len(points)
            over = len(self._queue) - self.max_queued_points
            for _ in range(max(0, over)):
                self._queue.popleft()
            if over > 0:
                before = self.metrics_lost
                self.metrics_lost += over
                if before == 0 or before // 10_000 != self.metrics_lost // 10_000:
                    log.warning("MLflow metric queue full (%d points): dropped the %d oldest (%d lost so far)",
                                self.max_queued_points, over, self.metrics_lost)
            if self._sender is None or not self._sender.is_alive():
                self._give_up = False
                self._sender = threading.Thread(target=self._send_forever, name=f"mlflow-metrics-{self.run_id}",
                                                daemon=True)
                self._sender.start()
            self._cond.notify_all()

    def _send_forever(self) -> None:
        """The sender thread: batches off the queue, each retried until it is sent, rejected or given up."""
        from mlflow.entities import Metric

        client = client_for(self.tracking_uri)  # its own client: the training thread's calls never wait on it
        while True:
            with self._cond:
                while not self._queue and not self._give_up:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_METRICS_PER_BATCH))]
                self._in_flight = len(batch)
            delay = self.policy.initial_s
            while True:
                try:
                    client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step, model_id=model)
                                                           for k, v, ts, step, model in batch])
                except Exception as exc:  # noqa: BLE001 - the sender must outlive any error
                    if is_permanent(exc):
                        with self._cond:
                            self.metrics_lost += len(batch)
                        log.warning("MLflow rejected %d metric points for run %s (counted lost): %s", len(batch),
                                    self.run_id, short_error(exc))
                        break
                    with self._cond:
                        now = time.monotonic()
                        if self._down_since is None:
                            self._down_since = self._last_down_warning = now
                            log.warning("MLflow is unreachable (%s); training goes on, metrics wait in a queue "
                                        "(%d points, at most %d) and are sent when it answers again",
                                        short_error(exc), len(self._queue) + len(batch), self.max_queued_points)
                        elif now - self._last_down_warning >= _DOWN_WARN_EVERY_S:
                            self._last_down_warning = now
                            log.warning("MLflow still unreachable after %.0f s: %d metric points queued",
                                        now - self._down_since, len(self._queue) + len(batch))
                        if self._give_up:
                            self.metrics_lost += len(batch)
                            break
                        self._cond.wait(min(delay, self.policy.max_s))
                        delay *= 2
                        if self._give_up:  # close() ran out of time while this batch waited
                            self.metrics_lost += len(batch)
                            break
                    continue
                with self._cond:
                    self.metrics_sent += len(batch)
                    if self._down_since is not None:
                        self._recovered_ms = int(time.time() * 1000)
                        log.warning("MLflow answers again after %.0f s: sending the %d queued metric points",
                                    time.monotonic() - self._down_since, len(self._queue) + len(batch))
                        self._down_since = None
                    self.metrics_late += sum(1 for point in batch if point[2] <= self._recovered_ms)
                break
            with self._cond:
                self._in_flight = 0
                self._cond.notify_all()

    # -- API ----------------------------------------------------------------------------------------
    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every metric point logged so far is sent (True), at most ``timeout_s`` seconds (default: the
        retry policy's ``max_total_s``). Returns False at once while the server is known to be down: the points stay
        queued and are sent when it returns, and the caller does not stall."""
        deadline = time.monotonic() + (self.policy.max_total_s if timeout_s is None else timeout_s)
        with self._cond:
            while self._queue or self._in_flight:
                left = deadline - time.monotonic()
                if self._down_since is not None or left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
            return True

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """End of logging: wait up to ``timeout_s`` for the queued metrics (through an outage), count what is still
        unsent as lost, stop the sender, and add this tracker's losses and late points to the run's tags, with a
        warning when anything was lost. Idempotent; the tracker can log again afterwards."""
        if not self.enabled:
            return
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (self._queue or self._in_flight) and time.monotonic() < deadline:
                self._cond.wait(min(deadline - time.monotonic(), 1.0))
            unsent = len(self._queue)
            self._queue.clear()
            self.metrics_lost += unsent
            self._give_up = True
            self._cond.notify_all()
            sender = self._sender
        if sender is not None:
            sender.join(timeout=max(1.0, self.policy.max_s))  # a batch still in a request: its own timeout
        with self._cond:
            if self._in_flight:  # still inside an HTTP request: not known to arrive
                self.metrics_lost += self._in_flight
                self._in_flight = 0
            lost, late, artifacts = self.metrics_lost, self.metrics_late, self.artifacts_lost
            new = (lost - self._reported[0], late - self._reported[1], artifacts - self._reported[2])
            logged, self._metrics_logged = self._metrics_logged, 0
        if new[0] or new[2]:
            log.warning("MLflow run %s: %d metric point(s) and %d artifact(s) never reached it (counted in its tags "
                        "%s and %s)", self.run_id, new[0], new[2], METRICS_LOST_TAG, ARTIFACTS_LOST_TAG)
        if new[1]:
            log.warning("MLflow run %s: %d metric point(s) arrived late, after an outage, with their original steps "
                        "and timestamps", self.run_id, new[1])
        if not (logged or any(new)):
            return
        if self._add_to_tags(dict(zip((METRICS_LOST_TAG, METRICS_LATE_TAG, ARTIFACTS_LOST_TAG), new))):
            self._reported = (lost, late, artifacts)
        else:
            log.error("MLflow run %s: its loss tags could not be written; this tracker lost %d metric point(s) and "
                      "%d artifact(s), and sent %d point(s) late", self.run_id, new[0], new[2], new[1])

    def _add_to_tags(self, counts: Mapping[str, int]) -> bool:
        """Add ``counts`` to the run's counter tags (read, add, write; tags that are missing count as 0)."""
        from mlflow.entities import RunTag

        def do() -> bool:
            tags = self.client.get_run(self.run_id).data.tags
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(int(tags.get(k, "0") or 0) + n))
                                                     for k, n in counts.items()])
            return True

        return self._call("set loss tags", do, final=True) is True

    def count_lost_artifacts(self, count: int, what: str) -> None:
        """A caller that kept artifacts to resend (:meth:`log_file`) reports the ``count`` that never arrived
        (``what`` names them in the log); :meth:`close` adds them to :data:`ARTIFACTS_LOST_TAG`."""
        if count > 0:
            with self._cond:
                self.artifacts_lost += count
            log.warning("MLflow run %s: %d artifact(s) never arrived: %s", self.run_id, count, what)

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

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, model_id: str | None = None) -> None:
        """Numeric metrics at ``step``, queued for the sender thread (returns at once; see the class docstring);
        non-numeric values are skipped with a warning (never the whole batch). ``model_id`` (MLflow 3 LoggedModel)
        also attaches them to that model, e.g. a registered version's."""
        if not self.enabled:
            return
        ts = int(time.time() * 1000)
        points = []
        for key, value in metrics.items():
            try:
                number = float(value.item() if hasattr(value, "item") else value)
            except (TypeError, ValueError):
                log.warning("metric %r has non-numeric value %r; not logged", key, value)
                continue
            if not math.isfinite(number):
                log.warning("metric %r is %s at step %s", key, number, step)
            points.append((key[:MAX_KEY_LENGTH], number, ts, int(step or 0), model_id))
        if points:
            self._enqueue(points)

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """An H×W×3 uint8 image under ``key`` at ``step`` (MLflow's image slider steps through them)."""
        if self.enabled:
            self._call(f"log_image {key}", lambda: self.client.log_image(self.run_id, image, key=key, step=int(step)),
                       artifact=True)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        if self.enabled:
            self._call(f"log_figure {artifact_file}",
                       lambda: self.client.log_figure(self.run_id, figure, artifact_file), artifact=True)

    def log_sample_grid(self, columns: Sequence[Any], step: int) -> None:
        """The fixed validation pairs (at most :data:`SAMPLE_GRID_MAX_ROWS`), one row each, as image
        :data:`SAMPLES_KEY` at ``step``; ``columns`` as for :func:`grid_image`."""
        if not self.enabled:
            return
        try:
            grid = grid_image([c[:SAMPLE_GRID_MAX_ROWS] for c in columns])
        except ValueError as exc:
            log.warning("sample grid at step %d not logged: %s", step, exc)
            return
        self.log_image(grid, SAMPLES_KEY, step)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._call(f"log_text {artifact_file}", lambda: self.client.log_text(self.run_id, text, artifact_file),
                       artifact=True)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        if self.enabled:
            self._call(f"log_dict {artifact_file}",
                       lambda: self.client.log_dict(self.run_id, dict(data), artifact_file), artifact=True)

    def log_file(self, local_path: str | Path, artifact_dir: str) -> bool:
        """Upload one file into the run's artifact folder ``artifact_dir`` (a file of the same name is replaced);
        True when it arrived (False: MLflow is down; the caller keeps the file to try again)."""
        if not self.enabled:
            return False
        return self._call(f"log_artifact {artifact_dir}/{Path(local_path).name}",
                          lambda: self.client.log_artifact(self.run_id, str(local_path), artifact_dir) or True) is True

    def list_files(self, artifact_dir: str) -> list[str] | None:
        """The artifact paths of the files directly in ``artifact_dir`` (None: MLflow is down)."""
        if not self.enabled:
            return None
        return self._call(f"list_artifacts {artifact_dir}", lambda: [
            f.path for f in self.client.list_artifacts(self.run_id, artifact_dir) if not f.is_dir])

    def download(self, artifact_path: str, dst_dir: str | Path) -> str | None:
        """Download one artifact into ``dst_dir``; its local path (None: MLflow is down)."""
        if not self.enabled:
            return None
        return self._call(f"download {artifact_path}",
                          lambda: self.client.download_artifacts(self.run_id, artifact_path, str(dst_dir)))

    def set_terminated(self, status: str = "FINISHED") -> None:
        """End the run (``FINISHED``, ``FAILED`` or ``KILLED``) after :meth:`close` (queued metrics sent or counted
        lost in the run's tags); a resumed run is set RUNNING again."""
        if self.enabled:
            self.close()
            self._call("set_terminated", lambda: self.client.set_terminated(self.run_id, status=status), final=True)


__all__ = ["ARTIFACTS_LOST_TAG", "CLOSE_TIMEOUT_S", "DATA_SKIPPED", "DATA_WAIT", "EPOCH", "EPOCH_UNUSED", "LR",
           "METRICS_LATE_TAG", "METRICS_LOST_TAG", "METRIC_QUEUE_POINTS", "NAN_STEPS", "PHASE", "SAMPLES_KEY",
           "THROUGHPUT", "VAL_PSNR", "VAL_SSIM", "WORLD_SIZE", "Tracker", "flatten", "git_commit", "grid_image",
           "loss_metric", "run_params", "val_metric"]
