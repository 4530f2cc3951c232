"""``adpulse bench gaps``: the CPU of one decision call back to back and with gaps between calls.

Why: on the 2-core box the same in-process decision took about 1.4x the CPU (up to
2.5x in a first script) when calls were a few milliseconds apart as in a tight loop
(docs/decide.md, "Tried and left, with figures"): part of why a worker spends 3 ms of
CPU per answer at 250 requests/s and 1 ms at 1,000/s. Other machines (the GPU box) may
differ, so the figure is a command, not a one-off script.

The worker's decision call (:class:`~adpulse.bench.decisionpath.DecisionPath`, as in
``bench serve``'s in-process baseline: one request of ``candidates`` ads, in-memory
copies of the worker's tables) runs ``calls`` times per gap, each call timed with
``time.thread_time`` (CPU, not wall time), with ``time.sleep(gap)`` (or a busy wait,
``spin``) before it. Rounds go through every gap in turn, so all see the same machine.
Per gap: the mean CPU of a call (what a worker pays) and the median call, each the
median over rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from adpulse.bench import machine, machine_line
from adpulse.bench.decisionpath import DecisionPath, request_bodies, synthetic_inputs


@dataclass(frozen=True)
class GapsBench:
    gaps_ms: tuple[float, ...] = (0.0, 0.2, 1.0, 2.0, 4.0)
    calls: int = 400  # timed calls per gap per round
    rounds: int = 3
    users: int = 10_000
    candidates: int = 100
    ads: int = 2_000
    spin: bool = False  # busy-wait the gap instead of sleeping

    @classmethod
    def smoke(cls) -> GapsBench:
        return cls(gaps_ms=(0.0, 1.0), calls=5, rounds=1, users=50, ads=50, candidates=10)


def _wait(seconds: float, spin: bool) -> None:
    if not spin:
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _cpu_ms(
    path: DecisionPath, bodies: list[bytes], gap_s: float, spin: bool
) -> tuple[float, float]:
    """Mean and median CPU ms of one call over ``bodies``, each after a gap of ``gap_s``.
    The mean is what a worker pays (CPU adds up); the median leaves the rare slow call out."""
    cpu = []
    for body in bodies:
        if gap_s > 0:
            _wait(gap_s, spin)
        t0 = time.thread_time()
        path.decide([body])
        cpu.append(time.thread_time() - t0)
    return 1000 * statistics.fmean(cpu), 1000 * statistics.median(cpu)


def run(cfg: GapsBench, log: Callable[[str], None] = print) -> dict[str, Any]:
    ads, values = synthetic_inputs(cfg.users, cfg.ads, 10)
    path = DecisionPath.build(ads, values)
    ad_ids = [a["ad_id"] for a in ads]
    warm = request_bodies(ad_ids, cfg.users, cfg.candidates, max(20, cfg.calls // 4), 5, "w")
    for body in warm:
        path.decide([body])
    means: dict[float, list[float]] = {g: [] for g in cfg.gaps_ms}
    medians: dict[float, list[float]] = {g: [] for g in cfg.gaps_ms}
    for r in range(cfg.rounds):
        for i, gap in enumerate(cfg.gaps_ms):
            bodies = request_bodies(ad_ids, cfg.users, cfg.candidates, cfg.calls, 100 * r + i, "g")
            mean, median = _cpu_ms(path, bodies, gap / 1000, cfg.spin)
            means[gap].append(mean)
            medians[gap].append(median)
        log(f"  round {r + 1}/{cfg.rounds}, mean CPU ms a call: " + ", ".join(
            f"{g:g} ms {means[g][-1]:.3f}" for g in cfg.gaps_ms))  # fmt: skip
    cpu = [statistics.median(means[g]) for g in cfg.gaps_ms]
    return {
        "gaps_ms": list(cfg.gaps_ms),
        "cpu_ms_per_decision": cpu,
        "ratio_to_first": [c / cpu[0] if cpu[0] > 0 else float("nan") for c in cpu],
        "median_call_cpu_ms": [statistics.median(medians[g]) for g in cfg.gaps_ms],
        "per_round": {f"{g:g}": means[g] for g in cfg.gaps_ms},
        "wait": "spin" if cfg.spin else "sleep",
        "calls": cfg.calls, "rounds": cfg.rounds, "candidates": cfg.candidates,
        "machine": machine(),
    }  # fmt: skip


def result_line(res: dict[str, Any]) -> str:
    rows = zip(res["gaps_ms"], res["cpu_ms_per_decision"], res["ratio_to_first"], strict=True)
    parts = [f"{g:g} ms {c:.3f} ({x:.2f}x)" for g, c, x in rows]
    return (f"gaps: CPU ms per decision ({res['candidates']} candidates) by gap between calls "
            f"({res['wait']}; mean of {res['calls']} calls, median of {res['rounds']} rounds): "
            + ", ".join(parts) + f"; {machine_line(res['machine'])}")  # fmt: skip
