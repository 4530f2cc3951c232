"""Where a benchmark's CPU went: the worker's process, this (the load generator's), the box.

On a 2-core box shared by the broker, the load generator and the worker, a latency figure
alone does not say whether the worker was slow or starved. CPU seconds per answered request
do: a worker that spends C ms of one core per request cannot answer more than 1000/C a
second, whatever the queueing. Read from /proc (Linux); NaN elsewhere.

On a virtual machine the host may run other guests on the same physical cores: the
time a core was ready to run us but the hypervisor ran someone else is *steal*
(/proc/stat's eighth field). On the 2-core dev VM it was 2-47% of the box's time in the
same hour (2026-12-03), and it moves every latency figure, so the benches report it.
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
    worker_s: float  # the worker processes' user + system CPU seconds, summed
    self_s: float  # this process's (children not included)
    box: tuple[float, float, float]  # all cores' seconds since boot: in all, busy, stolen


def _proc_cpu_s(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) * _TICK_S  # utime, stime


def box_s() -> tuple[float, float, float]:
    """All cores' seconds since boot: in all, busy (not idle, not iowait), stolen."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return math.nan, math.nan, math.nan
    ticks = [int(x) for x in first[1:9]]  # user nice system idle iowait irq softirq steal
    total = sum(ticks)
    return total * _TICK_S, (total - ticks[3] - ticks[4]) * _TICK_S, ticks[7] * _TICK_S


def steal_pct(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """The share of the box's time between two :func:`box_s` readings that the hypervisor
    gave to other guests (%): NaN where nothing elapsed or /proc is not there."""
    total = b[0] - a[0]
    return 100 * (b[2] - a[2]) / total if total > 0 else math.nan


def sample(*worker_pids: int) -> CpuSample:
    """Now: the workers' CPU seconds (summed: a run may spread its load over several),
    this process's and the box's."""
    t = os.times()
    worker_s = sum(_proc_cpu_s(pid) for pid in worker_pids)
    return CpuSample(time.monotonic(), worker_s, t.user + t.system, box_s())


def usage(a: CpuSample, b: CpuSample, answered: int) -> dict[str, float]:
    """Between two samples: the workers' (summed) and the generator's share of one core (%),
    the whole box's busy share and the part of it stolen by the hypervisor (% of all its
    cores), and the workers' CPU ms per answered request."""
    wall = max(b.at - a.at, 1e-9)
    worker = b.worker_s - a.worker_s
    cores = os.cpu_count() or 1
    return {
        "worker_cpu_pct": 100 * worker / wall,
        "generator_cpu_pct": 100 * (b.self_s - a.self_s) / wall,
        "box_busy_pct": 100 * (b.box[1] - a.box[1]) / (wall * cores),  # steal included
        "box_steal_pct": steal_pct(a.box, b.box),
        "worker_cpu_ms_per_answer": 1000 * worker / answered if answered else math.nan,
    }
