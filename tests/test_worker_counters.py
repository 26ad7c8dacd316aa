"""Per-worker counters are summed over all workers before they are logged (issue 15): ``data/skipped`` is the
corrupt rows dropped by EVERY rank, not rank 0's share, and a resumed run continues the count from its checkpoint;
the loss terms are averaged. Two real processes form a torch.distributed gloo group (what Ray Train sets up on CPU)
and run the training loop's own metric window (``pconv.train.loop.MetricWindow``), counters and the one all-reduce
helper (``pconv.train.state.WorkerContext.all_reduce``); the e2e check on MLflow is in tests/test_resume.py (the
2-worker runs, uninterrupted and restarted after a lost worker).

The metric window keeps its loss sums on the device (issue 25: no host read per step): the numbers it logs are those
of the host-side sum it replaced, and adding a step reads nothing back to the host."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import free_port

from pconv.core.config import TrainConfig
from pconv.core.losses import LOSS_TERMS
from pconv.tracking import runs
from pconv.train.loop import MetricWindow
from pconv.train.state import AmpSettings, TrainState, WorkerContext

WORKER = textwrap.dedent("""
    import json, sys

    import torch
    import torch.distributed as dist

    from pconv.core.config import TrainConfig
    from pconv.core.losses import LOSS_TERMS
    from pconv.train.loop import MetricWindow, skipped_rows
    from pconv.train.state import AmpSettings, Counters, TrainState, WorkerContext

    rank, port = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = WorkerContext(TrainConfig(images="i", masks="m"), rank, 2, torch.device("cpu"),
                        AmpSettings(False, None, False), None)

    def new_state(counters=None):
        model = torch.nn.Linear(1, 1)
        state = TrainState(model, torch.optim.Adam(model.parameters(), lr=2e-4),
                           torch.amp.GradScaler("cpu", enabled=False), step=1)
        if counters is not None:
            state.counters = counters
        return state

    state, window = new_state(), MetricWindow(ctx.device)
    # rank 0's batches carried 3 dropped rows, rank 1's 5 (+ 2 in a second window): as the loop counts them
    state.counters.skipped += skipped_rows({"skipped": torch.tensor([3, 0, 0, 0] if rank == 0 else [0, 5, 0, 0])})
    window.add({k: torch.tensor(float(1 + rank)) for k in LOSS_TERMS}, 0.1, 1.0, 4 * 2)
    first = window.flush(state, ctx)
    state.counters.skipped += skipped_rows({"skipped": torch.tensor([0, 0] if rank == 0 else [2, 0])})
    window.add({k: torch.tensor(float(1 + rank)) for k in LOSS_TERMS}, 0.1, 1.0, 4 * 2)
    second = window.flush(state, ctx)
    totals = state.counters.totals(ctx)  # what a checkpoint records (pconv.train.state.report)
    # a resumed worker group continues the run's counters from the checkpoint (every rank is given the same dict)
    resumed = new_state(Counters.from_record(totals, rank))
    resumed.counters.skipped += 1 if rank == 1 else 0
    window.add({k: torch.tensor(1.0) for k in LOSS_TERMS}, 0.1, 1.0, 4 * 2)
    after_resume = window.flush(resumed, ctx)
    # the one all-reduce helper, each reduction, and the agreement the data stream and the step skip use
    reduced = {op: ctx.all_reduce(torch.tensor([1.0 + rank, 10.0 * rank]), op).tolist() for op in ("sum", "mean", "min")}
    agree = [ctx.every_rank(True), ctx.every_rank(rank == 0), ctx.every_rank(torch.tensor(rank == 1))]
    dist.destroy_process_group()
    print(json.dumps({"first": first, "second": second, "totals": totals, "after_resume": after_resume,
                      "reduced": reduced, "agree": agree}))
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
        assert out["first"][runs.DATA_SKIPPED] == 3 + 5  # not rank 0's 3
        assert out["second"][runs.DATA_SKIPPED] == 3 + 5 + 2  # a running total of the run
        assert out["first"][runs.loss_metric("total")] == 1.5  # (1 + 2) / 2
        assert out["first"][runs.NAN_STEPS] == 0
        assert out["totals"] == {runs.DATA_SKIPPED: 10, runs.NAN_STEPS: 0}
        assert out["after_resume"][runs.DATA_SKIPPED] == 10 + 1  # continued once, not once per rank
        assert out["reduced"] == {"sum": [3.0, 10.0], "mean": [1.5, 5.0], "min": [1.0, 0.0]}
        assert out["agree"] == [True, False, False]


