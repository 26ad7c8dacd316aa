"""benchmarks/elastic_cost.py (issue 26): the spot cost model's laws on its own numbers — an epoch on spot costs the
spot fraction of on demand without reclaims; reclaims cost more without the notice checkpoint and more again
without elasticity, growing with the rate; the notice saves exactly the expected redo time; the table and the
headline ratio print."""

from __future__ import annotations

import sys

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def ec():
    yield load_benchmark("elastic_cost")
    sys.modules.pop("elastic_cost", None)
    sys.modules.pop("scaling_model", None)


def test_spot_costs_follow_the_model(ec):
    costs = ec.Costs(restart_s=8.0, resume_s=2.4, replace_min=7.0, checkpoint_min=15.0, spot_fraction=0.3)
    for node, gpus in (("p3.2xlarge", 8), ("p3.16xlarge", 32)):
        on_demand, hours, n = ec.per_epoch(ec.Plan(node, gpus, False, 0.0, True, False), costs)
        spot_free, spot_hours, _ = ec.per_epoch(ec.Plan(node, gpus, True, 0.0, False, False), costs)
        assert n == 0 and spot_hours == hours and spot_free == pytest.approx(0.3 * on_demand)
        previous = spot_free
        for rate in (0.02, 0.05, 0.10):
            plain, notice, elastic = (ec.per_epoch(ec.Plan(node, gpus, True, rate, nt, el), costs)
                                      for nt, el in ((False, False), (True, False), (True, True)))
            assert plain[0] > notice[0] > elastic[0] > spot_free and plain[0] > previous
            previous = plain[0]
            # the notice saves half a checkpoint interval per interruption on every node
            nodes = gpus // ec.NODE_TYPES[node].gpus
            saved = plain[2] * (15.0 / 2 / 60) * nodes * ec.NODE_TYPES[node].usd_per_hour * 0.3
            assert plain[0] - notice[0] == pytest.approx(saved)


def test_the_script_prints_the_table_and_the_ratio(ec, capsys):
    ec.main(["--gpus", "8", "--rates", "0", "0.05"])
    out = capsys.readouterr().out
    assert "assumptions:" in out and "spot 30% of it" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("   8 ")]
    assert len(rows) == 2 * (1 + 1 + 3)  # per node type: on demand, spot 0 %, spot 5 % x (notice, elastic) choices
    assert next(r for r in rows if r[1] == "p3.16xlarge" and r[2] == "on-demand")[-1] == "1.00"
    costs = ec.Costs(ec.RESTART_S, ec.RESUME_S, ec.REPLACE_MIN, ec.CHECKPOINT_MIN, ec.SPOT_FRACTION)
    ratio = (ec.per_epoch(ec.Plan("p3.2xlarge", 8, True, 0.05, True, False), costs)[0]
             / ec.per_epoch(ec.Plan("p3.16xlarge", 8, False, 0.0, True, False), costs)[0])
    assert f"/ on-demand p3.16xlarge, 8 GPUs: {ratio:.2f}" in out
    spot_row = next(r for r in rows if r[1] == "p3.2xlarge" and r[3] == "5%" and r[4:6] == ["yes", "no"])
    assert spot_row[-1] == f"{ratio:.2f}"  # the headline is that row of the table
