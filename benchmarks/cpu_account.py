"""Where a machine's CPU time went between two moments, per process group, from Linux /proc (empty elsewhere).

Used by benchmarks/data_throughput.py to show, for each Ray epoch, the CPU seconds of Ray Data's decode tasks (the
ray:: worker processes), the local S3 server, the driver, Ray's own services, other processes, idle time, and the
processes that exited in between (their time is in /proc/stat but no longer per process).

    account = CpuAccount(s3_pid=server.process.pid)
    before = account.snapshot()
    ...  # the work
    seconds = CpuAccount.delta(before, account.snapshot())   # {group: CPU seconds}
"""

from __future__ import annotations

import os
from pathlib import Path


class CpuAccount:
    """CPU seconds per process group between two /proc snapshots (Linux; empty elsewhere)."""

    GROUPS = ("decode tasks", "S3 server", "driver", "Ray services", "other", "idle", "exited processes")

    def __init__(self, s3_pid: int | None):
        self.s3_pid, self.hz = s3_pid, os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _group(self, pid: int, cmd: str) -> str:
        if pid == os.getpid():
            return "driver"
        if pid == self.s3_pid:
            return "S3 server"
        if cmd.startswith("ray::") and not cmd.startswith(("ray::_", "ray::Dashboard", "ray::Runtime")):
            return "decode tasks"  # Ray workers: ray::IDLE between tasks, ray::<op name> while running one
        return "Ray services" if "ray" in cmd else "other"

    def snapshot(self) -> dict:
        """Machine idle and busy seconds (/proc/stat) and each live process's (group, CPU seconds)."""
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return {}
        procs: dict[tuple[int, int], tuple[str, float]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            ticks = stat.rsplit(")", 1)[1].split()  # fields 3.. of proc(5): utime 14, stime 15, starttime 22
            procs[(int(entry.name), int(ticks[19]))] = (self._group(int(entry.name), cmd),
                                                         (int(ticks[11]) + int(ticks[12])) / self.hz)
        return {"idle": (fields[3] + fields[4]) / self.hz,
                "busy": (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / self.hz, "procs": procs}

    @staticmethod
    def delta(before: dict, after: dict) -> dict[str, float]:
        """CPU seconds per group between two snapshots. A process that exited in between is no longer in /proc:
        its CPU time in the interval is unknown per process but is in the machine's busy time, so it is shown as
        "exited processes" (busy time not found in the live processes)."""
        if not before or not after:
            return {}
        out = dict.fromkeys(CpuAccount.GROUPS, 0.0)
        out["idle"] = after["idle"] - before["idle"]
        for key, (group, cpu) in after["procs"].items():
            out[group] += cpu - before["procs"].get(key, (group, 0.0))[1]  # a new process: all its CPU time
        seen = sum(out[g] for g in CpuAccount.GROUPS if g != "idle")
        out["exited processes"] = max(0.0, after["busy"] - before["busy"] - seen)
        return out
