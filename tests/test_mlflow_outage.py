"""Training survives a 60 s MLflow outage (issue 26 item 5, "MLflow"): the real tracking server of this module is
stopped for 60 s in the middle of a one-worker training run on the session's Ray and started again on the same port
with the same backend store. Training keeps stepping through the outage (no step waits on the dead server: the
metrics wait in the tracker's queue), and when the run ends every metric of every step (``log_every=1``) is in the
MLflow run with its original step and timestamp; the run's tags say nothing was lost and how many points came late.

Pacing (what keeps the test short and the outage exactly 60 s): the step hook asks for the outage at the batch of
step :data:`STOP_AT` and waits until the server is down; during the outage rank 0 sleeps :data:`PACE_S` per step,
so ~40 steps of a tiny model (32 px, batch 2) spread over it instead of the run ending inside it; at step
:data:`HOLD_AT` it waits for the server to be back (the pacing alone takes ~54 s, so that wait is the outage's last
seconds and the restart), and :data:`TAIL` more steps run with the server up.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlflow_server import mlflow_server  # noqa: F401 - module-scoped fixture
from pconv.core.config import TrainConfig
from pconv.core.losses import LOSS_TERMS
from pconv.tracking import runs
from pconv.train.loop import StepEvent

OUTAGE_S = 60.0      # the outage
STOP_AT = 3          # steps 1-2 log with the server up
PACE_S = 1.5         # rank 0's pace while the server is down
HOLD_AT = STOP_AT + 36
TAIL = 2
TOTAL = HOLD_AT + TAIL
MAX_GAP_S = PACE_S + 6.5  # a step that waited on MLflow (the old synchronous retries: ~15 s) shows as a longer gap
STEP_KEYS = [runs.loss_metric(t) for t in LOSS_TERMS] + [runs.LR, runs.PHASE, runs.EPOCH, runs.THROUGHPUT,
                                                          runs.DATA_WAIT, runs.DATA_SKIPPED, runs.NAN_STEPS]


def wait_for(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.05)


@dataclass
class OutagePacer:
    """The step hook (rank 0): writes ``<step> <time>`` per batch drawn to ``steps.txt``; asks for the outage at
    :data:`STOP_AT` (file ``stop``) and waits for ``stopped``; sleeps :data:`PACE_S` per step until ``restarted``;
    waits for ``restarted`` at :data:`HOLD_AT`."""

    folder: str

    def __call__(self, event: StepEvent) -> None:
        if event.kind != "batch" or event.rank != 0:
            return
        folder, step = Path(self.folder), event.step + 1
        with open(folder / "steps.txt", "a") as f:
            f.write(f"{step} {time.time()}\n")
        if step == STOP_AT:
            (folder / "stop").touch()
            wait_for(folder / "stopped", 120)
        elif step == HOLD_AT:
            wait_for(folder / "restarted", 120)
        elif (folder / "stopped").exists() and not (folder / "restarted").exists():
            time.sleep(PACE_S)


def pacer(folder: Path) -> OutagePacer:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the Ray workers cannot import this module
    return OutagePacer(str(folder))


class Outage(threading.Thread):
    """Stops ``server`` when the hook asks, for :data:`OUTAGE_S`, then starts it again on the same port; records
    the wall-clock times (``stopped``, ``restarting``). ``abort`` (a run that failed): no outage, or a shorter one."""

    def __init__(self, server, folder: Path) -> None:
        super().__init__(daemon=True)
        self.server, self.folder = server, folder
        self.stopped = self.restarting = 0.0
        self.abort = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not (self.folder / "stop").exists():
                if self.abort.wait(0.05):
                    return
            self.server.stop()
            self.stopped = time.time()
            (self.folder / "stopped").touch()
            self.abort.wait(OUTAGE_S)
            self.restarting = time.time()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            if self.server.process is None:
                self.server.start()
            (self.folder / "restarted").touch()


@pytest.mark.slow
def test_training_steps_through_a_60s_mlflow_outage_and_its_metrics_arrive_late(
        prepared_shards, tmp_path, ray_local, mlflow_server):
    from mlflow import MlflowClient

    from pconv.train.driver import run

    folder = tmp_path / "pace"
    folder.mkdir()
    outage = Outage(mlflow_server, folder)
    outage.start()
    cfg = TrainConfig(images=prepared_shards["images"], masks=prepared_shards["masks"], image_size=32, batch_size=2,
                      workers=1, phase1_steps=TOTAL, phase2_steps=0, checkpoint_every=1000, val_every=1000,
                      sample_every=1000, log_every=1, val_size=2, vgg_weights="random",
                      storage=str(tmp_path / "runs"), run_name="outage", register_as="")
    try:
        summary = run(cfg, step_hook=pacer(folder))
    finally:
        outage.abort.set()  # a run that failed: no (further) outage; the server is up again for the next test
        outage.join(timeout=240)
    assert outage.error is None and outage.stopped and outage.restarting
    assert summary.status == "finished" and summary.step == TOTAL

    # Training went on while the server was down, at its own pace: no step waited on MLflow.
    lines = (folder / "steps.txt").read_text().splitlines()
    drawn = {int(step): float(t) for step, t in (line.split() for line in lines)}
    during = sorted(s for s, t in drawn.items() if outage.stopped < t < outage.restarting)
    assert len(during) >= 25, (len(during), drawn)
    gaps = {s: drawn[s + 1] - drawn[s] for s in during if s + 1 in drawn and s != HOLD_AT
            and drawn[s + 1] < outage.restarting}
    assert gaps and max(gaps.values()) < MAX_GAP_S, gaps

    # Every step's metrics are in the run, with the step and the time they were logged at; nothing lost.
    client = MlflowClient(mlflow_server.url)
    finished = client.get_run(summary.mlflow_run_id)
    assert finished.info.status == "FINISHED"
    history = {key: client.get_metric_history(summary.mlflow_run_id, key) for key in STEP_KEYS}
    missing = {(key, step) for key in STEP_KEYS for step in range(1, TOTAL + 1)} - {
        (key, m.step) for key, ms in history.items() for m in ms}
    tags = finished.data.tags
    assert int(tags[runs.METRICS_LOST_TAG]) == len(missing) == 0, sorted(missing)
    assert tags[runs.ARTIFACTS_LOST_TAG] == "0"
    # the points logged while the server was down waited in the queue and arrived after it came back
    assert int(tags[runs.METRICS_LATE_TAG]) >= len(during) * len(STEP_KEYS), (tags, len(during))
    logged_at = {m.step: m.timestamp / 1000 for m in history[runs.loss_metric("total")]}
    inside = [s for s in during if s + 1 in during]  # step s's metrics are logged between batches s and s + 1
    assert inside and all(outage.stopped < logged_at[s] < outage.restarting for s in inside), (
        {s: logged_at[s] for s in inside}, outage.stopped, outage.restarting)
    print(f"outage {outage.restarting - outage.stopped:.0f} s: {len(during)} steps while down, longest gap "
          f"{max(gaps.values()):.1f} s, {tags[runs.METRICS_LATE_TAG]} metric points sent late, none lost")
