"""benchmarks/data_throughput.py runs end to end (its own moto S3 server, its own Ray, a DataLoader) at a tiny size on
the training workers' data path (pconv.data.stream.WorkerDatasets) and prints the issue's two ratios and a CPU account
in which the decode tasks are found. Speed is not asserted.
The account's bookkeeping (benchmarks/cpu_account.py) is also checked on its own, with processes of known CPU time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load_benchmark

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.integration
def test_data_benchmark_prints_both_ratios_and_where_the_cpu_went(datasets_dir, own_ray_cluster, own_servers):
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONWARNINGS": "ignore"}  # its own Ray, never a test's
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(name, None)  # it starts and configures its own S3 server
    proc = subprocess.run(
        [sys.executable, "benchmarks/data_throughput.py", "--image-size", "64", "--repeat", "1", "--epochs", "1",
         "--floor-images", "16", "--n-masks", "40"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for ratio in ("raydata/dataloader", "raydata/decode_floor_per_cpu", "raydata/parallel_floor"):
        assert re.search(rf"ratio {ratio}: \d+\.\d\d", out), out
    assert "124 images" in out  # CBSD68 (68) + CelebA-HQ sample (56), once
    account = re.search(r"machine CPU time during the raydata epochs .*?: (.*)", out)
    assert account, out
    shares = {name.strip(): int(pct) for name, pct in re.findall(r"([A-Za-z0-9 ]+?) (\d+) %", account.group(1))}
    assert set(shares) == {"decode tasks", "S3 server", "driver", "Ray services", "other", "idle",
                           "exited processes"}
    assert 97 <= sum(shares.values()) <= 103  # rounded shares of the whole machine
    assert shares["decode tasks"] > 0 and shares["driver"] > 0  # the processes were found, not just idle time
    cost = re.search(r"decode tasks: \d+\.\d\d CPU-ms per image = (\d+\.\d\d)x the floor's", out)
    assert cost, out
    # the ceiling follows from the printed shares: 1 - the other processes' share (--cpus defaults to every core)
    ceiling = re.search(r"ceiling of ratio raydata/decode_floor_per_cpu on this machine: (\d\.\d\d) \(the other "
                        r"processes took (\d+) % .*?\), (\d+\.\d\d) at their measured", out)
    assert ceiling, out
    others = shares["S3 server"] + shares["driver"] + shares["Ray services"] + shares["other"]
    assert abs(int(ceiling.group(2)) - others) <= 2  # the same shares, rounded separately
    assert abs(float(ceiling.group(1)) - (1 - int(ceiling.group(2)) / 100)) <= 0.011
    assert float(ceiling.group(3)) == pytest.approx(float(ceiling.group(1)) / float(cost.group(1)), abs=0.011)


_BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="the CPU account reads Linux /proc")
def test_cpu_account_keeps_the_time_of_processes_that_exit_mid_interval():
    """CPU burnt between two snapshots by a process that has exited by the second one is shown as "exited
    processes" (not lost, not subtracted from its group); a process alive at both is in its group."""
    cpu_account = load_benchmark("cpu_account")
    account = cpu_account.CpuAccount(s3_pid=None)
    alive = subprocess.Popen([sys.executable, "-c", _BURN.format(s=0.6) + "time.sleep(60)"])
    try:
        before = account.snapshot()
        subprocess.run([sys.executable, "-c", _BURN.format(s=0.8)], check=True)  # starts and exits in between
        time.sleep(0.8)  # let the live one finish its burn
        cpu = cpu_account.CpuAccount.delta(before, account.snapshot())
    finally:
        alive.kill()
        alive.wait()
    assert set(cpu) == set(cpu_account.CpuAccount.GROUPS)
    assert cpu["exited processes"] >= 0.6, cpu  # the 0.8 s burn (10 ms ticks, plus interpreter start-up)
    assert cpu["other"] >= 0.3, cpu  # the live process's burn inside the interval
    assert all(v >= 0 for v in cpu.values()), cpu
