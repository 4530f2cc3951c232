"""What each handled batch adds to the metrics (adpulse/core/metrics.py), stage by stage.

Called by the handlers in streams/pipeline.py with the results the stages returned,
once per batch (never per record on the hot paths): the stages themselves count
nothing, so they run without a registry in their tests.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from schemas.messages import UNSET

if TYPE_CHECKING:
    from adpulse.core.metrics import Metrics
    from adpulse.core.settings import Settings
    from streams.decide import DecideResult
    from streams.interest import BatchResult
    from streams.join import JoinStep
    from streams.learn import LearnResult

log = logging.getLogger("streams.join")  # the join's lines keep the logger they had


def ingested(m: Metrics, result: BatchResult, n: int, started: float, oldest_ms: int) -> None:
    for (kind, outcome), count in result.outcomes.items():
        m.events.labels(kind, outcome).inc(count)
    m.table_writes.labels("interest").inc(len(result.writes))
    m.batch_events.observe(n)
    m.batch_seconds.observe(time.perf_counter() - started)
    m.freshness.observe(max(0.0, time.time() - oldest_ms / 1000))
    if result.newest_ts:
        m.newest_event_ts.set(result.newest_ts / 1000)


def decided(m: Metrics, settings: Settings, result: DecideResult) -> None:
    """Per decision only its latency is observed, where it is set (streams/pipeline.py)."""
    for (policy, placement), n in result.by_policy.items():
        m.decisions.labels(policy, placement).inc(n)
    for arm, n in result.by_arm.items():
        m.arm_decisions.labels(settings.experiment.split(":", 1)[0], arm).inc(n)
    for reason, n in result.no_fill.items():
        m.no_fill.labels(reason).inc(n)
    m.fallbacks.inc(result.fallbacks)
    for campaign, n in result.throttled.items():
        m.pacing_throttled.labels(campaign).inc(n)
    if result.rows_scored:
        m.scorer_rows.inc(result.rows_scored)
        m.scorer_batch_rows.observe(result.rows_scored)


def joined(m: Metrics, step: JoinStep, writes: int) -> None:
    for lab in step.labels:
        converted = lab.converted is not UNSET
        outcome = "converted" if converted else ("clicked" if lab.clicked else "zero")
        m.join_labels.labels("unknown" if lab.policy is UNSET else lab.policy, outcome).inc()
    if step.late_clicks:
        m.late_clicks.inc(step.late_clicks)
        log.info(
            "%d late click(s) after their decision's label: counted, not emitted",
            step.late_clicks,
        )
    m.pending_expired.inc(step.expired)
    m.table_writes.labels("pending").inc(writes)
    suspect_clicks(m, step.suspect)


def suspect_clicks(m: Metrics, found: list[tuple[str, str]]) -> None:
    """Count suspect clicks by rule; log them with the pseudonym (never a raw id)."""
    if not found:
        return
    by_rule: dict[str, list[str]] = {}
    for rule, user in found:
        by_rule.setdefault(rule, []).append(user)
    for rule, users in by_rule.items():
        m.suspect_clicks.labels(rule).inc(len(users))
        shown = ", ".join(sorted(set(users))[:5])
        n = len(users)
        log.info("%d suspect click(s), rule %s, not labelled; users %s", n, rule, shown)


def learned(m: Metrics, result: LearnResult) -> None:
    for outcome, n in result.outcomes.items():
        m.feedback_labels.labels(outcome).inc(n)
    m.table_writes.labels("learn").inc(len(result.writes))