def _one_worker() -> tuple[WorkerContext, TrainState]:
    ctx = WorkerContext(TrainConfig(images="i", masks="m"), 0, 1, torch.device("cpu"), AmpSettings(False, None, False),
                        None)
    model = torch.nn.Linear(1, 1)
    state = TrainState(model, torch.optim.Adam(model.parameters(), lr=2e-4), torch.amp.GradScaler("cpu", enabled=False))
    return ctx, state


def _steps_of_terms() -> list[dict[str, torch.Tensor]]:
    """Loss terms of 5 steps as the loss returns them (float32 scalars), one of them not finite."""
    gen = torch.Generator().manual_seed(3)
    steps = [{k: torch.rand((), generator=gen) * 10 ** float(i % 3) for i, k in enumerate(LOSS_TERMS)}
             for _ in range(5)]
    steps[2] = {**steps[2], "hole": torch.tensor(float("nan"))}
    return steps


def test_metric_window_logs_the_numbers_of_the_host_side_sum_it_replaced():
    ctx, state = _one_worker()
    window = MetricWindow(ctx.device)
    steps = _steps_of_terms()
    for terms in steps:
        window.add(terms, 0.1, 0.5, 2)
    logged = window.flush(state, ctx)
    # the replaced code: each step's terms copied to the CPU as float64, non-finite steps left out, mean as float32
    sums, n = torch.zeros(len(LOSS_TERMS), dtype=torch.float64), 0
    for terms in steps:
        values = torch.stack([terms[k].detach().float().cpu() for k in LOSS_TERMS]).double()
        if torch.isfinite(values).all():
            sums += values
            n += 1
    expected = (sums / max(1, n)).to(torch.float32)
    assert n == 4
    assert [logged[runs.loss_metric(k)] for k in LOSS_TERMS] == [float(v) for v in expected]  # bit-equal
    assert logged[runs.THROUGHPUT] == pytest.approx(10 / 2.5) and logged[runs.DATA_WAIT] == pytest.approx(0.2)
    empty = window.flush(state, ctx)  # a new window: nothing added, no division by zero
    assert all(empty[runs.loss_metric(k)] == 0.0 for k in LOSS_TERMS)


def test_adding_a_step_to_the_metric_window_reads_nothing_back_to_the_host(monkeypatch):
    """Every way a tensor's value reaches Python fails inside ``add``: the per-step host sync is gone."""
    ctx, state = _one_worker()
    window = MetricWindow(ctx.device)
    steps = _steps_of_terms()
    with monkeypatch.context() as patched:
        for name in ("cpu", "item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
            def read(self, *args, _name=name, **kwargs):
                raise AssertionError(f"MetricWindow.add read a tensor on the host (Tensor.{_name})")
            patched.setattr(torch.Tensor, name, read)
        for terms in steps:
            window.add(terms, 0.1, 0.5, 2)
    assert window.flush(state, ctx)[runs.loss_metric("total")] > 0  # read once, at log time


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch's sync debug mode)")
def test_metric_window_add_does_not_synchronise_cuda():
    ctx, state = _one_worker()
    window = MetricWindow("cuda")
    steps = [{k: v.cuda() for k, v in terms.items()} for terms in _steps_of_terms()]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for terms in steps:
            window.add(terms, 0.1, 0.5, 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert window.flush(state, ctx)[runs.loss_metric("total")] > 0


def test_gpu_checks_finiteness_row_times_the_loops_own_check_once_per_step(monkeypatch):
    """benchmarks/gpu_check.py's "finiteness check per step" row (issue 25: the loop reads on the host, once per
    step, whether the loss is finite on every worker) times the loop's own check, WorkerContext.every_rank on
    isfinite(loss) between forward and backward, once per step, and the step without it calls nothing of the kind."""
    from conftest import load_benchmark

    gpu_check = load_benchmark("gpu_check")
    calls = []
    real = WorkerContext.every_rank

    def every_rank(self, flag):
        calls.append(bool(torch.as_tensor(flag)))
        return real(self, flag)

    monkeypatch.setattr(WorkerContext, "every_rank", every_rank)
    s = gpu_check.settings(dry_run=True)
    checked, plain = gpu_check.make_step(s, None, False, check_finite=True)[0], gpu_check.make_step(s, None, False)[0]
    for _ in range(2):
        checked()
    plain()
    assert calls == [True, True]  # one all-reduce + host read per checked step; none in the plain step
