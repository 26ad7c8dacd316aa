"""Per-worker counters are summed over all workers before they are logged (issue 15): ``data/skipped`` is the
corrupt rows dropped by EVERY rank, not rank 0's share, and a resumed run continues the count from its checkpoint;
the loss terms are averaged. Two real processes form a torch.distributed gloo group (what Ray Train sets up on CPU)
and run the training loop's own metric window (``pconv.train.loop._Meter``); the e2e check on MLflow is in
tests/test_resume.py (the 2-worker runs, uninterrupted and restarted after a lost worker)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from conftest import free_port

from pconv.tracking import runs as tracking
WORKER = textwrap.dedent("""
    import json, sys
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from pconv.train import loop
    from pconv.core.losses import LOSS_TERMS

    rank, port = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = SimpleNamespace(rank=rank, world=2, device=torch.device("cpu"))
    state = SimpleNamespace(optimizer=SimpleNamespace(param_groups=[{"lr": 2e-4}]), phase=1, epoch=0, step=1)
    meter = loop._Meter()
    # rank 0's batches carried 3 dropped rows, rank 1's 5 (+ 2 in a second window): as the loop counts them
    meter.skipped += loop._sum_skipped({"skipped": torch.tensor([3, 0, 0, 0] if rank == 0 else [0, 5, 0, 0])})
    meter.add({k: torch.tensor(float(1 + rank)) for k in LOSS_TERMS}, 0.1, 1.0, 4 * 2)
    first = meter.flush(state, ctx)
    meter.skipped += loop._sum_skipped({"skipped": torch.tensor([0, 0] if rank == 0 else [2, 0])})
    meter.add({k: torch.tensor(float(1 + rank)) for k in LOSS_TERMS}, 0.1, 1.0, 4 * 2)
    second = meter.flush(state, ctx)
    totals = meter.totals(ctx)  # what a checkpoint records (train_checkpoint.report)
    # a resumed worker group continues the run's counters from the checkpoint (every rank is given the same dict)
    resumed = loop._Meter(totals, rank)
    resumed.skipped += 1 if rank == 1 else 0
    resumed.add({k: torch.tensor(1.0) for k in LOSS_TERMS}, 0.1, 1.0, 4 * 2)
    after_resume = resumed.flush(state, ctx)
    dist.destroy_process_group()
    print(json.dumps({"first": first, "second": second, "totals": totals, "after_resume": after_resume}))
""")


def test_skipped_rows_are_summed_over_the_workers_and_losses_averaged(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    for out in outs:  # every rank computes the same values (rank 0 logs them)
        assert out["first"][tracking.DATA_SKIPPED] == 3 + 5  # not rank 0's 3
        assert out["second"][tracking.DATA_SKIPPED] == 3 + 5 + 2  # a running total of the run
        assert out["first"][tracking.loss_metric("total")] == 1.5  # (1 + 2) / 2
        assert out["first"][tracking.NAN_STEPS] == 0
        assert out["totals"] == {tracking.DATA_SKIPPED: 10, tracking.NAN_STEPS: 0}
        assert out["after_resume"][tracking.DATA_SKIPPED] == 10 + 1  # continued once, not once per rank
