"""The demo's training progress bar: the trainer runs in Ray workers, so a thread follows the run's MLflow metrics
(the latest step logged for the learning rate, and the phase) and moves a tqdm bar. It never raises."""

from __future__ import annotations

import logging
import threading

from pconv.tracking import runs as tracking
from pconv.tracking.store import client_for
log = logging.getLogger(__name__)


class TrainProgress(threading.Thread):
    """Polls MLflow every ``interval`` seconds for the run named ``run_name`` in ``experiment``."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, total: int, interval: float = 3.0):
        super().__init__(daemon=True, name="demo-train-progress")
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.total, self.interval = total, interval
        self._halt = threading.Event()
        self._finished = False

    def run(self) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.total, desc="train (both phases)", unit="step", dynamic_ncols=True)
        run_id = None
        try:
            client = client_for(self.tracking_uri)
            while not self._halt.wait(self.interval):
                try:
                    if run_id is None:
                        exp = client.get_experiment_by_name(self.experiment)
                        if exp is None:
                            continue
                        runs = client.search_runs([exp.experiment_id],
                                                  filter_string=f"attributes.run_name = '{self.run_name}'")
                        if not runs:
                            continue
                        run_id = runs[0].info.run_id
                    hist = client.get_metric_history(run_id, tracking.LR)
                    if hist:
                        step = max(m.step for m in hist)
                        if step > bar.n:
                            phase = client.get_run(run_id).data.metrics.get(tracking.PHASE)
                            bar.set_postfix(phase=int(phase) if phase is not None else "?", refresh=False)
                            bar.update(step - bar.n)
                except Exception as exc:  # noqa: BLE001 - a progress bar must never break training
                    log.debug("progress poll failed: %s", exc)
            bar.update(max(0, self.total - bar.n) if self._finished else 0)
        finally:
            bar.close()

    def finish(self, ok: bool) -> None:
        """Stop polling; with ``ok`` the bar is completed."""
        self._finished = ok
        self._halt.set()
        self.join(timeout=10)
