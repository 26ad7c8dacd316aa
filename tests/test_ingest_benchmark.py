"""benchmarks/ingest_throughput.py (issue 17): the Places2 ingest model's arithmetic, and the script end to end at
a tiny size (its own local Ray: run under ``flock /tmp/pconv-ray.lock``). Speed is not asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_benchmark

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_model_is_bound_by_cpus_or_by_the_nic_and_bills_launch_work_and_idle():
    bench = load_benchmark("ingest_throughput")
    slow = bench.ingest_model(100.0, 1, images=1_000_000, total_bytes=1e11, launch_s=0)
    assert slow["bound"] == "cpu" and slow["rate"] == 100.0 * bench.NODE_VCPUS
    assert slow["work_s"] == pytest.approx(1_000_000 / (100.0 * bench.NODE_VCPUS))
    fast = bench.ingest_model(1e6, 2, images=1_000_000, total_bytes=1e11, launch_s=0)
    per_image = 2 * 1e11 / 1_000_000  # read once, written once
    assert fast["bound"] == "network" and fast["rate"] == pytest.approx(2 * bench.NODE_GBIT * 1e9 / 8 / per_image)
    assert fast["total_s"] == pytest.approx(fast["list_s"] + fast["work_s"])
    billed = 2 * bench.NODE_PRICE_H * (fast["work_s"] + bench.IDLE_S) / 3600 + 1_000_000 * bench.GET_PRICE
    assert fast["dollars"] == pytest.approx(billed)
    assert bench.ingest_model(200.0, 4)["total_s"] < bench.ingest_model(200.0, 1)["total_s"]


@pytest.mark.slow
@pytest.mark.integration
def test_benchmark_prints_the_ratios_and_the_model(datasets_dir, own_ray_cluster):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "benchmarks/ingest_throughput.py", "--copies", "1", "--rounds", "1",
                           "--floor-images", "20", "--shard-size-mb", "8"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "124 photos" in out  # CBSD68 (68) + CelebA-HQ sample (56), once
    for ratio in ("ray/threads", "ray/decode_floor", "threads/decode_floor"):
        assert re.search(rf"ratio {ratio}: \d+\.\d\d", out), out
    assert re.search(r"K=4: [\d,]+ images/s \((cpu|network)-bound\)", out), out
