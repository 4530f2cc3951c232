"""Where a benchmark's CPU went: the worker's process, this (the load generator's), the box.

On a 2-core box shared by the broker, the load generator and the worker, a latency figure
alone does not say whether the worker was slow or starved. CPU seconds per answered request
do: a worker that spends C ms of one core per request cannot answer more than 1000/C a
second, whatever the queueing. Read from /proc (Linux); NaN elsewhere.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


@dataclass(frozen=True)
class CpuSample:
    at: float  # time.monotonic()
    worker_s: float  # the worker process's user + system CPU seconds
    self_s: float  # this process's (children not included)
    busy_s: float  # all cores' busy seconds since boot (not idle, not iowait)


def _proc_cpu_s(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) * _TICK_S  # utime, stime


def _busy_s() -> float:
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return math.nan
    ticks = [int(x) for x in first[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) * _TICK_S


def sample(worker_pid: int) -> CpuSample:
    t = os.times()
    return CpuSample(time.monotonic(), _proc_cpu_s(worker_pid), t.user + t.system, _busy_s())


def usage(a: CpuSample, b: CpuSample, answered: int) -> dict[str, float]:
    """Between two samples: the worker's and the generator's share of one core (%), the whole
    box's busy share (% of all its cores), and the worker's CPU ms per answered request."""
    wall = max(b.at - a.at, 1e-9)
    worker = b.worker_s - a.worker_s
    cores = os.cpu_count() or 1
    return {
        "worker_cpu_pct": 100 * worker / wall,
        "generator_cpu_pct": 100 * (b.self_s - a.self_s) / wall,
        "box_busy_pct": 100 * (b.busy_s - a.busy_s) / (wall * cores),
        "worker_cpu_ms_per_answer": 1000 * worker / answered if answered else math.nan,
    }
