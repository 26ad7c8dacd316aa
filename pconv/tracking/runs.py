"""MLflow tracking of training runs: the metric names (the one list), run params, sample grids, and the
:class:`Tracker` that logs into one run.

- Logging never stops training: every :class:`Tracker` call retries with bounded exponential backoff and, on
  final failure, warns and returns. After a failure the tracker "cools down" (drops calls without touching the
  network, counting them) so a dead server costs one bounded stall, not one per step.
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
NAN_STEPS = "train/nan_steps"
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
            if not is_permanent(exc):
                self._down_until = time.monotonic() + self.policy.cooldown_s
            log.warning("MLflow %s failed for run %s after retries; continuing without it: %s", what, self.run_id,
                        short_error(exc))
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

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, model_id: str | None = None) -> None:
        """Numeric metrics at ``step``; non-numeric values are skipped with a warning (never the whole batch).
        ``model_id`` (MLflow 3 LoggedModel) also attaches them to that model, e.g. a registered version's."""
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
            batch.append(Metric(key[:MAX_KEY_LENGTH], number, ts, int(step or 0), model_id=model_id))
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            chunk = batch[i:i + MAX_METRICS_PER_BATCH]
            self._call("log_metrics", lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk))

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """An H×W×3 uint8 image under ``key`` at ``step`` (MLflow's image slider steps through them)."""
        if self.enabled:
            self._call(f"log_image {key}", lambda: self.client.log_image(self.run_id, image, key=key, step=int(step)))

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        if self.enabled:
            self._call(f"log_figure {artifact_file}",
                       lambda: self.client.log_figure(self.run_id, figure, artifact_file))

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
            self._call(f"log_text {artifact_file}", lambda: self.client.log_text(self.run_id, text, artifact_file))

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        if self.enabled:
            self._call(f"log_dict {artifact_file}",
                       lambda: self.client.log_dict(self.run_id, dict(data), artifact_file))

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
        """End the run (``FINISHED``, ``FAILED`` or ``KILLED``); a resumed run is set RUNNING again."""
        if self.enabled:
            self._call("set_terminated", lambda: self.client.set_terminated(self.run_id, status=status))


__all__ = ["DATA_SKIPPED", "DATA_WAIT", "EPOCH", "LR", "NAN_STEPS", "PHASE", "SAMPLES_KEY", "THROUGHPUT", "VAL_PSNR",
           "VAL_SSIM", "Tracker", "flatten", "git_commit", "grid_image", "loss_metric", "run_params", "val_metric"]
